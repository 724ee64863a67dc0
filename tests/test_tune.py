"""Sweeps on a real Ray (2 CPUs), real MLflow SQLite: ASHA stops trials after a stage and their child runs
say so, the parent/child structure and per-stage metrics are there, no placement group is left behind,
best.yaml reproduces its trial, and a bad space is refused before anything starts."""

import json
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from conftest import TINY_SYNTH
from ureid.config import CONFIG_DIR, ConfigError, load_config
from ureid.runtime.experiment import run_experiment
from ureid.runtime.tune import run_sweep


def _overrides(root, out):
    return [f"data.root={root}", "data.height=32", "data.width=16", "model.embedding_dim=32",
            "train.batch_size=8", "train.eval_batch_size=32", "train.first_stage_epochs=1", "train.stage_epochs=1",
            "train.max_batches_per_epoch=2", "ray.num_workers=1", "ray.cpus_per_worker=1", "schedule.max_stages=2",
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


def test_sweep_with_asha_parent_child_runs_and_best_yaml(ray_cluster, tiny_root, tmp_path):
    import ray

    space = tmp_path / "space.yaml"
    # Trials run one after the other (max_concurrent 1), so ASHA's decisions are deterministic: on this tiny
    # set the stage-0 silhouettes come out 0.26 (mp 0.2), 0.21 (0.3), 0.12 (0.1): the second and third trial
    # fall below the rung's median and are stopped after their first stage.
    space.write_text("space:\n  clustering.merge_percent: {grid: [0.2, 0.3, 0.1]}\n")
    out = tmp_path / "out"
    summary = run_sweep(CONFIG_DIR / "buc_cpu.yaml", "buc", _overrides(tiny_root, out), space_file=str(space),
                        search="grid", max_concurrent=1, quiet=True)
    trials = summary["trials"]
    assert len(trials) == 3
    statuses = [t["status"] for t in trials]
    assert statuses == ["finished", "early_stopped", "early_stopped"], statuses
    assert len({t["trial"] for t in trials}) == 3 and all(t["trial"].startswith(Path(summary["sweep_dir"]).name.split("-")[-1]) for t in trials)

    client = MlflowClient(summary["tracking_uri"])
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["ureid.kind"] == "sweep"
    assert f"best_{summary['objective']}" in parent.data.metrics
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 3
    by_name = {c.info.run_name: c for c in children}
    for t in trials:
        child = by_name[t["trial"]]
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "lf_silhouette")]
        assert steps == list(range(t["stages"]))
        assert "selected_at_stage" in child.data.metrics and "best_mAP" in child.data.metrics
        if t["status"] == "early_stopped":
            assert t["stages"] == 1
            assert child.info.status == "KILLED" and child.data.tags["ureid.early_stopped"] == "true"
        else:
            assert t["stages"] == 2 and child.info.status == "FINISHED"
    assert not [c for c in children if c.info.status == "RUNNING"]
    import time

    deadline = time.time() + 90  # Train's PlacementGroupCleaner frees a stopped trial's group on its next poll
    while any(pg["state"] != "REMOVED" for pg in ray.util.placement_group_table().values()) and time.time() < deadline:
        time.sleep(2)
    left = {k: v["state"] for k, v in ray.util.placement_group_table().items() if v["state"] != "REMOVED"}
    assert not left, f"placement groups left behind: {left}"

    sweep_dir = Path(summary["sweep_dir"])
    assert (sweep_dir / "trials.csv").read_text().count("\n") == 4
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

    method = get_method(space_file.stem.split("_")[0])
    base = read_yaml(CONFIG_DIR / f"{method.name}_cpu.yaml")
    space, source = load_space(method, space_file)
    check_space(base, space, source)
    check_space(base, *load_space(method))  # the method's own default space
