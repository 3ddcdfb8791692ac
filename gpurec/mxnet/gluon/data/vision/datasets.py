"""``mxnet.gluon.data.vision.datasets.ImageRecordDataset`` of MXNet 1.9.1."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gpurec.mxnet import image, recordio
from gpurec.mxnet.gluon.data.dataset import RecordFileDataset

__all__ = ["ImageRecordDataset"]


class ImageRecordDataset(RecordFileDataset):
    """The images of a `.rec` file (with its `.idx`): item ``i`` is ``(image, label)``,
    the image decoded by ``mx.image.imdecode(payload, flag)`` (HWC uint8, RGB for
    ``flag=1``, one channel for ``flag=0``) and the label the record's (a float, or an
    array for a multi-label record).

    ``transform(image, label)``, when given, makes the item, as in MXNet. As in MXNet too,
    every key of the `.idx` is an item: an InsightFace file's header and identity records
    (key 0 and the keys after the images) hold no image and fail to decode; read such
    files with ``gpurec.torch.RecordDataset`` or ``gpurec.Pipeline``, which leave them out.
    """

    def __init__(self, filename: str, flag: int = 1,
                 transform: Callable[[Any, Any], Any] | None = None) -> None:  # fmt: skip
        super().__init__(filename)
        self._flag = flag
        self._transform = transform

    def __getitem__(self, idx: int):
        record = super().__getitem__(idx)
        header, img = recordio.unpack(record)
        if self._transform is not None:
            return self._transform(image.imdecode(img, self._flag), header.label)
        return image.imdecode(img, self._flag), header.label
