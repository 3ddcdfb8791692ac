"""The augmentations, specified once and validated once, for every backend.

The steps and their meaning are MXNet's ``ImageRecordIter`` (its default augmenter,
``src/io/image_aug_default.cc``, and normaliser, ``iter_image_recordio_2.cc``), in its
order, so that ``gpurec.mxnet.io.ImageRecordIter`` is a translation of keywords and a
``gpurec.Pipeline`` trains on the images an MXNet script would:

1. **resize**: the shorter edge to ``resize`` pixels (``0``: keep the size);
2. **pre-crop affine** on the whole image, when any of its parameters is set: rotation by
   a random angle in ``±max_rotate_angle`` degrees (whole degrees when the maximum is
   whole, as MXNet draws them; positive turns the content anticlockwise) or exactly
   ``rotate`` (when > 0), horizontal shear ``x' = x + m*y`` with ``m`` in
   ``±max_shear_ratio``, scale ``s`` in ``[min_random_scale, max_random_scale]`` and a
   stretch ``r`` in ``[min_stretch, max_stretch]`` (both not with
   ``crop="random_resized"``), about the centre, onto a canvas of the scaled image's size
   clamped to ``[min_img_size, max_img_size]`` (which crops or pads, never resizes),
   uncovered pixels filled with ``fill_value``. MXNet's formula scales x by ``2s/(1+r)``
   and y by ``r`` times that: a stretch above 1 makes the content taller (MXNet's
   documentation says wider);
3. **pad**: ``pad`` pixels of ``fill_value`` on every side;
4. **crop** (``crop``):

   - ``"random_resized"``: a window of ``[min_random_area, max_random_area]`` of the area
     and width/height ratio in ``[min_aspect_ratio, max_aspect_ratio]`` (its sides swapped
     with probability 1/2; 10 attempts), resized to the data shape; when no attempt fits,
     the ``"center"`` rule below;
   - ``"random"`` / ``"center"``: a window of the data shape at the image's resolution
     (no resize), at a uniformly random or the central position; an image smaller than
     the data shape is first enlarged to cover it, keeping its aspect ratio. With
     ``min_crop_size``/``max_crop_size``, a square window of a random side in that range
     (both 0: off), resized to the data shape.

   Every resize uses ``interp``: ``"nearest"``, ``"linear"`` (the default, MXNet's
   too: the cheapest, and what DALI's random-resized crop recipes use), ``"cubic"``,
   ``"area"``, ``"lanczos"``, ``"auto"`` (cubic to enlarge, area to shrink, else
   linear) or ``"random"`` (one of the first five per image);
5. **colour**: brightness factor in ``1 ± brightness``, contrast factor in ``1 ± contrast``
   about the image's mean gray, saturation factor in ``1 ± saturation`` (a blend with the
   gray image; gray is the luma ``0.299 R + 0.587 G + 0.114 B``, where MXNet applies
   these weights to its BGR pixels, blue first); MXNet applies the three in a random
   order, but without clipping they commute, so gpurec applies them as one and clips
   once. Then HSL offsets
   (``random_h`` in OpenCV's 0-180 hue units, ``random_s``, ``random_l`` in 0-255, each
   drawn as MXNet does) and PCA lighting noise (``pca_noise``: AlexNet's eigenvectors,
   weights drawn from ``N(0, pca_noise)``);
6. **mirror**: horizontal flip always (``mirror``) or with probability 1/2
   (``rand_mirror``);
7. **normalise**: ``((x - mean) * c + i) * scale / std`` per RGB channel on the 0-255
   scale, ``c`` in ``1 ± max_random_contrast`` and ``i`` in ``± max_random_illumination``
   (MXNet's normaliser jitter; both 0 by default); ``mean_image`` (``(3, height,
   width)``, RGB, whatever the ``layout``) replaces ``mean``. ``dtype="int8"`` stores
   ``x - round(mean)`` saturated, ``"uint8"`` the pixels. Then ``layout``.

Where gpurec's defaults differ from MXNet's, it is for the ``Pipeline``'s sake (a training
spec that does something useful without keywords); ``ImageRecordIter`` passes MXNet's.
The random parameters of every image are drawn by :mod:`gpurec.draws`, once, for both
backends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

__all__ = ["CROPS", "INTERPS", "AugmentSpec"]

DTYPES = ("float32", "float16", "uint8", "int8")
LAYOUTS = ("NCHW", "NHWC")
CROPS = ("random_resized", "random", "center")
INTERPS = ("nearest", "linear", "cubic", "area", "lanczos", "auto", "random")
_RANDOM = (  # (field, value that means "off"): what train=False forbids
    ("max_rotate_angle", 0.0), ("max_shear_ratio", 0.0), ("brightness", 0.0),
    ("contrast", 0.0), ("saturation", 0.0), ("random_h", 0), ("random_s", 0),
    ("random_l", 0), ("pca_noise", 0.0), ("max_random_contrast", 0.0),
    ("max_random_illumination", 0.0),
)  # fmt: skip


def _real(name: str, value: Any) -> float:
    """``value`` as a finite float, or an error naming the field: a NaN passes every
    comparison test silently (a NaN angle turns every image to fill), an infinity fails
    half way through an epoch."""
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return out


def _whole(name: str, value: Any, low: int = 0) -> int:
    """``value`` as an int >= ``low``: a whole number (``224.0`` from a config file is one;
    ``224.7`` is refused rather than truncated)."""
    out = _real(name, value)
    if not out.is_integer() or out < low:
        raise ValueError(f"{name} must be a whole number >= {low}, got {value!r}")
    return int(out)


def _flag(name: str, value: Any) -> bool:
    """A real bool (Python's or NumPy's): ``bool("False")`` is True."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _triple(name: str, value: Any) -> tuple[float, float, float]:
    given = value
    if isinstance(value, (int, float, np.integer, np.floating)):
        value = (value,) * 3
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number or 3 numbers (R, G, B), got {value!r}") from None
    if len(out) != 3:
        raise ValueError(f"{name} must have 3 values (R, G, B), got {len(out)}")
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{name} must be finite, got {given!r}")
    return out  # type: ignore[return-value]


def _range(spec: AugmentSpec, low: str, high: str, floor: float = 0.0) -> None:
    lo, hi = _real(low, getattr(spec, low)), _real(high, getattr(spec, high))
    if not floor <= lo <= hi:
        raise ValueError(f"need {floor:g} <= {low} <= {high}, got {lo:g}, {hi:g}")
    object.__setattr__(spec, low, lo)
    object.__setattr__(spec, high, hi)


@dataclass(frozen=True)
class AugmentSpec:
    """What the Pipeline does to each image (the module docstring gives the steps).

    ``crop`` defaults to ``"random_resized"`` for training and ``"center"`` otherwise;
    ``rand_mirror`` to ``train``; ``resize`` to 256/224 of the crop's shorter side for
    ``"center"`` and ``"random"`` crops, and to 0 (the image as it is) for
    ``"random_resized"``. ``train=False`` is the evaluation transform: it allows no random
    augmentation. ``rotate``: None or 0 draws the angle from ``max_rotate_angle`` (MXNet's
    ``rotate=-1``; MXNet's fixed angle needs ``rotate > 0``); negative is refused.
    ``mean_image`` is ``(3, height, width)`` in RGB order, whatever the ``layout``.
    ``fill_value`` is a whole number in 0..255 (MXNet's is an int).
    """

    data_shape: tuple[int, int, int] = (3, 224, 224)
    train: bool = True
    crop: str | None = None
    resize: int | None = None
    min_random_area: float = 0.08
    max_random_area: float = 1.0
    min_aspect_ratio: float = 3 / 4
    max_aspect_ratio: float = 4 / 3
    min_crop_size: int = 0
    max_crop_size: int = 0
    max_rotate_angle: float = 0.0
    rotate: float | None = None
    max_shear_ratio: float = 0.0
    min_random_scale: float = 1.0
    max_random_scale: float = 1.0
    min_stretch: float = 1.0
    max_stretch: float = 1.0
    min_img_size: float = 0.0
    max_img_size: float = 1e10
    pad: int = 0
    fill_value: float = 0.0
    interp: str = "linear"
    rand_mirror: bool | None = None
    mirror: bool = False
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    random_h: int = 0
    random_s: int = 0
    random_l: int = 0
    pca_noise: float = 0.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    scale: float = 1.0
    max_random_contrast: float = 0.0
    max_random_illumination: float = 0.0
    mean_image: np.ndarray | None = field(default=None, compare=False, repr=False)
    dtype: str = "float32"
    layout: str = "NCHW"

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        try:
            shape = tuple(_whole("data_shape", v, 1) for v in self.data_shape)
        except (TypeError, ValueError):
            shape = ()
        if isinstance(self.data_shape, str) or len(shape) != 3 or shape[0] != 3:
            raise ValueError(
                f"data_shape must be (3, height, width), whole numbers >= 1, got "
                f"{self.data_shape!r}"
            )
        set_(self, "data_shape", shape)
        set_(self, "train", _flag("train", self.train))
        if self.crop is None:
            set_(self, "crop", "random_resized" if self.train else "center")
        if self.crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {self.crop!r}")
        if self.rand_mirror is None:
            set_(self, "rand_mirror", self.train)
        set_(self, "rand_mirror", _flag("rand_mirror", self.rand_mirror))
        set_(self, "mirror", _flag("mirror", self.mirror))
        if self.resize is None:
            auto = 0 if self.crop == "random_resized" else round(min(shape[1:]) * 256 / 224)
            set_(self, "resize", auto)
        set_(self, "resize", _whole("resize", self.resize))  # 0: keep the size
        _range(self, "min_random_area", "max_random_area")
        if not 0 < self.min_random_area <= self.max_random_area <= 1:
            raise ValueError(
                "need 0 < min_random_area <= max_random_area <= 1, got "
                f"{self.min_random_area}, {self.max_random_area}"
            )
        _range(self, "min_aspect_ratio", "max_aspect_ratio")
        if self.min_aspect_ratio <= 0:
            raise ValueError(f"min_aspect_ratio must be > 0, got {self.min_aspect_ratio}")
        for name in ("min_crop_size", "max_crop_size", "pad", "random_h", "random_s",
                     "random_l"):  # fmt: skip
            set_(self, name, _whole(name, getattr(self, name)))
        if (self.min_crop_size > 0) != (self.max_crop_size > 0):
            raise ValueError("set both min_crop_size and max_crop_size, or neither")
        _range(self, "min_crop_size", "max_crop_size")
        set_(self, "min_crop_size", int(self.min_crop_size))
        set_(self, "max_crop_size", int(self.max_crop_size))
        if self.crop == "random_resized":
            for name, off in (("min_crop_size", 0), ("max_crop_size", 0),
                              ("min_random_scale", 1.0), ("max_random_scale", 1.0),
                              ("min_stretch", 1.0), ("max_stretch", 1.0)):  # fmt: skip
                if getattr(self, name) != off:
                    raise ValueError(f"{name} does not apply to crop='random_resized'")
        _range(self, "min_random_scale", "max_random_scale")
        if self.min_random_scale <= 0:
            raise ValueError(f"min_random_scale must be > 0, got {self.min_random_scale}")
        _range(self, "min_stretch", "max_stretch")
        if self.min_stretch <= 0:
            raise ValueError(f"min_stretch must be > 0, got {self.min_stretch}")
        _range(self, "min_img_size", "max_img_size")
        for name in ("max_rotate_angle", "max_shear_ratio", "brightness", "contrast",
                     "saturation", "pca_noise", "max_random_contrast",
                     "max_random_illumination", "scale"):  # fmt: skip
            value = _real(name, getattr(self, name))
            if value < 0 or (name == "scale" and value == 0):
                raise ValueError(
                    f"{name} must be {'>' if name == 'scale' else '>='} 0, got {value}"
                )
            set_(self, name, value)
        if self.rotate is not None:
            rotate = _real("rotate", self.rotate)
            if rotate < 0:
                raise ValueError(
                    f"rotate must be >= 0 degrees (None or 0: the angle is drawn from "
                    f"max_rotate_angle), got {self.rotate!r}"
                )
            set_(self, "rotate", rotate)
        for name in ("brightness", "contrast", "saturation", "max_random_contrast"):
            if getattr(self, name) > 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.interp not in INTERPS:
            raise ValueError(f"interp must be one of {INTERPS}, got {self.interp!r}")
        if not self.train:
            random = [name for name, off in _RANDOM if getattr(self, name) != off]
            random += [name for name in ("rand_mirror",) if getattr(self, name)]
            random += [f"crop={self.crop!r}"] if self.crop != "center" else []
            random += ["interp='random'"] if self.interp == "random" else []
            if self.min_random_scale != self.max_random_scale:
                random.append("min/max_random_scale")
            if self.min_stretch != self.max_stretch:
                random.append("min/max_stretch")
            if self.min_crop_size != self.max_crop_size:
                random.append("min/max_crop_size")
            if random:
                raise ValueError(f"{random[0]} is a training augmentation; train=False forbids it")
        set_(self, "mean", _triple("mean", self.mean))
        set_(self, "std", _triple("std", self.std))
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        if self.mean_image is not None:
            image = np.ascontiguousarray(self.mean_image, np.float32)
            if image.shape != shape:
                raise ValueError(f"mean_image must have the data shape {shape}, got {image.shape}")
            if not np.isfinite(image).all():
                raise ValueError("mean_image must be finite: it holds NaN or infinite values")
            image.flags.writeable = False
            set_(self, "mean_image", image)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.dtype == "uint8" and (self.normalizes or self.jitters_normalisation):
            raise ValueError("dtype='uint8' holds the pixels as they are: leave mean, std, "
                             "scale, mean_image and the normaliser's jitter unset")  # fmt: skip
        if self.dtype == "int8" and (self.std != (1, 1, 1) or self.scale != 1
                                     or self.jitters_normalisation):  # fmt: skip
            raise ValueError("dtype='int8' stores x - round(mean): leave std, scale and the "
                             "normaliser's jitter unset")  # fmt: skip
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        # A whole number: the backends' padding and warp borders would round a fraction
        # differently (copyMakeBorder and DALI round it, a mask would truncate it).
        fill = _real("fill_value", self.fill_value)
        if not (fill.is_integer() and 0 <= fill <= 255):
            raise ValueError(
                f"fill_value must be a whole number in 0..255, got {self.fill_value!r}"
            )
        set_(self, "fill_value", fill)

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
    def affine(self) -> bool:
        """Whether step 2 (the pre-crop affine) runs; MXNet's condition."""
        return bool(
            self.max_rotate_angle or self.max_shear_ratio or (self.rotate or 0) > 0
            or self.min_random_scale != 1 or self.max_random_scale != 1
            or self.min_stretch != 1 or self.max_stretch != 1
            or self.max_img_size != 1e10 or self.min_img_size != 0
        )  # fmt: skip

    @property
    def color_jitter(self) -> bool:
        return bool(self.brightness or self.contrast or self.saturation)

    @property
    def hsl_jitter(self) -> bool:
        return bool(self.random_h or self.random_s or self.random_l)

    @property
    def jitters_normalisation(self) -> bool:
        return bool(self.max_random_contrast or self.max_random_illumination)

    @property
    def normalizes(self) -> bool:
        return (
            self.mean != (0.0, 0.0, 0.0) or self.std != (1.0, 1.0, 1.0) or self.scale != 1
            or self.mean_image is not None
        )  # fmt: skip

    def batch_shape(self, batch_size: int) -> tuple[int, int, int, int]:
        c, h, w = self.data_shape
        return (batch_size, c, h, w) if self.layout == "NCHW" else (batch_size, h, w, c)
