"""Shared test fixtures: where the MXNet-written golden files live."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

_DEFAULT_GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden"


@pytest.fixture(scope="session")
def golden() -> Path:
    """The folder of RecordIO files written by MXNet 1.9.1 (``../shared/golden``).

    Set GPUREC_GOLDEN to use another copy. Missing golden files fail the run in CI
    (they define compatibility) and skip with a reason elsewhere.
    """
    path = Path(os.environ.get("GPUREC_GOLDEN", _DEFAULT_GOLDEN))
    if not (path / "expected.json").exists():
        if os.environ.get("CI"):
            pytest.fail(f"golden files not found at {path}")
        pytest.skip(f"golden files not found at {path} (set GPUREC_GOLDEN)")
    return path


@pytest.fixture(scope="session")
def expected(golden: Path) -> dict:
    return json.loads((golden / "expected.json").read_text())
