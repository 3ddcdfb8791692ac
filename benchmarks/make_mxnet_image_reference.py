"""Reference outputs of real MXNet 1.9.1 ``mx.image``, ``mx.nd`` and ``mx.gluon.data`` for
gpurec's skins (``tests/test_mxnet_ndarray_gluon.py``).

Run (from the repository root, with MXNet's side venv, never the project's):

    /work/mxnet-venv/bin/python benchmarks/make_mxnet_image_reference.py tests/data/mxnet_image

(MXNet 1.9.1, numpy 1.23.5, opencv-python-headless in that venv.) Deterministic: the
inputs are made from fixed seeds, ``random_crop`` draws from ``random.seed(7)``.
Imports: numpy, cv2, mxnet and the standard library. Golden files come from
``../shared/golden`` (override with GPUREC_GOLDEN).

Writes into OUTDIR:
  faces.bin       a verification set in the layout of insightface's lfw.bin: a Python 2
                  pickle of ``(bins, issame_list)`` whose image bytes are py2 ``str``
                  (so that Python 3 needs ``encoding='bytes'``, as with the real files):
                  two 112x112 JPEGs (one JFIF, one Exif-free baseline), a 112x112 PNG and a
                  128x128 JPEG (which load_bin resizes with resize_short); issame [1, 0]
  load_bin.npz    what insightface's ``eval/verification.py::load_bin(faces.bin, (112, 112))``
                  makes with MXNet (its exact calls, NumPy in place of torch.zeros):
                  ``data_0``/``data_1`` uint8 (4, 3, 112, 112), ``issame``
  image_ops.npz   ``src`` (uint8 45x60x3) and MXNet's results of the mx.image and mx.nd
                  calls in ``image_ops`` below (keys: the call's name), and the
                  interp codes its imresize refuses
  gluon.npz       ``gluon.data`` on golden ``resized.rec`` and ``insightface/train.rec``
  README.md       this list
"""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import struct
import sys
from pathlib import Path

import cv2
import mxnet as mx
import numpy as np
from mxnet import ndarray as nd

GOLDEN = Path(os.environ.get("GPUREC_GOLDEN", Path(__file__).resolve().parents[2] / "shared" /
                             "golden"))  # fmt: skip


def face_like(seed: int, size: int) -> np.ndarray:
    """A smooth BGR image with some texture: resampling and JPEG both show on it."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([120 + 80 * np.sin(6 * x + seed), 100 + 90 * np.cos(5 * y),
                     90 + 60 * np.sin(4 * (x + y))], axis=-1)  # fmt: skip
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def py2_pickle(bins: list[bytes], issame: list[bool]) -> bytes:
    """``pickle.dumps((bins, issame), protocol=2)`` as Python 2 wrote it: each image a
    BINSTRING (py2 ``str``), which Python 3 decodes as ASCII unless told otherwise."""
    out = [b"\x80\x02", b"]", b"("]  # PROTO 2, EMPTY_LIST, MARK
    for data in bins:
        out += [b"T", struct.pack("<i", len(data)), data]  # BINSTRING
    out += [b"e", b"]", b"("]  # APPENDS, EMPTY_LIST, MARK
    out += [b"\x88" if same else b"\x89" for same in issame]  # NEWTRUE / NEWFALSE
    out += [b"e", b"\x86", b"."]  # APPENDS, TUPLE2, STOP
    return b"".join(out)


def load_bin_with_mxnet(path: Path, image_size: tuple[int, int]):
    """insightface's load_bin, call for call, with NumPy arrays where it has torch's."""
    try:
        with open(path, "rb") as f:
            bins, issame_list = pickle.load(f)
    except UnicodeDecodeError:
        with open(path, "rb") as f:
            bins, issame_list = pickle.load(f, encoding="bytes")
    data_list = [np.zeros((len(issame_list) * 2, 3, *image_size), np.uint8) for _ in (0, 1)]
    for idx in range(len(issame_list) * 2):
        img = mx.image.imdecode(bins[idx])
        if img.shape[1] != image_size[0]:
            img = mx.image.resize_short(img, image_size[0])
        img = nd.transpose(img, axes=(2, 0, 1))
        for flip in [0, 1]:
            if flip == 1:
                img = mx.ndarray.flip(data=img, axis=2)
            data_list[flip][idx][:] = img.asnumpy()
    return data_list, issame_list


def image_ops(src: np.ndarray) -> dict[str, np.ndarray]:
    """MXNet's results of the calls the tests repeat with gpurec.mxnet."""
    img = mx.nd.array(src, dtype="uint8")
    out: dict[str, np.ndarray] = {"src": src}
    for interp in (0, 1, 2, 3, 4, 5):  # 5: OpenCV's INTER_LINEAR_EXACT, passed through
        out[f"imresize_50x30_interp{interp}"] = mx.image.imresize(img, 50, 30, interp).asnumpy()
        out[f"imresize_90x70_interp{interp}"] = mx.image.imresize(img, 90, 70, interp).asnumpy()
    out["imresize_default"] = mx.image.imresize(img, 33, 21).asnumpy()
    refused = []  # the interp codes MXNet's imresize fails on (cv::resize refuses them)
    for interp in (5, 7, 9, 10):
        try:
            mx.image.imresize(img, 50, 30, interp).asnumpy()
        except mx.base.MXNetError:
            refused.append(interp)
    out["imresize_refused_interps"] = np.array(refused)
    for interp in (0, 1, 2, 3, 9):
        out[f"resize_short_30_interp{interp}"] = mx.image.resize_short(img, 30, interp).asnumpy()
    out["resize_short_100"] = mx.image.resize_short(img, 100).asnumpy()
    tall = mx.nd.array(src.transpose(1, 0, 2).copy(), dtype="uint8")
    out["resize_short_tall_32"] = mx.image.resize_short(tall, 32).asnumpy()
    out["fixed_crop"] = mx.image.fixed_crop(img, 5, 7, 30, 20).asnumpy()
    out["fixed_crop_resized"] = mx.image.fixed_crop(img, 5, 7, 30, 20, size=(16, 16)).asnumpy()
    crop, rect = mx.image.center_crop(img, (32, 24))
    out["center_crop"], out["center_crop_rect"] = crop.asnumpy(), np.array(rect)
    crop, rect = mx.image.center_crop(img, (80, 50), interp=1)  # larger than src: scaled down
    out["center_crop_big"], out["center_crop_big_rect"] = crop.asnumpy(), np.array(rect)
    random.seed(7)
    for k in range(3):
        crop, rect = mx.image.random_crop(img, (20, 20))
        out[f"random_crop_{k}"], out[f"random_crop_{k}_rect"] = crop.asnumpy(), np.array(rect)
    f = mx.nd.array(src)  # float32
    mean, std = mx.nd.array([123.68, 116.28, 103.53]), mx.nd.array([58.395, 57.12, 57.375])
    out["color_normalize"] = mx.image.color_normalize(f.copy(), mean, std).asnumpy()
    out["color_normalize_mean_only"] = mx.image.color_normalize(f.copy(), mean).asnumpy()
    # mx.nd on images
    out["nd_array_dtype_of_numpy_uint8"] = np.array(np.dtype(mx.nd.array(src).dtype).name)
    out["nd_array_dtype_of_list"] = np.array(np.dtype(mx.nd.array([1, 2, 3]).dtype).name)
    out["nd_array_dtype_of_uint8_ndarray"] = np.array(np.dtype(mx.nd.array(img).dtype).name)
    out["transpose_201"] = nd.transpose(img, axes=(2, 0, 1)).asnumpy()
    out["transpose_default"] = nd.transpose(img).asnumpy()
    for axis in (0, 1, 2):
        out[f"flip_{axis}"] = mx.ndarray.flip(data=img, axis=axis).asnumpy()
    out["reverse_1"] = nd.reverse(img, axis=1).asnumpy()
    chw = nd.transpose(img, axes=(2, 0, 1))
    out["stack_0"] = nd.stack(chw, mx.ndarray.flip(chw, axis=2)).asnumpy()
    out["stack_1"] = nd.stack(img, img, axis=1).asnumpy()
    out["concat_default"] = nd.concat(img, img).asnumpy()  # dim=1
    out["concat_dim0"] = nd.concat(img, img, dim=0).asnumpy()
    out["concatenate"] = nd.concatenate([img, img]).asnumpy()  # axis=0
    out["expand_dims_0"] = nd.expand_dims(chw, axis=0).asnumpy()
    out["reshape"] = nd.reshape(f, shape=(45, -1)).asnumpy()
    out["swapaxes"] = nd.swapaxes(img, dim1=0, dim2=2).asnumpy()
    out["cast_uint8"] = nd.cast(f * 1.7 - 20, dtype="uint8").asnumpy()
    out["clip"] = nd.clip(f, 50, 200).asnumpy()
    out["slice_axis"] = nd.slice_axis(img, axis=1, begin=3, end=17).asnumpy()
    out["squeeze"] = nd.squeeze(nd.expand_dims(img, axis=0), axis=0).asnumpy()
    out["tile"] = nd.tile(chw[0:1], reps=(2, 1, 1)).asnumpy()
    parts = nd.split(chw, num_outputs=3, axis=0)
    out["split_0"], out["split_2"] = parts[0].asnumpy(), parts[2].asnumpy()
    out["astype_float16"] = img.astype("float16").asnumpy()
    return out


def gluon_items() -> dict[str, np.ndarray]:
    data = mx.gluon.data
    out: dict[str, np.ndarray] = {}
    resized = str(GOLDEN / "resized.rec")
    raw = data.RecordFileDataset(resized)
    out["resized_len"] = np.array(len(raw))
    out["resized_raw_sha256"] = np.array([hashlib.sha256(raw[i]).hexdigest()
                                          for i in range(len(raw))])  # fmt: skip
    ds = data.vision.ImageRecordDataset(resized)
    items = [ds[i] for i in range(len(ds))]
    out["resized_images"] = np.stack([img.asnumpy() for img, _ in items])
    out["resized_labels"] = np.array([label for _, label in items], np.float64)
    out["resized_label_type"] = np.array(type(items[0][1]).__name__)
    gray = data.vision.ImageRecordDataset(resized, flag=0)
    out["resized_gray"] = np.stack([gray[i][0].asnumpy() for i in range(len(gray))])
    first = ds.transform_first(lambda x: x.astype("float32") / 255)
    out["transform_first_0"] = first[0][0].asnumpy()
    out["transform_first_label_0"] = np.array(first[0][1])
    both = ds.transform(lambda x, y: (nd.transpose(x, axes=(2, 0, 1)), y + 100))
    out["transform_1"] = both[1][0].asnumpy()
    out["transform_label_1"] = np.array(both[1][1])
    out["take_3_labels"] = np.array([y for _, y in ds.take(3)])
    out["shard_1_of_5_labels"] = np.array([ds.shard(5, 1)[i][1] for i in range(len(ds.shard(5,
                                           1)))])  # fmt: skip
    out["filter_label_1"] = np.array([y for _, y in ds.filter(lambda item: item[1] == 1.0)])
    face = data.RecordFileDataset(str(GOLDEN / "insightface" / "train.rec"))
    out["insightface_len"] = np.array(len(face))
    out["insightface_raw_sha256"] = np.array([hashlib.sha256(face[i]).hexdigest()
                                              for i in range(len(face))])  # fmt: skip
    faces = data.vision.ImageRecordDataset(str(GOLDEN / "insightface" / "train.rec"))
    out["insightface_item1_image"] = faces[1][0].asnumpy()
    out["insightface_item1_label"] = np.array(faces[1][1])
    return out


def main(outdir: str) -> None:
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    jpeg = cv2.imencode(".jpg", face_like(1, 112), [cv2.IMWRITE_JPEG_QUALITY, 90])[1]
    jpeg_b = cv2.imencode(".jpg", face_like(2, 112), [cv2.IMWRITE_JPEG_QUALITY, 75])[1]
    png = cv2.imencode(".png", face_like(3, 112))[1]
    big = cv2.imencode(".jpg", face_like(4, 128), [cv2.IMWRITE_JPEG_QUALITY, 95])[1]
    bins = [a.tobytes() for a in (jpeg, jpeg_b, png, big)]
    (out / "faces.bin").write_bytes(py2_pickle(bins, [True, False]))
    data_list, issame = load_bin_with_mxnet(out / "faces.bin", (112, 112))
    np.savez_compressed(out / "load_bin.npz", data_0=data_list[0], data_1=data_list[1],
                        issame=np.array(issame))  # fmt: skip
    np.savez_compressed(out / "image_ops.npz", **image_ops(face_like(5, 60)[:45]))
    np.savez_compressed(out / "gluon.npz", **gluon_items())
    (out / "README.md").write_text(
        "# MXNet 1.9.1 `mx.image`, `mx.nd` and `mx.gluon.data` reference outputs\n\n"
        "Generated by real MXNet 1.9.1 with\n"
        "`/work/mxnet-venv/bin/python benchmarks/make_mxnet_image_reference.py "
        "tests/data/mxnet_image`\n(deterministic; the script's docstring says what each "
        "file holds and how it was made).\n"
    )
    print(f"wrote {sorted(p.name for p in out.iterdir())} (MXNet {mx.__version__})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/data/mxnet_image")
