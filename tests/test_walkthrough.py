"""docs/walkthrough.md, run as written on generated Pets-style data."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "walkthrough.md"
BREEDS = ["Abyssinian", "american_bulldog", "english_cocker_spaniel", "pug"]


def blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", PAGE.read_text(), flags=re.S)


def pets_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    root.mkdir()
    for k, breed in enumerate(BREEDS):
        for n in range(1, 11):
            img = np.clip(rng.normal(60 * k + 40, 20, (180, 240, 3)), 0, 255).astype(np.uint8)
            cv2.imwrite(str(root / f"{breed}_{n}.jpg"), img)
    (root / "Abyssinian_34.jpg").write_bytes(b"")  # unreadable, as some real files are
    good = (root / "pug_1.jpg").read_bytes()
    (root / "pug_99.jpg").write_bytes(good[: len(good) // 2])


def test_walkthrough_commands_run_as_written(tmp_path: Path) -> None:
    pets_folder(tmp_path / "images")
    for name in ("configs", "examples"):
        (tmp_path / name).symlink_to(REPO / name)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    commands = [line for block in blocks("bash") for line in block.splitlines() if line.strip()]
    assert [c.split()[:2] for c in commands][:4] == [
        ["gpurec", "pack"],
        ["gpurec", "info"],
        ["gpurec", "verify"],
        ["gpurec", "show"],
    ]
    for command in commands:
        argv = shlex.split(command)
        if argv[0] == "gpurec":
            argv = [sys.executable, "-m", "gpurec", *argv[1:]]
        elif argv[0] == "python":
            argv = [sys.executable, *argv[1:]]
        res = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=600)  # fmt: skip
        assert res.returncode == 0, (command, res.stdout, res.stderr)
        if argv[2:4] == ["gpurec", "pack"]:
            assert "packed 40 images" in res.stdout and "skipped 2" in res.stdout
    report = (tmp_path / "data" / "pets.skipped.tsv").read_text().splitlines()[1:]
    assert sorted(line.split("\t")[0] for line in report) == ["Abyssinian_34.jpg", "pug_99.jpg"]
    classes = (tmp_path / "data" / "pets.classes.json").read_text()
    assert all(breed in classes for breed in BREEDS)
    five = cv2.imread(str(tmp_path / "five.png"))
    assert five.shape == (2 * (224 + 18), 3 * 224, 3)
    mxnet_way, pipeline_way = blocks("python")
    printed = []
    for code in (mxnet_way, pipeline_way):
        out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("(32, 3, 224, 224) float32")
        printed.append(out.stdout)
    assert printed[0] == printed[1]  # the same records, the iterator being the Pipeline


def test_training_example_learns_on_cpu(tmp_path: Path) -> None:
    from gpurec.pack import pack
    from gpurec.sample import make_sample_tree

    pack(make_sample_tree(tmp_path / "img", per_class=32), tmp_path / "ds", resize=64, workers=1)
    res = subprocess.run(
        [sys.executable, str(REPO / "examples" / "train_torch.py"), str(tmp_path / "ds"),
         "--classes", "3", "--device", "cpu", "--size", "48", "--batch-size", "16",
         "--epochs", "8", "--lr", "0.01"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    losses = [float(m) for m in re.findall(r"loss (\d+\.\d+)", res.stdout)]
    assert len(losses) == 8 and sum(losses[-3:]) / 3 < losses[0] - 0.1  # it learns
