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
        images = fn.brightness_contrast(
            images,
            brightness=fn.random.uniform(range=(1 - spec.brightness, 1 + spec.brightness)),
            contrast=fn.random.uniform(range=(1 - spec.contrast, 1 + spec.contrast)),
            contrast_center=128.0,
        )
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


class DALIBackend:
    """Runs :func:`graph` in a DALI pipeline and hands out owned arrays."""

    def __init__(self, pipe: Pipeline) -> None:
        from nvidia.dali import fn, pipeline_def, types

        self.pipe = pipe
        self._tmp = Path(tempfile.mkdtemp(prefix="gpurec-dali-"))
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._tmp, True)
        index = str(pipe.dataset.write_global_idx(self._tmp / "global.idx"))
        device_id = None
        if pipe.device == "gpu":
            import cupy

            device_id = cupy.cuda.Device().id
        self._pipeline = pipeline_def(graph)(
            fn,
            types,
            pipe.spec,
            device=pipe.device,
            recs=[str(p) for p in pipe.dataset.paths],
            index=index,
            shard_id=pipe.shard_id,
            num_shards=pipe.num_shards,
            shuffle=pipe.shuffle,
            batch_size=pipe.batch_size,
            num_threads=pipe.num_threads,
            device_id=device_id,
            seed=pipe.seed,
            prefetch_queue_depth=pipe.prefetch,
        )
        self._pipeline.build()
        self._reader_epoch = 0  # DALI's reader moves a rank to the next shard every epoch
        self._reader_batches = -(-self._shard_size_max() // pipe.batch_size)

    def _shard_size_max(self) -> int:
        meta = self._pipeline.reader_meta(READER)
        return -(-meta["epoch_size_padded"] // meta["number_of_shards"])

    def rank(self) -> int:
        return (self.pipe.shard_id + self._reader_epoch) % self.pipe.num_shards

    def _owned(self, tensors, name: str, epoch: int, batch: int):
        if self.pipe.device == "cpu":
            return tensors.as_array()
        import cupy  # GPU only: copy out of DALI's buffer into a CuPy array we own

        tensor = tensors.as_tensor()
        out = cupy.empty(tensor.shape(), dtype=np.dtype(self.pipe.spec.dtype))
        tensor.copy_to_external(out.data.ptr, cuda_stream=cupy.cuda.get_current_stream().ptr,
                                non_blocking=True)  # fmt: skip
        return out

    def run_epoch(self, epoch: int, start: int):
        """Yield (data, labels, real count) for batches ``start..`` of this epoch.

        DALI's reader epoch always runs to its end (``ceil(max share / batch)`` runs) so
        the next epoch starts at a shard boundary; with ``last_batch="drop"`` the tail
        batches are run and not handed out.
        """
        pipe = self.pipe
        if start:
            raise NotImplementedError("the DALI backend resumes at epoch boundaries only")
        rank = self.rank()
        for b in range(self._reader_batches):
            try:
                images, labels = self._pipeline.run()
            except RuntimeError as exc:
                raise RuntimeError(
                    f"DALI failed on batch {b} of epoch {epoch} (rank {pipe.shard_id}, "
                    f"records {pipe.dataset.paths[0].name}...): {str(exc).splitlines()[0]}; "
                    "`backend='cpu'` names the record and can skip it (on_error='skip')"
                ) from exc
            if b >= len(pipe):
                continue
            data = self._owned(images, "data", epoch, b)
            label = labels.as_array().astype(np.float32, copy=False)
            if label.ndim == 2 and label.shape[1] == 1:
                label = label[:, 0]
            if pipe.device == "gpu":
                import cupy

                label = cupy.asarray(label)
            yield data, label, pipe.real_count(rank, b)
        self._reader_epoch += 1

    def close(self) -> None:
        del self._pipeline
        self._cleanup()
