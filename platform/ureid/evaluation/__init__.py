"""Evaluation under the Market-1501 protocol: CMC / mAP, distances and k-reciprocal re-ranking.

Pure numpy (torch tensors accepted): arrays in, arrays and dicts out.
"""

from .metrics import AP_MODES, evaluate, nearest, nearest_by_distance, pairwise_distance, valid_queries
from .rerank import re_ranking, re_ranking_features

__all__ = ["AP_MODES", "evaluate", "nearest", "nearest_by_distance", "pairwise_distance", "re_ranking",
           "re_ranking_features", "valid_queries"]
