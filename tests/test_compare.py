"""`ureid compare` reads a real MLflow store (SQLite) holding runs of two methods and a sweep, and writes the
per-dataset tables (selected stage beside the oracle) and plots, logged as a comparison run."""

import csv

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from ureid import tracking
from ureid.tracking.compare import compare


def _run(uri, method, maps, selected, parent=None, params=None, reranked=False):
    run_id = tracking.start_run(uri, "cmp", f"{method}-run", {"method": method, **(params or {})},
                                {"method": method, "dataset": "synthetic"}, parent_run_id=parent)
    for stage, m in enumerate(maps):
        # silhouette ranks stages as mAP does; Davies-Bouldin (lower is better) the other way round
        tracking.log_stage(uri, run_id, stage, {"mAP": m, "rank1": m / 2, "num_clusters": 100 - 10 * stage,
                                                "stage_time_s": 6.0, "lf_silhouette": 10 * m, "lf_davies_bouldin": m,
                                                **({"rerank_mAP": m + 0.004 * (stage + 1)} if reranked else {})},
                           timestamp_ms=1)
    best = max(range(len(maps)), key=lambda s: maps[s])
    tracking.log_summary(uri, run_id, {"selected_at_stage": selected, "selected_mAP": maps[selected],
                                       "selected_rank1": maps[selected] / 2, "best_mAP": maps[best],
                                       "oracle_at_stage": best, "wall_time_s": 120.0,
                                       "selected_lf_silhouette": 0.1 * selected})
    tracking.set_tags(uri, run_id, {"ureid.setting": f"{method}-setting", "ureid.selection": "label_free:lf_silhouette"})
    tracking.finish_run(uri, run_id)
    return run_id


def test_compare_two_methods_and_a_sweep(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    _run(uri, "buc", [0.01, 0.03, 0.02], selected=2, reranked=True)  # train.eval_rerank
    _run(uri, "dbc", [0.02, 0.025], selected=1)
    parent = tracking.start_run(uri, "cmp", "sweep-buc", {"space": '{"clustering.size_penalty": {"loguniform": [0.001, 0.01]}}',
                                                          "objective": "lf_silhouette (max)"},
                                {"ureid.kind": "sweep", "method": "buc"})
    for i, lam in enumerate((0.001, 0.005)):
        _run(uri, "buc", [0.01, 0.02 + i / 100], selected=1, parent=parent, params={"clustering.size_penalty": lam})
    tracking.finish_run(uri, parent)

    files = compare(uri, tmp_path / "out", experiment="cmp")
    md, table_csv, map_png, clusters_png = files["synthetic"]
    text = md.read_text()
    assert text.count("\n| buc |") == 3 and text.count("\n| dbc |") == 1
    assert "2 of 3 (label_free:lf_silhouette) | 2.0% |" in text and "3.0% (1)" in text  # selected beside the oracle
    assert "| 3.0% / 1.5% (1) |" in text  # the stage silhouette picks, shown whatever the run kept
    # the re-ranked mAP of the selected stage, where the run logged it (stage 2: 2.0% + 1.2%), empty elsewhere
    assert "| re-ranked mAP |" in text.splitlines()[0] and "(label_free:lf_silhouette) | 2.0% | 1.0% |  |  | 3.2% |" in text, text
    assert "| dbc | dbc-setting | 1 of 2 (label_free:lf_silhouette) | 2.5% | 1.2% |  |  |  |" in text, text
    rows = list(csv.DictReader(table_csv.open()))
    assert {r["method"] for r in rows} == {"buc", "dbc"} and all(r["oracle_mAP"] for r in rows)
    for png in (map_png, clusters_png, *files["sweeps"]):
        with Image.open(png) as img:
            assert img.size[0] > 300
    (scores_md,) = files["synthetic label-free scores"]
    lines = {line.split(" | ")[0].lstrip("| "): line for line in scores_md.read_text().splitlines()}
    # 9 (run, stage) points from 4 runs; mean mAP of the stage each criterion picks, per run
    assert lines["lf_silhouette"].startswith("| lf_silhouette | 9 (4) | +1.00 | +1.00 |")
    assert lines["lf_davies_bouldin"].startswith("| lf_davies_bouldin | 9 (4) | -1.00 | -1.00 |")
    assert lines["lf_silhouette"].endswith("| 2.6% |")  # per run the best stage: (3.0 + 2.5 + 2.0 + 3.0) / 4
    assert lines["last (no selection)"].endswith("| 2.4% |") and lines["oracle_map (test labels)"].endswith("| 2.6% |")
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("cmp")
    (comparison,) = client.search_runs([exp.experiment_id], filter_string="tags.`ureid.kind` = 'comparison'")
    logged = {a.path for a in client.list_artifacts(comparison.info.run_id, "comparison")}
    assert "comparison/compare_synthetic.md" in logged and "comparison/map_per_stage_synthetic.png" in logged


def test_a_store_or_experiment_that_is_not_there_is_named_and_nothing_is_made(tmp_path, monkeypatch, capsys):
    """`ureid compare` at a mistyped SQLite path used to create an empty store there and report "no MLflow
    experiment None"; now it names the path, or the experiment with the ones the store has."""
    from ureid.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["compare"]) == 2
    assert f"no MLflow store at {tmp_path / 'runs' / 'mlflow.db'}" in capsys.readouterr().err
    assert main(["compare", "--tracking-uri", f"sqlite:///{tmp_path / 'typo.db'}"]) == 2
    assert "no MLflow store at" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no store, no runs/ or comparison folder

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).create_experiment("sweeps-of-june")
    assert main(["compare", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert "no MLflow experiment 'ureid'" in err and "'sweeps-of-june'" in err, err
    assert not (tmp_path / "runs").exists()  # no comparison folder for nothing to compare


def test_a_dataset_without_test_labels_is_compared_on_its_label_free_score(tmp_path):
    """Runs on an unlabeled folder log no mAP: their table shows the label-free score where the run kept its
    stage and the stage the score picks, and the per-stage plot is that score's."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    for method, scores, selected in (("buc", [0.02, 0.05, 0.04], 1), ("ssl", [0.10, 0.08], 1)):
        run_id = tracking.start_run(uri, "own", f"{method}-run", {"method": method},
                                    {"method": method, "dataset": "folder"})
        for stage, v in enumerate(scores):
            tracking.log_stage(uri, run_id, stage, {"num_clusters": 50 - stage, "stage_time_s": 6.0,
                                                    "lf_silhouette": v}, timestamp_ms=1)
        tracking.log_summary(uri, run_id, {"selected_at_stage": selected, "wall_time_s": 60.0})
        tracking.set_tags(uri, run_id, {"ureid.setting": f"{method}-setting", "ureid.selection": "last"})
        tracking.finish_run(uri, run_id)
    files = compare(uri, tmp_path / "out", experiment="own", log=False)
    md, table_csv, per_stage_png, _ = files["folder"]
    lines = md.read_text().splitlines()
    assert "mAP" not in lines[0] and "| lf_silhouette there | lf_silhouette pick (stage) |" in lines[0]
    assert lines[2] == "| buc | buc-setting | 1 of 3 (last) | 0.0500 | 1 | 48 | 1.0 min |"
    assert lines[3] == "| ssl | ssl-setting | 1 of 2 (last) | 0.0800 | 0 | 49 | 1.0 min |"
    assert per_stage_png.name == "lf_silhouette_per_stage_folder.png"
    rows = list(csv.DictReader(table_csv.open()))
    assert [r["label_free_at_selected"] for r in rows] == ["0.05", "0.08"] and not any(r["oracle_stage"] for r in rows)


def test_runs_named_by_id_that_cannot_be_compared_are_named(tmp_path, capsys):
    """`ureid compare --runs` with an id that is not there printed MLflow's traceback, and a named sweep or
    unfinished run was skipped in silence ("no finished ureid runs in experiment 'ureid'"): now each is named
    with why, and nothing is written."""
    from ureid.cli import main

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    good = _run(uri, "buc", [0.01, 0.03], selected=1)
    sweep = tracking.start_run(uri, "cmp", "sweep-buc", {}, {"ureid.kind": "sweep", "method": "buc"})
    tracking.finish_run(uri, sweep)
    running = tracking.start_run(uri, "cmp", "dbc-run", {"method": "dbc"}, {"method": "dbc", "dataset": "synthetic"})
    out = tmp_path / "out"
    assert main(["compare", "--tracking-uri", uri, "--out", str(out), "--runs", good, "deadbeef", sweep,
                 running]) == 2
    err = capsys.readouterr().err
    assert (f"--runs at {uri}: deadbeef (no such run); {sweep} (a sweep run, not a method's; its trials are its "
            f"child runs); {running} (RUNNING, not finished)") in err, err
    assert "Traceback" not in err and not out.exists()
    files = compare(uri, out, run_ids=[good], log=False)
    assert "| buc |" in files["synthetic"][0].read_text()


def test_an_experiment_of_no_comparable_run_says_what_it_holds(tmp_path):
    """An experiment of failed and running runs said only "no finished ureid runs": now it counts them by why."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    for name in ("a", "b"):
        failed = tracking.start_run(uri, "ureid", name, {"method": "buc"}, {"method": "buc", "dataset": "synthetic"})
        tracking.finish_run(uri, failed, status="FAILED")
    tracking.start_run(uri, "ureid", "c", {"method": "dbc"}, {"method": "dbc", "dataset": "synthetic"})
    with pytest.raises(FileNotFoundError) as info:
        compare(uri, tmp_path / "out", log=False)
    assert str(info.value) == (f"no finished ureid runs in experiment 'ureid' at {uri} (3 runs there: "
                               "2 FAILED, not finished; 1 RUNNING, not finished)")
    assert not (tmp_path / "out").exists()


def test_a_trial_stopped_before_its_first_stage_is_no_row(tmp_path):
    """A sweep trial that ASHA (or a Ctrl-C) stopped before its first stage is KILLED with no metric: it made a
    row of blanks (" of 0", "()", "0.0 min"); now it is left out, and named as such when asked for. A sweep's
    name that is no file name (a '/', from before --name was checked) names its plot file safely."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sweep = tracking.start_run(uri, "cmp", "a/b", {"space": '{"clustering.size_penalty": {"uniform": [0, 0.01]}}',
                                                   "objective": "lf_silhouette (max)"},
                               {"ureid.kind": "sweep", "method": "buc"})
    done = _run(uri, "buc", [0.01, 0.03], selected=1, parent=sweep, params={"clustering.size_penalty": 0.005})
    stopped = tracking.start_run(uri, "cmp", "buc-run", {"method": "buc"}, {"method": "buc", "dataset": "synthetic"},
                                 parent_run_id=sweep)
    tracking.finish_run(uri, stopped, status="KILLED")
    tracking.finish_run(uri, sweep)
    files = compare(uri, tmp_path / "out", experiment="cmp", log=False)
    rows = [line for line in files["synthetic"][0].read_text().splitlines() if line.startswith("| buc")]
    assert len(rows) == 1 and "1 of 2" in rows[0], rows
    with pytest.raises(ValueError, match=rf"{stopped} \(KILLED before its first stage\)"):
        compare(uri, tmp_path / "out2", run_ids=[done, stopped], log=False)
    assert [p.name for p in compare(uri, tmp_path / "out3", experiment="cmp", log=False)["sweeps"]] == ["sweep_a_b.png"]


def test_a_sweep_over_words_is_plotted_at_one_tick_each(tmp_path):
    """DBC's own space sweeps `clustering.update` over 'stage' and 'merge': the sweep plot took float('stage')
    and failed, and with it `ureid compare` of any experiment holding such a sweep."""
    from ureid.tracking.compare import _axis_positions, sweep_plot

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    space = '{"clustering.update": {"choice": ["stage", "merge"]}, "clustering.merge_percent": {"choice": [0.05, 0.1]}}'
    parent = tracking.start_run(uri, "cmp", "sweep-dbc", {"space": space, "objective": "lf_silhouette (max)"},
                                {"ureid.kind": "sweep", "method": "dbc"})
    for i, (update, mp) in enumerate((("merge", 0.05), ("stage", 0.1), ("merge", 0.1))):
        _run(uri, "dbc", [0.01, 0.02 + i / 100], selected=1, parent=parent,
             params={"clustering.update": update, "clustering.merge_percent": mp})
    tracking.finish_run(uri, parent)
    png = sweep_plot(uri, parent, tmp_path / "sweep.png")
    with Image.open(png) as img:
        assert img.size[0] > 600
    assert _axis_positions(["stage", "merge"], ["merge", "stage", "merge"]) == {"stage": 0, "merge": 1}
    assert _axis_positions([True, False], ["False"]) == {"False": 1}
    assert _axis_positions([0.05, 0.1], ["0.1", "0.05"]) == {"0.1": 0.1, "0.05": 0.05}
    files = compare(uri, tmp_path / "out", experiment="cmp", log=False)
    assert [p.name for p in files["sweeps"]] == ["sweep_sweep-dbc.png"]


def test_every_run_is_read_past_one_page_of_search_results(tmp_path, monkeypatch):
    """One search_runs call returns at most max_results runs (MLflow's default 1,000; compare asked for 5,000)
    and says nothing of the rest: an experiment past that lost runs from the comparison silently."""
    import functools

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    made = {_run(uri, method, [0.01 * (i + 1)], selected=0)
            for i, method in enumerate(["buc", "dbc", "ssl", "pul", "buc"])}
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("cmp").experiment_id
    assert len(client.search_runs([exp], max_results=2)) == 2  # what a single call gives
    assert {r.info.run_id for r in tracking.all_runs(client, [exp], page=2)} == made
    monkeypatch.setattr("ureid.tracking.compare.all_runs", functools.partial(tracking.all_runs, page=2))
    from ureid.tracking.compare import collect

    assert {r.run_id for r in collect(uri, "cmp")} == made
