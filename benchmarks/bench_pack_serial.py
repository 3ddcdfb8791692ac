"""The pack coordinator's serial CPU time per image, fixed and marginal (issue 14).

    .venv/bin/python benchmarks/bench_pack_serial.py /tmp/gpurec-bench-mixed/images

Packs the images of ROOT (class folders; e.g. the tree bench_pack.py generates) in
pass-through with 2 worker processes, listed 4,000 and 16,000 times over (a `.lst`
repeating the files), 3 runs each. Serial time = the coordinating process's CPU clock
over the write loop (``PackSummary.coordinator_cpu``) less the work other threads do in
parallel to the loop, with the GIL released: the copier threads' copies (``copy_cpu``)
and the background ``fdatasync`` every 32 MiB (``sync_cpu``: the kernel's writeback of
the shard, charged to the thread that asks for it, so it grows with the bytes per
image). ``PackSummary.serial_us_per_image`` is that. The marginal cost per image is the difference
between the two sizes over the 12,000 extra images; what is left is the fixed cost of a
pack (pool start-up, listing, fsync). Pass-through keeps the workers' share small, so
the coordinator is what is measured.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from gpurec.listing import list_images
from gpurec.pack import pack
from gpurec.recordio import ListEntry, write_lst

SIZES = (4000, 16000)


def main(root: Path, runs: int = 3) -> None:
    entries = list_images(root).entries
    if not entries:
        raise SystemExit(f"no images under {root}")
    best: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="gpurec-serial-") as tmp:
        for n in SIZES:
            lst = Path(tmp) / f"l{n}.lst"
            repeated = (entries * (n // len(entries) + 1))[:n]
            write_lst(lst, [ListEntry(i, e.labels, e.path) for i, e in enumerate(repeated)])
            for _ in range(runs):
                out = Path(tmp) / "out"
                shutil.rmtree(out, ignore_errors=True)
                summary = pack(root, out / "d", workers=2, pass_through=True, lst=str(lst))
                serial = summary.serial_us_per_image * summary.images / 1e6
                best[n] = min(best.get(n, serial), serial)
                print(f"{n} images: serial {serial / n * 1e6:.1f} us/image all-in (copies "
                      f"{summary.copy_cpu / n * 1e6:.1f} and background syncs "
                      f"{summary.sync_cpu / n * 1e6:.1f} us/image in other threads), "
                      f"{summary.images_per_second:.0f} images/s", flush=True)  # fmt: skip
    small, large = (best[n] for n in SIZES)
    marginal = (large - small) / (SIZES[1] - SIZES[0])
    fixed = small - SIZES[0] * marginal
    print(f"marginal serial time: {marginal * 1e6:.1f} us/image; fixed: {fixed * 1e3:.0f} ms")


if __name__ == "__main__":  # the guard worker processes need
    main(Path(sys.argv[1]))
