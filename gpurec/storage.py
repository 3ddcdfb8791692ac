"""Object storage through fsspec: URLs as pack inputs and outputs.

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
- **Training from a bucket**: :mod:`gpurec.cache` (the local shard cache and the
  background fetcher).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from gpurec.naming import is_url

__all__ = [
    "Publisher",
    "RemoteRoot",
    "filesystem",
    "is_url",
    "parse_storage_options",
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
