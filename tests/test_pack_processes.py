"""Packing on worker processes: the same bytes as threads and as one worker, bad files
skipped the same way, and a dead worker or coordinator leaves nothing under a final name."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import color_tree, run_gpurec
from test_pack import _bad_tree, _big_tree

from gpurec.pack import pack


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_processes_threads_and_one_worker_write_the_same_bytes(tmp_path: Path) -> None:
    root = color_tree(tmp_path / "img", per_class=9)
    _bad_tree(tmp_path / "img" / "zz")  # skipped files in the middle of batches
    common = dict(resize=40, shards=3, train_ratio=0.7, seed=5, max_pixels=100000)
    runs = {
        "one": dict(workers=1),
        "threads": dict(workers=2, executor="threads"),
        "processes2": dict(workers=2, executor="processes"),
        "processes3": dict(workers=3, executor="processes"),
    }
    summaries = {}
    for name, extra in runs.items():
        summaries[name] = pack(root, tmp_path / name / "ds", **common, **extra)
    want = _files(tmp_path / "one")
    assert len([n for n in want if n.endswith(".rec")]) == 6 and "ds.skipped.tsv" in want
    for name in runs:
        assert _files(tmp_path / name) == want, name
        assert summaries[name].skipped == summaries["one"].skipped
        assert not list((tmp_path / name).glob(".gpurec-work-*"))  # chunk files cleaned up
    s = summaries["processes2"]
    assert s.coordinator_cpu > 0 and s.serial_us_per_image > 0  # measured, not asserted on


def test_write_shards_gives_the_same_bytes_whatever_the_batch_size(tmp_path: Path) -> None:
    from gpurec.listing import list_images
    from gpurec.pack import ShardJob, write_shards
    from gpurec.transcode import EncodeSpec

    root = color_tree(tmp_path / "img", per_class=7)
    entries = list_images(root).entries
    outs = []
    for batch in (1, 5, 64):
        job = ShardJob(tmp_path / str(batch) / "x", entries)
        write_shards(root, [job], EncodeSpec(resize=30), workers=2, batch=batch)
        outs.append(_files(tmp_path / str(batch)))
    assert outs[0] == outs[1] == outs[2]


def test_a_killed_worker_stops_the_pack_cleanly(tmp_path: Path) -> None:
    root = _big_tree(tmp_path / "img", 300)
    out = tmp_path / "out"
    args = [
        sys.executable, "-m", "gpurec", "pack", str(root), str(out / "ds"),
        "--resize", "300", "--workers", "2", "--executor", "processes",
    ]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(out.glob(".gpurec-work-*/*.chunk")) and time.monotonic() < deadline:
        time.sleep(0.01)
    children = subprocess.run(
        ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
    ).stdout.split()  # the forkserver; the workers are its children
    workers = [
        pid
        for child in children
        for pid in subprocess.run(
            ["pgrep", "-P", child], capture_output=True, text=True
        ).stdout.split()
    ]
    if not workers:
        proc.kill()
        pytest.skip("no worker process found to kill")
    os.kill(int(workers[0]), signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert "a pack worker process died" in err and "Traceback" not in err
    assert not list(out.glob("*.rec")) and not list(out.glob("*.tmp"))
    assert not list(out.glob(".gpurec-work-*"))


def test_a_killed_coordinator_leaves_chunks_that_the_next_run_removes(tmp_path: Path) -> None:
    root = _big_tree(tmp_path / "img", 300)
    out = tmp_path / "out"
    args = ["pack", root, out / "ds", "--resize", "300", "--workers", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "gpurec", *map(str, args)],
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 60
    while not list(out.glob(".gpurec-work-*/*.chunk")) and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the coordinator and its workers, as an OOM kill
    proc.wait(timeout=30)
    assert list(out.glob(".gpurec-work-*"))
    assert not list(out.glob("*.rec")) and not list(out.glob("*.idx"))
    res = run_gpurec(*args)
    assert res.returncode == 0, res.stderr
    assert not list(out.glob(".gpurec-work-*")) and not list(out.glob("*.tmp"))
