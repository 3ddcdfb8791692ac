"""The order of an epoch: which records each rank reads, in which batches.

One implementation for every backend (the DALI backend and the OpenCV backend both take
their records from it), so both hand out the same records in the same order.

- **The epoch's permutation.** With ``shuffle`` every epoch is a new permutation of all
  ``n`` samples of all shards, drawn from ``(seed, epoch)``; without it, file order
  (shard by shard, record by record).
- **Ranks.** Rank ``k`` of ``S`` reads the contiguous slice ``[N*k//S, N*(k+1)//S)`` of
  the permutation: ranks are disjoint and together cover it.
- **Batches.** Every rank gets the same number of batches: ``floor(min share / batch)``
  with ``last_batch="drop"`` (the rest of each share is not read that epoch),
  ``ceil(max share / batch)`` with ``"pad"`` and ``"partial"`` (the last batch is filled
  with repeats of the rank's last record; :attr:`Plan.real` counts the real ones).
- **Wrap** (``last_batch="wrap"``, MXNet's ``round_batch``): each rank reads its slices of
  the epochs' permutations as one stream, cut into batches: the last batch of an epoch is
  filled with the first records of the rank's next slice (:attr:`Plan.real` counts the
  records of this epoch's slice), and the next epoch starts after them. Epoch ``e``
  holds stream positions ``[ceil(e*n/B)*B, ceil((e+1)*n/B)*B)`` (``n`` the rank's share,
  ``B`` the batch size): every record is read once per epoch in the long run, no batch
  is short, and the number of batches varies by one from epoch to epoch (as MXNet's).
  Ranks whose shares differ in size may then differ by one batch in an epoch (MXNet's
  ``num_parts`` do too). A share smaller than a batch wraps more than once, and an epoch
  may then have no batch, as in MXNet. There is no elastic resume (a checkpoint resumes
  with the same layout only).
- **Resume.** A checkpoint records the epoch, the number of batches every rank has
  consumed (ranks move in step: data-parallel training takes one batch per rank per
  step), and the layout (ranks, batch size). Resuming with the same layout continues
  each rank's slice at the next batch: exactly the batches an uninterrupted run reads.
- **Elastic resume.** Resuming with another number of ranks (or batch size) first
  removes every record the old ranks have read (their first ``done * batch`` records),
  then lays the rest out again, in permutation order, over the new ranks as above: the
  union over the new ranks is exactly the records not yet read (with ``"drop"``, less
  what the new layout drops at the end of the epoch), none is read twice. Such a
  "segment" can be resumed again; :class:`Segment` records each. What is not exact
  there: which rank reads a record and its batch neighbours differ from an
  uninterrupted run on the new number of ranks, and so do the random augmentations.
  The next epoch is a normal epoch of the new layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Plan", "Segment", "batches_for", "permutation", "plan", "rank_range", "remaining"]

LAST_BATCH = ("drop", "pad", "partial", "wrap")


def rank_range(n: int, num_shards: int, shard_id: int) -> tuple[int, int]:
    """The slice ``[lo, hi)`` of ``n`` ordered records that rank ``shard_id`` reads."""
    return n * shard_id // num_shards, n * (shard_id + 1) // num_shards


def permutation(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """All ``n`` sample indices in the order of ``epoch`` (int64)."""
    if shuffle:
        return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64)
    return np.arange(n, dtype=np.int64)


def batches_for(count: int, num_shards: int, batch_size: int, last_batch: str) -> int:
    """Batches every rank reads when ``count`` records are laid out over ``num_shards``
    (for ``"wrap"``: the most any rank reads in an epoch, the first epoch's)."""
    shares = [b - a for a, b in (rank_range(count, num_shards, k) for k in range(num_shards))]
    if last_batch == "drop":
        return min(shares) // batch_size
    return math.ceil(max(shares) / batch_size)


@dataclass(frozen=True)
class Segment:
    """A part of an epoch read with one layout: ``done`` batches of ``batch_size`` on
    each of ``num_shards`` ranks (what a checkpoint taken with that layout records)."""

    num_shards: int
    batch_size: int
    done: int

    def to_list(self) -> list[int]:
        return [self.num_shards, self.batch_size, self.done]

    @classmethod
    def from_list(cls, values) -> Segment:
        num_shards, batch_size, done = (int(v) for v in values)
        return cls(num_shards, batch_size, done)


def remaining(
    n: int, seed: int, epoch: int, shuffle: bool, segments: tuple[Segment, ...] = ()
) -> np.ndarray:
    """The records of ``epoch`` that the ranks of ``segments`` have not read, in
    permutation order."""
    rest = permutation(n, seed, epoch, shuffle)
    for seg in segments:
        seen = np.zeros(len(rest), bool)
        for k in range(seg.num_shards):
            lo, hi = rank_range(len(rest), seg.num_shards, k)
            seen[lo : min(hi, lo + seg.done * seg.batch_size)] = True
        rest = rest[~seen]
    return rest


@dataclass(frozen=True)
class Plan:
    """What one rank reads in (the rest of) an epoch.

    ``indices``: ``batches * batch_size`` sample indices, batch after batch, padding
    included; ``real[b]``: how many of batch ``b`` are this epoch's records (the rest
    pad it, or with ``wrapped`` are the next epoch's); ``segments``: the earlier layouts
    of this epoch (empty for a normal epoch).
    """

    epoch: int
    batch_size: int
    indices: np.ndarray
    real: list[int]
    segments: tuple[Segment, ...] = field(default=())
    wrapped: bool = False  # last_batch="wrap": the last batch ends in the next epoch

    def reads(self, b: int) -> int:
        """How many positions of batch ``b`` are reads of a record: ``real[b]``, less the
        padding that repeats the rank's last record; a wrapped batch reads all of them
        (the next epoch's records are read there, and not again). What counts a bad
        record once, not once per padding copy of it."""
        return self.batch_size if self.wrapped else self.real[b]

    @property
    def batches(self) -> int:
        return len(self.real)

    def batch(self, b: int) -> np.ndarray:
        return self.indices[b * self.batch_size : (b + 1) * self.batch_size]

    @property
    def key(self) -> tuple:
        """Identifies the plan: the epoch and its earlier layouts."""
        return (self.epoch, self.segments)


def plan(
    n: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool,
    num_shards: int,
    shard_id: int,
    batch_size: int,
    last_batch: str,
    segments: tuple[Segment, ...] = (),
) -> Plan:
    """The :class:`Plan` of rank ``shard_id``: its slice of what ``segments`` left of
    ``epoch``, cut into batches and padded as ``last_batch`` says."""
    if last_batch == "wrap":
        if segments:
            raise ValueError(
                "last_batch='wrap' resumes with the layout it was checkpointed with only "
                f"(checkpoint: {segments[0].num_shards} ranks of batch {segments[0].batch_size})"
            )
        return _wrapped(n, seed, epoch, shuffle, num_shards, shard_id, batch_size)
    rest = remaining(n, seed, epoch, shuffle, segments)
    batches = batches_for(len(rest), num_shards, batch_size, last_batch)
    lo, hi = rank_range(len(rest), num_shards, shard_id)
    mine = rest[lo:hi].copy()  # not a view: the whole permutation need not stay alive
    want = batches * batch_size
    real = [max(0, min(batch_size, len(mine) - b * batch_size)) for b in range(batches)]
    if len(mine) >= want:
        indices = mine[:want]
    else:  # pad with the rank's last record (or, for a rank left nothing, the rest's last)
        filler = mine[-1] if len(mine) else (rest[-1] if len(rest) else 0)
        indices = np.concatenate([mine, np.full(want - len(mine), filler, np.int64)])
    return Plan(epoch, batch_size, indices.astype(np.int64, copy=False), real, tuple(segments))


def _wrapped(
    n: int, seed: int, epoch: int, shuffle: bool, num_shards: int, shard_id: int, batch_size: int
) -> Plan:
    """``last_batch="wrap"``: epoch ``epoch`` of the rank's stream of slices (see the
    module docstring); the records after this epoch's slice are the next epoch's."""
    lo, hi = rank_range(n, num_shards, shard_id)
    share = hi - lo
    if share < 1:
        raise ValueError(f"last_batch='wrap': rank {shard_id} of {num_shards} has no record")
    start = -(-epoch * share // batch_size) * batch_size  # ceil(e*n/B)*B
    end = -(-(epoch + 1) * share // batch_size) * batch_size
    positions = np.arange(start, end, dtype=np.int64)
    passes = positions // share  # epoch, epoch + 1 (more when share < batch_size)
    indices = np.empty(len(positions), np.int64)
    for p in np.unique(passes).tolist():
        mine = permutation(n, seed, p, shuffle)[lo:hi]
        sel = passes == p
        indices[sel] = mine[positions[sel] % share]
    batches = (end - start) // batch_size
    real = [batch_size] * batches
    if batches:  # the next epochs' records in the last batch
        real[-1] -= int(end - (epoch + 1) * share)
    return Plan(epoch, batch_size, indices, real, wrapped=True)
