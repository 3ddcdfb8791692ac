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


def write_records(rec: Path, images, labels, encoding: str = ".png") -> Path:
    """A shard (``.rec`` + ``.idx``) of the given images and labels, ids 0..n-1."""
    import cv2

    from gpurec.recordio import IRHeader, RecordWriter, pack

    with RecordWriter(rec, rec.with_suffix(".idx")) as writer:
        for i, (img, label) in enumerate(zip(images, labels, strict=True)):
            data = cv2.imencode(encoding, img)[1].tobytes()
            writer.write(pack(IRHeader(0, label, i, 0), data), key=i)
    return rec


def numbered_shards(folder: Path, counts=(7, 5, 9), size=(40, 52)) -> list[Path]:
    """Shards whose record ``k`` (global) has label ``k`` and a flat grey level of
    ``k * 5 % 256``: a batch's labels say exactly which records it holds."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    shards, k = [], 0
    for s, count in enumerate(counts):
        images = [np.full((*size, 3), (k + i) * 5 % 256, np.uint8) for i in range(count)]
        labels = [float(k + i) for i in range(count)]
        shards.append(write_records(folder / f"n-{s:05d}-of-{len(counts):05d}.rec", images, labels))
        k += count
    return shards


def coordinate_image(size: int = 256):
    """A BGR image whose red channel is x and green channel is y (0..255): any crop of it
    says where it came from."""
    import numpy as np

    ramp = np.linspace(0, 255, size).round().astype(np.uint8)
    img = np.zeros((size, size, 3), np.uint8)
    img[..., 2] = ramp[None, :]
    img[..., 1] = ramp[:, None]
    return img


def empty_bucket(client, bucket: str) -> None:
    """Delete every object of ``bucket`` (a boto3 client's), so it can be deleted."""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=bucket, Key=obj["Key"])
