"""``mxnet.io.ImageRecordIter`` of MXNet 1.9.1 on gpurec: ``import gpurec.mxnet as mx``.

Training scripts pass ImageRecordIter dozens of keywords (MXNet's
``example/image-classification/common/data.py``, gluon-cv's ``train_imagenet.py
--use-rec``, Horovod's ResNet-50 example). :class:`ImageRecordIter` accepts every one of
them with MXNet's default and meaning, translates them onto one :class:`gpurec.Pipeline`
(whose :class:`~gpurec.augment.AugmentSpec` follows MXNet's augmenter step by step) and
hands out batches through MXNet's iteration protocol (``next()``, ``reset()``,
``iter_next()``, ``getdata()``..., ``DataBatch.data[0]/.label[0]/.pad/.index``,
``provide_data``/``provide_label``).

Unlike MXNet, a keyword it does not know is a ``TypeError`` naming it (MXNet accepts
typos silently), and a value it cannot honour is an error naming the keyword.

**Where the batches are made.** ``ctx`` keeps MXNet's meaning: the strings ``"gpu"``
(MXNet's default) and ``"cpu"`` only say which device the loader is tuned for, and the
arrays are on the host, NumPy arrays with ``asnumpy()``
(:class:`gpurec.mxnet.image.NDArray`). The environment variable ``GPUREC_MXNET_BACKEND``
picks who makes them without touching the script: ``"cpu"`` (OpenCV, the default),
``"dali"`` (NVIDIA DALI in its CPU mode) or ``"gpu"`` (DALI on GPU ``device_id``, which
MXNet scripts already set to their local GPU; the arrays are then CuPy arrays, with
``asnumpy()`` as well). ``ctx=gpurec.mxnet.gpu(i)`` asks for GPU ``i`` in the code,
``ctx=gpurec.mxnet.cpu()`` for the host.

**What differs from MXNet, deliberately** (all else is MXNet's):

- ``shuffle``: gpurec draws a new permutation of all records every epoch, from ``seed``
  (MXNet shuffles within chunks of its split; the order differs, and this one is a true
  shuffle). ``shuffle_chunk_size``/``shuffle_chunk_seed`` (MXNet's chunk shuffle of files
  read without an index) shuffle the same way: from ``shuffle_chunk_seed``, or from
  ``seed`` when ``shuffle`` is on as well (one permutation, one seed).
- The augmentations are drawn from ``(seed_aug or seed, epoch, batch, part)``: they differ from
  epoch to epoch and are reproducible, on both backends. MXNet draws them from
  per-thread generators with fixed seeds, and with ``seed_aug`` reseeds per position in
  the batch, so that every batch repeats the same augmentations.
- ``index`` holds the records' ids (``IRHeader.id``, MXNet's ``image_index``); MXNet
  1.9.1 leaves it zero.
- ``round_batch=False``: the last batch is filled with repeats of the last record and
  ``pad`` counts them; MXNet leaves the previous batch's rows there and reports pad 0.
  A part with fewer batches than the largest part ends sooner: no batch is all padding
  (as in MXNet, parts can differ in batch count).
- ``round_batch=True`` (the default) is MXNet's: the last batch is filled with the first
  records of the next epoch, ``pad`` counts them, and the next epoch starts after them
  (so its length varies by one). A ``reset()`` in the middle of an epoch starts the next
  epoch where a whole epoch would have ended (MXNet restarts at the first record).
- ``num_parts``/``part_index``: part ``k`` of ``P`` reads the slice ``[N*k//P,
  N*(k+1)//P)`` of each epoch's order (MXNet splits the file into parts of ``ceil(N/P)``
  records, the last one smaller, and shuffles within a part): 10 records in 3 parts are
  0-2, 3-5, 6-9 here, 0-3, 4-7, 8-9 in MXNet. ``mean_img``, when made, is the mean of all
  records (MXNet's: of its part).
- ``dtype="uint8"`` ignores ``mean_*``, ``std_*``, ``scale``, ``mean_img`` and
  ``max_random_contrast/illumination``, ``dtype="int8"`` all but the means, as MXNet
  does; gpurec says so in a warning.
- Keyword values may be strings, as MXNet reads them (``"(3,224,224)"``, ``"None"``,
  ``"True"``, ``"0.5"``).
- ``device_id`` without the GPU backend, ``verbose``'s wording, ``mean_a``/``std_a``
  (no alpha channel: ``data_shape`` has 3 channels) change no value.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gpurec.mxnet.image import NDArray
from gpurec.storage import is_url

__all__ = [
    "MXNET_DEFAULTS",
    "DataBatch",
    "DataDesc",
    "ImageRecordIter",
    "read_ndarray_file",
    "translate",
    "write_ndarray_file",
]

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


# ---------------------------------------------------------------------------- contexts


@dataclass(frozen=True)
class Context:
    """``mx.cpu()`` / ``mx.gpu(i)``: where :class:`ImageRecordIter` puts its arrays when
    given as ``ctx`` (MXNet's own ``ctx`` strings keep the arrays on the host)."""

    device_type: str
    device_id: int = 0

    def __str__(self) -> str:
        return f"{self.device_type}({self.device_id})"


def cpu(device_id: int = 0) -> Context:
    return Context("cpu", device_id)


def gpu(device_id: int = 0) -> Context:
    return Context("gpu", device_id)


# ------------------------------------------------------------------- batches, shapes


class DataDesc(tuple):
    """MXNet's ``DataDesc``: a ``(name, shape)`` pair (``dict(it.provide_data)`` works)
    with ``dtype`` and ``layout``."""

    def __new__(cls, name: str, shape: tuple[int, ...], dtype: Any = np.float32,
                layout: str = "NCHW") -> DataDesc:  # fmt: skip
        self = super().__new__(cls, (name, tuple(shape)))
        self.dtype = np.dtype(dtype).type
        self.layout = layout
        return self

    @property
    def name(self) -> str:
        return self[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return self[1]

    def __repr__(self) -> str:
        return f"DataDesc[{self.name},{self.shape},{self.dtype},{self.layout}]"


@dataclass
class DataBatch:
    """MXNet's ``DataBatch``: ``data`` and ``label`` are lists of one array each."""

    data: list
    label: list
    pad: int = 0
    index: np.ndarray | None = None
    bucket_key: Any = None
    provide_data: list[DataDesc] | None = None
    provide_label: list[DataDesc] | None = None

    def __str__(self) -> str:
        shapes = [tuple(d.shape) for d in self.data], [tuple(d.shape) for d in self.label]
        return f"DataBatch: data shapes: {shapes[0]} label shapes: {shapes[1]}"


def _gpu_array_class():
    """A CuPy array type with ``asnumpy()`` (made on first use: CuPy is optional)."""
    import cupy

    global _GPUArray
    if _GPUArray is None:

        class GPUNDArray(cupy.ndarray):
            def asnumpy(self) -> np.ndarray:
                return cupy.asnumpy(self)

        _GPUArray = GPUNDArray
    return _GPUArray


_GPUArray = None


def _nd(array: Any) -> Any:
    """The array with ``asnumpy()``: a view, no copy."""
    if isinstance(array, np.ndarray):
        return array.view(NDArray)
    if type(array).__module__.startswith("torch"):  # output="torch": tensors as they are
        return array
    return array.view(_gpu_array_class())  # CuPy, device="gpu"


# ------------------------------------------------------------------------- mean image

_LIST_MAGIC = 0x112
_V2_MAGIC, _V3_MAGIC = 0xF993FAC9, 0xF993FACA
_TYPE_FLAGS = {0: np.float32, 1: np.float64, 2: np.float16, 3: np.uint8, 4: np.int32,
               5: np.int8, 6: np.int64}  # fmt: skip


def read_ndarray_file(path: str | os.PathLike) -> dict[str, np.ndarray] | list[np.ndarray]:
    """Dense arrays from an ``mx.nd.save`` file (MXNet's ``NDArray::Save`` list format,
    versions 2 and 3): a dict when the file names them, else a list."""
    data = Path(path).read_bytes()
    pos = 0

    def take(fmt: str) -> tuple:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise ValueError(f"{path}: not an MXNet NDArray file (ends at byte {len(data)})")
        out = struct.unpack_from(fmt, data, pos)
        pos += size
        return out

    magic, _ = take("<QQ")
    if magic != _LIST_MAGIC:
        raise ValueError(f"{path}: not an MXNet NDArray file (magic {magic:#x})")
    (count,) = take("<Q")
    arrays = []
    for k in range(count):
        (version,) = take("<I")
        if version not in (_V2_MAGIC, _V3_MAGIC):
            raise ValueError(f"{path}: array {k} has format {version:#x}; only MXNet's "
                             "formats 2 and 3 (MXNet >= 1.0) are read")  # fmt: skip
        (stype,) = take("<i")
        if stype != 0:
            raise ValueError(f"{path}: array {k} is sparse (storage type {stype})")
        (ndim,) = take("<i")
        shape = take(f"<{ndim}q") if ndim > 0 else ()
        take("<ii")  # the context it was saved from
        (flag,) = take("<i")
        if flag not in _TYPE_FLAGS:
            raise ValueError(f"{path}: array {k} has an unknown type flag {flag}")
        dtype = np.dtype(_TYPE_FLAGS[flag])
        size = int(np.prod(shape)) * dtype.itemsize
        if pos + size > len(data):
            raise ValueError(f"{path}: array {k} is cut short")
        arrays.append(np.frombuffer(data, dtype, int(np.prod(shape)), pos).reshape(shape).copy())
        pos += size
    (nkeys,) = take("<Q")
    keys = []
    for _ in range(nkeys):
        (n,) = take("<Q")
        keys.append(data[pos : pos + n].decode())
        pos += n
    if keys and len(keys) != len(arrays):
        raise ValueError(f"{path}: {len(keys)} names for {len(arrays)} arrays")
    return dict(zip(keys, arrays, strict=True)) if keys else arrays


def write_ndarray_file(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """Write dense float32 arrays as ``mx.nd.save(path, arrays)`` does (format 2)."""
    out = [struct.pack("<QQQ", _LIST_MAGIC, 0, len(arrays))]
    for array in arrays.values():
        a = np.ascontiguousarray(array, np.float32)
        out.append(struct.pack(f"<Iii{a.ndim}q", _V2_MAGIC, 0, a.ndim, *a.shape))
        out.append(struct.pack("<iii", 1, 0, 0))  # cpu(0), float32
        out.append(a.tobytes())
    out.append(struct.pack("<Q", len(arrays)))
    for key in arrays:
        out.append(struct.pack("<Q", len(key.encode())) + key.encode())
    tmp = Path(f"{path}.tmp{os.getpid()}")
    tmp.write_bytes(b"".join(out))
    os.replace(tmp, path)


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
    if inter == 0 and (max_angle or spec["max_shear_ratio"] or rotate > 0
                       or scales != (1.0, 1.0) or (not rrc and aspect != (1.0, 1.0))
                       or spec["max_img_size"] != 1e10 or spec["min_img_size"] != 0):  # fmt: skip
        raise ValueError("ImageRecordIter: inter_method=0 (nearest) is refused by MXNet's "
                         "rotate/shear/scale/aspect step; use 1-4, 9 or 10")  # fmt: skip
    spec["train"] = bool(random)

    num_parts, part_index = _number(kw, "num_parts", int), _number(kw, "part_index", int)
    if num_parts < 1 or not 0 <= part_index < num_parts:
        raise ValueError(f"ImageRecordIter: part_index must be in 0..num_parts-1, got "
                         f"part_index={part_index}, num_parts={num_parts}")  # fmt: skip
    threads = _positive(kw, "preprocess_threads")
    prefetch = _positive(kw, "prefetch_buffer")
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


# -------------------------------------------------------------------------- image list


def read_imglist(path: str | os.PathLike, label_width: int) -> dict[int, np.ndarray]:
    """MXNet's ``ImageLabelMap``: ``index<TAB>label...<TAB>path`` lines; the first
    ``label_width`` numbers after the index are the labels of record id ``index``."""
    labels: dict[int, np.ndarray] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            try:
                index = int(float(fields[0]))
                values = [float(v) for v in fields[1 : 1 + label_width]]
            except ValueError:
                raise ValueError(f"{path} line {number}: expected an index and {label_width} "
                                 f"number(s), got {line.strip()!r}") from None  # fmt: skip
            if len(values) < label_width:
                raise ValueError(f"{path} line {number}: {len(values)} label(s), label_width "
                                 f"is {label_width}: {line.strip()!r}")  # fmt: skip
            labels[index] = np.array(values, np.float32)
    return labels


# ---------------------------------------------------------------------------- iterator


class ImageRecordIter:
    """MXNet 1.9.1's ``mx.io.ImageRecordIter`` (the module docstring says what differs).

    >>> import gpurec.mxnet as mx
    >>> it = mx.io.ImageRecordIter(path_imgrec="train.rec", data_shape=(3, 224, 224),
    ...                            batch_size=32, resize=256, rand_crop=True,
    ...                            rand_mirror=True)              # doctest: +SKIP
    >>> for batch in it:                                            # doctest: +SKIP
    ...     x, y = batch.data[0], batch.label[0]
    >>> it.reset()                                                  # doctest: +SKIP

    ``pipe``: the :class:`gpurec.Pipeline` underneath (``pipe.spec`` is the translated
    :class:`~gpurec.augment.AugmentSpec`).
    """

    def __init__(self, **kwargs: Any) -> None:
        self._build(kwargs, {})

    @classmethod
    def with_pipeline_options(cls, options: dict[str, Any], **kwargs: Any) -> ImageRecordIter:
        """MXNet's keywords plus :class:`gpurec.Pipeline` keywords MXNet has no word for
        (``on_error``, ``cache_dir``, ``cache_limit``, ``storage_options``, ``output``,
        ``label_dtype``): ``gpurec show`` reads an ImageRecordIter config with
        ``on_error="skip"`` this way, and ``{"output": "torch", "label_dtype": "int64"}``
        hands ``batch.data[0]``/``batch.label[0]`` to a PyTorch loop as tensors."""
        allowed = {"on_error", "cache_dir", "cache_limit", "storage_options", "output",
                   "label_dtype"}  # fmt: skip
        other = sorted(set(options) - allowed)
        if other:
            raise TypeError(f"ImageRecordIter.with_pipeline_options: {', '.join(other)} is "
                            f"not one of {', '.join(sorted(allowed))}")  # fmt: skip
        self = cls.__new__(cls)
        self._build(kwargs, dict(options))
        return self

    def _build(self, kwargs: dict[str, Any], extra: dict[str, Any]) -> None:
        from gpurec.augment import AugmentSpec
        from gpurec.pipeline import Pipeline

        self._closed = False
        t = translate(kwargs)
        self._opts = t["iter"]
        self._gpu_id = self._opts["gpu_id"]
        self._device = t["pipeline"]["device"]
        spec, options = dict(t["spec"]), {**t["pipeline"], **extra}
        AugmentSpec(**spec)  # the spec's own errors, before any file is opened
        width = self._opts["label_width"]
        # A bad .lst is reported before any work (the Pipeline, a mean image pass).
        self._labels = None
        if self._opts["path_imglist"]:
            self._labels = read_imglist(self._opts["path_imglist"], width)
        mean_img = self._opts["mean_img"]
        if mean_img and Path(mean_img).exists():
            spec["mean_image"] = self._load_mean(mean_img, spec["data_shape"])
        source = options.pop("source")
        batch_size = options.pop("batch_size")
        with self._on_device():
            if mean_img and "mean_image" not in spec:
                spec["mean_image"] = self._make_mean(source, batch_size, options, spec, mean_img)
            self.pipe = Pipeline(source, batch_size, **options, **spec)
        self.batch_size = batch_size
        if self._labels is None and width != self.pipe.label_width:
            path = self.pipe.dataset.paths[0]
            with self._on_device():
                self.pipe.close()
            raise ValueError(
                f"ImageRecordIter: label_width={width}, but {path} holds "
                f"{self.pipe.label_width} label(s) per record (set label_width to it, or "
                "give path_imglist)"
            )
        dtype = np.dtype(self._opts["dtype"])
        label_shape = (batch_size,) if width == 1 else (batch_size, width)
        self.provide_data = [DataDesc(self._opts["data_name"], (batch_size, *spec["data_shape"]),
                                      dtype)]  # fmt: skip
        self.provide_label = [DataDesc(self._opts["label_name"], label_shape, np.float32)]
        self.default_bucket_key = None
        self._epoch: Iterator | None = None
        self._epoch_batches = 0  # len() of the epoch being read
        self._exhausted = False
        self._current: DataBatch | None = None
        self._pending: DataBatch | None = None  # read ahead by getdata() (MXNet's first_batch)
        if self._opts["verbose"]:
            log.info("ImageRecordIter: %s, %d records, %s, %d threads", source,
                     len(self.pipe.dataset), self.pipe.backend.__class__.__name__,
                     self.pipe.num_threads)  # fmt: skip

    # ------------------------------------------------------------------ helpers
    def _on_device(self):
        """The GPU of ``ctx``/``device_id`` current while gpurec works, when on the GPU."""
        import contextlib

        if self._device != "gpu":
            return contextlib.nullcontext()
        try:
            import cupy
        except ImportError:
            raise ImportError(
                f"ImageRecordIter: {self._opts['gpu_why']} makes the batches on the GPU with "
                "DALI and CuPy: pip install 'gpurec[gpu]' (CUDA 12), or read on the CPU "
                f"({BACKEND_ENV}=cpu or dali, ctx=gpurec.mxnet.cpu())"
            ) from None
        return cupy.cuda.Device(self._gpu_id)

    @staticmethod
    def _load_mean(path: str, shape: tuple[int, int, int]) -> np.ndarray:
        arrays = read_ndarray_file(path)
        values = list(arrays.values()) if isinstance(arrays, dict) else arrays
        if len(values) != 1:
            raise ValueError(f"ImageRecordIter: mean_img {path} holds {len(values)} arrays, "
                             "not 1 (MXNet: invalid mean image file format)")  # fmt: skip
        mean = values[0].astype(np.float32)
        if mean.shape != tuple(shape):
            raise ValueError(f"ImageRecordIter: mean_img {path} has shape {mean.shape}, the "
                             f"data shape is {tuple(shape)}")  # fmt: skip
        return mean

    def _make_mean(self, source: str, batch_size: int, options: dict[str, Any],
                   spec: dict[str, Any], path: str) -> np.ndarray:  # fmt: skip
        """MXNet's ``CreateMeanImg``: the mean of every record's output (augmented and
        normalised as asked, without a mean image) over one pass, saved to ``path`` in
        MXNet's format under the key ``mean_img``."""
        from gpurec.pipeline import Pipeline

        log.info("ImageRecordIter: %s not found: computing the mean image", path)
        options = {**options, "shard_id": 0, "num_shards": 1, "shuffle": False,
                   "last_batch": "partial"}  # fmt: skip
        total, count = None, 0
        with Pipeline(source, batch_size, **options, **spec) as pipe:
            for batch in pipe:
                data = batch.data
                data = data if isinstance(data, np.ndarray) else data.get()
                real = len(data) - batch.pad
                part = data[:real].astype(np.float64).sum(axis=0)
                total = part if total is None else total + part
                count += real
        mean = (total / count).astype(np.float32)
        write_ndarray_file(path, {"mean_img": mean})
        return mean

    def _record_ids(self, index: np.ndarray) -> np.ndarray:
        """The records' own ids (``IRHeader.id``), MXNet's ``image_index``."""
        dataset = self.pipe.dataset
        return np.array([struct.unpack_from("<Q", dataset.read_view(int(i)), 8)[0]
                         for i in index], np.uint64)  # fmt: skip

    def _relabel(self, ids: np.ndarray) -> np.ndarray:
        width = self._opts["label_width"]
        out = np.empty((len(ids), width), np.float32)
        for row, i in enumerate(ids.tolist()):
            found = self._labels.get(int(i))
            if found is None:
                raise KeyError(f"ImageRecordIter: {self._opts['path_imglist']} has no line "
                               f"for record id {i} (MXNet: fail to find imagelabel)")  # fmt: skip
            out[row] = found
        return out[:, 0] if width == 1 else out

    # ------------------------------------------------------------ MXNet's protocol
    def __iter__(self) -> ImageRecordIter:
        return self

    def reset(self) -> None:
        """Start the next epoch (MXNet's ``BeforeFirst``). Called before any batch of an
        epoch is read, it changes nothing: scripts that reset at the start of every
        epoch lose no epoch (nor does a batch only looked at by ``getdata()``)."""
        if self._pending is not None:  # the epoch's first batch, not handed out yet
            return
        if self._epoch is not None:
            with self._on_device():
                self._epoch.close()
        self._epoch = None
        self._exhausted = False
        self._current = None

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("ImageRecordIter is closed")

    def iter_next(self) -> bool:
        """Move to the next batch; False at the end of the epoch (until ``reset()``)."""
        self._check_open()
        if self._pending is not None:
            self._current, self._pending = self._pending, None
            return True
        if self._exhausted:
            return False
        with self._on_device():
            if self._epoch is None:
                self._epoch_batches = self._batches_ahead()
                self._epoch = iter(self.pipe)
            try:
                batch = next(self._epoch)
            except StopIteration:
                batch = None
            # With round_batch=False, a part smaller than the largest has batches of
            # padding only at the end of its epoch: MXNet never hands one out.
            if batch is not None and batch.pad >= self.batch_size:
                self._epoch.close()
                batch = None
            if batch is None:
                self._exhausted, self._epoch, self._current = True, None, None
                return False
            ids = self._record_ids(batch.index)
            label = batch.label
            if self._labels is not None:
                label = self._relabel(ids)
                if self.pipe.label_dtype == "int64":  # as the Pipeline's: checked, then cast
                    from gpurec.handoff import int64_labels

                    label = int64_labels(label, self._opts["path_imglist"])
                if self.pipe.output == "torch":  # beside the images, as the Pipeline's
                    import torch

                    label = torch.as_tensor(label, device=batch.data.device)
                elif not isinstance(batch.data, np.ndarray):  # the GPU backend: labels there too
                    import cupy

                    label = cupy.asarray(label)
        self._current = DataBatch(
            [_nd(batch.data)], [_nd(label)], int(batch.pad), ids,
            provide_data=self.provide_data, provide_label=self.provide_label,
        )  # fmt: skip
        return True

    def _batches_ahead(self) -> int:
        """Batches the next epoch hands out: the Pipeline's, less those of padding only."""
        if self.pipe.last_batch != "pad":
            return len(self.pipe)
        return sum(1 for real in self.pipe.plan(self.pipe.epoch).real if real > 0)

    def next(self) -> DataBatch:
        if not self.iter_next():
            raise StopIteration
        return self._current

    __next__ = next

    def _need_batch(self) -> DataBatch:
        """The current batch. Before the first ``iter_next()`` of an epoch, its first batch,
        read ahead and still handed out by the next ``iter_next()``/``next()`` (MXNet's
        iterator reads it when made, so ``getdata()`` works right away)."""
        self._check_open()
        at_start = self._current is None and self._epoch is None and not self._exhausted
        if at_start and self.iter_next():
            self._pending = self._current
        if self._current is None:
            raise RuntimeError("ImageRecordIter: no current batch: the epoch is over "
                               "(call reset())")  # fmt: skip
        return self._current

    def getdata(self) -> Any:
        """The current batch's data array (MXNet's ``getdata()``: the array, not a list)."""
        return self._need_batch().data[0]

    def getlabel(self) -> Any:
        """The current batch's label array (MXNet's ``getlabel()``: the array, not a list)."""
        return self._need_batch().label[0]

    def getpad(self) -> int:
        return self._need_batch().pad

    def getindex(self) -> np.ndarray:
        return self._need_batch().index

    def __len__(self) -> int:
        """Batches in the epoch being read, or in the next (MXNet's iterator has no len;
        with ``round_batch`` it varies by one from epoch to epoch)."""
        if self._epoch is not None:
            return self._epoch_batches
        return self._batches_ahead()

    def close(self) -> None:
        if self._closed:
            return
        self._pending = None
        self.reset()
        with self._on_device():
            self.pipe.close()
        self._closed = True

    def __enter__(self) -> ImageRecordIter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"ImageRecordIter({self.provide_data[0]!r}, {self.provide_label[0]!r}, "
                f"{self.pipe!r})")  # fmt: skip
