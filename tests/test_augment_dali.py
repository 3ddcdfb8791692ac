"""The DALI backend executes the AugmentSpec with gpurec's draws (gpurec.draws).

DALI runs in its CPU mode. Each configuration is checked against a NumPy/OpenCV
reference made here from the same draws: the composed geometry (``Geometry.matrix``)
with one ``cv2.warpAffine`` (MXNet's steps one by one where padding meets a warp: the
canvas clips the warped image, the padding is fill), then the colour steps with OpenCV
(HLS through ``cv2.cvtColor``), normalisation and mirror (MXNet subtracts the mean image
from the unmirrored pixel). DALI resamples step by step where MXNet does (resize, warp,
window), antialiased on shrinks; the reference resamples once, so the images are smooth
and the bounds say how far resamplers may differ. The same configurations are compared
with the CPU backend as well.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("nvidia.dali")

import gpurec
from gpurec.augment import AugmentSpec
from gpurec.backends import dali_graph
from gpurec.draws import colour, draw, geometry

SHAPE = (3, 40, 48)
BATCH = 6


def smooth_image(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """An RGB image of smooth colour fields (so that resamplers agree closely)."""
    grid = rng.uniform(0, 255, (4, 5, 3)).astype(np.float32)
    image = cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    """12 PNG records of several sizes (some smaller than the output); label = index."""
    from gpurec.recordio import IRHeader, RecordWriter, pack

    rng = np.random.default_rng(5)
    sizes = [(64, 50), (90, 70), (70, 96), (120, 80), (40, 30), (56, 44),
             (100, 100), (80, 61), (49, 41), (130, 90), (60, 110), (72, 54)]  # fmt: skip
    images = [smooth_image(rng, w, h) for w, h in sizes]
    rec = tmp_path_factory.mktemp("aug") / "smooth.rec"
    with RecordWriter(rec, rec.with_suffix(".idx")) as writer:
        for i, image in enumerate(images):
            data = cv2.imencode(".png", image[:, :, ::-1])[1].tobytes()
            writer.write(pack(IRHeader(0, float(i), i, 0), data), key=i)
    return rec, images


def mxnet_steps(spec: AugmentSpec, geo, image: np.ndarray) -> np.ndarray:
    """MXNet's geometric steps one by one with OpenCV (uint8 between steps, as MXNet):
    resize, warp onto the canvas, pad with fill, enlarge, window, resize of the window."""
    fill = (spec.fill_value,) * 3
    img = image
    if geo.resized is not None:
        img = cv2.resize(img, geo.resized, interpolation=geo.interps["resize"])
    if geo.warp is not None:
        img = cv2.warpAffine(img, geo.warp, geo.canvas, flags=geo.interps["warp"],
                             borderMode=cv2.BORDER_CONSTANT, borderValue=fill)  # fmt: skip
    if geo.pad:
        p = geo.pad
        img = cv2.copyMakeBorder(img, p, p, p, p, cv2.BORDER_CONSTANT, value=fill)
    if geo.enlarged is not None:
        img = cv2.resize(img, geo.enlarged, interpolation=geo.interps["enlarge"])
    x, y, w, h = geo.window
    img = img[y : y + h, x : x + w]
    if geo.resize_window:
        img = cv2.resize(img, (spec.width, spec.height), interpolation=geo.interps["window"])
    return img


def reference_pixels(spec: AugmentSpec, d, k: int, image: np.ndarray) -> np.ndarray:
    """Image ``k``'s pixels (HWC, RGB, float32 on 0..255, before normalising and
    mirroring) made with OpenCV from the draws: composed warp (MXNet's steps when padding
    meets a warp), colour, HLS, PCA."""
    h, w = image.shape[:2]
    geo = geometry(spec, d, k, w, h)
    flags = cv2.INTER_NEAREST if spec.interp == "nearest" else cv2.INTER_LINEAR
    fill = (spec.fill_value,) * 3
    if geo.pad and geo.warp is not None:  # one warp cannot clip at MXNet's canvas
        out = mxnet_steps(spec, geo, image).astype(np.float32)
    else:
        size = (spec.width, spec.height)
        out = cv2.warpAffine(image.astype(np.float32), geo.matrix, size, flags=flags,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=fill)  # fmt: skip
        out = np.clip(np.rint(out), 0, 255)
    steps = colour(spec, d, k)
    if steps.matrix is not None:
        gray = float((out @ np.array([0.299, 0.587, 0.114])).mean())
        out = np.clip(np.rint(out @ steps.matrix.T.astype(np.float64) + steps.gray * gray), 0, 255)
    out = out.astype(np.uint8)
    if steps.hsl is not None:
        hls = cv2.cvtColor(out, cv2.COLOR_RGB2HLS).astype(np.int32) + steps.hsl
        hls = np.clip(hls, 0, (180, 255, 255)).astype(np.uint8)
        out = cv2.cvtColor(hls, cv2.COLOR_HLS2RGB)
    if steps.pca is not None:
        out = np.clip(np.floor(out + steps.pca), 0, 255).astype(np.uint8)
    return out.astype(np.float32)


def round_half_away(values) -> np.ndarray:
    """C's std::round, MXNet's rounding of the int8 mean (NumPy rounds halves to even)."""
    values = np.asarray(values, np.float64)
    return np.sign(values) * np.floor(np.abs(values) + 0.5)


def normalise(spec: AugmentSpec, d, k: int, pixels: np.ndarray) -> np.ndarray:
    """MXNet's normaliser on unmirrored HWC pixels, then the mirror (MXNet subtracts
    ``meanimg[c][i][j]`` from pixel (i, j) and writes the result mirrored), then the
    spec's layout (float32 or int)."""
    if spec.dtype == "uint8":
        out = pixels
    elif spec.dtype == "int8":
        mean = spec.mean_image.transpose(1, 2, 0) if spec.mean_image is not None else spec.mean
        out = np.clip(pixels - round_half_away(mean), -128, 127)
    else:
        mean = spec.mean_image.transpose(1, 2, 0) if spec.mean_image is not None else (
            np.array(spec.mean, np.float32))  # fmt: skip
        out = (pixels - mean) * d.mult[k] + d.bias[k]
    if d.mirror[k]:
        out = out[:, ::-1]
    return out.transpose(2, 0, 1) if spec.layout == "NCHW" else out


def run_backend(rec: Path, backend: str, **options) -> list[tuple[np.ndarray, np.ndarray]]:
    pipe = gpurec.Pipeline(rec, BATCH, SHAPE, device="cpu", backend=backend, shuffle=False,
                           seed=3, num_threads=2, **options)  # fmt: skip
    try:
        return [(np.array(data), np.array(label)) for data, label in pipe]
    finally:
        pipe.close()


def compare(rec: Path, images: list[np.ndarray], **options):
    """DALI's batches and the reference: (labels equal, |diff| in 0..255 pixel units)."""
    spec = AugmentSpec(data_shape=SHAPE, **options)
    batches = run_backend(rec, "dali", **options)
    diffs = []
    for b, (data, label) in enumerate(batches):
        d = draw(spec, (3, 0, b, 1), len(label))
        for k in range(len(label)):
            pixels = reference_pixels(spec, d, k, images[int(label[k])])
            want = normalise(spec, d, k, pixels)
            got = data[k].astype(np.float32)
            unit = np.abs(d.mult[k]).min() if spec.dtype in ("float32", "float16") else 1.0
            diffs.append(np.abs(got - want).ravel() / unit)
    labels = np.concatenate([label for _, label in batches])
    assert np.array_equal(labels, np.arange(12, dtype=np.float32))
    diff = np.concatenate(diffs)
    return float(diff.mean()), float(np.percentile(diff, 99)), batches


# (options, bound on the mean |diff|, bound on its 99th percentile), in pixel units.
CASES = {
    "eval-resize-center": (dict(train=False, resize=52), 0.6, 3.0),
    "seed-like": (
        dict(
            crop="random",
            resize=60,
            rand_mirror=True,
            max_rotate_angle=50,
            max_shear_ratio=0.5,
            fill_value=255,
        ),
        1.0,
        8.0,
    ),
    "random-resized": (dict(crop="random_resized", min_random_area=0.3), 0.8, 4.0),
    "crop-sizes": (dict(crop="random", min_crop_size=30, max_crop_size=44, resize=0), 0.8, 4.0),
    "pad": (dict(crop="random", pad=6, resize=0, fill_value=200), 0.3, 2.0),
    # Padding around a warped canvas: the band is fill, the warped corners that reach past
    # MXNet's canvas are clipped (before the fix the band showed them: p99 58..184).
    "pad-rotate-random": (
        dict(crop="random", resize=40, max_rotate_angle=45, pad=6, fill_value=255),
        0.5,
        3.0,
    ),
    "pad-rotate-center": (
        dict(crop="center", resize=44, rotate=30, pad=5, fill_value=255, train=False),
        0.5,
        3.0,
    ),
    "pad-rotate-enlarge": (  # padded canvas 28 + 2 * 4 on the short side: enlarged to 40
        dict(crop="center", resize=28, rotate=20, pad=4, fill_value=255, train=False),
        0.5,
        3.0,
    ),
    "pad-rotate-random-resized": (
        dict(
            crop="random_resized", max_rotate_angle=45, pad=8, fill_value=255, min_random_area=0.5
        ),
        0.5,
        3.0,
    ),
    "pad-rotate-crop-sizes": (
        dict(
            crop="random",
            resize=48,
            max_rotate_angle=45,
            pad=8,
            fill_value=255,
            min_crop_size=36,
            max_crop_size=48,
        ),
        0.5,
        3.0,
    ),
    "pad-shear-scale": (
        dict(
            crop="random",
            resize=44,
            max_shear_ratio=0.3,
            min_random_scale=0.8,
            max_random_scale=1.2,
            pad=5,
            fill_value=0,
        ),
        0.5,
        3.0,
    ),
    "colour": (dict(crop="center", brightness=0.4, contrast=0.4, saturation=0.4), 0.6, 3.0),
    "hsl": (dict(crop="center", random_h=20, random_s=30, random_l=30), 0.8, 4.0),
    "pca": (dict(crop="center", pca_noise=0.1), 0.6, 3.0),
    "normaliser-jitter": (
        dict(
            crop="center",
            mean=(120, 110, 100),
            std=(60, 50, 55),
            scale=0.5,
            max_random_contrast=0.3,
            max_random_illumination=20,
        ),
        0.6,
        3.0,
    ),
    "int8": (
        dict(crop="center", mean=(120.4, 110.6, 100.0), dtype="int8", layout="NHWC"),
        0.6,
        3.0,
    ),
    "uint8": (dict(crop="center", dtype="uint8", mirror=True), 0.6, 3.0),
    "float16": (
        dict(crop="center", mean=(120, 110, 100), std=(60, 50, 55), dtype="float16"),
        0.6,
        3.0,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_dali_matches_reference(shard, name):
    rec, images = shard
    options, mean_bound, p99_bound = CASES[name]
    mean, p99, _ = compare(rec, images, **options)
    assert mean <= mean_bound and p99 <= p99_bound, (name, mean, p99)


def tie_mean_image(seed: int) -> np.ndarray:
    """A mean image (3, H, W) of smooth values whose int8 rounding is at stake: a third of
    them exact halves (.5, where round-half-even and C's std::round differ), and a ramp
    along the width so that a mirror applied before the subtraction shows."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(80, 160, SHAPE).astype(np.float32)
    base += np.linspace(-40, 40, SHAPE[2], dtype=np.float32)[None, None, :]
    halves = rng.random(SHAPE) < 1 / 3
    return np.where(halves, np.floor(base) + 0.5, base).astype(np.float32)


MEAN_IMAGE_CASES = {
    "float32-train-default": dict(std=(50, 60, 70)),  # rand_mirror follows train
    "float32-mirror": dict(std=(50, 60, 70), mirror=True),
    "float32-rand-mirror-nhwc": dict(std=(50, 60, 70), rand_mirror=True, layout="NHWC"),
    "float32-jitter-rand-mirror": dict(
        rand_mirror=True, max_random_contrast=0.3, max_random_illumination=20
    ),
    "int8-rand-mirror": dict(dtype="int8", rand_mirror=True),
    "int8-mirror-nhwc": dict(dtype="int8", mirror=True, layout="NHWC"),
}


@pytest.mark.parametrize("name", list(MEAN_IMAGE_CASES))
def test_mean_image(shard, name):
    """mean_image against the reference (subtracted from the unmirrored pixel, mirrored
    after) and the CPU backend. Before the fix DALI mirrored first: the mirrored images
    were off by the mean image's left-right difference (up to 80 levels)."""
    rec, images = shard
    options = dict(crop="center", mean_image=tie_mean_image(2), **MEAN_IMAGE_CASES[name])
    mean, p99, batches = compare(rec, images, **options)
    assert mean <= 0.6 and p99 <= 3.0, (name, mean, p99)
    spec = AugmentSpec(data_shape=SHAPE, **options)
    cpu = run_backend(rec, "cpu", **options)
    for b, ((a, la), (c, lc)) in enumerate(zip(batches, cpu, strict=True)):
        assert np.array_equal(la, lc)
        d = draw(spec, (3, 0, b, 1), len(la))
        assert d.mirror.any() or not (spec.rand_mirror or spec.mirror)
        unit = np.abs(d.mult).min() if spec.dtype == "float32" else 1.0
        diff = np.abs(a.astype(np.float32) - c.astype(np.float32)) / unit
        assert diff.mean() <= 1.2 and np.percentile(diff, 99) <= 6.0, (name, b, diff.mean())


@pytest.mark.parametrize("dtype", ["float32", "int8"])
@pytest.mark.parametrize("mean_kind", ["mean", "mean_image"])
def test_normalise_is_mxnet_arithmetic(shard, dtype, mean_kind):
    """DALI's normalised output against its own uint8 output (same draws, so the same
    pixels) with MXNet's arithmetic, exactly: float32 ``(x - mean) * mult + bias`` on the
    unmirrored pixel, then mirrored; int8 ``saturate(x - std::round(mean))`` with halves
    rounded away from zero (the mean's .5 values: 120.5 -> 121, not 120)."""
    rec, _ = shard
    common = dict(crop="center", resize=44, rand_mirror=True, layout="NCHW")
    if mean_kind == "mean":
        extra = dict(mean=(120.5, 121.5, 0.5 if dtype == "float32" else 124.5))
        mean = np.array(extra["mean"], np.float32)[:, None, None] * np.ones(SHAPE, np.float32)
    else:
        mean = tie_mean_image(4)
        extra = dict(mean_image=mean)
    if dtype == "float32":
        extra.update(std=(50, 60, 70), max_random_contrast=0.2, max_random_illumination=10)
    spec = AugmentSpec(data_shape=SHAPE, dtype=dtype, **common, **extra)
    pixels = run_backend(rec, "dali", dtype="uint8", **common)
    normalised = run_backend(rec, "dali", dtype=dtype, **common, **extra)
    mirrored = 0
    for b, ((x, lx), (y, ly)) in enumerate(zip(pixels, normalised, strict=True)):
        assert np.array_equal(lx, ly)
        d = draw(spec, (3, 0, b, 1), len(lx))
        for k in range(len(lx)):
            m = mean[:, :, ::-1] if d.mirror[k] else mean  # the mean at the mirrored place
            if dtype == "int8":
                want = np.clip(x[k].astype(np.float32) - round_half_away(m), -128, 127)
                assert np.array_equal(y[k].astype(np.float32), want), (b, k)
            else:
                mult, bias = d.mult[k][:, None, None], d.bias[k][:, None, None]
                want = (x[k].astype(np.float32) - m) * mult + bias
                np.testing.assert_allclose(y[k], want, rtol=1e-5, atol=1e-4)
            mirrored += bool(d.mirror[k])
    assert 0 < mirrored < sum(len(lx) for _, lx in pixels)


def test_hls_jitter_matches_opencv():
    """The HLS round trip in DALI arithmetic against cv2.cvtColor on random pixels (every
    hue sector, grays, the clamps at 0 and 180/255)."""
    from nvidia.dali import fn, pipeline_def, types

    rng = np.random.default_rng(7)
    images = [rng.integers(0, 256, (64, 64, 3), np.uint8) for _ in range(4)]
    images[1][:8] = images[1][:8, :, :1]  # grays
    offsets = np.array([[0, 0, 0], [17, -30, 25], [-90, 100, -100], [179, -255, 255]], np.float32)

    @pipeline_def(batch_size=4, num_threads=1, device_id=None)
    def hls():
        x = fn.external_source(name="x", dtype=types.UINT8, ndim=3, layout="HWC")
        o = fn.external_source(name="o", dtype=types.FLOAT, ndim=1)
        return dali_graph._hls_jitter(fn, types, x, o)

    pipe = hls()
    pipe.build()
    pipe.feed_input("x", images)
    pipe.feed_input("o", offsets)
    (out,) = pipe.run()
    diffs = []
    for k, image in enumerate(images):
        h = cv2.cvtColor(image, cv2.COLOR_RGB2HLS).astype(np.int32) + offsets[k].astype(int)
        want = cv2.cvtColor(np.clip(h, 0, (180, 255, 255)).astype(np.uint8), cv2.COLOR_HLS2RGB)
        diffs.append(np.abs(out.at(k).astype(int) - want).ravel())
    diff = np.concatenate(diffs)
    # Measured: 99.998 % of the values exact, the rest off by up to 4 (a hue rounded the
    # other way: one step of 2 degrees). OpenCV's SIMD paths round a few values differently
    # from its scalar formulas, which the DALI version follows.
    assert (diff == 0).mean() >= 0.9995 and diff.max() <= 8, ((diff == 0).mean(), diff.max())


def test_roi_decoding_equals_whole_image(shard):
    """The decoded slice (ROI decoding) plus its margin gives the pixels the whole decoded
    image gives: the same graph fed the whole image as its "slice"."""
    from nvidia.dali import fn, pipeline_def, types

    _, images = shard
    spec = AugmentSpec(data_shape=SHAPE, crop="random_resized", min_random_area=0.1)
    payloads = [np.frombuffer(cv2.imencode(".jpg", im[:, :, ::-1])[1].tobytes(), np.uint8)
                for im in images]  # fmt: skip
    sizes = np.array([(im.shape[1], im.shape[0]) for im in images])
    d = draw(spec, (1, 2, 3), len(images))
    sliced = dali_graph.parameters(spec, d, sizes)
    whole = dict(sliced)
    offset = sliced[dali_graph.SLICE_START].astype(np.float32)
    whole[dali_graph.ROI_START] = sliced[dali_graph.ROI_START] + offset
    whole[dali_graph.ROI_END] = sliced[dali_graph.ROI_END] + offset
    whole[dali_graph.SLICE_START] = np.zeros_like(sliced[dali_graph.SLICE_START])
    whole[dali_graph.SLICE_SHAPE] = sizes[:, ::-1].astype(np.int32)
    assert (sliced[dali_graph.SLICE_SHAPE] < whole[dali_graph.SLICE_SHAPE]).any()

    @pipeline_def(batch_size=len(images), num_threads=1, device_id=None)
    def pipe_def():
        return dali_graph.graph(fn, types, spec, device="cpu")

    outs = []
    for params in (sliced, whole):
        pipe = pipe_def()
        pipe.build()
        pipe.feed_input(dali_graph.INPUT, payloads)
        for name, values in params.items():
            pipe.feed_input(name, values)
        outs.append(pipe.run()[0].as_array())
    diff = np.abs(outs[0] - outs[1])
    assert diff.max() <= 1.0, diff.max()  # libjpeg's partial decode: at most a rounding


# The other pad + warp cases differ from the CPU backend along the canvas edge where the
# window is resized or enlarged (the CPU backend's one warp cuts the padding with a hard
# mask, MXNet's resize blends it): against the reference only.
CROSS = ["eval-resize-center", "seed-like", "random-resized", "pad", "pad-rotate-random",
         "pad-rotate-center", "pad-shear-scale", "colour", "hsl", "pca", "normaliser-jitter",
         "int8"]  # fmt: skip


@pytest.mark.parametrize("name", CROSS)
def test_dali_matches_cpu_backend(shard, name):
    """Same seed, same records, same draws: the two backends agree up to resamplers."""
    rec, _ = shard
    options, mean_bound, p99_bound = CASES[name]
    spec = AugmentSpec(data_shape=SHAPE, **options)
    dali = run_backend(rec, "dali", **options)
    cpu = run_backend(rec, "cpu", **options)
    assert len(dali) == len(cpu)
    diffs = []
    for b, ((a, la), (c, lc)) in enumerate(zip(dali, cpu, strict=True)):
        assert np.array_equal(la, lc)
        d = draw(spec, (3, 0, b, 1), len(la))
        unit = np.abs(d.mult).min(axis=1) if spec.dtype in ("float32", "float16") else np.ones(
            len(la))  # fmt: skip
        diffs.append((np.abs(a.astype(np.float32) - c.astype(np.float32))
                      / unit.reshape(-1, 1, 1, 1)).ravel())  # fmt: skip
    diff = np.concatenate(diffs)
    mean, p99 = float(diff.mean()), float(np.percentile(diff, 99))
    assert mean <= 2 * mean_bound and p99 <= 2 * p99_bound, (name, mean, p99)
