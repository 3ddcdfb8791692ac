"""WebDataset: samples as consecutive members of `.tar` shards.

A sample is the members that share a key (the member name up to the first dot of its
base name): here ``KEY.jpg`` (or ``.png``, ... as sniffed), ``KEY.cls`` (the label as
decimal text, when it is a whole number) and ``KEY.json`` (the header fields, all the
labels, the class name and the file name). ``webdataset.WebDataset`` and plain ``tar``
read the shards.

Writing: the members are framed with :mod:`tarfile`'s own headers and the image bytes
are written after them as they are (no copy into a buffer). Reading (``gpurec pack``):
:class:`TarRoot` lists the tars once (member offsets, labels) and reads images by byte
ranges, on local disk or in object storage alike.
"""

from __future__ import annotations

import io
import json
import os
import struct
import tarfile
from collections.abc import Iterable, Sequence
from typing import BinaryIO

from gpurec.formats import IMAGE_KEYS, FilesRoot, Record, absolute, files_of, short_names
from gpurec.listing import Listing
from gpurec.recordio import ListEntry, write_all
from gpurec.storage import RemoteRoot

__all__ = ["TarRoot", "write_tar"]

_BLOCK = tarfile.BLOCKSIZE
_MTIME = 0  # members carry no time: the same records make the same bytes


_USTAR = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s12x")
_ZEROS = bytes(_BLOCK)
_TEMPLATE = _USTAR.pack(  # a member's header less its name, size and checksum
    b"", b"0000644\0", b"0000000\0", b"0000000\0", b"", b"%011o\0" % _MTIME, b" " * 8, b"0", b"",
    b"ustar\0", b"00", b"", b"", b"", b"", b"",
)  # fmt: skip


def ustar_header(name: str, size: int) -> bytes:
    """The POSIX ustar header of a regular file ``name`` of ``size`` bytes (mode 0644,
    owner 0, time 0): the bytes ``tarfile.TarInfo.tobuf(tarfile.USTAR_FORMAT)`` gives,
    built in a few microseconds instead of ~40 (a tar of small samples has millions).
    Names over 100 bytes, or sizes of 8 GiB and more, go through :mod:`tarfile`
    (GNU long names)."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) > 100 or size >= 8**11:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, _MTIME, 0o644
        return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")
    head = bytearray(_TEMPLATE)
    head[: len(raw)] = raw
    head[124:136] = b"%011o\0" % size
    head[148:156] = b"%06o\0 " % sum(head)
    return bytes(head)


def _member(parts: list, name: str, data: bytes | memoryview) -> int:
    """Add one member's buffers (header, data, padding) to ``parts``; returns its bytes."""
    size = memoryview(data).nbytes
    head = ustar_header(name, size)
    pad = -size % _BLOCK
    parts += (head, data, _ZEROS[:pad]) if pad else (head, data)
    return len(head) + size + pad


def sample_json(record: Record, class_name: str | None) -> bytes:
    """The sample's json: the header fields, all the labels, the class and file names.
    Formatted by hand where it can be (a third of ``json.dumps``' time per sample), with
    what ``json.dumps(..., sort_keys=True)`` gives."""
    f = record.fields
    if set(f) != _FIELDS or not all(type(f[k]) is int for k in ("flag", "id", "id2")):
        fields = {**f, "name": record.name, "label": _label_value(record)}
        if class_name is not None:
            fields["class"] = class_name
        return json.dumps(fields, ensure_ascii=False, sort_keys=True).encode()
    label = json.dumps(_label_value(record))
    head = "{" if class_name is None else '{"class": ' + _string(class_name) + ", "
    return (
        f'{head}"flag": {f["flag"]}, "id": {f["id"]}, "id2": {f["id2"]}, "label": {label}, '
        f'"name": {_string(record.name)}, "record": {_string(f["record"])}, '
        f'"source": {_string(f["source"])}}}'
    ).encode()


_FIELDS = {"flag", "id", "id2", "record", "source"}  # what gpurec.export puts in a record
_string = json.encoder.encode_basestring  # a JSON string, non-ASCII kept (ensure_ascii=False)


def _label_value(record: Record) -> float | list[float]:
    return list(record.labels) if len(record.labels) > 1 else record.label


def write_tar(out: BinaryIO, records: Iterable[Record], names: list[str] | None) -> int:
    """Write ``records`` as WebDataset samples to the open file ``out``, then the tar
    end (two zero blocks, padded to tar's 10 KiB record); returns the samples written.
    ``names``: class names by label, for the ``class`` field of each sample's json.
    A real file gets the buffers of ~1 MiB of samples per ``writev`` (the image bytes
    unjoined: views of the memory-mapped shard)."""
    out.flush()
    fd = _fileno(out)
    n = written = pending = 0
    parts: list = []
    for record in records:
        key, ext = record.key, record.name.rsplit(".", 1)[-1]
        size = _member(parts, f"{key}.{ext}", record.data)
        label = record.label
        whole = float(label).is_integer()
        if whole:
            size += _member(parts, f"{key}.cls", str(int(label)).encode())
        k = int(label) if whole else -1
        name = names[k] if names is not None and 0 <= k < len(names) else None
        size += _member(parts, f"{key}.json", sample_json(record, name))
        written += size
        pending += size
        n += 1
        if pending >= _FLUSH_BYTES or len(parts) >= _FLUSH_PARTS:
            _write(out, fd, parts)
            parts, pending = [], 0
    _write(out, fd, parts)
    end = 2 * _BLOCK
    end += -(written + end) % tarfile.RECORDSIZE
    out.write(b"\0" * end)
    return n


_FLUSH_BYTES = 1 << 20
_FLUSH_PARTS = 480


def _write(out, fd: int | None, parts: list) -> None:
    if fd is None:
        for part in parts:
            out.write(part)
    else:
        write_all(fd, parts)


def _fileno(out) -> int | None:
    try:
        return out.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None


# ----------------------------------------------------------------------------- reading


def _labels(cls: bytes | None, meta: dict | None) -> tuple[tuple[float, ...] | None, str | None]:
    """(labels, class name) of a sample from its ``cls`` and ``json`` members."""
    name = None
    labels = None
    if isinstance(meta, dict):
        found = meta.get("labels", meta.get("label"))
        if isinstance(found, list) and found and all(isinstance(x, (int, float)) for x in found):
            labels = tuple(float(x) for x in found)
        elif isinstance(found, (int, float)) and not isinstance(found, bool):
            labels = (float(found),)
        if isinstance(meta.get("class"), str):
            name = meta["class"]
    if cls is not None:
        text = cls.decode("utf-8", "replace").strip()
        try:
            first = float(int(text))
        except ValueError:
            first = None
        if first is not None:
            labels = (first, *labels[1:]) if labels and labels[0] == first else (first,)
    return labels, name


class TarRoot(FilesRoot, RemoteRoot):
    """WebDataset tars (a ``.tar``, a glob, a folder of them; local or at a URL) as a
    root ``gpurec pack`` reads images from: :meth:`list_samples` lists every tar once
    (the member headers, and each sample's ``cls``/``json``), :meth:`read_many` reads
    images by byte range (``fs.cat_ranges``: concurrent on object stores). Pickles with
    its index, so worker processes read without listing again."""

    labels_from = "WebDataset samples: cls, else the json's label"

    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        super().__init__(absolute(url), storage_options)
        self._where: dict[str, tuple[str, int, int]] = {}

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "where": self._where}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._where = state["where"]

    def list_samples(self) -> Listing:
        """Every sample with an image, labelled from ``cls`` (or the json's ``label``),
        in tar order; samples without either, and tars cut short, are skipped with a
        reason. Class names: ``classes.json`` beside the tars (``gpurec export`` writes
        it), else the samples' json ``class`` fields, else the label numbers."""
        fs = self.fs
        entries: list[ListEntry] = []
        skipped: list[tuple[str, str]] = []
        seen_names: dict[int, str] = {}
        self._where = {}
        tars = files_of(self, ".tar")
        for path, tar_name in short_names(tars).items():
            for key, members, problem in _samples(fs, path):
                rel = f"{tar_name}/{key}"
                if problem is not None:
                    skipped.append((rel, problem))
                    continue
                image = next((m for ext in IMAGE_KEYS if (m := members.get(ext))), None)
                if image is None:
                    skipped.append((rel, "no image member (" + ", ".join(sorted(members)) + ")"))
                    continue
                cls = _small(fs, path, members.get("cls"))
                meta = None
                raw = _small(fs, path, members.get("json"))
                if raw is not None:
                    try:
                        meta = json.loads(raw)
                    except ValueError:
                        meta = None
                labels, name = _labels(cls, meta)
                if labels is None:
                    skipped.append((rel, "no label: neither a cls member nor a json label"))
                    continue
                ext = image[0]
                rel = f"{rel}.{ext}"
                if rel in self._where:  # WebDataset's reader: another sample, same key
                    skipped.append((rel, "key repeats an earlier sample's in this tar"))
                    continue
                self._where[rel] = (path, image[1], image[2])
                entries.append(ListEntry(len(entries), labels, rel))
                if name is not None and labels[0].is_integer():
                    seen_names.setdefault(int(labels[0]), name)
        classes = _class_list(self, entries, seen_names)
        return Listing(entries, classes, skipped)

    def read_many(self, rels: Sequence[str], max_size: int) -> list[bytes | str]:
        out: list[bytes | str] = [""] * len(rels)
        want = []
        for i, rel in enumerate(rels):
            where = self._where.get(rel)
            if where is None:
                out[i] = "not in the tars' listing"
            elif where[2] > max_size:
                out[i] = f"member of {where[2]} bytes is over a record's maximum of {max_size}"
            else:
                want.append((i, where))
        if want:
            paths = [w[0] for _, w in want]
            starts = [w[1] for _, w in want]
            ends = [w[1] + w[2] for _, w in want]
            try:
                got = self.fs.cat_ranges(paths, starts, ends, on_error="return")
            except OSError as exc:
                got = [exc] * len(want)
            for (i, where), data in zip(want, got, strict=True):
                if isinstance(data, BaseException):
                    out[i] = f"cannot read {where[0]}: {data}"
                elif len(data) != where[2]:
                    out[i] = f"{where[0]}: member cut short ({len(data)} of {where[2]} bytes)"
                else:
                    out[i] = data
        return out


def _small(fs, path: str, member: tuple[str, int, int] | None) -> bytes | None:
    if member is None or member[2] > 1 << 20:
        return None
    return member[3] if len(member) > 3 else fs.cat_file(path, member[1], member[1] + member[2])


def _samples(fs, path: str):
    """(key, {ext: (ext, offset, size[, bytes])}, problem) of each sample of one tar, in
    order; small members (``cls``, ``json``) come with their bytes (read as the walk
    passes them). A tar cut short ends on a sample with the problem."""
    size = fs.size(path)
    current: str | None = None
    members: dict = {}
    with fs.open(path, "rb") as raw:
        try:
            tar = tarfile.open(fileobj=raw, mode="r:")  # noqa: SIM115 - closed with raw
        except tarfile.TarError as exc:
            yield path.rsplit("/", 1)[-1], {}, f"not a tar file: {exc}"
            return
        try:
            for info in _members(tar):
                if not info.isfile():
                    continue
                folder, _, base = info.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if not dot:
                    continue
                key = f"{folder}/{stem}" if folder else stem
                if key != current:
                    if current is not None:
                        yield current, members, None
                    current, members = key, {}
                if info.offset_data + info.size > size:
                    members = {}
                    yield key, {}, f"tar cut short: member {info.name} ends past byte {size}"
                    current = None
                    break
                entry: tuple = (ext.lower(), info.offset_data, info.size)
                if ext.lower() in ("cls", "json") and info.size <= 1 << 20:
                    entry += (tar.extractfile(info).read(),)
                members[ext.lower()] = entry
        except (tarfile.TarError, OSError, EOFError) as exc:
            if current is not None:
                members = {}
            yield current or path.rsplit("/", 1)[-1], {}, f"tar cut short or broken: {exc}"
            current = None
        if current is not None:
            yield current, members, None


def _members(tar: tarfile.TarFile):
    while True:
        info = tar.next()
        if info is None:
            return
        yield info
        tar.members.clear()  # a listing of millions of members does not grow in memory


def _class_list(root: RemoteRoot, entries: list[ListEntry], seen: dict[int, str]) -> list[str]:
    """Class names for labels 0..max: ``classes.json`` beside the data, else the names
    the samples carry, else numbers."""
    top = max((int(e.labels[0]) for e in entries if e.labels[0].is_integer()), default=-1)
    names = read_classes_json(root)
    if names is None and seen:
        names = [seen.get(k, str(k)) for k in range(top + 1)]
    if names is None or len(names) <= top:
        names = (names or []) + [str(k) for k in range(len(names or []), top + 1)]
    return names


def read_classes_json(root: RemoteRoot) -> list[str] | None:
    """``classes.json`` (``{"classes": [...]}``) in the folder of the data, if any."""
    fs, base = root.fs, root.path
    folder = base if fs.isdir(base) else os.path.dirname(base.split("*")[0].rstrip("/"))
    try:
        raw = fs.cat_file(f"{folder.rstrip('/')}/classes.json")
        classes = json.load(io.BytesIO(raw)).get("classes")
    except (OSError, ValueError, AttributeError):
        return None
    return [str(c) for c in classes] if isinstance(classes, list) else None
