"""Sweeps on a real Ray (2 CPUs), real MLflow SQLite: ASHA stops trials after a stage and their child runs
say so, the parent/child structure and per-stage metrics are there, no placement group is left behind,
best.yaml reproduces its trial, and a bad space is refused before anything starts."""

import json
from pathlib import Path

import numpy as np
import pytest
import ray
from mlflow.tracking import MlflowClient

from conftest import TINY_SYNTH, _free_port
from ureid.config import CONFIG_DIR, ConfigError, load_config
from ureid.runtime.experiment import run_experiment
from ureid.runtime.tune import check_state_api, run_sweep


def _overrides(root, out):
    return [f"data.root={root}", "data.height=32", "data.width=16", "model.embedding_dim=32",
            "train.batch_size=8", "train.eval_batch_size=32", "train.first_stage_epochs=1", "train.stage_epochs=1",
            "train.max_batches_per_epoch=2", "ray.num_workers=2", "schedule.max_stages=2",
            "ray.cpus_per_worker=1",  # the trainer takes every CPU of the (2-node) cluster, as the CPU presets do
            "tracking.pictures=false",  # test_pipeline checks the pictures; here they cost a matplotlib import a trial
            f"output_dir={out}", f"tracking.tracking_uri=sqlite:///{out}/mlflow.db", "tracking.experiment=test-sweep",
            *[f"data.synthetic.{k}={v}" for k, v in TINY_SYNTH.items()]]


def test_a_bad_space_is_refused_before_any_trial(tmp_path, tiny_root):
    space = tmp_path / "space.yaml"
    space.write_text("space:\n  clustering.merge_percent: {uniform: [0.1, 2.0]}\n  clustering.lambda: {choice: [1]}\n")
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as err:
        run_sweep(CONFIG_DIR / "buc_cpu.yaml", "buc", _overrides(tiny_root, out), space_file=str(space))
    msg = str(err.value)
    assert "clustering.merge_percent" in msg and "less than 1" in msg and "clustering.lambda: not a key" in msg
    assert not list(out.glob("sweep-*")), "nothing may be created for a refused sweep"


def test_asha_needs_the_state_api_and_a_cluster_without_one_is_refused(ray_cluster):
    """ASHA's stopped trials are freed by Ray Train's cleaner through the State API (tune.check_state_api):
    the test cluster's head serves it (found as the cleaner finds it); an address where no State API listens
    is refused with the key and the ways out. (A whole dashboard-less sweep would need a second Ray instance
    beside the shared one; measured by hand: refused before any folder or MLflow run, instead of hanging.)"""
    check_state_api()
    with pytest.raises(ConfigError) as err:
        check_state_api(f"http://127.0.0.1:{_free_port()}")
    msg = str(err.value)
    assert "ray.include_dashboard: true" in msg and "--scheduler none" in msg and "State API" in msg


def test_a_local_start_names_its_own_state_api(monkeypatch):
    """Two local Ray instances on one machine (two runs started at once): Ray's State API clients, Train's
    PlacementGroupCleaner among them, found "multiple active Ray instances" and the cleaner's thread died.
    A local start picks a dashboard port of its own (8265 when free) and names it to the job
    (RAY_API_SERVER_ADDRESS), which state_api_address() and check_state_api() follow. Measured by hand with
    two instances: no traceback, and an ASHA sweep beside another instance ends."""
    import socket

    from ureid.runtime import job

    with socket.socket() as taken:
        try:
            taken.bind(("127.0.0.1", 8265))
        except OSError:
            pass  # another process holds it: the same situation
        port = job._dashboard_port()
        assert port != 8265
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
    monkeypatch.setenv(job.API_SERVER_ENV, f"http://127.0.0.1:{port}")
    assert job.state_api_address() == f"http://127.0.0.1:{port}"
    with pytest.raises(ConfigError, match="ray.include_dashboard: true"):  # nothing listens there
        check_state_api()


def test_sweep_with_asha_parent_child_runs_and_best_yaml(ray_cluster, tiny_root, tmp_path):
    import ray

    space = tmp_path / "space.yaml"
    # Trials run one after the other (max_concurrent 1), so ASHA's decisions are deterministic: on this tiny
    # set the stage-0 silhouette of mp 0.2 comes out above that of 0.1 (0.062 and 0.003 on 7 December): the
    # second trial falls below the rung's median and is stopped after its first stage. (Two trials: each costs a Ray Train fit.)
    space.write_text("space:\n  clustering.merge_percent: {grid: [0.2, 0.1]}\n")
    out = tmp_path / "out"
    summary = run_sweep(CONFIG_DIR / "buc_cpu.yaml", "buc", _overrides(tiny_root, out), space_file=str(space),
                        search="grid", max_concurrent=1, quiet=True)
    trials = summary["trials"]
    assert len(trials) == 2
    statuses = [t["status"] for t in trials]
    assert statuses == ["finished", "early_stopped"], statuses
    assert len({t["trial"] for t in trials}) == 2 and all(t["trial"].startswith(Path(summary["sweep_dir"]).name.split("-")[-1]) for t in trials)

    client = MlflowClient(summary["tracking_uri"])
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["ureid.kind"] == "sweep"
    assert parent.data.params["num_samples"] == "2"  # a grid's trial count: its points
    assert f"best_{summary['objective']}" in parent.data.metrics
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 2
    by_name = {c.info.run_name: c for c in children}
    for t in trials:
        child = by_name[t["trial"]]
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "lf_silhouette")]
        assert steps == list(range(t["stages"]))
        assert "selected_at_stage" in child.data.metrics and "best_mAP" in child.data.metrics
        if t["status"] == "early_stopped":
            # ASHA stopped it on its first result: the one result Tune processed. Ray Train hands results to
            # Tune through a queue and trains on, so the stage in training when the stop lands can still be
            # logged (CI, 7 December: Tune's result.json 1 line, the run's history 2 stages).
            tune_results = (Path(summary["sweep_dir"]) / "tune" / "sweep" / t["trial"] / "result.json").read_text()
            assert [json.loads(line)["stages_done"] for line in tune_results.splitlines()] == [1]
            assert t["stages"] in (1, 2)
            assert child.info.status == "KILLED" and child.data.tags["ureid.early_stopped"] == "true"
        else:
            assert t["stages"] == 2 and child.info.status == "FINISHED"
    assert not [c for c in children if c.info.status == "RUNNING"]
    import time

    deadline = time.time() + 90  # Train's PlacementGroupCleaner frees a stopped trial's group on its next poll
    while any(pg["state"] != "REMOVED" for pg in ray.util.placement_group_table().values()) and time.time() < deadline:
        time.sleep(2)
    # Which group, when one is left (a flake of a slow hour, docs/ci_time.md): Tune's trial bundles hold the
    # clustering slot, Train's worker groups the CPUs; the id ends with the creating job's id.
    left = {k: {f: v[f] for f in ("name", "state", "bundles", "strategy")}
            for k, v in ray.util.placement_group_table().items() if v["state"] != "REMOVED"}
    assert not left, f"placement groups left behind: {left}"

    sweep_dir = Path(summary["sweep_dir"])
    assert (sweep_dir / "trials.csv").read_text().count("\n") == 3
    best = summary["best"]
    again = run_experiment(load_config(sweep_dir / "best.yaml"), quiet=True)
    trial_history = [json.loads(line) for line in (Path(best["run_dir"]) / "history.jsonl").read_text().splitlines()]
    assert len(again["history"]) == len(trial_history)
    for a, b in zip(again["history"], trial_history):
        assert a["num_clusters"] == b["num_clusters"]
        assert a["mAP"] == pytest.approx(b["mAP"], abs=1e-9) and a["lf_silhouette"] == pytest.approx(b["lf_silhouette"])
    assert np.isfinite(best[summary["objective"]])


SWEEPS = sorted((Path(__file__).resolve().parents[1] / "experiments" / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("space_file", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_shipped_spaces_and_method_defaults_pass_the_check(space_file):
    from ureid.config import read_yaml
    from ureid.methods import get_method
    from ureid.runtime.tune import check_space, load_space

    method = get_method(space_file.stem.removesuffix("_cpu"))
    base = read_yaml(CONFIG_DIR / f"{method.name}_cpu.yaml")
    space, source = load_space(method, space_file)
    check_space(base, space, source)
    check_space(base, *load_space(method))  # the method's own default space


def test_a_misspelt_space_key_names_the_key_it_resembles():
    from ureid.config import ConfigError, read_yaml
    from ureid.runtime.tune import check_space

    base = read_yaml(CONFIG_DIR / "buc_cpu.yaml")
    space = {"clustering.merge_percnt": {"uniform": [0.05, 0.1]}, "clustring.merge_percent": {"grid": [0.1]},
             "train.xyz": {"grid": [1]}}
    with pytest.raises(ConfigError) as info:
        check_space(base, space, "space.yaml")
    lines = str(info.value).splitlines()
    assert "clustering.merge_percnt: not a key of the buc config; did you mean clustering.merge_percent?" in lines[1]
    assert lines[2].endswith("did you mean clustering?")
    assert lines[3].endswith("train.xyz: not a key of the buc config")


def test_a_sweep_whose_driver_died_resumes_without_rerunning_finished_trials(ray_cluster, tiny_root, tmp_path):
    """The driver is a separate process on the same Ray (one Ray instance per machine, see conftest), killed
    with SIGKILL once the second trial has finished its first stage; ``--resume`` then continues that trial
    from its checkpoint and leaves the finished first trial alone."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import ray

    space = tmp_path / "space.yaml"
    space.write_text("space:\n  clustering.merge_percent: {grid: [0.2, 0.3]}\n")
    out = tmp_path / "out"
    # A second stage of 15 epochs (seconds, against a fraction of one): the kill lands while it trains,
    # whatever the timing of the reports.
    sets = [*_overrides(tiny_root, out), "train.stage_epochs=15", f"ray.address={ray.get_runtime_context().gcs_address}"]
    cmd = [sys.executable, "-m", "ureid.cli", "tune", "buc", "--config", str(CONFIG_DIR / "buc_cpu.yaml"),
           "--space", str(space), "--search", "grid", "--scheduler", "none", "--max-concurrent", "1",
           "--name", "killed", *[a for s in sets for a in ("--set", s)]]
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    sweep_dir = out / "killed"

    def histories():
        return {d.name: [json.loads(x) for x in h.read_text().splitlines()]
                for d in (sweep_dir / "trials").glob("*/") for h in d.glob("*/history.jsonl")}

    deadline = time.time() + 300
    while time.time() < deadline and driver.poll() is None:
        runs = histories()
        if len(runs) == 2 and any(len(h) == 1 for h in runs.values()):
            break
        time.sleep(0.1)
    assert driver.poll() is None, f"the driver ended before it could be killed:\n{(tmp_path / 'driver.log').read_text()}"
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    before = histories()
    first = next(n for n, h in before.items() if len(h) == 2)
    second = next(n for n, h in before.items() if len(h) == 1)
    first_dir = next((sweep_dir / "trials" / first).glob("*/run.json")).parent
    stamp = (first_dir / "summary.json").stat().st_mtime
    # what the driver said while it lived: one trial at a time, so the first had ended before the second began
    log = (tmp_path / "driver.log").read_text()
    # the trials' workers print nothing (every epoch line of every trial came through, each with its pid)
    assert "batch" not in log and "RayTrainWorker" not in log and "[ureid] run folder" not in log, log
    # nor does Tune: its configuration box, "View detailed results here" and TensorBoard lines came before
    assert "Configuration for experiment" not in log and "View detailed results" not in log, log
    assert "tensorboard" not in log.lower(), log
    said = [line for line in log.splitlines() if line.startswith("[ureid] trial")]
    assert said[:4] == [f"[ureid] trial {first} started: merge_percent=0.2",
                        *[f"[ureid] trial {first}: stage {s} ({s + 1}/2) done, lf_silhouette "
                          f"{before[first][s]['lf_silhouette']:.4f}" for s in (0, 1)],
                        f"[ureid] trial {first} finished"], said
    assert said[4] == f"[ureid] trial {second} started: merge_percent=0.3", said

    assert "RAY_AIR_NEW_OUTPUT" not in os.environ and "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS" not in os.environ
    summary = run_sweep(None, "buc", resume=str(sweep_dir), quiet=True)
    assert [t["status"] for t in summary["trials"]] == ["finished", "finished"]
    # Tune's settings were the sweep's alone: the driver's environment is as it was
    assert "RAY_AIR_NEW_OUTPUT" not in os.environ and "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS" not in os.environ
    # Tune's JSON and CSV records of each trial are kept; no TensorBoard files (the metrics are in MLflow)
    tune_dirs = [d for d in (sweep_dir / "tune" / "sweep").iterdir() if d.is_dir()]
    assert len(tune_dirs) == 2 and all((d / "result.json").is_file() and (d / "progress.csv").is_file()
                                       for d in tune_dirs), tune_dirs
    assert not list((sweep_dir / "tune").rglob("events.out.tfevents*"))
    after = histories()
    assert after[first] == before[first] and (first_dir / "summary.json").stat().st_mtime == stamp
    assert json.loads((first_dir / "run.json").read_text())["attempts"] == 1, "the finished trial ran again"
    second_dir = next((sweep_dir / "trials" / second).glob("*/run.json")).parent
    assert json.loads((second_dir / "run.json").read_text())["attempts"] == 2  # continued, not started over
    assert [h["stage"] for h in after[second]] == [0, 1] and after[second][0] == before[second][0]

    client = MlflowClient(summary["tracking_uri"])
    parent = client.get_run(summary["parent_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert parent.info.status == "FINISHED"
    assert sorted(c.info.status for c in children) == ["FINISHED", "FINISHED"], [c.info.status for c in children]
    assert (sweep_dir / "best.yaml").is_file()


def test_a_sweep_stopped_with_ctrl_c_says_so_and_resumes(ray_cluster, tiny_root, tmp_path):
    """Tune turns a Ctrl-C into a graceful stop and returns from fit() as from a finished sweep (every trial
    TERMINATED in its results): the sweep wrote its summary, best.yaml and a FINISHED parent for trials that
    had not run, and Tune's hint named its Python API. Now: exit status 130, the way on with --resume, the
    parent and the stopped trial's run FAILED with the reason, nothing written as if done; --resume
    finishes the trial (one: the driver-died test above covers the trials after it)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import ray

    space = tmp_path / "space.yaml"
    space.write_text("space:\n  clustering.merge_percent: {grid: [0.2]}\n")
    out = tmp_path / "out"
    sets = [*_overrides(tiny_root, out), "train.stage_epochs=15", f"ray.address={ray.get_runtime_context().gcs_address}"]
    cmd = [sys.executable, "-m", "ureid.cli", "tune", "buc", "--space", str(space), "--search", "grid",
           "--scheduler", "none", "--max-concurrent", "1", "--name", "stopped",
           *[a for s in sets for a in ("--set", s)]]
    log_path = tmp_path / "driver.log"
    with open(log_path, "w") as log:
        driver = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    sweep_dir = out / "stopped"
    deadline = time.time() + 300
    while time.time() < deadline and driver.poll() is None:
        if any(h.read_text().count("\n") >= 1 for h in sweep_dir.glob("trials/*/*/history.jsonl")):
            break  # the first trial's first stage is done: its second trains for seconds
        time.sleep(0.1)
    assert driver.poll() is None, log_path.read_text()
    os.kill(driver.pid, signal.SIGINT)
    assert driver.wait(timeout=120) == 130, log_path.read_text()
    log = log_path.read_text()
    assert f"[ureid] sweep stopped (Ctrl-C) with 1 of 1 trials started; Tune saved its state. Continue it with: " \
           f"ureid tune buc --resume {sweep_dir}" in log, log
    assert "Tuner.restore" not in log and "Traceback" not in log, log
    assert not (sweep_dir / "summary.json").exists() and not (sweep_dir / "best.yaml").exists()
    info = json.loads((sweep_dir / "sweep.json").read_text())
    client = MlflowClient(info["tracking_uri"])
    parent = client.get_run(info["parent_run_id"])
    assert parent.info.status == "FAILED" and "Ctrl-C in the sweep's driver" in parent.data.tags["error"]
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    # not KILLED, which is an ASHA stop that `ureid compare` reads as a finished trial's
    assert [c.info.status for c in children] == ["FAILED"] and "stopped with its sweep" in children[0].data.tags["error"]

    summary = run_sweep(None, "buc", resume=str(sweep_dir), quiet=True)
    assert [t["status"] for t in summary["trials"]] == ["finished"]
    assert client.get_run(info["parent_run_id"]).info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert [c.info.status for c in children] == ["FINISHED"]  # the stopped one reopened


def test_optuna_starts_from_the_paper_defaults(tmp_path, tiny_root):
    """The searcher a sweep builds for ``--search optuna``: its first suggestion is the paper point, later
    ones are Optuna's own samples. (Its trials through Tune and Ray Train: Cluster Contrast's sweep test.) A
    searcher that does not fit the space, or that does not exist, is refused before Ray starts and before the
    sweep folder or its MLflow parent run is made (a grid over a range once failed after both)."""
    from ureid.runtime.tune import _searcher, paper_point, tune_domains

    space = {"clustering.size_penalty": {"loguniform": [0.001, 0.01]}, "clustering.merge_percent": {"choice": [0.2, 0.3]}}
    base = load_config(CONFIG_DIR / "buc_cpu.yaml").to_dict()
    # the preset's lambda 0.005 lies inside; its mp 0.1 is not a choice: the nearest one
    first = paper_point(base, space)
    assert first == {"clustering.size_penalty": 0.005, "clustering.merge_percent": 0.2}
    searcher = _searcher("optuna", 0, 1, first)
    searcher.set_search_properties("lf_silhouette", "max", tune_domains(space))
    suggested = []
    for trial in ("a", "b", "c"):
        suggested.append(searcher.suggest(trial))
        searcher.on_trial_complete(trial, {"lf_silhouette": 0.1 * len(suggested)})
    assert suggested[0] == first
    for later in suggested[1:]:
        assert later != first and 0.001 <= later["clustering.size_penalty"] <= 0.01
        assert later["clustering.merge_percent"] in (0.2, 0.3)
    file = tmp_path / "space.yaml"
    file.write_text("space:\n  clustering.merge_percent: {grid: [0.2, 0.3]}\n")
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="grid; Optuna samples"):
        run_sweep(CONFIG_DIR / "buc_cpu.yaml", "buc", _overrides(tiny_root, out), space_file=str(file), search="optuna")
    file.write_text("space:\n  clustering.size_penalty: {loguniform: [0.001, 0.01]}\n")
    with pytest.raises(ConfigError, match="--search grid: clustering.size_penalty is a loguniform range; a grid "
                                          "needs choice or grid lists"):
        run_sweep(CONFIG_DIR / "buc_cpu.yaml", "buc", _overrides(tiny_root, out), space_file=str(file), search="grid")
    file.write_text("space:\n  clustering.merge_percent: {grid: [0.2, 0.3]}\n")
    # Tune would run the grid that many times over, each copy repeating the first (one seed): refused
    with pytest.raises(ConfigError, match="--num-samples 4 with --search grid: a grid runs each of its points once"):
        run_sweep(CONFIG_DIR / "buc_cpu.yaml", "buc", _overrides(tiny_root, out), space_file=str(file), search="grid",
                  num_samples=4)
    with pytest.raises(ConfigError, match="--search 'bayes': allowed: random, grid, optuna"):
        run_sweep(CONFIG_DIR / "buc_cpu.yaml", "buc", _overrides(tiny_root, out), space_file=str(file), search="bayes")
    assert not list(out.glob("sweep-*")), "nothing may be created for a refused sweep"
    assert not (out / "mlflow.db").exists(), "no MLflow parent run for a refused sweep"


@pytest.mark.parametrize("sets", [[], ["ray.clustering_tasks=false"], ["ray.store_gpus=1"]],
                         ids=["slots", "no-tasks", "gpu-share"])
def test_a_trial_reserves_for_its_children_not_for_itself(ray_cluster, tmp_path, sets):
    """Tune gives a trial's first bundle to the trial function's actor for its whole life. The sweep's trial
    resources (``_trial_resources``) must leave the trial's clustering slots, and a store's GPU share, to its
    children, and hold no CPU a trainer sized to every CPU needs: with a first bundle of slots the block tasks
    of any update that fanned out waited forever, and with 0.01 CPU the trainer never started."""
    from ray import tune

    from ureid.runtime.tune import _trial_resources

    # Defined here, not at the top of the file: Ray ships them by value (workers cannot import a test module).
    def double(_shared, item):
        return 2 * item

    @ray.remote(num_cpus=0)
    class StoreStandIn:
        def ready(self):
            return True

    def trial(config):
        """The trial's children under its reservation, each bounded (a regression fails instead of hanging):
        block tasks through the store's executor into the trial's slots; a placement group of 2 x 1 CPU outside it,
        a trainer sized to every CPU of the (2 x 1 CPU) test cluster; an actor with a GPU store's options."""
        import threading

        from ray.util.placement_group import placement_group, remove_placement_group

        from ureid.config import validate
        from ureid.runtime.feature_store import store_options
        from ureid.runtime.tasks import RayBlockMap

        ray_cfg = validate(config["cfg"], source="test").ray
        pg = ray.util.get_current_placement_group()
        out = {}

        def children():
            if ray_cfg.store_gpus > 0:
                store = StoreStandIn.options(**store_options(ray_cfg, pg)).remote()
                out["store"] = ray.get(store.ready.remote())
            elif ray_cfg.clustering_tasks:
                blocks = RayBlockMap(pg)
                out["tasks"] = blocks(double, None, [1, 2, 3]) == [2, 4, 6]
                out["reserved"] = blocks.stats()["cluster_tasks_reserved"]
            trainer = placement_group([{"CPU": 1}] * 2)  # as Ray Train's worker group asks, both at once
            try:
                ray.get(trainer.ready(), timeout=60)
                out["trainer"] = True
            finally:
                remove_placement_group(trainer)

        thread = threading.Thread(target=children, daemon=True)
        thread.start()
        thread.join(90)
        tune.report({k: float(v) for k, v in out.items()})

    cfg = load_config(CONFIG_DIR / "buc_cpu.yaml", sets)
    grid = tune.Tuner(tune.with_resources(trial, _trial_resources(cfg.ray)),
                      param_space={"cfg": cfg.to_dict()},
                      run_config=tune.RunConfig(name=f"reserve-{'-'.join(sets) or 'slots'}", storage_path=str(tmp_path),
                                                verbose=0)).fit()
    (result,) = grid
    assert result.error is None, result.error
    got = result.metrics
    assert got.get("trainer") == 1.0, got  # a trainer sized to every CPU started beside the trial
    if "ray.store_gpus=1" in sets:
        assert got.get("store") == 1.0, got  # the store stand-in got the reserved GPU share
    elif not sets:
        assert got.get("tasks") == 1.0 and got.get("reserved") == 1.0, got


def test_a_sweep_whose_updates_fan_out_finishes(ray_cluster, tmp_path):
    """A real sweep whose label updates fan out (5,253 synthetic training images: two k-NN blocks of BUC's update),
    the size where the old reservation hung: each update's tasks ran inside the trial's reservation and the trial
    finished (about 50 s here). In a thread, so that a regression fails the test instead of hanging the suite."""
    import threading

    out = tmp_path / "out"
    big = {"num_train_ids": 1100, "num_test_ids": 20, "num_distractors": 10, "num_junk": 5, "min_images": 4,
           "max_images": 6, "mean_images": 5}
    sets = [*_overrides(tmp_path / "big", out), *[f"data.synthetic.{k}={v}" for k, v in big.items()]]
    box = {}
    thread = threading.Thread(target=lambda: box.update(summary=run_sweep(
        CONFIG_DIR / "buc_cpu.yaml", "buc", sets, num_samples=1, scheduler="none", quiet=True)), daemon=True)
    thread.start()
    thread.join(600)
    assert not thread.is_alive(), "the sweep did not finish in 10 minutes (its clustering tasks waiting?)"
    (trial,) = box["summary"]["trials"]
    assert trial["status"] == "finished", trial
    history = [json.loads(line) for line in (Path(trial["run_dir"]) / "history.jsonl").read_text().splitlines()]
    assert len(history) == 2
    for row in history:
        assert row["cluster_tasks"] >= 2 and row["cluster_tasks_reserved"] == 1.0, row


def test_a_sweep_trial_reserves_its_stores_gpu_share(ray_cluster, tiny_root, tmp_path):
    """``ray.store_gpus`` in a sweep: each trial's placement group holds a bundle with its store's GPU share (after
    the trial function's empty one) and the store is created in it, so no other trial can take it. On the test cluster (one declared GPU, on the
    second node) the one trial's store gets that GPU and fails for want of CUDA: the sweep ends with the trial
    failed, its MLflow run FAILED with the store's reason. With CUDA (a GPU machine) the trial finishes."""
    import torch

    from ureid.runtime.tune import _max_concurrent, _trial_resources

    cfg = load_config(CONFIG_DIR / "buc_cpu.yaml", ["ray.store_gpus=1", "ray.num_workers=2", "ray.cpus_per_worker=1"])
    assert _trial_resources(cfg.ray).bundles == [{"GPU": 1.0}]  # after the trial function's empty one
    assert _max_concurrent(cfg.ray) == 1  # one GPU in the cluster, one share a trial
    out = tmp_path / "out"
    summary = run_sweep(CONFIG_DIR / "buc_cpu.yaml", "buc", [*_overrides(tiny_root, out), "ray.store_gpus=1"],
                        num_samples=1, scheduler="none", quiet=True)
    (trial,) = summary["trials"]
    if torch.cuda.is_available():
        assert trial["status"] == "finished", trial
        return
    assert trial["status"] == "failed", trial
    run_id = json.loads((Path(trial["run_dir"]) / "run.json").read_text())["run_id"]
    run = MlflowClient(f"sqlite:///{out}/mlflow.db").get_run(run_id)
    assert run.info.status == "FAILED"
    assert "torch there sees no CUDA device" in run.data.tags["error"]
    assert "CUDA_VISIBLE_DEVICES='0'" in run.data.tags["error"]


def test_a_trial_leaves_its_failure_status_to_the_sweep(tmp_path):
    """A trial that Tune stops dies inside its run, of errors not always recognisable as a stop (a CI run
    saw the store's ActorDiedError, "its owner has died"), and its dying process can write after the
    sweep's verdict; so a trial never writes a failure status: the sweep's ``_finish`` marks a stopped
    trial KILLED and a failed one FAILED with Tune's error. Outside a sweep any exit is FAILED."""
    from types import SimpleNamespace

    from ureid import tracking
    from ureid.runtime.job import Job
    from ureid.runtime.tune import _finish

    tracking_cfg = SimpleNamespace(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="stop", run_name=None)
    uri = tracking_cfg.tracking_uri
    client = MlflowClient(uri)
    cases = [(True, RuntimeError("ActorDiedError: its owner has died"), "RUNNING"),  # a sweep trial's run
             (True, SystemExit(0), "RUNNING"),
             (True, RuntimeError("a real error"), "RUNNING"),  # _finish marks it, below
             (False, SystemExit(0), "FAILED"),  # outside a sweep, any exit through the run is a failure
             (False, RuntimeError("a real error"), "FAILED")]
    for leave_status, error, status in cases:
        job = Job.start("buc", tmp_path / "out", tracking_cfg, params={}, tags={})
        with pytest.raises(type(error)):
            with job.failing_loudly(leave_status):
                raise error
        run = client.get_run(job.run_id)
        assert run.info.status == status, (error, status)
        if status == "FAILED":
            assert str(error.code if isinstance(error, SystemExit) else error) in run.data.tags.get("error", "")
            # an exit is named as a stop from outside (Ctrl-C ends a Ray Train run in SystemExit: 1)
            assert ("stopped from outside the run: Ctrl-C" in run.data.tags["error"]) == isinstance(error, SystemExit)

    # the sweep's verdict: one trial stopped by the scheduler, one failed, each with its run folder
    sweep_dir = tmp_path / "sweep"
    parent = tracking.start_run(uri, "stop", "sweep", {}, {})
    grid, run_ids = [], {}
    for name, error in (("t-00000", None), ("t-00001", RuntimeError("trial raised: bad merge"))):
        job = Job.start("buc", sweep_dir / "trials" / name, tracking_cfg, params={}, tags={}, parent_run_id=parent)
        run_ids[name] = job.run_id
        grid.append(SimpleNamespace(path=str(sweep_dir / "tune" / name), error=error, config={}))
    info = {"tracking_uri": uri, "objective": "lf_silhouette", "mode": "max", "name": "sweep", "method": "buc",
            "parent_run_id": parent}
    summary = _finish(sweep_dir, info, grid, num_stages=2, wall_time=1.0)
    assert [r["status"] for r in summary["trials"]] == ["early_stopped", "failed"]
    stopped, failed = client.get_run(run_ids["t-00000"]), client.get_run(run_ids["t-00001"])
    assert stopped.info.status == "KILLED" and stopped.data.tags["ureid.early_stopped"] == "true"
    assert failed.info.status == "FAILED" and "bad merge" in failed.data.tags["error"]
    assert client.get_run(parent).info.status == "FINISHED"


def test_the_sweeps_table_says_what_each_trial_tried():
    """The table printed at a sweep's end gave each trial's status and score but not its values: the reader had
    to open trials.csv to learn which merge_percent scored best."""
    from ureid.runtime.tune import _table

    summary = {"objective": "lf_silhouette", "mode": "max", "sweep_dir": "/x/sweep-dbc", "wall_time_s": 300.0,
               "space_keys": ["clustering.merge_percent", "clustering.update"], "best": {"trial": "abc-1"},
               "trials": [{"trial": f"abc-{i}", "status": status, "clustering.merge_percent": mp,
                           "clustering.update": update, "stages": stages, "lf_silhouette": score,
                           "selected_mAP": "", "oracle_mAP": ""}
                          for i, (status, mp, update, stages, score) in enumerate(
                              [("early_stopped", 0.123456, "stage", 1, 0.01), ("finished", 0.1, "merge", 4, 0.05)])]}
    lines = _table(summary).splitlines()
    # columns as wide as their widest value, so that the stages and scores line up
    assert lines[1] == "  abc-0  early_stopped  merge_percent=0.1235  update=stage  stages 1  lf_silhouette 0.0100"
    assert lines[2] == "  abc-1  finished       merge_percent=0.1  update=merge     stages 4  lf_silhouette 0.0500"
    assert lines[3] == "[ureid] best trial abc-1: /x/sweep-dbc/best.yaml"


def test_sweep_progress_takes_a_trials_end_from_its_own_folder(tmp_path, capsys):
    """A trial resumed after its last stage (the driver stopped between the stage's end and its report to
    Tune) finishes without reporting again: Tune's last result says 1 of 2 stages, and the line said
    "stopped after 1 of 2 stages (ASHA)" for a trial the table calls finished."""
    from ureid.runtime.tune import SweepProgress

    class Trial:
        last_result = {"stages_done": 1}

        def __str__(self):
            return "abc-00000"

    run = tmp_path / "trials" / "abc-00000" / "buc-1"
    run.mkdir(parents=True)
    (run / "run.json").write_text("{}")
    progress = SweepProgress("lf_silhouette", 2, str(tmp_path))
    progress.on_trial_complete(0, [], Trial())
    (run / "summary.json").write_text("{}")
    progress.on_trial_complete(0, [], Trial())
    assert capsys.readouterr().out.splitlines() == ["[ureid] trial abc-00000 stopped after 1 of 2 stages (ASHA)",
                                                    "[ureid] trial abc-00000 finished"]
