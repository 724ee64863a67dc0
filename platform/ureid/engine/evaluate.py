"""The evaluation protocol of every run: unit pooled features, squared Euclidean distance, Market-1501 CMC/mAP."""

from __future__ import annotations

import numpy as np

from ..data.records import Record
from .extract import extract_features


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def evaluate_model(model, query: list[Record], gallery: list[Record], device="cpu", **extract_options) -> dict:
    """mAP and rank-1/5/10 of ``model`` on query/gallery. ``extract_options`` go to
    :func:`~ureid.engine.extract.extract_features` (``Config.extract_options()`` gives them for a config)."""
    from ..evaluation import evaluate, pairwise_distance

    q = _unit(extract_features(model, query, device=device, **extract_options)["pooled"])
    g = _unit(extract_features(model, gallery, device=device, **extract_options)["pooled"])
    res = evaluate(
        pairwise_distance(q, g, metric="sqeuclidean"),
        np.array([r.pid for r in query]), np.array([r.pid for r in gallery]),
        np.array([r.camid for r in query]), np.array([r.camid for r in gallery]),
    )
    return {"mAP": float(res["mAP"]), "rank1": float(res["rank1"]), "rank5": float(res["rank5"]),
            "rank10": float(res["rank10"])}
