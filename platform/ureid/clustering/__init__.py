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

from .buc import bottom_up_merge
from .dbc import dispersion_merge
from .jaccard import dbscan, kreciprocal_jaccard
from .pul import inertia, kmeans, select_reliable
from .ssl import reliable_neighbors

__all__ = ["bottom_up_merge", "dispersion_merge", "inertia", "kmeans", "select_reliable", "reliable_neighbors",
           "kreciprocal_jaccard", "dbscan"]
