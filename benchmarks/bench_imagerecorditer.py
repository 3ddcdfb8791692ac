"""ImageRecordIter benchmark: gpurec.mxnet against MXNet 1.9.1, the same script in both.

The issue's target: ``gpurec.mxnet.io.ImageRecordIter`` on the CPU backend at least 2x
MXNet's own ``ImageRecordIter`` on the seed's configuration (shorter edge to 300, random
224 window, mirror, rotation up to 50 degrees, shear up to 0.5, saturation, normalised
float32 NCHW), side by side in one run. Both sides run :data:`SCRIPT`, the same text:
only its first line differs (``import mxnet as mx`` in MXNet's side venv,
``import gpurec.mxnet as mx`` here), which is the porting story of
``docs/porting-from-mxnet.md``. ``--gpurec-backend dali`` also measures gpurec's
ImageRecordIter on DALI's CPU mode.

The records are bench_load.py's photo-like JPEGs (about 500x375, 40-90 KB) packed as
they are (``pass_through``), as a seed user's im2rec would pack them; each method runs
in its own process when the machine is idle, round-robin over ``--rounds``; images/s
over epochs 2..E (epoch 1 is warm-up), and runs during which other processes kept the
machine busy are reported but not counted (bench_load.py's rules).

    .venv/bin/python benchmarks/bench_imagerecorditer.py --mxnet-python /work/mxnet-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_load import (
    cpu_busy,
    ensure_images,
    ensure_pack,
    log,
    machine,
    measured,
    wait_quiet,
)

# The seed's configuration (docs/walkthrough.md), MXNet's keywords, less the batch size.
SEED = {
    k: tuple(v) if isinstance(v, list) else v
    for k, v in yaml.safe_load(
        (Path(__file__).resolve().parents[1] / "configs" / "pets-imagerecorditer.yaml").read_text()
    )["ImageRecordIter"].items()
    if k != "batch_size"
}

SCRIPT = """
import json, sys, time
a = json.loads(sys.argv[1])
t0 = time.perf_counter()
it = mx.io.ImageRecordIter(path_imgrec=a["rec"], path_imgidx=a["idx"],
                           batch_size=a["batch_size"], preprocess_threads=a["threads"],
                           ctx="cpu", verbose=False, **a["config"])
times, images, first = [], [], None
for epoch in range(a["epochs"]):
    if epoch:
        it.reset()
    start, n = time.perf_counter(), 0
    for batch in it:
        data = batch.data[0].asnumpy()  # the images on the host, as a trainer takes them
        if first is None:
            first = time.perf_counter() - t0
        n += data.shape[0] - batch.pad
    times.append(time.perf_counter() - start)
    images.append(n)
print(json.dumps({"times": times, "images": images, "first_batch_s": first}))
"""

IMPORTS = {"mxnet": "import mxnet as mx", "gpurec": "import gpurec.mxnet as mx"}


def run(python: str, which: str, args: dict, env: dict | None = None) -> dict:
    """One run of SCRIPT in ``python``; images/s over epochs 2..E."""
    code = IMPORTS[which] + "\n" + SCRIPT
    proc = subprocess.run([python, "-c", code, json.dumps(args)], capture_output=True,
                          text=True, timeout=1800, env=env)  # fmt: skip
    if proc.returncode:
        raise RuntimeError(f"{which} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    times, images = out["times"][1:], out["images"][1:]
    out["rate"] = sum(images) / sum(times)
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/gpurec-loadbench"))
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="preprocess_threads of both")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run (1st = warm-up)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--mxnet-python", default="/work/mxnet-venv/bin/python")
    p.add_argument("--gpurec-backend", action="append", default=[],
                   help="also run gpurec with GPUREC_MXNET_BACKEND=this (e.g. dali)")  # fmt: skip
    p.add_argument("--quiet", type=float, default=0.15)
    p.add_argument("--max-foreign", type=float, default=0.05)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    import os

    a = parse_args(argv)
    ensure_images(a.workdir / "images", a.images, a.classes, 0)
    rec = ensure_pack(a.workdir / "images", a.workdir / "full" / "data", a.images,
                      pass_through=True, workers=2)  # fmt: skip
    args = dict(rec=str(rec), idx=str(rec.with_suffix(".idx")), batch_size=a.batch_size,
                threads=a.threads, epochs=a.epochs, config=SEED)  # fmt: skip
    methods = {
        "gpurec-cpu": (sys.executable, "gpurec", {**os.environ, "GPUREC_MXNET_BACKEND": "cpu"})
    }
    for backend in a.gpurec_backend:
        env = {**os.environ, "GPUREC_MXNET_BACKEND": backend}
        methods[f"gpurec-{backend}"] = (sys.executable, "gpurec", env)
    if Path(a.mxnet_python).exists():
        methods["mxnet"] = (a.mxnet_python, "mxnet", None)
    else:
        log(f"no MXNet at {a.mxnet_python}: only gpurec is measured")
    rates: dict[str, list[float]] = {name: [] for name in methods}
    for rnd in range(a.rounds):
        for name, (python, which, env) in methods.items():
            wait_quiet(a.quiet)
            r = measured(lambda python=python, which=which, env=env: run(python, which, args, env))
            counted = r["foreign"] <= a.max_foreign
            if counted:
                rates[name].append(r["rate"])
            log(f"round {rnd + 1} {name}: {r['rate']:.1f} images/s, cpu {r['cpu_s']:.1f} s, "
                f"foreign {r['foreign']:.2f}{'' if counted else ' (not counted)'}")  # fmt: skip
    print(f"\n{machine()}; {a.images} images (pass-through JPEGs, ~500x375), batch "
          f"{a.batch_size}, {a.threads} threads, seed config {SEED}\n")  # fmt: skip
    print("| method | images/s (median) | runs | vs MXNet |")
    print("|---|---|---|---|")
    base = statistics.median(rates["mxnet"]) if rates.get("mxnet") else None
    for name, values in rates.items():
        med = statistics.median(values) if values else float("nan")
        ratio = f"{med / base:.2f}x" if base and values else "-"
        runs = ", ".join(f"{v:.0f}" for v in values)
        print(f"| {name} | {med:.1f} | {runs} | {ratio} |")
    print(f"\nmachine busy at the end: {cpu_busy():.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
