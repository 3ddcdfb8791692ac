"""The local shard cache and its background fetcher: training from a bucket.

Shards are fetched whole into a local cache (``$GPUREC_CACHE/shards``,
``~/.cache/gpurec/shards`` by default), checked against the store's size and ETag,
reused while they match, fetched again when they do not, downloaded under a temporary
name and renamed when complete, and shared by the processes of a node through a lock
file per shard (a shard is downloaded once however many ranks ask). ``cache_limit``
bytes bounds the cache: least recently used shards that no process is fetching or using
(a process uses the shards it fetched until it exits, or :func:`release_shards`) are
evicted (readers that already opened an evicted shard keep reading it: the file is
memory-mapped, and removing it frees it only when they close). A Pipeline on a URL
fetches only the `.idx` files when it is made; a :class:`ShardFetcher` then fetches the
`.rec` files in the background, first needed first (:func:`gpurec.dataset.open_source`).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import fnmatch
import hashlib
import json
import os
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from gpurec.naming import cache_home, classes_candidates, is_url, scan_cache_name, select_shards
from gpurec.recordio import atomic_write
from gpurec.storage import filesystem

__all__ = ["ShardCache", "ShardFetcher", "cache_root", "release_shards"]


# ------------------------------------------------------------------------- shard cache


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The shard cache: ``cache_dir``, else ``$GPUREC_CACHE/shards``, else
    ``~/.cache/gpurec/shards``."""
    if cache_dir is not None:
        return Path(cache_dir)
    return cache_home("shards")


def _etag(info: dict) -> str | None:
    """The store's version tag of an object: S3's ETag, GCS's etag/generation, or None."""
    for key in ("ETag", "etag", "md5Hash", "generation", "version_id", "VersionId"):
        value = info.get(key)
        if value not in (None, ""):
            return str(value).strip('"')
    return None


@dataclass
class _Remote:
    """One remote object: its URL, path in the store, size and version tag."""

    url: str
    path: str
    size: int
    etag: str | None


@contextlib.contextmanager
def _locked(path: Path, blocking: bool = True) -> Iterator[bool]:
    """An exclusive ``flock`` on ``path`` (created); yields False if not blocking and taken."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    _HELD_FDS.add(fd)  # a forked child closes its copy (see _after_fork_in_child)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        _HELD_FDS.discard(fd)
        os.close(fd)


# The lock files this process holds (their descriptors) and the `.part` files it is
# downloading into. A forked child inherits the descriptors of locks its parent's
# threads hold: an flock is released only when every copy is closed, so the child closes
# its copies at once (it would otherwise keep the parent's lock, and wait on it itself).
# A process that exits with downloads under way removes their `.part` files (a
# download killed harder leaves its `.part`, removed by the next fetch of the shard).
_HELD_FDS: set[int] = set()
_PARTS: set[Path] = set()


def _part(local: Path) -> Path:
    """The file ``local`` is downloaded into: one name per file, as only the holder of
    the shard's lock downloads it; one left by a process killed mid-download is stale,
    and removed (or overwritten) by the next fetch of the shard."""
    return local.with_name(local.name + ".part")


def _remove_parts() -> None:
    for part in list(_PARTS):
        with contextlib.suppress(OSError):
            part.unlink()


atexit.register(_remove_parts)


class ShardCache:
    """Whole shards of remote datasets, kept on local disk for training.

    Layout: ``<root>/<hash of the remote folder>/<file name>`` (a shard keeps its name,
    its `.idx` and the dataset's ``classes.json`` beside it), with ``<name>.meta.json``
    (URL, size, ETag, when fetched), ``<name>.lock`` (held while fetching or evicting)
    and ``<name>.use`` (shared-locked by the processes using the shard) per shard. ``fetched`` and
    ``reused`` count files by what this object did; ``started`` lists the `.rec` URLs a
    :class:`ShardFetcher` of this cache took up, in the order it took them up.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike | None = None,
        cache_limit: int | None = None,
        storage_options: dict | None = None,
        *,
        parallel: int = 4,
    ) -> None:
        self.root = cache_root(cache_dir)
        self.cache_limit = cache_limit
        self.storage_options = dict(storage_options or {})
        self.parallel = max(1, parallel)
        self.fetched: list[str] = []
        self.reused: list[str] = []
        self.started: list[str] = []
        self._lock = threading.Lock()

    # --------------------------------------------------------------- finding shards
    def resolve(self, url: str) -> list[list[_Remote]]:
        """The shards a URL names (as :func:`gpurec.dataset.resolve_source` for paths:
        a `.rec`, a prefix of ``PREFIX.rec`` or ``PREFIX-KKKKK-of-NNNNN.rec``, a glob),
        each as its files: ``[rec, idx (if any)]``, in shard order; the dataset's
        ``classes.json`` rides with the first shard."""
        fs, path = filesystem(url, self.storage_options)
        proto = url.split("://", 1)[0]

        def to_url(p: str) -> str:
            return p if is_url(p) else f"{proto}://{p}"

        folder = path.rsplit("/", 1)[0]
        fs.invalidate_cache(folder)  # sizes and ETags must be the store's, not a cached list
        if any(c in path for c in "*?["):
            infos = fs.ls(folder, detail=True)
            by_path = {i["name"]: i for i in infos}
            recs = sorted(p for p in by_path if p.endswith(".rec") and fnmatch.fnmatchcase(p, path))
            if not recs:
                raise FileNotFoundError(f"no .rec files match {url!r}")
        else:
            try:
                infos = fs.ls(folder, detail=True)
            except FileNotFoundError:
                infos = []
            by_path = {i["name"]: i for i in infos}
            if path.endswith(".rec"):
                if path not in by_path:
                    raise FileNotFoundError(f"record file not found: {url}")
                recs = [path]
            elif path + ".rec" in by_path:
                recs = [path + ".rec"]
            else:
                in_folder = [p.rsplit("/", 1)[-1] for p in by_path if p.rsplit("/", 1)[0] == folder]
                names = select_shards(path.rsplit("/", 1)[-1], in_folder, url)
                recs = [f"{folder}/{name}" for name in names]
        shards = []
        for rec in recs:
            files = []
            for p in (rec, rec[:-4] + ".idx"):
                info = by_path.get(p)
                if info is not None:
                    files.append(_Remote(to_url(p), p, int(info.get("size") or 0), _etag(info)))
            shards.append(files)
        for name in classes_candidates(recs[0].rsplit("/", 1)[-1]):
            cls = f"{folder}/{name}"
            if cls in by_path:
                info = by_path[cls]
                shards[0].append(_Remote(to_url(cls), cls, int(info.get("size") or 0), _etag(info)))
        return shards

    # ------------------------------------------------------------------ fetching
    def local(self, remote: _Remote) -> Path:
        folder_url = remote.url.rsplit("/", 1)[0]
        digest = hashlib.sha1(folder_url.encode()).hexdigest()[:16]
        return self.root / digest / remote.url.rsplit("/", 1)[1]

    @staticmethod
    def _meta_path(local: Path) -> Path:
        return local.with_name(local.name + ".meta.json")

    def _valid(self, local: Path, remote: _Remote) -> bool:
        try:
            meta = json.loads(self._meta_path(local).read_text())
            size = local.stat().st_size
        except (OSError, ValueError):
            return False
        return (
            meta.get("url") == remote.url
            and meta.get("size") == remote.size == size
            and meta.get("etag") == remote.etag
        )

    def _download(self, fs, remote: _Remote, local: Path) -> None:
        part = _part(local)
        _PARTS.add(part)
        try:
            fs.get_file(remote.path, str(part))
            got = part.stat().st_size
            if got != remote.size:
                raise OSError(f"{remote.url}: fetched {got} bytes, the store says {remote.size}")
            with open(part, "rb") as f:
                os.fsync(f.fileno())
            meta = self._meta_path(local)
            meta.unlink(missing_ok=True)  # never a valid meta beside a file being replaced
            os.replace(part, local)
            with atomic_write(meta, "w") as f:
                f.write(
                    json.dumps(
                        {
                            "url": remote.url,
                            "size": remote.size,
                            "etag": remote.etag,
                            "fetched": time.time(),
                        }
                    )
                )
        finally:
            _PARTS.discard(part)
            part.unlink(missing_ok=True)

    def fetch_shard(self, files: Sequence[_Remote], *, whole: bool = True) -> Path | None:
        """Make one shard's files local (under its lock) and mark the shard in use by this
        process; returns the local `.rec`. With ``whole=False`` the `.rec` is left for later
        (a :class:`ShardFetcher`): the other files (`.idx`, ``classes.json``) are made local,
        and the `.rec` is returned only when the cache already holds it, valid (else None)."""
        fs = filesystem(files[0].url, self.storage_options)[0]
        rec = self.local(files[0])
        have = True
        with _locked(rec.with_name(rec.name + ".lock")):
            named = {self.local(remote) for remote in files}
            for local in named:  # only the lock holder downloads: any .part is stale
                _part(local).unlink(missing_ok=True)
            idx = rec.with_suffix(".idx")
            if idx not in named:  # the store has no .idx (now): never trust an old one
                self._meta_path(idx).unlink(missing_ok=True)
                idx.unlink(missing_ok=True)
            for remote in files:  # the .rec first: the .idx is only trusted beside it
                local = self.local(remote)
                if self._valid(local, remote):
                    with self._lock:
                        self.reused.append(remote.url)
                elif remote is files[0] and not whole:
                    have = False  # both are checked against the same listing's ETags
                    continue
                else:
                    local.parent.mkdir(parents=True, exist_ok=True)
                    self._download(fs, remote, local)
                    with self._lock:
                        self.fetched.append(remote.url)
                with contextlib.suppress(OSError):  # last use, for least-recently-used eviction
                    os.utime(self._meta_path(local))
            _hold(rec)  # before the shard lock goes: no eviction between fetch and use
        return rec if have else None

    def read_range(self, remote: _Remote, start: int, end: int) -> bytes:
        """Bytes ``start..end`` of a remote file (fewer at its end): one ranged read."""
        fs = filesystem(remote.url, self.storage_options)[0]
        end = min(end, remote.size)
        return fs.cat_file(remote.path, start=start, end=end) if start < end else b""

    def fetch(self, url: str) -> list[Path]:
        """The local `.rec` paths of every shard ``url`` names, fetching what is missing
        or stale, ``parallel`` shards at a time in shard order; then evicts down to
        ``cache_limit`` (see :meth:`fetch_all` for several URLs)."""
        out = self._fetch(url)
        self.evict(out)
        return out

    def fetch_all(self, urls: Sequence[str]) -> list[list[Path]]:
        """:meth:`fetch` of each URL, then one eviction that keeps all of them."""
        out = [self._fetch(url) for url in urls]
        self.evict([rec for recs in out for rec in recs])
        return out

    def _fetch(self, url: str) -> list[Path]:
        shards = self.resolve(url)
        with ThreadPoolExecutor(self.parallel, thread_name_prefix="gpurec-fetch") as pool:
            futures = [pool.submit(self.fetch_shard, files) for files in shards]
            return [future.result() for future in futures]

    # ------------------------------------------------------------------ eviction
    def entries(self) -> list[tuple[float, int, Path]]:
        """(last use, bytes, local .rec) of every cached shard."""
        out = []
        for meta in self.root.glob("*/*.rec.meta.json"):
            rec = meta.with_name(meta.name[: -len(".meta.json")])
            try:
                used = meta.stat().st_mtime
                size = sum(p.stat().st_size for p in (rec, rec.with_suffix(".idx")) if p.exists())
            except OSError:
                continue
            out.append((used, size, rec))
        return sorted(out)

    def evict(self, keep: Iterable[Path] = ()) -> list[Path]:
        """Remove least recently used shards until the cache holds at most
        ``cache_limit`` bytes; shards in ``keep`` (local `.rec` paths), shards being
        fetched and shards in use (fetched by a live process, :func:`release_shards`)
        stay."""
        if self.cache_limit is None:
            return []
        keep = set(keep)
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        removed = []
        for _, size, rec in entries:
            if total <= self.cache_limit:
                break
            if rec in keep:
                continue
            with (
                _locked(rec.with_name(rec.name + ".lock"), blocking=False) as mine,
                _locked(_use_path(rec), blocking=False) as unused,
            ):
                if not (mine and unused):
                    continue
                for path in (rec.with_suffix(".idx"), rec):
                    self._meta_path(path).unlink(missing_ok=True)
                    path.unlink(missing_ok=True)
                # gpurec.dataset's cached scan of a shard that came without an .idx
                rec.with_name(scan_cache_name(rec.name)).unlink(missing_ok=True)
            total -= size
            removed.append(rec)
        return removed


class ShardFetcher:
    """Fetches the `.rec` files of a dataset's shards in the background, the shards asked
    for first (:meth:`prioritise`), ``cache.parallel`` at a time, through
    :meth:`ShardCache.fetch_shard` (its lock, checks, atomic rename and sharing between
    processes). Nothing is fetched until a shard is asked for.

    :meth:`wait` blocks until a shard is local (asking for it first when it is not being
    fetched yet) and raises an error naming its URL when its fetch failed. A fetch is
    tried ``len(RETRY_DELAYS) + 1`` times (a store's transient errors); one that still
    fails is forgotten, so that the next wait asks for it again. Each time nothing is left
    to fetch, the cache is trimmed to ``cache_limit``, keeping ``keep`` (every shard of
    the dataset), and the threads end (started again when a shard is asked for: a fetcher
    never closed leaks none). The threads are daemons: a process may exit with fetches
    unfinished (their ``.part`` files are removed at exit, or by the next fetch of the
    shard). A forked child (a DataLoader worker) fetches on its own what its parent had
    not fetched yet (the parent's threads are not in the child).
    """

    RETRY_DELAYS: tuple[float, ...] = (1.0, 2.0)

    def __init__(self, cache: ShardCache, keep: Iterable[Path] = ()) -> None:
        self.cache = cache
        self.keep = set(keep)
        self._files: dict[Path, list[_Remote]] = {}  # local .rec -> its remote files
        self._queue: list[Path] = []  # asked for and not taken up yet: first needed first
        self._futures: dict[Path, Future] = {}  # asked for: queued, being fetched or done
        self._running: list[Path] = []  # taken up, being fetched by a thread
        self._busy = 0
        self._threads: list[threading.Thread] = []
        self._cond = threading.Condition()
        self._closed = False
        _LIVE_FETCHERS.add(self)

    def add(self, files: Sequence[_Remote]) -> Path:
        """Let this fetcher fetch one shard (its files as :meth:`ShardCache.resolve`
        lists them) when asked; returns its local `.rec` path, the shard's name here."""
        rec = self.cache.local(files[0])
        with self._cond:
            self._files[rec] = list(files)
        return rec

    def prioritise(self, recs: Iterable[Path]) -> None:
        """Fetch these shards (local `.rec` paths) next, in this order, ahead of those
        asked for earlier; shards taken up already, or not this fetcher's, are left as
        they are."""
        with self._cond:
            if self._closed:
                return
            queued = set(self._queue)
            wanted = [
                rec
                for rec in dict.fromkeys(recs)
                if rec in self._files and (rec not in self._futures or rec in queued)
            ]
            first = set(wanted)
            self._queue = wanted + [rec for rec in self._queue if rec not in first]
            for rec in wanted:
                self._futures.setdefault(rec, Future())
            self._start_threads()
            self._cond.notify_all()

    def _start_threads(self) -> None:
        """Enough threads for the queue (under ``_cond``); those that ended are dropped."""
        self._threads = [t for t in self._threads if t.is_alive()]
        want = min(self.cache.parallel, len(self._queue) + self._busy)
        while len(self._threads) < want:
            # The thread holds the fetcher weakly: a fetcher dropped unclosed is collected.
            thread = threading.Thread(
                target=_fetch_worker, args=(weakref.ref(self),), name="gpurec-fetch", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def wait(self, rec: Path) -> Path:
        """The shard's local `.rec` once it is fetched (asked for first if it is only
        queued or not asked for); an OSError naming its URL if the fetch failed, or if the
        fetcher is closed before the fetch is done."""
        url = self._files[rec][0].url
        closed = f"shard {url}: the dataset was closed before it was fetched"
        with self._cond:
            if self._closed and rec not in self._futures:
                raise OSError(closed)
            self.prioritise([rec])
            future = self._futures[rec]
            while not future.done() and not self._closed:
                self._cond.wait()
            if not future.done():
                raise OSError(closed)
        try:
            return future.result()
        except CancelledError:
            raise OSError(closed) from None
        except Exception as exc:
            raise OSError(f"cannot fetch shard {url} into the cache ({rec}): {exc}") from exc

    def _take(self) -> tuple[Path, Future] | None:
        """The next shard to fetch (under ``_cond``), or None: the thread ends."""
        while self._queue and not self._closed:
            rec = self._queue.pop(0)
            future = self._futures[rec]
            if future.set_running_or_notify_cancel():
                self.cache.started.append(self._files[rec][0].url)
                self._busy += 1
                self._running.append(rec)
                return rec, future
        return None

    def _fetch(self, rec: Path) -> Path:
        """One shard, tried again after each of ``RETRY_DELAYS`` (unless closed meanwhile)."""
        for delay in (*self.RETRY_DELAYS, None):
            try:
                return self.cache.fetch_shard(self._files[rec])  # type: ignore[return-value]
            except Exception:
                if delay is None:
                    raise
                with self._cond:
                    if self._closed or self._cond.wait_for(lambda: self._closed, delay):
                        raise
        raise AssertionError("unreachable")

    def _done(self, rec: Path, future: Future, failed: bool) -> bool:
        """Account for a finished fetch (under ``_cond``); True when nothing is left."""
        self._busy -= 1
        self._running.remove(rec)
        if failed and self._futures.get(rec) is future:
            del self._futures[rec]  # asked for again by the next wait or prioritise
        self._cond.notify_all()  # the waiters
        return not self._queue and not self._busy

    def _after_fork(self) -> None:
        """In a forked child: new locks, none of the parent's threads; what the parent was
        fetching or had queued is queued again, each with a new future (a parent's future
        is only ever completed by a parent's thread)."""
        self._cond = threading.Condition()
        self.cache._lock = threading.Lock()
        self._threads, self._busy = [], 0
        requeue = [rec for rec in self._running if rec not in self._queue]
        self._running = []
        self._queue = requeue + self._queue
        for rec, old in list(self._futures.items()):
            if old.done() and not old.cancelled() and old.exception() is None:
                self._futures[rec] = fresh = Future()
                fresh.set_result(old.result())
            elif rec in self._queue:
                self._futures[rec] = Future()
            else:
                del self._futures[rec]

    def close(self) -> None:
        """Take up nothing more (fetches under way finish in their threads); waiting for
        a shard not fetched yet raises, at once for those waiting now."""
        with self._cond:
            self._closed = True
            for rec in self._queue:
                self._futures[rec].cancel()
            self._queue.clear()
            self._cond.notify_all()


def _fetch_worker(ref: weakref.ref[ShardFetcher]) -> None:
    """A fetch thread: takes up shards while there are any, then ends."""
    while True:
        fetcher = ref()
        if fetcher is None:
            return
        with fetcher._cond:
            taken = fetcher._take()
            if taken is None:
                return
        rec, future = taken
        failed = False
        try:
            future.set_result(fetcher._fetch(rec))
        except BaseException as exc:  # handed to whoever waits for the shard
            failed = True
            future.set_exception(exc)
        with fetcher._cond:
            idle = fetcher._done(rec, future, failed)
            keep = fetcher.keep | set(fetcher._files)
        if idle:
            with contextlib.suppress(OSError):
                fetcher.cache.evict(keep)
        del fetcher


_LIVE_FETCHERS: weakref.WeakSet[ShardFetcher] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    global _IN_USE_LOCK
    for fd in list(_HELD_FDS):  # the parent's threads' lock files: only they release them
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_FDS.clear()
    _PARTS.clear()  # the parent's downloads: not the child's to remove
    _IN_USE_LOCK = threading.Lock()
    for fetcher in list(_LIVE_FETCHERS):
        fetcher._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


# Shards this process has fetched: a shared flock on each one's ``.use`` file, held until
# the process exits (or release_shards), so that no process evicts a shard between its
# fetch and its use; readers that memory-mapped a shard would survive its removal, but
# those that open it by path later (another backend, a worker) would not.
_IN_USE: dict[Path, int] = {}
_IN_USE_LOCK = threading.Lock()


def _use_path(rec: Path) -> Path:
    return rec.with_name(rec.name + ".use")


def _hold(rec: Path) -> None:
    """Mark ``rec`` in use by this process (called under the shard's fetch lock, which
    every eviction takes first, so this never waits on an evictor)."""
    with _IN_USE_LOCK:
        if rec in _IN_USE:
            return
        fd = os.open(_use_path(rec), os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
        except BaseException:
            os.close(fd)
            raise
        _IN_USE[rec] = fd


def release_shards(paths: Iterable[str | os.PathLike] | None = None) -> None:
    """Let other processes evict the cached shards this process fetched (``paths``:
    local `.rec` paths; all when None). For long-lived processes done with a dataset;
    a process that exits releases its shards anyway."""
    with _IN_USE_LOCK:
        chosen = list(_IN_USE) if paths is None else [Path(p) for p in paths]
        for rec in chosen:
            fd = _IN_USE.pop(rec, None)
            if fd is not None:
                os.close(fd)
