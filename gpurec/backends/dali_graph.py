"""The DALI backend's graph and its parameters: pure functions, no DALI state.

:func:`graph` is the whole data path, written once, for DALI's ``fn`` and ``types``
modules passed in (so this module imports DALI nowhere). ``device="gpu"`` and ``"cpu"``
differ in one string (the decoders' ``"mixed"`` or ``"cpu"``): every later operator
runs where its input lives, so on the GPU everything after decoding stays there. The
graph has no random operator: every random number is gpurec's (:mod:`gpurec.draws`),
turned per image into DALI's arguments (ROI, warp matrix, colour matrix, offsets, mirror
flag, normalisation) by :func:`parameters`, from the image's size in its header, and
fed beside the encoded images through one ``fn.external_source`` each (names: the module
constants, :func:`inputs`), or all through one (``packed``, :func:`pack`). The runtime
that builds, feeds and runs the pipeline is :mod:`gpurec.backends.dali`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from gpurec.augment import AugmentSpec
from gpurec.backends.common import round_half_away as _round_half_away
from gpurec.backends.common import size_only as _size_only
from gpurec.backends.common import staged as _staged
from gpurec.draws import INTERP_CODES, LUMA, Draws, Geometry, geometry, jitter_matrices

__all__ = ["INPUT", "PACKED", "WHERE", "DecoderSettings", "graph", "inputs", "pack", "parameters"]

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
# bool: the window is resampled (False: the decoded slice is the output, an exact crop)
RESAMPLE = "resample"
# With packed=True (graph, pack): every parameter of an image in one float32 row, fed as
# one input (each external_source fed costs tens of microseconds a batch in DALI)
PACKED = "params"
# With packed=True and the images fed by gpurec, INPUT gets for each image a buffer the
# image lies in, not the image: a shard's whole memory map, the same for every image from
# it (one DALI tensor broadcast over the batch, no Python per image), and the first WHERE
# columns of PACKED say where: the offset and the length of the image's bytes, each as
# 65536 * hi + lo (float32 is exact to 2**24: two columns reach a terabyte). The graph
# cuts each image out of its buffer (fn.slice) before decoding.
WHERE = 4
_SPLIT = 65536
_INTEGRAL = (SLICE_START, SLICE_SHAPE, RESIZE_INTERP, INTERP, MIRROR)  # int32 in DALI
_SHAPES = {MIRROR: (), RESIZE_INTERP: (), INTERP: (), RESAMPLE: (), WARP: (2, 3),
           COLOUR: (3, 3)}  # fmt: skip

# cv2 interpolation code (NEAREST, LINEAR, CUBIC, AREA, LANCZOS4) -> DALIInterpType value
# (INTERP_NN, INTERP_LINEAR, INTERP_CUBIC, INTERP_LINEAR + antialias, INTERP_LANCZOS3).
_DALI_INTERP = np.array([0, 1, 2, 1, 3], np.int32)
# Pixels each side of a decoded slice beyond the region resampled, per unit of
# max(1, 1 / scale): the widest filter (Lanczos3, antialiased) reaches 3 of them.
_SLICE_MARGIN = 3
# Pixel centres (OpenCV, gpurec.draws) to pixel corners (DALI): x_corner = x_centre + 0.5.
_CORNER = np.array([[1.0, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])


@dataclass(frozen=True)
class DecoderSettings:
    """The settings of DALI's image decoder that matter on a GPU (``device="gpu"``, the
    ``"mixed"`` decoder), as Pipeline keywords; the defaults are DALI's own.

    ``hw_decoder_load``: the share of each batch's JPEGs sent to the A100/H100 hardware
    JPEG decoder (the rest go to nvJPEG's CUDA decoder); 0 turns it off.
    ``device_memory_padding`` / ``host_memory_padding``: bytes added to each of nvJPEG's
    device / pinned host buffers when they grow, so that a slightly larger image does not
    reallocate. ``preallocate_width_hint`` / ``preallocate_height_hint``: the largest image
    expected, for the hardware decoder to allocate its buffers once up front (0: none).
    In DALI's CPU mode the decoder takes and ignores them."""

    hw_decoder_load: float = 0.65
    device_memory_padding: int = 16 << 20
    host_memory_padding: int = 8 << 20
    preallocate_width_hint: int = 0
    preallocate_height_hint: int = 0

    def __post_init__(self) -> None:
        load = self.hw_decoder_load
        if isinstance(load, bool) or not isinstance(load, (int, float)) or not 0 <= load <= 1:
            raise ValueError(f"hw_decoder_load must be a number in [0, 1], got {load!r}")
        for name in ("device_memory_padding", "host_memory_padding", "preallocate_width_hint",
                     "preallocate_height_hint"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")

    def arguments(self) -> dict:
        """The keyword arguments of DALI's decoders."""
        return {**asdict(self), "hw_decoder_load": float(self.hw_decoder_load)}


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


def _may_crop_exactly(spec: AugmentSpec) -> bool:
    """Whether images may come out as a window of the decoded image at its resolution,
    with nothing resampled: a data-shape crop (centred or random) of an image at least
    that large and already at the resize step's size (faces packed at 112 and cut at
    112, ImageNet's 256-px records centre-cut at 224). The graph then resamples only the
    images that need it (:data:`RESAMPLE`, DALI's per-sample conditionals): DALI's CPU
    resize costs more than decoding a 112-px JPEG, even at scale 1."""
    return not _warped(spec) and spec.crop in ("center", "random") and not spec.max_crop_size


def inputs(spec: AugmentSpec, exact_crops: bool = False) -> tuple[str, ...]:
    """The names of the parameter inputs :func:`graph` has for ``spec`` (beside INPUT);
    ``exact_crops``: see :func:`graph`."""
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
        names += [RESAMPLE] if exact_crops and _may_crop_exactly(spec) else []
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


def _geometries(spec: AugmentSpec, d: Draws, sizes: np.ndarray,
                rows: np.ndarray) -> list[Geometry]:  # fmt: skip
    """:func:`gpurec.draws.geometry` of images of ``sizes`` (``(n, 2)``: decoded width,
    height) with the draws of rows ``rows``."""
    return [geometry(spec, d, int(k), int(w), int(h))
            for k, (w, h) in zip(rows.tolist(), sizes.tolist(), strict=True)]  # fmt: skip


def _random_resized(spec: AugmentSpec) -> bool:
    """Whether the batch's geometry can be worked out at once by :func:`_window_maps`:
    a random-resized crop of the source itself (no resize step, no affine, no padding),
    one interpolation for every image."""
    return (spec.crop == "random_resized" and not spec.resize and not spec.affine
            and not spec.pad and not _interp_per_image(spec))  # fmt: skip


def _window_maps(spec: AugmentSpec, d: Draws, sizes: np.ndarray) -> np.ndarray:
    """The 2x3 source-to-output maps of a random-resized crop (:func:`_random_resized`)
    for the whole batch, as :func:`gpurec.draws.geometry` makes them one by one (the same
    float64 operations in the same order, elementwise, and the same 3x3 products) for
    the images where one of the attempts fits; geometry() itself for the others."""
    n = len(sizes)
    width, height = sizes[:, 0].astype(np.int64), sizes[:, 1].astype(np.int64)
    u = d.attempts[:n]
    area = (width * height).astype(np.float64)[:, None]
    target = area * (u[..., 0] * (spec.max_random_area - spec.min_random_area)
                     + spec.min_random_area)  # fmt: skip
    ratio = u[..., 1] * (spec.max_aspect_ratio - spec.min_aspect_ratio) + spec.min_aspect_ratio
    h = np.rint(np.sqrt(target / ratio))  # Python's round(): halves to even, as np.rint
    w = np.rint(np.sqrt(target * ratio))
    swap = u[..., 2] > 0.5
    w, h = np.where(swap, h, w), np.where(swap, w, h)
    fits = (h > 0) & (h <= height[:, None]) & (w > 0) & (w <= width[:, None])
    first = np.argmax(fits, axis=1)
    rows = np.arange(n)
    w, h = w[rows, first], h[rows, first]
    u_y, u_x = u[rows, first, 3], u[rows, first, 4]

    def randint(v: np.ndarray, high: np.ndarray) -> np.ndarray:  # draws._randint
        return np.where(high > 0, np.minimum(np.floor(v * (high + 1)), high), 0)

    x = randint(u_x, width - w)
    y = randint(u_y, height - h)
    shift = np.tile(np.eye(3), (n, 1, 1))  # the window's corner to the origin
    shift[:, 0, 2], shift[:, 1, 2] = -x, -y
    sx, sy = spec.width / w, spec.height / h
    resize = np.zeros((n, 3, 3))  # draws._resize_map((w, h), output size)
    resize[:, 0, 0], resize[:, 0, 2] = sx, 0.5 * sx - 0.5
    resize[:, 1, 1], resize[:, 1, 2] = sy, 0.5 * sy - 0.5
    resize[:, 2, 2] = 1
    # geometry()'s products (total = m @ total, from the identity), stacked: NumPy's
    # matmul runs the same 3x3 product per image (tests/test_feed.py checks the bits)
    matrices = np.matmul(resize, np.matmul(shift, np.eye(3)))[:, :2]
    for k in np.flatnonzero(~fits.any(axis=1)).tolist():  # no attempt fits: the fallback
        matrices[k] = geometry(spec, d, k, int(width[k]), int(height[k])).matrix
    return matrices


def parameters(spec: AugmentSpec, d: Draws, sizes: np.ndarray, exact_crops: bool = False,
               by_size: dict | None = None) -> dict[str, np.ndarray]:  # fmt: skip
    """The per-sample arrays :func:`graph` takes for images of ``sizes`` (``(n, 2)``:
    decoded width, height) augmented with draws ``d``: one array per name of
    :func:`inputs` (``exact_crops``: see :func:`graph`), the batch along the first axis.
    The geometry is gpurec.draws' (MXNet's steps) turned into DALI's arguments; the colour
    and normalisation arrays are built for the whole batch at once. When the geometry
    takes no draw it is worked out once per distinct size, and kept in ``by_size`` (a
    dict the caller keeps for one ``spec`` and ``exact_crops``) across batches."""
    n = len(sizes)
    names = inputs(spec, exact_crops)
    if _size_only(spec):
        key = (sizes[:, 0].astype(np.int64) << 32) | sizes[:, 1].astype(np.int64)
        distinct, first, inverse = np.unique(key, return_index=True, return_inverse=True)
        keys = distinct.tolist()
        known = {} if by_size is None else by_size
        missing = [j for j, k in enumerate(keys) if k not in known]
        if missing:
            rows = first[missing]
            new = _geometric(spec, d, sizes[rows], rows, names)
            if len(known) > 100_000:  # a bound: sizes are few in practice
                known.clear()
            for i, j in enumerate(missing):
                known[keys[j]] = {name: values[i : i + 1] for name, values in new.items()}
        rows_of = [known[k] for k in keys]
        inverse = inverse.reshape(-1)
        if len(keys) == 1:
            out = {name: np.repeat(values, n, axis=0) for name, values in rows_of[0].items()}
        else:
            out = {name: np.concatenate([r[name] for r in rows_of])[inverse] for name in rows_of[0]}
    else:
        out = _geometric(spec, d, sizes, np.arange(n), names)
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


def _geometric(spec: AugmentSpec, d: Draws, sizes: np.ndarray, rows: np.ndarray,
               names: tuple[str, ...]) -> dict[str, np.ndarray]:  # fmt: skip
    """The geometric parameters (:func:`parameters`) of images of ``sizes`` with the draws
    of rows ``rows``."""
    n = len(sizes)
    out: dict[str, np.ndarray] = {}
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
        for k, geo in enumerate(_geometries(spec, d, sizes, rows)):
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
        if _random_resized(spec):  # interp is a constant of the graph: not needed
            matrices = _window_maps(spec, d, sizes)
        else:
            geos = _geometries(spec, d, sizes, rows)
            matrices = np.array([geo.matrix for geo in geos]).reshape(n, 2, 3)
            interp[:] = [geo.interps["composed"] for geo in geos]
        roi[:] = _axis_window(matrices, out_w, out_h)
        # Decode only the region and the reach of the resampling filter around it (ROI
        # decoding): the resize sees the same pixels as in the whole image.
        hw = sizes[:, ::-1].astype(np.float64)
        scale = np.array([out_h, out_w]) / np.maximum(roi[:, 2:] - roi[:, :2], 1e-9)
        margin = np.ceil(_SLICE_MARGIN * np.maximum(1.0, 1.0 / scale)) + 1
        lo = np.clip(np.floor(roi[:, :2] - margin), 0, hw - 1)
        hi = np.clip(np.ceil(roi[:, 2:] + margin), lo + 1, hw)
        roi[:, :2] -= lo
        roi[:, 2:] -= lo
        if RESAMPLE in names:  # an exact crop: the slice is the window, nothing resampled
            m = matrices
            x, y = -m[:, 0, 2], -m[:, 1, 2]
            exact = ((m[:, 0, 0] == 1) & (m[:, 1, 1] == 1) & (m[:, 0, 1] == 0) & (m[:, 1, 0] == 0)
                     & (x == np.floor(x)) & (y == np.floor(y)) & (x >= 0) & (y >= 0)
                     & (x + out_w <= hw[:, 1]) & (y + out_h <= hw[:, 0]))  # fmt: skip
            lo[exact] = np.stack([y[exact], x[exact]], axis=1)
            hi[exact] = lo[exact] + (out_h, out_w)
            roi[exact] = 0, 0, out_h, out_w
            out[RESAMPLE] = ~exact
        out[SLICE_START] = lo.astype(np.int32)
        out[SLICE_SHAPE] = (hi - lo).astype(np.int32)
    if ROI_START in names:
        out[ROI_START] = roi[:, :2].astype(np.float32)
        out[ROI_END] = roi[:, 2:].astype(np.float32)
    if INTERP in names:
        out[INTERP] = _DALI_INTERP[interp]
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


def _shape(spec: AugmentSpec, name: str) -> tuple[int, ...]:
    """The per-sample shape of parameter ``name``."""
    if name in (MULT, BIAS):
        return (3, 1, 1) if spec.layout == "NCHW" else (1, 1, 3)
    return _SHAPES.get(name, (3,) if name in (GRAY, HSL, PCA, MEAN, STD) else (2,))


def pack(
    params: dict[str, np.ndarray],
    names: tuple[str, ...],
    n: int,
    offsets: np.ndarray | None = None,
    lengths: np.ndarray | None = None,
) -> np.ndarray:
    """:func:`parameters`' arrays for ``n`` images as one float32 ``(n, K)`` array, in the
    order of ``names`` (:func:`inputs`): the input of a ``packed`` graph. Every integer
    fed is a pixel count, a code or a flag: exact in float32. With ``offsets`` and
    ``lengths`` (where each image lies in the buffer fed for it): those first, in the
    :data:`WHERE` columns the graph fed by gpurec reads."""
    if set(params) != set(names):
        raise ValueError(f"parameters {sorted(params)} are not the graph's {sorted(names)}")
    parts = [np.asarray(params[k], np.float32).reshape(n, -1) for k in names]
    if offsets is not None:
        if max(int(offsets.max(initial=0)), int(lengths.max(initial=0))) >= _SPLIT * 2**24:
            raise ValueError("an image lies beyond the first terabyte of its shard")
        where = np.empty((n, WHERE), np.float32)
        where[:, 0], where[:, 1] = np.divmod(offsets, _SPLIT)
        where[:, 2], where[:, 3] = np.divmod(lengths, _SPLIT)
        parts.insert(0, where)
    if not parts:
        return np.zeros((n, 0), np.float32)
    return np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]


def _cut(fn, types, buffers, flat):
    """Each image's bytes cut out of the buffer fed for it, where :data:`WHERE` says."""
    where = fn.cast(flat[0:WHERE], dtype=types.INT64)
    start = where[0:1] * _SPLIT + where[1:2]
    length = where[2:3] * _SPLIT + where[3:4]
    return fn.slice(buffers, start, length, axes=[0])


def _unpacked(fn, types, spec: AugmentSpec, names: tuple[str, ...], at: int = 0) -> tuple:
    """The parameter nodes of a ``packed`` graph: slices of the one input :data:`PACKED`
    (from column ``at``)."""
    flat = fn.external_source(name=PACKED, dtype=types.FLOAT, ndim=1)
    params = {}
    for name in names:
        shape = _shape(spec, name)
        size = int(np.prod(shape))
        node = flat[at] if not shape else flat[at : at + size]
        if len(shape) > 1:
            node = fn.reshape(node, shape=list(shape))
        if name in _INTEGRAL:
            node = fn.cast(node, dtype=types.INT32)
        elif name == RESAMPLE:
            node = fn.cast(node, dtype=types.BOOL)
        params[name] = node
        at += size
    return params, flat


def _where(needed, images, step):
    """``step(images)`` for the samples where ``needed`` holds, ``images`` for the
    others: a per-sample ``if``, which DALI turns into a split and a merge of the batch
    (a pipeline built with ``enable_conditionals=True``)."""
    if needed:
        images = step(images)
    return images


def graph(fn, types, spec: AugmentSpec, *, device: str, jpegs=None, params=None,
          exact_crops: bool = False, settings: DecoderSettings | None = None,
          packed: bool = False):  # fmt: skip
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

    ``exact_crops`` (the pipeline built with ``enable_conditionals=True``): where the
    output may be an exact crop of the decoded image (:func:`_may_crop_exactly`), such
    images are decoded as that window and not resampled (:data:`RESAMPLE`); resampling
    them at scale 1 gives the same pixels, at more than a 112-px decode's cost.
    ``settings``: the decoders' settings (default: DALI's). ``packed``: the parameters
    come in as one input (:data:`PACKED`, fed :func:`pack`'s array), not one each; fed
    by gpurec (no ``jpegs``), the images then come as buffers they lie in (:data:`WHERE`).
    """
    decoder = "mixed" if device == "gpu" else "cpu"  # the only device string
    names = inputs(spec, exact_crops)
    flat = None
    if params is None and packed:
        params, flat = _unpacked(fn, types, spec, names, WHERE if jpegs is None else 0)
    if params is None:
        params = {}
        for name in names:
            dtype = types.INT32 if name in (SLICE_START, SLICE_SHAPE, RESIZE_INTERP, INTERP,
                                            MIRROR) else types.FLOAT  # fmt: skip
            dtype = types.BOOL if name == RESAMPLE else dtype
            ndim = {MIRROR: 0, RESIZE_INTERP: 0, INTERP: 0, WARP: 2, COLOUR: 2, MULT: 3,
                    BIAS: 3, RESAMPLE: 0}.get(name, 1)  # fmt: skip
            params[name] = fn.external_source(name=name, dtype=dtype, ndim=ndim)
    here = (lambda node: node.gpu()) if decoder == "mixed" else (lambda node: node)
    if jpegs is None:
        # no_copy: DALI reads gpurec's arrays in place (the backend keeps them alive)
        jpegs = fn.external_source(name=INPUT, dtype=types.UINT8, ndim=1, no_copy=True)
        if flat is not None:
            jpegs = _cut(fn, types, jpegs, flat)
    h, w = spec.height, spec.width
    antialias = _antialias(spec)
    decoding = (settings or DecoderSettings()).arguments()
    if _interp_per_image(spec):
        interp = lambda name: fn.cast(params[name], dtype=types.INTERP_TYPE)  # noqa: E731
    else:  # one interpolation for every image and step: a constant of the graph
        fixed = (types.INTERP_NN, types.INTERP_LINEAR, types.INTERP_CUBIC, types.INTERP_LINEAR,
                 types.INTERP_LANCZOS3)[INTERP_CODES[spec.interp]]  # fmt: skip
        interp = lambda name: fixed  # noqa: E731
    if _warped(spec):
        images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB,
                                   adjust_orientation=False, **decoding)  # fmt: skip
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
            **decoding,
        )

        def window(images):
            return fn.resize(images, size=(h, w), roi_start=params[ROI_START],
                             roi_end=params[ROI_END], roi_relative=False,
                             interp_type=interp(INTERP), antialias=antialias)  # fmt: skip

        images = _where(params[RESAMPLE], images, window) if RESAMPLE in names else window(images)
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
