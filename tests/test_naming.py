"""Shard names: what a pack writes is what a prefix resolves to, and nothing else.

Stray files beside a pack (a backup copy, a hand-made short name) are not shards of its
prefix: the Pipeline, ``gpurec info``, ``verify`` and ``show`` pass over them. URLs are
resolved by the same rules (tests/test_storage.py, against a real S3 API)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import color_tree, run_gpurec

from gpurec.dataset import resolve_source
from gpurec.naming import (
    ShardName,
    classes_candidates,
    dataset_stem,
    parse_shard,
    select_shards,
    shard_stem,
)

STRAYS = (
    "PFX-00001-of-00002-copy.rec",
    "PFX-1-of-2.rec",
    "PFX-00001-of-2.rec",
    "PFX-00002-of-00002.rec",  # shard 2 of 2 does not exist
    "PFX-00000-of-00002.rec.bak",
    "PFX_train-00000-of-00002.rec",
    "other PFX-00000-of-00002.rec",
)


def test_names_written_are_the_names_parsed() -> None:
    assert shard_stem("ds", "", 0, 1) == "ds"
    assert shard_stem("ds", "val", 0, 1) == "ds_val"
    assert shard_stem("my ds", "train", 3, 64) == "my ds_train-00003-of-00064"
    assert parse_shard("my ds_train-00003-of-00064.rec") == ShardName("my ds_train", 3, 64)
    for name in ("ds.rec", "ds-1-of-2.rec", "ds-00001-of-00002-copy.rec", "ds-00001-of-00002.idx"):
        assert parse_shard(name) is None, name
    assert dataset_stem("ds_train-00000-of-00004.rec") == "ds_train"
    assert dataset_stem("ds-1-of-2.rec") == "ds-1-of-2"
    assert classes_candidates("ds_train-00000-of-00004.rec") == [
        "ds_train.classes.json",
        "ds.classes.json",
    ]
    assert classes_candidates("ds.rec") == ["ds.classes.json"]


def test_select_shards_passes_over_strays_and_names_what_is_missing() -> None:
    for prefix in ("ds", "my ds", "d[s]*"):
        names = [n.replace("PFX", prefix) for n in STRAYS]
        names += [f"{prefix}-00001-of-00002.rec", f"{prefix}-00000-of-00002.rec"]
        assert select_shards(prefix, names, prefix) == [
            f"{prefix}-00000-of-00002.rec",
            f"{prefix}-00001-of-00002.rec",
        ]
        without_1 = names[:-2] + names[-1:]
        with pytest.raises(FileNotFoundError, match=r"shard\(s\) 1 of 2 are missing") as info:
            select_shards(prefix, without_1, prefix)
        assert f"{prefix}-00001-of-00002.rec" in str(info.value)
    with pytest.raises(FileNotFoundError, match=r"no ds\.rec nor shards"):
        select_shards("ds", ["ds-1-of-2.rec", "ds-00000-of-00001-copy.rec"], "ds")
    with pytest.raises(FileNotFoundError, match="side by side"):
        select_shards("ds", ["ds-00000-of-00001.rec", "ds-00000-of-00002.rec"], "ds")


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    """A 2-shard pack whose prefix has a space in it, with stray copies beside it."""
    tmp = tmp_path_factory.mktemp("naming")
    root = color_tree(tmp / "img", per_class=4)
    out = tmp / "out"
    res = run_gpurec("pack", root, out / "my ds", "--resize", "32", "--shards", "2",
                     "--workers", "1")  # fmt: skip
    assert res.returncode == 0, res.stderr
    shard = out / "my ds-00001-of-00002.rec"
    for stray in STRAYS:
        shutil.copy(shard, out / stray.replace("PFX", "my ds"))
    (out / "my ds-1-of-2.idx").write_bytes(b"not an index")
    return out


def test_a_prefix_beside_stray_copies_resolves_to_its_shards(packed: Path) -> None:
    assert resolve_source(packed / "my ds") == [
        packed / "my ds-00000-of-00002.rec",
        packed / "my ds-00001-of-00002.rec",
    ]
    from gpurec import Pipeline

    def labels(source) -> list[float]:
        with Pipeline(source, 4, (3, 16, 16), device="cpu", train=False, shuffle=False) as pipe:
            return np.concatenate([b.label for b in pipe]).tolist()

    shards = [packed / f"my ds-0000{k}-of-00002.rec" for k in range(2)]
    got = labels(str(packed / "my ds"))
    assert got == labels(shards) and sorted(got) == [0.0] * 4 + [1.0] * 4 + [2.0] * 4


def test_info_verify_and_show_pass_over_stray_copies(packed: Path, tmp_path: Path) -> None:
    res = run_gpurec("info", packed / "my ds", "--json")
    assert res.returncode == 0, res.stderr
    import json

    got = json.loads(res.stdout)
    assert got["records"] == 12 and len(got["shards"]) == 2
    assert got["classes"] == ["a", "b", "c"]
    res = run_gpurec("verify", packed / "my ds")
    assert res.returncode == 0, res.stderr
    res = run_gpurec("show", packed / "my ds", "-o", tmp_path / "grid.png", "-n", "4")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_a_missing_shard_is_an_error_naming_it(packed: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(packed, out)
    (out / "my ds-00001-of-00002.rec").unlink()
    with pytest.raises(FileNotFoundError, match=r"shard\(s\) 1 of 2 are missing") as info:
        resolve_source(out / "my ds")
    assert "my ds-00001-of-00002.rec" in str(info.value)
    res = run_gpurec("info", out / "my ds")
    assert res.returncode != 0
    assert "my ds-00001-of-00002.rec" in res.stderr and "Traceback" not in res.stderr
