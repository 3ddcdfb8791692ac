"""``gpurec im2rec``: MXNet's ``tools/im2rec.py`` command line, on gpurec's engine.

The argument parser is im2rec 1.9.1's (same flags, defaults, choices and positional
order), so scripts that call ``python im2rec.py ...`` work unchanged. The lists it
writes are im2rec's lists; with ``--pass-through`` the `.rec`/`.idx` are MXNet's bytes.
Differences, all on the side of not losing work: an image that cannot be read is
skipped and listed in ``<list>.skipped.tsv`` instead of stopping the run; paths in a
`.lst` that leave the root are refused; outputs appear only when complete; and the
records keep list order with any ``--num-thread``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

from gpurec.listing import Listing, RootRule, im2rec_chunks, list_images
from gpurec.pack import pack_lists
from gpurec.recordio import write_lst
from gpurec.transcode import EncodeSpec
from gpurec.workers import PackSummary


def build_parser(prog: str = "gpurec im2rec") -> argparse.ArgumentParser:
    """im2rec's parser, flag for flag."""
    parser = argparse.ArgumentParser(
        prog=prog,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Create an image list or make a record database by reading from an "
        "image list (MXNet im2rec.py compatible).",
        epilog="examples: gpurec im2rec data/pets images/ --list --recursive --train-ratio 0.8; "
        "gpurec im2rec data/pets images/ --resize 256 --num-thread 2",
    )
    parser.add_argument("prefix", help="prefix of input/output lst and rec files.")
    parser.add_argument("root", help="path to folder containing images.")
    cgroup = parser.add_argument_group("Options for creating image lists")
    cgroup.add_argument(
        "--list",
        action="store_true",
        help="create image list(s) by traversing root and write <prefix>.lst; otherwise "
        "read <prefix>*.lst and create <prefix>*.rec",
    )
    cgroup.add_argument(
        "--exts", nargs="+", default=[".jpeg", ".jpg", ".png"], help="acceptable extensions."
    )
    cgroup.add_argument("--chunks", type=int, default=1, help="number of chunks.")
    cgroup.add_argument(
        "--train-ratio", type=float, default=1.0, help="Ratio of images to use for training."
    )
    cgroup.add_argument(
        "--test-ratio", type=float, default=0, help="Ratio of images to use for testing."
    )
    cgroup.add_argument(
        "--recursive",
        action="store_true",
        help="walk subfolders, one label per folder; otherwise only root, label 0.",
    )
    cgroup.add_argument(
        "--no-shuffle",
        dest="shuffle",
        action="store_false",
        help="keep the walk order in <prefix>.lst",
    )
    rgroup = parser.add_argument_group("Options for creating database")
    rgroup.add_argument("--pass-through", action="store_true", help="store image files as they are")
    rgroup.add_argument(
        "--resize", type=int, default=0, help="resize the shorter edge of images to this size."
    )
    rgroup.add_argument("--center-crop", action="store_true", help="crop the central square.")
    rgroup.add_argument(
        "--quality",
        type=int,
        default=95,
        help="JPEG quality for encoding, 1-100; or PNG compression for encoding, 1-9",
    )
    rgroup.add_argument(
        "--num-thread",
        type=int,
        default=1,
        help="number of worker threads (records keep the list order regardless).",
    )
    rgroup.add_argument(
        "--color",
        type=int,
        default=1,
        choices=[-1, 0, 1],
        help="1: color (alpha dropped), 0: grayscale, -1: unchanged.",
    )
    rgroup.add_argument(
        "--encoding", type=str, default=".jpg", choices=[".jpg", ".png"], help="image encoding."
    )
    rgroup.add_argument(
        "--pack-label", action="store_true", help="pack multi-dimensional labels too."
    )
    extra = parser.add_argument_group("gpurec only")
    extra.add_argument(
        "--allow-outside-root",
        action="store_true",
        help="read .lst paths that are absolute or climb out of root with '..' (refused "
        "by default)",
    )
    return parser


def find_lists(prefix: str) -> list[Path]:
    """The `.lst` files im2rec packs for ``prefix``: files named ``<prefix>*.lst``."""
    working_dir = prefix if os.path.isdir(prefix) else os.path.dirname(prefix)
    names = sorted(os.listdir(working_dir))
    return [
        Path(working_dir, name)
        for name in names
        if os.path.isfile(os.path.join(working_dir, name))
        and os.path.join(working_dir, name).startswith(prefix)
        and name.endswith(".lst")
    ]


def run(
    args: argparse.Namespace,
    *,
    progress: Callable[[int], None] | None = None,
    on_plan: Callable[[int], None] | None = None,
) -> tuple[list[Path], PackSummary | None, Listing | None]:
    """Do what ``im2rec.py`` does with the parsed ``args``.

    Returns the list files, and the pack summary (packing) or the listing (``--list``).
    """
    args.prefix = os.path.abspath(args.prefix)
    args.root = os.path.abspath(args.root)
    if args.list:
        listing = list_images(
            args.root, exts=args.exts, recursive=args.recursive, follow_links=True
        )
        os.makedirs(os.path.dirname(args.prefix), exist_ok=True)
        written = []
        for suffix, entries in im2rec_chunks(
            listing.entries,
            chunks=args.chunks,
            train_ratio=args.train_ratio,
            test_ratio=args.test_ratio,
            shuffle=args.shuffle,
        ):
            path = Path(args.prefix + suffix + ".lst")
            write_lst(path, entries)
            written.append(path)
        return written, None, listing
    lists = find_lists(args.prefix)
    if not lists:
        raise FileNotFoundError(f"no list files {args.prefix}*.lst (make them with --list)")
    if on_plan is not None:
        on_plan(sum(len(lst.read_text(encoding="utf-8").splitlines()) for lst in lists))
    summary = pack_lists(
        lists,
        args.root,
        EncodeSpec.from_fields(args),
        pack_label=args.pack_label,
        workers=max(1, args.num_thread),
        rule=RootRule(follow_links=True, allow_outside=args.allow_outside_root),
        progress=progress,
    )
    return lists, summary, None
