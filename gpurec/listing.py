"""Image tree -> list entries: which files, with which labels, in which split and order.

The rules are im2rec's where im2rec has one (walk order, extension matching, one label
per folder in walk order, ``random.seed(100)`` shuffle, chunk and ratio arithmetic), so
``gpurec im2rec --list`` writes the very lists MXNet's script writes. ``gpurec pack``
adds labels from file names, a seeded shuffle and per-class (stratified) splits.
"""

from __future__ import annotations

import math
import os
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gpurec.recordio import ListEntry

__all__ = [
    "IMAGE_EXTS",
    "NAME_PATTERN",
    "Listing",
    "RootPaths",
    "RootRule",
    "im2rec_chunks",
    "list_images",
    "split_entries",
]

IMAGE_EXTS = (".jpeg", ".jpg", ".png")
NAME_PATTERN = r"^(.+)_\d+\.[^.]+$"
"""The default for ``label_from_name="default"``: ``<class>_<number>.<ext>`` (Oxford Pets)."""


@dataclass
class Listing:
    """Entries in walk order, the class names by label, and files left out with why."""

    entries: list[ListEntry]
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _walk(
    root: str, recursive: bool, follow_links: bool, skipped: list[tuple[str, str]]
) -> Iterator[tuple[str, list[str]]]:
    """(relative folder, sorted file names) top-down with sorted folders, like im2rec's
    ``os.walk`` loop, but loop-safe when following links and never raising."""
    seen: set[tuple[int, int]] = set()

    def visit(path: str, rel: str) -> Iterator[tuple[str, list[str]]]:
        try:
            st = os.stat(path)
            if (st.st_dev, st.st_ino) in seen:
                skipped.append((rel, "symlink loop: folder already visited"))
                return
            seen.add((st.st_dev, st.st_ino))
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError as exc:
            skipped.append((rel, f"cannot list folder: {exc.strerror or exc}"))
            return
        files, dirs = [], []
        for entry in entries:
            try:
                if entry.is_dir():
                    if follow_links or not entry.is_symlink():
                        dirs.append(entry)
                elif entry.is_file():
                    files.append(entry.name)
            except OSError as exc:
                skipped.append((os.path.join(rel, entry.name), f"cannot stat: {exc.strerror}"))
        yield rel, files
        if recursive:
            for d in dirs:
                yield from visit(d.path, d.name if rel == "." else f"{rel}/{d.name}")

    yield from visit(root, ".")


@dataclass(frozen=True)
class RootRule:
    """Which files a pack rooted at one folder may read.

    By default only files under the root: `.lst` paths that are absolute or climb out
    with ``..`` are refused, and so are symlinks that resolve outside the root.
    ``follow_links`` lets symlinks lead anywhere (and walks into linked folders);
    ``allow_outside`` accepts any path, absolute and ``..`` ones in a `.lst` included.
    """

    follow_links: bool = False
    allow_outside: bool = False


class RootPaths:
    """Turns `.lst` paths into full paths under one root, refusing what ``rule`` forbids.

    Made once per pack: the real path of the root and of each folder is looked up once
    and remembered, so checking a file costs one ``lstat``, not a ``realpath`` walk
    over every component of its path. Since the tree may change during a pack, what
    :meth:`open` opened is checked again afterwards, from the open file itself.
    """

    def __init__(self, root: str | Path, rule: RootRule = RootRule()) -> None:
        self.root = str(root)
        self.rule = rule
        self._inside = None  # the prefix every real path must start with, when checked
        if not (rule.allow_outside or rule.follow_links):
            self._inside = os.path.join(os.path.realpath(root), "")
        self._real_folders: dict[str, str] = {}

    def __call__(self, rel: str) -> str:
        """The full path of ``rel`` under the root; ValueError when the rule forbids it."""
        if self.rule.allow_outside:
            return os.path.join(self.root, rel)
        if os.path.isabs(rel) or rel.startswith(("/", "\\")):
            raise ValueError(f"absolute path refused: {rel!r} is not under the root")
        norm = os.path.normpath(rel)
        if norm == ".." or norm.startswith(".." + os.sep):
            raise ValueError(f"path escapes the root: {rel!r}")
        full = os.path.join(self.root, norm)
        if self._inside is not None:
            folder, name = os.path.split(full)
            real_folder = self._real_folders.get(folder)
            if real_folder is None:
                real_folder = self._real_folders[folder] = os.path.realpath(folder)
            real = os.path.join(real_folder, name)
            if os.path.islink(real):
                real = os.path.realpath(real)
            if not os.path.join(real, "").startswith(self._inside):
                raise ValueError(f"symlink points outside the root: {rel!r}")
        return full

    def open(self, rel: str) -> int:
        """A descriptor of ``rel`` opened for reading, or ValueError as :meth:`__call__`.

        Opened non-blocking (a FIFO does not hang the pack) and then checked by the path
        of the file actually opened, so a symlink swapped into the tree after the first
        check cannot lead outside the root.
        """
        full = self(rel)
        fd = os.open(full, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        if self._inside is None:
            return fd
        try:
            try:
                real = os.readlink(f"/proc/self/fd/{fd}")  # Linux: what is open, exactly
            except OSError:
                real = os.path.realpath(full)
            if not os.path.join(real, "").startswith(self._inside):
                raise ValueError(f"symlink points outside the root: {rel!r}")
        except BaseException:
            os.close(fd)
            raise
        return fd


def _unlistable(name: str) -> str | None:
    if any(c in name for c in "\t\n\r"):
        return "file name holds a tab or newline, which a .lst cannot hold"
    if any(part != part.strip() for part in name.split("/")):
        return "name starts or ends with white space, which .lst readers strip"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "file name is not valid UTF-8"
    return None


def list_images(
    root: str | Path,
    *,
    exts: Sequence[str] = IMAGE_EXTS,
    recursive: bool = True,
    label_from_name: str | None = None,
    follow_links: bool = False,
) -> Listing:
    """List the images under ``root``, numbered in walk order.

    Labels come from folders as im2rec's ``--recursive`` gives them (each folder that
    holds images is a class, numbered in walk order: sorted names, depth first), or with
    ``label_from_name`` from the first group of that regex searched in the file name
    (``"default"`` is :data:`NAME_PATTERN`; classes are numbered in sorted order).
    Without ``recursive`` only ``root`` itself is listed, all with label 0, as im2rec.
    ``root`` may be a :class:`gpurec.storage.RemoteRoot` (a folder in object storage):
    one recursive listing, walked in the same order as a local tree.
    """
    remote = root if hasattr(root, "walk") else None  # a gpurec.storage.RemoteRoot
    root = str(root) if remote is None else remote.url
    if remote is None and not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    wanted = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in exts}
    pattern = None
    if label_from_name is not None:
        try:
            pattern = re.compile(NAME_PATTERN if label_from_name == "default" else label_from_name)
        except re.error as exc:
            raise ValueError(f"label_from_name: bad regex {label_from_name!r}: {exc}") from None
        if pattern.groups < 1:
            raise ValueError(f"label_from_name: {label_from_name!r} has no group for the class")
    skipped: list[tuple[str, str]] = []
    found: list[tuple[str, str]] = []  # (relative path, class name)
    folder_labels: dict[str, int] = {}
    inside = RootPaths(root) if remote is None else remote.check
    if remote is None:
        walk = _walk(root, recursive or pattern is not None, follow_links, skipped)
    else:  # an object store: no symlinks; the same order as a local walk
        walk = remote.walk() if recursive or pattern is not None else list(remote.walk())[:1]
    for rel, files in walk:
        for name in files:
            if os.path.splitext(name)[1].lower() not in wanted:
                continue
            path = name if rel == "." else f"{rel}/{name}"
            reason = _unlistable(path)
            if reason is None and not follow_links:
                try:
                    inside(path)
                except ValueError as exc:
                    reason = str(exc).split(":")[0]
            if reason is not None:
                skipped.append((path, reason))
                continue
            if pattern is not None:
                match = pattern.search(name)
                if match is None or not match.group(1):
                    skipped.append((path, f"file name does not match {pattern.pattern}"))
                    continue
                found.append((path, match.group(1)))
            elif recursive:
                folder_labels.setdefault(rel, len(folder_labels))
                found.append((path, rel))
            else:
                found.append((path, "."))
    if pattern is not None:
        classes = sorted({cls for _, cls in found})
    elif recursive:
        classes = list(folder_labels)
    else:
        classes = ["."] if found else []
    label_of = {cls: i for i, cls in enumerate(classes)}
    entries = [ListEntry(i, (float(label_of[cls]),), path) for i, (path, cls) in enumerate(found)]
    return Listing(entries, classes, skipped)


def _check_ratios(train_ratio: float, test_ratio: float) -> None:
    if not (0 <= train_ratio <= 1 and 0 <= test_ratio <= 1):
        raise ValueError(f"ratios must be in [0, 1], got train {train_ratio}, test {test_ratio}")
    if train_ratio + test_ratio > 1 + 1e-9:
        raise ValueError(f"train_ratio + test_ratio = {train_ratio + test_ratio} is over 1")


def split_entries(
    entries: Sequence[ListEntry],
    *,
    train_ratio: float = 1.0,
    test_ratio: float = 0.0,
    shuffle: bool = True,
    seed: int = 0,
) -> dict[str, list[ListEntry]]:
    """Split per class (stratified by the first label) into train / val / test.

    Returns ``{"": all}`` when ``train_ratio`` is 1, else the splits whose share is
    not zero: ``train``, ``val`` (what train and test leave) and ``test``. Each class
    gives ``round(n * ratio)`` images to train and test. With ``shuffle`` every split
    is in a seeded random order, otherwise in list order.
    """
    _check_ratios(train_ratio, test_ratio)
    rng = random.Random(seed)
    if train_ratio == 1.0:
        out = {"": list(entries)}
    else:
        by_class: dict[float, list[ListEntry]] = {}
        for entry in entries:
            by_class.setdefault(entry.labels[0] if entry.labels else 0.0, []).append(entry)
        out = {"train": [], "val": [], "test": []}
        for label in sorted(by_class):
            members = list(by_class[label])
            if shuffle:
                rng.shuffle(members)
            n = len(members)
            n_test = min(n, math.floor(n * test_ratio + 0.5))
            n_train = min(n - n_test, math.floor(n * train_ratio + 0.5))
            out["test"] += members[:n_test]
            out["train"] += members[n_test : n_test + n_train]
            out["val"] += members[n_test + n_train :]
        if train_ratio + test_ratio >= 1 - 1e-9:
            out["train"] += out.pop("val")
        if test_ratio == 0:
            out.pop("test")
        if train_ratio == 0:
            out.pop("train")
        for name in out:
            out[name].sort(key=lambda e: e.index)
    if shuffle:
        for members in out.values():
            rng.shuffle(members)
    return out


def im2rec_chunks(
    entries: Sequence[ListEntry],
    *,
    chunks: int = 1,
    train_ratio: float = 1.0,
    test_ratio: float = 0.0,
    shuffle: bool = True,
) -> list[tuple[str, list[ListEntry]]]:
    """im2rec's ``make_list``: (file name suffix, entries) for every `.lst` it writes.

    Exactly its arithmetic, including ``random.seed(100)`` before the shuffle, integer
    chunk sizes and the test / val / train order inside each chunk.
    """
    if train_ratio != 1.0:  # im2rec ignores test_ratio when everything goes to one list
        _check_ratios(train_ratio, test_ratio)
    if chunks < 1:
        raise ValueError(f"chunks must be >= 1, got {chunks}")
    image_list = list(entries)
    if shuffle:
        random.Random(100).shuffle(image_list)
    n = len(image_list)
    chunk_size = (n + chunks - 1) // chunks
    out = []
    for i in range(chunks):
        chunk = image_list[i * chunk_size : (i + 1) * chunk_size]
        tag = f"_{i}" if chunks > 1 else ""
        sep = int(chunk_size * train_ratio)
        sep_test = int(chunk_size * test_ratio)
        if train_ratio == 1.0:
            out.append((tag, chunk))
        else:
            if test_ratio:
                out.append((f"{tag}_test", chunk[:sep_test]))
            if train_ratio + test_ratio < 1.0:
                out.append((f"{tag}_val", chunk[sep_test + sep :]))
            out.append((f"{tag}_train", chunk[sep_test : sep_test + sep]))
    return out
