"""MXNet's recordio, image, io, ndarray and gluon.data API on gpurec: ``import gpurec.mxnet as mx``.

Code written for Apache MXNet 1.9.1's ``mx.recordio``, ``mx.image`` (the InsightFace
``MXFaceDataset`` and its many copies, ``eval/verification.py``'s ``load_bin``,
im2rec-style writers), ``mx.nd`` on images, ``mx.gluon.data``'s record datasets and
``mx.io.ImageRecordIter`` (the image-classification scripts) runs unchanged after
replacing ``import mxnet as mx`` with ``import gpurec.mxnet as mx``. Only the parts of
MXNet those programs use are here; ``mx.cpu()``/``mx.gpu(i)`` only say where
``ImageRecordIter`` puts its arrays.

Importing this package loads NumPy and OpenCV, never DALI, CuPy or PyTorch.
"""

from gpurec.mxnet import gluon, image, io, ndarray, recordio
from gpurec.mxnet.context import Context, cpu, gpu

img = image  # MXNet's own alias: ``mx.img.imdecode`` is ``mx.image.imdecode``
nd = ndarray  # and ``mx.nd`` is ``mx.ndarray``

__all__ = ["Context", "cpu", "gluon", "gpu", "image", "img", "io", "nd", "ndarray", "recordio"]
