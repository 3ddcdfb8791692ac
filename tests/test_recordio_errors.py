"""Every malformed input gives a RecordIOError naming the file and the byte or line."""

from __future__ import annotations

import pickle
import threading
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import pytest

from gpurec.recordio import (
    MAGIC_BYTES,
    MAX_RECORD_SIZE,
    IRHeader,
    ListEntry,
    RecordIOError,
    RecordReader,
    RecordWriter,
    pack,
    read_idx,
    read_lst,
    unpack,
    write_lst,
)

RECORDS = [b"first", b"seco" + MAGIC_BYTES + b"x" * 6, b"", b"fourth!!"]  # record 1 is split


@pytest.fixture
def rec(tmp_path: Path) -> Path:
    path = tmp_path / "data.rec"
    with RecordWriter(path, tmp_path / "data.idx") as writer:
        for i, payload in enumerate(RECORDS):
            writer.write(payload, key=100 + i)
    return path


def test_reader_by_position_key_and_iteration(rec: Path) -> None:
    with RecordReader(rec) as reader:
        assert len(reader) == 4
        assert reader.keys.tolist() == [100, 101, 102, 103]
        assert reader[1] == RECORDS[1] and reader[-1] == RECORDS[3]
        assert reader.read_key(102) == b""
        assert list(reader) == RECORDS
        with pytest.raises(IndexError, match="out of range"):
            reader[4]
        with pytest.raises(KeyError, match="no record with key 7"):
            reader.read_key(7)


def test_bad_magic_names_file_and_offset(rec: Path) -> None:
    raw = bytearray(rec.read_bytes())
    second = RecordReader(rec).offsets[1]
    raw[second] ^= 0xFF
    rec.write_bytes(bytes(raw))
    with RecordReader(rec, idx_path=None) as reader, pytest.raises(RecordIOError) as err:
        list(reader.scan())
    assert err.value.offset == second and str(rec) in str(err.value)
    assert f"at byte {second}: bad magic" in str(err.value)


def test_truncated_record(rec: Path) -> None:
    raw = rec.read_bytes()
    rec.write_bytes(raw[:-3])
    last = int(read_idx(rec.with_suffix(".idx"))[1][-1])
    with pytest.raises(RecordIOError, match=rf"at byte {last}: truncated record"):
        RecordReader(rec, idx_path=None).offsets  # noqa: B018


def test_idx_offset_past_end_and_off_record_start(rec: Path, tmp_path: Path) -> None:
    idx = tmp_path / "bad.idx"
    idx.write_text("0\t0\n1\t4096\n")
    with pytest.raises(RecordIOError, match=r"bad\.idx: at byte 4096: .idx line 2 .*past the end"):
        RecordReader(rec, idx_path=idx)
    idx.write_text("0\t0\n1\t8\n")
    with pytest.raises(RecordIOError, match=r"line 2 \(offset 8\) points not at a record start"):
        RecordReader(rec, idx_path=idx)
    # an offset that lands on a continuation part of a split record is not a start either
    cont = RecordReader(rec).offsets[1] + 8 + 4  # the second frame (cflag 3) of record 1
    assert rec.read_bytes()[cont : cont + 4] == MAGIC_BYTES
    idx.write_text(f"0\t{cont}\n")
    with pytest.raises(RecordIOError, match="not at a record start"):
        RecordReader(rec, idx_path=idx)


def test_malformed_idx_names_the_line(tmp_path: Path, rec: Path) -> None:
    idx = tmp_path / "m.idx"
    idx.write_text("0\t0\n1\tzero\n")
    with pytest.raises(RecordIOError, match=r"m\.idx:2: offset b'zero' is not an integer"):
        read_idx(idx)
    idx.write_text("0\t0\n1 2\n")
    with pytest.raises(RecordIOError, match=r"m\.idx:2: expected 'key<TAB>offset'"):
        read_idx(idx)
    idx.write_text("1\t2\t3\n4\n")  # the counts of tabs and fields look right, the lines do not
    with pytest.raises(RecordIOError, match=r"m\.idx:1: expected 'key<TAB>offset'"):
        read_idx(idx)


def test_too_large_record_is_refused_before_writing(tmp_path: Path) -> None:
    path = tmp_path / "big.rec"
    with RecordWriter(path) as writer:
        writer.write(b"ok")
        with pytest.raises(RecordIOError, match=r"at byte 12: a record of 536870912 bytes"):
            writer.write(memoryview(bytes(MAX_RECORD_SIZE + 1)))
        assert writer.tell() == 12
    assert list(RecordReader(path, idx_path=None)) == [b"ok"]


def test_writer_leaves_nothing_under_final_names_on_error(tmp_path: Path) -> None:
    path = tmp_path / "x.rec"
    with pytest.raises(RuntimeError), RecordWriter(path, tmp_path / "x.idx") as writer:
        writer.write(b"abc")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_unpack_errors() -> None:
    with pytest.raises(RecordIOError, match="shorter than the 24-byte IRHeader"):
        unpack(b"short")
    multi = pack(IRHeader(0, [1.0, 2.0, 3.0], 5, 0), b"")
    with pytest.raises(RecordIOError, match="announces 3 labels"):
        unpack(multi[:-4])


def test_reader_unpack_adds_file_and_offset(tmp_path: Path) -> None:
    path = tmp_path / "h.rec"
    with RecordWriter(path) as writer:
        writer.write(pack(IRHeader(0, 1.0, 0, 0), b"img"))
        writer.write(b"tiny")
    with RecordReader(path, idx_path=None) as reader:
        assert reader.unpack(0)[1] == b"img"
        with pytest.raises(RecordIOError, match=r"h\.rec: at byte 36: record of 4 bytes"):
            reader.unpack(1)


def test_empty_rec_has_no_records(tmp_path: Path) -> None:
    path = tmp_path / "empty.rec"
    path.write_bytes(b"")
    with RecordReader(path, idx_path=None) as reader:
        assert len(reader) == 0 and list(reader) == []


def test_lst_reading_accepts_mxnet_variants(tmp_path: Path) -> None:
    lst = tmp_path / "a.lst"
    lst.write_bytes(b"0\t3\ta b.jpg\r\n\n1\t3.000000\t-1.5\tdir/c.png")
    assert list(read_lst(lst)) == [
        ListEntry(0, (3.0,), "a b.jpg"),
        ListEntry(1, (3.0, -1.5), "dir/c.png"),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0\t1.0\ta.jpg\n1\tb.jpg\n", r"a\.lst:2: expected 'index<TAB>label"),
        ("0\t1.0\ta.jpg\nx\t1\tb.jpg\n", r"a\.lst:2: index 'x' is not an integer"),
        ("0\t1.0\ta.jpg\n\n2\tcat\tb.jpg\n", r"a\.lst:3: non-numeric label"),
        ("0\t1.0\t\n", r"a\.lst:1: expected .* got 2 field"),  # stripped, as MXNet does
    ],
)
def test_malformed_lst_names_the_line(tmp_path: Path, text: str, message: str) -> None:
    lst = tmp_path / "a.lst"
    lst.write_text(text)
    with pytest.raises(RecordIOError, match=message):
        list(read_lst(lst))


def test_lst_fields_are_stripped_and_bad_lines_can_be_skipped(tmp_path: Path) -> None:
    lst = tmp_path / "a.lst"
    lst.write_text(" 0\t 1.0 \ta b.jpg \t\n1\tb.jpg\n2\tx\tc.jpg\n3\t2\td.jpg\n")
    skipped: list[tuple[str, str]] = []
    entries = list(read_lst(lst, skipped))
    assert entries == [ListEntry(0, (1.0,), "a b.jpg"), ListEntry(3, (2.0,), "d.jpg")]
    assert [line for line, _ in skipped] == ["a.lst line 2", "a.lst line 3"]
    assert "got 2 field(s)" in skipped[0][1] and "non-numeric label" in skipped[1][1]


def test_lst_refuses_tab_or_newline_in_path(tmp_path: Path) -> None:
    out = tmp_path / "o.lst"
    with pytest.raises(RecordIOError, match="tab or newline"):
        write_lst(out, [ListEntry(0, (1.0,), "ok.jpg"), ListEntry(1, (1.0,), "bad\tname.jpg")])
    with pytest.raises(RecordIOError, match="white space"):
        write_lst(out, [ListEntry(0, (1.0,), "trailing.jpg ")])
    assert not out.exists() and not list(tmp_path.iterdir())


def _hashes(reader: RecordReader) -> list[bytes]:
    return [reader[i] for i in range(len(reader))]


def test_one_reader_serves_many_threads(rec: Path) -> None:
    reader = RecordReader(rec)
    barrier = threading.Barrier(8)

    def work(_: int) -> list[bytes]:
        barrier.wait()
        return [reader[i % 4] for i in range(400)]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(work, range(8)))
    assert all(r == [RECORDS[i % 4] for i in range(400)] for r in results)


def test_reader_pickles_into_other_processes(rec: Path) -> None:
    reader = RecordReader(rec)
    assert pickle.loads(pickle.dumps(reader))[1] == RECORDS[1]
    with ProcessPoolExecutor(4, mp_context=get_context("spawn")) as pool:
        results = list(pool.map(_hashes, [reader] * 8))
    assert results == [RECORDS] * 8
