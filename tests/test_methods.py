"""The methods' pure pieces: target updates on features, diagnostics, the registry."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from ureid.config import CONFIG_DIR, load_config
from ureid.methods import METHODS, Targets, UpdateContext, get_method, pair_precision, register
from ureid.methods.pul import labeled_identities


def _blobs(n_ids=6, per_id=5, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_ids, dim)) * 4
    pids = np.repeat(np.arange(1, n_ids + 1), per_id)
    return centres[pids - 1] + rng.normal(size=(pids.size, dim)) * 0.3, pids


def _ctx(n, **kw):
    return UpdateContext(stage=kw.pop("stage", 0), seed=0, num_real=n, cameras=np.zeros(n, np.int64), **kw)


def test_pair_precision_counts_only_newly_joined_pairs():
    old = np.array([0, 0, 1, 2])
    pids = np.array([7, 7, 7, 8])
    # 0,1,2 joined: new pairs (0,2),(1,2) share identity 7 -> 1.0
    assert pair_precision(old, np.array([0, 0, 0, 1]), pids) == 1.0
    # everything joined: new pairs (0,2),(1,2) same; (0,3),(1,3),(2,3) different -> 2/5
    assert pair_precision(old, np.array([0, 0, 0, 0]), pids) == pytest.approx(2 / 5)
    assert pair_precision(old, old, pids) is None


def test_pul_semi_supervised_adds_known_identities_each_iteration():
    feats, pids = _blobs()
    cfg = load_config(CONFIG_DIR / "pul_cpu.yaml", ["clustering.num_clusters=6", "clustering.threshold=1.0",
                                                     "clustering.labeled_ids_per_iteration=2"])
    pul = METHODS["pul"]
    first = labeled_identities(pids, 2, 0, seed=0)
    second = labeled_identities(pids, 2, 1, seed=0)
    assert first.size == 2 and second.size == 4 and set(first) <= set(second)
    assert np.array_equal(pul.known_identities(cfg, 0, 0, np.unique(pids)), second)  # stage 0 = iteration 1
    known_labels = np.where(np.isin(pids, second), pids, -1)
    zeros = Targets(labels=np.zeros(len(pids), int))
    out = pul.update(cfg, feats, zeros, _ctx(len(pids), known_labels=known_labels))
    known = np.isin(pids, second)
    # each known identity is one class of its own, apart from the k-means classes 0..5
    assert len({int(x) for x in out.labels[known]}) == 4 and out.labels[known].min() >= 6
    plain = load_config(CONFIG_DIR / "pul_cpu.yaml", ["clustering.num_clusters=6", "clustering.threshold=1.0"])
    assert pul.known_identities(plain, 0, 0, np.unique(pids)).size == 0
    # threshold 1 selects no sample here (none is its centre to the last bit): the known identities alone
    assert np.array_equal(out.selected, known)
    with pytest.raises(ValueError, match=r"no sample lies within clustering.threshold=1.0 \(cosine\) of its k-means "
                                         r"centre \(6 clusters of 30 samples\): lower the threshold"):
        pul.update(plain, feats, zeros, _ctx(len(pids)))
    plain.clustering.threshold = 0.995
    out0 = pul.update(plain, feats, zeros, _ctx(len(pids)))
    assert out0.labels.max() < 6 and 0 < out0.selected.sum() < len(pids)
    assert pul.diagnostics(plain, zeros, out0, pids) == {"selected_fraction": float(out0.selected.mean())}


def test_buc_update_merges_exactly_mp_n0_and_keeps_identities_on_easy_data():
    feats, pids = _blobs()
    cfg = load_config(CONFIG_DIR / "buc_cpu.yaml", ["clustering.merge_percent=0.5"])
    n = len(pids)
    old = Targets(labels=np.arange(n))
    out = METHODS["buc"].update(cfg, feats, old, _ctx(n))
    assert out.num_classes == n - n // 2
    assert METHODS["buc"].diagnostics(cfg, old, out, pids) == {"merge_precision": 1.0}


def test_update_context_rejects_a_misspelt_field():
    with pytest.raises(TypeError):
        UpdateContext(stage=0, seed=0, num_real=1, cameras=np.zeros(1), pids=np.zeros(1))
    ctx = _ctx(3)
    with pytest.raises(AttributeError):
        ctx.pids  # noqa: B018  (ground truth is not part of the context)


def test_registry_names_and_refuses_duplicates():
    assert sorted(METHODS) == ["buc", "camstyle", "cluster_contrast", "dbc", "pul", "ssl"]
    with pytest.raises(KeyError, match="registered: buc, camstyle"):
        get_method("kmeans")
    clone = type(METHODS["buc"])()
    with pytest.raises(ValueError, match="already registered"):
        register(clone)
    for method in METHODS.values():  # every method's search space names keys its config has
        cfg = load_config(CONFIG_DIR / f"{method.name}_cpu.yaml")
        for key in method.search_space:
            section, name = key.split(".", 1)
            assert name in type(getattr(cfg, section)).model_fields, (method.name, key)


def test_l2_normalise_overwrites_only_when_allowed_and_gives_the_same_values():
    """A store's update may scale its gathered features in place (``ctx.features_writable``); anything
    else gets a copy, and both hold x / |x| exactly."""
    from ureid.methods import l2_normalise

    x = np.random.default_rng(0).normal(size=(300, 3, 40)).astype(np.float32) * 5
    want = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    y = x.copy()
    copy = l2_normalise(y)
    assert copy is not y and np.array_equal(y, x) and np.array_equal(copy, want)
    assert l2_normalise(y, overwrite=True) is y and np.array_equal(y, want)
    z = x.astype(np.float64)
    assert l2_normalise(z, overwrite=True) is not z and np.array_equal(z, x.astype(np.float64))  # a converted copy


@pytest.mark.parametrize("method,sets", [
    ("buc", ["clustering.merge_percent=0.1"]), ("camstyle", []), ("dbc", []), ("ssl", []),
    ("pul", ["clustering.num_clusters=150"]), ("cluster_contrast", ["clustering.k1=20", "clustering.eps=0.5"]),
])
def test_each_update_on_a_torch_device_gives_the_cpu_paths_targets(method, sets):
    """``UpdateContext.device`` (a store with ``ray.store_gpus`` passes "cuda") takes each method's clustering
    through its torch path: BUC's k-NN in torch instead of faiss, PUL's torch Lloyd instead of the lockstep one,
    Cluster Contrast's k-NN in torch. Given "cpu" here (no GPU on this machine): the same targets as the NumPy/faiss
    path, on overlapping clusters where a careless path would differ (3,000 samples, 300 identities, stage 1's
    labels of a previous merge for the merging methods, a quarter fake for camstyle)."""
    rng = np.random.default_rng(1)
    n = 3000
    x = (rng.normal(size=(300, 128))[rng.integers(0, 300, n)] + 1.5 * rng.normal(size=(n, 128))).astype(np.float32)
    parts = rng.normal(size=(n, 3, 32)).astype(np.float32)
    _, previous = np.unique(rng.integers(0, 2500, n), return_inverse=True)
    cfg = load_config(CONFIG_DIR / f"{method}_cpu.yaml", sets)
    out = {}
    cuda = torch.cuda.is_available()
    for device in (None, "cpu", *(["cuda"] if cuda else [])):
        ctx = UpdateContext(stage=1, seed=0, num_real=n, cameras=np.arange(n) % 6,
                            is_fake=np.arange(n) % 4 == 0 if method == "camstyle" else None, parts=parts,
                            device=device)
        out[device] = METHODS[method].update(cfg, x.copy(), Targets(labels=previous.astype(np.int64)), ctx)
    cpu = out[None]
    assert cpu.num_classes < n  # it clustered
    for device in out:
        assert np.array_equal(cpu.labels, out[device].labels), device
        for name in ("neighbors", "selected"):
            a, b = getattr(cpu, name), getattr(out[device], name)
            assert (a is None) == (b is None) and (a is None or np.array_equal(a, b)), (device, name)
    if not cuda:  # the device reaches the clustering: without CUDA, asking for it fails in torch
        with pytest.raises((AssertionError, RuntimeError), match="CUDA|cuda|NVIDIA"):
            METHODS[method].update(cfg, x.copy(), Targets(labels=previous.astype(np.int64)), replace(ctx, device="cuda"))


def test_pul_refuses_more_clusters_than_training_images(tiny_root):
    """PUL's update clamped K to N in silence: a preset's K = 80 on a folder of 10 crops ran k-means with every
    image its own cluster. The driver now refuses K > N with both numbers, before Ray starts."""
    from ureid.runtime.experiment import load_run_data

    from conftest import TINY_SYNTH

    sets = [f"data.root={tiny_root}", f"clustering.source.root={tiny_root}",
            *[f"{part}.synthetic.{k}={v}" for part in ("data", "clustering.source") for k, v in TINY_SYNTH.items()]]
    n = len(load_run_data(load_config(CONFIG_DIR / "pul_cpu.yaml", sets + ["clustering.num_clusters=5"]),
                          get_method("pul")).train)
    cfg = load_config(CONFIG_DIR / "pul_cpu.yaml", sets + [f"clustering.num_clusters={n + 1}"])
    with pytest.raises(ValueError, match=rf"clustering.num_clusters={n + 1} is more than the {n} training images"):
        load_run_data(cfg, get_method("pul"))


def test_cluster_contrast_refuses_k1_above_the_training_images(tiny_root):
    """Its update refuses k1 > N inside the feature store, after Ray and the trainer started; the driver
    says it first."""
    from conftest import TINY_SYNTH

    from ureid.runtime.experiment import load_run_data

    sets = [f"data.root={tiny_root}", *[f"data.synthetic.{k}={v}" for k, v in TINY_SYNTH.items()]]
    n = len(load_run_data(load_config(CONFIG_DIR / "cluster_contrast_cpu.yaml", sets + ["clustering.k1=2"]),
                          get_method("cluster_contrast")).train)
    cfg = load_config(CONFIG_DIR / "cluster_contrast_cpu.yaml", sets + [f"clustering.k1={n + 1}"])
    with pytest.raises(ValueError, match=rf"clustering.k1={n + 1} exceeds the {n} training images"):
        load_run_data(cfg, get_method("cluster_contrast"))


@pytest.mark.parametrize("method", ["buc", "dbc", "camstyle"])
def test_merge_schedules_end_before_the_clusters_run_out(method):
    """int(1 / mp) - 1 stages, each merging int(mp N0) pairs and at least one: on fewer than 1 / mp images the
    last updates had nothing to merge (5 crops at mp 0.1: stage 5 of 9 failed). The schedule stops at one
    cluster there and is the paper's everywhere else."""
    from ureid.methods import RunData

    cfg = load_config(CONFIG_DIR / f"{method}_cpu.yaml", ["clustering.merge_percent=0.1"])
    stages = {n: get_method(method).num_stages(cfg, RunData(train=[], query=[], gallery=[], num_real=n))
              for n in (5, 9, 10, 625, 12936)}
    assert stages == {5: 4, 9: 8, 10: 9, 625: 9, 12936: 9}


def test_ssl_loss_takes_read_only_neighbours_without_a_warning():
    """The store's targets reach the workers read-only (Ray's object store): a tensor over them made torch warn
    ("The given NumPy array is not writable") on every worker at SSL's stage 1."""
    import warnings

    cfg = load_config(CONFIG_DIR / "ssl_cpu.yaml")
    neighbors = np.array([[1, 2], [0, 2], [0, 1]])
    neighbors.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = get_method("ssl").build_loss(cfg, Targets(labels=np.arange(3), neighbors=neighbors), 3, 16)
    assert torch.equal(loss.neighbors.cpu(), torch.from_numpy(neighbors.copy()))
