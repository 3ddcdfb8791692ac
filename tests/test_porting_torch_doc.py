"""docs/porting-from-mxnet.md section 7 (arcface_torch without MXNet): its ``py`` blocks,
run as written on the InsightFace-layout file MXNet 1.9.1 wrote, copied to ``faces/``."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "porting-from-mxnet.md"


def test_arcface_section_runs_as_written(golden: Path, tmp_path: Path) -> None:
    text = PAGE.read_text()
    section = text[text.index("## 7. arcface_torch without MXNet") :]
    change = "-from dataset import get_dataloader\n+from gpurec.torch import get_dataloader"
    assert change in section
    code = re.findall(r"```py\n(.*?)```", section, flags=re.S)
    assert len(code) == 2
    (tmp_path / "faces").mkdir()
    for name in ("train.rec", "train.idx"):
        shutil.copy(golden / "insightface" / name, tmp_path / "faces" / name)
    script = tmp_path / "section7.py"
    script.write_text("\n\n".join(code))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "(4, 3, 112, 112) torch.float32 torch.int64 4",
        "(4, 3, 112, 112) torch.float32 torch.int64 4",
        "(4, 3, 112, 112) torch.float32 torch.int64 4",
        "12 (112, 112) RGB 0 None",
        "16 (112, 112, 3) 0.0",
    ]
