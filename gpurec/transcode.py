"""One image file's bytes -> one record's image bytes: checked, decoded, resized, encoded.

Everything a pack does to a single image lives here, so the process pool runs one
plain function and every bad file ends as an :class:`ImageError` whose message is the
skip reason written to the pack report.

Speed: the image size is read from the file header first (a few bytes, no decoding),
which both refuses decompression bombs before any pixel is decoded and picks
libjpeg's reduced-size decoding (1/2, 1/4, 1/8) whenever the reduced image still
covers the target size; only the remaining, less-than-2x resize is left to OpenCV.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, fields

import cv2
import numpy as np

__all__ = ["EncodeSpec", "ImageError", "ImageInfo", "Payload", "sniff", "transcode"]

DEFAULT_MAX_PIXELS = 100_000_000

Payload = bytes | memoryview
"""A record's image bytes: the file's own bytes (pass-through), or a read-only view of
the encoder's buffer (not copied: the record writer takes it as it is)."""


class ImageError(Exception):
    """An image that cannot be packed; the message is the reason given in reports."""


class UnknownImage(ImageError):
    """Bytes whose signature :func:`sniff` does not know: not necessarily not an image
    (PPM, JPEG 2000...), so loaders let their decoder try them."""


@dataclass(frozen=True)
class EncodeSpec:
    """How images become record payloads; the names and defaults are im2rec's.

    resize: shorter edge in pixels after the optional center crop (0 keeps the size).
    center_crop: crop the central square first. quality: JPEG quality (1-100), or PNG
    compression level with ``encoding=".png"`` (levels above 9 mean 9, so im2rec's
    default of 95 works for PNG too). color: 1 for 3-channel BGR,
    0 for grayscale, -1 unchanged. pass_through: store the file's bytes as they are
    (checked, never decoded). max_pixels: larger images are refused unread.
    """

    resize: int = 0
    center_crop: bool = False
    quality: int = 95
    encoding: str = ".jpg"
    color: int = 1
    pass_through: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS

    @classmethod
    def from_fields(cls, options: object) -> EncodeSpec:
        """The spec from any object with attributes of these names (PackOptions, argparse)."""
        return cls(
            **{f.name: getattr(options, f.name) for f in fields(cls) if hasattr(options, f.name)}
        )

    def __post_init__(self) -> None:
        if self.resize < 0:
            raise ValueError(f"resize must be >= 0, got {self.resize}")
        if self.encoding not in (".jpg", ".png"):
            raise ValueError(f"encoding must be '.jpg' or '.png', got {self.encoding!r}")
        if self.encoding == ".jpg" and not 1 <= self.quality <= 100:
            raise ValueError(f"JPEG quality must be in 1..100, got {self.quality}")
        if self.encoding == ".png" and not 0 <= self.quality <= 100:
            raise ValueError(f"PNG compression level must be in 0..9, got {self.quality}")
        if self.color not in (-1, 0, 1):
            raise ValueError(f"color must be 1, 0 or -1, got {self.color}")
        if self.max_pixels <= 0:
            raise ValueError(f"max_pixels must be positive, got {self.max_pixels}")


@dataclass(frozen=True)
class ImageInfo:
    """What the first bytes of a file say: its format, and its size where known."""

    format: str
    width: int | None = None
    height: int | None = None


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_frame(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, offset of the first scan) from the segment headers, walking the
    segment lengths only; None when the headers end before a frame and a scan."""
    pos, n, size = 2, len(data), None
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if marker in _JPEG_SOF and size is None:
            if pos + 9 > n:
                return None
            height, width = struct.unpack_from(">HH", data, pos + 5)
            size = (width, height)
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            return None if size is None else (*size, pos)
        if length < 2:
            return None
        pos += 2 + length
    return None


_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"  # the JP2 file format's first box
_J2K_SIGNATURE = b"\xff\x4f\xff\x51"  # a JPEG 2000 codestream: SOC, then the SIZ marker


def _jpeg2000_size(data: bytes | memoryview) -> tuple[int, int]:
    """(width, height) of a JPEG 2000 image: the JP2 header box's ``ihdr`` (height, then
    width), or a bare codestream's SIZ marker (reference grid less its offset)."""
    if data[:12] == _JP2_SIGNATURE:
        head = bytes(data[:4096])
        at = head.find(b"ihdr")
        if at < 0 or at + 12 > len(head):
            raise ImageError("corrupt JPEG 2000 header (no ihdr box)")
        height, width = struct.unpack_from(">II", head, at + 4)
        return width, height
    if len(data) < 24:
        raise ImageError("corrupt JPEG 2000 codestream (no SIZ marker)")
    xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">IIII", data, 8)
    if xsiz <= xosiz or ysiz <= yosiz:
        raise ImageError("corrupt JPEG 2000 codestream (empty image area)")
    return xsiz - xosiz, ysiz - yosiz


def _pnm_size(data: bytes | memoryview) -> tuple[int, int]:
    """(width, height) of a PBM/PGM/PPM image (``P1``..``P6``): the header's first two
    numbers, after the magic, whitespace and ``#`` comments."""
    head = bytes(data[:1024])
    numbers: list[int] = []
    pos = 2
    while len(numbers) < 2 and pos < len(head):
        c = head[pos : pos + 1]
        if c.isspace():
            pos += 1
        elif c == b"#":
            end = head.find(b"\n", pos)
            pos = len(head) if end < 0 else end + 1
        else:
            end = pos
            while end < len(head) and head[end : end + 1].isdigit():
                end += 1
            if end == pos:
                break
            numbers.append(int(head[pos:end]))
            pos = end
    if len(numbers) < 2:
        raise ImageError("corrupt PNM header (no width and height)")
    return numbers[0], numbers[1]


def _has_after(data: bytes | memoryview, marker: bytes, start: int) -> bool:
    """Whether ``marker`` occurs in ``data`` at or after ``start``. A memoryview (a record
    read in place from its memory map) is checked at its end first, where the marker
    nearly always is, so it is copied only in the rare other case."""
    if isinstance(data, memoryview):
        n = len(marker)
        if len(data) - n >= start and data[len(data) - n :] == marker:
            return True
        data = bytes(data)
    return data.rfind(marker, start) >= 0  # from the end: found at once


def sniff(data: bytes | memoryview) -> ImageInfo:
    """Identify an image by its signature (not its file name) and read its size.

    Raises ImageError for empty files, unknown signatures and truncated JPEG/PNG files
    (a JPEG must hold an end marker after its first scan, a PNG its IEND chunk). ``data``
    may be a memoryview, which is not copied.
    """
    if not data:
        raise ImageError("empty file")
    if data[:3] == b"\xff\xd8\xff":
        frame = _jpeg_frame(data)
        if frame is None:
            raise ImageError("corrupt or truncated JPEG header (no frame and scan found)")
        # Entropy-coded data cannot hold 0xFFD9 (0xFF bytes are stuffed), so the image is
        # whole when an end marker follows its first scan. Bytes after it (camera trailers,
        # motion-photo videos) are allowed.
        if not _has_after(data, b"\xff\xd9", frame[2]):
            raise ImageError("truncated JPEG (no end-of-image marker)")
        return ImageInfo("jpeg", frame[0], frame[1])
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise ImageError("corrupt PNG header")
        if not _has_after(data, b"IEND\xaeB`\x82", 0):  # IEND holds no data: a fixed CRC
            raise ImageError("truncated PNG (no IEND chunk)")
        width, height = struct.unpack_from(">II", data, 16)
        return ImageInfo("png", width, height)
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        width, height = struct.unpack_from("<HH", data, 6)
        return ImageInfo("gif", width, height)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ImageInfo("webp")
    if data[:2] == b"BM":
        return ImageInfo("bmp")
    if data[:4] in (b"II*\0", b"MM\0*"):
        return ImageInfo("tiff")
    if data[:12] == _JP2_SIGNATURE or data[:4] == _J2K_SIGNATURE:
        return ImageInfo("jpeg2000", *_jpeg2000_size(data))
    magic = bytes(data[:3])
    if len(magic) == 3 and magic[0] == ord("P") and magic[1] in b"123456" and magic[2:].isspace():
        return ImageInfo("pnm", *_pnm_size(data))
    raise UnknownImage(f"not an image: unknown file signature {bytes(data[:8]).hex()}")


_READ_FLAGS = {1: cv2.IMREAD_COLOR, 0: cv2.IMREAD_GRAYSCALE, -1: cv2.IMREAD_UNCHANGED}
_REDUCED_FLAGS = {
    1: {
        2: cv2.IMREAD_REDUCED_COLOR_2,
        4: cv2.IMREAD_REDUCED_COLOR_4,
        8: cv2.IMREAD_REDUCED_COLOR_8,
    },
    0: {
        2: cv2.IMREAD_REDUCED_GRAYSCALE_2,
        4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
        8: cv2.IMREAD_REDUCED_GRAYSCALE_8,
    },
}


def _reduction(info: ImageInfo, spec: EncodeSpec) -> int:
    """The largest libjpeg scale denominator whose output still covers the target."""
    if info.format != "jpeg" or not spec.resize or spec.color not in _REDUCED_FLAGS:
        return 1
    short = min(info.width, info.height)
    for denom in (8, 4, 2):
        if short // denom >= spec.resize:
            return denom
    return 1


def decode(data: bytes, info: ImageInfo, spec: EncodeSpec) -> np.ndarray:
    """Decode with OpenCV (at reduced size when the spec allows); raises ImageError."""
    denom = _reduction(info, spec)
    flags = _REDUCED_FLAGS[spec.color][denom] if denom > 1 else _READ_FLAGS[spec.color]
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error as exc:
        raise ImageError(f"OpenCV cannot decode it: {str(exc).strip().splitlines()[-1]}") from None
    if img is None or img.size == 0:
        raise ImageError(f"OpenCV cannot decode this {info.format} file")
    return img


def center_crop(img: np.ndarray) -> np.ndarray:
    """The central square, as im2rec's ``--center-crop`` cuts it."""
    h, w = img.shape[:2]
    if h > w:
        margin = (h - w) // 2
        return img[margin : margin + w]
    margin = (w - h) // 2
    return img[:, margin : margin + h]


def resize_shorter(
    img: np.ndarray, short: int, full_size: tuple[int, int] | None = None
) -> np.ndarray:
    """Resize so the shorter edge is ``short``, the longer one as im2rec computes it.

    ``full_size`` (height, width) is the image's size before any reduced decoding: the
    output size is computed from it, so it is the same as from a full-size decode.
    """
    h, w = full_size or img.shape[:2]
    size = (short, h * short // w) if h > w else (w * short // h, short)  # (width, height)
    if size == (img.shape[1], img.shape[0]):
        return img
    # Bilinear like im2rec; area averaging only for large downscales, where bilinear aliases.
    interp = cv2.INTER_AREA if min(img.shape[:2]) > 2 * short else cv2.INTER_LINEAR
    return cv2.resize(img, size, interpolation=interp)


def encode(img: np.ndarray, spec: EncodeSpec) -> memoryview:
    """Encode as the spec says; JPEG gets 8-bit data with at most 3 channels."""
    if spec.encoding == ".jpg":
        if img.dtype != np.uint8:
            img = cv2.convertScaleAbs(img, alpha=255.0 / np.iinfo(img.dtype).max)
        if img.ndim == 3 and img.shape[2] == 4:
            img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
        params = [cv2.IMWRITE_JPEG_QUALITY, spec.quality]
    else:
        params = [cv2.IMWRITE_PNG_COMPRESSION, min(spec.quality, 9)]
    ok, buf = cv2.imencode(spec.encoding, img, params)
    if not ok:
        raise ImageError(f"OpenCV cannot encode a {img.shape} {img.dtype} image as {spec.encoding}")
    return memoryview(buf).cast("B").toreadonly()


def transcode(data: bytes, spec: EncodeSpec) -> Payload:
    """The record image bytes for one file's bytes, or ImageError with the reason.

    Pass-through returns ``data`` itself after the header checks, so the record holds
    the file byte for byte (as im2rec's ``--pass-through``); otherwise a read-only view
    of the newly encoded image.
    """
    info = sniff(data)
    if info.width is not None:
        pixels = info.width * info.height
        if pixels == 0:
            raise ImageError(f"image declares a size of {info.width}x{info.height}")
        if pixels > spec.max_pixels:
            raise ImageError(
                f"{info.width}x{info.height} = {pixels} pixels is over the bound of "
                f"{spec.max_pixels} (max_pixels)"
            )
    if spec.pass_through:
        return data
    try:
        return _convert(data, info, spec)
    except cv2.error as exc:  # e.g. an allocation OpenCV could not make
        raise ImageError(f"OpenCV failed on it: {str(exc).strip().splitlines()[-1]}") from None
    except MemoryError:
        raise ImageError("out of memory while converting it") from None


def _convert(data: bytes, info: ImageInfo, spec: EncodeSpec) -> memoryview:
    img = decode(data, info, spec)
    h, w = img.shape[:2]
    if info.width is None:
        if h * w > spec.max_pixels:
            raise ImageError(f"{w}x{h} = {h * w} pixels is over the bound of {spec.max_pixels}")
        full = (h, w)
    elif (h > w and info.width > info.height) or (h < w and info.width < info.height):
        full = (info.width, info.height)  # decoded upright from an EXIF-rotated file
    else:
        full = (info.height, info.width)
    if spec.center_crop:
        img = center_crop(img)
        full = (min(full), min(full))
    if spec.resize:
        img = resize_shorter(img, spec.resize, full)
    return encode(img, spec)
