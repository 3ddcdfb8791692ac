"""Hostile inputs, faults and concurrency: gpurec tells the truth and loses nothing."""

from __future__ import annotations

import io
import os
import random
import re
import resource
import signal
import struct
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import color_tree, numbered_shards, run_gpurec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from gpurec import Pipeline
from gpurec.recordio import (
    MAGIC,
    IRHeader,
    RecordIOError,
    RecordReader,
    RecordWriter,
    pack,
    read_idx,
    read_lst,
    unpack,
)

REPO = Path(__file__).resolve().parents[1]


def decoded_records(rec: Path) -> dict[str, np.ndarray]:
    """Packed images by their .lst path."""
    paths = {e.index: e.path for e in read_lst(rec.with_suffix(".lst"))}
    out = {}
    for record in RecordReader(rec):
        header, payload = unpack(record)
        out[paths[header.id]] = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)
    return out


# ------------------------------------------------------------------------ image files


def test_webp_exif_non_utf8_names_and_symlink_loops(tmp_path: Path) -> None:
    root = tmp_path / "img"
    (root / "a").mkdir(parents=True)
    img = np.random.default_rng(0).integers(0, 255, (30, 60, 3)).astype(np.uint8)
    Image.fromarray(img).save(root / "a" / "webp_named.jpg", "WEBP")
    exif_image = Image.fromarray(img)
    exif = exif_image.getexif()
    exif[0x0112] = 6  # shown rotated by 90 degrees
    exif_image.save(root / "a" / "exif6.jpg", "JPEG", exif=exif.tobytes())
    bad_name = os.path.join(os.fsencode(root / "a"), b"caf\xe9.jpg")
    with open(bad_name, "wb") as f:
        f.write(cv2.imencode(".jpg", img)[1].tobytes())
    (root / "a" / "loop").symlink_to(root)  # a symlink loop: followed once, then refused
    res = run_gpurec("pack", root, tmp_path / "out" / "ds", "--follow-links", "--workers", "1")
    assert res.returncode == 0, res.stderr
    images = decoded_records(tmp_path / "out" / "ds.rec")
    assert images["a/webp_named.jpg"].shape == (30, 60, 3)
    assert images["a/exif6.jpg"].shape == (60, 30, 3)  # packed upright, as displayed
    report = (tmp_path / "out" / "ds.skipped.tsv").read_text()
    assert "caf\\udce9.jpg\tfile name is not valid UTF-8" in report
    assert "symlink loop: folder already visited" in report
    assert len(images) == 2  # the loop did not list anything twice


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file_is_skipped(tmp_path: Path) -> None:
    root = color_tree(tmp_path / "img", per_class=2)
    (root / "a" / "a_0.jpg").chmod(0)
    res = run_gpurec("pack", root, tmp_path / "ds", "--workers", "1")
    assert res.returncode == 0 and "skipped 1" in res.stdout
    assert "a/a_0.jpg\tcannot read: Permission denied" in (tmp_path / "ds.skipped.tsv").read_text()


def test_lst_duplicates_folders_and_outside_paths(tmp_path: Path) -> None:
    root = color_tree(tmp_path / "img", per_class=2)
    (tmp_path / "outside.jpg").write_bytes((root / "a" / "a_0.jpg").read_bytes())
    lst = tmp_path / "l.lst"
    lst.write_text("0\t0\ta/a_0.jpg\n1\t0\ta\n0\t1\tb/b_0.jpg\n2\t1\t../outside.jpg\r\n"
                   "3\t2\tc/c_1.jpg")  # fmt: skip
    res = run_gpurec("im2rec", tmp_path / "l", root, "--pass-through")
    assert res.returncode == 0, res.stderr
    assert [unpack(r)[0].id for r in RecordReader(tmp_path / "l.rec")] == [0, 3]
    report = (tmp_path / "l.skipped.tsv").read_text()
    assert "b/b_0.jpg\tduplicate index 0 (first: a/a_0.jpg)" in report
    assert "a\tnot a regular file" in report
    assert "../outside.jpg\tpath escapes the root" in report
    res = run_gpurec("im2rec", tmp_path / "l", root, "--pass-through", "--allow-outside-root")
    assert res.returncode == 0
    assert [unpack(r)[0].id for r in RecordReader(tmp_path / "l.rec")] == [0, 2, 3]


# ------------------------------------------------------------------------ .rec / .idx


def test_idx_from_another_file_is_refused(tmp_path: Path) -> None:
    a, b = numbered_shards(tmp_path, counts=(6, 9))
    b.with_suffix(".idx").write_bytes(a.with_suffix(".idx").read_bytes())
    with pytest.raises(RecordIOError, match=r"n-00001-of-00002\.idx: at byte \d+: .idx line 2"):
        RecordReader(b)
    with pytest.raises(RecordIOError, match="not at a record start"):
        Pipeline(tmp_path / "n", 3, device="cpu", backend="cpu")


@pytest.mark.parametrize("backend", ["cpu", "dali"])
def test_idx_out_of_order_still_gives_right_labels(tmp_path: Path, backend) -> None:
    (rec,) = numbered_shards(tmp_path, counts=(12,))
    lines = rec.with_suffix(".idx").read_text().splitlines()
    random.Random(1).shuffle(lines)
    rec.with_suffix(".idx").write_text("\n".join(lines) + "\n")
    pipe = Pipeline(rec, 4, (3, 16, 16), device="cpu", backend=backend, train=False)
    for data, label in pipe:  # grey level k * 5 is record k's: labels still name pixels
        np.testing.assert_allclose(data.mean(axis=(1, 2, 3)), np.asarray(label) * 5, atol=1)


def test_record_claiming_500_mb_is_a_clear_error(tmp_path: Path) -> None:
    (rec,) = numbered_shards(tmp_path, counts=(3,))
    size = rec.stat().st_size
    with open(rec, "ab") as f:
        f.write(struct.pack("<II", MAGIC, 500_000_000) + b"\0" * 64)
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(RecordIOError, match=rf"at byte {size}: truncated record: the frame "
                           r"announces 500000000 bytes"):  # fmt: skip
            list(RecordReader(rec, idx_path=None).scan())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50_000_000  # the claim is checked against the file, nothing is allocated


def test_empty_rec_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "e.rec").write_bytes(b"")
    (tmp_path / "e.idx").write_bytes(b"")
    with pytest.raises(ValueError, match="the source holds no records"):
        Pipeline(tmp_path / "e.rec", 2, device="cpu", backend="cpu")


def test_skip_exactly_the_bad_records(tmp_path: Path) -> None:
    (rec,) = numbered_shards(tmp_path, counts=(12,))
    offsets = read_idx(rec.with_suffix(".idx"))[1]
    raw = bytearray(rec.read_bytes())
    raw[int(offsets[4]) + 8] = 0x7F  # IRHeader flag of record 4: 127 labels announced
    raw[int(offsets[9]) + 8 + 24 + 1] ^= 0xFF  # the PNG signature of record 9
    rec.write_bytes(bytes(raw))
    pipe = Pipeline(rec, 12, (3, 16, 16), device="cpu", backend="cpu", train=False,
                    on_error="skip")  # fmt: skip
    (batch,) = list(pipe)
    assert pipe.skipped == 2
    assert set(batch.label.tolist()) == set(range(12)) - {4, 9}
    np.testing.assert_allclose(batch.data.mean(axis=(1, 2, 3)), batch.label * 5, atol=1)
    strict = Pipeline(rec, 12, (3, 16, 16), device="cpu", backend="cpu", train=False)
    with pytest.raises(RecordIOError, match=rf"at byte {offsets[4]}: record 4: IRHeader announces"):
        list(strict)


def test_verify_catches_a_flipped_label_byte_through_the_lst(tmp_path: Path) -> None:
    root = color_tree(tmp_path / "img", per_class=3)
    assert run_gpurec("pack", root, tmp_path / "ds", "--workers", "1").returncode == 0
    offsets = read_idx(tmp_path / "ds.idx")[1]
    raw = bytearray((tmp_path / "ds.rec").read_bytes())
    raw[int(offsets[5]) + 8 + 7] ^= 0x01  # a bit of the float label of record 5
    (tmp_path / "ds.rec").write_bytes(bytes(raw))
    res = run_gpurec("verify", tmp_path / "ds")
    assert res.returncode == 1 and re.search(r"index 5 .* differs from the \.lst", res.stdout)


FUZZ = settings(
    max_examples=int(os.environ.get("GPUREC_FUZZ_EXAMPLES", "2000")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _fuzz_base() -> tuple[bytes, bytes]:
    buf = io.BytesIO()
    with tempfile.TemporaryDirectory() as tmp:
        rec = Path(tmp) / "f.rec"
        with RecordWriter(rec, rec.with_suffix(".idx")) as writer:
            for i in range(6):
                body = b"\x0a\x23\xd7\xce" * (i % 3) + bytes(range(i * 7 % 40))
                writer.write(pack(IRHeader(0, [float(i)] * (i % 3 + 1), i, 0), body), key=i)
        buf.write(rec.read_bytes())
        return buf.getvalue(), rec.with_suffix(".idx").read_bytes()


BASE_REC, BASE_IDX = _fuzz_base()


@FUZZ
@given(
    flips=st.lists(st.tuples(st.integers(0, len(BASE_REC) - 1), st.integers(1, 255)), max_size=4),
    cut=st.integers(0, len(BASE_REC)),
    idx_cut=st.integers(0, len(BASE_IDX)),
    insert=st.binary(max_size=8),
)
def test_fuzzed_files_raise_only_recordio_error(flips, cut, idx_cut, insert) -> None:
    """Thousands of mutated .rec/.idx pairs: reading never hangs, crashes or raises
    anything but RecordIOError (the longer run is documented in RELIABILITY.md)."""
    raw = bytearray(BASE_REC)
    for pos, xor in flips:
        raw[pos] ^= xor
    raw = raw[:cut] + insert + raw[cut:] if insert else raw[:cut]
    with tempfile.TemporaryDirectory() as tmp:
        rec = Path(tmp) / "f.rec"
        rec.write_bytes(bytes(raw))
        rec.with_suffix(".idx").write_bytes(BASE_IDX[:idx_cut])
        for idx in ("auto", None):
            try:
                with RecordReader(rec, idx_path=idx) as reader:
                    for i in range(len(reader)):
                        header, _ = unpack(reader[i])
                        assert header.flag < 2**32
            except RecordIOError:
                pass


# ----------------------------------------------------------------------------- faults


def _tree(root: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    (root / "c").mkdir(parents=True)
    for i in range(n):
        img = rng.integers(0, 255, (300, 400, 3)).astype(np.uint8)
        cv2.imwrite(str(root / "c" / f"{i:04d}.jpg"), img)
    return root


@pytest.fixture(scope="module")
def big_tree(tmp_path_factory) -> Path:
    return _tree(tmp_path_factory.mktemp("big") / "img", 240)


def _finals(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("*") if p.suffix in (".rec", ".idx", ".lst", ".json"))


@pytest.mark.parametrize("delay", [0.3, 0.9, 1.6])
def test_sigkill_at_a_random_moment(big_tree: Path, tmp_path: Path, delay: float) -> None:
    args = ["pack", big_tree, tmp_path / "out" / "ds", "--resize", "200", "--shards", "3",
            "--workers", "2"]  # fmt: skip
    ref = run_gpurec(*args[:2], tmp_path / "ref" / "ds", *args[3:])
    assert ref.returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "gpurec", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGKILL)  # the pack and its workers, mid-way
    proc.wait(timeout=30)
    out = tmp_path / "out"
    for name in _finals(out) if out.exists() else []:  # whatever is final is complete
        if name.endswith((".rec", ".idx")):
            assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    res = run_gpurec(*args)
    assert res.returncode == 0, res.stderr
    assert _finals(out) == _finals(tmp_path / "ref")
    for name in _finals(out):
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    assert not list(out.glob("*.tmp"))


def test_disk_full_is_a_clear_error_and_leaves_nothing(big_tree: Path, tmp_path: Path) -> None:
    def small_disk() -> None:  # files may not grow past 300 KB: like a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))

    out = tmp_path / "out"
    res = subprocess.run(
        [sys.executable, "-m", "gpurec", "pack", str(big_tree), str(out / "ds"), "--pass-through",
         "--workers", "1"],
        capture_output=True, text=True, preexec_fn=small_disk, timeout=300,
    )  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert "error:" in res.stderr and "File too large" in res.stderr
    assert "Traceback" not in res.stderr
    assert sorted(p.name for p in out.iterdir()) == []  # no temporaries, no finals


def test_an_image_too_big_for_memory_is_skipped_and_the_pack_goes_on(tmp_path: Path) -> None:
    """The pack's workers are threads of one process: what one image does to memory must
    end as a skip of that image, never as the end of the pack. Address space is capped
    at 2 GiB; one JPEG declares 30000 x 30000 pixels (2.7 GB to decode), one file is a
    sparse 3 GB file (over a record's maximum: refused before it is read)."""
    root = color_tree(tmp_path / "img", per_class=6, classes=("a",))
    folder = root / "a"
    data = bytearray(cv2.imencode(".jpg", np.full((64, 64, 3), 99, np.uint8))[1].tobytes())
    struct.pack_into(">HH", data, data.find(b"\xff\xc0") + 5, 30000, 30000)
    (folder / "huge.jpg").write_bytes(data)
    with open(folder / "sparse.jpg", "wb") as f:
        f.truncate(3 << 30)

    def small_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    res = subprocess.run(
        [sys.executable, "-m", "gpurec", "pack", str(root), str(tmp_path / "ds"), "--workers",
         "2", "--max-pixels", "2000000000"],
        capture_output=True, text=True, preexec_fn=small_memory, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    report = dict(line.split("\t", 1) for line in
                  (tmp_path / "ds.skipped.tsv").read_text().splitlines()[1:])  # fmt: skip
    huge, sparse = "a/huge.jpg", "a/sparse.jpg"
    assert sorted(report) == [huge, sparse]
    assert report[huge].startswith("OpenCV cannot decode it: ")
    assert "Failed to allocate" in report[huge]
    assert report[sparse] == f"file of {3 << 30} bytes is over a record's maximum of {2**29 - 1}"
    with RecordReader(tmp_path / "ds.rec") as reader:
        assert len(reader) == 6


def _read_all(rec: Path) -> list[bytes]:
    with RecordReader(rec) as reader:
        return [reader[i] for i in range(len(reader))]


def test_eight_processes_read_identical_records(tmp_path: Path) -> None:
    shards = numbered_shards(tmp_path, counts=(40,))
    want = _read_all(shards[0])
    with ProcessPoolExecutor(8, mp_context=get_context("spawn")) as pool:
        results = list(pool.map(_read_all, [shards[0]] * 8))
    assert results == [want] * 8


def test_a_failing_worker_raises_in_the_training_loop(tmp_path: Path) -> None:
    """The CPU backend's workers are threads: what kills one (an exception) is re-raised
    in the loop, the rest of the pool is cancelled, and nothing hangs."""
    (rec,) = numbered_shards(tmp_path, counts=(64,))
    offsets = read_idx(rec.with_suffix(".idx"))[1]
    raw = bytearray(rec.read_bytes())
    raw[int(offsets[40]) + 8 + 24 + 1] ^= 0xFF
    rec.write_bytes(bytes(raw))
    pipe = Pipeline(rec, 8, (3, 16, 16), device="cpu", backend="cpu", train=False, prefetch=3)
    start = time.monotonic()
    seen = []
    with pytest.raises(RecordIOError, match="record 40"):
        for batch in pipe:
            seen.append(batch)
    assert len(seen) == 5 and time.monotonic() - start < 30
    pipe.close()


# ---------------------------------------------------------------------------- security


def test_no_pickle_eval_or_shell_on_user_data() -> None:
    forbidden = re.compile(
        r"pickle\.loads?\(|\beval\(|\bexec\(|shell=True|os\.system\(|yaml\.load\(|"
        r"yaml\.unsafe_load|marshal\.loads"
    )
    for path in (REPO / "gpurec").rglob("*.py"):
        for no, line in enumerate(path.read_text().splitlines(), 1):
            assert not forbidden.search(line), f"{path}:{no}: {line.strip()}"
    assert "yaml.safe_load" in (REPO / "gpurec" / "config.py").read_text()
