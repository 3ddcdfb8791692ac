"""insightface's ``MXFaceDataset`` on ``gpurec.mxnet``: one import line changed.

``MXFaceDataset`` below is ``recognition/arcface_torch/dataset.py`` of deepinsight/insightface
with ``import mxnet as mx`` replaced by ``import gpurec.mxnet as mx``. One more change:
the torchvision transform is left out (``self.transform = None``; torchvision does not
import beside the CPU build of torch the tests install). Its reading code is verbatim.

It runs on the InsightFace-layout files MXNet 1.9.1 wrote (``../shared/golden/insightface``)
and must give the keys, labels, payloads and pixels MXNet gave (``expected.json``), in the
parent process and in worker processes: PyTorch ``DataLoader`` workers (fork and spawn)
and a plain ``multiprocessing.Pool`` (fork and spawn). The
dataset is made in the parent and inherited (fork) or pickled (spawn), as DataLoader does.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import numbers
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import gpurec.mxnet as mx


class MXFaceDataset(Dataset):
    def __init__(self, root_dir, local_rank):
        super(MXFaceDataset, self).__init__()  # noqa: UP008 - kept as insightface wrote it
        self.transform = None  # insightface: ToPILImage, RandomHorizontalFlip, ToTensor, Normalize
        self.root_dir = root_dir
        self.local_rank = local_rank
        path_imgrec = os.path.join(root_dir, "train.rec")
        path_imgidx = os.path.join(root_dir, "train.idx")
        self.imgrec = mx.recordio.MXIndexedRecordIO(path_imgidx, path_imgrec, "r")
        s = self.imgrec.read_idx(0)
        header, _ = mx.recordio.unpack(s)
        if header.flag > 0:
            self.header0 = (int(header.label[0]), int(header.label[1]))
            self.imgidx = np.array(range(1, int(header.label[0])))
        else:
            self.imgidx = np.array(list(self.imgrec.keys))

    def __getitem__(self, index):
        idx = self.imgidx[index]
        s = self.imgrec.read_idx(idx)
        header, img = mx.recordio.unpack(s)
        label = header.label
        if not isinstance(label, numbers.Number):
            label = label[0]
        label = torch.tensor(label, dtype=torch.long)
        sample = mx.image.imdecode(img).asnumpy()
        if self.transform is not None:
            sample = self.transform(sample)
        return sample, label

    def __len__(self):
        return len(self.imgidx)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def summary(sample: np.ndarray, label) -> tuple[str, float, int, tuple]:
    """What a worker sends back: pixel hash, pixel mean, label, shape."""
    sample = np.asarray(sample)
    return sha(sample.tobytes()), float(sample.mean()), int(label), sample.shape


def test_keys_labels_payloads_and_pixels_match_mxnet(face: Path, face_expected: dict) -> None:
    ds = MXFaceDataset(str(face), 0)
    assert ds.header0 == tuple(face_expected["header0"]["label"]) == (13, 16)
    assert (
        ds.imgidx.tolist() == list(range(1, 13)) == sorted(int(k) for k in face_expected["images"])
    )
    assert len(ds) == 12
    exact = 0
    for index, key in enumerate(ds.imgidx.tolist()):
        image = face_expected["images"][str(key)]
        header, payload = mx.recordio.unpack(ds.imgrec.read_idx(key))
        assert sha(payload) == image["payload_sha256"] and header.id == image["id"]
        sample, label = ds[index]
        assert int(label) == image["label"]
        assert sample.shape == (112, 112, 3) and sample.dtype == np.uint8
        assert type(sample) is np.ndarray
        assert abs(float(sample.mean()) - image["imdecode_rgb_mean"]) < 0.5, key
        exact += sha(sample.tobytes()) == image["imdecode_rgb_sha256"]
    # MXNet's very pixels on the OpenCV builds tried (4.11, 5.0: all 12); another libjpeg
    # build may round a level differently here and there, which the means above allow
    assert exact >= 6


def test_identity_records(face: Path, face_expected: dict) -> None:
    ds = MXFaceDataset(str(face), 0)
    lo, hi = ds.header0
    for key in range(lo, hi):
        header, payload = mx.recordio.unpack(ds.imgrec.read_idx(key))
        assert payload == b"" and header.label.tolist() == face_expected["identities"][str(key)]


# -------------------------------------------------------------- in worker processes

_dataset: MXFaceDataset | None = None


def _init_worker(dataset: MXFaceDataset) -> None:
    global _dataset
    _dataset = dataset


def _read_item(index: int) -> tuple:
    sample, label = _dataset[index]
    return (*summary(sample, label), os.getpid())


def _parent_view(ds: MXFaceDataset) -> list[tuple]:
    return [summary(*ds[i]) for i in range(len(ds))]


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_multiprocessing_workers_read_what_the_parent_reads(face: Path, method: str) -> None:
    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {method} start method here")
    ds = MXFaceDataset(str(face), 0)
    parent = _parent_view(ds)  # the parent reads first, as a training script's checks do
    ctx = multiprocessing.get_context(method)
    # fork: the workers inherit the dataset object; spawn: it is pickled to them
    with ctx.Pool(2, initializer=_init_worker, initargs=(ds,)) as pool:
        results = pool.map(_read_item, range(len(ds)), chunksize=1)
    assert [r[:4] for r in results] == parent
    assert os.getpid() not in {r[4] for r in results}
    # the parent's reader still works (pickling MXNet's closes it)
    assert _parent_view(ds) == parent


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_torch_dataloader_workers(face: Path, face_expected: dict, method: str) -> None:
    ds = MXFaceDataset(str(face), 0)
    parent = _parent_view(ds)
    loader = DataLoader(ds, batch_size=4, shuffle=False, num_workers=2,
                        multiprocessing_context=method)  # fmt: skip
    got = []
    for samples, labels in loader:
        assert labels.dtype == torch.long
        got += [summary(s.numpy(), lab) for s, lab in zip(samples, labels, strict=True)]
    assert got == parent
    assert [g[2] for g in got] == [face_expected["images"][str(k)]["label"] for k in range(1, 13)]
