"""The evaluation protocol of every run: unit pooled features, squared Euclidean distance, Market-1501 CMC/mAP."""

from __future__ import annotations

import numpy as np

from ..data.records import Record
from .extract import extract_features


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def evaluate_model(model, query: list[Record], gallery: list[Record], device="cpu", rerank: dict | None = None,
                   progress=None, rerank_progress=None, **extract_options) -> dict:
    """mAP and rank-1/5/10 of ``model`` on query/gallery. ``extract_options`` go to
    :func:`~ureid.engine.extract.extract_features` (``Config.extract_options()`` gives them for a config).
    ``rerank``: also the scores after k-reciprocal re-ranking of the same features (keys ``rerank_mAP``, ...;
    ``{}`` for the paper's settings, ``re_ranking_features``' defaults, or some of ``k1``, ``k2``,
    ``lambda_value``), the "+RR" numbers papers report beside the plain ones; never used to pick anything in
    a run. ``progress``: passed to both extractions (``progress(done, total)``); ``rerank_progress``: to the
    re-ranking (rows of its passes, see ``re_ranking``)."""
    from ..evaluation import evaluate, pairwise_distance, re_ranking_features

    q = _unit(extract_features(model, query, device=device, progress=progress, **extract_options)["pooled"])
    g = _unit(extract_features(model, gallery, device=device, progress=progress, **extract_options)["pooled"])
    ids = (np.array([r.pid for r in query]), np.array([r.pid for r in gallery]),
           np.array([r.camid for r in query]), np.array([r.camid for r in gallery]))

    def scores(dist) -> dict:
        res = evaluate(dist, *ids)
        return {k: float(res[k]) for k in ("mAP", "rank1", "rank5", "rank10")}

    out = scores(pairwise_distance(q, g, metric="sqeuclidean"))
    if rerank is not None:
        reranked = scores(re_ranking_features(q, g, progress=rerank_progress, **rerank))
        out.update({f"rerank_{k}": v for k, v in reranked.items()})
    return out
