"""Reading the dataset a config names: the synthetic default generated on first use, the split lists."""

from __future__ import annotations

from ..config import DataConfig
from .records import ReidDataset


def ensure_synthetic(data: DataConfig) -> None:
    """Generate the synthetic default on first use (a no-op when the manifest matches)."""
    if data.name == "synthetic":
        from . import synthetic

        synthetic.generate(data.root, **data.synthetic)


def load_split_dataset(data: DataConfig) -> ReidDataset:
    """The train/query/gallery records of ``data`` (every image checked readable unless the format says not)."""
    from .formats import load_dataset

    ensure_synthetic(data)
    if data.name == "synthetic":
        name = "mars" if data.synthetic.get("video") else "market1501"
    else:
        name = data.name
    return load_dataset(name, data.root, pattern=data.pattern, cuhk03_protocol=data.cuhk03_protocol,
                        bad_images=data.bad_images)
