"""Cross-check ``gpurec.mxnet`` against MXNet 1.9.1's ``mx.recordio`` and ``mx.image.imdecode``.

Each probe below is a small program written against ``mx``: open, write, read, pack,
unpack, pickle, fork, decode... It returns what it saw (values, types, bytes as SHA-256,
arrays as dtype/shape/SHA-256, exceptions as their type). The driver runs every probe
twice, each in a fresh interpreter, once with ``import mxnet as mx`` under a Python that
has MXNet 1.9.1 and once with ``import gpurec.mxnet as mx`` under gpurec's, and compares:

- values must be equal;
- an exception matches when it has the same type name, or when gpurec's is an instance
  of every standard class MXNet's is (MXNet's ``MXNetError`` is a ``RuntimeError``, so a
  gpurec error that is also a ``RuntimeError`` matches); messages are not compared.

Differences that are deliberate (gpurec is better there) are listed in ``DELIBERATE``
with the reason, and reported as such; anything else is a failure (exit status 1).

Run::

    .venv/bin/python benchmarks/crosscheck_mxnet_recordio.py \\
        --mxnet-python /work/mxnet-venv/bin/python --json /tmp/crosscheck-recordio.json

The probe side needs only NumPy and OpenCV besides the ``mx`` under test, so it runs in
MXNet's side venv (Python 3.11, ``numpy<1.24``). Input images are encoded once by the
driver so both sides read the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import struct
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

MAGIC = struct.pack("<I", 0xCED7230A)
HERE = Path(__file__).resolve()
REPO = HERE.parents[1]

# ------------------------------------------------------------------------ encoding

KINDS = (
    KeyError,
    IndexError,
    ValueError,
    TypeError,
    AssertionError,
    struct.error,
    RuntimeError,
    OSError,
    AttributeError,
)


def sha(b) -> str:
    return hashlib.sha256(bytes(b)).hexdigest()[:16]


def enc(v):
    """A JSON-able description of ``v`` that is equal for equal observable values."""
    if isinstance(v, BaseException):
        return {
            "raises": type(v).__name__,
            "kinds": [k.__name__ for k in KINDS if isinstance(v, k)],
            "msg": str(v)[:160],
        }
    if v is None or (isinstance(v, (bool, int, str)) and not isinstance(v, np.generic)):
        return v
    if isinstance(v, float):
        return {"float": repr(v)}
    if isinstance(v, (bytes, bytearray, memoryview)):
        b = bytes(v)
        return {"type": type(v).__name__, "len": len(b), "sha": sha(b), "head": b[:12].hex()}
    if isinstance(v, np.ndarray):
        return {
            "ndarray": type(v).__name__ if type(v) is np.ndarray else "subclass",
            "dtype": str(v.dtype),
            "shape": list(v.shape),
            "writeable": bool(v.flags.writeable),
            "sha": sha(np.ascontiguousarray(v).tobytes()),
        }
    if isinstance(v, np.generic):
        return {"np": type(v).__name__, "value": repr(v.item())}
    if isinstance(v, tuple) and hasattr(v, "_fields"):
        return {"namedtuple": type(v).__name__, **{f: enc(getattr(v, f)) for f in v._fields}}
    if isinstance(v, (list, tuple)):
        return [enc(x) for x in v]
    if isinstance(v, dict):
        return {f"{k!r}:{type(k).__name__}": enc(x) for k, x in v.items()}
    if isinstance(v, type):
        return {"class": v.__name__}
    return {"other": type(v).__name__}


def attempt(fn, *args, **kwargs):
    try:
        return enc(fn(*args, **kwargs))
    except Exception as exc:
        return enc(exc)


def file_info(path) -> dict:
    p = Path(path)
    if not p.exists():
        return {"exists": False}
    return {"size": p.stat().st_size, "sha": sha(p.read_bytes())}


# -------------------------------------------------------------------------- probes

PROBES = {}


def probe(fn):
    PROBES[fn.__name__.removeprefix("p_")] = fn
    return fn


PAYLOADS = [
    b"",
    b"a",
    b"abc",
    b"abcd",
    b"x" * 1000,
    MAGIC,
    b"1234" + MAGIC + b"5678",
    MAGIC * 3 + b"tail",
    b"ab" + MAGIC + b"cd",  # magic at an unaligned offset: not split
    bytes(range(256)) * 3,
]


def write_plain(mx, path, payloads=PAYLOADS):
    w = mx.recordio.MXRecordIO(str(path), "w")
    for p in payloads:
        w.write(p)
    w.close()


@probe
def p_flags(mx, tmp):
    out = {}
    write_plain(mx, tmp / "a.rec", [b"x"])
    for flag in ("x", "a", "R", "rw", "rb", ""):
        out[flag] = attempt(mx.recordio.MXRecordIO, str(tmp / "a.rec"), flag)
        out["idx-" + flag] = attempt(
            mx.recordio.MXIndexedRecordIO, str(tmp / "a.idx"), str(tmp / "a.rec"), flag
        )
    return out


@probe
def p_write_types(mx, tmp):
    w = mx.recordio.MXRecordIO(str(tmp / "t.rec"), "w")

    class B(bytes):
        pass

    out = {}
    for name, buf in [
        ("str", "abc"),
        ("bytearray", bytearray(b"abc")),
        ("memoryview", memoryview(b"abc")),
        ("int", 5),
        ("none", None),
        ("np.bytes_", np.bytes_(b"npb")),
        ("bytes-subclass", B(b"sub")),
        ("list", [1, 2]),
        ("ndarray", np.zeros(3, np.uint8)),
    ]:
        out[name] = attempt(w.write, buf)
    w.close()
    out["file"] = file_info(tmp / "t.rec")
    r = mx.recordio.MXRecordIO(str(tmp / "t.rec"), "r")
    out["read"] = [attempt(r.read) for _ in range(3)]
    return out


@probe
def p_write_read(mx, tmp):
    write_plain(mx, tmp / "a.rec")
    r = mx.recordio.MXRecordIO(str(tmp / "a.rec"), "r")
    got = [attempt(r.read) for _ in range(len(PAYLOADS) + 3)]
    return {"file": file_info(tmp / "a.rec"), "reads": got}


@probe
def p_empty_file(mx, tmp):
    (tmp / "e.rec").write_bytes(b"")
    r = mx.recordio.MXRecordIO(str(tmp / "e.rec"), "r")
    return [attempt(r.read), attempt(r.read)]


@probe
def p_truncate_on_w(mx, tmp):
    (tmp / "a.rec").write_bytes(b"old content" * 10)
    w = mx.recordio.MXRecordIO(str(tmp / "a.rec"), "w")
    out = {"after_open": file_info(tmp / "a.rec")}
    w.close()
    out["after_close"] = file_info(tmp / "a.rec")
    return out


@probe
def p_visible_before_close(mx, tmp):
    w = mx.recordio.MXIndexedRecordIO(str(tmp / "a.idx"), str(tmp / "a.rec"), "w")
    for i in range(3):
        w.write_idx(i, b"0123456789")
    out = {"rec": file_info(tmp / "a.rec"), "idx": file_info(tmp / "a.idx")}
    w.close()
    out["rec_closed"] = file_info(tmp / "a.rec")
    return out


@probe
def p_reset(mx, tmp):
    write_plain(mx, tmp / "a.rec")
    r = mx.recordio.MXRecordIO(str(tmp / "a.rec"), "r")
    out = {"r": [attempt(r.read), attempt(r.read)]}
    r.reset()
    out["after_reset"] = attempt(r.read)
    w = mx.recordio.MXRecordIO(str(tmp / "b.rec"), "w")
    w.write(b"first")
    w.write(b"second")
    w.reset()
    out["w_after_reset"] = file_info(tmp / "b.rec")
    w.write(b"third")
    w.close()
    out["w_file"] = file_info(tmp / "b.rec")
    out["w_reads"] = [attempt(mx.recordio.MXRecordIO(str(tmp / "b.rec"), "r").read)]
    wi = mx.recordio.MXIndexedRecordIO(str(tmp / "c.idx"), str(tmp / "c.rec"), "w")
    wi.write_idx(1, b"one")
    wi.reset()
    out["wi_after_reset"] = [wi.keys, enc(wi.idx), attempt(wi.tell)]
    wi.write_idx(2, b"two")
    wi.close()
    out["wi_files"] = [file_info(tmp / "c.rec"), (tmp / "c.idx").read_text()]
    ri = mx.recordio.MXIndexedRecordIO(str(tmp / "c.idx"), str(tmp / "c.rec"), "r")
    ri.read_idx(2)
    ri.reset()
    out["ri_after_reset"] = [ri.keys, attempt(ri.read)]
    return out


@probe
def p_close(mx, tmp):
    write_plain(mx, tmp / "a.rec")
    r = mx.recordio.MXRecordIO(str(tmp / "a.rec"), "r")
    out = {"open": r.is_open}
    r.close()
    out["closed"] = r.is_open
    out["close_again"] = attempt(r.close)
    out["read_closed"] = attempt(r.read)
    w = mx.recordio.MXRecordIO(str(tmp / "b.rec"), "w")
    w.close()
    out["write_closed"] = attempt(w.write, b"x")
    out["pid_closed"] = w.pid
    wi = mx.recordio.MXIndexedRecordIO(str(tmp / "b.idx"), str(tmp / "b.rec"), "w")
    wi.close()
    out["wi_close_again"] = attempt(wi.close)
    return out


@probe
def p_modes(mx, tmp):
    write_plain(mx, tmp / "a.rec")
    r = mx.recordio.MXRecordIO(str(tmp / "a.rec"), "r")
    w = mx.recordio.MXRecordIO(str(tmp / "b.rec"), "w")
    wi = mx.recordio.MXIndexedRecordIO(str(tmp / "c.idx"), str(tmp / "c.rec"), "w")
    wi.write_idx(0, b"zero")
    wi.close()
    ri = mx.recordio.MXIndexedRecordIO(str(tmp / "c.idx"), str(tmp / "c.rec"), "r")
    wi2 = mx.recordio.MXIndexedRecordIO(str(tmp / "d.idx"), str(tmp / "d.rec"), "w")
    return {
        "write_in_r": attempt(r.write, b"x"),
        "read_in_w": attempt(w.read),
        "read_idx_in_w": attempt(wi2.read_idx, 0),
        "seek_in_w": attempt(wi2.seek, 0),
        "write_idx_in_r": attempt(ri.write_idx, 5, b"x"),
        "tell_in_r": attempt(ri.tell),
        "tell_plain_w": attempt(lambda: w.tell()),
        "has_tell_plain": hasattr(w, "tell"),
    }


@probe
def p_attributes(mx, tmp):
    wi = mx.recordio.MXIndexedRecordIO(str(tmp / "a.idx"), str(tmp / "a.rec"), "w")
    out = {
        "w": {
            "uri": type(wi.uri).__name__,
            "flag": wi.flag,
            "is_open": wi.is_open,
            "writable": wi.writable,
            "pid_is_int": isinstance(wi.pid, int),
            "idx_path": Path(wi.idx_path).name,
            "key_type": enc(wi.key_type),
            "keys": wi.keys,
            "idx": enc(wi.idx),
        }
    }
    for k in (3, 1, 2):
        wi.write_idx(k, b"rec%d" % k)
    out["after_writes"] = {"keys": wi.keys, "idx": enc(wi.idx), "tell": wi.tell()}
    wi.close()
    ri = mx.recordio.MXIndexedRecordIO(str(tmp / "a.idx"), str(tmp / "a.rec"), "r")
    out["r"] = {"writable": ri.writable, "keys": ri.keys, "idx": enc(ri.idx)}
    out["idx_text"] = (tmp / "a.idx").read_text()
    out["rec"] = file_info(tmp / "a.rec")
    out["header"] = {
        "name": mx.recordio.IRHeader.__name__,
        "fields": list(mx.recordio.IRHeader._fields),
        "repr": repr(mx.recordio.IRHeader(0, 1.0, 2, 3)),
        "is_tuple": issubclass(mx.recordio.IRHeader, tuple),
    }
    return out


@probe
def p_tell(mx, tmp):
    wi = mx.recordio.MXIndexedRecordIO(str(tmp / "a.idx"), str(tmp / "a.rec"), "w")
    tells = [wi.tell()]
    for i, p in enumerate(PAYLOADS):
        wi.write_idx(i, p)
        tells.append(wi.tell())
    wi.close()
    return {"tells": tells, "idx": (tmp / "a.idx").read_text(), "rec": file_info(tmp / "a.rec")}


@probe
def p_duplicates(mx, tmp):
    wi = mx.recordio.MXIndexedRecordIO(str(tmp / "a.idx"), str(tmp / "a.rec"), "w")
    for k, p in [(1, b"a"), (2, b"b"), (1, b"c"), (3, b"d")]:
        wi.write_idx(k, p)
    out = {"w_keys": wi.keys, "w_idx": enc(wi.idx)}
    wi.close()
    ri = mx.recordio.MXIndexedRecordIO(str(tmp / "a.idx"), str(tmp / "a.rec"), "r")
    out.update(keys=ri.keys, idx=enc(ri.idx), read1=attempt(ri.read_idx, 1))
    return out


@probe
def p_read_idx_keys(mx, tmp):
    wi = mx.recordio.MXIndexedRecordIO(str(tmp / "a.idx"), str(tmp / "a.rec"), "w")
    for k in range(5):
        wi.write_idx(k, b"record %d" % k)
    wi.close()
    ri = mx.recordio.MXIndexedRecordIO(str(tmp / "a.idx"), str(tmp / "a.rec"), "r")
    keys = {
        "int": 2,
        "np.int64": np.int64(2),
        "np.int32": np.int32(2),
        "np.uint8": np.uint8(2),
        "float": 2.0,
        "np.float32": np.float32(2.0),
        "float-2.5": 2.5,
        "str": "2",
        "missing": 99,
        "negative": -1,
        "True": True,
        "None": None,
        "0-d array": np.array(2),
    }
    return {name: attempt(ri.read_idx, k) for name, k in keys.items()}


@probe
def p_write_idx_keys(mx, tmp):
    wi = mx.recordio.MXIndexedRecordIO(str(tmp / "a.idx"), str(tmp / "a.rec"), "w")
    out = {}
    for name, k in [
        ("float", 2.7),
        ("np.int64", np.int64(7)),
        ("str-digit", "5"),
        ("str-alpha", "a"),
        ("bool", True),
        ("negative", -3),
        ("none", None),
    ]:
        out[name] = attempt(wi.write_idx, k, b"v")
    out["bad_buf"] = attempt(wi.write_idx, 9, "not bytes")
    out["keys"] = wi.keys
    wi.close()
    out["idx_text"] = (tmp / "a.idx").read_text()
    out["rec"] = file_info(tmp / "a.rec")
    return out


@probe
def p_key_type_str(mx, tmp):
    wi = mx.recordio.MXIndexedRecordIO(str(tmp / "a.idx"), str(tmp / "a.rec"), "w", key_type=str)
    for k in ("a", 5, "b c", 2.5):
        wi.write_idx(k, b"v-%s" % str(k).encode())
    out = {"w_keys": wi.keys}
    wi.close()
    ri = mx.recordio.MXIndexedRecordIO(str(tmp / "a.idx"), str(tmp / "a.rec"), "r", key_type=str)
    out.update(
        keys=ri.keys,
        idx=enc(ri.idx),
        a=attempt(ri.read_idx, "a"),
        five_str=attempt(ri.read_idx, "5"),
        five_int=attempt(ri.read_idx, 5),
        space=attempt(ri.read_idx, "b c"),
        text=(tmp / "a.idx").read_text(),
    )
    return out


IDX_TEXTS = {
    "plain": "0\t0\n1\t12\n",
    "no_final_newline": "0\t0\n1\t12",
    "blank_middle": "0\t0\n\n1\t12\n",
    "blank_end": "0\t0\n1\t12\n\n",
    "blank_start": "\n0\t0\n1\t12\n",
    "spaces_line": "0\t0\n   \n1\t12\n",
    "leading_space": " 0\t0\n 1\t12\n",
    "space_in_fields": "0 \t 0\n1 \t 12\n",
    "crlf": "0\t0\r\n1\t12\r\n",
    "three_fields": "0\t0\textra\n1\t12\tmore\n",
    "key_only": "0\t0\n1\n",
    "float_key": "0\t0\n1.0\t12\n",
    "float_offset": "0\t0\n1\t12.0\n",
    "plus_key": "+0\t0\n+1\t12\n",
    "underscore": "0\t0\n1_0\t12\n",
    "negative_key": "-5\t0\n1\t12\n",
    "space_separated": "0 0\n1 12\n",
    "empty": "",
    "huge_key": "123456789012345678901234567890\t0\n1\t12\n",
    "duplicate": "1\t0\n1\t12\n",
    "two_tabs_then_none": "0\t0\t1\n12\n",
    "trailing_tab": "0\t0\t\n1\t12\n",
}


@probe
def p_idx_parsing(mx, tmp):
    write_plain(mx, tmp / "a.rec", [b"first", b"second"])
    out = {}
    for name, text in IDX_TEXTS.items():
        (tmp / f"{name}.idx").write_bytes(text.encode())
        for kt in (int, str):
            try:
                ri = mx.recordio.MXIndexedRecordIO(
                    str(tmp / f"{name}.idx"), str(tmp / "a.rec"), "r", key_type=kt
                )
                out[f"{name}/{kt.__name__}"] = {"keys": enc(ri.keys), "idx": enc(ri.idx)}
            except Exception as exc:
                out[f"{name}/{kt.__name__}"] = enc(exc)
    return out


@probe
def p_seek(mx, tmp):
    wi = mx.recordio.MXIndexedRecordIO(str(tmp / "a.idx"), str(tmp / "a.rec"), "w")
    for k in range(5):
        wi.write_idx(k, b"record %d" % k)
    wi.close()
    ri = mx.recordio.MXIndexedRecordIO(str(tmp / "a.idx"), str(tmp / "a.rec"), "r")
    out = {"first_read": attempt(ri.read)}
    ri.seek(3)
    out["after_seek3"] = [attempt(ri.read), attempt(ri.read), attempt(ri.read)]
    out["read_idx1_then_read"] = [attempt(ri.read_idx, 1), attempt(ri.read)]
    out["seek_missing"] = attempt(ri.seek, 42)
    out["seek_returns"] = attempt(ri.seek, 0)
    return out


@probe
def p_idx_offsets_bad(mx, tmp):
    write_plain(mx, tmp / "a.rec", [b"first", b"second"])
    size = (tmp / "a.rec").stat().st_size
    (tmp / "a.idx").write_text(f"0\t0\n1\t4\n2\t{size}\n3\t{size + 100}\n4\t16\n")
    ri = mx.recordio.MXIndexedRecordIO(str(tmp / "a.idx"), str(tmp / "a.rec"), "r")
    return {
        "ok": attempt(ri.read_idx, 0),
        "mid_record": attempt(ri.read_idx, 1),
        "at_end": attempt(ri.read_idx, 2),
        "past_end": attempt(ri.read_idx, 3),
        "second_record": attempt(ri.read_idx, 4),
    }


PACK_LABELS = {
    "int": 3,
    "float": 2.5,
    "float-precise": 0.1,
    "np.float32": np.float32(1.5),
    "np.float64": np.float64(0.3),
    "np.int64": np.int64(7),
    "bool": True,
    "np.bool_": np.bool_(True),
    "empty-list": [],
    "list1": [1],
    "list2": [1, 2.5],
    "tuple": (1.5,),
    "2d": np.array([[1, 2], [3, 4]]),
    "0d": np.array(3.0),
    "float64-array": np.array([0.1, 0.2]),
    "str": "abc",
    "str-number": "1.5",
    "none": None,
    "complex": 1j,
    "fraction": Fraction(1, 2),
    "nan": float("nan"),
    "inf": float("inf"),
    "huge": 1e40,
}


@probe
def p_pack(mx, tmp):
    IR = mx.recordio.IRHeader
    out = {}
    for name, label in PACK_LABELS.items():
        out[name] = attempt(mx.recordio.pack, IR(5, label, 7, 9), b"payload")
    for name, header in [
        ("neg-id", IR(0, 1.0, -1, 0)),
        ("big-id", IR(0, 1.0, 2**64, 0)),
        ("max-id", IR(0, 1.0, 2**64 - 1, 2**64 - 1)),
        ("float-id", IR(0, 1.0, 1.0, 0)),
        ("neg-flag", IR(-1, [1.0], 0, 0)),
        ("tuple-header", (0, 1.0, 2, 3)),
        ("list-header", [0, [1.0, 2.0], 2, 3]),
        ("short-header", (0, 1.0, 2)),
    ]:
        out[name] = attempt(mx.recordio.pack, header, b"p")
    for name, payload in [
        ("str", "text"),
        ("bytearray", bytearray(b"ba")),
        ("memoryview", memoryview(b"mv")),
        ("int", 5),
        ("empty", b""),
    ]:
        out["payload-" + name] = attempt(mx.recordio.pack, IR(0, 1.0, 0, 0), payload)
        out["payload-multi-" + name] = attempt(mx.recordio.pack, IR(0, [1.0], 0, 0), payload)
    return out


@probe
def p_unpack(mx, tmp):
    IR = mx.recordio.IRHeader
    rec = mx.recordio.pack(IR(0, [1.0, 2.0, 3.0], 4, 5), b"tail")
    one = mx.recordio.pack(IR(0, 0.1, 4, 5), b"tail")
    head = struct.pack("<IfQQ", 3, 0.0, 1, 2)
    return {
        "multi": attempt(mx.recordio.unpack, rec),
        "single": attempt(mx.recordio.unpack, one),
        "single_label_type": type(mx.recordio.unpack(one)[0].label).__name__,
        "multi_label_writeable": mx.recordio.unpack(rec)[0].label.flags.writeable,
        "short": attempt(mx.recordio.unpack, b"x" * 23),
        "empty": attempt(mx.recordio.unpack, b""),
        "flag_over": attempt(mx.recordio.unpack, head + b"\0" * 8),
        "flag_exact": attempt(mx.recordio.unpack, head + b"\0" * 12),
        "bytearray": attempt(mx.recordio.unpack, bytearray(rec)),
        "bytearray_label_writeable": mx.recordio.unpack(bytearray(rec))[0].label.flags.writeable,
        "memoryview": attempt(mx.recordio.unpack, memoryview(rec)),
        "str": attempt(mx.recordio.unpack, "x" * 30),
        "none": attempt(mx.recordio.unpack, None),
        "huge_flag": attempt(mx.recordio.unpack, struct.pack("<IfQQ", 2**32 - 1, 0, 0, 0)),
    }


@probe
def p_mxnet_unittest_pack_labels(mx, tmp):
    """tests/python/unittest/test_recordio.py::test_recordio_pack_label, with checks."""
    N = 255
    results = []
    for i in range(1, N):
        for j in range(N):
            content = b"".join(bytes([k % 256]) for k in range(j))
            label = np.random.RandomState(i * 1000 + j).uniform(size=i).astype(np.float32)
            header = (0, label, 0, 0)
            s = mx.recordio.pack(header, content)
            rheader, rcontent = mx.recordio.unpack(s)
            ok = bool((label == rheader.label).all()) and content == rcontent
            if not ok:
                results.append((i, j))
            if j == 0 and i % 50 == 1:
                results.append(sha(s))
    return results


@probe
def p_mxnet_unittest_records(mx, tmp):
    """test_recordio.py::test_recordio and ::test_indexed_recordio, with file checksums."""
    N = 255
    w = mx.recordio.MXRecordIO(str(tmp / "r.rec"), "w")
    for i in range(N):
        w.write(bytes(str(chr(i)), "utf-8"))
    del w
    r = mx.recordio.MXRecordIO(str(tmp / "r.rec"), "r")
    plain = [r.read() == bytes(str(chr(i)), "utf-8") for i in range(N)]
    del r
    w = mx.recordio.MXIndexedRecordIO(str(tmp / "i.idx"), str(tmp / "i.rec"), "w")
    for i in range(N):
        w.write_idx(i, bytes(str(chr(i)), "utf-8"))
    del w
    r = mx.recordio.MXIndexedRecordIO(str(tmp / "i.idx"), str(tmp / "i.rec"), "r")
    keys = list(r.keys)
    order = np.random.RandomState(3).permutation(keys).tolist()
    indexed = [r.read_idx(i) == bytes(str(chr(i)), "utf-8") for i in order]
    return {
        "plain": all(plain),
        "indexed": all(indexed),
        "keys": keys == list(range(N)),
        "r.rec": file_info(tmp / "r.rec"),
        "i.rec": file_info(tmp / "i.rec"),
        "i.idx": file_info(tmp / "i.idx"),
    }


def load_inputs(work: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((work / "inputs").iterdir())}


@probe
def p_imdecode(mx, tmp):
    inputs = load_inputs(tmp.parent.parent)
    out = {}

    def dec(*args, **kwargs):
        img = mx.image.imdecode(*args, **kwargs)
        return {
            "has_asnumpy": hasattr(img, "asnumpy"),
            "shape": tuple(img.shape),
            "np": img.asnumpy(),
        }

    for name, data in inputs.items():
        out[name] = attempt(dec, data)
        out[name + "/gray"] = attempt(dec, data, flag=0)
        out[name + "/bgr"] = attempt(dec, data, to_rgb=0)
        out[name + "/gray-bgr"] = attempt(dec, data, 0, 0)
    jpeg = inputs["color.jpg"]
    padded = jpeg + bytes(-len(jpeg) % 4)  # bytes after the end marker are ignored
    out["bytearray"] = attempt(dec, bytearray(jpeg))
    out["np.uint8"] = attempt(dec, np.frombuffer(jpeg, np.uint8))
    out["np.uint8-2d"] = attempt(dec, np.frombuffer(padded, np.uint8).reshape(4, -1))
    out["np.int32-view"] = attempt(dec, np.frombuffer(padded, np.int32))
    out["str"] = attempt(dec, "not bytes")
    out["memoryview"] = attempt(dec, memoryview(jpeg))
    out["list"] = attempt(dec, list(jpeg[:10]))
    out["empty"] = attempt(dec, b"")
    out["garbage"] = attempt(dec, b"this is not an image at all")
    out["jfif-garbage"] = attempt(dec, jpeg[:20] + b"\0" * 40)
    out["half-jpeg"] = attempt(dec, jpeg[: len(jpeg) // 2])
    out["flag2"] = attempt(dec, jpeg, flag=2)
    out["flag-1"] = attempt(dec, jpeg, flag=-1)
    out["flag-true"] = attempt(dec, jpeg, flag=True)
    out["to_rgb-false"] = attempt(dec, jpeg, to_rgb=False)
    out["result-type-asnumpy"] = attempt(lambda: type(mx.image.imdecode(jpeg).asnumpy()).__name__)
    out["img-alias"] = attempt(lambda: mx.img.imdecode is mx.image.imdecode)
    return out


@probe
def p_imdecode_golden(mx, tmp):
    golden = Path(os.environ["GOLDEN"]) / "insightface"
    r = mx.recordio.MXIndexedRecordIO(str(golden / "train.idx"), str(golden / "train.rec"), "r")
    out = {}
    for k in r.keys:
        h, s = mx.recordio.unpack(r.read_idx(k))
        out[k] = [enc(h), attempt(lambda s=s: mx.image.imdecode(s).asnumpy()) if s else None]
    return out


@probe
def p_unpack_img(mx, tmp):
    inputs = load_inputs(tmp.parent.parent)
    IR = mx.recordio.IRHeader
    out = {}
    for name, data in inputs.items():
        rec = mx.recordio.pack(IR(0, 1.0, 0, 0), data)
        for iscolor in (-1, 0, 1):
            out[f"{name}/{iscolor}"] = attempt(mx.recordio.unpack_img, rec, iscolor)
    for name, header, payload in [
        ("default", IR(0, 1.0, 0, 0), inputs["color.jpg"]),
        ("garbage", IR(0, 1.0, 0, 0), b"garbage!"),
        ("empty", IR(2, [1.0, 2.0], 0, 0), b""),
    ]:
        out[name] = attempt(mx.recordio.unpack_img, mx.recordio.pack(header, payload))
    return out


@probe
def p_pack_img(mx, tmp):
    import cv2

    inputs = load_inputs(tmp.parent.parent)
    img = cv2.imdecode(np.frombuffer(inputs["color.png"], np.uint8), cv2.IMREAD_COLOR)
    IR = mx.recordio.IRHeader
    out = {}
    for name, kwargs in [
        ("default", {}),
        ("q50", {"quality": 50}),
        ("JPEG", {"img_fmt": ".JPEG"}),
        ("png3", {"quality": 3, "img_fmt": ".png"}),
        ("png9", {"quality": 9, "img_fmt": ".PNG"}),
        ("bmp", {"img_fmt": ".bmp"}),
        ("bad-fmt", {"img_fmt": ".xyz"}),
        ("float-quality", {"quality": 95.0}),
    ]:
        try:
            s = mx.recordio.pack_img(IR(0, [1.0, 2.0], 3, 0), img, **kwargs)
            h, payload = mx.recordio.unpack(s)
            decoded = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_UNCHANGED)
            out[name] = {
                "header": enc(h),
                "payload_head": payload[:4].hex(),
                "payload_sha": sha(payload),  # depends on the OpenCV build
                "decoded": enc(decoded),
            }
        except Exception as exc:
            out[name] = enc(exc)
    out["gray"] = attempt(lambda: len(mx.recordio.pack_img(IR(0, 1, 0, 0), img[:, :, 0])) > 24)
    return out


def _read_all(r):
    out = []
    while True:
        try:
            s = r.read()
        except Exception as exc:
            out.append(enc(exc))
            break
        out.append(enc(s))
        if s is None:
            break
    return out


@probe
def p_damaged(mx, tmp):
    write_plain(mx, tmp / "a.rec")
    data = (tmp / "a.rec").read_bytes()
    out = {}
    for name, damaged in [
        ("cut-mid-payload", data[: len(data) - 500]),
        ("cut-mid-header", data[: len(data) - len(PAYLOADS[-1]) - 6]),
        ("cut-3-bytes", data[:-3]),
        ("trailing-garbage", data + b"\x01\x02\x03\x04\x05\x06\x07\x08\x09\x10\x11\x12"),
        ("garbage-start", b"garbage!" * 8 + data),
        ("random", bytes(np.random.RandomState(0).randint(0, 256, 400, dtype=np.uint8))),
    ]:
        (tmp / f"{name}.rec").write_bytes(damaged)
        r = mx.recordio.MXRecordIO(str(tmp / f"{name}.rec"), "r")
        out[name] = _read_all(r)
    return out


@probe
def p_missing_files(mx, tmp):
    write_plain(mx, tmp / "a.rec", [b"x"])
    return {
        "r-missing": attempt(mx.recordio.MXRecordIO, str(tmp / "nope.rec"), "r"),
        "w-no-dir": attempt(mx.recordio.MXRecordIO, str(tmp / "no" / "dir.rec"), "w"),
        "idx-missing": attempt(
            mx.recordio.MXIndexedRecordIO, str(tmp / "nope.idx"), str(tmp / "a.rec"), "r"
        ),
        "rec-missing-idx-too": attempt(
            mx.recordio.MXIndexedRecordIO, str(tmp / "nope.idx"), str(tmp / "nope.rec"), "r"
        ),
        "pathlib-uri": attempt(lambda: mx.recordio.MXRecordIO(tmp / "a.rec", "r").read()),
    }


def _fork_child(q, fn):
    try:
        q.put(("ok", enc(fn())))
    except Exception as exc:
        q.put(("err", enc(exc)))


def in_process(ctx_name, fn):
    import multiprocessing as mp

    ctx = mp.get_context(ctx_name)
    q = ctx.Queue()
    p = ctx.Process(target=_fork_child, args=(q, fn))
    p.start()
    try:
        result = q.get(timeout=60)
    except Exception as exc:
        result = ("lost", repr(exc))
    p.join(30)
    return {"result": result, "exitcode": p.exitcode}


@probe
def p_fork(mx, tmp):
    wi = mx.recordio.MXIndexedRecordIO(str(tmp / "a.idx"), str(tmp / "a.rec"), "w")
    for k in range(5):
        wi.write_idx(k, b"record %d" % k)
    wi.close()
    ri = mx.recordio.MXIndexedRecordIO(str(tmp / "a.idx"), str(tmp / "a.rec"), "r")
    r = mx.recordio.MXRecordIO(str(tmp / "a.rec"), "r")
    first = r.read()
    out = {
        "parent_first": enc(first),
        "child_read": in_process("fork", lambda: r.read()),
        "child_read_idx": in_process("fork", lambda: ri.read_idx(3)),
        "child_seek_read": in_process("fork", lambda: (ri.seek(2), ri.read())[1]),
        "parent_after": enc(r.read()),
    }
    w = mx.recordio.MXRecordIO(str(tmp / "w.rec"), "w")
    w.write(b"parent")
    out["child_write"] = in_process("fork", lambda: w.write(b"child"))
    w.close()
    out["written"] = file_info(tmp / "w.rec")
    return out


@probe
def p_pickle(mx, tmp):
    wi = mx.recordio.MXIndexedRecordIO(str(tmp / "a.idx"), str(tmp / "a.rec"), "w")
    for k in range(5):
        wi.write_idx(k, b"record %d" % k)
    wi.close()
    ri = mx.recordio.MXIndexedRecordIO(str(tmp / "a.idx"), str(tmp / "a.rec"), "r")
    ri.read_idx(1)
    out = {}
    try:
        data = pickle.dumps(ri)
        out["dumps"] = "ok"
    except Exception as exc:
        out["dumps"] = enc(exc)
        return out
    out["original_is_open"] = ri.is_open
    out["original_read_idx"] = attempt(ri.read_idx, 2)
    copy = pickle.loads(data)
    out["copy"] = {
        "is_open": copy.is_open,
        "keys": copy.keys,
        "read": attempt(copy.read),
        "read_idx": attempt(copy.read_idx, 4),
    }
    r = mx.recordio.MXRecordIO(str(tmp / "a.rec"), "r")
    r.read()
    r.read()
    c2 = pickle.loads(pickle.dumps(r))
    out["plain_copy_first_read"] = attempt(c2.read)
    r.close()
    out["closed_pickle"] = attempt(lambda: pickle.loads(pickle.dumps(r)).is_open)
    w = mx.recordio.MXRecordIO(str(tmp / "w.rec"), "w")
    w.write(b"one")
    try:
        wc = pickle.loads(pickle.dumps(w))
        out["writer_pickle"] = {
            "original_open": w.is_open,
            "copy_open": wc.is_open,
            "file": file_info(tmp / "w.rec"),
        }
    except Exception as exc:
        out["writer_pickle"] = enc(exc)
    return out


@probe
def p_spawn(mx, tmp):
    wi = mx.recordio.MXIndexedRecordIO(str(tmp / "a.idx"), str(tmp / "a.rec"), "w")
    for k in range(5):
        wi.write_idx(k, b"record %d" % k)
    wi.close()
    ri = mx.recordio.MXIndexedRecordIO(str(tmp / "a.idx"), str(tmp / "a.rec"), "r")
    return in_process("spawn", _SpawnRead(ri))


class _SpawnRead:
    def __init__(self, rec):
        self.rec = rec

    def __call__(self):
        return [self.rec.read_idx(4), self.rec.read_idx(0), self.rec.read()]


@probe
def p_threads(mx, tmp):
    import threading

    wi = mx.recordio.MXIndexedRecordIO(str(tmp / "a.idx"), str(tmp / "a.rec"), "w")
    payloads = {k: (b"%d:" % k) * (50 + 37 * k) for k in range(64)}
    for k, p in payloads.items():
        wi.write_idx(k, p)
    wi.close()
    ri = mx.recordio.MXIndexedRecordIO(str(tmp / "a.idx"), str(tmp / "a.rec"), "r")
    wrong = []
    errors = []

    def work(seed):
        rng = np.random.RandomState(seed)
        for _ in range(2000):
            k = int(rng.randint(64))
            try:
                if ri.read_idx(k) != payloads[k]:
                    wrong.append(k)
            except Exception as exc:
                errors.append(type(exc).__name__)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"wrong": len(wrong), "errors": sorted(set(errors))}


# --------------------------------------------------------------------------- driver

DELIBERATE = {
    # (probe, path prefix): why gpurec differs there on purpose
    ("visible_before_close", "/"): "gpurec writes each record and .idx line straight to the "
    "files (a killed writer leaves a consistent prefix); MXNet buffers both until close",
    ("modes", "/has_tell_plain"): "MXRecordIO has tell() too (MXNet: on MXIndexedRecordIO only)",
    ("modes", "/tell_plain_w"): "MXRecordIO has tell() too (MXNet: on MXIndexedRecordIO only)",
    ("attributes", "/w/uri"): "uri is a str (MXNet: a ctypes.c_char_p)",
    ("seek", "/read_idx1_then_read"): "MXNet's reader never clears dmlc's end-of-stream flag: "
    "once read() has returned None, every later read_idx()/seek()+read() returns None too",
    ("idx_offsets_bad", "/at_end"): "an .idx offset at or past the end of the .rec raises "
    "RecordIOError naming file and offset (MXNet returns None)",
    ("idx_offsets_bad", "/past_end"): "as /at_end",
    ("idx_offsets_bad", "/second_record"): "MXNet returns None after its end-of-stream (see seek)",
    ("missing_files", "/pathlib-uri"): "os.PathLike paths work (MXNet: AttributeError)",
    ("missing_files", "/"): "a missing .rec or folder raises FileNotFoundError naming the path "
    "(MXNet: MXNetError)",
    ("fork", "/child_read"): "a forked child reads on (MXNet: RuntimeError 'Forbidden operation "
    "in multiple processes' on read(); its read_idx() reopens)",
    ("pickle", "/original_is_open"): "pickling keeps the original open (MXNet closes it)",
    ("pickle", "/writer_pickle"): "an open writer refuses to pickle (TypeError): MXNet closes "
    "the original and its copy reopens the file with 'w', truncating what was written",
    ("threads", "/"): "reads are thread-safe (MXNet returns other keys' records, and "
    "sometimes raises MXNetError)",
    ("unpack_img", "/empty"): "an empty payload gives None, like any non-image (MXNet: "
    "cv2.error from cv2.imdecode)",
    ("imdecode", "/flag-1"): "flag must be 0 or 1: ValueError (MXNet: MXNetError)",
    ("imdecode", "/flag2"): "flag must be 0 or 1: ValueError (MXNet: MXNetError from a failed "
    "internal check)",
    ("imdecode", "/flag-true"): "flag=True is taken as 1 (MXNet refuses a bool)",
    ("imdecode", "/half-jpeg"): "a truncated JPEG: MXNet's bundled OpenCV 3.4 decodes it (the "
    "missing part gray); OpenCV 4.x and 5.x (cv2 in gpurec and in MXNet's own venv alike) "
    "refuse it, so gpurec raises ImageDecodeError",
}


def deliberate(probe_name: str, path: str) -> str | None:
    for (name, prefix), why in DELIBERATE.items():
        prefix = prefix.rstrip("/")
        if name == probe_name and (path == prefix or path.startswith((prefix + "/", prefix + "["))):
            return why
    return None


def run_probe(name: str, impl: str, work: Path) -> object:
    tmp = work / impl / name
    tmp.mkdir(parents=True, exist_ok=True)
    if impl == "mxnet":
        import mxnet as mx
    else:
        sys.path.insert(0, str(REPO))
        import gpurec.mxnet as mx
    return PROBES[name](mx, tmp)


def differences(mx, gr, path=""):
    """Paths where gpurec's result differs from MXNet's (exceptions: see the docstring)."""
    if isinstance(mx, dict) and "raises" in mx:
        if isinstance(gr, dict) and "raises" in gr:
            same = mx["raises"] == gr["raises"] or set(mx["kinds"]) <= set(gr["kinds"])
            return [] if same else [(path, mx, gr)]
        return [(path, mx, gr)]
    if isinstance(mx, dict) and isinstance(gr, dict):
        out = []
        for k in sorted(set(mx) | set(gr)):
            if k in ("msg", "payload_sha"):
                continue
            out += differences(mx.get(k, "<missing>"), gr.get(k, "<missing>"), f"{path}/{k}")
        return out
    if isinstance(mx, list) and isinstance(gr, list) and len(mx) == len(gr):
        out = []
        for i, (a, b) in enumerate(zip(mx, gr, strict=True)):
            out += differences(a, b, f"{path}[{i}]")
        return out
    return [] if mx == gr else [(path, mx, gr)]


def make_inputs(folder: Path) -> None:
    """Encoded images both sides decode (written by this venv's OpenCV, read by both)."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:48, 0:64]
    img = np.stack([xx * 4, yy * 5, (xx + yy) * 2], axis=-1).astype(np.uint8)
    img = np.clip(img + rng.integers(0, 20, img.shape), 0, 255).astype(np.uint8)
    jpeg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    (folder / "color.jpg").write_bytes(jpeg)
    (folder / "color.png").write_bytes(cv2.imencode(".png", img)[1].tobytes())
    gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    (folder / "gray.jpg").write_bytes(cv2.imencode(".jpg", gray)[1].tobytes())
    rgba = cv2.cvtColor(img, cv2.COLOR_BGR2BGRA)
    rgba[..., 3] = 100
    (folder / "rgba.png").write_bytes(cv2.imencode(".png", rgba)[1].tobytes())
    deep = (img.astype(np.uint16) * 257)[..., 0]
    (folder / "gray16.png").write_bytes(cv2.imencode(".png", deep)[1].tobytes())
    exif = exif_app1(6)
    (folder / "jfif-exif6.jpg").write_bytes(jpeg[:20] + exif + jpeg[20:])  # APP0 first
    (folder / "exif6-only.jpg").write_bytes(jpeg[:2] + exif + jpeg[20:])  # APP1 replaces APP0
    (folder / "bmp.bmp").write_bytes(cv2.imencode(".bmp", img)[1].tobytes())


def exif_app1(orientation: int) -> bytes:
    ifd = struct.pack("<H", 1) + struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0)
    tiff = b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0)
    return b"\xff\xe1" + struct.pack(">H", 8 + len(tiff)) + b"Exif\x00\x00" + tiff


def drive(args) -> int:
    work = Path(args.workdir)
    if work.exists():
        import shutil

        shutil.rmtree(work)
    make_inputs(work / "inputs")
    pythons = {"mxnet": args.mxnet_python, "gpurec": sys.executable}
    env = {**os.environ, "GOLDEN": str(args.golden), "PYTHONWARNINGS": "ignore"}
    report, failures = {}, 0
    names = args.only or list(PROBES)
    for name in names:
        results = {}
        for impl, python in pythons.items():
            t0 = time.perf_counter()
            proc = subprocess.run(
                [python, str(HERE), "--probe", name, "--impl", impl, "--workdir", str(work)],
                capture_output=True,
                text=True,
                timeout=300,
                env=env,
            )
            if proc.returncode != 0 or not proc.stdout.strip():
                results[impl] = {"crashed": proc.returncode, "stderr": proc.stderr[-800:]}
            else:
                results[impl] = json.loads(proc.stdout.strip().splitlines()[-1])
            results[impl + "_seconds"] = round(time.perf_counter() - t0, 2)
        diffs = [
            (path, a, b, deliberate(name, path))
            for path, a, b in differences(results["mxnet"], results["gpurec"])
        ]
        if not diffs:
            status = "same"
        elif all(why for *_, why in diffs):
            status = "deliberate"
        else:
            status = "DIFFERENT"
        failures += status == "DIFFERENT"
        report[name] = {"status": status, "diffs": diffs, **results}
        print(f"{status:10s} {name}")
        for path, a, b, why in diffs:
            print(f"    {path}{'' if why else '   <-- not explained'}")
            print(f"        mxnet:  {json.dumps(a)[:240]}\n        gpurec: {json.dumps(b)[:240]}")
        for why in dict.fromkeys(why for *_, why in diffs if why):
            print(f"    why: {why}")
    statuses = [r["status"] for r in report.values()]
    counts = {s: statuses.count(s) for s in ("same", "deliberate", "DIFFERENT")}
    print(f"\n{len(report)} probes: {counts}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 1 if failures else 0


REFERENCE_PACK_LABELS = {
    "int": 3,
    "float": 2.5,
    "float-precise": 0.1,
    "bool": True,
    "huge": 1e40,
    "empty-list": [],
    "list1": [1],
    "list2": [1, 2.5],
    "2d": [[1, 2], [3, 4]],
}


def write_reference(mx, out: Path) -> None:
    """Files and values MXNet wrote, for gpurec's tests (``tests/data/mxnet_recordio``)."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.iterdir():
        stale.unlink()
    wi = mx.recordio.MXIndexedRecordIO(str(out / "payloads.idx"), str(out / "payloads.rec"), "w")
    tells = [wi.tell()]
    keys = [*range(len(PAYLOADS)), 3]  # key 3 twice: the .idx keeps both lines
    for key, payload in zip(keys, [*PAYLOADS, b"again"], strict=True):
        wi.write_idx(key, payload)
        tells.append(wi.tell())
    wi.close()
    write_plain(mx, out / "plain.rec")
    IR = mx.recordio.IRHeader
    pack = {}
    for name, label in REFERENCE_PACK_LABELS.items():
        packed = mx.recordio.pack(IR(5, label, 7, 9), b"payload")
        header, _ = mx.recordio.unpack(packed)
        pack[name] = {
            "label": label,
            "packed": packed.hex(),
            "unpacked_label": header.label.tolist() if header.flag else header.label,
            "unpacked_flag": header.flag,
        }
    idx_parsing = {}
    write_plain(mx, out / "two.rec", [b"first", b"second"])
    for name, text in IDX_TEXTS.items():
        (out / "case.idx").write_bytes(text.encode())
        for kt in (int, str):
            try:
                ri = mx.recordio.MXIndexedRecordIO(
                    str(out / "case.idx"), str(out / "two.rec"), "r", key_type=kt
                )
                idx_parsing[f"{name}/{kt.__name__}"] = {
                    "keys": ri.keys,
                    "idx": [[k, v] for k, v in ri.idx.items()],
                }
                ri.close()
            except Exception as exc:
                idx_parsing[f"{name}/{kt.__name__}"] = {"raises": type(exc).__name__}
    (out / "case.idx").unlink()
    (out / "two.rec").unlink()
    tmp = out / "tmp"
    tmp.mkdir()
    unittest = p_mxnet_unittest_records(mx, tmp)
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    reference = {
        "written_by": f"mxnet {mx.__version__}, numpy {np.__version__}",
        "payloads": {"keys": keys, "tells": tells, "hex": [p.hex() for p in PAYLOADS]},
        "pack": pack,
        "idx_parsing": {"texts": IDX_TEXTS, "results": idx_parsing},
        "unittest_files_sha16": {k: unittest[k]["sha"] for k in ("r.rec", "i.rec", "i.idx")},
    }
    (out / "reference.json").write_text(json.dumps(reference, indent=1, sort_keys=True) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mxnet-python", default="/work/mxnet-venv/bin/python")
    parser.add_argument("--golden", default=str(REPO.parent / "shared" / "golden"))
    parser.add_argument("--workdir", default="/tmp/gpurec-crosscheck-recordio")
    parser.add_argument("--json", help="write every result here")
    parser.add_argument("--only", nargs="*", help="run these probes only")
    parser.add_argument(
        "--write-reference",
        metavar="DIR",
        help="(under MXNet's Python) write tests/data/mxnet_recordio there",
    )
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=("mxnet", "gpurec"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_reference:
        import mxnet as mx

        write_reference(mx, Path(args.write_reference))
        return 0
    if args.probe:
        print(json.dumps(run_probe(args.probe, args.impl, Path(args.workdir))))
        return 0
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
