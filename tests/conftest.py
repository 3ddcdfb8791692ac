"""Shared test fixtures: where the MXNet-written golden files live."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
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


@pytest.fixture(scope="module")
def face(golden: Path) -> Path:
    """MXNet's InsightFace-layout file (``train.rec``/``.idx``, a header record, identity
    records), with its ``expected.json``."""
    return golden / "insightface"


@pytest.fixture(scope="module")
def face_expected(face: Path) -> dict:
    return json.loads((face / "expected.json").read_text())


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    """A real S3 API on 127.0.0.1 (moto's server), one per test module."""
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_client(endpoint: str, monkeypatch):
    """A boto3 client of the module's moto server; AWS_* point every client (and every
    subprocess) at it. fsspec keeps filesystems by their arguments, not by
    AWS_ENDPOINT_URL, so its cache is cleared on the way in and out: a filesystem of one
    module's server must not serve another module's tests."""
    pytest.importorskip("s3fs")
    import boto3
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    s3fs.S3FileSystem.clear_instance_cache()
    yield boto3.client("s3")
    s3fs.S3FileSystem.clear_instance_cache()
