"""Compatibility with files written by MXNet 1.9.1 itself (../shared/golden)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from gpurec.recordio import (
    IRHeader,
    RecordReader,
    RecordWriter,
    pack,
    read_idx,
    read_lst,
    rebuild_idx,
    unpack,
    write_lst,
)


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.mark.parametrize("name", ["special", "passthrough", "resized"])
def test_every_golden_record_reads_back_exactly(golden: Path, expected: dict, name: str) -> None:
    want = expected[name]
    with RecordReader(golden / f"{name}.rec") as reader:
        assert len(reader) == len(want)
        seen = set()
        for i in range(len(reader)):
            header, payload = reader.unpack(i)
            exp = want[str(header.id)]
            seen.add(header.id)
            assert header.id == exp["id"]
            assert _sha(payload) == exp["payload_sha256"]
            if "payload_len" in exp:
                assert len(payload) == exp["payload_len"]
            if "id2" in exp:
                assert header.id2 == exp["id2"]
            if isinstance(exp["label"], list):
                assert header.flag == len(exp["label"])
                np.testing.assert_array_equal(header.label, np.float32(exp["label"]))
            else:
                assert header.flag == 0
                assert header.label == exp["label"]
        assert seen == {int(k) for k in want}


@pytest.mark.parametrize("name", ["special", "passthrough", "resized"])
def test_idx_keys_match_ids_and_scan_matches_idx(golden: Path, name: str) -> None:
    keys, offsets = read_idx(golden / f"{name}.idx")
    with RecordReader(golden / f"{name}.rec") as indexed:
        for key in keys.tolist():
            assert unpack(indexed.read_key(key))[0].id == key
    with RecordReader(golden / f"{name}.rec", idx_path=None) as scanned:
        assert scanned.offsets.tolist() == offsets.tolist()
        assert list(scanned) == list(RecordReader(golden / f"{name}.rec"))


def test_special_golden_exercises_split_records(golden: Path) -> None:
    """special.rec must hold continuation frames, else the split tests prove nothing."""
    raw = (golden / "special.rec").read_bytes()
    words = np.frombuffer(raw[: len(raw) // 4 * 4], dtype="<u4")
    cflags = {
        int(w >> 29) for w, prev in zip(words[1:], words[:-1], strict=True) if prev == 0xCED7230A
    }
    assert {1, 2, 3} <= cflags


def test_passthrough_pack_is_byte_identical_to_mxnet(golden: Path, tmp_path: Path) -> None:
    """im2rec --pass-through: IRHeader(0, label, index, 0) + the file's bytes, in list order."""
    rec, idx = tmp_path / "passthrough.rec", tmp_path / "passthrough.idx"
    with RecordWriter(rec, idx) as writer:
        for entry in read_lst(golden / "passthrough.lst"):
            image = (golden / "images" / entry.path).read_bytes()
            header = IRHeader(0, entry.labels[0], entry.index, 0)
            writer.write(pack(header, image), key=entry.index)
    assert rec.read_bytes() == (golden / "passthrough.rec").read_bytes()
    assert idx.read_bytes() == (golden / "passthrough.idx").read_bytes()


def test_rewriting_special_records_reproduces_the_file(golden: Path, tmp_path: Path) -> None:
    """Our framing of payloads with aligned magic words is dmlc-core's, byte for byte."""
    rec, idx = tmp_path / "special.rec", tmp_path / "special.idx"
    with RecordReader(golden / "special.rec") as reader, RecordWriter(rec, idx) as writer:
        for i in range(len(reader)):
            header, payload = reader.unpack(i)
            assert pack(header, payload) == reader[i]  # multi-label header repacks exactly
            writer.write(reader[i], key=int(reader.keys[i]))
    assert rec.read_bytes() == (golden / "special.rec").read_bytes()
    assert idx.read_bytes() == (golden / "special.idx").read_bytes()


@pytest.mark.parametrize("name", ["special", "passthrough", "resized"])
def test_rebuilt_idx_equals_mxnet_idx(golden: Path, tmp_path: Path, name: str) -> None:
    rec = tmp_path / f"{name}.rec"
    shutil.copyfile(golden / f"{name}.rec", rec)
    rebuilt = rebuild_idx(rec)
    assert rebuilt == tmp_path / f"{name}.idx"
    assert rebuilt.read_bytes() == (golden / f"{name}.idx").read_bytes()


def test_lst_round_trips_to_mxnet_bytes(golden: Path, tmp_path: Path) -> None:
    entries = list(read_lst(golden / "passthrough.lst"))
    assert entries[11].path == "fox/fox_3.png" and entries[11].labels == (2.0,)
    out = tmp_path / "out.lst"
    assert write_lst(out, entries) == 12
    assert out.read_bytes() == (golden / "passthrough.lst").read_bytes()


@pytest.mark.parametrize("name", ["special", "passthrough"])
def test_views_read_the_same_records_without_copying(golden: Path, name: str) -> None:
    """view_at/unpack_view give what read_at/unpack give; single-frame records are views
    of the map itself, and closing the reader leaves views in use valid."""
    from gpurec.recordio import unpack_view
    from gpurec.transcode import sniff

    reader = RecordReader(golden / f"{name}.rec")
    views = []
    for offset in reader.offsets.tolist():
        record, _ = reader.read_at(offset)
        view = reader.view_at(offset)
        assert bytes(view) == record
        header, payload = unpack_view(view)
        want_header, want_payload = unpack(record)
        assert bytes(payload) == want_payload and header.id == want_header.id
        np.testing.assert_array_equal(header.label, want_header.label)
        if name == "passthrough":  # images: sniffed alike from a view and from bytes
            assert sniff(payload) == sniff(want_payload)
        views.append((payload, want_payload))
    assert any(isinstance(p, memoryview) and p.readonly for p, _ in views)
    reader.close()  # the map stays until the last view goes
    assert all(bytes(p) == want for p, want in views)
