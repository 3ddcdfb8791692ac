"""Each image's augmentation, drawn once from an :class:`AugmentSpec`, for both backends.

The random numbers of a batch are drawn in one go from ``(seed, epoch, batch, rank)``
(:func:`draw`), before any decoding, so a batch's augmentation does not depend on
threads, timing or the backend. What they mean for one image follows from its size
alone (:func:`geometry`, :func:`colour`): the OpenCV backend and the DALI graph apply the
same windows, matrices and factors, and differ only in their decoders and resamplers.

The geometry is MXNet's sequence (resize, pre-crop affine, pad, crop, resize of the
window), kept step by step in :class:`Geometry` for a backend that runs the steps as MXNet
does, and composed into one source-to-output matrix (``Geometry.matrix``) for a backend
that samples the output once. Coordinates are OpenCV's: pixel ``i`` has its centre at
``i``; ``cv2.resize`` maps ``x`` to ``(x + 0.5) * scale - 0.5``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gpurec.augment import AugmentSpec

__all__ = ["ATTEMPTS", "INTERP_CODES", "Colour", "Draws", "Geometry", "colour", "draw",
           "enlarge_side", "geometry", "jitter_matrices"]  # fmt: skip

ATTEMPTS = 10  # random-resized crop: windows tried before falling back (MXNet's 10)
NEAREST, LINEAR, CUBIC, AREA, LANCZOS = range(5)  # cv2.INTER_* values, MXNet's codes
INTERP_CODES = {"nearest": NEAREST, "linear": LINEAR, "cubic": CUBIC, "area": AREA,
                 "lanczos": LANCZOS}  # fmt: skip

# AlexNet's PCA lighting: eigenvectors (rows R, G, B) times eigenvalues, as MXNet holds them.
PCA_EIGVEC = np.array(
    [[55.46 * -0.5675, 4.794 * 0.7192, 1.148 * 0.4009],
     [55.46 * -0.5808, 4.794 * -0.0045, 1.148 * -0.8140],
     [55.46 * -0.5836, 4.794 * -0.6948, 1.148 * 0.4203]], np.float32,
)  # fmt: skip
LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # gray = LUMA . (R, G, B)


@dataclass
class Draws:
    """A batch's random numbers, one row per image (uniforms in [0, 1) unless said)."""

    affine: np.ndarray  # (n, 4): shear, angle, scale, stretch
    crop: np.ndarray  # (n, 3): window side, y, x
    attempts: np.ndarray  # (n, ATTEMPTS, 5): area, ratio, swap, y, x
    mirror: np.ndarray  # (n,) bool
    jitter: np.ndarray  # (n, 3): brightness, contrast, saturation factors (1 = none)
    hsl: np.ndarray  # (n, 3) int: offsets of H, L, S (OpenCV's HLS order)
    pca: np.ndarray  # (n, 3) float32: RGB offsets
    interp: np.ndarray  # (n,) int: interpolation codes for interp="random"
    mult: np.ndarray  # (n, 3) float32: normalising multiplier per RGB channel
    bias: np.ndarray  # (n, 3) float32: normalising offset per RGB channel

    def __len__(self) -> int:
        return len(self.mirror)


def draw(spec: AugmentSpec, key: tuple[int, ...], n: int) -> Draws:
    """The random numbers of ``n`` images, from ``key`` (e.g. seed, epoch, batch)."""
    rng = np.random.default_rng(list(key))
    u = rng.random((n, 7 + 5 * ATTEMPTS + 13))
    mirror = u[:, 57] < 0.5 if spec.rand_mirror else np.zeros(n, bool)
    mirror |= spec.mirror
    amount = np.array([spec.brightness, spec.contrast, spec.saturation])
    jitter = 1 + (u[:, 58:61] * 2 - 1) * amount
    # MXNet: r = (u1 + 4 u2) / 5; offset = int(r * 2 * max - max), truncated toward zero
    r = (u[:, 61:64] + 4 * u[:, 64:67]) / 5
    limits = np.array([spec.random_h, spec.random_l, spec.random_s], np.float64)
    hsl = np.trunc((r * 2 * limits - limits).astype(np.float32)).astype(np.int32)
    alpha = rng.normal(0, spec.pca_noise, (n, 3)).astype(np.float32) if spec.pca_noise else (
        np.zeros((n, 3), np.float32))  # fmt: skip
    pca = alpha @ PCA_EIGVEC.T  # (r, g, b) = eigvec . alpha
    interp = np.minimum((u[:, 67] * 5).astype(np.int32), 4)
    # MXNet's normaliser, in float32 as it computes: mult = c * scale / std, bias = i * scale / std
    c = (u[:, 68] * spec.max_random_contrast * 2 - spec.max_random_contrast + 1).astype(np.float32)
    i = (u[:, 69] * spec.max_random_illumination * 2 - spec.max_random_illumination).astype(
        np.float32)  # fmt: skip
    std = np.array(spec.std, np.float32)
    scale = np.float32(spec.scale)
    mult = (c * scale)[:, None] / std
    bias = (i * scale)[:, None] / std
    return Draws(
        affine=u[:, 0:4], crop=u[:, 4:7], attempts=u[:, 7:57].reshape(n, ATTEMPTS, 5),
        mirror=mirror, jitter=jitter, hsl=hsl, pca=pca.astype(np.float32), interp=interp,
        mult=mult.astype(np.float32), bias=bias.astype(np.float32),
    )  # fmt: skip


@dataclass
class Geometry:
    """One image's geometric steps (MXNet's order) and their composition.

    ``resized``: the size after step 1, or None; ``warp`` (2x3, forward) and ``canvas``
    (its output size, before padding): step 2, or None; ``pad``; ``enlarged``: the size
    the padded canvas is enlarged to before a data-shape window, or None; ``window``
    (x, y, w, h) in that image; ``resize_window``: whether the window is resized to the
    output (else it is the output); ``interps``: the cv2 interpolation code of each step
    (``resize``, ``warp``, ``enlarge``, ``window``) and of the composed map
    (``composed``); ``matrix``: the forward 2x3 map from source pixels to output pixels.
    """

    source: tuple[int, int]
    resized: tuple[int, int] | None
    warp: np.ndarray | None
    canvas: tuple[int, int]
    pad: int
    enlarged: tuple[int, int] | None
    window: tuple[int, int, int, int]
    resize_window: bool
    interps: dict[str, int]
    matrix: np.ndarray

    @property
    def axis_aligned(self) -> bool:
        """No rotation or shear: the output is a resized window of the source (possibly
        reaching past its edges when padded)."""
        return self.warp is None


def _resize_map(old: tuple[int, int], new: tuple[int, int]) -> np.ndarray:
    """3x3: ``cv2.resize`` from size ``old`` to ``new`` (width, height), as a map."""
    sx, sy = new[0] / old[0], new[1] / old[1]
    return np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1]])


def _interp(spec: AugmentSpec, d: Draws, k: int, old: tuple[float, float],
            new: tuple[float, float]) -> int:  # fmt: skip
    """MXNet's GetInterMethod; ``"random"`` takes one draw per image for every step."""
    if spec.interp == "random":
        return int(d.interp[k])
    if spec.interp != "auto":
        return INTERP_CODES[spec.interp]
    if new[0] > old[0] and new[1] > old[1]:
        return CUBIC
    if new[0] < old[0] and new[1] < old[1]:
        return AREA
    return LINEAR


def enlarge_side(out: int, side: int, other: int) -> int:
    """The other side of an image enlarged so that ``side`` becomes ``out``: MXNet's
    ``(index_t)((float)out / (float)side * (float)other)``, each step rounded to float32
    as MXNet computes it (in float64, 41x41 enlarged to 64 would stay 64 wide; MXNet
    makes it 63, then enlarges the width in a second step)."""
    ratio = np.float32(out) / np.float32(side)
    return int(np.float32(ratio * np.float32(other)))


def _randint(u: float, high: int) -> int:
    """A uniform integer in ``[0, high]`` from a uniform ``u`` in [0, 1)."""
    return min(int(u * (high + 1)), high) if high > 0 else 0


def geometry(spec: AugmentSpec, d: Draws, k: int, width: int, height: int) -> Geometry:
    """Image ``k`` of draws ``d``, whose decoded size is ``width`` x ``height``."""
    out_h, out_w = spec.height, spec.width
    maps = []  # 3x3 forward maps, source first
    interps: dict[str, int] = {}
    size = (width, height)
    resized = None
    if spec.resize:  # MXNet's integer arithmetic: the longer side is resize * long / short
        r = spec.resize
        resized = (r, r * height // width) if height > width else (r * width // height, r)
        resized = (max(1, resized[0]), max(1, resized[1]))
        interps["resize"] = _interp(spec, d, k, size, resized)
        maps.append(_resize_map(size, resized))
        size = resized
    warp = None
    canvas = size
    if spec.affine:
        shear_u, angle_u, scale_u, stretch_u = d.affine[k]
        s = shear_u * spec.max_shear_ratio * 2 - spec.max_shear_ratio
        top = spec.max_rotate_angle
        if top.is_integer():  # MXNet draws whole degrees in [-max, max]
            angle = float(min(int(angle_u * (2 * top + 1)), 2 * top) - top)
        else:
            angle = top * (2 * angle_u - 1)
        if spec.rotate is not None and spec.rotate > 0:
            angle = spec.rotate
        a, b = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        scale = ratio = 1.0
        if spec.crop != "random_resized":
            scale = (
                scale_u * (spec.max_random_scale - spec.min_random_scale) + spec.min_random_scale
            )
            ratio = stretch_u * (spec.max_stretch - spec.min_stretch) + spec.min_stretch
        hs = 2 * scale / (1 + ratio)
        ws = ratio * hs
        new_w = max(spec.min_img_size, min(spec.max_img_size, scale * size[0]))
        new_h = max(spec.min_img_size, min(spec.max_img_size, scale * size[1]))
        m = np.array([[hs * a - s * b * ws, hs * b + s * a * ws, 0.0], [-b * ws, a * ws, 0.0]])
        m[0, 2] = (new_w - (m[0, 0] * size[0] + m[0, 1] * size[1])) / 2
        m[1, 2] = (new_h - (m[1, 0] * size[0] + m[1, 1] * size[1])) / 2
        canvas = (max(1, int(new_w)), max(1, int(new_h)))
        interps["warp"] = _interp(spec, d, k, size, canvas)
        warp = m
        maps.append(np.vstack([m, [0, 0, 1]]))
        size = canvas
    if spec.pad:
        p = spec.pad
        maps.append(np.array([[1.0, 0, p], [0, 1, p], [0, 0, 1]]))
        size = (size[0] + 2 * p, size[1] + 2 * p)
    enlarged = None
    window = None
    if spec.crop == "random_resized":
        area = size[0] * size[1]
        for u_area, u_ratio, u_swap, u_y, u_x in d.attempts[k]:
            target = area * (u_area * (spec.max_random_area - spec.min_random_area)
                             + spec.min_random_area)  # fmt: skip
            ratio = (
                u_ratio * (spec.max_aspect_ratio - spec.min_aspect_ratio) + spec.min_aspect_ratio
            )
            h = round(math.sqrt(target / ratio))
            w = round(math.sqrt(target * ratio))
            if u_swap > 0.5:
                w, h = h, w
            if 0 < h <= size[1] and 0 < w <= size[0]:
                window = (_randint(u_x, size[0] - w), _randint(u_y, size[1] - h), w, h)
                break
    elif spec.max_crop_size:
        u_side, u_y, u_x = d.crop[k]
        # MXNet stops when the image is smaller than max_crop_size: gpurec takes the image's
        # shorter side as the largest window instead.
        high = min(spec.max_crop_size, size[0], size[1])
        low = min(spec.min_crop_size, high)
        side = low + _randint(u_side, high - low)
        if spec.crop == "random":
            window = (_randint(u_x, size[0] - side), _randint(u_y, size[1] - side), side, side)
        else:
            window = ((size[0] - side) // 2, (size[1] - side) // 2, side, side)
    resize_window = window is not None
    if window is None:  # a window of the data shape, at the image's resolution
        w, h = size
        if h < out_h:  # MXNet enlarges the height first, then the width (in float32)
            w, h = enlarge_side(out_h, h, w), out_h
        if w < out_w:
            w, h = out_w, enlarge_side(out_w, w, h)
        if (w, h) != size:
            enlarged = (w, h)
            interps["enlarge"] = _interp(spec, d, k, size, (out_w, out_h))
            maps.append(_resize_map(size, enlarged))
            size = enlarged
        if spec.crop == "random":
            _, u_y, u_x = d.crop[k]
            window = (_randint(u_x, size[0] - out_w), _randint(u_y, size[1] - out_h), out_w, out_h)
        else:
            window = ((size[0] - out_w) // 2, (size[1] - out_h) // 2, out_w, out_h)
    x, y, w, h = window
    maps.append(np.array([[1.0, 0, -x], [0, 1, -y], [0, 0, 1]]))
    if resize_window:
        interps["window"] = _interp(spec, d, k, (w, h), (out_w, out_h))
        maps.append(_resize_map((w, h), (out_w, out_h)))
    total = np.eye(3)
    for m in maps:
        total = m @ total
    # The composed map's interpolation: MXNet's rule on the whole change of size.
    sx = math.hypot(total[0, 0], total[1, 0])
    sy = math.hypot(total[0, 1], total[1, 1])
    interps["composed"] = _interp(spec, d, k, (1.0, 1.0), (sx, sy))
    return Geometry((width, height), resized, warp, canvas, spec.pad, enlarged, window,
                    resize_window, interps, total[:2].copy())  # fmt: skip


@dataclass
class Colour:
    """One image's colour steps: ``matrix`` (3x3, on RGB) and ``gray`` (3,), so that
    ``out = matrix @ x + gray * mean_gray(x)`` clipped to 0..255, where ``mean_gray`` is the
    mean of ``LUMA . x`` over the image (brightness, contrast and saturation together);
    then the ``hsl`` offsets (H, L, S) and the ``pca`` offsets (R, G, B)."""

    matrix: np.ndarray | None
    gray: np.ndarray | None
    hsl: np.ndarray | None
    pca: np.ndarray | None


def jitter_matrices(jitter: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Brightness, contrast and saturation factors ``(..., 3)`` (one image's, or a
    batch's) as ``(..., 3, 3)`` matrices on RGB and ``(..., 3)`` coefficients of the mean
    gray (see :func:`colour`), float32."""
    b, c, s = (jitter[..., j, None, None] for j in range(3))
    matrix = b * c * (s * np.eye(3) + (1 - s) * np.outer(np.ones(3), LUMA))
    gray = np.repeat(b[..., 0] * (1 - c[..., 0]), 3, axis=-1)
    return matrix.astype(np.float32), gray.astype(np.float32)


def colour(spec: AugmentSpec, d: Draws, k: int) -> Colour:
    """Image ``k``'s colour steps (None where a step is off).

    Brightness ``b``: ``x -> b x``; contrast ``c``: ``x -> c x + (1 - c) m`` (``m`` the mean
    gray); saturation ``s``: ``x -> s x + (1 - s) Y(x)`` (``Y`` the pixel's gray). Without
    clipping they commute, and together are ``b c (s x + (1 - s) Y(x)) + b (1 - c) m``.
    """
    matrix = gray = None
    if spec.color_jitter:
        matrix, gray = jitter_matrices(d.jitter[k])
    hsl = d.hsl[k] if spec.hsl_jitter else None
    pca = d.pca[k] if spec.pca_noise else None
    return Colour(matrix, gray, hsl, pca)
