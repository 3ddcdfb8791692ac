"""`gpurec export` to folders, WebDataset and parquet, read back by the real `webdataset`
and `datasets` libraries and by plain `tarfile`, on MXNet-written files and gpurec packs;
`gpurec pack` from those formats; InsightFace verification `.bin` files."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import color_tree, empty_bucket, run_gpurec, write_records

from gpurec.dataset import Dataset
from gpurec.export import export
from gpurec.pack import pack
from gpurec.recordio import IRHeader, RecordReader, RecordWriter, read_lst, unpack
from gpurec.recordio import pack as pack_record

FORMATS = ("folder", "webdataset", "parquet")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def records_of(prefix_or_rec) -> Counter:
    """The multiset of (payload sha256, labels) of every sample of a dataset."""
    out: Counter = Counter()
    ds = Dataset([prefix_or_rec] if isinstance(prefix_or_rec, Path) else prefix_or_rec)
    try:
        for i in range(len(ds)):
            header, payload = unpack(ds.read(i))
            out[(sha(payload), tuple(np.atleast_1d(header.label).tolist()))] += 1
    finally:
        ds.close()
    return out


def shards(prefix: Path) -> list[Path]:
    return sorted(prefix.parent.glob(prefix.name + "*.rec"))


def read_webdataset(folder: Path) -> list[dict]:
    import webdataset as wds

    urls = [str(p) for p in sorted(folder.glob("*.tar"))]
    return list(wds.WebDataset(urls, shardshuffle=False))


def load_parquet(folder: Path):
    import datasets

    files = [str(p) for p in sorted(folder.glob("*.parquet"))]
    ds = datasets.load_dataset("parquet", data_files=files, split="train")
    return ds, ds.cast_column("image", datasets.Image(decode=False))


# ---------------------------------------------------------------- MXNet-written files


def test_golden_passthrough_to_folder_is_the_image_tree(golden: Path, tmp_path: Path) -> None:
    """MXNet's im2rec pass-through pack exports back to the very files it was made from,
    under their .lst names, class folders from the .lst (there is no classes.json)."""
    summary = export(golden / "passthrough.rec", tmp_path / "out", format="folder", workers=1)
    assert summary.images == 12 and not summary.skipped
    out = tmp_path / "out"
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.parent != out)
    originals = sorted(p.relative_to(golden / "images").as_posix()
                       for p in (golden / "images").rglob("*.*"))  # fmt: skip
    assert written == originals
    for rel in originals:
        assert (tmp_path / "out" / rel).read_bytes() == (golden / "images" / rel).read_bytes()
    assert json.loads((tmp_path / "out" / "classes.json").read_text())["classes"] == [
        "cat", "dog", "fox"]  # fmt: skip
    listed = list(read_lst(tmp_path / "out" / "export.lst"))
    assert [e.path for e in listed] == [
        e.path for e in read_lst(golden / "passthrough.lst")
    ]  # same order, same names
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_golden_passthrough_to_webdataset(golden: Path, expected: dict, tmp_path: Path) -> None:
    import gpurec

    gpurec.export(golden / "passthrough.rec", tmp_path / "wds", format="webdataset")
    want = expected["passthrough"]
    samples = read_webdataset(tmp_path / "wds")
    assert len(samples) == 12
    for k, sample in enumerate(samples):
        image = sample.get("jpg", sample.get("png"))
        meta = json.loads(sample["json"])
        rec = want[str(meta["id"])]
        assert sha(image) == rec["payload_sha256"]
        assert int(sample["cls"]) == rec["label"] == meta["label"]
        assert meta["class"] == ["cat", "dog", "fox"][int(rec["label"])]
        assert sample["__key__"] == f"{k:06d}"
    assert sum("png" in s for s in samples) == 1  # fox_3.png is a PNG, named so
    with tarfile.open(next((tmp_path / "wds").glob("*.tar"))) as tar:  # plain tar reads it
        names = tar.getnames()
        assert names[:3] == ["000000.jpg", "000000.cls", "000000.json"]
        assert tar.extractfile("000000.cls").read() == b"0"


def test_golden_passthrough_to_parquet(golden: Path, expected: dict, tmp_path: Path) -> None:
    export(golden / "passthrough.rec", tmp_path / "pq", format="parquet")
    decoded, ds = load_parquet(tmp_path / "pq")
    assert ds.features["label"].names == ["cat", "dog", "fox"]
    want = expected["passthrough"]
    for row in ds:
        rec = want[str(row["id"])]
        assert sha(row["image"]["bytes"]) == rec["payload_sha256"]
        assert row["label"] == rec["label"]
    assert decoded[0]["image"].size == tuple(want[str(decoded[0]["id"])]["shape"][1::-1])
    paths = sorted(row["image"]["path"] for row in ds)
    assert paths[0] == "cat_0.jpg" and "fox_3.png" in paths


@pytest.mark.parametrize("name", ["train.rec", "shuffled.rec"])
def test_golden_insightface(golden: Path, tmp_path: Path, name: str) -> None:
    """InsightFace layout (header and identity records left out) and its shuffled file
    without .idx: the 12 face images, their labels, bytes unchanged."""
    want = json.loads((golden / "insightface" / "expected.json").read_text())["images"]
    hashes = Counter((v["payload_sha256"], v["label"]) for v in want.values())
    src = tmp_path / name
    shutil.copy(golden / "insightface" / name, src)  # the scan's cache goes beside it
    if (golden / "insightface" / name).with_suffix(".idx").exists():
        shutil.copy((golden / "insightface" / name).with_suffix(".idx"), src.with_suffix(".idx"))
    export(src, tmp_path / "wds", format="webdataset", workers=1)
    samples = read_webdataset(tmp_path / "wds")
    assert Counter((sha(s["jpg"]), float(int(s["cls"]))) for s in samples) == hashes
    export(src, tmp_path / "pq", format="parquet", workers=1)
    _, ds = load_parquet(tmp_path / "pq")
    assert Counter((sha(r["image"]["bytes"]), float(r["label"])) for r in ds) == hashes
    export(src, tmp_path / "dir", format="folder", workers=1)
    files = [p for p in (tmp_path / "dir").rglob("*.jpg")]
    assert Counter((sha(p.read_bytes()), float(int(p.parent.name))) for p in files) == hashes


# ------------------------------------------------------------------ gpurec packs


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("packed")
    root = color_tree(tmp / "img", per_class=7)
    (root / "c" / "c_6.jpg").write_bytes(cv2.imencode(".png", np.zeros((20, 30, 3), np.uint8))[1])
    pack(root, tmp / "out" / "ds", pass_through=True, shards=3, workers=1)
    return tmp / "out" / "ds"


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_through_each_format(packed: Path, tmp_path: Path, fmt: str) -> None:
    """.rec -> export -> pack --pass-through gives the same (image bytes, label) multiset;
    the class names come back too."""
    summary = export(packed, tmp_path / fmt, format=fmt, workers=2, max_samples=8)
    assert summary.images == 21 and not summary.skipped
    if fmt != "folder":
        assert len(summary.outputs) == 3  # 21 samples, 8 per file
    back = pack(tmp_path / fmt, tmp_path / "back" / "ds", pass_through=True, workers=1)
    assert back.images == 21 and not back.skipped
    assert back.classes == ["a", "b", "c"]
    assert records_of(shards(tmp_path / "back" / "ds")) == records_of(shards(packed))


def test_folder_export_reads_as_an_image_folder(packed: Path, tmp_path: Path) -> None:
    """What torchvision's ImageFolder does: sorted class folders numbered 0..K-1; the
    PNG stored under a .jpg name is written as .png (its sniffed format)."""
    export(packed, tmp_path / "dir", format="folder")
    classes = sorted(p.name for p in (tmp_path / "dir").iterdir() if p.is_dir())
    assert classes == ["a", "b", "c"]
    assert [p.name for p in (tmp_path / "dir" / "c").glob("*.png")] == ["c_6.png"]
    seen = Counter()
    for label, name in enumerate(classes):
        for path in (tmp_path / "dir" / name).iterdir():
            seen[(sha(path.read_bytes()), float(label))] += 1
    assert seen == Counter({(h, lab[0]): n for (h, lab), n in records_of(shards(packed)).items()})


def test_job_array_parts_write_what_one_export_writes(packed: Path, tmp_path: Path) -> None:
    one = export(packed, tmp_path / "one", format="webdataset", max_samples=5)
    for part in range(3):
        export(packed, tmp_path / "parts", format="webdataset", max_samples=5,
               num_parts=3, part=part)  # fmt: skip
    names = sorted(Path(p).name for p in one.outputs)
    assert len(names) == 5 and sorted(p.name for p in (tmp_path / "parts").glob("*.tar")) == names
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "parts" / name).read_bytes()


def test_multi_label_records_keep_every_label(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (16, 16, 3), np.uint8) for _ in range(5)]
    labels = [[float(k % 2), 10.0 + k, 0.5] for k in range(5)]
    rec = write_records(tmp_path / "multi.rec", images, labels)
    want = records_of(rec)
    for fmt in FORMATS:
        export(rec, tmp_path / fmt, format=fmt, workers=1)
    samples = read_webdataset(tmp_path / "webdataset")
    assert [json.loads(s["json"])["label"] for s in samples] == labels
    assert [int(s["cls"]) for s in samples] == [k % 2 for k in range(5)]
    ds = load_parquet(tmp_path / "parquet")[1]
    assert [r["labels"] for r in ds] == labels and [r["label"] for r in ds] == [0, 1, 0, 1, 0]
    lst = tmp_path / "folder" / "export.lst"
    assert [list(e.labels) for e in read_lst(lst)] == labels
    back = pack(tmp_path / "folder", tmp_path / "b1", lst=str(lst), pack_label=True,
                pass_through=True, workers=1)  # fmt: skip
    assert back.images == 5 and records_of(tmp_path / "b1.rec") == want
    for fmt in ("webdataset", "parquet"):
        pack(tmp_path / fmt, tmp_path / f"b_{fmt}", pack_label=True, pass_through=True, workers=1)
        assert records_of(tmp_path / f"b_{fmt}.rec") == want, fmt


def test_cut_short_file_exports_its_intact_records(golden: Path, tmp_path: Path) -> None:
    rec = tmp_path / "cut.rec"
    data = (golden / "passthrough.rec").read_bytes()
    rec.write_bytes(data[: len(data) - 500])  # into the last record
    shutil.copy(golden / "passthrough.idx", rec.with_suffix(".idx"))
    res = run_gpurec("export", rec, tmp_path / "wds", "--format", "webdataset")
    assert res.returncode == 0, res.stderr
    assert "11 images" in res.stdout and "1 lost to a cut" in res.stdout
    assert "cut short" in res.stderr and "at byte" in res.stderr
    assert len(read_webdataset(tmp_path / "wds")) == 11


def _with_a_bad_record(tmp_path: Path) -> Path:
    rec = tmp_path / "bad.rec"
    good = cv2.imencode(".jpg", np.full((8, 8, 3), 90, np.uint8))[1].tobytes()
    with RecordWriter(rec, rec.with_suffix(".idx")) as writer:
        for i in range(4):
            payload = good if i != 2 else good[: len(good) // 2]  # a truncated JPEG
            writer.write(pack_record(IRHeader(0, float(i), i, 0), payload), key=i)
    return rec


def test_an_unreadable_record_is_an_error_naming_it_or_skipped(tmp_path: Path) -> None:
    rec = _with_a_bad_record(tmp_path)
    res = run_gpurec("export", rec, tmp_path / "wds", "--format", "webdataset")
    assert res.returncode == 2
    assert "bad.rec" in res.stderr and "record 2" in res.stderr and "--on-error skip" in res.stderr
    assert not (tmp_path / "wds").exists() or not list((tmp_path / "wds").iterdir())
    res = run_gpurec("export", rec, tmp_path / "wds", "--format", "webdataset",
                     "--on-error", "skip")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "3 images" in res.stdout and "skipped 1" in res.stdout
    report = (tmp_path / "wds" / "export.skipped.tsv").read_text()
    assert "record 2" in report and "truncated JPEG" in report
    assert [int(s["cls"]) for s in read_webdataset(tmp_path / "wds")] == [0, 1, 3]


# ------------------------------------------------------------ pack from other formats


def test_pack_from_a_datasets_parquet(tmp_path: Path) -> None:
    """A parquet dataset written by datasets' own to_parquet (an Image column, a
    ClassLabel), one row without image bytes and one that is no image."""
    import datasets

    rng = np.random.default_rng(3)
    pngs = [cv2.imencode(".png", rng.integers(0, 255, (9, 11, 3), np.uint8))[1].tobytes()
            for _ in range(6)]  # fmt: skip
    rows = [{"bytes": b, "path": f"x{i}.png"} for i, b in enumerate(pngs)]
    rows[4] = {"bytes": b"not an image at all", "path": "bad.png"}
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=["ant", "bee"])})  # fmt: skip
    labels = [0, 1, 1, 0, 1, 0]
    ds = datasets.Dataset.from_dict({"image": rows, "label": labels}, features=features)
    (tmp_path / "hub" / "data").mkdir(parents=True)
    ds.to_parquet(str(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"))
    summary = pack(tmp_path / "hub", tmp_path / "out" / "bugs", pass_through=True, workers=2)
    assert summary.images == 5 and summary.classes == ["ant", "bee"]
    assert len(summary.skipped) == 1 and "not an image" in summary.skipped[0][1]
    assert "00000004" in summary.skipped[0][0]
    assert (tmp_path / "out" / "bugs.skipped.tsv").exists()
    want = Counter(
        (sha(b), (float(lab),))
        for k, (b, lab) in enumerate(zip(pngs, labels, strict=True))
        if k != 4
    )
    assert records_of(tmp_path / "out" / "bugs.rec") == want


def test_pack_from_webdataset_with_resize_and_bad_samples(packed: Path, tmp_path: Path) -> None:
    export(packed, tmp_path / "wds", format="webdataset", max_samples=10)
    tars = sorted((tmp_path / "wds").glob("*.tar"))
    extra = tmp_path / "wds" / "zz-extra.tar"  # a sample without cls or json, one cut short
    with tarfile.open(extra, "w") as tar:
        data = b"\xff\xd8\xff" + bytes(100)
        info = tarfile.TarInfo("lonely.jpg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    data = tars[-1].read_bytes()
    tars[-1].write_bytes(data[: len(data) // 2])
    res = run_gpurec("pack", tmp_path / "wds", tmp_path / "out" / "ds", "--resize", "24")
    assert res.returncode == 0, res.stderr
    report = (tmp_path / "out" / "ds.skipped.tsv").read_text()
    assert "zz-extra.tar/lonely\tno label" in report
    assert "cut short" in report
    kept = sum(len(RecordReader(p)) for p in shards(tmp_path / "out" / "ds"))
    assert 10 < kept < 21
    reader = RecordReader(shards(tmp_path / "out" / "ds")[0])
    img = cv2.imdecode(np.frombuffer(unpack(reader[0])[1], np.uint8), cv2.IMREAD_COLOR)
    assert min(img.shape[:2]) == 24  # resized: not pass-through


# ------------------------------------------------------------------- object storage


@pytest.fixture
def bucket(s3_client):
    s3_client.create_bucket(Bucket="formats")
    yield s3_client
    empty_bucket(s3_client, "formats")
    s3_client.delete_bucket(Bucket="formats")


def test_export_from_s3(packed: Path, tmp_path: Path, bucket, monkeypatch) -> None:
    """A source in a bucket is fetched into the shard cache and exported as a local one;
    its classes.json rides with it."""
    monkeypatch.setenv("GPUREC_CACHE", str(tmp_path / "cache"))
    for path in packed.parent.iterdir():
        if path.suffix in (".rec", ".idx") or path.name.endswith(".classes.json"):
            bucket.upload_file(str(path), "formats", f"src/{path.name}")
    res = run_gpurec("export", "s3://formats/src/ds", tmp_path / "wds", "--format", "webdataset")
    assert res.returncode == 0, res.stderr
    samples = read_webdataset(tmp_path / "wds")
    assert len(samples) == 21 and {json.loads(s["json"])["class"] for s in samples} == {
        "a", "b", "c"}  # fmt: skip
    got = Counter((sha(s.get("jpg", s.get("png"))), (float(int(s["cls"])),)) for s in samples)
    assert got == records_of(shards(packed))


def test_export_to_s3_and_pack_back_from_it(packed: Path, tmp_path: Path, bucket) -> None:
    for fmt in FORMATS:
        res = run_gpurec("export", packed, f"s3://formats/{fmt}", "--format", fmt,
                         "--max-samples", "9")  # fmt: skip
        assert res.returncode == 0, res.stderr
    keys = {o["Key"] for o in bucket.list_objects_v2(Bucket="formats")["Contents"]}
    assert {"webdataset/ds-00000-of-00003.tar", "parquet/ds-00002-of-00003.parquet",
            "folder/a/a_0.jpg", "folder/classes.json", "folder/export.lst"} <= keys  # fmt: skip
    assert not [k for k in keys if k.endswith(".tmp")]
    want = records_of(shards(packed))
    for fmt in FORMATS:
        out = tmp_path / fmt / "ds"
        # threads: a forkserver started by an earlier test has not this test's AWS_* variables
        summary = pack(f"s3://formats/{fmt}", out, pass_through=True, workers=2,
                       executor="threads")  # fmt: skip
        assert summary.classes == ["a", "b", "c"], fmt
        assert records_of(shards(out)) == want, fmt


# ------------------------------------------------------------------ verification sets


def _verification_bin(path: Path, pairs: int = 3) -> tuple[list[bytes], list[bool]]:
    rng = np.random.default_rng(5)
    images = [cv2.imencode(".jpg", rng.integers(0, 255, (12, 12, 3), np.uint8))[1].tobytes()
              for _ in range(2 * pairs)]  # fmt: skip
    issame = [k % 2 == 0 for k in range(pairs)]
    stored = [images[0], np.frombuffer(images[1], np.uint8), *images[2:]]  # one as an array
    path.write_bytes(pickle.dumps((stored, issame), protocol=2))
    return images, issame


def test_verification_bin_export_and_info(tmp_path: Path) -> None:
    images, issame = _verification_bin(tmp_path / "lfw.bin")
    res = run_gpurec("info", tmp_path / "lfw.bin")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("3 pairs (2 same, 1 different), 6 images")
    res = run_gpurec("export", tmp_path / "lfw.bin", tmp_path / "lfw", "--format", "folder")
    assert res.returncode == 0, res.stderr
    assert "3 pairs, 6 images" in res.stdout
    lines = (tmp_path / "lfw" / "pairs.tsv").read_text().splitlines()
    assert lines[0] == "first\tsecond\tsame" and len(lines) == 4
    for k, line in enumerate(lines[1:]):
        first, second, same = line.split("\t")
        assert (tmp_path / "lfw" / first).read_bytes() == images[2 * k]
        assert (tmp_path / "lfw" / second).read_bytes() == images[2 * k + 1]
        assert same == str(int(issame[k]))


def test_a_bin_that_would_run_code_is_refused(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    (tmp_path / "evil.bin").write_bytes(pickle.dumps(([Evil(), b"x"], [True])))
    res = run_gpurec("info", tmp_path / "evil.bin")
    assert res.returncode == 2 and "owned" not in res.stdout
    assert "refused" in res.stderr and "builtins.print" in res.stderr


# -------------------------------------------------- class names from an im2rec .lst


def test_im2rec_pack_without_classes_json_gets_names_from_its_lst(
    tmp_path: Path,
) -> None:
    """An im2rec-made pack has no classes.json: ``info``, ``show`` and export name the
    classes from the .lst's folders. ``show``'s grid is the same picture as with a
    classes.json of those names, and differs from one captioned with numbers."""
    color_tree(tmp_path / "img", per_class=4)
    assert run_gpurec("im2rec", tmp_path / "pets", tmp_path / "img", "--list",
                      "--recursive", "--no-shuffle").returncode == 0  # fmt: skip
    res = run_gpurec("im2rec", tmp_path / "pets", tmp_path / "img", "--resize", "32")
    assert res.returncode == 0, res.stderr
    assert not list(tmp_path.glob("*.classes.json"))
    info = json.loads(run_gpurec("info", tmp_path / "pets.rec", "--json").stdout)
    assert info["classes"] == ["a", "b", "c"] and info["labels"] == {"a": 4, "b": 4, "c": 4}
    args = ["show", tmp_path / "pets.rec", "-n", "6", "-o"]
    assert run_gpurec(*args, tmp_path / "from_lst.png").returncode == 0
    (tmp_path / "pets.classes.json").write_text(json.dumps({"classes": ["a", "b", "c"]}))
    assert run_gpurec(*args, tmp_path / "from_json.png").returncode == 0
    (tmp_path / "pets.classes.json").write_text(json.dumps({"classes": ["0", "1", "2"]}))
    assert run_gpurec(*args, tmp_path / "numbers.png").returncode == 0
    from_lst = cv2.imread(str(tmp_path / "from_lst.png"))
    assert np.array_equal(from_lst, cv2.imread(str(tmp_path / "from_json.png")))
    assert not np.array_equal(from_lst, cv2.imread(str(tmp_path / "numbers.png")))
    (tmp_path / "pets.classes.json").unlink()
    export(tmp_path / "pets.rec", tmp_path / "dir", format="folder")
    assert sorted(p.name for p in (tmp_path / "dir").iterdir() if p.is_dir()) == ["a", "b", "c"]
    assert (tmp_path / "dir" / "b" / "b_2.jpg").is_file()


def test_tar_headers_are_tarfiles_own() -> None:
    """The fast ustar headers are byte for byte what tarfile writes (long names go
    through tarfile itself)."""
    from gpurec.formats.webdataset import ustar_header

    for name, size in (("000001.jpg", 78123), ("a/b/c.json", 0), ("x" * 100, 5), ("é.png", 512)):
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, 0, 0o644
        assert ustar_header(name, size) == info.tobuf(tarfile.USTAR_FORMAT, "utf-8")
    long = "k" * 150 + ".jpg"
    with tarfile.open(fileobj=io.BytesIO(ustar_header(long, 0) + bytes(1024))) as tar:
        assert tar.getnames() == [long]


def test_pack_from_parquet_with_string_labels_and_a_bare_binary_column(tmp_path: Path) -> None:
    """A parquet file of no particular writer: a binary image column and string labels
    (classes in sorted order)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    jpgs = [cv2.imencode(".jpg", np.full((10, 10, 3), 40 * k, np.uint8))[1].tobytes()
            for k in range(4)]  # fmt: skip
    names = ["zebra", "ant", "zebra", "mole"]
    table = pa.table({"img": pa.array(jpgs, pa.binary()), "label": names})
    pq.write_table(table, tmp_path / "animals.parquet")
    summary = pack(tmp_path / "animals.parquet", tmp_path / "out", pass_through=True, workers=1)
    assert summary.classes == ["ant", "mole", "zebra"] and summary.images == 4
    number = {"ant": 0.0, "mole": 1.0, "zebra": 2.0}
    want = Counter((sha(b), (number[n],)) for b, n in zip(jpgs, names, strict=True))
    assert records_of(tmp_path / "out.rec") == want


def test_an_image_tree_with_an_archive_beside_it_is_packed_as_a_tree(tmp_path: Path) -> None:
    root = color_tree(tmp_path / "img", per_class=2)
    with tarfile.open(root / "backup.tar", "w") as tar:
        tar.add(root / "a", arcname="a")
    summary = pack(root, tmp_path / "out", pass_through=True, workers=1)
    assert summary.images == 6 and summary.classes == ["a", "b", "c"]


def test_sample_json_is_json_dumps() -> None:
    """The hand-formatted sample json is json.dumps' own text (sorted keys, non-ASCII
    and quotes as json writes them)."""
    from gpurec.formats import Record
    from gpurec.formats.webdataset import sample_json

    fields = {"id": 7, "id2": 0, "flag": 0, "source": "x.rec", "record": "record 5"}
    for labels, name, cls in (((1.0,), 'ca"t_é.jpg', "cat\t1"), ((0.0, 2.5), "a.png", None)):
        record = Record(b"", labels, name, "000001", dict(fields, flag=len(labels) - 1))
        want = {**record.fields, "name": name, "label": list(labels) if len(labels) > 1
                else labels[0]}  # fmt: skip
        if cls is not None:
            want["class"] = cls
        assert sample_json(record, cls) == json.dumps(want, ensure_ascii=False,
                                                      sort_keys=True).encode()  # fmt: skip


def test_ray_pack_from_webdataset_writes_the_bytes_of_a_local_pack(packed: Path, tmp_path) -> None:
    """The tars' root travels to Ray tasks with its index (and an absolute path)."""
    ray = pytest.importorskip("ray")
    export(packed, tmp_path / "wds", format="webdataset", max_samples=8)
    local = pack(tmp_path / "wds", tmp_path / "local" / "ds", shards=2, resize=20, workers=1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = pack(tmp_path / "wds", tmp_path / "ray" / "ds", shards=2, resize=20,
                      executor="ray")  # fmt: skip
    finally:
        ray.shutdown()
    assert remote.images == local.images == 21
    for rec in shards(tmp_path / "local" / "ds"):
        assert (tmp_path / "ray" / rec.name).read_bytes() == rec.read_bytes()


# ------------------------------------------------- folder names that must not collide


def _two_packs_with_the_same_file_names(tmp_path: Path) -> Path:
    """Two packs of trees whose files have the same names (a/0.jpg ... in both), the
    images different; their shards side by side."""
    for seed, name in ((1, "x"), (2, "y")):
        for c in ("a", "b"):
            (tmp_path / name / c).mkdir(parents=True)
            for k in range(2):
                img = np.full((8, 8, 3), 40 * seed + 10 * k + 5 * (c == "b"), np.uint8)
                cv2.imwrite(str(tmp_path / name / c / f"{k}.jpg"), img)
        pack(tmp_path / name, tmp_path / "out" / name, pass_through=True, workers=1)
    return tmp_path / "out"


@pytest.mark.parametrize("workers", [1, 2])
def test_folder_export_of_shards_whose_lst_names_repeat_keeps_every_image(
    tmp_path: Path, workers: int
) -> None:
    """Two shards whose .lst both name a/0.jpg: each image gets a file of its own (the
    repeated names get the sample number in front), none overwrites another, and the
    folder packs back to the same (bytes, label) multiset."""
    out = _two_packs_with_the_same_file_names(tmp_path)
    recs = sorted(out.glob("*.rec"))
    summary = export(str(out / "*.rec"), tmp_path / "dir", format="folder", workers=workers)
    assert summary.images == 8
    files = sorted(p.relative_to(tmp_path / "dir").as_posix()
                   for p in (tmp_path / "dir").rglob("*.jpg"))  # fmt: skip
    assert len(files) == 8
    assert sorted(f.split("_", 1)[1] for f in files if f.startswith("a/")) == ["0.jpg"] * 2 + [
        "1.jpg"] * 2  # fmt: skip
    listed = list(read_lst(tmp_path / "dir" / "export.lst"))
    assert sorted(e.path for e in listed) == files
    assert all(e.path.split("/")[1].startswith(f"{e.index:06d}_") for e in listed)
    back = pack(tmp_path / "dir", tmp_path / "back", pass_through=True, workers=1)
    assert back.images == 8 and not back.skipped
    assert records_of(tmp_path / "back.rec") == records_of(recs)


def test_folder_names_read_back_as_the_labels(packed: Path, tmp_path: Path) -> None:
    """Class names that a sorted folder listing would number otherwise (not in sorted
    order, repeated, or a path out of the destination) become ``<label>_<name>``
    folders: ImageFolder's numbering (sorted folders) and ``gpurec pack DEST`` give the
    records' labels back, no two classes share a folder, nothing lands outside DEST."""
    src = tmp_path / "src"
    shutil.copytree(packed.parent, src)
    want = Counter({(h, lab[0]): n for (h, lab), n in records_of(shards(packed)).items()})
    for names in (["zeta", "alpha", "mid"], ["crane", "crane", "kite"], ["../../evil", "b", "c"]):
        (src / "ds.classes.json").write_text(json.dumps({"classes": names}))
        dest = tmp_path / "dir" / str(len(list((tmp_path).glob("dir/*"))))
        export(src / "ds", dest, format="folder", workers=1)
        folders = sorted(p.name for p in dest.iterdir() if p.is_dir())
        assert folders == [f"{k}_{n.replace('/', '_')}" for k, n in enumerate(names)]
        seen = Counter()
        for label, folder in enumerate(folders):  # ImageFolder: sorted folders are 0..K-1
            for path in (dest / folder).iterdir():
                seen[(sha(path.read_bytes()), float(label))] += 1
        assert seen == want, names
        assert json.loads((dest / "classes.json").read_text())["classes"] == names
        back = pack(dest, tmp_path / "back" / dest.name, pass_through=True, workers=1)
        assert back.classes == folders
        assert records_of(shards(tmp_path / "back" / dest.name)) == records_of(shards(packed))
    assert not list(tmp_path.rglob("evil"))
    # names a sorted listing numbers as the labels stay as they are
    (src / "ds.classes.json").write_text(json.dumps({"classes": ["ant", "bee", "cow"]}))
    export(src / "ds", tmp_path / "plain", format="folder", workers=1)
    assert sorted(p.name for p in (tmp_path / "plain").iterdir() if p.is_dir()) == [
        "ant", "bee", "cow"]  # fmt: skip


def test_no_output_path_outside_the_destination_local_or_url(tmp_path: Path) -> None:
    from gpurec.export import Destination

    for dest in (Destination(str(tmp_path / "d")), Destination("s3://bucket/d")):
        for rel in ("../x.jpg", "a/../../x.jpg", "/etc/x.jpg", "a//x.jpg", "./x.jpg"):
            with pytest.raises(ValueError, match="not under the destination"):
                dest.put(rel, b"data")
            with pytest.raises(ValueError, match="not under the destination"):
                dest.write(rel, lambda f: f.write(b"data"))
        assert dest.name("a/b.jpg").endswith("/d/a/b.jpg")
    assert not list(tmp_path.rglob("x.jpg"))


# ------------------------------------------ pack from files or samples named alike


def test_pack_from_tars_and_parquet_files_of_one_name_in_two_folders(tmp_path: Path) -> None:
    """``train/ds-00000-of-00001.tar`` and ``val/ds-00000-of-00001.tar`` under one glob
    (an export of two splits names its files alike, and its keys too): every sample
    keeps its own image (they were named by the file's base name and key, and the
    second file's images were read for the first's), and likewise for parquet."""
    src = tmp_path / "src"
    want: Counter = Counter()
    for split, shade in (("train", 30), ("val", 200)):
        (src / split).mkdir(parents=True)
        images = [np.full((8, 8, 3), shade + 9 * k, np.uint8) for k in range(3)]
        rec = write_records(src / split / "ds.rec", images, [float(k) for k in range(3)])
        want += records_of(rec)
        export(rec, tmp_path / "wds" / split, format="webdataset", workers=1)
        export(rec, tmp_path / "pq" / split, format="parquet", workers=1)
    assert (tmp_path / "wds" / "val" / "ds-00000-of-00001.tar").exists()
    for fmt, suffix in (("wds", "tar"), ("pq", "parquet")):
        out = tmp_path / "back" / fmt
        summary = pack(str(tmp_path / fmt / "*" / f"*.{suffix}"), out, pass_through=True,
                       workers=1)  # fmt: skip
        assert summary.images == 6 and not summary.skipped, fmt
        assert records_of(out.with_suffix(".rec")) == want, fmt
        listed = [e.path for e in read_lst(out.with_suffix(".lst"))]
        assert any(p.startswith("train/ds-00000-of-00001") for p in listed), listed


def test_a_tar_key_that_repeats_is_skipped_not_read_for_the_other(tmp_path: Path) -> None:
    """WebDataset's reader makes two samples of a key that comes back after another
    key; they were listed under one name, both reading the second's image."""
    jpgs = [cv2.imencode(".jpg", np.full((8, 8, 3), 60 * k, np.uint8))[1].tobytes()
            for k in range(3)]  # fmt: skip
    with tarfile.open(tmp_path / "rep.tar", "w") as tar:
        for k, key in enumerate(("a", "b", "a")):
            for ext, data in (("jpg", jpgs[k]), ("cls", str(k).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    summary = pack(tmp_path / "rep.tar", tmp_path / "out", pass_through=True, workers=1)
    assert summary.images == 2
    assert summary.skipped == [("rep.tar/a.jpg", "key repeats an earlier sample's in this tar")]
    assert records_of(tmp_path / "out.rec") == Counter({(sha(jpgs[0]), (0.0,)): 1,
                                                        (sha(jpgs[1]), (1.0,)): 1})  # fmt: skip


def test_the_parquet_spool_is_removed_when_a_pack_ends_or_fails(
    tmp_path: Path, monkeypatch
) -> None:
    """The spool holds a copy of every image: it goes as the pack ends, and as a pack
    that fails ends, not when the failure's traceback is dropped (in a notebook: never)."""
    import tempfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    spools = tmp_path / "tmp"
    spools.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spools))
    jpgs = [cv2.imencode(".jpg", np.full((10, 10, 3), 40 * k, np.uint8))[1].tobytes()
            for k in range(4)]  # fmt: skip
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"img": pa.array(jpgs, pa.binary()), "label": [0, 1, 0, 1]}),
                   tmp_path / "pq" / "a.parquet")  # fmt: skip
    summary = pack(tmp_path / "pq", tmp_path / "out" / "ok", pass_through=True, workers=1)
    assert summary.images == 4 and not list(spools.iterdir())
    pq.write_table(pa.table({"img": pa.array(jpgs, pa.binary()), "what": [0, 1, 0, 1]}),
                   tmp_path / "pq" / "b.parquet")  # fmt: skip
    with pytest.raises(ValueError, match=r"b\.parquet: no label column") as failure:
        pack(tmp_path / "pq", tmp_path / "out" / "bad", pass_through=True, workers=1)
    assert failure.value is not None and not list(spools.iterdir())
    from gpurec.formats.parquet import ParquetRoot

    root = ParquetRoot(str(tmp_path / "pq" / "a.parquet"))
    root.list_samples()
    assert (
        len(list(spools.iterdir())) == 1
        and root.read_many(["a.parquet/00000000.jpg"], 1 << 20)[0] == jpgs[0]
    )
    root.release()
    assert not list(spools.iterdir())


def test_a_folder_image_interrupted_as_its_file_is_made_leaves_nothing(
    tmp_path: Path, monkeypatch
) -> None:
    """Ctrl-C is raised at the first bytecode after the system call it arrived in:
    after the open that made the temporary file, before its descriptor was kept (seen
    in a real Ctrl-C of an export: an empty ``.NNNNNN.jpg.tmp`` left in a class folder)."""
    import os

    from gpurec.export import Destination

    real_open = os.open

    def open_then_interrupted(path, flags, mode=0o777, **kw):
        real_open(path, flags, mode, **kw)
        raise KeyboardInterrupt

    dest = Destination(str(tmp_path / "d"))
    monkeypatch.setattr(os, "open", open_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        dest.put("a/000001.jpg", b"\xff\xd8\xff" + bytes(10))
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "d").rglob("*") if p.is_file()] == []


def test_pack_from_parquet_with_a_labels_column_that_is_not_every_label(tmp_path: Path) -> None:
    """A ClassLabel ``label`` beside another dataset's ``labels`` (tag ids, or strings):
    the class stays the label (the tags took its place, strings stopped the pack)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    jpgs = [cv2.imencode(".jpg", np.full((10, 10, 3), 40 * k, np.uint8))[1].tobytes()
            for k in range(3)]  # fmt: skip
    for name, tags in (("ids", [[7, 3], [], [1, 5]]), ("words", [["x"], ["y", "z"], []])):
        table = pa.table({"image": pa.array(jpgs, pa.binary()), "label": [0, 1, 1],
                          "labels": tags})  # fmt: skip
        pq.write_table(table, tmp_path / f"{name}.parquet")
        out = tmp_path / "out" / name
        summary = pack(tmp_path / f"{name}.parquet", out, pass_through=True, workers=1)
        assert summary.images == 3, name
        want = Counter((sha(b), (lab,)) for b, lab in zip(jpgs, [0.0, 1.0, 1.0], strict=True))
        assert records_of(out.with_suffix(".rec")) == want, name


def test_verification_bin_from_s3(tmp_path: Path, bucket) -> None:
    """A .bin in a bucket exports and tells its pairs as a local one (it was opened as
    the local path 's3:/formats/...')."""
    images, _ = _verification_bin(tmp_path / "lfw.bin")
    bucket.upload_file(str(tmp_path / "lfw.bin"), "formats", "sets/lfw.bin")
    summary = export("s3://formats/sets/lfw.bin", tmp_path / "lfw", format="folder")
    assert summary.pairs == 3 and summary.images == 6
    lines = (tmp_path / "lfw" / "pairs.tsv").read_text().splitlines()[1:]
    assert [(tmp_path / "lfw" / line.split("\t")[0]).read_bytes() for line in lines] == images[::2]
    res = run_gpurec("info", "s3://formats/sets/lfw.bin")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("3 pairs (2 same, 1 different), 6 images")


def test_a_python2_verification_bin_exports_its_bytes(tmp_path: Path) -> None:
    """InsightFace's own .bin files are Python 2 pickles (str images): the repository's
    faces.bin, made so, exports each image's bytes as stored."""
    path = Path(__file__).parent / "data" / "mxnet_image" / "faces.bin"
    images, issame = pickle.loads(path.read_bytes(), encoding="bytes")  # our own file
    summary = export(path, tmp_path / "faces", format="folder")
    assert summary.pairs == len(issame) == 2 and summary.images == len(images) == 4
    lines = (tmp_path / "faces" / "pairs.tsv").read_text().splitlines()[1:]
    got = [
        (tmp_path / "faces" / name).read_bytes() for line in lines for name in line.split("\t")[:2]
    ]
    assert got == [bytes(b) for b in images]
    assert [line.split("\t")[2] for line in lines] == [str(int(s)) for s in issame]
    assert sorted(p.suffix for p in (tmp_path / "faces" / "images").iterdir()) == [
        ".jpg", ".jpg", ".jpg", ".png"]  # fmt: skip
