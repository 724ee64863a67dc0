"""Reading the dataset a config names: the synthetic default generated on first use, the split lists."""

from __future__ import annotations

from pathlib import Path

from ..config import DataConfig
from .records import ReidDataset


def ensure_synthetic(data: DataConfig, key: str = "data") -> bool:
    """Generate the synthetic default on first use (a no-op when the manifest matches); True when it wrote it now.

    A folder holding a synthetic dataset made with other parameters (e.g. by ``ureid data synth``) is refused
    with the settings that read it as it is, a folder holding something else (a user's dataset, with ``name``
    left at its default) with the format it looks like; ``key`` is where ``data`` sits in the config (for the
    message)."""
    if data.name != "synthetic":
        return False
    from . import synthetic

    root = Path(data.root).expanduser()
    before = synthetic.read_manifest(root)
    try:
        synthetic.generate(data.root, **data.synthetic)
    except synthetic.NotSynthetic:
        raise FileExistsError(f"{key}.root={data.root!r} holds no synthetic dataset (no {synthetic.MANIFEST}) and "
                              f"{key}.name is 'synthetic' (the default), which writes one there: refusing to write "
                              f"into a folder that is not empty. {_read_as_is(root, key)}") from None
    except synthetic.OtherParameters as exc:
        if not exc.diff:
            raise
        have = " ".join(f"--set {key}.synthetic.{name}={_yaml_value(old)}" for name, (old, _) in exc.diff.items())
        differ = ", ".join(f"{name} {old!r} (the config's: {new!r})" for name, (old, new) in exc.diff.items())
        layout = "mars" if exc.diff.get("video", (data.synthetic.get("video", False),))[0] else "market1501"
        raise FileExistsError(
            f"{key}.root={data.root!r} holds a synthetic dataset made with other parameters: {differ}. "
            f"To use it as it is: {have} (or read it as a real dataset: --set {key}.name={layout}); "
            f"to use the config's parameters: another {key}.root, or replace the folder with "
            f"`ureid data synth --out {data.root} --overwrite ...`") from None
    return synthetic.read_manifest(root) != before


def _read_as_is(root: Path, key: str) -> str:
    """How to read ``root`` as the dataset it looks like (for a message)."""
    from .formats import DATASETS, guess_format

    guess = guess_format(root)
    if guess is None:
        return (f"It holds no image; to read a dataset, set {key}.name to its format ({', '.join(sorted(DATASETS))}); "
                f"for the synthetic default, another {key}.root")
    name, why = guess
    how = f"--set {key}.name={name}"
    if name == "folder":
        how += f" (unlabeled crops; {key}.pattern reads identities and cameras from file names, see the README)"
    return f"It looks like {name} ({why}): {how}; for the synthetic default, another {key}.root"


def _yaml_value(value) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


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
