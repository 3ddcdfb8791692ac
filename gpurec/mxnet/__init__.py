"""MXNet's recordio, image and io API on gpurec: ``import gpurec.mxnet as mx``.

Code written for Apache MXNet 1.9.1's ``mx.recordio``, ``mx.image.imdecode`` (the
InsightFace ``MXFaceDataset`` and its many copies, im2rec-style writers) and
``mx.io.ImageRecordIter`` (the image-classification scripts) runs unchanged after
replacing ``import mxnet as mx`` with ``import gpurec.mxnet as mx``. Only the parts of
MXNet those programs use are here; ``mx.cpu()``/``mx.gpu(i)`` only say where
``ImageRecordIter`` puts its arrays.

Importing this package loads NumPy and OpenCV, never DALI, CuPy or PyTorch.
"""

from gpurec.mxnet import image, io, recordio
from gpurec.mxnet.context import Context, cpu, gpu

img = image  # MXNet's own alias: ``mx.img.imdecode`` is ``mx.image.imdecode``

__all__ = ["Context", "cpu", "gpu", "image", "img", "io", "recordio"]
