"""The CPU backend: gpurec's reader, OpenCV decoding, the AugmentSpec steps, NumPy out.

For machines without DALI. A thread pool works on one image per task (OpenCV and
NumPy release the GIL), a few batches ahead of the trainer. Random parameters are
drawn per batch from ``(seed, epoch, batch)`` before any thread runs, so the batches
are the same bit for bit whatever the thread count or timing.

Speed: the crop is chosen from the JPEG header's size before decoding, so libjpeg can
decode at 1/2, 1/4 or 1/8 size whenever that still covers the output; the crop is
resized once; colour steps are single ``cv2.transform`` calls; normalising writes
straight into the batch.
"""

from __future__ import annotations

import math
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import cv2
import numpy as np

from gpurec.augment import AugmentSpec, saturation_matrix
from gpurec.recordio import RecordIOError, unpack
from gpurec.transcode import ImageError, ImageInfo, sniff

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


class CPUBackend:
    """Turns a batch of record indices into a NumPy batch (see module docstring)."""

    def __init__(self, pipe: Pipeline) -> None:
        self.pipe = pipe
        self.spec = pipe.spec
        self.dataset = pipe.dataset
        self.label_width = pipe.label_width
        spec = self.spec
        self._mean = np.array(spec.mean, np.float32).reshape(3, 1, 1)
        self._inv_std = (1 / np.array(spec.std, np.float32)).reshape(3, 1, 1)
        if spec.layout == "NHWC":
            self._mean, self._inv_std = self._mean.reshape(3), self._inv_std.reshape(3)
        self._dtype = np.dtype(spec.dtype)
        cv2.setNumThreads(1)  # parallelism comes from our threads, one image each
        self._pool = ThreadPoolExecutor(pipe.num_threads, thread_name_prefix="gpurec-cpu")

    # ---------------------------------------------------------------------- records
    def _unpack(self, index: int):
        try:
            return unpack(self.dataset.read(index))
        except RecordIOError as exc:
            shard, pos = self.dataset.locate(index)
            reader = self.dataset.readers[shard]
            raise RecordIOError(
                f"record {pos}: {exc.reason}", reader.path, offset=int(reader.offsets[pos])
            ) from None

    def _label(self, header, index: int) -> np.ndarray:
        label = np.atleast_1d(np.asarray(header.label, np.float32))
        if label.size != self.label_width:
            raise RecordIOError(
                f"has {label.size} label(s), the dataset has {self.label_width}: "
                + self.dataset.where(index)
            )
        return label

    # ----------------------------------------------------------------------- pixels
    def _pixels(self, payload: bytes, draws, mirror: bool, angle: float, shear: float,
                jitter: np.ndarray) -> np.ndarray:  # fmt: skip
        """Decode and augment one image: (height, width, 3) uint8 RGB."""
        spec = self.spec
        try:
            info = sniff(payload)
        except ImageError:
            info = ImageInfo("unknown")
        denom = 1
        if info.format == "jpeg":
            x, y, w, h = crop_window(info.width, info.height, spec, draws)
            for d in (8, 4, 2):
                if w / d >= spec.width and h / d >= spec.height:
                    denom = d
                    break
        flags = _REDUCED[denom] if denom > 1 else cv2.IMREAD_COLOR
        try:
            img = cv2.imdecode(np.frombuffer(payload, np.uint8), flags)
        except cv2.error:
            img = None
        if img is None:
            try:
                sniff(payload)
            except ImageError as exc:
                raise ImageError(f"cannot decode image: {exc}") from None
            raise ImageError(f"cannot decode image ({info.format})")
        dh, dw = img.shape[:2]
        if info.format == "jpeg" and (dw > dh) == (info.width > info.height):
            sx, sy = dw / info.width, dh / info.height
        else:  # size unknown before decoding, or EXIF-rotated: choose on the decoded image
            x, y, w, h = crop_window(dw, dh, spec, draws)
            sx = sy = 1.0
        x0, y0 = max(0, round(x * sx)), max(0, round(y * sy))
        x1, y1 = (
            min(dw, max(x0 + 1, round((x + w) * sx))),
            min(dh, max(y0 + 1, round((y + h) * sy))),
        )
        crop = img[y0:y1, x0:x1]
        size = (spec.width, spec.height)
        if crop.shape[1] != spec.width or crop.shape[0] != spec.height:
            shrink = crop.shape[1] > 2 * spec.width or crop.shape[0] > 2 * spec.height
            interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
            crop = cv2.resize(crop, size, interpolation=interp)
        out = cv2.cvtColor(crop, cv2.COLOR_BGR2RGB)
        if angle or shear:
            fill = (float(spec.fill_value),) * 3
            out = cv2.warpAffine(out, _affine(spec, angle, shear), size, flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_CONSTANT, borderValue=fill)  # fmt: skip
        if spec.brightness or spec.contrast:
            b, c = float(jitter[0]), float(jitter[1])
            gain, offset = b * c, b * 128 * (1 - c)
            out = cv2.transform(out, np.hstack([np.eye(3) * gain, np.full((3, 1), offset)]))
        if spec.saturation:
            out = cv2.transform(out, saturation_matrix(float(jitter[2])))
        return out[:, ::-1] if mirror else out

    def _write(self, img: np.ndarray, dst: np.ndarray) -> None:
        spec = self.spec
        src = img.transpose(2, 0, 1) if spec.layout == "NCHW" else img
        if spec.normalizes:
            np.subtract(src, self._mean, out=dst, casting="unsafe")
            np.multiply(dst, self._inv_std, out=dst, casting="unsafe")
        else:
            dst[...] = src

    def _sample(self, index: int, params: tuple, data: np.ndarray, labels: np.ndarray,
                i: int) -> None:  # fmt: skip
        header, payload = self._unpack(index)
        labels[i] = self._label(header, index)
        try:
            img = self._pixels(payload, *params)
        except ImageError as exc:
            shard, pos = self.dataset.locate(index)
            reader = self.dataset.readers[shard]
            raise RecordIOError(
                f"record {pos}: {exc}", reader.path, offset=int(reader.offsets[pos])
            ) from None
        self._write(img, data[i])

    # ----------------------------------------------------------------------- batches
    def _draws(self, epoch: int, batch: int, n: int) -> list[tuple]:
        spec = self.spec
        rng = np.random.default_rng([self.pipe.seed, epoch, batch, 1])
        crop = rng.random((n, ATTEMPTS, 4)) if spec.rand_crop else [None] * n
        mirror = rng.random(n) < 0.5 if spec.rand_mirror else np.zeros(n, bool)
        angle = rng.uniform(-1, 1, n) * spec.max_rotate_angle
        shear = rng.uniform(-1, 1, n) * spec.max_shear_ratio
        amount = np.array([spec.brightness, spec.contrast, spec.saturation])
        jitter = 1 + rng.uniform(-1, 1, (n, 3)) * amount
        return [(crop[i], bool(mirror[i]), float(angle[i]), float(shear[i]), jitter[i])
                for i in range(n)]  # fmt: skip

    def _submit(self, epoch: int, batch: int, indices: np.ndarray):
        n = len(indices)
        data = np.empty(self.spec.batch_shape(n), self._dtype)
        labels = np.empty((n, self.label_width), np.float32)
        futures = [
            self._pool.submit(self._sample, int(index), params, data, labels, i)
            for i, (index, params) in enumerate(zip(indices, self._draws(epoch, batch, n),
                                                    strict=True))
        ]  # fmt: skip
        return data, labels, futures

    def _collect(self, data, labels, futures: list[Future]):
        failed = []
        for i, future in enumerate(futures):
            exc = future.exception()
            if exc is None:
                continue
            if self.pipe.on_error == "raise" or not isinstance(exc, RecordIOError):
                for f in futures:
                    f.cancel()
                raise exc
            failed.append(i)
        if failed:
            good = [i for i in range(len(futures)) if i not in set(failed)]
            if not good:
                raise RecordIOError(
                    f"no record of a batch decodes (first: {futures[0].exception()})"
                )
            for k, i in enumerate(failed):
                data[i], labels[i] = data[good[k % len(good)]], labels[good[k % len(good)]]
            self.pipe.skipped += len(failed)
        return data, labels

    def run_epoch(self, epoch: int, start: int):
        """Yield (data, labels, real count) for batches ``start..`` of ``epoch``."""
        pipe, bs = self.pipe, self.pipe.batch_size
        order = pipe.epoch_order(epoch)
        pending: deque = deque()
        todo = iter(range(start, len(pipe)))

        def submit_next() -> None:
            b = next(todo, None)
            if b is not None:
                pending.append((b, *self._submit(epoch, b, order[b * bs : (b + 1) * bs])))

        try:
            for _ in range(pipe.prefetch):
                submit_next()
            while pending:
                b, data, labels, futures = pending.popleft()
                submit_next()
                data, labels = self._collect(data, labels, futures)
                if self.label_width == 1:
                    labels = labels[:, 0]
                yield data, labels, pipe.real_count(pipe.shard_id, b)
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
