"""``gpurec.torch.RecordDataset``: a map-style torch Dataset over every layout gpurec reads.

Checked on the files MXNet 1.9.1 wrote (``../shared/golden``: the InsightFace layout with
and without ``.idx``), on packs made here (class names), on multi-label and broken
records, in real ``DataLoader`` workers (2, fork and spawn), with a real
``DistributedSampler`` of 2 replicas, pickled, and read from a real S3 API (moto).
torchvision does not import beside the CPU build of torch: transforms are written here.
"""

from __future__ import annotations

import hashlib
import pickle
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

from gpurec.recordio import IRHeader, RecordIOError, RecordWriter, pack
from gpurec.torch import RecordDataset
from tests.helpers import color_tree, label_from_pixels

METHODS = ["fork", "spawn"]


def to_tensor(image: Image.Image) -> torch.Tensor:
    """torchvision's ToTensor without torchvision: CHW float32 in [0, 1]."""
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


def corner(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels[:30, :30].copy())


def pixels_sha(image) -> str:
    return hashlib.sha256(np.ascontiguousarray(np.asarray(image)).tobytes()).hexdigest()


def test_insightface_items_are_the_images_not_the_header_or_identities(face, face_expected) -> None:
    ds = RecordDataset(face / "train.rec")
    assert len(ds) == 12  # keys 1..12; key 0 and the 3 identity records are not items
    exact = 0
    for i, key in enumerate(range(1, 13)):
        image, label = ds[i]
        ref = face_expected["images"][str(key)]
        assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (112, 112)
        assert type(label) is int and label == ref["label"]
        assert abs(float(np.asarray(image).mean()) - ref["imdecode_rgb_mean"]) < 0.5
        exact += pixels_sha(image) == ref["imdecode_rgb_sha256"]  # MXNet's very pixels
    assert exact >= 6  # another libjpeg may round a level here and there (test_mxface)
    assert ds[-1][1] == ds[11][1] and ds.classes is None and ds.lost == 0
    with pytest.raises(IndexError, match="out of range"):
        ds[12]


def test_numpy_option_and_file_without_idx(face, face_expected, tmp_path) -> None:
    shutil.copy(face / "shuffled.rec", tmp_path / "shuffled.rec")  # no .idx beside it
    ds = RecordDataset(tmp_path / "shuffled.rec", image="numpy")
    indexed = RecordDataset(face / "train.rec", image="numpy")
    assert len(ds) == 12
    by_key = {k: indexed[k - 1][0] for k in range(1, 13)}
    for i, key in enumerate(face_expected["shuffled_order"]):
        pixels, label = ds[i]
        assert pixels.dtype == np.uint8 and pixels.shape == (112, 112, 3)
        np.testing.assert_array_equal(pixels, by_key[key])
        assert label == face_expected["images"][str(key)]["label"]


def test_cut_short_file_raises_or_keeps_its_intact_records(face, tmp_path) -> None:
    rec = tmp_path / "cut.rec"
    data = (face / "shuffled.rec").read_bytes()
    rec.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(RecordIOError, match=r"cut\.rec"):
        RecordDataset(rec)
    ds = RecordDataset(rec, on_error="skip")
    assert 0 < len(ds) < 12 and ds.lost >= 1
    assert all(ds[i][0].size == (112, 112) for i in range(len(ds)))


def _records(tmp_path: Path, labels: list, payloads: list[bytes]) -> Path:
    rec = tmp_path / "r.rec"
    with RecordWriter(rec, rec.with_suffix(".idx")) as writer:
        for i, (label, payload) in enumerate(zip(labels, payloads, strict=True)):
            writer.write(pack(IRHeader(0, label, i, 0), payload), key=i)
    return rec


def _png(level: int) -> bytes:
    return cv2.imencode(".png", np.full((6, 5, 3), level, np.uint8))[1].tobytes()


def test_multi_label_and_fractional_labels(tmp_path) -> None:
    rec = _records(tmp_path, [[1.0, 0.0, 1.0], [0.0, 2.5, 1.0]], [_png(10), _png(20)])
    ds = RecordDataset(rec)
    image, label = ds[1]
    assert isinstance(label, np.ndarray) and label.dtype == np.float32
    assert label.tolist() == [0.0, 2.5, 1.0] and np.asarray(image)[0, 0].tolist() == [20] * 3
    assert [t.tolist() for t in ds.targets] == [[1.0, 0.0, 1.0], [0.0, 2.5, 1.0]]
    (tmp_path / "one").mkdir()
    one = RecordDataset(_records(tmp_path / "one", [0.5, 3.0], [_png(1), _png(2)]))
    assert [one[0][1], one[1][1]] == [0.5, 3] and type(one[1][1]) is int
    assert one.targets == [0.5, 3]


def test_a_record_that_does_not_decode(tmp_path) -> None:
    rec = _records(tmp_path, [0.0, 1.0, 2.0], [_png(10), b"not an image", _png(30)])
    with pytest.raises(RecordIOError, match=r"r\.rec.*record 1: cannot decode image"):
        RecordDataset(rec)[1]
    ds = RecordDataset(rec, on_error="skip", image="numpy")
    pixels, label = ds[1]  # the next record that decodes stands in
    assert label == 2 and pixels[0, 0, 0] == 30 and ds.skipped == 1


def test_class_names_and_transforms(tmp_path) -> None:
    from gpurec.pack import pack as pack_tree

    pack_tree(color_tree(tmp_path / "img", per_class=4), tmp_path / "ds", resize=40, workers=1)
    ds = RecordDataset(tmp_path / "ds", transform=to_tensor, target_transform=lambda y: y * 10)
    assert ds.classes == ["a", "b", "c"] and ds.class_to_idx == {"a": 0, "b": 1, "c": 2}
    assert "3 classes" in repr(ds)
    for i in range(len(ds)):
        image, label = ds[i]
        assert isinstance(image, torch.Tensor) and image.shape[0] == 3
        bgr = (image.permute(1, 2, 0).numpy() * 255)[..., ::-1]  # the pixels name the class
        assert label == 10 * label_from_pixels(bgr) == 10 * ds.targets[i]


def test_pickles_and_reopens(face) -> None:
    ds = RecordDataset(face / "train.rec", image="numpy")
    ds[0]
    copy = pickle.loads(pickle.dumps(ds))
    assert copy._data is None and len(copy) == 12
    for i in (0, 5, 11):
        np.testing.assert_array_equal(copy[i][0], ds[i][0])
        assert copy[i][1] == ds[i][1]


# ------------------------------------------------------------------ DataLoader workers


def _summary(images: torch.Tensor, labels: torch.Tensor) -> list[tuple]:
    return [(pixels_sha((img * 255).round().byte().permute(1, 2, 0).numpy()), int(lab))
            for img, lab in zip(images, labels, strict=True)]  # fmt: skip


@pytest.mark.parametrize("method", METHODS)
def test_dataloader_workers_read_what_the_parent_reads(face, method: str) -> None:
    ds = RecordDataset(face / "train.rec", transform=to_tensor)
    items = [ds[i] for i in range(len(ds))]
    parent = _summary(torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items]))
    loader = DataLoader(ds, batch_size=5, num_workers=2, multiprocessing_context=method)
    got = []
    for images, labels in loader:
        assert images.dtype == torch.float32 and labels.dtype == torch.int64
        got += _summary(images, labels)
    assert got == parent  # 12 items in batches of 5, 5, 2: each worker read its batches


@pytest.mark.parametrize("method", METHODS)
def test_distributed_sampler_two_replicas(face, method: str) -> None:
    ds = RecordDataset(face / "train.rec", image="numpy", transform=torch.from_numpy)
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=7)
        sampler.set_epoch(3)
        loader = DataLoader(ds, batch_size=3, sampler=sampler, num_workers=2,
                            multiprocessing_context=method)  # fmt: skip
        items = list(sampler)
        rows = [(img, int(lab)) for images, labels in loader
                for img, lab in zip(images, labels, strict=True)]  # fmt: skip
        assert len(rows) == 6
        for i, (img, lab) in zip(items, rows, strict=True):
            np.testing.assert_array_equal(img.numpy(), ds[i][0].numpy())
            assert lab == ds[i][1]
        seen += items
    assert sorted(seen) == list(range(12))  # the two ranks share the images, none twice


# ------------------------------------------------------------------ from a bucket


def test_reads_shards_at_a_url(tmp_path, monkeypatch) -> None:
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    import boto3

    from gpurec.pack import pack as pack_tree

    pack_tree(color_tree(tmp_path / "img", per_class=3), tmp_path / "out" / "ds", resize=32,
              workers=1, shards=2)  # fmt: skip
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
        for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "t"),
                            ("AWS_DEFAULT_REGION", "us-east-1")):  # fmt: skip
            monkeypatch.setenv(name, value)
        client = boto3.client("s3")
        client.create_bucket(Bucket="bucket")
        for path in sorted((tmp_path / "out").iterdir()):
            client.put_object(Bucket="bucket", Key=f"data/{path.name}", Body=path.read_bytes())
        local = RecordDataset(tmp_path / "out" / "ds", image="numpy")
        # this server's own endpoint: a new filesystem, not one cached for another server
        endpoint = {"client_kwargs": {"endpoint_url": f"http://{host}:{port}"}}
        remote = RecordDataset("s3://bucket/data/ds", image="numpy", cache_dir=tmp_path / "c",
                               storage_options=endpoint)  # fmt: skip
        assert len(remote) == len(local) == 9 and len(remote.paths) == 2
        for i in range(len(local)):
            np.testing.assert_array_equal(remote[i][0], local[i][0])
            assert remote[i][1] == local[i][1]
        assert remote.classes == ["a", "b", "c"]
        remote.transform = corner  # a fixed size, to collate
        loader = DataLoader(remote, batch_size=4, num_workers=2, multiprocessing_context="spawn")
        got = torch.cat([images for images, _ in loader])
        want = torch.stack([corner(local[i][0]) for i in range(len(local))])
        assert torch.equal(got, want)  # spawned workers open the shards fetched to the cache
    finally:
        server.stop()


def test_needs_neither_dali_nor_cupy(face) -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "sys.modules['cupy'] = None; sys.modules['nvidia'] = None  # importing them raises\n"
        "import gpurec, gpurec.torch\n"
        f"ds = gpurec.torch.RecordDataset({str(face / 'train.rec')!r})\n"
        "image, label = ds[3]\n"
        "print(image.size, label, sorted(m for m in sys.modules if m.split('.')[0] in "
        "('cupy', 'nvidia', 'mxnet', 'torchvision') and sys.modules[m] is not None))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(112, 112) 0 []"


def test_import_gpurec_loads_no_torch() -> None:
    import subprocess
    import sys

    code = "import sys, gpurec; gpurec.Pipeline; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
