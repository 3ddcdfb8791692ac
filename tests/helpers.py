"""Helpers for tests: the CLI as a subprocess, and image trees whose pixels name labels."""

from __future__ import annotations

from pathlib import Path


def run_gpurec(*args: str, cwd: Path | None = None, timeout: float = 300):
    """Run the real CLI in a subprocess; returns the CompletedProcess (text output)."""
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "gpurec", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def color_tree(root: Path, per_class: int = 6, classes: tuple[str, ...] = ("a", "b", "c")) -> Path:
    """Class folders whose images are a flat class colour plus noise: pixels name labels.

    Class k has BGR colour CLASS_COLORS[k]; sizes vary per image.
    """
    import cv2
    import numpy as np

    rng = np.random.default_rng(1)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = int(rng.integers(90, 140)), int(rng.integers(90, 140))
            img = np.clip(CLASS_COLORS[k] + rng.normal(0, 4, (h, w, 3)), 0, 255).astype(np.uint8)
            cv2.imwrite(str(root / name / f"{name}_{i}.jpg"), img)
    return root


CLASS_COLORS = [(30, 30, 220), (40, 200, 40), (210, 60, 30), (128, 128, 128), (200, 200, 30)]


def label_from_pixels(image) -> int:
    """The class whose colour is nearest to the image's mean colour."""
    import numpy as np

    mean = image.reshape(-1, image.shape[-1]).mean(axis=0)
    return int(np.argmin([np.abs(mean - np.array(c)).sum() for c in CLASS_COLORS]))
