"""``gpurec.Pipeline``: `.rec` shards in, augmented batches out, one epoch per ``iter()``.

This module owns what is the same on every backend: resolving the source, the epoch
and rank arithmetic (which records each rank sees, how many batches, how the last one
is padded), checkpoints, and the hand-off of arrays to the caller (NumPy for
``device="cpu"``, CuPy on the current GPU for ``device="gpu"``, or torch tensors on
either with ``output="torch"``: :mod:`gpurec.handoff`). The backends only turn
a batch's records into pixels: :mod:`gpurec.backends.dali` (NVIDIA DALI, on the GPU or
in its CPU mode) and :mod:`gpurec.backends.cpu` (OpenCV and NumPy).

The order of records is gpurec's own, one implementation for both backends
(:mod:`gpurec.order`): every epoch a new global permutation of all records of all shards
(or file order without ``shuffle``), rank ``k`` of ``S`` reading the slice
``[N*k//S, N*(k+1)//S)`` of it; every rank gets ``floor(min share / batch)`` batches
with ``last_batch="drop"`` and ``ceil(max share / batch)`` with ``"pad"`` (repeats of the
rank's last record fill the batch, ``batch.pad`` counts them) or ``"partial"`` (the
padding is cut off, but a batch is never empty); with ``"wrap"`` (MXNet's
``round_batch``) the last batch is filled with the first records of the rank's next
epoch, ``batch.pad`` counts them, and the next epoch starts after them. Both backends
read the records through :class:`gpurec.dataset.Dataset`; DALI only decodes and augments
what gpurec feeds it, so for the same seed, epoch and rank both hand out the same records
in the same order.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpurec.augment import AugmentSpec
from gpurec.backends.dali_graph import DecoderSettings
from gpurec.dataset import open_source
from gpurec.draws import Draws, draw
from gpurec.handoff import check_label_dtype, check_output, hand_off
from gpurec.order import LAST_BATCH, Plan, Segment, batches_for, plan, rank_range
from gpurec.recordio import RecordIOError, label_count

__all__ = ["Batch", "Pipeline", "rank_range"]


@dataclass
class Batch:
    """One batch: images, labels (float32; ``(N,)`` or ``(N, k)``), and padded count.

    ``index``: the dataset's sample numbers of the rows (int64, ``(N,)``, padding
    included), so that ``pipe.dataset.read(batch.index[i])`` is row ``i``'s record. They
    are positions in the source (shard by shard, record by record), the same on both
    backends; a record's own id (``IRHeader.id``) is in that record.
    """

    data: Any
    label: Any
    pad: int = 0
    index: np.ndarray | None = None

    def __iter__(self):  # ``data, label = batch``
        yield self.data
        yield self.label

    def __len__(self) -> int:  # a (data, label) pair, as DataLoader's batches are
        return 2

    def __getitem__(self, k: int) -> Any:  # ``batch[0]``, ``batch[1]``
        return (self.data, self.label)[k]

    def __setitem__(self, k: int, value: Any) -> None:  # ``batch[k] = batch[k].to(dev)``
        if k in (0, -2):
            self.data = value
        elif k in (1, -1):
            self.label = value
        else:
            raise IndexError(f"a batch is (data, label): no item {k}")


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
    ``shuffle`` defaults to ``train``: a new global permutation every epoch, the same on
    both backends. ``seed`` draws the order and the augmentations; ``augment_seed``, when
    given, draws the augmentations instead (the order keeps ``seed``).
    ``on_error="skip"`` (both backends) replaces a record that does not decode by a good
    one of its batch (augmented with the failed position's own draws) and counts it in
    ``pipe.skipped`` (once per read: copies of it that pad a last batch are not counted);
    ``"raise"`` stops with the shard, record and byte offset. ``prefetch``: batches read
    and decoded ahead of the caller (DALI's prefetch queue depth).
    ``output``: ``"numpy"`` (``device="cpu"``), ``"cupy"`` (``device="gpu"``) or
    ``"torch"`` (tensors on that device, zero-copy and stream-ordered through DLPack;
    see :mod:`gpurec.handoff`); the default follows ``device``. ``label_dtype``:
    ``"float32"`` (the records' labels as stored) or ``"int64"`` (what
    ``CrossEntropyLoss`` takes).
    ``hw_decoder_load``, ``device_memory_padding``, ``host_memory_padding``,
    ``preallocate_width_hint``, ``preallocate_height_hint``: DALI's GPU JPEG decoder
    settings (:class:`gpurec.backends.dali_graph.DecoderSettings`; DALI's defaults).
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
        augment_seed: int | None = None,
        shard_id: int | None = None,
        num_shards: int | None = None,
        last_batch: str = "drop",
        on_error: str = "raise",
        num_threads: int | None = None,
        prefetch: int = 2,
        hw_decoder_load: float = 0.65,
        device_memory_padding: int = 16 << 20,
        host_memory_padding: int = 8 << 20,
        preallocate_width_hint: int = 0,
        preallocate_height_hint: int = 0,
        cache_dir: str | os.PathLike | None = None,
        cache_limit: int | None = None,
        storage_options: dict | None = None,
        output: str | None = None,
        label_dtype: str = "float32",
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
        self.output = check_output(output, device)
        self.label_dtype = check_label_dtype(label_dtype)
        self.decoder = DecoderSettings(hw_decoder_load, device_memory_padding,
                                       host_memory_padding, preallocate_width_hint,
                                       preallocate_height_hint)  # fmt: skip
        num_shards = num_shards if num_shards is not None else _env_int("WORLD_SIZE") or 1
        shard_id = shard_id if shard_id is not None else _env_int("RANK") or 0
        if num_shards < 1 or not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id must be in 0..num_shards-1, got {shard_id} of {num_shards}")
        self.batch_size = batch_size
        self.device = device
        self.shuffle = train if shuffle is None else bool(shuffle)
        self.seed = int(seed)
        # The augmentations' draws: ``seed`` unless told apart (MXNet's ``seed_aug``).
        self.augment_seed = self.seed if augment_seed is None else int(augment_seed)
        self.shard_id, self.num_shards = shard_id, num_shards
        self.last_batch = last_batch
        self.on_error = on_error
        self.num_threads = num_threads or os.cpu_count() or 1
        self.prefetch = prefetch
        self.skipped = 0
        self.epoch = 0  # the epoch being read, or the next to start
        self._next_batch = 0  # the next unseen batch of that epoch
        self._resume = False  # set by load_state_dict: the next iter() continues self.epoch
        self._segments: tuple[Segment, ...] = ()  # earlier layouts of self.epoch (elastic)
        self._plans: dict[tuple, Plan] = {}  # the last plans made, by (epoch, segments)

        remote = dict(cache_dir=cache_dir, cache_limit=cache_limit, storage_options=storage_options)
        # Shards at URLs: their .rec files are fetched in the background, first needed first.
        self.dataset = open_source(source, on_error=on_error, **remote)
        # Records lost to files cut short belong to the dataset, not to a rank: rank 0
        # counts them, so that the ranks' counts add up.
        self.skipped = self.dataset.lost if shard_id == 0 else 0
        n = len(self.dataset)
        if n < num_shards:
            raise ValueError(f"{n} records cannot be shared by {num_shards} ranks")
        self._batches = batches_for(n, num_shards, batch_size, last_batch)
        if self._batches == 0:
            raise ValueError(
                f"last_batch='drop' leaves no batch: a rank's share is {n // num_shards} "
                f"records, below batch_size {batch_size}"
            )
        first = self.dataset.head(0)  # without waiting for a shard being fetched
        if len(first) < 4:
            raise RecordIOError(f"record 0 has no IRHeader: {self.dataset.where(0)}")
        self.label_width = max(1, label_count(first))
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
        """Batches per epoch on this rank (the same on every rank); for an epoch resumed
        on another number of ranks (elastic), the batches that epoch has in all; with
        ``last_batch="wrap"``, the batches of the epoch the next ``iter()`` reads."""
        if self._resume and self._segments:
            return self.plan(self.epoch, self._segments).batches
        if self.last_batch == "wrap":  # varies by one from epoch to epoch: the next one's
            nxt = self.epoch + 1 if self._next_batch and not self._resume else self.epoch
            return self.plan(nxt).batches
        return self._batches

    def plan(self, epoch: int, segments: tuple[Segment, ...] = ()) -> Plan:
        """What this rank reads in ``epoch`` (after ``segments``, when resumed with
        another layout): sample indices batch by batch, padding included. The last two
        are kept: the DALI backend reads the next epoch's plan ahead, then iter() asks."""
        key = (epoch, tuple(segments))
        if key not in self._plans:
            if len(self._plans) >= 2:
                self._plans.pop(next(iter(self._plans)))
            self._plans[key] = self._make_plan(epoch, segments)
        return self._plans[key]

    def _make_plan(self, epoch: int, segments: tuple[Segment, ...]) -> Plan:
        return plan(
            len(self.dataset),
            seed=self.seed,
            epoch=epoch,
            shuffle=self.shuffle,
            num_shards=self.num_shards,
            shard_id=self.shard_id,
            batch_size=self.batch_size,
            last_batch=self.last_batch,
            segments=segments,
        )

    def draws(self, plan: Plan, b: int, n: int | None = None) -> Draws:
        """The random numbers of batch ``b`` of ``plan`` (its first ``n`` images): both
        backends augment with these, so they follow from (seed, epoch, batch, rank)
        alone, and a resumed run draws what an uninterrupted one does.

        Each rank of several draws its own (``shard_id`` and ``num_shards`` join the key;
        a single rank's key is ``(augment_seed, epoch, batch, 1)``), so that ranks do not
        augment their batches alike. A part of an epoch laid out again by an elastic
        resume gets draws of its own (the number of earlier layouts joins the key), on
        the rank that reads it in the new layout."""
        rank = (self.shard_id, self.num_shards) if self.num_shards > 1 else ()
        extra = (len(plan.segments),) if plan.segments else ()
        count = self.batch_size if n is None else n
        return draw(self.spec, (self.augment_seed, plan.epoch, b, 1, *rank, *extra), count)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The sample indices this rank reads in ``epoch``, padded or cut to whole batches."""
        return self.plan(epoch).indices

    def __iter__(self) -> Iterator[Batch]:
        """One epoch: the next one, or the rest of the one a checkpoint was taken in.

        Nothing is decided until the first batch is asked for: an iterator made and
        dropped unused (``iter(pipe)``) leaves a loaded checkpoint in force."""
        if self._resume:
            epoch, start, segments = self.epoch, self._next_batch, self._segments
        elif self._next_batch:  # the last epoch was left unfinished: start the next
            epoch, start, segments = self.epoch + 1, 0, ()
        else:
            epoch, start, segments = self.epoch, 0, ()
        self._resume = False
        yield from self._run(self.plan(epoch, segments), start)

    def _run(self, plan: Plan, start: int) -> Iterator[Batch]:
        if start >= plan.batches:  # an elastic resume found nothing left of the epoch
            self.epoch, self._next_batch, self._segments = plan.epoch + 1, 0, ()
            return
        self.dataset.prefetch(plan.indices[start * plan.batch_size :])  # shards at URLs
        for b, (data, label, real) in enumerate(self.backend.run_epoch(plan, start), start):
            pad = self.batch_size - real
            index = plan.batch(b)
            if self.last_batch == "partial" and pad:
                keep = max(real, 1)
                data, label, pad = data[:keep], label[:keep], keep - real
                index = index[:keep]
            if b + 1 == plan.batches:
                self.epoch, self._next_batch, self._segments = plan.epoch + 1, 0, ()
            else:
                self.epoch, self._next_batch, self._segments = plan.epoch, b + 1, plan.segments
            if self.output == "torch" or self.label_dtype != "float32":
                where = f"batch {b} of epoch {plan.epoch} (rank {self.shard_id})"
                data, label = hand_off(data, label, self.output, self.label_dtype, where)
            yield Batch(data, label, pad, index.copy())
            del data, label  # hold no batch while the backend makes the next

    def set_epoch(self, epoch: int) -> None:
        """Read ``epoch`` on the next ``iter()``, for loops written for
        ``DistributedSampler`` (``sampler.set_epoch(e)`` before each epoch).

        Iterating on its own already reads one epoch after the other, so in such a loop
        this mostly confirms the epoch; called with another epoch it starts that one from
        its first batch. The epoch of a loaded checkpoint keeps its resume: a loop that
        starts again at the checkpoint's epoch reads the rest of it, not all of it."""
        epoch = int(epoch)
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if self._resume and epoch == self.epoch:
            return  # the rest of the checkpoint's epoch
        if not self._resume and self._next_batch == 0 and epoch == self.epoch:
            return  # the epoch iter() would start anyway
        self.epoch, self._next_batch, self._segments, self._resume = epoch, 0, (), False

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Where a Pipeline given this state resumes: the epoch, the batches every rank
        has read of it, the layout (ranks, batch size, earlier layouts of the epoch) and
        the backend's own state (DALI's checkpoint of its random generators; nothing for
        the CPU backend, whose random draws follow from the seed)."""
        return {
            "epoch": self.epoch,
            "batch": self._next_batch,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "records": len(self.dataset),
            "num_shards": self.num_shards,
            "batch_size": self.batch_size,
            "last_batch": self.last_batch,
            "segments": [s.to_list() for s in self._segments],
            "backend": self.backend.state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`: the next ``iter()`` yields the next unseen batch.

        A checkpoint taken after leaving an epoch early (``break``) resumes the rest of
        that epoch, which is what a preempted job wants; the same Pipeline iterated again
        without a checkpoint starts the next epoch instead.

        With the checkpoint's number of ranks and batch size, the rest of the epoch is
        exactly the batches an uninterrupted run reads. With another layout (elastic
        resume), the records no rank has read are laid out over the new ranks: none is
        read twice, none is left out (see :mod:`gpurec.order` for what differs).
        ``last_batch="wrap"`` resumes with the checkpoint's layout only: its epochs start
        where the rank's stream of records reaches a whole batch, so with another batch
        size or rank count records around any epoch boundary would repeat or be skipped.
        """
        taken = state.get("last_batch")  # absent from checkpoints before it was recorded
        if taken is not None and taken != self.last_batch:
            raise ValueError(f"checkpoint was taken with last_batch={taken!r}, this Pipeline "
                             f"has last_batch={self.last_batch!r}")  # fmt: skip
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(f"checkpoint was taken with seed {state['seed']}, not {self.seed}")
        if bool(state.get("shuffle", self.shuffle)) != self.shuffle:
            raise ValueError(f"checkpoint was taken with shuffle={state['shuffle']}")
        records = int(state.get("records", len(self.dataset)))
        if records != len(self.dataset):
            raise ValueError(
                f"checkpoint was taken on {records} records, the source has {len(self.dataset)}"
            )
        epoch, batch = int(state["epoch"]), int(state["batch"])
        segments = tuple(Segment.from_list(s) for s in state.get("segments", []))
        layout = (int(state.get("num_shards", self.num_shards)),
                  int(state.get("batch_size", self.batch_size)))  # fmt: skip
        if batch < 0:
            raise ValueError(f"checkpoint batch {batch} is negative")
        if self.last_batch == "wrap" and (layout != (self.num_shards, self.batch_size)
                                          or segments):  # fmt: skip
            ranks, size = (segments[0].num_shards, segments[0].batch_size) if segments else layout
            raise ValueError(
                "last_batch='wrap' resumes with the layout it was checkpointed with only: "
                f"the checkpoint has {_ranks(ranks)} of batch {size}, this Pipeline "
                f"{_ranks(self.num_shards)} of batch {self.batch_size}"
            )
        if layout != (self.num_shards, self.batch_size):
            if batch:  # what the old ranks read is a segment of its own; lay out the rest
                segments += (Segment(*layout, batch),)
            batch = 0
        else:
            batches = self.plan(epoch, segments).batches
            if batch and batch >= batches:
                raise ValueError(f"checkpoint batch {batch} is outside 0..{batches - 1}")
        self.backend.restore(state.get("backend") or {})
        self.epoch, self._next_batch, self._segments = epoch, batch, segments
        self._resume = True

    def close(self) -> None:
        # Reads waiting for shards being fetched give up first: the backend's close
        # waits for its reads, not for downloads.
        self.dataset.stop_fetching()
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


def _ranks(count: int) -> str:
    return f"{count} rank" if count == 1 else f"{count} ranks"


def _dali_installed() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True
