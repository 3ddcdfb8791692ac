"""docs/porting-from-mxnet.md, run as written on the InsightFace files MXNet 1.9.1 wrote."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "porting-from-mxnet.md"


def blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", PAGE.read_text(), flags=re.S)


def test_porting_page_runs_as_written(golden: Path, tmp_path: Path) -> None:
    faces = tmp_path / "faces"
    faces.mkdir()
    for name in ("train.rec", "train.idx", "shuffled.rec"):
        shutil.copy(golden / "insightface" / name, faces / name)
    shutil.copytree(golden / "images", tmp_path / "images")
    (tmp_path / "data").mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    script = tmp_path / "page.py"
    script.write_text("\n\n".join(blocks("python")))
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "12 (112, 112, 3) uint8 0.0"
    assert lines[1] == str([0.0] * 4 + [1.0] * 4 + [2.0] * 4)
    assert lines[2] == "[0, 1, 2]"
    shapes_labels = [line.split(") ") for line in lines[3:6]]
    assert all(shape == "(4, 3, 112, 112" for shape, _ in shapes_labels)
    labels = sorted(float(v) for _, lab in shapes_labels for v in lab.strip("[]").split())
    assert labels == [0.0] * 4 + [1.0] * 4 + [2.0] * 4  # one epoch: every face once
    assert lines[6] == "12"
    assert lines[7].startswith("cut.rec: at byte 28464: the file is cut short or broken")
    assert lines[8] == "8 1"
    assert lines[9] == "data (4, 3, 96, 96)"  # get_rec_iter, as MXNet's example wrote it
    batches = [line.split(") ") for line in lines[10:13]]
    assert all(shape == "(4, 3, 96, 96" for shape, _ in batches) and len(lines) == 13
    labels = sorted(float(v) for _, rest in batches for v in rest.rsplit("]", 1)[0][1:].split(","))
    assert labels == [0.0] * 4 + [1.0] * 4 + [2.0] * 4
    assert all(rest.endswith("] 0") for _, rest in batches)  # 12 faces, no padding
    assert (faces / "shuffled.rec.gpurec-index.npz").is_file()

    commands = [line for block in blocks("bash") for line in block.splitlines() if line.strip()]
    for command in commands:
        argv = shlex.split(command, comments=True)
        assert argv[0] == "gpurec", command
        res = subprocess.run([sys.executable, "-m", "gpurec", *argv[1:]], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert res.returncode == 0, (command, res.stdout, res.stderr)
        if argv[1] == "info":
            assert "12 images" in res.stdout and "InsightFace layout" in res.stdout
    assert (tmp_path / "faces.png").is_file()
    assert len((tmp_path / "cut.idx").read_text().splitlines()) == 8
    assert len((tmp_path / "data" / "pets.lst").read_text().splitlines()) == 12
    assert (tmp_path / "data" / "pets.idx").is_file()
