"""One image -> one record payload: header checks, conversions, reduced decoding, pixels."""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from gpurec.transcode import EncodeSpec, ImageError, _reduction, sniff, transcode


def photo(h: int = 300, w: int = 400, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], axis=-1)
    img += rng.normal(0, 6, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def jpeg(img: np.ndarray, quality: int = 90) -> bytes:
    return cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()


def decode(payload: bytes, flags: int = cv2.IMREAD_UNCHANGED) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(payload, np.uint8), flags)


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that declares a huge size (a decompression bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    body = struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    end = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return b"\x89PNG\r\n\x1a\n" + body + end


def test_installed_opencv_honours_reduced_jpeg_decoding() -> None:
    data = jpeg(photo(300, 400))
    for flag, shape in [
        (cv2.IMREAD_REDUCED_COLOR_2, (150, 200, 3)),
        (cv2.IMREAD_REDUCED_COLOR_4, (75, 100, 3)),
        (cv2.IMREAD_REDUCED_COLOR_8, (38, 50, 3)),
        (cv2.IMREAD_REDUCED_GRAYSCALE_2, (150, 200)),
    ]:
        assert decode(data, flag).shape == shape


def test_reduction_keeps_the_target_covered() -> None:
    info = sniff(jpeg(photo(300, 400)))
    assert (info.format, info.width, info.height) == ("jpeg", 400, 300)
    assert _reduction(info, EncodeSpec(resize=256)) == 1
    assert _reduction(info, EncodeSpec(resize=150)) == 2
    assert _reduction(info, EncodeSpec(resize=74)) == 4
    assert _reduction(info, EncodeSpec(resize=37)) == 8
    assert _reduction(info, EncodeSpec(resize=0)) == 1
    assert _reduction(info, EncodeSpec(resize=37, color=-1)) == 1


def test_resized_pixels_match_a_reference_resize() -> None:
    """Tolerance: mean absolute difference <= 2 levels vs. a full decode + INTER_AREA."""
    src = photo(375, 500, seed=3)
    data = jpeg(src, 95)
    out = decode(transcode(data, EncodeSpec(resize=120, quality=95)))
    assert out.shape == (120, 160, 3)
    ref = cv2.resize(decode(data, cv2.IMREAD_COLOR), (160, 120), interpolation=cv2.INTER_AREA)
    assert np.abs(out.astype(int) - ref).mean() <= 2.0


def test_center_crop_then_resize_geometry() -> None:
    img = photo(200, 400)
    img[:, :100] = 0  # left and right quarters black: a center crop removes them
    img[:, 300:] = 0
    out = decode(transcode(jpeg(img), EncodeSpec(resize=50, center_crop=True)))
    assert out.shape == (50, 50, 3)
    assert out[:, :3].mean() > 40 and out[:, -3:].mean() > 40


def test_pass_through_returns_the_file_bytes() -> None:
    data = jpeg(photo())
    assert transcode(data, EncodeSpec(pass_through=True, resize=10)) is data


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (b"hello, not an image", "not an image: unknown file signature"),
        (jpeg(photo())[:2000], "truncated JPEG"),
        (png_header_only(100_000, 100_000), "100000x100000 = 10000000000 pixels is over"),
        (b"P6\n# no size\n", "corrupt PNM header"),
        (b"P6\n90000 90000\n255\n", "90000x90000 = 8100000000 pixels is over"),
        (b"\x00\x00\x00\x0cjP  \r\n\x87\n" + bytes(20), "no ihdr box"),
        (b"\xff\x4f\xff\x51" + bytes(30), "empty image area"),
    ],
)
def test_bad_inputs_are_refused_with_a_reason(data: bytes, reason: str) -> None:
    for spec in (EncodeSpec(), EncodeSpec(pass_through=True)):
        with pytest.raises(ImageError, match=reason):
            transcode(data, spec)


def test_pnm_and_jpeg2000_sizes_come_from_their_headers() -> None:
    """The formats DALI decodes besides JPEG and PNG whose headers give the size: PBM,
    PGM and PPM (binary and text, with comments) and JPEG 2000 (a JP2 file, and a bare
    codestream's SIZ marker)."""
    img = photo(37, 51)
    text = [cv2.IMWRITE_PXM_BINARY, 0]
    cases = [(".ppm", img, []), (".pgm", img[..., 0], []), (".pbm", img[..., 0], []),
             (".ppm", img, text), (".jp2", img, [])]  # fmt: skip
    for ext, pixels, flags in cases:
        data = cv2.imencode(ext, pixels, flags)[1].tobytes()
        info = sniff(data)
        assert (info.width, info.height) == (51, 37), (ext, flags)
        assert info.format == ("jpeg2000" if ext == ".jp2" else "pnm")
    assert sniff(b"P5\n# made by hand\n# two comments\n 640\t480 255\n").width == 640
    siz = b"\xff\x4f\xff\x51" + struct.pack(">HHIIII", 41, 0, 300, 200, 20, 10) + bytes(12)
    assert (sniff(siz).width, sniff(siz).height) == (280, 190)
    assert sniff(memoryview(cv2.imencode(".ppm", img)[1].tobytes())).width == 51


def test_jpeg_bomb_header_refused_before_decoding() -> None:
    data = bytearray(jpeg(photo(64, 64)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 60000, 60000)
    with pytest.raises(ImageError, match="60000x60000"):
        transcode(bytes(data), EncodeSpec(max_pixels=10_000_000))


def _pil_bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_conversions_to_3_channel_8_bit() -> None:
    rgb = photo(60, 80)[..., ::-1]
    cases = {
        "cmyk": _pil_bytes(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95),
        "gray": _pil_bytes(Image.fromarray(rgb).convert("L"), "JPEG", quality=95),
        "gif": _pil_bytes(Image.fromarray(rgb), "GIF"),
        "alpha": cv2.imencode(".png", np.dstack([rgb[..., ::-1], np.full((60, 80), 7, np.uint8)]))[
            1
        ].tobytes(),
        "16bit": cv2.imencode(".png", rgb[..., ::-1].astype(np.uint16) * 257)[1].tobytes(),
    }
    for name, data in cases.items():
        out = decode(transcode(data, EncodeSpec(encoding=".png")))
        assert out.shape == (60, 80, 3) and out.dtype == np.uint8, name
        if name in ("alpha", "16bit"):  # lossless sources keep their exact pixels
            np.testing.assert_array_equal(out, rgb[..., ::-1], err_msg=name)
        elif name == "gray":
            assert (out[..., 0] == out[..., 1]).all()
        else:
            assert np.abs(out.astype(int) - rgb[..., ::-1]).mean() < 12, name


def test_unchanged_colour_16_bit_to_jpeg_is_scaled_not_clipped() -> None:
    gray16 = np.full((20, 20), 32896, np.uint16)  # 128 * 257
    data = cv2.imencode(".png", gray16)[1].tobytes()
    out = decode(transcode(data, EncodeSpec(color=-1)))
    assert out.dtype == np.uint8 and abs(int(out.mean()) - 128) <= 1


def test_grayscale_mode() -> None:
    out = decode(transcode(jpeg(photo()), EncodeSpec(color=0, resize=30)))
    assert out.shape == (30, 40)


def test_spec_validation() -> None:
    for bad in (
        {"resize": -1},
        {"encoding": ".bmp"},
        {"quality": 0},
        {"color": 2},
        {"max_pixels": 0},
    ):
        with pytest.raises(ValueError):
            EncodeSpec(**bad)


def test_exif_rotated_jpeg_is_packed_upright_with_im2rec_size() -> None:
    """OpenCV applies the EXIF orientation when decoding; the pack keeps that upright view."""
    im = Image.fromarray(photo(300, 400)[..., ::-1])
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = _pil_bytes(im, "JPEG", quality=95, exif=exif.tobytes())
    assert sniff(data).width == 400
    for resize in (100, 37):  # without and with reduced decoding
        out = decode(transcode(data, EncodeSpec(resize=resize)))
        assert out.shape == (400 * resize // 300, resize, 3)


def test_trailing_bytes_after_the_image_are_not_truncation() -> None:
    """Camera trailers and motion-photo videos follow the end marker: still whole images."""
    img = photo(60, 80)
    for data in (jpeg(img), cv2.imencode(".png", img)[1].tobytes()):
        padded = data + b"\x00ftypmp42" + bytes(range(256)) * 40
        for spec in (EncodeSpec(pass_through=True), EncodeSpec(encoding=".png")):
            out = transcode(padded, spec)
            assert out is padded or decode(out).shape == (60, 80, 3)
        with pytest.raises(ImageError, match="truncated"):
            transcode(data[: len(data) * 2 // 3], EncodeSpec(pass_through=True))
