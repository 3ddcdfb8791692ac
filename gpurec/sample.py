"""A small generated image dataset, so the demo and the tests need no download.

Class folders of photo-like JPEGs (a shape on a textured background, one shape per
class), plus, on request, the kinds of broken files real downloads contain.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

CLASSES = ("circle", "square", "triangle")


def _draw(kind: str, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(40, 200, size=3)
    slope = rng.uniform(-0.4, 0.4, size=(2, 3))
    img = base + yy[..., None] * slope[0] + xx[..., None] * slope[1]
    img += rng.normal(0, 12, size=(height, width, 3))
    img = np.clip(img, 0, 255).astype(np.uint8)
    color = tuple(int(c) for c in rng.integers(0, 256, size=3))
    cy, cx = int(height * rng.uniform(0.35, 0.65)), int(width * rng.uniform(0.35, 0.65))
    r = int(min(height, width) * rng.uniform(0.2, 0.3))
    if kind == "circle":
        cv2.circle(img, (cx, cy), r, color, -1, cv2.LINE_AA)
    elif kind == "square":
        cv2.rectangle(img, (cx - r, cy - r), (cx + r, cy + r), color, -1, cv2.LINE_AA)
    else:
        pts = np.array([[cx, cy - r], [cx - r, cy + r], [cx + r, cy + r]], np.int32)
        cv2.fillPoly(img, [pts], color, cv2.LINE_AA)
    return img


def make_sample_tree(
    root: str | Path,
    per_class: int = 16,
    *,
    classes: tuple[str, ...] = CLASSES,
    size: tuple[int, int] = (120, 160),
    seed: int = 0,
    bad_files: bool = False,
) -> Path:
    """Write ``per_class`` JPEGs (quality 90) into ``root/<class>/``; returns ``root``.

    Image sizes vary by up to a quarter around ``size`` (height, width). With
    ``bad_files``, a few files that a pack must skip are added: an empty file, a
    truncated JPEG and a text file named `.jpg`.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for kind in classes:
        folder = root / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h = int(size[0] * rng.uniform(0.75, 1.25))
            w = int(size[1] * rng.uniform(0.75, 1.25))
            ok, buf = cv2.imencode(".jpg", _draw(kind, rng, h, w), [cv2.IMWRITE_JPEG_QUALITY, 90])
            assert ok
            (folder / f"{kind}_{i:04d}.jpg").write_bytes(buf.tobytes())
    if bad_files:
        first = root / classes[0]
        (first / "empty.jpg").write_bytes(b"")
        whole = (first / f"{classes[0]}_0000.jpg").read_bytes()
        (first / "truncated.jpg").write_bytes(whole[: len(whole) // 3])
        (first / "notes.jpg").write_text("this is not an image\n")
    return root
