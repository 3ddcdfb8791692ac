"""The Dockerfile installs what pyproject.toml calls the gpu extra, for CUDA 12."""

from __future__ import annotations

import re
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]


def test_dockerfile_and_gpu_extra_stay_in_sync() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    gpu = project["optional-dependencies"]["gpu"]
    names = {re.split(r"[<>=\[ ]", req)[0] for req in gpu}
    assert names == {"nvidia-dali-cuda120", "cupy-cuda12x"}  # both built for CUDA 12
    docker = (REPO / "Dockerfile").read_text()
    installs = re.findall(r"pip install (.+)", docker)
    assert installs == ['"/src[gpu]"'], installs  # the project with exactly its gpu extra
    base = re.search(r"ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.\d+\.\d+-runtime", docker)
    assert base and base.group(1) == "12"
    assert 'ENTRYPOINT ["gpurec"]' in docker and "USER gpurec" in docker
    assert "VOLUME /data" in docker and "PIP_NO_CACHE_DIR=1" in docker
    final = docker.split("\nFROM ")[-1]
    assert "pip install" not in final and "build-essential" not in docker  # no build tools
    for copied in re.findall(r"^COPY (?!--from)(.+) /", docker, flags=re.M):
        for path in copied.split():
            assert (REPO / path).exists(), path
    scripts = project["scripts"]
    assert scripts == {"gpurec": "gpurec.cli:app"}
