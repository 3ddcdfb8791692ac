"""``gpurec.Pipeline``: `.rec` shards in, augmented batches out, one epoch per ``iter()``.

This module owns what is the same on every backend: resolving the source, the epoch
and rank arithmetic (which records each rank sees, how many batches, how the last one
is padded), checkpoints, and the hand-off of arrays to the caller (NumPy for
``device="cpu"``, CuPy on the current GPU for ``device="gpu"``). The backends only turn
a batch's records into pixels: :mod:`gpurec.backends.dali` (NVIDIA DALI, on the GPU or
in its CPU mode) and :mod:`gpurec.backends.cpu` (OpenCV and NumPy).

Ranks: ``shard_id``/``num_shards`` default to ``RANK``/``WORLD_SIZE`` (torchrun). Rank
``k`` of ``S`` reads records ``[N*k//S, N*(k+1)//S)`` of the epoch's order; every rank
gets ``floor(min share / batch)`` batches with ``last_batch="drop"`` and
``ceil(max share / batch)`` with ``"pad"`` (repeats of the rank's last record fill the
batch, ``batch.pad`` counts them) or ``"partial"`` (the padding is cut off, but a batch
is never empty). The CPU backend draws a new global permutation every epoch; DALI's
reader shuffles within a buffer and moves each rank to the next shard every epoch.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpurec.augment import AugmentSpec
from gpurec.dataset import Dataset, resolve_source
from gpurec.recordio import RecordIOError

__all__ = ["Batch", "Pipeline", "rank_range"]

LAST_BATCH = ("drop", "pad", "partial")


@dataclass
class Batch:
    """One batch: images, labels (float32; ``(N,)`` or ``(N, k)``), and padded count."""

    data: Any
    label: Any
    pad: int = 0

    def __iter__(self):  # ``data, label = batch``
        yield self.data
        yield self.label


def rank_range(n: int, num_shards: int, shard_id: int) -> tuple[int, int]:
    """The slice of an epoch's ``n`` records that rank ``shard_id`` reads (as DALI cuts)."""
    return n * shard_id // num_shards, n * (shard_id + 1) // num_shards


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


class Pipeline:
    """Batches of augmented images from `.rec` shards, on the GPU or the CPU.

    >>> pipe = Pipeline("out/imagenet_train", 256, device="gpu", mean=(123.68, 116.28,
    ...                 103.53), std=(58.395, 57.12, 57.375))        # doctest: +SKIP
    >>> for data, label in pipe: ...                                # one epoch

    ``source``: a `.rec`, a prefix, a glob or a list of them (each shard with its
    `.idx`). ``device``: ``"gpu"`` (CuPy arrays on the current device, decoded by
    nvJPEG through DALI) or ``"cpu"`` (NumPy arrays). ``backend``: ``"dali"``,
    ``"cpu"`` (OpenCV, no DALI needed) or ``"auto"`` (DALI on the GPU; on the CPU the
    OpenCV backend, which measured faster than DALI's CPU mode here). Augmentation
    keywords are :class:`AugmentSpec` fields.
    ``shuffle`` defaults to ``train``. ``on_error="skip"`` (CPU backend) replaces a
    record that does not decode by the next good one of its batch and counts it in
    ``pipe.skipped``; ``"raise"`` stops with the shard, record and byte offset.
    """

    def __init__(
        self,
        source: str | os.PathLike | Sequence[str | os.PathLike],
        batch_size: int,
        data_shape: Sequence[int] = (3, 224, 224),
        *,
        device: str = "gpu",
        backend: str = "auto",
        train: bool = True,
        shuffle: bool | None = None,
        seed: int = 0,
        shard_id: int | None = None,
        num_shards: int | None = None,
        last_batch: str = "drop",
        on_error: str = "raise",
        num_threads: int | None = None,
        prefetch: int = 2,
        **augment: Any,
    ) -> None:
        unknown = sorted(set(augment) - AugmentSpec.names())
        if unknown:
            raise TypeError(f"Pipeline got unknown argument(s): {', '.join(unknown)}")
        self.spec = AugmentSpec(data_shape=tuple(data_shape), train=train, **augment)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if device not in ("gpu", "cpu"):
            raise ValueError(f"device must be 'gpu' or 'cpu', got {device!r}")
        if backend not in ("auto", "dali", "cpu"):
            raise ValueError(f"backend must be 'auto', 'dali' or 'cpu', got {backend!r}")
        if last_batch not in LAST_BATCH:
            raise ValueError(f"last_batch must be one of {LAST_BATCH}, got {last_batch!r}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        num_shards = num_shards if num_shards is not None else _env_int("WORLD_SIZE") or 1
        shard_id = shard_id if shard_id is not None else _env_int("RANK") or 0
        if num_shards < 1 or not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id must be in 0..num_shards-1, got {shard_id} of {num_shards}")
        self.batch_size = batch_size
        self.device = device
        self.shuffle = train if shuffle is None else bool(shuffle)
        self.seed = int(seed)
        self.shard_id, self.num_shards = shard_id, num_shards
        self.last_batch = last_batch
        self.on_error = on_error
        self.num_threads = num_threads or os.cpu_count() or 1
        self.prefetch = prefetch
        self.skipped = 0
        self.epoch = 0  # the epoch being read, or the next to start
        self._next_batch = 0  # the next unseen batch of that epoch
        self._resume = False  # set by load_state_dict: the next iter() continues self.epoch

        self.dataset = Dataset(resolve_source(source))
        n = len(self.dataset)
        if n < num_shards:
            raise ValueError(f"{n} records cannot be shared by {num_shards} ranks")
        shares = [b - a for a, b in (rank_range(n, num_shards, k) for k in range(num_shards))]
        if last_batch == "drop":
            self._batches = min(shares) // batch_size
            if self._batches == 0:
                raise ValueError(
                    f"last_batch='drop' leaves no batch: a rank's share is {min(shares)} "
                    f"records, below batch_size {batch_size}"
                )
        else:
            self._batches = math.ceil(max(shares) / batch_size)
        first = self.dataset.read(0)
        if len(first) < 4:
            raise RecordIOError(f"record 0 has no IRHeader: {self.dataset.where(0)}")
        self.label_width = max(1, int.from_bytes(first[:4], "little"))  # IRHeader.flag
        self.backend = self._make_backend(backend)

    # ------------------------------------------------------------------ construction
    def _make_backend(self, backend: str):
        if backend == "auto":  # on the CPU, OpenCV costs less CPU time per image than
            backend = "dali" if self.device == "gpu" else "cpu"  # DALI (BENCHMARKS.md)
        if self.device == "gpu":
            if backend != "dali":
                raise ValueError("device='gpu' decodes with DALI: use backend='dali' or 'auto'")
            try:
                import cupy  # noqa: F401
            except ImportError:
                raise ImportError(
                    "device='gpu' needs CuPy and a CUDA 12 GPU: pip install 'gpurec[gpu]'; "
                    "without a GPU use device='cpu'"
                ) from None
        if backend == "dali":
            if not _dali_installed():
                raise ImportError(
                    "backend='dali' needs NVIDIA DALI: pip install 'gpurec[gpu]' (GPU) or "
                    "'gpurec[dali]' (CPU mode); or use backend='cpu'"
                )
            if self.on_error == "skip":
                raise ValueError("on_error='skip' needs backend='cpu': DALI stops on bad records")
            from gpurec.backends.dali import DALIBackend

            return DALIBackend(self)
        from gpurec.backends.cpu import CPUBackend

        return CPUBackend(self)

    @classmethod
    def from_config(cls, path: str | os.PathLike, **overrides: Any) -> Pipeline:
        """A Pipeline from a YAML preset (keys: this constructor's keyword names);
        ``overrides`` win over the file."""
        from gpurec.config import load_config

        return cls.from_config_dict({**load_config(path), **overrides}, str(path))

    @classmethod
    def from_config_dict(cls, options: dict[str, Any], origin: str = "config") -> Pipeline:
        """A Pipeline from a mapping of keyword names; unknown names are an error."""
        options = dict(options)
        allowed = set(inspect.signature(cls.__init__).parameters) - {"self", "augment"}
        unknown = sorted(set(options) - allowed - AugmentSpec.names())
        if unknown:
            raise ValueError(f"{origin}: unknown Pipeline option(s): {', '.join(unknown)}")
        missing = [k for k in ("source", "batch_size") if k not in options]
        if missing:
            raise ValueError(f"{origin}: give {' and '.join(missing)} in the file or as arguments")
        return cls(options.pop("source"), options.pop("batch_size"), **options)

    # -------------------------------------------------------------------- iteration
    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        return self._batches

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The records this rank reads in ``epoch``, padded or cut to whole batches
        (CPU backend; DALI orders records itself)."""
        n = len(self.dataset)
        order = (
            np.random.default_rng([self.seed, epoch]).permutation(n)
            if self.shuffle
            else np.arange(n)
        )
        lo, hi = rank_range(n, self.num_shards, self.shard_id)
        mine = order[lo:hi]
        want = self._batches * self.batch_size
        if len(mine) >= want:
            return mine[:want]
        return np.concatenate([mine, np.full(want - len(mine), mine[-1])])

    def real_count(self, rank: int, batch: int) -> int:
        """How many records of batch ``batch`` are real (not padding) for ``rank``."""
        lo, hi = rank_range(len(self.dataset), self.num_shards, rank)
        return max(0, min(self.batch_size, hi - lo - batch * self.batch_size))

    def __iter__(self) -> Iterator[Batch]:
        """One epoch: the next one, or the rest of the one a checkpoint was taken in."""
        if self._resume:
            epoch, start = self.epoch, self._next_batch
        elif self._next_batch:  # the last epoch was left unfinished: start the next
            epoch, start = self.epoch + 1, 0
        else:
            epoch, start = self.epoch, 0
        self._resume = False
        return self._run(epoch, start)

    def _run(self, epoch: int, start: int) -> Iterator[Batch]:
        for b, (data, label, real) in enumerate(self.backend.run_epoch(epoch, start), start):
            pad = self.batch_size - real
            if self.last_batch == "partial" and pad:
                keep = max(real, 1)
                data, label, pad = data[:keep], label[:keep], keep - real
            done = b + 1 == self._batches
            self.epoch, self._next_batch = (epoch + 1, 0) if done else (epoch, b + 1)
            yield Batch(data, label, pad)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Where a Pipeline given this state resumes: the epoch, the next unseen batch, and
        the backend's own state (DALI's checkpoint; nothing for the CPU backend, whose
        batches follow from the seed)."""
        return {
            "epoch": self.epoch,
            "batch": self._next_batch,
            "seed": self.seed,
            "backend": self.backend.state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`: the next ``iter()`` yields the next unseen batch."""
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(f"checkpoint was taken with seed {state['seed']}, not {self.seed}")
        batch = int(state["batch"])
        if not 0 <= batch < self._batches:
            raise ValueError(f"checkpoint batch {batch} is outside 0..{self._batches - 1}")
        self.backend.restore(state.get("backend") or {})
        self.epoch, self._next_batch = int(state["epoch"]), batch
        self._resume = True

    def close(self) -> None:
        self.backend.close()
        self.dataset.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Pipeline({len(self.dataset)} records in {len(self.dataset.paths)} shard(s), "
            f"batch {self.batch_size}, {len(self)} batches/epoch on rank {self.shard_id} of "
            f"{self.num_shards}, device={self.device!r}, backend={type(self.backend).__name__})"
        )


def _dali_installed() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True
