"""``ImageRecordIter``'s keywords, as MXNet 1.9.1 has them, translated onto gpurec's
Pipeline and AugmentSpec keywords (:func:`translate`; :mod:`gpurec.mxnet.io` runs the
iterator). Every keyword keeps MXNet's default and meaning; an unknown one is a
``TypeError``, a value that cannot be honoured a ``ValueError`` naming the keyword.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from gpurec.mxnet.context import Context
from gpurec.storage import is_url

__all__ = ["BACKEND_ENV", "MXNET_DEFAULTS", "translate"]

log = logging.getLogger("gpurec.mxnet.io")

BACKEND_ENV = "GPUREC_MXNET_BACKEND"
REQUIRED = ("path_imgrec", "data_shape", "batch_size")

# Every keyword of MXNet 1.9.1's ImageRecordIter and its default, from
# src/io/image_iter_common.h (ImageRecParserParam, BatchParam, ImageRecordParam,
# ImageNormalizeParam, PrefetcherParam), src/io/image_aug_default.cc
# (DefaultImageAugmentParam) and python/mxnet/io (data_name, label_name).
MXNET_DEFAULTS: dict[str, Any] = {
    # ImageRecParserParam
    "path_imglist": "", "path_imgrec": "", "path_imgidx": "", "aug_seq": "aug_default",
    "label_width": 1, "data_shape": None, "preprocess_threads": 4, "verbose": True,
    "num_parts": 1, "part_index": 0, "device_id": 0, "shuffle_chunk_size": 0,
    "shuffle_chunk_seed": 0, "seed_aug": None,
    # BatchParam
    "batch_size": None, "round_batch": True,
    # ImageRecordParam
    "shuffle": False, "seed": 0,
    # ImageNormalizeParam
    "mirror": False, "rand_mirror": False, "mean_img": "", "mean_r": 0.0, "mean_g": 0.0,
    "mean_b": 0.0, "mean_a": 0.0, "std_r": 1.0, "std_g": 1.0, "std_b": 1.0, "std_a": 1.0,
    "scale": 1.0, "max_random_contrast": 0.0, "max_random_illumination": 0.0,
    # PrefetcherParam
    "prefetch_buffer": 4, "ctx": "gpu", "dtype": None,
    # DefaultImageAugmentParam
    "resize": -1, "rand_crop": False, "random_resized_crop": False, "max_rotate_angle": 0,
    "max_aspect_ratio": 0.0, "min_aspect_ratio": None, "max_shear_ratio": 0.0,
    "max_crop_size": -1, "min_crop_size": -1, "max_random_scale": 1.0,
    "min_random_scale": 1.0, "max_random_area": 1.0, "min_random_area": 1.0,
    "max_img_size": 1e10, "min_img_size": 0.0, "brightness": 0.0, "contrast": 0.0,
    "saturation": 0.0, "pca_noise": 0.0, "random_h": 0, "random_s": 0, "random_l": 0,
    "rotate": -1, "fill_value": 255, "inter_method": 1, "pad": 0,
    # MXDataIter (python)
    "data_name": "data", "label_name": "softmax_label",
}  # fmt: skip

INTER_METHODS = {0: "nearest", 1: "linear", 2: "cubic", 3: "area", 4: "lanczos", 9: "auto",
                 10: "random"}  # fmt: skip
DTYPES = {"float32": "float32", "uint8": "uint8", "int8": "int8"}
# Keywords that only act on float32 output (MXNet skips them for uint8; int8 keeps the mean).
_NORMALISING = ("std_r", "std_g", "std_b", "scale", "max_random_contrast",
                "max_random_illumination")  # fmt: skip


# ------------------------------------------------------------------------ translation


def _positive(kw: dict[str, Any], name: str) -> int:
    """A whole-number keyword that must be at least 1."""
    value = _number(kw, name, int)
    if value < 1:
        raise ValueError(f"ImageRecordIter: {name} must be >= 1, got {value}")
    return value


def _number(kw: dict[str, Any], name: str, kind: type = float) -> Any:
    value = kw[name]
    try:
        out = kind(value)
    except (TypeError, ValueError):
        what = "a whole number" if kind is int else "a number"  # MXNet refuses "4.0" for ints
        raise ValueError(f"ImageRecordIter: {name} must be {what}, got {value!r}") from None
    if kind is int and out != float(value):
        raise ValueError(f"ImageRecordIter: {name} must be a whole number, got {value!r}")
    return out


def _optional(kw: dict[str, Any], name: str) -> Any:
    """The value, or None for None and the string ``"None"``: MXNet ``str()``s every
    keyword, so ``seed_aug="None"`` (and a YAML ``min_aspect_ratio: None``) means unset."""
    value = kw[name]
    if value is None or (isinstance(value, str) and value.strip() == "None"):
        return None
    return value


def _shape(value: Any) -> tuple[int, ...]:
    """``data_shape`` as MXNet reads it: a sequence, or a string ``"(3,224,224)"`` /
    ``"[3,224,224]"`` (MXNet's TShape syntax; a bare ``"3,224,224"`` is refused there)."""
    values = value
    if isinstance(value, str):
        text = value.strip()
        if not (text[:1] in "([" and text[-1:] in ")]" and len(text) >= 2):
            raise ValueError(f"ImageRecordIter: data_shape must be (channels, height, width), "
                             f"got {value!r} (as a string: '(3,224,224)')")  # fmt: skip
        values = [v for v in text[1:-1].split(",") if v.strip()]
    try:
        return tuple(int(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"ImageRecordIter: data_shape must be (channels, height, width), "
                         f"got {value!r}") from None  # fmt: skip


def _flag(kw: dict[str, Any], name: str) -> bool:
    value = kw[name]
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("1", "true"):
            return True
        if lowered in ("0", "false"):
            return False
        raise ValueError(f"ImageRecordIter: {name} must be a boolean, got {value!r}")
    return bool(value)


def _backend(ctx: Any, device_id: int) -> tuple[str, str, int, str]:
    """(device, backend, GPU number, what asked for the GPU) from ``ctx``, ``device_id``
    and ``GPUREC_MXNET_BACKEND``."""
    env = os.environ.get(BACKEND_ENV, "").strip().lower() or "cpu"
    if env not in ("cpu", "dali", "gpu"):
        raise ValueError(f"{BACKEND_ENV}={env!r}: use 'cpu' (OpenCV), 'dali' (DALI, CPU "
                         "mode) or 'gpu' (DALI on GPU device_id)")  # fmt: skip
    if isinstance(ctx, Context):
        if ctx.device_type == "gpu":
            if ctx.device_id < 0:
                raise ValueError(f"ImageRecordIter: ctx={ctx} names no GPU (use gpu(0), "
                                 "gpu(1)...)")  # fmt: skip
            return "gpu", "dali", ctx.device_id, f"ctx={ctx}"
        if ctx.device_type != "cpu":
            raise ValueError(f"ImageRecordIter: ctx {ctx} is neither cpu nor gpu")
        return "cpu", "cpu" if env == "gpu" else env, 0, ""
    if ctx not in ("gpu", "cpu"):
        raise ValueError(f"ImageRecordIter: ctx must be 'gpu' or 'cpu' (MXNet's) or "
                         f"gpurec.mxnet.gpu(i)/cpu(), got {ctx!r}")  # fmt: skip
    if env == "gpu":
        if device_id < 0:  # MXNet's -1: its internal arrays on the CPU
            raise ValueError(f"ImageRecordIter: device_id={device_id} names no GPU, and "
                             f"{BACKEND_ENV}=gpu puts the batches on GPU device_id: give "
                             f"device_id >= 0, or unset {BACKEND_ENV}")  # fmt: skip
        return "gpu", "dali", device_id, f"{BACKEND_ENV}=gpu"
    return "cpu", env, 0, ""


def _geometry(kw: dict[str, Any], spec: dict[str, Any], random: list[str]) -> None:
    """Resize, crop, scale, aspect, rotation, shear, padding and interpolation: MXNet's
    keywords into ``spec``, the random ones named in ``random``."""
    resize = _number(kw, "resize", int)
    if resize != -1 and resize < 1:
        raise ValueError(f"ImageRecordIter: resize must be -1 (keep the size) or >= 1, "
                         f"got {resize}")  # fmt: skip
    spec["resize"] = max(resize, 0)

    max_aspect = _number(kw, "max_aspect_ratio")
    min_aspect = _optional(kw, "min_aspect_ratio")
    if min_aspect is None:
        aspect = (1 - max_aspect, 1 + max_aspect)
    else:
        aspect = (_number(kw, "min_aspect_ratio"), max_aspect)
    if aspect[0] <= 0 or aspect[0] > aspect[1]:
        name = "max_aspect_ratio" if min_aspect is None else "min_aspect_ratio"
        raise ValueError(f"ImageRecordIter: {name} gives the aspect ratio range "
                         f"[{aspect[0]:g}, {aspect[1]:g}]; it must be positive and ordered "
                         "(without min_aspect_ratio: [1 - max, 1 + max])")  # fmt: skip
    rand_crop, rrc = _flag(kw, "rand_crop"), _flag(kw, "random_resized_crop")
    crop_sizes = (_number(kw, "min_crop_size", int), _number(kw, "max_crop_size", int))
    scales = (_number(kw, "min_random_scale"), _number(kw, "max_random_scale"))
    areas = (_number(kw, "min_random_area"), _number(kw, "max_random_area"))
    if rrc:  # MXNet's CHECK: these conflict with random_resized_crop
        for name, value, off in (("rand_crop", rand_crop, False),
                                 ("min_crop_size", crop_sizes[0], -1),
                                 ("max_crop_size", crop_sizes[1], -1),
                                 ("min_random_scale", scales[0], 1.0),
                                 ("max_random_scale", scales[1], 1.0)):  # fmt: skip
            if value != off:
                raise ValueError(f"ImageRecordIter: random_resized_crop=True conflicts with "
                                 f"{name}={kw[name]!r} (as in MXNet)")  # fmt: skip
        if areas != (1.0, 1.0) or aspect != (1.0, 1.0):
            spec.update(crop="random_resized", min_random_area=areas[0],
                        max_random_area=areas[1], min_aspect_ratio=aspect[0],
                        max_aspect_ratio=aspect[1])  # fmt: skip
            random.append("random_resized_crop")
        else:  # MXNet runs no area crop then: the center crop below
            spec["crop"] = "center"
    else:
        spec["crop"] = "random" if rand_crop else "center"
        if rand_crop:
            random.append("rand_crop")
        if (crop_sizes[0] == -1) != (crop_sizes[1] == -1):
            raise ValueError("ImageRecordIter: set both min_crop_size and max_crop_size, or "
                             f"neither (got {crop_sizes[0]} and {crop_sizes[1]})")  # fmt: skip
        if crop_sizes != (-1, -1):
            spec.update(min_crop_size=crop_sizes[0], max_crop_size=crop_sizes[1])
            if crop_sizes[0] != crop_sizes[1]:
                random.append("min/max_crop_size")
        spec.update(min_random_scale=scales[0], max_random_scale=scales[1],
                    min_stretch=aspect[0], max_stretch=aspect[1])  # fmt: skip
        if scales[0] != scales[1]:
            random.append("min/max_random_scale")
        if aspect[0] != aspect[1]:
            random.append("max_aspect_ratio")

    max_angle = _number(kw, "max_rotate_angle")
    rotate = _number(kw, "rotate")
    spec.update(max_rotate_angle=abs(max_angle), rotate=rotate if rotate > 0 else None,
                max_shear_ratio=abs(_number(kw, "max_shear_ratio")),
                min_img_size=_number(kw, "min_img_size"),
                max_img_size=_number(kw, "max_img_size"),
                pad=_number(kw, "pad", int), fill_value=_number(kw, "fill_value"))  # fmt: skip
    if max_angle and not (rotate > 0):
        random.append("max_rotate_angle")
    if spec["max_shear_ratio"]:
        random.append("max_shear_ratio")
    inter = _number(kw, "inter_method", int)
    if inter not in INTER_METHODS:
        raise ValueError(f"ImageRecordIter: inter_method must be one of 0-4, 9, 10 "
                         f"(MXNet's), got {inter}")  # fmt: skip
    spec["interp"] = INTER_METHODS[inter]
    if inter == 10:
        random.append("inter_method=10")


def _colour(kw: dict[str, Any], spec: dict[str, Any], random: list[str]) -> None:
    """Brightness, contrast, saturation, PCA noise, HSL jitter and mirroring."""
    for name in ("brightness", "contrast", "saturation", "pca_noise"):
        spec[name] = _number(kw, name)
        if spec[name] > 0:
            random.append(name)
        elif spec[name] < 0:
            raise ValueError(f"ImageRecordIter: {name} must be >= 0, got {spec[name]}")
    for name in ("random_h", "random_s", "random_l"):
        spec[name] = abs(_number(kw, name, int))  # MXNet's draw is symmetric in the sign
        if spec[name]:
            random.append(name)
    mirror, rand_mirror = _flag(kw, "mirror"), _flag(kw, "rand_mirror")
    spec.update(mirror=mirror, rand_mirror=rand_mirror)
    if rand_mirror:
        random.append("rand_mirror")


def _normaliser(kw: dict[str, Any], spec: dict[str, Any], random: list[str], dtype: str) -> str:
    """Means, standard deviations, scale and the random contrast and illumination, as
    far as ``dtype`` keeps them; returns the ``mean_img`` path ("" for none)."""
    # The normaliser: MXNet applies none of it to uint8, only the rounded mean to int8.
    normalising = {name: kw[name] for name in _NORMALISING
                   if _number(kw, name) != float(MXNET_DEFAULTS[name])}  # fmt: skip
    means = {name: kw[name] for name in ("mean_r", "mean_g", "mean_b")
             if _number(kw, name) != 0.0}  # fmt: skip
    mean_img = os.fspath(kw["mean_img"]) if kw["mean_img"] else ""
    # MXNet ignores them silently (its own example/quantization/imagenet_inference.py
    # passes dtype with mean_r..std_b); gpurec ignores them too, and says so.
    ignored = []
    if dtype == "uint8":
        ignored = [*normalising, *means, *(["mean_img"] if mean_img else [])]
        mean_img = ""  # MXNet neither loads nor makes it for uint8
    elif dtype == "int8":
        ignored = list(normalising)
    if ignored:
        what = ("returns the pixels as they are" if dtype == "uint8"
                else "stores x - round(mean)")  # fmt: skip
        log.warning("ImageRecordIter: dtype=%r %s (as MXNet does): %s ignored", dtype, what,
                    ", ".join(ignored))  # fmt: skip
    if dtype == "float32":
        spec.update(std=(_number(kw, "std_r"), _number(kw, "std_g"), _number(kw, "std_b")),
                    scale=_number(kw, "scale"),
                    max_random_contrast=_number(kw, "max_random_contrast"),
                    max_random_illumination=_number(kw, "max_random_illumination"))  # fmt: skip
        for name in ("max_random_contrast", "max_random_illumination"):
            if spec[name]:
                random.append(name)
    if dtype != "uint8":
        spec["mean"] = (_number(kw, "mean_r"), _number(kw, "mean_g"), _number(kw, "mean_b"))
    return mean_img


def _refuse_nearest(spec: dict[str, Any]) -> None:
    """MXNet's rotate/shear/scale/aspect step refuses nearest-neighbour interpolation."""
    scales = (spec.get("min_random_scale", 1.0), spec.get("max_random_scale", 1.0))
    stretch = (spec.get("min_stretch", 1.0), spec.get("max_stretch", 1.0))
    if spec["interp"] == "nearest" and (
        spec["max_rotate_angle"] or spec["max_shear_ratio"] or spec["rotate"] is not None
        or scales != (1.0, 1.0) or stretch != (1.0, 1.0)
        or spec["max_img_size"] != 1e10 or spec["min_img_size"] != 0
    ):  # fmt: skip
        raise ValueError("ImageRecordIter: inter_method=0 (nearest) is refused by MXNet's "
                         "rotate/shear/scale/aspect step; use 1-4, 9 or 10")  # fmt: skip


def _paths(kw: dict[str, Any]) -> Path | str:
    """``path_imgrec`` (a file or a URL), checked with its ``path_imgidx``: gpurec reads
    the `.idx` beside the `.rec`."""
    rec: Path | str = os.fspath(kw["path_imgrec"])
    if is_url(rec):  # object storage: fetched into gpurec's shard cache, its .idx with it
        idx_url = os.fspath(kw["path_imgidx"] or "")
        beside_url = rec[: -len(".rec")] + ".idx" if rec.endswith(".rec") else None
        if idx_url and idx_url != beside_url:
            raise ValueError(f"ImageRecordIter: path_imgidx {idx_url} is not {beside_url}: "
                             "gpurec reads the .idx beside the .rec")  # fmt: skip
    elif not Path(rec).is_file():
        raise FileNotFoundError(f"ImageRecordIter: path_imgrec {rec} is not a .rec file")
    elif kw["path_imgidx"]:
        rec = Path(rec)
        idx = Path(os.fspath(kw["path_imgidx"]))
        if not idx.is_file():
            raise FileNotFoundError(f"ImageRecordIter: path_imgidx {idx} does not exist")
        beside = rec.with_suffix(".idx")
        if not beside.is_file() or not os.path.samefile(idx, beside):
            raise ValueError(
                f"ImageRecordIter: path_imgidx {idx} is not {beside}: gpurec "
                "reads the .idx beside the .rec (rename or link it there)"
            )
    return rec


def translate(kwargs: dict[str, Any]) -> dict[str, Any]:
    """MXNet's keywords (defaults filled in) as gpurec's: ``{"pipeline": Pipeline
    keywords (with ``source``), "spec": AugmentSpec keywords, "iter": what the iterator
    keeps}``. Raises ``TypeError`` for an unknown keyword and ``ValueError`` naming the
    keyword for a value that cannot be honoured."""
    unknown = sorted(set(kwargs) - set(MXNET_DEFAULTS))
    if unknown:
        raise TypeError(f"ImageRecordIter got unknown keyword(s): {', '.join(unknown)} "
                        "(MXNet 1.9.1 has no such keyword)")  # fmt: skip
    kw = {**MXNET_DEFAULTS, **kwargs}
    for name in REQUIRED:
        if kw[name] in (None, ""):
            raise ValueError(f"ImageRecordIter: {name} is required")
    if kw["aug_seq"] != "aug_default":
        raise ValueError(f"ImageRecordIter: aug_seq={kw['aug_seq']!r} is not supported: "
                         "only MXNet's default augmenter, 'aug_default'")  # fmt: skip
    shape = _shape(kw["data_shape"])
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"ImageRecordIter: data_shape must be 3 positive numbers "
                         f"(channels, height, width), got {kw['data_shape']!r}")  # fmt: skip
    if shape[0] != 3:
        raise ValueError(f"ImageRecordIter: data_shape {shape} has {shape[0]} channel(s); "
                         "gpurec makes 3-channel (RGB) images only")  # fmt: skip
    batch_size = _positive(kw, "batch_size")
    label_width = _positive(kw, "label_width")
    dtype = _optional(kw, "dtype")
    dtype = "float32" if dtype is None else str(np.dtype(dtype).name if not isinstance(
        dtype, str) else dtype)  # fmt: skip
    if dtype not in DTYPES:
        raise ValueError(f"ImageRecordIter: dtype={kw['dtype']!r} is not supported "
                         "(MXNet's: None, 'float32', 'uint8', 'int8')")  # fmt: skip

    spec: dict[str, Any] = {"data_shape": shape, "dtype": dtype, "layout": "NCHW"}
    random: list[str] = []  # the random augmentations asked for: they make train=True

    _geometry(kw, spec, random)
    _colour(kw, spec, random)
    mean_img = _normaliser(kw, spec, random, dtype)
    _refuse_nearest(spec)
    spec["train"] = bool(random)

    num_parts, part_index = _number(kw, "num_parts", int), _number(kw, "part_index", int)
    if num_parts < 1 or not 0 <= part_index < num_parts:
        raise ValueError(f"ImageRecordIter: part_index must be in 0..num_parts-1, got "
                         f"part_index={part_index}, num_parts={num_parts}")  # fmt: skip
    threads = _positive(kw, "preprocess_threads")
    prefetch = _positive(kw, "prefetch_buffer")
    rec = _paths(kw)
    chunk_shuffle = not kw["path_imgidx"] and _number(kw, "shuffle_chunk_size", int) > 0
    shuffle = _flag(kw, "shuffle")
    seed = _number(kw, "seed", int)
    if chunk_shuffle and not shuffle:  # MXNet shuffles chunks even without shuffle
        shuffle, seed = True, _number(kw, "shuffle_chunk_seed", int)
    seed_aug = None if _optional(kw, "seed_aug") is None else _number(kw, "seed_aug", int)
    device_id = _number(kw, "device_id", int)
    device, backend, gpu_id, gpu_why = _backend(kw["ctx"], device_id)
    pipeline = dict(
        source=str(rec), batch_size=batch_size, device=device, backend=backend,
        shuffle=shuffle, seed=seed, augment_seed=seed_aug, shard_id=part_index,
        num_shards=num_parts, last_batch="wrap" if _flag(kw, "round_batch") else "pad",
        num_threads=threads, prefetch=prefetch,
    )  # fmt: skip
    state = dict(
        data_name=str(kw["data_name"]), label_name=str(kw["label_name"]),
        label_width=label_width, path_imglist=os.fspath(kw["path_imglist"] or ""),
        mean_img=mean_img, gpu_id=gpu_id, gpu_why=gpu_why, verbose=_flag(kw, "verbose"),
        dtype=dtype,
    )  # fmt: skip
    return {"pipeline": pipeline, "spec": spec, "iter": state}
