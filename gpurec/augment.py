"""The augmentations, specified once and validated once, for every backend.

Both backends read an :class:`AugmentSpec` and apply the same steps with the same
parameter meaning, in this order:

1. crop: training with ``rand_crop`` takes a random-resized crop (area fraction in
   ``[min_random_area, max_random_area]`` of the image, aspect ratio width/height in
   ``[min_aspect_ratio, max_aspect_ratio]``, 10 attempts, then the whole image);
   otherwise the shorter edge is resized to ``resize`` and the center is cropped;
2. resize the crop to the data shape (height, width);
3. rotate by a random angle in ``±max_rotate_angle`` degrees (counter-clockwise for
   positive angles), same size, corners filled with ``fill_value``;
4. shear: ``x' = x + s * y`` about the center, ``s`` in ``±max_shear_ratio``
   (ImageRecordIter's ``max_shear_ratio``), filled with ``fill_value``;
5. colour: brightness factor in ``1 ± brightness``, contrast factor in ``1 ± contrast``
   about 128, saturation factor in ``1 ± saturation`` (chroma scaled in YIQ space),
   each clamped to 0..255 as 8-bit images;
6. mirror (horizontal flip) with probability 1/2 when ``rand_mirror``;
7. normalise ``(x - mean) / std`` per RGB channel on the 0-255 scale, cast to
   ``dtype``, in ``layout``.

Names and defaults follow MXNet's ImageRecordIter where the meaning is the same.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np

__all__ = ["RGB_FROM_YIQ", "YIQ_FROM_RGB", "AugmentSpec", "saturation_matrix"]

DTYPES = ("float32", "float16", "uint8")
LAYOUTS = ("NCHW", "NHWC")

# DALI's RGB <-> YIQ constants (hsv/saturation operators), used by both backends.
YIQ_FROM_RGB = np.array(
    [[0.299, 0.587, 0.114], [0.596, -0.274, -0.321], [0.211, -0.523, 0.311]], np.float32
)
RGB_FROM_YIQ = np.array(
    [[1.0, 0.956, 0.621], [1.0, -0.272, -0.647], [1.0, -1.107, 1.705]], np.float32
)


def saturation_matrix(s: float) -> np.ndarray:
    """The 3x3 RGB matrix that scales chroma by ``s`` (1 keeps the image)."""
    return RGB_FROM_YIQ @ np.diag([1.0, s, s]).astype(np.float32) @ YIQ_FROM_RGB


def _triple(name: str, value: Any) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        value = (value,) * 3
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number or 3 numbers (R, G, B), got {value!r}") from None
    if len(out) != 3:
        raise ValueError(f"{name} must have 3 values (R, G, B), got {len(out)}")
    return out  # type: ignore[return-value]


@dataclass(frozen=True)
class AugmentSpec:
    """What the Pipeline does to each image (see the module docstring for the steps).

    ``rand_crop`` and ``rand_mirror`` default to ``train``; ``resize`` (the shorter edge
    before the center crop) defaults to 256/224 of the crop's shorter side.
    ``train=False`` is the evaluation transform and allows no random augmentation.
    """

    data_shape: tuple[int, int, int] = (3, 224, 224)
    train: bool = True
    rand_crop: bool | None = None
    rand_mirror: bool | None = None
    resize: int | None = None
    min_random_area: float = 0.08
    max_random_area: float = 1.0
    min_aspect_ratio: float = 3 / 4
    max_aspect_ratio: float = 4 / 3
    max_rotate_angle: float = 0.0
    max_shear_ratio: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    fill_value: float = 0.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    dtype: str = "float32"
    layout: str = "NCHW"

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        shape = tuple(int(v) for v in self.data_shape)
        if len(shape) != 3 or shape[0] != 3 or min(shape) < 1:
            raise ValueError(f"data_shape must be (3, height, width), got {self.data_shape!r}")
        set_(self, "data_shape", shape)
        set_(self, "train", bool(self.train))
        for name in ("rand_crop", "rand_mirror"):
            value = getattr(self, name)
            if value is None:
                set_(self, name, self.train)
            elif value and not self.train:
                raise ValueError(f"{name}=True is a training augmentation; train=False forbids it")
        if self.resize is None:
            set_(self, "resize", round(min(shape[1:]) * 256 / 224))
        if self.resize < min(shape[1:]):
            raise ValueError(f"resize={self.resize} is smaller than the crop {shape[1:]}")
        if not 0 < self.min_random_area <= self.max_random_area <= 1:
            raise ValueError(
                "need 0 < min_random_area <= max_random_area <= 1, got "
                f"{self.min_random_area}, {self.max_random_area}"
            )
        if not 0 < self.min_aspect_ratio <= self.max_aspect_ratio:
            raise ValueError(
                "need 0 < min_aspect_ratio <= max_aspect_ratio, got "
                f"{self.min_aspect_ratio}, {self.max_aspect_ratio}"
            )
        for name in ("max_rotate_angle", "max_shear_ratio", "brightness", "contrast", "saturation"):
            value = float(getattr(self, name))
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
            if value and not self.train:
                raise ValueError(
                    f"{name}={value} is a training augmentation; train=False forbids it"
                )
            set_(self, name, value)
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) > 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.max_shear_ratio > 1:
            raise ValueError(f"max_shear_ratio must be in [0, 1], got {self.max_shear_ratio}")
        set_(self, "mean", _triple("mean", self.mean))
        set_(self, "std", _triple("std", self.std))
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.dtype == "uint8" and (self.mean != (0, 0, 0) or self.std != (1, 1, 1)):
            raise ValueError("dtype='uint8' cannot hold normalised values: leave mean 0, std 1")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if not 0 <= float(self.fill_value) <= 255:
            raise ValueError(f"fill_value must be in 0..255, got {self.fill_value}")

    @classmethod
    def names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    @property
    def height(self) -> int:
        return self.data_shape[1]

    @property
    def width(self) -> int:
        return self.data_shape[2]

    @property
    def color_jitter(self) -> bool:
        return bool(self.brightness or self.contrast or self.saturation)

    @property
    def normalizes(self) -> bool:
        return self.mean != (0.0, 0.0, 0.0) or self.std != (1.0, 1.0, 1.0)

    def batch_shape(self, batch_size: int) -> tuple[int, int, int, int]:
        c, h, w = self.data_shape
        return (batch_size, c, h, w) if self.layout == "NCHW" else (batch_size, h, w, c)
