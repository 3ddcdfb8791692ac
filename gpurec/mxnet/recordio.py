"""``mxnet.recordio`` of MXNet 1.9.1, as a thin skin over :mod:`gpurec.recordio`.

The classes and functions keep MXNet's names, signatures, return types and the errors
programs written for MXNet may rely on (``ValueError`` for a bad flag, ``TypeError`` for
a ``str`` record, ``KeyError`` for a missing key, ``struct.error`` for a short header,
``AssertionError`` for the wrong mode...). Records are framed by
:func:`gpurec.recordio.frame_record` and read by :class:`gpurec.recordio.RecordReader`,
so what is written is byte for byte what MXNet writes, and one format implementation
serves all of gpurec.

Deliberate differences, each where MXNet fails, corrupts data or says too little
(all checked against MXNet 1.9.1 by ``benchmarks/crosscheck_mxnet_recordio.py``):

- **Processes.** A reader works in forked and spawned workers (PyTorch ``DataLoader``,
  ``multiprocessing``): reads go through a read-only memory map with no shared file
  position, so a forked child simply goes on reading. MXNet raises "Forbidden operation
  in multiple processes" on ``read()`` in a child (its ``read_idx`` reopens there).
- **Pickling** does not close the original (MXNet's ``__getstate__`` does); the copy
  reopens the file and reads from the first record, as MXNet's copy does. A file open
  for writing refuses to pickle (``TypeError``): MXNet's copy reopens it with ``'w'``,
  truncating what the original wrote.
- **Threads.** ``read()``, ``read_idx()`` and ``seek()`` may be called from many threads:
  each ``read()`` returns a whole record and ``read_idx(k)`` the record of ``k`` (MXNet's
  share one file position and hand out other keys' records).
- **After the end.** Once MXNet's ``read()`` has returned ``None``, its reader stays at
  end of stream: every later ``read_idx()`` or ``seek()`` + ``read()`` returns ``None``.
  Here they return the record asked for.
- **Damaged files** raise :class:`RecordIOError`, naming the file and the byte offset: a
  truncated or corrupt ``.rec`` (MXNet: ``MXNetError``, a ``RuntimeError``; this is one
  too), and an ``.idx`` offset at or past the end of the ``.rec``, a truncated copy
  (MXNet returns ``None``). A missing file is a ``FileNotFoundError`` naming it.
- **Writing** goes straight to the files: after each ``write``/``write_idx`` the ``.rec``
  and ``.idx`` on disk hold every record so far (MXNet buffers both until ``close``), so
  a killed writer leaves an ``.idx`` that matches its ``.rec``.
- ``unpack_img`` gives ``None`` for an empty payload, like for any other non-image (MXNet
  lets ``cv2.imdecode`` raise).
- ``uri`` is the path as a ``str`` (MXNet keeps a ``ctypes.c_char_p``); paths may be
  ``os.PathLike``. ``fidx`` is ``None`` (MXNet: its open `.idx` file object). Both
  classes are context managers, and ``MXRecordIO`` has ``tell()`` too (MXNet has it on
  ``MXIndexedRecordIO`` only).
"""

from __future__ import annotations

import contextlib
import numbers
import os
import struct
import threading
from collections import namedtuple
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np

from gpurec import recordio as _format
from gpurec.recordio import (
    IR_SIZE,
    RecordReader,
    frame_record,
    parse_idx,
    peek_header,
    write_all,
)

__all__ = [
    "IRHeader",
    "MXIndexedRecordIO",
    "MXRecordIO",
    "RecordIOError",
    "pack",
    "pack_img",
    "unpack",
    "unpack_img",
]


class RecordIOError(_format.RecordIOError, RuntimeError):
    """A damaged `.rec` (truncated, corrupt) or a record too large to write.

    gpurec's :class:`gpurec.recordio.RecordIOError` (the message names the file and the
    byte offset), and a ``RuntimeError`` like the ``MXNetError`` MXNet raises there, so
    handlers written for either catch it.
    """

    @classmethod
    def of(cls, exc: _format.RecordIOError) -> RecordIOError:
        return cls(exc.reason, exc.path, offset=exc.offset, line=exc.line)


# MXNet packs the header with the native format "IfQQ": the same 24 little-endian bytes as
# gpurec.recordio's "<IfQQ" on every machine gpurec runs on, but a float label beyond
# float32's range becomes inf instead of raising OverflowError. pack() keeps that.
_IR_NATIVE = struct.Struct("IfQQ")


class MXRecordIO:
    """Reads or writes a `.rec` file record by record, as ``mxnet.recordio.MXRecordIO``.

    ``flag`` is ``'r'`` (read) or ``'w'`` (write; the file is created or truncated at
    once). ``write`` takes ``bytes``; ``read`` returns the next record as ``bytes``
    (``b''`` for an empty record) and ``None`` after the last one.

    Unlike MXNet's, a reader keeps working in forked and spawned worker processes, pickles
    without closing the original, may be shared by threads, and raises
    :class:`RecordIOError` (file and byte offset) on a damaged file; see the module
    documentation.
    """

    def __init__(self, uri: str | os.PathLike, flag: str) -> None:
        self.uri = os.fspath(uri)
        self.flag = flag
        self.pid: int | None = None
        self.is_open = False
        self._init_private()
        self.open()

    def _init_private(self) -> None:
        self._reader: RecordReader | None = None
        self._fd: int | None = None
        self._pos = 0  # reading: offset of the next record; writing: bytes written
        self._lock = threading.Lock()

    # -- opening and closing
    def open(self) -> None:
        """Open the file: for reading at its first record, for writing truncated."""
        if self.is_open:  # MXNet would leak the open handle; reopen cleanly instead
            self.close()
        if self.flag == "w":
            try:
                self._fd = os.open(self.uri, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            except OSError as exc:
                why = f"cannot open for writing: {exc.strerror}"
                raise OSError(exc.errno, why, self.uri) from None
            self.writable = True
        elif self.flag == "r":
            self._reader = RecordReader(self.uri, idx_path=None)
            self.writable = False
        else:
            raise ValueError(f"Invalid flag {self.flag!r}: MXRecordIO opens with 'r' or 'w'")
        self._pos = 0
        self._lock = threading.Lock()
        self.pid = os.getpid()
        self.is_open = True

    def close(self) -> None:
        """Close the file; closing again does nothing."""
        if not self.is_open:
            return
        if self._fd is not None:
            os.close(self._fd)  # every record is already written: nothing is buffered
            self._fd = None
        if self._reader is not None:
            # A forked child shares nothing with the parent's map but the pages: closing
            # its own copy of the map is safe in either process.
            self._reader.close()
            self._reader = None
        self.is_open = False
        self.pid = None

    def reset(self) -> None:
        """Back to the first record; a file open for writing is truncated to empty."""
        self.close()
        self.open()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # nothing to report to at interpreter teardown
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- pickling: the copy reopens the file; the original stays open
    def __getstate__(self) -> dict[str, Any]:
        if self.is_open and self.writable:
            raise TypeError(
                f"cannot pickle {type(self).__name__}({self.uri!r}) while it is open for "
                "writing: the copy would reopen the file with 'w' and truncate it "
                "(close it first, or pickle a reader)"
            )
        state = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        state.pop("pid", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_private()
        self.pid = None
        was_open, self.is_open = state.get("is_open", False), False
        if was_open:
            self.open()

    # -- state checks
    def _check_usable(self, want_writable: bool, what: str) -> None:
        if self.writable != want_writable:
            mode = "writing" if self.writable else "reading"
            raise AssertionError(f"{what} on {self.uri!r}, which is open for {mode}")
        if not self.is_open:
            raise RuntimeError(f"{what} on {self.uri!r}, which is closed (reset() reopens it)")
        if self.pid != os.getpid():
            if want_writable:  # two processes appending to one file would interleave records
                raise RuntimeError(
                    f"Forbidden operation in multiple processes: {self.uri!r} was opened for "
                    f"writing in process {self.pid}; write from that process only"
                )
            # A forked child: the read-only map and the position are its own copies; only a
            # lock some other thread of the parent held at the fork must not be inherited.
            self._lock = threading.Lock()
            self.pid = os.getpid()

    # -- writing
    def write(self, buf: bytes) -> None:
        """Append ``buf`` (``bytes``; MXNet 1.9.1 takes nothing else) as one record."""
        self._check_writable(buf, "write()")
        with self._lock:
            self._append(buf)

    def _check_writable(self, buf: bytes, what: str) -> None:
        self._check_usable(True, what)
        if not isinstance(buf, bytes):
            raise TypeError(
                f"{what} takes bytes, not {type(buf).__name__} (as MXNet's MXRecordIO); "
                "convert it with bytes(...) or .encode()"
            )

    def _append(self, buf: bytes) -> int:
        """Frame and write one record (the lock held); returns its offset."""
        offset = self._pos
        try:
            frame = frame_record(buf)
        except _format.RecordIOError as exc:
            raise RecordIOError(exc.reason, self.uri, offset=offset) from None
        self._pos += write_all(self._fd, frame, self.uri)
        return offset

    def tell(self) -> int:
        """The byte offset at which the next record will be written."""
        self._check_usable(True, "tell()")
        return self._pos

    # -- reading
    def read(self) -> bytes | None:
        """The next record (``b''`` if empty), or ``None`` after the last record."""
        self._check_usable(False, "read()")
        with self._lock:
            if self._pos >= self._reader.size:
                return None
            try:
                record, self._pos = self._reader.read_at(self._pos)
            except _format.RecordIOError as exc:
                raise RecordIOError.of(exc) from None
        return record

    def __repr__(self) -> str:
        state = "open" if self.is_open else "closed"
        return f"<{type(self).__module__}.{type(self).__name__} {self.uri!r} {self.flag!r} {state}>"


def _plain_idx(data: bytes) -> bool:
    """Whether ``data`` is an `.idx` as MXNet writes it with integer keys: only lines of
    ``digits<TAB>digits`` (signs allowed), each with exactly one tab and no empty field.

    Checked in bulk: with as many tabs as lines, every line holding the tab of its own
    rank strictly inside it means one tab per line and something on both sides of it.
    """
    if not data or data.translate(None, b"0123456789-\t\n"):
        return False
    raw = np.frombuffer(data, np.uint8)
    tabs, ends = np.flatnonzero(raw == 9), np.flatnonzero(raw == 10)
    if data[-1:] != b"\n":  # a last line without newline ends at the end of the file
        ends = np.append(ends, len(raw))
    if len(tabs) != len(ends):
        return False
    starts = np.concatenate(([0], ends[:-1] + 1))
    return bool(np.all(starts < tabs) and np.all(tabs + 1 < ends))


def _load_idx(path: str, key_type: Callable[[Any], Hashable]) -> tuple[dict, list]:
    """Read an `.idx` into MXNet's ``idx`` dict and ``keys`` list.

    An `.idx` as MXNet writes it with integer keys is parsed in bulk (millions of lines
    in a second); anything else line by line exactly as MXNet 1.9.1 does
    (``line.strip().split('\\t')``, ``key_type(line[0])``, ``int(line[1])``), so the same
    files load and the same lines fail, with the same exception types (a blank line is a
    ``ValueError``), here naming the file and line.
    """
    with open(path, "rb") as f:
        data = f.read()
    if key_type is int and _plain_idx(data):
        try:
            key_array, offsets = parse_idx(data, path)
        except (ValueError, OverflowError, _format.RecordIOError):
            pass  # a misplaced sign or a huge number: the line-by-line path says which
        else:
            keys = key_array.tolist()
            return dict(zip(keys, offsets.tolist(), strict=True)), keys
    idx: dict = {}
    keys = []
    with open(path) as f:  # text mode, as MXNet reads it
        for no, raw in enumerate(iter(f.readline, ""), 1):
            line = raw.strip().split("\t")
            try:
                key = key_type(line[0])
                idx[key] = int(line[1])
            except (ValueError, IndexError) as exc:
                if type(exc) not in (ValueError, IndexError):
                    raise
                raise type(exc)(f"{path}:{no}: {exc} (line {raw[:80]!r})") from None
            keys.append(key)
    return idx, keys


class MXIndexedRecordIO(MXRecordIO):
    """A `.rec` with its `.idx`, for reading by key, as ``mxnet.recordio.MXIndexedRecordIO``.

    ``idx`` maps each key to its record's byte offset (the last line wins for a key that
    appears twice) and ``keys`` lists the keys in `.idx` order, duplicates kept.
    ``read_idx(key)`` is a dict lookup, so NumPy integers and equal floats find the record
    of an ``int`` key. ``write_idx(key, buf)`` appends a record and its ``key<TAB>offset``
    line. With ``key_type=str`` keys stay strings.

    Beyond MXNet: usable from worker processes and threads (see :class:`MXRecordIO`), and
    ``read_idx`` of a key whose offset lies at or past the end of the `.rec` (a truncated
    copy) raises :class:`RecordIOError` naming both, where MXNet returns
    ``None``.
    """

    def __init__(
        self,
        idx_path: str | os.PathLike,
        uri: str | os.PathLike,
        flag: str,
        key_type: Callable[[Any], Hashable] = int,
    ) -> None:
        self.idx_path = os.fspath(idx_path)
        self.idx: dict = {}
        self.keys: list = []
        self.key_type = key_type
        self.fidx = None
        super().__init__(uri, flag)

    def _init_private(self) -> None:
        super()._init_private()
        self._idx_fd: int | None = None

    def open(self) -> None:
        super().open()
        self.idx, self.keys = {}, []
        try:
            if self.writable:
                self._idx_fd = os.open(self.idx_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            else:
                self.idx, self.keys = _load_idx(self.idx_path, self.key_type)
        except BaseException:  # MXNet leaves the .rec open here; close it
            super().close()
            raise

    def close(self) -> None:
        if not self.is_open:
            return
        super().close()
        if self._idx_fd is not None:
            os.close(self._idx_fd)
            self._idx_fd = None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        for name in ("idx", "keys", "fidx"):  # the copy reads the .idx again when it opens
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.idx, self.keys, self.fidx = {}, [], None
        super().__setstate__(state)

    def seek(self, idx: Hashable) -> None:
        """Make ``read()`` return the record of key ``idx`` next."""
        self._check_usable(False, "seek()")
        offset = self.idx[idx]
        with self._lock:
            self._pos = offset

    def read_idx(self, idx: Hashable) -> bytes:
        """The record of key ``idx`` (``KeyError`` if there is none)."""
        self._check_usable(False, "read_idx()")
        offset = self.idx[idx]
        reader = self._reader
        if offset >= reader.size:
            raise RecordIOError(
                f"key {idx!r} of {self.idx_path} points at or past the end of the "
                f"{reader.size}-byte file (a truncated copy?)",
                self.uri,
                offset=offset,
            )
        try:
            record, nxt = reader.read_at(offset)  # no shared position: threads never mix keys
        except _format.RecordIOError as exc:
            raise RecordIOError.of(exc) from None
        with self._lock:
            self._pos = nxt
        return record

    def write_idx(self, idx: Any, buf: bytes) -> None:
        """Append ``buf`` as a record with key ``key_type(idx)``, and its `.idx` line."""
        key = self.key_type(idx)
        self._check_writable(buf, "write_idx()")
        with self._lock:  # record and line together, even with several writing threads
            pos = self._append(buf)
            line = "%s\t%d\n" % (str(key), pos)  # noqa: UP031 - MXNet's format, verbatim
            write_all(self._idx_fd, [line.encode()], self.idx_path)
            self.idx[key] = pos
            self.keys.append(key)


# ------------------------------------------------------------------------- IRHeader

IRHeader = namedtuple("HEADER", ["flag", "label", "id", "id2"])  # MXNet's type, name and all
IRHeader.__doc__ = """MXNet's image record header: ``flag``, ``label``, ``id``, ``id2``.

``label`` is a number, or with ``flag > 0`` an array of ``flag`` float32 labels. The same
namedtuple as ``mxnet.recordio.IRHeader`` (its class is named ``HEADER``)."""


def pack(header: Sequence, s: bytes) -> bytes:
    """``header`` then ``s``, as one record payload (``mxnet.recordio.pack``).

    A numeric label (``numbers.Number``: ``int``, ``float``, NumPy scalars) goes into the
    header with ``flag`` 0, whatever ``header.flag`` said; anything else is flattened to
    float32 and stored after the header, with ``flag`` = its size (``[]`` gives flag 0
    and label 0.0).
    """
    header = IRHeader(*header)
    if isinstance(header.label, numbers.Number):
        head = _IR_NATIVE.pack(0, header.label, header.id, header.id2)
    else:
        labels = np.asarray(header.label, dtype=np.float32)
        head = _IR_NATIVE.pack(labels.size, 0, header.id, header.id2)
        head += labels.astype("<f4").tobytes()
    return head + s


def unpack(s: bytes) -> tuple[IRHeader, bytes]:
    """Split a record into its header and the rest (``mxnet.recordio.unpack``).

    With ``flag > 0`` the header's label becomes the ``flag`` float32 labels that follow
    it, as a read-only array viewing ``s``; with ``flag == 0`` it is a Python float (of
    float32 precision). A record shorter than the header raises ``struct.error``, one
    with fewer labels than ``flag`` says ``ValueError``, as in MXNet.
    """
    header = IRHeader(*peek_header(s))
    s = s[IR_SIZE:]
    if header.flag > 0:
        try:
            labels = np.frombuffer(s, np.float32, header.flag)
        except ValueError as exc:
            raise ValueError(
                f"the record header announces {header.flag} float32 labels but only "
                f"{len(s)} bytes follow it ({exc})"
            ) from None
        header = header._replace(label=labels)
        s = s[header.flag * 4 :]
    return header, s


def unpack_img(s: bytes, iscolor: int = -1) -> tuple[IRHeader, np.ndarray | None]:
    """The header and the image of a record, decoded by OpenCV (BGR, as cv2.imdecode).

    ``iscolor`` is ``cv2.imdecode``'s flag (-1: as stored, 0: grayscale, 1: BGR). The
    image is ``None`` when the payload is not an image; that includes an empty payload,
    on which MXNet raises ``cv2.error`` (InsightFace's header records have one).
    """
    import cv2

    header, s = unpack(s)
    img = np.frombuffer(s, dtype=np.uint8)
    return header, (cv2.imdecode(img, iscolor) if img.size else None)


def pack_img(header: Sequence, img: np.ndarray, quality: int = 95, img_fmt: str = ".jpg") -> bytes:
    """Encode ``img`` (BGR) with OpenCV and pack it behind ``header`` (``mxnet.recordio.pack_img``).

    ``quality`` is the JPEG quality (1-100) for ``.jpg``/``.jpeg``, the PNG compression
    level (0-9) for ``.png``; other formats get OpenCV's defaults.
    """
    import cv2

    params: list[int] = []
    if img_fmt.upper() in (".JPG", ".JPEG"):
        params = [cv2.IMWRITE_JPEG_QUALITY, quality]
    elif img_fmt.upper() == ".PNG":
        params = [cv2.IMWRITE_PNG_COMPRESSION, quality]
    ok, buf = cv2.imencode(img_fmt, img, params)
    if not ok:
        raise AssertionError(f"failed to encode image ({img_fmt}, shape {np.shape(img)})")
    return pack(header, buf.tobytes())
