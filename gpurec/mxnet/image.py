"""``mxnet.image`` of MXNet 1.9.1 (``imdecode``, ``imread``, ``imresize``,
``resize_short``, the crops, ``color_normalize``), on OpenCV, returning NumPy arrays.

MXNet decodes and resizes with OpenCV as well (``cv::imdecode`` then ``cvtColor`` to
RGB; ``cv::resize``), so the pixels are OpenCV's; only the libjpeg build may differ, by
a level here and there. ``random_crop`` draws from Python's ``random`` as MXNet's does,
so a script that seeds ``random`` gets MXNet's crops.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "ImageDecodeError", "NDArray", "center_crop", "color_normalize", "fixed_crop", "imdecode",
    "imread", "imresize", "random_crop", "resize_short", "scale_down",
]  # fmt: skip


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


def imread(filename: str, flag: int = 1, to_rgb: int | bool = 1, out: np.ndarray | None = None):
    """``mx.image.imread``: the image file ``filename`` decoded as :func:`imdecode` does."""
    try:
        with open(filename, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise OSError(f"imread: cannot open {filename}: {exc.strerror}") from exc
    try:
        return imdecode(data, flag, to_rgb, out)
    except ImageDecodeError as exc:
        raise ImageDecodeError(f"{filename}: {exc}") from None


def _get_interp_method(interp: int, sizes: tuple[int, int, int, int] | tuple = ()) -> int:
    """MXNet's interpolation codes (OpenCV's 0-4; 9: cubic to enlarge, area to shrink,
    else linear; 10: one of 0-4 at random, from Python's ``random``)."""
    if interp == 9:
        if not sizes:
            return 2
        old_h, old_w, new_h, new_w = sizes
        if new_h > old_h and new_w > old_w:
            return 2
        if new_h < old_h and new_w < old_w:
            return 3
        return 1
    if interp == 10:
        import random

        return random.randint(0, 4)
    if interp not in (0, 1, 2, 3, 4):
        raise ValueError(f"Unknown interp method {interp}")
    return interp


def imresize(src: np.ndarray, w: int, h: int, interp: int = 1) -> NDArray:
    """``mx.image.imresize``: ``src`` (HWC) resized to ``w`` x ``h`` by OpenCV.

    MXNet 1.9.1's imresize hands ``interp`` to ``cv::resize`` as it is: OpenCV's codes
    0-5 (5: ``INTER_LINEAR_EXACT``) work, any other fails, 9 and 10 included (only the
    functions that call it, ``resize_short`` and the crops, choose for those)."""
    import cv2

    img = np.asarray(src)
    if interp not in (0, 1, 2, 3, 4, 5):
        raise ValueError(f"Unknown interp method {interp}: imresize takes OpenCV's 0-5, as "
                         "MXNet's (9 and 10 are for resize_short and the crops)")  # fmt: skip
    code = int(interp)
    out = cv2.resize(img, (int(w), int(h)), interpolation=code)
    if img.ndim == 3 and out.ndim == 2:  # one channel: OpenCV drops the axis
        out = out[:, :, None]
    return out.view(NDArray)


def resize_short(src: np.ndarray, size: int, interp: int = 2) -> NDArray:
    """``mx.image.resize_short``: the shorter edge to ``size``, the other in proportion
    (rounded down, as MXNet's integer arithmetic)."""
    h, w = np.shape(src)[:2]
    if h > w:
        new_h, new_w = size * h // w, size
    else:
        new_h, new_w = size, size * w // h
    return imresize(src, new_w, new_h, interp=_get_interp_method(interp, (h, w, new_h, new_w)))


def fixed_crop(src: np.ndarray, x0: int, y0: int, w: int, h: int,
               size: tuple[int, int] | None = None, interp: int = 2) -> NDArray:  # fmt: skip
    """``mx.image.fixed_crop``: the ``w`` x ``h`` window at ``(x0, y0)``, resized to
    ``size`` ``(w, h)`` when given and different."""
    img = np.asarray(src)
    out = np.ascontiguousarray(img[y0 : y0 + h, x0 : x0 + w]).copy().view(NDArray)
    if size is not None and (w, h) != tuple(size):
        sizes = (h, w, size[1], size[0])
        out = imresize(out, *size, interp=_get_interp_method(interp, sizes))
    return out


def scale_down(src_size: tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
    """``mx.image.scale_down``: ``size`` (w, h) scaled down to fit ``src_size`` (w, h),
    keeping its aspect ratio."""
    w, h = size
    sw, sh = src_size
    if sh < h:
        w, h = float(w * sh) / h, sh
    if sw < w:
        w, h = sw, float(h * sw) / w
    return int(w), int(h)


def center_crop(src: np.ndarray, size: tuple[int, int], interp: int = 2):
    """``mx.image.center_crop``: the central window of ``size`` (w, h)'s aspect, as
    large as fits, resized to ``size``; returns ``(image, (x0, y0, w, h))``."""
    h, w = np.shape(src)[:2]
    new_w, new_h = scale_down((w, h), size)
    x0, y0 = int((w - new_w) / 2), int((h - new_h) / 2)
    return fixed_crop(src, x0, y0, new_w, new_h, size, interp), (x0, y0, new_w, new_h)


def random_crop(src: np.ndarray, size: tuple[int, int], interp: int = 2):
    """``mx.image.random_crop``: as :func:`center_crop` at a position drawn from Python's
    ``random`` (MXNet's draws); returns ``(image, (x0, y0, w, h))``."""
    import random

    h, w = np.shape(src)[:2]
    new_w, new_h = scale_down((w, h), size)
    x0, y0 = random.randint(0, w - new_w), random.randint(0, h - new_h)
    return fixed_crop(src, x0, y0, new_w, new_h, size, interp), (x0, y0, new_w, new_h)


def color_normalize(src: np.ndarray, mean, std=None) -> np.ndarray:
    """``mx.image.color_normalize``: ``(src - mean) / std``, in place as in MXNet (``src``
    is changed and returned; give a float array)."""
    if mean is not None:
        src -= np.asarray(mean)
    if std is not None:
        src /= np.asarray(std)
    return src
