"""The one record type every dataset format yields.

An image dataset has one path per record; a video dataset (MARS, DukeMTMC-VideoReID) has one
record per tracklet whose ``paths`` are its frames in temporal order. ``pid`` is the identity
(-1 junk, 0 distractor in Market-style layouts' test splits, -1 unknown in the training images of an
unlabeled folder; only used for evaluation and diagnostics in the unsupervised methods), ``camid`` the
0-based camera index, ``is_fake`` marks camera-style transferred images (camstyle), which are never evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

UNKNOWN_PID = -1  # a training image whose identity nobody knows (an unlabeled folder)


def known_identities(records) -> np.ndarray | None:
    """The records' identities (int64), or None when any is :data:`UNKNOWN_PID` (an unlabeled folder): for
    diagnostics and pictures only, which then measure or frame nothing by identity."""
    import numpy as np

    pids = np.array([r.pid for r in records], dtype=np.int64)
    return None if (pids == UNKNOWN_PID).any() else pids


@dataclass(frozen=True)
class Record:
    paths: tuple[str, ...]
    pid: int
    camid: int
    is_fake: bool = False

    @property
    def path(self) -> str:
        return self.paths[0]


@dataclass
class ReidDataset:
    """The three splits of a re-ID dataset, as lists of :class:`Record`."""

    name: str
    root: str
    train: list[Record] = field(default_factory=list)
    query: list[Record] = field(default_factory=list)
    gallery: list[Record] = field(default_factory=list)
    is_video: bool = False
    # camid -> the camera as the data names it, where a reader numbered values of its own (a pattern's camid
    # group: '3', 'cam_a'); None for the fixed layouts, whose c1..cN are camid 0..N-1
    camera_names: list[str] | None = None

    def camera_name(self, camid: int) -> str:
        return self.camera_names[camid] if self.camera_names is not None else f"c{camid + 1}"

    def summary(self) -> str:
        def stats(recs: list[Record]) -> str:
            pids = {r.pid for r in recs}
            cams = {r.camid for r in recs}
            ids = "unlabeled" if recs and pids == {UNKNOWN_PID} else f"{len(pids):>5} ids"
            return f"{len(recs):>7} records {ids:>9} {len(cams):>3} cameras"

        return "\n".join(
            f"  {split:<8}{stats(getattr(self, split))}" for split in ("train", "query", "gallery")
        )
