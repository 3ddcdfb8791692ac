"""Packing on a Ray cluster: ``gpurec pack ... --executor ray`` (``executor="ray"``).

The driver (the machine running ``gpurec pack``) lists the tree and plans the shards
exactly as a local pack does; each shard is then one Ray task, which packs it with
:func:`gpurec.workers.write_shards` on one core and leaves its files under a temporary
name (in ``<output folder>/.gpurec-ray-<run>/<attempt>/``, on the shared filesystem or
in the bucket; on a filesystem the driver holds a lock on that folder while it runs,
and a later pack into the same folder removes those of dead drivers, as
:class:`gpurec.workers.WorkDir` says). Tasks that fail (a lost node, an error) are retried by Ray
(``max_retries``); every attempt writes under its own name, so a half-finished attempt
never meets a finished one. The driver moves each finished shard to its final names
itself, once (stale `.idx` first out, `.rec`, then `.idx`, then `.lst`), shows one
progress bar fed by all tasks (a retried task counted once), writes the manifest files
last, and removes the temporary folder. The bytes are those of a local pack: a shard's
records depend only on the listing and the options, never on where or how often it ran.

The cluster is the one at ``RAY_ADDRESS`` (``ray.init()``'s rule); a local Ray is
started when it is unset. Inputs must be reachable from every node: a shared
filesystem path, or a URL (``s3://``), with ``storage_options`` shipped to the tasks.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

__all__ = ["ray_write_shards"]


def _ray():
    try:
        import ray
    except ImportError:
        raise ImportError("executor='ray' needs Ray: pip install 'gpurec[ray]'") from None
    return ray


def _counter_class(ray):
    @ray.remote(num_cpus=0)
    class Counter:
        """Images done by all tasks since the driver last asked, counted per task: a
        retried task's attempts each count from zero, and only the furthest one counts."""

        def __init__(self) -> None:
            self.attempts: dict[tuple[str, str], int] = {}
            self.best: dict[str, int] = {}
            self.total = 0
            self.told = 0

        def add(self, task: str, attempt: str, k: int) -> None:
            n = self.attempts[task, attempt] = self.attempts.get((task, attempt), 0) + k
            best = self.best.get(task, 0)
            if n > best:
                self.best[task] = n
                self.total += n - best

        def take(self) -> int:
            n, self.told = self.total - self.told, self.total
            return n

    return Counter


def _pack_one(
    source, name: str, entries, opts: dict, temp: str, storage_options, counter
) -> dict[str, Any]:
    """One shard, in a Ray task: written under ``temp/<attempt>/name.*``; returns what
    the driver needs (the attempt's folder, counts, skipped images)."""
    from gpurec.pack import PackOptions
    from gpurec.storage import filesystem, is_url, staging_dir
    from gpurec.workers import ShardJob, write_shards

    options = PackOptions.from_dict(opts)
    tag = uuid.uuid4().hex
    attempt = f"{temp}/{tag}"
    remote = is_url(temp)
    folder = staging_dir() if remote else Path(attempt)
    try:
        job = ShardJob(folder / name, list(entries))
        from gpurec.listing import RootRule

        done = write_shards(
            source,
            [job],
            options.encode_spec(),
            pack_label=options.pack_label,
            rule=RootRule(options.follow_links, options.allow_outside_root),
            workers=1,
            progress=lambda n: counter.add.remote(name, tag, n),
        )
        files = [job.rec.name, job.idx.name, job.lst.name]
        if remote:
            fs, base = filesystem(attempt, storage_options)
            for f in files:
                fs.put_file(str(folder / f), f"{base}/{f}")
        return {
            "attempt": attempt,
            "files": files,
            "images": done.images,
            "bytes": done.bytes,
            "skipped": done.skipped,
        }
    finally:
        if remote:
            shutil.rmtree(folder, ignore_errors=True)


def _place(result: dict, final_dir: str, storage_options) -> None:
    """Move one finished attempt's files to their final names (driver only, once)."""
    from gpurec.recordio import publish_shard
    from gpurec.storage import filesystem, is_url, place_in_order

    rec, idx, lst = result["files"]
    if is_url(final_dir):
        fs, base = filesystem(final_dir, storage_options)
        _, src = filesystem(result["attempt"], storage_options)
        fs.invalidate_cache()
        moves = [(f"{src}/{name}", f"{base}/{name}") for name in (rec, idx, lst)]
        place_in_order(fs, moves, [f"{base}/{idx}"], fs.mv)
        return
    src, dst = Path(result["attempt"]), Path(final_dir)
    publish_shard(src / rec, dst / rec, src / idx, dst / idx)  # never beside a stale .idx
    os.replace(src / lst, dst / lst)


def ray_write_shards(source, jobs, opts, *, outputs, progress=None, max_retries: int = 3):
    """Pack ``jobs`` (from :func:`gpurec.pack.plan_jobs`) as Ray tasks; see the module
    docstring. ``outputs``: the pack's output place (local folder or URL)."""
    from dataclasses import asdict

    from gpurec.workers import PackSummary

    ray = _ray()
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=False)
    start_cpu = time.process_time()
    if outputs.url is not None:
        final_dir = outputs.url.rsplit("/", 1)[0]
    else:  # absolute: the tasks do not run in this process's folder
        final_dir = os.path.abspath(outputs.prefix.parent)
    if isinstance(source, (str, Path)):
        source = Path(os.path.abspath(source))
    workdir = None
    if outputs.url is not None:
        temp = f"{final_dir}/.gpurec-ray-{uuid.uuid4().hex[:12]}"
    else:  # held by a lock while this driver lives; those of dead drivers are removed
        from gpurec.workers import WorkDir

        workdir = WorkDir(Path(final_dir), ".gpurec-ray-")
        temp = str(workdir.path)
    options = {k: v for k, v in asdict(opts).items() if k != "executor"}
    storage_options = opts.storage_options
    task = ray.remote(num_cpus=1, max_retries=max_retries, retry_exceptions=True)(_pack_one)
    counter = _counter_class(ray).remote()
    summary = PackSummary()
    refs = [
        task.remote(source, job.prefix.name, job.entries, options, temp, storage_options, counter)
        for job in jobs
    ]
    order = {ref: i for i, ref in enumerate(refs)}
    results: list[dict | None] = [None] * len(refs)
    pending = list(refs)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=0.25)
            for ref in ready:
                result = ray.get(ref)
                _place(result, final_dir, storage_options)
                results[order[ref]] = result
            if progress is not None:
                n = ray.get(counter.take.remote())
                if n:
                    progress(n)
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        if workdir is not None:
            workdir.close()
        else:
            _remove(temp, storage_options)
    if progress is not None:
        n = ray.get(counter.take.remote())
        if n:
            progress(n)
    for job, result in zip(jobs, results, strict=True):
        summary.images += result["images"]
        summary.bytes += result["bytes"]
        summary.skipped += [tuple(s) for s in result["skipped"]]
        summary.outputs.append(job.rec)
    summary.coordinator_cpu = time.process_time() - start_cpu
    return summary


def _remove(temp: str, storage_options) -> None:
    from gpurec.storage import filesystem, is_url

    if is_url(temp):
        fs, path = filesystem(temp, storage_options)
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path, recursive=True)
    else:
        shutil.rmtree(temp, ignore_errors=True)
