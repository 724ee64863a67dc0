"""ureid: unsupervised person re-identification at cluster scale.

Pure algorithms live in :mod:`ureid.clustering` and :mod:`ureid.evaluation`;
Ray orchestration in :mod:`ureid.distributed`; MLflow tracking in :mod:`ureid.tracking`.
"""

__version__ = "0.1.0"
