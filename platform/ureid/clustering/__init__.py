"""Pure label-update algorithms: numpy / torch arrays in, arrays out. No Ray, no MLflow, no files.

=======================  =========================================================================
``bottom_up_merge``      BUC (and camstyle with ``is_fake``): sample-pair score + diversity penalty
``dispersion_merge``     DBC: average linkage + intra-dispersion, per stage (code) or per merge (paper)
``kmeans``               PUL: k-means on raw features (lockstep Lloyd, exact assignments)
``select_reliable``      PUL: samples whose cosine to a cluster centre exceeds the threshold
``reliable_neighbors``   SSL: k most similar images by global + part distance + camera penalty
``kreciprocal_jaccard``  Cluster Contrast / SpCL: k-reciprocal Jaccard distance as a sparse matrix,
                         then ``dbscan`` on it (sklearn's precomputed DBSCAN, in closed form)
=======================  =========================================================================

None of them builds an N x N matrix: candidate pairs come from blockwise exact top-k, average
linkage from products of cluster means, merges from union-find, Jaccard distances from an inverted
index over the sparse k-reciprocal encodings (only pairs that share a neighbour are stored).
"""

from .._lazy import lazy_getattr

# Imported on first use (torch and faiss come with them): the methods' modules name these at import, and
# `ureid --help` lists the methods without paying for them.
_EXPORTS = {"bottom_up_merge": "buc", "dispersion_merge": "dbc", "dbscan": "jaccard", "kreciprocal_jaccard": "jaccard",
            "inertia": "pul", "kmeans": "pul", "select_reliable": "pul", "reliable_neighbors": "ssl"}
__getattr__ = lazy_getattr(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
# the submodules behind them, for a process that wants all of them loaded before it is timed (the feature store)
MODULES = tuple(f"{__name__}.{m}" for m in sorted(set(_EXPORTS.values())))
