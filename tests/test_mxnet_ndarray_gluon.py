"""``gpurec.mxnet``'s ``image`` functions, ``nd``/``ndarray`` and ``gluon.data`` against real
MXNet 1.9.1: the expected values in ``tests/data/mxnet_image`` were written by MXNet itself
(``benchmarks/make_mxnet_image_reference.py``, run in MXNet's side venv).

The face-evaluation client below makes, in our words, exactly the calls of insightface's
``recognition/arcface_torch/eval/verification.py::load_bin`` (pickle with the
``encoding='bytes'`` fallback, ``mx.image.imdecode``, ``mx.image.resize_short``,
``nd.transpose(img, axes=(2, 0, 1))``, ``mx.ndarray.flip(data=img, axis=2)``,
``.asnumpy()`` into torch tensors) with only its imports pointing at gpurec.
"""

from __future__ import annotations

import hashlib
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import gpurec.mxnet as mx
from gpurec.mxnet import ndarray as nd  # insightface: ``from mxnet import ndarray as nd``

DATA = Path(__file__).resolve().parent / "data" / "mxnet_image"
# Bicubic interpolation (MXNet's interp=2, the crops' and resize_short's default): the
# OpenCV MXNet 1.9.1 bundles rounds up to 5% of the levels one lower or higher than the
# OpenCV here; every other interpolation is exact.
CUBIC = -1


@pytest.fixture(scope="module")
def ops() -> dict[str, np.ndarray]:
    with np.load(DATA / "image_ops.npz") as f:
        return dict(f)


@pytest.fixture(scope="module")
def gluon_ref() -> dict[str, np.ndarray]:
    with np.load(DATA / "gluon.npz") as f:
        return dict(f)


def same(got, want, tolerance: float = 0) -> None:
    """MXNet's array: the same shape and dtype, the same values (within ``tolerance``)."""
    got = got.asnumpy() if hasattr(got, "asnumpy") else np.asarray(got)
    assert type(got) is np.ndarray
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.dtype)
    if tolerance == CUBIC:
        diff = np.abs(got.astype(int) - want.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.05, (diff.max(), (diff > 0).mean())
    elif tolerance:
        diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
        assert diff.max() <= tolerance, diff.max()
    else:
        np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------ the load_bin client


@torch.no_grad()
def read_verification_pairs(path: Path, image_size: tuple[int, int]):
    """Our client of the calls load_bin makes, in its order."""
    try:
        with open(path, "rb") as f:
            bins, issame_list = pickle.load(f)  # a Python 2 pickle fails here ...
    except UnicodeDecodeError:
        with open(path, "rb") as f:
            bins, issame_list = pickle.load(f, encoding="bytes")  # ... and loads here
    count = len(issame_list) * 2
    data_list = [torch.zeros((count, 3, *image_size), dtype=torch.uint8) for _ in (0, 1)]
    for idx in range(count):
        img = mx.image.imdecode(bins[idx])
        if img.shape[1] != image_size[0]:
            img = mx.image.resize_short(img, image_size[0])
        img = nd.transpose(img, axes=(2, 0, 1))
        for flip in [0, 1]:
            if flip == 1:
                img = mx.ndarray.flip(data=img, axis=2)
            data_list[flip][idx][:] = torch.from_numpy(img.asnumpy())
    return data_list, issame_list


def test_load_bin_gives_mxnets_arrays() -> None:
    with pytest.raises(UnicodeDecodeError):  # the file is a Python 2 pickle, as lfw.bin
        pickle.loads((DATA / "faces.bin").read_bytes())
    data_list, issame = read_verification_pairs(DATA / "faces.bin", (112, 112))
    with np.load(DATA / "load_bin.npz") as want:
        assert list(issame) == want["issame"].tolist() == [True, False]
        for flip in (0, 1):
            got = data_list[flip].numpy()
            ref = want[f"data_{flip}"]
            assert got.shape == ref.shape == (4, 3, 112, 112) and got.dtype == ref.dtype
            np.testing.assert_array_equal(got[2], ref[2])  # the PNG: exact
            # the JPEGs: MXNet's libjpeg may round a level differently here and there
            diff = np.abs(got.astype(int) - ref.astype(int))
            assert diff.max() <= 3 and diff.mean() < 0.05, (flip, diff.max(), diff.mean())
    # the second set is the first mirrored, image by image
    np.testing.assert_array_equal(data_list[1].numpy(), data_list[0].numpy()[..., ::-1])


# ------------------------------------------------------------ mx.image


def test_imresize_and_resize_short(ops) -> None:
    src = mx.nd.array(ops["src"], dtype="uint8")
    for interp in (0, 1, 2, 3, 4, 5):
        exact = 0 if interp != 2 else CUBIC
        same(mx.image.imresize(src, 50, 30, interp), ops[f"imresize_50x30_interp{interp}"], exact)
        same(mx.image.imresize(src, 90, 70, interp), ops[f"imresize_90x70_interp{interp}"], exact)
    same(mx.image.imresize(src, 33, 21), ops["imresize_default"])
    for interp in (0, 1, 2, 3, 9):
        exact = 0 if interp != 2 else CUBIC
        same(mx.image.resize_short(src, 30, interp), ops[f"resize_short_30_interp{interp}"], exact)
    same(mx.image.resize_short(src, 100), ops["resize_short_100"], CUBIC)
    tall = mx.nd.array(ops["src"].transpose(1, 0, 2), dtype="uint8")
    same(mx.image.resize_short(tall, 32), ops["resize_short_tall_32"], CUBIC)
    refused = ops["imresize_refused_interps"].tolist()  # the codes MXNet's imresize fails on
    assert refused == [7, 9, 10]
    for code in refused:
        with pytest.raises(ValueError, match=f"Unknown interp method {code}"):
            mx.image.imresize(src, 10, 10, code)


def test_crops(ops) -> None:
    src = mx.nd.array(ops["src"], dtype="uint8")
    same(mx.image.fixed_crop(src, 5, 7, 30, 20), ops["fixed_crop"])
    resized = mx.image.fixed_crop(src, 5, 7, 30, 20, size=(16, 16))  # bicubic, taller
    same(resized, ops["fixed_crop_resized"], CUBIC)
    crop, rect = mx.image.center_crop(src, (32, 24))
    same(crop, ops["center_crop"])
    assert rect == tuple(ops["center_crop_rect"].tolist())
    crop, rect = mx.image.center_crop(src, (80, 50), interp=1)
    same(crop, ops["center_crop_big"])
    assert rect == tuple(ops["center_crop_big_rect"].tolist())
    random.seed(7)  # MXNet draws the position from Python's random
    for k in range(3):
        crop, rect = mx.image.random_crop(src, (20, 20))
        same(crop, ops[f"random_crop_{k}"])
        assert rect == tuple(ops[f"random_crop_{k}_rect"].tolist())


def test_color_normalize_and_imread(ops, tmp_path) -> None:
    f = mx.nd.array(ops["src"])
    mean, std = mx.nd.array([123.68, 116.28, 103.53]), mx.nd.array([58.395, 57.12, 57.375])
    same(mx.image.color_normalize(f.copy(), mean, std), ops["color_normalize"], 1e-5)
    same(mx.image.color_normalize(f.copy(), mean), ops["color_normalize_mean_only"])
    g = f.copy()
    assert mx.image.color_normalize(g, mean) is g  # in place, as MXNet
    import cv2

    path = tmp_path / "img.png"
    cv2.imwrite(str(path), ops["src"][..., ::-1])  # BGR on disk: RGB read back
    same(mx.image.imread(str(path)), ops["src"])
    assert mx.image.imread(str(path), flag=0).shape == (45, 60, 1)
    with pytest.raises(OSError, match="imread: cannot open"):
        mx.image.imread(str(tmp_path / "missing.png"))


# ------------------------------------------------------------ mx.nd


def test_nd_functions(ops) -> None:
    src = ops["src"]
    assert str(mx.nd.array(src).dtype) == str(ops["nd_array_dtype_of_numpy_uint8"])  # float32
    assert str(mx.nd.array([1, 2, 3]).dtype) == str(ops["nd_array_dtype_of_list"])
    img = mx.nd.array(src, dtype="uint8")
    assert str(mx.nd.array(img).dtype) == str(ops["nd_array_dtype_of_uint8_ndarray"])  # uint8
    f = mx.nd.array(src)
    chw = nd.transpose(img, axes=(2, 0, 1))
    same(chw, ops["transpose_201"])
    same(nd.transpose(img), ops["transpose_default"])
    for axis in (0, 1, 2):
        same(mx.ndarray.flip(data=img, axis=axis), ops[f"flip_{axis}"])
    same(nd.reverse(img, axis=1), ops["reverse_1"])
    same(nd.stack(chw, mx.ndarray.flip(chw, axis=2)), ops["stack_0"])
    same(nd.stack(img, img, axis=1), ops["stack_1"])
    same(nd.concat(img, img), ops["concat_default"])
    same(nd.concat(img, img, dim=0), ops["concat_dim0"])
    same(nd.concatenate([img, img]), ops["concatenate"])
    same(nd.expand_dims(chw, axis=0), ops["expand_dims_0"])
    same(nd.reshape(f, shape=(45, -1)), ops["reshape"])
    same(nd.swapaxes(img, dim1=0, dim2=2), ops["swapaxes"])
    same(nd.cast(f * 1.7 - 20, dtype="uint8"), ops["cast_uint8"])
    same(nd.clip(f, 50, 200), ops["clip"])
    same(nd.slice_axis(img, axis=1, begin=3, end=17), ops["slice_axis"])
    same(nd.squeeze(nd.expand_dims(img, axis=0), axis=0), ops["squeeze"])
    same(nd.tile(chw[0:1], reps=(2, 1, 1)), ops["tile"])
    parts = nd.split(chw, num_outputs=3, axis=0)
    same(parts[0], ops["split_0"])
    same(parts[2], ops["split_2"])
    same(img.astype("float16"), ops["astype_float16"])
    # results own their memory, as MXNet's: writing one leaves the input alone
    flipped = mx.ndarray.flip(data=chw, axis=2)
    flipped[...] = 0
    same(chw, ops["transpose_201"])
    assert mx.nd is mx.ndarray and mx.nd.zeros((2, 3)).asnumpy().dtype == np.float32


# ------------------------------------------------------------ mx.gluon.data


def test_record_file_dataset_is_mxnets(golden, gluon_ref) -> None:
    raw = mx.gluon.data.RecordFileDataset(str(golden / "resized.rec"))
    assert len(raw) == int(gluon_ref["resized_len"]) == 12
    assert [hashlib.sha256(raw[i]).hexdigest() for i in range(len(raw))] == \
        gluon_ref["resized_raw_sha256"].tolist()  # fmt: skip
    face = mx.gluon.data.RecordFileDataset(str(golden / "insightface" / "train.rec"))
    assert len(face) == int(gluon_ref["insightface_len"])  # every key, header included
    assert [hashlib.sha256(face[i]).hexdigest() for i in range(len(face))] == \
        gluon_ref["insightface_raw_sha256"].tolist()  # fmt: skip


def test_image_record_dataset_items_are_mxnets(golden, gluon_ref) -> None:
    ds = mx.gluon.data.vision.ImageRecordDataset(str(golden / "resized.rec"))
    assert isinstance(ds, mx.gluon.data.Dataset)
    images = np.stack([ds[i][0].asnumpy() for i in range(len(ds))])
    same(images, gluon_ref["resized_images"], 3)  # libjpeg: a level here and there
    labels = [ds[i][1] for i in range(len(ds))]
    assert labels == gluon_ref["resized_labels"].tolist()
    assert type(labels[0]).__name__ == str(gluon_ref["resized_label_type"])  # float
    gray = mx.gluon.data.vision.ImageRecordDataset(str(golden / "resized.rec"), flag=0)
    same(np.stack([gray[i][0] for i in range(len(gray))]), gluon_ref["resized_gray"], 3)
    faces = mx.gluon.data.vision.datasets.ImageRecordDataset(
        str(golden / "insightface" / "train.rec")
    )
    same(faces[1][0], gluon_ref["insightface_item1_image"], 3)
    assert faces[1][1] == float(gluon_ref["insightface_item1_label"])


def test_dataset_transforms_are_mxnets(golden, gluon_ref) -> None:
    ds = mx.gluon.data.vision.ImageRecordDataset(str(golden / "resized.rec"))
    first = ds.transform_first(lambda x: x.astype("float32") / 255)
    same(first[0][0], gluon_ref["transform_first_0"], 3 / 255)
    assert first[0][1] == float(gluon_ref["transform_first_label_0"])
    both = ds.transform(lambda x, y: (nd.transpose(x, axes=(2, 0, 1)), y + 100))
    same(both[1][0], gluon_ref["transform_1"], 3)
    assert both[1][1] == float(gluon_ref["transform_label_1"])
    eager = ds.transform_first(lambda x: x.shape, lazy=False)
    assert isinstance(eager, mx.gluon.data.SimpleDataset) and eager[0][0] == (48, 48, 3)
    assert [y for _, y in ds.take(3)] == gluon_ref["take_3_labels"].tolist()
    shard = ds.shard(5, 1)
    assert [shard[i][1] for i in range(len(shard))] == gluon_ref["shard_1_of_5_labels"].tolist()
    assert [y for _, y in ds.filter(lambda item: item[1] == 1.0)] == \
        gluon_ref["filter_label_1"].tolist()  # fmt: skip
    pairs = mx.gluon.data.ArrayDataset([1, 2], ["a", "b"])
    assert pairs[1] == (2, "b") and len(pairs) == 2


def test_gluon_dataset_in_torch_dataloader_workers(golden) -> None:
    # gluon datasets pickle (MXIndexedRecordIO reopens): torch's DataLoader reads them
    ds = mx.gluon.data.vision.ImageRecordDataset(str(golden / "resized.rec"))
    ds = ds.transform_first(to_chw)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2,
                                         multiprocessing_context="spawn")  # fmt: skip
    got = torch.cat([images for images, _ in loader])
    want = np.stack([to_chw(ds._data[i][0]) for i in range(12)])
    np.testing.assert_array_equal(got.numpy(), want)


def to_chw(img) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1))
