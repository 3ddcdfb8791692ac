"""The CPU backend: gpurec's reader, OpenCV decoding, the AugmentSpec steps, NumPy out.

For machines without DALI. A thread pool works on a few images per task (OpenCV and
NumPy release the GIL), a few batches ahead of the trainer. Random parameters are
drawn per batch from ``(seed, epoch, batch)`` before any thread runs, so the batches
are the same bit for bit whatever the thread count or timing.

Speed (measured with ``benchmarks/bench_load.py``, see ``benchmarks/RESULTS-load.md``):
the crop is chosen from the JPEG header's size before decoding, so libjpeg can decode
at 1/2, 1/4 or 1/8 size whenever that still covers the output; the crop is resized
once; colour steps are single ``cv2.transform`` calls. The last step, mirror + BGR to
RGB + normalise + cast + layout, is one pass per channel straight into the batch: the
decoded BGR planes go to the RGB planes in reverse order (no colour conversion), and
``(x - mean) / std`` is a 256-entry table per channel (``cv2.LUT``) made by applying
the very same arithmetic to every uint8 value, so it is bit-identical to computing it
per pixel. Memory is reused rather than allocated per image: each thread resizes,
mirrors and splits into its own scratch images, and a batch array the caller no longer
references is filled again (fresh ones cost a page fault per 4 KiB). Tasks hold
several images each, so the executor's per-task cost is paid a few times per batch.
"""

from __future__ import annotations

import math
import sys
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import cv2
import numpy as np

from gpurec.augment import AugmentSpec, saturation_matrix
from gpurec.recordio import RecordIOError, unpack_view
from gpurec.transcode import ImageError, ImageInfo, UnknownImage, sniff

if TYPE_CHECKING:
    from gpurec.pipeline import Pipeline

__all__ = ["CPUBackend", "crop_window"]

ATTEMPTS = 10
_REDUCED = {
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}


def crop_window(
    width: int, height: int, spec: AugmentSpec, draws: np.ndarray | None
) -> tuple[float, float, float, float]:
    """The source window (x, y, w, h) that becomes the output image.

    With ``draws`` (``ATTEMPTS x 4`` uniforms): a random-resized crop, the whole image
    when no attempt fits. Without: resize-shorter-to-``spec.resize`` then center crop,
    expressed as the window of the source it keeps.
    """
    if draws is None:
        scale = spec.resize / min(width, height)
        w, h = spec.width / scale, spec.height / scale
        return (width - w) / 2, (height - h) / 2, w, h
    area = width * height
    lo, hi = math.log(spec.min_aspect_ratio), math.log(spec.max_aspect_ratio)
    for u_area, u_ratio, u_x, u_y in draws:
        target = area * (
            spec.min_random_area + (spec.max_random_area - spec.min_random_area) * u_area
        )
        ratio = math.exp(lo + (hi - lo) * u_ratio)
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            return float(int(u_x * (width - w + 1))), float(int(u_y * (height - h + 1))), w, h
    return 0.0, 0.0, float(width), float(height)


def _affine(spec: AugmentSpec, angle: float, shear: float) -> np.ndarray:
    """Forward 2x3 matrix: rotate ``angle`` degrees counter-clockwise, then shear, both
    about the image center (DALI's rotate and transforms.shear conventions)."""
    cx, cy = (spec.width - 1) / 2, (spec.height - 1) / 2
    rot = np.vstack([cv2.getRotationMatrix2D((cx, cy), angle, 1.0), [0, 0, 1]])
    sh = np.array([[1, shear, -shear * cy], [0, 1, 0], [0, 0, 1]])
    return (sh @ rot)[:2]


def _refcounts(arrays: deque) -> list[int]:
    """The reference count of each array of ``arrays`` as seen from here."""
    return [sys.getrefcount(arrays[k]) for k in range(len(arrays))]


# What _refcounts says of an array that only its deque holds (measured, not assumed: the
# count a function sees differs between Python versions).
_UNREFERENCED = _refcounts(deque([np.empty(0)]))[0]


def _tables(spec: AugmentSpec) -> np.ndarray:
    """``(3, 256)`` tables (RGB): what normalising and casting make of each uint8 value.

    Built with the arithmetic a per-pixel pass would do (``(x - mean) * (1 / std)`` in
    float32, cast to ``spec.dtype``), so looking values up is bit-identical to it.
    """
    values = np.arange(256, dtype=np.uint8)
    tables = np.empty((3, 256), spec.dtype)
    if spec.normalizes:
        mean = np.array(spec.mean, np.float32).reshape(3, 1)
        inv_std = (1 / np.array(spec.std, np.float32)).reshape(3, 1)
        np.subtract(values, mean, out=tables, casting="unsafe")
        np.multiply(tables, inv_std, out=tables, casting="unsafe")
    else:
        tables[...] = values
    return tables


class CPUBackend:
    """Turns a batch of record indices into a NumPy batch (see module docstring)."""

    def __init__(self, pipe: Pipeline) -> None:
        self.pipe = pipe
        self.spec = spec = pipe.spec
        self.dataset = pipe.dataset
        self.label_width = pipe.label_width
        self._dtype = np.dtype(spec.dtype)
        self._nchw = spec.layout == "NCHW"
        # Normalising as cv2.LUT lookups; float16 tables go through as their uint16 bits.
        tables = _tables(spec)
        self._view = np.uint16 if self._dtype == np.float16 else None
        if self._view is not None:
            tables = tables.view(self._view)
        self._lookup = self._dtype != np.uint8  # uint8 holds the pixels as they are
        self._luts = [np.ascontiguousarray(t) for t in tables]  # R, G, B
        self._lut3 = np.ascontiguousarray(tables.T.reshape(256, 1, 3))  # for HWC, RGB
        self._local = threading.local()  # per-thread scratch images, reused
        # Batches handed out, reused once nobody holds them any more (see _new_batch).
        self._handed: deque[np.ndarray] = deque(maxlen=pipe.prefetch + 3)
        cv2.setNumThreads(1)  # parallelism comes from our threads
        self._pool = ThreadPoolExecutor(pipe.num_threads, thread_name_prefix="gpurec-cpu")
        # Images per task: a batch in about 2 tasks per thread, so the executor's cost is
        # paid a few times per batch while every thread still has work at a batch's end.
        self._chunk = max(1, math.ceil(pipe.batch_size / (2 * pipe.num_threads)))

    # ---------------------------------------------------------------------- records
    def _unpack(self, index: int):
        try:
            return unpack_view(self.dataset.read_view(index))
        except RecordIOError as exc:
            raise self._error(index, exc.reason) from None

    def _error(self, index: int, reason: str) -> RecordIOError:
        """An error naming the shard, the record and its byte offset."""
        dataset = self.dataset
        shard = dataset.locate(index)[0]
        return RecordIOError(
            f"{dataset.name(index)}: {reason}", dataset.paths[shard], offset=dataset.offset(index)
        )

    def _label(self, header, index: int) -> np.ndarray:
        label = np.atleast_1d(np.asarray(header.label, np.float32))
        if label.size != self.label_width:
            raise RecordIOError(
                f"has {label.size} label(s), the dataset has {self.label_width}: "
                + self.dataset.where(index)
            )
        return label

    # ----------------------------------------------------------------------- pixels
    def _scratch(self) -> list[np.ndarray]:
        """This thread's reusable images: resized, mirrored, and three planes (fresh
        arrays per image would cost page faults: the allocator hands big ones back)."""
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            h, w = self.spec.height, self.spec.width
            scratch = [np.empty((h, w, 3), np.uint8) for _ in range(2)]
            scratch += [np.empty((h, w), np.uint8) for _ in range(3)]
            self._local.scratch = scratch
        return scratch

    def _plan(self, payload: bytes, draws) -> tuple[ImageInfo, tuple | None, int]:
        """Before decoding: the image's header info, the crop window on that size (None
        when the size is unknown), and libjpeg's scale denominator (1, 2, 4 or 8)."""
        spec = self.spec
        try:
            info = sniff(payload)
        except UnknownImage:  # OpenCV decides (PPM, JPEG 2000...), as DALI's decoder does
            return ImageInfo("unknown"), None, 1
        except ImageError as exc:  # a known format, broken (cut short...): refused, as
            raise ImageError(f"cannot decode image: {exc}") from None  # on DALI
        if info.format != "jpeg":
            return info, None, 1
        window = crop_window(info.width, info.height, spec, draws)
        _, _, w, h = window
        for denom in (8, 4, 2):
            if w / denom >= spec.width and h / denom >= spec.height:
                return info, window, denom
        return info, window, 1

    def _pixels(self, payload: bytes, draws, angle: float, shear: float, jitter: np.ndarray,
                resized: np.ndarray) -> tuple[np.ndarray, bool]:  # fmt: skip
        """Decode, crop, resize and the geometric and colour steps of one image:
        ``(height, width, 3)`` uint8, and whether its channels are RGB (else BGR)."""
        spec = self.spec
        info, window, denom = self._plan(payload, draws)
        flags = _REDUCED[denom] if denom > 1 else cv2.IMREAD_COLOR
        try:
            img = cv2.imdecode(np.frombuffer(payload, np.uint8), flags)
        except cv2.error:
            img = None
        # Kept until the next decode of this task: freeing it first would let the
        # allocator hand the memory back to the kernel and fault it in again each image.
        self._local.decoded = img
        if img is None:
            try:
                sniff(payload)
            except ImageError as exc:
                raise ImageError(f"cannot decode image: {exc}") from None
            raise ImageError(f"cannot decode image ({info.format})")
        dh, dw = img.shape[:2]
        if window is not None and (dw > dh) == (info.width > info.height):
            x, y, w, h = window
            sx, sy = dw / info.width, dh / info.height
        else:  # size unknown before decoding, or EXIF-rotated: choose on the decoded image
            x, y, w, h = crop_window(dw, dh, spec, draws)
            sx = sy = 1.0
        x0, y0 = max(0, round(x * sx)), max(0, round(y * sy))
        x1, y1 = (
            min(dw, max(x0 + 1, round((x + w) * sx))),
            min(dh, max(y0 + 1, round((y + h) * sy))),
        )
        out = img[y0:y1, x0:x1]
        size = (spec.width, spec.height)
        if out.shape[1] != spec.width or out.shape[0] != spec.height:
            shrink = out.shape[1] > 2 * spec.width or out.shape[0] > 2 * spec.height
            interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
            out = cv2.resize(out, size, dst=resized, interpolation=interp)
        # Rotation, shear, brightness and contrast treat the channels alike: they run on
        # BGR. Saturation mixes channels with an RGB matrix: convert before it.
        if angle or shear:
            fill = (float(spec.fill_value),) * 3
            out = cv2.warpAffine(out, _affine(spec, angle, shear), size, flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_CONSTANT, borderValue=fill)  # fmt: skip
        if spec.brightness or spec.contrast:
            b, c = float(jitter[0]), float(jitter[1])
            gain, offset = b * c, b * 128 * (1 - c)
            out = cv2.transform(out, np.hstack([np.eye(3) * gain, np.full((3, 1), offset)]))
        if spec.saturation:
            out = cv2.cvtColor(out, cv2.COLOR_BGR2RGB)
            return cv2.transform(out, saturation_matrix(float(jitter[2]))), True
        return out, False

    def _write(self, img: np.ndarray, rgb: bool, mirror: bool, dst: np.ndarray,
               scratch: list[np.ndarray]) -> None:  # fmt: skip
        """Mirror, RGB order, normalise, cast and lay out ``img`` into ``dst``."""
        if mirror:
            img = cv2.flip(img, 1, dst=scratch[1])
        if self._nchw:
            planes = cv2.split(img, scratch[2:])
            if not rgb:
                planes = planes[::-1]
            for c in range(3):
                out = dst[c]
                if not self._lookup:
                    np.copyto(out, planes[c])
                    continue
                if self._view is not None:
                    out = out.view(self._view)
                if cv2.LUT(planes[c], self._luts[c], dst=out) is not out:
                    raise RuntimeError("cv2.LUT did not write into the batch")  # pragma: no cover
            return
        if not rgb:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        if not self._lookup:
            np.copyto(dst, img)
            return
        out = dst if self._view is None else dst.view(self._view)
        if cv2.LUT(img, self._lut3, dst=out) is not out:
            raise RuntimeError("cv2.LUT did not write into the batch")  # pragma: no cover

    def _sample(self, index: int, params: tuple, data: np.ndarray, labels: np.ndarray,
                i: int, scratch: list[np.ndarray]) -> None:  # fmt: skip
        draws, mirror, angle, shear, jitter = params
        header, payload = self._unpack(index)
        labels[i] = self._label(header, index)
        try:
            img, rgb = self._pixels(payload, draws, angle, shear, jitter, scratch[0])
        except ImageError as exc:
            raise self._error(index, str(exc)) from None
        self._write(img, rgb, mirror, data[i], scratch)

    def _task(self, items: list[tuple], data: np.ndarray, labels: np.ndarray,
              stop_at_error: bool) -> list[tuple[int, Exception]]:  # fmt: skip
        """Several images of a batch, in order; the errors, by position in the batch."""
        errors = []
        scratch = self._scratch()
        try:
            for i, index, params in items:
                try:
                    self._sample(index, params, data, labels, i, scratch)
                except Exception as exc:
                    errors.append((i, exc))
                    if stop_at_error:
                        break
        finally:
            self._local.decoded = None
        return errors

    # ----------------------------------------------------------------------- batches
    def _draws(self, epoch: int, batch: int, n: int, extra: tuple = ()) -> list[tuple]:
        spec = self.spec
        rng = np.random.default_rng([self.pipe.seed, epoch, batch, 1, *extra])
        crop = rng.random((n, ATTEMPTS, 4)) if spec.rand_crop else [None] * n
        mirror = rng.random(n) < 0.5 if spec.rand_mirror else np.zeros(n, bool)
        angle = rng.uniform(-1, 1, n) * spec.max_rotate_angle
        shear = rng.uniform(-1, 1, n) * spec.max_shear_ratio
        amount = np.array([spec.brightness, spec.contrast, spec.saturation])
        jitter = 1 + rng.uniform(-1, 1, (n, 3)) * amount
        return list(zip(crop, mirror.tolist(), angle.tolist(), shear.tolist(), jitter,
                        strict=True))  # fmt: skip

    def _new_batch(self, n: int) -> np.ndarray:
        """An array for the next batch: one handed out before that nothing refers to any
        more (no variable, view, tensor or buffer export holds a reference; a raw data
        pointer or a weak reference does not count), or else a new one.

        A new array costs the kernel a page fault and a zeroed page for every 4 KiB on
        first write: for float32 224x224 batches, about a tenth of the CPU time.
        """
        shape = self.spec.batch_shape(n)
        for k, count in enumerate(_refcounts(self._handed)):
            if count == _UNREFERENCED and self._handed[k].shape == shape:
                buf = self._handed[k]
                del self._handed[k]
                return buf
        return np.empty(shape, self._dtype)

    def _submit(self, epoch: int, batch: int, indices: np.ndarray, extra: tuple = ()):
        n = len(indices)
        data = self._new_batch(n)
        labels = np.empty((n, self.label_width), np.float32)
        items = list(zip(range(n), indices.tolist(), self._draws(epoch, batch, n, extra),
                         strict=True))  # fmt: skip
        stop = self.pipe.on_error == "raise"
        futures = [
            self._pool.submit(self._task, items[k : k + self._chunk], data, labels, stop)
            for k in range(0, n, self._chunk)
        ]
        return data, labels, futures

    def _collect(self, data, labels, futures: list[Future], plan=None, b: int = 0,
                 extra: tuple = ()):  # fmt: skip
        errors: list[tuple[int, Exception]] = []
        try:
            for future in futures:
                errors += future.result()
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        failed = []
        for i, exc in errors:  # in batch order: tasks hold consecutive images
            if self.pipe.on_error == "raise" or not isinstance(exc, RecordIOError):
                for f in futures:
                    f.cancel()
                raise exc
            failed.append(i)
        if failed:
            good = sorted(set(range(len(data))) - set(failed))
            if not good:
                self._stand_in(data, labels, failed, plan, b, extra, errors[0][1])
            for k, i in enumerate(failed):
                if good:
                    data[i], labels[i] = data[good[k % len(good)]], labels[good[k % len(good)]]
                else:
                    data[i], labels[i] = data[failed[0]], labels[failed[0]]
            self.pipe.skipped += len(failed)
        return data, labels

    def _stand_in(self, data, labels, failed: list[int], plan, b: int, extra: tuple,
                  first: Exception) -> None:  # fmt: skip
        """A batch with no good record (a bad last record and its padding): its first
        position gets the nearest record before the batch in the rank's plan (going back,
        then on from the plan's end) that decodes; the DALI backend picks by this rule."""
        if plan is not None:
            params = self._draws(plan.epoch, b, 1, extra)[0]
            scratch = self._scratch()
            n, start = len(plan.indices), b * plan.batch_size
            tried = {int(i) for i in plan.batch(b)}
            for step in range(1, n + 1):
                index = int(plan.indices[(start - step) % n])
                if index in tried:
                    continue
                tried.add(index)
                try:
                    self._sample(index, params, data, labels, failed[0], scratch)
                    return
                except RecordIOError:
                    continue
        raise RecordIOError(f"no record of the epoch decodes (first: {first})")

    def run_epoch(self, plan, start: int):
        """Yield (data, labels, real count) for batches ``start..`` of ``plan`` (a
        :class:`gpurec.order.Plan`)."""
        pipe, epoch = self.pipe, plan.epoch
        # Random draws follow (seed, epoch, batch); a part of an epoch laid out again by
        # an elastic resume gets draws of its own.
        extra = (len(plan.segments),) if plan.segments else ()
        pending: deque = deque()
        todo = iter(range(start, plan.batches))

        def submit_next() -> None:
            b = next(todo, None)
            if b is not None:
                pending.append((b, *self._submit(epoch, b, plan.batch(b), extra)))

        try:
            for _ in range(pipe.prefetch):
                submit_next()
            while pending:
                b, data, labels, futures = pending.popleft()
                submit_next()
                data, labels = self._collect(data, labels, futures, plan, b, extra)
                if self.label_width == 1:
                    labels = labels[:, 0]
                self._handed.append(data)
                yield data, labels, plan.real[b]
                del data  # so that its buffer can be reused once the caller drops it
        finally:
            for _, _, _, futures in pending:
                for f in futures:
                    f.cancel()

    def state(self) -> dict:
        return {}  # batches follow from (seed, epoch, batch): nothing else to keep

    def restore(self, state: dict) -> None:
        pass

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._handed.clear()
