"""Object storage against a real S3 API server (moto in server mode, on 127.0.0.1):
packing from and to a bucket, and the Pipeline's local shard cache."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from helpers import color_tree, empty_bucket, run_gpurec

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

BUCKET = "gpurec-test"


@pytest.fixture
def s3(s3_client):
    """A fresh bucket on the module's moto server."""
    s3_client.create_bucket(Bucket=BUCKET)
    yield s3_client
    empty_bucket(s3_client, BUCKET)
    s3_client.delete_bucket(Bucket=BUCKET)


def keys(client, prefix: str = "") -> dict[str, bytes]:
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = client.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read()
    return out


def upload_tree(client, root: Path, prefix: str) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            rel = path.relative_to(root).as_posix()
            client.put_object(Bucket=BUCKET, Key=f"{prefix}/{rel}", Body=path.read_bytes())


def test_pack_from_and_to_a_bucket_gives_the_bytes_of_a_local_pack(s3, tmp_path: Path) -> None:
    root = color_tree(tmp_path / "img", per_class=6)
    (root / "b" / "broken.jpg").write_bytes(b"not an image")
    upload_tree(s3, root, "images")
    common = ["--resize", "40", "--shards", "2", "--train-ratio", "0.75", "--workers", "2"]
    local = run_gpurec("pack", root, tmp_path / "local" / "ds", *common)
    assert local.returncode == 0, local.stderr
    remote = run_gpurec(
        "pack", f"s3://{BUCKET}/images", f"s3://{BUCKET}/out/ds", *common,
        "--storage-option", "default_block_size=5242880",
    )  # fmt: skip
    assert remote.returncode == 0, remote.stderr
    assert "skipped 1" in remote.stdout
    got = keys(s3, "out/")
    want = sorted(p.name for p in (tmp_path / "local").iterdir())
    assert sorted(k.removeprefix("out/") for k in got) == want  # nothing temporary left
    for name in want:
        assert got[f"out/{name}"] == (tmp_path / "local" / name).read_bytes(), name
    # a local pack from the bucket, and a pack of the local tree into the bucket: same bytes
    mixed = run_gpurec("pack", f"s3://{BUCKET}/images", tmp_path / "mixed" / "ds", *common)
    assert mixed.returncode == 0, mixed.stderr
    for name in want:
        assert (tmp_path / "mixed" / name).read_bytes() == got[f"out/{name}"], name


def test_a_pack_that_fails_leaves_no_shard_in_the_bucket(s3, tmp_path: Path) -> None:
    root = color_tree(tmp_path / "img", per_class=40)
    upload_tree(s3, root, "images")
    args = [
        sys.executable, "-m", "gpurec", "pack", f"s3://{BUCKET}/images", f"s3://{BUCKET}/out/ds",
        "--resize", "100", "--workers", "1", "--quality", "100",
    ]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stage = None
    deadline = time.monotonic() + 60
    while stage is None and time.monotonic() < deadline:  # the shard is being written locally
        found = list(Path(os.environ.get("TMPDIR", "/tmp")).glob("gpurec-stage-*/ds.rec.tmp"))
        stage = found[0] if found else None
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert keys(s3, "out/") == {}
    assert not stage.parent.exists()  # the staging folder is removed too


def test_storage_options_parse() -> None:
    from gpurec.storage import parse_storage_options

    got = parse_storage_options(
        ["anon=true", "client_kwargs.endpoint_url=http://127.0.0.1:9000", "max_concurrency=8"]
    )
    assert got == {
        "anon": True,
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"},
        "max_concurrency": 8,
    }
    with pytest.raises(ValueError, match="key=value"):
        parse_storage_options(["anon"])


# ------------------------------------------------------------------------ the shard cache


def _packed(tmp_path: Path, s3, shards: int = 3) -> Path:
    root = color_tree(tmp_path / "img", per_class=8)
    from gpurec.pack import pack

    pack(root, tmp_path / "local" / "ds", resize=32, shards=shards, workers=1)
    for path in sorted((tmp_path / "local").iterdir()):
        s3.put_object(Bucket=BUCKET, Key=f"data/{path.name}", Body=path.read_bytes())
    return tmp_path / "local"


def test_pipeline_reads_s3_through_the_cache_and_a_second_open_fetches_nothing(
    s3, tmp_path: Path
) -> None:
    from gpurec import Pipeline
    from gpurec.cache import ShardCache

    local = _packed(tmp_path, s3)
    cache_dir = tmp_path / "cache"
    kw = dict(device="cpu", backend="cpu", train=False, seed=3, num_shards=1, shard_id=0)
    remote = Pipeline(f"s3://{BUCKET}/data/ds", 8, (3, 24, 24), cache_dir=cache_dir, **kw)
    plain = Pipeline(str(local / "ds"), 8, (3, 24, 24), **kw)
    for a, b in zip(remote, plain, strict=True):
        np.testing.assert_array_equal(a.data, b.data)
        np.testing.assert_array_equal(a.label, b.label)
    cached = sorted(p.name for p in cache_dir.rglob("*.rec"))
    assert cached == [f"ds-0000{k}-of-00003.rec" for k in range(3)]
    for rec in cache_dir.rglob("*.rec"):
        assert rec.read_bytes() == (local / rec.name).read_bytes()
        assert (
            rec.with_suffix(".idx").read_bytes()
            == (local / rec.with_suffix(".idx").name).read_bytes()
        )
    assert list(cache_dir.rglob("ds.classes.json"))  # beside the shards, for `show`
    again = ShardCache(cache_dir)
    paths = again.fetch(f"s3://{BUCKET}/data/ds")
    assert again.fetched == [] and len(again.reused) == 7  # 3 x (.rec, .idx) + classes
    assert [p.name for p in paths] == cached


def test_imagerecorditer_reads_s3_through_the_cache(s3, tmp_path: Path, monkeypatch) -> None:
    """``mx.io.ImageRecordIter(path_imgrec="s3://...")``: the issue's MXNet spelling of
    training from a bucket, through the same cache ($GPUREC_CACHE), with the local
    file's batches."""
    import gpurec.mxnet as mx

    local = _packed(tmp_path, s3, shards=1)
    monkeypatch.setenv("GPUREC_CACHE", str(tmp_path / "cache"))
    kw = dict(data_shape=(3, 24, 24), batch_size=8, resize=28, rand_crop=True, shuffle=True,
              seed=3, verbose=False)  # fmt: skip
    url = f"s3://{BUCKET}/data/ds.rec"
    remote = mx.io.ImageRecordIter(path_imgrec=url, path_imgidx=url[:-4] + ".idx", **kw)
    plain = mx.io.ImageRecordIter(path_imgrec=str(local / "ds.rec"), **kw)
    for a, b in zip(remote, plain, strict=True):
        np.testing.assert_array_equal(a.data[0].asnumpy(), b.data[0].asnumpy())
        np.testing.assert_array_equal(a.label[0].asnumpy(), b.label[0].asnumpy())
    assert [p.name for p in (tmp_path / "cache").rglob("*.rec")] == ["ds.rec"]
    with pytest.raises(ValueError, match=r"path_imgidx s3://.*other\.idx is not"):
        mx.io.ImageRecordIter(path_imgrec=url, path_imgidx=f"s3://{BUCKET}/other.idx", **kw)


def test_a_pipeline_on_s3_fetches_its_idx_files_then_its_own_first_shard_first(
    s3, tmp_path: Path
) -> None:
    from gpurec import Pipeline

    local = _packed(tmp_path, s3)  # 24 records, 8 per shard
    cache_dir = tmp_path / "cache"
    kw = dict(device="cpu", backend="cpu", train=False, shuffle=False, num_shards=2, shard_id=1)
    remote = Pipeline(f"s3://{BUCKET}/data/ds", 4, (3, 24, 24), cache_dir=cache_dir, **kw)
    names = [f"ds-0000{k}-of-00003" for k in range(3)]
    assert sorted(p.name for p in cache_dir.rglob("*.idx")) == [f"{n}.idx" for n in names]
    assert list(cache_dir.rglob("ds.classes.json"))
    assert not list(cache_dir.rglob("*.rec"))  # nothing fetched before the first iter()
    plain = Pipeline(str(local / "ds"), 4, (3, 24, 24), **kw)
    got, want = list(remote), list(plain)
    assert len(got) == len(want) == 3
    np.testing.assert_array_equal(got[0].data, want[0].data)  # the first batch...
    for a, b in zip(got, want, strict=True):  # ...and the rest of the epoch
        np.testing.assert_array_equal(a.data, b.data)
        np.testing.assert_array_equal(a.label, b.label)
        np.testing.assert_array_equal(a.index, b.index)
    # rank 1 reads records 12..23: shard 1, then shard 2; shard 0 is not this rank's
    cache = remote.dataset.fetcher.cache
    assert cache.started == [f"s3://{BUCKET}/data/{n}.rec" for n in names[1:]]
    assert sorted(p.name for p in cache_dir.rglob("*.rec")) == [f"{n}.rec" for n in names[1:]]
    remote.close()
    plain.close()


def test_a_url_prefix_beside_stray_copies_and_with_spaces_resolves_to_its_shards(
    s3, tmp_path: Path
) -> None:
    """The rules of tests/test_naming.py for URLs: a backup copy or a short name beside
    the shards is passed over, a space is a character like any other, a missing shard
    is named."""
    from gpurec import Pipeline
    from gpurec.cache import ShardCache

    root = color_tree(tmp_path / "img", per_class=4)
    from gpurec.pack import pack

    pack(root, tmp_path / "local" / "my ds", resize=32, shards=2, workers=1)
    local = tmp_path / "local"
    shard = (local / "my ds-00001-of-00002.rec").read_bytes()
    for path in sorted(local.iterdir()):
        s3.put_object(Bucket=BUCKET, Key=f"sp/{path.name}", Body=path.read_bytes())
    for stray in ("my ds-00001-of-00002-copy.rec", "my ds-1-of-2.rec", "my ds-00002-of-00002.rec",
                  "my ds-00000-of-2.rec", "my ds_train-00000-of-00002.rec"):  # fmt: skip
        s3.put_object(Bucket=BUCKET, Key=f"sp/{stray}", Body=shard)
    cache = ShardCache(tmp_path / "cache")
    url = f"s3://{BUCKET}/sp/my ds"
    got = cache.resolve(url)
    assert [[f.url for f in files] for files in got] == [
        [f"s3://{BUCKET}/sp/my ds-0000{k}-of-00002.{ext}" for ext in ("rec", "idx")]
        + ([f"s3://{BUCKET}/sp/my ds.classes.json"] if k == 0 else [])
        for k in range(2)
    ]
    kw = dict(device="cpu", backend="cpu", train=False, shuffle=False)
    with Pipeline(url, 4, (3, 16, 16), cache_dir=tmp_path / "cache", **kw) as remote:
        got_labels = np.concatenate([b.label for b in remote]).tolist()
    with Pipeline(str(local / "my ds"), 4, (3, 16, 16), **kw) as plain:
        assert got_labels == np.concatenate([b.label for b in plain]).tolist()
    assert len(got_labels) == 12
    s3.delete_object(Bucket=BUCKET, Key="sp/my ds-00001-of-00002.rec")
    with pytest.raises(FileNotFoundError, match=r"shard\(s\) 1 of 2 are missing") as info:
        cache.resolve(url)
    assert "my ds-00001-of-00002.rec" in str(info.value)


@pytest.mark.parametrize("backend", ["cpu", "dali"])
def test_an_epoch_from_s3_equals_the_local_one(s3, tmp_path: Path, backend: str) -> None:
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    from gpurec import Pipeline

    local = _packed(tmp_path, s3)
    kw = dict(device="cpu", backend=backend, train=False, shuffle=True, seed=5,
              last_batch="pad")  # fmt: skip
    remote = Pipeline(f"s3://{BUCKET}/data/ds", 5, (3, 24, 24), cache_dir=tmp_path / "c", **kw)
    plain = Pipeline(str(local / "ds"), 5, (3, 24, 24), **kw)
    got, want = list(remote), list(plain)  # the global shuffle: every batch, many shards
    assert len(got) == len(want) == 5
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a.data, b.data)
        np.testing.assert_array_equal(a.label, b.label)
        np.testing.assert_array_equal(a.index, b.index)
        assert a.pad == b.pad
    assert sorted(remote.dataset.fetcher.cache.started) == sorted(
        f"s3://{BUCKET}/data/ds-0000{k}-of-00003.rec" for k in range(3)
    )
    remote.close()
    plain.close()


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_a_shard_deleted_after_the_pipeline_is_made_is_named_when_read(
    s3, tmp_path: Path, on_error: str
) -> None:
    from gpurec import Pipeline

    _packed(tmp_path, s3)
    url = f"s3://{BUCKET}/data/ds-00000-of-00003.rec"
    pipe = Pipeline(f"s3://{BUCKET}/data/ds", 8, (3, 24, 24), device="cpu", backend="cpu",
                    train=False, on_error=on_error, cache_dir=tmp_path / "cache")  # fmt: skip
    s3.delete_object(Bucket=BUCKET, Key="data/ds-00000-of-00003.rec")
    with pytest.raises(OSError, match=f"cannot fetch shard {url}"):
        next(iter(pipe))  # not a bad record to skip: the shard is not there
    assert pipe.skipped == 0
    pipe.close()


def test_an_insightface_file_at_a_url_is_told_by_a_ranged_read(
    memory_bucket, tmp_path: Path
) -> None:
    from test_layouts import insightface_file

    from gpurec import Pipeline

    fs, base = memory_bucket
    rec = insightface_file(tmp_path / "face", multi_label=True)
    for f in (rec, rec.with_suffix(".idx")):
        fs.put_file(str(f), f"{base}/{f.name}")
    cache_dir = tmp_path / "cache"
    pipe = Pipeline(f"memory://{base}/face", 6, (3, 16, 16), device="cpu", backend="cpu",
                    train=False, cache_dir=cache_dir)  # fmt: skip
    assert not list(cache_dir.rglob("*.rec"))
    (shard,) = pipe.dataset.shards
    assert shard.layout == "insightface" and shard.keys.tolist() == [1, 2, 3, 4, 5, 6]
    assert pipe.label_width == 1  # the first label, as read() gives it, from the store
    (batch,) = list(pipe)
    assert batch.label.tolist() == [0, 0, 1, 1, 2, 2]
    np.testing.assert_allclose(batch.data.mean(axis=(1, 2, 3)), 20 + 100 * batch.label, atol=2)
    pipe.close()


def test_a_shard_whose_bytes_disagree_with_its_idx_is_refused_naming_its_url(
    memory_bucket, tmp_path: Path
) -> None:
    from test_layouts import insightface_file

    from gpurec import Pipeline
    from gpurec.recordio import read_idx, write_idx

    fs, base = memory_bucket
    rec = insightface_file(tmp_path / "face")
    keys, offsets = read_idx(rec.with_suffix(".idx"))
    write_idx(rec.with_suffix(".idx"), keys[1:], offsets[1:])  # no header: identities listed
    for f in (rec, rec.with_suffix(".idx")):
        fs.put_file(str(f), f"{base}/{f.name}")
    kw = dict(device="cpu", backend="cpu", train=False, shuffle=False)
    with Pipeline(rec, 3, (3, 16, 16), **kw) as plain:  # header-only identities left out
        assert len(plain.dataset) == 6
    pipe = Pipeline(f"memory://{base}/face", 3, (3, 16, 16), cache_dir=tmp_path / "c", **kw)
    assert len(pipe.dataset) == 9  # from the .idx alone
    with pytest.raises(ValueError, match=f"shard memory://{base}/face.rec.* holds 6 samples"):
        next(iter(pipe))
    pipe.close()


@pytest.mark.parametrize("cut", [4, 40], ids=["in-frame-header", "inside-the-record"])
def test_a_remote_shard_cut_short_loads_as_the_local_file_does(
    memory_bucket, tmp_path: Path, cut: int
) -> None:
    """Opened before its bytes are here, a shard cut in its last record is found cut (by
    ranged reads of that record's frames): "skip" loads the intact records, as for the
    local file, "raise" names the URL."""
    from helpers import numbered_shards

    from gpurec import Pipeline
    from gpurec.recordio import RecordIOError, read_idx

    fs, base = memory_bucket
    (rec,) = numbered_shards(tmp_path / "l", counts=(9,))
    _, offsets = read_idx(rec.with_suffix(".idx"))
    rec.write_bytes(rec.read_bytes()[: int(offsets[-1]) + cut])
    for f in (rec, rec.with_suffix(".idx")):
        fs.put_file(str(f), f"{base}/{f.name}")
    url = f"memory://{base}/{rec.stem}"
    kw = dict(device="cpu", backend="cpu", train=False, shuffle=False, last_batch="partial")
    with Pipeline(rec, 4, (3, 16, 16), on_error="skip", **kw) as local:
        want = [b.label.tolist() for b in local]
        assert local.skipped == 1 and len(local.dataset) == 8
    with Pipeline(url, 4, (3, 16, 16), on_error="skip", cache_dir=tmp_path / "c", **kw) as pipe:
        assert not list((tmp_path / "c").rglob("*.rec"))  # found cut from the store
        assert (len(pipe.dataset), pipe.skipped) == (8, 1)
        assert [b.label.tolist() for b in pipe] == want
    with pytest.raises(RecordIOError, match=f"memory://{base}/{rec.name}: at byte"):
        Pipeline(url, 4, (3, 16, 16), on_error="raise", cache_dir=tmp_path / "c2", **kw)


def test_a_shard_changed_remotely_is_fetched_again(s3, tmp_path: Path) -> None:
    from gpurec.cache import ShardCache

    local = _packed(tmp_path, s3, shards=2)
    cache_dir = tmp_path / "cache"
    ShardCache(cache_dir).fetch(f"s3://{BUCKET}/data/ds")
    name = "ds-00001-of-00002.rec"
    data = bytearray((local / name).read_bytes())
    data[-8:] = b"\x01" * 8  # same size, other bytes: only the ETag tells
    s3.put_object(Bucket=BUCKET, Key=f"data/{name}", Body=bytes(data))
    cache = ShardCache(cache_dir)
    paths = cache.fetch(f"s3://{BUCKET}/data/ds")
    assert cache.fetched == [f"s3://{BUCKET}/data/{name}"]
    assert paths[1].read_bytes() == bytes(data)


def test_an_interrupted_fetch_leaves_no_shard_under_its_final_name(s3, tmp_path: Path) -> None:
    big = os.urandom(1 << 20) * 96  # 96 MiB: long enough to be caught mid-way
    s3.put_object(Bucket=BUCKET, Key="big/ds.rec", Body=big)
    cache_dir = tmp_path / "cache"
    code = (
        "import sys; from gpurec.dataset import resolve_source; "
        "resolve_source(sys.argv[1], cache_dir=sys.argv[2])"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, f"s3://{BUCKET}/big/ds", str(cache_dir)])
    deadline = time.monotonic() + 60
    while not list(cache_dir.rglob("*.part")) and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert list(cache_dir.rglob("*.part")), "the fetch ended before it could be interrupted"
    assert not list(cache_dir.rglob("ds.rec")) and not list(cache_dir.rglob("*.meta.json"))
    from gpurec.cache import ShardCache

    cache = ShardCache(cache_dir)
    (path,) = cache.fetch(f"s3://{BUCKET}/big/ds")
    assert cache.fetched == [f"s3://{BUCKET}/big/ds.rec"]
    assert path.stat().st_size == len(big) and path.read_bytes() == big


def test_ranks_share_the_cache_and_lru_eviction_keeps_it_under_the_limit(
    s3, tmp_path: Path
) -> None:
    from gpurec.cache import ShardCache, release_shards

    _packed(tmp_path, s3, shards=3)
    cache_dir = tmp_path / "cache"
    caches = [ShardCache(cache_dir) for _ in range(4)]  # four ranks of one node, at once
    threads = [threading.Thread(target=c.fetch, args=(f"s3://{BUCKET}/data/ds",)) for c in caches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    fetched = [url for c in caches for url in c.fetched]
    assert sorted(fetched) == sorted(set(fetched)) and len(fetched) == 7  # each file once
    # a second dataset with a limit that holds only it: the first one's shards go once
    # the ranks that use them are done (here: this process lets them go)
    limited = ShardCache(cache_dir, cache_limit=1)
    limited.evict()
    assert len(limited.entries()) == 3  # in use: never evicted
    release_shards()
    s3.put_object(Bucket=BUCKET, Key="other/x.rec", Body=os.urandom(5000))
    s3.put_object(Bucket=BUCKET, Key="other/x.idx", Body=b"0\t0\n")
    limited = ShardCache(cache_dir, cache_limit=6000)
    (x,) = limited.fetch(f"s3://{BUCKET}/other/x")
    assert x.is_file()
    assert [rec.name for _, _, rec in limited.entries()] == ["x.rec"]
    assert sum(size for size, _ in [(s, r) for _, s, r in limited.entries()]) <= 6000


# ------------------------------------------- the cache and writers, on fsspec's memory://


@pytest.fixture
def memory_bucket(tmp_path: Path):
    """A folder of fsspec's (process-wide) memory filesystem, removed afterwards; the
    shards this test fetched are released for eviction."""
    import fsspec

    from gpurec.cache import release_shards

    fs = fsspec.filesystem("memory")
    base = f"/{tmp_path.name}"
    yield fs, base
    release_shards()
    if fs.exists(base):
        fs.rm(base, recursive=True)


def test_an_evicted_shard_without_idx_leaves_no_cached_scan(memory_bucket, tmp_path) -> None:
    """A shard without `.idx` is scanned once fetched, and the scan cached beside it in
    the cache; evicting the shard removes that too."""
    from helpers import numbered_shards

    from gpurec.cache import ShardCache, release_shards
    from gpurec.dataset import open_source

    fs, base = memory_bucket
    (rec,) = numbered_shards(tmp_path / "src", counts=(6,))
    fs.put_file(str(rec), f"{base}/plain/{rec.name}")  # no .idx in the store
    ds = open_source(f"memory://{base}/plain/{rec.stem}", cache_dir=tmp_path / "cache")
    assert len(ds) == 6
    ds.close()
    (local,) = (tmp_path / "cache").rglob(rec.name)
    scan = local.with_name(local.name + ".gpurec-index.npz")
    assert scan.is_file()
    release_shards()
    assert ShardCache(tmp_path / "cache", cache_limit=1).evict() == [local]
    assert not local.exists() and not scan.exists()


def test_several_urls_are_all_fetched_before_the_cache_is_trimmed(
    memory_bucket, tmp_path: Path
) -> None:
    from helpers import numbered_shards

    from gpurec.dataset import resolve_source

    fs, base = memory_bucket
    for name in ("a", "b"):
        for p in numbered_shards(tmp_path / name, counts=(7, 5)):
            for f in (p, p.with_suffix(".idx")):
                fs.put_file(str(f), f"{base}/{name}/{f.name}")
    urls = [f"memory://{base}/a/n", f"memory://{base}/b/n"]
    recs = resolve_source(urls, cache_dir=tmp_path / "cache", cache_limit=1000)
    assert len(recs) == 4 and all(r.is_file() and r.with_suffix(".idx").is_file() for r in recs)
    from gpurec.dataset import Dataset

    assert len(Dataset(recs)) == 24


def test_a_shard_in_use_by_a_process_is_not_evicted_by_another(
    memory_bucket, tmp_path: Path
) -> None:
    from helpers import numbered_shards

    from gpurec.cache import ShardCache

    fs, base = memory_bucket
    for p in numbered_shards(tmp_path / "a", counts=(7, 5)):
        fs.put_file(str(p), f"{base}/a/{p.name}")
    cache_dir = tmp_path / "cache"
    recs = ShardCache(cache_dir).fetch(f"memory://{base}/a/n")  # this process uses them
    code = (
        "import sys; from gpurec.cache import ShardCache\n"
        "print(len(ShardCache(sys.argv[1], cache_limit=1).evict()))\n"
    )
    run = [sys.executable, "-c", code, str(cache_dir)]
    res = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert res.stdout.strip() == "0", res.stderr  # another rank trims the cache: kept
    assert all(r.is_file() for r in recs)
    from gpurec.cache import release_shards

    release_shards(recs)
    res = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert res.stdout.strip() == "2", res.stderr
    assert not any(r.exists() for r in recs)


def test_a_cached_idx_the_store_no_longer_has_is_removed(memory_bucket, tmp_path: Path) -> None:
    from helpers import write_records

    from gpurec.cache import ShardCache

    fs, base = memory_bucket
    flat = [np.full((20, 20, 3), i, np.uint8) for i in range(8)]
    old = write_records(tmp_path / "old.rec", flat, [float(i) for i in range(8)])
    sized = [np.full((20 + i, 30, 3), i, np.uint8) for i in range(8)]
    new = write_records(tmp_path / "new.rec", sized, [100.0 + i for i in range(8)])
    fs.put_file(str(old), f"{base}/ds.rec")
    fs.put_file(str(old.with_suffix(".idx")), f"{base}/ds.idx")
    cache = ShardCache(tmp_path / "cache")
    (rec,) = cache.fetch(f"memory://{base}/ds")
    assert rec.with_suffix(".idx").is_file()
    fs.put_file(str(new), f"{base}/ds.rec")  # re-packed; its .idx not (yet) there
    fs.rm_file(f"{base}/ds.idx")
    (rec,) = cache.fetch(f"memory://{base}/ds")
    assert rec.read_bytes() == new.read_bytes()
    assert not rec.with_suffix(".idx").exists()
    assert not (rec.parent / "ds.idx.meta.json").exists()
    from gpurec import Pipeline

    pipe = Pipeline([rec], 8, (3, 16, 16), device="cpu", shuffle=False, train=False)
    assert next(iter(pipe)).label.tolist() == [100.0 + i for i in range(8)]
    pipe.close()


def _recording_fs(name: str, fail: str | None = None, delay: float = 0.0):
    """A memory filesystem under protocol ``name`` whose `.rec` uploads take ``delay`` s,
    fail for a path containing ``fail``, and record how many finished `.rec` files sit in
    the staging folder at each upload."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    class Recording(MemoryFileSystem):
        protocol = (name,)
        store: ClassVar[dict] = {}
        pseudo_dirs: ClassVar[list[str]] = [""]
        staged: ClassVar[list[int]] = []

        def put_file(self, lpath, rpath, *args, **kwargs):
            Recording.staged.append(len(list(Path(lpath).parent.glob("*.rec"))))
            if fail is not None and fail in rpath:
                raise OSError("simulated upload failure")
            if ".rec" in rpath:
                time.sleep(delay)
            return super().put_file(lpath, rpath, *args, **kwargs)

    fsspec.register_implementation(name, Recording, clobber=True)
    return Recording


def test_a_pack_faster_than_its_uploads_stages_only_a_few_shards(tmp_path: Path) -> None:
    from gpurec.pack import pack

    root = color_tree(tmp_path / "img", per_class=6)
    fs = _recording_fs("slowupload", delay=0.6)
    pack(root, "slowupload://bucket/out/ds", resize=30, shards=6, workers=1)
    assert len([k for k in fs.store if k.endswith(".rec")]) == 6
    assert max(fs.staged) <= 3, fs.staged  # 2 queued or uploading (+1 being written)


def test_after_a_failed_upload_nothing_more_is_uploaded(tmp_path: Path) -> None:
    from gpurec.pack import pack

    root = color_tree(tmp_path / "img", per_class=6)
    fs = _recording_fs("flakyupload", fail="ds-00000-of-00004.rec")
    with pytest.raises(OSError, match="simulated upload failure"):
        pack(root, "flakyupload://bucket/out/ds", resize=30, shards=4, workers=1)
    assert fs.store == {}


def test_a_malformed_storage_option_is_not_echoed() -> None:
    from gpurec.storage import parse_storage_options

    for item in ("s3cr3t-value", "=s3cr3t-value"):
        with pytest.raises(ValueError) as info:
            parse_storage_options(["anon=true", item])
        assert "s3cr3t" not in str(info.value) and "#2" in str(info.value)


# ------------------------------------------------- background fetches: failures, close, fork

# A memory filesystem whose `.rec` downloads are slow and can fail (a store's transient
# errors), registered as "slowmem" in this process and in the subprocesses below.
SLOWMEM = """
import time
import fsspec
from fsspec.implementations.memory import MemoryFileSystem


class SlowMemory(MemoryFileSystem):
    protocol = "slowmem"
    delay = 0.0
    fail_next = 0
    streamed = False  # write half the file, then wait: a .part exists meanwhile
    gate = None  # a threading.Event: downloads after the first `free` wait until it is set
    free = 0
    started = 0  # downloads begun

    @classmethod
    def _strip_protocol(cls, path):
        return MemoryFileSystem._strip_protocol(path.removeprefix("slowmem://"))

    def get_file(self, rpath, lpath, *args, **kwargs):
        if rpath.endswith(".rec"):
            if SlowMemory.fail_next > 0:
                SlowMemory.fail_next -= 1
                raise OSError("transient network error")
            SlowMemory.started += 1
            if SlowMemory.gate is not None and SlowMemory.started > SlowMemory.free:
                SlowMemory.gate.wait(60)
            if SlowMemory.streamed:
                data = self.cat_file(rpath)
                with open(lpath, "wb") as f:
                    f.write(data[: len(data) // 2])
                    f.flush()
                    time.sleep(SlowMemory.delay)
                    f.write(data[len(data) // 2 :])
                return None
            time.sleep(SlowMemory.delay)
        return super().get_file(rpath, lpath, *args, **kwargs)


fsspec.register_implementation("slowmem", SlowMemory, clobber=True)
"""
_slowmem: dict = {}
exec(SLOWMEM, _slowmem)
SlowMemory = _slowmem["SlowMemory"]


def _pack_to_slowmem(tmp_path: Path, shards: int) -> tuple[str, Path]:
    """A dataset packed locally and copied to the slowmem filesystem: (its URL, local dir)."""
    import fsspec

    from gpurec.pack import pack

    root = color_tree(tmp_path / "img", per_class=8)
    pack(root, tmp_path / "local" / "ds", resize=32, shards=shards, workers=1)
    fs = fsspec.filesystem("slowmem")
    for path in sorted((tmp_path / "local").iterdir()):
        fs.put_file(str(path), f"/{tmp_path.name}/{path.name}")
    return f"slowmem:///{tmp_path.name}/ds", tmp_path / "local"


def _reset_slowmem() -> None:
    if SlowMemory.gate is not None:
        SlowMemory.gate.set()  # nothing stays blocked past its test
    SlowMemory.delay, SlowMemory.fail_next, SlowMemory.streamed = 0.0, 0, False
    SlowMemory.gate, SlowMemory.free, SlowMemory.started = None, 0, 0


@pytest.fixture
def slow_bucket(tmp_path: Path):
    """(URL, local dir) of 3 shards of 8 records on the slowmem filesystem."""
    import fsspec

    from gpurec.cache import release_shards

    _reset_slowmem()
    yield _pack_to_slowmem(tmp_path, 3)
    _reset_slowmem()
    release_shards()
    fsspec.filesystem("slowmem").rm(f"/{tmp_path.name}", recursive=True)


def _fetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("gpurec-fetch")]


def test_a_transient_fetch_error_is_retried_and_a_failed_fetch_is_tried_again_later(
    slow_bucket, tmp_path: Path, monkeypatch
) -> None:
    from gpurec.cache import ShardFetcher
    from gpurec.dataset import Dataset, open_source

    url, local = slow_bucket
    monkeypatch.setattr(ShardFetcher, "RETRY_DELAYS", (0.01,))  # two tries
    plain = Dataset([local / f"ds-0000{k}-of-00003.rec" for k in range(3)])
    ds = open_source(url, cache_dir=tmp_path / "c")
    SlowMemory.fail_next = 1  # one error: the second try fetches the shard
    assert ds.read(0) == plain.read(0)
    SlowMemory.fail_next = 2  # both tries of shard 1 fail...
    with pytest.raises(OSError, match=r"cannot fetch shard slowmem:.*00001-of-00003\.rec") as one:
        ds.read(8)
    SlowMemory.fail_next = 2
    with pytest.raises(OSError, match="transient network error") as two:
        ds.read(8)  # ...asked for again, and failing again
    assert one.value is not two.value
    assert ds.read(8) == plain.read(8)  # ...and fetched when the store answers
    assert [ds.read(i) for i in range(len(ds))] == [plain.read(i) for i in range(len(plain))]
    ds.close()
    plain.close()


def test_fetch_threads_end_when_idle_and_a_dataset_dropped_unclosed_stops_fetching(
    slow_bucket, tmp_path: Path
) -> None:
    import gc

    from gpurec.dataset import open_source

    url, _ = slow_bucket
    before = set(_fetch_threads())
    ds = open_source(url, cache_dir=tmp_path / "c")
    ds.read(0)
    deadline = time.monotonic() + 30
    while set(_fetch_threads()) - before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not set(_fetch_threads()) - before  # nothing queued: no thread waits
    ds.prefetch(np.arange(len(ds)))
    fetcher = ds.fetcher
    del ds
    gc.collect()
    assert fetcher._closed  # the dataset's finalizer closed its fetcher
    deadline = time.monotonic() + 30
    while set(_fetch_threads()) - before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not set(_fetch_threads()) - before


def test_closing_a_dataset_wakes_a_read_waiting_for_its_shard_and_reads_after_raise(
    slow_bucket, tmp_path: Path
) -> None:
    from gpurec.dataset import open_source

    url, _ = slow_bucket
    SlowMemory.gate = threading.Event()  # the download of shard 0 waits until it is set
    before = set(_fetch_threads())
    ds = open_source(url, cache_dir=tmp_path / "c")
    got: dict[str, object] = {}

    def read() -> None:
        try:
            got["read"] = ds.read(0)
        except Exception as exc:
            got["read"] = exc

    reader = threading.Thread(target=read)
    reader.start()
    deadline = time.monotonic() + 30
    while not SlowMemory.started and time.monotonic() < deadline:
        time.sleep(0.005)
    assert SlowMemory.started  # the read waits for shard 0, being fetched
    fetching = set(_fetch_threads()) - before
    ds.close()
    reader.join(30)
    assert not reader.is_alive()
    assert any(thread.is_alive() for thread in fetching)  # woken before the download ended
    assert isinstance(got["read"], OSError) and "closed before it was fetched" in str(got["read"])
    SlowMemory.gate.set()  # the download finishes in its thread: the shard is not opened
    for thread in fetching:
        thread.join(30)
    assert not any(thread.is_alive() for thread in fetching)
    with pytest.raises((OSError, ValueError), match="closed"):
        ds.read(0)
    assert ds.shards[0].reader._reader is None


def test_pipeline_close_does_not_wait_for_the_downloads_under_way(tmp_path: Path) -> None:
    import fsspec

    from gpurec import Pipeline
    from gpurec.cache import release_shards

    url, _ = _pack_to_slowmem(tmp_path, 6)  # more shards than fetched at a time (4)
    SlowMemory.gate, SlowMemory.free = threading.Event(), 4  # shards 5 and 6 never arrive
    try:
        pipe = Pipeline(url, 4, (3, 24, 24), device="cpu", backend="cpu", train=False,
                        shuffle=True, seed=1, num_threads=2, cache_dir=tmp_path / "c")  # fmt: skip
        it = iter(pipe)
        next(it)  # the first 4 shards here, reads of the other 2 waiting for them
        del it
        closing = threading.Thread(target=pipe.close)
        closing.start()
        closing.join(30)
        assert not closing.is_alive()  # closed while 2 downloads are still held back
    finally:
        _reset_slowmem()
        release_shards()
        fsspec.filesystem("slowmem").rm(f"/{tmp_path.name}", recursive=True)


def test_stale_part_files_are_removed_by_the_next_fetch(slow_bucket, tmp_path: Path) -> None:
    from gpurec.cache import ShardCache
    from gpurec.dataset import open_source

    url, _ = slow_bucket
    cache = ShardCache(tmp_path / "c")
    rec = cache.local(cache.resolve(url)[0][0])
    rec.parent.mkdir(parents=True, exist_ok=True)
    stale = rec.with_name(f"{rec.name}.part")  # a process killed mid-fetch
    stale.write_bytes(b"half a shard")
    ds = open_source(url, cache_dir=tmp_path / "c")
    ds.read(0)
    assert not stale.exists() and rec.exists()
    ds.close()


def _run_slowmem_script(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from test_storage import SlowMemory, _pack_to_slowmem
        tmp_path = Path({str(tmp_path)!r})
    """) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=90)  # fmt: skip


def test_a_process_exiting_mid_fetch_leaves_no_part_files(tmp_path: Path) -> None:
    res = _run_slowmem_script(
        tmp_path,
        """
        import time
        import numpy as np
        from gpurec.dataset import open_source
        url, _ = _pack_to_slowmem(tmp_path, 3)
        SlowMemory.delay, SlowMemory.streamed = 10.0, True
        ds = open_source(url, cache_dir=tmp_path / "c")
        ds.prefetch(np.arange(len(ds)))
        deadline = time.monotonic() + 8  # the downloads take 10 s
        while len(list((tmp_path / "c").rglob("*.part"))) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        print(len(list((tmp_path / "c").rglob("*.part"))), flush=True)
        sys.exit(1)  # e.g. an exception in the training loop
    """,
    )
    assert res.stdout.strip() == "3", res.stderr  # three downloads were under way...
    assert not list((tmp_path / "c").rglob("*.part"))  # ...and left nothing


def test_a_forked_child_fetches_on_its_own_what_its_parent_was_fetching(tmp_path: Path) -> None:
    """A DataLoader-style fork while the parent's threads fetch a shard and a read waits
    for it: the child has neither, and must fetch and read every record itself."""
    res = _run_slowmem_script(
        tmp_path,
        """
        import multiprocessing, threading, time
        from gpurec.dataset import Dataset, open_source
        url, local = _pack_to_slowmem(tmp_path, 3)
        SlowMemory.delay = 1.5
        ds = open_source(url, cache_dir=tmp_path / "c")
        threading.Thread(target=ds.read, args=(0,), daemon=True).start()
        time.sleep(0.3)  # shard 0 being fetched, the read waiting for it
        plain = Dataset([local / f"ds-0000{k}-of-00003.rec" for k in range(3)])
        want = [plain.read(i) for i in range(len(plain))]
        def child():
            SlowMemory.delay = 0.0
            sys.exit(0 if [ds.read(i) for i in range(len(ds))] == want else 3)
        proc = multiprocessing.get_context("fork").Process(target=child)
        proc.start()
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join()
            print("hung")
        print(proc.exitcode)
    """,
    )
    assert res.returncode == 0 and res.stdout.strip() == "0", (res.stdout, res.stderr)
