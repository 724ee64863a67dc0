"""Readers for the public re-ID dataset layouts, as users download and extract them.

Every reader returns a :class:`~ureid.data.records.ReidDataset` whose records keep the
dataset's **original** identity numbers (no relabelling: the unsupervised methods never look at
them, and a supervised caller relabels the training ids itself) and **0-based** camera ids.
The identity conventions of the Market-1501 family are kept as they are: ``-1`` marks junk
images and ``0`` distractors; the evaluation protocol (DESIGN.md) ignores the first and counts
the second as negatives.

The layouts follow the published datasets and the reference loaders of torchreid
(KaiyangZhou/deep-person-reid), which the published numbers were produced with:

===============  ===========================================================================
``market1501``   ``bounding_box_train/ bounding_box_test/ query/``, ``0002_c1s1_000451_03.jpg``
``dukemtmc``     same folders, ``0001_c2_f0046182.jpg``
``msmt17``       ``list_{train,val,query,gallery}.txt`` (``relpath pid``), images under
                 ``train/`` and ``test/`` (V2: ``mask_train_v2/``, ``mask_test_v2/``);
                 camera = third ``_`` field of ``0000_000_01_0303morning_0015_0.jpg``
``cuhk03``       new protocol: ``images_labeled/`` (or ``images_detected/``) +
                 ``cuhk03_new_protocol_config_labeled.mat`` (``..._detected.mat``)
``mars``         ``bbox_train/ bbox_test/ info/`` with the name lists and track tables
``dukevideo``    DukeMTMC-VideoReID ``train|query|gallery/<pid>/<tracklet>/<frames>.jpg``
``folder``       any tree of images: unlabeled crops, or a filename regex with groups ``pid``/``camid``
``tracklets``    any tree of frame folders (a folder of frames, or a MARS tracklet name, is one), unlabeled;
                 cameras from a path regex with group ``camid``
===============  ===========================================================================
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

from .records import UNKNOWN_PID, Record, ReidDataset

log = logging.getLogger(__name__)

# What PIL opens in the wheels ureid pins (WebP and TIFF included); other files are listed in a warning by the
# formats that read a whole tree (folder, tracklets), since a crop in a format not read would vanish in silence.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")
BAD_IMAGE_POLICIES = ("fail", "skip")
CUHK03_PROTOCOLS = ("labeled", "detected")
# The folders each dataset usually extracts to: a root may be that folder or its parent (see _resolve_root).
_MARKET_ALIASES = ("Market-1501-v15.09.15", "market1501")
_DUKE_ALIASES = ("DukeMTMC-reID", "dukemtmc-reid")
_MSMT_ALIASES = ("MSMT17_V1", "MSMT17_V2", "msmt17")
_CUHK03_ALIASES = ("cuhk03", "cuhk03_release")
_MARS_ALIASES = ("mars", "MARS")
_DUKEV_ALIASES = ("DukeMTMC-VideoReID", "dukemtmc-videoreid")


# ----------------------------------------------------------------------------- helpers
def _resolve_root(name: str, root: str | os.PathLike, marker: str, aliases: Iterable[str], layout: str) -> Path:
    """Return the folder holding ``marker``: ``root`` itself or the dataset's usual extracted folder in it.

    Users point at either ``.../Market-1501-v15.09.15`` or its parent; both are accepted so that a
    torchreid-style ``root`` works unchanged.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{name}: dataset root {root} is not a folder ({layout})")
    if (root / marker).exists():
        return root
    for alias in aliases:
        if (root / alias / marker).exists():
            return root / alias
    raise FileNotFoundError(f"{name}: expected {root / marker} ({layout})")


def _require(name: str, path: Path, layout: str, *, is_dir: bool) -> Path:
    ok = path.is_dir() if is_dir else path.is_file()
    if not ok:
        kind = "folder" if is_dir else "file"
        raise FileNotFoundError(f"{name}: expected {kind} {path} ({layout})")
    return path


def _list_images(folder: Path) -> list[Path]:
    """Image files in ``folder``, sorted so that record order never depends on the file system."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


# What file browsers leave in a folder of images (Windows' thumbnail cache ships with Market-1501).
_OS_FILES = {"Thumbs.db", "desktop.ini"}


def scan_below(folder: Path) -> tuple[list[Path], dict[str, list[str]]]:
    """One walk of ``folder`` and its subfolders: the images (by suffix, in path order) and the other files by
    suffix (for :func:`warn_unread`). Hidden files and folders (``.DS_Store``, ``.git``, macOS's ``._x.jpg``
    resource forks, ``.ipynb_checkpoints``), ``Thumbs.db`` and ``desktop.ini`` and what ureid writes under the
    root (camstyle's ``bounding_box_train_camstyle/`` and ``camstyle_stargan/`` at its top) are left out.
    (Hidden images were read, and a ``._x.jpg`` failed the run as an unreadable image.) Symlinked folders are
    followed, as torchvision's ImageFolder does (a crops folder linking cameras from shared storage read nothing
    of them), each real folder once, so a link back up the tree ends."""
    from .camstyle import DEFAULT_FOLDER, STARGAN_FOLDER

    images: list[Path] = []
    unread: dict[str, list[str]] = {}
    seen: set[str] = set()
    for top, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:  # a link to a folder already read (or to one of its parents)
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and not (Path(top) == folder and d in (DEFAULT_FOLDER, STARGAN_FOLDER)))
        for n in sorted(names):
            if n.startswith(".") or n in _OS_FILES:
                continue
            suffix = Path(n).suffix.lower()
            if suffix in IMAGE_SUFFIXES:
                if os.path.isfile(os.path.join(top, n)):  # not a broken link
                    images.append(Path(top) / n)
            else:
                unread.setdefault(suffix or "(none)", []).append(os.path.join(top, n))
    return sorted(images), unread


def warn_unread(name: str, folder: Path, unread: dict[str, list[str]] | None = None) -> None:
    """Log the files in and below ``folder`` that the tree formats do not read (no image suffix), by suffix, with
    examples: a folder of ``.heic`` or ``.avif`` crops would otherwise train on what is left, unannounced.
    ``unread``: :func:`scan_below`'s, when the caller walked the folder already."""
    by_suffix = scan_below(folder)[1] if unread is None else unread
    if by_suffix:
        count = sum(map(len, by_suffix.values()))
        kinds = ", ".join(f"{k} {len(v)}" for k, v in sorted(by_suffix.items(), key=lambda kv: (-len(kv[1]), kv[0])))
        shown = ", ".join([p for v in by_suffix.values() for p in v][:3])
        log.warning("%s: %d file(s) under %s are not read, not being images by their suffix (%s; e.g. %s); "
                    "ureid reads %s", name, count, folder, kinds, shown, ", ".join(IMAGE_SUFFIXES))


def images_below(folder: Path) -> list[Path]:
    """Every image in and below ``folder``, in path order (see :func:`scan_below` for what is left out): a user's
    folder of crops, read whole."""
    return scan_below(folder)[0]


# MARS names frames <pid>C<cam>T<tracklet>F<frame>.jpg, several tracklets to a folder
_MARS_FRAME = re.compile(r"^(.+T\d{4})F\d{3}$")


def tracklets_below(folder: Path, images: list[Path] | None = None) -> list[tuple[str, ...]]:
    """The tracklets in and below ``folder`` (:func:`images_below`'s frames, or ``images`` when the caller has
    them): one per folder that directly holds frames (DukeMTMC-VideoReID's ``<pid>/<tracklet>/``, a tracker's
    output), or per MARS tracklet name in it (``0001C1T0002F003.jpg``: several to a folder); frames in name
    order, tracklets in path order."""
    tracklets: dict[tuple[Path, str], list[str]] = {}
    for p in images_below(folder) if images is None else images:
        mars = _MARS_FRAME.match(p.stem)
        tracklets.setdefault((p.parent, mars.group(1) if mars else ""), []).append(str(p))
    return [tuple(frames) for _, frames in sorted(tracklets.items())]


def _check_policy(bad_images: str) -> None:
    if bad_images not in BAD_IMAGE_POLICIES:
        raise ValueError(f"bad_images must be one of {BAD_IMAGE_POLICIES}, got {bad_images!r}")


def verify_images(records: list[Record], bad_images: str = "fail") -> list[Record]:
    """Check that every image of ``records`` can be opened; return the records that survive.

    The check is PIL's header parse plus ``verify()`` (no pixel decode), i.e. O(files) and cheap.
    ``bad_images="fail"`` raises :class:`OSError` naming the first unreadable path;
    ``"skip"`` drops unreadable frames (a tracklet with no readable frame is dropped as a whole)
    and logs a warning with the count and the paths, so that nothing disappears silently.
    """
    _check_policy(bad_images)
    from PIL import Image

    def readable(path: str) -> bool:
        try:
            with Image.open(path) as im:
                im.verify()
            return True
        except Exception:  # PIL raises a zoo of types (OSError, SyntaxError, ValueError...)
            return False

    kept: list[Record] = []
    bad: list[str] = []
    for rec in records:
        good = []
        for p in rec.paths:
            if readable(p):
                good.append(p)
            elif bad_images == "fail":
                raise OSError(f"unreadable image {p} (data.bad_images=skip in a config or --set, --bad-images skip for "
                              f"`ureid data info`, `evaluate`, `embed` and `search`, drops unreadable images and "
                              f"names them)")
            else:
                bad.append(p)
        if len(good) == len(rec.paths):
            kept.append(rec)
        elif good:
            kept.append(Record(tuple(good), rec.pid, rec.camid, rec.is_fake))
    if bad:
        shown = ", ".join(bad[:10]) + (f" ... and {len(bad) - 10} more" if len(bad) > 10 else "")
        log.warning("skipped %d unreadable image(s): %s", len(bad), shown)
    return kept


def _match(name: str, regex: re.Pattern, path: Path, expected: str) -> re.Match:
    m = regex.fullmatch(path.name)
    if m is None:
        raise ValueError(f"{name}: file {path} does not match the expected naming {expected!r} (regex {regex.pattern!r})")
    return m


# ----------------------------------------------------------------------------- Market-1501 family
_MARKET_RE = re.compile(r"(-?\d+)_c(\d+)s\d+_\d+_\d+\.(?:jpg|jpeg|png)", re.IGNORECASE)
_DUKE_RE = re.compile(r"(-?\d+)_c(\d+)_f\d+\.(?:jpg|jpeg|png)", re.IGNORECASE)
_MARKET_SPLITS = (("train", "bounding_box_train"), ("query", "query"), ("gallery", "bounding_box_test"))


def _market_style(name: str, root, regex: re.Pattern, example: str, aliases: tuple[str, ...]) -> ReidDataset:
    layout = f"layout: bounding_box_train/, bounding_box_test/, query/ with files like {example}"
    base = _resolve_root(name, root, "bounding_box_train", aliases, layout)
    ds = ReidDataset(name=name, root=str(base))
    for split, folder in _MARKET_SPLITS:
        d = _require(name, base / folder, layout, is_dir=True)
        recs = []
        for p in _list_images(d):
            m = _match(name, regex, p, example)
            pid, cam = int(m.group(1)), int(m.group(2))
            if cam < 1:
                raise ValueError(f"{name}: file {p} has camera c{cam}; cameras are numbered from c1")
            recs.append(Record((str(p),), pid, cam - 1))
        setattr(ds, split, recs)
    return ds


def load_market1501(root) -> ReidDataset:
    """Market-1501 (Zheng et al., ICCV 2015): six cameras c1..c6 -> camid 0..5."""
    return _market_style("market1501", root, _MARKET_RE, "0002_c1s1_000451_03.jpg", _MARKET_ALIASES)


def load_dukemtmc(root) -> ReidDataset:
    """DukeMTMC-reID (Zheng et al., ICCV 2017): eight cameras c1..c8 -> camid 0..7."""
    return _market_style("dukemtmc", root, _DUKE_RE, "0001_c2_f0046182.jpg", _DUKE_ALIASES)


# ----------------------------------------------------------------------------- MSMT17
_MSMT_RE = re.compile(r"\d+_\d+_(\d+)_\w+\.(?:jpg|jpeg|png)", re.IGNORECASE)


def load_msmt17(root) -> ReidDataset:
    """MSMT17 V1 or V2 (Wei et al., CVPR 2018): lists ``relpath pid``; the validation list joins train.

    Train + val form the training set as in torchreid (``list_val.txt`` is a subset of the official
    training identities); it is optional so that trimmed copies load too.
    """
    example = "0000_000_01_0303morning_0015_0.jpg"
    layout = f"layout: list_train.txt, list_query.txt, list_gallery.txt (lines 'relpath pid'), train/, test/; files like {example}"
    base = _resolve_root("msmt17", root, "list_train.txt", _MSMT_ALIASES, layout)
    img_dirs = [("train", "test"), ("mask_train_v2", "mask_test_v2")]
    train_dir, test_dir = next(((base / a, base / b) for a, b in img_dirs if (base / a).is_dir()), (base / "train", base / "test"))
    _require("msmt17", train_dir, layout, is_dir=True)
    _require("msmt17", test_dir, layout, is_dir=True)

    def read_list(list_name: str, img_dir: Path) -> list[Record]:
        list_path = _require("msmt17", base / list_name, layout, is_dir=False)
        recs = []
        for lineno, line in enumerate(list_path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or not re.fullmatch(r"-?\d+", parts[1]):
                raise ValueError(f"msmt17: {list_path}:{lineno}: expected 'relpath pid', got {line!r}")
            path = img_dir / parts[0]
            m = _match("msmt17", _MSMT_RE, path, example)
            recs.append(Record((str(path),), int(parts[1]), int(m.group(1)) - 1))
        return recs

    train = read_list("list_train.txt", train_dir)
    if (base / "list_val.txt").is_file():
        train += read_list("list_val.txt", train_dir)
    return ReidDataset("msmt17", str(base), train, read_list("list_query.txt", test_dir), read_list("list_gallery.txt", test_dir))


# ----------------------------------------------------------------------------- CUHK03
def _mat_strings(arr) -> list[str]:
    """A MATLAB cell array of strings as loaded by scipy.io.loadmat -> list of str."""
    import numpy as np

    out = []
    for item in np.asarray(arr, dtype=object).ravel():
        while isinstance(item, np.ndarray):
            item = item.ravel()[0] if item.size else ""
        out.append(str(item))
    return out


def load_cuhk03(root, protocol: str = "labeled") -> ReidDataset:
    """CUHK03 (Li et al., CVPR 2014) under the new 767/700 protocol (Zhong et al., CVPR 2017).

    The split file holds 1-based ``train_idx``, ``query_idx``, ``gallery_idx`` into ``filelist``,
    ``labels`` (pids) and ``camId`` (1 or 2: the camera within the image's camera pair, which is
    what the protocol's same-camera junk rule uses).
    """
    if protocol not in CUHK03_PROTOCOLS:
        raise ValueError(f"cuhk03_protocol must be one of {CUHK03_PROTOCOLS}, got {protocol!r}")
    import numpy as np
    from scipy.io import loadmat

    split_name = f"cuhk03_new_protocol_config_{protocol}.mat"
    layout = f"new-protocol layout: images_{protocol}/ and {split_name}"
    base = _resolve_root("cuhk03", root, split_name, _CUHK03_ALIASES, layout)
    img_dir = _require("cuhk03", base / f"images_{protocol}", layout, is_dir=True)
    try:
        mat = loadmat(str(base / split_name))
    except Exception as e:
        raise ValueError(f"cuhk03: cannot read split file {base / split_name}: {e}") from e
    fields = ("train_idx", "query_idx", "gallery_idx", "labels", "filelist", "camId")
    missing = [f for f in fields if f not in mat]
    if missing:
        raise ValueError(f"cuhk03: split file {base / split_name} lacks field(s) {missing}; expected {fields}")
    files = _mat_strings(mat["filelist"])
    labels = np.asarray(mat["labels"]).ravel().astype(np.int64)
    cams = np.asarray(mat["camId"]).ravel().astype(np.int64)
    if not len(files) == len(labels) == len(cams):
        raise ValueError(f"cuhk03: {split_name}: filelist/labels/camId lengths differ ({len(files)}, {len(labels)}, {len(cams)})")

    def subset(field: str) -> list[Record]:
        idx = np.asarray(mat[field]).ravel().astype(np.int64) - 1  # MATLAB indices are 1-based
        if idx.size and (idx.min() < 0 or idx.max() >= len(files)):
            raise ValueError(f"cuhk03: {split_name}: {field} has indices outside 1..{len(files)}")
        return [Record((str(img_dir / files[i]),), int(labels[i]), int(cams[i]) - 1) for i in idx]

    return ReidDataset("cuhk03", str(base), subset("train_idx"), subset("query_idx"), subset("gallery_idx"))


# ----------------------------------------------------------------------------- MARS
_MARS_RE = re.compile(r"(\d{4}|00-1)C(\d)T(\d{4})F(\d+)\.jpg", re.IGNORECASE)


def load_mars(root) -> ReidDataset:
    """MARS (Zheng et al., ECCV 2016): one record per tracklet, frames in temporal order.

    ``tracks_*_info.mat`` rows are ``start end pid camid`` (1-based rows into the name lists,
    1-based cameras). As in torchreid, junk tracklets (pid -1) are dropped from every split and
    distractors (pid 0) are kept; ``query_IDX.mat`` holds the 1-based test rows that are queries and
    every other test row is gallery.
    """
    import numpy as np
    from scipy.io import loadmat

    example = "0001C1T0001F001.jpg"
    layout = "layout: bbox_train/, bbox_test/, info/{train_name,test_name}.txt, info/tracks_{train,test}_info.mat, info/query_IDX.mat"
    base = _resolve_root("mars", root, "info", _MARS_ALIASES, layout)
    info = base / "info"
    for d in ("bbox_train", "bbox_test"):
        _require("mars", base / d, layout, is_dir=True)

    def load_mat(fname: str, key: str):
        path = _require("mars", info / fname, layout, is_dir=False)
        mat = loadmat(str(path))
        if key not in mat:
            raise ValueError(f"mars: {path} has no variable {key!r}")
        return np.asarray(mat[key])

    def names(fname: str) -> list[str]:
        path = _require("mars", info / fname, layout, is_dir=False)
        return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]

    def tracklets(name_list: list[str], table, home: str) -> list[Record]:
        table = np.asarray(table, dtype=np.int64).reshape(-1, 4)
        recs = []
        for row, (start, end, pid, cam) in enumerate(table):
            if pid == -1:
                continue  # junk tracklets are dropped, as in torchreid
            if not 1 <= start <= end <= len(name_list):
                raise ValueError(f"mars: {home} track row {row + 1} spans {start}..{end}, outside 1..{len(name_list)}")
            frames = []
            for n in name_list[start - 1 : end]:
                m = _match("mars", _MARS_RE, Path(n), example)
                name_pid = -1 if m.group(1) == "00-1" else int(m.group(1))
                if name_pid != pid or int(m.group(2)) != cam:
                    raise ValueError(f"mars: {home} track row {row + 1} (pid {pid}, camera {cam}) lists frame {n} of another person or camera")
                frames.append((int(m.group(4)), n))
            frames.sort()  # temporal order by frame number (the name lists are sorted already)
            paths = tuple(str(base / home / n[:4] / n) for _, n in frames)
            recs.append(Record(paths, int(pid), int(cam) - 1))
        return recs

    test_table = load_mat("tracks_test_info.mat", "track_test_info").reshape(-1, 4)
    q_idx = load_mat("query_IDX.mat", "query_IDX").ravel().astype(np.int64) - 1
    if q_idx.size and (q_idx.min() < 0 or q_idx.max() >= len(test_table)):
        raise ValueError(f"mars: query_IDX has rows outside 1..{len(test_table)}")
    is_query = np.zeros(len(test_table), dtype=bool)
    is_query[q_idx] = True
    test_names = names("test_name.txt")
    return ReidDataset(
        "mars",
        str(base),
        train=tracklets(names("train_name.txt"), load_mat("tracks_train_info.mat", "track_train_info"), "bbox_train"),
        query=tracklets(test_names, test_table[q_idx], "bbox_test"),
        gallery=tracklets(test_names, test_table[~is_query], "bbox_test"),
        is_video=True,
    )


# ----------------------------------------------------------------------------- DukeMTMC-VideoReID
_DUKEV_RE = re.compile(r"(\d{4})_?C(\d+)_?F(\d+)_?X(\d+)\.jpg", re.IGNORECASE)


def load_dukevideo(root) -> ReidDataset:
    """DukeMTMC-VideoReID (Wu et al., CVPR 2018): ``<split>/<pid>/<tracklet>/<frames>``.

    Camera from the first frame name (``0001_C6_F0099_X30823.jpg`` or the older
    ``0001C6F0099X30823.jpg``), frames sorted by their ``F`` number, as in torchreid.
    """
    example = "0001_C6_F0099_X30823.jpg"
    layout = f"layout: train/, query/, gallery/ each with <pid>/<tracklet>/ frame folders, frames like {example}"
    base = _resolve_root("dukevideo", root, "train", _DUKEV_ALIASES, layout)
    ds = ReidDataset("dukevideo", str(base), is_video=True)
    for split in ("train", "query", "gallery"):
        split_dir = _require("dukevideo", base / split, layout, is_dir=True)
        recs = []
        for pdir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            if not re.fullmatch(r"-?\d+", pdir.name):
                raise ValueError(f"dukevideo: folder {pdir} is not an identity number ({layout})")
            for tdir in sorted(p for p in pdir.iterdir() if p.is_dir()):
                frames = []
                for f in _list_images(tdir):
                    m = _match("dukevideo", _DUKEV_RE, f, example)
                    frames.append((int(m.group(3)), int(m.group(2)), str(f)))
                if not frames:
                    log.warning("dukevideo: tracklet folder %s holds no frames; ignored", tdir)
                    continue
                frames.sort()
                recs.append(Record(tuple(f for _, _, f in frames), int(pdir.name), frames[0][1] - 1))
        setattr(ds, split, recs)
    return ds


# ----------------------------------------------------------------------------- generic folder
def _compile(name: str, pattern: str | None) -> re.Pattern | None:
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{name}: pattern {pattern!r} is not a valid regular expression: {e}") from e


def load_folder(root, pattern: str | None = None) -> ReidDataset:
    r"""Any tree of images: your own crops, unlabeled, or file names that carry the identity and camera.

    ``pattern`` is a regular expression searched in each file name, with a named group ``pid`` (an
    integer) and/or ``camid``; a pattern with a ``/`` is searched in the path below the (split) folder
    instead, for a folder per identity or camera (``r'(?P<pid>\d+)/'``, ``r'(?P<pid>\d+)/cam(?P<camid>\d)'``);
    camera values (numbers or strings such as ``cam_a``) are mapped to 0..K-1 in sorted order, and without a
    ``camid`` group every image gets camera 0. Without a pattern, or without a ``pid`` group, the images are
    unlabeled (identity :data:`UNKNOWN_PID`): the methods train on
    them as they are, and the run reports only its label-free scores. With subfolders ``query/`` and
    ``gallery/`` (and optionally ``train/``) those become the splits, scored by identity, so they need a
    ``pid`` group; otherwise every image goes to train, except what ureid writes under the root itself
    (camstyle's ``bounding_box_train_camstyle/`` and ``camstyle_stargan/``). Image files that do not match are
    listed in a warning.
    """
    regex = _compile("folder", pattern)
    if regex is not None:
        if not {"pid", "camid"} & set(regex.groupindex):
            raise ValueError(f"folder: pattern {pattern!r} needs a named group (?P<pid>...) and/or (?P<camid>...); "
                             "leave the pattern out for unlabeled images on one camera")
    base = Path(root).expanduser()
    if not base.is_dir():
        raise FileNotFoundError(f"folder: dataset root {base} is not a folder")
    has_split = (base / "query").is_dir() or (base / "gallery").is_dir()
    if has_split:
        for d in ("query", "gallery"):
            _require("folder", base / d, "split layout: query/ and gallery/ (and optionally train/) under the root", is_dir=True)
        if regex is None or "pid" not in regex.groupindex:
            raise ValueError(f"folder: {base} has query/ and gallery/, which are scored by identity: give a pattern "
                             "with a (?P<pid>...) group (e.g. r'(?P<pid>\\d+)_c(?P<camid>\\d+)'), or train on an "
                             "unlabeled folder without those subfolders")
        split_dirs = {s: base / s for s in ("train", "query", "gallery") if (base / s).is_dir()}
    else:
        split_dirs = {"train": base}

    raw: dict[str, list[tuple[str, int, str | None]]] = {}
    unmatched: list[str] = []
    in_path = regex is not None and "/" in pattern  # a folder per identity: the path below the split folder
    scans = {split: scan_below(d) for split, d in split_dirs.items()}  # one walk each: images and the rest
    for split, d in split_dirs.items():
        raw[split] = []
        for p in scans[split][0]:
            if regex is None:
                raw[split].append((str(p), UNKNOWN_PID, None))
                continue
            m = regex.search(p.relative_to(d).as_posix() if in_path else p.name)
            if m is None:
                unmatched.append(str(p))
                continue
            pid = UNKNOWN_PID
            if "pid" in regex.groupindex:
                try:
                    pid = int(m.group("pid"))
                except (TypeError, ValueError):
                    raise ValueError(f"folder: file {p}: group pid={m.group('pid')!r} of pattern {pattern!r} is not an integer") from None
            cam = m.group("camid") if "camid" in regex.groupindex else None
            if "camid" in regex.groupindex and cam is None:
                raise ValueError(f"folder: file {p}: group camid of pattern {pattern!r} did not match")
            raw[split].append((str(p), pid, cam))
    for split, d in split_dirs.items():  # before a refusal for want of images: the files there may be why
        warn_unread("folder", d, scans[split][1])
    if not any(raw.values()):
        if regex is None:
            raise ValueError(f"folder: no image under {base} (looked for {', '.join(sorted(IMAGE_SUFFIXES))} files in every subfolder)")
        where = "a path below it" if in_path else "a file name"
        d, example = next(((split_dirs[s], found[0]) for s, (found, _) in scans.items() if found), (base, None))
        seen = f" (e.g. {(example.relative_to(d).as_posix() if in_path else example.name)!r})" if example else ""
        raise ValueError(f"folder: no image under {base} has {where} matching pattern {pattern!r}{seen}")
    _warn_unmatched("folder", "image(s)", unmatched, pattern)

    cam_index = _camera_index({c for recs in raw.values() for _, _, c in recs if c is not None})
    ds = ReidDataset("folder", str(base), camera_names=list(cam_index) or None)
    for split, recs in raw.items():
        setattr(ds, split, [Record((p,), pid, cam_index[c] if c is not None else 0) for p, pid, c in recs])
    return ds


# ----------------------------------------------------------------------------- your own tracklets
def _camera_index(cams: set[str]) -> dict[str, int]:
    """Camera values (numbers, or strings such as ``cam_a``) -> 0..K-1 in sorted order (numerically when all
    are numbers)."""
    numeric = all(re.fullmatch(r"-?\d+", c) for c in cams)
    return {c: i for i, c in enumerate(sorted(cams, key=(lambda c: int(c)) if numeric else None))}


def _warn_unmatched(name: str, what: str, unmatched: list[str], pattern: str) -> None:
    if unmatched:
        shown = ", ".join(unmatched[:5]) + (" ..." if len(unmatched) > 5 else "")
        log.warning("%s: %d %s do not match pattern %r and were ignored: %s", name, len(unmatched), what, pattern,
                    shown)


def load_tracklets(root, pattern: str | None = None) -> ReidDataset:
    r"""Your own tracklets, unlabeled (a tracker's crops, say): :func:`tracklets_below` the root, each a training
    sample of unknown identity (:data:`UNKNOWN_PID`); no query/gallery, so a run reports its label-free
    scores only. camstyle's output under the root is left out, as for ``folder``.

    Cameras: ``pattern``, a regular expression with a named group ``camid``, is searched in each tracklet's
    first frame's path below the root (``/``-separated), e.g. ``r"^cam(?P<camid>\d+)/"`` for a tracker's
    ``cam1/track_0007/*.jpg`` or ``r"C(?P<camid>\d+)T"`` for MARS-named frames; values are numbered as the
    ``folder`` format's. Tracklets that do not match are listed in a warning and left out. Without a pattern
    every tracklet is on camera 0, so what compares cameras (SSL's cross-camera encouragement) sees one."""
    regex = _compile("tracklets", pattern)
    if regex is not None:
        if "camid" not in regex.groupindex or "pid" in regex.groupindex:
            raise ValueError(f"tracklets: pattern {pattern!r} needs a named group (?P<camid>...) and no (?P<pid>...) "
                             "(your tracklets are unlabeled; labeled video sets: the mars and dukevideo formats)")
    base = Path(root).expanduser()
    if not base.is_dir():
        raise FileNotFoundError(f"tracklets: dataset root {base} is not a folder")
    images, unread = scan_below(base)
    found = tracklets_below(base, images)
    warn_unread("tracklets", base, unread)
    if not found:
        raise ValueError(f"tracklets: no frame under {base} (looked for {', '.join(sorted(IMAGE_SUFFIXES))} files "
                         "in every subfolder; one tracklet per folder of frames)")
    ds = ReidDataset("tracklets", str(base), is_video=True)
    if regex is None:
        ds.train = [Record(frames, UNKNOWN_PID, 0) for frames in found]
        return ds
    cams: list[tuple[tuple[str, ...], str]] = []
    unmatched: list[str] = []
    for frames in found:
        m = regex.search(Path(frames[0]).relative_to(base).as_posix())
        if m is None or m.group("camid") is None:
            unmatched.append(frames[0])
        else:
            cams.append((frames, m.group("camid")))
    if not cams:
        raise ValueError(f"tracklets: no tracklet under {base} has a first frame whose path below the root matches "
                         f"pattern {pattern!r} (e.g. {Path(found[0][0]).relative_to(base).as_posix()})")
    _warn_unmatched("tracklets", "tracklet(s)", unmatched, pattern)
    index = _camera_index({c for _, c in cams})
    ds.train = [Record(frames, UNKNOWN_PID, index[c]) for frames, c in cams]
    ds.camera_names = list(index)
    return ds


# ----------------------------------------------------------------------------- guessing
def guess_format(root) -> tuple[str, str] | None:
    """``(format, why)``: the dataset format whose layout ``root`` has (itself or its usual extracted folder in
    it), by the marker each reader looks for first (``why`` names it); ``folder`` for any other tree holding
    images; None when ``root`` is not a folder or holds no image. For messages and ``ureid data info``: a reader
    still checks the whole layout."""
    root = Path(root).expanduser()
    if not root.is_dir():
        return None

    def base(marker: str, aliases: Iterable[str]) -> Path | None:
        return next((d for d in (root, *(root / a for a in aliases)) if (d / marker).exists()), None)

    if (b := base("bounding_box_train", _MARKET_ALIASES + _DUKE_ALIASES)) is not None and (b / "bounding_box_train").is_dir():
        first = next(iter(_list_images(b / "bounding_box_train")), None)
        for name, regex in (("market1501", _MARKET_RE), ("dukemtmc", _DUKE_RE)):
            if first is not None and regex.fullmatch(first.name):
                return name, f"{b / 'bounding_box_train'}/ with files like {first.name}"
    if (b := base("list_train.txt", _MSMT_ALIASES)) is not None:
        return "msmt17", f"{b / 'list_train.txt'}"
    for protocol in CUHK03_PROTOCOLS:
        mat = f"cuhk03_new_protocol_config_{protocol}.mat"
        if (b := base(mat, _CUHK03_ALIASES)) is not None:
            return "cuhk03", f"{b / mat}"
    if (b := base("info", _MARS_ALIASES)) is not None and (b / "bbox_train").is_dir():
        return "mars", f"{b / 'info'}/ and {b / 'bbox_train'}/"
    if (b := base("train", _DUKEV_ALIASES)) is not None and (b / "query").is_dir() and (b / "gallery").is_dir():
        return "dukevideo", f"{b}/ with train/, query/, gallery/"
    for _, _, files in os.walk(root):
        if any(f.lower().endswith(IMAGE_SUFFIXES) for f in files):
            return "folder", f"images in {root}, in none of the published layouts"
    return None


# ----------------------------------------------------------------------------- dispatch
DATASETS: dict[str, Callable[..., ReidDataset]] = {
    "market1501": load_market1501,
    "dukemtmc": load_dukemtmc,
    "msmt17": load_msmt17,
    "cuhk03": load_cuhk03,
    "mars": load_mars,
    "dukevideo": load_dukevideo,
    "folder": load_folder,
    "tracklets": load_tracklets,
}
#: The formats that take a ``pattern``.
PATTERN_FORMATS = ("folder", "tracklets")


def load_dataset(
    name: str,
    root,
    *,
    pattern: str | None = None,
    cuhk03_protocol: str = "labeled",
    bad_images: str = "fail",
    verify: bool | None = None,
) -> ReidDataset:
    """Read dataset ``name`` (a key of :data:`DATASETS`) from ``root``.

    ``pattern`` is the regex of the ``folder`` format (file names) and of ``tracklets`` (cameras),
    ``cuhk03_protocol`` picks the labeled or detected boxes of CUHK03. ``verify`` (default: on for image
    datasets, off for the video sets, whose million frames would make it slow) checks each image with
    :func:`verify_images`, handling unreadable ones by ``bad_images`` ("fail" or "skip").
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset format {name!r}; choose one of {sorted(DATASETS)}")
    _check_policy(bad_images)
    if pattern is not None and name not in PATTERN_FORMATS:
        raise ValueError(f"pattern applies only to the {' and '.join(map(repr, PATTERN_FORMATS))} formats, "
                         f"not {name!r}")
    if name in PATTERN_FORMATS:
        ds = DATASETS[name](root, pattern)
    elif name == "cuhk03":
        ds = load_cuhk03(root, cuhk03_protocol)
    else:
        ds = DATASETS[name](root)
    if verify is None:
        verify = not ds.is_video
    if verify:
        for split in ("train", "query", "gallery"):
            setattr(ds, split, verify_images(getattr(ds, split), bad_images))
    return ds
