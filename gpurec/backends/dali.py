"""The DALI backend: gpurec reads, DALI decodes (nvJPEG on the GPU, or DALI's CPU mode).

:func:`graph` is the whole data path, written once. ``device="gpu"`` and ``"cpu"``
differ in one string (the decoders' ``"mixed"`` or ``"cpu"``): every later operator
runs where its input lives, so on the GPU everything after decoding stays there.
The graph has no random operator: every random number is gpurec's (:mod:`gpurec.draws`,
from seed, epoch and batch), turned per image into DALI's arguments (ROI, warp matrix,
colour matrix, offsets, mirror flag, normalisation) by :func:`parameters` in the reader
thread, from the image's size in its header, and fed beside the encoded images. So both
backends apply the same windows, matrices and factors to the same records.

Records come from gpurec, not from a DALI reader: the order (:mod:`gpurec.order`) and
the bytes (:class:`gpurec.dataset.Dataset`) are the ones the CPU backend uses, so both
backends hand out the same records in the same order. The encoded images of a batch go
in through ``fn.external_source`` (``feed_input``, one uint8 array per record), each
parameter through one of its own (names: the module constants, :func:`inputs`); the
labels never enter DALI: they travel beside the batch in a queue. A GIF record, or one
of a signature gpurec does not know (DALI cannot decode them; OpenCV, and so MXNet and
the CPU backend, can), is decoded with OpenCV in the reader thread and fed as a BMP
(:func:`encoded_for_dali`).

Prefetching: a reader thread reads, unpacks and checks (:func:`gpurec.transcode.sniff`)
the next batches while DALI decodes the ``prefetch`` batches fed to it; the stream of
batches runs on into the next epoch, so DALI stays busy across epoch boundaries. When an
``iter()`` asks for other batches than the ones in flight (an abandoned epoch, a
checkpoint loaded), the pipeline is rebuilt from DALI's checkpoint taken after the last
batch handed out. With no random operator in the graph that checkpoint holds no random
state (the draws follow from the batch's place), so a resumed run hands out exactly the
batches an uninterrupted one does; the machinery stays for DALI's own state.

Bad records: one whose bytes are not an image (or whose record or label is malformed)
is found before it is fed; one that passes that check but fails in the decoder makes
DALI's run fail, after which the batch's records are decoded one by one through the same
graph to find it, and the pipeline is rebuilt from the last checkpoint. With
``on_error="skip"`` a bad record is replaced by a good one of its batch, augmented with
the failed position's own draws (as the CPU backend does, so labels and images agree),
and counted in ``pipe.skipped``; with
``"raise"`` the error names shard, record and byte offset. Either way the Pipeline
stays usable.

DALI recycles its output buffers on the next run, so every batch is copied into an
array the caller owns (``as_array`` on the CPU; on the GPU ``copy_to_external`` into a
new CuPy array, stream-ordered, device to device).
"""

from __future__ import annotations

import ctypes
import os
import weakref
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

from gpurec.augment import AugmentSpec
from gpurec.backends.common import label_of, reusable, stand_in_candidates
from gpurec.backends.common import round_half_away as _round_half_away
from gpurec.backends.common import staged as _staged
from gpurec.draws import INTERP_CODES, LUMA, Draws, geometry, jitter_matrices
from gpurec.recordio import RecordIOError, unpack_view
from gpurec.transcode import ImageError, UnknownImage, sniff

if TYPE_CHECKING:
    from gpurec.order import Plan
    from gpurec.pipeline import Pipeline


# Formats OpenCV decodes and DALI's decoders do not: GIF (MXNet's OpenCV decoded it too),
# and signatures sniff does not know (Sun raster, PFM, HDR...). Such a record is decoded
# here, as the OpenCV backend decodes it, and fed to DALI as a BMP (lossless, and written
# in the time of a copy), so both backends hand out the same pixels.
_DECODED_HERE = ("gif",)
_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION  # MXNet ignores EXIF orientation


def encoded_for_dali(payload: bytes | memoryview) -> tuple[np.ndarray, tuple[int, int]]:
    """What DALI is fed for a record's image, and the image's (width, height) as decoded
    without EXIF orientation: the record's own bytes (no copy) and the size its header
    gives (JPEG, PNG, PNM, JPEG 2000); for BMP, TIFF and WebP the record's bytes and the
    size from decoding them once with OpenCV; for GIF and unknown signatures a BMP of
    OpenCV's decoding. Raises ImageError, worded as the CPU backend words it."""
    info = unknown = None
    try:
        info = sniff(payload)
        if info.format not in _DECODED_HERE and info.width and info.height:
            return np.frombuffer(payload, np.uint8), (info.width, info.height)
    except UnknownImage as exc:
        unknown = exc
    except ImageError as exc:  # a known format, broken (cut short...)
        raise ImageError(f"cannot decode image: {exc}") from None
    try:
        image = cv2.imdecode(np.frombuffer(payload, np.uint8), _FLAGS)
    except cv2.error:
        image = None
    if image is None:
        if unknown is not None:
            raise ImageError(f"cannot decode image: {unknown}")
        raise ImageError(f"cannot decode image ({info.format})")
    size = (image.shape[1], image.shape[0])
    if info is None or info.format in _DECODED_HERE:
        bmp = cv2.imencode(".bmp", image)[1]  # (a level-1 PNG would take ~10 ms)
        return bmp.reshape(-1), size
    return np.frombuffer(payload, np.uint8), size


__all__ = ["INPUT", "DALIBackend", "graph", "inputs", "parameters"]

INPUT = "encoded"  # the external_source the encoded images are fed to
# The per-sample parameters gpurec computes from its draws (gpurec.draws) and feeds beside
# the encoded images, one external_source each; `inputs(spec)` says which a graph has.
SLICE_START = "slice_start"  # int32 (y, x): the part of the image decoded (ROI decoding)
SLICE_SHAPE = "slice_shape"  # int32 (h, w)
RESIZED = "resized"  # float32 (h, w): step 1's size (the warp path)
RESIZE_INTERP = "resize_interp"  # int32 DALIInterpType of step 1
WARP = "warp"  # float32 2x3: destination-to-source map of the warp (DALI's pixel corners)
# float32 (h, w): the warp's output size: the output when the whole geometry is one warp,
# else (staged, see _staged) MXNet's canvas before padding, which the padding surrounds
CANVAS = "canvas"
ROI_START = "roi_start"  # float32 (y, x): the region resampled to the output
ROI_END = "roi_end"  # float32 (y, x)
INTERP = "interp"  # int32 DALIInterpType of the last resampling
COLOUR = "colour"  # float32 3x3: row j is column j of the colour matrix
GRAY = "gray"  # float32 (3,): coefficient of the mean gray
HSL = "hsl"  # float32 (3,): H, L, S offsets
PCA = "pca"  # float32 (3,): RGB offsets
MIRROR = "mirror"  # int32: flip horizontally
MEAN = "mean"  # float32 (3,): crop_mirror_normalize's mean, from the draws' mult and bias
STD = "std"  # float32 (3,)
MULT = "mult"  # float32 (3,1,1) or (1,1,3): with mean_image, the multiplier in the layout
BIAS = "bias"  # float32, same shape: with mean_image, the offset

# DALI pipelines alive in this process. A forked child (a DataLoader worker, a
# multiprocessing pool) inherits them without the threads they wait for: destroying one
# there, as the child's garbage collector may, hangs forever. The child keeps them.
_LIVE: weakref.WeakSet = weakref.WeakSet()
_INHERITED: list = []


def _keep_inherited_pipelines() -> None:
    _INHERITED.extend(_LIVE)  # never destroyed: multiprocessing children end in os._exit


os.register_at_fork(after_in_child=_keep_inherited_pipelines)

# cv2 interpolation code (NEAREST, LINEAR, CUBIC, AREA, LANCZOS4) -> DALIInterpType value
# (INTERP_NN, INTERP_LINEAR, INTERP_CUBIC, INTERP_LINEAR + antialias, INTERP_LANCZOS3).
_DALI_INTERP = np.array([0, 1, 2, 1, 3], np.int32)
# Pixels each side of a decoded slice beyond the region resampled, per unit of
# max(1, 1 / scale): the widest filter (Lanczos3, antialiased) reaches 3 of them.
_SLICE_MARGIN = 3
# Pixel centres (OpenCV, gpurec.draws) to pixel corners (DALI): x_corner = x_centre + 0.5.
_CORNER = np.array([[1.0, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])


def _warped(spec: AugmentSpec) -> bool:
    """Whether the graph warps (pre-crop affine or padding, both filled with
    ``fill_value``): else the output is a resized region inside the source."""
    return spec.affine or spec.pad > 0


def _antialias(spec: AugmentSpec) -> bool:
    """DALI's ``antialias`` is one flag per operator, OpenCV's INTER_AREA a per-image
    choice: on for ``"area"`` and ``"auto"`` (whose shrinks are INTER_AREA), off for the
    others. ``"random"`` resamples its INTER_AREA images (one in five) as plain linear:
    the flag on would instead antialias the linear, cubic and Lanczos ones (three in
    five), which OpenCV does not."""
    return spec.interp in ("area", "auto")


def _interp_per_image(spec: AugmentSpec) -> bool:
    """Whether the interpolation varies from image to image (``"auto"`` chooses by the
    change of size, ``"random"`` draws): then it is fed, else it is a constant of the
    graph (cheaper: no per-sample argument)."""
    return spec.interp in ("auto", "random")


def _jittered(spec: AugmentSpec) -> bool:
    """Whether the normalisation varies from image to image (MXNet's normaliser jitter):
    then it is fed, else crop_mirror_normalize gets constants."""
    return spec.jitters_normalisation


def inputs(spec: AugmentSpec) -> tuple[str, ...]:
    """The names of the parameter inputs :func:`graph` has for ``spec`` (beside INPUT)."""
    names: list[str] = []
    per_image = _interp_per_image(spec)
    if _warped(spec):
        if spec.resize:
            names += [RESIZED, RESIZE_INTERP] if per_image else [RESIZED]
        if _staged(spec):  # warp (if any) onto the canvas, pad, resample the window
            names += [WARP, CANVAS] if spec.affine else [CANVAS]
            names += [ROI_START, ROI_END, INTERP] if per_image else [ROI_START, ROI_END]
        else:  # one warp to the output
            names += [WARP, CANVAS]
    else:
        names += [SLICE_START, SLICE_SHAPE, ROI_START, ROI_END]
        names += [INTERP] if per_image else []
    if spec.color_jitter:
        names += [COLOUR, GRAY]
    if spec.hsl_jitter:
        names.append(HSL)
    if spec.pca_noise:
        names.append(PCA)
    if spec.rand_mirror:
        names.append(MIRROR)
    if spec.mean_image is not None:
        if spec.dtype != "int8":
            names += [MULT, BIAS]
    elif spec.dtype in ("float32", "float16") and _jittered(spec):
        names += [MEAN, STD]
    return tuple(names)


def _axis_window(m: np.ndarray, width: int, height: int) -> np.ndarray:
    """``(..., 4)``: (y0, x0, y1, x1) in pixel-corner coordinates of the region each
    axis-aligned forward map of ``m`` (``(..., 2 or 3, 3)``, pixel centres) sends onto a
    ``width`` x ``height`` output (the order of DALI's ROI arguments)."""
    px, py = 1.0 / m[..., 0, 0], 1.0 / m[..., 1, 1]
    x0 = (-0.5 - m[..., 0, 2]) * px + 0.5
    y0 = (-0.5 - m[..., 1, 2]) * py + 0.5
    return np.stack([y0, x0, y0 + height * py, x0 + width * px], axis=-1)


def parameters(spec: AugmentSpec, d: Draws, sizes: np.ndarray) -> dict[str, np.ndarray]:
    """The per-sample arrays :func:`graph` takes for images of ``sizes`` (``(n, 2)``:
    decoded width, height) augmented with draws ``d``: one array per name of
    :func:`inputs`, the batch along the first axis. The geometry is gpurec.draws'
    (MXNet's steps) turned into DALI's arguments; the colour and normalisation arrays are
    built for the whole batch at once."""
    n = len(sizes)
    out: dict[str, np.ndarray] = {}
    names = inputs(spec)
    out_w, out_h = spec.width, spec.height
    roi = np.empty((n, 4), np.float64)  # y0, x0, y1, x1
    interp = np.empty(n, np.int32)
    if _warped(spec):
        warp = np.empty((n, 2, 3), np.float32)
        canvas = np.empty((n, 2), np.float32)
        resized = np.empty((n, 2), np.float32)
        resize_interp = np.empty(n, np.int32)
        staged = _staged(spec)
        # 3x3 maps of the whole batch, inverted together (one call, not one per image)
        first = np.tile(np.eye(3), (n, 1, 1))  # source -> step 1's image
        total = np.tile(np.eye(3), (n, 1, 1))  # source -> output
        fwd = np.tile(np.eye(3), (n, 1, 1))  # step 1's image -> the warp's output
        for k in range(n):
            geo = geometry(spec, d, k, int(sizes[k, 0]), int(sizes[k, 1]))
            if geo.resized is not None:
                w, h = geo.resized
                sx, sy = w / geo.source[0], h / geo.source[1]
                first[k, 0] = sx, 0, 0.5 * sx - 0.5
                first[k, 1] = 0, sy, 0.5 * sy - 0.5
                resized[k] = h, w
                resize_interp[k] = geo.interps["resize"]
            total[k, :2] = geo.matrix
            if staged:  # the warp onto MXNet's canvas; the graph pads it, then the window
                if geo.warp is not None:
                    fwd[k, :2] = geo.warp
                canvas[k] = geo.canvas[1], geo.canvas[0]
                interp[k] = geo.interps.get("window", geo.interps.get("enlarge", 1))
            else:  # everything after step 1 in one warp, straight to the output
                canvas[k] = out_h, out_w
        if staged:  # padded canvas -> output: the window (and enlargement) resampled
            pad = np.array([[1.0, 0, spec.pad], [0, 1, spec.pad], [0, 0, 1]])
            roi[:] = _axis_window(total @ np.linalg.inv(pad @ fwd @ first), out_w, out_h)
        else:
            fwd = total @ np.linalg.inv(first)
        warp[:] = np.linalg.inv(_CORNER @ fwd @ np.linalg.inv(_CORNER))[:, :2]
        out[CANVAS] = canvas
        if WARP in names:
            out[WARP] = warp
        if RESIZED in names:
            out[RESIZED] = resized
        if RESIZE_INTERP in names:
            out[RESIZE_INTERP] = _DALI_INTERP[resize_interp]
    else:
        matrices = np.empty((n, 2, 3))
        for k in range(n):
            geo = geometry(spec, d, k, int(sizes[k, 0]), int(sizes[k, 1]))
            matrices[k] = geo.matrix
            interp[k] = geo.interps["composed"]
        roi[:] = _axis_window(matrices, out_w, out_h)
        # Decode only the region and the reach of the resampling filter around it (ROI
        # decoding): the resize sees the same pixels as in the whole image.
        hw = sizes[:, ::-1].astype(np.float64)
        scale = np.array([out_h, out_w]) / np.maximum(roi[:, 2:] - roi[:, :2], 1e-9)
        margin = np.ceil(_SLICE_MARGIN * np.maximum(1.0, 1.0 / scale)) + 1
        lo = np.clip(np.floor(roi[:, :2] - margin), 0, hw - 1)
        hi = np.clip(np.ceil(roi[:, 2:] + margin), lo + 1, hw)
        out[SLICE_START] = lo.astype(np.int32)
        out[SLICE_SHAPE] = (hi - lo).astype(np.int32)
        roi[:, :2] -= lo
        roi[:, 2:] -= lo
    if ROI_START in names:
        out[ROI_START] = roi[:, :2].astype(np.float32)
        out[ROI_END] = roi[:, 2:].astype(np.float32)
    if INTERP in names:
        out[INTERP] = _DALI_INTERP[interp]
    if spec.color_jitter:
        matrix, out[GRAY] = jitter_matrices(d.jitter[:n])  # the CPU backend's colour()
        out[COLOUR] = np.ascontiguousarray(matrix.transpose(0, 2, 1))
    if spec.hsl_jitter:
        out[HSL] = d.hsl[:n].astype(np.float32)
    if spec.pca_noise:
        out[PCA] = np.ascontiguousarray(d.pca[:n], np.float32)
    if spec.rand_mirror:
        out[MIRROR] = d.mirror[:n].astype(np.int32)
    mult, bias = d.mult[:n], d.bias[:n]
    if MEAN in names:  # (x - mean) * mult + bias as crop_mirror_normalize's (x - m) / s
        out[MEAN] = (np.array(spec.mean, np.float32) - bias / mult).astype(np.float32)
        out[STD] = (1 / mult).astype(np.float32)
    if MULT in names:
        shape = (n, 3, 1, 1) if spec.layout == "NCHW" else (n, 1, 1, 3)
        out[MULT] = np.ascontiguousarray(mult.reshape(shape), np.float32)
        out[BIAS] = np.ascontiguousarray(bias.reshape(shape), np.float32)
    return out


def _round_even(fn, x):
    """OpenCV's cvRound (halves to even) in DALI arithmetic; DALI's casts round halves
    away from zero."""
    from nvidia.dali import math as dmath

    r = dmath.floor(x + 0.5)
    tie = (r - x) == 0.5
    odd = (r - 2 * dmath.floor(r * 0.5)) == 1
    return r - tie * odd


def _hls_jitter(fn, types, images, offsets):
    """OpenCV's 8-bit RGB -> HLS, ``offsets`` (H, L, S) added and clamped to 180, 255,
    255 as MXNet does, HLS -> RGB, in DALI arithmetic (there is no HLS operator); the
    formulas and roundings are OpenCV's ``RGB2HLS_f``/``HLS2RGB_f`` on values / 255."""
    from nvidia.dali import math as dmath

    x = images * (1 / 255)
    r, g, b = x[:, :, 0], x[:, :, 1], x[:, :, 2]
    vmax = dmath.max(dmath.max(r, g), b)
    vmin = dmath.min(dmath.min(r, g), b)
    diff = vmax - vmin
    light = (vmax + vmin) * 0.5
    chroma = diff > 1.1920929e-07  # FLT_EPSILON: else h = s = 0
    low = light < 0.5
    sat = chroma * diff / dmath.max(low * (vmax + vmin) + (1 - low) * (2 - vmax - vmin), 1e-7)
    k = 60 / dmath.max(diff, 1e-7)
    is_r = vmax == r
    is_g = (vmax == g) * (1 - is_r)
    is_b = 1 - is_r - is_g
    hue = is_r * ((g - b) * k) + is_g * ((b - r) * k + 120) + is_b * ((r - g) * k + 240)
    hue = chroma * (hue + (hue < 0) * 360)
    h8 = dmath.clamp(_round_even(fn, hue * 0.5) + offsets[0], 0, 180)
    l8 = dmath.clamp(_round_even(fn, light * 255) + offsets[1], 0, 255)
    s8 = dmath.clamp(_round_even(fn, sat * 255) + offsets[2], 0, 255)
    # HLS2RGB_f with hscale 6 / 180
    light, sat = l8 * (1 / 255), s8 * (1 / 255)
    p2 = (light <= 0.5) * (light * (1 + sat)) + (light > 0.5) * (light + sat - light * sat)
    p1 = 2 * light - p2
    h = h8 * (6 / 180)
    h = h - (h >= 6) * 6
    sector = dmath.floor(h)
    frac = h - sector
    tab = (p2, p1, p1 + (p2 - p1) * (1 - frac), p1 + (p2 - p1) * frac)
    sectors = ((1, 3, 0), (1, 0, 2), (3, 0, 1), (0, 2, 1), (0, 1, 3), (2, 1, 0))  # OpenCV's
    grey = s8 == 0
    channels = []
    for c in (2, 1, 0):  # sector_data gives B, G, R
        value = None
        for s, row in enumerate(sectors):
            term = (sector == s) * tab[row[c]]
            value = term if value is None else value + term
        channels.append(grey * light + (1 - grey) * value)
    rgb = fn.stack(*channels, axis=2)
    return fn.cast(_round_even(fn, rgb * 255), dtype=types.UINT8)


def graph(fn, types, spec: AugmentSpec, *, device: str, jpegs=None, params=None):
    """The DALI graph of :mod:`gpurec.augment`'s steps, with the parameters gpurec
    computed (:func:`parameters`); returns the images. Call inside a pipeline.

    ``jpegs``: the encoded images (default: an ``external_source`` named :data:`INPUT`,
    fed by gpurec; a benchmark may pass a DALI reader's output). ``params``: the
    parameter inputs by name (default: one ``external_source`` each, named as
    :func:`inputs` lists them). ``device``: ``"gpu"`` decodes with ``"mixed"`` and every
    later operator runs where its input lives; the parameters that enter arithmetic
    (colour) are moved beside the images.

    Geometry: without warp (no pre-crop affine, no padding) the output is a region of the
    source resampled once (``fn.resize`` with an absolute ROI: the sample positions of
    MXNet's "resize whole, crop window", one resampling instead of two), and only that
    region and its filter's reach are decoded (``decoders.image_slice``). With a warp:
    step 1's resize, then ``fn.warp_affine`` filled with ``fill_value`` (only nearest and
    linear exist there), straight to the output when the crop is of the data shape at
    native resolution and nothing is padded (one resampling); else MXNet's steps apart
    (:func:`_staged`): the warp onto MXNet's canvas, ``fn.slice`` pads it with
    ``fill_value`` (so the warped corners the canvas clipped stay out of the padding), and
    ``fn.resize`` resamples the window of the padded canvas (antialiased like INTER_AREA).
    Padding without an affine and without a resized window is a translation: one warp.

    Normalisation: ``crop_mirror_normalize`` (mirror included); with ``mean_image`` the
    image is normalised unmirrored and flipped last, as MXNet subtracts the mean image
    before it mirrors.
    """
    decoder = "mixed" if device == "gpu" else "cpu"  # the only device string
    names = inputs(spec)
    if params is None:
        params = {}
        for name in names:
            dtype = types.INT32 if name in (SLICE_START, SLICE_SHAPE, RESIZE_INTERP, INTERP,
                                            MIRROR) else types.FLOAT  # fmt: skip
            ndim = {MIRROR: 0, RESIZE_INTERP: 0, INTERP: 0, WARP: 2, COLOUR: 2, MULT: 3,
                    BIAS: 3}.get(name, 1)  # fmt: skip
            params[name] = fn.external_source(name=name, dtype=dtype, ndim=ndim)
    here = (lambda node: node.gpu()) if decoder == "mixed" else (lambda node: node)
    if jpegs is None:
        # no_copy: DALI reads gpurec's arrays in place (the backend keeps them alive)
        jpegs = fn.external_source(name=INPUT, dtype=types.UINT8, ndim=1, no_copy=True)
    h, w = spec.height, spec.width
    antialias = _antialias(spec)
    if _interp_per_image(spec):
        interp = lambda name: fn.cast(params[name], dtype=types.INTERP_TYPE)  # noqa: E731
    else:  # one interpolation for every image and step: a constant of the graph
        fixed = (types.INTERP_NN, types.INTERP_LINEAR, types.INTERP_CUBIC, types.INTERP_LINEAR,
                 types.INTERP_LANCZOS3)[INTERP_CODES[spec.interp]]  # fmt: skip
        interp = lambda name: fixed  # noqa: E731
    if _warped(spec):
        images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB,
                                   adjust_orientation=False)  # fmt: skip
        if spec.resize:
            images = fn.resize(images, size=params[RESIZED], interp_type=interp(RESIZE_INTERP),
                               antialias=antialias)  # fmt: skip
        if WARP in names:
            images = fn.warp_affine(
                images,
                matrix=params[WARP],
                size=params[CANVAS],
                fill_value=spec.fill_value,
                interp_type=types.INTERP_NN if spec.interp == "nearest" else types.INTERP_LINEAR,
            )
        if _staged(spec):
            if spec.pad:  # MXNet's padding around the canvas (which clipped the warp)
                p = spec.pad
                padded = fn.cast(params[CANVAS] + 2 * p, dtype=types.INT32)
                images = fn.slice(images, start=[-p, -p], shape=padded, axis_names="HW",
                                  out_of_bounds_policy="pad",
                                  fill_values=spec.fill_value)  # fmt: skip
            images = fn.resize(images, size=(h, w), roi_start=params[ROI_START],
                               roi_end=params[ROI_END], roi_relative=False,
                               interp_type=interp(INTERP), antialias=antialias)  # fmt: skip
    else:
        images = fn.decoders.image_slice(
            jpegs,
            device=decoder,
            output_type=types.RGB,
            adjust_orientation=False,
            start=params[SLICE_START],
            shape=params[SLICE_SHAPE],
            axis_names="HW",
        )
        images = fn.resize(images, size=(h, w), roi_start=params[ROI_START],
                           roi_end=params[ROI_END], roi_relative=False,
                           interp_type=interp(INTERP), antialias=antialias)  # fmt: skip
    if spec.color_jitter:  # out = M x + g * mean gray, rounded and saturated to uint8
        columns = here(params[COLOUR])
        mean = fn.reductions.mean(images, axes=(0, 1))
        gray = float(LUMA[0]) * mean[0] + float(LUMA[1]) * mean[1] + float(LUMA[2]) * mean[2]
        mixed = (images[:, :, 0:1] * columns[0] + images[:, :, 1:2] * columns[1]
                 + images[:, :, 2:3] * columns[2] + here(params[GRAY]) * gray)  # fmt: skip
        images = fn.cast(_round_even(fn, mixed), dtype=types.UINT8)
    if spec.hsl_jitter:
        images = _hls_jitter(fn, types, images, here(params[HSL]))
    if spec.pca_noise:  # MXNet: int(x + offset) (truncation; negatives clamp to 0 anyway)
        from nvidia.dali import math as dmath

        images = fn.cast(dmath.clamp(dmath.floor(images + here(params[PCA])), 0, 255),
                         dtype=types.UINT8)  # fmt: skip
    dtypes = {"float32": types.FLOAT, "float16": types.FLOAT16, "uint8": types.UINT8,
              "int8": types.INT8}  # fmt: skip
    layout = "CHW" if spec.layout == "NCHW" else "HWC"
    mirror = params[MIRROR] if spec.rand_mirror else int(spec.mirror)
    if spec.mean_image is not None:
        # MXNet subtracts meanimg[i][j] from pixel (i, j) and writes the result mirrored:
        # normalise the unmirrored image, flip last.
        mean_image = spec.mean_image if layout == "CHW" else spec.mean_image.transpose(1, 2, 0)
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout=layout,
                                          mirror=0)  # fmt: skip
        if spec.dtype == "int8":  # x - round(mean image), saturated
            images = images - types.Constant(_round_half_away(mean_image).astype(np.float32))
        else:
            images = images - types.Constant(np.ascontiguousarray(mean_image, np.float32))
            images = images * here(params[MULT]) + here(params[BIAS])
        images = fn.cast(images, dtype=dtypes[spec.dtype])
        if spec.rand_mirror or spec.mirror:
            images = fn.flip(images, horizontal=mirror)
        return images
    if MEAN in names:
        mean, std = params[MEAN], params[STD]
    elif spec.dtype == "int8":  # x - round(mean), saturated
        mean, std = [float(v) for v in _round_half_away(np.array(spec.mean))], [1.0, 1.0, 1.0]
    elif spec.dtype in ("float32", "float16"):  # the draws' mult without jitter, as constants
        mult = np.float32(spec.scale) / np.array(spec.std, np.float32)
        mean, std = [float(v) for v in spec.mean], [float(v) for v in (1 / mult)]
    else:
        mean, std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    return fn.crop_mirror_normalize(images, dtype=dtypes[spec.dtype], output_layout=layout,
                                    mean=mean, std=std, mirror=mirror)  # fmt: skip


def _dali_reason(exc: BaseException) -> str:
    """The informative line of a DALI error (its first lines are generic)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for i, line in enumerate(lines):
        if line.startswith("encountered:") and i + 1 < len(lines):
            return lines[i + 1]
    return lines[-1] if lines else type(exc).__name__


@dataclass
class _Batch:
    """A batch read by gpurec and ready to feed: its place in the stream, the sample fed
    at each position (bad ones replaced), the encoded images, labels, and what to tell
    the caller when it is handed out."""

    key: tuple
    epoch: int
    batch: int
    indices: list[int]
    payloads: list[np.ndarray]
    labels: np.ndarray
    real: int
    params: dict[str, np.ndarray]  # the graph's parameter inputs (see parameters())
    skipped: int = 0
    error: Exception | None = None  # raised when this batch is reached (on_error="raise")

    def feed(self, pipeline, positions: slice = slice(None)) -> None:
        """Feed the encoded images and the parameters of ``positions`` to ``pipeline``."""
        pipeline.feed_input(INPUT, self.payloads[positions])
        for name, values in self.params.items():
            pipeline.feed_input(name, values[positions])


class DALIBackend:
    """Feeds gpurec's batches to :func:`graph` in a DALI pipeline; hands out owned arrays.

    Checkpoints hold DALI's own state as of the last batch handed out (no random
    generators: the draws are gpurec's); the position in the epoch is the Pipeline's.
    """

    def __init__(self, pipe: Pipeline) -> None:
        self.pipe = pipe
        self.dataset = pipe.dataset
        self.depth = pipe.prefetch
        self._device_id = None
        if pipe.device == "gpu":
            import cupy

            self._device_id = cupy.cuda.Device().id
        self._bad: dict[int, str] = {}  # sample -> why it cannot be decoded
        # Fed to DALI when a batch has no good record at all: it is never handed out.
        self._filler = np.frombuffer(
            cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes(), np.uint8
        )
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="gpurec-dali-read")
        self._inflight: deque[_Batch] = deque()  # fed and scheduled, oldest first
        # Batches handed out recently: DALI reads fed arrays in place (no_copy) and may
        # hold on to them for up to `depth` iterations after their outputs came out.
        self._done: deque[_Batch] = deque(maxlen=self.depth + 2)
        self._handed: deque[np.ndarray] = deque(maxlen=self.depth + 3)  # see _owned
        self._ahead: deque[Future] = deque()  # being read, not fed yet
        self._stream = None  # (plan, batch) pairs to read next
        self._generation = 0  # the run_epoch that owns the stream
        self._checkpoint: bytes | None = None  # DALI's state after the last batch handed out
        self._pipeline = None
        self._fresh = True
        self._rebuild(None)

    # ------------------------------------------------------------------- pipelines
    def _new_pipeline(self, checkpoint: bytes | None, batch_size: int, depth: int):
        from nvidia.dali import fn, pipeline_def, types

        pipe = self.pipe
        pipeline = pipeline_def(graph, enable_checkpointing=True)(
            fn,
            types,
            pipe.spec,
            device=pipe.device,
            batch_size=batch_size,
            num_threads=pipe.num_threads,
            device_id=self._device_id,
            seed=pipe.seed,
            prefetch_queue_depth=depth,
            checkpoint=checkpoint,
            # DALI's static executor: its buffers are allocated once and reused, so the
            # resident size is flat to the MiB over epochs. The dynamic one (DALI 2's
            # default) allocates each iteration's buffers afresh; fed from Python, that
            # left glibc holding a changing 20-60 MiB of freed heap (BENCHMARKS.md).
            exec_dynamic=False,
        )
        pipeline.build()
        _LIVE.add(pipeline)
        return pipeline

    def _drain(self) -> None:
        """Let DALI finish what is in flight (it reads the fed arrays in place), then
        drop the pipeline and those arrays."""
        if self._pipeline is not None and not self._fresh:
            for _ in range(len(self._inflight)):
                try:
                    self._pipeline.outputs()
                except Exception:  # a failed pipeline has nothing left to run
                    break
        self._pipeline = None
        self._inflight.clear()

    def _rebuild(self, checkpoint: bytes | None) -> None:
        """A new pipeline in the state ``checkpoint`` records; nothing in flight."""
        self._drain()
        self._pipeline = self._new_pipeline(checkpoint, self.pipe.batch_size, self.depth)
        self._checkpoint = checkpoint
        self._fresh = True  # the first schedule_run runs `depth` fed batches
        self._broken = False
        self._inflight.clear()
        self._drop_ahead()

    def _drop_ahead(self) -> None:
        for future in self._ahead:
            future.cancel()
        self._ahead.clear()
        self._stream = None

    def state(self) -> dict:
        return {"dali_checkpoint": self._checkpoint or self._pipeline.checkpoint()}

    def restore(self, state: dict) -> None:
        """DALI's random state from a checkpoint (none in a CPU backend's checkpoint:
        then the order resumes exactly, the random augmentations start afresh)."""
        self._rebuild(state.get("dali_checkpoint"))

    # --------------------------------------------------------------------- reading
    def _label(self, header, index: int):
        if header.flag == 0 and self.pipe.label_width == 1:
            return header.label  # one float: the common case, kept cheap
        return label_of(header, self.pipe.label_width, self.dataset, index)

    def _error(self, index: int, reason: str) -> RecordIOError:
        """An error that names the shard, the record and its byte offset."""
        return self.dataset.error(index, reason)

    def _read(self, plan: Plan, b: int) -> _Batch:
        """Read, unpack and check batch ``b`` of ``plan`` (in the reader thread)."""
        dataset, pipe = self.dataset, self.pipe
        indices = plan.batch(b).tolist()
        n = len(indices)
        payloads: list[np.ndarray | None] = [None] * n
        labels = np.empty((n, pipe.label_width), np.float32)
        sizes = np.empty((n, 2), np.int64)  # decoded width, height: the geometry needs them
        failed: list[tuple[int, Exception]] = []
        for k, index in enumerate(indices):
            if index in self._bad:
                failed.append((k, self._error(index, self._bad[index])))
                continue
            try:
                header, payload = unpack_view(dataset.read_view(index))
            except RecordIOError as exc:
                failed.append((k, self._error(index, exc.reason)))
                continue
            try:
                labels[k] = self._label(header, index)
                payloads[k], sizes[k] = encoded_for_dali(payload)
            except RecordIOError as exc:
                failed.append((k, exc))
                continue
            except ImageError as exc:
                failed.append((k, self._error(index, str(exc))))
                continue
        draws = pipe.draws(plan, b, n)
        if not failed:
            params = parameters(pipe.spec, draws, sizes)
            return _Batch((plan.key, b), plan.epoch, b, indices, payloads, labels, plan.real[b],
                          params)  # fmt: skip
        # As the CPU backend does: the k-th bad position gets the k-th good record (cyclic);
        # a batch with none gets the nearest earlier good record of the rank's plan.
        good = [k for k in range(n) if payloads[k] is not None]
        stand_in = None
        if not good and pipe.on_error == "skip":
            stand_in = self._stand_in(plan, b, set(indices))
        for j, (k, _) in enumerate(failed):
            if good:  # the position keeps its own draws, applied to the image it now holds
                src = good[j % len(good)]
                payloads[k], labels[k], indices[k] = payloads[src], labels[src], indices[src]
                sizes[k] = sizes[src]
            elif stand_in is not None:
                indices[k], payloads[k], labels[k], sizes[k] = stand_in
            else:
                payloads[k], sizes[k] = self._filler, (8, 8)
        params = parameters(pipe.spec, draws, sizes)
        out = _Batch((plan.key, b), plan.epoch, b, indices, payloads, labels, plan.real[b], params)
        if pipe.on_error == "raise":
            out.error = failed[0][1]
        elif not good and stand_in is None:
            out.error = RecordIOError(f"no record of the epoch decodes (first: {failed[0][1]})")
        reads = plan.reads(b)  # a bad last record counts once, not per padding copy
        out.skipped = sum(1 for k, _ in failed if k < reads)
        return out

    def _stand_in(self, plan: Plan, b: int, tried: set[int]):
        """For a batch with no good record (a bad last record and its padding): the
        nearest record before it in the rank's plan (going back, then on from the plan's
        end) that reads and is not known bad, as (index, payload, label, (width, height));
        the CPU backend
        picks by the same rule. If DALI then fails on it, it is known bad and the next
        is taken."""
        for index in stand_in_candidates(plan, b, tried):
            if index in self._bad:
                continue
            try:
                header, payload = unpack_view(self.dataset.read_view(index))
                label = self._label(header, index)
                encoded, size = encoded_for_dali(payload)
            except (RecordIOError, ImageError):
                continue
            return index, encoded, label, size
        return None

    def _stream_from(self, plan: Plan, start: int):
        """(plan, batch) from ``start`` on, on into the following epochs."""
        while True:
            for b in range(start, plan.batches):
                yield plan, b
            plan, start = self.pipe.plan(plan.epoch + 1), 0

    def _read_ahead(self) -> None:
        while len(self._ahead) < self.depth + 1:
            plan, b = next(self._stream)
            self._ahead.append(self._reader.submit(self._read, plan, b))

    def _feed_next(self) -> None:
        self._read_ahead()
        batch = self._ahead.popleft().result()
        self._read_ahead()
        batch.feed(self._pipeline)
        self._inflight.append(batch)

    def _top_up(self) -> None:
        """Keep ``depth + 1`` batches fed and scheduled, as DALI's own ``run()`` does (it
        schedules the next iteration before it waits for the oldest), so that DALI has
        work queued while the caller holds a batch."""
        if self._fresh:  # DALI's first schedule_run runs `depth` iterations
            while len(self._inflight) < self.depth:
                self._feed_next()
            self._pipeline.schedule_run()
            self._fresh = False
        while len(self._inflight) < self.depth + 1:
            self._feed_next()
            self._pipeline.schedule_run()

    def _restart(self, plan: Plan, start: int) -> None:
        """Make batch ``start`` of ``plan`` the next one out."""
        key = (plan.key, start)
        if self._broken or (self._inflight and self._inflight[0].key != key):
            self._rebuild(self._checkpoint)  # discard what is in flight
        if self._inflight:
            return
        if self._ahead:
            head = self._ahead[0].result()
            if head.key == key:
                return
        self._drop_ahead()
        self._stream = self._stream_from(plan, start)

    # ------------------------------------------------------------------- decoding
    def _owned(self, tensors):
        if self.pipe.device == "cpu":
            # Into an array the caller owns: one handed out before that nothing refers to
            # any more, or a new one (the CPU backend's rule; fresh 10s-of-MiB arrays cost
            # page faults, and freeing them lets the resident size swing by whole batches).
            shape = (len(tensors), *tensors[0].shape())
            out = reusable(self._handed, shape)
            if out is None:
                out = np.empty(shape, np.dtype(self.pipe.spec.dtype))
            tensors.copy_to_external(ctypes.c_void_p(out.ctypes.data))
            self._handed.append(out)
            return out
        import cupy  # GPU only: copy out of DALI's buffer into a CuPy array we own

        tensor = tensors.as_tensor()
        out = cupy.empty(tensor.shape(), dtype=np.dtype(self.pipe.spec.dtype))
        stream = ctypes.c_void_p(cupy.cuda.get_current_stream().ptr)  # ordered on our stream
        tensor.copy_to_external(ctypes.c_void_p(out.data.ptr), stream, non_blocking=True)
        return out

    def _probe(self, batch: _Batch) -> dict[int, str]:
        """The records of ``batch`` that the graph cannot decode, one at a time."""
        found: dict[int, str] = {}
        tried: set[int] = set()
        probe = None
        for k, (index, payload) in enumerate(zip(batch.indices, batch.payloads, strict=True)):
            if index in tried or payload is self._filler:
                continue
            tried.add(index)
            if probe is None:
                probe = self._new_pipeline(None, 1, 1)
            batch.feed(probe, slice(k, k + 1))  # with the parameters of its position
            try:
                probe.run()
            except RuntimeError as exc:
                found[index] = f"cannot decode image: {_dali_reason(exc)}"
                probe = None  # DALI's pipeline is not usable after a failure
        return found

    def _recover(self, batch: _Batch, exc: BaseException) -> None:
        """DALI failed while ``batch`` was the next out: find the bad records, rebuild
        the pipeline at the last checkpoint; raise unless they can be skipped (the caller
        retries). The static executor reports a failure at the next ``outputs()``,
        whichever of the batches fed it was decoding: every batch in flight is probed. A
        bad record of a later batch is known from now on, and that batch raises or skips
        it when it comes (:meth:`_read`)."""
        pipe = self.pipe
        where = (f"batch {batch.batch} of epoch {batch.epoch} (rank {pipe.shard_id} of "
                 f"{pipe.num_shards})")  # fmt: skip
        bad: dict[int, str] = {}
        for fed in (batch, *self._inflight):
            bad.update(self._probe(fed))
        self._rebuild(self._checkpoint)
        if not bad:
            raise RuntimeError(f"DALI failed on {where}: {_dali_reason(exc)}") from exc
        self._bad.update(bad)
        here = [index for index in batch.indices if index in bad]
        if pipe.on_error == "raise" and here:
            raise self._error(
                here[0], f"{bad[here[0]]} (DALI, {where}; on_error='skip' skips such records)"
            ) from None

    def run_epoch(self, plan: Plan, start: int):
        """Yield (data, labels, real count) for batches ``start..`` of ``plan``."""
        pipe = self.pipe
        self._generation += 1
        generation = self._generation
        b = start
        while b < plan.batches:
            if generation != self._generation:
                raise RuntimeError("another iter() of this Pipeline has started: this one ended")
            self._restart(plan, b)
            self._top_up()
            batch = self._inflight.popleft()
            try:
                (images,) = self._pipeline.outputs()
            except RuntimeError as exc:
                self._recover(batch, exc)
                continue  # the bad records are known now: read the batch again
            except BaseException:
                self._broken = True
                raise
            self._checkpoint = self._pipeline.checkpoint()
            self._done.append(batch)
            if batch.error is not None:
                raise batch.error
            data = self._owned(images)
            label = batch.labels[:, 0] if batch.labels.shape[1] == 1 else batch.labels
            if pipe.device == "gpu":
                import cupy

                label = cupy.asarray(label)
            pipe.skipped += batch.skipped
            del images
            self._top_up()
            yield data, label, batch.real
            del data, label  # so that the batch array can be reused once the caller drops it
            b += 1

    def close(self) -> None:
        self._drop_ahead()
        self._reader.shutdown(wait=True, cancel_futures=True)
        self._drain()
        self._done.clear()
        self._handed.clear()
