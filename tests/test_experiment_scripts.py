"""The measurement scripts behind the README's reference numbers run on tiny data (images and tracklets)."""

import importlib.util
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_SYNTH
from ureid.config import CONFIG_DIR

from test_config import REPO


def _script(name, folder="experiments"):
    spec = importlib.util.spec_from_file_location(name, REPO / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny(root, video=False):
    sets = [f"data.root={root}", "data.height=32", "data.width=16", "train.batch_size=8",
            "train.eval_batch_size=16", "data.seq_len=2", "data.max_test_frames=3"]
    synth = {**TINY_SYNTH, **({"video": True, "min_frames": 2, "max_frames": 4, "mean_frames": 3} if video else {})}
    return sets + [f"data.synthetic.{k}={v}" for k, v in synth.items()]


def test_handcrafted_features_and_table(tmp_path, capsys):
    mod = _script("handcrafted_baselines")
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 20, 3), dtype=np.uint8))
    assert mod.hsv_histogram(img).sum() == 40 * 20 and mod.hsv_histogram(img).size == 8 * 4 * 4
    assert mod.pixels(img).size == 16 * 32 * 3
    assert mod.main(["--config", str(CONFIG_DIR / "buc_cpu.yaml"), *sum((["--set", s] for s in _tiny(tmp_path / "d")), [])]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("pixels", "HSV"))]
    assert len(rows) == 2 and all(line.count("%") == 4 for line in rows)


def test_reference_points_on_tracklets(tmp_path):
    mod = _script("reference_points")
    out = tmp_path / "ref.json"
    sets = sum((["--set", s] for s in _tiny(tmp_path / "v", video=True)), [])
    assert mod.main(["--config", str(CONFIG_DIR / "buc_video_cpu.yaml"), *sets, "--epochs", "1", "--threads", "1",
                     "--json", str(out)]) == 0
    ref = json.loads(out.read_text())
    assert 0.0 <= ref["floor"]["mAP"] <= 1.0 and 0.0 <= ref["ceiling"]["mAP"] <= 1.0


def test_reference_points_with_no_epochs_reports_the_floor_only(tmp_path):
    mod = _script("reference_points")
    out = tmp_path / "ref.json"
    sets = sum((["--set", s] for s in _tiny(tmp_path / "d")), [])
    assert mod.main(["--config", str(CONFIG_DIR / "buc_cpu.yaml"), *sets, "--epochs", "0", "--threads", "1",
                     "--json", str(out)]) == 0
    ref = json.loads(out.read_text())
    assert 0.0 <= ref["floor"]["mAP"] <= 1.0 and ref["ceiling"] is None and ref["epochs"] == 0
    # the CPU preset starts from ImageNet: the random-init floor and the ImageNet-only start are both reported
    assert ref["weights"] == "imagenet" and 0.0 <= ref["start"]["mAP"] <= 1.0
    with pytest.raises(SystemExit):
        mod.main(["--config", str(CONFIG_DIR / "buc_cpu.yaml"), *sets, "--epochs", "-1"])


def test_cluster_contrast_grid_scores_every_setting_without_labels(tmp_path, capsys):
    mod = _script("cluster_contrast_grid")
    sets = sum((["--set", s] for s in [*_tiny(tmp_path / "d"), "clustering.k2=2"]), [])
    assert mod.main(["--config", str(CONFIG_DIR / "cluster_contrast_cpu.yaml"), *sets,
                     "--k1", "6", "--eps", "0.6", "0.9"]) == 0
    rows = [line.strip("| ").split(" | ") for line in capsys.readouterr().out.splitlines()
            if line.startswith("| 6 |")]
    assert [r[1] for r in rows] == ["0.6", "0.9"]
    for _, _, clusters, outliers, sil, sil0 in rows:
        kept = 1 - float(outliers.rstrip("%")) / 100
        assert int(clusters) >= 0 and -1 <= float(sil) <= 1
        assert float(sil0) == pytest.approx(float(sil) * kept, abs=0.006)  # outliers' share printed to 1%


def test_scaling_throughput_part_trains_the_configs_network_on_the_device():
    """``benchmarks/scaling.py --throughput DEVICE``: the row a GPU session fills (images/s per train worker),
    here on the CPU with a small network and input."""
    scaling = _script("scaling", "benchmarks")
    small = ("model.arch=resnet18", "data.height=64", "data.width=32")
    row = scaling.part_throughput("cpu", batch=3, steps=2, warmup=1, overrides=small, num_classes=20)
    assert (row["arch"], row["size"], row["batch"]) == ("resnet18", "64x32", 3)
    assert row["device"].startswith("CPU") and np.isfinite(row["loss"]) and row["loss"] > 0
    assert row["images_per_s"] == pytest.approx(3 / row["step_s"]) and row["step_s"] > 0
    with pytest.raises(ValueError, match="batch and steps"):
        scaling.part_throughput("cpu", batch=0, overrides=small)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device"):
            scaling.part_throughput("cuda", overrides=small)


def test_scaling_store_gpus_is_checked_before_anything_runs(monkeypatch, capsys):
    """``benchmarks/scaling.py --store-gpus SHARE``: the GPU session's update rows. A share outside [0, 1] is
    refused by the parser; without CUDA the flag stops the script before any cluster starts, naming it."""
    scaling = _script("scaling", "benchmarks")
    monkeypatch.setattr(sys, "argv", ["scaling.py", "--skip-train", "--store-gpus", "2"])
    with pytest.raises(SystemExit):
        scaling.main()
    assert "--store-gpus must be in [0, 1] (ray.store_gpus), got 2" in capsys.readouterr().err
    if not torch.cuda.is_available():
        monkeypatch.setattr(sys, "argv", ["scaling.py", "--skip-train", "--store-gpus", "1"])
        with pytest.raises(SystemExit, match=r"--store-gpus 1: this machine has no CUDA device"):
            scaling.main()


def test_scaling_updates_on_a_device_match_the_cpu_path():
    """``benchmarks/scaling.py --updates-on DEVICE``: each method's update in one process on the torch path (what a
    store with ``ray.store_gpus`` runs), timed beside that device's GEMM floor and compared with the NumPy/faiss
    path. Here on the CPU (the torch path there), small."""
    scaling = _script("scaling", "benchmarks")
    methods = ["buc", "dbc", "ssl", "pul", "cluster_contrast"]
    rows = scaling.part_device_updates("cpu", methods, n=1200, repeat=1)
    assert [r["method"] for r in rows] == methods
    for r in rows:
        assert r["same"] and r["reference"] == "NumPy/faiss", r
        assert r["time_s"] > 0 and r["first_s"] > 0 and r["floor"] > 0
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match=r"--updates-on cuda: this machine has no CUDA device"):
            scaling.part_device_updates("cuda", ["buc"], n=100)
