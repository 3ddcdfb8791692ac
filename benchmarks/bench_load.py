"""Loading benchmark: gpurec.Pipeline against raw DALI, the decode limit, MXNet, torchvision.

Measures on this machine, side by side in one run (round-robin over the methods, each
in its own process, each started when the machine is idle), the images/s of the
standard ImageNet training transform (random-resized crop 224, area 0.08-1, aspect
3/4-4/3, mirror, normalise, float32 NCHW, batch 64):

- ``gpurec.Pipeline(..., device="cpu", backend="dali")`` (gpurec's reader and order,
  the encoded images fed to DALI through ``external_source``) and the same graph
  written directly in DALI (readers.mxnet -> decoders.image_random_crop -> resize ->
  crop_mirror_normalize, CPU mode, outputs copied out with ``as_array``), side by side
  in one run: the issue's ">= 0.95x raw DALI" is their ratio. ``dali-raw`` runs on
  DALI's default executor, ``dali-raw-static`` on the static one gpurec's graph uses.
  ``--config seed`` measures the seed's recipe instead (resize 300, rotation 50, shear
  0.5, white fill, random 224, mirror; the raw side: decoders.image ->
  resize(resize_shorter) -> warp_affine with DALI's random transforms ->
  crop_mirror_normalize, see ``raw_seed_graph``);
- ``gpurec.Pipeline(..., backend="cpu")`` (OpenCV and NumPy);
- the decode limit: ``cv2.imdecode`` of the payloads held in memory, one thread and a
  pool of ``--threads`` threads (each thread decodes its share of the list);
- MXNet 1.9.1's ``ImageRecordIter`` (in a side venv, ``--mxnet-python``);
- torchvision's ``ImageFolder`` + ``DataLoader`` on JPEG files (side venv,
  ``--torch-python``): the original files and the 256-short-side payloads as files;

on 256-short-side records (``gpurec.pack.pack(..., resize=256)``) and, with ``--full``,
on the original-size files packed with ``pass_through=True``. It also measures startup
(construction to first batch) on a 100k-record data set, and the resident memory after
every epoch of every run (VmRSS, and the peak VmHWM, from /proc/self/status); the
"RSS range" column is max - min of VmRSS over epochs 2..E (``--epochs 10`` for the
issue's "flat over 10 epochs").

Throughput counts the images handed to the caller per second over epochs 2..E (epoch
1, which holds start-up and warm-up, is reported apart). The data set has a multiple of
64 images (2048 by default), so that every method reads the same number of batches
per epoch and no method pays for a partial batch. The machine may be shared: a run
during which other processes kept more than ``--max-foreign`` of the cores busy (from
/proc/stat, less the run's own CPU time) is shown but not counted.

    .venv/bin/python benchmarks/bench_load.py                  # everything, 3 rounds
    .venv/bin/python benchmarks/bench_load.py --only gpurec-cpu,dali-raw,startup

The side venvs: ``python3 -m venv /tmp/mxnet-venv && /tmp/mxnet-venv/bin/pip install
mxnet==1.9.1 "numpy<1.24" opencv-python-headless``; ``python3 -m venv /tmp/tv-venv &&
/tmp/tv-venv/bin/pip install torch==2.14.1 torchvision==0.29.1``. A method whose venv is
missing is reported as skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import cv2
import numpy as np

MEAN = (123.68, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
TRAIN = dict(
    crop="random_resized",
    min_random_area=0.08,
    max_random_area=1.0,
    min_aspect_ratio=3 / 4,
    max_aspect_ratio=4 / 3,
    rand_mirror=True,
    mean=MEAN,
    std=STD,
)
# The project's seed (MXNet's ImageRecordIter recipe): shorter edge to 300, rotation and
# shear of the whole image filled with white, a random 224 window at that resolution.
SEED = dict(  # configs/pets-imagerecorditer.yaml's geometry, in Pipeline keywords
    crop="random",
    resize=300,
    interp="linear",  # MXNet's inter_method=1 (the default), OpenCV's INTER_LINEAR
    rand_mirror=True,
    max_rotate_angle=50,
    max_shear_ratio=0.5,
    fill_value=255,
    mean=MEAN,
    std=STD,
)
CONFIGS = {"train": TRAIN, "seed": SEED}
DATASET_VERSION = 1
MARKER = ".bench_load.json"

# ------------------------------------------------------------------------- the data set


def photo(seed: int) -> np.ndarray:
    """A photo-like BGR image of about 500x375: a smooth colour field, blotchy texture at
    two scales, a few soft shapes, a little blur and sensor-like noise. Quality-90 JPEGs
    of these come out at 40-90 KB, like ImageNet photos of that size."""
    rng = np.random.default_rng(seed)
    w, h = 500, int(rng.choice([333, 375, 375, 375, 400]))
    if rng.random() < 0.2:
        w, h = h, w  # some portraits
    field = rng.uniform(20, 235, (int(rng.integers(2, 6)), int(rng.integers(2, 7)), 3))
    img = cv2.resize(field.astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    for cell, amp in ((24, 20.0), (6, 9.0)):
        small = rng.normal(0, 1, (h // cell + 2, w // cell + 2, 1)).astype(np.float32)
        tint = rng.normal(0, 0.4, (h // cell + 2, w // cell + 2, 3)).astype(np.float32)
        img += amp * cv2.resize(small + tint, (w, h), interpolation=cv2.INTER_CUBIC)
    canvas = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(3, 9))):
        layer = canvas.copy()
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        center = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        if rng.random() < 0.5:
            axes = (int(rng.integers(8, 110)), int(rng.integers(8, 110)))
            cv2.ellipse(
                layer, center, axes, float(rng.uniform(0, 180)), 0, 360, color, -1, cv2.LINE_AA
            )
        else:
            pts = rng.integers(0, (w, h), (int(rng.integers(3, 6)), 2)).astype(np.int32)
            cv2.fillPoly(layer, [pts], color, cv2.LINE_AA)
        alpha = float(rng.uniform(0.35, 0.95))
        canvas = cv2.addWeighted(layer, alpha, canvas, 1 - alpha, 0)
    canvas = cv2.GaussianBlur(canvas, (0, 0), float(rng.uniform(0.7, 1.8)))
    noise = rng.standard_normal(canvas.shape, dtype=np.float32) * float(rng.uniform(5.0, 13.0))
    return cv2.add(canvas, noise, dtype=cv2.CV_8U)


def _write_photo(job: tuple[str, int]) -> int:
    path, seed = job
    cv2.setNumThreads(1)
    ok, buf = cv2.imencode(".jpg", photo(seed), [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise RuntimeError(f"cannot encode {path}")
    Path(path).write_bytes(buf.tobytes())
    return len(buf)


def ensure_images(root: Path, count: int, classes: int, seed: int) -> list[Path]:
    params = {"version": DATASET_VERSION, "images": count, "classes": classes, "seed": seed}
    files = [root / f"class_{i % classes:02d}" / f"img_{i:05d}.jpg" for i in range(count)]
    marker = root / MARKER
    if (
        marker.is_file()
        and json.loads(marker.read_text()) == params
        and all(f.is_file() for f in files)
    ):
        return files
    if root.exists():
        shutil.rmtree(root)
    for k in range(classes):
        (root / f"class_{k:02d}").mkdir(parents=True)
    start = time.perf_counter()
    jobs = [(str(f), seed * 1_000_003 + i) for i, f in enumerate(files)]
    with get_context("fork").Pool(os.cpu_count() or 1) as pool:
        sizes = pool.map(_write_photo, jobs, chunksize=16)
    marker.write_text(json.dumps(params))
    log(
        f"generated {count} images in {time.perf_counter() - start:.0f} s under {root}: "
        f"{min(sizes) / 1024:.0f}-{max(sizes) / 1024:.0f} KB, mean "
        f"{sum(sizes) / len(sizes) / 1024:.0f} KB"
    )
    return files


def ensure_pack(images: Path, prefix: Path, count: int, **options) -> Path:
    """``prefix.rec`` packed from ``images`` with ``options`` (reused when up to date)."""
    from gpurec.pack import pack

    stamp = prefix.with_name(prefix.name + MARKER)
    want = {"images": count, "options": options, "source": str(images)}
    rec = prefix.with_suffix(".rec")
    if rec.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == want:
        return rec
    summary = pack(images, prefix, shuffle=True, **options)
    if summary.images != count or summary.skipped:
        raise RuntimeError(f"packing {prefix} gave {summary.images} images of {count}")
    stamp.write_text(json.dumps(want))
    log(
        f"packed {prefix} ({options}) in {summary.seconds:.1f} s: "
        f"{summary.bytes / count / 1024:.0f} KB a record"
    )
    return rec


def ensure_files_from_records(rec: Path, out: Path, classes: int) -> Path:
    """The payloads of ``rec`` as an ImageFolder tree (for torchvision on the same bytes)."""
    from gpurec.recordio import RecordReader

    stamp = out / MARKER
    want = {"rec": str(rec), "mtime": rec.stat().st_mtime}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return out
    if out.exists():
        shutil.rmtree(out)
    for k in range(classes):
        (out / f"class_{k:02d}").mkdir(parents=True)
    with RecordReader(rec) as reader:
        for i in range(len(reader)):
            header, payload = reader.unpack(i)
            (out / f"class_{int(header.label):02d}" / f"r{i:05d}.jpg").write_bytes(payload)
    stamp.write_text(json.dumps(want))
    return out


def ensure_startup_set(prefix: Path, records: int) -> Path:
    """``records`` tiny records (one ~2 KB JPEG repeated), written with RecordWriter."""
    from gpurec.recordio import IRHeader, RecordWriter, pack

    rec, idx = prefix.with_suffix(".rec"), prefix.with_suffix(".idx")
    stamp = prefix.with_name(prefix.name + MARKER)
    if rec.is_file() and idx.is_file() and stamp.is_file() and stamp.read_text() == str(records):
        return rec
    prefix.parent.mkdir(parents=True, exist_ok=True)
    jpeg = cv2.imencode(".jpg", cv2.resize(photo(7), (64, 48)), [cv2.IMWRITE_JPEG_QUALITY, 90])
    payload = jpeg[1].tobytes()
    with RecordWriter(rec, idx) as writer:
        for i in range(records):
            writer.write(pack(IRHeader(0, float(i % 1000), i, 0), payload), key=i)
    stamp.write_text(str(records))
    log(f"wrote {records} records of {len(payload)} B for the startup test: {rec}")
    return rec


# ---------------------------------------------------------------------- measurements
# Each runs in its own process (``--child``) and prints one JSON line.


def proc_status() -> dict[str, float]:
    """VmRSS, VmHWM and RssAnon of this process in MiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon"):
            out[key] = int(value.split()[0]) / 1024
    return out


class Epochs:
    """Per-epoch wall times and memory of a run."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.images: list[int] = []
        self.rss: list[float] = []
        self.hwm: list[float] = []
        self.anon: list[float] = []

    def add(self, seconds: float, images: int) -> None:
        status = proc_status()
        self.times.append(seconds)
        self.images.append(images)
        self.rss.append(round(status["VmRSS"], 1))
        self.hwm.append(round(status["VmHWM"], 1))
        self.anon.append(round(status["RssAnon"], 1))

    def result(self, **extra) -> dict:
        steady = slice(1, None) if len(self.times) > 1 else slice(None)
        rate = sum(self.images[steady]) / sum(self.times[steady])
        return {
            "rate": rate,
            "first_epoch_rate": self.images[0] / self.times[0],
            "epoch_times": [round(t, 3) for t in self.times],
            "images_per_epoch": self.images[0],
            "images": self.images,
            "rss": self.rss,
            "hwm": self.hwm,
            "anon": self.anon,
            **extra,
        }


def child_gpurec(a: argparse.Namespace) -> dict:
    import gpurec

    t0 = time.perf_counter()
    pipe = gpurec.Pipeline(
        a.source,
        a.batch_size,
        (3, 224, 224),
        device="cpu",
        backend=a.backend,
        num_threads=a.threads,
        seed=1,
        **CONFIGS[a.config],
    )
    if a.cpu_alt:  # another version of gpurec/backends/cpu.py, for before/after runs
        import importlib.util

        spec = importlib.util.spec_from_file_location("cpu_alt", a.cpu_alt)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        pipe.backend.close()
        pipe.backend = module.CPUBackend(pipe)
    built = time.perf_counter() - t0
    epochs = Epochs()
    first = None
    for _ in range(a.epochs):
        start, n = time.perf_counter(), 0
        for data, label in pipe:
            if first is None:
                first = time.perf_counter() - t0
            assert data.shape[1:] == (3, 224, 224) and data.dtype == np.float32
            n += len(label)
        epochs.add(time.perf_counter() - start, n)
    pipe.close()
    return epochs.result(build_s=built, first_batch_s=first)


def raw_seed_graph(fn, types, images):
    """The seed's augmentation as a DALI user writes it, with DALI's random operators:
    shorter edge to 300, one warp (rotation and shear about the centre, then a random 224
    window's offset) filled with white straight to 224 x 224, mirror, normalise. gpurec's
    graph for SEED runs the same operators (resize, warp_affine, crop_mirror_normalize)
    with its own parameters fed through external_source."""
    # interp="linear" is OpenCV's INTER_LINEAR, which does not antialias: DALI's resize
    # does by default, so the same graph turns it off.
    images = fn.resize(images, resize_shorter=300, antialias=False)
    shape = fn.cast(fn.shapes(images), dtype=types.FLOAT)
    height, width = shape[0], shape[1]
    center = fn.stack(width * 0.5, height * 0.5)
    angle = fn.random.uniform(range=(-50.0, 50.0))
    shear = fn.stack(fn.random.uniform(range=(-0.5, 0.5)), types.Constant(0.0))
    offset = fn.stack(
        -fn.random.uniform(range=(0.0, 1.0)) * (width - 224),
        -fn.random.uniform(range=(0.0, 1.0)) * (height - 224),
    )
    matrix = fn.transforms.combine(
        fn.transforms.rotation(angle=angle, center=center),
        fn.transforms.shear(shear=shear, center=center),
        fn.transforms.translation(offset=offset),
    )
    return fn.warp_affine(
        images, matrix=matrix, size=(224, 224), fill_value=255.0, inverse_map=False
    )


def child_dali_raw(a: argparse.Namespace) -> dict:
    from nvidia.dali import fn, pipeline_def, types

    rec = Path(a.source)

    @pipeline_def(
        batch_size=a.batch_size,
        num_threads=a.threads,
        device_id=None,
        seed=1,
        prefetch_queue_depth=2,
        exec_dynamic=None if a.exec_dynamic == "default" else False,
    )
    def raw():
        jpegs, labels = fn.readers.mxnet(
            path=[str(rec)],
            index_path=[str(rec.with_suffix(".idx"))],
            random_shuffle=True,
            pad_last_batch=True,
            name="reader",
        )
        if a.config == "seed":
            images = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
            images = raw_seed_graph(fn, types, images)
        else:  # gpurec: decoders.image_slice of its window, resize with an ROI
            images = fn.decoders.image_random_crop(
                jpegs,
                device="cpu",
                output_type=types.RGB,
                random_area=[0.08, 1.0],
                random_aspect_ratio=[3 / 4, 4 / 3],
                num_attempts=10,
            )
            images = fn.resize(images, resize_x=224, resize_y=224, antialias=False)
        images = fn.crop_mirror_normalize(
            images,
            dtype=types.FLOAT,
            output_layout="CHW",
            mean=list(MEAN),
            std=list(STD),
            mirror=fn.random.coin_flip(probability=0.5),
        )
        return images, labels

    t0 = time.perf_counter()
    pipe = raw()
    pipe.build()
    built = time.perf_counter() - t0
    meta = pipe.reader_meta("reader")
    runs = math.ceil(meta["epoch_size_padded"] / a.batch_size)
    epochs = Epochs()
    first = None
    for _ in range(a.epochs):
        start, n = time.perf_counter(), 0
        for _ in range(runs):
            images, labels = pipe.run()
            data, label = images.as_array(), labels.as_array()
            if first is None:
                first = time.perf_counter() - t0
            assert data.shape[1:] == (3, 224, 224) and data.dtype == np.float32
            n += len(label)
        epochs.add(time.perf_counter() - start, n)
    return epochs.result(build_s=built, first_batch_s=first)


def child_decode(a: argparse.Namespace) -> dict:
    """cv2.imdecode (full size, BGR) of every payload, held in memory: the decode limit."""
    from gpurec.recordio import RecordReader

    cv2.setNumThreads(1)
    with RecordReader(a.source) as reader:
        payloads = [np.frombuffer(reader.unpack(i)[1], np.uint8) for i in range(len(reader))]

    def work(part: list[np.ndarray]) -> int:
        for p in part:
            cv2.imdecode(p, cv2.IMREAD_COLOR)
        return len(part)

    epochs = Epochs()
    with ThreadPoolExecutor(a.threads) as pool:
        for _ in range(a.epochs):
            start = time.perf_counter()
            parts = [payloads[k :: a.threads] for k in range(a.threads)]
            n = sum(pool.map(work, parts))
            epochs.add(time.perf_counter() - start, n)
    return epochs.result()


def child_startup(a: argparse.Namespace) -> dict:
    """Construction and first batch on the 100k-record set, in a fresh process: the first
    Pipeline ("cold": it imports DALI, for that backend) and a second one ("warm"), then
    the index's parts alone."""
    import gpurec
    from gpurec.dataset import Dataset
    from gpurec.recordio import read_idx

    rec = Path(a.source)
    out = {}
    for run in ("cold", "warm"):
        t0 = time.perf_counter()
        pipe = gpurec.Pipeline(
            rec, a.batch_size, (3, 224, 224), device="cpu", backend=a.backend,
            num_threads=a.threads, **TRAIN,
        )  # fmt: skip
        out[f"{run}_build_s"] = time.perf_counter() - t0
        next(iter(pipe))
        out[f"{run}_first_batch_s"] = time.perf_counter() - t0
        pipe.close()
    t0 = time.perf_counter()
    read_idx(rec.with_suffix(".idx"))
    out["read_idx_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    Dataset([rec]).close()
    out["dataset_s"] = time.perf_counter() - t0
    return out


MXNET_SCRIPT = """
import json, sys, time
import mxnet as mx
a = json.loads(sys.argv[1])
def status():
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            out[k] = round(int(v.split()[0]) / 1024, 1)
    return out
t0 = time.perf_counter()
# MXNet 1.9.1 applies the area and aspect ranges only with random_resized_crop=True, which
# refuses rand_crop=True (it is a crop of its own): this is its random-resized crop.
it = mx.io.ImageRecordIter(
    path_imgrec=a["rec"], path_imgidx=a["idx"], data_shape=(3, 224, 224),
    batch_size=a["batch_size"], random_resized_crop=True,
    min_random_area=0.08, max_random_area=1.0, min_aspect_ratio=0.75, max_aspect_ratio=1.333,
    rand_mirror=True, mean_r=123.68, mean_g=116.28, mean_b=103.53, std_r=58.395,
    std_g=57.12, std_b=57.375, preprocess_threads=a["threads"], shuffle=True, ctx="cpu",
    verbose=False,
)
times, images, rss, hwm, first = [], [], [], [], None
for epoch in range(a["epochs"]):
    if epoch:
        it.reset()
    start, n = time.perf_counter(), 0
    for batch in it:
        batch.data[0].wait_to_read()
        if first is None:
            first = time.perf_counter() - t0
        n += batch.data[0].shape[0] - batch.pad
    times.append(time.perf_counter() - start)
    images.append(n)
    s = status()
    rss.append(s["VmRSS"]); hwm.append(s["VmHWM"])
print(json.dumps({"times": times, "images": images, "rss": rss, "hwm": hwm,
                  "first_batch_s": first, "version": mx.__version__}))
"""

TORCH_SCRIPT = """
import json, sys, time
import torch, torchvision
from torchvision import datasets, transforms
a = json.loads(sys.argv[1])
def status():
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            out[k] = round(int(v.split()[0]) / 1024, 1)
    return out
t0 = time.perf_counter()
tf = transforms.Compose([
    transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
    transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
])
ds = datasets.ImageFolder(a["root"], tf)
dl = torch.utils.data.DataLoader(ds, batch_size=a["batch_size"], shuffle=True,
                                 num_workers=a["threads"], drop_last=True,
                                 persistent_workers=True)
times, images, rss, hwm, first = [], [], [], [], None
for epoch in range(a["epochs"]):
    start, n = time.perf_counter(), 0
    for data, label in dl:
        if first is None:
            first = time.perf_counter() - t0
        n += len(label)
    times.append(time.perf_counter() - start)
    images.append(n)
    s = status()
    rss.append(s["VmRSS"]); hwm.append(s["VmHWM"])
print(json.dumps({"times": times, "images": images, "rss": rss, "hwm": hwm,
                  "first_batch_s": first,
                  "version": f"torch {torch.__version__}, torchvision {torchvision.__version__}"}))
"""


def run_side(python: str, script: str, args: dict, timeout: float = 900) -> dict:
    proc = subprocess.run(
        [python, "-c", script, json.dumps(args)], capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode:
        raise RuntimeError(f"{python} failed:\n{proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    epochs = Epochs()
    epochs.times, epochs.images = out["times"], out["images"]
    epochs.rss, epochs.hwm = out["rss"], out["hwm"]
    return epochs.result(first_batch_s=out["first_batch_s"], version=out["version"])


def run_child(kind: str, **kw) -> dict:
    args = [sys.executable, __file__, "--child", kind]
    for key, value in kw.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=900)
    if proc.returncode:
        raise RuntimeError(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- driver


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cpu_busy(seconds: float = 0.5) -> float:
    """Share of all cores busy over ``seconds`` (from /proc/stat), 0..1."""

    def sample() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = values[3] + values[4]
        return sum(values) - idle, sum(values)

    busy0, total0 = sample()
    time.sleep(seconds)
    busy1, total1 = sample()
    return (busy1 - busy0) / max(total1 - total0, 1)


def cpu_ticks() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat (steal
    counts as busy: another VM had the core)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    idle = values[3] + values[4]
    total = sum(values[:8])
    return (total - idle) / hz, total / hz


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measured(run) -> dict:
    """Run ``run()`` (a child process) and add what else the machine did meanwhile:
    ``foreign`` is the share of all cores busy with other processes (0..1)."""
    busy0, total0 = cpu_ticks()
    own0, t0 = children_cpu(), time.perf_counter()
    r = run()
    busy1, total1 = cpu_ticks()
    own = children_cpu() - own0
    r["cpu_s"] = own
    r["foreign"] = max(0.0, (busy1 - busy0 - own) / max(total1 - total0, 1e-9))
    r["wall_s"] = time.perf_counter() - t0
    return r


def wait_quiet(threshold: float = 0.1, max_wait: float = 120) -> float:
    """Wait until the machine is idle (another user's work skews a run); the wait in s."""
    start = time.perf_counter()
    while cpu_busy() > threshold and time.perf_counter() - start < max_wait:
        pass
    return time.perf_counter() - start


def methods(a: argparse.Namespace, paths: dict) -> dict[str, tuple]:
    """name -> (description, data set, how to run it)."""
    common = dict(batch_size=a.batch_size, threads=a.threads, epochs=a.epochs, config=a.config)
    out: dict[str, tuple] = {}
    sets = [("", "r256")] + ([("full:", "full")] if a.full else [])
    for tag, key in sets:
        rec = paths[key]
        out[f"{tag}gpurec-dali"] = (
            "gpurec.Pipeline backend='dali' (CPU mode)",
            key,
            lambda rec=rec: run_child("gpurec", source=rec, backend="dali", **common),
        )
        out[f"{tag}dali-raw"] = (
            "same graph written in DALI directly",
            key,
            lambda rec=rec: run_child("dali-raw", source=rec, **common),
        )
        out[f"{tag}dali-raw-static"] = (
            "the same, on DALI's static executor (exec_dynamic=False, as gpurec's graph)",
            key,
            lambda rec=rec: run_child("dali-raw", source=rec, exec_dynamic="off", **common),
        )
        out[f"{tag}gpurec-cpu"] = (
            "gpurec.Pipeline backend='cpu' (OpenCV)",
            key,
            lambda rec=rec: run_child("gpurec", source=rec, backend="cpu", **common),
        )
        if a.cpu_alt:
            out[f"{tag}gpurec-cpu-alt"] = (
                f"the same with the CPU backend of {a.cpu_alt}",
                key,
                lambda rec=rec: run_child(
                    "gpurec", source=rec, backend="cpu", cpu_alt=a.cpu_alt, **common
                ),
            )
        if a.mxnet_python and Path(a.mxnet_python).exists():
            args = {
                "rec": str(rec),
                "idx": str(rec.with_suffix(".idx")),
                "batch_size": a.batch_size,
                "threads": a.threads,
                "epochs": a.epochs,
            }
            out[f"{tag}mxnet"] = (
                "MXNet ImageRecordIter",
                key,
                lambda args=args: run_side(a.mxnet_python, MXNET_SCRIPT, args),
            )
        if a.torch_python and Path(a.torch_python).exists():
            root = paths["r256-files" if key == "r256" else "images"]
            args = {
                "root": str(root),
                "batch_size": a.batch_size,
                "threads": a.threads,
                "epochs": a.epochs,
            }
            out[f"{tag}torchvision"] = (
                "torchvision ImageFolder + DataLoader (JPEG files)",
                key,
                lambda args=args: run_side(a.torch_python, TORCH_SCRIPT, args),
            )
        if key == "r256":
            out["decode-1t"] = (
                "cv2.imdecode only, 1 thread",
                key,
                lambda rec=rec: run_child("decode", source=rec, threads=1, epochs=a.epochs),
            )
            out["decode-pool"] = (
                f"cv2.imdecode only, {a.threads} threads",
                key,
                lambda rec=rec: run_child("decode", source=rec, threads=a.threads, epochs=a.epochs),
            )
    return out


def fmt_rate(values: list[float]) -> str:
    return f"{statistics.median(values):.0f}" if values else "-"


def counted(r: dict) -> list[float]:
    """The rates of the runs that count, or of all runs when none does."""
    return r["rates"] or [run["rate"] for run in r["runs"]]


def table(results: dict, names: dict[str, tuple], rounds: int) -> str:
    def median_of(name: str) -> float | None:
        r = results.get(name)
        return statistics.median(counted(r)) if r and r["runs"] else None

    ref = {key: median_of(f"{tag}dali-raw") for tag, key in (("", "r256"), ("full:", "full"))}
    mx = {key: median_of(f"{tag}mxnet") for tag, key in (("", "r256"), ("full:", "full"))}
    lines = [
        "| method | records | images/s (median) | each run | vs raw DALI | vs MXNet | "
        "1st epoch img/s | CPU ms/img | RSS after each epoch (MiB) | RSS range epochs 2.. "
        "(MiB, each run) | peak RSS (MiB) |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | --- | --- | ---: |",
    ]
    for name, (desc, key, _) in names.items():
        r = results.get(name)
        if not r or not r["runs"]:
            lines.append(f"| {name}: {desc} | {key} | skipped | | | | | | | | |")
            continue
        rate = median_of(name)
        each = ", ".join(
            f"{run['rate']:.0f}" + ("" if run["rate"] in r["rates"] else "*") for run in r["runs"]
        )
        vs_dali = f"{rate / ref[key]:.2f}x" if ref.get(key) else "-"
        vs_mx = f"{rate / mx[key]:.2f}x" if mx.get(key) else "-"
        good = [run for run in r["runs"] if run["rate"] in r["rates"]] or r["runs"]
        last = good[-1]
        first = statistics.median(run["first_epoch_rate"] for run in good)
        cpu = statistics.median(run["cpu_s"] / sum(run["images"]) * 1e3 for run in good)
        rss = " / ".join(f"{v:.0f}" for v in last["rss"])
        spread = ", ".join(
            f"{max(run['rss'][1:]) - min(run['rss'][1:]):.0f}"
            for run in r["runs"]
            if run["rss"][1:]
        )
        lines.append(
            f"| {name}: {desc} | {key} | {rate:.0f} | {each} | {vs_dali} | {vs_mx} | "
            f"{first:.0f} | {cpu:.2f} | {rss} | {spread} | "
            f"{max(max(run['hwm']) for run in good):.0f} |"
        )
    return "\n".join(lines)


def machine() -> str:
    model = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    import nvidia.dali

    return (
        f"{os.cpu_count()} cores ({model}), Python {platform.python_version()}, "
        f"DALI {nvidia.dali.__version__}, OpenCV {cv2.__version__}, "
        f"NumPy {np.__version__}"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--workdir", type=Path, default=Path("/tmp/gpurec-loadbench"))
    p.add_argument("--images", type=int, default=2048, help="images in the data set")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0, help="data set seed")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="num_threads / preprocess_threads / num_workers",
    )
    p.add_argument("--epochs", type=int, default=5, help="epochs per run (1st = warm-up)")
    p.add_argument("--rounds", type=int, default=3, help="round-robin passes over the methods")
    p.add_argument("--only", help="comma-separated method names (default: all)")
    p.add_argument(
        "--full",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure the full-size (pass-through) records",
    )
    p.add_argument(
        "--startup-records",
        type=int,
        default=100_000,
        help="records of the startup test (0 skips it)",
    )
    p.add_argument("--mxnet-python", default="/tmp/mxnet-venv/bin/python")
    p.add_argument("--torch-python", default="/tmp/tv-venv/bin/python")
    p.add_argument(
        "--quiet",
        type=float,
        default=0.15,
        help="start each run when the machine is at most this busy (0..1)",
    )
    p.add_argument(
        "--max-foreign",
        type=float,
        default=0.05,
        help="runs during which other processes kept more than this share of "
        "the cores busy are reported but not counted (0..1)",
    )
    p.add_argument(
        "--cpu-alt",
        help="also run gpurec-cpu with the CPUBackend of this file (another version of "
        "gpurec/backends/cpu.py, e.g. from git show REV:gpurec/backends/cpu.py)",
    )
    p.add_argument(
        "--config",
        choices=sorted(CONFIGS),
        default="train",
        help="the augmentation: 'train' (random-resized crop 224, mirror, normalise) or "
        "'seed' (the seed's ImageRecordIter recipe: resize 300, rotate, shear, random 224)",
    )
    p.add_argument("--json", type=Path, help="also write all results here")
    # child mode (internal)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--source", help=argparse.SUPPRESS)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    p.add_argument("--exec-dynamic", default="default", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    if a.child:
        run = {
            "gpurec": child_gpurec,
            "dali-raw": child_dali_raw,
            "decode": child_decode,
            "startup": child_startup,
        }[a.child]
        print(json.dumps(run(a)))
        return 0
    if a.images % a.batch_size:
        log(f"note: {a.images} images is not a multiple of the batch size {a.batch_size}")
    work = a.workdir
    images = ensure_images(work / "images", a.images, a.classes, a.seed)
    paths = {
        "images": work / "images",
        "r256": ensure_pack(
            work / "images", work / "r256" / "data", len(images), resize=256, workers=2
        ),
    }
    if a.full:
        paths["full"] = ensure_pack(
            work / "images", work / "full" / "data", len(images), pass_through=True, workers=2
        )
    paths["r256-files"] = ensure_files_from_records(paths["r256"], work / "r256-files", a.classes)
    names = methods(a, paths)
    if a.only:
        wanted = a.only.split(",")
        unknown = sorted(set(wanted) - set(names) - {"startup"})
        if unknown:
            raise SystemExit(f"unknown method(s) {unknown}; known: {sorted(names)}")
        names = {k: v for k, v in names.items() if k in wanted}
    results: dict[str, dict] = {name: {"rates": [], "runs": []} for name in names}
    for rnd in range(a.rounds):
        for name, (_, _, run) in names.items():
            waited = wait_quiet(a.quiet)
            try:
                r = measured(run)
            except Exception as exc:  # a side venv that fails: report, go on
                log(f"round {rnd + 1} {name}: FAILED {str(exc)[-800:]}")
                continue
            results[name]["runs"].append(r)
            if r["foreign"] <= a.max_foreign:
                results[name]["rates"].append(r["rate"])
            log(
                f"round {rnd + 1} {name}: {r['rate']:.0f} images/s "
                f"(epochs {r['epoch_times']} s, RSS {r['rss']} MiB, waited {waited:.0f} s, "
                f"others busy {100 * r['foreign']:.0f}%"
                f"{'' if r['foreign'] <= a.max_foreign else ': NOT COUNTED'})"
            )

    startup = {}
    if a.startup_records and (not a.only or "startup" in a.only.split(",")):
        rec = ensure_startup_set(work / "startup" / "data", a.startup_records)
        for backend in ("dali", "cpu"):
            runs = []
            for _ in range(3):
                wait_quiet(a.quiet)
                runs.append(
                    run_child(
                        "startup",
                        source=rec,
                        backend=backend,
                        batch_size=a.batch_size,
                        threads=a.threads,
                    )
                )
            startup[backend] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            log(f"startup {backend}: {startup[backend]}")

    print(f"\n{machine()}\n")
    print(
        f"{a.images} images, batch {a.batch_size}, threads {a.threads}, {a.epochs} epochs a "
        f"run (images/s over epochs 2..{a.epochs}), {a.rounds} round(s)\n"
    )
    print(table(results, names, a.rounds))
    print(
        f"\n(*: other processes kept more than {100 * a.max_foreign:.0f}% of the cores busy "
        "during that run: shown, not counted. Medians, 1st-epoch rates, CPU and peak RSS "
        "are over the counted runs; RSS after each epoch is from the last counted run. "
        "CPU ms/img: CPU time of the whole run (all its processes), start-up included, "
        "over the images it handed out. torchvision's RSS is the main process only: "
        "its DataLoader workers are processes of their own.)"
    )
    if startup:
        print(f"\nStartup on {a.startup_records} records (median of 3 fresh processes, s):\n")
        print(
            "| backend | first Pipeline: construction | first Pipeline: to first batch | "
            "second Pipeline: construction | second: to first batch | read_idx | Dataset |"
        )
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for backend, t in startup.items():
            print(
                f"| {backend} | {t['cold_build_s']:.3f} | {t['cold_first_batch_s']:.3f} | "
                f"{t['warm_build_s']:.3f} | {t['warm_first_batch_s']:.3f} | "
                f"{t['read_idx_s']:.3f} | {t['dataset_s']:.3f} |"
            )
    if a.json:
        a.json.write_text(
            json.dumps({"machine": machine(), "results": results, "startup": startup}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
