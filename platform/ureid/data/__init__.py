"""Data: re-ID records, the public dataset formats and the synthetic generator.

:mod:`ureid.data.formats` reads the layouts users download (Market-1501, DukeMTMC-reID, MSMT17,
CUHK03, MARS, DukeMTMC-VideoReID, a generic folder); :mod:`ureid.data.synthetic` renders a
small dataset in the Market-1501 or MARS layout so that everything runs without a download.
"""

from .formats import DATASETS, load_dataset, verify_images
from .records import Record, ReidDataset
from .synthetic import generate

__all__ = ["DATASETS", "Record", "ReidDataset", "generate", "load_dataset", "verify_images"]
