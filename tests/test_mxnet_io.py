"""``gpurec.mxnet.io.ImageRecordIter``: MXNet 1.9.1's keywords, meanings and protocol.

The protocol cases compare with MXNet's own outputs in ``tests/data/mxnet_iter/iter.json``
(made by ``benchmarks/make_mxnet_iter_reference.py`` from real MXNet 1.9.1 on
``iter.rec``: record ``i`` is a flat 8x8 image of value ``20*i``, label ``100+i``, id
``i``). Both backends run every iteration test, picked as a user would: with the
``GPUREC_MXNET_BACKEND`` environment variable.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import write_records

import gpurec.mxnet as mx
from gpurec.mxnet.io import (
    DataDesc,
    ImageRecordIter,
    read_ndarray_file,
    write_ndarray_file,
)
from gpurec.mxnet.keywords import MXNET_DEFAULTS, translate

REF = Path(__file__).parent / "data" / "mxnet_iter"
ITER_JSON = json.loads((REF / "iter.json").read_text())
BASE = dict(preprocess_threads=1, shuffle=False, verbose=False)
BACKENDS = ["cpu", "dali"]

# The keywords issue #13 lists, all of which MXNet 1.9.1 has.
ISSUE_KEYWORDS = [
    "path_imgrec", "path_imgidx", "path_imglist", "label_width", "data_shape", "batch_size",
    "round_batch", "shuffle", "seed", "seed_aug", "shuffle_chunk_size", "shuffle_chunk_seed",
    "num_parts", "part_index", "preprocess_threads", "prefetch_buffer", "verbose", "device_id",
    "ctx", "dtype", "data_name", "label_name", "resize", "rand_crop", "random_resized_crop",
    "min_random_area", "max_random_area", "min_aspect_ratio", "max_aspect_ratio",
    "max_random_scale", "min_random_scale", "max_img_size", "min_img_size", "max_crop_size",
    "min_crop_size", "max_rotate_angle", "rotate", "max_shear_ratio", "pad", "fill_value",
    "inter_method", "rand_mirror", "mirror", "brightness", "contrast", "saturation",
    "pca_noise", "random_h", "random_s", "random_l", "mean_r", "mean_g", "mean_b", "mean_a",
    "std_r", "std_g", "std_b", "std_a", "scale", "mean_img", "max_random_contrast",
    "max_random_illumination", "aug_seq",
]  # fmt: skip


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch) -> str:
    monkeypatch.setenv("GPUREC_MXNET_BACKEND", request.param)
    return request.param


def make(rec: str = "iter", folder: Path = REF, **kw) -> ImageRecordIter:
    args = dict(path_imgrec=str(folder / f"{rec}.rec"), data_shape=(3, 8, 8), **BASE)
    args.update(kw)
    return ImageRecordIter(**args)


def epochs(it: ImageRecordIter, count: int) -> list[list[dict]]:
    """As the reference script records them: per batch label, pad, record from pixels."""
    out = []
    for _ in range(count):
        batches = []
        for b in it:
            data = b.data[0].asnumpy()
            batches.append({
                "label": b.label[0].asnumpy().tolist(),
                "pad": b.pad,
                "index": b.index.tolist(),
                "record_from_pixels": [round(float(x) / 20) for x in data[:, 0, 0, 0]],
            })  # fmt: skip
        out.append(batches)
        it.reset()
    return out


def real_rows(batch: dict) -> dict:
    """What a batch holds before its padding (MXNet's pad slots of round_batch=False are
    stale memory, reported as None, and not counted in its pad)."""
    n = len(batch["label"]) - batch["pad"]
    if None in batch["record_from_pixels"]:
        n = batch["record_from_pixels"].index(None)
    return {k: batch[k][:n] for k in ("label", "record_from_pixels")}


# ----------------------------------------------------------------------- keywords


def test_every_mxnet_keyword_is_accepted_with_its_default():
    assert set(ISSUE_KEYWORDS) <= set(MXNET_DEFAULTS)
    kw = {k: v for k, v in MXNET_DEFAULTS.items() if v is not None}
    kw.update(path_imgrec=str(REF / "iter.rec"), path_imgidx=str(REF / "iter.idx"),
              data_shape=(3, 8, 8), batch_size=4, min_aspect_ratio=None, seed_aug=None,
              dtype=None, verbose=False)  # fmt: skip
    it = ImageRecordIter(**kw)
    assert it.pipe.spec.train is False  # MXNet's defaults augment nothing at random
    assert it.pipe.spec.crop == "center" and it.pipe.spec.resize == 0
    assert it.pipe.spec.fill_value == 255 and it.pipe.spec.interp == "linear"
    assert it.pipe.last_batch == "wrap" and it.pipe.shuffle is False
    assert it.next().data[0].shape == (4, 3, 8, 8)


def test_a_misspelt_keyword_is_named():
    # MXNet accepts it silently (iter.json "keyword_typo"); gpurec refuses it.
    assert ITER_JSON["keyword_typo"]["behaviour"] == "accepted silently"
    with pytest.raises(TypeError, match="rand_mirrror"):
        make(batch_size=4, rand_mirrror=True)


def spec_of(**kw) -> dict:
    args = dict(path_imgrec=str(REF / "iter.rec"), data_shape=(3, 64, 48), batch_size=2)
    return translate({**args, **kw})["spec"]


@pytest.mark.parametrize(
    "kw, expected",
    [
        ({}, dict(resize=0, crop="center", train=False, interp="linear", fill_value=255,
                  min_stretch=1, max_stretch=1, rotate=None, rand_mirror=False)),
        (dict(resize=300), dict(resize=300, crop="center")),
        (dict(rand_crop=True), dict(crop="random", train=True)),
        (dict(rand_crop=1, min_crop_size=40, max_crop_size=60),
         dict(crop="random", min_crop_size=40, max_crop_size=60)),
        (dict(max_aspect_ratio=0.25), dict(min_stretch=0.75, max_stretch=1.25, train=True)),
        (dict(max_aspect_ratio=1.5, min_aspect_ratio=0.5), dict(min_stretch=0.5, max_stretch=1.5)),
        (dict(random_resized_crop=True, min_random_area=0.08, max_aspect_ratio=4 / 3,
              min_aspect_ratio=3 / 4),
         dict(crop="random_resized", min_random_area=0.08, max_random_area=1.0,
              min_aspect_ratio=0.75, max_aspect_ratio=4 / 3, min_stretch=1.0, train=True)),
        (dict(random_resized_crop=True, max_aspect_ratio=0.25),
         dict(crop="random_resized", min_aspect_ratio=0.75, max_aspect_ratio=1.25,
              min_random_area=1.0)),
        # MXNet runs no area crop when area and aspect are all 1: its center crop
        (dict(random_resized_crop=True), dict(crop="center", train=False)),
        (dict(max_random_scale=1.2, min_random_scale=0.8),
         dict(min_random_scale=0.8, max_random_scale=1.2, train=True)),
        (dict(max_rotate_angle=10), dict(max_rotate_angle=10.0, rotate=None, train=True)),
        (dict(rotate=30), dict(rotate=30.0, train=False)),
        (dict(rotate=-1, max_rotate_angle=5), dict(rotate=None, max_rotate_angle=5.0)),
        (dict(max_shear_ratio=0.1), dict(max_shear_ratio=0.1, train=True)),
        (dict(pad=4, fill_value=0), dict(pad=4, fill_value=0.0)),
        (dict(max_img_size=300, min_img_size=100), dict(max_img_size=300, min_img_size=100)),
        (dict(inter_method=0), dict(interp="nearest")),
        (dict(inter_method=2), dict(interp="cubic")),
        (dict(inter_method=3), dict(interp="area")),
        (dict(inter_method=4), dict(interp="lanczos")),
        (dict(inter_method=9), dict(interp="auto", train=False)),
        (dict(inter_method=10), dict(interp="random", train=True)),
        (dict(mirror=True), dict(mirror=True, rand_mirror=False, train=False)),
        (dict(rand_mirror=True), dict(rand_mirror=True, train=True)),
        (dict(brightness=0.4, contrast=0.3, saturation=0.2, pca_noise=0.1),
         dict(brightness=0.4, contrast=0.3, saturation=0.2, pca_noise=0.1, train=True)),
        (dict(random_h=36, random_s=50, random_l=50),
         dict(random_h=36, random_s=50, random_l=50, train=True)),
        (dict(mean_r=123.68, mean_g=116.779, mean_b=103.939, std_r=58.393, std_g=57.12,
              std_b=57.375, scale=0.5),
         dict(mean=(123.68, 116.779, 103.939), std=(58.393, 57.12, 57.375), scale=0.5)),
        (dict(max_random_contrast=0.2, max_random_illumination=10),
         dict(max_random_contrast=0.2, max_random_illumination=10.0, train=True)),
        (dict(dtype="uint8"), dict(dtype="uint8")),
        (dict(dtype="int8", mean_r=100), dict(dtype="int8", mean=(100.0, 0.0, 0.0))),
        (dict(dtype=None), dict(dtype="float32")),
    ],
)  # fmt: skip
def test_keywords_translate_to_mxnets_meaning(kw, expected):
    from gpurec.augment import AugmentSpec

    spec = AugmentSpec(**spec_of(**kw))  # every translation is a valid spec
    for name, value in expected.items():
        got = getattr(spec, name)
        if isinstance(value, float):
            assert got == pytest.approx(value), name
        else:
            assert got == value, name


@pytest.mark.parametrize(
    "kw, name",
    [
        (dict(aug_seq="det_aug_default"), "aug_seq"),
        (dict(data_shape=(1, 8, 8)), "data_shape"),
        (dict(data_shape=(4, 8, 8)), "data_shape"),
        (dict(data_shape=(8, 8)), "data_shape"),
        (dict(dtype="float16"), "dtype"),
        (dict(dtype="float64"), "dtype"),
        (dict(inter_method=5), "inter_method"),
        (dict(inter_method=0, rotate=30), "inter_method"),
        (dict(inter_method=0, max_random_scale=1.2), "inter_method"),
        (dict(random_resized_crop=True, rand_crop=True), "rand_crop"),
        (dict(random_resized_crop=True, max_crop_size=40, min_crop_size=20), "crop_size"),
        (dict(random_resized_crop=True, min_random_scale=0.8), "min_random_scale"),
        (dict(max_crop_size=40), "min_crop_size"),
        (dict(max_aspect_ratio=1.5), "max_aspect_ratio"),
        (dict(max_aspect_ratio=0.5, min_aspect_ratio=0.8), "min_aspect_ratio"),
        (dict(resize=0), "resize"),
        (dict(num_parts=2, part_index=2), "part_index"),
        (dict(ctx="tpu"), "ctx"),
        (dict(batch_size=0), "batch_size"),
        (dict(label_width=0), "label_width"),
        (dict(path_imgidx=str(REF / "iter_multi.idx")), "path_imgidx"),
        (dict(path_imgrec=str(REF / "missing.rec")), "path_imgrec"),
    ],
)  # fmt: skip
def test_keywords_it_cannot_honour_are_named(kw, name):
    with pytest.raises((ValueError, FileNotFoundError), match=name):
        make(batch_size=kw.pop("batch_size", 2), **kw)


def test_affine_with_nearest_is_refused_as_mxnet_refuses_it():
    assert "inter_method" in ITER_JSON["affine_inter_method0"]
    with pytest.raises(ValueError, match="inter_method"):
        make(batch_size=4, resize=80, rotate=30, inter_method=0)


def test_pipeline_keywords_and_seeds():
    t = translate(dict(path_imgrec=str(REF / "iter.rec"), data_shape=(3, 8, 8), batch_size=4,
                       num_parts=3, part_index=2, preprocess_threads=7, prefetch_buffer=9,
                       seed=5, seed_aug=11, shuffle=True, round_batch=False))  # fmt: skip
    p = t["pipeline"]
    assert (p["num_shards"], p["shard_id"], p["num_threads"], p["prefetch"]) == (3, 2, 7, 9)
    assert (p["seed"], p["augment_seed"], p["shuffle"], p["last_batch"]) == (5, 11, True, "pad")
    # MXNet shuffles chunks of an index-less file even without shuffle, from its own seed
    chunk = translate(dict(path_imgrec=str(REF / "iter.rec"), data_shape=(3, 8, 8),
                           batch_size=4, shuffle_chunk_size=64, shuffle_chunk_seed=9))  # fmt: skip
    assert (chunk["pipeline"]["shuffle"], chunk["pipeline"]["seed"]) == (True, 9)


def test_backend_and_context_choice(monkeypatch):
    def where(**kw):
        p = translate(dict(path_imgrec=str(REF / "iter.rec"), data_shape=(3, 8, 8),
                           batch_size=4, **kw))["pipeline"]  # fmt: skip
        return p["device"], p["backend"]

    monkeypatch.delenv("GPUREC_MXNET_BACKEND", raising=False)
    assert where() == ("cpu", "cpu")  # MXNet's ctx="gpu" default: arrays on the host
    assert where(ctx="cpu") == ("cpu", "cpu")
    assert where(ctx=mx.gpu(1)) == ("gpu", "dali")
    monkeypatch.setenv("GPUREC_MXNET_BACKEND", "dali")
    assert where() == ("cpu", "dali")
    monkeypatch.setenv("GPUREC_MXNET_BACKEND", "gpu")
    assert where(device_id=3) == ("gpu", "dali")
    assert where(ctx=mx.cpu()) == ("cpu", "cpu")
    monkeypatch.setenv("GPUREC_MXNET_BACKEND", "opencl")
    with pytest.raises(ValueError, match="GPUREC_MXNET_BACKEND"):
        where()


# ----------------------------------------------------------------------- protocol


def test_round_batch_matches_mxnet_over_three_epochs(backend):
    ref = ITER_JSON["round_batch_true"]["epochs"]
    got = epochs(make(batch_size=4), 3)
    strip = [[{k: b[k] for k in ("label", "pad", "record_from_pixels")} for b in e] for e in got]
    want = [[{k: b[k] for k in ("label", "pad", "record_from_pixels")} for b in e] for e in ref]
    assert strip == want  # epoch 1 starts at record 2, after the two that filled epoch 0
    assert [b["index"] for b in got[0]] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]


def test_batch_larger_than_the_data_wraps_as_mxnet(backend):
    ref = ITER_JSON["batch_larger_than_dataset"]["round_batch_true"]["epochs"]
    got = epochs(make(batch_size=12), len(ref))
    assert [[real_rows(b) | {"pad": b["pad"]} for b in e] for e in got] == [
        [real_rows(b) | {"pad": b["pad"]} for b in e] for e in ref
    ]
    assert [[b["label"] for b in e] for e in got] == [[b["label"] for b in e] for e in ref]


def test_round_batch_false_pads_with_the_last_record(backend):
    ref = ITER_JSON["round_batch_false"]["epochs"]
    got = epochs(make(batch_size=4, round_batch=False), 3)
    assert [[real_rows(b) for b in e] for e in got] == [[real_rows(b) for b in e] for e in ref]
    last = got[0][-1]  # MXNet reports pad 0 and leaves stale rows; gpurec counts its repeats
    assert last["pad"] == 2 and last["record_from_pixels"] == [8, 9, 9, 9]
    assert [len(e) for e in got] == [3, 3, 3]


def test_num_parts_match_mxnet_and_cover_the_data(backend):
    seen = []
    for part in (0, 1):
        ref = ITER_JSON[f"num_parts2_part{part}"]["epochs"]
        got = epochs(make(batch_size=2, num_parts=2, part_index=part), 1)
        assert [[{k: b[k] for k in ("label", "pad")} for b in e] for e in got] == [
            [{k: b[k] for k in ("label", "pad")} for b in e] for e in ref
        ]
        seen.append({r for b in got[0] for r in real_rows(b)["record_from_pixels"]})
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(10))


@pytest.mark.parametrize("case, width", [("path_imglist", 1), ("path_imglist_width2", 2)])
def test_path_imglist_labels_override_the_records(backend, case, width):
    ref = ITER_JSON[case]["epochs"]
    it = make(batch_size=5, path_imglist=str(REF / "iter_relabel.lst"), label_width=width)
    assert it.provide_label[0].shape == ((5,) if width == 1 else (5, 2))
    got = epochs(it, 1)
    assert [[b["label"] for b in e] for e in got] == [[b["label"] for b in e] for e in ref]


def test_path_imglist_errors_name_the_line_and_the_id(tmp_path):
    bad = tmp_path / "bad.lst"
    bad.write_text("0\t1\ta.png\n1\tx\tb.png\n")
    with pytest.raises(ValueError, match="line 2"):
        make(batch_size=2, path_imglist=str(bad))
    short = tmp_path / "short.lst"
    short.write_text("0\t500\ta.png\n")
    with pytest.raises(ValueError, match="line 1"):
        make(batch_size=2, path_imglist=str(short), label_width=3)
    missing = tmp_path / "missing.lst"
    missing.write_text("".join(f"{i}\t{500 + i}\timg.png\n" for i in range(10) if i != 3))
    it = make(batch_size=5, path_imglist=str(missing))
    with pytest.raises(KeyError, match="record id 3"):
        it.next()


def test_multi_label_records(backend):
    ref = ITER_JSON["label_width2"]["epochs"]
    got = epochs(make("iter_multi", batch_size=5, label_width=2), 1)
    assert [[b["label"] for b in e] for e in got] == [[b["label"] for b in e] for e in ref]
    assert "label_width" in ITER_JSON["label_width_mismatch"]
    with pytest.raises(ValueError, match="label_width"):
        make("iter_multi", batch_size=5)


def test_provide_data_and_label():
    ref = ITER_JSON["provide"]
    it = make(batch_size=5, data_name="img", label_name="lbl")
    got = [[d.name, list(d.shape), np.dtype(d.dtype).name, d.layout] for d in it.provide_data]
    assert got == ref["provide_data"]
    got = [[d.name, list(d.shape), np.dtype(d.dtype).name, d.layout] for d in it.provide_label]
    assert got == ref["provide_label"]
    got = [[d.name, list(d.shape), np.dtype(d.dtype).name]
           for d in make(batch_size=5, dtype="uint8").provide_data]  # fmt: skip
    assert got == ref["provide_data_uint8"]
    assert dict(it.provide_data) == {"img": (5, 3, 8, 8)}  # a (name, shape) pair, as MXNet's
    assert isinstance(it.provide_data[0], DataDesc) and it.batch_size == 5


def test_iteration_protocol(backend):
    it = make(batch_size=4)
    it.reset()  # scripts reset before each epoch: that loses no epoch
    assert it.iter_next()
    assert it.getdata().shape == (4, 3, 8, 8) and it.getpad() == 0  # the array, as MXNet's
    assert it.getlabel().asnumpy().tolist() == [100, 101, 102, 103]
    assert it.getindex().tolist() == [0, 1, 2, 3] and it.getindex().dtype == np.uint64
    batch = it.next()
    assert batch.label[0].tolist() == [104, 105, 106, 107] and batch.index.tolist() == [4, 5, 6, 7]
    assert batch.provide_data == it.provide_data
    assert it.next().pad == 2
    with pytest.raises(StopIteration):
        it.next()
    assert not it.iter_next() and list(it) == []  # exhausted until reset(), as MXNet
    it.reset()
    assert [b.label[0].tolist()[0] for b in it] == [102, 106]  # epoch 1 starts at record 2
    it.reset()
    first = next(iter(it))
    assert first.label[0].tolist() == [100, 101, 102, 103]
    it.reset()  # in the middle of epoch 2: the next epoch starts
    assert len(it) == 2 and it.next().label[0].tolist()[0] == 102
    it.close()


def test_getdata_returns_the_array_and_works_before_the_first_batch(backend):
    # MXNet 1.9.1 (/work/mxnet-venv, iter.rec/.idx, batch_size=4), right after
    # construction: getdata() -> NDArray (4, 3, 8, 8), getlabel() -> NDArray [100, 101,
    # 102, 103], getpad() -> 0; then iter_next() -> True on that same first batch.
    it = make(batch_size=4)
    data, label = it.getdata(), it.getlabel()
    assert not isinstance(data, list) and data.shape == (4, 3, 8, 8)
    assert label.asnumpy().tolist() == [100, 101, 102, 103] and it.getpad() == 0
    np.testing.assert_array_equal(data.asnumpy()[:, 0, 0, 0], [0, 20, 40, 60])
    it.reset()  # a batch only looked at is not read: reset() keeps it
    assert it.iter_next() and it.getlabel().asnumpy().tolist() == [100, 101, 102, 103]
    # MXNet's second iter_next() repeats batch 0 (its first_batch is never cleared by
    # iter_next); gpurec moves on, as iter_next() means
    assert it.iter_next() and it.getlabel().asnumpy().tolist() == [104, 105, 106, 107]
    assert [b.label[0].tolist()[0] for b in it] == [108]
    with pytest.raises(RuntimeError, match="epoch is over"):
        it.getdata()
    it.close()


def test_len_during_an_epoch_is_that_epochs(backend):
    it = make(batch_size=4)  # round_batch: epochs of 3, 2, 3 batches (10 records)
    for want in (3, 2, 3):
        assert len(it) == want
        seen = []
        for _ in it:
            seen.append(len(it))
        assert seen == [want] * want
        it.reset()
    it.close()


def test_round_batch_false_hands_out_no_batch_of_padding_only(backend):
    # MXNet 1.9.1 (iter.rec/.idx, batch_size=3, round_batch=False, num_parts=3), labels
    # and pad per batch, the same every epoch: part 0 [100, 101, 102] 0, [103, -, -] 0;
    # part 1 [104, 105, 106] 0, [107, -, -] 0; part 2 [108, 109, -] 0 ("-": stale rows).
    # Its parts differ in batch count and none is all padding; gpurec's split differs
    # (10 records: 3, 3, 4; MXNet: 4, 4, 2), its rule on padding is the same.
    got = {}
    for part in range(3):
        it = make(batch_size=3, round_batch=False, num_parts=3, part_index=part)
        assert len(it) == (1, 1, 2)[part]
        got[part] = []
        for _ in range(2):
            got[part].append([(b.label[0].tolist(), b.pad) for b in it])
            it.reset()
        it.close()
    assert got[0] == [[([100, 101, 102], 0)]] * 2
    assert got[1] == [[([103, 104, 105], 0)]] * 2
    assert got[2] == [[([106, 107, 108], 0), ([109, 109, 109], 2)]] * 2


# MXNet str()s every keyword: these strings work there (MXNet 1.9.1, iter.rec/.idx,
# batch_size=4: the first batch's labels [100, 101, ...] and pixels 0, 20, 40, 60);
# "3,8,8" without brackets is refused ("Invalid Parameter format for data_shape").
@pytest.mark.parametrize(
    "kw",
    [dict(data_shape="(3,8,8)"), dict(data_shape="[3,8,8]"), dict(data_shape="(3, 8, 8)"),
     dict(seed_aug="None"), dict(min_aspect_ratio="None"), dict(dtype="None"),
     dict(seed="5"), dict(resize="8"), dict(rand_crop="True"), dict(round_batch="0")],
)  # fmt: skip
def test_string_values_as_mxnet_reads_them(kw):
    it = make(batch_size=4, **kw)
    batch = it.next()
    assert batch.data[0].shape == (4, 3, 8, 8) and batch.data[0].dtype == np.float32
    assert batch.label[0].tolist() == [100, 101, 102, 103]
    np.testing.assert_array_equal(batch.data[0].asnumpy()[:, 0, 3, 3], [0, 20, 40, 60])
    it.close()


def test_string_values_mxnet_refuses_are_named():
    with pytest.raises(ValueError, match=r"data_shape.*'3,8,8'"):
        make(batch_size=4, data_shape="3,8,8")
    with pytest.raises(ValueError, match="seed_aug"):
        make(batch_size=4, seed_aug="none of it")
    t = translate(dict(path_imgrec=str(REF / "iter.rec"), data_shape="[3,8,8]", batch_size="4",
                       seed_aug="7", min_aspect_ratio="0.5", max_aspect_ratio="2"))  # fmt: skip
    assert t["spec"]["data_shape"] == (3, 8, 8) and t["pipeline"]["augment_seed"] == 7
    assert (t["spec"]["min_stretch"], t["spec"]["max_stretch"]) == (0.5, 2.0)


@pytest.mark.parametrize(
    "kw, dtype, pixels, ignored",
    [
        # MXNet 1.9.1 (iter.rec/.idx, batch_size=4): pixels (R, G, B at 3,3) of records 0-3
        (dict(dtype="uint8", mean_r=10, std_r=2, scale=0.5), np.uint8,
         [0, 0, 0, 20, 20, 20, 40, 40, 40, 60, 60, 60], "std_r, scale, mean_r"),
        (dict(dtype="uint8", max_random_contrast=0.3, max_random_illumination=5), np.uint8,
         [0, 0, 0, 20, 20, 20, 40, 40, 40, 60, 60, 60],
         "max_random_contrast, max_random_illumination"),
        (dict(dtype="int8", mean_r=10, std_r=2, scale=0.5), np.int8,
         [-10, 0, 0, 10, 20, 20, 30, 40, 40, 50, 60, 60], "std_r, scale"),
    ],
)  # fmt: skip
def test_dtype_ignores_the_normaliser_as_mxnet_and_says_so(backend, caplog, kw, dtype, pixels,
                                                           ignored):  # fmt: skip
    with caplog.at_level("WARNING", logger="gpurec.mxnet.io"):
        it = make(batch_size=4, **kw)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].endswith(f": {ignored} ignored"), warnings
    data = it.next().data[0].asnumpy()
    assert data.dtype == dtype
    assert data[:, :, 3, 3].ravel().tolist() == pixels
    it.close()


def test_uint8_neither_makes_nor_reads_mean_img(tmp_path, caplog):
    mean_file = tmp_path / "mean.nd"  # MXNet does not load the mean image for uint8
    with caplog.at_level("WARNING", logger="gpurec.mxnet.io"):
        it = make(batch_size=4, dtype="uint8", mean_img=str(mean_file))
    assert not mean_file.exists() and "mean_img ignored" in caplog.text
    assert it.next().data[0].asnumpy()[:, 0, 0, 0].tolist() == [0, 20, 40, 60]
    it.close()


def test_a_closed_iterator_says_so(backend):
    it = make(batch_size=4)
    it.next()
    it.close()
    for call in (it.next, it.iter_next, it.getdata):
        with pytest.raises(RuntimeError, match="ImageRecordIter is closed"):
            call()
    it.close()  # twice is harmless


def test_gpu_choices_that_cannot_work_are_named(monkeypatch):
    monkeypatch.setenv("GPUREC_MXNET_BACKEND", "gpu")
    with pytest.raises(ValueError, match=r"device_id=-1 names no GPU.*GPUREC_MXNET_BACKEND"):
        make(batch_size=4, device_id=-1)
    with pytest.raises(ValueError, match=r"ctx=gpu\(-1\)"):
        make(batch_size=4, ctx=mx.gpu(-1))
    try:
        import cupy  # noqa: F401
    except ImportError:  # this machine: the variable and the extra are named
        with pytest.raises(ImportError, match=r"GPUREC_MXNET_BACKEND=gpu.*gpurec\[gpu\]"):
            make(batch_size=4)
        with pytest.raises(ImportError, match=r"ctx=gpu\(1\).*gpurec\[gpu\]"):
            make(batch_size=4, ctx=mx.gpu(1))


def test_a_bad_image_list_is_reported_before_any_work(tmp_path):
    bad = tmp_path / "bad.lst"
    bad.write_text("0\t1\ta.png\n1\tx\tb.png\n")
    mean_file = tmp_path / "mean.nd"  # would be made by a pass over the data
    with pytest.raises(ValueError, match="line 2"):
        make(batch_size=2, path_imglist=str(bad), mean_img=str(mean_file))
    assert not mean_file.exists()


def test_shuffle_is_a_new_permutation_every_epoch(backend):
    def orders(seed):
        got = epochs(make(batch_size=5, shuffle=True, seed=seed), 3)
        return [[r for b in e for r in b["record_from_pixels"]] for e in got]

    a, b = orders(3), orders(3)
    assert a == b  # reproducible from the seed
    assert all(sorted(e) == list(range(10)) for e in a)  # each epoch a permutation
    assert len({tuple(e) for e in a}) == 3  # and a new one every epoch
    assert orders(4) != a
    # MXNet's own shuffle is a permutation per epoch too (its order differs)
    ref = ITER_JSON["shuffle_seed3"]["epochs"]
    assert all(sorted(r for b in e for r in b["record_from_pixels"]) == list(range(10))
               for e in ref)  # fmt: skip


@pytest.mark.parametrize(
    "kw, dtype, expect",
    [
        ({}, np.float32, lambda v: v),
        (dict(mean_r=10, mean_g=20, mean_b=30, std_r=2, std_g=4, std_b=5, scale=0.5),
         np.float32, lambda v: (v - np.array([10, 20, 30])) * 0.5 / np.array([2, 4, 5])),
        (dict(dtype="uint8"), np.uint8, lambda v: v),
        (dict(dtype="int8", mean_r=100.4, mean_g=0, mean_b=60),
         np.int8, lambda v: np.clip(v - np.array([100, 0, 60]), -128, 127)),
    ],
)  # fmt: skip
def test_dtypes_and_normalisation(backend, kw, dtype, expect):
    it = make(batch_size=10, **kw)
    data = it.next().data[0].asnumpy()
    assert data.dtype == dtype and it.provide_data[0].dtype == dtype
    values = np.arange(10, dtype=np.float64)[:, None] * 20
    want = expect(np.repeat(values, 3, axis=1))
    np.testing.assert_allclose(data[:, :, 3, 3].astype(np.float64), want, rtol=1e-6, atol=1e-4)


# ----------------------------------------------------------------------- mean_img

# mx.nd.save("m.nd", {"mean_img": mx.nd.array(np.arange(6).reshape(1, 2, 3))}) by MXNet 1.9.1
MXNET_SAVED = bytes.fromhex(
    "120100000000000000000000000000000100000000000000c9fa93f900000000030000000100000000000000"
    "02000000000000000300000000000000010000000000000000000000000000000000803f0000004000004040"
    "000080400000a040010000000000000008000000000000006d65616e5f696d67"
)


def test_reads_mxnets_ndarray_files_and_writes_them_back(tmp_path):
    path = tmp_path / "m.nd"
    path.write_bytes(MXNET_SAVED)
    arrays = read_ndarray_file(path)
    assert list(arrays) == ["mean_img"]
    np.testing.assert_array_equal(
        arrays["mean_img"], np.arange(6, dtype=np.float32).reshape(1, 2, 3)
    )
    again = tmp_path / "again.nd"
    write_ndarray_file(again, arrays)
    assert again.read_bytes() == MXNET_SAVED  # byte for byte what MXNet writes
    path.write_bytes(MXNET_SAVED[:40])
    with pytest.raises(ValueError, match=r"m\.nd"):
        read_ndarray_file(path)


def test_mean_img_is_computed_saved_and_used(backend, tmp_path):
    shutil.copy(REF / "iter.rec", tmp_path / "iter.rec")
    shutil.copy(REF / "iter.idx", tmp_path / "iter.idx")
    mean_file = tmp_path / "mean.nd"
    it = make(folder=tmp_path, batch_size=10, mean_img=str(mean_file))
    mean = read_ndarray_file(mean_file)["mean_img"]
    np.testing.assert_allclose(mean, np.full((3, 8, 8), 90.0))  # the mean of 20*i, i < 10
    data = it.next().data[0].asnumpy()
    np.testing.assert_allclose(data[:, 0, 0, 0], np.arange(10) * 20 - 90.0)
    again = make(folder=tmp_path, batch_size=10, mean_img=str(mean_file))  # loaded now
    np.testing.assert_allclose(again.next().data[0].asnumpy(), data)
    write_ndarray_file(mean_file, {"mean_img": np.zeros((3, 4, 4), np.float32)})
    with pytest.raises(ValueError, match="mean_img"):
        make(folder=tmp_path, batch_size=10, mean_img=str(mean_file))


# ------------------------------------------------------------ real scripts' keywords


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """24 noisy JPEGs of assorted sizes around 40-60 pixels, labels 0..3, ids 0..23."""
    import cv2  # noqa: F401

    rng = np.random.default_rng(5)
    folder = tmp_path_factory.mktemp("photos")
    images = [rng.integers(0, 256, (int(rng.integers(36, 60)), int(rng.integers(36, 60)), 3),
                           dtype=np.uint8) for _ in range(24)]  # fmt: skip
    return write_records(folder / "train.rec", images, [float(i % 4) for i in range(24)], ".jpg")


def data_py_args(rec: Path, **overrides) -> argparse.Namespace:
    """The defaults of MXNet's example/image-classification/common/data.py arguments."""
    args = dict(
        data_train=str(rec), data_train_idx=str(rec.with_suffix(".idx")), data_val=str(rec),
        data_val_idx="", rgb_mean="123.68,116.779,103.939", rgb_std="1,1,1", pad_size=0,
        fill_value=127, image_shape="3,32,32", num_classes=4, num_examples=24,
        data_nthreads=2, benchmark=0, random_crop=0, random_mirror=0, max_random_h=0,
        max_random_s=0, max_random_l=0, min_random_aspect_ratio=None, max_random_aspect_ratio=0,
        max_random_rotate_angle=0, max_random_shear_ratio=0, max_random_scale=1,
        min_random_scale=1, max_random_area=1, min_random_area=1, min_crop_size=-1,
        max_crop_size=-1, brightness=0, contrast=0, saturation=0, pca_noise=0,
        random_resized_crop=0, batch_size=8,
    )  # fmt: skip
    args.update(overrides)
    return argparse.Namespace(**args)


def get_rec_iter(args, kv=None):
    """MXNet 1.9.1's example/image-classification/common/data.py ``get_rec_iter``, as is
    (only ``mx`` is gpurec.mxnet)."""
    image_shape = tuple([int(i) for i in args.image_shape.split(",")])
    (rank, nworker) = (kv.rank, kv.num_workers) if kv else (0, 1)
    rgb_mean = [float(i) for i in args.rgb_mean.split(",")]
    rgb_std = [float(i) for i in args.rgb_std.split(",")]
    train = mx.io.ImageRecordIter(
        path_imgrec=args.data_train, path_imgidx=args.data_train_idx, label_width=1,
        mean_r=rgb_mean[0], mean_g=rgb_mean[1], mean_b=rgb_mean[2], std_r=rgb_std[0],
        std_g=rgb_std[1], std_b=rgb_std[2], data_name="data", label_name="softmax_label",
        data_shape=image_shape, batch_size=args.batch_size, rand_crop=args.random_crop,
        max_random_scale=args.max_random_scale, pad=args.pad_size, fill_value=args.fill_value,
        random_resized_crop=args.random_resized_crop, min_random_scale=args.min_random_scale,
        max_aspect_ratio=args.max_random_aspect_ratio,
        min_aspect_ratio=args.min_random_aspect_ratio, max_random_area=args.max_random_area,
        min_random_area=args.min_random_area, min_crop_size=args.min_crop_size,
        max_crop_size=args.max_crop_size, brightness=args.brightness, contrast=args.contrast,
        saturation=args.saturation, pca_noise=args.pca_noise, random_h=args.max_random_h,
        random_s=args.max_random_s, random_l=args.max_random_l,
        max_rotate_angle=args.max_random_rotate_angle,
        max_shear_ratio=args.max_random_shear_ratio, rand_mirror=args.random_mirror,
        preprocess_threads=args.data_nthreads, shuffle=True, num_parts=nworker,
        part_index=rank,
    )  # fmt: skip
    val = mx.io.ImageRecordIter(
        path_imgrec=args.data_val, path_imgidx=args.data_val_idx, label_width=1,
        mean_r=rgb_mean[0], mean_g=rgb_mean[1], mean_b=rgb_mean[2], std_r=rgb_std[0],
        std_g=rgb_std[1], std_b=rgb_std[2], data_name="data", label_name="softmax_label",
        batch_size=args.batch_size, data_shape=image_shape, preprocess_threads=args.data_nthreads,
        rand_crop=False, rand_mirror=False, num_parts=nworker, part_index=rank,
    )  # fmt: skip
    return train, val


SCRIPT_ARGS = {
    "data_py_defaults": {},
    # train_imagenet.py's set_imagenet_aug
    "data_py_imagenet_aug": dict(rgb_std="58.393,57.12,57.375", random_crop=0,
                                 random_resized_crop=1, random_mirror=1, min_random_area=0.08,
                                 max_random_aspect_ratio=4 / 3, min_random_aspect_ratio=3 / 4,
                                 brightness=0.4, contrast=0.4, saturation=0.4, pca_noise=0.1),
    # train_cifar10.py: image_shape 3,28,28 and pad_size 4; its set_cifar_aug as well
    "cifar10": dict(image_shape="3,28,28", pad_size=4),
    "cifar10_aug": dict(image_shape="3,28,28", pad_size=4, rgb_mean="125.307,122.961,113.8575",
                        rgb_std="51.5865,50.847,51.255", random_mirror=1, fill_value=0,
                        random_crop=1),
    "data_py_heavy": dict(random_crop=1, random_mirror=1, max_random_h=36, max_random_s=50,
                          max_random_l=50, max_random_aspect_ratio=0.25,
                          max_random_rotate_angle=10, max_random_shear_ratio=0.1,
                          max_random_scale=1.2, min_random_scale=0.8),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(SCRIPT_ARGS))
def test_mxnet_example_get_rec_iter(backend, photos, name):
    args = data_py_args(photos, **SCRIPT_ARGS[name])
    train, val = get_rec_iter(args)
    shape = tuple(int(v) for v in args.image_shape.split(","))
    for it in (train, val):
        batch = it.next()
        data = batch.data[0].asnumpy()
        assert data.shape == (8, *shape) and data.dtype == np.float32
        assert np.isfinite(data).all() and data.std() > 0.1
        assert batch.label[0].shape == (8,) and set(batch.label[0].tolist()) <= {0, 1, 2, 3}
        assert it.provide_data[0].name == "data" and it.provide_label[0].name == "softmax_label"
    assert train.pipe.shuffle and not val.pipe.shuffle and not val.pipe.spec.train
    assert train.pipe.spec.train == (name not in ("data_py_defaults", "cifar10"))
    assert train.pipe.spec.pad == args.pad_size and train.pipe.spec.fill_value == args.fill_value
    assert val.pipe.spec.crop == "center" and val.pipe.spec.pad == 0


def gluoncv_rec_iters(rec: Path, input_size: int = 32, batch_size: int = 8):
    """gluon-cv's scripts/classification/imagenet/train_imagenet.py ``get_data_rec``
    (``--use-rec``), as is but for the sizes."""
    rgb_mean, rgb_std = [123.68, 116.779, 103.939], [58.393, 57.12, 57.375]
    jitter_param, lighting_param = 0.4, 0.1
    resize = math.ceil(input_size / 0.875)
    train_data = mx.io.ImageRecordIter(
        path_imgrec=str(rec), path_imgidx=str(rec.with_suffix(".idx")), preprocess_threads=2,
        shuffle=True, batch_size=batch_size, data_shape=(3, input_size, input_size),
        mean_r=rgb_mean[0], mean_g=rgb_mean[1], mean_b=rgb_mean[2], std_r=rgb_std[0],
        std_g=rgb_std[1], std_b=rgb_std[2], rand_mirror=True, random_resized_crop=True,
        max_aspect_ratio=4.0 / 3.0, min_aspect_ratio=3.0 / 4.0, max_random_area=1,
        min_random_area=0.08, brightness=jitter_param, saturation=jitter_param,
        contrast=jitter_param, pca_noise=lighting_param,
    )  # fmt: skip
    val_data = mx.io.ImageRecordIter(
        path_imgrec=str(rec), path_imgidx=str(rec.with_suffix(".idx")), preprocess_threads=2,
        shuffle=False, batch_size=batch_size, resize=resize,
        data_shape=(3, input_size, input_size), mean_r=rgb_mean[0], mean_g=rgb_mean[1],
        mean_b=rgb_mean[2], std_r=rgb_std[0], std_g=rgb_std[1], std_b=rgb_std[2],
    )  # fmt: skip
    return train_data, val_data


def horovod_rec_iters(rec: Path, rank: int = 0, num_workers: int = 2, batch_size: int = 4):
    """Horovod's examples/mxnet/mxnet_imagenet_resnet50.py ``get_data_rec``, as is but for
    the sizes (data_shape 32, resize 37)."""
    mean_rgb = [123.68, 116.779, 103.939]
    jitter_param, lighting_param = 0.4, 0.1
    train_iter = mx.io.ImageRecordIter(
        path_imgrec=str(rec), path_imgidx=str(rec.with_suffix(".idx")), preprocess_threads=2,
        shuffle=True, batch_size=batch_size, label_width=1, data_shape=(3, 32, 32),
        mean_r=mean_rgb[0], mean_g=mean_rgb[1], mean_b=mean_rgb[2], rand_mirror=True,
        rand_crop=False, random_resized_crop=True, max_aspect_ratio=4.0 / 3.0,
        min_aspect_ratio=3.0 / 4.0, max_random_area=1, min_random_area=0.08, verbose=False,
        brightness=jitter_param, saturation=jitter_param, contrast=jitter_param,
        pca_noise=lighting_param, num_parts=num_workers, part_index=rank, device_id=rank,
    )  # fmt: skip
    val_iter = mx.io.ImageRecordIter(
        path_imgrec=str(rec), path_imgidx=str(rec.with_suffix(".idx")), preprocess_threads=2,
        shuffle=False, batch_size=batch_size, resize=37, label_width=1, rand_crop=False,
        rand_mirror=False, data_shape=(3, 32, 32), mean_r=mean_rgb[0], mean_g=mean_rgb[1],
        mean_b=mean_rgb[2], device_id=rank,
    )  # fmt: skip
    return train_iter, val_iter


def test_gluoncv_train_imagenet_use_rec(backend, photos):
    train, val = gluoncv_rec_iters(photos)
    assert train.pipe.spec.crop == "random_resized" and val.pipe.spec.resize == 37
    for it in (train, val):
        it.reset()  # gluon-cv resets at the start of every epoch
        batch = it.next()
        data = batch.data[0].asnumpy()
        assert data.shape == (8, 3, 32, 32) and np.isfinite(data).all()
        assert abs(float(data.mean())) < 2  # normalised: (x - mean) / std
        assert batch.label[0].shape == (8,)


def test_horovod_mxnet_imagenet_resnet50(backend, photos):
    seen = set()
    for rank in (0, 1):
        train, val = horovod_rec_iters(photos, rank)
        for batch in train:
            assert batch.data[0].shape == (4, 3, 32, 32)
            seen |= set(batch.index[: 4 - batch.pad].tolist())
        batch = val.next()
        assert batch.data[0].shape == (4, 3, 32, 32) and np.isfinite(batch.data[0]).all()
    assert seen == set(range(24))  # the two workers' parts cover the data


# ------------------------------------------------- gpurec.order / Pipeline additions


@pytest.mark.parametrize("n, shards, batch", [(10, 1, 4), (23, 3, 4), (10, 1, 12), (9, 2, 2)])
def test_wrap_reads_each_ranks_slices_as_one_stream(n, shards, batch):
    from gpurec.order import permutation, plan, rank_range

    for rank in range(shards):
        lo, hi = rank_range(n, shards, rank)
        stream = []
        for epoch in range(7):
            p = plan(n, seed=2, epoch=epoch, shuffle=True, num_shards=shards, shard_id=rank,
                     batch_size=batch, last_batch="wrap")  # fmt: skip
            assert len(p.indices) == p.batches * batch
            assert all(r == batch for r in p.real[:-1])  # only the last batch wraps
            stream += p.indices.tolist()
            pad = batch - p.real[-1] if p.batches else 0  # the next epoch's records
            assert len(stream) - pad == (epoch + 1) * (hi - lo)  # epochs end on the passes'
        want = [int(i) for e in range(20) for i in permutation(n, 2, e, True)[lo:hi]]
        assert stream == want[: len(stream)]  # no record skipped or repeated


def test_pipeline_batch_index_and_augment_seed(backend, tmp_path):
    from gpurec import Pipeline

    rec = REF / "iter.rec"
    kind = "dali" if backend == "dali" else "cpu"
    for last_batch, pads in (("pad", [0, 0, 2]), ("partial", [0, 0, 0]), ("wrap", [0, 0, 2])):
        pipe = Pipeline(rec, 4, (3, 8, 8), device="cpu", backend=kind, train=False,
                        last_batch=last_batch, resize=0)  # fmt: skip
        got = list(pipe)
        assert [b.pad for b in got] == pads
        for b in got:  # index names the rows: record i is the flat image 20*i
            np.testing.assert_array_equal(b.data[:, 0, 0, 0], b.index * 20.0)
        pipe.close()

    def crops(**kw):
        pipe = Pipeline(rec, 5, (3, 4, 4), device="cpu", backend=kind, shuffle=True, seed=1,
                        crop="random", resize=0, rand_mirror=False, **kw)  # fmt: skip
        d = pipe.draws(pipe.plan(0), 0)
        out = (pipe.plan(0).indices.tolist(), d.crop.tolist())
        pipe.close()
        return out

    plain, same, other = crops(), crops(augment_seed=1), crops(augment_seed=2)
    assert plain == same  # augment_seed defaults to seed
    assert other[0] == plain[0] and other[1] != plain[1]  # the order keeps seed


@pytest.fixture(scope="module")
def smooth(tmp_path_factory) -> Path:
    """24 blurred-noise PNGs (lossless: both backends decode the same pixels)."""
    import cv2

    rng = np.random.default_rng(5)
    images = [cv2.GaussianBlur(rng.integers(0, 256, (int(rng.integers(36, 60)),
                                                     int(rng.integers(36, 60)), 3),
                                            dtype=np.uint8), (7, 7), 2)
              for _ in range(24)]  # fmt: skip
    rec = tmp_path_factory.mktemp("smooth") / "train.rec"
    return write_records(rec, images, [float(i % 4) for i in range(24)], ".png")


@pytest.mark.parametrize(
    "kw",
    [
        dict(resize=37),  # an evaluation iterator
        # the project's seed recipe, at a small size
        dict(resize=40, rand_crop=True, rand_mirror=True, max_rotate_angle=50,
             max_shear_ratio=0.5, saturation=0.3, shuffle=True),
    ],
)  # fmt: skip
def test_both_backends_make_the_same_images(monkeypatch, smooth, kw):
    out = {}
    for kind in BACKENDS:
        monkeypatch.setenv("GPUREC_MXNET_BACKEND", kind)
        it = ImageRecordIter(path_imgrec=str(smooth), data_shape=(3, 32, 32), batch_size=8,
                             verbose=False, **kw)  # fmt: skip
        batch = it.next()
        out[kind] = (batch.data[0].asnumpy(), batch.index.tolist(), batch.label[0].tolist())
        it.close()
    (a, ia, la), (b, ib, lb) = out["cpu"], out["dali"]
    assert ia == ib and la == lb  # the same records, in the same order
    diff = np.abs(a - b)  # the same draws: only the resamplers differ
    assert diff.mean() < 1 and np.quantile(diff, 0.999) < 10, (diff.mean(), diff.max())
