"""The Dockerfile installs what pyproject.toml calls the GPU extras, one per CUDA major."""

from __future__ import annotations

import re
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
EXTRAS = {"12": "gpu", "13": "gpu-cu13"}  # CUDA major -> extra


def test_dockerfile_and_gpu_extras_stay_in_sync() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    for major, extra in EXTRAS.items():
        names = {re.split(r"[<>=\[ ]", req)[0] for req in extras[extra]}
        assert names == {f"nvidia-dali-cuda{major}0", f"cupy-cuda{major}x"}, (extra, names)
    docker = (REPO / "Dockerfile").read_text()
    # The CUDA major version is a build argument, 12 by default ...
    assert re.search(r"^ARG CUDA_MAJOR=12$", docker, flags=re.M)
    # ... choosing a base stage per major: its image is that CUDA and its extra the one above.
    for major, extra in EXTRAS.items():
        image = re.search(rf"^ARG CUDA{major}_IMAGE=nvidia/cuda:(\d+)\.\d+\.\d+-runtime", docker,
                          flags=re.M)  # fmt: skip
        assert image and image.group(1) == major
        stage = re.search(rf"^FROM \${{CUDA{major}_IMAGE}} AS cuda{major}\nENV GPUREC_EXTRA=(\S+)$",
                          docker, flags=re.M)  # fmt: skip
        assert stage and stage.group(1) == extra
    assert re.findall(r"^FROM (\S+)", docker, flags=re.M)[2:] == ["cuda${CUDA_MAJOR}"] * 2
    installs = re.findall(r"pip install (.+)", docker)
    assert installs == ['"/src[${GPUREC_EXTRA}]"'], installs  # exactly the chosen extra
    assert 'ENTRYPOINT ["gpurec"]' in docker and "USER gpurec" in docker
    assert "VOLUME /data" in docker and "PIP_NO_CACHE_DIR=1" in docker
    final = docker.split("\nFROM ")[-1]
    assert "pip install" not in final and "build-essential" not in docker  # no build tools
    for copied in re.findall(r"^COPY (?!--from)(.+) /", docker, flags=re.M):
        for path in copied.split():
            assert (REPO / path).exists(), path
    scripts = project["scripts"]
    assert scripts == {"gpurec": "gpurec.cli:app"}


def test_test_extra_pins_the_cpu_build_of_torch() -> None:
    # A range (or another release) makes `make test` download a multi-GB CUDA build: the
    # CPU build of exactly this release is the one the CI machines hold.
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    torch_reqs = [r for r in project["optional-dependencies"]["test"] if r.startswith("torch")]
    assert torch_reqs == ["torch==2.13.0"]
    assert not any(r.startswith("torch") for r in project["dependencies"])
