"""`gpurec im2rec`: MXNet's im2rec.py command line, checked against MXNet's own files."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import color_tree, run_gpurec

from gpurec.recordio import RecordReader, read_idx, read_lst, unpack


@pytest.fixture
def golden_tree(golden: Path, tmp_path: Path) -> Path:
    shutil.copytree(golden / "images", tmp_path / "images")
    return tmp_path / "images"


def test_list_then_pass_through_equals_mxnet_bytes(golden: Path, golden_tree: Path) -> None:
    work = golden_tree.parent
    res = run_gpurec(
        "im2rec", "passthrough", "images", "--list", "--recursive", "--no-shuffle", cwd=work
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[:3] == ["cat 0", "dog 1", "fox 2"]  # im2rec prints these
    assert (work / "passthrough.lst").read_bytes() == (golden / "passthrough.lst").read_bytes()
    res = run_gpurec(
        "im2rec", "passthrough", "images", "--pass-through", "--num-thread", "2", cwd=work
    )
    assert res.returncode == 0, res.stderr
    for ext in (".rec", ".idx"):
        assert (work / f"passthrough{ext}").read_bytes() == (
            golden / f"passthrough{ext}"
        ).read_bytes()


def test_resize_center_crop_matches_mxnet_pixels(golden: Path, golden_tree: Path) -> None:
    """Tolerance: mean absolute difference <= 4 levels per image (MXNet decodes at full
    size; gpurec decodes at reduced size when that still covers the target)."""
    work = golden_tree.parent
    shutil.copy(golden / "resized.lst", work / "resized.lst")
    res = run_gpurec(
        "im2rec",
        "resized",
        "images",
        "--resize",
        "48",
        "--center-crop",
        "--quality",
        "90",
        cwd=work,
    )
    assert res.returncode == 0, res.stderr
    assert (
        read_idx(work / "resized.idx")[0].tolist() == read_idx(golden / "resized.idx")[0].tolist()
    )
    ours, theirs = RecordReader(work / "resized.rec"), RecordReader(golden / "resized.rec")
    assert len(ours) == len(theirs) == 12
    for i in range(12):
        (h1, p1), (h2, p2) = unpack(ours[i]), unpack(theirs[i])
        assert h1 == h2
        a, b = (cv2.imdecode(np.frombuffer(p, np.uint8), cv2.IMREAD_COLOR) for p in (p1, p2))
        assert a.shape == b.shape == (48, 48, 3)
        assert np.abs(a.astype(int) - b).mean() <= 4, i


def test_shuffled_chunked_lists_follow_im2rec_arithmetic(tmp_path: Path) -> None:
    root = color_tree(tmp_path / "img", per_class=7)
    res = run_gpurec(
        "im2rec",
        tmp_path / "lists" / "ds",
        root,
        "--list",
        "--recursive",
        "--chunks",
        "2",
        "--train-ratio",
        "0.6",
        "--test-ratio",
        "0.2",
    )
    assert res.returncode == 0, res.stderr
    walk = [(f"{c}/{c}_{i}.jpg", k) for k, c in enumerate("abc") for i in range(7)]
    items = [(i, path, label) for i, (path, label) in enumerate(walk)]
    random.seed(100)  # what im2rec.py does
    random.shuffle(items)
    chunk_size = 11
    for c in range(2):
        chunk = items[c * chunk_size : (c + 1) * chunk_size]
        sep, sep_test = int(chunk_size * 0.6), int(chunk_size * 0.2)
        parts = {
            "test": chunk[:sep_test],
            "val": chunk[sep_test + sep :],
            "train": chunk[sep_test : sep_test + sep],
        }
        for name, want in parts.items():
            got = [
                (e.index, e.path, e.labels[0])
                for e in read_lst(tmp_path / "lists" / f"ds_{c}_{name}.lst")
            ]
            assert got == [(i, p, float(lab)) for i, p, lab in want], (c, name)


def test_unreadable_images_and_escaping_paths_are_skipped_not_fatal(tmp_path: Path) -> None:
    root = color_tree(tmp_path / "img", per_class=2)
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    (tmp_path / "secret.jpg").write_bytes((root / "a" / "a_0.jpg").read_bytes())
    os.mkfifo(root / "a" / "pipe.jpg")  # opening it for reading would wait for a writer
    (root / "a" / "folder.jpg").mkdir()
    lst = tmp_path / "ds.lst"
    lst.write_text(
        "0\t0.000000\ta/a_0.jpg\n1\t0.000000\ta/broken.jpg\n"
        "2\t0.000000\t../secret.jpg\n3\t1.000000\tb/b_1.jpg\n"
        "4\t1.000000\t/etc/hostname\n5\t1.000000\tb/missing.jpg\n"
        "6\t0.000000\ta/pipe.jpg\n7\t0.000000\ta/folder.jpg\n"
    )
    res = run_gpurec("im2rec", tmp_path / "ds", root, "--num-thread", "2")
    assert res.returncode == 0, res.stderr
    assert [unpack(r)[0].id for r in RecordReader(tmp_path / "ds.rec")] == [0, 3]
    report = dict(
        line.split("\t") for line in (tmp_path / "ds.skipped.tsv").read_text().splitlines()[1:]
    )
    assert report["a/broken.jpg"].startswith("corrupt or truncated JPEG header")
    assert report["../secret.jpg"].startswith("path escapes the root")
    assert report["/etc/hostname"].startswith("absolute path refused")
    assert report["b/missing.jpg"].startswith("cannot read: No such file")
    assert report["a/pipe.jpg"] == report["a/folder.jpg"] == "not a regular file"


def test_pack_label_writes_multi_label_headers(tmp_path: Path) -> None:
    root = color_tree(tmp_path / "img", per_class=1)
    (tmp_path / "m.lst").write_text(
        "0\t1.000000\t0.500000\t-2.000000\ta/a_0.jpg\n1\t2.000000\t0.000000\t3.000000\tb/b_0.jpg\n"
    )
    assert (
        run_gpurec("im2rec", tmp_path / "m", root, "--pack-label", "--pass-through").returncode == 0
    )
    headers = [unpack(r)[0] for r in RecordReader(tmp_path / "m.rec")]
    assert [h.flag for h in headers] == [3, 3]
    np.testing.assert_array_equal(headers[1].label, np.float32([2, 0, 3]))
    assert run_gpurec("im2rec", tmp_path / "m", root, "--pass-through").returncode == 0
    assert [unpack(r)[0].label for r in RecordReader(tmp_path / "m.rec")] == [1.0, 2.0]


def test_help_and_usage_errors(tmp_path: Path) -> None:
    res = run_gpurec("im2rec", "-h")
    assert res.returncode == 0 and "--pass-through" in res.stdout and "--num-thread" in res.stdout
    res = run_gpurec("im2rec", "onlyprefix")
    assert res.returncode == 2 and "root" in res.stderr
    res = run_gpurec("im2rec", tmp_path / "nothing", tmp_path)
    assert res.returncode == 2 and "no list files" in res.stderr


def test_malformed_list_lines_are_skipped_like_im2rec(tmp_path: Path) -> None:
    root = color_tree(tmp_path / "img", per_class=2)
    (tmp_path / "m.lst").write_text("0\t0\ta/a_0.jpg \n1\tb/b_0.jpg\n2\tcat\tb/b_1.jpg\n"
                                   "3\t2\tc/c_0.jpg\n")  # fmt: skip
    res = run_gpurec("im2rec", tmp_path / "m", root, "--pass-through")
    assert res.returncode == 0, res.stderr
    assert [unpack(r)[0].id for r in RecordReader(tmp_path / "m.rec")] == [0, 3]
    report = (tmp_path / "m.skipped.tsv").read_text()
    assert "m.lst line 2\texpected" in report and "m.lst line 3\tnon-numeric label" in report


def test_test_ratio_is_ignored_without_a_train_split_as_in_im2rec(tmp_path: Path) -> None:
    root = color_tree(tmp_path / "img", per_class=2)
    res = run_gpurec("im2rec", tmp_path / "l", root, "--list", "--recursive", "--test-ratio",
                     "0.2")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert len(list(read_lst(tmp_path / "l.lst"))) == 6 and not (tmp_path / "l_test.lst").exists()
