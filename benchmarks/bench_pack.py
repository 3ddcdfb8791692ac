"""Pack throughput: gpurec pack / gpurec im2rec against MXNet 1.9.1's im2rec.py and the raw limit.

What it measures, in one run and on the same files (best of ``--repeat`` runs each, the
configs taken round-robin so that a slow moment of the machine hits all of them alike;
each run starts only once the machine is idle, and a run during which other processes
used more than 5% of the machine is marked ``*``):

- ``gpurec pack ROOT PREFIX --resize 256 --workers W`` and ``--pass-through``, through
  the library (``from gpurec.pack import pack``, in this process); the time is the
  summary's ``seconds`` (listing, worker start-up and writing included), and no image
  may be skipped.
- ``gpurec im2rec PREFIX ROOT --resize 256 --num-thread W`` and ``--pass-through``,
  through the CLI in a subprocess, after an untimed ``--list --recursive``; the time
  is the wall time of the packing command (interpreter start-up included).
- MXNet 1.9.1's ``tools/im2rec.py`` the same way, run by the Python of a side venv
  (``--mxnet-python``, ``--im2rec``); these rows are skipped when it is not available.
- The raw limit: one process (OpenCV on one thread) reading each file, decoding it
  (full size, then again with ``IMREAD_REDUCED_COLOR_2``), resizing the shorter edge
  to 256 (bilinear, im2rec's size arithmetic) and encoding JPEG quality 95, in
  images/s per core; and the full-size loop in W processes at once, each on 1/W of the
  files: the ceiling, the most W cores do with this work and no packing at all.
  ``vs the raw ceiling`` divides a row's rate by it (resize rows only).
- ``--baseline DIR`` adds ``gpurec im2rec`` rows for another gpurec source tree (an
  older commit, unpacked with ``git archive``), to measure a change side by side.

Every run starts after ``sync`` (the previous run's output is on disk, so its
write-back does not land in this run) and once the machine is idle. The ``sync`` right
after each run is timed too: gpurec ``fsync``s its outputs before renaming them, MXNet's
im2rec.py leaves them to the kernel, so "until on disk" compares the time until each
dataset is safely written.

The data set is generated once under ``WORKDIR/images`` (photo-like JPEGs of about
500x375, quality 90, in 10 class folders; seeded) and reused while its parameters match.
After the runs it checks that every output holds every image, that gpurec's and MXNet's
``.lst`` are the same bytes, and compares their ``--pass-through`` and ``--resize 256``
``.rec``/``.idx`` bytes (so the two did the same work).

Run (the MXNet side venv is optional)::

    python3.11 -m venv /tmp/mxnet-venv
    /tmp/mxnet-venv/bin/pip install mxnet==1.9.1 "numpy<1.24" opencv-python-headless
    cp /tmp/mxnet-venv/lib/python3.11/site-packages/mxnet/tools/im2rec.py /tmp/im2rec.py
    .venv/bin/python benchmarks/bench_pack.py \\
        --mxnet-python /tmp/mxnet-venv/bin/python --im2rec /tmp/im2rec.py
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import cv2
import numpy as np

DATASET_VERSION = 2  # bump when make_image changes, so old data sets are regenerated
MARKER = ".bench-dataset.json"
RESIZE = 256
RAW_FULL = "raw: imdecode full + resize + imencode q95"
RAW_REDUCED = "raw: imdecode REDUCED_COLOR_2 + resize + imencode q95"
RAW_PARALLEL = "raw: the same full-decode loop in W processes at once (the ceiling)"
RAW_PHYSICAL = (
    "raw: read + decode (reduced when that covers 256) + resize + encode q95 in W processes "
    "(the physical limit)"
)
PACK_ONE = "gpurec pack --resize 256, 1 worker"
PACK_RESIZE = "gpurec pack --resize 256"
PACK_THREADS = "gpurec pack --resize 256 --executor threads"


# ------------------------------------------------------------------------- the data set


def make_image(seed: int, scale: float = 1.0) -> np.ndarray:
    """One photo-like BGR image: smooth colour field, cloudy texture, shapes, blur, noise.

    Sizes vary in 450-550 x 340-410 (times ``scale``); the noise level varies per image
    so that JPEG quality 90 files come out at roughly 40-90 KB at scale 1, like ImageNet
    photos of that size.
    """
    rng = np.random.default_rng(seed)
    w, h = int(rng.integers(450, 551)), int(rng.integers(340, 411))
    if scale == 0:  # --mixed: every image its own size, 333-1023 px wide
        scale = float(rng.uniform(0.74, 1.86))
    w, h = round(w * scale), round(h * scale)
    grid = rng.uniform(0, 255, (int(rng.integers(3, 7)), int(rng.integers(4, 9)), 3))
    img = cv2.resize(grid.astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    for scale, amp in ((16, 18.0), (4, 11.0)):  # texture: mostly luminance, some colour
        small = (h // scale + 2, w // scale + 2)
        luma = rng.normal(0, 1, (*small, 1)) * 0.8 + rng.normal(0, 1, (*small, 3)) * 0.45
        img += amp * cv2.resize(luma.astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    canvas = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(4, 10))):
        layer = canvas.copy()
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        p, q = (tuple(int(v) for v in rng.integers(0, (w, h))) for _ in range(2))
        kind = int(rng.integers(0, 4))
        if kind == 0:
            cv2.circle(layer, p, int(rng.integers(10, 120)), color, -1, cv2.LINE_AA)
        elif kind == 1:
            cv2.rectangle(layer, p, q, color, -1)
        elif kind == 2:
            pts = rng.integers(0, (w, h), (int(rng.integers(3, 7)), 2)).astype(np.int32)
            cv2.fillPoly(layer, [pts], color, cv2.LINE_AA)
        else:
            cv2.line(layer, p, q, color, int(rng.integers(2, 12)), cv2.LINE_AA)
        alpha = float(rng.uniform(0.4, 1.0))
        canvas = cv2.addWeighted(layer, alpha, canvas, 1 - alpha, 0)
    canvas = cv2.GaussianBlur(canvas, (0, 0), float(rng.uniform(0.6, 2.0)))
    noise = rng.standard_normal(canvas.shape, dtype=np.float32) * float(rng.uniform(5.5, 11.5))
    return cv2.add(canvas, noise, dtype=cv2.CV_8U)  # saturating


def _write_image(job: tuple[str, int, float]) -> int:
    path, seed, scale = job
    cv2.setNumThreads(1)
    ok, buf = cv2.imencode(".jpg", make_image(seed, scale), [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise RuntimeError(f"cannot encode {path}")
    Path(path).write_bytes(buf.tobytes())
    return len(buf)


def ensure_dataset(
    root: Path, images: int, classes: int, seed: int, workers: int, scale: float = 1.0
) -> list[Path]:
    """The image files under ``root`` (``class_KK/img_NNNNN.jpg``), made unless present."""
    params = {"version": DATASET_VERSION, "images": images, "classes": classes, "seed": seed}
    if scale != 1.0:
        params["scale"] = scale
    files = [root / f"class_{i % classes:02d}" / f"img_{i:05d}.jpg" for i in range(images)]
    marker = root / MARKER
    reuse = marker.is_file() and json.loads(marker.read_text()) == params
    if reuse and all(f.is_file() for f in files):
        print(f"reusing data set {root} ({images} images)", file=sys.stderr)
        return sorted(files)
    if root.exists():
        shutil.rmtree(root)
    for k in range(classes):
        (root / f"class_{k:02d}").mkdir(parents=True)
    start = time.perf_counter()
    jobs = [(str(f), seed * 1_000_003 + i, scale) for i, f in enumerate(files)]
    with get_context("fork").Pool(workers) as pool:
        sizes = pool.map(_write_image, jobs, chunksize=16)
    marker.write_text(json.dumps(params))
    print(
        f"generated {images} images in {time.perf_counter() - start:.1f} s under {root}: "
        f"JPEG {min(sizes) / 1024:.0f}-{max(sizes) / 1024:.0f} KB, "
        f"mean {sum(sizes) / len(sizes) / 1024:.0f} KB",
        file=sys.stderr,
    )
    return sorted(files)


def dataset_stats(files: Sequence[Path]) -> dict:
    """File count, byte sizes and pixel sizes (read from the JPEG headers), for the report."""
    from gpurec.transcode import sniff

    sizes = [f.stat().st_size for f in files]
    dims = [sniff(f.read_bytes()) for f in files]
    return {
        "files": len(files),
        "total_mb": sum(sizes) / 1e6,
        "kb_min": min(sizes) / 1024,
        "kb_mean": sum(sizes) / len(sizes) / 1024,
        "kb_max": max(sizes) / 1024,
        "width": (min(d.width for d in dims), max(d.width for d in dims)),
        "height": (min(d.height for d in dims), max(d.height for d in dims)),
    }


def warm_cache(files: Sequence[Path]) -> int:
    """Read every file once so that no config pays for the first read from disk."""
    return sum(len(f.read_bytes()) for f in files)


# ------------------------------------------------------------------------ the configs


@dataclass
class Result:
    """One config's runs; the best (shortest) run is the one reported."""

    name: str
    workers: str
    group: str  # "resize" or "pass" (what a ratio compares against), or "raw"
    images: int = 0
    runs: list[float] = field(default_factory=list)
    foreign: list[float] = field(default_factory=list)  # others' CPU seconds during each run
    sync: list[float] = field(default_factory=list)  # seconds of the `sync` after each run
    serial_us: list[float] = field(default_factory=list)  # coordinator CPU us/image (processes)

    def disturbed(self, i: int) -> bool:
        """Whether other processes took more than 5% of the machine during run ``i``."""
        return self.foreign[i] > 0.05 * self.runs[i] * (os.cpu_count() or 1)

    @property
    def best(self) -> float:
        """The shortest run: others' work can only slow a run down, never speed it up."""
        return min(self.runs)

    @property
    def best_disturbed(self) -> bool:
        """Whether even the best run was disturbed (its rate is then a lower bound)."""
        return self.disturbed(self.runs.index(self.best))

    @property
    def rate(self) -> float:
        return self.images / self.best

    @property
    def best_on_disk(self) -> float:
        """The shortest run counted until its output is on disk (run + ``sync``)."""
        return min(r + s for r, s in zip(self.runs, self.sync, strict=True))


def run_command(cmd: Sequence[str], log: Path) -> float:
    """Run ``cmd``; its wall time in seconds. Output goes to ``log``; failing is fatal."""
    start = time.perf_counter()
    with open(log, "ab") as out:
        out.write(f"$ {' '.join(map(str, cmd))}\n".encode())
        out.flush()
        proc = subprocess.run(list(map(str, cmd)), stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\nsee {log}")
    return seconds


def idx_count(idx: Path) -> int:
    """Records in an ``.idx`` (one line each)."""
    return len(idx.read_text().splitlines())


def gpurec_pack(
    root: Path,
    out: Path,
    workers: int,
    pass_through: bool,
    executor: str = "processes",
    result: Result | None = None,
) -> Callable[[], tuple]:
    """A run of ``gpurec.pack.pack``: (images, seconds) from its summary. With worker
    processes, the coordinator's serial CPU time per image (all its threads but the
    copier threads, over the whole write loop) goes to ``result.serial_us``."""
    from gpurec.pack import pack

    def run() -> tuple[int, float]:
        shutil.rmtree(out, ignore_errors=True)
        options = {"pass_through": True} if pass_through else {"resize": RESIZE}
        summary = pack(root, out / "data", workers=workers, executor=executor, **options)
        if summary.skipped:
            sys.exit(f"gpurec pack skipped {len(summary.skipped)} images: {summary.skipped[:3]}")
        if result is not None and executor == "processes" and workers > 1:
            result.serial_us.append(summary.serial_us_per_image)
        return summary.images, summary.seconds

    return run


def im2rec_run(
    base_cmd: Sequence[str], lst: Path, out: Path, root: Path, workers: int, flags: Sequence[str]
) -> Callable[[], tuple]:
    """A run of an im2rec command (gpurec's or MXNet's) on a copy of ``lst`` in ``out``."""

    def run() -> tuple[int, float]:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        shutil.copyfile(lst, out / "data.lst")
        cmd = [*base_cmd, out / "data", root, *flags, "--num-thread", str(workers)]
        seconds = run_command(cmd, out.parent / f"{out.name}.log")
        return idx_count(out / "data.idx"), seconds

    return run


def make_lists(base_cmd: Sequence[str], out: Path, root: Path) -> Path:
    """``im2rec PREFIX ROOT --list --recursive`` into ``out``; the `.lst` it wrote."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    run_command([*base_cmd, out / "data", root, "--list", "--recursive"], out / "list.log")
    return out / "data.lst"


def raw_limit(files: Sequence[Path], reduced: bool) -> Callable[[], tuple]:
    """Read, decode, resize the shorter edge to 256, encode q95: one process, one thread."""
    flag = cv2.IMREAD_REDUCED_COLOR_2 if reduced else cv2.IMREAD_COLOR
    params = [cv2.IMWRITE_JPEG_QUALITY, 95]

    def run() -> tuple[int, float]:
        threads = cv2.getNumThreads()
        cv2.setNumThreads(1)
        try:
            start = time.perf_counter()
            for f in files:
                img = cv2.imdecode(np.frombuffer(f.read_bytes(), np.uint8), flag)
                h, w = img.shape[:2]
                size = (RESIZE, h * RESIZE // w) if h > w else (w * RESIZE // h, RESIZE)
                ok, _ = cv2.imencode(".jpg", cv2.resize(img, size), params)
                assert ok
            return len(files), time.perf_counter() - start
        finally:
            cv2.setNumThreads(threads)

    return run


def _raw_share(files: Sequence[str]) -> float:
    """One process's share of the parallel raw run: its seconds."""
    return raw_limit([Path(f) for f in files], False)()[1]


def raw_parallel(files: Sequence[Path], workers: int) -> Callable[[], tuple]:
    """The raw full-decode loop in ``workers`` processes at once, each on its share of the
    files: what W cores really deliver (cores of a VM may share caches or be hyperthreads,
    so W x one core is only an upper bound). Time from start to the last one's end."""

    def run() -> tuple[int, float]:
        shares = [[str(f) for f in files[k::workers]] for k in range(workers)]
        with get_context("fork").Pool(workers) as pool:
            pool.map(abs, range(workers))  # the processes are up before the clock starts
            start = time.perf_counter()
            pool.map(_raw_share, shares, chunksize=1)
            return len(files), time.perf_counter() - start

    return run


def _physical_share(files: Sequence[str]) -> float:
    """One process's share of the physical limit: read, decode at the smallest libjpeg
    scale that still covers the target (size from the header), resize, encode; its seconds."""
    from gpurec.transcode import sniff

    cv2.setNumThreads(1)
    params = [cv2.IMWRITE_JPEG_QUALITY, 95]
    flags = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2,
             4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}  # fmt: skip
    start = time.perf_counter()
    for f in files:
        data = Path(f).read_bytes()
        info = sniff(data)
        short = min(info.width, info.height)
        denom = next((d for d in (8, 4, 2) if short // d >= RESIZE), 1)
        img = cv2.imdecode(np.frombuffer(data, np.uint8), flags[denom])
        h, w = info.height, info.width
        size = (RESIZE, h * RESIZE // w) if h > w else (w * RESIZE // h, RESIZE)
        interp = cv2.INTER_AREA if min(img.shape[:2]) > 2 * RESIZE else cv2.INTER_LINEAR
        ok, _ = cv2.imencode(".jpg", cv2.resize(img, size, interpolation=interp), params)
        assert ok
    return time.perf_counter() - start


def raw_physical(files: Sequence[Path], workers: int) -> Callable[[], tuple]:
    """The physical limit of the issue: W processes doing only the work every image
    needs (read, reduced-size decode where it covers the target, resize, encode),
    writing nothing, each on 1/W of the files."""

    def run() -> tuple[int, float]:
        shares = [[str(f) for f in files[k::workers]] for k in range(workers)]
        with get_context("fork").Pool(workers) as pool:
            pool.map(abs, range(workers))
            start = time.perf_counter()
            pool.map(_physical_share, shares, chunksize=1)
            return len(files), time.perf_counter() - start

    return run


def startup_seconds(cmd: Sequence[str], repeat: int = 3) -> float:
    """Best wall time of a command that only starts up (counted in the CLI rows)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(list(map(str, cmd)), capture_output=True, check=True)
        best = min(best, time.perf_counter() - start)
    return best


def mxnet_available(python: str | None, script: str | None) -> str | None:
    """Why the MXNet rows cannot run, or None when they can."""
    if not python or not script:
        return "--mxnet-python and --im2rec not given"
    if not Path(script).is_file():
        return f"{script} not found"
    probe = subprocess.run(
        [python, "-c", "import mxnet, cv2; print(mxnet.__version__, cv2.__version__)"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        return f"{python} cannot import mxnet: {probe.stderr.strip().splitlines()[-1:]}"
    return None


def mxnet_versions(args: argparse.Namespace) -> str | None:
    """MXNet's, OpenCV's and Python's versions in the side venv, when it runs."""
    if mxnet_available(args.mxnet_python, args.im2rec):
        return None
    probe = subprocess.run(
        [
            args.mxnet_python,
            "-c",
            "import mxnet, cv2, numpy, platform; print(f'mxnet {mxnet.__version__}, "
            "OpenCV {cv2.__version__}, numpy {numpy.__version__}, "
            "Python {platform.python_version()}')",
        ],
        capture_output=True,
        text=True,
    )
    return probe.stdout.strip() or None


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------- report


def ratio(value: float, reference: float | None) -> str:
    return f"{value / reference:.2f}" if reference else "—"


def table(results: Sequence[Result], workers: int) -> str:
    """The markdown table: rates and ratios against MXNet (same W) and the raw limit."""
    by_name = {r.name: r for r in results}
    mxnet = {
        "resize": by_name.get("MXNet im2rec.py --resize 256"),
        "pass": by_name.get("MXNet im2rec.py --pass-through"),
    }
    raw = by_name.get(RAW_PARALLEL)
    lines = [
        "| config | workers | images | seconds (best) | runs (s; * = disturbed) | images/s "
        "| vs MXNet im2rec (same W) | vs the raw ceiling (W processes) "
        "| until on disk: s (best run + sync) | on disk: vs MXNet |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        ref = mxnet.get(r.group)
        vs_mx = ratio(r.rate, ref.rate) if ref is not None and r.group != "raw" else "—"
        vs_raw = ratio(r.rate, raw.rate) if raw and r.group == "resize" else "—"
        runs = ", ".join(f"{s:.2f}" + ("*" if r.disturbed(i) else "") for i, s in enumerate(r.runs))
        star = "*" if r.best_disturbed else ""
        on_disk, vs_mx_disk = "—", "—"
        if r.group != "raw":
            on_disk = f"{r.best_on_disk:.2f}"
            if ref is not None:
                vs_mx_disk = ratio(ref.best_on_disk, r.best_on_disk)
        lines.append(
            f"| {r.name} | {r.workers} | {r.images} | {r.best:.2f}{star} | {runs} | {r.rate:.0f} "
            f"| {vs_mx} | {vs_raw} | {on_disk} | {vs_mx_disk} |"
        )
    return "\n".join(lines)


def scaling_lines(results: Sequence[Result], w: int) -> list[str]:
    """The scaling figures: 1-to-W speed-up, share of the physical limit, serial time."""
    by_name = {r.name: r for r in results}
    pack_w, pack_1 = by_name.get(PACK_RESIZE), by_name.get(PACK_ONE)
    physical = by_name.get(RAW_PHYSICAL)
    lines = []
    if pack_w and pack_1:
        lines.append(
            f"1-to-{w}-worker speed-up of `gpurec pack --resize 256`: "
            f"{pack_w.rate / pack_1.rate:.2f}x ({pack_1.rate:.0f} -> {pack_w.rate:.0f} images/s)"
        )
    if pack_w and physical:
        lines.append(
            f"`gpurec pack --resize 256` with {w} workers = {pack_w.rate / physical.rate:.2f} of "
            f"the physical limit ({physical.rate:.0f} images/s: {w} processes that only read, "
            "decode, resize and encode)"
        )
    if pack_w and pack_w.serial_us:
        serial = sorted(pack_w.serial_us)
        lines.append(
            "coordinator serial CPU time per image (all its threads but the copier threads, "
            f"from the pack's own CPU clock over the write loop): {serial[0]:.1f}-"
            f"{serial[-1]:.1f} us over {len(serial)} runs; at that rate one coordinator "
            f"feeds {1e6 / serial[-1]:,.0f} images/s, about "
            f"{1e6 / serial[-1] / (pack_1.rate if pack_1 else 1):.0f} workers' worth"
        )
    return lines


def gpurec_revision() -> str:
    """The gpurec measured: its version, and the git commit of its checkout when it has one."""
    import gpurec

    src = Path(gpurec.__file__).resolve().parent
    rev = subprocess.run(
        ["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    if rev.returncode != 0:
        return f"gpurec {gpurec.__version__}"
    dirty = subprocess.run(
        ["git", "-C", str(src), "status", "--porcelain", "--", "."], capture_output=True, text=True
    ).stdout.strip()
    sources = hashlib.sha256()
    for path in sorted(src.rglob("*.py")):
        sources.update(path.read_bytes())
    return (
        f"gpurec {gpurec.__version__} at {rev.stdout.strip()}"
        + (" (with uncommitted changes)" if dirty else "")
        + f", sources sha256 {sources.hexdigest()[:12]}"
    )


def machine() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown",
    )
    return f"nproc {os.cpu_count()}, CPU {model}, OpenCV {cv2.__version__}, numpy {np.__version__}"


# ------------------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/gpurec-bench"))
    parser.add_argument("--images", type=int, default=2000, help="images in the data set")
    parser.add_argument("--classes", type=int, default=10, help="class folders")
    parser.add_argument("--seed", type=int, default=0, help="data set seed")
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="image size factor (2: 900-1100 x 680-820 px, where reduced-size decoding "
        "applies at --resize 256; 0: mixed sizes, each image 333-1023 px wide)",
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="W")
    parser.add_argument("--repeat", type=int, default=3, help="runs per config (best reported)")
    parser.add_argument(
        "--gpurec",
        default=str(Path(sys.executable).with_name("gpurec")),
        help="the gpurec command",
    )
    parser.add_argument("--mxnet-python", help="Python of a venv with mxnet==1.9.1")
    parser.add_argument("--im2rec", help="MXNet 1.9.1's tools/im2rec.py")
    parser.add_argument(
        "--quiet",
        type=float,
        default=0.1,
        help="start each run only once all cores are busy less than this share over 0.5 s "
        "(waits up to 300 s; 1 disables)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another gpurec source tree (e.g. `git archive` of an older commit): adds its "
        "`gpurec im2rec` rows, run with PYTHONPATH set to it",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


Config = tuple[Result, Callable[[], tuple]]


def build_configs(
    root: Path,
    out: Path,
    files: Sequence[Path],
    w: int,
    gpurec: list,
    mxnet: list | None,
    baseline: Path | None = None,
) -> tuple[list[Config], dict[str, Path]]:
    """Every config with its run function; also the `.lst` each im2rec wrote."""
    resize = ["--resize", str(RESIZE)]
    lists = {"gpurec": make_lists(gpurec, out / "lists-gpurec", root)}
    pack_w = Result(PACK_RESIZE, str(w), "resize")
    pack_1 = Result(PACK_ONE, "1", "resize")
    configs: list[Config] = [
        (pack_w, gpurec_pack(root, out / "pack-resize", w, False, result=pack_w)),
        (pack_1, gpurec_pack(root, out / "pack-resize-1", 1, False)),
        (
            Result(PACK_THREADS, str(w), "resize"),
            gpurec_pack(root, out / "pack-threads", w, False, "threads"),
        ),
        (
            Result("gpurec pack --pass-through", str(w), "pass"),
            gpurec_pack(root, out / "pack-pass", w, True),
        ),
        (
            Result("gpurec im2rec --resize 256", str(w), "resize"),
            im2rec_run(gpurec, lists["gpurec"], out / "gpurec-im2rec-resize", root, w, resize),
        ),
        (
            Result("gpurec im2rec --pass-through", str(w), "pass"),
            im2rec_run(
                gpurec, lists["gpurec"], out / "gpurec-im2rec-pass", root, w, ["--pass-through"]
            ),
        ),
    ]
    if baseline is not None:
        base = ["env", f"PYTHONPATH={baseline}", sys.executable, "-m", "gpurec", "im2rec"]
        for mode, flags in (("resize", resize), ("pass", ["--pass-through"])):
            configs.append(
                (
                    Result(f"baseline gpurec im2rec {FLAGS[mode]}", str(w), mode),
                    im2rec_run(base, lists["gpurec"], out / f"base-{mode}", root, w, flags),
                )
            )
    if mxnet:
        lists["mxnet"] = make_lists(mxnet, out / "lists-mxnet", root)
        configs += [
            (
                Result("MXNet im2rec.py --resize 256", str(w), "resize"),
                im2rec_run(mxnet, lists["mxnet"], out / "mxnet-im2rec-resize", root, w, resize),
            ),
            (
                Result("MXNet im2rec.py --pass-through", str(w), "pass"),
                im2rec_run(
                    mxnet, lists["mxnet"], out / "mxnet-im2rec-pass", root, w, ["--pass-through"]
                ),
            ),
        ]
    per_core = "1 (per core)"
    configs += [
        (Result(RAW_FULL, per_core, "raw"), raw_limit(files, False)),
        (Result(RAW_REDUCED, per_core, "raw"), raw_limit(files, True)),
        (Result(RAW_PARALLEL, str(w), "raw"), raw_parallel(files, w)),
        (Result(RAW_PHYSICAL, str(w), "raw"), raw_physical(files, w)),
    ]
    return configs, lists


def cpu_busy(seconds: float = 0.5) -> float:
    """Share of all cores busy over ``seconds`` (from /proc/stat), 0..1."""

    def sample() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = values[3] + values[4]  # idle + iowait
        return sum(values) - idle, sum(values)

    busy0, total0 = sample()
    time.sleep(seconds)
    busy1, total1 = sample()
    return (busy1 - busy0) / max(total1 - total0, 1)


_TICK = os.sysconf("SC_CLK_TCK")


def _foreign_snapshot(mine: int) -> dict[int, int]:
    """utime + stime (ticks) of every process outside process group ``mine``."""
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        if int(fields[2]) != mine:  # pgrp
            out[int(entry.name)] = int(fields[11]) + int(fields[12])
    return out


class ForeignCPU:
    """CPU seconds used by processes outside this benchmark while the block runs.

    Everything the benchmark starts (pools, forkservers, subprocesses) stays in its
    process group; a thread samples the other processes every ``interval`` seconds and
    adds up what each used since it was last seen (a process first seen counts from its
    start). Processes that live less than one interval are missed; children's times
    (cutime) are left out, since a long-lived process reaped mid-run would count whole.
    """

    def __init__(self, interval: float = 0.5) -> None:
        self.interval, self.seconds = interval, 0.0
        self._stop = threading.Event()

    def _watch(self) -> None:
        mine = os.getpgrp()
        last = _foreign_snapshot(mine)
        ticks = 0
        while not self._stop.wait(self.interval):
            now = _foreign_snapshot(mine)
            ticks += sum(max(0, v - last.get(pid, 0)) for pid, v in now.items() if pid in last)
            ticks += sum(v for pid, v in now.items() if pid not in last)
            last = now
        now = _foreign_snapshot(mine)
        ticks += sum(max(0, v - last.get(pid, 0)) for pid, v in now.items() if pid in last)
        self.seconds = ticks / _TICK

    def __enter__(self) -> ForeignCPU:
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def wait_quiet(threshold: float, max_wait: float) -> float:
    """Wait until the machine is idle (others' work would skew a run); the wait in seconds.

    On a shared machine a run that starts while something else is busy is slow for no
    fault of its own; best-of-N absorbs the rest.
    """
    start = time.perf_counter()
    while cpu_busy() > threshold and time.perf_counter() - start < max_wait:
        pass
    return time.perf_counter() - start


def run_configs(configs: Sequence[Config], repeat: int, quiet: float) -> list[Result]:
    """Each config ``repeat`` times, round-robin, each run started on an idle machine.

    Every run also records the CPU time other processes used meanwhile, so that a run
    they disturbed is marked (the best run is the shortest, disturbed or not).
    """
    for rep in range(repeat):
        for result, run in configs:
            os.sync()  # the last run's data goes to disk now, not during this run
            waited = wait_quiet(quiet, max_wait=300) if quiet < 1 else 0.0
            if waited > 1:
                print(f"waited {waited:.0f} s for the machine to be idle", file=sys.stderr)
            with ForeignCPU() as others:
                result.images, seconds = run()
            start = time.perf_counter()
            os.sync()  # what is not on disk yet: gpurec fsyncs its outputs, im2rec.py does not
            result.sync.append(time.perf_counter() - start)
            result.runs.append(seconds)
            result.foreign.append(others.seconds)
            note = ""
            if result.disturbed(len(result.runs) - 1):
                note = f" (disturbed: others used {result.foreign[-1]:.2f} CPU s)"
            print(
                f"run {rep + 1}/{repeat} {result.name}: {result.images} images, {seconds:.2f} s"
                + note,
                file=sys.stderr,
            )
    return [r for r, _ in configs]


def check_outputs(
    results: Sequence[Result], n: int, out: Path, lists: dict[str, Path]
) -> list[str]:
    """Every row holds every image; gpurec's and MXNet's lists and pass-through bytes agree."""
    short = [f"{r.name} wrote {r.images}" for r in results if r.images != n]
    checks = [
        f"every row holds all {n} images: {'yes' if not short else 'NO: ' + '; '.join(short)}"
    ]
    if "mxnet" in lists:
        same = lists["gpurec"].read_bytes() == lists["mxnet"].read_bytes()
        checks.append(f"`--list --recursive` .lst, gpurec im2rec vs MXNet: {_same(same)}")
        for mode, ext in [(m, e) for m in ("pass", "resize") for e in ("rec", "idx")]:
            a = out / f"gpurec-im2rec-{mode}" / f"data.{ext}"
            b = out / f"mxnet-im2rec-{mode}" / f"data.{ext}"
            same = sha256(a) == sha256(b)
            checks.append(
                f"`{FLAGS[mode]}` data.{ext}, gpurec im2rec vs MXNet: {_same(same)} "
                f"({a.stat().st_size} vs {b.stat().st_size} bytes)"
            )
    return checks


FLAGS = {"pass": "--pass-through", "resize": f"--resize {RESIZE}"}


def _same(same: bool) -> str:
    return "same bytes" if same else "DIFFERENT bytes"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    root, out, w = args.workdir / "images", args.workdir / "out", args.workers
    files = ensure_dataset(
        root, args.images, args.classes, args.seed, os.cpu_count() or 1, args.scale
    )
    stats = dataset_stats(files)
    warm_cache(files)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    gpurec = [args.gpurec, "im2rec"]
    missing = mxnet_available(args.mxnet_python, args.im2rec)
    mxnet = None if missing else [args.mxnet_python, args.im2rec]
    if missing:
        print(f"MXNet rows skipped: {missing}", file=sys.stderr)
    revision = gpurec_revision()
    configs, lists = build_configs(root, out, files, w, gpurec, mxnet, args.baseline)
    results = run_configs(configs, args.repeat, args.quiet)
    if gpurec_revision() != revision:
        print(f"warning: gpurec changed during the runs (was {revision})", file=sys.stderr)
        revision += f"; CHANGED DURING THE RUNS to {gpurec_revision()}"
    checks = check_outputs(results, len(files), out, lists)
    startup = {"gpurec im2rec --help": startup_seconds([*gpurec, "--help"])}
    if mxnet:
        startup["MXNet python -c 'import mxnet, cv2'"] = startup_seconds(
            [args.mxnet_python, "-c", "import mxnet, cv2"]
        )

    (wmin, wmax), (hmin, hmax) = stats["width"], stats["height"]
    print(f"machine: {machine()}")
    print(f"measured: {revision}; MXNet side: {mxnet_versions(args) or 'not run'}")
    if args.baseline is not None:
        print(f"baseline: gpurec sources in {args.baseline}")
    print(
        f"data set: {stats['files']} JPEGs (q90) in {args.classes} class folders, "
        f"{stats['total_mb']:.1f} MB, {stats['kb_min']:.0f}-{stats['kb_max']:.0f} KB "
        f"(mean {stats['kb_mean']:.0f} KB), {wmin}-{wmax} x {hmin}-{hmax} px; "
        f"W = {w}; best of {args.repeat} runs"
    )
    print()
    print(table(results, w))
    print()
    for line in scaling_lines(results, w):
        print(f"- {line}")
    for line in checks:
        print(f"- {line}")
    for what, seconds in startup.items():
        print(f"- start-up, included in the CLI rows: `{what}` takes {seconds:.2f} s")
    if args.json:
        report = {
            "machine": machine(),
            "gpurec": revision,
            "dataset": stats,
            "workers": w,
            "results": [asdict(r) | {"best": r.best, "images_per_second": r.rate} for r in results],
            "scaling": scaling_lines(results, w),
            "checks": checks,
            "startup_seconds": startup,
        }
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
