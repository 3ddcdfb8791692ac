"""Shared test fixtures: where the MXNet-written golden files live."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

# A shell without job control starts a background command (`make test &` in a script)
# with SIGINT ignored, and every process it starts inherits that: the packs that the
# Ctrl-C tests interrupt would then run to the end. The tests' own process takes
# Python's handler back, so the processes it starts get the default disposition.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

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
