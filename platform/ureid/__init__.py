"""ureid: unsupervised person re-identification at cluster scale.

Pure algorithms live in :mod:`ureid.clustering` and :mod:`ureid.evaluation`;
each method in its module under :mod:`ureid.methods`; Ray orchestration in :mod:`ureid.runtime`,
which names no method; MLflow tracking in :mod:`ureid.tracking`.
"""

__version__ = "0.1.0"
