"""Shared fixtures: a real 2-node Ray cluster (both nodes on this machine) and a tiny synthetic dataset.

Ray 2.60 turns token auth on for clusters it starts; every process of the test session runs with
``RAY_AUTH_MODE=disabled`` (set here, before Ray is imported, so workers inherit it).
"""

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray Train's controller polls its workers every 2 s, so a run's end (and each report) waits up to 2 s more
# for the next poll: seconds per fit(), of which the suite runs dozens. A poll that takes longer is awaited at
# the next one (a worker is declared dead only after RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S, 10 min).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# Each fit() also starts a PreemptionWatcher actor (one more Python process that imports Ray, to log node
# drains on spot instances): 2-3 s of a tiny fit on 2 cores (measured 22.0 s against 19.3 s, 8 fits each).
# The nodes and every process they start inherit this.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

import pytest  # noqa: E402

# Label-free scores rest on float32 products, whose last bits depend on the BLAS kernel's handling of the
# block shape and thread count: bitwise the same whatever the block on OpenBLAS's SkylakeX kernels, but not on
# its Haswell ones (AVX2 CPUs, or OPENBLAS_CORETYPE=Haswell, as the AMD EPYC of 6 December 2026 had set; 3e-9
# apart there). A wrong row, column or piece moves a score by orders of magnitude more.
SCORE_RTOL, SCORE_ATOL = 1e-6, 1e-7


def assert_scores_close(got: dict, want: dict) -> None:
    """The same score keys, each value within float32 product rounding (``SCORE_RTOL``, ``SCORE_ATOL``)."""
    import math

    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    for key, value in want.items():
        assert math.isclose(got[key], value, rel_tol=SCORE_RTOL, abs_tol=SCORE_ATOL), (key, got[key], value)


TINY_SYNTH = {"seed": 3, "num_train_ids": 6, "num_test_ids": 4, "num_distractors": 6, "num_junk": 3,
              "min_images": 3, "max_images": 5, "mean_images": 4, "height": 32, "width": 16}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _own_ports() -> list[str]:
    """``ray start`` flags for the ports a node would otherwise take at their fixed defaults: nodes on one host
    must not share them."""
    return [f"--dashboard-agent-listen-port={_free_port()}", f"--metrics-export-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}"]


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _stat(pid) -> tuple[str, str, int, int] | None:
    """(name, state, parent pid, process group) of a process, from /proc (None when it is gone)."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return None
    name = stat[stat.index("(") + 1:stat.rindex(")")]
    state, ppid, pgrp = stat[stat.rindex(")") + 2:].split()[:3]
    return name, state, int(ppid), int(pgrp)


def _alive(pid) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[1] != "Z"


def _processes():
    return [(int(d), st) for d in os.listdir("/proc") if d.isdigit() and (st := _stat(d)) is not None]


def _raylets_and_their_workers(pgids) -> tuple[list[int], list[int]]:
    """The live raylets of these process groups and the live children of those raylets, from one /proc scan."""
    live = [(pid, st) for pid, st in _processes() if st[1] != "Z"]
    raylets = [pid for pid, (name, _, _, pgrp) in live if pgrp in pgids and name == "raylet"]
    return raylets, [pid for pid, (_, _, ppid, _) in live if ppid in raylets]


@pytest.fixture(scope="session")
def ray_cluster():
    """A real 2-node Ray cluster on this machine, shared by the whole session (two Ray instances on one machine
    confuse Ray Train's placement-group cleaner): ``ray start --head --block`` and a second ``ray start
    --block`` with ports of its own, 1 CPU and 2 clustering slots each, stopped by PID (never ``ray stop``).
    The second node declares one GPU that is not there (``--num-gpus=1`` on a machine without one): what a
    GPU share for the feature store (``ray.store_gpus``) is scheduled on and checked against.
    Two train workers hold every CPU slot, one per node, so the feature-store actor must not need one (the
    deadlock the design warns about), and a label update's tasks spread over both nodes. With the head's
    dashboard: Ray Train's PlacementGroupCleaner needs the State API to free the placement group of a trial
    that ASHA stopped; without it the group leaks and the next trial waits forever for its CPU."""
    import json
    import shutil
    import signal
    import subprocess
    import sys
    import tempfile
    import time
    from pathlib import Path

    import ray

    from ureid.runtime.tasks import SLOT

    ray_bin = str(Path(sys.executable).parent / "ray")
    temp = tempfile.mkdtemp(prefix="ureid-t-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = _free_port()
    common = ["--block", "--num-cpus=1", f"--resources={json.dumps({SLOT: 2})}", "--object-store-memory=500000000"]

    logs = Path(temp) / "logs-nodes"
    logs.mkdir()
    # Each node runs under a watchdog that ends the node's process group when this pytest process is gone
    # (killed by a CI timeout, say): a node must never outlive the session that started it
    # (`ray start --block` can hang on SIGTERM once its raylet is gone: SIGKILL follows).
    watch = [sys.executable, "-c", "import os, signal, subprocess, sys, time\n"
             "node = subprocess.Popen(sys.argv[2:])\n"
             "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
             "while node.poll() is None:\n"
             "    if os.getppid() != int(sys.argv[1]):\n"
             "        os.killpg(0, signal.SIGTERM)\n"
             "        time.sleep(15)\n"
             "        os.killpg(0, signal.SIGKILL)\n"
             "    time.sleep(1)\n", str(os.getpid())]
    nodes = [subprocess.Popen(
        [*watch, ray_bin, "start", "--head", f"--port={port}", f"--temp-dir={temp}", "--num-gpus=0", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={_free_port()}", *common, *_own_ports()],
        stdout=open(logs / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)]
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while not _listening(port):  # the head's GCS is up
            assert time.time() < deadline and nodes[0].poll() is None, (logs / "head.log").read_text()[-3000:]
            time.sleep(0.2)
        second = Path(temp) / "n2"  # its own session folder, as on another machine (one log monitor per file)
        second.mkdir()
        nodes.append(subprocess.Popen(
            [*watch, ray_bin, "start", f"--address={address}", f"--temp-dir={second}", "--num-gpus=1", *common,
             *_own_ports()],
            stdout=open(logs / "node.log", "w"), stderr=subprocess.STDOUT, start_new_session=True))
        ray.init(address=address, log_to_driver=False)
        while len([n for n in ray.nodes() if n["Alive"]]) < 2 or ray.cluster_resources().get("CPU", 0) < 2:
            assert time.time() < deadline and nodes[1].poll() is None, (logs / "node.log").read_text()[-3000:]
            time.sleep(0.5)
        yield
    finally:
        ray.shutdown()
        # The raylets first and alone, gracefully: a raylet ends its workers (nodes SIGKILLed after 5 s left an
        # orphaned TrainController behind) and tells the GCS, which must still be up (with the whole process
        # group SIGTERMed at once the raylets waited 10-30 s for the stopping GCS; alone they take a fraction of
        # a second). Then what is left (GCS, dashboard, monitor, `ray start`, the watchdog) holds no one's work
        # and each node's own process group is SIGKILLed.
        # They usually take under a second; once in a CI run on 7 December one of them outlived a 60 s wait:
        # after 15 s whatever is left is named in a warning and SIGKILLed (the workers too: they are not in
        # the node's process group).
        raylets, workers = _raylets_and_their_workers({node.pid for node in nodes})
        for pid in raylets:
            os.kill(pid, signal.SIGTERM)
        deadline = time.time() + 15
        while any(_alive(pid) for pid in raylets + workers) and time.time() < deadline:
            time.sleep(0.2)
        left = [(pid, st[0]) for pid in raylets + workers if (st := _stat(pid)) is not None and st[1] != "Z"]
        if left:
            import warnings

            warnings.warn(f"still running 15 s after their raylets were sent SIGTERM, SIGKILLed: {left}")
            for pid, _ in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for node in nodes:
            try:
                os.killpg(node.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            node.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    from ureid.data.synthetic import generate

    root = tmp_path_factory.mktemp("data") / "tiny"
    generate(root, **TINY_SYNTH)
    return root
