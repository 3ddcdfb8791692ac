"""MXNet's recordio and image API on gpurec: ``import gpurec.mxnet as mx``.

Code written for Apache MXNet 1.9.1's ``mx.recordio`` and ``mx.image.imdecode`` (the
InsightFace ``MXFaceDataset`` and its many copies, im2rec-style writers) runs unchanged
after replacing ``import mxnet as mx`` with ``import gpurec.mxnet as mx``. Only the
parts of MXNet those programs use are here; ``mx.io`` comes later.

Importing this package loads NumPy and OpenCV, never DALI, CuPy or PyTorch.
"""

from gpurec.mxnet import image, recordio

img = image  # MXNet's own alias: ``mx.img.imdecode`` is ``mx.image.imdecode``

__all__ = ["image", "img", "recordio"]
