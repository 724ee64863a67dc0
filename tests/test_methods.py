"""The method table's pure pieces: target updates on features, the merge diagnostic."""

import numpy as np
import pytest

from ureid.config import CONFIG_DIR, load_config
from ureid.methods import METHODS, labeled_identities, pair_precision


def _blobs(n_ids=6, per_id=5, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_ids, dim)) * 4
    pids = np.repeat(np.arange(1, n_ids + 1), per_id)
    return centres[pids - 1] + rng.normal(size=(pids.size, dim)) * 0.3, pids


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
    first = labeled_identities(pids, 2, 0, seed=0)
    second = labeled_identities(pids, 2, 1, seed=0)
    assert first.size == 2 and second.size == 4 and set(first) <= set(second)
    out = METHODS["pul"].update(cfg, feats, {"labels": np.zeros(len(pids), int)}, len(pids), seed=0, stage=0,
                                pids=pids)
    known = np.isin(pids, second)
    # each known identity is one class of its own, apart from the k-means classes 0..5
    assert len({int(x) for x in out["labels"][known]}) == 4 and out["labels"][known].min() >= 6
    plain = load_config(CONFIG_DIR / "pul_cpu.yaml", ["clustering.num_clusters=6", "clustering.threshold=1.0"])
    out0 = METHODS["pul"].update(plain, feats, {"labels": np.zeros(len(pids), int)}, len(pids), seed=0, stage=0,
                                 pids=pids)
    # threshold 1 selects (up to rounding) only the centres themselves; the known identities come on top
    assert out0["labels"].max() < 6 and out0["selected"].sum() <= 6
    assert np.array_equal(out["selected"], known | out0["selected"])


def test_buc_update_merges_exactly_mp_n0_and_keeps_identities_on_easy_data():
    feats, pids = _blobs()
    cfg = load_config(CONFIG_DIR / "buc_cpu.yaml", ["clustering.merge_percent=0.5"])
    n = len(pids)
    out = METHODS["buc"].update(cfg, feats, {"labels": np.arange(n)}, n)
    assert np.unique(out["labels"]).size == n - n // 2
    assert pair_precision(np.arange(n), out["labels"], pids) == 1.0
