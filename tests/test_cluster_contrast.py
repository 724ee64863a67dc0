"""Cluster Contrast as the sixth method: its memory, sampler, model options, and two stages through a real
TorchTrainer with 2 workers (identical memory replicas, Adam kept across stages and across a resume).
The clustering half (sparse Jaccard, DBSCAN) is tested in test_clustering_cc.py."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ureid.engine.datasets import cluster_instance_batches, make_batch_loader
from ureid.methods import get_method
from ureid.models.backbone import ReidNet
from ureid.models.losses import ClusterMemory, hard_momentum_update_, momentum_update_


def _loop_update(memory, x, y, m):
    """The public code's CM.backward, literally: one sample at a time in batch order."""
    memory = memory.clone()
    for xi, yi in zip(x, y.tolist()):
        memory[yi] = m * memory[yi] + (1.0 - m) * xi
        memory[yi] /= memory[yi].norm()
    return memory


def _hard_loop_update(memory, x, y, m):
    """CM_Hard.backward as it means to be: per cluster the least similar sample, similarities taken before
    any row moves, clusters in order of first appearance."""
    memory = memory.clone()
    before = memory.clone()
    seen = {}
    for k, yi in enumerate(y.tolist()):
        seen.setdefault(yi, []).append(k)
    for yi, ks in seen.items():
        sims = [float(x[k] @ before[yi]) for k in ks]
        hard = ks[int(np.argmin(sims))]
        memory[yi] = memory[yi] * m + (1 - m) * x[hard]
        memory[yi] /= memory[yi].norm()
    return memory


@pytest.mark.parametrize("momentum", [0.0, 0.1, 0.2])
def test_momentum_update_equals_the_codes_plain_loop(momentum):
    g = torch.Generator().manual_seed(0)
    memory = F.normalize(torch.randn(7, 16, generator=g), dim=1)
    x = F.normalize(torch.randn(40, 16, generator=g), dim=1)
    y = torch.randint(0, 7, (40,), generator=g)  # repeats: later samples must see the moved row
    ours = memory.clone()
    momentum_update_(ours, x, y, momentum)
    assert torch.allclose(ours, _loop_update(memory, x, y, momentum), atol=1e-6)
    assert not torch.allclose(ours, memory)
    hard = memory.clone()
    hard_momentum_update_(hard, x, y, momentum)
    assert torch.allclose(hard, _hard_loop_update(memory, x, y, momentum), atol=1e-6)
    untouched = sorted(set(range(7)) - set(y.tolist()))
    assert torch.equal(ours[untouched], memory[untouched])


def test_cluster_memory_loss_gradient_and_update():
    torch.manual_seed(0)
    centroids = torch.randn(5, 8)
    original = centroids.clone()
    loss_fn = ClusterMemory(8, temperature=0.05, momentum=0.2)
    loss_fn.reset(centroids)
    assert torch.allclose(loss_fn.memory.norm(dim=1), torch.ones(5))
    before = loss_fn.memory.clone()
    feats = torch.randn(6, 8, requires_grad=True)
    y = torch.tensor([0, 0, 1, 2, 2, 2])
    loss = loss_fn({"pooled": feats}, y)
    q = F.normalize(feats.detach(), dim=1)
    expected = F.cross_entropy(q @ before.T / 0.05, y)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert feats.grad is not None and torch.isfinite(feats.grad).all()
    assert torch.allclose(loss_fn.memory, _loop_update(before, q, y, 0.2), atol=1e-6)
    assert torch.equal(centroids, original)  # the memory is a copy: the caller's tensor is left alone
    read_only = centroids.numpy().copy()
    read_only.flags.writeable = False  # as the feature store's results come
    loss_fn.reset(read_only)
    assert torch.equal(loss_fn.memory, before)
    with pytest.raises(ValueError, match="centroids"):
        loss_fn.reset(torch.randn(3, 4))
    with pytest.raises(ValueError, match="momentum"):
        ClusterMemory(8, momentum=1.0)


def test_cluster_instance_batches_follow_the_sampler():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(12), 6)
    cameras = rng.integers(0, 3, labels.size)
    cameras[labels == 11] = 2  # one cluster seen by a single camera: other members of its own camera
    b = cluster_instance_batches(labels, cameras, num_instances=4, batch_size=16, num_batches=7, seed=3)
    assert b.shape == (7, 16)
    assert np.array_equal(b, cluster_instance_batches(labels, cameras, 4, 16, 7, seed=3))  # seeded
    assert not np.array_equal(b, cluster_instance_batches(labels, cameras, 4, 16, 7, seed=4))
    # a pass is 12 groups of 4 = 48 = 3 full batches; every group is one cluster, anchor first
    groups = b.reshape(-1, 4)
    assert (labels[groups] == labels[groups[:, :1]]).all()
    first_pass = labels[groups[:12, 0]]
    assert sorted(first_pass) == list(range(12)), "one pass visits every cluster once"
    for g in groups:
        if labels[g[0]] != 11 and (cameras[labels == labels[g[0]]] != cameras[g[0]]).sum() >= 3:
            assert (cameras[g[1:]] != cameras[g[0]]).all(), "others are drawn from other cameras first"
        if labels[g[0]] == 11:
            assert (g[1:] != g[0]).all()
    few = cluster_instance_batches(labels[:18], cameras[:18], 4, 16, 2, seed=0)  # 3 clusters: 12 a pass
    assert few.shape == (2, 16) and set(labels[few.ravel()]) == {0, 1, 2}
    with pytest.raises(ValueError, match="batch"):
        cluster_instance_batches(labels[:8], cameras[:8], 4, 16, 2, seed=0)
    with pytest.raises(ValueError, match="labels >= 0"):
        cluster_instance_batches(np.r_[labels, -1], np.r_[cameras, 0], 4, 16, 2, seed=0)


def test_batch_loader_splits_each_global_batch_over_ranks(tiny_root):
    from ureid.data.formats import load_dataset
    from ureid.engine.datasets import ReidImageDataset, pad_crop_erase_transforms

    records = load_dataset("market1501", tiny_root).train[:24]
    ds = ReidImageDataset(records, pad_crop_erase_transforms(32, 16), labels=np.arange(24) % 6)
    batches = np.array([[0, 1, 2, 3, 0, 0, 4, 5], [6, 7, 8, 9, 10, 11, 12, 13]])
    single = [idx.tolist() for _, _, idx, _ in make_batch_loader(ds, batches, seed=1, epoch=0)]
    assert single == batches.tolist()
    halves = [[idx.tolist() for _, _, idx, _ in make_batch_loader(ds, batches, seed=1, epoch=0, rank=r,
                                                                  world_size=2)] for r in (0, 1)]
    assert [a + b for a, b in zip(*halves)] == single
    imgs = next(iter(make_batch_loader(ds, batches, seed=1, epoch=0)))[0]
    assert not torch.equal(imgs[0], imgs[4]), "a sample drawn twice gets two augmentations"
    again = next(iter(make_batch_loader(ds, batches, seed=1, epoch=0)))[0]
    assert torch.equal(imgs, again)


def test_model_options_gem_bn_neck_and_last_stride():
    x = torch.randn(2, 3, 64, 32)
    net = ReidNet("resnet18", weights="none", embedding_dim=0, pooling="gem", neck="bn", last_stride=1).eval()
    assert net.trunk(x).shape[2:] == (4, 2)  # stride 16 instead of 32
    assert ReidNet("resnet18", weights="none", embedding_dim=0).eval().trunk(x).shape[2:] == (2, 1)
    assert ReidNet("resnet50", weights="none", embedding_dim=0, last_stride=1).eval().trunk(x).shape[2:] == (4, 2)
    assert float(net.gem.p.detach()) == 3.0 and net.gem.p.requires_grad
    assert not net.neck_bn.bias.requires_grad and net.neck_bn.weight.requires_grad
    fmap = net.trunk(x)
    gem = fmap.clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3)
    assert torch.allclose(net(x)["pooled"], net.neck_bn(gem), atol=1e-5)
    with pytest.raises(ValueError, match="pooling"):
        ReidNet("resnet18", weights="none", pooling="max")
    with pytest.raises(ValueError, match="last_stride=1"):
        ReidNet("mobilenet_v2", weights="none", last_stride=1)


def test_update_outliers_are_singletons_outside_training():
    from ureid.config import CONFIG_DIR, load_config
    from ureid.methods import UpdateContext

    cfg = load_config(CONFIG_DIR / "cluster_contrast_cpu.yaml", ["clustering.k1=10", "clustering.k2=2",
                                                                 "clustering.eps=0.6", "train.batch_size=8"])
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 32))
    feats = np.concatenate([c + 0.05 * rng.normal(size=(10, 32)) for c in centres] + [rng.normal(size=(3, 32)) * 5])
    method = get_method("cluster_contrast")
    ctx = UpdateContext(stage=0, seed=0, num_real=len(feats), cameras=np.zeros(len(feats), dtype=np.int64))
    t = method.update(cfg, feats.astype(np.float32), None, ctx)
    assert t.num_classes == 4 and t.centroids.shape == (4, 32)
    assert t.selected[:40].all()
    truth = np.repeat(np.arange(4), 10)
    for c in range(4):  # each true cluster is one pseudo cluster
        assert len(set(t.labels[:40][truth == c])) == 1
    n_out = int((~t.selected).sum())
    assert np.array_equal(np.sort(t.labels[~t.selected]), 4 + np.arange(n_out))
    assert np.allclose(np.linalg.norm(t.centroids, axis=1), 1.0, atol=0.01)
    d = method.diagnostics(cfg, t, t, np.r_[truth, [7, 8, 9]])
    assert d["cluster_pair_precision"] == 1.0 and d["outlier_fraction"] == pytest.approx(n_out / len(feats))
    cfg.train.batch_size, cfg.ray.num_workers = 21, 2  # 42 > the 40 clustered samples: refused in the update
    with pytest.raises(ValueError, match=r"kept 40 of 43 samples in clusters, fewer than one global batch of 42 "
                                         r"\(train.batch_size 21 x ray.num_workers 2\)"):
        method.update(cfg, feats.astype(np.float32), None, ctx)
    with pytest.raises(ValueError, match="no cluster"):
        cfg.clustering.eps = 1e-4
        method.update(cfg, rng.normal(size=(20, 32)).astype(np.float32), None,
                      UpdateContext(stage=0, seed=0, num_real=20, cameras=np.zeros(20, dtype=np.int64)))


def _cc_cfg(root, out, *extra):
    from test_pipeline import tiny_cfg

    # 25 tiny images: k1 6 / k2 2 / eps 0.6 give 3 clusters and 40% outliers on the ImageNet features
    return tiny_cfg("cluster_contrast", root, out, "clustering.k1=6", "clustering.k2=2", "clustering.eps=0.6",
                    "clustering.min_samples=3", "clustering.num_instances=2", "clustering.iters=2",
                    "clustering.epochs=2", "train.batch_size=4", "tracking.pictures=false", *extra)


def _adam_steps(run_dir: str, stage: int) -> set:
    from ureid.runtime.job import stage_checkpoints
    from ureid.runtime.stage_loop import STATE_FILE

    path = dict(stage_checkpoints(Path(run_dir)))[stage] / STATE_FILE
    state = torch.load(path, map_location="cpu", weights_only=False)["optimizer"]
    return {int(s["step"]) for s in state["state"].values()}


def test_two_stages_on_ray_train_with_identical_memories_and_one_adam(ray_cluster, tiny_root, tmp_path_factory):
    """Two stages, 2 workers, the real TorchTrainer, MLflow and faiss; then the same run stopped after
    stage 0 and resumed: same labels, and Adam's moments carried through the checkpoint."""
    from mlflow.tracking import MlflowClient

    from ureid.runtime.experiment import load_run_config, run_experiment

    out = tmp_path_factory.mktemp("cc")
    full = run_experiment(_cc_cfg(tiny_root, out), quiet=True)
    assert [h["stage"] for h in full["history"]] == [0, 1]
    client = MlflowClient(full["tracking_uri"])
    run = client.get_run(full["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["method"] == "cluster_contrast"
    same = client.get_metric_history(full["run_id"], "memory_replicas_identical")
    assert [x.value for x in same] == [1.0, 1.0], "the DDP replicas' cluster memories drifted apart"
    outliers = client.get_metric_history(full["run_id"], "outlier_fraction")
    assert len(outliers) == 2 and all(0.0 <= x.value < 1.0 for x in outliers)
    for h in full["history"]:
        assert h["num_classes"] >= 1 and 0.0 <= h["mAP"] <= 1.0
    # one Adam for the run: 2 batches a stage (train.max_batches_per_epoch=2 in the tiny config)
    assert _adam_steps(full["run_dir"], 0) == {2} and _adam_steps(full["run_dir"], 1) == {4}
    labels = np.load(f"{full['run_dir']}/labels.npy")
    assert labels.ndim == 1 and np.array_equal(np.unique(labels), np.arange(labels.max() + 1))

    out2 = tmp_path_factory.mktemp("cc_resume")
    first = run_experiment(_cc_cfg(tiny_root, out2, "schedule.max_stages=1"), quiet=True)
    resumed = run_experiment(load_run_config(first["run_dir"], ["schedule.max_stages=2"]),
                             resume=first["run_dir"], quiet=True)
    assert [h["stage"] for h in resumed["history"]] == [0, 1]
    assert _adam_steps(resumed["run_dir"], 1) == {4}, "the resumed stage started a fresh Adam"
    assert np.array_equal(np.load(f"{resumed['run_dir']}/labels.npy"), labels)
    for a, b in zip(resumed["history"], full["history"]):
        assert a["num_clusters"] == b["num_clusters"] and a["mAP"] == pytest.approx(b["mAP"], abs=1e-6)
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)  # a fresh Adam would train differently


def test_a_sweep_over_its_own_keys_runs_through_tune(ray_cluster, tiny_root, tmp_path):
    """Cluster Contrast's search keys (eps, k1, temperature) through the same ``ureid tune`` as the seed methods,
    with Optuna: its first trial is the paper point (the base config's values moved into the space, every
    one of them other than the base's here, so the trial's own setting is seen to reach its run), a 2-worker
    Train run with its clustering slots reserved, its child run carrying its setting, and the label-free
    objective reported per stage. One trial: each costs a Train run. The seed methods' sweeps (grid, ASHA, a
    killed driver) and Optuna's later suggestions: tests/test_tune.py."""
    from mlflow.tracking import MlflowClient

    from ureid.config import load_config, save_config
    from ureid.runtime.tune import paper_point, run_sweep

    base = save_config(_cc_cfg(tiny_root, tmp_path / "out", "schedule.max_stages=1"), tmp_path / "base.yaml")
    space = {"clustering.eps": {"choice": [0.7, 0.8]}, "clustering.k1": {"choice": [8, 10]},
             "loss.temperature": {"loguniform": [0.1, 0.2]}}
    (tmp_path / "space.yaml").write_text(json.dumps({"space": space}))  # JSON is YAML
    summary = run_sweep(base, "cluster_contrast", [], space_file=str(tmp_path / "space.yaml"), search="optuna",
                        num_samples=1, scheduler="none", max_concurrent=1, quiet=True)
    base_cfg = load_config(base)
    assert base_cfg.clustering.eps == 0.6 and base_cfg.clustering.k1 == 6 and base_cfg.loss.temperature < 0.1
    want = {"clustering.eps": 0.7, "clustering.k1": 8, "loss.temperature": 0.1}
    assert paper_point(base_cfg.to_dict(), space) == want
    (trial,) = summary["trials"]
    assert trial["status"] == "finished" and {k: trial[k] for k in want} == want
    client = MlflowClient(summary["tracking_uri"])
    run = client.get_run(client.search_runs(
        [client.get_run(summary["parent_run_id"]).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{summary['parent_run_id']}' and attributes.run_name = '{trial['trial']}'")[0].info.run_id)
    assert float(run.data.params["clustering.eps"]) == 0.7
    assert float(run.data.params["loss.temperature"]) == 0.1 and run.data.params["clustering.k1"] == "8"
    assert [m.step for m in client.get_metric_history(run.info.run_id, summary["objective"])] == [0]


def test_group_sums_are_bitwise_those_of_np_add_at(monkeypatch):
    """The centroids' float64 sums (``clustering._common.group_sums``): each group's rows added in row order
    from 0.0, across chunk boundaries and with -0.0 inputs, bit for bit what np.add.at gives; the default
    chunk (None) is cut by bytes, here 384: 1 to 6 rows of one thread's columns."""
    from ureid.clustering import _common
    from ureid.clustering._common import group_sums

    monkeypatch.setattr(_common, "GROUP_SUMS_CHUNK_BYTES", 384)
    rng = np.random.default_rng(0)
    for n, d, groups, chunk in ((500, 8, 7, 13), (300, 5, 150, 4), (64, 3, 2, 1), (1000, 16, 40, 8192),
                                (700, 16, 30, None), (200, 40, 3, None)):
        x = rng.standard_normal((n, d)).astype(np.float32)
        x[rng.random((n, d)) < 0.05] = -0.0
        labels = rng.integers(-1, groups, n)  # -1: outliers, left out
        ref = np.zeros((groups, d))
        np.add.at(ref, labels[labels >= 0], x[labels >= 0])
        for threads in (1, 2, 3):  # column ranges summed on threads: each as the whole
            got = group_sums(x, labels, groups, chunk_rows=chunk, threads=threads)
            assert np.array_equal(ref.view(np.int64), got.view(np.int64)), (n, d, groups, chunk, threads)


def test_jaccard_on_more_threads_is_bitwise_the_one_thread_matrix(monkeypatch):
    """The softmax weights' dot products and rows, the expansion's and the Jaccard sums' row blocks run on
    torch's thread count (``ray.store_threads`` in the store): the distances are bitwise those of one thread,
    and of one row block."""
    import torch

    from ureid.clustering import jaccard, kreciprocal_jaccard

    rng = np.random.default_rng(3)
    x = (rng.standard_normal((70, 1024))[rng.integers(0, 70, 700)] + rng.standard_normal((700, 1024))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # d = 1024: the pairs' dots take several 4,096-pair chunks
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kreciprocal_jaccard(x, k1=12, k2=4)  # every pass in one row block (700 rows)
        stats = {}
        monkeypatch.setattr(jaccard, "_TRIPLE_BUDGET", 3000)  # dozens of row blocks per pass
        torch.set_num_threads(3)
        many = kreciprocal_jaccard(x, k1=12, k2=4, stats=stats)
    finally:
        torch.set_num_threads(before)
    assert one.nnz > 10 * len(x) and stats["triples"] > 20 * 3000
    assert np.array_equal(one.indptr, many.indptr) and np.array_equal(one.indices, many.indices)
    assert np.array_equal(one.data.view(np.int32), many.data.view(np.int32))
