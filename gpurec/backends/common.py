"""What both backends do alike: the choice of resampling path, C's rounding, a record's
label checked against the dataset's width, the stand-in for a batch with no good record,
and the reuse of batch arrays the trainer has let go.

Shared here so that the two backends cannot drift apart: both must hand out the same
images for the same (seed, epoch, batch). Nothing here imports DALI or OpenCV.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from gpurec.augment import AugmentSpec
from gpurec.recordio import RecordIOError

if TYPE_CHECKING:
    from gpurec.dataset import Dataset
    from gpurec.order import Plan

__all__ = [
    "label_of",
    "reusable",
    "round_half_away",
    "size_only",
    "staged",
    "stand_in_candidates",
    "window_resized",
]


def window_resized(spec: AugmentSpec) -> bool:
    """Whether the crop window may be resized (a random-resized crop, or a crop of
    random size)."""
    return spec.crop == "random_resized" or spec.max_crop_size > 0


def staged(spec: AugmentSpec) -> bool:
    """Whether the warp path runs MXNet's steps apart: warp onto the canvas, pad, then
    resample the window (antialiased, as MXNet resizes it). Needed when the window may be
    resized, and when a pre-crop affine meets padding: MXNet's canvas clips the warped
    image and the padding around it is ``fill_value``, which one warp straight to the
    output cannot tell from the warped corners that reach past the canvas. Otherwise
    everything after the resize is one warp to the output (one resampling). Both
    backends take this one condition, so that they resample the same way."""
    return window_resized(spec) or (spec.affine and spec.pad > 0)


def size_only(spec: AugmentSpec) -> bool:
    """Whether :func:`gpurec.draws.geometry` takes no draw for ``spec`` (no pre-crop
    affine, no random or random-size window, no random interpolation): then an image's
    geometry follows from its size alone, and a backend works it out once per size."""
    return not (spec.affine or spec.crop in ("random", "random_resized") or spec.max_crop_size
                or spec.interp == "random")  # fmt: skip


def round_half_away(values: np.ndarray) -> np.ndarray:
    """C's ``std::round``, which MXNet's int8 mean uses (halves away from zero; NumPy's
    ``np.round`` takes them to even)."""
    return np.sign(values) * np.floor(np.abs(values) + 0.5)


def label_of(header, width: int, dataset: Dataset, index: int) -> np.ndarray:
    """Record ``index``'s labels (float32, 1-D), which must be ``width`` of them: else an
    error naming the shard, the record and its byte offset."""
    label = np.atleast_1d(np.asarray(header.label, np.float32))
    if label.size != width:
        raise RecordIOError(
            f"has {label.size} label(s), the dataset has {width}: " + dataset.where(index)
        )
    return label


def stand_in_candidates(plan: Plan, b: int, tried: set[int]) -> Iterator[int]:
    """For a batch with no good record (a bad last record and its padding): the records
    to try in its place, nearest first: going back from batch ``b`` in the rank's plan,
    then on from the plan's end, each once and none in ``tried`` (which each one joins)."""
    n, start = len(plan.indices), b * plan.batch_size
    for step in range(1, n + 1):
        index = int(plan.indices[(start - step) % n])
        if index in tried:
            continue
        tried.add(index)
        yield index


def _refcounts(arrays: deque) -> list[int]:
    """The reference count of each array of ``arrays`` as seen from here."""
    return [sys.getrefcount(arrays[k]) for k in range(len(arrays))]


# What _refcounts says of an array that only its deque holds (measured, not assumed: the
# count a function sees differs between Python versions).
_UNREFERENCED = _refcounts(deque([np.empty(0)]))[0]


def reusable(handed: deque, shape: tuple[int, ...]) -> np.ndarray | None:
    """An array of ``shape`` taken out of ``handed`` (the batches handed out before) that
    nothing refers to any more (no variable, view, tensor or buffer export holds a
    reference; a raw data pointer or a weak reference does not count), or None.

    A new array costs the kernel a page fault and a zeroed page for every 4 KiB on first
    write (for float32 224x224 batches, about a tenth of the CPU time), and freeing them
    lets the resident size swing by whole batches."""
    for k, count in enumerate(_refcounts(handed)):
        if count == _UNREFERENCED and handed[k].shape == shape:
            buf = handed[k]
            del handed[k]
            return buf
    return None
