"""112-px face records end to end: raw DALI against gpurec's two backends, side by side.

The issue-21 setting: photo-like images cut to 112x112 (a few KB each, the size of
MS1M's aligned faces) packed as they are (pass-through), arcface_torch's transform
(decode, random mirror, ``(x - 127.5) / 127.5``, CHW float32), batch 256, 2 threads,
DALI's CPU mode. Each method runs in a process of its own, the methods alternating
round by round; a run's rate counts the images handed out over epochs 2..E:

- ``dali-raw``: ``readers.mxnet`` -> ``decoders.image`` -> ``crop_mirror_normalize``
  (mirror from ``random.coin_flip``), DALI's default executor, each batch copied out
  with ``as_array()``: the graph a DALI user writes;
- ``dali-raw-static``: the same on DALI's static executor (the one gpurec's graph uses);
- ``gpurec-dali``: ``Pipeline(..., backend="dali", crop="center", rand_mirror=True,
  mean=127.5, std=127.5, resize=0)``: the same work (``resize=0``: the crop is the
  image; without it ``crop="center"`` first resizes the shorter side to 128, the
  evaluation default, which the raw graph does not do);
- ``gpurec-dali-r128``: the issue's command as written (that resize included);
- ``gpurec-cpu``: the OpenCV backend, ``resize=0``.

    .venv/bin/python benchmarks/bench_faces.py --rounds 5 --epochs 10
    .venv/bin/python benchmarks/bench_faces.py --only dali-raw,gpurec-dali --rounds 8
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_feed import ensure_faces  # noqa: E402
from bench_load import ensure_pack  # noqa: E402

METHODS = ("dali-raw", "dali-raw-static", "gpurec-dali", "gpurec-dali-r128", "gpurec-cpu")
ARCFACE = dict(crop="center", rand_mirror=True, mean=127.5, std=127.5)


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def child(method: str, rec: str, a: argparse.Namespace) -> dict:
    times, images = [], []
    cpu0 = None
    if method.startswith("dali-raw"):
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(batch_size=a.batch_size, num_threads=a.threads, device_id=None, seed=1,
                      prefetch_queue_depth=2,
                      exec_dynamic=None if method == "dali-raw" else False)  # fmt: skip
        def raw():
            jpegs, labels = fn.readers.mxnet(path=[rec], index_path=[rec[:-4] + ".idx"],
                                             random_shuffle=True, pad_last_batch=True,
                                             name="reader")  # fmt: skip
            images = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
            images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                              mean=[127.5] * 3, std=[127.5] * 3,
                                              mirror=fn.random.coin_flip(probability=0.5),
                                              )  # fmt: skip
            return images, labels

        pipe = raw()
        pipe.build()
        runs = math.ceil(pipe.reader_meta("reader")["epoch_size_padded"] / a.batch_size)
        for epoch in range(a.epochs):
            if epoch == 1:
                cpu0 = cpu_seconds()
            start, n = time.perf_counter(), 0
            for _ in range(runs):
                out, labels = pipe.run()
                data, label = out.as_array(), labels.as_array()
                assert data.shape[1:] == (3, 112, 112) and data.dtype == np.float32
                n += len(label)
            times.append(time.perf_counter() - start)
            images.append(n)
    else:
        import gpurec

        options = dict(ARCFACE)
        if method != "gpurec-dali-r128":
            options["resize"] = 0
        backend = "cpu" if method == "gpurec-cpu" else "dali"
        pipe = gpurec.Pipeline(rec, a.batch_size, (3, 112, 112), device="cpu", backend=backend,
                               num_threads=a.threads, seed=1, **options)  # fmt: skip
        for epoch in range(a.epochs):
            if epoch == 1:
                cpu0 = cpu_seconds()
            start, n = time.perf_counter(), 0
            for data, label in pipe:
                assert data.shape[1:] == (3, 112, 112) and data.dtype == np.float32
                n += len(label)
            times.append(time.perf_counter() - start)
            images.append(n)
        pipe.close()
    steady = sum(images[1:])
    return {
        "rate": steady / sum(times[1:]),
        "first_epoch_rate": images[0] / times[0],
        "cpu_us_per_image": (cpu_seconds() - cpu0) / steady * 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/gpurec-bench-feed"))
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--only", default=",".join(METHODS))
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--rec", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a.rec, a)))
        return 0
    faces = ensure_faces(a.workdir / "faces", a.images)
    rec = str(ensure_pack(faces, a.workdir / "face112", a.images, pass_through=True))
    methods = a.only.split(",")
    rates: dict[str, list[float]] = {m: [] for m in methods}
    cpu: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(a.rounds):
        for m in methods:
            cmd = [sys.executable, __file__, "--child", m, "--rec", rec,
                   "--batch-size", str(a.batch_size), "--threads", str(a.threads),
                   "--epochs", str(a.epochs)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode:
                print(out.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"{m} failed")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            rates[m].append(res["rate"])
            cpu[m].append(res["cpu_us_per_image"])
            print(f"round {r + 1} {m:18} {res['rate']:7.0f} img/s  "
                  f"{res['cpu_us_per_image']:6.0f} CPU us/img", flush=True)  # fmt: skip
    ref = statistics.median(rates["dali-raw"]) if "dali-raw" in rates else None
    print("\n| method | img/s, each run | median | vs dali-raw (medians) | per round | "
          "CPU us/img |\n| --- | --- | ---: | ---: | --- | ---: |")  # fmt: skip
    for m in methods:
        med = statistics.median(rates[m])
        vs = f"{med / ref:.2f}x" if ref else "-"
        rounds = ", ".join(f"{x / y:.2f}" for x, y in zip(rates[m], rates.get("dali-raw", []),
                                                          strict=False))  # fmt: skip
        each = ", ".join(f"{x:.0f}" for x in rates[m])
        print(f"| `{m}` | {each} | {med:.0f} | {vs} | {rounds} | "
              f"{statistics.median(cpu[m]):.0f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
