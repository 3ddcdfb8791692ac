"""``gpurec.torch.get_dataloader``: arcface_torch's loader, on the InsightFace-layout file
MXNet 1.9.1 wrote (``../shared/golden/insightface``: 12 images at keys 1..12).

Both paths (``dali=False``: DataLoader workers; ``dali=True``: gpurec's DALI path, here in
DALI's CPU mode) must hand float32 ``N x 3 x 112 x 112`` images in [-1, 1] that are the
records' images, some mirrored, and int64 labels, dropping the last batch; with two real
ranks (``torch.distributed``, gloo) each rank gets the same number of batches and no
image twice.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gpurec.torch import RecordDataset, get_dataloader

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def face(golden: Path) -> Path:
    return golden / "insightface"


@pytest.fixture(scope="module")
def references(face: Path) -> tuple[np.ndarray, np.ndarray]:
    """The 12 images as the loader normalises them, and their labels."""
    ds = RecordDataset(face / "train.rec", image="numpy")
    images = np.stack([ds[i][0].transpose(2, 0, 1) for i in range(len(ds))]).astype(np.float32)
    return images / 127.5 - 1, np.array([ds[i][1] for i in range(len(ds))])


def identify(batch: torch.Tensor, references, tolerance: float) -> list[tuple[int, bool]]:
    """(record, mirrored) of each image of the batch."""
    images, _ = references
    out = []
    for img in batch.numpy():
        plain = np.abs(images - img).reshape(len(images), -1).max(axis=1)
        flipped = np.abs(images[..., ::-1] - img).reshape(len(images), -1).max(axis=1)
        k, mirrored = (int(plain.argmin()), False)
        if flipped.min() < plain.min():
            k, mirrored = int(flipped.argmin()), True
        assert min(plain[k], flipped[k]) <= tolerance, (k, plain[k], flipped[k])
        out.append((k, mirrored))
    return out


def test_signature_is_arcface_torchs() -> None:
    params = inspect.signature(get_dataloader).parameters
    assert list(params) == ["root_dir", "local_rank", "batch_size", "dali", "dali_aug", "seed",
                            "num_workers"]  # fmt: skip
    assert [params[p].default for p in ("dali", "dali_aug", "seed", "num_workers")] == [
        False, False, 2048, 2]  # fmt: skip


@pytest.mark.parametrize("dali", [False, True])
def test_batches_are_normalised_mirrored_records_with_int64_labels(face, references, dali) -> None:
    loader = get_dataloader(str(face), 0, 4, dali=dali, seed=5)
    if not dali:
        assert isinstance(loader, torch.utils.data.DataLoader)  # train_v2.py checks this
        loader.sampler.set_epoch(0)
    seen, mirrored = [], set()
    for images, labels in loader:
        assert images.dtype == torch.float32 and tuple(images.shape) == (4, 3, 112, 112)
        assert labels.dtype == torch.int64 and tuple(labels.shape) == (4,)
        assert images.min() >= -1 and images.max() <= 1 and images.device.type == "cpu"
        # OpenCV decodes the dali=False path (MXNet's pixels); DALI's decoder may round
        # a level differently here and there
        found = identify(images, references, 1e-6 if not dali else 3 / 127.5)
        assert labels.tolist() == [int(references[1][k]) for k, _ in found]
        seen += [k for k, _ in found]
        mirrored |= {m for _, m in found}
    assert sorted(seen) == list(range(12))  # 12 images, batches of 4: 3, none dropped here
    assert mirrored == {False, True}
    again = get_dataloader(str(face), 0, 4, dali=dali, seed=5)
    first = next(iter(again))
    assert first[1].tolist() == next(iter(loader))[1].tolist() or dali  # seeded order
    if dali:
        loader.pipe.close()
        again.pipe.close()


def test_last_batch_is_dropped(face) -> None:
    for dali in (False, True):
        loader = get_dataloader(str(face), 0, 5, dali=dali)
        assert len(loader) == 2 and sum(len(labels) for _, labels in loader) == 10


def test_refusals_and_synthetic(face, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"dali_aug=True.*not in gpurec's augmenter"):
        get_dataloader(str(face), 0, 4, dali=True, dali_aug=True)
    # without DALI arcface_torch ignores dali_aug (a train_v2.py that passes cfg.seed in
    # its place runs): so does gpurec
    assert isinstance(get_dataloader(str(face), 0, 4, dali_aug=True), torch.utils.data.DataLoader)
    with pytest.raises(FileNotFoundError, match=r"train\.rec not found.*gpurec pack"):
        get_dataloader(str(tmp_path), 0, 4)
    images, labels = next(iter(get_dataloader("synthetic", 0, 8, num_workers=0)))
    assert tuple(images.shape) == (8, 3, 112, 112) and labels.tolist() == [1] * 8


_RANKS = r"""
import json, os, sys
import torch
import torch.distributed as dist
from gpurec.torch import get_dataloader

def run(rank, root, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    report = {}
    for dali in (False, True):
        loader = get_dataloader(root, rank, 2, dali=dali, num_workers=1)
        if not dali:
            loader.sampler.set_epoch(1)
        report[str(dali)] = [[img.sum().item() for img in images] + labels.tolist()
                             for images, labels in loader]
    with open(f"{out}.{rank}", "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()

if __name__ == "__main__":
    torch.multiprocessing.spawn(run, args=tuple(sys.argv[1:]), nprocs=2)
"""


def test_two_ranks_get_the_same_number_of_batches_and_no_image_twice(face, tmp_path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "rank"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    script = tmp_path / "ranks.py"  # spawned ranks import the function from a file
    script.write_text(_RANKS)
    res = subprocess.run([sys.executable, str(script), str(face), str(port), str(out)],
                         env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
    for dali in ("False", "True"):
        batches = [r[dali] for r in ranks]
        assert len(batches[0]) == len(batches[1]) == 3  # 6 images each, batches of 2
        sums = [round(v, 2) for b in batches for batch in b for v in batch[:2]]
        assert len(sums) == 12
        # mirroring keeps an image's sum: 12 different images, each read once
        assert len(set(sums)) == 12


def test_train_v2_loop_with_dali_resets_between_epochs(face, references) -> None:
    # train_v2.py: ``for img, labels in train_loader: ...`` then ``train_loader.reset()``
    loader = get_dataloader(str(face), 0, 4, dali=True, seed=5)
    epochs = []
    for _ in range(2):
        found = [k for images, _ in loader for k, _ in identify(images, references, 3 / 127.5)]
        loader.reset()
        epochs.append(found)
    loader.pipe.close()
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(12))
    assert epochs[0] != epochs[1]  # a new permutation each epoch


@pytest.mark.parametrize("dali", [False, True])
def test_several_labels_give_the_first_as_int64(tmp_path, dali: bool) -> None:
    from tests.helpers import write_records

    images = [np.full((112, 112, 3), 10 * k, np.uint8) for k in range(8)]
    labels = [np.array([k % 3, 100 + k], np.float32) for k in range(8)]
    write_records(tmp_path / "train.rec", images, labels)
    loader = get_dataloader(str(tmp_path), 0, 4, dali=dali, num_workers=0)
    got = {}
    for batch, labels in loader:
        assert labels.dtype == torch.int64 and tuple(labels.shape) == (4,)
        for img, label in zip(batch, labels.tolist(), strict=True):  # grey level 10k
            got[round((float(img.mean()) + 1) * 127.5 / 10)] = label
    assert got == {k: k % 3 for k in range(8)}
    if dali:
        loader.pipe.close()
