"""A pack's write machinery: shard jobs made into `.rec`/`.idx`/`.lst` files on all cores.

:func:`write_shards` runs :class:`ShardJob` s (from :func:`gpurec.pack.plan_jobs`, or any
executor's share of them): it sends batches of images to worker processes (or threads),
keeps a bounded window of them in flight (memory does not grow with the list) and writes
results in list order whatever the worker count, so the bytes are the same with 1 or 64
workers. Worker processes write their records to chunk files in a :class:`WorkDir`,
which the coordinator splices into the shard.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import cv2

from gpurec.listing import (
    RootPaths,
    RootRule,
)
from gpurec.recordio import (
    MAX_RECORD_SIZE,
    IRHeader,
    ListEntry,
    RecordIOError,
    RecordWriter,
    frame_record,
    write_all,
    write_lst,
)
from gpurec.storage import RemoteRoot
from gpurec.transcode import EncodeSpec, ImageError, Payload, transcode

__all__ = [
    "Chunk",
    "PackSummary",
    "ShardJob",
    "WorkDir",
    "refuse_in_starting_worker",
    "sweep_work_dirs",
    "write_shards",
]

Progress = Callable[[int], None]


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
    outputs: list[Path | str] = field(default_factory=list)  # local paths or URLs
    skipped: list[tuple[str, str]] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    report: Path | str | None = None
    # CPU seconds of the coordinating process while writing (all its threads), and the
    # parts of it spent in parallel to its loop: copier threads moving workers' bytes
    # into shards, and the background syncs (the kernel's writeback of what is written,
    # charged to the thread that asks for it).
    coordinator_cpu: float = 0.0
    copy_cpu: float = 0.0
    sync_cpu: float = 0.0

    @property
    def serial_us_per_image(self) -> float:
        """The coordinator's own CPU time per image: what one process must do for every
        image, the copies and background syncs (other threads, no GIL held) excluded."""
        serial = self.coordinator_cpu - self.copy_cpu - self.sync_cpu
        return serial / max(self.images, 1) * 1e6

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
    """Our workers give the parallelism: OpenCV's own pool would only oversubscribe the
    cores. The caller's setting is restored afterwards."""
    before = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(before)


Frame = list[Payload]
"""One record, framed (:func:`frame_record`) and ready to append to a `.rec`."""

Item = tuple[str, "float | list[float]", int]
"""What a worker needs for one image: its path under the root, its label(s), its index."""

Source = "RootPaths | RemoteRoot"
"""Where images are read from: a local folder (checked paths) or a folder at a URL."""


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


def _record(source, item: Item, spec: EncodeSpec, data: bytes | str | None) -> Frame | str:
    """The framed record of one image, or why it is skipped. ``data``: the file's bytes
    when already fetched (object storage), the reason it could not be, or None (read it)."""
    path, label, index = item
    if isinstance(data, str):
        return data
    try:
        if data is None:
            data = _read(source, path)
        return frame_record(transcode(data, spec), IRHeader(0, label, index, 0))
    except (ImageError, RecordIOError, ValueError) as exc:
        return str(exc)
    except OSError as exc:
        return f"cannot read: {exc.strerror or exc}"
    except MemoryError:
        return "out of memory reading it"


def _records(source, spec: EncodeSpec, items: Sequence[Item]) -> list[Frame | str]:
    """The records of a batch, in order. From object storage the batch's objects are
    fetched together, concurrently, before any is decoded."""
    if isinstance(source, RootPaths):
        return [_record(source, item, spec, None) for item in items]
    datas = source.read_many([item[0] for item in items], MAX_RECORD_SIZE)
    return [_record(source, item, spec, d) for item, d in zip(items, datas, strict=True)]


@dataclass
class Chunk:
    """A batch's records as a worker process left them: framed, back to back, in the file
    ``path``; ``sizes`` of the records written (in order), ``skips`` (position in the
    batch, reason) of the images left out."""

    path: str
    sizes: list[int]
    skips: list[tuple[int, str]]


_WORKER: dict = {}


def _init_worker(source, spec: EncodeSpec, scratch: str) -> None:
    cv2.setNumThreads(1)
    _WORKER.update(source=source, spec=spec, scratch=scratch)


def chunk_records(source, spec: EncodeSpec, items: Sequence[Item], path: str) -> Chunk:
    """Make a batch's records and write them, framed and in order, to the file ``path``.

    This is a worker process's whole job: reading, decoding, resizing, encoding and
    framing all happen here; what goes back to the coordinator is a few numbers per
    image (the bytes stay in the file, which the coordinator splices into the shard)."""
    parts: list[Payload] = []
    sizes: list[int] = []
    skips: list[tuple[int, str]] = []
    for i, result in enumerate(_records(source, spec, items)):
        if isinstance(result, str):
            skips.append((i, result))
        else:
            parts += result
            sizes.append(sum(memoryview(p).nbytes for p in result))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        write_all(fd, parts, path)
    finally:
        os.close(fd)
    return Chunk(path, sizes, skips)


def _chunk_in_worker(seq: int, items: list[Item]) -> Chunk:
    w = _WORKER
    return chunk_records(w["source"], w["spec"], items, os.path.join(w["scratch"], f"{seq}.chunk"))


def _place(path: str, dst: int, at: int, count: int) -> float:
    """Copy the chunk file ``path`` into ``dst`` at byte ``at`` and remove it; returns the
    CPU seconds it took. In the kernel where it can (``copy_file_range``, which also
    shares blocks on filesystems that can), else through a buffer; several of these run
    at once, on different ranges of the shard."""
    start = time.thread_time()
    src = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        done = 0
        if count and hasattr(os, "copy_file_range"):
            try:
                while done < count:
                    n = os.copy_file_range(src, dst, count - done, done, at + done)
                    if n <= 0:
                        break
                    done += n
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
        while done < count:
            data = os.pread(src, min(count - done, 1 << 20), done)
            if not data:
                raise OSError(errno.EIO, "a worker's chunk file is shorter than it said")
            view = memoryview(data)
            while view:
                n = os.pwrite(dst, view, at + done)
                view = view[n:]
                done += n
    finally:
        os.close(src)
        os.unlink(path)
    return time.thread_time() - start


class _ShardWriter(RecordWriter):
    """A RecordWriter that also takes workers' chunk files: the coordinator only assigns
    each chunk its place in the shard and writes its `.idx` lines; copier threads move
    the bytes (kernel copies at explicit offsets, several at once). Every copy is
    finished before the shard is synced and renamed, or before an aborted one is removed.
    """

    def __init__(self, path, idx_path, copier: ThreadPoolExecutor | None = None) -> None:
        super().__init__(path, idx_path)
        self._copier = copier
        self._copies: deque[Future] = deque()
        self.copy_cpu = 0.0

    def _settle(self, keep: int) -> None:
        """Wait until at most ``keep`` copies are running or queued."""
        while len(self._copies) > keep:
            self.copy_cpu += self._copies.popleft().result()

    def append_chunk(self, chunk: Chunk, keys: Sequence[int]) -> None:
        total = sum(chunk.sizes)
        fd, at = self._file.fileno(), self._offset
        if self._copier is None:
            self.copy_cpu += _place(chunk.path, fd, at, total)
        else:
            self._copies.append(self._copier.submit(_place, chunk.path, fd, at, total))
            self._settle(2 * self._copier._max_workers)  # chunk files on disk stay bounded
        if total:
            if self._idx is not None:
                lines = []
                for key, size in zip(keys, chunk.sizes, strict=True):
                    lines.append(f"{key}\t{at}\n")
                    at += size
                self._idx.write("".join(lines))
            self._offset += total
            self.count += len(chunk.sizes)
            if self._offset - self._synced >= self._SYNC_BYTES:
                self._settle(0)
                self.flush()  # starts the background sync every 32 MiB

    def close(self) -> None:
        try:
            self._settle(0)
        except BaseException:
            self.abort()
            raise
        super().close()

    def abort(self) -> None:
        for future in self._copies:  # never close the file under a running copy
            future.cancel()
        for future in self._copies:
            with contextlib.suppress(BaseException):
                future.result()
        self._copies.clear()
        super().abort()


STALE_AFTER = 24 * 3600  # seconds: when a work folder's lock cannot be trusted (see WorkDir)
_HEARTBEAT = 600.0


class WorkDir:
    """A private temporary folder in ``folder`` (``<prefix>XXXXXXXX``, unique), held by an
    exclusive ``flock`` on its ``.lock`` file for as long as this object is open, and
    removed by :meth:`close`.

    Opening one first removes the stale folders of the same prefix: those whose lock can
    be taken (no live holder) and which were made on this host (the lock file names the
    host; ``flock`` between processes of one kernel is always reliable) or whose lock
    file has not been touched for :data:`STALE_AFTER` seconds (another host's folder:
    on a shared filesystem whose locks do not reach across hosts a free lock proves
    nothing, so age decides; a live holder touches its lock file every 10 minutes). A
    folder without a lock file (being made just now) goes only when that old too.
    """

    def __init__(self, folder: Path, prefix: str) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        sweep_work_dirs(folder, prefix)
        self.path = Path(tempfile.mkdtemp(dir=folder, prefix=prefix))
        self._lock = self.path / ".lock"
        self._fd = os.open(self._lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        os.write(self._fd, f"{socket.gethostname()}\n{os.getpid()}\n".encode())
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="gpurec-workdir", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(_HEARTBEAT):
            with contextlib.suppress(OSError):
                os.utime(self._lock)

    def close(self) -> None:
        if self._fd < 0:
            return
        self._stop.set()
        try:
            shutil.rmtree(self.path, ignore_errors=True)
        finally:
            os.close(self._fd)  # releases the lock, after the folder is gone
            self._fd = -1

    def __enter__(self) -> WorkDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _stale(path: Path, now: float) -> bool:
    """Whether the work folder ``path`` may be removed; removes it (under its lock) if so."""
    lock = path / ".lock"
    try:
        fd = os.open(lock, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:  # being made now, or a crash between mkdtemp and the lock
        try:
            old = now - path.stat().st_mtime > STALE_AFTER
        except OSError:
            return False
        if old:
            shutil.rmtree(path, ignore_errors=True)
        return old
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # held: a live pack
        try:
            with os.fdopen(os.dup(fd), "rb") as f:
                host = f.read(4096).split(b"\n", 1)[0].decode(errors="replace")
            mine = host == socket.gethostname()
            old = now - os.fstat(fd).st_mtime > STALE_AFTER
        except OSError:
            return False
        if not (mine or old):
            return False
        shutil.rmtree(path, ignore_errors=True)
        return True
    finally:
        os.close(fd)


def sweep_work_dirs(folder: Path, prefix: str) -> list[Path]:
    """Remove the stale work folders ``folder/<prefix>*`` (see :class:`WorkDir`)."""
    now = time.time()
    return [old for old in Path(folder).glob(prefix + "*") if old.is_dir() and _stale(old, now)]


def refuse_in_starting_worker(what: str = "packing") -> None:
    """A script that calls pack() (or export(), ``what``) outside ``if __name__ ==
    "__main__":`` runs again in every worker process as it starts (forkserver and spawn
    import the main script): stop there, before that copy of the script lists or writes
    anything, with the cause
    (the pack that started the worker then reports a worker that failed as it started,
    :func:`_died`)."""
    import multiprocessing

    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise RuntimeError(
            f"gpurec's {what} was called in one of its worker processes as it started: the "
            "script that calls it runs again in each worker, so it must call it under "
            '`if __name__ == "__main__":`'
        )


def _died(pool: ProcessPoolExecutor, wait: float = 5.0) -> str:
    """Why a pack stops when a worker process died, from the workers' exit codes: 1 is
    an error as the worker started (printed above it; a script without its main guard
    ends so, see :func:`refuse_in_starting_worker`), a signal is a kill (out of memory)
    or a crash in a decoder.

    The executor fails the futures before it has terminated and reaped its workers, so
    an exit code read at once can still be unknown (None): wait for them, a few seconds
    at the most in all, so that the explanation does not depend on the timing."""
    import signal

    processes = getattr(pool, "_processes", None) or {}  # the executor's own (no API)
    workers = list(processes.values())
    deadline = time.monotonic() + wait
    for process in workers:
        process.join(max(0.0, deadline - time.monotonic()))
    codes = {p.exitcode for p in workers} - {None, 0, -signal.SIGTERM}
    if 1 in codes:
        why = (
            "failed as it started, its error is above (a script that packs outside "
            '`if __name__ == "__main__":` ends so)'
        )
    elif codes and min(codes) < 0:
        number = -min(codes)
        name = signal.Signals(number).name if number in signal.valid_signals() else number
        why = f"was killed by signal {name} (out of memory, or a crash in a decoder)"
    else:
        why = "died (killed, out of memory, or a crash in a decoder)"
    return f"a pack worker process {why}; nothing partial was left under a final name"


def pool_context(preload: str = "gpurec.pack"):
    """forkserver where there is one (a fork of a process with threads is unsafe); the
    server imports ``preload`` (and OpenCV) once, each worker is a fork of it."""
    import multiprocessing

    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([preload])
        return ctx
    return multiprocessing.get_context("spawn")


def _in_order(
    source,
    spec: EncodeSpec,
    batches: Iterable[list[Item]],
    workers: int,
    executor: str = "processes",
    scratch: Path | None = None,
    ahead: int = 3,
) -> Iterator[list[Frame | str] | Chunk]:
    """The records of each batch, batch by batch in order, made on ``workers`` workers.

    ``"processes"``: each worker process reads, decodes, resizes, encodes and frames a
    whole batch and writes it to a chunk file in ``scratch`` (a :class:`Chunk` comes
    back: sizes and skip reasons, no image bytes). The coordinator's share per image is
    then a few microseconds (BENCHMARKS.md), so one pack keeps many cores busy.
    ``"threads"``: a thread pool returning the frames themselves (decoding, resizing
    and encoding release the GIL; what does not, ~140 us per image, caps a pack at
    about a dozen cores). With one worker everything runs in this thread. At most
    ``workers * ahead`` batches are in flight, so memory does not grow with the list.
    """
    todo = iter(batches)
    if workers <= 1:
        for items in todo:
            yield _records(source, spec, items)
        return
    if executor == "processes":
        pool = ProcessPoolExecutor(
            workers,
            mp_context=pool_context(),
            initializer=_init_worker,
            initargs=(source, spec, str(scratch)),
        )
    else:
        pool = ThreadPoolExecutor(workers, thread_name_prefix="gpurec-pack")
    seq = 0

    def submit() -> None:
        nonlocal seq
        items = next(todo, None)
        if items is not None:
            if executor == "processes":
                pending.append(pool.submit(_chunk_in_worker, seq, items))
            else:
                pending.append(pool.submit(_records, source, spec, items))
            seq += 1

    pending: deque[Future] = deque()
    try:
        for _ in range(workers * ahead):
            submit()
        while pending:
            try:
                done = pending.popleft().result()
            except BrokenProcessPool:
                raise RuntimeError(_died(pool)) from None
            submit()
            yield done
    finally:  # an error or a closed generator: drop the queued work, finish the rest
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def _label(entry: ListEntry, pack_label: bool) -> float | list[float]:
    if not entry.labels:
        return 0.0
    if pack_label and len(entry.labels) > 1:
        return list(entry.labels)
    return entry.labels[0]


def batch_size_for(total: int, workers: int) -> int:
    """Images per batch: 64 (the coordinator's per-batch costs spread thin), fewer when
    that would leave workers idle on a small pack."""
    return max(1, min(64, -(-total // max(1, workers * 4))))


def write_shards(
    root: str | Path | RemoteRoot,
    jobs: Sequence[ShardJob],
    spec: EncodeSpec,
    *,
    pack_label: bool = False,
    rule: RootRule = RootRule(),
    workers: int | None = None,
    progress: Progress | None = None,
    executor: str = "processes",
    on_shard: Callable[[ShardJob], None] | None = None,
    batch: int | None = None,
) -> PackSummary:
    """Write every job's `.rec`/`.idx` (and `.lst` of what was packed), in list order.

    A record is ``IRHeader(0, label, index, 0)`` + image bytes, keyed by the list index
    in the `.idx`, as im2rec writes it. Each shard is written under temporary names and
    renamed when complete; an interruption leaves no partial file under a final name.
    Batches never straddle two shards; the records, and so the bytes, are the same
    whatever ``workers``, ``executor`` and ``batch``. ``on_shard(job)`` is called once
    each shard is complete (to upload it).
    """
    refuse_in_starting_worker()
    if executor not in ("processes", "threads"):
        raise ValueError(f"executor must be 'processes' or 'threads' here, got {executor!r}")
    workers = workers or os.cpu_count() or 1
    summary = PackSummary()
    source = root if isinstance(root, RemoteRoot) else RootPaths(root, rule)
    size = batch or batch_size_for(sum(len(job.entries) for job in jobs), workers)
    work = (
        [(e.path, _label(e, pack_label), e.index) for e in job.entries[s : s + size]]
        for job in jobs
        for s in range(0, len(job.entries), size)
    )
    folders = {job.prefix.parent for job in jobs}
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    workdir = None
    if workers > 1 and executor == "processes" and jobs:
        # a private folder for the workers' chunk files, beside the outputs (so the copy
        # into the shard stays in one filesystem); those of dead packs are removed
        workdir = WorkDir(jobs[0].prefix.parent, ".gpurec-work-")
    scratch = None if workdir is None else workdir.path
    copier = None
    if scratch is not None:
        copier = ThreadPoolExecutor(min(4, workers), thread_name_prefix="gpurec-copy")
    start_cpu = time.process_time()
    try:
        with _opencv_on_one_thread():
            results = _in_order(source, spec, work, workers, executor, scratch)
            try:
                for job in jobs:
                    _write_job(job, results, size, summary, progress, copier)
                    if on_shard is not None:
                        on_shard(job)
            finally:
                results.close()
    finally:
        if copier is not None:
            copier.shutdown(wait=True, cancel_futures=True)
        if workdir is not None:
            workdir.close()
    summary.coordinator_cpu = time.process_time() - start_cpu
    return summary


def _write_job(
    job: ShardJob,
    results: Iterator[list[Frame | str] | Chunk],
    size: int,
    summary: PackSummary,
    progress: Progress | None,
    copier: ThreadPoolExecutor | None = None,
) -> None:
    """One shard from the next batches of ``results``: the coordinator's loop."""
    kept: list[ListEntry] = []
    with _ShardWriter(job.rec, job.idx, copier) as writer:
        for s in range(0, len(job.entries), size):
            entries = job.entries[s : s + size]
            result = next(results)
            if isinstance(result, Chunk):
                skips = dict(result.skips)
            else:
                skips = {i: r for i, r in enumerate(result) if isinstance(r, str)}
            good = entries if not skips else [e for i, e in enumerate(entries) if i not in skips]
            if isinstance(result, Chunk):
                writer.append_chunk(result, [e.index for e in good])
            else:
                frames = (r for r in result if not isinstance(r, str))
                for entry, frame in zip(good, frames, strict=True):
                    writer.write_frame(frame, key=entry.index)
            kept += good
            if skips:
                summary.skipped += [(entries[i].path, reason) for i, reason in skips.items()]
            if progress is not None:
                progress(len(entries))
    if job.write_lst:  # once its .rec/.idx are in place, never beside old ones
        write_lst(job.lst, kept)
    summary.bytes += writer.tell()
    summary.copy_cpu += writer.copy_cpu
    summary.sync_cpu += writer.sync_cpu
    summary.images += len(kept)
    summary.outputs.append(job.rec)
