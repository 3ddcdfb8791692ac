"""``gpurec export`` against a plain copy of the same bytes (issue 20: aim for >= 0.8x).

    .venv/bin/python benchmarks/bench_export.py --images 6000 --rounds 3

Writes a dataset of ``--images`` JPEG records (about 100 KB each, 2 shards), then, side by
side in each round and in alternating order:

- ``copy``: the `.rec` and `.idx` files copied (``shutil.copyfile``, a kernel copy) and
  fsynced: what moving the bytes costs at least;
- ``webdataset`` / ``parquet``: ``gpurec.export`` with 2 worker processes, everything
  included (opening the dataset, the header scan, the pool's start, the fsync of each
  file before its rename);
- ``files``: each image's bytes written to a file of its own by a plain loop (open,
  write, close: no temporary name, no rename), the baseline of ...
- ``folder``: ``gpurec.export(format="folder")``, one file per image.

The source is read from the page cache in every case (the machine is shared: its cache
is not dropped), so the figures are of the write path and the per-record work.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np


def make_dataset(folder: Path, images: int) -> list[Path]:
    from gpurec.recordio import IRHeader, RecordWriter, pack

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    bases = []
    for _ in range(32):  # noise at 380x380, quality 90: about 100 KB
        img = cv2.GaussianBlur(rng.integers(0, 255, (380, 380, 3), np.uint8), (3, 3), 0)
        bases.append(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
    recs = []
    half = images // 2
    for s, (start, stop) in enumerate(((0, half), (half, images))):
        rec = folder / f"bench-{s:05d}-of-00002.rec"
        with RecordWriter(rec, rec.with_suffix(".idx")) as writer:
            for i in range(start, stop):
                base = bases[i % len(bases)]  # unique: a JPEG comment segment after SOI
                payload = base[:2] + b"\xff\xfe\x00\x0a" + i.to_bytes(8, "little") + base[2:]
                writer.write(pack(IRHeader(0, float(i % 100), i, 0), payload), key=i)
        recs.append(rec)
    return recs


def plain_copy(recs: list[Path], out: Path) -> None:
    out.mkdir(parents=True)
    for rec in recs:
        for src in (rec, rec.with_suffix(".idx")):
            dst = out / src.name
            shutil.copyfile(src, dst)
            fd = os.open(dst, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


def plain_files(recs: list[Path], out: Path) -> None:
    from gpurec.dataset import Dataset
    from gpurec.recordio import unpack_view

    ds = Dataset(recs)
    made = set()
    for i in range(len(ds)):
        header, payload = unpack_view(ds.read_view(i))
        folder = out / f"{int(header.label):03d}"
        if folder not in made:
            folder.mkdir(parents=True, exist_ok=True)
            made.add(folder)
        with open(folder / f"{i:06d}.jpg", "wb") as f:
            f.write(payload)
    ds.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=6000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args()

    from gpurec.export import export

    with tempfile.TemporaryDirectory(prefix="gpurec-bench-export-") as tmp:
        tmp = Path(tmp)
        recs = make_dataset(tmp / "src", a.images)
        size = sum(r.stat().st_size for r in recs)
        print(f"{a.images} records, {size / 1e6:.0f} MB in {len(recs)} shards", flush=True)
        runs = {
            "copy": lambda out: plain_copy(recs, out),
            "webdataset": lambda out: export(recs, out, format="webdataset", workers=a.workers,
                                             max_samples=1000),
            "parquet": lambda out: export(recs, out, format="parquet", workers=a.workers,
                                          max_samples=1000),
            "files": lambda out: plain_files(recs, out),
            "folder": lambda out: export(recs, out, format="folder", workers=a.workers),
        }  # fmt: skip
        times: dict[str, list[float]] = {name: [] for name in runs}
        for r in range(a.rounds):
            order = list(runs) if r % 2 == 0 else list(reversed(runs))
            for name in order:
                out = tmp / "out"
                shutil.rmtree(out, ignore_errors=True)
                os.sync()
                start = time.perf_counter()
                runs[name](out)
                times[name].append(time.perf_counter() - start)
                shutil.rmtree(out, ignore_errors=True)
            print(f"round {r}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()),
                  flush=True)  # fmt: skip
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"median of {a.rounds} rounds ({size / 1e6:.0f} MB):")
    for name, base in (("webdataset", "copy"), ("parquet", "copy"), ("folder", "files")):
        rate = size / 1e6 / med[name]
        best = max(b / t for b, t in zip(times[base], times[name], strict=True))
        print(f"  {name:10s} {med[name]:6.2f} s  {rate:6.0f} MB/s  = {med[base] / med[name]:.2f}x "
              f"{base} ({med[base]:.2f} s; best round {best:.2f}x)")  # fmt: skip


if __name__ == "__main__":  # the guard worker processes need
    main()
