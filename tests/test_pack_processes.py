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
    from gpurec.transcode import EncodeSpec
    from gpurec.workers import ShardJob, write_shards

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
    assert "a pack worker process was killed by signal SIGKILL" in err
    assert "Traceback" not in err and "__main__" not in err
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


def test_two_packs_into_one_folder_at_once_write_the_bytes_of_one_pack(tmp_path: Path) -> None:
    """Two coordinators (two hosts of a job array on a shared filesystem, or two pods with
    the same pid) each get a work folder of their own: neither removes nor overwrites
    the other's chunk files."""
    root = _big_tree(tmp_path / "img", 160)
    out = tmp_path / "out"
    pack(root, tmp_path / "one" / "ds", resize=200, shards=2, workers=1)
    args = ["--resize", "200", "--shards", "2", "--workers", "2", "--executor", "processes"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "gpurec", "pack", str(root), str(out / name), *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    want = _files(tmp_path / "one")
    got = _files(out)
    for name in ("a", "b"):
        for suffix in ("-00000-of-00002.rec", "-00001-of-00002.rec", "-00000-of-00002.idx"):
            assert got[name + suffix] == want["ds" + suffix], name + suffix
    assert not list(out.glob(".gpurec-work-*"))


def _work_folder(folder: Path, name: str, host: str | None, age: float = 0.0) -> Path:
    path = folder / name
    path.mkdir(parents=True)
    (path / "0.chunk").write_bytes(b"x" * 100)
    if host is not None:
        (path / ".lock").write_text(f"{host}\n12345\n")
        if age:
            then = time.time() - age
            os.utime(path / ".lock", (then, then))
    elif age:
        then = time.time() - age
        os.utime(path, (then, then))
    return path


def test_only_stale_work_folders_are_removed(tmp_path: Path) -> None:
    import fcntl
    import socket

    from gpurec.workers import STALE_AFTER, WorkDir, sweep_work_dirs

    out = tmp_path / "out"
    me = socket.gethostname()
    day = STALE_AFTER + 60
    dead = _work_folder(out, ".gpurec-work-dead", me)  # this host, lock free: a dead pack
    live = _work_folder(out, ".gpurec-work-live", me)
    fd = os.open(live / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a live pack holds its lock
    other = _work_folder(out, ".gpurec-work-other", "another-host")  # flock may not reach it
    other_old = _work_folder(out, ".gpurec-work-otherold", "another-host", age=day)
    new = _work_folder(out, ".gpurec-work-new", None)  # mkdtemp done, lock not yet made
    new_old = _work_folder(out, ".gpurec-work-newold", None, age=day)
    try:
        root = color_tree(tmp_path / "img", per_class=4)
        pack(root, out / "ds", resize=30, workers=2, executor="processes")  # sweeps first
        assert not dead.exists() and not other_old.exists() and not new_old.exists()
        assert live.exists() and other.exists() and new.exists()
        assert sweep_work_dirs(out, ".gpurec-work-") == []
        with WorkDir(out, ".gpurec-work-") as mine:  # a live WorkDir is never swept
            assert (mine.path / ".lock").read_text().split("\n")[0] == me
            assert sweep_work_dirs(out, ".gpurec-work-") == [] and mine.path.exists()
        assert not mine.path.exists()
    finally:
        os.close(fd)
    assert sweep_work_dirs(out, ".gpurec-work-") == [live]


def test_concurrent_writers_of_one_manifest_never_collide(tmp_path: Path) -> None:
    """The parts of a job array all write `classes.json`: each through a name of its own."""
    code = (
        "import sys; from pathlib import Path; from gpurec.pack import _write_json\n"
        "for i in range(300):\n"
        "    _write_json(Path(sys.argv[1]), {'classes': [f'c{k}' for k in range(2000)]})\n"
    )
    target = tmp_path / "ds.classes.json"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(target)], stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    import json

    assert len(json.loads(target.read_text())["classes"]) == 2000
    assert [p.name for p in tmp_path.iterdir()] == ["ds.classes.json"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    from gpurec.recordio import _UMASK

    return _UMASK


def test_a_script_without_a_main_guard_is_told_so(tmp_path: Path) -> None:
    """pack() at the top level of a script: each worker process imports the script as it
    starts and would pack again; it stops there, and the pack names the missing guard."""
    root = color_tree(tmp_path / "img", 6)
    script = tmp_path / "unguarded.py"
    script.write_text(
        "from gpurec.pack import pack\n"
        f"pack({str(root)!r}, {str(tmp_path / 'out' / 'ds')!r}, workers=2, "
        "executor='processes')\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 1
    assert "packing was called in one of its worker processes as it started" in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: a pack worker process failed as it started")
    assert 'a script that packs outside `if __name__ == "__main__":`' in last
    assert not list((tmp_path / "out").glob("*.rec"))
    guarded = tmp_path / "guarded.py"
    body = script.read_text().splitlines()
    guarded.write_text(f"{body[0]}\nif __name__ == '__main__':\n    {body[1]}\n")
    subprocess.run([sys.executable, str(guarded)], check=True, timeout=120, cwd=tmp_path)
    assert (tmp_path / "out" / "ds.rec").stat().st_size > 0
