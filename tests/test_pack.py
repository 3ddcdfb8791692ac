"""`gpurec pack` through real subprocesses on real image trees."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import color_tree, label_from_pixels, run_gpurec
from PIL import Image

from gpurec.recordio import RecordReader, read_lst, unpack


def records(rec: Path) -> list[tuple[float, int, np.ndarray]]:
    """(label, id, decoded image) of every record of a shard."""
    out = []
    with RecordReader(rec) as reader:
        for i in range(len(reader)):
            header, payload = unpack(reader[i])
            img = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_UNCHANGED)
            out.append((header.label, header.id, img))
    return out


def test_class_folders_pack_with_right_labels_pixels_and_files(tmp_path: Path) -> None:
    root = color_tree(tmp_path / "img", per_class=6)
    res = run_gpurec("pack", root, tmp_path / "out" / "ds", "--resize", "48", "--workers", "2")
    assert res.returncode == 0, res.stderr
    last = res.stdout.strip().splitlines()[-1]
    assert last.startswith("packed 18 images into 1 shard(s)") and "skipped 0" in last
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "ds.classes.json",
        "ds.idx",
        "ds.lst",
        "ds.rec",
    ]
    assert json.loads((out / "ds.classes.json").read_text())["classes"] == ["a", "b", "c"]
    entries = {e.index: e for e in read_lst(out / "ds.lst")}
    got = records(out / "ds.rec")
    assert sorted(rid for _, rid, _ in got) == list(range(18))
    for label, rid, img in got:
        entry = entries[rid]
        assert label == entry.labels[0] == "abc".index(entry.path[0])
        assert label_from_pixels(img) == label  # the label belongs to its image
        assert min(img.shape[:2]) == 48
        src = cv2.imread(str(root / entry.path))
        h, w = src.shape[:2]
        assert img.shape[:2] == ((h * 48 // w, 48) if h > w else (48, w * 48 // h))
        ref = cv2.resize(src, img.shape[1::-1], interpolation=cv2.INTER_AREA)
        assert np.abs(img.astype(int) - ref).mean() < 3  # stated tolerance: 3 levels


def test_order_and_bytes_do_not_depend_on_workers(tmp_path: Path) -> None:
    root = color_tree(tmp_path / "img", per_class=10)
    for w in ("1", "2"):
        res = run_gpurec(
            "pack",
            root,
            tmp_path / w / "ds",
            "--resize",
            "40",
            "--workers",
            w,
            "--shards",
            "3",
            "--seed",
            "7",
        )
        assert res.returncode == 0, res.stderr
    names = sorted(p.name for p in (tmp_path / "1").iterdir())
    assert len([n for n in names if n.endswith(".rec")]) == 3
    for name in names:
        assert (tmp_path / "1" / name).read_bytes() == (tmp_path / "2" / name).read_bytes(), name


def test_shards_are_balanced_disjoint_and_each_readable_alone(tmp_path: Path) -> None:
    root = color_tree(tmp_path / "img", per_class=10)
    prefix = tmp_path / "out" / "ds"
    res = run_gpurec("pack", root, prefix, "--shards", "4", "--pass-through", "--workers", "1")
    assert res.returncode == 0, res.stderr
    shards = sorted((tmp_path / "out").glob("ds-*-of-00004.rec"))
    assert [s.name for s in shards] == [f"ds-0000{k}-of-00004.rec" for k in range(4)]
    ids = [[rid for _, rid, _ in records(s)] for s in shards]
    assert sorted(len(i) for i in ids) == [7, 7, 8, 8]
    assert sorted(i for shard_ids in ids for i in shard_ids) == list(range(30))
    for shard, shard_ids in zip(shards, ids, strict=True):
        assert [e.index for e in read_lst(shard.with_suffix(".lst"))] == shard_ids


def test_stratified_splits(tmp_path: Path) -> None:
    root = color_tree(tmp_path / "img", per_class=10)
    prefix = tmp_path / "ds"
    res = run_gpurec(
        "pack", root, prefix, "--train-ratio", "0.6", "--test-ratio", "0.2", "--pass-through"
    )
    assert res.returncode == 0, res.stderr
    splits = {s: list(read_lst(tmp_path / f"ds_{s}.lst")) for s in ("train", "val", "test")}
    for name, want in (("train", 6), ("val", 2), ("test", 2)):
        per_class = np.bincount([int(e.labels[0]) for e in splits[name]], minlength=3)
        assert per_class.tolist() == [want] * 3, name
        assert len(records(tmp_path / f"ds_{name}.rec")) == 3 * want
    all_ids = [e.index for s in splits.values() for e in s]
    assert sorted(all_ids) == list(range(30))


def test_flat_pets_folder_with_labels_from_names(tmp_path: Path) -> None:
    root = tmp_path / "pets"
    root.mkdir()
    img = np.full((50, 60, 3), 100, np.uint8)
    names = [
        "english_cocker_spaniel_186.jpg",
        "english_cocker_spaniel_2.jpg",
        "Abyssinian_1.jpg",
        "Abyssinian_12.JPG",
        "pug_3.jpeg",
        "README.jpg",
    ]
    for name in names:
        cv2.imwrite(str(root / name), img) if not name.endswith("JPG") else shutil.copy(
            root / "Abyssinian_1.jpg", root / name
        )
    res = run_gpurec(
        "pack", root, tmp_path / "out" / "pets", "--label-from-name", "default", "--pass-through"
    )
    assert res.returncode == 0, res.stderr
    classes = json.loads((tmp_path / "out" / "pets.classes.json").read_text())["classes"]
    assert classes == ["Abyssinian", "english_cocker_spaniel", "pug"]
    labels = {e.path: e.labels[0] for e in read_lst(tmp_path / "out" / "pets.lst")}
    assert labels == {
        "Abyssinian_1.jpg": 0.0,
        "Abyssinian_12.JPG": 0.0,
        "english_cocker_spaniel_186.jpg": 1.0,
        "english_cocker_spaniel_2.jpg": 1.0,
        "pug_3.jpeg": 2.0,
    }
    report = (tmp_path / "out" / "pets.skipped.tsv").read_text().splitlines()
    assert report == [
        "path\treason",
        "README.jpg\tfile name does not match ^(.+)_\\\\d+\\\\.[^.]+$",
    ]


def _bad_tree(root: Path) -> dict[str, str | None]:
    """Every kind of awkward file; value: the skip reason start, or None if it must pack."""
    good = np.random.default_rng(0).integers(0, 255, (40, 50, 3)).astype(np.uint8)
    d = root / "x"
    d.mkdir(parents=True)
    jpg = cv2.imencode(".jpg", good)[1].tobytes()
    (d / "ok.jpg").write_bytes(jpg)
    (d / "empty.jpg").write_bytes(b"")
    (d / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (d / "garbage.jpg").write_bytes(os.urandom(500))
    (d / "png_named.jpg").write_bytes(cv2.imencode(".png", good)[1].tobytes())
    Image.fromarray(good).save(d / "gif_named.jpg", "GIF")
    Image.fromarray(good).convert("CMYK").save(d / "cmyk.jpg", "JPEG")
    Image.fromarray(good).convert("L").save(d / "gray.jpg", "JPEG")
    cv2.imwrite(str(d / "deep16.png"), good.astype(np.uint16) * 257)
    cv2.imwrite(str(d / "alpha.png"), np.dstack([good, good[..., 0]]))
    cv2.imwrite(str(d / "huge.png"), np.zeros((300, 400, 3), np.uint8))  # over --max-pixels
    (d / "tab\there.jpg").write_bytes(jpg)
    (d / "new\nline.jpg").write_bytes(jpg)
    (d / "spaced name.jpg").write_bytes(jpg)
    (d / " leading space.jpg").write_bytes(jpg)
    (d / "outside.jpg").symlink_to(root.parent / "elsewhere.jpg")
    (root.parent / "elsewhere.jpg").write_bytes(jpg)
    return {
        "ok.jpg": None,
        "png_named.jpg": None,
        "gif_named.jpg": None,
        "cmyk.jpg": None,
        "gray.jpg": None,
        "deep16.png": None,
        "alpha.png": None,
        "spaced name.jpg": None,
        "empty.jpg": "empty file",
        "truncated.jpg": "truncated JPEG",
        "garbage.jpg": "not an image",
        "huge.png": "400x300 = 120000 pixels is over",
        "tab\there.jpg": "file name holds a tab",
        "new\nline.jpg": "file name holds a tab",
        "outside.jpg": "symlink points outside the root",
        " leading space.jpg": "name starts or ends with white space",
    }


def test_bad_files_never_stop_a_pack_and_are_reported(tmp_path: Path) -> None:
    want = _bad_tree(tmp_path / "img")
    prefix = tmp_path / "out" / "ds"
    res = run_gpurec("pack", tmp_path / "img", prefix, "--max-pixels", "100000", "--workers", "2")
    assert res.returncode == 0, res.stderr
    assert "skipped 8" in res.stdout
    packed = {e.path for e in read_lst(tmp_path / "out" / "ds.lst")}
    assert packed == {f"x/{n}" for n, why in want.items() if why is None}
    for _, _, img in records(tmp_path / "out" / "ds.rec"):
        assert img.shape == (40, 50, 3) and img.dtype == np.uint8
    lines = (tmp_path / "out" / "ds.skipped.tsv").read_text().splitlines()
    assert lines[0] == "path\treason"
    reported = dict(line.split("\t") for line in lines[1:])
    escaped = {
        f"x/{n}".replace("\t", "\\t").replace("\n", "\\n"): why for n, why in want.items() if why
    }
    assert set(reported) == set(escaped)
    for path, why in escaped.items():
        assert reported[path].startswith(why), (path, reported[path])
    strict = run_gpurec("pack", tmp_path / "img", prefix, "--max-pixels", "100000", "--strict")
    assert strict.returncode == 1 and "skipped 8" in strict.stdout


def test_unknown_config_key_and_bad_option_are_clear_errors(tmp_path: Path) -> None:
    root = color_tree(tmp_path / "img", per_class=1)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("resize: 32\nresise: 64\n")
    res = run_gpurec("pack", root, tmp_path / "o", "--config", cfg)
    assert res.returncode == 2
    assert "unknown pack option(s): resise" in res.stderr and "Traceback" not in res.stderr
    res = run_gpurec("pack", root, tmp_path / "o", "--train-ratio", "0.7", "--test-ratio", "0.5")
    assert res.returncode == 2 and "is over 1" in res.stderr
    res = run_gpurec("pack", tmp_path / "missing", tmp_path / "o")
    assert res.returncode == 2 and "image folder not found" in res.stderr


def test_config_presets_load_and_flags_override(tmp_path: Path) -> None:
    root = color_tree(tmp_path / "img", per_class=2)
    preset = Path(__file__).parents[1] / "configs" / "imagenet-pack.yaml"
    res = run_gpurec(
        "pack", root, tmp_path / "o" / "ds", "--config", preset, "--shards", "1", "--resize", "32"
    )
    assert res.returncode == 0, res.stderr
    assert all(min(img.shape[:2]) == 32 for _, _, img in records(tmp_path / "o" / "ds.rec"))


def test_job_array_parts_give_the_same_files_as_one_machine(tmp_path: Path) -> None:
    root = color_tree(tmp_path / "img", per_class=8)
    common = ["--shards", "3", "--train-ratio", "0.75", "--resize", "40", "--workers", "1"]
    assert run_gpurec("pack", root, tmp_path / "one" / "ds", *common).returncode == 0
    for part in range(4):
        res = run_gpurec(
            "pack", root, tmp_path / "many" / "ds", *common, "--num-parts", "4", "--part", str(part)
        )
        assert res.returncode == 0, res.stderr
    one = sorted(p.name for p in (tmp_path / "one").iterdir())
    many = sorted(p.name for p in (tmp_path / "many").iterdir())
    assert one == many and len([n for n in one if n.endswith(".rec")]) == 6
    for name in one:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "many" / name).read_bytes()


def _big_tree(root: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (600, 800, 3)).astype(np.uint8)
    data = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    (root / "c").mkdir(parents=True)
    for i in range(n):
        (root / "c" / f"{i:04d}.jpg").write_bytes(data)
    return root


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_pack_leaves_nothing_final_and_rerun_completes(tmp_path: Path, sig) -> None:
    root = _big_tree(tmp_path / "img", 400)
    out = tmp_path / "out"
    args = [
        sys.executable,
        "-m",
        "gpurec",
        "pack",
        str(root),
        str(out / "ds"),
        "--resize",
        "300",
        "--workers",
        "1",
        "--shards",
        "2",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(out.glob("*.rec.tmp")) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert not list(out.glob("*.rec")) and not list(out.glob("*.idx")), sorted(out.iterdir())
    if sig == signal.SIGINT:  # a Ctrl-C cleans its temporary files too
        assert not list(out.glob("*.tmp")), sorted(out.iterdir())
    res = run_gpurec("pack", root, out / "ds", "--resize", "300", "--workers", "1", "--shards", "2")
    assert res.returncode == 0, res.stderr
    assert not list(out.glob("*.tmp"))
    ref = run_gpurec(
        "pack", root, tmp_path / "ref" / "ds", "--resize", "300", "--workers", "2", "--shards", "2"
    )
    assert ref.returncode == 0
    for rec in sorted(out.glob("*.rec")) + sorted(out.glob("*.idx")):
        assert rec.read_bytes() == (tmp_path / "ref" / rec.name).read_bytes()


def test_list_paths_stay_under_the_root_unless_allowed(tmp_path: Path) -> None:
    """One RootPaths serves a whole pack and remembers folders' real paths: a folder or
    file symlink that leads out is refused on every use, one that stays in is followed."""
    from gpurec.listing import RootPaths, RootRule

    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "real").mkdir(parents=True)
    outside.mkdir()
    for folder in (root / "real", outside):
        (folder / "x.jpg").write_bytes(b"x")
    (root / "in_link").symlink_to(root / "real")
    (root / "out_link").symlink_to(outside)
    (root / "real" / "file_out.jpg").symlink_to(outside / "x.jpg")
    (root / "real" / "file_in.jpg").symlink_to(root / "real" / "x.jpg")
    paths = RootPaths(root)
    for _ in range(2):  # the second round is served by the remembered folders
        assert paths("real/x.jpg") == str(root / "real" / "x.jpg")
        assert paths("in_link/x.jpg") == str(root / "in_link" / "x.jpg")
        assert paths("real/file_in.jpg") == str(root / "real" / "file_in.jpg")
        assert paths("real/../real/x.jpg") == str(root / "real" / "x.jpg")
        for rel, why in [
            ("out_link/x.jpg", "symlink points outside the root"),
            ("real/file_out.jpg", "symlink points outside the root"),
            ("../outside/x.jpg", "path escapes the root"),
            (str(outside / "x.jpg"), "absolute path refused"),
        ]:
            with pytest.raises(ValueError, match=why):
                paths(rel)
    # A folder checked once, then swapped for a link to the outside while the pack runs:
    # the remembered check would pass, the check of the opened file does not.
    os.close(paths.open("real/x.jpg"))
    (root / "real").rename(root / "moved")
    (root / "real").symlink_to(outside)
    assert paths("real/x.jpg") == str(root / "real" / "x.jpg")  # remembered: looks fine
    with pytest.raises(ValueError, match="symlink points outside the root"):
        paths.open("real/x.jpg")
    assert RootPaths(root, RootRule(follow_links=True))("out_link/x.jpg") == str(
        root / "out_link" / "x.jpg"
    )
    assert RootPaths(root, RootRule(allow_outside=True))("../outside/x.jpg") == os.path.join(
        root, "../outside/x.jpg"
    )
