"""Every `.rec` layout MXNet users have: InsightFace files, files without `.idx`, files cut
short; through the Dataset, the Pipeline (both backends) and the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import run_gpurec

from gpurec import Pipeline
from gpurec.dataset import Dataset, open_shard
from gpurec.recordio import IRHeader, RecordIOError, RecordReader, RecordWriter, read_idx, unpack
from gpurec.recordio import pack as pack_record

BACKENDS = ["cpu", "dali"]


@pytest.fixture()
def shuffled(face: Path, tmp_path: Path) -> Path:
    """A writable copy of the golden index-less file."""
    return Path(shutil.copy(face / "shuffled.rec", tmp_path / "shuffled.rec"))


def cut_copy(face: Path, folder: Path, keep: int, with_idx: bool = True) -> Path:
    """The golden InsightFace file cut after ``keep`` bytes (its .idx kept whole)."""
    folder.mkdir(parents=True, exist_ok=True)
    rec = folder / "cut.rec"
    rec.write_bytes((face / "train.rec").read_bytes()[:keep])
    if with_idx:
        shutil.copy(face / "train.idx", folder / "cut.idx")
    return rec


def eval_pipe(source, backend: str, **kw) -> Pipeline:
    kw = {"train": False, "last_batch": "partial", "device": "cpu", "backend": backend, **kw}
    return Pipeline(source, 5, (3, 64, 64), **kw)


def labels_of(pipe: Pipeline) -> list[float]:
    return [float(v) for b in pipe for v in np.asarray(b.label)[: len(b.label) - b.pad]]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------- InsightFace


def test_insightface_samples_are_the_declared_image_keys(face, face_expected) -> None:
    dataset = Dataset([face / "train.rec"])
    (shard,) = dataset.shards
    assert shard.layout == "insightface" and shard.other == 4  # header + 3 identities
    assert shard.keys.tolist() == list(range(1, 13))
    for i in range(len(dataset)):
        header, payload = unpack(dataset.read(i))
        want = face_expected["images"][str(shard.keys[i])]
        assert sha(payload) == want["payload_sha256"]
        assert (header.label, header.id) == (want["label"], want["id"])
    assert dataset.where(3) == f"{face / 'train.rec'} key 4 at byte {int(shard.offsets[3])}"


def insightface_file(folder: Path, multi_label: bool = False, header_first: bool = True) -> Path:
    """A small InsightFace-layout file: images of keys 1..6 (labels 0,0,1,1,2,2 as the
    image's grey level / 100), identity records 7..9, header at key 0."""
    folder.mkdir(parents=True, exist_ok=True)
    rec = folder / "face.rec"
    labels = [0, 0, 1, 1, 2, 2]
    with RecordWriter(rec, rec.with_suffix(".idx")) as writer:

        def header0() -> None:
            writer.write(pack_record(IRHeader(2, [7.0, 10.0], 0, 1), b""), key=0)

        if header_first:
            header0()
        for key, label in enumerate(labels, 1):
            img = np.full((24, 24, 3), 20 + 100 * label, np.uint8)
            value = [float(label), 99.0] if multi_label else float(label)
            jpeg = cv2.imencode(".jpg", img)[1].tobytes()
            writer.write(pack_record(IRHeader(0, value, key, 0), jpeg), key=key)
        for key, (lo, hi) in zip((7, 8, 9), ((1, 3), (3, 5), (5, 7)), strict=True):
            writer.write(pack_record(IRHeader(2, [float(lo), float(hi)], key, 0), b""), key=key)
        if not header_first:
            header0()
    return rec


@pytest.mark.parametrize("backend", BACKENDS)
def test_pipeline_on_the_golden_insightface_file(face, face_expected, backend) -> None:
    pipe = eval_pipe(face / "train.rec", backend)
    assert len(pipe.dataset) == 12
    want = [face_expected["images"][str(k)]["label"] for k in range(1, 13)]
    batches = list(pipe)
    assert labels_of(pipe) == want  # second epoch: the same, file order
    assert [float(v) for b in batches for v in b.label] == want
    data = np.concatenate([b.data for b in batches])
    assert data.shape == (12, 3, 64, 64)
    means = [face_expected["images"][str(k)]["imdecode_rgb_mean"] for k in range(1, 13)]
    # 112x112 resized to 64x64 keeps the mean within a level or two
    np.testing.assert_allclose(data.mean(axis=(1, 2, 3)), means, atol=2.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("header_first", [True, False])
def test_insightface_multi_label_images_give_the_first_label(tmp_path, backend, header_first):
    rec = insightface_file(tmp_path, multi_label=True, header_first=header_first)
    pipe = Pipeline(rec, 6, (3, 16, 16), device="cpu", backend=backend, train=False)
    (batch,) = list(pipe)
    assert pipe.label_width == 1
    assert batch.label.tolist() == [0, 0, 1, 1, 2, 2]  # what MXFaceDataset reads: label[0]
    grey = batch.data.mean(axis=(1, 2, 3))
    np.testing.assert_allclose(grey, 20 + 100 * batch.label, atol=2)


def test_insightface_keys_missing_from_the_idx_are_named(tmp_path) -> None:
    rec = insightface_file(tmp_path)
    idx = rec.with_suffix(".idx")
    idx.write_text("".join(ln + "\n" for ln in idx.read_text().splitlines() if ln[0] != "4"))
    with pytest.raises(RecordIOError, match=r"face\.idx: .*keys 1\.\.6, but 1 of them .*key 4"):
        Dataset([rec])
    dataset = Dataset([rec], on_error="skip")
    assert dataset.shards[0].keys.tolist() == [1, 2, 3, 5, 6] and dataset.lost == 1


def test_header_only_records_are_never_samples(tmp_path) -> None:
    """Without the key-0 header (e.g. it was cut off), identity records are still not
    taken for images."""
    rec = insightface_file(tmp_path)
    idx = rec.with_suffix(".idx")
    idx.write_text("".join(ln + "\n" for ln in idx.read_text().splitlines() if ln[0] != "0"))
    (shard,) = Dataset([rec]).shards
    assert shard.layout == "plain" and shard.other == 3
    assert shard.keys.tolist() == [1, 2, 3, 4, 5, 6]


# -------------------------------------------------------------------------- no .idx


def test_index_less_file_is_scanned_once_then_cached(shuffled, face_expected) -> None:
    first = open_shard(shuffled)
    assert first.index == "scan" and first.layout == "plain"
    cache = shuffled.with_name("shuffled.rec.gpurec-index.npz")
    assert first.index_file == cache and cache.is_file()
    order = [unpack(first.reader.read_at(o)[0])[0].id2 for o in first.offsets.tolist()]
    assert order == face_expected["shuffled_order"]
    again = open_shard(shuffled)
    assert again.index == "cache" and again.offsets.tolist() == first.offsets.tolist()
    # A changed file (here: one more record, so another size and mtime) is scanned anew.
    with open(shuffled, "ab") as f:
        f.write(b"".join(bytes(p) for p in _frame(pack_record(IRHeader(0, 5.0, 99, 0), b"x"))))
    changed = open_shard(shuffled)
    assert changed.index == "scan" and len(changed) == 13
    # Same size, new mtime: rescanned too.
    os.utime(shuffled, ns=(1_000_000_000, 1_000_000_000))
    assert open_shard(shuffled).index == "scan"
    assert open_shard(shuffled).index == "cache"


def _frame(record: bytes):
    from gpurec.recordio import frame_record

    return frame_record(record)


def test_cache_goes_to_the_cache_folder_when_the_file_folder_refuses_it(
    shuffled, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("GPUREC_CACHE", str(tmp_path / "cache"))
    shuffled.with_name("shuffled.rec.gpurec-index.npz").mkdir()  # the name beside is taken
    first = open_shard(shuffled)
    assert first.index == "scan" and first.index_file.parent == tmp_path / "cache" / "index"
    assert open_shard(shuffled).index == "cache"
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_cache_file_that_is_not_ours_is_rebuilt(shuffled) -> None:
    shuffled.with_name("shuffled.rec.gpurec-index.npz").write_bytes(b"garbage")
    shard = open_shard(shuffled)
    assert shard.index == "scan" and len(shard) == 12
    assert open_shard(shuffled).index == "cache"


@pytest.mark.parametrize("backend", BACKENDS)
def test_pipeline_on_an_index_less_file(shuffled, face_expected, backend) -> None:
    pipe = eval_pipe(shuffled, backend)
    images = face_expected["images"]
    want = [images[str(k)]["label"] for k in face_expected["shuffled_order"]]
    assert labels_of(pipe) == want
    shuffled_pipe = eval_pipe(shuffled, backend, shuffle=True)
    got = labels_of(shuffled_pipe)
    assert sorted(got) == sorted(want)


# ---------------------------------------------------------------------------- cut short


@pytest.mark.parametrize("with_idx", [True, False])
def test_a_cut_file_names_where_it_ends_or_loads_what_is_intact(face, tmp_path, with_idx):
    rec = cut_copy(face, tmp_path, 20_000, with_idx)
    offsets = read_idx(face / "train.idx")[1]
    last_intact = int(offsets[offsets < 20_000].max())  # the record the cut goes through
    where = rf"cut\.rec: at byte {last_intact}: .*ends at byte 20000"
    with pytest.raises(RecordIOError, match=where):
        Dataset([rec])
    dataset = Dataset([rec], on_error="skip")
    assert len(dataset) == 5  # keys 1..5 end before byte 18332
    assert dataset.lost == (11 if with_idx else 1)  # the .idx says how many were lost
    assert [unpack(dataset.read(i))[0].id for i in range(5)] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("backend", BACKENDS)
def test_pipeline_on_a_cut_file_raises_or_skips(face, face_expected, tmp_path, backend) -> None:
    rec = cut_copy(face, tmp_path, 30_000)
    with pytest.raises(RecordIOError, match=r"cut\.rec: at byte 28464: the file is cut short"):
        eval_pipe(rec, backend)
    pipe = eval_pipe(rec, backend, on_error="skip")
    assert pipe.skipped == 8  # keys 9..12, 3 identities and the header are past the cut
    want = [face_expected["images"][str(k)]["label"] for k in range(1, 9)]
    assert labels_of(pipe) == want


def test_a_record_cut_part_way_with_an_idx_loses_only_itself(tmp_path) -> None:
    """Cut inside the last record: the others stay, and the .idx entry counts as lost."""
    rec = insightface_file(tmp_path, header_first=True)
    offsets = read_idx(rec.with_suffix(".idx"))[1]
    rec.write_bytes(rec.read_bytes()[: int(offsets[-1]) + 12])  # into identity record 9
    dataset = Dataset([rec], on_error="skip")
    (shard,) = dataset.shards
    assert shard.layout == "insightface" and shard.keys.tolist() == [1, 2, 3, 4, 5, 6]
    assert dataset.lost == 1


# --------------------------------------------------------------------------------- CLI


def test_cli_info_verify_show_on_every_layout(face, shuffled, tmp_path) -> None:
    res = run_gpurec("info", face / "train.rec")
    assert res.returncode == 0, res.stderr
    assert "12 images" in res.stdout and "InsightFace layout: 4 header/identity" in res.stdout
    res = run_gpurec("info", shuffled, "--json")
    shard = json.loads(res.stdout)["shards"][0]
    assert (shard["records"], shard["index"], shard["indexed"]) == (12, "scan", False)
    cut = cut_copy(face, tmp_path / "c", 30_000)
    res = run_gpurec("info", cut, "--json")
    assert json.loads(res.stdout)["shards"][0]["lost_records"] == 8

    for intact in (face / "train.rec", shuffled):
        res = run_gpurec("verify", intact)
        assert res.returncode == 0, res.stdout + res.stderr
    res = run_gpurec("verify", cut)
    assert res.returncode == 1
    assert "file cut short at the record at byte 28464 (it ends at byte 30000)" in res.stdout

    for source in (face / "train.rec", shuffled, cut):
        out = tmp_path / f"{source.stem}.png"
        res = run_gpurec("show", source, "-o", out, "-n", "4", "--raw")
        assert res.returncode == 0, res.stderr
        grid = cv2.imread(str(out))
        assert grid is not None and grid.std() > 5  # faces, not a blank grid


def test_cli_index_writes_the_intact_part_only_when_asked(face, tmp_path) -> None:
    rec = cut_copy(face, tmp_path, 20_000, with_idx=False)
    res = run_gpurec("index", rec)
    assert res.returncode == 2
    assert "at byte 18332: truncated record" in res.stderr and "--intact" in res.stderr
    assert not rec.with_suffix(".idx").exists()
    res = run_gpurec("index", rec, "--intact")
    assert res.returncode == 0, res.stderr
    assert "5 records indexed" in res.stdout and "1668 bytes after byte 18332" in res.stdout
    keys, offsets = read_idx(rec.with_suffix(".idx"))
    assert keys.tolist() == [1, 2, 3, 4, 5]  # IRHeader ids, as MXIndexedRecordIO keys
    assert offsets.tolist() == read_idx(face / "train.idx")[1][:5].tolist()
    with RecordReader(rec) as reader:  # an ordinary, complete index now
        assert len(reader) == 5


# ------------------------------------------------------------------- review findings


def test_verify_reports_a_file_cut_inside_its_first_record(tmp_path) -> None:
    rec = insightface_file(tmp_path)
    rec.write_bytes(rec.read_bytes()[:10])
    res = run_gpurec("verify", rec)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert "file cut short at the record at byte 0 (it ends at byte 10)" in res.stdout


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04garbage", "half"])
def test_a_torn_or_empty_cache_is_rebuilt(shuffled, content) -> None:
    cache = shuffled.with_name("shuffled.rec.gpurec-index.npz")
    open_shard(shuffled)
    if content == "half":
        content = cache.read_bytes()[: cache.stat().st_size // 2]
    cache.write_bytes(content)
    shard = open_shard(shuffled)
    assert shard.index == "scan" and len(shard) == 12 and shard.index_file == cache


def test_threads_opening_one_index_less_file_all_cache_it_beside(shuffled, monkeypatch, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv("GPUREC_CACHE", str(tmp_path / "central"))
    with ThreadPoolExecutor(4) as pool:
        shards = list(pool.map(lambda _: open_shard(shuffled), range(8)))
    assert {s.index_file for s in shards} == {shuffled.with_name("shuffled.rec.gpurec-index.npz")}
    assert all(len(s) == 12 for s in shards)
    assert not (tmp_path / "central").exists() and not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_insightface_file_cut_before_its_header_is_still_read_as_one(tmp_path, backend) -> None:
    rec = insightface_file(tmp_path, multi_label=True, header_first=False)
    offsets = read_idx(rec.with_suffix(".idx"))[1]
    rec.write_bytes(rec.read_bytes()[: int(offsets[-1]) + 12])  # into the header (last)
    pipe = Pipeline(rec, 6, (3, 16, 16), device="cpu", backend=backend, train=False,
                    on_error="skip")  # fmt: skip
    (shard,) = pipe.dataset.shards
    assert (shard.layout, shard.other, pipe.skipped) == ("insightface", 3, 1)
    (batch,) = list(pipe)
    assert pipe.label_width == 1 and batch.label.tolist() == [0, 0, 1, 1, 2, 2]


def test_header_only_records_inside_the_declared_key_range_are_not_samples(tmp_path) -> None:
    rec = tmp_path / "f.rec"
    with RecordWriter(rec, rec.with_suffix(".idx")) as writer:
        writer.write(pack_record(IRHeader(2, [8.0, 10.0], 0, 1), b""), key=0)  # keys 1..7
        jpeg = cv2.imencode(".jpg", np.full((8, 8, 3), 100, np.uint8))[1].tobytes()
        for key in range(1, 7):
            writer.write(pack_record(IRHeader(0, float(key), key, 0), jpeg), key=key)
        for key in (7, 8, 9):  # identities: key 7 falls inside the declared range
            writer.write(pack_record(IRHeader(2, [1.0, 3.0], key, 0), b""), key=key)
    (shard,) = Dataset([rec]).shards
    assert shard.keys.tolist() == [1, 2, 3, 4, 5, 6] and shard.other == 4


def test_an_idx_cut_short_is_noted_by_info(face, tmp_path) -> None:
    (tmp_path / "train.rec").symlink_to(face / "train.rec")
    lines = (face / "train.idx").read_text().splitlines()
    (tmp_path / "train.idx").write_text("\n".join(lines[:6]) + "\n")
    (shard,) = Dataset([tmp_path / "train.rec"]).shards
    assert len(shard) == 6 and shard.unindexed == (face / "train.rec").stat().st_size - 21332
    res = run_gpurec("info", tmp_path / "train.rec")
    assert "21,616 bytes after the last indexed record" in res.stdout, res.stdout


def test_negative_offsets_are_errors_not_records(tmp_path) -> None:
    rec = insightface_file(tmp_path)
    with pytest.raises(RecordIOError, match="at byte -40: negative offset"):
        RecordReader(rec, idx_path=None).read_at(-40)


def test_a_file_of_header_records_only_says_so(tmp_path) -> None:
    rec = tmp_path / "h.rec"
    with RecordWriter(rec, rec.with_suffix(".idx")) as writer:
        for key in (1, 2):
            writer.write(pack_record(IRHeader(2, [1.0, 3.0], key, 0), b""), key=key)
    with pytest.raises(ValueError, match=r"no records \(2 header-only records, no image\)"):
        Dataset([rec])
