"""Pictures of a finished run folder (``ureid visualize RUN_DIR``, and at the end of every run).

From the run's own files, so it works long after the run: the stage checkpoints (the model), the feature
store's saved targets (the pseudo-labels) and the resolved config. It writes ``pictures/ranked_lists.png``
(the selected stage's model on a fixed sample of queries; for a dataset without query/gallery, an unlabeled
folder, ``pictures/pseudo_identities.png``: a sample of the selected stage's pseudo-identities, their members
nearest the cluster mean first, or ``pictures/neighbours.png`` where every image is a class of its own, SSL:
a sample of images and their nearest neighbours) and ``pictures/feature_map.png`` (t-SNE of the
training features after stage 0 and after the selected stage, coloured by the pseudo-labels their update
gave). No Ray here.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np

from .config import DatasetMissing, load_config, read_yaml
from .embed import run_folder, stage_model, unfinished


def visualize_run(run_dir: str | Path, num_queries: int = 8, seed: int = 0, records=None,
                  stage: int | None = None, root: str | Path | None = None) -> list[Path]:
    """``records``: (train, query, gallery) record lists when the caller has them (the driver at the end of a
    run); otherwise the dataset the run's config names is read, at ``root`` when given (the same dataset in
    another folder: a run made on a cluster, drawn on a laptop). ``stage``: another stage than the selected
    one, drawn into ``pictures/stage<N>/`` (the run's own pictures stay)."""
    from .data.records import known_identities
    from .data.run_data import load_split_dataset
    from .engine.extract import extract_features
    from .evaluation import pairwise_distance
    from .runtime.job import stage_checkpoints, training_set_mismatch, training_set_record
    from .visualize import drawable_clusters, feature_maps, nearest_neighbours, pseudo_identities, ranked_lists

    run_dir = run_folder(run_dir)
    finished = (run_dir / "summary.json").is_file()
    checkpoints = dict(stage_checkpoints(run_dir))
    if not finished and stage is None:  # an unfinished run can still be drawn stage by stage
        method = read_yaml(run_dir / "config.yaml").get("method", "<method>")
        raise FileNotFoundError(unfinished(run_dir, method, checkpoints, "summary.json", "draws"))
    try:
        cfg = load_config(run_dir / "config.yaml", check_paths=root is None)
    except DatasetMissing as exc:
        if exc.key != "data":  # --root stands for data.root alone
            raise
        raise FileNotFoundError(f"{exc}; if the dataset was moved or the run copied from another machine, "
                                f"`ureid visualize {run_dir} --root DIR` reads it there") from None
    if root is not None:
        if not Path(root).expanduser().is_dir():
            raise FileNotFoundError(f"--root {root}: no such folder (the run's {cfg.data.name} dataset)")
        cfg.data.root = str(Path(root).expanduser())
    results = pickle.loads((run_dir / "feature_store" / "feature_store.pkl").read_bytes())
    kept = None  # an unfinished run has selected none
    if finished:
        summary = json.loads((run_dir / "summary.json").read_text())
        kept = summary.get("selected_stage", summary.get("best_stage"))  # runs before schedule.select: best_stage
    selected = kept if stage is None else stage
    if selected not in checkpoints or selected not in results:
        have = sorted(set(checkpoints) & set(results))
        raise FileNotFoundError(f"{run_dir}: no stage {selected} to draw (it has stages {', '.join(map(str, have))})")
    if records is None:
        ds = load_split_dataset(cfg.data)
        records = (list(ds.train), ds.query, ds.gallery)
        # the pseudo-labels are indexed by training image: drawn on other images they would be wrong
        recorded = json.loads((run_dir / "run.json").read_text()).get("training_set")
        if recorded is not None:  # runs since 7 December 2026
            why = training_set_mismatch(recorded, training_set_record(cfg.data.root, [r.paths for r in ds.train]))
        else:  # the real images, then camstyle's fakes: a multiple
            covered = len(results[selected]["targets"].labels)
            why = f"{len(ds.train)} training images, the run's labels cover {covered} samples" \
                if not ds.train or covered % len(ds.train) else None
        if why:
            raise ValueError(f"{cfg.data.name} at {cfg.data.root}: not the dataset the run trained on ({why})")
    train, query, gallery = records  # real training images only (camstyle fakes are not drawn)
    out = run_dir / "pictures" if selected == kept else run_dir / "pictures" / f"stage{selected}"
    out.mkdir(parents=True, exist_ok=True)
    opts = cfg.extract_options()

    def unit(x):
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    models = {st: stage_model(cfg, checkpoints[st] / "state.pt") for st in sorted({0, selected})}
    train_features = {st: extract_features(model, train, **opts)["pooled"] for st, model in models.items()}
    if query:
        q = unit(extract_features(models[selected], query, **opts)["pooled"])
        g = unit(extract_features(models[selected], gallery, **opts)["pooled"])
        ranked_lists([r.path for r in query], [r.pid for r in query], [r.camid for r in query],
                     [r.path for r in gallery], [r.pid for r in gallery], [r.camid for r in gallery],
                     pairwise_distance(q, g, metric="sqeuclidean"), out / "ranked_lists.png",
                     num_queries=num_queries, seed=seed)
        first = out / "ranked_lists.png"
    else:  # an unlabeled folder: what its pseudo-identities look like instead of what a query retrieves
        pids = known_identities(train)
        labels = results[selected]["targets"].labels[: len(train)]
        if drawable_clusters(labels)[0].size:
            first = out / "pseudo_identities.png"
            pseudo_identities([r.path for r in train], labels, unit(train_features[selected]), first,
                              num_clusters=num_queries, seed=seed, pids=pids)
        else:  # a class per image (SSL): what each image's nearest neighbours are
            first = out / "neighbours.png"
            nearest_neighbours([r.path for r in train], unit(train_features[selected]), first,
                               num_queries=num_queries, seed=seed, pids=pids)
    panels = []
    for st, feats in train_features.items():
        labels = results[st]["targets"].labels[: len(train)]
        panels.append((feats, labels, f"after stage {st}" + (" (selected)" if st == kept else "")))
    feature_maps(panels, out / "feature_map.png", seed=seed)
    return [first, out / "feature_map.png"]
