"""gpurec's own per-image cost on the DALI path: everything except DALI's decoding.

What the DALI backend does in Python for every image before DALI decodes it: read the
record from the memory map, unpack its IRHeader, sniff the image's size, take its label,
draw the batch's random numbers, turn them into DALI's per-image parameters
(``DALIBackend._read``), and hand the batch to DALI's ``external_source``
(``_Batch.feed``). Measured on one thread, per image, on two data sets:

- ``face112``: 112x112 photo-like JPEGs packed as they are (pass-through), the issue's
  arcface command (``crop="center", rand_mirror=True, mean=127.5, std=127.5``; without
  ``resize=0`` that first resizes to 128, which changes DALI's work, not this cost);
- ``r256``: photo-like JPEGs packed at shorter side 256, the ImageNet training
  transform (random-resized crop 224, mirror, normalise, CHW float32).

Each epoch's batches are read back to back, as the backend's reader thread reads them
when DALI's work lies elsewhere (on a GPU); then each is fed and DALI runs it (not
timed), so that the feed measures what ``feed_input`` costs into a pipeline that
consumes its input. ``--cold`` reads each batch just before it is fed, after DALI's CPU
decoding of the one before on the same core (caches flushed: a pessimistic figure, the
one on this machine's CPU-only pipelines). The first epoch (which learns every record's
image size) and the later ones (sizes known) are reported apart; each figure is the
minimum over ``--repeat`` epochs.

    .venv/bin/python benchmarks/bench_feed.py                 # both sets
    .venv/bin/python benchmarks/bench_feed.py --only face112 --profile 20
    .venv/bin/python benchmarks/bench_feed.py --cold          # reads after DALI's decoding

``--profile N`` prints cProfile's top N functions of the reading for the later epochs.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import cv2

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_load import TRAIN, ensure_pack, photo

ARCFACE = dict(crop="center", rand_mirror=True, mean=127.5, std=127.5)


def ensure_faces(root: Path, count: int, classes: int = 16) -> Path:
    """``count`` 112x112 JPEGs (quality 90) cut from photo-like images: the size and kind
    of MS1M's aligned faces (a few KB each)."""
    marker = root / ".bench_feed.json"
    if marker.is_file() and marker.read_text() == str(count):
        return root
    for k in range(classes):
        (root / f"id_{k:03d}").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        img = photo(10_000 + i)
        h, w = img.shape[:2]
        side = min(h, w)
        y, x = (h - side) // 2, (w - side) // 2
        face = cv2.resize(img[y : y + side, x : x + side], (112, 112), interpolation=cv2.INTER_AREA)
        _ok, buf = cv2.imencode(".jpg", face, [cv2.IMWRITE_JPEG_QUALITY, 90])
        (root / f"id_{i % classes:03d}" / f"f{i:05d}.jpg").write_bytes(buf.tobytes())
    marker.write_text(str(count))
    return root


def datasets(work: Path, count: int) -> dict[str, tuple[Path, tuple, dict]]:
    faces = ensure_faces(work / "faces", count)
    face_rec = ensure_pack(faces, work / "face112", count, pass_through=True)
    photos = work / "photos"
    if not (photos / ".bench_feed.json").is_file():
        for k in range(8):
            (photos / f"c{k}").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            _ok, buf = cv2.imencode(".jpg", photo(i), [cv2.IMWRITE_JPEG_QUALITY, 90])
            (photos / f"c{i % 8}" / f"p{i:05d}.jpg").write_bytes(buf.tobytes())
        (photos / ".bench_feed.json").write_text(str(count))
    r256 = ensure_pack(photos, work / "r256", count, resize=256)
    return {
        "face112": (face_rec, (3, 112, 112), ARCFACE),
        "r256": (r256, (3, 224, 224), TRAIN),
    }


def feed_run(batch, fed, profile) -> float:
    """Seconds to feed ``batch`` to ``fed``, which then runs it (untimed)."""
    if profile is not None:
        profile.enable()
    t0 = time.perf_counter()
    batch.feed(fed)
    took = time.perf_counter() - t0
    if profile is not None:
        profile.disable()
    fed.run()
    return took


def measure(rec: Path, shape: tuple, options: dict, a: argparse.Namespace) -> dict:
    import gpurec

    pipe = gpurec.Pipeline(str(rec), a.batch_size, shape, device="cpu", backend="dali",
                           num_threads=1, seed=1, **options)  # fmt: skip
    backend = pipe.backend
    fed = backend._new_pipeline(None, a.batch_size, 1)  # DALI runs what is fed (untimed)
    profile = cProfile.Profile() if a.profile else None
    epochs = []
    for epoch in range(a.repeat + 1):
        plan = pipe.plan(epoch)
        read = feed = 0.0
        batches = []
        for b in range(plan.batches):
            if profile is not None and epoch:
                profile.enable()
            t0 = time.perf_counter()
            batches.append(backend._read(plan, b))
            read += time.perf_counter() - t0
            if profile is not None:
                profile.disable()
            if a.cold:
                feed += feed_run(batches.pop(), fed, profile if epoch else None)
        for batch in batches:
            feed += feed_run(batch, fed, profile if epoch else None)
        images = plan.batches * a.batch_size
        epochs.append((read / images * 1e6, feed / images * 1e6))
    pipe.close()
    later = epochs[1:]
    best = min(later, key=sum)
    out = {
        "first_epoch_us": round(sum(epochs[0]), 2),
        "read_us": round(best[0], 2),
        "feed_us": round(best[1], 2),
        "total_us": round(sum(best), 2),
        "per_epoch_us": [round(sum(e), 2) for e in later],
    }
    if profile is not None:
        stats = pstats.Stats(profile)
        stats.sort_stats("tottime").print_stats(a.profile)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/gpurec-bench-feed"))
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeat", type=int, default=5, help="later epochs (min taken)")
    p.add_argument("--only", default="face112,r256")
    p.add_argument("--profile", type=int, default=0, metavar="N")
    p.add_argument("--cold", action="store_true", help="read each batch after DALI's decoding")
    a = p.parse_args(argv)
    sets = datasets(a.workdir, a.images)
    head = f"{'set':8} {'first epoch':>12} {'read':>8} {'feed':>8} {'total':>8}"
    print(head + f"  (us/image, 1 thread{', reads cold' if a.cold else ''})")
    for name in a.only.split(","):
        rec, shape, options = sets[name]
        r = measure(rec, shape, options, a)
        print(f"{name:8} {r['first_epoch_us']:12.2f} {r['read_us']:8.2f} {r['feed_us']:8.2f} "
              f"{r['total_us']:8.2f}  epochs: {r['per_epoch_us']}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
