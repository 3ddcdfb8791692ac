"""``mxnet.gluon`` of MXNet 1.9.1: the data part that reads `.rec` files (``gluon.data``)."""

from gpurec.mxnet.gluon import data

__all__ = ["data"]
