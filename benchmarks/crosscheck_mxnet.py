"""Cross-check ``gpurec im2rec`` against MXNet 1.9.1's ``tools/im2rec.py``, file by file.

Builds a small tree (60 images: ``cat/`` with a nested ``cat/kitten/``, ``dog/``,
``fish/``; portrait and landscape JPEGs, an upper-case ``.JPG`` with a space in its name,
a PNG, an RGBA PNG, a grayscale JPEG, a JPEG with EXIF orientation 6, a ``.txt`` and an
empty folder), runs the same im2rec command lines through both tools into separate
folders, and prints what matched and what did not:

1. ``--list --recursive --chunks 2 --train-ratio 0.7 --test-ratio 0.1`` (shuffled):
   every ``.lst`` byte for byte; then more list options.
2. ``--pass-through --num-thread 1`` (and 2): every ``.rec`` and ``.idx`` byte for byte.
3. ``--resize 64 --center-crop --quality 90`` (and a few other resizes): headers equal,
   decoded sizes equal, mean/max absolute pixel difference of corresponding records;
   and whether MXNet's own algorithm, re-run on this venv's OpenCV, reproduces MXNet's
   bytes (which separates an OpenCV-version effect from a gpurec algorithm effect).
4. ``--pack-label`` on a hand-written 3-label ``.lst`` (and without it), pass-through.
5. Hand-written ``.lst`` files with oddities (CRLF, spaces, short lines, missing files).

Run::

    .venv/bin/python benchmarks/crosscheck_mxnet.py \\
        --mxnet-python /tmp/mxnet-venv/bin/python --im2rec /tmp/im2rec.py
"""

from __future__ import annotations

import argparse
import shutil
import struct
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pack import make_image

from gpurec.recordio import RecordReader, read_lst, unpack

LAYOUT = {"cat": 15, "cat/kitten": 5, "dog": 20, "fish": 20}


# ---------------------------------------------------------------------------- the tree


def _jpeg(img: np.ndarray, quality: int = 90) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def with_exif_orientation(data: bytes, orientation: int) -> bytes:
    """``data`` (a JPEG) with an APP1 Exif segment holding only the Orientation tag."""
    ifd = struct.pack("<H", 1) + struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0)
    tiff = b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0)
    app1 = b"\xff\xe1" + struct.pack(">H", 8 + len(tiff)) + b"Exif\x00\x00" + tiff
    return data[:2] + app1 + data[2:]


def make_tree(root: Path) -> int:
    """The 60-image tree described in the module docstring; returns the image count."""
    shutil.rmtree(root, ignore_errors=True)
    seed, count = 500, 0
    for folder, n in LAYOUT.items():
        (root / folder).mkdir(parents=True)
        for k in range(n):
            img = make_image(seed)
            seed += 1
            if k % 5 == 1:
                img = np.ascontiguousarray(img.transpose(1, 0, 2))  # portrait
            name, data = f"{folder.replace('/', '_')}_{k:03d}.jpg", None
            if (folder, k) == ("dog", 2):
                name = "dog 002 with space.JPG"
            elif (folder, k) == ("dog", 3):
                name, data = "dog_003.png", cv2.imencode(".png", img)[1].tobytes()
            elif (folder, k) == ("dog", 4):
                rgba = cv2.cvtColor(img, cv2.COLOR_BGR2BGRA)
                rgba[..., 3] = 128
                name, data = "dog_004_rgba.png", cv2.imencode(".png", rgba)[1].tobytes()
            elif (folder, k) == ("fish", 2):
                name, data = "fish_002_gray.jpeg", _jpeg(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY))
            elif (folder, k) == ("fish", 3):
                name, data = "fish_003_exif6.jpg", with_exif_orientation(_jpeg(img), 6)
            (root / folder / name).write_bytes(data if data is not None else _jpeg(img))
            count += 1
    (root / "dog" / "notes.txt").write_text("not an image\n")
    (root / "empty").mkdir()
    return count


# ----------------------------------------------------------------------------- helpers


class Tools:
    """The two im2rec command lines, run into sibling folders ``mx/`` and ``gr/``."""

    def __init__(self, mxnet: Sequence[str], gpurec: Sequence[str], work: Path, root: Path):
        self.cmd = {"mx": list(mxnet), "gr": list(gpurec)}
        self.work, self.root = work, root

    def run(
        self, case: str, flags: Sequence[str], lists: Path | None = None, root: Path | None = None
    ) -> dict[str, int]:
        """Run both; ``lists`` (a folder of .lst files) is copied in first. Exit codes.

        stdout goes to ``<case>/<tool>.out``, stdout and stderr to ``<case>/<tool>.log``.
        """
        codes = {}
        for tool, cmd in self.cmd.items():
            out = self.work / case / tool
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            if lists is not None:
                for lst in lists.glob("*.lst"):
                    shutil.copyfile(lst, out / lst.name)
            prefix = out / ("data" if lists is None else _prefix(lists))
            proc = subprocess.run(
                [*cmd, str(prefix), str(root or self.root), *flags], capture_output=True, text=True
            )
            (out.parent / f"{tool}.out").write_text(proc.stdout)
            (out.parent / f"{tool}.log").write_text(proc.stdout + proc.stderr)
            codes[tool] = proc.returncode
        return codes

    def dirs(self, case: str) -> tuple[Path, Path]:
        return self.work / case / "mx", self.work / case / "gr"

    def log(self, case: str, tool: str) -> str:
        return (self.work / case / f"{tool}.log").read_text(errors="replace")


def _prefix(lists: Path) -> str:
    names = sorted(p.name for p in lists.glob("*.lst"))
    return names[0].split("_")[0].removesuffix(".lst")


def compare_files(mx: Path, gr: Path, pattern: str) -> tuple[list[str], list[str]]:
    """(identical names, descriptions of differences) for files matching ``pattern``."""
    same, diff = [], []
    names = sorted({p.name for p in mx.glob(pattern)} | {p.name for p in gr.glob(pattern)})
    for name in names:
        a, b = mx / name, gr / name
        if not (a.exists() and b.exists()):
            diff.append(f"{name} only in {'MXNet' if a.exists() else 'gpurec'}'s output")
            continue
        da, db = a.read_bytes(), b.read_bytes()
        if da == db:
            same.append(name)
            continue
        first = next((i for i, (x, y) in enumerate(zip(da, db, strict=False)) if x != y), None)
        first = min(len(da), len(db)) if first is None else first
        line = da[:first].count(b"\n") + 1
        where = f" (line {line})" if name.endswith((".lst", ".idx")) else ""
        diff.append(
            f"{name}: {len(da)} vs {len(db)} bytes, first difference at byte offset {first}{where}"
        )
    return same, diff


def _decode(payload: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR).astype(np.int16)


def mxnet_algorithm(path: Path, resize: int, crop: bool, quality: int) -> bytes:
    """im2rec.py's image_encode (imread, crop, bilinear resize, imencode) on this OpenCV."""
    img = cv2.imread(str(path), 1)
    if crop:
        h, w = img.shape[:2]
        m = abs(h - w) // 2
        img = img[m : m + w] if h > w else img[:, m : m + h]
    if resize:
        h, w = img.shape[:2]
        img = cv2.resize(img, (resize, h * resize // w) if h > w else (w * resize // h, resize))
    return cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()


def compare_pixels(tools: Tools, case: str, resize: int, crop: bool, quality: int) -> list[str]:
    """Record-by-record comparison of two re-encoded outputs, as report lines."""
    mx, gr = tools.dirs(case)
    records = headers = shapes = same_bytes = replayed = 0
    mads, worst, shape_diffs = [], [], []
    for rec in sorted(mx.glob("*.rec")):
        paths = {e.index: e.path for e in read_lst(rec.with_suffix(".lst"))}
        with RecordReader(rec) as ra, RecordReader(gr / rec.name) as rb:
            assert len(ra) == len(rb) and list(ra.keys) == list(rb.keys), rec.name
            for i in range(len(ra)):
                (ha, pa), (hb, pb) = unpack(ra[i]), unpack(rb[i])
                records += 1
                headers += (ha.flag, ha.label, ha.id, ha.id2) == (hb.flag, hb.label, hb.id, hb.id2)
                same_bytes += pa == pb
                path = paths[ha.id]
                replayed += mxnet_algorithm(tools.root / path, resize, crop, quality) == pa
                ia, ib = _decode(pa), _decode(pb)
                if ia.shape != ib.shape:
                    shape_diffs.append(f"{path}: MXNet {ia.shape[1::-1]} gpurec {ib.shape[1::-1]}")
                    continue
                shapes += 1
                d = np.abs(ia - ib)
                mads.append(float(d.mean()))
                worst.append((float(d.mean()), int(d.max()), path))
    lines = [
        f"{records} records in {len(list(mx.glob('*.rec')))} .rec files; IRHeaders equal "
        f"{headers}/{records}; payload bytes equal {same_bytes}/{records}; decoded sizes equal "
        f"{shapes}/{records}" + (f" ({'; '.join(shape_diffs)})" if shape_diffs else "")
    ]
    if mads:
        lines.append(
            f"pixels (0-255, all channels): per-record MAD mean {np.mean(mads):.2f}, "
            f"median {np.median(mads):.2f}, range {min(mads):.2f}-{max(mads):.2f}; "
            f"largest single difference {max(w[1] for w in worst)}"
        )
        top = sorted(worst, reverse=True)[:3]
        lines.append("worst: " + "; ".join(f"{p} (mean {m:.2f}, max {x})" for m, x, p in top))
    lines.append(
        f"MXNet's algorithm re-run here on OpenCV {cv2.__version__} reproduces MXNet's payload "
        f"bytes for {replayed}/{records} records"
    )
    return lines


# ------------------------------------------------------------------------------ checks


def check_lists(tools: Tools, report: list[str]) -> Path:
    flags = ["--list", "--recursive", "--chunks", "2", "--train-ratio", "0.7"]
    flags += ["--test-ratio", "0.1"]
    codes = tools.run("lists", flags)
    same, diff = compare_files(*tools.dirs("lists"), "*.lst")
    report.append(f"### 1. `{' '.join(flags)}` (exit codes {codes})")
    report.append(f"- identical: {len(same)} .lst files: {', '.join(same)}")
    report += [f"- DIFFERENT: {d}" for d in diff]
    printed = {
        t: (tools.work / "lists" / f"{t}.out").read_text().splitlines() for t in ("mx", "gr")
    }
    alike = printed["mx"] == printed["gr"][: len(printed["mx"])]
    report.append(
        f"- folder -> label lines on stdout alike: {alike} (MXNet: {'; '.join(printed['mx'])})"
    )
    report.append("- the list variants below run on a copy of the tree with 2 root-level images:")
    flat = tools.work / "tree-with-root-files"
    shutil.rmtree(flat, ignore_errors=True)
    shutil.copytree(tools.root, flat)
    shutil.copyfile(tools.root / "cat" / "cat_000.jpg", flat / "root_a.jpg")
    shutil.copyfile(tools.root / "dog" / "dog_003.png", flat / "root_b.PNG")
    variants = [
        ["--recursive", "--no-shuffle"],
        [],
        ["--no-shuffle"],
        ["--recursive", "--chunks", "3", "--train-ratio", "0.8"],
        ["--recursive", "--chunks", "4", "--train-ratio", "0.5", "--test-ratio", "0.3"],
        ["--recursive", "--chunks", "70"],
        ["--recursive", "--exts", ".png"],
        ["--recursive", "--exts", ".JPG"],
        ["--recursive", "--exts", "jpg"],
        ["--recursive", "--test-ratio", "0.2"],
    ]
    for k, extra in enumerate(variants):
        codes = tools.run(f"lists-{k}", ["--list", *extra], root=flat)
        same, diff = compare_files(*tools.dirs(f"lists-{k}"), "*.lst")
        sizes = {
            t: sum(len(p.read_text().splitlines()) for p in d.glob("*.lst"))
            for t, d in zip(("MXNet", "gpurec"), tools.dirs(f"lists-{k}"), strict=True)
        }
        verdict = f"{len(same)} .lst identical" if not diff else f"DIFFERENT: {'; '.join(diff)}"
        report.append(
            f"- `--list {' '.join(extra)}`: exit codes {codes}; {verdict}; lines listed {sizes}"
        )
    return tools.dirs("lists")[0]


def check_pass_through(tools: Tools, lists: Path, report: list[str]) -> None:
    for threads in ("1", "2"):
        case = f"pass-{threads}"
        codes = tools.run(case, ["--pass-through", "--num-thread", threads], lists)
        same, diff = compare_files(*tools.dirs(case), "*.[ri][ed][cx]")
        report.append(
            f"- `--pass-through --num-thread {threads}` (exit codes {codes}): identical "
            f"{len(same)} files ({', '.join(same)})"
        )
        report += [f"  - DIFFERENT: {d}" for d in diff]


def check_resize(tools: Tools, lists: Path, report: list[str]) -> None:
    for resize, crop in ((64, True), (64, False), (256, True), (256, False)):
        flags = ["--resize", str(resize), *(["--center-crop"] if crop else []), "--quality", "90"]
        case = f"resize-{resize}-{int(crop)}"
        codes = tools.run(case, [*flags, "--num-thread", "1"], lists)
        same, _ = compare_files(*tools.dirs(case), "*.[ri][ed][cx]")
        report.append(
            f"- `{' '.join(flags)} --num-thread 1` (exit codes {codes}): "
            f"{len(same)}/12 .rec/.idx files byte-identical"
        )
        report += [f"  - {line}" for line in compare_pixels(tools, case, resize, crop, 90)]


def check_pack_label(tools: Tools, report: list[str]) -> None:
    lines = [
        "7\t0\t1.5\t-2\tcat/cat_000.jpg",
        "3\t1.000000\t0.250000\t3.000000\tcat/kitten/cat_kitten_001.jpg",
        "12\t2\t2\t2\tdog/dog 002 with space.JPG",
        "0\t3.5\t-0.125\t1e-3\tdog/dog_003.png",
        "5\t1\t0\t100000\tfish/fish_003_exif6.jpg",
        "42\t0.1\t0.2\t0.3\tfish/fish_002_gray.jpeg",
        "9\t-1\t-1\t-1\tdog/dog_004_rgba.png",
        "100\t7\t8\t9\tfish/fish_010.jpg",
    ]
    cases = {
        "3 labels per line, non-sequential indices": ("\n".join(lines) + "\n", []),
        "1, 2, 4 and 3 labels on different lines": (
            "1\t5\tcat/cat_000.jpg\n2\t1\t2\tcat/cat_001.jpg\n"
            "3\t0.5\t1\t2\t3\tcat/cat_002.jpg\n4\t1\t2\t3\tcat/cat_003.jpg\n",
            [],
        ),
        "CRLF line ends": ("1\t5\t1\t2\tcat/cat_000.jpg\r\n2\t1\t2\t3\tcat/cat_001.jpg\r\n", []),
        "a space after the path": (
            "1\t5\t1\t2\tcat/cat_000.jpg \n2\t1\t2\t3\tcat/cat_001.jpg\n",
            [],
        ),
        "spaces around the tabs": (
            "1 \t 5 \t 1\t2\t cat/cat_000.jpg\n2\t1\t2\t3\tcat/cat_001.jpg\n",
            [],
        ),
        "a line with 2 fields": (
            "1\t5\t1\t2\tcat/cat_000.jpg\n2\tcat/cat_001.jpg\n3\t1\t2\t3\tcat/cat_002.jpg\n",
            [],
        ),
        "a non-numeric label": (
            "1\t5\t1\t2\tcat/cat_000.jpg\n2\tdog\t2\t3\tcat/cat_001.jpg\n3\t1\t2\t3\tcat/cat_002.jpg\n",
            [],
        ),
        "a missing image": (
            "1\t5\t1\t2\tcat/cat_000.jpg\n2\t1\t2\t3\tcat/missing.jpg\n3\t1\t2\t3\tcat/cat_002.jpg\n",
            [],
        ),
    }
    for k, (what, (text, _)) in enumerate(cases.items()):
        src = tools.work / f"lst-{k}"
        shutil.rmtree(src, ignore_errors=True)
        src.mkdir(parents=True)
        (src / "multi.lst").write_bytes(text.encode())
        modes = [["--pack-label"], []] if k == 0 else [["--pack-label"]]
        for mode in modes:
            case = f"label-{k}-{len(mode)}"
            codes = tools.run(case, ["--pass-through", *mode, "--num-thread", "1"], src)
            same, diff = compare_files(*tools.dirs(case), "*.[ri][ed][cx]")
            counts = {}
            for tool, d in zip(("MXNet", "gpurec"), tools.dirs(case), strict=True):
                idx = d / "multi.idx"
                counts[tool] = len(idx.read_text().splitlines()) if idx.exists() else None
            verdict = "identical .rec and .idx" if len(same) == 2 else "; ".join(diff)
            report.append(
                f"- {what}, `--pass-through {' '.join(mode)}`: exit codes {codes}; "
                f"records {counts}; {verdict}"
            )
            for tool in ("mx", "gr"):
                log = [
                    line
                    for line in tools.log(case, tool).splitlines()
                    if line.strip()
                    and not line.startswith(("time:", "Creating", "multiprocessing", "  "))
                ]
                if log and (diff or codes["mx"] or codes["gr"]):
                    name = "MXNet" if tool == "mx" else "gpurec"
                    report.append(f"  - {name} said: `{log[-1][:160]}`")


# -------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/gpurec-crosscheck"))
    parser.add_argument("--mxnet-python", required=True)
    parser.add_argument("--im2rec", required=True, help="MXNet 1.9.1's tools/im2rec.py")
    parser.add_argument("--gpurec", default=str(Path(sys.executable).with_name("gpurec")))
    args = parser.parse_args(argv)
    root = args.workdir / "tree"
    n = make_tree(root)
    tools = Tools([args.mxnet_python, args.im2rec], [args.gpurec, "im2rec"], args.workdir, root)
    report = [f"tree: {n} images under {root}"]
    lists = check_lists(tools, report)
    report.append("### 2. pass-through packing of those lists")
    check_pass_through(tools, lists, report)
    report.append("### 3. re-encoded packing of those lists")
    check_resize(tools, lists, report)
    report.append("### 4-5. hand-written lists")
    check_pack_label(tools, report)
    print("\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
