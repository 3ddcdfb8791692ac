"""Property tests of the record framing: round trips, dmlc-core's split rule, and garbage."""

from __future__ import annotations

import contextlib
import struct
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpurec.recordio import (
    MAGIC,
    MAGIC_BYTES,
    IRHeader,
    RecordIOError,
    RecordReader,
    RecordWriter,
    pack,
    unpack,
)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def dmlc_write_record(buf: bytes) -> bytes:
    """A line-by-line port of dmlc-core's RecordIOWriter::WriteRecord, the reference."""
    out = bytearray()
    size = len(buf)
    lower_align = (size >> 2) << 2
    upper_align = ((size + 3) >> 2) << 2
    dptr = 0
    for i in range(0, lower_align, 4):
        if buf[i : i + 4] == MAGIC_BYTES:
            out += struct.pack("<II", MAGIC, ((1 if dptr == 0 else 2) << 29) | (i - dptr))
            out += buf[dptr:i]
            dptr = i + 4
    out += struct.pack("<II", MAGIC, ((3 if dptr != 0 else 0) << 29) | (size - dptr))
    out += buf[dptr:]
    out += b"\0" * (upper_align - size)
    return bytes(out)


# Payloads built from chunks so that magic words land at aligned and unaligned offsets.
chunk = st.one_of(
    st.just(MAGIC_BYTES),
    st.just(MAGIC_BYTES * 2),
    st.binary(min_size=0, max_size=9),
    st.sampled_from([b"\x0a", b"\x0a\x23", b"\x23\xd7\xce", b"\xce\x0a\x23\xd7"]),
)
payloads = st.lists(chunk, max_size=12).map(b"".join)


def _write(path: Path, records: list[bytes]) -> None:
    with RecordWriter(path, path.with_suffix(".idx")) as writer:
        for i, rec in enumerate(records):
            writer.write(rec, key=i)


@FAST
@given(st.lists(payloads, max_size=8))
def test_payloads_round_trip_and_frame_like_dmlc(records: list[bytes]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rec = Path(tmp) / "a.rec"
        _write(rec, records)
        assert rec.read_bytes() == b"".join(dmlc_write_record(r) for r in records)
        with RecordReader(rec) as indexed:
            assert [indexed[i] for i in range(len(indexed))] == records
        with RecordReader(rec, idx_path=None) as scanned:
            assert list(scanned) == records
            assert len(scanned) == len(records)


@FAST
@given(
    st.one_of(
        st.floats(allow_nan=False, width=32),
        st.lists(st.floats(allow_nan=False, width=32), min_size=1, max_size=6),
    ),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**64 - 1),
    payloads,
)
def test_irheader_pack_unpack_round_trip(label, rid: int, rid2: int, payload: bytes) -> None:
    header, body = unpack(pack(IRHeader(0, label, rid, rid2), payload))
    assert body == payload and header.id == rid and header.id2 == rid2
    if isinstance(label, list):
        assert header.flag == len(label)
        np.testing.assert_array_equal(header.label, np.float32(label))
    else:
        assert header.flag == 0 and header.label == np.float32(label)


@FAST
@given(
    st.lists(
        st.tuples(
            st.one_of(st.floats(allow_nan=False, width=32), st.lists(st.floats(width=32))),
            payloads,
        ),
        max_size=6,
    ),
    st.sampled_from([bytes, bytearray, memoryview, "readonly-view"]),
)
def test_writing_header_and_payload_apart_gives_the_packed_bytes(items, kind) -> None:
    """``write(payload, header=h)`` frames h + payload without joining them: the file
    must equal writing ``pack(h, payload)``, including dmlc's cuts at magic words that
    fall in the header, the labels or the payload; a writable buffer that the caller
    changes after ``write`` must not change what is written."""
    with tempfile.TemporaryDirectory() as tmp:
        apart, joined = Path(tmp) / "apart.rec", Path(tmp) / "joined.rec"
        with RecordWriter(apart) as writer:
            for i, (label, payload) in enumerate(items):
                header = IRHeader(0, label, MAGIC if i % 2 else i, MAGIC << 32 if i % 3 else i)
                buf = bytearray(payload)
                given_as = {
                    bytes: bytes(buf),
                    bytearray: buf,
                    memoryview: memoryview(buf),
                    "readonly-view": memoryview(bytes(buf)).toreadonly(),
                }[kind]
                writer.write(given_as, header=header)
                buf[:] = b"\xff" * len(buf)  # the caller reuses its buffer
        _write(
            joined,
            [pack(IRHeader(0, lab, MAGIC if i % 2 else i, MAGIC << 32 if i % 3 else i), p)
             for i, (lab, p) in enumerate(items)],
        )  # fmt: skip
        assert apart.read_bytes() == joined.read_bytes()


def test_records_larger_than_the_write_batch_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    records = [rng.bytes(n) for n in (3 << 20, 5, 700_001, 0, 2 << 20)]
    records[1] = MAGIC_BYTES + b"x"  # a split record between two large ones
    _write(tmp_path / "big.rec", records)
    assert (tmp_path / "big.rec").read_bytes() == b"".join(dmlc_write_record(r) for r in records)
    with RecordReader(tmp_path / "big.rec") as reader:
        assert [reader[i] for i in range(len(reader))] == records


def test_a_record_cut_at_thousands_of_magic_words_is_written_whole(tmp_path: Path) -> None:
    """Each magic word adds two parts to a frame; writev takes at most IOV_MAX (1024)."""
    records = [MAGIC_BYTES * 600, b"x" * 7, b"ab" + MAGIC_BYTES * 3000 + b"c", MAGIC_BYTES]
    _write(tmp_path / "m.rec", records)
    assert (tmp_path / "m.rec").read_bytes() == b"".join(dmlc_write_record(r) for r in records)
    with RecordReader(tmp_path / "m.rec") as reader:
        assert [reader[i] for i in range(len(reader))] == records


class _OftenSynced(RecordWriter):
    _SYNC_BYTES = 1 << 12  # a background sync every 4 KiB instead of every 32 MiB


def test_background_syncs_leave_the_bytes_alone_and_abort_cleanly(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    records = [rng.bytes(int(n)) for n in rng.integers(0, 9000, 400)]
    with _OftenSynced(tmp_path / "s.rec", tmp_path / "s.idx") as writer:
        for i, rec in enumerate(records):
            writer.write(rec, key=i)
            if i % 50 == 0:
                writer.flush()  # each flush past 4 KiB may start a sync
    assert (tmp_path / "s.rec").read_bytes() == b"".join(dmlc_write_record(r) for r in records)
    writer = _OftenSynced(tmp_path / "t.rec", tmp_path / "t.idx")
    for rec in records[:200]:
        writer.write(rec)
        writer.flush()
    writer.abort()  # with a sync possibly still running
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.idx", "s.rec"]


def _read_everything(path: Path) -> list[bytes]:
    with RecordReader(path, idx_path=None) as reader:
        return [record for _, record in reader.scan()]


@FAST
@given(st.binary(max_size=200))
def test_garbage_raises_only_recordio_error(garbage: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rec = Path(tmp) / "g.rec"
        rec.write_bytes(garbage)
        try:
            _read_everything(rec)
        except RecordIOError as exc:
            assert str(rec) in str(exc) and "at byte" in str(exc)


@FAST
@given(st.lists(payloads, min_size=1, max_size=5), st.data())
def test_truncation_and_byte_flips_never_hang_or_lie(records: list[bytes], data) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rec = Path(tmp) / "t.rec"
        _write(rec, records)
        raw = rec.read_bytes()
        cut = data.draw(st.integers(0, len(raw) - 1), label="cut")
        rec.write_bytes(raw[:cut])
        boundaries = np.cumsum([len(dmlc_write_record(r)) for r in records]).tolist()
        try:
            got = _read_everything(rec)
        except RecordIOError:
            assert cut not in [0, *boundaries]
        else:  # only a cut exactly between records reads cleanly, and then as a prefix
            assert cut in [0, *boundaries] and got == records[: len(got)]
        # a flipped byte: the reader either raises the format's error or returns records
        pos = data.draw(st.integers(0, len(raw) - 1), label="flip")
        flipped = bytearray(raw)
        flipped[pos] ^= data.draw(st.integers(1, 255), label="xor")
        rec.write_bytes(bytes(flipped))
        with contextlib.suppress(RecordIOError), RecordReader(rec, idx_path=None) as reader:
            for i in range(len(reader)):
                unpack(reader[i])
