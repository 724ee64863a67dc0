"""Faults cost at most the stage they hit (issue 14, point 3). Each kill is a real SIGKILL of a real process on
the test session's Ray instance: the feature-store actor (it restarts and reloads its finished updates and the
current stage's shards from the run folder), a Ray Train worker (Ray Train restarts the worker group, which
continues from the last stage checkpoint) and the driver (``--resume``). Every faulted run must end with the
labels and per-stage numbers of an uninterrupted run of the same config. The uninterrupted run logs through a
real local ``mlflow server`` (the multi-node recipe of the README: a tracking server every node reaches, its
artifacts served by it), so the Train controller's per-stage callbacks and the driver's artifacts go over HTTP."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray

from conftest import _free_port, _own_ports
from test_pipeline import tiny_cfg
from ureid.config import CONFIG_DIR, load_config
from ureid.methods import METHODS, Targets, UpdateContext
from ureid.runtime.callbacks import read_history
from ureid.runtime.experiment import run_experiment
from ureid.runtime.feature_store import FeatureStore, StoreInputs, save_inputs

# Three stages, and later stages long enough (20 epochs of 2 batches) for a kill to land inside their training;
# no pictures (test_pipeline checks them).
FAULT_RUN = ("schedule.max_stages=3", "train.stage_epochs=20", "tracking.pictures=false")


def _alive_pids(class_name: str) -> set[int]:
    from ray.util.state import list_actors

    actors = list_actors(address=ray.get_runtime_context().gcs_address, limit=1000,
                         filters=[("class_name", "=", class_name), ("state", "=", "ALIVE")])
    return {a.pid for a in actors}


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def _wait(what, timeout=240, alive=lambda: True):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = what()
        if got:
            return got
        assert alive(), "the run ended before the fault could be injected"
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the run to reach the point of the fault")


def _checkpointed(run_dir: Path, stage: int) -> bool:
    return any(run_dir.glob(f"ray/*/stage_{stage:03d}/state.pt"))


def _recorded(run_dir: Path) -> int:
    path = run_dir / "history.jsonl"
    return len(read_history(path)) if path.is_file() else 0


def _same_run(got: dict, want: dict) -> None:
    assert [h["stage"] for h in got["history"]] == [h["stage"] for h in want["history"]] == [0, 1, 2]
    assert np.array_equal(np.load(Path(got["run_dir"]) / "labels.npy"), np.load(Path(want["run_dir"]) / "labels.npy"))
    for a, b in zip(got["history"], want["history"]):
        assert a["num_clusters"] == b["num_clusters"] and a["num_classes"] == b["num_classes"]
        assert a["mAP"] == pytest.approx(b["mAP"], abs=1e-6) and a["loss"] == pytest.approx(b["loss"], rel=1e-5)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` on 127.0.0.1 with a SQLite store and served artifacts; yields (uri, artifact folder)."""
    import urllib.request

    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    server = subprocess.Popen(
        [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root}/server.db", "--artifacts-destination", str(root / "artifacts")],
        stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, (root / "server.log").read_text()[-3000:]
                time.sleep(0.5)
        yield uri, root / "artifacts"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


_UNINTERRUPTED = {}


def _uninterrupted(tiny_root, tmp_path_factory, mlflow_server) -> dict:
    if not _UNINTERRUPTED:
        out = tmp_path_factory.mktemp("uninterrupted")
        cfg = tiny_cfg("buc", tiny_root, out, *FAULT_RUN, f"tracking.tracking_uri={mlflow_server[0]}")
        _UNINTERRUPTED.update(run_experiment(cfg, quiet=True))
    return _UNINTERRUPTED


def test_a_run_logs_through_a_local_mlflow_server(ray_cluster, tiny_root, tmp_path_factory, mlflow_server):
    from mlflow.tracking import MlflowClient

    summary = _uninterrupted(tiny_root, tmp_path_factory, mlflow_server)
    uri, artifacts = mlflow_server
    assert summary["tracking_uri"] == uri
    client = MlflowClient(uri)
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "num_clusters")) == [0, 1, 2]
    assert {"labels.npy", "summary", "best_checkpoint"} <= {f.path for f in client.list_artifacts(run.info.run_id)}
    assert list(artifacts.rglob("labels.npy")), "the server stored the artifacts it was sent"


def test_a_store_killed_after_the_shards_were_put_reloads_them(ray_cluster, tmp_path):
    """Between the workers' puts and the update the store is killed: the restarted actor reads the stage's
    shards back from the run folder and gives the update an unkilled store gives; killed again, it still
    serves the finished update, and the shard files are gone once that update is saved."""
    n = 400
    cfg = load_config(CONFIG_DIR / "buc_cpu.yaml", ["clustering.merge_percent=0.2"])
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(40, 16))[np.arange(n) % 40] + 0.3 * rng.normal(size=(n, 16))
    feats = (feats / np.linalg.norm(feats, axis=1, keepdims=True)).astype(np.float32)
    initial = Targets(labels=np.arange(n))
    cameras = np.arange(n) % 3
    want = METHODS["buc"].update(cfg, feats, initial, UpdateContext(stage=0, seed=0, num_real=n, cameras=cameras))
    inputs = StoreInputs(num_samples=n, num_real=n, cameras=cameras, is_fake=None, truth=None, initial=initial, seed=0)
    state = tmp_path / "store"
    store = FeatureStore.remote(METHODS["buc"], cfg, save_inputs(inputs, state), 2, str(state), None)  # as the driver does
    try:
        for rank in (0, 1):
            ray.get(store.put.remote(0, rank, np.arange(n)[rank::2], feats[rank::2]))
        assert len(list((state / "shards").glob("*.npz"))) == 2
        first = ray.get(store.pid.remote())
        _kill(first)
        result = ray.get(store.update.remote(0), timeout=120)  # retried on the restarted actor
        assert ray.get(store.pid.remote()) != first
        assert np.array_equal(result["targets"].labels, want.labels)
        assert not list((state / "shards").glob("*.npz"))
        _kill(ray.get(store.pid.remote()))
        assert np.array_equal(ray.get(store.targets_for.remote(1), timeout=120).labels, want.labels)
    finally:
        ray.kill(store)


def test_a_tracking_server_that_does_not_answer_fails_in_seconds(mlflow_server, tmp_path, capsys):
    """MLflow's client retried a refused connection for about 4 minutes per call; tracking.check_server
    (through resolve_tracking_uri, where every job finds its URI, and reopen_run, where a resumed one meets it
    again) refuses in seconds, naming the key; a run is refused before its folder is made. The real server
    answers; stores that are not servers pass."""
    from ureid.config import ConfigError
    from ureid.runtime.job import Job
    from ureid.tracking import check_server, resolve_tracking_uri

    assert resolve_tracking_uri(mlflow_server[0], tmp_path) == mlflow_server[0]
    for store in (f"sqlite:///{tmp_path}/x.db", f"file://{tmp_path}/mlruns", "databricks"):
        check_server(store)
    dead = f"http://127.0.0.1:{_free_port()}"
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=rf"tracking.tracking_uri={dead}: no MLflow server answers there"):
        check_server(dead)
    assert time.perf_counter() - start < 10
    tracking_cfg = load_config(CONFIG_DIR / "buc_cpu.yaml", [f"tracking.tracking_uri={dead}"]).tracking
    with pytest.raises(ConfigError, match="no MLflow server answers there"):
        Job.start("buc", tmp_path / "runs", tracking_cfg, params={}, tags={})
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    resumed = tmp_path / "resumed"  # a run folder whose stored server is gone: --resume says so at once
    resumed.mkdir()
    (resumed / "run.json").write_text(json.dumps({"run_id": "0" * 32, "tracking_uri": dead, "attempts": 1}))
    with pytest.raises(ConfigError, match="no MLflow server answers there"):
        Job.reopen(resumed)
    assert json.loads((resumed / "run.json").read_text())["attempts"] == 1
    from ureid.cli import main

    assert main(["compare", "--tracking-uri", dead, "--out", str(tmp_path / "cmp")]) == 2
    assert f"--tracking-uri {dead}: no MLflow server answers there" in capsys.readouterr().err


class _Background:
    """A tiny BUC run of ``FAULT_RUN`` in a thread, to fault while it runs: ``run_dir`` once it has one, ``result()``
    its summary (its error re-raised in the test's thread)."""

    def __init__(self, tiny_root, out: Path):
        self.box = {}

        def run():
            try:
                self.box["summary"] = run_experiment(tiny_cfg("buc", tiny_root, out, *FAULT_RUN), quiet=True)
            except BaseException as exc:
                self.box["error"] = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        self.alive = self.thread.is_alive
        self.run_dir = _wait(lambda: next(out.glob("buc-*/run.json"), None), alive=self.alive).parent

    def wait_for_stage(self, stage: int) -> None:
        """Until stage ``stage`` (0-based) is checkpointed and recorded, the next one not yet recorded. Recorded,
        not checkpointed: the history line is written by Train's controller when it gets to the report, which
        can be after the workers have checkpointed the next short stage (a CI run saw stage 1's checkpoint
        before stage 0's line), so only the controller's own order tells which stage is still running."""
        _wait(lambda: _checkpointed(self.run_dir, stage) and _recorded(self.run_dir) >= stage + 1, alive=self.alive)
        assert _recorded(self.run_dir) == stage + 1, "the run got past the next stage before the fault"

    def result(self) -> dict:
        self.thread.join(timeout=600)
        assert not self.thread.is_alive()
        if "error" in self.box:
            raise self.box["error"]
        return self.box["summary"]


def test_a_killed_store_and_a_killed_train_worker_cost_only_their_stage(ray_cluster, tiny_root, tmp_path_factory, mlflow_server):
    """One run, two faults: the feature store is killed while stage 2 trains (its next put and update reach
    the restarted actor, which reloads stage 1's targets), then a train worker while stage 3 trains (Ray
    Train restarts the group from stage 2's checkpoint). The run completes with the uninterrupted labels."""
    want = _uninterrupted(tiny_root, tmp_path_factory, mlflow_server)
    run = _Background(tiny_root, tmp_path_factory.mktemp("faults"))
    run.wait_for_stage(0)
    store = ray.get_actor("feature_store", namespace=f"ureid-{run.run_dir.name}")
    store_pid = ray.get(store.pid.remote())
    _kill(store_pid)

    run.wait_for_stage(1)
    workers = _alive_pids("RayTrainWorker")
    assert len(workers) == 2
    _kill(min(workers))

    _same_run(run.result(), want)
    assert _alive_pids("RayTrainWorker").isdisjoint(workers)  # the group was replaced, not the run failed


def _start_node(temp: Path) -> subprocess.Popen:
    """One more node of 1 CPU (and 2 clustering slots, as the others) in the session's cluster: ``ray start --block``
    with its own session folder and ports, in a process group of its own."""
    from ureid.runtime.tasks import SLOT

    return subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", f"--address={ray.get_runtime_context().gcs_address}",
         f"--temp-dir={temp}", "--block", "--num-cpus=1", "--num-gpus=0", f"--resources={json.dumps({SLOT: 2})}",
         "--object-store-memory=500000000", *_own_ports()],
        stdout=open(temp / "node.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)


def test_a_lost_node_costs_only_its_stage(ray_cluster, tiny_root, tmp_path_factory, mlflow_server):
    """Issue 14: "a lost node is the same as a killed worker". A third node joins the session's cluster, and the
    second node's CPU is held (an actor pinned there), so the run's two train workers take the head's CPU and
    the third node's. While stage 2 trains, the third node goes whole: its raylet and every process on it
    SIGKILLed at once, as when a machine dies. The holder lets go, Ray Train restarts the worker group on the
    head and the second node from stage 1's checkpoint, and the run ends with the uninterrupted labels."""
    import shutil
    import tempfile

    from conftest import _raylets_and_their_workers
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    want = _uninterrupted(tiny_root, tmp_path_factory, mlflow_server)
    before = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    head = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"])
    temp = Path(tempfile.mkdtemp(prefix="ureid-n3-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    node = _start_node(temp)
    holder = None
    try:
        third = _wait(lambda: next((n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] not in before),
                                   None), timeout=120, alive=lambda: node.poll() is None)
        (second,) = before - {head}

        @ray.remote(num_cpus=1)
        class Holder:  # stands in for other work on the second node
            def ready(self):
                return True

        holder = Holder.options(scheduling_strategy=NodeAffinitySchedulingStrategy(second, soft=False)).remote()
        ray.get(holder.ready.remote(), timeout=60)

        run = _Background(tiny_root, tmp_path_factory.mktemp("lost_node"))
        run.wait_for_stage(1)
        from ray.util.state import list_actors

        workers = list_actors(address=ray.get_runtime_context().gcs_address, limit=1000, detail=True,
                              filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        assert sorted(w.node_id for w in workers) == sorted([head, third])  # one worker on the node that goes

        raylets, processes = _raylets_and_their_workers({node.pid})
        assert raylets, "the third node's raylet"
        for pid in processes:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # a worker that ended between the /proc scan and now (CI, 7 December)
                pass
        for pid in raylets:
            _kill(pid)  # the raylet must still be there: nothing else ends it
        os.killpg(node.pid, signal.SIGKILL)
        node.wait(timeout=30)
        ray.kill(holder)  # the second node's CPU is free for the restarted group

        _same_run(run.result(), want)
        # Train restarted the group as soon as the worker's process was gone; the GCS marks the node dead only
        # after its health checks fail (a CI run ended before that). Later tests must see two alive nodes.
        _wait(lambda: not any(n["Alive"] for n in ray.nodes() if n["NodeID"] == third), timeout=180)
    finally:
        if holder is not None:
            ray.kill(holder)
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)


def test_a_killed_driver_resumes_with_the_labels_of_an_uninterrupted_run(ray_cluster, tiny_root, tmp_path_factory, mlflow_server):
    """``experiments/buc.py --verbose`` as its own process on the session's Ray, SIGKILLed while stage 2 trains,
    then ``ureid run buc --resume RUN_DIR`` as another: stage 1 is not run again, and the run ends as the
    uninterrupted one. The two drivers' whole output (stdout + stderr) is also the check of what a user sees:
    with --verbose the workers' own lines and Ray Train's INFO output; without, one line per finished stage
    from the progress relay, no line twice, none of Ray Train's per-report dumps (tests/test_progress.py
    checks the drawing itself)."""
    import re

    want = _uninterrupted(tiny_root, tmp_path_factory, mlflow_server)
    out = tmp_path_factory.mktemp("driver")
    cfg = tiny_cfg("buc", tiny_root, out, *FAULT_RUN)
    sets = [f"ray.address={ray.get_runtime_context().gcs_address}"]
    config = out / "config.yaml"
    from ureid.config import save_config

    save_config(cfg, config)
    script = Path(__file__).resolve().parents[1] / "experiments" / "buc.py"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # what the killed driver printed is in its log
    log_path = out / "driver.log"
    driver = subprocess.Popen([sys.executable, str(script), "--config", str(config), "--verbose",
                               *[a for s in sets for a in ("--set", s)]],
                              stdout=open(log_path, "w"), stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        run_dir = _wait(lambda: next(out.glob("buc-*/run.json"), None), alive=lambda: driver.poll() is None).parent
        _wait(lambda: _checkpointed(run_dir, 0) and _recorded(run_dir) == 1, alive=lambda: driver.poll() is None)
        # Ray forwards the workers' lines a moment after they are printed
        _wait(lambda: re.search(r"\(RayTrainWorker pid=\d+.*\[ureid\] stage 0 \(1/3\) done in", log_path.read_text()),
              timeout=60, alive=lambda: driver.poll() is None)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    verbose = log_path.read_text()
    assert "Reporting training result" in verbose and "(RayTrainWorker" in verbose
    first = read_history(run_dir / "history.jsonl")
    assert [h["stage"] for h in first] == [0] and not (run_dir / "summary.json").exists()

    done = subprocess.run([sys.executable, "-m", "ureid.cli", "run", "buc", "--resume", str(run_dir)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    text = "\n".join(lines)
    stage_lines = [line for line in lines if re.search(r"\[ureid\] stage \d \(\d/3\) done in", line)]
    assert len(stage_lines) == 2 and all(line.startswith("[ureid] stage") for line in stage_lines), text
    assert "stage 1 (2/3)" in stage_lines[0] and "stage 2 (3/3)" in stage_lines[1], text
    assert "Reporting training result" not in text and "Checkpoint successfully created" not in text, text
    assert "RayTrainWorker" not in text, text  # nothing forwarded from the workers' stdout
    assert re.search(r"^\[ureid\] data: synthetic \(market1501 layout\) at \S+: \d+ training images from \d cameras; "
                     r"\d+ query, \d+ gallery images \(mAP per stage\)$", text, re.M), text
    assert (f"[ureid] its embedding: `ureid embed {run_dir} IMAGES`, `ureid search {run_dir} PROBE "
            f"--gallery IMAGES`, `ureid export {run_dir}`") in done.stdout.splitlines(), text  # no pictures here
    repeated = {line for line in lines if lines.count(line) > 1}
    assert not repeated, f"printed more than once: {repeated}"

    resumed = json.loads((run_dir / "summary.json").read_text())
    _same_run(resumed, want)
    assert resumed["history"][0] == first[0]  # stage 1 kept, not recomputed
    # the same run continued, not a second one: the killed attempt's MLflow run, each stage's metrics once
    info = json.loads((run_dir / "run.json").read_text())
    assert info["attempts"] == 2 and resumed["run_id"] == info["run_id"] and resumed["run_dir"] == str(run_dir)
    from mlflow.tracking import MlflowClient

    steps = [m.step for m in MlflowClient(resumed["tracking_uri"]).get_metric_history(resumed["run_id"], "mAP")]
    assert sorted(steps) == [0, 1, 2]
