"""The DALI backend: gpurec reads, DALI decodes (nvJPEG on the GPU, or DALI's CPU mode).

:func:`gpurec.backends.dali_graph.graph` is the whole data path, written once (with
its parameters, a pure module; this one is the runtime). ``device="gpu"`` and ``"cpu"``
differ in one string (the decoders' ``"mixed"`` or ``"cpu"``): every later operator
runs where its input lives, so on the GPU everything after decoding stays there.
The graph has no random operator: every random number is gpurec's (:mod:`gpurec.draws`,
from seed, epoch and batch), turned per image into DALI's arguments (ROI, warp matrix,
colour matrix, offsets, mirror flag, normalisation) by :func:`parameters` in the reader
thread, from the image's size in its header, and fed beside the encoded images. So both
backends apply the same windows, matrices and factors to the same records.

Records come from gpurec, not from a DALI reader: the order (:mod:`gpurec.order`) and
the bytes (:class:`gpurec.dataset.Dataset`) are the ones the CPU backend uses, so both
backends hand out the same records in the same order. The encoded images of a batch go
in through ``fn.external_source`` as the buffer each lies in: a batch from one shard is
that shard's whole memory map broadcast (one DALI tensor wrapping it, no copy and no
Python per image; DALI's TensorList of a view per record cost ~4 us an image), and
where each image lies (offset, length) leads the parameters, fed through one more input
(one float32 row per image, :func:`gpurec.backends.dali_graph.pack`); the graph cuts the
images out (``fn.slice``) before decoding. The labels never enter DALI: they
travel beside the batch in a queue. A record read once is read again from what that
read learned (:class:`gpurec.backends.records.RecordTable`: where its image lies in the
map, its size, its label), a whole batch at once. A GIF record, or one
of a signature gpurec does not know (DALI cannot decode them; OpenCV, and so MXNet and
the CPU backend, can), is decoded with OpenCV in the reader thread and fed as a BMP
(:func:`encoded_for_dali`).

Prefetching: a reader thread reads, unpacks and checks (:func:`gpurec.transcode.sniff`)
the next batches while DALI decodes the ``prefetch`` batches fed to it; the stream of
batches runs on into the next epoch, so DALI stays busy across epoch boundaries. When an
``iter()`` asks for other batches than the ones in flight (an abandoned epoch, a
checkpoint loaded), the pipeline is rebuilt from DALI's checkpoint taken after the last
batch handed out. With no random operator in the graph that checkpoint holds no random
state (the draws follow from the batch's place), so a resumed run hands out exactly the
batches an uninterrupted one does; the machinery stays for DALI's own state.

Bad records: one whose bytes are not an image (or whose record or label is malformed)
is found before it is fed; one that passes that check but fails in the decoder makes
DALI's run fail, after which the batch's records are decoded one by one through the same
graph to find it, and the pipeline is rebuilt from the last checkpoint. With
``on_error="skip"`` a bad record is replaced by a good one of its batch, augmented with
the failed position's own draws (as the CPU backend does, so labels and images agree),
and counted in ``pipe.skipped``; with
``"raise"`` the error names shard, record and byte offset. Either way the Pipeline
stays usable.

DALI recycles its output buffers on the next run, so every batch is copied into an
array the caller owns (``as_array`` on the CPU; on the GPU ``copy_to_external`` into a
new CuPy array, stream-ordered, device to device).
"""

from __future__ import annotations

import ctypes
import os
import weakref
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

from gpurec.backends.common import label_of, reusable, stand_in_candidates
from gpurec.backends.dali_graph import INPUT, PACKED, graph, inputs, pack, parameters
from gpurec.backends.records import RecordTable
from gpurec.recordio import RecordIOError, unpack_view
from gpurec.transcode import ImageError, UnknownImage, sniff

if TYPE_CHECKING:
    from gpurec.order import Plan
    from gpurec.pipeline import Pipeline


# Formats OpenCV decodes and DALI's decoders do not: GIF (MXNet's OpenCV decoded it too),
# and signatures sniff does not know (Sun raster, PFM, HDR...). Such a record is decoded
# here, as the OpenCV backend decodes it, and fed to DALI as a BMP (lossless, and written
# in the time of a copy), so both backends hand out the same pixels.
_DECODED_HERE = ("gif",)
_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION  # MXNet ignores EXIF orientation


def encoded_for_dali(payload: bytes | memoryview) -> tuple[np.ndarray, tuple[int, int]]:
    """What DALI is fed for a record's image, and the image's (width, height) as decoded
    without EXIF orientation: the record's own bytes (no copy) and the size its header
    gives (JPEG, PNG, PNM, JPEG 2000); for BMP, TIFF and WebP the record's bytes and the
    size from decoding them once with OpenCV; for GIF and unknown signatures a BMP of
    OpenCV's decoding. Raises ImageError, worded as the CPU backend words it."""
    encoded, size, _ = _encoded(payload)
    return encoded, size


def _encoded(payload: bytes | memoryview) -> tuple[np.ndarray, tuple[int, int], bool]:
    """:func:`encoded_for_dali`, and whether what is fed is the record's own bytes."""
    info = unknown = None
    try:
        info = sniff(payload)
        if info.format not in _DECODED_HERE and info.width and info.height:
            return np.frombuffer(payload, np.uint8), (info.width, info.height), True
    except UnknownImage as exc:
        unknown = exc
    except ImageError as exc:  # a known format, broken (cut short...)
        raise ImageError(f"cannot decode image: {exc}") from None
    try:
        image = cv2.imdecode(np.frombuffer(payload, np.uint8), _FLAGS)
    except cv2.error:
        image = None
    if image is None:
        if unknown is not None:
            raise ImageError(f"cannot decode image: {unknown}")
        raise ImageError(f"cannot decode image ({info.format})")
    size = (image.shape[1], image.shape[0])
    if info is None or info.format in _DECODED_HERE:
        bmp = cv2.imencode(".bmp", image)[1]  # (a level-1 PNG would take ~10 ms)
        return bmp.reshape(-1), size, False
    return np.frombuffer(payload, np.uint8), size, True


__all__ = ["DALIBackend", "encoded_for_dali"]

# DALI pipelines alive in this process. A forked child (a DataLoader worker, a
# multiprocessing pool) inherits them without the threads they wait for: destroying one
# there, as the child's garbage collector may, hangs forever. The child keeps them.
_LIVE: weakref.WeakSet = weakref.WeakSet()
_INHERITED: list = []


def _keep_inherited_pipelines() -> None:
    _INHERITED.extend(_LIVE)  # never destroyed: multiprocessing children end in os._exit


os.register_at_fork(after_in_child=_keep_inherited_pipelines)


def _dali_reason(exc: BaseException) -> str:
    """The informative line of a DALI error (its first lines are generic)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for i, line in enumerate(lines):
        if line.startswith("encountered:") and i + 1 < len(lines):
            return lines[i + 1]
    return lines[-1] if lines else type(exc).__name__


@dataclass
class _Batch:
    """A batch read by gpurec and ready to feed: its place in the stream, the sample fed
    at each position (bad ones replaced), where its encoded images lie, labels, and what
    to tell the caller when it is handed out.

    The images are not cut out here: position ``k``'s lies in ``buffers[source[k]]`` (a
    shard's memory map, or an array of its own: a record in parts, a converted image) at
    ``offsets[k]`` for ``lengths[k]`` bytes, and DALI cuts it out (dali_graph.WHERE). A
    batch from one shard is one buffer broadcast: no Python per image."""

    key: tuple
    epoch: int
    batch: int
    indices: list[int]
    buffers: list[np.ndarray]
    tensors: list  # the same as DALI tensors (wrapping them in place)
    source: np.ndarray | None  # the buffer of each position (None: all in buffers[0])
    offsets: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray
    real: int
    params: dict[str, np.ndarray]  # the graph's parameter inputs (see parameters())
    packed: np.ndarray  # the same in one float32 row per image, as the graph takes them
    skipped: int = 0
    error: Exception | None = None  # raised when this batch is reached (on_error="raise")

    def buffer(self, k: int) -> np.ndarray:
        """The buffer position ``k``'s image lies in."""
        return self.buffers[0 if self.source is None else int(self.source[k])]

    @property
    def payloads(self) -> list[np.ndarray]:
        """The encoded image of each position (views: no copy)."""
        spans = zip(self.offsets.tolist(), (self.offsets + self.lengths).tolist(), strict=True)
        return [self.buffer(k)[a:e] for k, (a, e) in enumerate(spans)]

    def feed(self, pipeline, positions: slice = slice(None)) -> None:
        """Feed the images and the parameters of ``positions`` to ``pipeline``."""
        from nvidia.dali.backend import TensorListCPU

        packed = self.packed[positions]
        if self.source is None:
            images = TensorListCPU.broadcast(self.tensors[0], len(packed))
        else:  # DALI wraps each tensor of a list (~1.4 us), the same one too
            tensors = self.tensors
            images = TensorListCPU([tensors[s] for s in self.source[positions].tolist()],
                                   contiguous=False)  # fmt: skip
        pipeline.feed_input(INPUT, images)
        pipeline.feed_input(PACKED, packed)


class DALIBackend:
    """Feeds gpurec's batches to :func:`graph` in a DALI pipeline; hands out owned arrays.

    Checkpoints hold DALI's own state as of the last batch handed out (no random
    generators: the draws are gpurec's); the position in the epoch is the Pipeline's.
    """

    def __init__(self, pipe: Pipeline) -> None:
        self.pipe = pipe
        self.dataset = pipe.dataset
        self.depth = pipe.prefetch
        self._device_id = None
        if pipe.device == "gpu":
            import cupy

            self._device_id = cupy.cuda.Device().id
        self._bad: dict[int, str] = {}  # sample -> why it cannot be decoded
        self._table = RecordTable(self.dataset, pipe.label_width)  # records read before
        self._shard_tensors: dict[int, tuple] = {}  # shard -> (its map, a DALI tensor of it)
        self._by_size: dict = {}  # geometric parameters by image size (dali_graph.parameters)
        self._names = inputs(pipe.spec, exact_crops=True)  # the graph's parameters, in order
        # Fed to DALI when a batch has no good record at all: it is never handed out.
        self._filler = np.frombuffer(
            cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes(), np.uint8
        )
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="gpurec-dali-read")
        self._inflight: deque[_Batch] = deque()  # fed and scheduled, oldest first
        # Batches handed out recently: DALI reads fed arrays in place (no_copy) and may
        # hold on to them for up to `depth` iterations after their outputs came out.
        self._done: deque[_Batch] = deque(maxlen=self.depth + 2)
        self._handed: deque[np.ndarray] = deque(maxlen=self.depth + 3)  # see _owned
        self._ahead: deque[Future] = deque()  # being read, not fed yet
        self._stream = None  # (plan, batch) pairs to read next
        self._generation = 0  # the run_epoch that owns the stream
        self._checkpoint: bytes | None = None  # DALI's state after the last batch handed out
        self._pipeline = None
        self._fresh = True
        self._rebuild(None)

    # ------------------------------------------------------------------- pipelines
    def _new_pipeline(self, checkpoint: bytes | None, batch_size: int, depth: int):
        from nvidia.dali import fn, pipeline_def, types

        pipe = self.pipe
        # Conditionals: images that are exact crops skip the resize (dali_graph.graph)
        pipeline = pipeline_def(graph, enable_checkpointing=True, enable_conditionals=True)(
            fn,
            types,
            pipe.spec,
            device=pipe.device,
            exact_crops=True,
            settings=pipe.decoder,
            packed=True,  # one parameter input: each one fed costs DALI ~0.1 ms a batch
            batch_size=batch_size,
            num_threads=pipe.num_threads,
            device_id=self._device_id,
            seed=pipe.seed,
            prefetch_queue_depth=depth,
            checkpoint=checkpoint,
            # DALI's static executor: its buffers are allocated once and reused, so the
            # resident size is flat to the MiB over epochs. The dynamic one (DALI 2's
            # default) allocates each iteration's buffers afresh; fed from Python, that
            # left glibc holding a changing 20-60 MiB of freed heap (BENCHMARKS.md).
            exec_dynamic=False,
        )
        pipeline.build()
        _LIVE.add(pipeline)
        return pipeline

    def _drain(self) -> None:
        """Let DALI finish what is in flight (it reads the fed arrays in place), then
        drop the pipeline and those arrays."""
        if self._pipeline is not None and not self._fresh:
            for _ in range(len(self._inflight)):
                try:
                    self._pipeline.outputs()
                except Exception:  # a failed pipeline has nothing left to run
                    break
        self._pipeline = None
        self._inflight.clear()

    def _rebuild(self, checkpoint: bytes | None) -> None:
        """A new pipeline in the state ``checkpoint`` records; nothing in flight."""
        self._drain()
        self._pipeline = self._new_pipeline(checkpoint, self.pipe.batch_size, self.depth)
        self._checkpoint = checkpoint
        self._fresh = True  # the first schedule_run runs `depth` fed batches
        self._broken = False
        self._inflight.clear()
        self._drop_ahead()

    def _drop_ahead(self) -> None:
        for future in self._ahead:
            future.cancel()
        self._ahead.clear()
        self._stream = None

    def state(self) -> dict:
        return {"dali_checkpoint": self._checkpoint or self._pipeline.checkpoint()}

    def restore(self, state: dict) -> None:
        """DALI's random state from a checkpoint (none in a CPU backend's checkpoint:
        then the order resumes exactly, the random augmentations start afresh)."""
        self._rebuild(state.get("dali_checkpoint"))

    # --------------------------------------------------------------------- reading
    def _label(self, header, index: int):
        if header.flag == 0 and self.pipe.label_width == 1:
            return header.label  # one float: the common case, kept cheap
        return label_of(header, self.pipe.label_width, self.dataset, index)

    def _error(self, index: int, reason: str) -> RecordIOError:
        """An error that names the shard, the record and its byte offset."""
        return self.dataset.error(index, reason)

    def _read_one(self, index: int, k: int, payloads: list, labels: np.ndarray,
                  sizes: np.ndarray) -> Exception | None:  # fmt: skip
        """Read and check record ``index`` into position ``k`` (learning it when it
        passes); the error that names it, if it does not."""
        if index in self._bad:
            return self._error(index, self._bad[index])
        try:
            header, payload = unpack_view(self.dataset.read_view(index))
        except RecordIOError as exc:
            return self._error(index, exc.reason)
        try:
            labels[k] = self._label(header, index)
            payloads[k], sizes[k], own = _encoded(payload)
        except RecordIOError as exc:
            return exc
        except ImageError as exc:
            return self._error(index, str(exc))
        if own:
            self._table.learn(index, payloads[k], sizes[k], labels[k])
        return None

    def _shard_tensors_of(self, shards: list[int]) -> tuple[list, list]:
        """The memory maps of ``shards`` and DALI tensors wrapping them in place (each
        made once)."""
        from nvidia.dali.backend import TensorCPU

        for shard in shards:
            if shard not in self._shard_tensors:
                buf = self._table.shard_bytes(shard)
                self._shard_tensors[shard] = (buf, TensorCPU(buf))
        pairs = [self._shard_tensors[shard] for shard in shards]
        return [buf for buf, _ in pairs], [tensor for _, tensor in pairs]

    def _read(self, plan: Plan, b: int) -> _Batch:
        """Read, unpack and check batch ``b`` of ``plan`` (in the reader thread). Records
        read before come from :attr:`_table` for the whole batch at once (what their
        checks found, and where their images lie in the maps); the others are read and
        checked one by one, and learned."""
        from nvidia.dali.backend import TensorCPU

        pipe, table = self.pipe, self._table
        batch = plan.batch(b)
        indices = batch.tolist()
        n = len(indices)
        labels = np.empty((n, pipe.label_width), np.float32)
        sizes = np.empty((n, 2), np.int64)  # decoded width, height: the geometry needs them
        failed: list[tuple[int, Exception]] = []
        offsets = table.start[batch]  # once: the main thread may forget a record meanwhile
        lengths = table.length[batch].astype(np.int64)
        known = offsets != 0
        buffers: list[np.ndarray] = []
        tensors: list = []
        source: np.ndarray | None = None
        shards = table.shards(batch)
        if known.all():
            labels[:] = table.label[batch]
            sizes[:] = table.size[batch]
            if (shards == shards[0]).all():  # one shard's map, broadcast
                buffers, tensors = self._shard_tensors_of([int(shards[0])])
            else:
                distinct, source = np.unique(shards, return_inverse=True)
                buffers, tensors = self._shard_tensors_of(distinct.tolist())
        else:
            source = np.empty(n, np.intp)
            payloads: list[np.ndarray | None] = [None] * n
            if known.any():
                where = np.flatnonzero(known)
                labels[where] = table.label[batch[where]]
                sizes[where] = table.size[batch[where]]
                distinct, source[where] = np.unique(shards[where], return_inverse=True)
                buffers, tensors = self._shard_tensors_of(distinct.tolist())
            for k in np.flatnonzero(~known).tolist():
                error = self._read_one(indices[k], k, payloads, labels, sizes)
                if error is not None:
                    failed.append((k, error))
                    continue
                source[k], offsets[k], lengths[k] = len(buffers), 0, len(payloads[k])
                buffers.append(payloads[k])
                tensors.append(TensorCPU(payloads[k]))
        draws = pipe.draws(plan, b, n)
        if not failed:
            params = parameters(pipe.spec, draws, sizes, True, self._by_size)
            return _Batch((plan.key, b), plan.epoch, b, indices, buffers, tensors, source,
                          offsets, lengths, labels, plan.real[b], params,
                          pack(params, self._names, n, offsets, lengths))  # fmt: skip
        # As the CPU backend does: the k-th bad position gets the k-th good record (cyclic);
        # a batch with none gets the nearest earlier good record of the rank's plan.
        bad = {k for k, _ in failed}
        good = [k for k in range(n) if k not in bad]
        stand_in = None
        if not good and pipe.on_error == "skip":
            stand_in = self._stand_in(plan, b, set(indices))
        for j, (k, _) in enumerate(failed):
            if good:  # the position keeps its own draws, applied to the image it now holds
                src = good[j % len(good)]
                source[k], offsets[k], lengths[k] = source[src], offsets[src], lengths[src]
                labels[k], indices[k], sizes[k] = labels[src], indices[src], sizes[src]
                continue
            if stand_in is not None:
                indices[k], image, labels[k], sizes[k] = stand_in
            else:
                image, sizes[k] = self._filler, (8, 8)
            source[k], offsets[k], lengths[k] = len(buffers), 0, len(image)
            buffers.append(image)
            tensors.append(TensorCPU(image))
        params = parameters(pipe.spec, draws, sizes, True, self._by_size)
        out = _Batch((plan.key, b), plan.epoch, b, indices, buffers, tensors, source, offsets,
                     lengths, labels, plan.real[b], params,
                     pack(params, self._names, n, offsets, lengths))  # fmt: skip
        if pipe.on_error == "raise":
            out.error = failed[0][1]
        elif not good and stand_in is None:
            out.error = RecordIOError(f"no record of the epoch decodes (first: {failed[0][1]})")
        reads = plan.reads(b)  # a bad last record counts once, not per padding copy
        out.skipped = sum(1 for k, _ in failed if k < reads)
        return out

    def _stand_in(self, plan: Plan, b: int, tried: set[int]):
        """For a batch with no good record (a bad last record and its padding): the
        nearest record before it in the rank's plan (going back, then on from the plan's
        end) that reads and is not known bad, as (index, payload, label, (width, height));
        the CPU backend
        picks by the same rule. If DALI then fails on it, it is known bad and the next
        is taken."""
        for index in stand_in_candidates(plan, b, tried):
            if index in self._bad:
                continue
            try:
                header, payload = unpack_view(self.dataset.read_view(index))
                label = self._label(header, index)
                encoded, size = encoded_for_dali(payload)
            except (RecordIOError, ImageError):
                continue
            return index, encoded, label, size
        return None

    def _stream_from(self, plan: Plan, start: int):
        """(plan, batch) from ``start`` on, on into the following epochs."""
        while True:
            for b in range(start, plan.batches):
                yield plan, b
            plan, start = self.pipe.plan(plan.epoch + 1), 0

    def _read_ahead(self) -> None:
        while len(self._ahead) < self.depth + 1:
            plan, b = next(self._stream)
            self._ahead.append(self._reader.submit(self._read, plan, b))

    def _feed_next(self) -> None:
        self._read_ahead()
        batch = self._ahead.popleft().result()
        self._read_ahead()
        batch.feed(self._pipeline)
        self._inflight.append(batch)

    def _top_up(self) -> None:
        """Keep ``depth + 1`` batches fed and scheduled, as DALI's own ``run()`` does (it
        schedules the next iteration before it waits for the oldest), so that DALI has
        work queued while the caller holds a batch."""
        if self._fresh:  # DALI's first schedule_run runs `depth` iterations
            while len(self._inflight) < self.depth:
                self._feed_next()
            self._pipeline.schedule_run()
            self._fresh = False
        while len(self._inflight) < self.depth + 1:
            self._feed_next()
            self._pipeline.schedule_run()

    def _restart(self, plan: Plan, start: int) -> None:
        """Make batch ``start`` of ``plan`` the next one out."""
        key = (plan.key, start)
        if self._broken or (self._inflight and self._inflight[0].key != key):
            self._rebuild(self._checkpoint)  # discard what is in flight
        if self._inflight:
            return
        if self._ahead:
            head = self._ahead[0].result()
            if head.key == key:
                return
        self._drop_ahead()
        self._stream = self._stream_from(plan, start)

    # ------------------------------------------------------------------- decoding
    def _owned(self, tensors):
        if self.pipe.device == "cpu":
            # Into an array the caller owns: one handed out before that nothing refers to
            # any more, or a new one (the CPU backend's rule; fresh 10s-of-MiB arrays cost
            # page faults, and freeing them lets the resident size swing by whole batches).
            shape = (len(tensors), *tensors[0].shape())
            out = reusable(self._handed, shape)
            if out is None:
                out = np.empty(shape, np.dtype(self.pipe.spec.dtype))
            tensors.copy_to_external(ctypes.c_void_p(out.ctypes.data))
            self._handed.append(out)
            return out
        import cupy  # GPU only: copy out of DALI's buffer into a CuPy array we own

        tensor = tensors.as_tensor()
        out = cupy.empty(tensor.shape(), dtype=np.dtype(self.pipe.spec.dtype))
        stream = ctypes.c_void_p(cupy.cuda.get_current_stream().ptr)  # ordered on our stream
        tensor.copy_to_external(ctypes.c_void_p(out.data.ptr), stream, non_blocking=True)
        return out

    def _probe(self, batch: _Batch) -> dict[int, str]:
        """The records of ``batch`` that the graph cannot decode, one at a time."""
        found: dict[int, str] = {}
        tried: set[int] = set()
        probe = None
        for k, index in enumerate(batch.indices):
            if index in tried or batch.buffer(k) is self._filler:
                continue
            tried.add(index)
            if probe is None:
                probe = self._new_pipeline(None, 1, 1)
            batch.feed(probe, slice(k, k + 1))  # with the parameters of its position
            try:
                probe.run()
            except RuntimeError as exc:
                found[index] = f"cannot decode image: {_dali_reason(exc)}"
                probe = None  # DALI's pipeline is not usable after a failure
        return found

    def _recover(self, batch: _Batch, exc: BaseException) -> None:
        """DALI failed while ``batch`` was the next out: find the bad records, rebuild
        the pipeline at the last checkpoint; raise unless they can be skipped (the caller
        retries). The static executor reports a failure at the next ``outputs()``,
        whichever of the batches fed it was decoding: every batch in flight is probed. A
        bad record of a later batch is known from now on, and that batch raises or skips
        it when it comes (:meth:`_read`)."""
        pipe = self.pipe
        where = (f"batch {batch.batch} of epoch {batch.epoch} (rank {pipe.shard_id} of "
                 f"{pipe.num_shards})")  # fmt: skip
        bad: dict[int, str] = {}
        for fed in (batch, *self._inflight):
            bad.update(self._probe(fed))
        self._rebuild(self._checkpoint)
        if not bad:
            raise RuntimeError(f"DALI failed on {where}: {_dali_reason(exc)}") from exc
        self._bad.update(bad)
        for index in bad:
            self._table.forget(index)
        here = [index for index in batch.indices if index in bad]
        if pipe.on_error == "raise" and here:
            raise self._error(
                here[0], f"{bad[here[0]]} (DALI, {where}; on_error='skip' skips such records)"
            ) from None

    def run_epoch(self, plan: Plan, start: int):
        """Yield (data, labels, real count) for batches ``start..`` of ``plan``."""
        pipe = self.pipe
        self._generation += 1
        generation = self._generation
        b = start
        while b < plan.batches:
            if generation != self._generation:
                raise RuntimeError("another iter() of this Pipeline has started: this one ended")
            self._restart(plan, b)
            self._top_up()
            batch = self._inflight.popleft()
            try:
                (images,) = self._pipeline.outputs()
            except RuntimeError as exc:
                self._recover(batch, exc)
                continue  # the bad records are known now: read the batch again
            except BaseException:
                self._broken = True
                raise
            self._checkpoint = self._pipeline.checkpoint()
            self._done.append(batch)
            if batch.error is not None:
                raise batch.error
            data = self._owned(images)
            label = batch.labels[:, 0] if batch.labels.shape[1] == 1 else batch.labels
            if pipe.device == "gpu":
                import cupy

                label = cupy.asarray(label)
            pipe.skipped += batch.skipped
            del images
            self._top_up()
            yield data, label, batch.real
            del data, label  # so that the batch array can be reused once the caller drops it
            b += 1

    def close(self) -> None:
        self._drop_ahead()
        self._reader.shutdown(wait=True, cancel_futures=True)
        self._drain()
        self._done.clear()
        self._handed.clear()
        self._shard_tensors.clear()
        self._table.close()
