"""The small public helpers of gpurec.recordio that the rest of gpurec writes and reads
through: atomic_write, publish_shard, the header and frame peeks, parse_idx, and the
ShardReader protocol both readers serve."""

from __future__ import annotations

import struct
import threading
from pathlib import Path

import numpy as np
import pytest

from gpurec.recordio import (
    IR_SIZE,
    MAGIC,
    IRHeader,
    RecordIOError,
    RecordReader,
    RecordWriter,
    ShardReader,
    atomic_write,
    first_label,
    frame_record,
    label_count,
    pack,
    parse_idx,
    peek_frame,
    peek_header,
    publish_shard,
)


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text("old")
    with pytest.raises(ZeroDivisionError), atomic_write(path, "w") as f:
        f.write("half")
        1 / 0  # noqa: B018
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write("new")
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_atomic_writers_of_one_file_never_share_a_temporary_name(tmp_path: Path) -> None:
    path = tmp_path / "shared.bin"
    barrier = threading.Barrier(8)
    names: list[str] = []
    errors: list[BaseException] = []

    def write(k: int) -> None:
        try:
            with atomic_write(path) as f:
                names.append(f.name)
                barrier.wait(10)  # all eight temporaries exist at once
                f.write(bytes([k]) * 100_000)
        except BaseException as exc:  # pragma: no cover - the failure is reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and len(set(names)) == 8
    data = path.read_bytes()
    assert len(data) == 100_000 and data == data[:1] * 100_000  # one writer's bytes, whole
    assert [p.name for p in tmp_path.iterdir()] == ["shared.bin"]


def test_publish_shard_never_shows_a_rec_beside_a_stale_idx(tmp_path: Path, monkeypatch) -> None:
    out, new = tmp_path / "out", tmp_path / "new"
    out.mkdir()
    new.mkdir()
    (out / "ds.rec").write_bytes(b"old rec")
    (out / "ds.idx").write_bytes(b"old idx")
    (new / "ds.rec").write_bytes(b"new rec")
    (new / "ds.idx").write_bytes(b"new idx")
    seen = []
    import os

    real_replace = os.replace

    def watching(src, dst):  # what a reader could see before each move
        seen.append({p.name: p.read_bytes() for p in out.iterdir()})
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", watching)
    publish_shard(new / "ds.rec", out / "ds.rec", new / "ds.idx", out / "ds.idx")
    monkeypatch.undo()
    seen.append({p.name: p.read_bytes() for p in out.iterdir()})
    assert seen[-1] == {"ds.rec": b"new rec", "ds.idx": b"new idx"}
    for state in seen:
        if "ds.rec" in state and "ds.idx" in state:
            assert state["ds.rec"][:3] == state["ds.idx"][:3], state  # old with old, new with new


def test_peeks_read_what_pack_and_frame_record_wrote() -> None:
    one = pack(IRHeader(0, 7.0, 11, 12), b"payload")
    many = pack(IRHeader(0, np.array([3.0, 4.0], np.float32), 21, 22), b"x")
    assert peek_header(one) == (0, 7.0, 11, 12)
    assert peek_header(many)[0] == 2 == label_count(many) and label_count(one) == 0
    assert first_label(many) == 3.0
    framed = b"".join(bytes(part) for part in frame_record(one))
    assert peek_frame(framed) == (MAGIC, 0, len(one))
    assert peek_header(framed, 8)[2] == 11
    with pytest.raises(struct.error):
        peek_header(one[: IR_SIZE - 1])
    with pytest.raises(struct.error):
        peek_frame(framed[:7])


def test_parse_idx_is_read_idx_on_bytes(tmp_path: Path) -> None:
    keys, offsets = parse_idx(b"0\t0\n5\t24\n-1\t48\n")
    assert keys.tolist() == [0, 5, -1] and offsets.tolist() == [0, 24, 48]
    with pytest.raises(RecordIOError, match=r"bad\.idx:2: key b.x. is not an integer"):
        parse_idx(b"0\t0\nx\t24\n", tmp_path / "bad.idx")


def test_both_readers_serve_the_shard_reader_protocol(tmp_path: Path) -> None:
    from gpurec.dataset import _FetchingReader

    members = [name for name in dir(ShardReader) if not name.startswith("_")]
    members += list(ShardReader.__annotations__)
    with RecordWriter(tmp_path / "a.rec", tmp_path / "a.idx") as writer:
        writer.write(pack(IRHeader(0, 1.0, 0, 0), b"img"), key=0)
    local = RecordReader(tmp_path / "a.rec")
    remote = _FetchingReader(tmp_path / "a.rec", "memory://a.rec", local.size,
                             lambda: tmp_path / "a.rec", lambda a, b: b"")  # fmt: skip
    for reader in (local, remote):
        missing = [m for m in members if not hasattr(reader, m)]
        assert not missing, (type(reader).__name__, missing)
    with pytest.raises(RecordIOError, match=r"\.idx line 1 \(offset 3\) points not at a record"):
        remote.check_offsets(np.array([3]))
    with pytest.raises(RecordIOError, match=r"\.idx line 1 \(offset 3\) points not at a record"):
        local.check_offsets(np.array([3]))
    whole = (tmp_path / "a.rec").read_bytes()
    assert bytes(local.mapped()) == whole
    assert remote.mapped() is None  # not arrived: no wait for the fetch
    remote.read_at(0)
    assert bytes(remote.mapped()) == whole
    local.close()
    remote.close()
