"""Several `.rec` shards, whatever their layout, read as one dataset of samples.

Resolves what a user passes as a source (a `.rec`, a prefix, a glob, or a list of
those) into shards, and finds in each shard the records that are samples:

- **plain** (im2rec, ``gpurec pack``, ``MXIndexedRecordIO``): every record of the `.idx`,
  in `.idx` order.
- **InsightFace** (MS1M, Glint360K, WebFace as `.rec`): record 0 (`.idx` key 0, flag >= 2,
  no payload) declares the image keys ``1 .. label[0]-1``; the identity records after
  them (no payload, label = a key range) are not samples. The samples are those keys in
  key order, labelled as insightface's ``MXFaceDataset`` labels them (the first label).
- **no `.idx`** (insightface's shuffled files, anything written with plain
  ``MXRecordIO``): the records in file order, found by one scan of the frames. The scan
  is cached (beside the file when its folder is writable, else under
  ``$GPUREC_CACHE/index``, ``~/.cache/gpurec/index`` by default) and rebuilt when the
  file's size or modification time changes.

In every layout, header-only records (flag >= 1 labels and nothing after them, like
InsightFace's identity records) are not samples: they hold no image.
- **cut short** (an interrupted copy, a full disk): with ``on_error="raise"`` opening
  fails, naming the file and the byte where it ends; with ``"skip"`` every intact record
  is a sample and :attr:`Dataset.lost` counts the records lost (one when no `.idx` says
  how many were there).

Samples are numbered 0..N-1 in shard order; :meth:`Dataset.read` returns the record of
sample ``i`` (IRHeader + payload), which is all the backends need.

A source at a URL (:func:`open_source`) is opened before its `.rec` files are local: its
`.idx` files are fetched into the shard cache and the `.rec` files are fetched in the
background (:class:`gpurec.cache.ShardFetcher`), a read waiting for its shard. Without
the bytes, such a shard's samples are its `.idx` records (InsightFace's declared keys when
its key-0 record, read by one ranged read, says so); no record is taken for header-only
and only the offsets' bounds are checked. When the shard arrives it is opened as a local
file is, and read only if that finds the same samples (:class:`_FetchingReader`).
Shards without an `.idx` are fetched, and scanned, when the source is opened.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import sys
import threading
import weakref
from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gpurec.naming import cache_home, is_url, scan_cache_name, select_shards
from gpurec.recordio import (
    IR_SIZE,
    MAGIC,
    IRHeader,
    RecordIOError,
    RecordReader,
    ShardReader,
    atomic_write,
    check_frame,
    check_offsets,
    first_label,
    header_bytes,
    idx_path_for,
    peek_frame,
    peek_header,
    read_idx,
    unpack,
)

if TYPE_CHECKING:
    from gpurec.cache import ShardFetcher

__all__ = ["Dataset", "Shard", "index_cache_dir", "open_shard", "open_source", "resolve_source"]

_CACHE_VERSION = 1
_PROGRESS_BYTES = 256 << 20  # scans of larger files show a progress bar on a terminal


def _resolve_one(item: str | os.PathLike) -> list[Path]:
    text = os.fspath(item)
    if any(c in text for c in "*?["):
        found = sorted(Path(p) for p in glob.glob(text) if p.endswith(".rec"))
        if not found:
            raise FileNotFoundError(f"no .rec files match {text!r}")
        return found
    path = Path(text)
    if path.suffix == ".rec":
        if not path.is_file():
            raise FileNotFoundError(f"record file not found: {path}")
        return [path]
    single = Path(text + ".rec")
    if single.is_file():
        return [single]
    try:
        names = os.listdir(path.parent)
    except (FileNotFoundError, NotADirectoryError):
        names = []
    return [path.parent / name for name in select_shards(path.name, names, text)]


def resolve_source(source: str | os.PathLike | Sequence[str | os.PathLike], **remote) -> list[Path]:
    """The `.rec` files a source names: a path, a prefix (``PREFIX.rec`` or all of
    ``PREFIX-KKKKK-of-NNNNN.rec``), a glob, or a list of any of these, in order.
    A URL (``s3://bucket/ds_train``) names shards in object storage: they are fetched
    into the local shard cache (:meth:`gpurec.cache.ShardCache.fetch_all`; ``remote``:
    its ``cache_dir``, ``cache_limit``, ``storage_options``) and their local paths returned."""
    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not items:
        raise ValueError("source is empty: give a .rec path, a prefix, a glob or a list")
    urls = [i for i in items if is_url(i)]
    fetched: dict[str, list[Path]] = {}
    if urls:  # all of them fetched first, then one eviction that keeps every one
        from gpurec.cache import ShardCache

        cache = ShardCache(**remote)
        fetched = dict(zip(urls, cache.fetch_all(urls), strict=True))
    out: list[Path] = []
    for item in items:
        out += fetched[item] if item in fetched else _resolve_one(item)
    return out


# ------------------------------------------------------------------------------ shards


@dataclass
class Shard:
    """One `.rec` file: where its samples are, and what else it holds.

    ``offsets`` are the byte offsets of the sample records, in sample order; ``keys``
    their `.idx` keys (positions in the file when there is no `.idx`). ``index`` says
    where the offsets came from: ``"idx"`` (the `.idx` beside the file), ``"cache"`` (a
    cached scan, ``index_file``) or ``"scan"`` (scanned now). ``other`` counts records
    that are not samples (InsightFace header and identity records), ``lost`` the records
    lost to a cut (``end``: the error that says where the file breaks off).
    ``reader`` is a :class:`_FetchingReader` for a shard still being fetched.
    """

    reader: ShardReader
    offsets: np.ndarray
    keys: np.ndarray
    layout: str  # "plain" or "insightface"
    index: str  # "idx", "cache" or "scan"
    index_file: Path | None = None  # the .idx, or the cached scan
    other: int = 0
    lost: int = 0
    unindexed: int = 0  # bytes after the last indexed record (an .idx cut short?)
    end: RecordIOError | None = None
    first_label_only: bool = False

    @property
    def path(self) -> Path:
        return self.reader.path

    def __len__(self) -> int:
        return len(self.offsets)


def index_cache_dir() -> Path:
    """Where scans of index-less files are cached when their own folder is read-only."""
    return cache_home("index")


def _cache_candidates(rec: Path, cache_dir: Path | None) -> list[Path]:
    """The cached-scan files of ``rec``: beside it, then in the cache folder."""
    name = scan_cache_name(rec.name)
    digest = hashlib.sha1(str(rec.resolve()).encode()).hexdigest()[:16]
    folder = index_cache_dir() if cache_dir is None else Path(cache_dir)
    return [rec.with_name(name), folder / f"{digest}-{name}"]


@dataclass
class _Scan:
    """What one walk over a `.rec` found: record offsets, which records are samples, and
    what stopped the walk early (None: the file ended on a record boundary)."""

    offsets: np.ndarray
    samples: np.ndarray  # bool per record
    end_offset: int | None = None
    end_reason: str | None = None


def _scan(reader: RecordReader, progress: Callable[[int], None] | None) -> _Scan:
    """Walk every frame of ``reader``'s file once, noting each record's offset and
    whether it is header-only (flag >= 1 and nothing after the labels: InsightFace's
    header and identity records), up to the end or the first record that breaks."""
    offsets: list[int] = []
    pos, size, reported = 0, reader.size, 0
    end_offset = end_reason = None
    while pos < size:
        try:
            nxt = reader.skip_at(pos)
        except RecordIOError as exc:
            end_offset, end_reason = pos, exc.reason
            break
        offsets.append(pos)
        pos = nxt
        if progress is not None and pos - reported >= 1 << 24:
            progress(pos - reported)
            reported = pos
    if progress is not None:
        progress(pos - reported)
    found = np.array(offsets, dtype=np.int64)
    return _Scan(found, ~reader.header_only(found), end_offset, end_reason)


@contextlib.contextmanager
def _scan_progress(rec: Path, size: int) -> Iterator[Callable[[int], None] | None]:
    """A progress bar for the scan of a large file, on a terminal only."""
    if size < _PROGRESS_BYTES or not sys.stderr.isatty():
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        transient=True,
    ) as bar:
        task = bar.add_task(f"indexing {rec.name} (no .idx; once)", total=size)
        yield lambda n: bar.advance(task, n)


def _load_cached(path: Path, stat: os.stat_result) -> _Scan | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            ok = (
                int(z["version"]) == _CACHE_VERSION
                and int(z["size"]) == stat.st_size
                and int(z["mtime_ns"]) == stat.st_mtime_ns
            )
            if not ok:
                return None
            end = int(z["end_offset"])
            return _Scan(
                z["offsets"].astype(np.int64),
                z["samples"].astype(bool),
                None if end < 0 else end,
                str(z["end_reason"]) or None,
            )
    except Exception:  # missing, unreadable, torn or not ours (EOFError, BadZipFile...): rescan
        return None


def _store_cached(candidates: list[Path], stat: os.stat_result, scan: _Scan) -> Path | None:
    """Write the scan atomically to the first place that takes it; None if none does."""
    for path in candidates:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(path) as f:
                np.savez(
                    f,
                    version=_CACHE_VERSION,
                    size=stat.st_size,
                    mtime_ns=stat.st_mtime_ns,
                    offsets=scan.offsets,
                    samples=scan.samples,
                    end_offset=-1 if scan.end_offset is None else scan.end_offset,
                    end_reason=scan.end_reason or "",
                )
            return path
        except OSError:
            pass
    return None


def _cut_error(
    rec: Path | str, size: int, at: int, reason: str, intact: int, lost: str
) -> RecordIOError:
    return RecordIOError(
        f"the file is cut short or broken: it ends at byte {size}, and the record at byte "
        f"{at} cannot be read ({reason}); {intact} intact record(s) before it, {lost}. "
        "on_error='skip' loads the intact records; `gpurec index --intact` indexes them",
        rec,
        offset=at,
    )


def _open_indexed(reader: ShardReader, idx: Path, on_error: str) -> Shard:
    keys, offsets = read_idx(idx)
    rec, size = getattr(reader, "url", reader.path), reader.size  # errors name the URL if remote
    misplaced = reader.misplaced(offsets)
    past_end = misplaced & (offsets + 8 > size) & (offsets >= 0)
    if (misplaced & ~past_end).any():  # a wrong .idx, not a short file: always an error
        reader.check_offsets(offsets)
    lost_mask = past_end.copy()
    end = None
    records_end = 0  # where the last indexed record ends
    if len(offsets) and not past_end.all():  # only the last record can be cut part-way
        last = int(np.argmax(np.where(past_end, -1, offsets)))
        try:
            records_end = reader.skip_at(int(offsets[last]))
        except RecordIOError as exc:
            lost_mask |= offsets == offsets[last]
            end = exc
    header_lost = bool((keys[lost_mask] == 0).any())  # an InsightFace header written last
    if lost_mask.any():
        first_lost = int(offsets[lost_mask].min())
        if end is not None:
            reason = end.reason
        elif first_lost < size:
            reason = "the file ends inside its frame header"
        else:
            reason = "past the end of the file"
        intact = int((~lost_mask).sum())
        lost = f"{int(lost_mask.sum())} lost"
        error = _cut_error(rec, size, first_lost, reason, intact, lost)
        if on_error == "raise":
            raise error
        keys, offsets = keys[~lost_mask], offsets[~lost_mask]
        end = error
    lost = int(lost_mask.sum())
    shard = Shard(reader, offsets, keys, "plain", "idx", idx, lost=lost, end=end)
    if end is None and records_end < size:  # e.g. an .idx cut short: records it misses
        shard.unindexed = size - records_end
    insightface = _insightface(shard, on_error)
    if insightface is not None:
        insightface.unindexed = shard.unindexed
        return insightface
    image = ~reader.header_only(offsets)  # e.g. InsightFace identity records, key 0 cut off
    if header_lost:  # an InsightFace file whose header (written last) was cut off: keep
        image &= keys >= 1  # reading it as one, image keys in key order, first label
        keys, offsets = _last_wins(keys[image], offsets[image])
        return Shard(
            reader, offsets, keys, "insightface", "idx", idx, other=int((~image).sum()),
            lost=lost, end=end, first_label_only=True,
        )  # fmt: skip
    if not image.all():
        shard.keys, shard.offsets, shard.other = keys[image], offsets[image], int((~image).sum())
    return shard


def _last_wins(keys: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keys sorted, each with the offset of its last `.idx` line (as a dict reads it)."""
    unique, pos = np.unique(keys[::-1], return_index=True)
    return unique, offsets[::-1][pos]


def _insightface(shard: Shard, on_error: str) -> Shard | None:
    """The InsightFace view of an indexed shard whose key 0 is a header-only record with
    flag >= 2, or None. Keys ``1 .. label[0]-1`` are the samples, as ``MXFaceDataset``
    reads them (the `.idx` as a dict: the last line of a key wins)."""
    keys, offsets, reader = shard.keys, shard.offsets, shard.reader
    zero = np.flatnonzero(keys == 0)
    if not len(zero):
        return None
    at = int(offsets[zero[-1]])
    cflag, length = reader.frame_at(at)
    head = reader.head_at(at, min(length, IR_SIZE + 8))
    if cflag != 0 or len(head) < IR_SIZE + 8:
        return None
    flag, *_ = peek_header(head)
    if flag < 2 or length != IR_SIZE + 4 * flag:
        return None
    first_end = int(first_label(head))
    rev_keys, key_offsets = _last_wins(keys, offsets)
    want = np.arange(1, max(first_end, 1), dtype=np.int64)
    where = np.searchsorted(rev_keys, want)
    found = (where < len(rev_keys)) & (rev_keys[np.minimum(where, len(rev_keys) - 1)] == want)
    missing = int((~found).sum())
    if missing and on_error == "raise" and not shard.lost:
        raise RecordIOError(
            f"InsightFace header (key 0) declares image keys 1..{first_end - 1}, but "
            f"{missing} of them are not in the .idx (first: key {int(want[~found][0])})",
            shard.index_file,
        )
    sample_keys, sample_offsets = want[found], key_offsets[where[found]]
    image = ~reader.header_only(sample_offsets)  # never a record without an image
    sample_keys, sample_offsets = sample_keys[image], sample_offsets[image]
    return Shard(
        reader,
        sample_offsets,
        sample_keys,
        "insightface",
        shard.index,
        shard.index_file,
        other=len(rev_keys) - len(sample_keys),
        lost=shard.lost + (missing if not shard.lost else 0),
        end=shard.end,
        first_label_only=True,
    )


def _open_scanned(reader: RecordReader, on_error: str, cache_dir: Path | None) -> Shard:
    rec = reader.path
    stat = reader.stat  # of the file as mapped: a file still growing is not cached as whole
    candidates = _cache_candidates(rec, cache_dir)
    source, index_file, scan = "cache", None, None
    for path in candidates:
        scan = _load_cached(path, stat)
        if scan is not None:
            index_file = path
            break
    if scan is None:
        with _scan_progress(rec, reader.size) as progress:
            scan = _scan(reader, progress)
        unchanged = os.stat(rec)
        if (unchanged.st_size, unchanged.st_mtime_ns) == (stat.st_size, stat.st_mtime_ns):
            source, index_file = "scan", _store_cached(candidates, stat, scan)
        else:  # changed while we scanned (a copy still running): use the scan, keep none
            source = "scan"
    end = None
    if scan.end_offset is not None:
        end = _cut_error(
            rec, reader.size, scan.end_offset, scan.end_reason or "", len(scan.offsets),
            "the rest is lost (no .idx says how many records it held)",
        )  # fmt: skip
        if on_error == "raise":
            raise end
    offsets = scan.offsets[scan.samples]
    keys = np.flatnonzero(scan.samples).astype(np.int64)
    other = int((~scan.samples).sum())
    return Shard(
        reader, offsets, keys, "plain", source, index_file,
        other=other, lost=int(end is not None), end=end,
    )  # fmt: skip


def open_shard(
    rec: str | os.PathLike, on_error: str = "raise", cache_dir: str | os.PathLike | None = None
) -> Shard:
    """Open one `.rec` and find its samples (see the module docstring for the layouts)."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    reader = RecordReader(rec, idx_path=None)
    try:
        idx = idx_path_for(reader.path)
        if idx.is_file() and idx != reader.path:
            return _open_indexed(reader, idx, on_error)
        return _open_scanned(reader, on_error, None if cache_dir is None else Path(cache_dir))
    except BaseException:
        reader.close()
        raise


class _FetchingReader:
    """The reader of a shard whose `.rec` is being fetched into the cache (its `.idx` is
    local), standing in for a :class:`RecordReader` until the bytes are here.

    Before that it answers what opening the shard asks (:func:`_open_indexed`) from the
    store: the file's size (the listing's) and the first bytes of a record (one ranged
    read each, kept: the InsightFace header at key 0, the Pipeline's label width). It
    cannot see every record, so offsets are checked against the size only, no record is
    header-only, and the last record is taken to end the file. The first read of a
    record waits for the fetch (``fetch``), opens the local file as a local shard is
    opened, and reads through it only if that finds the samples the dataset was opened
    with (``expect``); otherwise every read raises a ValueError naming the URL.
    """

    def __init__(
        self,
        path: Path,
        url: str,
        size: int,
        fetch: Callable[[], Path],
        read_range: Callable[[int, int], bytes],
    ) -> None:
        self.path, self.url, self.size = path, url, size
        self.idx_path = path.with_suffix(".idx")
        self._fetch, self._read_range = fetch, read_range
        self._heads: dict[int, bytes] = {}
        self._reader: RecordReader | None = None
        self._failed: ValueError | None = None  # bytes that disagree with the .idx
        self._closed = False
        self._opening = threading.Lock()
        self._expect: Shard | None = None
        self._on_error = "raise"
        _LIVE_READERS.add(self)

    def _after_fork(self) -> None:
        """In a forked child: a new lock (a parent's thread may hold the old one, waiting)."""
        self._opening = threading.Lock()

    def expect(self, shard: Shard, on_error: str) -> None:
        """The samples the dataset was opened with: the local file must give the same."""
        self._expect, self._on_error = shard, on_error

    # -- what opening the shard asks, before the bytes are here
    def misplaced(self, offsets: np.ndarray) -> np.ndarray:
        offsets = np.asarray(offsets, dtype=np.int64)
        return (offsets < 0) | (offsets % 4 != 0) | (offsets + 8 > self.size)

    def header_only(self, offsets: np.ndarray) -> np.ndarray:
        return np.zeros(len(offsets), dtype=bool)

    def check_offsets(self, offsets: np.ndarray) -> None:
        check_offsets(self, offsets)  # RecordReader's messages, from the checks above

    def skip_at(self, offset: int) -> int:
        """The offset after the record at ``offset``, walking its frames by ranged reads of
        their 8-byte headers (what opening asks of the last record, the one a cut reaches),
        with :meth:`RecordReader.skip_at`'s checks and errors."""
        pos, size, url = int(offset), self.size, self.url
        while True:
            head = b""
            if pos + 8 <= size:
                head = self._head(pos) if pos == offset else self._read_range(pos, pos + 8)
                if len(head) < 8:
                    raise RecordIOError("the store returned fewer bytes than it lists", url,
                                        offset=pos)  # fmt: skip
            cflag, _, end = check_frame(head, 0, pos, int(offset), size, url)
            if cflag in (0, 3):
                return end
            pos = end

    def _head(self, offset: int) -> bytes:
        """The frame header and first 32 bytes of the record at ``offset`` (one ranged read)."""
        if offset not in self._heads:
            self._heads[offset] = self._read_range(offset, offset + 8 + IR_SIZE + 8)
        return self._heads[offset]

    def frame_at(self, offset: int) -> tuple[int, int]:
        if self._reader is not None:
            return self._reader.frame_at(offset)
        head = self._head(int(offset))
        magic, cflag, length = peek_frame(head) if len(head) >= 8 else (None, 0, 0)
        if magic != MAGIC:
            got = "no frame header" if magic is None else f"bad magic 0x{magic:08x}"
            raise RecordIOError(f"{got} in {self.url}", self.path, offset=int(offset))
        return cflag, length

    def head_at(self, offset: int, n: int = IR_SIZE) -> bytes:
        offset = int(offset)
        if self._reader is None and n <= IR_SIZE + 8:
            head = self._head(offset)
            if len(head) >= 8:
                magic, cflag, length = peek_frame(head)
                whole = cflag == 0 or (cflag == 1 and length >= n)
                if magic == MAGIC and whole and len(head) >= 8 + min(n, length):
                    return head[8 : 8 + min(n, length)]
        return self._open().head_at(offset, n)

    # -- reading: waits for the shard
    def read_at(self, offset: int) -> tuple[bytes, int]:
        return self._open().read_at(offset)

    def view_at(self, offset: int) -> memoryview | bytes:
        return self._open().view_at(offset)

    def mapped(self) -> memoryview | None:
        """The shard's map once it has arrived; None while it is being fetched (no wait)."""
        reader = self._reader
        return None if reader is None else reader.mapped()

    def _open(self) -> RecordReader:
        reader = self._reader
        if reader is None:
            with self._opening:  # one thread waits and opens; the others wait for it
                if self._failed is not None:  # a new error each time, from the first
                    raise ValueError(str(self._failed)) from self._failed
                if self._closed:
                    raise ValueError(f"shard {self.url}: the dataset is closed")
                if self._reader is None:
                    try:
                        reader = self._arrive()  # an OSError (fetch failed) is not kept
                    except ValueError as exc:
                        self._failed = exc
                        raise
                    if self._closed:  # closed while the shard arrived
                        reader.close()
                        raise ValueError(f"shard {self.url}: the dataset is closed")
                    self._reader = reader
                reader = self._reader
        return reader

    def _arrive(self) -> RecordReader:
        local = self._fetch()  # an OSError naming the URL if the fetch failed
        expect = self._expect
        try:
            shard = open_shard(local, self._on_error)
        except RecordIOError as exc:
            raise ValueError(f"shard {self.url}, fetched to {local}: {exc}") from exc
        same = expect is None or (
            shard.layout == expect.layout
            and shard.first_label_only == expect.first_label_only
            and np.array_equal(shard.keys, expect.keys)
            and np.array_equal(shard.offsets, expect.offsets)
        )
        if not same:
            shard.reader.close()
            raise ValueError(
                f"shard {self.url}, fetched to {local}, holds {len(shard)} samples where its "
                f".idx listed {len(expect)} when the dataset was opened (header-only records, "
                "offsets off record starts, or a file cut short: only the bytes tell); "
                "open a local copy (gpurec.dataset.resolve_source) to read what it holds"
            )
        return shard.reader

    def close(self) -> None:
        """Close the shard; reads after this raise. A read waiting for the fetch is woken
        by closing the fetcher (:meth:`Dataset.close` does that first)."""
        self._closed = True
        with self._opening:
            reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()


# The readers of shards being fetched: a forked child (DataLoader worker) gets new locks.
_LIVE_READERS: weakref.WeakSet[_FetchingReader] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for reader in list(_LIVE_READERS):
        reader._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


# Shards opened at a time from a store: an `.idx` and a few record headers each, small
# reads whose time is the store's latency (benchmarks/bench_remote_open.py: 1,000 shards
# at 20 ms a request open in about half the time with 16 at a time as with 4).
_OPEN_PARALLEL = 16


def open_source(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    on_error: str = "raise",
    cache_dir: str | os.PathLike | None = None,
    cache_limit: int | None = None,
    storage_options: dict | None = None,
) -> Dataset:
    """The :class:`Dataset` of a source (see :func:`resolve_source`), without waiting for
    the `.rec` files of shards at URLs: their `.idx` files and the dataset's
    ``classes.json`` are fetched into the shard cache (``cache_dir``, ``cache_limit``,
    ``storage_options``: see :class:`gpurec.cache.ShardCache`), the shards already there
    are opened as local files, and the others are fetched when asked for
    (:meth:`Dataset.prefetch`) or read. Shards without an `.idx` are fetched (and scanned)
    now. Local sources open as ``Dataset(resolve_source(source))``."""
    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    urls = list(dict.fromkeys(i for i in items if is_url(i)))
    if not urls:
        return Dataset(resolve_source(items), on_error=on_error)
    from gpurec.cache import ShardCache, ShardFetcher

    cache = ShardCache(cache_dir, cache_limit, storage_options)
    remote = {url: cache.resolve(url) for url in urls}
    every = [files for shards in remote.values() for files in shards]
    fetcher = ShardFetcher(cache, keep=[cache.local(files[0]) for files in every])

    def prepare(files) -> Path | Shard:
        indexed = any(r.path == files[0].path[:-4] + ".idx" for r in files[1:])
        if not indexed:
            return cache.fetch_shard(files)  # scanned below
        rec = cache.fetch_shard(files, whole=False)
        if rec is not None:  # already in the cache
            return rec
        rec = fetcher.add(files)
        reader = _FetchingReader(
            rec,
            files[0].url,
            files[0].size,
            lambda: fetcher.wait(rec),
            lambda start, end: cache.read_range(files[0], start, end),
        )
        shard = _open_indexed(reader, reader.idx_path, on_error)
        reader.expect(shard, on_error)
        return shard

    with ThreadPoolExecutor(
        max(cache.parallel, _OPEN_PARALLEL), thread_name_prefix="gpurec-open"
    ) as pool:
        opened = dict(zip(map(id, every), pool.map(prepare, every), strict=True))
    recs: list[str | os.PathLike | Shard] = []
    for item in items:
        if item in remote:
            recs += [opened[id(files)] for files in remote[item]]
        else:
            recs += _resolve_one(item)
    dataset = Dataset(recs, on_error=on_error, fetcher=fetcher)
    cache.evict(fetcher.keep)
    return dataset


# ----------------------------------------------------------------------------- dataset


class Dataset:
    """The samples of several shards, numbered 0..N-1 in shard order.

    ``on_error="skip"`` opens shards that are cut short with their intact records
    (:attr:`lost` counts the rest); ``"raise"`` refuses them, naming file and byte.
    ``recs`` may hold shards opened already (:func:`open_source`: shards being fetched,
    by ``fetcher``).
    """

    def __init__(
        self,
        recs: Sequence[str | os.PathLike | Shard],
        *,
        on_error: str = "raise",
        cache_dir: str | os.PathLike | None = None,
        fetcher: ShardFetcher | None = None,
    ) -> None:
        self.shards: list[Shard] = []
        self.fetcher = fetcher
        if fetcher is not None:  # a dataset dropped unclosed stops its fetches
            weakref.finalize(self, fetcher.close)
        try:
            for rec in recs:
                opened = rec if isinstance(rec, Shard) else open_shard(rec, on_error, cache_dir)
                self.shards.append(opened)
        except BaseException:
            self.close()
            for rec in recs[len(self.shards) :]:
                if isinstance(rec, Shard):
                    rec.reader.close()
            raise
        self.shard_sizes = [len(s) for s in self.shards]
        self.starts = np.concatenate([[0], np.cumsum(self.shard_sizes)]).astype(np.int64)
        self._starts = self.starts.tolist()
        self._offsets = [s.offsets for s in self.shards]
        self.lost = sum(s.lost for s in self.shards)
        if self._starts[-1] == 0:
            other = sum(s.other for s in self.shards)
            self.close()
            held = f" ({other} header-only records, no image)" if other else ""
            names = ", ".join(str(r.path if isinstance(r, Shard) else r) for r in recs)
            raise ValueError(f"the source holds no records{held}: {names}")

    def __len__(self) -> int:
        return self._starts[-1]

    @property
    def paths(self) -> list[Path]:
        return [s.path for s in self.shards]

    def locate(self, i: int) -> tuple[int, int]:
        """(shard number, position among that shard's samples) of sample ``i``."""
        if not 0 <= i < self._starts[-1]:
            raise IndexError(f"sample {i} out of range: the dataset has {len(self)}")
        shard = bisect_right(self._starts, i) - 1
        return shard, i - self._starts[shard]

    def offset(self, i: int) -> int:
        """Byte offset of sample ``i``'s record in its shard."""
        shard, pos = self.locate(i)
        return int(self._offsets[shard][pos])

    def read(self, i: int) -> bytes:
        """The record of sample ``i`` (IRHeader, labels, image bytes)."""
        shard, pos = self.locate(i)
        s = self.shards[shard]
        record = s.reader.read_at(int(self._offsets[shard][pos]))[0]
        if s.first_label_only and record[:4] != b"\0\0\0\0" and len(record) >= IR_SIZE:
            try:  # InsightFace: MXFaceDataset takes the first label of a multi-label image
                header, payload = unpack(record)
            except RecordIOError:
                return record  # the backend reports it, naming the record
            label = float(np.atleast_1d(header.label)[0]) if np.size(header.label) else 0.0
            return header_bytes(IRHeader(0, label, header.id, header.id2)) + payload
        return record

    def name(self, i: int) -> str:
        """``record K`` (K: the position among the shard's samples) or, in an indexed
        InsightFace file, ``key K``: how a record is named within its shard."""
        shard, pos = self.locate(i)
        s = self.shards[shard]
        if s.layout == "insightface" and s.index == "idx":
            return f"key {int(s.keys[pos])}"
        return f"record {pos}"

    def read_view(self, i: int) -> memoryview | bytes:
        """:meth:`read` without a copy where it can: a view of the memory-mapped shard."""
        shard, pos = self.locate(i)
        s = self.shards[shard]
        if s.first_label_only:
            return self.read(i)
        return s.reader.view_at(int(self._offsets[shard][pos]))

    def head(self, i: int) -> bytes:
        """The IRHeader of sample ``i``'s record as :meth:`read` gives it (fewer bytes for
        a shorter record), from the record's first bytes alone: of a shard still being
        fetched, one ranged read from the store, without waiting for the shard."""
        shard, pos = self.locate(i)
        s = self.shards[shard]
        head = bytes(s.reader.head_at(int(self._offsets[shard][pos]), IR_SIZE + 4))
        if s.first_label_only and head[:4] != b"\0\0\0\0" and len(head) >= IR_SIZE + 4:
            _, _, id1, id2 = peek_header(head)  # InsightFace: the first label, as read()
            label = first_label(head)
            return header_bytes(IRHeader(0, label, id1, id2))
        return head[:IR_SIZE]

    def prefetch(self, indices: np.ndarray) -> None:
        """Fetch the shards of samples ``indices`` (in the order they will be read)
        first needed first, ahead of those asked for before; nothing for local shards."""
        if self.fetcher is None or not len(indices):
            return
        shards = np.searchsorted(self.starts, indices, side="right") - 1
        _, first = np.unique(shards, return_index=True)
        self.fetcher.prioritise(self.shards[k].path for k in shards[np.sort(first)].tolist())

    def where(self, i: int) -> str:
        """``shard.rec record K at byte B``: how errors name a record."""
        shard = self.locate(i)[0]
        return f"{self.shards[shard].path} {self.name(i)} at byte {self.offset(i)}"

    def error(self, i: int, reason: str) -> RecordIOError:
        """The error for sample ``i`` that cannot be loaded (``shard.rec: at byte B:
        record K: reason``), the same from every backend."""
        shard = self.locate(i)[0]
        return RecordIOError(f"{self.name(i)}: {reason}", self.paths[shard], offset=self.offset(i))

    def stop_fetching(self) -> None:
        """Take up no more shard fetches and wake the reads waiting for one (they raise);
        fetches under way finish in their threads. :meth:`close` does this first."""
        if self.fetcher is not None:
            self.fetcher.close()

    def close(self) -> None:
        self.stop_fetching()
        for shard in self.shards:
            shard.reader.close()
