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

from gpurec.mxnet.context import Context, cpu, gpu  # noqa: F401 - mx.io users find them here
from gpurec.mxnet.image import NDArray
from gpurec.mxnet.keywords import BACKEND_ENV, MXNET_DEFAULTS, translate  # noqa: F401
from gpurec.recordio import atomic_write, peek_header

__all__ = [
    "DataBatch",
    "DataDesc",
    "ImageRecordIter",
    "read_ndarray_file",
    "write_ndarray_file",
]

log = logging.getLogger("gpurec.mxnet.io")

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
    with atomic_write(path) as f:
        f.write(b"".join(out))


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
        return np.array([peek_header(dataset.head(int(i)))[2] for i in index], np.uint64)

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
