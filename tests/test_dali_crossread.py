"""Files written by gpurec are read by DALI's own MXNet reader (CPU pipeline, no GPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gpurec.recordio import MAGIC_BYTES, IRHeader, RecordWriter, pack

dali = pytest.importorskip("nvidia.dali", reason="DALI is not installed (pip install .[dali])")
fn = pytest.importorskip("nvidia.dali.fn")


def test_dali_reads_split_and_multilabel_records(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    samples = []
    for i in range(10):
        body = rng.bytes(int(rng.integers(0, 60)))
        if i % 3 == 0:  # aligned magic words: the writer splits these records
            body = MAGIC_BYTES + body[: len(body) // 4 * 4] + MAGIC_BYTES + b"tail"
        label = [float(i), -1.5, 2.25] if i % 2 else float(i)
        samples.append((pack(IRHeader(0, label, i, 0), body), body, np.float32(label).ravel()))
    rec, idx = tmp_path / "x.rec", tmp_path / "x.idx"
    with RecordWriter(rec, idx) as writer:
        for i, (record, _, _) in enumerate(samples):
            writer.write(record, key=i)
    assert rec.read_bytes().count(MAGIC_BYTES) > len(samples)  # split frames are present

    @dali.pipeline_def(batch_size=len(samples), num_threads=1, device_id=None)
    def read():
        data, labels = fn.readers.mxnet(
            path=[str(rec)], index_path=[str(idx)], random_shuffle=False
        )
        return data, labels

    pipe = read()
    pipe.build()
    data, labels = pipe.run()
    for i, (_, body, label) in enumerate(samples):
        assert np.array(data[i]).tobytes() == body, f"payload of record {i}"
        np.testing.assert_array_equal(np.array(labels[i]).ravel(), label)


def test_dali_reads_and_decodes_each_packed_shard_alone(tmp_path: Path) -> None:
    from helpers import color_tree, label_from_pixels

    from gpurec.pack import pack

    root = color_tree(tmp_path / "img", per_class=5)
    summary = pack(root, tmp_path / "out" / "ds", resize=40, shards=2, workers=1)
    assert summary.images == 15 and len(summary.outputs) == 2
    seen = 0
    for rec in summary.outputs:
        n = len(list((rec.with_suffix(".lst")).read_text().splitlines()))

        @dali.pipeline_def(batch_size=n, num_threads=1, device_id=None)
        def read(rec=rec):
            jpegs, labels = fn.readers.mxnet(
                path=[str(rec)], index_path=[str(rec.with_suffix(".idx"))], random_shuffle=False
            )
            return fn.decoders.image(jpegs, device="cpu"), labels

        pipe = read()
        pipe.build()
        images, labels = pipe.run()
        for i in range(n):
            img = np.array(images[i])  # RGB from DALI
            assert min(img.shape[:2]) == 40
            assert label_from_pixels(img[..., ::-1]) == int(np.array(labels[i])[0])
        seen += n
    assert seen == 15
