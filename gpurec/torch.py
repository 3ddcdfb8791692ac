"""PyTorch's surface: a map-style ``Dataset`` of `.rec` records, and arcface_torch's loader.

:class:`RecordDataset` is for code written around ``torch.utils.data``: ``ds[i]`` is
``(PIL RGB image, label)`` as torchvision's datasets give, so the usual transforms,
``DataLoader`` workers, samplers (``DistributedSampler``, weighted ones through
:attr:`RecordDataset.targets`) and collate functions work unchanged. It reads every
layout :class:`gpurec.dataset.Dataset` reads (InsightFace files without their header and
identity records, files without an `.idx`, files cut short with ``on_error="skip"``) and
every source :class:`gpurec.Pipeline` takes, URLs included. It needs neither DALI nor
CuPy; Pillow only for PIL images (``image="numpy"`` gives arrays instead).

:func:`get_dataloader` is insightface's ``recognition/arcface_torch/dataset.py``
``get_dataloader`` with its signature and behaviour on gpurec, without MXNet: replace
``from dataset import get_dataloader`` in ``train_v2.py`` by
``from gpurec.torch import get_dataloader``.

For the augmenting, batching loader of whole training runs, use
``gpurec.Pipeline(..., output="torch")``: it decodes on the GPU with DALI.
"""

from __future__ import annotations

import contextlib
import operator
import os
import random
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from gpurec.dataset import Dataset, resolve_source
from gpurec.recordio import RecordIOError, unpack, unpack_view

__all__ = ["RecordDataset", "get_dataloader"]

# MXNet's training iterator ignores EXIF orientation; so do the Pipeline's backends.
_COLOR = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION


class RecordDataset(torch.utils.data.Dataset):
    """The images of `.rec` shards as a map-style ``torch.utils.data.Dataset``.

    >>> ds = RecordDataset("out/pets_train", transform=torchvision_transform)  # doctest: +SKIP
    >>> image, label = ds[0]                  # PIL RGB image (transformed), int label

    ``source``: what :class:`gpurec.Pipeline` takes (a `.rec`, a shard prefix, a glob,
    URLs, or a list of them). ``ds[i]`` is ``(image, label)``: the image a PIL RGB image
    (``image="pil"``) or an ``(H, W, 3)`` uint8 RGB array (``image="numpy"``); the label
    an ``int`` for one whole-number label, a ``float`` for one that is not, a float32
    array for several (multi-label records). ``transform`` and ``target_transform`` are
    applied to them, as in torchvision.

    ``on_error``: ``"raise"`` refuses shards cut short and raises for a record that does
    not decode, naming shard, record and byte; ``"skip"`` opens cut-short shards with
    their intact records (:attr:`lost` counts the rest) and gives the next record that
    decodes in place of one that does not (:attr:`skipped` counts them, per process).

    In ``DataLoader`` workers: under fork a worker reads the shards the parent opened
    (memory-mapped, nothing copied); under spawn, and whenever the dataset is pickled,
    only the shard paths travel and each process opens them itself on first use.
    ``classes``: the class names when the shards have them (``classes.json`` beside the
    shards, as ``gpurec pack`` writes; see :func:`gpurec.inspection.find_classes`).
    """

    def __init__(
        self,
        source: str | os.PathLike | Sequence[str | os.PathLike],
        transform: Callable | None = None,
        target_transform: Callable | None = None,
        *,
        image: str = "pil",
        on_error: str = "raise",
        cache_dir: str | os.PathLike | None = None,
        cache_limit: int | None = None,
        storage_options: dict | None = None,
    ) -> None:
        if image not in ("pil", "numpy"):
            raise ValueError(f"image must be 'pil' or 'numpy', got {image!r}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if image == "pil":
            try:
                import PIL.Image  # noqa: F401
            except ImportError:
                raise ImportError("image='pil' needs Pillow: pip install pillow (or use "
                                  "image='numpy')") from None  # fmt: skip
        self.transform, self.target_transform = transform, target_transform
        self.image, self.on_error = image, on_error
        remote = dict(cache_dir=cache_dir, cache_limit=cache_limit,
                      storage_options=storage_options)  # fmt: skip
        # Shards at URLs are fetched into the shard cache here, all of them: a map-style
        # dataset reads any record at any time, so it waits for them once rather than
        # in every worker.
        self.paths = resolve_source(source, **remote)
        self.skipped = 0
        self._data: Dataset | None = None
        self._length = len(self._dataset())
        self.lost = self._data.lost
        from gpurec.inspection import find_classes

        self.classes: list[str] | None = find_classes(self.paths[0]) if self.paths else None
        self._targets: list | None = None

    # -------------------------------------------------------------- the records
    def _dataset(self) -> Dataset:
        if self._data is None:
            self._data = Dataset(self.paths, on_error=self.on_error)
        return self._data

    def __len__(self) -> int:
        return self._length

    @property
    def class_to_idx(self) -> dict[str, int] | None:
        """``{name: label}``, as torchvision's ``ImageFolder`` has it (None without names)."""
        return None if self.classes is None else {c: k for k, c in enumerate(self.classes)}

    @property
    def targets(self) -> list:
        """Every item's label, in order (from the record headers alone; read once)."""
        if self._targets is None:
            data, targets = self._dataset(), []
            for i in range(len(self)):
                head = data.head(i)  # one float label: in the header itself
                record = head if head[:4] == b"\0\0\0\0" else data.read(i)
                targets.append(self._label(unpack(record)[0]))
            self._targets = targets
        return self._targets

    @staticmethod
    def _label(header) -> int | float | np.ndarray:
        label = header.label
        if np.ndim(label):  # several labels per record
            return np.asarray(label, np.float32)
        value = float(label)
        return int(value) if value.is_integer() else value

    def _decode(self, i: int) -> tuple[np.ndarray, Any]:
        data = self._dataset()
        try:  # the payload as a view of the memory-mapped shard: decoded without a copy
            header, payload = unpack_view(data.read_view(i))
        except RecordIOError as exc:
            raise data.error(i, exc.reason) from None
        try:
            pixels = cv2.imdecode(np.frombuffer(payload, np.uint8), _COLOR) if payload else None
        except cv2.error:
            pixels = None
        if pixels is None:
            raise data.error(i, f"cannot decode image ({len(payload)} bytes)")
        return cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB), self._label(header)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        i = operator.index(index)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range: the dataset has {n} images")
        for k in range(n):
            try:
                pixels, label = self._decode((i + k) % n)
                break
            except RecordIOError:
                if self.on_error == "raise":
                    raise
                self.skipped += 1  # the next record that decodes stands in for it
        else:
            raise RecordIOError(f"no record of {n} decodes", self.paths[0])
        if self.image == "pil":
            from PIL import Image

            sample = Image.fromarray(pixels, "RGB")
        else:
            sample = pixels
        if self.transform is not None:
            sample = self.transform(sample)
        if self.target_transform is not None:
            label = self.target_transform(label)
        return sample, label

    # ----------------------------------------------------------- worker habits
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_data"] = None  # memory maps do not pickle: the receiver opens the paths
        return state

    def close(self) -> None:
        if self._data is not None:
            self._data.close()
            self._data = None

    def __repr__(self) -> str:
        shards = f"{len(self.paths)} shard(s)"
        names = f", {len(self.classes)} classes" if self.classes else ""
        return f"RecordDataset({len(self)} images in {shards}{names}, image={self.image!r})"


# ------------------------------------------------------------------ arcface_torch


def _dist_info() -> tuple[int, int]:
    """(rank, world size): torch.distributed's when it is set up, else (0, 1), as
    arcface_torch's ``get_dist_info``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _seed_worker(worker_id: int, num_workers: int, rank: int, seed: int) -> None:
    """arcface_torch's ``worker_init_fn``: every worker of every rank its own seed."""
    worker_seed = num_workers * rank + worker_id + seed
    np.random.seed(worker_seed)
    random.seed(worker_seed)
    torch.manual_seed(worker_seed)


def _face_label(label: int | float | np.ndarray) -> int:
    """arcface_torch's label: the first of several, as a whole number (``torch.long``
    truncates as ``int`` does), so that batches collate to int64 ``(N,)``."""
    return int(label[0]) if np.ndim(label) else int(label)


class _FaceTransform:
    """arcface_torch's training transform, by hand: a random horizontal mirror, then a
    float32 CHW tensor normalised to [-1, 1] (``ToTensor`` then ``Normalize(0.5, 0.5)``)."""

    def __call__(self, pixels: np.ndarray) -> torch.Tensor:
        if torch.rand(1).item() < 0.5:  # torchvision's RandomHorizontalFlip draws so
            pixels = pixels[:, ::-1]
        chw = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
        return chw.float().div_(127.5).sub_(1.0)  # == (x / 255 - 0.5) / 0.5


class _SyntheticFaces(torch.utils.data.Dataset):
    """arcface_torch's ``SyntheticDataset`` (``root_dir="synthetic"``): one random face-
    sized image, label 1, a million times, for measuring the training step alone."""

    def __init__(self) -> None:
        img = torch.from_numpy(np.random.randint(0, 255, (3, 112, 112), dtype=np.int32))
        self.img, self.label = img.float().div(255).sub(0.5).div(0.5), 1

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.img, self.label

    def __len__(self) -> int:
        return 1_000_000


class _DeviceLoader(DataLoader):
    """A ``DataLoader`` whose batches arrive on ``device`` (arcface_torch's
    ``DataLoaderX``): copied from pinned memory without blocking, on the current stream,
    so the next kernel on that stream sees them (stream-ordered, no extra stream)."""

    def __init__(self, device: torch.device, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.device = device

    def __iter__(self) -> Iterator:
        for images, labels in super().__iter__():
            if self.device.type != "cpu":  # GPU: stream-ordered host-to-device copies
                images = images.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
            yield images, labels


class _PipelineLoader:
    """The ``dali=True`` loader: a :class:`gpurec.Pipeline` on the rank's GPU (or DALI's
    CPU mode without one), handing torch tensors; iterating reads the next epoch, as
    arcface_torch's ``DALIWarper`` resets after each."""

    def __init__(self, pipe, device: torch.device) -> None:
        self.pipe, self.device = pipe, device

    def _on_device(self):
        if self.device.type == "cuda":  # GPU: gpurec makes batches on the current device
            return torch.cuda.device(self.device)
        return contextlib.nullcontext()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        with self._on_device():
            for batch in self.pipe:
                label = batch.label
                if label.ndim > 1:  # several labels per record: the first, as arcface_torch's
                    label = label[:, 0].contiguous()
                yield batch.data, label

    def __len__(self) -> int:
        return len(self.pipe)

    def set_epoch(self, epoch: int) -> None:
        self.pipe.set_epoch(epoch)

    def reset(self) -> None:
        """``train_v2.py`` calls ``train_loader.reset()`` after each epoch with DALI: the
        next ``iter()`` reads the next epoch anyway (an epoch left early included)."""


def get_dataloader(
    root_dir: str,
    local_rank: int,
    batch_size: int,
    dali: bool = False,
    dali_aug: bool = False,
    seed: int | None = 2048,
    num_workers: int = 2,
):
    """insightface arcface_torch's ``get_dataloader``, on gpurec (no MXNet).

    Reads ``root_dir/train.rec`` (its ``train.idx`` when there; without one the file is
    indexed by one scan, which arcface_torch cannot do) and yields ``(images, labels)``:
    float32 ``N x 3 x 112 x 112`` images normalised to [-1, 1] and int64 ``(N,)`` labels,
    on ``cuda:local_rank`` when CUDA is available (else on the CPU), each image mirrored
    at random, the last incomplete batch dropped. Every rank (``torch.distributed``'s
    rank and world size) gets the same number of batches. InsightFace's header and
    identity records are not samples (DALI's ``readers.mxnet`` counts them).

    - ``dali=False``: a ``DataLoader`` (so ``train_v2.py``'s
      ``train_loader.sampler.set_epoch(epoch)`` works) over :class:`RecordDataset` with a
      ``DistributedSampler(shuffle=True, seed=seed)``, ``num_workers`` workers seeded as
      arcface_torch seeds them (``seed=None``: not seeded), pinned memory on the GPU.
    - ``dali=True``: :class:`gpurec.Pipeline` (DALI, on the GPU when there is one) with
      ``rand_mirror`` and mean = std = 127.5, reading a new permutation of all records
      each epoch from ``seed`` (2048 when None: the ranks must agree on it).
    - ``dali_aug=True`` with ``dali=True`` (arcface_torch's extra DALI augmentations:
      random downscale, Gaussian blur, HSV and grey) is refused with a ``ValueError``:
      gpurec's augmenter follows MXNet's and has no blur; use ``dali_aug=False``.
      Without DALI it is ignored, as arcface_torch ignores it.
    - ``root_dir="synthetic"``: arcface_torch's synthetic dataset (one random image).

    A folder of images (arcface_torch's ``ImageFolder`` fallback) is refused: pack it
    first (``gpurec pack``).
    """
    if dali and dali_aug and root_dir != "synthetic":  # without DALI arcface_torch ignores it
        raise ValueError(
            "get_dataloader(dali_aug=True): arcface_torch's DALI-only augmentations "
            "(random downscale, Gaussian blur, HSV jitter, grey) are not in gpurec's "
            "augmenter, which follows MXNet's; use dali_aug=False (random mirror only, as "
            "arcface_torch's default)"
        )
    rank, world_size = _dist_info()
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if root_dir == "synthetic":
        train_set: torch.utils.data.Dataset = _SyntheticFaces()
    else:
        rec = Path(root_dir) / "train.rec"
        if not rec.is_file():
            raise FileNotFoundError(
                f"{rec} not found: gpurec reads the InsightFace layout (train.rec, and "
                "train.idx when there); a folder of images is packed first with `gpurec pack`"
            )
        if dali:
            from gpurec.pipeline import Pipeline

            with contextlib.ExitStack() as on_device:
                if device.type == "cuda":  # GPU: the Pipeline takes the current device
                    on_device.enter_context(torch.cuda.device(device))
                pipe = Pipeline(
                    str(rec), batch_size, (3, 112, 112),
                    device="gpu" if device.type == "cuda" else "cpu", backend="dali",
                    train=True, shuffle=True, seed=2048 if seed is None else seed,
                    shard_id=rank, num_shards=world_size, last_batch="drop",
                    crop="center", resize=0,  # the 112x112 faces as they are
                    mean=(127.5, 127.5, 127.5), std=(127.5, 127.5, 127.5), rand_mirror=True,
                    num_threads=2, output="torch", label_dtype="int64",
                )  # fmt: skip
            return _PipelineLoader(pipe, device)
        train_set = RecordDataset(str(rec), transform=_FaceTransform(),
                                  target_transform=_face_label, image="numpy")  # fmt: skip
    sampler = DistributedSampler(
        train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=seed or 0
    )
    init_fn = None
    if seed is not None:
        init_fn = partial(_seed_worker, num_workers=num_workers, rank=rank, seed=seed)
    return _DeviceLoader(
        device,
        dataset=train_set,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
        worker_init_fn=init_fn,
    )
