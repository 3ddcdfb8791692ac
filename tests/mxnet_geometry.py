"""Coordinate images and estimators for comparing augmenters with MXNet's reference outputs.

NumPy only (no test functions): tests import it as ``from mxnet_geometry import ...``, and
``benchmarks/make_mxnet_iter_reference.py`` (run with MXNet's own venv, numpy 1.23) imports
the same module, so the reference files in ``tests/data/mxnet_iter/`` and the tests measure
outputs with the same code.

A coordinate image stores each pixel's own position: R = x, G = y, B = 128. After any
resize, crop, rotation, shear or mirror, the R and G of an output pixel say which source
pixel it came from, so ``estimate`` can recover the affine map from output pixel to source
pixel by least squares and report it as scale, rotation, shear, mirror and centre.

Conventions of ``estimate`` (chosen to read directly as MXNet's ``image_aug_default.cc``
parameters):

* The fitted map is ``[x, y] = matrix @ [u, v, 1]``, with (u, v) = (column, row) of the
  output pixel and (x, y) = (column, row) in the *original* coordinate image (before
  ``resize``), pixel centres at integer coordinates.
* ``mirrored`` is ``det(matrix[:, :2]) < 0``. MXNet mirrors last (``u -> W-1-u``), so for a
  mirrored output the column of ``u`` is negated before the rest is decomposed: the other
  numbers then describe the geometry before the mirror.
* The (un-mirrored) 2x2 part is QR-decomposed, ``L = Q @ T`` with Q a rotation and T upper
  triangular with positive diagonal: ``scale_x = T[0,0]``, ``scale_y = T[1,1]`` (source pixels
  per output pixel along the output's x and y axes), ``shear = -T[0,1] / T[0,0]`` and
  ``angle = degrees(atan2(Q[1,0], Q[0,0]))``.
  This matches MXNet's forward matrix ``M = Sh(s) @ diag(hs, ws) @ R(angle)``
  (``R = [[cos, sin], [-sin, cos]]``): ``angle`` is MXNet's ``angle`` (positive = the content
  turns counter-clockwise as seen on screen, y pointing down), ``shear`` is MXNet's ``s``
  (the forward shear ``(x, y) -> (x + s*y, y)`` in output pixels; multiplied by
  crop-resize factor dx/dy when a crop is resized anisotropically), and
  ``scale_x = 1/(hs*dx)``, ``scale_y = 1/(ws*dy)`` with dx, dy the factors of any later
  crop-resize and of the initial ``resize``.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "COLOUR_COMMON",
    "COLOUR_CONFIGS",
    "ESTIMATE_KEYS",
    "GEOM_COMMON",
    "GEOM_CONFIGS",
    "colour_stats",
    "coordinate_image",
    "estimate",
    "fill_margins",
]

ESTIMATE_KEYS = (
    "scale_x",
    "scale_y",
    "angle",
    "shear",
    "mirrored",
    "center_x",
    "center_y",
    "inside",
)


def coordinate_image(width: int, height: int) -> np.ndarray:
    """HxWx3 uint8 RGB image with R = x, G = y, B = 128 (width and height at most 256).

    Encode it for OpenCV (``cv2.imencode``, MXNet's ``pack_img``) as ``img[..., ::-1]``: those
    expect BGR, and MXNet's iterator turns the decoded BGR back into RGB.
    """
    if not (1 <= width <= 256 and 1 <= height <= 256):
        raise ValueError(f"coordinate images must be at most 256x256, got {width}x{height}")
    img = np.empty((height, width, 3), np.uint8)
    img[..., 0] = np.arange(width, dtype=np.uint8)[None, :]
    img[..., 1] = np.arange(height, dtype=np.uint8)[:, None]
    img[..., 2] = 128
    return img


def _content_mask(img: np.ndarray, fill: float, tol: float = 2.0) -> np.ndarray:
    near_fill = np.all(np.abs(img - float(fill)) <= tol, axis=-1)
    return (np.abs(img[..., 2] - 128.0) <= tol) & ~near_fill


def _nan_result(inside: float) -> dict:
    out = {k: math.nan for k in ESTIMATE_KEYS}
    out["mirrored"] = False
    out["inside"] = inside
    out["matrix"] = np.full((2, 3), np.nan)
    out["residual"] = math.nan
    out["n"] = 0
    return out


def estimate(output: np.ndarray, fill: float = 255, min_pixels: int = 30) -> dict:
    """Fit the affine map output pixel (u, v) -> source pixel (x = R, y = G) of one output.

    ``output`` is one augmented coordinate image as HxWx3 **RGB, HWC**, values 0..255 (float
    or integer). MXNet's iterator gives NCHW: pass ``batch[i].transpose(1, 2, 0)``. Use an
    output without mean/std/scale normalisation and without colour augmentation.

    Content pixels are those with B within +-2 of 128 that are not all within 2 of ``fill``
    (blends of content and fill along the border fail the B test). The fit is repeated once
    without pixels whose residual exceeds 3 source pixels (clamped borders).

    Returns a dict: ``scale_x``, ``scale_y``, ``angle`` (degrees), ``shear``, ``mirrored``
    (bool), ``center_x``, ``center_y`` (source point at the output's centre
    ((W-1)/2, (H-1)/2)), ``inside`` (fraction of output pixels that are content), ``matrix``
    (2x3), ``residual`` (RMS, source pixels) and ``n`` (pixels used). See the module
    docstring for the conventions. Numbers are NaN (``mirrored`` False) when fewer than
    ``min_pixels`` content pixels exist or they are degenerate (e.g. one row).
    """
    img = np.asarray(output, dtype=np.float64)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected HxWx3 (HWC), got shape {img.shape}")
    h, w = img.shape[:2]
    mask = _content_mask(img, fill)
    inside = float(mask.mean())
    if int(mask.sum()) < min_pixels:
        return _nan_result(inside)

    vv, uu = np.nonzero(mask)
    design = np.stack([uu, vv, np.ones_like(uu)], axis=1).astype(np.float64)
    target = np.stack([img[vv, uu, 0], img[vv, uu, 1]], axis=1)
    if np.linalg.matrix_rank(design) < 3:
        return _nan_result(inside)
    coef = np.linalg.lstsq(design, target, rcond=None)[0]
    resid = np.abs(design @ coef - target).max(axis=1)
    keep = resid <= 3.0
    refit = keep.sum() >= min_pixels and not keep.all()
    if refit and np.linalg.matrix_rank(design[keep]) == 3:
        design, target = design[keep], target[keep]
        coef = np.linalg.lstsq(design, target, rcond=None)[0]
    matrix = coef.T  # 2x3: [x, y] = matrix @ [u, v, 1]
    rms = float(np.sqrt(np.mean((design @ coef - target) ** 2)))

    lin = matrix[:, :2].copy()
    det = float(np.linalg.det(lin))
    if det == 0 or not np.isfinite(det):
        return _nan_result(inside)
    mirrored = det < 0
    if mirrored:
        lin[:, 0] = -lin[:, 0]
    c0 = lin[:, 0]
    scale_x = float(np.hypot(c0[0], c0[1]))
    q0 = c0 / scale_x
    q1 = np.array([-q0[1], q0[0]])
    t01 = float(q0 @ lin[:, 1])
    t11 = float(q1 @ lin[:, 1])
    centre = matrix @ np.array([(w - 1) / 2.0, (h - 1) / 2.0, 1.0])
    return {
        "scale_x": scale_x,
        "scale_y": t11,
        "angle": math.degrees(math.atan2(q0[1], q0[0])),
        "shear": -t01 / scale_x,
        "mirrored": bool(mirrored),
        "center_x": float(centre[0]),
        "center_y": float(centre[1]),
        "inside": inside,
        "matrix": matrix,
        "residual": rms,
        "n": int(design.shape[0]),
    }


def fill_margins(output: np.ndarray, fill: float, tol: float = 2.0) -> dict:
    """Where the fill is: leading rows/columns made only of fill on each side, and the fraction.

    ``output`` is HxWx3 (HWC). A pixel is fill when all its channels are within ``tol`` of
    ``fill``. Returns ``top``, ``bottom``, ``left``, ``right`` (ints) and ``fill_fraction``.
    """
    img = np.asarray(output, dtype=np.float64)
    is_fill = np.all(np.abs(img - float(fill)) <= tol, axis=-1)
    rows = is_fill.all(axis=1)
    cols = is_fill.all(axis=0)

    def lead(flags: np.ndarray) -> int:
        bad = np.nonzero(~flags)[0]
        return int(flags.size if bad.size == 0 else bad[0])

    return {
        "top": lead(rows),
        "bottom": lead(rows[::-1]),
        "left": lead(cols),
        "right": lead(cols[::-1]),
        "fill_fraction": float(is_fill.mean()),
    }


def colour_stats(output: np.ndarray) -> dict:
    """Per-image colour statistics of one HxWx3 RGB (HWC) output, values in 0..255 units.

    ``mean`` and ``std`` (3 values each, R, G, B), ``sat`` (mean over pixels of
    max - min over channels), ``luma`` (mean of 0.299 R + 0.587 G + 0.114 B).
    """
    img = np.asarray(output, dtype=np.float64)
    flat = img.reshape(-1, 3)
    return {
        "mean": flat.mean(axis=0),
        "std": flat.std(axis=0),
        "sat": float((flat.max(axis=1) - flat.min(axis=1)).mean()),
        "luma": float((flat @ np.array([0.299, 0.587, 0.114])).mean()),
    }


# The configurations of the reference files (tests/data/mxnet_iter/README.md): MXNet's
# ImageRecordIter keywords, shared by the script that ran them in MXNet
# (benchmarks/make_mxnet_iter_reference.py) and the tests that run them in gpurec.
GEOM_COMMON = dict(data_shape=(3, 64, 64), batch_size=32, fill_value=255)
GEOM_CONFIGS = {
    "a_seed_recipe": dict(
        resize=80, rand_crop=True, rand_mirror=True, max_rotate_angle=50, max_shear_ratio=0.5
    ),
    "b_rand_crop": dict(resize=80, rand_crop=True),
    "c_scale_aspect": dict(
        resize=80, rand_crop=True, max_random_scale=1.3, min_random_scale=0.7, max_aspect_ratio=0.25
    ),
    "d_random_resized_crop": dict(
        random_resized_crop=True,
        min_random_area=0.08,
        max_random_area=1.0,
        max_aspect_ratio=4 / 3,
        min_aspect_ratio=3 / 4,
    ),
    "e_crop_size": dict(resize=80, rand_crop=True, min_crop_size=40, max_crop_size=64),
    "f_pad": dict(resize=64, pad=8, rand_crop=True),
    "g_rotate_only": dict(resize=80, max_rotate_angle=50),
    "h_shear_only": dict(resize=80, max_shear_ratio=0.5),
    "i_rand_mirror": dict(resize=80, rand_mirror=True),
}
COLOUR_COMMON = dict(data_shape=(3, 64, 64), resize=64, batch_size=12)
COLOUR_CONFIGS = {
    "baseline": {},
    "brightness": dict(brightness=0.4),
    "contrast": dict(contrast=0.4),
    "saturation": dict(saturation=0.4),
    "jitter": dict(brightness=0.3, contrast=0.3, saturation=0.3),
    "random_h": dict(random_h=36),
    "random_s": dict(random_s=50),
    "random_l": dict(random_l=50),
    "pca_noise": dict(pca_noise=0.1),
    "max_random_contrast": dict(max_random_contrast=0.3),
    "max_random_illumination": dict(max_random_illumination=20),
}
