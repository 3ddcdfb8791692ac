"""``mxnet.gluon.data.dataset`` of MXNet 1.9.1: ``Dataset`` with its lazy transforms,
``SimpleDataset``, ``ArrayDataset`` and ``RecordFileDataset``."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from gpurec.mxnet import recordio

__all__ = ["ArrayDataset", "Dataset", "RecordFileDataset", "SimpleDataset"]


class Dataset:
    """MXNet's abstract dataset: ``__getitem__`` and ``__len__``, and the views
    ``transform``, ``transform_first``, ``filter``, ``take`` and ``shard``."""

    def __getitem__(self, idx: int):
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def transform(self, fn: Callable, lazy: bool = True) -> Dataset:
        """Items passed through ``fn`` (a tuple item is unpacked into its arguments):
        on every read (``lazy``) or once, now."""
        trans = _LazyTransformDataset(self, fn)
        if lazy:
            return trans
        return SimpleDataset([trans[i] for i in range(len(trans))])

    def transform_first(self, fn: Callable, lazy: bool = True) -> Dataset:
        """``fn`` applied to the first element of each item only (the image of
        ``(image, label)``), the rest kept."""
        return self.transform(_TransformFirstClosure(fn), lazy)

    def filter(self, fn: Callable[[Any], bool]) -> Dataset:
        """The items for which ``fn(item)`` is true (every item is read once, now)."""
        return _SampledDataset(self, [i for i in range(len(self)) if fn(self[i])])

    def take(self, count: int | None) -> Dataset:
        """The first ``count`` items (all of them for None or more than there are)."""
        if count is None or count > len(self):
            count = len(self)
        return _SampledDataset(self, list(range(count)))

    def shard(self, num_shards: int, index: int) -> Dataset:
        """Part ``index`` of ``num_shards`` contiguous parts, the first ``len % num_shards``
        one item longer."""
        if not 0 <= index < num_shards:
            raise ValueError(f"shard index {index} out of range 0..{num_shards - 1}")
        length = len(self)
        size, rest = divmod(length, num_shards)
        start = size * index + min(index, rest)
        return _SampledDataset(self, list(range(start, start + size + (index < rest))))


class SimpleDataset(Dataset):
    """Any sequence (a list, an array) as a Dataset."""

    def __init__(self, data: Sequence) -> None:
        self._data = data

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, idx: int):
        return self._data[idx]


class ArrayDataset(Dataset):
    """Several sequences of one length zipped: item ``i`` is ``(a[i], b[i], ...)`` (the
    element itself for a single sequence)."""

    def __init__(self, *args: Sequence) -> None:
        if not args:
            raise ValueError("ArrayDataset needs at least one sequence")
        self._length = len(args[0])
        for i, data in enumerate(args):
            if len(data) != self._length:
                raise ValueError(f"all arrays must have the same length: array 0 has "
                                 f"{self._length}, array {i} has {len(data)}")  # fmt: skip
        self._data = args

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, idx: int):
        if len(self._data) == 1:
            return self._data[0][idx]
        return tuple(data[idx] for data in self._data)


class _LazyTransformDataset(Dataset):
    def __init__(self, data: Dataset, fn: Callable) -> None:
        self._data, self._fn = data, fn

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, idx: int):
        item = self._data[idx]
        if isinstance(item, tuple):
            return self._fn(*item)
        return self._fn(item)


class _TransformFirstClosure:
    """Picklable (for DataLoader workers), as MXNet's is."""

    def __init__(self, fn: Callable) -> None:
        self._fn = fn

    def __call__(self, x, *args):
        if args:
            return (self._fn(x), *args)
        return self._fn(x)


class _SampledDataset(Dataset):
    def __init__(self, dataset: Dataset, indices: list[int]) -> None:
        self._dataset, self._indices = dataset, indices

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, idx: int):
        return self._dataset[self._indices[idx]]


class RecordFileDataset(Dataset):
    """The records of a `.rec` file, by the keys of its `.idx` (``<stem>.idx``): item
    ``i`` is the raw record of the ``i``-th key (``mx.recordio.unpack`` splits it)."""

    def __init__(self, filename: str) -> None:
        self.idx_file = os.path.splitext(filename)[0] + ".idx"
        self.filename = filename
        self._record = recordio.MXIndexedRecordIO(self.idx_file, self.filename, "r")

    def __getitem__(self, idx: int) -> bytes:
        return self._record.read_idx(self._record.keys[idx])

    def __len__(self) -> int:
        return len(self._record.keys)
