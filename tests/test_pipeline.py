"""gpurec.Pipeline on both backends (DALI's CPU mode and the OpenCV fallback)."""

from __future__ import annotations

import ast
import inspect
import textwrap
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import color_tree, coordinate_image, label_from_pixels, numbered_shards, write_records

from gpurec import Pipeline
from gpurec.backends import dali_graph
from gpurec.pack import pack
from gpurec.recordio import IRHeader, RecordIOError, RecordWriter, read_idx
from gpurec.recordio import pack as pack_record

BACKENDS = ["cpu", "dali"]


def cpu_pipe(source, batch_size, shape=(3, 32, 32), **kw) -> Pipeline:
    return Pipeline(source, batch_size, shape, device="cpu", **kw)


def epoch_labels(pipe: Pipeline) -> list[int]:
    return [int(v) for b in pipe for v in np.asarray(b.label)[: len(b.label) - b.pad]]


@pytest.fixture(scope="module")
def colors(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("colors")
    root = color_tree(base / "img", per_class=12)
    pack(root, base / "ds", resize=64, shards=2, workers=1)
    return base / "ds"


# ------------------------------------------------------------------------ equivalence


@pytest.mark.parametrize(
    ("source", "shape"),
    [("packed", (3, 48, 48)), ("golden-resized", (3, 40, 40)), ("golden-passthrough", (3, 64, 64))],
)
def test_eval_transform_agrees_across_backends(colors, golden, source, shape) -> None:
    """Tolerance: per image, mean absolute difference <= 4 levels (0-255 scale)."""
    path = {"packed": colors, "golden-resized": golden / "resized.rec",
            "golden-passthrough": golden / "passthrough.rec"}[source]  # fmt: skip
    out = {}
    for backend in BACKENDS:
        pipe = cpu_pipe(path, 4, shape, backend=backend, train=False, last_batch="partial")
        batches = list(pipe)
        out[backend] = (np.concatenate([b.data for b in batches]),
                        np.concatenate([b.label for b in batches]))  # fmt: skip
    np.testing.assert_array_equal(out["cpu"][1], out["dali"][1])
    diff = np.abs(out["cpu"][0] - out["dali"][0]).mean(axis=(1, 2, 3))
    assert diff.max() <= 4, diff


# ----------------------------------------------------------------- augmentation facts


@pytest.mark.parametrize("backend", BACKENDS)
def test_labels_belong_to_their_images_under_full_augmentation(colors, backend) -> None:
    pipe = cpu_pipe(colors, 8, (3, 40, 40), backend=backend, max_rotate_angle=20,
                    max_shear_ratio=0.2, brightness=0.2, contrast=0.2, saturation=0.3,
                    mean=(120, 110, 100), std=(60, 60, 60))  # fmt: skip
    for data, label in pipe:
        assert data.shape == (8, 3, 40, 40) and data.dtype == np.float32
        for img, lab in zip(data, label, strict=True):
            rgb = img.transpose(1, 2, 0) * 60 + np.array([120, 110, 100])
            assert label_from_pixels(rgb[..., ::-1]) == int(lab)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mirror_is_a_horizontal_flip(colors, backend) -> None:
    common = dict(backend=backend, shuffle=False, dtype="uint8", layout="NHWC")
    plain = np.concatenate([b.data for b in cpu_pipe(colors, 8, train=False, **common)])
    mirrored = np.concatenate([b.data for b in cpu_pipe(colors, 8, crop="center",
                                                        rand_mirror=True, **common)])  # fmt: skip
    flips = 0
    for a, m in zip(plain, mirrored, strict=True):
        if np.array_equal(m, a[:, ::-1]) and not np.array_equal(m, a):
            flips += 1
        else:
            np.testing.assert_array_equal(m, a)
    assert 0 < flips < len(plain)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rotation_keeps_size_and_fills(tmp_path, backend) -> None:
    """MXNet's order: the whole (resized) image turns about its centre on a canvas of its
    size, uncovered pixels filled, then the crop; with the crop as large as the canvas,
    its corners show the fill whenever the angle is not tiny."""
    rec = write_records(tmp_path / "d.rec", [np.full((64, 64, 3), 40, np.uint8)] * 16, [0.0] * 16)
    pipe = cpu_pipe(rec, 16, (3, 64, 64), backend=backend, crop="center", resize=64,
                    rand_mirror=False, max_rotate_angle=60, fill_value=200, dtype="uint8",
                    layout="NHWC")  # fmt: skip
    ((data, _),) = list(pipe)
    assert data.shape == (16, 64, 64, 3)
    assert (np.abs(data[:, 28:36, 28:36].astype(int) - 40) <= 2).all()  # the center is image
    filled = [(img[:3, :3] >= 195).all() or (img[:3, -3:] >= 195).all() for img in data]
    assert sum(filled) >= 10  # corners show fill_value whenever the angle is not tiny
    assert not ((data > 45) & (data < 195)).any(axis=-1).mean() > 0.05  # only image or fill


@pytest.mark.parametrize("backend", BACKENDS)
def test_rotation_happens_before_the_crop_on_the_whole_image(tmp_path, backend) -> None:
    """A 20 degree turn of a 96x96 image, then a central 48x48 crop: the crop lies inside
    the turned image (no fill at all), which a turn after the crop would not give."""
    rec = write_records(tmp_path / "r.rec", [np.full((96, 96, 3), 40, np.uint8)] * 4, [0.0] * 4)
    pipe = cpu_pipe(rec, 4, (3, 48, 48), backend=backend, train=False, crop="center",
                    resize=96, rotate=20, fill_value=250, dtype="uint8", layout="NHWC")  # fmt: skip
    ((data, _),) = list(pipe)
    assert (np.abs(data.astype(int) - 40) <= 1).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_crops_stay_inside_with_area_and_aspect_in_range(tmp_path, backend) -> None:
    """MXNet's random-resized crop: area fraction uniform in [min, max], width/height
    ratio uniform in [min_aspect_ratio, max_aspect_ratio] and, with probability 1/2,
    the sides swapped (so the ratio is inverted). With ratios 1.2-2, both wide and tall
    windows appear, none in between."""
    rec = write_records(tmp_path / "c.rec", [coordinate_image(256)] * 32, [0.0] * 32)
    pipe = cpu_pipe(rec, 32, (3, 64, 64), backend=backend, rand_mirror=False,
                    min_random_area=0.25, max_random_area=0.6, min_aspect_ratio=1.2,
                    max_aspect_ratio=2.0, dtype="uint8", layout="NHWC")  # fmt: skip
    ((data, _),) = list(pipe)
    wide = tall = 0
    for img in data.astype(float):
        x0, x1 = img[:, 0, 0].mean() * 256 / 255, img[:, -1, 0].mean() * 256 / 255
        y0, y1 = img[0, :, 1].mean() * 256 / 255, img[-1, :, 1].mean() * 256 / 255
        w, h = x1 - x0, y1 - y0
        assert x0 >= -2 and x1 <= 258 and y0 >= -2 and y1 <= 258
        assert 0.25 * 0.85 <= w * h / 256**2 <= 0.6 * 1.15, (w, h)
        ratio = w / h
        assert 1.2 * 0.9 <= ratio <= 2.0 * 1.1 or 0.5 * 0.9 <= ratio <= 1 / 1.2 * 1.1, (w, h)
        wide += ratio > 1
        tall += ratio < 1
    assert wide >= 6 and tall >= 6, (wide, tall)


# ------------------------------------------------------------------ ranks and epochs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("last_batch", ["pad", "partial", "drop"])
def test_ranks_are_disjoint_cover_everything_and_have_equal_lengths(
    tmp_path, backend, last_batch
) -> None:
    shards = numbered_shards(tmp_path)  # 21 records, labels 0..20
    per_rank = []
    for rank in range(3):
        pipe = cpu_pipe(shards, 3, backend=backend, shard_id=rank, num_shards=3,
                        last_batch=last_batch, seed=5)  # fmt: skip
        lengths = [len(pipe)]
        per_rank.append(epoch_labels(pipe))
        lengths.append(len(list(pipe)))  # a second epoch
        assert lengths == [len(pipe)] * 2
    assert len({len(cpu_pipe(shards, 3, backend=backend, shard_id=r, num_shards=3,
                             last_batch=last_batch)) for r in range(3)}) == 1  # fmt: skip
    flat = [x for r in per_rank for x in r]
    assert len(flat) == len(set(flat))  # disjoint
    if last_batch == "drop":
        assert set(flat) <= set(range(21)) and len(flat) == 3 * 2 * 3
    else:
        assert sorted(flat) == list(range(21))  # together they cover the dataset


def test_pad_and_partial_report_padding(tmp_path) -> None:
    shards = numbered_shards(tmp_path, counts=(10,))
    pad = list(cpu_pipe(shards, 4, backend="cpu", last_batch="pad", shuffle=False))
    assert [b.pad for b in pad] == [0, 0, 2] and [len(b.label) for b in pad] == [4, 4, 4]
    assert list(pad[-1].label) == [8, 9, 9, 9]
    partial = list(cpu_pipe(shards, 4, backend="cpu", last_batch="partial", shuffle=False))
    assert [len(b.label) for b in partial] == [4, 4, 2] and partial[-1].pad == 0


@pytest.mark.parametrize(
    ("shuffle", "num_shards", "last_batch"),
    [(True, 1, "partial"), (True, 2, "pad"), (True, 3, "drop"), (False, 2, "partial"),
     (False, 3, "pad")],
)  # fmt: skip
def test_both_backends_hand_out_the_same_records_in_the_same_order(
    tmp_path, shuffle, num_shards, last_batch
) -> None:
    """Labels name records (label k = record k of the three shards): batch for batch,
    epoch after epoch, rank by rank, the two backends agree, and follow gpurec.order."""
    shards = numbered_shards(tmp_path)  # 21 records in shards of 7, 5, 9
    seen = []
    for rank in range(num_shards):
        out = {}
        for backend in BACKENDS:
            pipe = cpu_pipe(shards, 3, backend=backend, shard_id=rank, num_shards=num_shards,
                            shuffle=shuffle, last_batch=last_batch, seed=11)  # fmt: skip
            out[backend] = [[b.label.tolist() for b in pipe] for _ in range(3)]
        assert out["cpu"] == out["dali"]
        for epoch, batches in enumerate(out["dali"]):
            flat = [int(v) for b in batches for v in b]
            plan = pipe.plan(epoch)
            assert flat == plan.indices[: len(flat)].tolist()
        if shuffle:
            assert out["dali"][0] != out["dali"][1] != out["dali"][2]  # a new order each epoch
        else:
            assert out["dali"][0] == out["dali"][1]
        seen += [int(v) for b in out["dali"][0] for v in b]
    if last_batch != "drop" and not shuffle:
        assert sorted(set(seen)) == list(range(21))


def test_a_global_shuffle_mixes_the_shards_of_an_unshuffled_pack(tmp_path) -> None:
    """Shards written in label order (7, 5 and 9 records): already the first batch holds
    records of several shards, and each epoch is a permutation of all 21 records."""
    shards = numbered_shards(tmp_path)
    owner = [0] * 7 + [1] * 5 + [2] * 9
    for backend in BACKENDS:
        pipe = cpu_pipe(shards, 6, backend=backend, seed=0, last_batch="partial")
        epochs = [epoch_labels(pipe) for _ in range(3)]
        assert len({owner[k] for k in epochs[0][:6]}) >= 2
        for labels in epochs:
            assert sorted(labels) == list(range(21))
        assert epochs[0] != epochs[1] != epochs[2]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("old", "new", "last_batch"), [(3, 2, "pad"), (2, 4, "partial")])
def test_elastic_resume_reads_exactly_the_unseen_records(
    tmp_path, backend, old, new, last_batch
) -> None:
    """A checkpoint taken on `old` ranks after 2 batches each, resumed on `new` ranks: the
    union of what the new ranks read is exactly the records no old rank has read, none
    twice, every new rank the same number of batches; the next epoch is a normal one."""
    shards = numbered_shards(tmp_path, counts=(13, 11, 9))  # 33 records

    def make(rank: int, ranks: int) -> Pipeline:
        return cpu_pipe(shards, 2, backend=backend, shard_id=rank, num_shards=ranks,
                        last_batch=last_batch, seed=7)  # fmt: skip

    seen, state = [], None
    for rank in range(old):
        pipe = make(rank, old)
        it = iter(pipe)
        for _ in range(2):
            batch = next(it)
            seen += batch.label[: len(batch.label) - batch.pad].astype(int).tolist()
        if rank == 0:
            state = pipe.state_dict()
    assert state["epoch"] == 0 and state["batch"] == 2 and len(seen) == 4 * old
    rest, lengths, nexts = [], set(), []
    for rank in range(new):
        pipe = make(rank, new)
        pipe.load_state_dict(state)
        batches = list(pipe)
        lengths.add(len(batches))
        rest += [int(v) for b in batches for v in b.label[: len(b.label) - b.pad]]
        assert pipe.state_dict()["epoch"] == 1 and pipe.state_dict()["segments"] == []
        nexts.append(epoch_labels(pipe))
    assert len(lengths) == 1
    assert sorted(rest) == sorted(set(range(33)) - set(seen))  # exactly the unseen, once
    fresh = [make(rank, new) for rank in range(new)]
    for pipe in fresh:
        list(pipe)  # epoch 0
    assert nexts == [epoch_labels(pipe) for pipe in fresh]  # epoch 1: the new layout's


def test_resume_mid_way_through_an_elastic_epoch(tmp_path) -> None:
    """A checkpoint taken inside a re-laid-out epoch resumes there (with the same layout)
    or is laid out again (with yet another one): still every record exactly once."""
    shards = numbered_shards(tmp_path, counts=(13, 11, 9))

    def make(rank: int, ranks: int) -> Pipeline:
        return cpu_pipe(shards, 2, backend="cpu", shard_id=rank, num_shards=ranks,
                        last_batch="pad", seed=3)  # fmt: skip

    seen, state = [], None
    for rank in range(3):
        pipe = make(rank, 3)
        it = iter(pipe)
        seen += [int(v) for _ in range(2) for v in next(it).label]
        state = state or pipe.state_dict()
    state2, mid = None, []
    for rank in range(2):
        pipe = make(rank, 2)
        pipe.load_state_dict(state)
        it = iter(pipe)
        mid += [int(v) for v in next(it).label]
        state2 = state2 or pipe.state_dict()
        if rank == 0:  # the same layout continues exactly
            again = make(0, 2)
            again.load_state_dict(pipe.state_dict())
            assert epoch_labels(again) == [int(v) for b in it for v in b.label[: 2 - b.pad]]
    assert state2["segments"] == [[3, 2, 2]] and state2["batch"] == 1
    rest = []
    for rank in range(4):
        pipe = make(rank, 4)
        pipe.load_state_dict(state2)
        rest += epoch_labels(pipe)
    assert sorted(seen + mid + rest) == list(range(33))


def test_cpu_backend_is_deterministic_and_reshuffles_each_epoch(colors) -> None:
    def run(threads):
        pipe = cpu_pipe(colors, 6, backend="cpu", seed=3, num_threads=threads,
                        max_rotate_angle=10, brightness=0.3)  # fmt: skip
        return [[(b.data.copy(), b.label.copy()) for b in pipe] for _ in range(2)]

    a, b = run(1), run(3)
    for ea, eb in zip(a, b, strict=True):
        for (da, la), (db, lb) in zip(ea, eb, strict=True):
            np.testing.assert_array_equal(da, db)
            np.testing.assert_array_equal(la, lb)
    assert not np.array_equal(a[0][0][0], a[1][0][0])  # epoch 2 differs from epoch 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("last_batch", ["drop", "pad"])
def test_resume_continues_at_the_next_unseen_batch(colors, backend, last_batch) -> None:
    def make() -> Pipeline:
        return cpu_pipe(colors, 5, backend=backend, seed=9, brightness=0.2, num_threads=2,
                        last_batch=last_batch)  # fmt: skip

    full = make()
    want = [[b.data.copy() for b in full] for _ in range(3)]  # epochs 0, 1, 2
    first = make()
    list(first)
    it = iter(first)
    got = [next(it).data.copy() for _ in range(2)]
    state = first.state_dict()
    assert state["epoch"] == 1 and state["batch"] == 2
    resumed = make()
    resumed.load_state_dict(state)
    got += [b.data.copy() for b in resumed]
    assert resumed.state_dict()["epoch"] == 2 and resumed.state_dict()["batch"] == 0
    got_next = [b.data.copy() for b in resumed]
    for g, w in zip(got + got_next, want[1] + want[2], strict=True):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_stay_valid_after_the_next_batch(colors, backend) -> None:
    pipe = cpu_pipe(colors, 4, backend=backend, train=False)
    batches = list(pipe)
    copies = [b.data.copy() for b in batches]
    list(pipe)  # another epoch through the same buffers
    for b, c in zip(batches, copies, strict=True):
        np.testing.assert_array_equal(b.data, c)
    assert not np.array_equal(batches[0].data, batches[1].data)


# ----------------------------------------------------------------- sources and labels


@pytest.mark.parametrize("backend", BACKENDS)
def test_several_shards_form_one_dataset_by_prefix_glob_or_list(tmp_path, backend) -> None:
    shards = numbered_shards(tmp_path)
    for source in (tmp_path / "n", str(tmp_path / "n-*.rec"), shards):
        pipe = cpu_pipe(source, 4, backend=backend, last_batch="partial", shuffle=False)
        assert epoch_labels(pipe) == list(range(21))
    shards[1].unlink()
    with pytest.raises(FileNotFoundError, match=r"shard\(s\) 1 of 3 are missing"):
        cpu_pipe(tmp_path / "n", 4, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_label_records_give_n_by_k_labels(tmp_path, backend) -> None:
    rec = tmp_path / "m.rec"
    with RecordWriter(rec, rec.with_suffix(".idx")) as writer:
        for i in range(6):
            png = cv2.imencode(".png", np.full((20, 20, 3), i * 30, np.uint8))[1].tobytes()
            writer.write(pack_record(IRHeader(0, [i, 0.5, -i], i, 0), png), key=i)
    (batch,) = list(cpu_pipe(rec, 6, (3, 16, 16), backend=backend, shuffle=False, train=False))
    assert batch.label.shape == (6, 3) and batch.label.dtype == np.float32
    np.testing.assert_array_equal(batch.label[:, 0], np.arange(6))


def _jpeg_that_passes_sniff_but_not_the_decoder() -> bytes:
    """A JPEG whose markers are all in place (sniff accepts it) but whose Huffman table
    is bogus: decoders refuse it."""
    good = bytearray(cv2.imencode(".jpg", np.full((24, 24, 3), 90, np.uint8))[1].tobytes())
    dht = good.find(b"\xff\xc4")
    good[dht + 5 : dht + 21] = b"\xff" * 16
    return bytes(good)


def _bad_records(tmp_path, bad: dict[int, bytes], count: int = 8) -> Path:
    good = cv2.imencode(".png", np.full((20, 20, 3), 90, np.uint8))[1].tobytes()
    rec = tmp_path / "b.rec"
    with RecordWriter(rec, rec.with_suffix(".idx")) as writer:
        for i in range(count):
            writer.write(pack_record(IRHeader(0, float(i), i, 0), bad.get(i, good)), key=i)
    return rec


@pytest.mark.parametrize(
    "body",
    [b"hello", b"\xff\xd8\xff not a jpeg", b"\x89PNG\r\n\x1a\n cut", b"BM broken bitmap"],
    ids=["unknown-signature", "broken-jpeg", "cut-png", "broken-bmp"],
)
def test_both_backends_word_a_bad_record_alike(tmp_path, body) -> None:
    rec = _bad_records(tmp_path, {1: body})
    errors = []
    for backend in BACKENDS:
        with pytest.raises(RecordIOError) as err:
            list(cpu_pipe(rec, 4, (3, 16, 16), backend=backend, shuffle=False, train=False))
        errors.append(str(err.value))
    offset = int(read_idx(rec.with_suffix(".idx"))[1][1])
    assert errors[0] == errors[1]
    assert f"b.rec: at byte {offset}: record 1: cannot decode image" in errors[0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "body",
    [b"\xff\xd8\xff not a jpeg", _jpeg_that_passes_sniff_but_not_the_decoder()],
    ids=["not-an-image", "fails-in-decoder"],
)
def test_bad_record_named_or_skipped(tmp_path, backend, body) -> None:
    rec = _bad_records(tmp_path, {2: body})
    offset = int(read_idx(rec.with_suffix(".idx"))[1][2])
    pipe = cpu_pipe(rec, 4, (3, 16, 16), backend=backend, shuffle=False, train=False)
    with pytest.raises(RecordIOError, match=rf"b\.rec: at byte {offset}: record 2: cannot "
                       "decode") as err:  # fmt: skip
        list(pipe)
    assert err.value.offset == offset and err.value.path.endswith("b.rec")
    # The Pipeline is not left dead: the next epoch runs to the bad batch again.
    with pytest.raises(Exception, match="cannot decode"):
        list(pipe)
    skip = cpu_pipe(rec, 4, (3, 16, 16), backend=backend, shuffle=False, train=False,
                    on_error="skip")  # fmt: skip
    for epoch in range(2):
        first, second = list(skip)
        assert first.label.tolist() == [0, 1, 0, 3]  # record 2 replaced by the first good one
        assert second.label.tolist() == [4, 5, 6, 7]
        assert skip.skipped == epoch + 1
        assert np.abs(first.data[2] - first.data[0]).max() <= 1e-6  # an image of record 0


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_dali_finds_a_bad_record_of_a_later_batch_than_the_one_failing(tmp_path, on_error):
    """DALI's static executor reports a decoder failure at the next ``outputs()``, whichever
    batch it was decoding: with a slow consumer, DALI decodes ahead, and batch 1's
    outputs fail for record 5 of batch 2. The batches before it still come out; then
    record 5 is named (``"raise"``) or skipped (``"skip"``), as on the CPU backend."""
    rec = _bad_records(tmp_path, {5: _jpeg_that_passes_sniff_but_not_the_decoder()}, count=8)
    got: list[list[float]] = []
    pipe = cpu_pipe(rec, 2, (3, 16, 16), backend="dali", shuffle=False, train=False,
                    on_error=on_error, prefetch=3)  # fmt: skip
    try:
        for batch in pipe:
            got.append(batch.label.tolist())
            time.sleep(0.3)  # DALI decodes the batches fed ahead meanwhile
    except RecordIOError as exc:
        assert on_error == "raise" and "record 5: cannot decode image" in str(exc)
        assert got == [[0, 1], [2, 3]]
        return
    assert on_error == "skip" and pipe.skipped == 1
    assert got == [[0, 1], [2, 3], [4, 4], [6, 7]]


def test_dali_skips_bad_records_under_shuffle_and_keeps_the_order_of_the_cpu_backend(
    tmp_path,
) -> None:
    """Both kinds of bad records, several of them, shuffled over several batches: the two
    backends hand out the same labels and count the same skips."""
    bad = {3: b"not an image at all", 9: _jpeg_that_passes_sniff_but_not_the_decoder(),
           14: _jpeg_that_passes_sniff_but_not_the_decoder()}  # fmt: skip
    rec = _bad_records(tmp_path, bad, count=20)
    out = {}
    for backend in BACKENDS:
        pipe = cpu_pipe(rec, 4, (3, 16, 16), backend=backend, seed=2, on_error="skip",
                        crop="center")  # fmt: skip
        labels = [[b.label.tolist() for b in pipe] for _ in range(2)]
        out[backend] = labels, pipe.skipped
    assert out["dali"] == out["cpu"]
    labels, skipped = out["dali"]
    assert skipped == 2 * 3
    for epoch in labels:
        flat = [int(v) for b in epoch for v in b]
        assert not set(flat) & set(bad) and set(flat) == set(range(20)) - set(bad)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"device": "tpu"}, "device must be 'gpu' or 'cpu'"),
        ({"backend": "torch"}, "backend must be"),
        ({"last_batch": "keep"}, "last_batch must be one of"),
        ({"data_shape": (1, 32, 32)}, r"data_shape must be \(3, height, width\)"),
        ({"train": False, "rand_mirror": True}, "rand_mirror is a training augmentation"),
        ({"train": False, "max_rotate_angle": 10}, "train=False forbids it"),
        ({"min_random_area": 0.5, "max_random_area": 0.2}, "min_random_area <= max_random_area"),
        ({"mean": (1, 2)}, "mean must have 3 values"),
        ({"std": 0}, "std must be positive"),
        ({"dtype": "uint8", "mean": (1, 1, 1)}, "dtype='uint8' holds the pixels"),
        ({"layout": "CHW"}, "layout must be one of"),
        ({"shard_id": 3, "num_shards": 3}, "shard_id must be in 0..num_shards-1"),
        ({"brightness": 1.5}, r"brightness must be in \[0, 1\]"),
        ({"resise": 3}, "unknown argument"),
        ({"batch_size": 40, "last_batch": "drop"}, "leaves no batch"),
    ],
)
def test_bad_arguments_are_clear_errors(colors, kwargs, error) -> None:
    args = {"batch_size": 4, "device": "cpu", "backend": "cpu"} | kwargs
    with pytest.raises((ValueError, TypeError), match=error):
        Pipeline(colors, **args)


def test_ranks_default_from_torchrun_environment(tmp_path, monkeypatch) -> None:
    shards = numbered_shards(tmp_path)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    pipe = cpu_pipe(shards, 7, backend="cpu", shuffle=False)
    assert (pipe.shard_id, pipe.num_shards) == (2, 3)
    assert epoch_labels(pipe) == list(range(14, 21))


def test_from_config_with_overrides_and_unknown_keys(colors, tmp_path) -> None:
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"source: {colors}\nbatch_size: 6\ndata_shape: [3, 24, 24]\n"
                   "device: cpu\nbackend: cpu\nrand_mirror: true\n")  # fmt: skip
    pipe = Pipeline.from_config(cfg, batch_size=4)
    assert pipe.batch_size == 4 and pipe.spec.rand_mirror and pipe.spec.height == 24
    cfg.write_text("batch_size: 4\nbrightnes: 0.1\n")
    with pytest.raises(ValueError, match="unknown Pipeline option"):
        Pipeline.from_config(cfg, source=colors)


# -------------------------------------------------------------------------- the GPU path


def test_gpu_graph_differs_from_cpu_graph_only_in_the_decoder_device() -> None:
    """The GPU graph cannot be built here; what the device changes must be one string."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(dali_graph.graph)))
    reads = [n for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id == "device"]
    assert len(reads) == 1  # only the decoder switch reads the device
    switch = next(n for n in ast.walk(tree) if isinstance(n, ast.Assign)
                  and ast.unparse(n.targets[0]) == "decoder")  # fmt: skip
    assert ast.unparse(switch.value) == "'mixed' if device == 'gpu' else 'cpu'"
    device_args = [ast.unparse(k.value) for n in ast.walk(tree) if isinstance(n, ast.Call)
                   for k in n.keywords if k.arg == "device"]  # fmt: skip
    assert device_args == ["decoder", "decoder"]  # the two decoders, no other operator


def test_gpu_device_without_cuda_says_what_is_missing(colors) -> None:
    with pytest.raises(ImportError, match="device='gpu' needs CuPy"):
        Pipeline(colors, 4, device="gpu")


@pytest.mark.parametrize("preset", ["imagenet-train", "imagenet-eval", "oxford-pets-train"])
def test_pipeline_presets_build_and_run(colors, preset) -> None:
    path = Path(__file__).parents[1] / "configs" / f"{preset}.yaml"
    pipe = Pipeline.from_config(path, source=colors, batch_size=4, data_shape=(3, 32, 32),
                                device="cpu", backend="cpu")  # fmt: skip
    data, label = next(iter(pipe))
    assert data.shape == (4, 3, 32, 32) and label.shape == (4,)
    assert -3 < float(data.mean()) < 3  # normalised with the ImageNet mean and std


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_abandoned_epoch_does_not_shift_the_next(tmp_path, backend) -> None:
    shards = numbered_shards(tmp_path)  # 21 records, label = record number
    pipe = cpu_pipe(shards, 3, backend=backend, shard_id=1, num_shards=3, last_batch="pad")
    first = epoch_labels(pipe)
    it = iter(pipe)
    next(it)  # leave epoch 1 after one batch
    del it
    third = epoch_labels(pipe)
    assert first == pipe.plan(0).indices[:7].tolist()
    assert third == pipe.plan(2).indices[:7].tolist() and len(set(third)) == 7


def test_auto_backend_is_dali_on_the_gpu_and_opencv_on_the_cpu(colors) -> None:
    assert type(Pipeline(colors, 4, device="cpu").backend).__name__ == "CPUBackend"
    with pytest.raises(ImportError, match="CuPy"):  # the GPU path goes to DALI, needing CuPy
        Pipeline(colors, 4, device="gpu", backend="auto")


def test_a_view_or_buffer_keeps_its_batch_from_being_reused(colors) -> None:
    """The OpenCV backend reuses batch arrays nothing refers to: a view, a memoryview or
    a DLPack capsule of a batch must keep that batch's data as it was."""
    pipe = cpu_pipe(colors, 4, backend="cpu", train=False)
    it = iter(pipe)
    batch = next(it)
    view, buffer = batch.data[1:3], memoryview(batch.data)
    capsule = batch.data.__dlpack__()
    want = batch.data.copy()
    del batch
    for _ in range(3):
        for _ in it:
            pass
        it = iter(pipe)
    np.testing.assert_array_equal(view, want[1:3])
    np.testing.assert_array_equal(np.asarray(buffer), want)
    del capsule


def test_forked_workers_do_not_hang_on_an_inherited_dali_pipeline(golden) -> None:
    """A DataLoader-style fork after a DALI Pipeline was left to the garbage collector:
    a child that collects it must not run DALI's destructor (its threads are gone)."""
    import subprocess
    import sys

    script = textwrap.dedent(f"""
        import gc, multiprocessing
        from gpurec import Pipeline
        gc.disable()
        pipe = Pipeline({str(golden / "resized.rec")!r}, 4, (3, 32, 32), device="cpu",
                        backend="dali", train=False)
        list(pipe)
        pipe.cycle = pipe  # unclosed, in a reference cycle
        del pipe
        def work(i):
            gc.collect()
            return i
        with multiprocessing.get_context("fork").Pool(2) as pool:
            print(pool.map(work, range(4)))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert res.returncode == 0 and res.stdout.strip() == "[0, 1, 2, 3]", res.stderr


def test_a_forked_child_iterates_an_inherited_cpu_pipeline(golden) -> None:
    """A Pipeline iterated, then inherited by a forked child (a DataLoader worker, a
    multiprocessing pool): the child's epoch is the parent's, on thread pools of its
    own (the inherited pool has no threads in the child)."""
    import subprocess
    import sys

    script = textwrap.dedent(f"""
        import multiprocessing
        from gpurec import Pipeline
        pipe = Pipeline({str(golden / "resized.rec")!r}, 4, (3, 32, 32), device="cpu",
                        backend="cpu", train=False, num_threads=2)
        it = iter(pipe)
        next(it)  # the pool's threads are running in the parent
        del it
        want = [b.label.tolist() for b in pipe]
        def child(i):
            return [b.label.tolist() for b in pipe]
        with multiprocessing.get_context("fork").Pool(2) as pool:
            got = pool.map(child, range(2), chunksize=1)
        print(got == [want, want] and len(want) == 3)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert res.returncode == 0 and res.stdout.strip() == "True", res.stderr


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_unused_iterator_leaves_a_loaded_checkpoint_in_force(tmp_path, backend) -> None:
    shards = numbered_shards(tmp_path, counts=(10, 8))
    full = cpu_pipe(shards, 3, backend=backend, seed=4)
    it = iter(full)
    next(it)
    state = full.state_dict()
    want = [int(v) for b in it for v in b.label]
    again = cpu_pipe(shards, 3, backend=backend, seed=4)
    again.load_state_dict(state)
    unused = iter(again)  # made and dropped before any batch: nothing changes
    del unused
    assert epoch_labels(again) == want


def test_len_of_an_elastically_resumed_epoch_is_its_batches(tmp_path) -> None:
    shards = numbered_shards(tmp_path, counts=(13, 11, 9))  # 33 records
    old = cpu_pipe(shards, 2, backend="cpu", shard_id=0, num_shards=3, seed=1)
    it = iter(old)
    next(it), next(it)
    state = old.state_dict()
    new = cpu_pipe(shards, 2, backend="cpu", shard_id=0, num_shards=2, seed=1)
    new.load_state_dict(state)
    assert len(new) == len(list(new)) == 5  # 33 - 12 read = 21 left: 10 each, 5 batches
    assert len(new) == 8  # the next epoch is a normal one of the new layout


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_sun_raster_and_ppm_records_are_decoded_on_both_backends(tmp_path, on_error):
    """Sun raster has a signature gpurec does not know, PPM and JPEG 2000 ones it knows
    (the size from the header); OpenCV decodes all three, DALI the last two (the DALI
    backend decodes the raster with OpenCV): same labels, same pixels."""
    rec = tmp_path / "p.rec"
    with RecordWriter(rec, rec.with_suffix(".idx")) as writer:
        for i in range(4):
            img = np.full((48, 48, 3), 40 * i, np.uint8)
            encoding = {1: ".ras", 2: ".ppm", 3: ".jp2"}.get(i, ".png")
            data = cv2.imencode(encoding, img)[1].tobytes()
            writer.write(pack_record(IRHeader(0, float(i), i, 0), data), key=i)
    out = {}
    for backend in BACKENDS:
        pipe = cpu_pipe(rec, 4, (3, 48, 48), backend=backend, train=False, on_error=on_error)
        (batch,) = list(pipe)
        out[backend] = (batch.label.tolist(), pipe.skipped, np.asarray(batch.data))
    assert out["cpu"][:2] == out["dali"][:2] == ([0, 1, 2, 3], 0)
    np.testing.assert_allclose(out["dali"][2].mean(axis=(1, 2, 3)), [0, 40, 80, 120], atol=1)
    np.testing.assert_array_equal(out["dali"][2], out["cpu"][2])


@pytest.mark.parametrize("last_batch", ["pad", "partial"])
def test_skip_fills_a_batch_with_no_good_record_from_earlier_in_the_epoch(tmp_path, last_batch):
    """The rank's last record is bad: the last batch (it and its padding) has no good
    record; both backends take the nearest earlier record of the epoch, and go on."""
    (rec,) = numbered_shards(tmp_path, counts=(9,))
    offsets = read_idx(rec.with_suffix(".idx"))[1]
    raw = bytearray(rec.read_bytes())
    raw[int(offsets[8]) + 8 + 24 + 1] ^= 0xFF  # the PNG signature of record 8
    rec.write_bytes(bytes(raw))
    out = {}
    for backend in BACKENDS:
        pipe = cpu_pipe(rec, 4, (3, 16, 16), backend=backend, train=False, on_error="skip",
                        last_batch=last_batch)  # fmt: skip
        epochs = [[b.label.astype(int).tolist() for b in pipe] for _ in range(2)]
        last = list(pipe)[-1]
        np.testing.assert_allclose(last.data.mean(axis=(1, 2, 3)), last.label * 5, atol=1)
        out[backend] = (epochs, pipe.skipped)
    assert out["cpu"] == out["dali"]
    epochs, _ = out["cpu"]
    assert epochs[0] == epochs[1] and epochs[0][-1][0] == 7  # record 7 stands in for 8


# --------------------------------------------------- draws per rank, per position, specs


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_rank_draws_its_own_augmentations(tmp_path, backend) -> None:
    """Every record the same image, so only the draws tell the ranks' batches apart:
    rank 0 and rank 1 of 2 do not augment alike (their draws' key holds the rank); a
    single rank keeps the key (augment_seed, epoch, batch, 1)."""
    from gpurec.draws import draw

    rec = write_records(tmp_path / "same.rec", [coordinate_image(64)] * 8, [0.0] * 8)
    kw = dict(backend=backend, shuffle=False, seed=4, crop="random", resize=48,
              rand_mirror=True, brightness=0.3, dtype="uint8")  # fmt: skip
    ranks = [list(cpu_pipe(rec, 4, num_shards=2, shard_id=r, **kw)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 1
    for k in range(4):
        assert not np.array_equal(ranks[0][0].data[k], ranks[1][0].data[k]), k
    single = cpu_pipe(rec, 4, **kw)
    mine, want = single.draws(single.plan(0), 1), draw(single.spec, (4, 0, 1, 1), 4)
    np.testing.assert_array_equal(mine.crop, want.crop)
    np.testing.assert_array_equal(mine.jitter, want.jitter)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_rank_of_several_resumes_its_augmentations_exactly(tmp_path, backend) -> None:
    """Rank 1 of 3, checkpointed after 2 batches, resumes with the pixels of an
    uninterrupted run; after an elastic resume on 2 ranks, a checkpoint taken there
    resumes each new rank with its own pixels again."""
    shards = numbered_shards(tmp_path, counts=(13, 11, 9))

    def make(rank: int, ranks: int) -> Pipeline:
        return cpu_pipe(shards, 2, backend=backend, shard_id=rank, num_shards=ranks,
                        last_batch="pad", seed=3, brightness=0.4, num_threads=2)  # fmt: skip

    full = [b.data.copy() for b in make(1, 3)]
    first = make(1, 3)
    it = iter(first)
    got = [next(it).data.copy() for _ in range(2)]
    state = first.state_dict()
    resumed = make(1, 3)
    resumed.load_state_dict(state)
    got += [b.data.copy() for b in resumed]
    assert len(got) == len(full)
    for g, w in zip(got, full, strict=True):
        np.testing.assert_array_equal(g, w)
    for rank in range(2):
        pipe = make(rank, 2)
        pipe.load_state_dict(state)
        it = iter(pipe)
        next(it)
        mid = pipe.state_dict()
        rest = [b.data.copy() for b in it]
        again = make(rank, 2)
        again.load_state_dict(mid)
        resumed_rest = [b.data.copy() for b in again]
        assert len(rest) == len(resumed_rest) > 0
        for g, w in zip(resumed_rest, rest, strict=True):
            np.testing.assert_array_equal(g, w)


def _records(rec: Path, bodies: list[bytes], labels: list[float]) -> Path:
    with RecordWriter(rec, rec.with_suffix(".idx")) as writer:
        for i, (body, label) in enumerate(zip(bodies, labels, strict=True)):
            writer.write(pack_record(IRHeader(0, label, i, 0), body), key=i)
    return rec


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_skipped_position_augments_its_stand_in_with_its_own_draws(tmp_path, backend):
    """Records 1 and 8 (the last) do not decode. Position 1 gets record 0 augmented with
    position 1's draws: exactly what a source holding record 0's image at position 1
    gives, not a copy of position 0; every position of the last batch (record 8 and its
    padding) gets record 7 with its own draws. Both backends follow this rule."""
    base = coordinate_image(64)
    pngs = [cv2.imencode(".png", np.roll(base, 7 * i, axis=1))[1].tobytes() for i in range(9)]
    bad = list(pngs)
    bad[1], bad[8] = b"not an image", b"\x89PNG\r\n\x1a\n cut short"
    good = list(pngs)
    good[1], good[8] = pngs[0], pngs[7]
    bad_rec = _records(tmp_path / "bad.rec", bad, [float(i) for i in range(9)])
    labels = [0.0, 0.0, *[float(i) for i in range(2, 8)], 7.0]
    good_rec = _records(tmp_path / "good.rec", good, labels)
    kw = dict(backend=backend, shuffle=False, seed=2, crop="random", resize=48,
              rand_mirror=True, brightness=0.3, dtype="uint8", last_batch="pad",
              on_error="skip")  # fmt: skip
    skip = cpu_pipe(bad_rec, 4, **kw)
    got = list(skip)
    want = list(cpu_pipe(good_rec, 4, **kw))
    assert skip.skipped == 2  # records 1 and 8, not the three padding copies of record 8
    assert [b.label.tolist() for b in got] == [b.label.tolist() for b in want]
    assert got[0].label.tolist() == [0, 0, 2, 3] and got[2].label.tolist() == [7] * 4
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g.data, w.data)
    assert not np.array_equal(got[0].data[1], got[0].data[0])
    assert len({got[2].data[k].tobytes() for k in range(4)}) == 4


def test_gif_and_sun_raster_records_give_the_same_pixels_on_both_backends(tmp_path) -> None:
    """DALI decodes neither GIF nor Sun raster; OpenCV (and so MXNet) decodes both. The DALI
    backend decodes them with OpenCV and feeds them as BMP: both backends hand
    out the same labels and the same pixels, OpenCV's decoding of the record."""
    base = coordinate_image(48)
    gif = cv2.imencode(".gif", np.roll(base, 9, axis=0))[1].tobytes()
    ras = cv2.imencode(".ras", np.roll(base, 5, axis=1))[1].tobytes()
    png = cv2.imencode(".png", base)[1].tobytes()
    rec = _records(tmp_path / "gif.rec", [png, gif, ras, gif], [0.0, 1.0, 2.0, 3.0])

    def want(body: bytes) -> np.ndarray:
        bgr = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
        return bgr[..., ::-1].transpose(2, 0, 1)

    out = {}
    for backend in BACKENDS:
        pipe = cpu_pipe(rec, 4, (3, 48, 48), backend=backend, train=False, resize=0, dtype="uint8")
        (batch,) = list(pipe)
        assert batch.label.tolist() == [0, 1, 2, 3] and pipe.skipped == 0
        out[backend] = np.asarray(batch.data)
    np.testing.assert_array_equal(out["dali"], out["cpu"])
    np.testing.assert_array_equal(out["dali"][1], want(gif))
    np.testing.assert_array_equal(out["dali"][2], want(ras))
    assert not np.array_equal(out["dali"][1], out["dali"][0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_skipped_counts_reads_of_bad_records_padding_copies_aside(tmp_path, backend):
    """``pipe.skipped`` counts each read of a bad record: with ``"pad"`` the copies that
    pad the last batch are not reads; with ``"wrap"`` the next epoch's records read in
    the last batch are (and are not read again in the next epoch)."""
    pngs = [cv2.imencode(".png", np.full((16, 16, 3), 20 * i, np.uint8))[1].tobytes()
            for i in range(9)]  # fmt: skip
    pngs[0] = pngs[8] = b"not an image"
    rec = _records(tmp_path / "bad.rec", pngs, [float(i) for i in range(9)])
    kw = dict(backend=backend, shuffle=False, on_error="skip", dtype="uint8")
    padded = cpu_pipe(rec, 4, last_batch="pad", **kw)
    for _ in padded:
        pass
    assert padded.skipped == 2  # records 0 and 8; not 8's three padding copies
    wrapped = cpu_pipe(rec, 4, last_batch="wrap", **kw)
    labels = [b.label.tolist() for b in wrapped]  # 0..7, then 8 (bad), 0 (bad), 1, 2
    assert wrapped.skipped == 3  # 0 in epoch 0's slice, 8, and epoch 1's 0 read here
    assert labels[0] == [1, 1, 2, 3] and labels[2] == [1, 2, 1, 2]  # k-th bad: k-th good
    for _ in wrapped:  # epoch 1: records 3..8, then epoch 2's 0 and 1
        pass
    assert wrapped.skipped == 5


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"max_rotate_angle": float("nan")}, "max_rotate_angle must be a finite number, got nan"),
        ({"brightness": float("nan")}, "brightness must be a finite number, got nan"),
        ({"scale": float("inf")}, "scale must be a finite number, got inf"),
        ({"pca_noise": float("inf")}, "pca_noise must be a finite number, got inf"),
        ({"min_random_area": float("nan")}, "min_random_area must be a finite number"),
        ({"max_aspect_ratio": float("inf")}, "max_aspect_ratio must be a finite number"),
        ({"std": (1, float("inf"), 1)}, r"std must be finite, got \(1, inf, 1\)"),
        ({"mean": float("nan")}, "mean must be finite, got nan"),
        ({"rotate": float("nan")}, "rotate must be a finite number, got nan"),
        ({"rotate": -30}, "rotate must be >= 0 degrees .*got -30"),
        ({"fill_value": 127.5}, "fill_value must be a whole number in 0..255, got 127.5"),
        ({"fill_value": 256}, "fill_value must be a whole number in 0..255, got 256"),
        ({"train": False, "crop": "random_resized"},
         "crop='random_resized' is a training augmentation"),
        ({"data_shape": (3, 224.7, 224)}, r"data_shape must be \(3, height, width\).*224\.7"),
        ({"data_shape": "abc"}, r"data_shape must be \(3, height, width\).*'abc'"),
        ({"resize": 1.5}, "resize must be a whole number >= 0, got 1.5"),
        ({"resize": "x"}, "resize must be a number, got 'x'"),
        ({"resize": -1}, "resize must be a whole number >= 0, got -1"),
        ({"random_h": None}, "random_h must be a number, got None"),
        ({"pad": 2.5}, "pad must be a whole number >= 0, got 2.5"),
        ({"train": "False"}, "train must be True or False, got 'False'"),
        ({"mirror": "no"}, "mirror must be True or False, got 'no'"),
        ({"rand_mirror": 1}, "rand_mirror must be True or False, got 1"),
        ({"brightness": True}, "brightness must be a number, got True"),
        ({"mean_image": np.full((3, 224, 224), np.nan)}, "mean_image must be finite"),
    ],
)  # fmt: skip
def test_augment_spec_names_the_field_and_the_bad_value(kwargs, error) -> None:
    """Values that would fail half way through an epoch, be truncated or turned into
    True silently, or (a NaN angle) make every image fill, are refused up front."""
    from gpurec.augment import AugmentSpec

    with pytest.raises(ValueError, match=error):
        AugmentSpec(**kwargs)


def test_augment_spec_takes_whole_floats_numpy_values_and_zero_rotate() -> None:
    """What configs and ``gpurec.mxnet.io`` pass: whole floats, NumPy scalars and bools."""
    from gpurec.augment import AugmentSpec

    spec = AugmentSpec(data_shape=(3, 224.0, np.int64(200)), resize=np.float64(256.0),
                       fill_value=255.0, rotate=30.0, random_h=36.0, pad=np.int32(2),
                       train=np.True_, rand_mirror=np.False_, mirror=True,
                       mean=np.float32(3), std=[1, 2, 3])  # fmt: skip
    assert spec.data_shape == (3, 224, 200) and type(spec.data_shape[1]) is int
    assert spec.resize == 256 and type(spec.resize) is int and spec.pad == 2
    assert spec.fill_value == 255.0 and spec.rotate == 30.0 and spec.random_h == 36
    assert spec.train is True and spec.rand_mirror is False and spec.mirror is True
    assert spec.mean == (3.0, 3.0, 3.0) and spec.std == (1.0, 2.0, 3.0)
    zero = AugmentSpec(rotate=0, crop="random")
    assert zero.rotate == 0.0 and not zero.affine  # MXNet's fixed angle needs rotate > 0


def test_a_wrap_checkpoint_loads_with_its_own_layout_and_last_batch_only() -> None:
    """``last_batch="wrap"`` epochs start where the rank's stream reaches a whole batch:
    with another batch size or rank count, records around an epoch boundary would repeat
    or be skipped, so load_state_dict refuses it (at an epoch boundary too), and a
    checkpoint remembers its last_batch."""
    rec = Path(__file__).parent / "data" / "mxnet_iter" / "iter.rec"  # 10 records

    def make(batch: int = 4, last_batch: str = "wrap", **kw) -> Pipeline:
        return cpu_pipe(rec, batch, (3, 8, 8), backend="cpu", train=False, shuffle=True,
                        seed=3, last_batch=last_batch, num_threads=1, **kw)  # fmt: skip

    boundary = make()
    list(boundary)
    state = boundary.state_dict()
    assert (state["epoch"], state["batch"], state["last_batch"]) == (1, 0, "wrap")
    with pytest.raises(ValueError, match="the checkpoint has 1 rank of batch 4, this "
                                         "Pipeline 1 rank of batch 3"):  # fmt: skip
        make(3).load_state_dict(state)
    with pytest.raises(ValueError, match="1 rank of batch 4, this Pipeline 2 ranks of batch 4"):
        make(num_shards=2, shard_id=0).load_state_dict(state)
    mid = make()
    next(iter(mid))
    with pytest.raises(ValueError, match="1 rank of batch 4, this Pipeline 1 rank of batch 5"):
        make(5).load_state_dict(mid.state_dict())  # refused when loaded, not at iter()
    with pytest.raises(ValueError, match="last_batch='wrap', this Pipeline has "
                                         "last_batch='pad'"):  # fmt: skip
        make(last_batch="pad").load_state_dict(mid.state_dict())
    # the same layout resumes exactly; a checkpoint from before last_batch was recorded
    # loads as before
    full = make()
    want = [b.index.tolist() for _ in range(2) for b in full]
    for old in (False, True):
        first = make()
        it = iter(first)
        got = [next(it).index.tolist()]
        state = first.state_dict()
        if old:
            del state["last_batch"]
        resumed = make()
        resumed.load_state_dict(state)
        got += [b.index.tolist() for _ in range(2) for b in resumed]
        assert got == want
