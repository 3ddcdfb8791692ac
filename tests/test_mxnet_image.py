"""``gpurec.mxnet.image.imdecode`` against MXNet 1.9.1's ``mx.image.imdecode``.

MXNet's pixels are in ``../shared/golden/insightface/expected.json`` (SHA-256 and mean of
``mx.image.imdecode(payload).asnumpy()``); the other behaviours here were observed on MXNet
1.9.1 by ``benchmarks/crosscheck_mxnet_recordio.py`` (probe ``imdecode``).
"""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

import gpurec.mxnet as mx
from gpurec.mxnet.image import ImageDecodeError, NDArray


def _image() -> np.ndarray:
    yy, xx = np.mgrid[0:48, 0:64]
    img = np.stack([xx * 4, yy * 5, (xx + yy) * 2], axis=-1)
    noise = np.random.default_rng(7).integers(0, 20, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def encode(img: np.ndarray, ext: str = ".jpg") -> bytes:
    return cv2.imencode(ext, img)[1].tobytes()


def exif_app1(orientation: int) -> bytes:
    """An APP1 Exif segment holding only the Orientation tag."""
    ifd = struct.pack("<H", 1) + struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0)
    tiff = b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0)
    return b"\xff\xe1" + struct.pack(">H", 8 + len(tiff)) + b"Exif\x00\x00" + tiff


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    return encode(_image())


def test_rgb_by_default_bgr_with_to_rgb_0(jpeg: bytes) -> None:
    bgr = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    rgb = mx.image.imdecode(jpeg)
    assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb.asnumpy(), bgr[:, :, ::-1])
    assert np.array_equal(mx.image.imdecode(jpeg, to_rgb=0).asnumpy(), bgr)
    assert np.array_equal(mx.image.imdecode(jpeg, to_rgb=False).asnumpy(), bgr)
    assert mx.img.imdecode is mx.image.imdecode


def test_flag_0_is_grayscale_with_a_channel_axis(jpeg: bytes) -> None:
    gray = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_GRAYSCALE)
    for to_rgb in (0, 1):
        out = mx.image.imdecode(jpeg, flag=0, to_rgb=to_rgb)
        assert out.shape == (48, 64, 1) and np.array_equal(out.asnumpy()[:, :, 0], gray)
    assert np.array_equal(mx.image.imdecode(jpeg, 0).asnumpy()[:, :, 0], gray)  # positional


def test_accepts_bytes_bytearray_and_arrays(jpeg: bytes) -> None:
    want = mx.image.imdecode(jpeg).asnumpy()
    padded = jpeg + bytes(-len(jpeg) % 4)  # bytes after the end marker are ignored
    for buf in (
        bytearray(jpeg),
        np.frombuffer(jpeg, np.uint8),
        np.frombuffer(padded, np.uint8).reshape(4, -1),  # any shape: its bytes are the file
        np.frombuffer(padded, np.int32),  # any dtype: MXNet takes np.frombuffer(buf, uint8)
    ):
        assert np.array_equal(mx.image.imdecode(buf).asnumpy(), want)


@pytest.mark.parametrize("buf", ["a str", memoryview(b"abc"), [255, 216], None, 3])
def test_other_input_types_are_value_errors(buf) -> None:
    with pytest.raises(ValueError, match=r"buf must be of type bytes, bytearray or numpy\.ndarray"):
        mx.image.imdecode(buf)


@pytest.mark.parametrize(
    "buf, message",
    [
        (b"", "Input cannot be an empty buffer"),
        (np.zeros(0, np.uint8), "Input cannot be an empty buffer"),
        (b"this is not an image at all", "Decoding failed"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(40), "Decoding failed"),
    ],
)
def test_empty_or_broken_buffers_raise(buf, message: str) -> None:
    with pytest.raises(ImageDecodeError, match=message) as err:
        mx.image.imdecode(buf)
    # catchable as what MXNet raises (MXNetError is a RuntimeError) and as a bad value
    assert isinstance(err.value, RuntimeError) and isinstance(err.value, ValueError)


def test_a_truncated_jpeg_raises(jpeg: bytes) -> None:
    """MXNet's bundled OpenCV 3.4 decoded a cut JPEG (missing part gray); OpenCV 4 and 5
    refuse it, and so does gpurec (a difference of the OpenCV version, documented)."""
    with pytest.raises(ImageDecodeError, match=f"{len(jpeg) // 2} bytes"):
        mx.image.imdecode(jpeg[: len(jpeg) // 2])


@pytest.mark.parametrize("flag", [-1, 2, 4])
def test_flag_must_be_0_or_1(jpeg: bytes, flag: int) -> None:
    with pytest.raises(ValueError, match="flag must be 0"):
        mx.image.imdecode(jpeg, flag=flag)


def test_result_is_an_ndarray_with_asnumpy(jpeg: bytes) -> None:
    out = mx.image.imdecode(jpeg)
    assert isinstance(out, NDArray) and isinstance(out, np.ndarray)
    plain = out.asnumpy()
    assert type(plain) is np.ndarray and plain.flags.writeable and plain.flags.owndata
    plain[0, 0] = 0
    assert not np.array_equal(plain, out)  # a copy
    out.wait_to_read()
    assert out[:1, 0, 0].asscalar() == out.asnumpy()[0, 0, 0]
    with pytest.raises(ValueError, match="one element"):
        out.asscalar()
    assert type((out.astype(np.float32) / 255).asnumpy()) is np.ndarray
    target = np.zeros((48, 64, 3), np.uint8)
    assert mx.image.imdecode(jpeg, out=target) is target
    assert np.array_equal(target, out)
    with pytest.raises(ValueError, match="shape"):
        mx.image.imdecode(jpeg, out=np.zeros((2, 2, 3), np.uint8))


def test_png_gray_rgba_16bit_and_bmp_become_8bit_rgb() -> None:
    img = _image()
    rgb = img[:, :, ::-1]
    assert np.array_equal(mx.image.imdecode(encode(img, ".png")).asnumpy(), rgb)
    assert np.array_equal(mx.image.imdecode(encode(img, ".bmp")).asnumpy(), rgb)
    rgba = cv2.cvtColor(img, cv2.COLOR_BGR2BGRA)
    rgba[..., 3] = 100
    assert np.array_equal(mx.image.imdecode(encode(rgba, ".png")).asnumpy(), rgb)
    gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    assert np.array_equal(mx.image.imdecode(encode(gray, ".png")).asnumpy(), np.dstack([gray] * 3))
    deep = img[:, :, 0].astype(np.uint16) * 257
    out = mx.image.imdecode(encode(deep, ".png")).asnumpy()
    assert out.dtype == np.uint8 and np.array_equal(out, np.dstack([img[:, :, 0]] * 3))


def test_exif_orientation_as_mxnet_applies_it() -> None:
    """MXNet reads JFIF JPEGs and PNGs at their header size, ignoring EXIF orientation;
    other JPEGs (Exif first, as cameras write them) are rotated. Checked on MXNet 1.9.1."""
    img = _image()
    jpeg = encode(img)
    assert jpeg[2:4] == b"\xff\xe0" and jpeg[6:11] == b"JFIF\x00" and len(jpeg) > 20
    plain = mx.image.imdecode(jpeg).asnumpy()
    jfif_exif = jpeg[:20] + exif_app1(6) + jpeg[20:]  # APP0 JFIF, then APP1 Exif
    assert np.array_equal(mx.image.imdecode(jfif_exif).asnumpy(), plain)
    exif_only = jpeg[:2] + exif_app1(6) + jpeg[20:]  # APP1 Exif replaces APP0
    rotated = mx.image.imdecode(exif_only).asnumpy()
    assert rotated.shape == (64, 48, 3)
    assert np.array_equal(rotated, np.rot90(plain, k=-1))  # orientation 6: 90° clockwise
    assert mx.image.imdecode(exif_only, flag=0).shape == (64, 48, 1)


def test_golden_insightface_pixels_match_mxnet(golden: Path) -> None:
    face = golden / "insightface"
    want = json.loads((face / "expected.json").read_text())
    r = mx.recordio.MXIndexedRecordIO(str(face / "train.idx"), str(face / "train.rec"), "r")
    same = 0
    for key, image in want["images"].items():
        _, payload = mx.recordio.unpack(r.read_idx(int(key)))
        pixels = mx.image.imdecode(payload).asnumpy()
        assert pixels.shape == (112, 112, 3) and pixels.dtype == np.uint8
        assert abs(pixels.mean() - image["imdecode_rgb_mean"]) < 0.5, key
        same += hashlib.sha256(pixels.tobytes()).hexdigest() == image["imdecode_rgb_sha256"]
    # identical on the OpenCV builds tried (4.11, 5.0); another libjpeg may differ by a level
    assert same >= len(want["images"]) // 2


def test_import_loads_no_gpu_library() -> None:
    code = (
        "import sys, gpurec.mxnet as mx; "
        "mx.recordio.MXRecordIO; mx.image.imdecode; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'cupy', 'nvidia', 'torchvision', 'mxnet')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
