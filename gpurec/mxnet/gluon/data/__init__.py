"""``mxnet.gluon.data``: ``Dataset`` and its transforms, ``RecordFileDataset`` and
``vision.ImageRecordDataset``, with MXNet 1.9.1's semantics, on gpurec's reader.

Data loading (``gluon.data.DataLoader``) is not here: hand these datasets to
``torch.utils.data.DataLoader``, or read batches with ``gpurec.Pipeline``.
"""

from gpurec.mxnet.gluon.data import vision
from gpurec.mxnet.gluon.data.dataset import ArrayDataset, Dataset, RecordFileDataset, SimpleDataset

__all__ = ["ArrayDataset", "Dataset", "RecordFileDataset", "SimpleDataset", "vision"]
