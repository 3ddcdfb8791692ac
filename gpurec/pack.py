"""Image tree -> list -> `.rec`/`.idx` shards, on all cores, in list order, never half-written.

:func:`pack` is ``gpurec pack``: list a tree (or read a `.lst`), split, shard, and
write each shard. :func:`pack_lists` is the packing half of ``gpurec im2rec``: one
`.rec`/`.idx` per existing `.lst`. Both run :func:`write_shards`, which sends images
to a thread pool in small batches, keeps a bounded window of them in flight (memory
does not grow with the list) and writes results in list order whatever the worker
count, so the bytes are the same with 1 or 32 workers.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from itertools import islice
from pathlib import Path

import cv2

from gpurec.listing import (
    IMAGE_EXTS,
    Listing,
    RootPaths,
    RootRule,
    list_images,
    split_entries,
)
from gpurec.recordio import (
    MAX_RECORD_SIZE,
    IRHeader,
    ListEntry,
    RecordIOError,
    RecordWriter,
    frame_record,
    read_lst,
    write_lst,
)
from gpurec.transcode import DEFAULT_MAX_PIXELS, EncodeSpec, ImageError, Payload, transcode

__all__ = ["PackOptions", "PackSummary", "ShardJob", "pack", "pack_lists", "write_shards"]

Progress = Callable[[int], None]


@dataclass(frozen=True)
class PackOptions:
    """Every option of :func:`pack`; config files use these names as keys.

    Listing: ``exts``, ``label_from_name`` (a regex whose first group is the class, or
    ``"default"`` for ``<class>_<number>.<ext>``), ``follow_links`` (symlinks may lead
    out of the root), ``allow_outside_root`` (a `.lst` may name absolute or ``..``
    paths), ``lst`` (pack this `.lst` instead of listing the tree). Order and splits:
    ``shuffle``, ``seed``, ``train_ratio``, ``test_ratio`` (val gets the rest). Images:
    as :class:`EncodeSpec`. Records: ``pack_label`` (several labels of a `.lst` line as a
    multi-label header).
    Output: ``shards`` per split; ``num_parts``/``part`` to pack only every
    ``num_parts``-th shard starting at ``part`` (one job of a job array).
    ``workers``: threads (None: all cores).
    """

    exts: tuple[str, ...] = IMAGE_EXTS
    label_from_name: str | None = None
    follow_links: bool = False
    allow_outside_root: bool = False
    lst: str | None = None
    shuffle: bool = True
    seed: int = 0
    train_ratio: float = 1.0
    test_ratio: float = 0.0
    resize: int = 0
    center_crop: bool = False
    quality: int = 95
    encoding: str = ".jpg"
    color: int = 1
    pass_through: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    pack_label: bool = False
    shards: int = 1
    num_parts: int = 1
    part: int = 0
    workers: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "exts", tuple(self.exts))
        if self.shards < 1:
            raise ValueError(f"shards must be >= 1, got {self.shards}")
        if self.num_parts < 1 or not 0 <= self.part < self.num_parts:
            raise ValueError(f"part must be in 0..num_parts-1, got {self.part} of {self.num_parts}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        self.encode_spec()  # validates the image options

    @classmethod
    def from_dict(cls, options: dict) -> PackOptions:
        """Build from keyword names (a config file); unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"unknown pack option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**options)

    def encode_spec(self) -> EncodeSpec:
        return EncodeSpec.from_fields(self)


@dataclass
class ShardJob:
    """One output shard: where it goes and the list entries it holds, in order."""

    prefix: Path
    entries: list[ListEntry]
    write_lst: bool = True

    @property
    def rec(self) -> Path:
        return self.prefix.with_name(self.prefix.name + ".rec")

    @property
    def idx(self) -> Path:
        return self.prefix.with_name(self.prefix.name + ".idx")

    @property
    def lst(self) -> Path:
        return self.prefix.with_name(self.prefix.name + ".lst")


@dataclass
class PackSummary:
    """What a pack wrote: counts, bytes, time, the files, and the skipped images."""

    images: int = 0
    bytes: int = 0
    seconds: float = 0.0
    outputs: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    report: Path | None = None

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        """The one-line summary the CLI prints."""
        return (
            f"packed {self.images} images into {len(self.outputs)} shard(s), "
            f"{self.bytes / 1e6:.1f} MB, skipped {len(self.skipped)}, "
            f"{self.seconds:.1f} s, {self.images_per_second:.0f} images/s"
        )


# ------------------------------------------------------------------------ the workers


@contextlib.contextmanager
def _opencv_on_one_thread() -> Iterator[None]:
    """Our threads give the parallelism: OpenCV's own pool would only oversubscribe the
    cores. The caller's setting is restored afterwards."""
    before = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(before)


Frame = list[Payload]
"""One record, framed (:func:`frame_record`) and ready to append to a `.rec`."""


def _read(paths: RootPaths, rel: str) -> bytes:
    """The bytes of the file ``rel`` under the root, with the fewest system calls (0.5-0.6x
    the time of ``open(path, "rb").read()`` on 60 KB files). ImageError, before reading,
    for what is not a regular file (a FIFO, a device) or is larger than a record can be
    (a huge file could exhaust memory)."""
    fd = paths.open(rel)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ImageError("not a regular file")
        size = info.st_size
        if size > MAX_RECORD_SIZE:
            raise ImageError(
                f"file of {size} bytes is over a record's maximum of {MAX_RECORD_SIZE}"
            )
        chunks = [os.read(fd, max(size, 1))]
        while chunks[-1] and sum(map(len, chunks)) < size:  # a short read: read on
            chunks.append(os.read(fd, size))
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    finally:
        os.close(fd)


def _record(paths: RootPaths, path: str, header: IRHeader, spec: EncodeSpec) -> Frame | str:
    """The framed record of the image at ``path`` under the root, or why it is skipped."""
    try:
        return frame_record(transcode(_read(paths, path), spec), header)
    except (ImageError, RecordIOError, ValueError) as exc:
        return str(exc)
    except OSError as exc:
        return f"cannot read: {exc.strerror or exc}"
    except MemoryError:
        return "out of memory reading it"


Work = tuple[str, IRHeader]  # an image's path under the root, and its record's header


def _records(paths: RootPaths, spec: EncodeSpec, batch: list[Work]) -> list[Frame | str]:
    return [_record(paths, path, header, spec) for path, header in batch]


def _in_order(
    paths: RootPaths,
    spec: EncodeSpec,
    work: Iterable[Work],
    workers: int,
    batch: int = 8,
    ahead: int = 4,
) -> Iterator[list[Frame | str]]:
    """Make the records of ``work`` on ``workers`` threads; lists of them come back in order.

    Threads, not processes: reading, decoding, resizing, encoding and most of framing
    (the search for magic words) run in C with the GIL released, so a thread pool keeps
    the cores busy with no image copied between processes, and the one thread that
    writes only appends ready frames. On 2 cores it packs as fast as the process pool
    it replaced (BENCHMARKS.md). What still holds the GIL (header checks, framing, the
    loop) measured under 140 us per image against ~1.7 ms of work at 500x375 -> 256, so
    one pack can keep at most about a dozen cores busy (estimated from that ratio, not
    measured on such a machine); more cores are better used by several ``num_parts``
    jobs side by side. At most ``workers * ahead`` batches are in flight,
    so memory does not grow with the list.
    """
    todo = iter(work)
    if workers <= 1:
        while chunk := list(islice(todo, batch)):
            yield _records(paths, spec, chunk)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="gpurec-pack") as pool:
        pending: deque[Future] = deque()

        def submit() -> None:
            chunk = list(islice(todo, batch))
            if chunk:
                pending.append(pool.submit(_records, paths, spec, chunk))

        try:
            for _ in range(workers * ahead):
                submit()
            while pending:
                done = pending.popleft().result()
                submit()
                yield done
        finally:  # an error or a closed generator: drop the queued work, finish the rest
            for future in pending:
                future.cancel()


def _label(entry: ListEntry, pack_label: bool) -> float | list[float]:
    if not entry.labels:
        return 0.0
    if pack_label and len(entry.labels) > 1:
        return list(entry.labels)
    return entry.labels[0]


def write_shards(
    root: str | Path,
    jobs: Sequence[ShardJob],
    spec: EncodeSpec,
    *,
    pack_label: bool = False,
    rule: RootRule = RootRule(),
    workers: int | None = None,
    progress: Progress | None = None,
) -> PackSummary:
    """Write every job's `.rec`/`.idx` (and `.lst` of what was packed), in list order.

    A record is ``IRHeader(0, label, index, 0)`` + image bytes, keyed by the list index
    in the `.idx`, as im2rec writes it. Each shard is written under temporary names and
    renamed when complete; an interruption leaves no partial file under a final name.
    """
    workers = workers or os.cpu_count() or 1
    summary = PackSummary()
    work = (
        (entry.path, IRHeader(0, _label(entry, pack_label), entry.index, 0))
        for job in jobs
        for entry in job.entries
    )
    with _opencv_on_one_thread():
        batches = _in_order(RootPaths(root, rule), spec, work, workers)
        results = (result for batch in batches for result in batch)
        try:
            for job in jobs:
                job.prefix.parent.mkdir(parents=True, exist_ok=True)
                kept: list[ListEntry] = []
                with RecordWriter(job.rec, job.idx) as writer:
                    for n, entry in enumerate(job.entries, 1):
                        result = next(results)
                        if isinstance(result, str):
                            summary.skipped.append((entry.path, result))
                        else:
                            writer.write_frame(result, key=entry.index)
                            kept.append(entry)
                        if progress is not None and (n % 64 == 0 or n == len(job.entries)):
                            progress(n % 64 or 64)
                if job.write_lst:  # once its .rec/.idx are in place, never beside old ones
                    write_lst(job.lst, kept)
                summary.bytes += writer.tell()
                summary.images += len(kept)
                summary.outputs.append(job.rec)
        finally:
            batches.close()
    return summary


# ----------------------------------------------------------------------------- reports


def _tsv_field(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def write_report(path: Path, skipped: Sequence[tuple[str, str]]) -> Path | None:
    """Write ``path`` as ``path<TAB>reason`` lines (escaped), or remove a stale one."""
    if not skipped:
        path.unlink(missing_ok=True)
        return None
    lines = ["path\treason\n"] + [f"{_tsv_field(p)}\t{_tsv_field(r)}\n" for p, r in skipped]
    _write_text(path, "".join(lines))
    return path


def _write_text(path: Path, text: str) -> None:
    """Write through a temporary name; on any failure nothing is left behind."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8", errors="backslashreplace", newline="\n")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _write_json(path: Path, obj: object) -> None:
    _write_text(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


# -------------------------------------------------------------------------------- pack


def shard_prefix(prefix: Path, split: str, shard: int, shards: int) -> Path:
    """``PREFIX[_split][-KKKKK-of-NNNNN]``: the name of one shard, without extension."""
    name = prefix.name + (f"_{split}" if split else "")
    if shards > 1:
        name += f"-{shard:05d}-of-{shards:05d}"
    return prefix.with_name(name)


def _even_chunks(entries: list[ListEntry], n: int) -> list[list[ListEntry]]:
    """``n`` contiguous chunks whose sizes differ by at most one."""
    q, r = divmod(len(entries), n)
    bounds = [i * q + min(i, r) for i in range(n + 1)]
    return [entries[bounds[i] : bounds[i + 1]] for i in range(n)]


def unique_indices(entries: Iterable[ListEntry]) -> tuple[list[ListEntry], list[tuple[str, str]]]:
    """Entries with their first use of each `.lst` index, and the later ones as skips:
    two records under one `.idx` key would make lookups by key ambiguous."""
    first: dict[int, str] = {}
    kept, skipped = [], []
    for entry in entries:
        if entry.index in first:
            skipped.append(
                (entry.path, f"duplicate index {entry.index} (first: {first[entry.index]})")
            )
        else:
            first[entry.index] = entry.path
            kept.append(entry)
    return kept, skipped


def _listing(root: Path, opts: PackOptions) -> Listing:
    if opts.lst is None:
        return list_images(
            root,
            exts=opts.exts,
            recursive=True,
            label_from_name=opts.label_from_name,
            follow_links=opts.follow_links,
        )
    malformed: list[tuple[str, str]] = []
    entries, duplicates = unique_indices(read_lst(opts.lst, malformed))
    labels = sorted({int(e.labels[0]) for e in entries if e.labels})
    return Listing(entries, [str(label) for label in labels], malformed + duplicates)


def pack(
    root: str | Path,
    prefix: str | Path,
    *,
    progress: Progress | None = None,
    on_plan: Callable[[int], None] | None = None,
    **options,
) -> PackSummary:
    """``gpurec pack``: list ``root``, split, shard, and write the shards under ``prefix``.

    Writes, next to ``prefix`` (its folder is created): per shard ``.rec``, ``.idx`` and
    the ``.lst`` of the images it holds; ``<prefix>.classes.json`` (class names by
    label); and ``<prefix>.skipped.tsv`` listing every image left out with the reason,
    when any were. ``options`` are :class:`PackOptions` fields. ``on_plan`` is told how
    many images will be processed before the work starts (for a progress total).
    """
    start = time.perf_counter()
    opts = PackOptions.from_dict(options)
    root, prefix = Path(root), Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    listing = _listing(root, opts)
    splits = split_entries(
        listing.entries,
        train_ratio=opts.train_ratio,
        test_ratio=opts.test_ratio,
        shuffle=opts.shuffle,
        seed=opts.seed,
    )
    jobs = [
        ShardJob(shard_prefix(prefix, split, k, opts.shards), chunk)
        for split, members in splits.items()
        for k, chunk in enumerate(_even_chunks(members, opts.shards))
    ]
    mine = jobs[opts.part :: opts.num_parts]
    if on_plan is not None:
        on_plan(sum(len(job.entries) for job in mine))
    summary = write_shards(
        root,
        mine,
        opts.encode_spec(),
        pack_label=opts.pack_label,
        rule=RootRule(opts.follow_links, opts.allow_outside_root),
        workers=opts.workers,
        progress=progress,
    )
    _write_json(  # last: a pack that failed leaves nothing under a final name
        prefix.with_name(prefix.name + ".classes.json"),
        {"classes": listing.classes, "labels_from": _labels_from(opts)},
    )
    summary.skipped[:0] = listing.skipped if opts.part == 0 else []
    summary.classes = listing.classes
    part = f".part-{opts.part}-of-{opts.num_parts}" if opts.num_parts > 1 else ""
    summary.report = write_report(
        prefix.with_name(f"{prefix.name}{part}.skipped.tsv"), summary.skipped
    )
    summary.seconds = time.perf_counter() - start
    return summary


def _labels_from(opts: PackOptions) -> str:
    if opts.lst is not None:
        return f"list {opts.lst}"
    if opts.label_from_name is not None:
        return f"file names: {opts.label_from_name}"
    return "folders"


def pack_lists(
    lists: Sequence[str | Path],
    root: str | Path,
    spec: EncodeSpec,
    *,
    pack_label: bool = False,
    workers: int = 1,
    rule: RootRule = RootRule(follow_links=True),
    progress: Progress | None = None,
) -> PackSummary:
    """im2rec's packing step: ``X.lst`` -> ``X.rec`` + ``X.idx`` beside it, for each list.

    Images that cannot be packed, malformed lines and repeated indices are skipped (never
    a crash) and listed in ``X.skipped.tsv``; the `.lst` itself is left as it is.
    """
    start = time.perf_counter()
    total = PackSummary()
    for lst in map(Path, lists):
        malformed: list[tuple[str, str]] = []
        entries, duplicates = unique_indices(read_lst(lst, malformed))
        job = ShardJob(lst.with_suffix(""), entries, write_lst=False)
        done = write_shards(
            root,
            [job],
            spec,
            pack_label=pack_label,
            rule=rule,
            workers=workers,
            progress=progress,
        )
        done.skipped[:0] = malformed + duplicates
        write_report(lst.with_suffix(".skipped.tsv"), done.skipped)
        total.images += done.images
        total.bytes += done.bytes
        total.outputs += done.outputs
        total.skipped += done.skipped
    total.seconds = time.perf_counter() - start
    return total
