"""A finished run's embedding, applied to new images: ``ureid embed RUN_DIR IMAGES...`` and :func:`load_embedding`.

What a run trains is an embedding: the model of its selected stage (``best_checkpoint/``), whose features
are compared by squared Euclidean distance after L2 normalisation (the evaluation protocol of every run,
``engine/evaluate.py``). This module loads that model with the run's own input size and gives the same
features for any images, so a user can search, cluster or compare crops the run never saw::

    from ureid.embed import load_embedding

    emb = load_embedding("runs/buc-20261206-101500-1a2b3c")      # the selected stage; stage=N for another
    features = emb(["a.jpg", "b.jpg"])                            # (2, D) float32, unit rows

A video run (``data.name`` mars / dukevideo / tracklets) embeds tracklets: each folder that holds frames is one
tracklet, its feature the mean of (at most ``data.max_test_frames``) frame features, as in its evaluation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .data.formats import IMAGE_SUFFIXES


@dataclass
class Embedding:
    """The model of one stage of a run, ready to embed images (or tracklets, for a video run)."""

    model: object  # torch.nn.Module, in eval mode
    cfg: object  # the run's Config
    stage: int
    run_dir: Path

    def __call__(self, inputs: Sequence[str | Path], device: str = "cpu", batch_size: int | None = None,
                 num_workers: int | None = None, progress=None) -> np.ndarray:
        """(len(records), D) float32 unit features of ``inputs`` (see :func:`collect_inputs`); ``progress`` as
        for ``engine.extract.extract_features``."""
        return self.embed(collect_inputs(inputs, self.video), device, batch_size, num_workers, progress)

    @property
    def video(self) -> bool:
        return bool(self.cfg.data.is_video)

    def embed(self, records, device: str = "cpu", batch_size: int | None = None,
              num_workers: int | None = None, progress=None) -> np.ndarray:
        from .engine.extract import extract_features

        opts = self.on(device, batch_size, num_workers)
        pooled = extract_features(self.model, records, device=device, progress=progress, **opts)["pooled"]
        return (pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    def on(self, device: str, batch_size: int | None = None, num_workers: int | None = None) -> dict:
        """The model moved to ``device``; the run's extraction options (its input size, eval batch, loader
        workers) with the given ones in place of its own."""
        opts = self.cfg.extract_options()
        if batch_size is not None:
            opts["batch_size"] = batch_size
        if num_workers is not None:
            opts["num_workers"] = num_workers
        self.model.to(device)
        return opts


def load_embedding(run_dir: str | Path, stage: int | None = None) -> Embedding:
    """The model of ``stage`` of a run (None: the stage the run selected, its ``best_checkpoint/``)."""
    from .config import load_config
    from .runtime.job import stage_checkpoints

    run_dir = run_folder(run_dir)
    cfg = load_config(run_dir / "config.yaml", check_paths=False)  # the dataset need not be on this machine
    stages = dict(stage_checkpoints(run_dir))
    if stage is None:
        best = run_dir / "best_checkpoint" / "state.pt"
        if not best.is_file() or not (run_dir / "summary.json").is_file():
            raise FileNotFoundError(unfinished(run_dir, cfg.method, stages, "best_checkpoint/ or summary.json",
                                               "picks", "or "))
        summary = json.loads((run_dir / "summary.json").read_text())
        stage = int(summary.get("selected_stage", summary.get("best_stage")))
    else:
        if stage not in stages:
            raise FileNotFoundError(f"{run_dir}: no checkpoint of stage {stage} (it has {_listing(stages)})")
        best = stages[stage] / "state.pt"
    return Embedding(stage_model(cfg, best), cfg, stage, run_dir)


def run_folder(run_dir: str | Path) -> Path:
    """``run_dir`` as a Path, if it is a run folder (it holds the run's ``config.yaml``); else a clear error."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir}: not a ureid run folder (no config.yaml; a run writes "
                                f"runs/<method>-<time>-<id>/)")
    return run_dir


def stage_model(cfg, state_path: Path):
    """The network of a run's config with a stage checkpoint's weights (``state.pt``), in eval mode."""
    import torch

    from .methods import get_method

    net = get_method(cfg.method).build_model(cfg, weights="none")  # the checkpoint's weights replace any start
    net.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=False)["model"])
    return net.eval()


def unfinished(run_dir: Path, method: str, stages: dict, missing: str, verb: str, joint: str = "") -> str:
    """Why a command that needs a run's selected stage refuses a run that has not finished, and what to do."""
    return (f"{run_dir}: the run has not finished (no {missing}), so it has selected no stage; --stage {verb} one "
            f"of its checkpoints ({_listing(stages)}), {joint}`ureid run {method} --resume {run_dir}` finishes it")


def _listing(stages: dict) -> str:
    return "stages " + ", ".join(map(str, sorted(stages))) if stages else "no stage checkpoints"


def collect_inputs(inputs: Sequence[str | Path], video: bool = False, bad_images: str | None = None):
    """Records of the images named: a file is one image; a folder, every image in it and below, in path order
    (camstyle's fakes and StarGAN under it left out, as the ``folder`` format does).
    For a video run a folder's frames make one tracklet per folder that directly holds them (DukeMTMC-VideoReID's
    ``<pid>/<tracklet>/``), or per MARS tracklet name (``0001C1T0002F003.jpg``: several to a folder), frames in
    name order; a file is a tracklet of one frame. Errors name the path. ``bad_images``: every image opened
    first (:func:`~ureid.data.formats.verify_images`): ``"fail"`` names an unreadable one before anything is
    embedded (it failed the embedding where the loader met it), ``"skip"`` leaves it out with a warning;
    ``None``: not checked."""
    from .data.formats import scan_below, tracklets_below, verify_images, warn_unread
    from .data.records import Record

    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    records = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            images, unread = scan_below(path)
            warn_unread("images", path, unread)  # other files are named, as a dataset folder's are
            if not images:
                raise FileNotFoundError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in it or below")
            if video:
                records += [Record(frames, -1, -1) for frames in tracklets_below(path, images)]
            else:
                records += [Record((str(p),), -1, -1) for p in images]
        elif path.is_file():
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise ValueError(f"{path}: not an image file (expected {', '.join(IMAGE_SUFFIXES)})")
            records.append(Record((str(path),), -1, -1))
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    if not records:
        raise ValueError("no images given")
    if bad_images is not None:
        records = verify_images(records, bad_images)
        if not records:
            raise ValueError(f"no readable image in {', '.join(str(i) for i in inputs)}")
    return records


def search(run_dir: str | Path, queries: Sequence[str | Path], gallery: Sequence[str | Path], top: int = 10,
           stage: int | None = None, device: str = "cpu", batch_size: int | None = None, progress=None,
           rerank: dict | None = None, rerank_progress=None, bad_images: str | None = "fail") -> dict:
    """``ureid search``: the ``top`` gallery images (or tracklets) nearest each query under a run's embedding,
    by the run's own distance (squared Euclidean of unit features), ties in gallery order; a query's own
    file in the gallery is skipped. A gallery item ending in ``.npz`` is a ``ureid embed`` file of the same run
    and stage: its features are used as they are (stored files first, then the images, each in their order).
    Returns ``queries`` and ``gallery`` (paths; a tracklet's first frame), ``indices`` (nq, k) into ``gallery``
    and their ``distances``, ``stage`` and ``method``.

    ``rerank``: rank by the k-reciprocal re-ranked distances instead (a dict of
    :func:`~ureid.evaluation.re_ranking_features`' settings, ``{}`` for the paper's), computed over the
    queries and the whole gallery: two (Q + G)^2 products and a (Q, G) float32 matrix; ``rerank_progress`` is
    its ``progress``. ``bad_images``: see :func:`collect_inputs`."""
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    emb = load_embedding(run_dir, stage)
    q_recs = collect_inputs(queries, emb.video, bad_images)
    q = emb.embed(q_recs, device, batch_size, progress=progress)
    items = [gallery] if isinstance(gallery, (str, Path)) else list(gallery)
    images = [g for g in items if not str(g).endswith(".npz")]
    g_parts, g_paths, g_frames = [], [], []
    for f in (Path(g) for g in items if str(g).endswith(".npz")):  # embedded once with this model, searched often
        z = _embedded(f, emb)
        g_parts.append(z["features"])
        g_paths += [str(p) for p in z["paths"]]
        g_frames += [None] * len(z["paths"])  # frame counts are not stored: the first frame alone says "its own"
    if images or not g_parts:
        g_recs = collect_inputs(images, emb.video, bad_images)
        g_parts.append(emb.embed(g_recs, device, batch_size, progress=progress))
        g_paths += [r.paths[0] for r in g_recs]
        g_frames += [len(r.paths) for r in g_recs]
    from .evaluation import nearest, nearest_by_distance, re_ranking_features

    where = {str(Path(p).resolve()): i for i, p in enumerate(g_paths)}
    skip = np.full(len(q_recs), -1, dtype=np.int64)
    for i, rec in enumerate(q_recs):
        own = where.get(str(Path(rec.paths[0]).resolve()))
        if own is not None and g_frames[own] in (None, len(rec.paths)):
            skip[i] = own
    g = np.concatenate(g_parts)
    if rerank is None:
        indices, distances = nearest(q, g, top, skip=skip)
    else:
        indices, distances = nearest_by_distance(re_ranking_features(q, g, progress=rerank_progress, **rerank), top,
                                                 skip=skip)
    return {"queries": [r.paths[0] for r in q_recs], "gallery": g_paths, "indices": indices,
            "distances": distances, "stage": emb.stage, "method": emb.cfg.method}


def _embedded(path: Path, emb: Embedding) -> dict:
    """A ``ureid embed`` file, checked to hold features of ``emb``'s own run and stage (other features would be
    compared in another space)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such features file")
    with np.load(path) as z:
        got = {k: z[k] for k in z.files}
    if "features" not in got or "paths" not in got:
        raise ValueError(f"{path}: not a `ureid embed` file (it has {', '.join(sorted(got)) or 'nothing'})")
    theirs = (str(got.get("run", "?")), str(got.get("method", "?")), int(got.get("stage", -1)))
    ours = (emb.run_dir.name, emb.cfg.method, emb.stage)
    if theirs != ours:
        raise ValueError(f"{path}: features of run {theirs[0]} ({theirs[1]}, stage {theirs[2]}); this search uses "
                         f"run {ours[0]} ({ours[1]}, stage {ours[2]}): embed the gallery with the same run and stage")
    return got


def embed_to_file(run_dir: str | Path, inputs: Sequence[str | Path], out: str | Path, stage: int | None = None,
                  device: str = "cpu", batch_size: int | None = None, progress=None,
                  bad_images: str | None = "fail") -> tuple[Path, int, int, int]:
    """``ureid embed``: write ``out`` (.npz) with ``features`` (N, D) float32 unit rows, ``paths`` (N,) (a
    tracklet's first frame), ``stage``, ``method`` and ``run`` (the run folder's name); return (out, N, D,
    stage). ``ureid search`` takes such a file as its gallery. ``bad_images``: see :func:`collect_inputs`."""
    emb = load_embedding(run_dir, stage)
    records = collect_inputs(inputs, emb.video, bad_images)
    features = emb.embed(records, device, batch_size, progress=progress)
    names = [r.paths[0] for r in records]
    out = Path(out)
    if out.suffix != ".npz":
        out = out.with_name(out.name + ".npz")  # what np.savez would write; the path printed is the file's
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, features=features, paths=np.array(names), stage=emb.stage, method=emb.cfg.method,
             run=emb.run_dir.name)
    return out, features.shape[0], features.shape[1], emb.stage


# The extra file of an exported program that says what it takes and gives (read with torch.export.load's
# extra_files, or any zip reader: a .pt2 is a zip archive).
EXPORT_INFO = "ureid.json"


def _exportable(net, video: bool):
    """``net`` wrapped to take what a user can make with torch and PIL alone: RGB images resized to the run's
    input size, as floats in [0, 1] (``to_tensor``); the ImageNet normalisation of the run's test transform
    (:func:`~ureid.engine.datasets.build_transforms`) is inside. Gives unit rows: one per image, or for a video
    run one per call, the mean of the frames' pooled features made unit (as ``extract_features`` then
    ``Embedding.embed``)."""
    import torch

    from .engine.datasets import IMAGENET_MEAN, IMAGENET_STD

    class Exported(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net
            self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1))

        def forward(self, images):
            pooled = self.net((images - self.mean) / self.std)["pooled"].float()
            if video:
                pooled = pooled.mean(0, keepdim=True)
            return torch.nn.functional.normalize(pooled, dim=1, eps=1e-12)

    return Exported().eval()


def export_embedding(run_dir: str | Path, out: str | Path, stage: int | None = None) -> tuple[Path, dict]:
    """``ureid export``: a run's embedding (the selected stage, or ``stage``) as one ``torch.export`` program
    (``.pt2``) that runs with torch alone, no ureid and no config; returns (out, info). ``info`` (also the
    file's ``ureid.json``) says what the program takes and gives::

        import json, torch
        from PIL import Image
        from torchvision.transforms.functional import to_tensor

        extra = {"ureid.json": ""}
        model = torch.export.load("embedding.pt2", extra_files=extra).module()
        info = json.loads(extra["ureid.json"])
        size = (info["width"], info["height"])
        x = torch.stack([to_tensor(Image.open(p).convert("RGB").resize(size, Image.BILINEAR)) for p in paths])
        features = model(x)  # (len(paths), D) unit rows; compare by Euclidean distance

    The features are ``ureid embed``'s (float32 rounding apart): the same resize (PIL's bilinear, which the
    run's test transform applies) and normalisation. The batch size is free; for a video run a call takes the
    frames of one tracklet (``ureid embed`` uses at most ``max_frames`` of them, evenly spaced) and gives its
    one feature."""
    import torch

    emb = load_embedding(run_dir, stage)
    cfg = emb.cfg
    video = emb.video
    module = _exportable(emb.model, video)
    example = torch.rand(2, 3, cfg.data.height, cfg.data.width)
    name = "frames" if video else "batch"
    program = torch.export.export(module, (example,), dynamic_shapes={"images": {0: torch.export.Dim(name, min=1)}})
    dim = int(emb.model.feature_dim)  # the pooled feature's size, as extract_features reads it
    info = {"method": cfg.method, "run": emb.run_dir.name, "stage": emb.stage, "arch": cfg.model.arch,
            "height": cfg.data.height, "width": cfg.data.width, "feature_dim": dim, "video": video,
            "input": f"float32 ({'T' if video else 'B'}, 3, {cfg.data.height}, {cfg.data.width}) RGB in [0, 1]: "
                     "PIL's bilinear resize to (width, height), then torchvision's to_tensor",
            "output": ("(1, D) float32: the tracklet's unit feature (the mean of its frames' features, made unit)"
                       if video else "(B, D) float32 unit rows"),
            "distance": "Euclidean (squared) between unit rows, as the run's evaluation",
            **({"max_frames": cfg.data.max_test_frames} if video else {}),
            "torch": torch.__version__}
    out = Path(out)
    if out.suffix != ".pt2":
        out = out.with_name(out.name + ".pt2")
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, out, extra_files={EXPORT_INFO: json.dumps(info, indent=1)})
    return out, info


def evaluate_run(run_dir: str | Path, stage: int | None = None, data_format: str | None = None, root=None,
                 device: str = "cpu", batch_size: int | None = None, rerank: dict | None = None,
                 progress=None, rerank_progress=None, **load_options) -> dict:
    """mAP and rank-1/5/10 of a run's stage (None: the selected one) on a labeled query/gallery split: the run's
    own dataset, or another (``data_format`` and ``root``, the names of ``ureid data info``), e.g. a model
    trained without labels on one set and tested on another. The run's own evaluation protocol
    (:func:`~ureid.engine.evaluate.evaluate_model`): unit pooled features, squared Euclidean distance,
    Market-1501's CMC/mAP, the run's input size; with ``rerank`` (a dict, see ``evaluate_model``) the scores
    after k-reciprocal re-ranking too. ``progress``, ``rerank_progress``: as ``evaluate_model``'s."""
    from .engine.evaluate import evaluate_model

    if (data_format is None) != (root is None):
        raise ValueError("another dataset needs both its format and its root (--format and --root); "
                         "with neither, the run's own dataset is used")
    emb = load_embedding(run_dir, stage)
    if data_format is None:
        from .data.run_data import load_split_dataset

        emb.cfg.data.check_paths()
        ds = load_split_dataset(emb.cfg.data)
    else:
        from .data.formats import load_dataset

        ds = load_dataset(data_format, root, **load_options)
    if bool(ds.is_video) != emb.video:
        kinds = {True: "video (tracklets)", False: "image"}
        raise ValueError(f"{ds.name} at {ds.root} is an {kinds[bool(ds.is_video)]} dataset, but the run "
                         f"{emb.run_dir} trained on {kinds[emb.video]} data")
    if not ds.query or not ds.gallery:
        where = "the run's own dataset, " if data_format is None else ""
        raise ValueError(f"{where}{ds.name} at {ds.root}, has no query/gallery split to score (an unlabeled folder "
                         "trains only): give a labeled dataset with --format and --root")
    scores = evaluate_model(emb.model, ds.query, ds.gallery, device=device, rerank=rerank, progress=progress,
                            rerank_progress=rerank_progress, **emb.on(device, batch_size))
    return {"method": emb.cfg.method, "stage": emb.stage, "dataset": ds.name, "root": str(ds.root),
            "num_query": len(ds.query), "num_gallery": len(ds.gallery), **scores}
