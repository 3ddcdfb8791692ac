"""Other formats read and written as record streams: image folders, WebDataset tars,
Hugging Face parquet files and InsightFace verification `.bin` files.

A :class:`Record` is what every format holds for one sample: the image bytes exactly as
stored (never re-encoded), its label(s), a file name and the IRHeader fields. The
writers (:mod:`.folder`, :mod:`.webdataset`, :mod:`.parquet`) take records and write one
output file (or folder of files) each; ``gpurec export`` (:mod:`gpurec.export`) feeds
them from `.rec` shards. The readers (:class:`.webdataset.TarRoot`,
:class:`.parquet.ParquetRoot`) are roots that ``gpurec pack`` reads images from, as it
reads an image folder in object storage (:class:`gpurec.storage.RemoteRoot`).

Each format module imports its third-party library (pyarrow) only when used, so
``import gpurec`` needs none of them.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field

from gpurec.transcode import ImageError, sniff

__all__ = ["FORMATS", "Record", "class_names", "extension", "sample_root"]

FORMATS = ("folder", "webdataset", "parquet")

# sniffed format -> file extension (WebDataset's and Hugging Face's usual keys)
_EXTENSIONS = {"jpeg": "jpg", "png": "png", "gif": "gif", "webp": "webp", "bmp": "bmp",
               "tiff": "tiff", "jpeg2000": "jp2"}  # fmt: skip
_PNM = {ord("1"): "pbm", ord("4"): "pbm", ord("2"): "pgm", ord("5"): "pgm"}
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm", "pgm", "pbm",
              "pnm", "jp2", "j2k")  # fmt: skip
"""Extensions of the members (WebDataset) or files that hold an image."""


@dataclass
class Record:
    """One sample in transit: image bytes as stored, label(s), a file name (with the
    extension of the sniffed format), a key unique in its export, and the IRHeader
    fields (``flag``, ``id``, ``id2``) with where the record came from."""

    data: bytes | memoryview
    labels: tuple[float, ...]
    name: str
    key: str
    fields: dict = field(default_factory=dict)

    @property
    def label(self) -> float:
        """The first label (the class of a multi-label record, as MXNet's readers take it)."""
        return self.labels[0] if self.labels else 0.0


def extension(data: bytes | memoryview) -> str:
    """The file extension of an image's bytes, from its signature (not from any name);
    ImageError when the bytes are no image gpurec knows, or a truncated one."""
    info = sniff(data)
    if info.format == "pnm":
        return _PNM.get(data[1], "ppm")
    if info.format == "jpeg2000" and bytes(data[:4]) == b"\xff\x4f\xff\x51":
        return "j2k"  # a bare codestream
    try:
        return _EXTENSIONS[info.format]
    except KeyError:  # pragma: no cover - sniff knows no other format
        raise ImageError(f"no file extension for format {info.format}") from None


def class_names(classes: list[str] | None, top: int) -> list[str]:
    """Names for labels ``0..top``: the dataset's class names where known, else the
    numbers zero-padded to one width, so that a sorted listing of the names (a folder
    reader's, ImageFolder's) numbers them as the labels were numbered."""
    if classes and len(classes) > top:
        return list(classes)
    width = len(str(max(top, 0)))
    known = list(classes or [])
    return known + [f"{k:0{width}d}" for k in range(len(known), top + 1)]


class LocalFiles:
    """The few fsspec filesystem calls the readers make, on local files, for a pack of
    local tars without fsspec installed (fsspec comes with the ``s3``/``gcs`` extras)."""

    protocol = "file"

    def isdir(self, path: str) -> bool:
        return os.path.isdir(path)

    def isfile(self, path: str) -> bool:
        return os.path.isfile(path)

    def ls(self, path: str, detail: bool = False) -> list:
        if not detail:
            return [os.path.join(path, n) for n in sorted(os.listdir(path))]
        with os.scandir(path) as found:
            return [{"name": e.path, "type": "directory" if e.is_dir() else "file"}
                    for e in sorted(found, key=lambda e: e.name)]  # fmt: skip

    def glob(self, pattern: str) -> list[str]:
        import glob

        return sorted(glob.glob(pattern, recursive=True))

    def find(self, path: str) -> list[str]:
        return sorted(os.path.join(d, n) for d, _, names in os.walk(path) for n in names)

    def size(self, path: str) -> int:
        return os.path.getsize(path)

    def open(self, path: str, mode: str = "rb"):
        return open(path, mode)

    def cat_file(self, path: str, start: int | None = None, end: int | None = None) -> bytes:
        with open(path, "rb") as f:
            f.seek(start or 0)
            return f.read(-1 if end is None else end - (start or 0))

    def cat_ranges(self, paths, starts, ends, on_error: str = "return") -> list:
        out: list = []
        handles: dict[str, int] = {}
        try:
            for path, start, end in zip(paths, starts, ends, strict=True):
                try:
                    if path not in handles:
                        handles[path] = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                    out.append(os.pread(handles[path], end - start, start))
                except OSError as exc:
                    out.append(exc)
        finally:
            for fd in handles.values():
                os.close(fd)
        return out


def absolute(url: str) -> str:
    """A local path made absolute (worker processes and Ray tasks may run elsewhere); a
    URL unchanged."""
    from gpurec.storage import is_url, local_path

    if is_url(url) and not url.startswith("file://"):
        return url
    return os.path.abspath(local_path(url))


class FilesRoot:
    """For the readers' roots: local paths go through :class:`LocalFiles`, URLs through
    fsspec (:class:`gpurec.storage.RemoteRoot`'s ``fs`` and ``path``)."""

    @property
    def fs(self):
        if self._fs is None:
            from gpurec.storage import filesystem, is_url, local_path

            if is_url(self.url) and not self.url.startswith("file://"):
                self._fs, self._path = filesystem(self.url, self.storage_options)
            else:
                self._fs, self._path = LocalFiles(), os.path.abspath(local_path(self.url))
        return self._fs

    @property
    def path(self) -> str:
        self.fs  # noqa: B018 - resolves both
        return self._path.rstrip("/") or "/"


def sample_root(root: str, storage_options: dict | None = None):
    """The root ``gpurec pack`` reads for ``root`` when it names WebDataset tars (a
    ``.tar``, a glob of them, a folder holding them and no folders) or parquet files (a
    ``.parquet``, a glob, a folder holding them, or holding them under ``data/`` as on
    the Hugging Face hub); None for anything else: a folder with images or other folders
    in it is an image tree, whatever archives lie beside them."""
    from gpurec.storage import filesystem, is_url, local_path

    text = root.rstrip("/")
    kind = _kind_of_name(text)
    if kind is None:
        try:
            if is_url(text) and not text.startswith("file://"):
                fs, path = filesystem(text, storage_options)
            else:
                fs, path = LocalFiles(), str(local_path(text))
            if not fs.isdir(path):
                return None
            entries = fs.ls(path, detail=True)
        except (OSError, ValueError):
            return None
        folders = {_base(e["name"]) for e in entries if e.get("type") == "directory"}
        suffixes = {os.path.splitext(_base(e["name"]))[1].lower()
                    for e in entries if e.get("type") != "directory"}  # fmt: skip
        images = any(s.lstrip(".") in IMAGE_KEYS for s in suffixes)
        if images or folders - {"data"}:  # an image tree (with an archive of it, maybe)
            return None
        if ".tar" in suffixes and not folders:
            kind = "webdataset"
        elif (".parquet" in suffixes and not folders) or (
            folders == {"data"} and any(p.endswith(".parquet") for p in _safe_glob(fs, path))
        ):
            kind = "parquet"
    if kind == "webdataset":
        from gpurec.formats.webdataset import TarRoot

        return TarRoot(text, storage_options)
    if kind == "parquet":
        from gpurec.formats.parquet import ParquetRoot

        return ParquetRoot(text, storage_options)
    return None


def _base(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1]


def _kind_of_name(text: str) -> str | None:
    lower = text.lower()
    if lower.endswith(".tar"):
        return "webdataset"
    if lower.endswith(".parquet"):
        return "parquet"
    return None


def _safe_glob(fs, path: str) -> Iterator[str]:
    try:
        yield from fs.glob(f"{path}/data/**/*.parquet")
    except OSError:
        return


def short_names(paths: list[str]) -> dict[str, str]:
    """A name for each of a root's files that no other of them has, to name its samples
    by (``<name>/<key>``): the base name, or, where two files share one (``train/x.tar``
    and ``val/x.tar`` under one glob), every file's path below their common folder;
    samples named alike would read one another's images."""
    bases = [p.rsplit("/", 1)[-1] for p in paths]
    if len(set(bases)) == len(bases):
        return dict(zip(paths, bases, strict=True))
    common = posixpath.commonpath([p.rsplit("/", 1)[0] for p in paths])
    return {p: p[len(common) :].lstrip("/") for p in paths}


def files_of(root, suffix: str) -> list[str]:
    """The files of a :class:`gpurec.storage.RemoteRoot`-like ``root`` that end with
    ``suffix``: the root itself, the matches of a glob, or those in a folder (and in
    its folders), sorted; FileNotFoundError naming the root when there are none."""
    fs, base = root.fs, root.path
    if any(c in root.url for c in "*?["):
        found = fs.glob(base)
    elif fs.isfile(base):
        found = [base]
    else:
        found = fs.find(base)
    found = sorted(p for p in found if p.lower().endswith(suffix))
    if not found:
        raise FileNotFoundError(f"no {suffix} files found at {root.url}")
    return found
