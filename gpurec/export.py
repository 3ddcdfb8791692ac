"""`.rec` shards -> image folders, WebDataset tars or Hugging Face parquet: ``gpurec export``.

The source is anything the Pipeline reads (a `.rec`, a prefix of shards, a glob, a URL:
:func:`gpurec.dataset.resolve_source`), in every layout :class:`gpurec.dataset.Dataset`
knows: InsightFace header and identity records are not exported, files without an
`.idx` are scanned, and of a file cut short the intact records are exported and the
lost ones reported (:attr:`ExportSummary.lost`). Image bytes are copied as they are,
never re-encoded, under the extension of their sniffed format. An InsightFace
verification ``.bin`` exports to a folder of images and a pairs file.

The samples are cut into chunks (one output file each for WebDataset and parquet, a few
hundred images for folders) that worker processes write, each opening the dataset
itself (memory-mapped: only the chunk's records are read). Every file appears under its
final name only when complete (a temporary name and a rename, or an object-store upload
that completes), the manifests (``classes.json``, the folder's ``export.lst``, the skip
report) last. ``num_parts``/``part`` export every ``num_parts``-th chunk from ``part``:
the parts of a job array write exactly the files one export would.

Labels: every record's labels are kept (see each format's module for how); class names
come from ``classes.json`` or the `.lst` beside the shard (:func:`gpurec.inspection.find_classes`),
file names from the `.lst` paths where known (else the sample's number).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from gpurec.dataset import Dataset, resolve_source
from gpurec.formats import FORMATS, Record, class_names, extension
from gpurec.formats.folder import folder_for, folder_names
from gpurec.naming import dataset_stem
from gpurec.recordio import IR_SIZE, RecordIOError, atomic_write, read_lst, unpack_view
from gpurec.storage import Publisher, filesystem, is_url, local_path, staging_dir
from gpurec.transcode import ImageError
from gpurec.workers import pool_context, refuse_in_starting_worker

__all__ = ["ExportSummary", "export"]

Progress = Callable[[int], None]
ON_ERROR = ("raise", "skip")
FOLDER_CHUNK = 256  # images per task of a folder export
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


@dataclass
class ExportSummary:
    """What an export wrote: counts, bytes, the output files (or folder), the records
    skipped (unreadable, with ``on_error="skip"``) and the records lost to files cut
    short (``lost``; ``cuts`` says where)."""

    format: str
    dest: str
    images: int = 0
    bytes: int = 0
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    lost: int = 0
    cuts: list[str] = field(default_factory=list)
    pairs: int | None = None  # a verification set's
    report: str | None = None

    def line(self) -> str:
        """The one-line summary the CLI prints."""
        what = f"{self.pairs} pairs, " if self.pairs is not None else ""
        files = f"{len(self.outputs)} file(s)" if self.format != "folder" else "a folder"
        lost = f", {self.lost} lost to a cut" if self.lost else ""
        rate = self.images / self.seconds if self.seconds > 0 else 0.0
        return (
            f"exported {what}{self.images} images to {self.dest} as {self.format} ({files}), "
            f"{self.bytes / 1e6:.1f} MB, skipped {len(self.skipped)}{lost}, "
            f"{self.seconds:.1f} s, {rate:.0f} images/s"
        )


# ------------------------------------------------------------------------ destination


class Destination:
    """Where an export's files go: a local folder (temporary name, then a rename in
    place) or a URL (object stores: an object appears when its upload completes; other
    filesystems: a temporary name and a move; see :class:`gpurec.storage.Publisher`)."""

    def __init__(self, dest: str, storage_options: dict | None = None) -> None:
        text = str(dest)
        self.url = text.rstrip("/") if is_url(text) and not text.startswith("file://") else None
        self.storage_options = storage_options
        self.root = None if self.url else Path(local_path(text))
        self._made: set[Path] = set()
        self._publisher: Publisher | None = None
        self._pending: dict[str, bytes] = {}

    def name(self, rel: str) -> str:
        """The full name of ``rel``; ValueError for one that is not a plain relative
        path (``../x``, ``/x``, ``a//b``), local or at a URL alike: nothing is written
        outside the destination."""
        parts = rel.split("/")
        if rel.startswith("/") or ".." in parts or "" in parts or "." in parts or "\0" in rel:
            raise ValueError(f"refused output path {rel!r}: not under the destination")
        return f"{self.url}/{rel}" if self.url else str(self.root / rel)

    def _local(self, rel: str) -> Path:
        path = Path(self.name(rel))
        if path.parent not in self._made:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._made.add(path.parent)
        return path

    def write(self, rel: str, write: Callable) -> str:
        """Write the file ``rel`` with ``write(binary file)``; it appears when complete."""
        if self.url is None:
            with atomic_write(self._local(rel), sync=True) as f:  # a tar, a parquet file
                write(f)
            return self.name(rel)
        self.name(rel)  # refused before anything is written
        stage = staging_dir()
        try:
            local = stage / rel.rsplit("/", 1)[-1]
            with open(local, "wb") as f:
                write(f)
            if self._publisher is None:
                self._publisher = Publisher(self.url + "/", self.storage_options)
            self._publisher.publish([(local, self._publisher.path(self.name(rel)))]).result()
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return self.name(rel)

    def put(self, rel: str, data: bytes | memoryview) -> None:
        """One small file (an image of a folder export): written under a temporary name
        and renamed, not fsynced one by one (a million fsyncs would be the export's
        whole cost; after a crash, run the export again); to a URL, sent with the
        others of its chunk by :meth:`flush` (each object appears whole)."""
        # locally atomic_write's steps on descriptors, with a fixed temporary name and no
        # fsync: one file per image, at the speed of a plain copy
        if self.url is None:
            path = str(self._local(rel))
            folder, _, name = path.rpartition("/")
            tmp = f"{folder}/.{name}.tmp"
            fd = -1
            try:  # the open too: a Ctrl-C handled as it returns left an empty .tmp behind
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _CLOEXEC, 0o666)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.close(fd)
                fd = -1
                os.replace(tmp, path)
            except BaseException:
                if fd >= 0:
                    os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        else:
            self.name(rel)  # checked now, sent by flush
            self._pending[rel] = bytes(data)

    def flush(self) -> None:
        if self._pending:
            fs, _ = filesystem(self.url, self.storage_options)
            pending, self._pending = self._pending, {}
            fs.pipe({filesystem(self.name(rel))[1]: data for rel, data in pending.items()})


# ------------------------------------------------------------------------------ plan


@dataclass(frozen=True)
class _Labels:
    width: int  # labels per record, at most
    whole: bool  # every first label a whole number >= 0
    top: int  # the largest first label (whole numbers)


def _scan_labels(dataset: Dataset, progress: Progress | None) -> _Labels:
    """The label shape of every sample, from the IRHeaders alone (no image is read)."""
    width, whole, top = 1, True, -1
    for shard in dataset.shards:
        reader = shard.reader
        firsts = np.empty(len(shard), np.float32)
        for k, offset in enumerate(shard.offsets.tolist()):
            head = reader.head_at(offset, IR_SIZE + 4)
            flag = int.from_bytes(head[:4], "little") if len(head) >= 4 else 0
            if flag and not shard.first_label_only:
                width = max(width, flag)
            at = IR_SIZE if flag and len(head) >= IR_SIZE + 4 else 4
            firsts[k] = np.frombuffer(head, "<f4", 1, at)[0] if len(head) >= at + 4 else 0.0
        if len(firsts):
            whole = whole and bool(np.all((firsts == np.round(firsts)) & (firsts >= 0)))
            if whole:
                top = max(top, int(firsts.max()))
        if progress is not None:
            progress(len(shard))
    return _Labels(width, whole, top)


def _estimated_sizes(dataset: Dataset) -> np.ndarray:
    """Each sample's bytes in its shard, from the offsets (up to the next record)."""
    out = []
    for shard in dataset.shards:
        offsets = shard.offsets.astype(np.int64)
        order = np.argsort(offsets, kind="stable")
        ends = np.append(offsets[order][1:], shard.reader.size)
        sizes = np.empty(len(offsets), np.int64)
        sizes[order] = ends - offsets[order]
        out.append(sizes)
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def _chunks(sizes: np.ndarray, max_samples: int, max_bytes: int) -> list[tuple[int, int]]:
    """Contiguous (start, stop) ranges of at most ``max_samples`` samples and about
    ``max_bytes`` bytes each (a single larger sample gets a chunk of its own)."""
    out, start, total = [], 0, 0
    for i, size in enumerate(sizes.tolist()):
        if i > start and (i - start >= max_samples or total + size > max_bytes):
            out.append((start, i))
            start, total = i, 0
        total += size
    if start < len(sizes):
        out.append((start, len(sizes)))
    return out


def _lst_names(rec: Path) -> Iterator[tuple[int, float, str]]:
    """(IRHeader id, first label, file name without extension) of each line of the
    `.lst` beside a shard; nothing when there is none or it cannot be read."""
    lst = Path(rec).with_suffix(".lst")
    if not lst.is_file():
        return
    with contextlib.suppress(RecordIOError, OSError, UnicodeDecodeError):
        entries = list(read_lst(lst, []))
        for e in entries:
            name = e.path.replace("\\", "/").rsplit("/", 1)[-1]
            yield e.index, (e.labels[0] if e.labels else 0.0), os.path.splitext(name)[0]


def _name_key(folder: str, stem: str) -> int:
    """A stable 64-bit key of a file's (class folder, name): the same in every process
    (str's hash() is not), 8 bytes a record in the coordinator's count."""
    text = f"{folder}\0{stem}".encode("utf-8", "surrogateescape")
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def _repeated_names(dataset: Dataset, folders: list[str]) -> frozenset[int]:
    """The (class folder, `.lst` name) pairs (:func:`_name_key` s) that more than one
    record of the whole export would take, over all its shards (two packs of trees with
    the same file names, an oversampled `.lst`): those records' files get their sample
    number in front, so that no image overwrites another in a folder export. One pass
    over the `.lst` files, in the coordinator, before any worker starts; 8 bytes a
    record (a key shared by chance only puts a number in front of a name)."""
    keys = [
        np.fromiter(
            (_name_key(folder_for(label, folders), stem) for _, label, stem in _lst_names(s.path)),
            np.uint64,
        )
        for s in dataset.shards
    ]
    if not keys:
        return frozenset()
    found, counts = np.unique(np.concatenate(keys), return_counts=True)
    return frozenset(found[counts > 1].tolist())


# --------------------------------------------------------------------------- workers


@dataclass
class _Done:
    """What a worker reports for one chunk."""

    count: int = 0
    bytes: int = 0
    output: str | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    lst: list[str] = field(default_factory=list)
    error: tuple[str, str | None, int | None] | None = None  # reason, path, offset


class _Exporter:
    """One process's view of an export: the dataset (opened once), the destination,
    and how records become :class:`Record` s."""

    def __init__(self, recs, fmt, dest, storage_options, names, spec, on_error, width, repeated):
        self.dataset = Dataset(recs, on_error="skip")
        self.fmt, self.names, self.spec, self.on_error = fmt, names, spec, on_error
        self.dest = Destination(dest, storage_options)
        self.width = width
        self.folders = folder_names(names) if names is not None else []
        self.repeated: frozenset[int] = repeated
        self._lst_names: dict[int, dict[int, str]] = {}

    def _names_of(self, shard: int) -> dict[int, str]:
        """File names (without extension) by IRHeader id, from the shard's `.lst`."""
        if shard not in self._lst_names:
            path = self.dataset.shards[shard].path
            self._lst_names[shard] = {i: stem for i, _, stem in _lst_names(path)}
        return self._lst_names[shard]

    def records(self, start: int, stop: int, done: _Done) -> Iterator[Record]:
        dataset = self.dataset
        for i in range(start, stop):
            try:
                header, payload = unpack_view(dataset.read_view(i))
                ext = extension(payload)
            except (RecordIOError, ImageError) as exc:
                reason = exc.reason if isinstance(exc, RecordIOError) else str(exc)
                if self.on_error == "raise":
                    error = dataset.error(i, reason)
                    done.error = (f"{error.reason} (--on-error skip goes on without it)",
                                  error.path, error.offset)  # fmt: skip
                    return
                done.skipped.append((dataset.where(i), reason))
                continue
            shard = dataset.locate(i)[0]
            labels = tuple(float(x) for x in np.atleast_1d(header.label).tolist()) or (0.0,)
            key = f"{i:0{self.width}d}"
            stem = self._names_of(shard).get(header.id)
            if stem is None:
                stem = key
            elif _name_key(folder_for(labels[0], self.folders), stem) in self.repeated:
                stem = f"{key}_{stem}"  # a name another record of its class has too
            fields = {"id": int(header.id), "id2": int(header.id2), "flag": int(header.flag),
                      "source": dataset.shards[shard].path.name,
                      "record": dataset.name(i)}  # fmt: skip
            done.count += 1
            done.bytes += len(payload)
            yield Record(payload, labels, f"{stem}.{ext}", key, fields)

    def run(self, start: int, stop: int, output: str | None) -> _Done:
        done = _Done(output=output)
        records = self.records(start, stop, done)
        if self.fmt == "folder":
            from gpurec.formats.folder import write_folder

            done.lst = write_folder(records, self.dest.put, self.folders)
            self.dest.flush()
            return done
        if self.fmt == "webdataset":
            from gpurec.formats.webdataset import write_tar

            def write(f) -> None:
                write_tar(f, records, self.names)
        else:
            from gpurec.formats.parquet import write_parquet

            def write(f) -> None:
                write_parquet(f, records, self.spec)

        def guarded(f) -> None:
            write(f)
            if done.error is not None:  # an unreadable record: this file is dropped
                raise _Aborted

        try:
            done.output = self.dest.write(output, guarded)
        except _Aborted:
            done.output = None
        return done


class _Aborted(Exception):
    """Ends the writing of a file whose records stopped at an unreadable one."""


_WORKER: dict = {}


def _init_worker(*args) -> None:
    _WORKER["exporter"] = _Exporter(*args)


def _run_in_worker(start: int, stop: int, output: str | None) -> _Done:
    return _WORKER["exporter"].run(start, stop, output)


def _pool(workers: int, args: tuple) -> ProcessPoolExecutor:
    ctx = pool_context("gpurec.export")
    return ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=args)


# ---------------------------------------------------------------------------- export


def export(
    source,
    dest: str | os.PathLike,
    *,
    format: str = "folder",
    workers: int | None = None,
    max_samples: int = 10_000,
    max_bytes: int = 1 << 30,
    num_parts: int = 1,
    part: int = 0,
    on_error: str = "raise",
    storage_options: dict | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: Progress | None = None,
    on_plan: Callable[[int], None] | None = None,
) -> ExportSummary:
    """``gpurec export``: write every sample of ``source`` to ``dest`` as ``format``
    (``"folder"``, ``"webdataset"`` or ``"parquet"``; see the module docstring).

    ``max_samples``/``max_bytes``: the size of each tar or parquet file (the bytes as
    the records take them). ``on_error``: ``"raise"`` stops at the first unreadable
    record with an error naming it (the files complete by then stay, the one being
    written is dropped); ``"skip"`` leaves it out and lists it in the summary and in
    ``DEST/export.skipped.tsv``. ``on_plan`` is told how many samples this part
    exports, ``progress`` how many are done as chunks finish.
    """
    refuse_in_starting_worker("export")
    start_time = time.perf_counter()
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if num_parts < 1 or not 0 <= part < num_parts:
        raise ValueError(f"part must be in 0..num_parts-1, got {part} of {num_parts}")
    if max_samples < 1 or max_bytes < 1:
        raise ValueError("max_samples and max_bytes must be >= 1")
    dest_text = os.fspath(dest) if not isinstance(dest, str) else dest
    if isinstance(source, (str, os.PathLike)) and os.fspath(source).endswith(".bin"):
        if format != "folder":
            raise ValueError("a verification .bin exports with --format folder")
        return _export_bin(os.fspath(source), dest_text, storage_options,
                           start_time, progress, on_plan)  # fmt: skip
    recs = resolve_source(source, cache_dir=cache_dir, storage_options=storage_options)
    dataset = Dataset(recs, on_error="skip")
    summary = ExportSummary(format, dest_text)
    try:
        summary.lost = dataset.lost
        summary.cuts = [str(s.end) for s in dataset.shards if s.end is not None]
        labels = _scan_labels(dataset, None)
        from gpurec.inspection import find_classes

        classes = find_classes(recs[0])
        names = class_names(classes, labels.top) if labels.whole else None
        width = max(6, len(str(len(dataset) - 1)))
        repeated = _repeated_names(dataset, folder_names(names) if names is not None else [])
        if format == "folder":
            ranges = [(s, min(s + FOLDER_CHUNK, len(dataset)))
                      for s in range(0, len(dataset), FOLDER_CHUNK)]  # fmt: skip
        else:
            ranges = _chunks(_estimated_sizes(dataset), max_samples, max_bytes)
    finally:
        dataset.close()
    stem = dataset_stem(recs[0].name)
    ext = {"webdataset": "tar", "parquet": "parquet"}.get(format)
    tasks = [
        (a, b, None if ext is None else f"{stem}-{k:05d}-of-{len(ranges):05d}.{ext}")
        for k, (a, b) in enumerate(ranges)
    ][part::num_parts]
    if on_plan is not None:
        on_plan(sum(b - a for a, b, _ in tasks))
    spec = None
    if format == "parquet":
        from gpurec.formats.parquet import LabelSpec

        spec = LabelSpec(names, labels.width)
    args = (recs, format, dest_text, storage_options, names, spec, on_error, width, repeated)
    workers = max(1, min(workers or os.cpu_count() or 1, len(tasks)))
    destination = Destination(dest_text, storage_options)
    # the folder's .lst lines go to an unnamed local file as chunks finish, not into a
    # list of every record's line (a GB for ten million records)
    with tempfile.TemporaryFile(prefix="gpurec-export-lst-") as lst:
        for done in _run(tasks, workers, args):
            if done.error is not None:
                reason, path, offset = done.error
                raise RecordIOError(reason, path, offset=offset)
            summary.images += done.count
            summary.bytes += done.bytes
            summary.skipped += done.skipped
            if done.lst:
                lst.write("".join(done.lst).encode())
            if done.output is not None:
                summary.outputs.append(done.output)
            if progress is not None:
                progress(done.count + len(done.skipped))
        lst.seek(0)
        _manifests(destination, summary, names, lst, num_parts, part)
    summary.seconds = time.perf_counter() - start_time
    return summary


def _run(tasks: list, workers: int, args: tuple) -> Iterator[_Done]:
    """Each task's result, in task order; ``workers`` processes (this one alone for 1),
    a bounded number of tasks in flight."""
    if workers <= 1:
        exporter = _Exporter(*args)
        try:
            for task in tasks:
                yield exporter.run(*task)
        finally:
            exporter.dataset.close()
        return
    pool = _pool(workers, args)
    pending: list[Future] = []
    todo = iter(tasks)
    try:
        for task in todo:
            pending.append(pool.submit(_run_in_worker, *task))
            if len(pending) >= 2 * workers:
                break
        while pending:
            done = pending.pop(0).result()
            task = next(todo, None)
            if task is not None:
                pending.append(pool.submit(_run_in_worker, *task))
            yield done
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def _manifests(
    dest: Destination, summary: ExportSummary, names, lst: BinaryIO, num_parts: int, part: int
) -> None:
    """classes.json, the folder's export.lst and the skip report, once the data is in
    place (the parts of a job array each write their own .lst and report)."""
    tag = f".part-{part}-of-{num_parts}" if num_parts > 1 else ""
    if names is not None:
        text = json.dumps({"classes": names}, indent=1, ensure_ascii=False) + "\n"
        dest.write("classes.json", lambda f: f.write(text.encode()))
    if summary.format == "folder":
        copy = lambda f: shutil.copyfileobj(lst, f, 1 << 20)  # noqa: E731
        summary.outputs.append(dest.write(f"export{tag}.lst", copy))
    if summary.skipped:
        from gpurec.pack import write_report

        stage = Path(tempfile.mkdtemp(prefix="gpurec-report-"))
        try:
            local = write_report(stage / "report.tsv", summary.skipped)
            data = local.read_bytes()
            summary.report = dest.write(f"export{tag}.skipped.tsv", lambda f: f.write(data))
        finally:
            shutil.rmtree(stage, ignore_errors=True)


# ------------------------------------------------------------------- verification sets


def _export_bin(path: str, dest: str, storage_options, start_time, progress, on_plan):
    from gpurec.formats.verification import read_bin

    vset = read_bin(path, storage_options)
    destination = Destination(dest, storage_options)
    summary = ExportSummary("folder", dest, pairs=vset.pairs)
    if on_plan is not None:
        on_plan(len(vset.images))
    width = max(5, len(str(len(vset.images) - 1)))
    names = []
    for i, data in enumerate(vset.images):
        try:
            ext = extension(data)
        except ImageError as exc:
            raise ValueError(f"{path}: image {i}: {exc}") from None
        names.append(f"images/{i:0{width}d}.{ext}")
        destination.put(names[-1], data)
        summary.images += 1
        summary.bytes += len(data)
        if progress is not None:
            progress(1)
    destination.flush()
    lines = ["first\tsecond\tsame\n"] + [
        f"{names[2 * k]}\t{names[2 * k + 1]}\t{int(same)}\n" for k, same in enumerate(vset.issame)
    ]
    data = "".join(lines).encode()
    summary.outputs.append(destination.write("pairs.tsv", lambda f: f.write(data)))
    summary.seconds = time.perf_counter() - start_time
    return summary
