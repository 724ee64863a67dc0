"""What one run reads: the dataset named by the config, camstyle fakes, PUL's labeled source.

Training samples are ordered real images first (index ``0..N0-1``), then camstyle fakes; each real
image's *support set* is itself plus its fakes, and they start as one cluster.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..config import Config, DataConfig
from ..data.records import Record

FAKE_NAME = re.compile(r"^(?P<stem>.+)_fake_c(?P<cam>\d+)\.(jpg|jpeg|png)$", re.IGNORECASE)


def ensure_synthetic(data: DataConfig) -> None:
    """Generate the synthetic default on first use (a no-op when the manifest matches)."""
    if data.name == "synthetic":
        from ..data import synthetic

        synthetic.generate(data.root, **data.synthetic)


def load_split_dataset(data: DataConfig):
    from ..data import load_dataset

    ensure_synthetic(data)
    if data.name == "synthetic":
        name = "mars" if data.synthetic.get("video") else "market1501"
    else:
        name = data.name
    return load_dataset(name, data.root, pattern=data.pattern, cuhk03_protocol=data.cuhk03_protocol,
                        bad_images=data.bad_images)


def fake_folder(cfg: Config) -> Path:
    root = getattr(cfg.clustering, "fake_root", None)
    return Path(root) if root else Path(cfg.data.root) / "bounding_box_train_camstyle"


def load_fakes(cfg: Config, train: list[Record]) -> list[tuple[int, Record]]:
    """Camera-style fakes named ``<real stem>_fake_c<camera>.jpg`` (camera 1-based), as (source index, record)."""
    folder = fake_folder(cfg)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"camstyle needs camera-style fakes in {folder} (files named <real stem>_fake_c<k>.jpg, one per other "
            f"camera); make them with `ureid data camstyle --root {cfg.data.root}` (colour-statistics stand-in) "
            f"or with a StarGAN, or set clustering.fake_root"
        )
    by_stem = {Path(r.path).stem: i for i, r in enumerate(train)}
    fakes = []
    for path in sorted(folder.iterdir()):
        m = FAKE_NAME.match(path.name)
        if not m:
            continue
        if m["stem"] not in by_stem:
            raise ValueError(f"camstyle fake {path} has no real training image named {m['stem']}.*")
        src = by_stem[m["stem"]]
        fakes.append((src, Record((str(path),), train[src].pid, int(m["cam"]) - 1, is_fake=True)))
    if not fakes:
        raise FileNotFoundError(f"no camstyle fakes named <real stem>_fake_c<k>.jpg in {folder}")
    return fakes


def load_run_data(cfg: Config) -> dict:
    ds = load_split_dataset(cfg.data)
    train = list(ds.train)
    n0 = len(train)
    out: dict = {"query": ds.query, "gallery": ds.gallery, "n0": n0}
    if cfg.method == "camstyle":
        fakes = load_fakes(cfg, train)
        support = [[i] for i in range(n0)]
        support_labels = list(range(n0))
        for src, rec in fakes:
            support[src].append(len(train))
            support_labels.append(src)
            train.append(rec)
        out["support"] = support
        out["support_labels"] = np.asarray(support_labels, dtype=np.int64)
    if cfg.method == "pul":
        source = cfg.clustering.source
        if source is None:
            raise ValueError("pul needs clustering.source: the labeled source dataset of its original model")
        out["source"] = [r for r in load_split_dataset(source).train if r.pid >= 0]
    out["train"] = train
    out["pids"] = np.array([r.pid for r in train])
    out["cameras"] = np.array([r.camid for r in train])
    out["is_fake"] = np.array([r.is_fake for r in train]) if cfg.method == "camstyle" else None
    return out
