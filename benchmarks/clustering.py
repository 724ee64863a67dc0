#!/usr/bin/env python
"""Pseudo-label updates, ours against the public code's procedure, side by side in one run.

BUC (benchmarks/clustering_buc.py), DBC + PUL k-means (benchmarks/clustering_dbc_pul.py) and
Cluster Contrast's k-reciprocal Jaccard + DBSCAN (benchmarks/clustering_cc.py) on clustered unit
features, d = 2048, N = 5,000, 12,936 and 77,616 (77,616 with 5 of every 6 samples fake for
camstyle-BUC; the public codes' dense procedures are not run there). Each measurement runs in a
fresh process so peak memory is its own.

    python benchmarks/clustering.py            # the full tables (about an hour on 2 cores)
    python benchmarks/clustering.py --quick    # N = 5,000 only
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "platform")]

import clustering_buc  # noqa: E402
import clustering_cc  # noqa: E402
import clustering_dbc_pul  # noqa: E402


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    quick = "--quick" in argv
    print("## BUC (bottom_up_merge)\n", flush=True)
    clustering_buc.main(quick=quick)
    print("\n## DBC (dispersion_merge) and PUL (kmeans, K = 750)\n", flush=True)
    clustering_dbc_pul.main(["--quick"] if quick else [])
    print("\n## Cluster Contrast (kreciprocal_jaccard + dbscan)\n", flush=True)
    clustering_cc.main(quick=quick)


if __name__ == "__main__":
    main()
