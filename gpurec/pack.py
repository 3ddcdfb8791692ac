"""Image tree -> list -> `.rec`/`.idx` shards, on all cores, in list order, never half-written.

:func:`pack` is ``gpurec pack``: list a tree (or read a `.lst`), split, shard, and
write each shard. :func:`pack_lists` is the packing half of ``gpurec im2rec``: one
`.rec`/`.idx` per existing `.lst`. This module plans (options, listing, splits, shard
jobs, outputs); both run :func:`gpurec.workers.write_shards`, the write machinery, which
sends batches of images to worker processes (or threads), keeps a bounded window of them
in flight (memory does not grow with the list) and writes results in list order whatever
the worker count, so the bytes are the same with 1 or 64 workers. ``executor="ray"`` runs
the shards as tasks of a Ray cluster instead (:mod:`gpurec.executors`).

``root`` and ``prefix`` may be URLs (``s3://``, ``gs://``, any fsspec protocol;
:mod:`gpurec.storage`): images are then read in concurrent batches, and each finished
shard is uploaded from a local staging folder, visible only once complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from gpurec.formats import sample_root
from gpurec.listing import (
    IMAGE_EXTS,
    Listing,
    RootRule,
    list_images,
    split_entries,
)
from gpurec.naming import classes_name, shard_stem
from gpurec.recordio import (
    ListEntry,
    atomic_write,
    read_lst,
)
from gpurec.storage import Publisher, RemoteRoot, is_url, local_path, staging_dir
from gpurec.transcode import DEFAULT_MAX_PIXELS, EncodeSpec
from gpurec.workers import PackSummary, ShardJob, refuse_in_starting_worker, write_shards

__all__ = ["PackOptions", "PackSummary", "ShardJob", "pack", "pack_lists", "write_shards"]

Progress = Callable[[int], None]
EXECUTORS = ("processes", "threads", "ray")


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
    ``workers``: worker processes (None: all cores); ``executor``: ``"processes"``,
    ``"threads"`` or ``"ray"`` (shards as tasks of the Ray cluster at ``RAY_ADDRESS``, a
    local one when unset). ``storage_options``: keyword arguments for the fsspec
    filesystem of a URL ``root`` or ``prefix`` (credentials, ``endpoint_url``, ...).
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
    executor: str = "processes"
    storage_options: dict | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "exts", tuple(self.exts))
        if self.executor not in EXECUTORS:
            raise ValueError(
                f"executor must be one of {', '.join(EXECUTORS)}, got {self.executor!r}"
            )
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
    """Write through a temporary name of its own (concurrent writers of one file, the
    parts of a job array, never share one) and rename; on any failure nothing is left."""
    with atomic_write(path, "w", encoding="utf-8", errors="backslashreplace", newline="\n") as f:
        f.write(text)


def _write_json(path: Path, obj: object) -> None:
    _write_text(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


# -------------------------------------------------------------------------------- pack


def shard_prefix(prefix: Path, split: str, shard: int, shards: int) -> Path:
    """``PREFIX[_split][-KKKKK-of-NNNNN]``: the name of one shard, without extension."""
    return prefix.with_name(shard_stem(prefix.name, split, shard, shards))


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


def _listing(root: Path | RemoteRoot, opts: PackOptions) -> Listing:
    if opts.lst is None and hasattr(root, "list_samples"):  # WebDataset tars, parquet files
        return root.list_samples()
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


def plan_jobs(
    root: str | Path | RemoteRoot, prefix: Path, opts: PackOptions
) -> tuple[Listing, list[ShardJob]]:
    """The listing and every shard job of a pack (all parts), in output order."""
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
    return listing, jobs


_MAX_UPLOADS = 2


class _Outputs:
    """Where a pack's files go: beside ``prefix`` on local disk, or, for a URL prefix,
    to a local staging folder first and from there to the store, shard by shard
    (:class:`gpurec.storage.Publisher`: `.rec`, then `.idx`, then `.lst`; the manifest
    files last)."""

    def __init__(self, prefix: str | Path, storage_options: dict | None) -> None:
        text = str(prefix) if isinstance(prefix, str) else os.fspath(prefix)
        self.url = text.rstrip("/") if is_url(text) and not text.startswith("file://") else None
        if self.url is None:
            self.stage = None
            self.prefix = Path(local_path(text))
            self.publisher = None
        else:
            self.stage = staging_dir()
            name = self.url.rsplit("/", 1)[1]
            if not name:
                raise ValueError(f"output prefix {text!r} names no file prefix")
            self.prefix = self.stage / name
            # at most 2 shards waiting or uploading (and 1 being written) staged locally
            self.publisher = Publisher(self.url, storage_options, max_pending=_MAX_UPLOADS)

    def final(self, local: Path) -> str | Path:
        """The final name (URL or path) of a staged or local file."""
        if self.url is None:
            return local
        return self.url.rsplit("/", 1)[0] + "/" + local.name

    def _path(self, local: Path) -> str:
        return self.publisher.path(str(self.final(local)))

    def shard_done(self, job: ShardJob) -> None:
        if self.publisher is None:
            return
        files = [job.rec, job.idx] + ([job.lst] if job.write_lst else [])
        self.publisher.publish(
            [(f, self._path(f)) for f in files], delete_first=[self._path(job.idx)]
        )

    def manifest(self, path: Path, exists: bool) -> None:
        """Publish a manifest file written at ``path`` (or remove a stale one)."""
        if self.publisher is None:
            return
        if exists:
            self.publisher.publish([(path, self._path(path))])
        else:
            self.publisher.remove(self._path(path))

    def close(self, ok: bool) -> None:
        try:
            if self.publisher is not None:
                if ok:
                    self.publisher.close()
                else:
                    self.publisher.abort()
        finally:
            if self.stage is not None:
                shutil.rmtree(self.stage, ignore_errors=True)


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
    ``root`` and ``prefix`` may be URLs (``s3://bucket/train``); see the module docstring.
    """
    refuse_in_starting_worker()
    start = time.perf_counter()
    opts = PackOptions.from_dict(options)
    root_text = root if isinstance(root, str) else os.fspath(root)
    if is_url(root_text) and not root_text.startswith("file://"):
        source: Path | RemoteRoot = RemoteRoot(root_text, opts.storage_options)
    else:
        source = Path(local_path(root_text))
    source = sample_root(root_text, opts.storage_options) or source  # tars, parquet files
    outputs = _Outputs(prefix, opts.storage_options)
    ok = False
    try:
        prefix = outputs.prefix
        prefix.parent.mkdir(parents=True, exist_ok=True)
        listing, jobs = plan_jobs(source, prefix, opts)
        mine = jobs[opts.part :: opts.num_parts]
        if on_plan is not None:
            on_plan(sum(len(job.entries) for job in mine))
        if opts.executor == "ray":
            from gpurec.executors import ray_write_shards

            summary = ray_write_shards(source, mine, opts, outputs=outputs, progress=progress)
        else:
            summary = write_shards(
                source,
                mine,
                opts.encode_spec(),
                pack_label=opts.pack_label,
                rule=RootRule(opts.follow_links, opts.allow_outside_root),
                workers=opts.workers,
                progress=progress,
                executor=opts.executor,
                on_shard=outputs.shard_done,
            )
        classes = prefix.with_name(classes_name(prefix.name))
        labels_from = getattr(source, "labels_from", None) or _labels_from(opts)  # tars, parquet
        _write_json(  # last: a pack that failed leaves nothing under a final name
            classes, {"classes": listing.classes, "labels_from": labels_from}
        )
        outputs.manifest(classes, True)
        summary.skipped[:0] = listing.skipped if opts.part == 0 else []
        summary.classes = listing.classes
        part = f".part-{opts.part}-of-{opts.num_parts}" if opts.num_parts > 1 else ""
        report = prefix.with_name(f"{prefix.name}{part}.skipped.tsv")
        summary.report = write_report(report, summary.skipped)
        outputs.manifest(report, summary.report is not None)
        if outputs.url is not None:
            summary.outputs = [str(outputs.final(Path(p))) for p in summary.outputs]
            if summary.report is not None:
                summary.report = str(outputs.final(report))
        ok = True
    finally:
        outputs.close(ok)
        if hasattr(source, "release"):  # a parquet root's spool file
            source.release()
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
    executor: str = "processes",
) -> PackSummary:
    """im2rec's packing step: ``X.lst`` -> ``X.rec`` + ``X.idx`` beside it, for each list.

    Images that cannot be packed, malformed lines and repeated indices are skipped (never
    a crash) and listed in ``X.skipped.tsv``; the `.lst` itself is left as it is.
    """
    refuse_in_starting_worker()
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
            executor=executor,
        )
        done.skipped[:0] = malformed + duplicates
        write_report(lst.with_suffix(".skipped.tsv"), done.skipped)
        total.images += done.images
        total.bytes += done.bytes
        total.outputs += done.outputs
        total.skipped += done.skipped
    total.seconds = time.perf_counter() - start
    return total
