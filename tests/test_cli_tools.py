"""`gpurec info`, `verify`, `index`, `show` and `demo` through real subprocesses."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import cv2
import pytest
from helpers import color_tree, run_gpurec

from gpurec.pack import pack
from gpurec.recordio import read_idx


@pytest.fixture
def packed(tmp_path: Path) -> Path:
    root = color_tree(tmp_path / "img", per_class=5)
    pack(root, tmp_path / "out" / "ds", resize=40, train_ratio=0.6, shards=2, workers=1)
    return tmp_path / "out"


def test_info_json_values(packed: Path) -> None:
    res = run_gpurec("info", packed / "ds_train", "--json")
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["records"] == 9 and [s["records"] for s in got["shards"]] == [5, 4]
    assert got["bytes"] == sum(
        (packed / Path(s["path"]).name).stat().st_size for s in got["shards"]
    )
    assert got["labels"] == {"a": 3, "b": 3, "c": 3} and got["classes"] == ["a", "b", "c"]
    assert got["label_kind"] == "single"
    assert got["sample"]["formats"] == {"jpeg": 9} and got["sample"]["height"]["min"] == 40
    text = run_gpurec("info", packed / "ds_val")
    assert text.returncode == 0 and text.stdout.strip().splitlines()[-1].startswith("6 images")


def test_info_multi_label(golden: Path) -> None:
    res = run_gpurec("info", golden / "special.rec", "--json", "--sample", "0")
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["records"] == 6 and got["label_kind"] == "multi-label (0, 4)"


def test_verify_intact_then_catches_a_flipped_byte_and_a_wrong_idx(packed: Path) -> None:
    ok = run_gpurec("verify", packed / "ds_train")
    assert ok.returncode == 0 and "verified 9 records in 2 shard(s): intact" in ok.stdout
    rec = packed / "ds_train-00000-of-00002.rec"
    offsets = read_idx(rec.with_suffix(".idx"))[1]
    raw = bytearray(rec.read_bytes())
    raw[int(offsets[2]) + 200] ^= 0xFF  # inside the image data of record 2
    raw[int(offsets[3])] ^= 0x01  # the magic word of record 3
    rec.write_bytes(bytes(raw))
    other = packed / "ds_train-00001-of-00002"
    shutil.copy(packed / "ds_val-00000-of-00002.idx", other.with_suffix(".idx"))  # wrong .idx
    bad = run_gpurec("verify", packed / "ds_train")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    lines = [ln for ln in bad.stdout.splitlines() if ln.startswith("bad")]
    assert any(f"index 3  offset {offsets[3]}  bad magic" in ln for ln in lines), lines
    assert any(f"index 2  offset {offsets[2]}  does not decode" in ln for ln in lines), lines
    wrong_idx = [ln for ln in lines if "ds_train-00001-of-00002.rec" in ln]
    assert wrong_idx and all("idx" in ln for ln in wrong_idx), lines
    assert "problem(s)" in bad.stdout.splitlines()[-1]


def test_index_reproduces_the_original(packed: Path, golden: Path, tmp_path: Path) -> None:
    idx = packed / "ds_val-00001-of-00002.idx"
    original = idx.read_bytes()
    idx.unlink()
    res = run_gpurec("index", packed / "ds_val-00001-of-00002.rec")
    assert res.returncode == 0 and idx.read_bytes() == original
    shutil.copy(golden / "special.rec", tmp_path / "special.rec")
    res = run_gpurec("index", tmp_path / "special.rec", "-o", tmp_path / "x.idx")
    assert (
        res.returncode == 0
        and (tmp_path / "x.idx").read_bytes() == (golden / "special.idx").read_bytes()
    )
    assert run_gpurec("index", tmp_path / "missing.rec").returncode == 2


def test_show_writes_a_png_grid_of_the_right_size(packed: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "p.yaml"
    cfg.write_text("data_shape: [3, 32, 48]\nmax_rotate_angle: 30\nmean: [120, 120, 120]\n"
                   "std: [50, 50, 50]\n")  # fmt: skip
    res = run_gpurec("show", packed / "ds_train", "-o", tmp_path / "g.png", "-n", "5",
                     "--config", cfg)  # fmt: skip
    assert res.returncode == 0, res.stderr
    img = cv2.imread(str(tmp_path / "g.png"))
    assert img.shape == (2 * (32 + 18), 3 * 48, 3)  # 5 tiles in 3 columns, captions of 18 px
    res = run_gpurec("show", packed / "ds_train", "-o", tmp_path / "r.png", "-n", "4", "--raw",
                     "--config", cfg)  # fmt: skip
    assert res.returncode == 0 and cv2.imread(str(tmp_path / "r.png")).shape == (64, 96, 3)


def test_show_an_imagerecorditer_config(packed: Path, tmp_path: Path) -> None:
    """MXNet's keywords in a config: a misspelt one is an error naming the file (not a
    traceback); a record that does not decode is skipped and counted, as for a preset."""
    typo = tmp_path / "typo.yaml"
    typo.write_text("ImageRecordIter:\n  data_shape: [3, 32, 32]\n  rand_mirrror: true\n")
    res = run_gpurec("show", packed / "ds_train-00000-of-00002", "-o", tmp_path / "t.png",
                     "--config", typo)  # fmt: skip
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "typo.yaml" in res.stderr and "rand_mirrror" in res.stderr
    rec = packed / "ds_train-00000-of-00002.rec"
    offsets = read_idx(rec.with_suffix(".idx"))[1]
    raw = bytearray(rec.read_bytes())
    start = int(offsets[1]) + 8 + 24  # record 1's image, after its headers
    raw[start : start + 64] = bytes(64)  # no JPEG any more; the RecordIO frame intact
    rec.write_bytes(bytes(raw))
    cfg = tmp_path / "mx.yaml"  # strings as MXNet reads them, and a YAML None
    cfg.write_text("ImageRecordIter:\n  data_shape: '(3, 32, 32)'\n  resize: 40\n"
                   "  rand_crop: 'True'\n  min_aspect_ratio: None\n")  # fmt: skip
    res = run_gpurec("show", rec, "-o", tmp_path / "g.png", "-n", "5", "--raw", "--config", cfg)
    assert res.returncode == 0, res.stderr
    assert "5 images of 32x32 (1 unreadable record(s) skipped)" in res.stdout, res.stdout
    assert cv2.imread(str(tmp_path / "g.png")).shape == (64, 96, 3)  # 5 tiles, 3 columns


def test_demo_completes_in_a_temporary_folder(tmp_path: Path) -> None:
    res = run_gpurec("demo", "--out", tmp_path / "d", "--per-class", "12")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1].startswith("demo: packed 36 images (3 skipped)")
    assert (tmp_path / "d" / "grid.png").is_file()
    assert (tmp_path / "d" / "sample.skipped.tsv").read_text().count("\n") == 4


def test_errors_have_no_traceback_unless_debug(tmp_path: Path) -> None:
    res = run_gpurec("info", tmp_path / "nothing.rec")
    assert res.returncode == 2 and "record file not found" in res.stderr
    assert "Traceback" not in res.stderr
    res = run_gpurec("--debug", "info", tmp_path / "nothing.rec")
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_bench_reports_each_stage(packed: Path) -> None:
    res = run_gpurec("bench", packed / "ds_train", "--epochs", "2", "--batch-size", "4",
                     "--backend", "cpu")  # fmt: skip
    assert res.returncode == 0, res.stderr
    rates = dict(re.findall(r"^(read|decode|epoch \d)\s+([\d,]+) ", res.stdout, flags=re.M))
    assert set(rates) == {"read", "decode", "epoch 0", "epoch 1"}
    assert all(float(v.replace(",", "")) > 0 for v in rates.values())
    assert re.search(r"^bench: [\d,]+ images/s with CPUBackend on cpu", res.stdout, flags=re.M)


@pytest.mark.parametrize(
    "command", ["pack", "im2rec", "info", "verify", "index", "show", "demo", "bench"]
)
def test_every_command_has_help(command: str) -> None:
    res = run_gpurec(command, "--help" if command != "im2rec" else "-h")
    assert res.returncode == 0 and "usage" in res.stdout.lower(), res.stderr
