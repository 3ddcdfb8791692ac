"""``executor="ray"`` on a local Ray started by the test: the bytes of a local pack."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import color_tree
from test_storage import s3  # noqa: F401 - a fixture (endpoint is conftest's)

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_ray_pack_writes_the_bytes_of_a_local_pack(local_ray, tmp_path: Path) -> None:
    from gpurec.pack import pack

    root = color_tree(tmp_path / "img", per_class=8)
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff broken")
    common = dict(resize=40, shards=3, train_ratio=0.75, seed=2)
    local = pack(root, tmp_path / "local" / "ds", workers=1, **common)
    seen = []
    remote = pack(root, tmp_path / "ray" / "ds", executor="ray", progress=seen.append, **common)
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")  # no temporary left
    assert remote.images == local.images == 24 and sum(seen) == 25
    assert remote.skipped == local.skipped and len(remote.skipped) == 1
    # a second run over the first: the same files again, replaced once each
    again = pack(root, tmp_path / "ray" / "ds", executor="ray", **common)
    assert again.images == 24 and _files(tmp_path / "ray") == _files(tmp_path / "local")


def test_ray_pack_from_and_to_a_bucket(local_ray, tmp_path: Path, endpoint, s3) -> None:  # noqa: F811
    """Tasks get the store through ``storage_options`` (no environment on the workers)."""
    from test_storage import BUCKET, keys, upload_tree

    from gpurec.pack import pack

    root = color_tree(tmp_path / "img", per_class=5)
    upload_tree(s3, root, "images")
    common = dict(resize=40, shards=2, seed=1)
    pack(root, tmp_path / "local" / "ds", workers=1, **common)
    options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
    pack(f"s3://{BUCKET}/images", f"s3://{BUCKET}/out/ds", executor="ray",
         storage_options=options, **common)  # fmt: skip
    got = keys(s3, "out/")
    assert {k.removeprefix("out/"): v for k, v in got.items()} == _files(tmp_path / "local")


def test_ray_pack_removes_the_temporary_folders_of_dead_drivers(local_ray, tmp_path: Path) -> None:
    import socket

    from gpurec.pack import pack

    root = color_tree(tmp_path / "img", per_class=3)
    out = tmp_path / "out"
    dead = out / ".gpurec-ray-0123456789ab"  # a driver killed mid-pack, lock not held
    (dead / "attempt").mkdir(parents=True)
    (dead / ".lock").write_text(f"{socket.gethostname()}\n1\n")
    pack(root, out / "ds", executor="ray", resize=30)
    assert not dead.exists() and not list(out.glob(".gpurec-ray-*"))


def test_ray_progress_counts_a_retried_task_once(local_ray) -> None:
    from gpurec.executors import _counter_class

    counter = _counter_class(ray).remote()
    ray.get([counter.add.remote("shard0", "first", 5), counter.add.remote("shard1", "x", 2)])
    assert ray.get(counter.take.remote()) == 7
    ray.get([counter.add.remote("shard0", "retry", 3)])  # the retry redoes the first 5
    assert ray.get(counter.take.remote()) == 0
    ray.get([counter.add.remote("shard0", "retry", 4)])
    assert ray.get(counter.take.remote()) == 2
