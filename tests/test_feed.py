"""The DALI backend's learned records (gpurec.backends.records): a batch read from what
the first read of its records learned is the batch the checked path reads, byte for byte
(images fed, labels, sizes, every parameter), in every layout; records that failed are
never learned and fail again the same way."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("nvidia.dali")

from helpers import numbered_shards

import gpurec
from gpurec.recordio import IRHeader, RecordWriter, pack


def _checked(backend, plan, b):
    """Batch ``b`` read as a first read reads it: every record through the checks."""
    saved = backend._table.start.copy()
    backend._table.start[:] = 0
    try:
        return backend._read(plan, b)
    finally:
        backend._table.start[:] = saved


def _same(one, two) -> None:
    assert one.indices == two.indices
    assert len(one.payloads) == len(two.payloads)
    for a, b in zip(one.payloads, two.payloads, strict=True):
        assert bytes(a) == bytes(b)
    np.testing.assert_array_equal(one.labels, two.labels)
    assert one.params.keys() == two.params.keys()
    for name in one.params:
        np.testing.assert_array_equal(one.params[name], two.params[name], err_msg=name)
    assert (one.skipped, repr(one.error)) == (two.skipped, repr(two.error))


def _sizes_tree(rec: Path, n: int = 23) -> Path:
    """JPEGs of several sizes (and one PNG, one BMP): sizes the geometry must tell apart."""
    rng = np.random.default_rng(3)
    with RecordWriter(rec, rec.with_suffix(".idx")) as writer:
        for i in range(n):
            w, h = [(40, 52), (64, 48), (33, 71), (48, 64)][i % 4]
            img = rng.integers(0, 255, (h, w, 3), np.uint8)
            ext = ".png" if i == 5 else ".bmp" if i == 6 else ".jpg"
            payload = cv2.imencode(ext, img)[1].tobytes()
            writer.write(pack(IRHeader(0, float(i % 7), i, 0), payload), key=i)
    return rec


@pytest.mark.parametrize(
    "options",
    [
        dict(crop="center", rand_mirror=True, mean=127.5, std=127.5),
        dict(crop="random_resized", rand_mirror=True),
        dict(crop="random", resize=40, max_rotate_angle=20, fill_value=255),
        dict(crop="center", pad=4, interp="auto"),
    ],
)
def test_learned_batches_are_the_checked_ones(tmp_path: Path, options: dict) -> None:
    rec = _sizes_tree(tmp_path / "s.rec")
    kw = dict(device="cpu", backend="dali", num_threads=1, seed=2)
    with gpurec.Pipeline(str(rec), 8, (3, 32, 32), **kw, **options) as pipe:
        backend = pipe.backend
        plan = pipe.plan(0)
        for b in range(plan.batches):
            first = backend._read(plan, b)  # learns
            assert backend._table.known(plan.batch(b)).all()
            _same(backend._read(plan, b), first)
            _same(backend._read(plan, b), _checked(backend, plan, b))


def test_learned_across_shards_and_insightface(tmp_path: Path, golden: Path) -> None:
    shards = numbered_shards(tmp_path / "n")
    face = tmp_path / "face"
    shutil.copytree(golden / "insightface", face)
    recs = [str(s) for s in shards] + [str(face / "train.rec")]
    with gpurec.Pipeline(recs, 5, (3, 24, 24), device="cpu", backend="dali", num_threads=1,
                         rand_mirror=True) as pipe:  # fmt: skip
        backend = pipe.backend
        for epoch in range(2):
            plan = pipe.plan(epoch)
            for b in range(plan.batches):
                _same(backend._read(plan, b), _checked(backend, plan, b))
        assert backend._table.known(np.arange(len(pipe.dataset))).all()
        # and the batches handed out are those of a pipeline that learned nothing yet
        got = [(np.asarray(x.data).copy(), np.asarray(x.label).copy()) for x in pipe]
    with gpurec.Pipeline(recs, 5, (3, 24, 24), device="cpu", backend="dali", num_threads=1,
                         rand_mirror=True) as fresh:  # fmt: skip
        fresh.epoch = 0
        want = [(np.asarray(x.data).copy(), np.asarray(x.label).copy()) for x in fresh]
    assert len(got) == len(want)
    for (d1, l1), (d2, l2) in zip(got, want, strict=True):
        np.testing.assert_array_equal(l1, l2)
        np.testing.assert_array_equal(d1, d2)


def test_a_bad_record_is_never_learned(tmp_path: Path) -> None:
    rec = tmp_path / "bad.rec"
    good = cv2.imencode(".jpg", np.full((20, 20, 3), 90, np.uint8))[1].tobytes()
    with RecordWriter(rec, rec.with_suffix(".idx")) as writer:
        for i in range(6):
            payload = b"not an image" if i == 3 else good
            writer.write(pack(IRHeader(0, float(i), i, 0), payload), key=i)
    with gpurec.Pipeline(str(rec), 6, (3, 16, 16), device="cpu", backend="dali", num_threads=1,
                         on_error="skip", shuffle=False) as pipe:  # fmt: skip
        plan = pipe.plan(0)
        first = pipe.backend._read(plan, 0)
        known = pipe.backend._table.known(plan.batch(0))
        assert known.tolist() == [i != 3 for i in plan.batch(0).tolist()]
        again = pipe.backend._read(plan, 0)
        _same(again, first)
        assert again.skipped == 1


@pytest.mark.parametrize(
    "options",
    [
        dict(crop="random_resized", rand_mirror=True),
        dict(
            crop="random_resized", min_random_area=0.3, max_aspect_ratio=2.0, data_shape=(3, 64, 48)
        ),
    ],
)
def test_window_maps_are_geometry_s_to_the_bit(options: dict) -> None:
    """The whole batch's random-resized windows at once, as draws.geometry makes them one
    by one, bit for bit (tiny images whose attempts all fail take geometry's fallback)."""
    from gpurec.augment import AugmentSpec
    from gpurec.backends.dali_graph import _random_resized, _window_maps
    from gpurec.draws import draw, geometry

    options = {"data_shape": (3, 224, 224), **options}
    spec = AugmentSpec(train=True, **options)
    assert _random_resized(spec)
    rng = np.random.default_rng(0)
    for t in range(20):
        n = 256
        sizes = np.stack([rng.integers(20, 700, n), rng.integers(20, 700, n)], 1)
        sizes[:5] = [[1, 1], [2, 300], [300, 2], [224, 224], [5, 5]]
        d = draw(spec, (1, t, 0), n)
        want = np.array([geometry(spec, d, k, int(w), int(h)).matrix
                         for k, (w, h) in enumerate(sizes.tolist())])  # fmt: skip
        got = _window_maps(spec, d, sizes)
        assert got.tobytes() == want.tobytes()


def _epoch(pipe, epoch: int) -> list[tuple[np.ndarray, np.ndarray]]:
    pipe.epoch = epoch
    return [(np.asarray(b.data).copy(), np.asarray(b.label).copy()) for b in pipe]


@pytest.mark.parametrize("backend", ["cpu", "dali"])
@pytest.mark.parametrize(
    "options",
    [
        dict(crop="center", rand_mirror=True, mean=127.5, std=127.5, resize=0),
        dict(crop="center", interp="area", shape=(3, 8, 8)),  # reduced JPEG decoding
        dict(crop="random_resized", rand_mirror=True, brightness=0.3),
    ],
)
def test_a_learned_epoch_is_a_first_read_epoch(tmp_path: Path, backend: str, options) -> None:
    """Epoch 1 of a pipeline that learned its records in epoch 0 is, pixel for pixel and
    label for label, epoch 1 of a fresh pipeline (which reads every record checked)."""
    rec = _sizes_tree(tmp_path / "s.rec", n=37)
    options = dict(options)
    shape = options.pop("shape", (3, 24, 24))
    kw = dict(device="cpu", backend=backend, num_threads=2, seed=4, **options)
    with gpurec.Pipeline(str(rec), 8, shape, **kw) as learned:
        _epoch(learned, 0)
        assert learned.backend._table.known(np.arange(len(learned.dataset))).sum() >= 30
        got = _epoch(learned, 1)
    with gpurec.Pipeline(str(rec), 8, shape, **kw) as fresh:
        want = _epoch(fresh, 1)
    assert len(got) == len(want) == 4  # 37 records, batches of 8, the last dropped (train)
    for (d1, l1), (d2, l2) in zip(got, want, strict=True):
        np.testing.assert_array_equal(l1, l2)
        np.testing.assert_array_equal(d1, d2)


def test_exact_crops_skip_the_resize_and_keep_the_pixels(tmp_path: Path) -> None:
    """Windows that are exact crops of the decoded image (a data-shape crop of an image
    at least that large) are decoded as that window and not resampled; images smaller
    than the data shape are still enlarged. Lossless records, uint8 out: the DALI path's
    exact crops are the OpenCV backend's crops to the byte."""
    from gpurec.backends import dali_graph

    rng = np.random.default_rng(5)
    rec = tmp_path / "png.rec"
    sizes = [(40, 40), (57, 44), (32, 32), (20, 50), (33, 90), (32, 31)]
    with RecordWriter(rec, rec.with_suffix(".idx")) as writer:
        for i, (w, h) in enumerate(sizes):
            png = cv2.imencode(".png", rng.integers(0, 255, (h, w, 3), np.uint8))[1].tobytes()
            writer.write(pack(IRHeader(0, float(i), i, 0), png), key=i)
    kw = dict(device="cpu", num_threads=1, crop="center", resize=0, dtype="uint8",
              shuffle=False, last_batch="pad")  # fmt: skip
    with gpurec.Pipeline(str(rec), 6, (3, 32, 32), backend="dali", **kw) as dali:
        plan = dali.plan(0)
        params = dali.backend._read(plan, 0).params
        assert params[dali_graph.RESAMPLE].tolist() == [False, False, False, True, False, True]
        got = np.asarray(next(iter(dali)).data).copy()
    with gpurec.Pipeline(str(rec), 6, (3, 32, 32), backend="cpu", **kw) as cpu:
        want = np.asarray(next(iter(cpu)).data).copy()
    exact = [0, 1, 2, 4]
    np.testing.assert_array_equal(got[exact], want[exact])
    assert np.abs(got[[3, 5]].astype(int) - want[[3, 5]]).max() <= 2  # two resamplers


def test_decoder_settings_reach_dali_and_change_no_pixel(tmp_path: Path) -> None:
    """The GPU decoder's settings are Pipeline keywords, checked, passed to DALI's decoder
    (found in the serialised graph); in DALI's CPU mode they change nothing."""
    import struct

    rec = _sizes_tree(tmp_path / "s.rec", n=16)
    kw = dict(device="cpu", backend="dali", num_threads=1, seed=3, rand_mirror=True)
    settings = dict(hw_decoder_load=0.99, device_memory_padding=1 << 20,
                    host_memory_padding=1 << 19, preallocate_width_hint=1234,
                    preallocate_height_hint=987)  # fmt: skip
    with gpurec.Pipeline(str(rec), 8, (3, 24, 24), **kw, **settings) as tuned:
        serialised = tuned.backend._pipeline.serialize()
        assert struct.pack("<f", 0.99) in serialised
        got = _epoch(tuned, 0)
    with gpurec.Pipeline(str(rec), 8, (3, 24, 24), **kw) as plain:
        assert struct.pack("<f", 0.99) not in plain.backend._pipeline.serialize()
        want = _epoch(plain, 0)
    for (d1, l1), (d2, l2) in zip(got, want, strict=True):
        np.testing.assert_array_equal(l1, l2)
        np.testing.assert_array_equal(d1, d2)


@pytest.mark.parametrize(
    ("name", "value"),
    [("hw_decoder_load", 1.5), ("hw_decoder_load", -0.1), ("hw_decoder_load", "0.5"),
     ("device_memory_padding", -1), ("host_memory_padding", 2.5),
     ("preallocate_width_hint", True), ("preallocate_height_hint", -3)],
)  # fmt: skip
def test_bad_decoder_settings_are_refused(tmp_path: Path, name: str, value) -> None:
    rec = _sizes_tree(tmp_path / "s.rec", n=4)
    with pytest.raises(ValueError, match=name):
        gpurec.Pipeline(str(rec), 2, (3, 24, 24), device="cpu", backend="cpu", **{name: value})


@pytest.mark.parametrize(
    "options",
    [dict(crop="center", rand_mirror=True, resize=0), dict(crop="center", resize=40, pad=3),
     dict(crop="center", interp="auto")],
)  # fmt: skip
def test_parameters_kept_by_size_are_the_ones_worked_out(options: dict) -> None:
    """Geometry that takes no draw is kept per image size across batches: every batch's
    parameters are those worked out afresh, image by image (a batch of one each)."""
    from gpurec.augment import AugmentSpec
    from gpurec.backends.dali_graph import parameters
    from gpurec.draws import draw

    spec = AugmentSpec(data_shape=(3, 32, 32), train=True, **options)
    rng = np.random.default_rng(1)
    kept: dict = {}
    for b in range(6):
        sizes = np.array([(20, 50), (32, 32), (57, 44), (100, 70)])[rng.integers(0, 4, 16)]
        d = draw(spec, (1, 0, b), 16)
        got = parameters(spec, d, sizes, True, kept)
        for k in range(16):
            one = draw(spec, (1, 0, b), 16)
            want = parameters(spec, one, sizes[k : k + 1], True)
            assert got.keys() == want.keys()
            for name in want:
                if name in ("mirror", "mean", "std"):
                    want[name] = parameters(spec, one, sizes, True)[name][k : k + 1]
                assert got[name][k : k + 1].tobytes() == want[name].tobytes(), name
    assert len(kept) == 4


def test_opencv_float32_planes_are_the_tables_lookup(tmp_path: Path) -> None:
    """The OpenCV backend's float32 CHW normalisation (float32 arithmetic per plane) gives
    to the bit what its lookup tables give for the uint8 pixels of the same batch, with the
    normaliser's jitter (a multiplier and offset per image)."""
    from gpurec.backends.cpu import _tables

    rec = _sizes_tree(tmp_path / "s.rec", n=16)
    kw = dict(device="cpu", backend="cpu", num_threads=2, seed=6, rand_mirror=True)
    norm = dict(mean=(123.68, 116.28, 103.53), std=(58.4, 57.1, 57.4), max_random_contrast=0.3,
                max_random_illumination=10.0)  # fmt: skip
    with gpurec.Pipeline(str(rec), 8, (3, 24, 24), dtype="float32", **kw, **norm) as pipe:
        floats = _epoch(pipe, 0)
        plan = pipe.plan(0)
        draws = [pipe.draws(plan, b, 8) for b in range(plan.batches)]
        spec = pipe.spec
    with gpurec.Pipeline(str(rec), 8, (3, 24, 24), dtype="uint8", **kw) as pipe:
        pixels = _epoch(pipe, 0)
    for (f, _), (u, _), d in zip(floats, pixels, draws, strict=True):
        for k in range(len(f)):
            tables = _tables(spec, d.mult[k], d.bias[k])
            want = np.stack([tables[c][u[k, c]] for c in range(3)])
            assert f[k].tobytes() == want.tobytes()


def test_images_are_cut_from_their_shard_past_4_gib() -> None:
    """The fed graph takes each image as the buffer it lies in (a shard's map) and where:
    offsets past 2**32 and lengths cut out the same bytes, and the same pixels, as the
    images fed one array each (dali_graph.WHERE's two float32 columns a number)."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.backend import TensorCPU, TensorListCPU

    from gpurec.augment import AugmentSpec
    from gpurec.backends import dali_graph
    from gpurec.draws import draw

    rng = np.random.default_rng(5)
    images = [rng.integers(0, 255, (40 + 9 * k, 50 - 3 * k, 3), np.uint8) for k in range(4)]
    jpegs = [cv2.imencode(".jpg", im)[1].reshape(-1) for im in images]
    shard = np.zeros(5 * 2**30 + 12345, np.uint8)  # calloc: pages only where written
    offsets = np.array([8, 2**31 - 3, 2**32 + 65535, len(shard) - len(jpegs[3])], np.int64)
    for at, jpeg in zip(offsets.tolist(), jpegs, strict=True):
        shard[at : at + len(jpeg)] = jpeg
    lengths = np.array([len(j) for j in jpegs], np.int64)
    spec = AugmentSpec(data_shape=(3, 32, 32), crop="center", rand_mirror=True)
    sizes = np.array([(im.shape[1], im.shape[0]) for im in images])
    params = dali_graph.parameters(spec, draw(spec, (1, 2), 4), sizes, exact_crops=True)
    names = dali_graph.inputs(spec, exact_crops=True)

    @pipeline_def(batch_size=4, num_threads=1, device_id=None, enable_conditionals=True)
    def fed():
        return dali_graph.graph(fn, types, spec, device="cpu", exact_crops=True, packed=True)

    outs = []
    for buffers, at in ((TensorListCPU.broadcast(TensorCPU(shard), 4), offsets),
                        (TensorListCPU([TensorCPU(j) for j in jpegs], contiguous=False),
                         np.zeros(4, np.int64))):  # fmt: skip
        pipe = fed()
        pipe.build()
        pipe.feed_input(dali_graph.INPUT, buffers)
        pipe.feed_input(dali_graph.PACKED, dali_graph.pack(params, names, 4, at, lengths))
        outs.append(pipe.run()[0].as_array())
    del pipe, buffers
    assert outs[0].std() > 10  # pixels, not the zeros around the images
    np.testing.assert_array_equal(outs[0], outs[1])
    where = dali_graph.pack(params, names, 4, offsets, lengths)[:, : dali_graph.WHERE]
    np.testing.assert_array_equal(where[:, 0].astype(np.int64) * 65536 + where[:, 1], offsets)
    with pytest.raises(ValueError, match="terabyte"):
        dali_graph.pack(params, names, 4, offsets + 2**40, lengths)
