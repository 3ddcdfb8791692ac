"""A picture of what the Pipeline feeds the model: a grid of its output images.

Undoes the normalisation and layout of a batch, tiles the images, and writes a PNG,
each tile captioned with its class name (or bare, ``raw=True``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from gpurec.augment import AugmentSpec
from gpurec.recordio import atomic_write

__all__ = ["CAPTION", "batch_images", "captions", "picture", "tile", "write_grid"]

CAPTION = 18  # pixels of caption strip under each tile


def batch_images(data, spec: AugmentSpec) -> np.ndarray:
    """A batch as the Pipeline gave it -> (N, H, W, 3) uint8 RGB, as the eye sees it."""
    array = _host(data).astype(np.float32)
    if spec.layout == "NCHW":
        array = array.transpose(0, 2, 3, 1)
    # Undo (x - mean) * scale / std (the normaliser's random jitter cannot be undone:
    # those images show it), or int8's x - round(mean).
    if spec.dtype == "int8":
        array = array + np.round(np.array(spec.mean, np.float32))
    elif spec.dtype != "uint8":
        array = array * (np.array(spec.std, np.float32) / np.float32(spec.scale))
        if spec.mean_image is not None:
            array = array + spec.mean_image.transpose(1, 2, 0)
        else:
            array = array + np.array(spec.mean, np.float32)
    return np.clip(np.rint(array), 0, 255).astype(np.uint8)


def _host(array) -> np.ndarray:
    return np.asarray(array.get() if hasattr(array, "get") else array)  # CuPy -> NumPy


def captions(labels, classes: Sequence[str] | None) -> list[str]:
    """Class names for a batch's labels (the first label of multi-label records)."""
    labels = _host(labels)
    firsts = labels if labels.ndim == 1 else labels[:, 0]
    names = []
    for value in firsts.tolist():
        known = classes and float(value).is_integer() and 0 <= value < len(classes)
        names.append(classes[int(value)] if known else f"{value:g}")
    return names


def picture(batch, spec: AugmentSpec, classes: Sequence[str] | None, raw: bool = False):
    """The grid of a Pipeline batch, captioned with class names unless ``raw``."""
    images = batch_images(batch.data, spec)
    return tile(images, None if raw else captions(batch.label, classes))


def tile(images: np.ndarray, captions: Sequence[str] | None = None, cols: int = 0) -> np.ndarray:
    """Tiles of (N, H, W, 3) RGB images as one BGR picture, captions under each tile."""
    n, h, w = images.shape[:3]
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    cap = CAPTION if captions is not None else 0
    canvas = np.full((rows * (h + cap), cols * w, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = r * (h + cap), c * w
        canvas[y : y + h, x : x + w] = images[i][..., ::-1]
        if captions is not None:
            scale = 0.4
            text = captions[i][: max(1, int(w / (12 * scale)))]
            cv2.putText(canvas, text, (x + 2, y + h + cap - 5), cv2.FONT_HERSHEY_SIMPLEX, scale,
                        (0, 0, 0), 1, cv2.LINE_AA)  # fmt: skip
    return canvas


def write_grid(path: str | Path, picture: np.ndarray) -> Path:
    """Write the picture as PNG (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".png", picture)
    if not ok:
        raise ValueError(f"cannot encode a {picture.shape} picture as PNG")
    with atomic_write(path) as f:
        f.write(buf.tobytes())
    return path
