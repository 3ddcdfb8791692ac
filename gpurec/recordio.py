"""MXNet RecordIO, exactly: the dmlc record framing, IRHeader, `.idx` and `.lst` files.

This module is the format and nothing else (no OpenCV, no DALI, nothing else of gpurec),
so every other part reads and writes records through one small, byte-exact place.

A `.rec` file is a sequence of records. Each record is framed as dmlc-core's
``RecordIOWriter`` frames it::

    uint32 magic = 0xced7230a | uint32 lrec | payload | zero padding to 4 bytes

``lrec`` holds a continuation flag (cflag) in its top 3 bits and the part length in the
low 29. dmlc-core cannot let the magic word appear at a 4-byte-aligned offset inside a
payload (a reader resynchronising on magic words would stop there), so the writer cuts
the payload at every such word and drops it: the first part has cflag 1, middle parts 2,
the last part 3; the reader puts one magic word back between parts. An unsplit record
has cflag 0.

An image record's payload starts with MXNet's ``IRHeader`` (``struct 'IfQQ'``: flag,
label, id, id2); when ``flag > 0`` the header's label is unused and ``flag`` float32
labels follow it (multi-label records).

An `.idx` file has one ``key<TAB>byte offset`` line per record; a `.lst` file has one
``index<TAB>label[<TAB>label...]<TAB>path`` line per image.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal, NamedTuple, Protocol

import numpy as np

__all__ = [
    "IR_SIZE",
    "MAGIC",
    "MAX_RECORD_SIZE",
    "IRHeader",
    "ListEntry",
    "RecordIOError",
    "RecordReader",
    "RecordWriter",
    "ShardReader",
    "atomic_write",
    "check_frame",
    "check_offsets",
    "first_label",
    "format_lst_line",
    "frame_record",
    "idx_path_for",
    "label_count",
    "pack",
    "parse_idx",
    "peek_frame",
    "peek_header",
    "publish_shard",
    "read_idx",
    "read_lst",
    "rebuild_idx",
    "scan_offsets",
    "temp_beside",
    "unpack",
    "unpack_view",
    "write_all",
    "write_idx",
    "write_lst",
]

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
MAX_RECORD_SIZE = (1 << 29) - 1
"""The largest payload dmlc-core can frame: the length field has 29 bits."""

_FRAME = struct.Struct("<II")
_LEN_MASK = (1 << 29) - 1
_IR = struct.Struct("<IfQQ")
IR_SIZE = _IR.size  # 24 bytes, as MXNet's struct.calcsize('IfQQ')

PathLike = str | os.PathLike


# ------------------------------------------------------------------- files put in place


def _read_umask() -> int:
    mask = os.umask(0)  # read once, at import: setting it is not thread-safe
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def temp_beside(path: Path) -> tuple[int, Path]:
    """A new temporary file of its own beside ``path`` (``.NAME.XXXXXXXX.tmp``: two
    writers of one file never share one), with the permissions a plain ``open`` gives:
    ``(fd, its path)``."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; the final file is as any other
    except BaseException:
        os.close(fd)
        os.unlink(name)
        raise
    return fd, Path(name)


@contextlib.contextmanager
def atomic_write(
    path: PathLike,
    mode: str = "wb",
    *,
    encoding: str | None = None,
    errors: str | None = None,
    newline: str | None = None,
    sync: bool = False,
) -> Iterator[IO]:
    """``with atomic_write(path) as f:``: ``f`` writes a temporary file of its own beside
    ``path`` (:func:`temp_beside`), renamed to ``path`` when the block ends; on any error
    the temporary file is removed and ``path`` is as it was. The one way gpurec writes a
    file that others may read at any moment. ``sync``: made durable (``fsync``) before
    the rename, for large outputs a crash must not leave empty under their final name."""
    path = Path(path)
    fd, tmp = temp_beside(path)
    try:
        with os.fdopen(fd, mode, encoding=encoding, errors=errors, newline=newline) as f:
            yield f
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def publish_shard(
    rec_src: PathLike, rec: PathLike, idx_src: PathLike | None, idx: PathLike | None
) -> None:
    """Move a finished shard's files to their final names in the one order that never
    shows a `.rec` beside a stale `.idx`: the old `.rec` goes first, then the new `.idx`
    is placed, then the new `.rec` (without a new `.idx`, only the `.rec` is moved)."""
    if idx_src is not None and idx is not None:
        Path(rec).unlink(missing_ok=True)
        os.replace(idx_src, idx)
    os.replace(rec_src, rec)


class RecordIOError(Exception):
    """Anything wrong with a `.rec`, `.idx` or `.lst` file.

    The message always names the file and where in it: the byte offset for records,
    the line number for text files.
    """

    def __init__(
        self,
        message: str,
        path: PathLike | None = None,
        *,
        offset: int | None = None,
        line: int | None = None,
    ) -> None:
        self.reason = message
        self.path = None if path is None else str(path)
        self.offset = offset
        self.line = line
        where = self.path or "<bytes>"
        if line is not None:
            where = f"{where}:{line}"
        if offset is not None:
            where = f"{where}: at byte {offset}"
        super().__init__(f"{where}: {message}")


# --------------------------------------------------------------------------- IRHeader


class IRHeader(NamedTuple):
    """MXNet's image record header. ``label`` is a float, or an array when ``flag > 0``."""

    flag: int
    label: float | np.ndarray
    id: int
    id2: int


def header_bytes(header: IRHeader | Sequence) -> bytes:
    """The bytes :func:`pack` puts before a payload: the IRHeader, then any labels."""
    _, label, rid, rid2 = header
    if isinstance(label, (int, float, np.integer, np.floating)):
        with np.errstate(over="ignore"):  # float32 as MXNet stores it: 1e40 becomes inf
            return _IR.pack(0, float(np.float32(label)), rid, rid2)
    labels = np.asarray(label, dtype=np.float32).ravel()
    return _IR.pack(labels.size, 0.0, rid, rid2) + labels.astype("<f4").tobytes()


def pack(header: IRHeader | Sequence, payload: bytes) -> bytes:
    """Prefix ``payload`` with ``header`` exactly as ``mxnet.recordio.pack`` does.

    A scalar label is stored in the header (flag 0). A sequence or array label, even of
    length one, is stored as ``len(label)`` float32 values after the header, with the
    header's flag set to that count and its label field 0.
    """
    return header_bytes(header) + bytes(payload)


def unpack(record: bytes | memoryview) -> tuple[IRHeader, bytes]:
    """Split a record into its ``IRHeader`` and the payload after the header and labels.

    Like ``mxnet.recordio.unpack``, a header with ``flag > 0`` gets its ``label``
    replaced by the ``flag`` float32 labels that follow it.
    """
    header, end = _header(record)
    return header, bytes(record[end:])


def unpack_view(record: bytes | memoryview) -> tuple[IRHeader, memoryview]:
    """:func:`unpack` without copying the payload: a memoryview of ``record`` (with
    :meth:`RecordReader.view_at`, of the memory-mapped file itself)."""
    header, end = _header(record)
    return header, memoryview(record)[end:]


def _header(record: bytes | memoryview) -> tuple[IRHeader, int]:
    """The IRHeader (labels included) of a record, and where its payload starts."""
    if len(record) < IR_SIZE:
        raise RecordIOError(
            f"record of {len(record)} bytes is shorter than the {IR_SIZE}-byte IRHeader"
        )
    flag, label, rid, rid2 = _IR.unpack_from(record, 0)
    if flag == 0:
        return IRHeader(0, label, rid, rid2), IR_SIZE
    end = IR_SIZE + 4 * flag
    if end > len(record):
        raise RecordIOError(
            f"IRHeader announces {flag} labels but the record has only "
            f"{len(record) - IR_SIZE} bytes after the header"
        )
    labels = np.frombuffer(record, dtype="<f4", count=flag, offset=IR_SIZE).copy()
    return IRHeader(flag, labels, rid, rid2), end


def peek_header(head: bytes | memoryview, at: int = 0) -> tuple[int, float, int, int]:
    """The IRHeader fields ``(flag, label, id, id2)`` at byte ``at`` of ``head`` (a
    record's first bytes), labels after it unread; ``struct.error`` when fewer than
    :data:`IR_SIZE` bytes are there (as ``struct.unpack`` in MXNet's ``unpack``)."""
    return _IR.unpack_from(head, at)


def label_count(head: bytes | memoryview) -> int:
    """``IRHeader.flag`` of a record's first bytes (4 are enough): how many float32
    labels follow the header, 0 for a record whose label is the header's own."""
    return int.from_bytes(bytes(head[:4]), "little")


def first_label(head: bytes | memoryview) -> float:
    """The first of the labels that follow the IRHeader (``flag > 0``), from the
    record's first ``IR_SIZE + 4`` bytes."""
    return float(np.frombuffer(head, "<f4", 1, IR_SIZE)[0])


# ------------------------------------------------------------------------ record frames


def peek_frame(buf: bytes | memoryview | mmap.mmap, at: int = 0) -> tuple[int, int, int]:
    """``(magic, cflag, length)`` of the frame header at byte ``at`` of ``buf``, unchecked
    (:func:`check_frame` checks); ``struct.error`` when fewer than 8 bytes are there."""
    magic, lrec = _FRAME.unpack_from(buf, at)
    return magic, lrec >> 29, lrec & _LEN_MASK


def _has_magic(data: memoryview) -> bool:
    """Whether the magic word sits at a 4-byte-aligned offset of ``data`` (the only
    offsets dmlc-core looks at): one vectorised compare, no copy."""
    words = np.frombuffer(data, dtype="<u4", count=data.nbytes // 4)
    return bool(np.count_nonzero(words == MAGIC))


def frame_record(
    payload: bytes | memoryview, header: IRHeader | None = None
) -> list[bytes | memoryview]:
    """The bytes dmlc-core's ``RecordIOWriter::WriteRecord`` writes for one record, as a
    list of buffers: ``payload``, or ``pack(header, payload)`` without joining the two.

    The result may be kept and written later (:meth:`RecordWriter.write_frame`): a
    read-only payload (bytes, a read-only memoryview) is referenced, a writable one is
    copied. Building frames is thread-safe, so it can run where the payloads are made.
    """
    if not memoryview(payload).readonly:  # the caller may reuse it: keep a copy
        payload = bytes(payload)
    views = [memoryview(payload).cast("B")]
    if header is not None:
        views.insert(0, memoryview(header_bytes(header)))
    size = sum(v.nbytes for v in views)
    if size > MAX_RECORD_SIZE:
        raise RecordIOError(
            f"a record of {size} bytes is too large: RecordIO holds at most "
            f"{MAX_RECORD_SIZE} bytes (2^29 - 1) per record"
        )
    pad = [bytes(-size % 4)] if size % 4 else []
    # The header and its labels are whole 4-byte words, so each part can be searched alone.
    if not any(_has_magic(v) for v in views):  # nearly always
        return [_FRAME.pack(MAGIC, size), *views, *pad]
    data = b"".join(views)
    words = np.frombuffer(data, dtype="<u4", count=size // 4)
    out: list[bytes | memoryview] = []
    view = memoryview(data)
    start = 0
    for pos in (4 * np.flatnonzero(words == MAGIC)).tolist():  # cut at each one, drop it
        out.append(_FRAME.pack(MAGIC, ((2 if start else 1) << 29) | (pos - start)))
        out.append(view[start:pos])
        start = pos + 4
    out.append(_FRAME.pack(MAGIC, ((3 if start else 0) << 29) | (size - start)))
    out.append(view[start:])
    return out + pad


def write_all(fd: int, parts: Sequence[bytes | memoryview], path: PathLike | None = None) -> int:
    """Write every buffer of ``parts`` to ``fd`` with ``writev`` (in groups under
    IOV_MAX, short writes resumed); returns the bytes written. An error names ``path``:
    "No space left on device" alone says little."""
    views = [memoryview(p).cast("B") for p in parts]
    total = sum(v.nbytes for v in views)
    first = 0
    while first < len(views):
        try:
            done = os.writev(fd, views[first : first + _IOV_PARTS])
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, None if path is None else str(path)) from None
        while first < len(views) and done >= views[first].nbytes:
            done -= views[first].nbytes
            first += 1
        if done:
            views[first] = views[first][done:]
    return total


_IOV_PARTS = 512  # buffers per writev: well under IOV_MAX (1024 on Linux)


def _sync_folder(folder: Path) -> None:
    """fsync a folder, so that renames in it are on disk (where the system allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class RecordWriter:
    """Writes a `.rec` file (and optionally its `.idx`) the way MXNet's writers do.

    Outputs are written under temporary names (``<name>.tmp``) and renamed to their
    final names by :meth:`close`, so a crash or an exception inside ``with`` never
    leaves a half-written `.rec`/`.idx` under the final name.

    Records are gathered (not copied) and written with one ``writev`` per ~1 MiB, so
    writing costs a system call per batch of records, not per record part. The file is
    made durable (``fsync``) before it gets its final name; to not pay for the whole disk
    write at that moment, a background thread syncs what is written every 32 MiB while
    writing goes on.
    """

    _FLUSH_BYTES = 1 << 20
    _FLUSH_PARTS = 512  # well under IOV_MAX (1024 on Linux)
    _SYNC_BYTES = 32 << 20

    def __init__(self, path: PathLike, idx_path: PathLike | None = None) -> None:
        self.path = Path(path)
        self.idx_path = None if idx_path is None else Path(idx_path)
        # Fixed temporary names, unlike atomic_write's: a writer killed mid-shard leaves
        # them, and the pack run again writes over them instead of beside them.
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._idx_tmp = (
            None if self.idx_path is None else self.idx_path.with_name(self.idx_path.name + ".tmp")
        )
        self._file = open(self._tmp, "wb", buffering=0)  # noqa: SIM115 - closed by close()/abort()
        self._idx = None if self._idx_tmp is None else open(self._idx_tmp, "w")  # noqa: SIM115
        self._parts: list[bytes | memoryview] = []
        self._pending = 0
        self._offset = 0
        self._synced = 0  # bytes handed to the background sync so far
        self._sync: threading.Thread | None = None
        self._sync_error: OSError | None = None
        self.sync_cpu = 0.0  # CPU seconds the background syncs took (parallel to writing)
        self.count = 0

    def tell(self) -> int:
        """Byte offset at which the next record starts."""
        return self._offset

    def write(
        self, payload: bytes | memoryview, key: int | None = None, *, header: IRHeader | None = None
    ) -> int:
        """Append one record; returns its byte offset. ``key`` defaults to its position.

        With ``header``, the record is ``pack(header, payload)``, written without joining
        the two. With an `.idx`, the line ``key<TAB>offset`` is written for it, as
        ``MXIndexedRecordIO.write_idx`` does. A read-only payload (bytes, a read-only
        memoryview) is kept by reference until the next flush, a writable one is copied.
        """
        try:
            frame = frame_record(payload, header)
        except RecordIOError as exc:
            raise RecordIOError(exc.reason, self.path, offset=self._offset) from None
        return self.write_frame(frame, key)

    def write_frame(self, frame: Sequence[bytes | memoryview], key: int | None = None) -> int:
        """Append one record already framed by :func:`frame_record`; returns its offset."""
        offset = self._offset
        written = sum(memoryview(p).nbytes for p in frame)
        self._parts += frame
        self._pending += written
        self._offset += written
        if self._pending >= self._FLUSH_BYTES or len(self._parts) >= self._FLUSH_PARTS:
            self.flush()
        if self._idx is not None:
            self._idx.write(f"{self.count if key is None else int(key)}\t{offset}\n")
        self.count += 1
        return offset

    def flush(self) -> None:
        """Write out the gathered records (``writev``; short writes are resumed)."""
        parts, self._parts, self._pending = self._parts, [], 0
        fd = self._file.fileno()
        write_all(fd, parts, self._tmp)  # a record cut at many magic words has many parts
        if self._offset - self._synced >= self._SYNC_BYTES and not self._syncing():
            self._synced = self._offset
            # The thread syncs and closes its own descriptor: however the writer ends,
            # it never syncs a number the writer closed and the system gave to another file.
            own = os.dup(fd)
            self._sync = threading.Thread(target=self._background_sync, args=(own,), daemon=True)
            self._sync.start()

    def _background_sync(self, fd: int) -> None:
        start = time.thread_time()  # the kernel's writeback, charged to this thread
        try:
            os.fdatasync(fd)
        except OSError as exc:  # raised by close(), in the writing thread
            self._sync_error = exc
        finally:
            os.close(fd)
            self.sync_cpu += time.thread_time() - start

    def _syncing(self) -> bool:
        return self._sync is not None and self._sync.is_alive()

    def _join_sync(self) -> None:
        if self._sync is not None:
            self._sync.join()
            self._sync = None
        if self._sync_error is not None:
            error, self._sync_error = self._sync_error, None
            raise OSError(error.errno, error.strerror, str(self._tmp))

    def close(self) -> None:
        """Flush, fsync and move the outputs to their final names (and sync the folder)."""
        if self._file.closed:
            return
        try:
            self.flush()
            self._join_sync()
            for handle, tmp in ((self._file, self._tmp), (self._idx, self._idx_tmp)):
                if handle is not None:
                    handle.flush()
                    try:
                        os.fsync(handle.fileno())
                    except OSError as exc:
                        raise OSError(exc.errno, exc.strerror, str(tmp)) from None
                    handle.close()
            publish_shard(self._tmp, self.path, self._idx_tmp, self.idx_path)
        except BaseException:  # disk full at the last moment: leave no temporary behind
            self.abort()
            raise
        _sync_folder(self.path.parent)  # the new names, too, survive a crash

    def abort(self) -> None:
        """Drop everything written: the temporary files are removed, finals untouched."""
        self._parts, self._pending, self._sync = [], 0, None  # a running sync closes its own fd
        for handle, tmp in ((self._file, self._tmp), (self._idx, self._idx_tmp)):
            if handle is not None:
                with contextlib.suppress(OSError):  # closing flushes, which may fail again
                    handle.close()
            if tmp is not None:
                tmp.unlink(missing_ok=True)

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# ------------------------------------------------------------------------------ reading


def check_frame(
    buf, at: int, pos: int, first: int, size: int, path: PathLike | str | None
) -> tuple[int, int, int]:
    """The frame header at byte ``pos`` of a file of ``size`` bytes, in a record that
    starts at ``first``, read from ``buf`` at ``at`` (the file mapped, ``at == pos``, or
    just those 8 bytes, ``at == 0``): ``(cflag, length, end of the frame)``, every
    field checked. One set of checks for every reader of frames."""
    if pos + 8 > size:
        if pos >= size:
            raise RecordIOError(f"past the end of the {size}-byte file", path, offset=pos)
        raise RecordIOError(
            f"truncated record: {size - pos} bytes left, a frame header needs 8", path, offset=pos
        )
    magic, lrec = _FRAME.unpack_from(buf, at)
    if magic != MAGIC:
        where = "not at a record start" if pos == first else "inside a split record"
        raise RecordIOError(f"bad magic 0x{magic:08x} ({where})", path, offset=pos)
    cflag, length = lrec >> 29, lrec & _LEN_MASK
    if cflag not in ((0, 1) if pos == first else (2, 3)):
        what = "a record start" if pos == first else "a continuation part"
        raise RecordIOError(f"unexpected cflag {cflag} for {what}", path, offset=pos)
    end = pos + 8 + ((length + 3) & ~3)
    if end > size:
        raise RecordIOError(
            f"truncated record: the frame announces {length} bytes, "
            f"{size - pos - 8} remain in the file",
            path,
            offset=pos,
        )
    return cflag, length, end


def _read_frames(
    buf, size: int, offset: int, path: PathLike | None, payload: bool = True
) -> tuple[bytes | None, int]:
    """Read the record starting at ``offset``: its payload and the next record's offset.

    ``buf`` is any buffer (an mmap here). Every length is checked against ``size``
    before use and every step moves forward, so garbage can neither hang nor crash.
    With ``payload=False`` only the frames are walked (index rebuilding, counting).
    """
    parts: list[bytes] = []
    pos = offset
    if offset < 0:  # unpack_from would count it from the end
        raise RecordIOError("negative offset", path, offset=offset)
    while True:
        cflag, length, end = check_frame(buf, pos, pos, offset, size, path)
        start = pos + 8
        if cflag == 0:
            return (buf[start : start + length] if payload else None), end
        if payload:
            parts.append(buf[start : start + length])
        pos = end
        if cflag == 3:
            return (MAGIC_BYTES.join(parts) if payload else None), pos


def idx_path_for(rec_path: PathLike) -> Path:
    """The conventional `.idx` beside a `.rec` (``train.rec`` -> ``train.idx``)."""
    return Path(rec_path).with_suffix(".idx")


class ShardReader(Protocol):
    """What a dataset asks of the reader of one `.rec`: :class:`RecordReader` (a local
    file) serves it, and so does ``gpurec.dataset``'s reader of a shard still being
    fetched from a store, each with its own code for it."""

    path: Path
    idx_path: Path | None
    size: int

    def misplaced(self, offsets: np.ndarray) -> np.ndarray: ...
    def header_only(self, offsets: np.ndarray) -> np.ndarray: ...
    def check_offsets(self, offsets: np.ndarray) -> None: ...
    def frame_at(self, offset: int) -> tuple[int, int]: ...
    def head_at(self, offset: int, n: int = IR_SIZE) -> bytes: ...
    def skip_at(self, offset: int) -> int: ...
    def read_at(self, offset: int) -> tuple[bytes, int]: ...
    def view_at(self, offset: int) -> memoryview | bytes: ...
    def mapped(self) -> memoryview | None: ...
    def close(self) -> None: ...


def check_offsets(reader: ShardReader, offsets: np.ndarray) -> None:
    """Every `.idx` offset must point at a record start of the reader's `.rec` (by its
    :meth:`~ShardReader.misplaced`, vectorised): else an error naming the first that
    does not, its `.idx` line and why."""
    if not len(offsets):
        return
    bad = reader.misplaced(offsets)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        off = int(offsets[i])
        reason = (
            f"past the end of the {reader.size}-byte file"
            if off + 8 > reader.size or off < 0
            else "not at a record start"
        )
        raise RecordIOError(
            f".idx line {i + 1} (offset {off}) points {reason} of {reader.path}",
            reader.idx_path,
            offset=off,
        )


class RecordReader:
    """Random and sequential access to a `.rec` file through a memory map.

    With an `.idx` (given, or found beside the `.rec`), ``reader[i]`` is the record of
    the i-th `.idx` line and ``reader.read_key(key)`` the record of that key. Without
    one, the record offsets are found by scanning the file once, on first need.

    Reads never move a shared file position, so one reader can serve many threads;
    a reader pickles as its paths and reopens in the receiving process.
    """

    def __init__(
        self,
        path: PathLike,
        idx_path: PathLike | Literal["auto"] | None = "auto",
    ) -> None:
        self.path = Path(path)
        if idx_path == "auto":
            found = idx_path_for(self.path)
            idx_path = found if found.exists() and found != self.path else None
        self.idx_path = None if idx_path is None else Path(idx_path)
        self._open()

    def _open(self) -> None:
        with open(self.path, "rb") as f:
            self.stat = os.fstat(f.fileno())  # of the file mapped, not of a later one
            self.size = self.stat.st_size
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self.size else b""
        self._view = memoryview(self._mm)
        self._lock = threading.Lock()
        self._keys: np.ndarray | None = None
        self._offsets: np.ndarray | None = None
        self._key_pos: dict[int, int] | None = None
        if self.idx_path is not None:
            keys, offsets = read_idx(self.idx_path)
            self.check_offsets(offsets)
            self._keys, self._offsets = keys, offsets

    def misplaced(self, offsets: np.ndarray) -> np.ndarray:
        """Which ``offsets`` cannot be record starts of this file (vectorised): negative,
        unaligned, past the end, or not on a magic word opening a record (cflag 0 or 1).
        """
        offsets = np.asarray(offsets, dtype=np.int64)
        bad = (offsets < 0) | (offsets % 4 != 0) | (offsets + 8 > self.size)
        if len(offsets) and not bad.all():
            words = np.frombuffer(self._mm, dtype="<u4", count=self.size // 4)
            w = np.where(bad, 0, offsets // 4)
            bad |= (words[w] != MAGIC) | ((words[w + 1] >> 29) > 1)
            del words  # release the buffer export so the map can close
        return bad

    def header_only(self, offsets: np.ndarray) -> np.ndarray:
        """Which records (at valid ``offsets``) hold an IRHeader with labels and nothing
        after them, as InsightFace's header and identity records do: they have no image.
        Read from the first frame of each record, vectorised (no record is read)."""
        offsets = np.asarray(offsets, dtype=np.int64)
        if not len(offsets) or self.size < 12:
            return np.zeros(len(offsets), dtype=bool)
        words = np.frombuffer(self._mm, dtype="<u4", count=self.size // 4)
        w = offsets // 4
        lrec = words[w + 1].astype(np.int64)
        flag = words[np.minimum(w + 2, len(words) - 1)].astype(np.int64)
        del words  # release the buffer export so the map can close
        length = lrec & _LEN_MASK
        return ((lrec >> 29) == 0) & (flag >= 1) & (length == IR_SIZE + 4 * flag)

    def check_offsets(self, offsets: np.ndarray) -> None:
        """Every `.idx` offset must point at a record start of this `.rec` (vectorised)."""
        check_offsets(self, offsets)

    # -- offsets and keys
    @property
    def offsets(self) -> np.ndarray:
        """Byte offset of every record, in `.idx` order (file order without one)."""
        if self._offsets is None:
            with self._lock:
                if self._offsets is None:
                    offs = np.fromiter(scan_offsets(self), dtype=np.int64)
                    self._keys = np.arange(len(offs), dtype=np.int64)
                    self._offsets = offs
        return self._offsets

    @property
    def keys(self) -> np.ndarray:
        """The `.idx` keys (positions 0..n-1 without an `.idx`)."""
        self.offsets  # noqa: B018 - builds keys with the offsets
        return self._keys

    def __len__(self) -> int:
        return len(self.offsets)

    # -- access
    def read_at(self, offset: int) -> tuple[bytes, int]:
        """The record at byte ``offset`` and the offset of the record after it."""
        payload, nxt = _read_frames(self._mm, self.size, int(offset), self.path)
        return bytes(payload), nxt

    def view_at(self, offset: int) -> memoryview | bytes:
        """The record at byte ``offset`` without copying it: a read-only view of the
        memory map (a record split into parts is joined: a copy). Loaders that decode
        straight from it allocate nothing per record, which keeps their memory flat."""
        return _read_frames(self._view, self.size, int(offset), self.path)[0]

    def mapped(self) -> memoryview | None:
        """The whole file as mapped (a view, no copy), for readers that slice many
        records out of it at once; None for an empty file."""
        return self._view if self.size else None

    def __getitem__(self, i: int) -> bytes:
        offsets = self.offsets
        n = len(offsets)
        if not -n <= i < n:
            raise IndexError(f"record {i} out of range: {self.path} has {n} records")
        return self.read_at(int(offsets[i]))[0]

    def read_key(self, key: int) -> bytes:
        """The record whose `.idx` key is ``key``."""
        if self._key_pos is None:
            keys = self.keys
            self._key_pos = {int(k): i for i, k in enumerate(keys.tolist())}
        try:
            return self[self._key_pos[int(key)]]
        except KeyError:
            raise KeyError(f"no record with key {key} in {self.idx_path or self.path}") from None

    def head_at(self, offset: int, n: int = IR_SIZE) -> bytes:
        """The first ``n`` bytes of the record at byte ``offset`` (its IRHeader by
        default), read from the first frame alone when it is long enough: header scans
        skip the image bytes."""
        offset = int(offset)
        if offset + 8 <= self.size:
            magic, lrec = _FRAME.unpack_from(self._mm, offset)
            whole = lrec >> 29 in (0, 1) and (lrec & _LEN_MASK) >= n
            if magic == MAGIC and whole and offset + 8 + n <= self.size:
                return self._mm[offset + 8 : offset + 8 + n]
        return self.read_at(offset)[0][:n]

    def frame_at(self, offset: int) -> tuple[int, int]:
        """(cflag, length) of the first frame of the record at byte ``offset``: an unsplit
        record (cflag 0) is that long, so tiny header-only records are found unread."""
        magic, lrec = _FRAME.unpack_from(self._mm, int(offset))
        if magic != MAGIC:
            raise RecordIOError(f"bad magic 0x{magic:08x}", self.path, offset=int(offset))
        return lrec >> 29, lrec & _LEN_MASK

    def skip_at(self, offset: int) -> int:
        """The offset after the record at byte ``offset``, walking its frames unread."""
        return _read_frames(self._mm, self.size, int(offset), self.path, False)[1]

    def unpack(self, i: int) -> tuple[IRHeader, bytes]:
        """Record ``i`` split into its IRHeader and payload; errors name file and offset."""
        record = self[i]
        try:
            return unpack(record)
        except RecordIOError as exc:
            raise RecordIOError(exc.reason, self.path, offset=int(self.offsets[i])) from None

    def __iter__(self) -> Iterator[bytes]:
        for off in self.offsets.tolist():
            yield self.read_at(off)[0]

    def scan(self, payloads: bool = True) -> Iterator[tuple[int, bytes | None]]:
        """Every record in file order with its offset, ignoring any `.idx`.

        ``payloads=False`` walks the frames only and yields ``None`` payloads.
        """
        pos = 0
        while pos < self.size:
            record, nxt = _read_frames(self._mm, self.size, pos, self.path, payloads)
            yield pos, record
            pos = nxt

    # -- lifetime
    def close(self) -> None:
        self._view.release()
        if isinstance(self._mm, mmap.mmap):
            # views of records still in use: the map is unmapped when the last one goes
            with contextlib.suppress(BufferError):
                self._mm.close()

    def __enter__(self) -> RecordReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        return {"path": self.path, "idx_path": self.idx_path}

    def __setstate__(self, state: dict) -> None:
        self.path, self.idx_path = state["path"], state["idx_path"]
        self._open()

    def __repr__(self) -> str:
        idx = None if self.idx_path is None else str(self.idx_path)
        return f"RecordReader({str(self.path)!r}, idx_path={idx!r})"


def scan_offsets(reader: RecordReader) -> Iterator[int]:
    """The offset of every record of a `.rec`, found by walking its frames."""
    yield from (offset for offset, _ in reader.scan(payloads=False))


# --------------------------------------------------------------------------------- .idx


_POW10 = np.array([10**k for k in range(1, 20)], dtype=np.uint64)


def _content_lines(data: bytes) -> int:
    """How many lines of ``data`` hold more than whitespace, counted in bulk for an
    `.idx` as MXNet and gpurec write them (digits, tabs, newlines); any other file is
    counted line by line."""
    if data.translate(None, b"0123456789-\t\n"):
        return sum(1 for line in data.splitlines() if line.strip())
    newline = np.frombuffer(data.translate(None, b"\t"), np.uint8) == ord("\n")
    if not len(newline):
        return 0
    # a line with content ends where a non-newline byte is followed by a newline (or EOF)
    return int(np.count_nonzero(~newline[:-1] & newline[1:])) + int(not newline[-1])


def _idx_text(keys: Iterable[int], offsets: Iterable[int]) -> bytes:
    """The ``key<TAB>offset`` lines of an `.idx`, as ``f"{int(k)}\\t{int(o)}\\n"`` writes
    them, formatted in bulk: each column becomes a fixed-width matrix of ASCII digits,
    and a mask keeps the sign and significant digits."""
    try:
        columns = [
            np.asarray(v if isinstance(v, np.ndarray) else list(v), dtype=np.int64).ravel()
            for v in (keys, offsets)
        ]
    except OverflowError:  # beyond int64: Python's own formatting
        return "".join(f"{int(k)}\t{int(o)}\n" for k, o in zip(keys, offsets, strict=True)).encode()
    if len(columns[0]) != len(columns[1]):
        raise ValueError(f"{len(columns[0])} keys but {len(columns[1])} offsets")
    chars, keep = [], []
    for values, end in zip(columns, b"\t\n", strict=True):
        magnitude = np.abs(values).astype(np.uint64)  # |-2**63| wraps to 2**63, exactly
        digits = 1 + np.searchsorted(_POW10, magnitude, side="right")
        width = int(digits.max(initial=1))
        col = np.empty((len(values), width + 2), np.uint8)
        col[:, 0], col[:, -1] = ord("-"), end
        rest = magnitude.copy()
        for k in range(width, 0, -1):  # least significant digit last
            col[:, k] = ord("0") + rest % 10
            rest //= 10
        mask = np.ones_like(col, dtype=bool)
        mask[:, 0] = values < 0
        mask[:, 1:-1] = np.arange(width, 0, -1) <= digits[:, None]
        chars.append(col)
        keep.append(mask)
    return np.concatenate(chars, axis=1)[np.concatenate(keep, axis=1)].tobytes()


def _between_tabs(data: bytes) -> bytes:
    """The tabs and newlines of ``data`` with each tab followed by the next separator: a
    tab there means two tabs on one line (``1\t2\t3``), which the counts alone miss."""
    raw = np.frombuffer(data, np.uint8)
    seps = raw[(raw == 9) | (raw == 10)]
    return bytes(seps[1:][seps[:-1] == 9])


def read_idx(path: PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Keys and offsets of an `.idx` file as two int64 arrays, in file order.

    Parsed in bulk (one split, one conversion), so a million-line index loads in a
    fraction of a second; only when that fails is it read line by line, to name the
    malformed line.
    """
    return parse_idx(Path(path).read_bytes(), path)


def parse_idx(data: bytes, path: PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Keys and offsets of the text of an `.idx` (see :func:`read_idx`; ``path`` names
    the file in errors): the one bulk parser of `.idx` files."""
    rows = _content_lines(data)
    fields = data.split()
    if len(fields) == 2 * rows and data.count(b"\t") == rows and b"\t" not in _between_tabs(data):
        try:
            table = np.array(fields, dtype=np.int64).reshape(-1, 2)
            return table[:, 0].copy(), table[:, 1].copy()
        except ValueError:
            pass
    for no, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(b"\t")
        if len(parts) != 2:
            raise RecordIOError(f"expected 'key<TAB>offset', got {line[:80]!r}", path, line=no)
        for what, value in zip(("key", "offset"), parts, strict=True):
            try:
                int(value)
            except ValueError:
                raise RecordIOError(
                    f"{what} {value.strip()[:40]!r} is not an integer", path, line=no
                ) from None
    raise RecordIOError("malformed .idx", path)  # pragma: no cover - a line fails above


def write_idx(path: PathLike, keys: Iterable[int], offsets: Iterable[int]) -> None:
    """Write an `.idx` (``key<TAB>offset`` lines), atomically."""
    text = _idx_text(keys, offsets)
    with atomic_write(path) as f:
        f.write(text)


def rebuild_idx(
    rec_path: PathLike,
    idx_path: PathLike | None = None,
    *,
    keys: Literal["id", "position"] = "id",
    intact: bool = False,
) -> Path:
    """Recreate the `.idx` of a `.rec` by scanning it; returns the `.idx` path.

    ``keys="id"`` keys each record by its IRHeader id, which is what im2rec and
    ``MXIndexedRecordIO`` users write; ``"position"`` numbers records 0..n-1.
    A file that is cut short (or broken) raises, naming where; with ``intact=True`` the
    records before that point are indexed and the rest is left out.
    """
    rec_path = Path(rec_path)
    idx_path = idx_path_for(rec_path) if idx_path is None else Path(idx_path)
    key_list: list[int] = []
    offsets: list[int] = []
    with RecordReader(rec_path, idx_path=None) as reader:
        records = reader.scan()
        if intact:
            records = _until_broken(records)
        for offset, record in records:
            if keys == "id":
                if len(record) < IR_SIZE:
                    raise RecordIOError(
                        "record has no IRHeader to take an id from (use keys='position')",
                        rec_path,
                        offset=offset,
                    )
                key_list.append(_IR.unpack_from(record, 0)[2])
            else:
                key_list.append(len(offsets))
            offsets.append(offset)
    write_idx(idx_path, key_list, offsets)
    return idx_path


def _until_broken(records: Iterator[tuple[int, bytes | None]]):
    """The records of a scan up to the first one that cannot be read."""
    with contextlib.suppress(RecordIOError):
        yield from records


# --------------------------------------------------------------------------------- .lst


@dataclass(frozen=True)
class ListEntry:
    """One `.lst` line: the record index, its label(s) and the image path (relative)."""

    index: int
    labels: tuple[float, ...]
    path: str


def read_lst(path: PathLike, skipped: list[tuple[str, str]] | None = None) -> Iterator[ListEntry]:
    """Yield the entries of a `.lst` file lazily (lists can hold millions of lines).

    Parsed as MXNet's im2rec parses it: the line and each field are stripped of white
    space; labels may be written ``3`` or ``3.000000``; CRLF line ends, a last line
    without newline and blank lines are fine. A malformed line raises naming the line,
    or, given a ``skipped`` list, is appended to it as ``("line N", reason)`` and passed
    over (im2rec prints and skips such lines).
    """
    with open(path, encoding="utf-8", newline="") as f:
        for no, raw in enumerate(f, 1):
            parts = [field.strip() for field in raw.strip().split("\t")]
            if parts == [""]:
                continue
            reason = None
            if len(parts) < 3:
                reason = (
                    f"expected 'index<TAB>label[<TAB>label...]<TAB>path', "
                    f"got {len(parts)} field(s): {raw.strip()[:80]!r}"
                )
            elif not parts[-1]:
                reason = "empty image path"
            else:
                try:
                    index = int(parts[0])
                except ValueError:
                    reason = f"index {parts[0][:40]!r} is not an integer"
                try:
                    labels = tuple(float(x) for x in parts[1:-1])
                except ValueError:
                    reason = reason or f"non-numeric label in {parts[1:-1]!r}"
            if reason is None:
                yield ListEntry(index, labels, parts[-1])
            elif skipped is None:
                raise RecordIOError(reason, path, line=no)
            else:
                skipped.append((f"{Path(path).name} line {no}", reason))


def format_lst_line(entry: ListEntry) -> str:
    """One `.lst` line as MXNet 1.9.1's im2rec writes it (labels as ``%f``)."""
    if any(c in entry.path for c in "\t\n\r") or entry.path != entry.path.strip():
        raise RecordIOError(
            f"image path {entry.path!r} holds a tab or newline, or starts or ends with white "
            "space, and cannot go into a .lst"
        )
    labels = "".join(f"{label:f}\t" for label in entry.labels)
    return f"{entry.index}\t{labels}{entry.path}\n"


def write_lst(path: PathLike, entries: Iterable[ListEntry]) -> int:
    """Write a `.lst` atomically; returns the number of lines."""
    n = 0
    with atomic_write(path, "w", encoding="utf-8", newline="\n") as f:
        for entry in entries:
            f.write(format_lst_line(entry))
            n += 1
    return n
