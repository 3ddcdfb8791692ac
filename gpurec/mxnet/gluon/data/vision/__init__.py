"""``mxnet.gluon.data.vision``: ``ImageRecordDataset``."""

from gpurec.mxnet.gluon.data.vision import datasets
from gpurec.mxnet.gluon.data.vision.datasets import ImageRecordDataset

__all__ = ["ImageRecordDataset", "datasets"]
