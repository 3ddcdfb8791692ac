"""Object storage through fsspec: URLs as pack inputs and outputs, and a local shard cache.

Any fsspec protocol works (``s3://`` with the ``s3`` extra, ``gs://`` with ``gcs``,
``memory://``, ``http://`` for reading, ...). Credentials and endpoints come from the
store's usual environment and config files (``AWS_*`` including ``AWS_ENDPOINT_URL``,
``~/.aws``, Google's default credentials) or from ``storage_options`` (``--storage-option
key=value``), passed to the filesystem as keyword arguments.

- **Reading images** (:class:`RemoteRoot`): one recursive listing of the root (S3 lists
  1,000 keys per request), walked in the order a local tree is walked, and the objects
  of a batch fetched concurrently (``fs.cat`` of many paths, asynchronous in s3fs/gcsfs).
- **Writing outputs** (:class:`Publisher`): the pack writes each shard to a local
  staging folder, then uploads it. Nothing is visible half-written: on object stores an
  object appears only once its upload is complete (a single PUT, or a multipart upload
  whose completion is the last call); other filesystems get a temporary name and a move.
  Per shard the `.rec` goes first and its `.idx` after it (a stale `.idx` of an earlier
  pack is deleted before the new `.rec` is placed), and the manifest files
  (``classes.json``, the skip report) go last, once every shard is in place.
- **Training from a bucket** (:class:`ShardCache`, :class:`ShardFetcher`): shards are
  fetched whole into a local cache (``$GPUREC_CACHE/shards``, ``~/.cache/gpurec/shards``
  by default), checked against the store's size and ETag, reused while they match,
  fetched again when they do not, downloaded under a temporary name and renamed when
  complete, and shared by the processes of a node through a lock file per shard (a shard
  is downloaded once however many ranks ask). ``cache_limit`` bytes bounds the cache:
  least recently used shards that no process is fetching or using (a process uses the
  shards it fetched until it exits, or :func:`release_shards`) are evicted (readers that
  already opened an evicted shard keep reading it: the file is memory-mapped, and
  removing it frees it only when they close). A Pipeline on a URL fetches only the `.idx`
  files when it is made; a :class:`ShardFetcher` then fetches the `.rec` files in the
  background, first needed first (:func:`gpurec.dataset.open_source`).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import fnmatch
import hashlib
import json
import os
import tempfile
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpurec.naming import cache_home, classes_candidates, is_url, scan_cache_name, select_shards
from gpurec.recordio import atomic_write

__all__ = [
    "Publisher",
    "RemoteRoot",
    "ShardCache",
    "ShardFetcher",
    "cache_root",
    "filesystem",
    "is_url",
    "parse_storage_options",
    "release_shards",
]

# Stores on which an object becomes visible only when its upload is complete.
_WHOLE_OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "abfs", "az", "adl", "memory", "oss"}


def local_path(path: str | os.PathLike) -> str | os.PathLike:
    """``file:///x`` -> ``/x``; anything else unchanged."""
    if isinstance(path, str) and path.startswith("file://"):
        return path[len("file://") :]
    return path


def _fsspec():
    try:
        import fsspec
    except ImportError:  # pragma: no cover - fsspec is a dependency
        raise ImportError("URLs need fsspec: pip install 'gpurec[s3]' or 'gpurec[gcs]'") from None
    return fsspec


def filesystem(url: str, storage_options: dict | None = None) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for ``url``; a clear error for a protocol
    whose package is missing (``pip install 'gpurec[s3]'``)."""
    fsspec = _fsspec()
    try:
        return fsspec.core.url_to_fs(url, **(storage_options or {}))
    except ImportError as exc:
        protocol = url.split("://", 1)[0]
        extra = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}.get(protocol)
        hint = f": pip install 'gpurec[{extra}]'" if extra else ""
        raise ImportError(
            f"{protocol}:// needs a package that is not installed{hint} ({exc})"
        ) from None


def parse_storage_options(items: Iterable[str] | None) -> dict[str, Any]:
    """``["key=value", ...]`` -> a dict for fsspec. Values are JSON when they parse as
    JSON (numbers, ``true``/``false``, ``{"endpoint_url": ...}``), else strings; a dotted
    key sets a nested value (``client_kwargs.endpoint_url=http://...``)."""
    out: dict[str, Any] = {}
    for n, item in enumerate(items or (), 1):
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep:  # the item is not echoed: it may be a secret given without its key
            raise ValueError(f"--storage-option #{n} wants key=value: it has no '='")
        if not key:
            raise ValueError(f"--storage-option #{n} wants key=value: no key before its '='")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        target = out
        *parents, last = key.split(".")
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ValueError(f"--storage-option #{n} ({key}=...): {part} is not a mapping")
        target[last] = value
    return out


def _join(base: str, rel: str) -> str:
    return f"{base.rstrip('/')}/{rel}" if base else rel


def _protocol(fs) -> str:
    proto = fs.protocol
    return proto[0] if isinstance(proto, (tuple, list)) else proto


def _etag(info: dict) -> str | None:
    """The store's version tag of an object: S3's ETag, GCS's etag/generation, or None."""
    for key in ("ETag", "etag", "md5Hash", "generation", "version_id", "VersionId"):
        value = info.get(key)
        if value not in (None, ""):
            return str(value).strip('"')
    return None


# ------------------------------------------------------------------------------ reading


class RemoteRoot:
    """An image folder at a URL: listed once, read in concurrent batches.

    Pickles as its URL and options, so worker processes and Ray tasks open their own
    filesystem (fsspec's clients are not shared across processes).
    """

    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self._fs = None
        self._path = None

    def __getstate__(self) -> dict:
        return {"url": self.url, "storage_options": self.storage_options}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["url"], state["storage_options"])

    @property
    def fs(self):
        if self._fs is None:
            self._fs, self._path = filesystem(self.url, self.storage_options)
        return self._fs

    @property
    def path(self) -> str:
        self.fs  # noqa: B018 - resolves both
        return self._path.rstrip("/")

    def listing(self) -> dict[str, int]:
        """Every object under the root: relative path -> size (one recursive listing)."""
        fs, base = self.fs, self.path
        fs.invalidate_cache(base)  # s3fs and gcsfs keep listings: this one must be fresh
        if not fs.isdir(base):
            raise FileNotFoundError(f"image folder not found: {self.url}")
        found = fs.find(base, detail=True)
        out = {}
        for full, info in found.items():
            if info.get("type", "file") != "file":
                continue
            rel = full[len(base) :].lstrip("/") if full.startswith(base) else full
            if rel:
                out[rel] = int(info.get("size") or 0)
        return out

    def walk(self) -> Iterator[tuple[str, list[str]]]:
        """(relative folder, sorted file names), folders depth first in sorted order:
        exactly the walk of a local tree with the same files (``"."`` is the root)."""
        tree: dict = {}
        for rel in self.listing():
            node = tree
            *folders, name = rel.split("/")
            for folder in folders:
                node = node.setdefault(folder, {})
                if not isinstance(node, dict):
                    break
            else:
                node.setdefault(name, None)

        def visit(node: dict, rel: str) -> Iterator[tuple[str, list[str]]]:
            names = sorted(node)
            yield rel, [n for n in names if node[n] is None]
            for n in names:
                if node[n] is not None:
                    yield from visit(node[n], n if rel == "." else f"{rel}/{n}")

        yield from visit(tree, ".")

    def check(self, rel: str) -> str:
        """The full path of ``rel``; ValueError for absolute or ``..`` paths."""
        if rel.startswith("/") or "://" in rel:
            raise ValueError(f"absolute path refused: {rel!r} is not under the root")
        parts = rel.split("/")
        if ".." in parts:
            raise ValueError(f"path escapes the root: {rel!r}")
        return _join(self.path, "/".join(p for p in parts if p not in ("", ".")))

    def read_many(self, rels: Sequence[str], max_size: int) -> list[bytes | str]:
        """The bytes of each object, or the reason it cannot be read, in order.

        All of them are requested at once (s3fs and gcsfs fetch them concurrently)."""
        out: list[bytes | str] = [""] * len(rels)
        paths: dict[str, list[int]] = {}
        for i, rel in enumerate(rels):
            try:
                paths.setdefault(self.check(rel), []).append(i)
            except ValueError as exc:
                out[i] = str(exc)
        if paths:
            got = self.fs.cat(list(paths), on_error="return")
            if not isinstance(got, dict):  # a single path comes back bare in some versions
                got = {next(iter(paths)): got}
            for path, where in paths.items():
                data = got.get(path)
                if isinstance(data, BaseException):
                    reason = (
                        "file not found"
                        if isinstance(data, FileNotFoundError)
                        else f"cannot read: {data}"
                    )
                    data = reason
                elif data is None:
                    data = "cannot read: no data returned"
                elif len(data) > max_size:
                    data = f"file of {len(data)} bytes is over a record's maximum of {max_size}"
                for i in where:
                    out[i] = data
        return out


# ------------------------------------------------------------------------------ writing


def place_in_order(
    fs, pairs: Sequence[tuple[Any, str]], delete_first: Sequence[str], place
) -> None:
    """The publish order in a store (:func:`gpurec.recordio.publish_shard` is the local
    one): the stale `.idx` of an earlier pack (``delete_first``) goes before anything is
    placed, then each (source, path) pair, the `.rec` before its `.idx`, by ``place``.
    Each object appears whole, so a `.rec` under its final name never stands beside a
    stale `.idx`."""
    if delete_first:
        fs.invalidate_cache()
    for path in delete_first:
        with contextlib.suppress(FileNotFoundError):
            if fs.exists(path):
                fs.rm_file(path)
    for source, path in pairs:
        place(source, path)


class Publisher:
    """Moves finished local files to their final URLs, in order, in a background thread.

    ``publish(pairs)`` queues a group of (local file, URL) pairs; each is uploaded in
    order and the local file removed. Object stores make an object visible only when its
    upload completes; elsewhere the file goes to ``URL.tmp`` and is moved into place.
    ``delete_first`` URLs are removed before a group's first upload (a stale `.idx` must
    never sit beside a new `.rec`). After a group fails nothing more is uploaded;
    :meth:`publish` and :meth:`close` raise its error (:meth:`close` after waiting for
    the rest). ``max_pending`` bounds the groups queued or uploading: :meth:`publish`
    waits for room, so a pack faster than its uploads does not fill the local disk.
    """

    def __init__(
        self,
        url_prefix: str,
        storage_options: dict | None = None,
        *,
        max_pending: int | None = None,
    ) -> None:
        self.fs, self.base = filesystem(url_prefix, storage_options)
        self.protocol = _protocol(self.fs)
        parent = self.base.rsplit("/", 1)[0] if "/" in self.base else ""
        if parent and self.protocol not in _WHOLE_OBJECT_STORES:
            self.fs.makedirs(parent, exist_ok=True)
        self.max_pending = max_pending
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="gpurec-upload")
        self._pending: list[Future] = []
        self._failed: Future | None = None

    def path(self, url: str) -> str:
        return filesystem(url)[1] if is_url(url) else url

    def _put(self, local: Path, path: str) -> None:
        if self.protocol in _WHOLE_OBJECT_STORES:
            self.fs.put_file(str(local), path)
        else:
            tmp = path + ".tmp"
            self.fs.put_file(str(local), tmp)
            self.fs.mv(tmp, path)
        local.unlink(missing_ok=True)

    def _group(self, pairs: Sequence[tuple[Path, str]], delete_first: Sequence[str]) -> None:
        if self._failed is not None:
            return  # an earlier group failed: upload nothing after it (close raises that error)
        place_in_order(self.fs, pairs, delete_first, self._put)

    @staticmethod
    def _bad(future: Future) -> bool:
        return future.done() and not future.cancelled() and future.exception() is not None

    def _check(self) -> None:
        """Raise the error of the first group that failed, if one has."""
        for future in self._pending:
            if self._bad(future):
                future.result()

    def publish(
        self, pairs: Sequence[tuple[Path, str]], delete_first: Sequence[str] = ()
    ) -> Future:
        """Queue a group; with ``max_pending``, first wait until fewer than that many
        groups are queued or uploading (files staged locally stay bounded). Raises the
        error of an earlier group that failed (nothing more is uploaded after one)."""
        self._check()
        if self.max_pending is not None:
            while True:
                waiting = [f for f in self._pending if not f.done()]
                if len(waiting) < self.max_pending:
                    break
                with contextlib.suppress(BaseException):
                    waiting[0].result()  # the oldest: the one now uploading
            self._check()
        self._pending = [f for f in self._pending if not f.done() or self._bad(f)]
        future = self._pool.submit(self._group, list(pairs), list(delete_first))
        future.add_done_callback(self._note)
        self._pending.append(future)
        return future

    def _note(self, future: Future) -> None:  # in the upload thread, before its next group
        if self._failed is None and self._bad(future):
            self._failed = future

    def remove(self, path: str) -> None:
        """Delete ``path`` if it exists (a stale skip report), after what is queued."""
        self.publish([], [path])

    def close(self) -> None:
        try:
            for future in self._pending:
                future.result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def abort(self) -> None:
        for future in self._pending:
            future.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)


def staging_dir() -> Path:
    """A new local folder for outputs on their way to a URL."""
    return Path(tempfile.mkdtemp(prefix="gpurec-stage-"))


# ------------------------------------------------------------------------- shard cache


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The shard cache: ``cache_dir``, else ``$GPUREC_CACHE/shards``, else
    ``~/.cache/gpurec/shards``."""
    if cache_dir is not None:
        return Path(cache_dir)
    return cache_home("shards")


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
