"""``gpurec.mxnet.recordio`` against MXNet 1.9.1: its unit tests, its files, its edge cases.

Reference values come from MXNet itself: the golden files in ``../shared/golden`` and
``tests/data/mxnet_recordio`` (written by ``benchmarks/crosscheck_mxnet_recordio.py
--write-reference`` under MXNet 1.9.1; that script also cross-checks every behaviour
below against a live MXNet).
"""

from __future__ import annotations

import builtins
import hashlib
import json
import math
import multiprocessing as mp
import os
import pickle
import struct
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

import gpurec.mxnet as mx
from gpurec import recordio as fmt

REFERENCE = Path(__file__).parent / "data" / "mxnet_recordio"
IR = mx.recordio.IRHeader
MAGIC = struct.pack("<I", fmt.MAGIC)


@pytest.fixture(scope="module")
def ref() -> dict:
    return json.loads((REFERENCE / "reference.json").read_text())


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_indexed(folder: Path, records: dict, name: str = "a", **kwargs) -> tuple[str, str]:
    idx, rec = str(folder / f"{name}.idx"), str(folder / f"{name}.rec")
    w = mx.recordio.MXIndexedRecordIO(idx, rec, "w", **kwargs)
    for key, payload in records.items():
        w.write_idx(key, payload)
    w.close()
    return idx, rec


def read_all(r: mx.recordio.MXRecordIO) -> list[bytes]:
    out = []
    while (item := r.read()) is not None:
        out.append(item)
    return out


# -------------------------------------------------- MXNet's tests/python/unittest/test_recordio.py


def test_mxnet_unittest_recordio(tmp_path, ref) -> None:
    n = 255
    writer = mx.recordio.MXRecordIO(str(tmp_path / "r.rec"), "w")
    for i in range(n):
        writer.write(bytes(str(chr(i)), "utf-8"))
    del writer
    reader = mx.recordio.MXRecordIO(str(tmp_path / "r.rec"), "r")
    for i in range(n):
        assert reader.read() == bytes(str(chr(i)), "utf-8")
    assert reader.read() is None
    got = sha((tmp_path / "r.rec").read_bytes())[:16]
    assert got == ref["unittest_files_sha16"]["r.rec"]


def test_mxnet_unittest_indexed_recordio(tmp_path, ref) -> None:
    n = 255
    writer = mx.recordio.MXIndexedRecordIO(str(tmp_path / "i.idx"), str(tmp_path / "i.rec"), "w")
    for i in range(n):
        writer.write_idx(i, bytes(str(chr(i)), "utf-8"))
    del writer
    reader = mx.recordio.MXIndexedRecordIO(str(tmp_path / "i.idx"), str(tmp_path / "i.rec"), "r")
    keys = list(reader.keys)
    assert keys == list(range(n))
    for i in np.random.default_rng(0).permutation(keys):
        assert reader.read_idx(i) == bytes(str(chr(i)), "utf-8")
    for name in ("i.rec", "i.idx"):
        assert sha((tmp_path / name).read_bytes())[:16] == ref["unittest_files_sha16"][name]


def test_mxnet_unittest_pack_label() -> None:
    n = 255
    for i in range(1, n):
        for j in range(n):
            content = bytes(k % 256 for k in range(j))
            label = np.random.uniform(size=i).astype(np.float32)
            s = mx.recordio.pack((0, label, 0, 0), content)
            rheader, rcontent = mx.recordio.unpack(s)
            assert (label == rheader.label).all()
            assert content == rcontent
            assert rheader.flag == i and len(s) == 24 + 4 * i + j


# ------------------------------------------------------------------- files MXNet wrote


def test_reads_the_golden_special_file_by_key_and_in_order(golden: Path, expected) -> None:
    special = expected["special"]
    r = mx.recordio.MXIndexedRecordIO(str(golden / "special.idx"), str(golden / "special.rec"), "r")
    assert r.keys == [int(k) for k in special] and r.idx[5] == 1272
    for key, want in special.items():
        header, payload = mx.recordio.unpack(r.read_idx(int(key)))
        assert (header.id, header.id2) == (want["id"], want["id2"])
        assert np.asarray(header.label).tolist() == want["label"]
        assert len(payload) == want["payload_len"] and sha(payload) == want["payload_sha256"]
    seq = mx.recordio.MXRecordIO(str(golden / "special.rec"), "r")
    records = read_all(seq)
    assert [sha(mx.recordio.unpack(s)[1]) for s in records] == [
        v["payload_sha256"] for v in special.values()
    ]
    assert seq.read() is None


def test_rewriting_golden_files_reproduces_mxnets_bytes(golden: Path, tmp_path: Path) -> None:
    """Every record of an MXNet-written file, written again in file order with its key,
    gives MXNet's .rec and .idx byte for byte (records with magic words included)."""
    files = [(golden, "special"), (golden, "passthrough"), (golden / "insightface", "train")]
    for folder, name in files:
        src = mx.recordio.MXIndexedRecordIO(folder / f"{name}.idx", folder / f"{name}.rec", "r")
        records = {key: src.read_idx(key) for key in src.keys}
        idx, rec = write_indexed(tmp_path, records, name)
        assert Path(rec).read_bytes() == (folder / f"{name}.rec").read_bytes(), name
        assert Path(idx).read_bytes() == (folder / f"{name}.idx").read_bytes(), name


def test_golden_insightface_file(golden: Path) -> None:
    face = golden / "insightface"
    want = json.loads((face / "expected.json").read_text())
    r = mx.recordio.MXIndexedRecordIO(str(face / "train.idx"), str(face / "train.rec"), "r")
    assert r.keys == [*range(1, 16), 0]
    header, rest = mx.recordio.unpack(r.read_idx(0))
    assert (header.flag, header.id, header.id2) == (2, 0, 1) and rest == b""
    assert header.label.tolist() == want["header0"]["label"]
    for key, (lo, hi) in want["identities"].items():
        header, rest = mx.recordio.unpack(r.read_idx(int(key)))
        assert header.label.tolist() == [lo, hi] and rest == b""
    for key, image in want["images"].items():
        header, payload = mx.recordio.unpack(r.read_idx(int(key)))
        assert (header.flag, header.label, header.id) == (0, image["label"], image["id"])
        assert sha(payload) == image["payload_sha256"]


def test_golden_shuffled_file_without_idx(golden: Path, tmp_path: Path) -> None:
    face = golden / "insightface"
    want = json.loads((face / "expected.json").read_text())
    records = read_all(mx.recordio.MXRecordIO(str(face / "shuffled.rec"), "r"))
    order = want["shuffled_order"]
    assert len(records) == len(order)
    for n, (record, key) in enumerate(zip(records, order, strict=True)):
        header, payload = mx.recordio.unpack(record)
        image = want["images"][str(key)]
        assert header == (0, image["label"], n, key)
        assert sha(payload) == image["payload_sha256"]
    w = mx.recordio.MXRecordIO(str(tmp_path / "s.rec"), "w")
    for record in records:
        w.write(record)
    w.close()
    assert (tmp_path / "s.rec").read_bytes() == (face / "shuffled.rec").read_bytes()


def test_mxnet_written_payload_files(tmp_path: Path, ref) -> None:
    """MXNet's frames for empty, odd-length and magic-holding payloads, read and rewritten."""
    payloads = [bytes.fromhex(h) for h in ref["payloads"]["hex"]]
    keys = ref["payloads"]["keys"]
    r = mx.recordio.MXIndexedRecordIO(
        str(REFERENCE / "payloads.idx"), str(REFERENCE / "payloads.rec"), "r"
    )
    assert r.keys == keys
    assert [r.read_idx(k) for k in range(len(payloads))] == [*payloads[:3], b"again", *payloads[4:]]
    assert read_all(mx.recordio.MXRecordIO(str(REFERENCE / "plain.rec"), "r")) == payloads

    w = mx.recordio.MXIndexedRecordIO(str(tmp_path / "p.idx"), str(tmp_path / "p.rec"), "w")
    tells = [w.tell()]
    for key, payload in zip(keys, [*payloads, b"again"], strict=True):
        w.write_idx(key, payload)
        tells.append(w.tell())
    w.close()
    assert tells == ref["payloads"]["tells"]
    for name in ("p.rec", "p.idx"):
        target = REFERENCE / name.replace("p.", "payloads.")
        assert (tmp_path / name).read_bytes() == target.read_bytes()
    plain = mx.recordio.MXRecordIO(tmp_path / "plain.rec", "w")
    for payload in payloads:
        plain.write(payload)
    plain.close()
    assert (tmp_path / "plain.rec").read_bytes() == (REFERENCE / "plain.rec").read_bytes()


# ------------------------------------------------------------------ opening and modes


@pytest.mark.parametrize("flag", ["x", "a", "R", "rw", "rb", ""])
def test_a_flag_other_than_r_or_w_is_a_value_error(tmp_path: Path, flag: str) -> None:
    with pytest.raises(ValueError, match="Invalid flag"):
        mx.recordio.MXRecordIO(str(tmp_path / "a.rec"), flag)
    with pytest.raises(ValueError, match="Invalid flag"):
        mx.recordio.MXIndexedRecordIO(str(tmp_path / "a.idx"), str(tmp_path / "a.rec"), flag)
    assert list(tmp_path.iterdir()) == []  # nothing created


def test_w_truncates_at_once_and_files_fill_as_written(tmp_path: Path) -> None:
    (tmp_path / "a.rec").write_bytes(b"old" * 100)
    (tmp_path / "a.idx").write_text("old\n")
    w = mx.recordio.MXIndexedRecordIO(str(tmp_path / "a.idx"), str(tmp_path / "a.rec"), "w")
    assert (tmp_path / "a.rec").stat().st_size == 0 and (tmp_path / "a.idx").read_text() == ""
    w.write_idx(4, b"0123456789")
    w.write_idx(2, b"x")
    # deliberate: on disk at once (MXNet buffers until close), .idx consistent with .rec
    assert (tmp_path / "a.rec").stat().st_size == w.tell() == 32
    assert (tmp_path / "a.idx").read_text() == "4\t0\n2\t20\n"
    w.close()
    assert (tmp_path / "a.rec").stat().st_size == 32


def test_write_takes_bytes_only(tmp_path: Path) -> None:
    w = mx.recordio.MXRecordIO(str(tmp_path / "a.rec"), "w")

    class Sub(bytes):
        pass

    for bad in ["abc", bytearray(b"abc"), memoryview(b"abc"), 5, None, [1], np.zeros(3, np.uint8)]:
        with pytest.raises(TypeError, match="bytes"):
            w.write(bad)
    assert w.tell() == 0
    w.write(np.bytes_(b"npb"))
    w.write(Sub(b"sub"))
    w.close()
    assert read_all(mx.recordio.MXRecordIO(str(tmp_path / "a.rec"), "r")) == [b"npb", b"sub"]


def test_read_empty_records_end_and_empty_file(tmp_path: Path) -> None:
    w = mx.recordio.MXRecordIO(str(tmp_path / "a.rec"), "w")
    for payload in (b"", b"a", b""):
        w.write(payload)
    w.close()
    r = mx.recordio.MXRecordIO(str(tmp_path / "a.rec"), "r")
    got = [r.read() for _ in range(5)]
    assert got == [b"", b"a", b"", None, None]
    assert all(type(g) is bytes for g in got[:3])
    (tmp_path / "e.rec").write_bytes(b"")
    assert mx.recordio.MXRecordIO(str(tmp_path / "e.rec"), "r").read() is None


def test_reset(tmp_path: Path) -> None:
    idx, rec = write_indexed(tmp_path, {1: b"one", 2: b"two"})
    r = mx.recordio.MXIndexedRecordIO(idx, rec, "r")
    assert r.read_idx(2) == b"two" and r.read() is None
    r.reset()
    assert r.read() == b"one" and r.keys == [1, 2]

    w = mx.recordio.MXIndexedRecordIO(idx, rec, "w")
    w.write_idx(1, b"first")
    w.reset()  # truncates both files, forgets the keys
    assert (w.keys, w.idx, w.tell()) == ([], {}, 0)
    assert Path(rec).stat().st_size == 0 and Path(idx).read_text() == ""
    w.write_idx(2, b"second")
    w.close()
    assert Path(idx).read_text() == "2\t0\n"
    assert read_all(mx.recordio.MXRecordIO(rec, "r")) == [b"second"]


def test_close_twice_and_use_after_close(tmp_path: Path) -> None:
    idx, rec = write_indexed(tmp_path, {0: b"zero"})
    r = mx.recordio.MXIndexedRecordIO(idx, rec, "r")
    assert r.is_open and r.pid == os.getpid()
    r.close()
    r.close()
    assert not r.is_open and r.pid is None
    with pytest.raises(RuntimeError, match="closed"):
        r.read()
    with pytest.raises(RuntimeError, match="closed"):
        r.read_idx(0)
    w = mx.recordio.MXRecordIO(str(tmp_path / "w.rec"), "w")
    w.close()
    w.close()
    with pytest.raises(RuntimeError, match="closed"):
        w.write(b"x")
    with mx.recordio.MXRecordIO(rec, "r") as r2:
        assert r2.read() == b"zero"
    assert not r2.is_open


def test_wrong_mode_is_an_assertion_error(tmp_path: Path) -> None:
    idx, rec = write_indexed(tmp_path, {0: b"zero"})
    r = mx.recordio.MXIndexedRecordIO(idx, rec, "r")
    w = mx.recordio.MXIndexedRecordIO(str(tmp_path / "w.idx"), str(tmp_path / "w.rec"), "w")
    for call in (lambda: r.write(b"x"), lambda: r.write_idx(5, b"x"), r.tell, w.read,
                 lambda: w.read_idx(0), lambda: w.seek(0)):  # fmt: skip
        with pytest.raises(AssertionError):
            call()
    assert Path(idx).read_text() == "0\t0\n"


def test_attributes(tmp_path: Path) -> None:
    w = mx.recordio.MXIndexedRecordIO(tmp_path / "a.idx", tmp_path / "a.rec", "w")
    assert (w.uri, w.idx_path) == (str(tmp_path / "a.rec"), str(tmp_path / "a.idx"))
    assert (w.flag, w.is_open, w.writable, w.key_type) == ("w", True, True, int)
    assert (w.keys, w.idx) == ([], {})
    for key in (3, 1, 2):
        w.write_idx(key, b"rec%d" % key)
    assert (w.keys, w.idx) == ([3, 1, 2], {3: 0, 1: 12, 2: 24})
    w.close()
    r = mx.recordio.MXIndexedRecordIO(tmp_path / "a.idx", tmp_path / "a.rec", "r")
    assert (r.flag, r.writable, r.keys, r.idx) == ("r", False, [3, 1, 2], {3: 0, 1: 12, 2: 24})


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.rec"):
        mx.recordio.MXRecordIO(str(tmp_path / "nope.rec"), "r")
    with pytest.raises(FileNotFoundError, match=r"dir\.rec"):
        mx.recordio.MXRecordIO(str(tmp_path / "no" / "dir.rec"), "w")
    _, rec = write_indexed(tmp_path, {0: b"x"})
    with pytest.raises(FileNotFoundError, match=r"nope\.idx"):
        mx.recordio.MXIndexedRecordIO(str(tmp_path / "nope.idx"), rec, "r")


# ------------------------------------------------------------------------ keys and .idx


def test_duplicate_keys_last_wins_keys_keep_both(tmp_path: Path) -> None:
    idx, rec = write_indexed(tmp_path, {})
    w = mx.recordio.MXIndexedRecordIO(idx, rec, "w")
    for key, payload in [(1, b"a"), (2, b"b"), (1, b"c"), (3, b"d")]:
        w.write_idx(key, payload)
    assert (w.keys, w.idx) == ([1, 2, 1, 3], {1: 24, 2: 12, 3: 36})
    w.close()
    r = mx.recordio.MXIndexedRecordIO(idx, rec, "r")
    assert (r.keys, r.idx, r.read_idx(1)) == ([1, 2, 1, 3], {1: 24, 2: 12, 3: 36}, b"c")


def test_read_idx_is_a_dict_lookup(tmp_path: Path) -> None:
    idx, rec = write_indexed(tmp_path, {k: b"record %d" % k for k in range(5)})
    r = mx.recordio.MXIndexedRecordIO(idx, rec, "r")
    for key in (2, np.int64(2), np.int32(2), np.uint8(2), 2.0, np.float32(2.0)):
        assert r.read_idx(key) == b"record 2"
    assert r.read_idx(True) == b"record 1"
    for missing in ("2", 99, -1, 2.5, None):
        with pytest.raises(KeyError):
            r.read_idx(missing)
    with pytest.raises(TypeError):  # unhashable, as in MXNet
        r.read_idx(np.array(2))


def test_write_idx_converts_keys_with_key_type(tmp_path: Path) -> None:
    w = mx.recordio.MXIndexedRecordIO(str(tmp_path / "a.idx"), str(tmp_path / "a.rec"), "w")
    for key in (2.7, np.int64(7), "5", True, -3):
        w.write_idx(key, b"v")
    with pytest.raises(ValueError):
        w.write_idx("a", b"v")
    with pytest.raises(TypeError):
        w.write_idx(None, b"v")
    with pytest.raises(TypeError):
        w.write_idx(9, "not bytes")  # nothing written: neither record nor line
    assert w.keys == [2, 7, 5, 1, -3] and all(type(k) is int for k in w.keys)
    w.close()
    assert (tmp_path / "a.idx").read_text() == "2\t0\n7\t12\n5\t24\n1\t36\n-3\t48\n"
    assert (tmp_path / "a.rec").stat().st_size == 60


def test_key_type_str(tmp_path: Path) -> None:
    idx, rec = write_indexed(tmp_path, {"a": b"A", 5: b"five", "b c": b"BC"}, key_type=str)
    assert Path(idx).read_text() == "a\t0\n5\t12\nb c\t24\n"
    r = mx.recordio.MXIndexedRecordIO(idx, rec, "r", key_type=str)
    assert r.keys == ["a", "5", "b c"]
    assert (r.read_idx("a"), r.read_idx("5"), r.read_idx("b c")) == (b"A", b"five", b"BC")
    with pytest.raises(KeyError):
        r.read_idx(5)


def test_idx_parsing_matches_mxnet_line_for_line(tmp_path: Path, ref) -> None:
    """Blank lines, CRLF, extra fields, signs, spaces...: the same keys or the same error
    type as MXNet 1.9.1 (recorded in tests/data), for int and str keys."""
    cases = ref["idx_parsing"]
    w = mx.recordio.MXRecordIO(str(tmp_path / "two.rec"), "w")
    w.write(b"first")
    w.write(b"second")
    w.close()
    idx, rec = str(tmp_path / "case.idx"), str(tmp_path / "two.rec")
    for name, text in cases["texts"].items():
        (tmp_path / "case.idx").write_bytes(text.encode())
        for key_type in (int, str):
            want = cases["results"][f"{name}/{key_type.__name__}"]
            label = f"{name}/{key_type.__name__}"
            if "raises" in want:
                with pytest.raises(getattr(builtins, want["raises"])) as err:
                    mx.recordio.MXIndexedRecordIO(idx, rec, "r", key_type=key_type)
                assert type(err.value).__name__ == want["raises"], label
                assert "case.idx:" in str(err.value), label  # file and line named
            else:
                r = mx.recordio.MXIndexedRecordIO(idx, rec, "r", key_type=key_type)
                assert r.keys == want["keys"], label
                assert [[k, v] for k, v in r.idx.items()] == want["idx"], label


def test_bulk_idx_parsing_equals_mxnets_line_by_line_parsing(tmp_path: Path) -> None:
    """A large .idx as MXNet writes it takes the bulk path; it must give exactly what
    MXNet's loop gives (a key_type other than ``int`` forces that loop)."""
    rng = np.random.default_rng(5)
    keys = rng.integers(-(10**12), 10**12, 20000)
    keys[100:110] = keys[0]  # duplicates
    offsets = np.cumsum(rng.integers(0, 4000, len(keys))) * 4
    text = "".join(f"{k}\t{o}\n" for k, o in zip(keys.tolist(), offsets.tolist(), strict=True))
    (tmp_path / "a.idx").write_text(text)
    (tmp_path / "a.rec").write_bytes(b"")
    bulk = mx.recordio.MXIndexedRecordIO(str(tmp_path / "a.idx"), str(tmp_path / "a.rec"), "r")
    loop = mx.recordio.MXIndexedRecordIO(
        str(tmp_path / "a.idx"), str(tmp_path / "a.rec"), "r", key_type=lambda s: int(s)
    )
    assert bulk.keys == loop.keys == keys.tolist()
    assert bulk.idx == loop.idx and list(bulk.idx) == list(loop.idx)
    assert {type(k) for k in bulk.keys} == {type(v) for v in bulk.idx.values()} == {int}


def test_seek_and_sequential_reads(tmp_path: Path) -> None:
    idx, rec = write_indexed(tmp_path, {k: b"record %d" % k for k in range(5)})
    r = mx.recordio.MXIndexedRecordIO(idx, rec, "r")
    assert r.read() == b"record 0"
    assert r.seek(3) is None
    assert [r.read(), r.read(), r.read()] == [b"record 3", b"record 4", None]
    # deliberate: MXNet returns None from here on (its reader stays at end of stream)
    assert [r.read_idx(1), r.read()] == [b"record 1", b"record 2"]
    with pytest.raises(KeyError):
        r.seek(42)


def test_idx_offsets_past_the_end_or_inside_a_record(tmp_path: Path) -> None:
    w = mx.recordio.MXRecordIO(str(tmp_path / "a.rec"), "w")
    w.write(b"first")
    w.write(b"second")
    w.close()
    (tmp_path / "a.idx").write_text("0\t0\n1\t4\n2\t32\n3\t132\n4\t16\n")
    r = mx.recordio.MXIndexedRecordIO(str(tmp_path / "a.idx"), str(tmp_path / "a.rec"), "r")
    assert (r.read_idx(0), r.read_idx(4)) == (b"first", b"second")
    for key, offset in [(2, 32), (3, 132)]:
        with pytest.raises(mx.recordio.RecordIOError, match="past the end") as err:
            r.read_idx(key)
        assert (err.value.offset, err.value.path) == (offset, str(tmp_path / "a.rec"))
        assert isinstance(err.value, RuntimeError | fmt.RecordIOError)
    with pytest.raises(RuntimeError, match="at byte 4: bad magic"):
        r.read_idx(1)


def test_truncated_file_names_file_and_offset(tmp_path: Path) -> None:
    idx, rec = write_indexed(tmp_path, {k: bytes([k]) * 100 for k in range(4)})
    data = Path(rec).read_bytes()
    Path(rec).write_bytes(data[:-30])
    r = mx.recordio.MXIndexedRecordIO(idx, rec, "r")
    assert [r.read() for _ in range(3)] == [bytes([k]) * 100 for k in range(3)]
    with pytest.raises(mx.recordio.RecordIOError) as err:
        r.read()
    assert err.value.offset == 324 and err.value.path == rec
    assert f"{rec}: at byte 324: truncated record" in str(err.value)
    assert isinstance(err.value, RuntimeError)  # what MXNet's MXNetError is
    assert r.read_idx(1) == bytes([1]) * 100  # the intact records stay readable
    with pytest.raises(mx.recordio.RecordIOError, match="truncated"):
        r.read_idx(3)
    Path(rec).write_bytes(b"garbage!" * 8)
    with pytest.raises(mx.recordio.RecordIOError, match="at byte 0: bad magic"):
        mx.recordio.MXRecordIO(rec, "r").read()


# ----------------------------------------------------------------------- pack, unpack


def test_pack_matches_mxnet_bytes(ref) -> None:
    for name, case in ref["pack"].items():
        packed = mx.recordio.pack(IR(5, case["label"], 7, 9), b"payload")
        assert packed.hex() == case["packed"], name
        header, rest = mx.recordio.unpack(packed)
        assert rest == b"payload" and header.flag == case["unpacked_flag"], name
        label = header.label.tolist() if header.flag else header.label
        assert label == case["unpacked_label"], name


def test_pack_label_rules() -> None:
    def head(label):
        return mx.recordio.unpack(mx.recordio.pack(IR(5, label, 1, 2), b""))[0]

    for number in (3, 2.5, np.float32(1.5), np.float64(0.3), np.int64(7), True):
        assert head(number).flag == 0 and isinstance(head(number).label, float)
    assert head([]) == (0, 0.0, 1, 2)
    assert head(np.bool_(True)).label.tolist() == [1.0]  # not a numbers.Number: an array
    assert head(np.array(3.0)).flag == 1  # a 0-d array is an array
    assert head(np.array([[1, 2], [3, 4]])).label.tolist() == [1, 2, 3, 4]
    assert head(1e40).label == math.inf  # MXNet's native struct makes it inf
    assert mx.recordio.pack((0, 1.0, 2, 3), b"x") == mx.recordio.pack([0, 1.0, 2, 3], b"x")
    for bad in (IR(0, 1.0, -1, 0), IR(0, 1.0, 2**64, 0), IR(0, 1.0, 1.0, 0), IR(0, 1j, 0, 0)):
        with pytest.raises(struct.error):
            mx.recordio.pack(bad, b"")
    with pytest.raises(ValueError):
        mx.recordio.pack(IR(0, "abc", 0, 0), b"")
    with pytest.raises(TypeError):
        mx.recordio.pack((0, 1.0, 2), b"")
    with pytest.raises(TypeError):
        mx.recordio.pack(IR(0, 1.0, 0, 0), "text")
    assert mx.recordio.pack(IR(0, 1.0, 0, 0), bytearray(b"ba"))[-2:] == b"ba"


def test_unpack_types_and_errors() -> None:
    rec = mx.recordio.pack(IR(0, [1.0, 2.0, 3.0], 4, 5), b"tail")
    header, rest = mx.recordio.unpack(rec)
    assert header.flag == 3 and (header.id, header.id2, rest) == (4, 5, b"tail")
    assert header.label.dtype == np.float32 and not header.label.flags.writeable
    header, _ = mx.recordio.unpack(mx.recordio.pack(IR(0, 0.1, 4, 5), b""))
    assert type(header.label) is float and header.label == float(np.float32(0.1)) != 0.1
    for kind in (bytearray, memoryview):  # the rest keeps the input's type, as MXNet's slicing
        assert type(mx.recordio.unpack(kind(rec))[1]) is kind
    assert mx.recordio.unpack(bytearray(rec))[0].label.flags.writeable
    for short in (b"", b"x" * 23):
        with pytest.raises(struct.error):
            mx.recordio.unpack(short)
    head = struct.pack("<IfQQ", 3, 0.0, 1, 2)
    with pytest.raises(ValueError, match="3 float32 labels"):
        mx.recordio.unpack(head + b"\0" * 8)
    assert mx.recordio.unpack(head + b"\0" * 12)[1] == b""
    with pytest.raises(ValueError):
        mx.recordio.unpack(struct.pack("<IfQQ", 2**32 - 1, 0, 0, 0))


def test_irheader_is_mxnets_namedtuple() -> None:
    assert IR.__name__ == "HEADER" and IR._fields == ("flag", "label", "id", "id2")
    assert repr(IR(0, 1.0, 2, 3)) == "HEADER(flag=0, label=1.0, id=2, id2=3)"
    assert isinstance(IR(0, 1.0, 2, 3), tuple)


def _image() -> np.ndarray:
    yy, xx = np.mgrid[0:40, 0:56]
    return np.stack([xx * 4, yy * 5, (xx + yy) * 2], axis=-1).astype(np.uint8)


def test_pack_img_and_unpack_img() -> None:
    img = _image()
    png = mx.recordio.pack_img(IR(0, [1.0, 2.0], 3, 0), img, quality=3, img_fmt=".png")
    header, decoded = mx.recordio.unpack_img(png)
    assert header.label.tolist() == [1.0, 2.0] and header.id == 3
    assert np.array_equal(decoded, img)  # BGR in, BGR out
    _, payload = mx.recordio.unpack(png)
    assert payload == cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 3])[1].tobytes()
    png9 = mx.recordio.pack_img(IR(0, 1, 0, 0), img, quality=9, img_fmt=".PNG")
    assert np.array_equal(mx.recordio.unpack_img(png9)[1], img)

    jpg = mx.recordio.pack_img(IR(0, 1.0, 0, 0), img)
    _, payload = mx.recordio.unpack(jpg)
    assert payload == cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    low = mx.recordio.unpack(mx.recordio.pack_img(IR(0, 1.0, 0, 0), img, quality=50))[1]
    assert len(low) < len(payload) and low[:2] == b"\xff\xd8"
    upper = mx.recordio.pack_img(IR(0, 1.0, 0, 0), img, img_fmt=".JPEG")
    assert mx.recordio.unpack(upper)[1] == payload
    assert np.abs(mx.recordio.unpack_img(jpg)[1].astype(int) - img).mean() < 2
    gray = mx.recordio.unpack_img(png, 0)[1]
    assert gray.shape == (40, 56)  # libpng's own conversion: within a level of OpenCV's
    assert np.abs(gray.astype(int) - cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)).max() <= 1
    assert mx.recordio.unpack_img(mx.recordio.pack(IR(0, 1.0, 0, 0), b"garbage!"))[1] is None
    # deliberate: MXNet lets cv2.imdecode raise on an empty payload
    assert mx.recordio.unpack_img(mx.recordio.pack(IR(2, [1.0, 2.0], 0, 0), b""))[1] is None
    with pytest.raises(cv2.error):
        mx.recordio.pack_img(IR(0, 1.0, 0, 0), img, img_fmt=".xyz")


# --------------------------------------------------------- processes, pickling, threads


def _child(queue, fn) -> None:
    try:
        queue.put(("ok", fn()))
    except Exception as exc:
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


def _in_forked_child(fn):
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, fn))
    proc.start()
    result = queue.get(timeout=60)
    proc.join(30)
    return result


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_readers_work_in_forked_children_writers_refuse(tmp_path: Path) -> None:
    idx, rec = write_indexed(tmp_path, {k: b"record %d" % k for k in range(5)})
    plain = mx.recordio.MXRecordIO(rec, "r")
    assert plain.read() == b"record 0"
    indexed = mx.recordio.MXIndexedRecordIO(idx, rec, "r")
    # deliberate: MXNet raises "Forbidden operation in multiple processes" on read()
    assert _in_forked_child(plain.read) == ("ok", b"record 1")
    assert _in_forked_child(lambda: indexed.read_idx(3)) == ("ok", b"record 3")
    assert _in_forked_child(lambda: (indexed.seek(2), indexed.read())[1]) == ("ok", b"record 2")
    assert plain.read() == b"record 1"  # the parent's position is its own
    w = mx.recordio.MXRecordIO(str(tmp_path / "w.rec"), "w")
    w.write(b"parent")
    status, message = _in_forked_child(lambda: w.write(b"child"))
    assert status == "error" and "Forbidden operation in multiple processes" in message
    w.close()
    assert read_all(mx.recordio.MXRecordIO(str(tmp_path / "w.rec"), "r")) == [b"parent"]


def test_pickling_keeps_the_original_open(tmp_path: Path) -> None:
    idx, rec = write_indexed(tmp_path, {k: b"record %d" % k for k in range(5)})
    r = mx.recordio.MXIndexedRecordIO(idx, rec, "r")
    assert r.read_idx(1) == b"record 1"
    copy = pickle.loads(pickle.dumps(r))
    assert r.is_open and r.read() == b"record 2"  # deliberate: MXNet closes the original
    assert copy.is_open and copy.keys == r.keys and copy.idx == r.idx
    assert copy.read() == b"record 0"  # the copy starts at the first record, as MXNet's
    assert copy.read_idx(4) == b"record 4"
    r.close()
    assert not pickle.loads(pickle.dumps(r)).is_open

    w = mx.recordio.MXRecordIO(str(tmp_path / "w.rec"), "w")
    w.write(b"one")
    with pytest.raises(TypeError, match="open for writing"):
        pickle.dumps(w)  # deliberate: MXNet's copy would truncate the file
    w.close()
    assert not pickle.loads(pickle.dumps(w)).is_open
    assert read_all(mx.recordio.MXRecordIO(str(tmp_path / "w.rec"), "r")) == [b"one"]


def test_reads_are_thread_safe(tmp_path: Path) -> None:
    payloads = {k: (b"%d:" % k) * (50 + 37 * k) for k in range(64)}
    idx, rec = write_indexed(tmp_path, payloads)
    r = mx.recordio.MXIndexedRecordIO(idx, rec, "r")
    wrong, seen = [], []

    def by_key(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for k in rng.integers(0, 64, 500).tolist():
            if r.read_idx(k) != payloads[k]:
                wrong.append(k)

    def in_order() -> None:
        while (item := seq.read()) is not None:
            seen.append(item)

    threads = [threading.Thread(target=by_key, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []
    seq = mx.recordio.MXRecordIO(rec, "r")
    threads = [threading.Thread(target=in_order) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seen) == sorted(payloads.values())  # every record exactly once


def test_large_record_with_many_magic_words(tmp_path: Path) -> None:
    payload = (MAGIC + b"abcd") * 3000 + b"xyz"  # 3000 continuation parts
    w = mx.recordio.MXRecordIO(str(tmp_path / "a.rec"), "w")
    w.write(payload)
    w.close()
    frames = fmt.frame_record(payload)
    assert (tmp_path / "a.rec").read_bytes() == b"".join(bytes(f) for f in frames)
    assert mx.recordio.MXRecordIO(str(tmp_path / "a.rec"), "r").read() == payload


def test_write_idx_from_threads_keeps_records_and_lines_together(tmp_path: Path) -> None:
    idx, rec = str(tmp_path / "a.idx"), str(tmp_path / "a.rec")
    w = mx.recordio.MXIndexedRecordIO(idx, rec, "w")

    def work(first: int) -> None:
        for key in range(first, first + 200):
            w.write_idx(key, b"%d" % key * (key % 7))

    threads = [threading.Thread(target=work, args=(t * 1000,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    w.close()
    r = mx.recordio.MXIndexedRecordIO(idx, rec, "r")
    assert sorted(r.keys) == sorted(k for t in range(4) for k in range(t * 1000, t * 1000 + 200))
    assert all(r.read_idx(k) == b"%d" % k * (k % 7) for k in r.keys)
    assert sorted(r.idx.values()) == [r.idx[k] for k in r.keys]  # lines in file order
