"""RSS of plain DALI (no gpurec Pipeline) fed by ``external_source`` vs ``readers.mxnet``.

    .venv/bin/python benchmarks/rss_external_source.py reader|ext-nocopy|ext-copy [static]

Decodes the bench_load.py data set (``/tmp/gpurec-loadbench/r256``, made by
``benchmarks/bench_load.py``) for 12 epochs with the training crop and prints VmRSS
after each: shows whether an RSS swing comes from feeding DALI from Python at all, and
(``static``: ``exec_dynamic=False``) from DALI's executor (see BENCHMARKS.md, issue 12).
"""

from __future__ import annotations

import sys

import numpy as np
from nvidia.dali import fn, pipeline_def, types

from gpurec.recordio import RecordReader, unpack

DATA = "/tmp/gpurec-loadbench/r256/data"
BATCH = 64


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return 0.0


def main(mode: str, static: bool = False, epochs: int = 12) -> list[int]:
    reader = RecordReader(DATA + ".rec")
    payloads = [np.frombuffer(unpack(reader[i])[1], np.uint8) for i in range(len(reader))]
    rng = np.random.default_rng(0)
    state = {"order": rng.permutation(len(payloads)), "batch": 0}
    batches = len(payloads) // BATCH

    def feed() -> list[np.ndarray]:
        if state["batch"] >= batches:
            state["order"], state["batch"] = rng.permutation(len(payloads)), 0
        b = state["batch"]
        state["batch"] += 1
        return [payloads[i] for i in state["order"][b * BATCH : (b + 1) * BATCH]]

    @pipeline_def(batch_size=BATCH, num_threads=2, device_id=None, seed=1, prefetch_queue_depth=2,
                  exec_dynamic=False if static else None)  # fmt: skip
    def graph():
        if mode == "reader":
            jpegs, _ = fn.readers.mxnet(
                path=[DATA + ".rec"], index_path=[DATA + ".idx"], random_shuffle=True
            )
        else:
            jpegs = fn.external_source(
                source=feed, dtype=types.UINT8, ndim=1, no_copy=mode == "ext-nocopy", batch=True
            )
        images = fn.decoders.image_random_crop(jpegs, device="cpu", output_type=types.RGB)
        images = fn.resize(images, resize_x=224, resize_y=224)
        return fn.crop_mirror_normalize(
            images, dtype=types.FLOAT, output_layout="CHW", mean=[0.0] * 3, std=[1.0] * 3
        )

    pipe = graph()
    pipe.build()
    out = []
    for _ in range(epochs):
        for _ in range(batches):
            (images,) = pipe.run()
            images.as_array()
        out.append(round(rss_mib()))
    return out


if __name__ == "__main__":
    static = sys.argv[2:] == ["static"]
    print(sys.argv[1], "static" if static else "dynamic", main(sys.argv[1], static))
