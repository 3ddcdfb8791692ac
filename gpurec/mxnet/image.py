"""``mxnet.image.imdecode`` of MXNet 1.9.1, on OpenCV, returning NumPy arrays.

MXNet decodes with OpenCV as well (``cv::imdecode`` then ``cvtColor`` to RGB), so the
pixels are OpenCV's; only the libjpeg build may differ, by a level here and there.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ImageDecodeError", "NDArray", "imdecode"]


class ImageDecodeError(ValueError, RuntimeError):
    """The buffer is empty or not an image OpenCV can decode.

    MXNet raises its ``MXNetError`` (a ``RuntimeError``) here; this is both a
    ``ValueError`` (the input is bad) and a ``RuntimeError``, so handlers written for
    either catch it.
    """


class NDArray(np.ndarray):
    """A NumPy array with the few ``mxnet.nd.NDArray`` methods image code calls.

    It is an ``np.ndarray`` in every other respect (indexing, ``.shape``, ``.dtype``,
    arithmetic), so ``imdecode(buf).asnumpy()`` and NumPy code taking the result both
    work. There is no device context: everything is in host memory.
    """

    def asnumpy(self) -> np.ndarray:
        """A plain ``np.ndarray`` copy (MXNet copies from the NDArray's storage too)."""
        return np.array(self, copy=True, subok=False)

    def asscalar(self):
        """The single element, as a NumPy scalar (MXNet's ``asscalar``)."""
        if self.size != 1:
            raise ValueError(f"asscalar() needs an array of one element, not shape {self.shape}")
        return self.asnumpy().reshape(())[()]

    def wait_to_read(self) -> None:
        """Nothing to wait for: decoding is synchronous here (MXNet's is asynchronous)."""


def _jpeg_size_known(data: np.ndarray) -> bool:
    """MXNet's ``get_jpeg_size``: a JFIF JPEG (APP0 first) whose start-of-frame marker is
    found by walking the segments. MXNet decodes such images into a preallocated array
    with ``IMREAD_IGNORE_ORIENTATION``; this reproduces its test, out-of-range reads
    counting as failure."""
    n = len(data)
    if n < 11 or bytes(data[:4]) != b"\xff\xd8\xff\xe0" or bytes(data[6:11]) != b"JFIF\x00":
        return False
    i = 4
    block = int(data[i]) * 256 + int(data[i + 1])
    while i < n:
        i += block
        if i >= n or data[i] != 0xFF or i + 1 >= n:
            return False
        m = int(data[i + 1])
        if m == 0xC0 or (0xC1 <= m <= 0xCF and m not in (0xC4, 0xC8, 0xCC)):
            return True
        i += 2
        if i + 1 >= n:
            return False
        block = int(data[i]) * 256 + int(data[i + 1])
    return False


def _ignores_orientation(data: np.ndarray) -> bool:
    """Whether MXNet 1.9.1 decodes ``data`` ignoring its EXIF orientation.

    MXNet reads the size of JFIF JPEGs and PNGs from their headers and decodes those with
    ``IMREAD_IGNORE_ORIENTATION``; any other image (an Exif JPEG straight from a camera)
    goes through plain ``cv::imdecode``, which applies the orientation.
    """
    return _jpeg_size_known(data) or bytes(data[:4]) == b"\x89PNG"


def imdecode(
    buf: bytes | bytearray | np.ndarray,
    flag: int = 1,
    to_rgb: int | bool = 1,
    out: np.ndarray | None = None,
) -> NDArray:
    """Decode an encoded image (JPEG, PNG, ...) to an ``(H, W, C)`` uint8 array.

    As ``mxnet.image.imdecode``: ``flag=1`` gives 3 channels, RGB unless ``to_rgb=0``
    (then BGR, OpenCV's order); ``flag=0`` gives grayscale as ``(H, W, 1)``. ``buf`` is
    ``bytes``, ``bytearray`` or a NumPy array (its bytes are the file); a ``str`` or any
    other type is a ``ValueError`` as in MXNet. ``out``, if given, receives the pixels
    and is returned.

    Raises :class:`ImageDecodeError` for an empty buffer or one that does not decode.
    Differences from MXNet, deliberate: the result is a NumPy array (an :class:`NDArray`
    with ``asnumpy()``), not an MXNet NDArray; errors are raised here, where MXNet may
    raise them only when the result is first read; ``flag`` must be 0 or 1 (MXNet hands
    other values to OpenCV and fails on most of them).
    """
    import cv2

    if not isinstance(buf, (bytes, bytearray, np.ndarray)):
        raise ValueError(
            "buf must be of type bytes, bytearray or numpy.ndarray, not "
            f"{type(buf).__name__}; if you would like to input type str, please convert "
            "to bytes"
        )
    if flag not in (0, 1):
        raise ValueError(f"flag must be 0 (grayscale) or 1 (color), not {flag!r}")
    data = np.frombuffer(buf, dtype=np.uint8)
    if data.size == 0:
        raise ImageDecodeError("Input cannot be an empty buffer")
    mode = cv2.IMREAD_COLOR if flag else cv2.IMREAD_GRAYSCALE
    if _ignores_orientation(data):
        mode |= cv2.IMREAD_IGNORE_ORIENTATION
    img = cv2.imdecode(data, mode)
    if img is None or img.size == 0:
        head = bytes(data[:8])
        raise ImageDecodeError(
            f"Decoding failed. Invalid image file ({data.size} bytes starting {head!r})"
        )
    if flag == 0:
        img = img[:, :, None]
    elif to_rgb:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    result = img.view(NDArray)
    if out is None:
        return result
    if out.shape != result.shape:
        raise ValueError(f"out has shape {out.shape}, the image {result.shape}")
    out[...] = result
    return out
