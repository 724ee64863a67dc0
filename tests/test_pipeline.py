"""End to end: every method through a real TorchTrainer with 2 workers, a real MLflow SQLite store,
real faiss, on a tiny synthetic dataset. Each ``fit()`` costs ~25 s of Ray overhead, so the checks
are combined: one run per method, plus one interrupted-and-resumed BUC run."""

import json
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from conftest import TINY_SYNTH
from ureid.config import CONFIG_DIR, load_config
from ureid.runtime.experiment import run_experiment
from ureid.runtime.job import stage_checkpoints


def tiny_cfg(method, root, out, *extra):
    overrides = [
        f"data.root={root}", "data.height=32", "data.width=16",
        "model.embedding_dim=32", "train.batch_size=8", "train.eval_batch_size=32",
        "train.first_stage_epochs=1", "train.stage_epochs=1", "train.max_batches_per_epoch=2",
        "ray.num_workers=2", "ray.cpus_per_worker=1", "schedule.max_stages=2", f"output_dir={out}",
        f"tracking.tracking_uri=sqlite:///{out}/mlflow.db", f"tracking.experiment=test-{method}",
    ]
    for key, value in TINY_SYNTH.items():
        overrides.append(f"data.synthetic.{key}={value}")
    if method in ("buc", "dbc", "camstyle"):
        overrides.append("clustering.merge_percent=0.2")
    if method == "camstyle":  # the colour stand-in here; tests/test_stargan.py runs camstyle on StarGAN fakes
        overrides.append("clustering.style_transfer=colour")
    if method == "pul":
        src = root.parent / "tiny_source"
        overrides += [f"clustering.source.root={src}", "clustering.source.height=32", "clustering.source.width=16",
                      "clustering.num_clusters=5", "clustering.iterations=2", "clustering.pretrain_epochs=1",
                      "clustering.threshold=0.5"]
        overrides += [f"clustering.source.synthetic.{k}={v}" for k, v in {**TINY_SYNTH, "seed": 4}.items()]
    if method == "dbc":  # stages selected on another labeled dataset (the TIP protocol)
        val = root.parent / "tiny_validation"
        overrides += ["schedule.select=validation", f"schedule.validation.root={val}",
                      "schedule.validation.height=32", "schedule.validation.width=16"]
        overrides += [f"schedule.validation.synthetic.{k}={v}" for k, v in {**TINY_SYNTH, "seed": 5}.items()]
    if method == "ssl":
        # two stripes need a final feature map two rows high: 64-pixel-high inputs
        overrides += ["clustering.num_neighbors=2", "model.num_stripes=2", "data.height=64", "data.width=32"]
        overrides += ["train.eval_rerank=true"]  # each stage's re-ranked scores too (checked below)
    return load_config(CONFIG_DIR / f"{method}_cpu.yaml", overrides + list(extra))


@pytest.fixture(scope="module")
def fakes(tiny_root):
    from ureid.data.camstyle import write_fakes
    from ureid.data.formats import load_dataset

    write_fakes(load_dataset("market1501", tiny_root).train, tiny_root / "bounding_box_train_camstyle")
    return tiny_root / "bounding_box_train_camstyle"


_RUNS = {}


def _run(method, tiny_root, tmp_path_factory):
    if method not in _RUNS:
        out = tmp_path_factory.mktemp(method)
        shared = tmp_path_factory.getbasetemp() / "methods_mlflow.db"  # one store: `ureid compare` reads them all
        _RUNS[method] = run_experiment(tiny_cfg(method, tiny_root, out, f"tracking.tracking_uri=sqlite:///{shared}"),
                                       quiet=True)
    return _RUNS[method]


@pytest.mark.parametrize("method", ["buc", "dbc", "pul", "ssl", "camstyle"])
def test_method_two_stages_on_ray_train(method, ray_cluster, tiny_root, fakes, tmp_path_factory):
    summary = _run(method, tiny_root, tmp_path_factory)
    assert [h["stage"] for h in summary["history"]] == [0, 1]

    client = MlflowClient(summary["tracking_uri"])
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["method"] == method and run.data.tags["dataset"] == "synthetic"
    assert run.data.params["clustering." + next(iter(tiny_cfg(method, tiny_root, "x").clustering.model_dump()))]
    for key in ("mAP", "rank1", "rank5", "rank10", "num_clusters", "loss", "stage_time_s", "train_samples_per_s"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == [0, 1], (key, steps)
    assert all(m.value > 0 for m in client.get_metric_history(run.info.run_id, "train_samples_per_s"))
    for m in client.get_metric_history(run.info.run_id, "mAP"):
        assert 0.0 <= m.value <= 1.0
    for key in ("lf_silhouette", "lf_snd", "lf_nmi_previous", "selected_stage", "oracle_stage"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 2, key
    history = summary["history"]
    assert summary["oracle_stage"] == max(history, key=lambda h: h["mAP"])["stage"]
    if method == "dbc":
        assert summary["selection"] == "validation"
        assert summary["selected_stage"] == max(history, key=lambda h: h["val_mAP"])["stage"]
    else:
        assert summary["selection"] == "last" and summary["selected_stage"] == history[-1]["stage"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "labels.npy", "plots", "best_checkpoint", "pictures"} <= artifacts

    labels = np.load(f"{summary['run_dir']}/labels.npy")
    assert labels.ndim == 1 and labels.min() == 0
    assert np.array_equal(np.unique(labels), np.arange(labels.max() + 1)), "labels must be contiguous"

    if method in ("buc", "dbc", "camstyle"):
        # Bottom-up methods: each stage merges exactly int(mp * N0) clusters.
        n0 = summary["history"][0]["num_classes"] if method != "camstyle" else None
        if n0 is not None:
            m = int(0.2 * n0)
            assert [h["num_clusters"] for h in summary["history"]] == [n0 - m, n0 - 2 * m]
        merge = client.get_metric_history(run.info.run_id, "merge_precision")
        assert len(merge) == 2 and all(0 <= x.value <= 1 for x in merge)
        same = client.get_metric_history(run.info.run_id, "memory_replicas_identical")
        assert [x.value for x in same] == [1.0, 1.0], "the DDP replicas' memory tables drifted apart"
        # Both CPUs are held by the two train workers: the store must not queue Ray tasks for them.
        tasks = client.get_metric_history(run.info.run_id, "cluster_tasks")
        assert [x.value for x in tasks] == [0.0, 0.0]
    reranked = [h.get("rerank_mAP") for h in history]
    if method == "ssl":
        assert len(client.get_metric_history(run.info.run_id, "neighbor_precision")) == 2
        # train.eval_rerank: every stage's re-ranked scores, logged beside the plain ones (and not equal to them)
        assert all(0.0 <= r <= 1.0 for r in reranked) and reranked != [h["mAP"] for h in history], history
        assert [m.step for m in client.get_metric_history(run.info.run_id, "rerank_rank1")] == [0, 1]
        assert np.array_equal(labels, np.arange(labels.size)), "SSL keeps one class per image"
    else:
        assert reranked == [None, None]
    if method == "pul":
        assert len(client.get_metric_history(run.info.run_id, "selected_fraction")) == 2
        (source,) = client.get_metric_history(run.info.run_id, "source_model_mAP")  # direct transfer, step 0
        assert source.step == 0 and 0.0 <= source.value <= 1.0
    if method == "camstyle":
        n_fakes = len(list(fakes.iterdir()))
        assert labels.size == summary["history"][0]["num_classes"] + n_fakes


def test_resuming_a_finished_run_starts_nothing(ray_cluster, tiny_root, fakes, tmp_path_factory, capsys):
    """`--resume` of a finished run with its own config: the summary back, no Ray job, trainer or store, the
    MLflow run left FINISHED and the attempt not counted (it used to reopen the run, start a trainer for no
    stage and print "continuing at stage 3")."""
    from ureid.cli import main

    summary = _run("buc", tiny_root, tmp_path_factory)
    run_dir = Path(summary["run_dir"])
    before = json.loads((run_dir / "run.json").read_text())
    assert main(["run", "buc", "--resume", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"{run_dir} has finished (2 stages, summary.json): nothing to resume, nothing started" in out, out
    assert "continuing at stage" not in out and json.loads((run_dir / "run.json").read_text()) == before
    assert MlflowClient(summary["tracking_uri"]).get_run(summary["run_id"]).info.status == "FINISHED"


def _map_of(features_file, records):
    """mAP of query against gallery from an embed file's features, looked up by each record's first path."""
    from ureid.evaluation import evaluate, pairwise_distance

    z = np.load(features_file)
    by_path = dict(zip(z["paths"].tolist(), z["features"]))
    q, g = records
    res = evaluate(pairwise_distance(np.stack([by_path[r.paths[0]] for r in q]),
                                     np.stack([by_path[r.paths[0]] for r in g]), metric="sqeuclidean"),
                   np.array([r.pid for r in q]), np.array([r.pid for r in g]),
                   np.array([r.camid for r in q]), np.array([r.camid for r in g]))
    return float(res["mAP"])


def test_embed_gives_the_runs_own_features_of_any_images(ray_cluster, tiny_root, fakes, tmp_path_factory, tmp_path,
                                                        capsys):
    """`ureid embed RUN_DIR FOLDERS`: the selected stage's unit features of every image, the ones the run was
    evaluated with (their mAP is the run's), another stage with --stage, and errors that name the path;
    `ureid search` ranks a gallery by those features; and `ureid evaluate RUN_DIR` scores the run's model on
    its own or a named dataset."""
    from PIL import Image

    from ureid.cli import main
    from ureid.data.formats import load_dataset
    from ureid.visualize import picture_size

    summary = _run("buc", tiny_root, tmp_path_factory)
    run_dir, selected = summary["run_dir"], summary["selected_stage"]
    ds = load_dataset("market1501", tiny_root)
    out = tmp_path / "features"
    assert main(["embed", run_dir, str(tiny_root / "query"), str(tiny_root / "bounding_box_test"),
                 "--out", str(out)]) == 0
    z = np.load(tmp_path / "features.npz")
    n = len(list((tiny_root / "query").glob("*.jpg"))) + len(list((tiny_root / "bounding_box_test").glob("*.jpg")))
    dim = z["features"].shape[1]  # the pooled trunk feature the evaluation uses (MobileNetV2's 1280)
    assert z["features"].shape == (n, dim) and z["features"].dtype == np.float32
    assert np.allclose(np.linalg.norm(z["features"], axis=1), 1.0, atol=1e-5)
    assert int(z["stage"]) == selected and str(z["method"]) == "buc"
    assert f"{n} x {dim} features of stage {selected}" in capsys.readouterr().out
    reported = next(h["mAP"] for h in summary["history"] if h["stage"] == selected)
    assert abs(_map_of(tmp_path / "features.npz", (ds.query, ds.gallery)) - reported) < 1e-6

    assert main(["embed", run_dir, str(tiny_root / "query"), "--stage", "0", "--out", str(tmp_path / "s0.npz")]) == 0
    s0 = np.load(tmp_path / "s0.npz")
    assert int(s0["stage"]) == 0 and not np.allclose(s0["features"], z["features"][:len(s0["features"])])

    # `ureid evaluate`: the run's own test split by default, or a dataset named by --format/--root (here the
    # same folder, so the same numbers; --root alone: the format guessed from its layout, and said); the stage's
    # reported mAP and rank-1 either way
    reported_rank1 = next(h["rank1"] for h in summary["history"] if h["stage"] == selected)
    for extra in ([], ["--format", "market1501", "--root", str(tiny_root)], ["--root", str(tiny_root)]):
        assert main(["evaluate", run_dir, *extra]) == 0
        said = capsys.readouterr().out
        assert said.startswith("format market1501, guessed from ") == (extra[:1] == ["--root"]), said
        assert f"buc, stage {selected}, on market1501 at {tiny_root}" in said
        assert f"mAP {100 * reported:.2f}%, rank-1 {100 * reported_rank1:.2f}%" in said, said
    assert main(["evaluate", run_dir, "--format", "mars", "--root", str(tiny_root)]) == 2
    assert "mars: expected" in capsys.readouterr().err
    # --rerank: also the scores after k-reciprocal re-ranking of the same features (here k1 = 5 for a tiny set)
    from ureid.evaluation import evaluate, re_ranking_features

    by_path = dict(zip(z["paths"].tolist(), z["features"]))
    qf, gf = (np.stack([by_path[r.paths[0]] for r in part]) for part in (ds.query, ds.gallery))
    ids = [np.array([getattr(r, a) for r in part]) for a in ("pid", "camid") for part in (ds.query, ds.gallery)]
    want = evaluate(re_ranking_features(qf, gf, k1=5, k2=3, lambda_value=0.2), *ids)
    assert abs(want["mAP"] - reported) > 1e-4  # re-ranking moved the score: the line below tells them apart
    assert main(["evaluate", run_dir, "--rerank", "--rerank-k1", "5", "--rerank-k2", "3", "--rerank-lambda", "0.2"]) == 0
    said = capsys.readouterr().out.splitlines()
    assert f"mAP {100 * reported:.2f}%" in said[0] and said[1].startswith("  with k-reciprocal re-ranking (k1 5, k2 3, "
                                                                          "lambda 0.2): "), said
    assert f"mAP {100 * want['mAP']:.2f}%, rank-1 {100 * want['rank1']:.2f}%" in said[1], (said, want["mAP"])
    for bad, says in ((["--rerank-lambda", "1.5"], "--rerank-lambda: expected a number in [0, 1], got '1.5'"),
                      (["--rerank-k1", "0"], "--rerank-k1: expected an integer >= 1, got '0'")):
        with pytest.raises(SystemExit):  # refused before any image is read
            main(["evaluate", run_dir, "--rerank", *bad])
        assert says in capsys.readouterr().err

    # `ureid search`: the gallery ranked by those features and the run's distance, a query's own file skipped
    from ureid.embed import search

    paths = [str(p) for p in z["paths"]]
    queries = sorted(str(p) for p in (tiny_root / "query").glob("*.jpg"))[:2]
    found = search(run_dir, queries, [str(tiny_root / "bounding_box_test"), queries[0]], top=4)
    assert found["gallery"][-1] == queries[0] and found["indices"].shape == (2, 4)
    for i, q in enumerate(queries):
        g = np.array([paths.index(p) for p in found["gallery"]])
        dist = ((z["features"][g] - z["features"][paths.index(q)]) ** 2).sum(1).astype(np.float64)
        if i == 0:
            dist[-1] = np.inf  # its own file
        assert found["indices"][i].tolist() == np.argsort(dist, kind="stable")[:4].tolist()
        assert np.allclose(found["distances"][i], np.sort(dist)[:4], atol=1e-5)
    # a gallery embedded once (`ureid embed`'s file of the same run and stage) ranks as the images do
    stored = search(run_dir, queries, [str(tmp_path / "features.npz")], top=4)
    assert stored["gallery"] == paths
    for i, q in enumerate(queries):
        dist = ((z["features"] - z["features"][paths.index(q)]) ** 2).sum(1).astype(np.float64)
        dist[paths.index(q)] = np.inf  # its own file
        assert stored["indices"][i].tolist() == np.argsort(dist, kind="stable")[:4].tolist()
    # --rerank: ranked by the k-reciprocal re-ranked distances of the queries and the whole gallery
    from ureid.evaluation import nearest_by_distance, re_ranking_features

    own = [paths.index(q) for q in queries]
    reranked = search(run_dir, queries, [str(tmp_path / "features.npz")], top=4, rerank={"k1": 5, "k2": 3})
    want = nearest_by_distance(re_ranking_features(z["features"][own], z["features"], k1=5, k2=3), 4, skip=own)
    np.testing.assert_array_equal(reranked["indices"], want[0])
    np.testing.assert_allclose(reranked["distances"], want[1], atol=1e-6)
    assert main(["search", run_dir, *queries, "--gallery", str(tmp_path / "features.npz"), "--top", "4", "--rerank",
                 "--rerank-k1", "5", "--rerank-k2", "3"]) == 0
    said = capsys.readouterr().out
    assert "k-reciprocal re-ranked distance, k1 5, k2 3, lambda 0.3" in said
    assert f"\n    1  {want[1][1][0]:.4f}  {paths[want[0][1][0]]}\n" in said and said.count("\n    1  ") == 2, said
    with pytest.raises(ValueError, match=r"s0.npz: features of run .* stage 0\); this search uses run .* stage "):
        search(run_dir, queries, [str(tmp_path / "s0.npz")])
    assert main(["search", run_dir, queries[0], "--gallery", str(tiny_root / "bounding_box_test"), "--top", "2",
                 "--picture", str(tmp_path / "search.png")]) == 0
    said = capsys.readouterr().out
    assert f"buc, stage {selected}: the 2 nearest of" in said and said.count("\n    1  ") == 1, said
    assert "gallery items for the query (" in said and "asked for more" not in said
    gallery = len(list((tiny_root / "bounding_box_test").iterdir()))
    assert main(["search", run_dir, *queries, "--gallery", str(tiny_root / "bounding_box_test"), "--top", "999"]) == 0
    said = capsys.readouterr().out
    assert f"the {gallery} nearest of {gallery} gallery items for each of {len(queries)} queries (" in said, said
    assert "; --top 999 asked for more than the gallery holds" in said
    with Image.open(tmp_path / "search.png") as img:
        assert img.size == picture_size(1, 2)

    # `ureid export`: one .pt2 that torch alone runs (loaded here with torch.export, no ureid call), giving
    # `ureid embed`'s features of images resized with PIL and made tensors by to_tensor, any batch size
    import torch
    from torchvision.transforms.functional import to_tensor

    assert main(["export", run_dir, "--out", str(tmp_path / "model")]) == 0
    assert f"wrote {tmp_path / 'model.pt2'}: buc stage {selected}" in capsys.readouterr().out
    extra = {"ureid.json": ""}
    program = torch.export.load(tmp_path / "model.pt2", extra_files=extra).module()
    info = json.loads(extra["ureid.json"])
    assert (info["method"], info["stage"], info["feature_dim"], info["video"]) == ("buc", selected, dim, False)
    some = paths[:5]
    x = torch.stack([to_tensor(Image.open(p).convert("RGB").resize((info["width"], info["height"]), Image.BILINEAR))
                     for p in some])
    with torch.no_grad():
        exported = program(x).numpy()
        one = program(x[:1]).numpy()
    want = z["features"][[paths.index(p) for p in some]]
    np.testing.assert_allclose(exported, want, atol=1e-5)
    np.testing.assert_allclose(one, want[:1], atol=1e-5)
    assert main(["export", run_dir, "--stage", "0", "--out", str(tmp_path / "s0.pt2")]) == 0
    with torch.no_grad():
        np.testing.assert_allclose(torch.export.load(tmp_path / "s0.pt2").module()(x).numpy(),
                                   s0["features"][[paths.index(p) for p in some]], atol=1e-5)

    (tmp_path / "notes.txt").write_text("x")
    for argv, says in [([str(tmp_path / "nope")], "no such file or folder"),
                       ([str(tmp_path / "notes.txt")], "not an image file"),
                       ([str(tiny_root / "query"), "--stage", "7"], "no checkpoint of stage 7 (it has stages 0, 1)")]:
        assert main(["embed", run_dir, *argv, "--out", str(tmp_path / "bad.npz")]) == 2
        assert says in capsys.readouterr().err
    assert not (tmp_path / "bad.npz").exists()


@pytest.mark.parametrize("method", ["pul"])
def test_resume_gives_the_same_labels(method, ray_cluster, tiny_root, tmp_path_factory, capsys):
    """A run stopped after stage 0 and resumed gives the labels of the uninterrupted run, PUL's original
    (source-trained) model restored too. BUC's resume: tests/test_faults.py, after its driver is SIGKILLed."""
    full = _run(method, tiny_root, tmp_path_factory)
    out = tmp_path_factory.mktemp("resume")
    first = run_experiment(tiny_cfg(method, tiny_root, out, "schedule.max_stages=1", "tracking.pictures=false"), quiet=True)
    run_dir = first["run_dir"]
    assert [s for s, _ in stage_checkpoints(Path(run_dir))] == [0]

    from ureid.runtime.experiment import load_run_config

    resumed = run_experiment(load_run_config(run_dir, ["schedule.max_stages=2"]), resume=run_dir, quiet=True)
    assert resumed["run_dir"] == run_dir and resumed["run_id"] == first["run_id"]
    assert [h["stage"] for h in resumed["history"]] == [0, 1]
    assert np.array_equal(np.load(f"{run_dir}/labels.npy"), np.load(f"{full['run_dir']}/labels.npy"))
    for a, b in zip(resumed["history"], full["history"]):
        assert a["num_clusters"] == b["num_clusters"]
        assert a["mAP"] == pytest.approx(b["mAP"], abs=1e-6)
    assert json.loads((Path(run_dir) / "run.json").read_text())["attempts"] == 2
    steps = [m.step for m in MlflowClient(first["tracking_uri"]).get_metric_history(first["run_id"], "mAP")]
    assert sorted(steps) == [0, 1]
    # the override is the run's setting from now on: config.yaml says so, the first attempt's is kept, a tag
    assert load_run_config(run_dir).schedule.max_stages == 2
    assert load_config(Path(run_dir) / "config.attempt1.yaml").schedule.max_stages == 1
    tags = MlflowClient(first["tracking_uri"]).get_run(first["run_id"]).data.tags
    assert tags["ureid.attempt2.set"] == "schedule.max_stages=2"
    # a resume that leaves nothing to run (fewer stages than done) starts nothing and keeps config.yaml as
    # the stages ran with it (it used to be rewritten with the override before the stage count was known)
    again = run_experiment(load_run_config(run_dir, ["schedule.max_stages=1"]), resume=run_dir)
    assert "no stage left: the run has 2 stages done and pul runs 1" in capsys.readouterr().out
    assert again["history"] == resumed["history"] and load_run_config(run_dir).schedule.max_stages == 2
    assert not (Path(run_dir) / "config.attempt2.yaml").exists()
    assert MlflowClient(first["tracking_uri"]).get_run(first["run_id"]).info.status == "FINISHED"
    # a resume on another training set (one image fewer) is refused in the driver, before Ray: it failed in
    # every train worker on the labels' length ("labels must have one entry per record")
    import shutil
    fewer = out / "fewer"
    shutil.copytree(tiny_root, fewer)
    sorted((fewer / "bounding_box_train").iterdir())[0].unlink()
    n = len(list((tiny_root / "bounding_box_train").iterdir()))
    with pytest.raises(ValueError, match=rf"not the training set the run started on: {n - 1} training images under "
                                         rf".*fewer, the run's stages trained on {n} under .*Resume on the same images"):
        run_experiment(load_run_config(run_dir, [f"data.root={fewer}", "schedule.max_stages=3"]), resume=run_dir)


@pytest.fixture(scope="module")
def own_crops(tiny_root, tmp_path_factory):
    """The tiny set's training images renamed to bare numbers in the loader's order, the camera kept in the name:
    a user's own crops, identity unknown."""
    import shutil

    from ureid.data.formats import load_dataset

    folder = tmp_path_factory.mktemp("own_crops")
    for i, r in enumerate(load_dataset("market1501", tiny_root).train):
        shutil.copy(r.path, folder / f"crop{i:04d}_cam{r.camid + 1}.jpg")
    return folder


@pytest.mark.parametrize("method", ["buc", "ssl"])
def test_an_unlabeled_folder_trains_as_its_labeled_copy_and_reports_label_free(method, ray_cluster, tiny_root,
                                                                               own_crops, tmp_path_factory):
    """A `folder` without query/gallery whose names carry no identity. The method must give the labels and
    losses of the labeled run (identities never reach training), skip what needs identities (mAP, merge and
    neighbour precision), keep the stage its label-free score ranks best, and draw pseudo-identities (BUC) or
    each image's nearest neighbours (SSL, a class per image) instead of ranked lists."""
    labeled = _run(method, tiny_root, tmp_path_factory)
    out = tmp_path_factory.mktemp(f"unlabeled_{method}")
    cfg = tiny_cfg(method, tiny_root, out, "data.name=folder", f"data.root={own_crops}",
                   r"data.pattern=_cam(?P<camid>\d+)", "schedule.select=label_free:lf_silhouette")
    summary = run_experiment(cfg, quiet=True)

    history = summary["history"]
    assert [h["loss"] for h in history] == [h["loss"] for h in labeled["history"]]
    assert np.array_equal(np.load(f"{summary['run_dir']}/labels.npy"), np.load(f"{labeled['run_dir']}/labels.npy"))
    for h in history:
        assert not {"mAP", "rank1", "merge_precision", "neighbor_precision"} & set(h) and "lf_silhouette" in h
    assert summary["selected_stage"] == max(history, key=lambda h: (h["lf_silhouette"], -h["stage"]))["stage"]
    pictures = Path(summary["run_dir"]) / "pictures"
    first = {"buc": "pseudo_identities.png", "ssl": "neighbours.png"}[method]
    assert sorted(p.name for p in pictures.iterdir()) == sorted(["feature_map.png", first])

    client = MlflowClient(summary["tracking_uri"])
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["dataset"] == "folder"
    assert client.get_metric_history(run.info.run_id, "mAP") == []
    assert len(client.get_metric_history(run.info.run_id, "lf_silhouette")) == 2
    assert "selected_mAP" not in run.data.metrics and run.data.metrics["selected_at_stage"] == summary["selected_stage"]
    if method != "buc":
        return

    from ureid.run_pictures import visualize_run
    other = 1 - summary["selected_stage"]  # the stage the run did not keep, into a folder of its own
    assert visualize_run(summary["run_dir"], stage=other) == [pictures / f"stage{other}" / "pseudo_identities.png",
                                                             pictures / f"stage{other}" / "feature_map.png"]
    with pytest.raises(FileNotFoundError, match=r"no stage 5 to draw \(it has stages 0, 1\)"):
        visualize_run(summary["run_dir"], stage=5)
    # the run copied to a machine where the crops sit elsewhere: told about --root, drawn with it; a folder
    # of other images is refused by its count
    import shutil

    import yaml
    copied = out / "copied_run"
    shutil.copytree(summary["run_dir"], copied, ignore=shutil.ignore_patterns("pictures"))
    conf = yaml.safe_load((copied / "config.yaml").read_text())
    conf["data"]["root"] = str(out / "crops_on_the_cluster")
    (copied / "config.yaml").write_text(yaml.safe_dump(conf))
    with pytest.raises(FileNotFoundError, match=r"crops_on_the_cluster' does not exist .*ureid visualize .*--root DIR"):
        visualize_run(copied)
    assert visualize_run(copied, root=own_crops) == [copied / "pictures" / "pseudo_identities.png",
                                                     copied / "pictures" / "feature_map.png"]
    fewer = out / "fewer_crops"
    shutil.copytree(own_crops, fewer, ignore=lambda d, names: sorted(names)[::2])
    with pytest.raises(ValueError, match=rf"not the dataset the run trained on \({len(list(fewer.iterdir()))} training "
                                         rf"images under .*fewer_crops, the run's stages trained on "
                                         rf"{len(list(own_crops.iterdir()))} under "):
        visualize_run(copied, root=fewer)
    # a run stopped before it finished (no summary): drawn stage by stage, none marked selected
    (copied / "summary.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"has not finished .* --stage draws one of its checkpoints "
                                                r"\(stages 0, 1\), `ureid run buc --resume "):
        visualize_run(copied, root=own_crops)
    assert visualize_run(copied, root=own_crops, stage=0) == [copied / "pictures" / "stage0" / "pseudo_identities.png",
                                                              copied / "pictures" / "stage0" / "feature_map.png"]
    from ureid.embed import evaluate_run
    with pytest.raises(ValueError, match="has no query/gallery split to score"):
        evaluate_run(summary["run_dir"])
    with pytest.raises(ValueError, match="'oracle_map' keeps the stage of best test-set mAP"):
        run_experiment(tiny_cfg("buc", tiny_root, out, "data.name=folder", f"data.root={own_crops}",
                                "schedule.select=oracle_map"), quiet=True)


def test_failed_run_is_marked_failed_with_the_reason(ray_cluster, tiny_root, tmp_path):
    cfg = tiny_cfg("camstyle", tiny_root, tmp_path, f"clustering.fake_root={tmp_path / 'no_fakes'}")
    with pytest.raises(FileNotFoundError, match="camstyle needs camera-style fakes"):
        run_experiment(cfg, quiet=True)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("test-camstyle")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FAILED"
    assert "camstyle needs camera-style fakes" in run.data.tags["error"]
    assert "ureid data camstyle" in run.data.tags["error"]


def test_compare_reads_the_runs_of_two_methods_from_mlflow(ray_cluster, tiny_root, fakes, tmp_path_factory, tmp_path):
    from PIL import Image

    from ureid.tracking.compare import compare

    runs = [_run(m, tiny_root, tmp_path_factory) for m in ("buc", "dbc")]
    assert runs[0]["tracking_uri"] == runs[1]["tracking_uri"]
    files = compare(runs[0]["tracking_uri"], tmp_path, run_ids=[r["run_id"] for r in runs])
    md, _, map_png, clusters_png = files["synthetic"]
    lines = md.read_text().splitlines()
    assert len(lines) == 4 and lines[2].startswith("| buc | merge_percent=0.2") and lines[3].startswith("| dbc |")
    assert "(last)" in lines[2] and "(validation)" in lines[3] and "oracle-best" in lines[0]
    assert f"| {runs[0]['selected']['mAP']:.1%} |" in lines[2]
    (scores,) = files["synthetic label-free scores"]
    assert "| lf_silhouette | 4 (2) |" in scores.read_text()
    for png in (map_png, clusters_png):
        with Image.open(png) as img:
            assert img.size[0] > 300


def test_video_buc_two_stages_on_ray_train(ray_cluster, tmp_path_factory):
    """Tracklets through the same loop: a tracklet is one sample, frames drawn in order, DDP on 2 workers; and
    the same tracklets as an unlabeled `tracklets` folder train alike."""
    root = tmp_path_factory.mktemp("video") / "tiny_video"
    out = tmp_path_factory.mktemp("video_run")
    synth = {**TINY_SYNTH, "video": True, "min_frames": 2, "max_frames": 5, "mean_frames": 3}
    cfg = load_config(CONFIG_DIR / "buc_video_cpu.yaml", [
        f"data.root={root}", "data.height=32", "data.width=16", "data.seq_len=3", "data.max_test_frames=4",
        "model.embedding_dim=32", "train.batch_size=4", "train.eval_batch_size=16",
        "train.first_stage_epochs=1", "train.stage_epochs=1", "train.max_batches_per_epoch=2",
        "ray.num_workers=2", "ray.cpus_per_worker=1", "schedule.max_stages=2", f"output_dir={out}",
        f"tracking.tracking_uri=sqlite:///{out}/mlflow.db", "tracking.experiment=test-video",
        "clustering.merge_percent=0.2", "model.frozen_stages=layer2",
        *[f"data.synthetic.{k}={v}" for k, v in synth.items()],
    ])
    summary = run_experiment(cfg, quiet=True)
    from ureid.data.run_data import load_split_dataset

    ds = load_split_dataset(cfg.data)
    assert all(len(r.paths) >= 2 for r in ds.train), "the synthetic video variant must give multi-frame tracklets"
    n0 = len(ds.train)
    assert summary["history"][0]["num_classes"] == n0
    m = int(0.2 * n0)
    assert [h["num_clusters"] for h in summary["history"]] == [n0 - m, n0 - 2 * m]
    labels = np.load(f"{summary['run_dir']}/labels.npy")
    assert labels.size == n0  # one label per tracklet, not per frame
    client = MlflowClient(summary["tracking_uri"])
    same = client.get_metric_history(summary["run_id"], "memory_replicas_identical")
    assert [x.value for x in same] == [1.0, 1.0]
    assert all(0.0 <= m.value <= 1.0 for m in client.get_metric_history(summary["run_id"], "mAP"))
    # `ureid embed` of the test folder: MARS tracklets (several to a folder) give the run's own mAP
    from ureid.embed import embed_to_file

    features, count, _, stage = embed_to_file(summary["run_dir"], [root / "bbox_test"], out / "embed.npz")
    embedded = set(np.load(features)["paths"].tolist())
    assert len(embedded) == count and {r.paths[0] for r in ds.query + ds.gallery} <= embedded  # + junk tracklets
    reported = next(h["mAP"] for h in summary["history"] if h["stage"] == stage)
    assert abs(_map_of(features, (ds.query, ds.gallery)) - reported) < 1e-6
    # `ureid export` of a video run: a call takes one tracklet's frames and gives its feature, embed's
    import torch
    from PIL import Image
    from torchvision.transforms.functional import to_tensor

    from ureid.embed import export_embedding
    from ureid.engine.datasets import select_test_frames

    exported, info = export_embedding(summary["run_dir"], out / "video.pt2")
    program = torch.export.load(exported).module()
    by_path = dict(zip(np.load(features)["paths"].tolist(), np.load(features)["features"]))
    assert info["video"] and info["max_frames"] == 4
    for r in ds.query[:3]:
        frames = [r.paths[j] for j in select_test_frames(len(r.paths), info["max_frames"])]
        x = torch.stack([to_tensor(Image.open(f).convert("RGB").resize((info["width"], info["height"]),
                                                                     Image.BILINEAR)) for f in frames])
        with torch.no_grad():
            np.testing.assert_allclose(program(x).numpy()[0], by_path[r.paths[0]], atol=1e-5)

    # your own tracklets (`data.name=tracklets`): the training tracklets as bare folders of frames, no identity,
    # in the loader's order; the same losses and pseudo-labels as the labeled run, and label-free reports
    import shutil

    own = tmp_path_factory.mktemp("own_tracklets")
    for i, r in enumerate(ds.train):
        (own / f"track{i:04d}").mkdir()
        for f in r.paths:
            shutil.copy(f, own / f"track{i:04d}" / f"frame_{Path(f).name}")
    unlabeled = run_experiment(cfg.model_copy(update={
        "data": cfg.data.model_copy(update={"name": "tracklets", "root": str(own)}),
        "output_dir": str(tmp_path_factory.mktemp("own_tracklets_run"))}), quiet=True)
    assert [h["loss"] for h in unlabeled["history"]] == [h["loss"] for h in summary["history"]]
    assert np.array_equal(np.load(f"{unlabeled['run_dir']}/labels.npy"), labels)
    assert not any("mAP" in h or "merge_precision" in h for h in unlabeled["history"])
    assert (Path(unlabeled["run_dir"]) / "pictures" / "pseudo_identities.png").is_file()
