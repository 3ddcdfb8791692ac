"""The DALI backend: one graph, decoded by nvJPEG on the GPU or by DALI's CPU mode.

:func:`graph` is the whole data path, written once. ``device="gpu"`` and ``"cpu"``
differ in one string (the decoders' ``"mixed"`` or ``"cpu"``): every later operator
runs where its input lives, so on the GPU everything after decoding stays there.
Random parameters are DALI's own generators, seeded from the Pipeline's seed.

DALI recycles its output buffers on the next run, so every batch is copied into an
array the caller owns (``as_array`` on the CPU; on the GPU ``copy_to_external`` into a
new CuPy array, stream-ordered, device to device).
"""

from __future__ import annotations

import ctypes
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gpurec.augment import AugmentSpec

if TYPE_CHECKING:
    from gpurec.pipeline import Pipeline

__all__ = ["DALIBackend", "graph"]

READER = "reader"


def graph(
    fn,
    types,
    spec: AugmentSpec,
    *,
    device: str,
    recs: list[str],
    index: str,
    shard_id: int,
    num_shards: int,
    shuffle: bool,
):
    """The DALI graph: read, decode (+ random crop), resize, rotate, shear, colour,
    mirror and normalise, as :mod:`gpurec.augment` specifies. Call inside a pipeline."""
    decoder = "mixed" if device == "gpu" else "cpu"  # the only device string
    jpegs, labels = fn.readers.mxnet(
        path=recs,
        index_path=[index],
        shard_id=shard_id,
        num_shards=num_shards,
        random_shuffle=shuffle,
        pad_last_batch=True,
        stick_to_shard=False,
        name=READER,
    )
    h, w = spec.height, spec.width
    if spec.rand_crop:
        images = fn.decoders.image_random_crop(
            jpegs,
            device=decoder,
            output_type=types.RGB,
            random_area=[spec.min_random_area, spec.max_random_area],
            random_aspect_ratio=[spec.min_aspect_ratio, spec.max_aspect_ratio],
            num_attempts=10,
        )
        images = fn.resize(images, resize_x=w, resize_y=h)
    else:
        images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB)
        images = fn.resize(images, resize_shorter=spec.resize)
        images = fn.crop(images, crop=(h, w), crop_pos_x=0.5, crop_pos_y=0.5)
    if spec.max_rotate_angle:
        angle = fn.random.uniform(range=(-spec.max_rotate_angle, spec.max_rotate_angle))
        images = fn.rotate(images, angle=angle, keep_size=True, fill_value=spec.fill_value)
    if spec.max_shear_ratio:
        s = fn.random.uniform(range=(-spec.max_shear_ratio, spec.max_shear_ratio), shape=[2])
        s = s * types.Constant(np.array([1.0, 0.0], np.float32))  # horizontal shear only
        matrix = fn.transforms.shear(shear=s, center=[w / 2, h / 2])
        images = fn.warp_affine(
            images, matrix=matrix, inverse_map=False, fill_value=spec.fill_value
        )
    if spec.brightness or spec.contrast:
        factors = {
            name: fn.random.uniform(range=(1 - amount, 1 + amount))
            for name, amount in (("brightness", spec.brightness), ("contrast", spec.contrast))
            if amount
        }
        images = fn.brightness_contrast(images, contrast_center=128.0, **factors)
    if spec.saturation:
        images = fn.saturation(
            images, saturation=fn.random.uniform(range=(1 - spec.saturation, 1 + spec.saturation))
        )
    dtypes = {"float32": types.FLOAT, "float16": types.FLOAT16, "uint8": types.UINT8}
    images = fn.crop_mirror_normalize(
        images,
        dtype=dtypes[spec.dtype],
        output_layout="CHW" if spec.layout == "NCHW" else "HWC",
        mean=list(spec.mean),
        std=list(spec.std),
        mirror=fn.random.coin_flip(probability=0.5) if spec.rand_mirror else 0,
    )
    return images, labels


def _dali_reason(exc: Exception) -> str:
    """The informative line of a DALI error (its first lines are generic)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for i, line in enumerate(lines):
        if line.startswith("encountered:") and i + 1 < len(lines):
            return lines[i + 1]
    return lines[-1] if lines else type(exc).__name__


class DALIBackend:
    """Runs :func:`graph` in a DALI pipeline and hands out owned arrays.

    Checkpoints are DALI's own (reader position, shuffle buffer and random generator
    states), so a restored pipeline continues with exactly the batches it would have
    produced.
    """

    def __init__(self, pipe: Pipeline) -> None:
        self.pipe = pipe
        self._tmp = Path(tempfile.mkdtemp(prefix="gpurec-dali-"))
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._tmp, True)
        readers = pipe.dataset.readers
        if len(readers) == 1:  # one shard: its own .idx already counts from its start
            self._index = str(readers[0].idx_path)
        else:
            self._index = str(pipe.dataset.write_global_idx(self._tmp / "global.idx"))
        self._device_id = None
        if pipe.device == "gpu":
            import cupy

            self._device_id = cupy.cuda.Device().id
        self._pipeline = self._build()
        meta = self._pipeline.reader_meta(READER)
        shard_max = -(-meta["epoch_size_padded"] // meta["number_of_shards"])
        self._reader_batches = -(-shard_max // pipe.batch_size)  # one DALI reader epoch
        self._reader_epoch = 0  # the reader moves a rank to the next shard every epoch
        self._position = 0  # runs done in the current reader epoch

    def _build(self, checkpoint: bytes | None = None):
        from nvidia.dali import fn, pipeline_def, types

        pipe = self.pipe
        pipeline = pipeline_def(graph, enable_checkpointing=True)(
            fn,
            types,
            pipe.spec,
            device=pipe.device,
            recs=[str(p) for p in pipe.dataset.paths],
            index=self._index,
            shard_id=pipe.shard_id,
            num_shards=pipe.num_shards,
            shuffle=pipe.shuffle,
            batch_size=pipe.batch_size,
            num_threads=pipe.num_threads,
            device_id=self._device_id,
            seed=pipe.seed,
            prefetch_queue_depth=pipe.prefetch,
            checkpoint=checkpoint,
        )
        pipeline.build()
        return pipeline

    def state(self) -> dict:
        return {
            "dali_checkpoint": self._pipeline.checkpoint(),
            "reader_epoch": self._reader_epoch,
            "position": self._position,
        }

    def restore(self, state: dict) -> None:
        if "dali_checkpoint" not in state:
            raise ValueError("the checkpoint holds no DALI state (taken with backend='cpu'?)")
        self._pipeline = self._build(state["dali_checkpoint"])
        self._reader_epoch = int(state["reader_epoch"])
        self._position = int(state["position"])

    def _owned(self, tensors):
        if self.pipe.device == "cpu":
            return tensors.as_array()
        import cupy  # GPU only: copy out of DALI's buffer into a CuPy array we own

        tensor = tensors.as_tensor()
        out = cupy.empty(tensor.shape(), dtype=np.dtype(self.pipe.spec.dtype))
        stream = ctypes.c_void_p(cupy.cuda.get_current_stream().ptr)  # ordered on our stream
        tensor.copy_to_external(ctypes.c_void_p(out.data.ptr), stream, non_blocking=True)
        return out

    def _run_once(self, epoch: int, batch: int):
        """One DALI run; a failure names the batch, the rank, and the first record of the
        rank's share whose header shows it cannot be an image, when one does."""
        try:
            outputs = self._pipeline.run()
        except RuntimeError as exc:
            pipe = self.pipe
            raise RuntimeError(
                f"DALI failed on batch {batch} of epoch {epoch} (rank {pipe.shard_id} of "
                f"{pipe.num_shards}): {_dali_reason(exc)}{self._suspect()}; backend='cpu' "
                "can skip bad records (on_error='skip')"
            ) from exc
        self._position += 1
        if self._position == self._reader_batches:
            self._position, self._reader_epoch = 0, self._reader_epoch + 1
        return outputs

    def _suspect(self) -> str:
        from gpurec.pipeline import rank_range
        from gpurec.recordio import RecordIOError, unpack
        from gpurec.transcode import ImageError, sniff

        pipe, dataset = self.pipe, self.pipe.dataset
        rank = (pipe.shard_id + self._reader_epoch) % pipe.num_shards
        for i in range(*rank_range(len(dataset), pipe.num_shards, rank)):
            try:
                sniff(unpack(dataset.read(i))[1])
            except (ImageError, RecordIOError) as exc:
                return f"; suspect: {dataset.where(i)}: {exc}"
        return ""

    def run_epoch(self, epoch: int, start: int):
        """Yield (data, labels, real count) for batches ``start..`` of this epoch.

        A DALI reader epoch always runs to its end (``ceil(max share / batch)`` runs), so
        the next one starts at a shard boundary: the runs past ``len(pipe)`` (``"drop"``)
        happen before the last batch is handed out, so a checkpoint taken after it is at
        the start of the next epoch; an epoch left unfinished is run out first.
        """
        pipe = self.pipe
        if start == 0 and self._position:
            while self._position:
                self._run_once(epoch, -1)
        rank = (pipe.shard_id + self._reader_epoch) % pipe.num_shards
        for b in range(start, len(pipe)):
            images, labels = self._run_once(epoch, b)
            data = self._owned(images)
            label = labels.as_array().astype(np.float32, copy=False)
            if label.ndim == 2 and label.shape[1] == 1:
                label = label[:, 0]
            if pipe.device == "gpu":
                import cupy

                label = cupy.asarray(label)
            if b == len(pipe) - 1:
                while self._position:
                    self._run_once(epoch, b + 1)
            yield data, label, pipe.real_count(rank, b)

    def close(self) -> None:
        del self._pipeline
        self._cleanup()
