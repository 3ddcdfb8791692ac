"""What is in a dataset, and is it intact: ``gpurec info`` and ``gpurec verify``.

Both take a source as the Pipeline does (a `.rec`, a prefix, a glob or a list). ``info``
reads only IRHeaders (first frames) for the whole dataset and image headers for a
sample; ``verify`` walks every frame, checks the `.idx` against the walk, and decodes
every image.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from gpurec.dataset import Dataset, resolve_source
from gpurec.naming import classes_candidates, dataset_stem
from gpurec.recordio import (
    IR_SIZE,
    RecordIOError,
    RecordReader,
    idx_path_for,
    read_idx,
    read_lst,
    unpack,
)
from gpurec.transcode import ImageError, sniff

__all__ = ["BadRecord", "DatasetInfo", "VerifyReport", "find_classes", "info", "verify"]

Progress = Callable[[int], None]


def find_classes(rec: Path) -> list[str] | None:
    """Class names from the ``<prefix>.classes.json`` that ``gpurec pack`` wrote beside
    the shard (``out/ds_train-00000-of-00004.rec`` -> ``out/ds.classes.json``); else,
    for packs im2rec made, from the ``.lst`` beside the shard (:func:`classes_from_lst`)."""
    rec = Path(rec)
    for candidate in classes_candidates(rec.name):
        path = rec.with_name(candidate)
        if path.is_file():
            classes = json.loads(path.read_text(encoding="utf-8")).get("classes")
            if isinstance(classes, list):
                return [str(c) for c in classes]
    for lst in dict.fromkeys(
        (rec.with_suffix(".lst"), rec.with_name(dataset_stem(rec.name) + ".lst"))
    ):
        if lst.is_file():
            return classes_from_lst(lst)
    return None


def classes_from_lst(lst: Path) -> list[str] | None:
    """The class names of an im2rec `.lst`: im2rec numbers the folders that hold images
    in walk order and labels their images so, so label ``k``'s name is its paths'
    folder (``a/b`` for ``a/b/x.jpg``). None unless that is so throughout: one label per
    line, every path in a folder, each label one folder and each folder one label, the
    labels 0..K-1 with none missing."""
    names: dict[int, str] = {}
    try:
        for entry in read_lst(lst):
            folder = entry.path.replace("\\", "/").rpartition("/")[0]
            if len(entry.labels) != 1 or not folder or not entry.labels[0].is_integer():
                return None
            if names.setdefault(int(entry.labels[0]), folder) != folder:
                return None
    except (RecordIOError, OSError, UnicodeDecodeError):
        return None
    classes = [names.get(k) for k in range(len(names))]
    if None in classes or len(set(classes)) != len(classes):
        return None
    return classes  # type: ignore[return-value]


@dataclass
class DatasetInfo:
    """``gpurec info``: counts, sizes, labels and image statistics of a dataset."""

    shards: list[dict]
    records: int
    bytes: int
    label_kind: str  # "single" or "multi-label (k)"
    labels: dict[str, int]  # label (or class name) -> count; first label for multi-label
    classes: list[str] | None
    sample: dict = field(default_factory=dict)
    # What arcface-style configs ask for: the classifier's width (the class names' count,
    # else the largest whole-number label + 1; None for other labels) and the images.
    num_classes: int | None = None
    num_image: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def info(
    source, *, sample: int = 200, seed: int = 0, progress: Progress | None = None
) -> DatasetInfo:
    """Records per shard, bytes, the label histogram, header flags, and image formats
    and sizes measured on ``sample`` records drawn at random."""
    recs = resolve_source(source)
    shards, flags, firsts = [], Counter(), Counter()
    dataset = Dataset(recs, on_error="skip")
    for shard in dataset.shards:
        reader = shard.reader
        for offset in shard.offsets.tolist():
            head = reader.head_at(offset, IR_SIZE)
            if len(head) < IR_SIZE:
                raise RecordIOError("record has no IRHeader", shard.path, offset=offset)
            flag = int.from_bytes(head[:4], "little")
            if flag == 0 or shard.first_label_only:
                flags[0] += 1
            else:
                flags[flag] += 1
            if flag:  # multi-label: count the first label
                head = reader.head_at(offset, IR_SIZE + 4)
            firsts[float(np.frombuffer(head, "<f4", 1, IR_SIZE if flag else 4)[0])] += 1
            if progress is not None:
                progress(1)
        shards.append({
            "path": str(shard.path), "records": len(shard), "bytes": reader.size,
            "indexed": shard.index == "idx", "layout": shard.layout, "index": shard.index,
            "index_file": None if shard.index_file is None else str(shard.index_file),
            "other_records": shard.other, "lost_records": shard.lost,
            "unindexed_bytes": shard.unindexed,
            "cut": None if shard.end is None else str(shard.end),
        })  # fmt: skip
    classes = find_classes(recs[0])

    def name(label: float) -> str:
        if classes and label.is_integer() and 0 <= int(label) < len(classes):
            return classes[int(label)]
        return f"{label:g}"

    kinds = sorted(flags)
    label_kind = "single" if kinds == [0] else "multi-label (" + ", ".join(map(str, kinds)) + ")"
    total = sum(s["records"] for s in shards)
    rng = random.Random(seed)
    picks = sorted(rng.sample(range(total), min(sample, total)))
    widths, heights, formats = [], [], Counter()
    for g in picks:
        payload = unpack(dataset.read(g))[1]
        try:
            image = sniff(payload)
        except ImageError as exc:
            formats[f"bad: {exc}"] += 1
            continue
        formats[image.format] += 1
        if image.width is None:
            decoded = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)
            if decoded is None:
                continue
            image_h, image_w = decoded.shape[:2]
        else:
            image_w, image_h = image.width, image.height
        widths.append(image_w)
        heights.append(image_h)
    dataset.close()

    def stats(values: list[int]) -> dict:
        if not values:
            return {}
        return {"min": int(np.min(values)), "median": float(np.median(values)),
                "max": int(np.max(values))}  # fmt: skip

    return DatasetInfo(
        shards=shards,
        records=total,
        bytes=sum(s["bytes"] for s in shards),
        label_kind=label_kind,
        labels={name(label): count for label, count in sorted(firsts.items())},
        classes=classes,
        num_classes=_num_classes(classes, firsts, label_kind),
        num_image=total,
        sample={
            "records": len(picks),
            "formats": dict(formats),
            "width": stats(widths),
            "height": stats(heights),
        },
    )


def _num_classes(classes: list[str] | None, firsts: Counter, label_kind: str) -> int | None:
    if classes:
        return len(classes)
    whole = [label for label in firsts if label >= 0 and float(label).is_integer()]
    if label_kind != "single" or not whole or len(whole) != len(firsts):
        return None
    return int(max(whole)) + 1


@dataclass(frozen=True)
class BadRecord:
    shard: str
    index: int | None  # position in the shard's .idx (None: found by walking the frames)
    offset: int
    reason: str


@dataclass
class VerifyReport:
    records: int = 0
    bad: list[BadRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # facts that are not faults

    @property
    def ok(self) -> bool:
        return not self.bad


def _record_problem(record: bytes, listed: dict[int, tuple[float, ...]] | None) -> str | None:
    """Why a record is bad (header, labels against the `.lst`, image), or None."""
    try:
        header, payload = unpack(record)
        image = sniff(payload)
    except (RecordIOError, ImageError) as exc:
        return str(exc.reason if isinstance(exc, RecordIOError) else exc)
    if listed is not None:  # RecordIO has no checksums: the .lst is the witness of labels
        want = listed.get(header.id)
        got = np.atleast_1d(np.asarray(header.label, np.float32))
        if want is None:
            return f"id {header.id} is not in the .lst"
        if not np.array_equal(got, np.float32(want[: len(got)] if len(got) == 1 else want)):
            return f"label {got.tolist()} differs from the .lst's {list(want)} for id {header.id}"
    flags = cv2.IMREAD_REDUCED_COLOR_8 if image.format == "jpeg" else cv2.IMREAD_COLOR
    try:  # reduced decoding still runs the whole entropy decoder over the data
        decoded = cv2.imdecode(np.frombuffer(payload, np.uint8), flags)
    except cv2.error as exc:
        return f"does not decode: {str(exc).strip().splitlines()[-1]}"
    return None if decoded is not None else f"does not decode ({image.format})"


def _walk(rec: Path) -> tuple[list[int], RecordIOError | None]:
    """Offsets of the records found by walking the frames, and what stopped the walk."""
    offsets: list[int] = []
    with RecordReader(rec, idx_path=None) as reader:
        try:
            for offset, _ in reader.scan(payloads=False):
                offsets.append(offset)
        except RecordIOError as exc:
            return offsets, exc
    return offsets, None


def verify(
    source: str | os.PathLike | Sequence, *, workers: int = 0, progress: Progress | None = None
) -> VerifyReport:
    """Check every shard: frames, `.idx` against the frames, labels and ids against the
    `.lst` beside the shard when there is one, and every image decoding."""
    report = VerifyReport()
    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(workers) as pool:
        for rec in resolve_source(source):
            walked, broken = _walk(rec)
            rec_size = rec.stat().st_size
            complete = broken is None
            idx = idx_path_for(rec)
            offsets: list[int] = walked
            if not idx.is_file():  # a layout of its own (MXRecordIO files), not a fault
                report.notes.append(f"{rec}: no {idx.name}; records found by walking the file")
            else:
                try:
                    offsets = read_idx(idx)[1].tolist()
                except RecordIOError as exc:
                    report.bad.append(BadRecord(str(rec), None, 0, f"{idx.name}: {exc.reason}"))
                walked_set, indexed = set(walked), set(offsets)
                for i, offset in enumerate(offsets):
                    if offset not in walked_set and (complete or offset < (broken.offset or 0)):
                        reason = f"{idx.name} entry points at no record start"
                        if offset >= rec_size:
                            reason = f"past the end of the {rec_size}-byte file: cut short"
                        report.bad.append(BadRecord(str(rec), i, offset, reason))
                for offset in walked:
                    if offset not in indexed:
                        reason = f"record missing from {idx.name}"
                        report.bad.append(BadRecord(str(rec), None, offset, reason))
            if broken is not None:
                at = broken.offset or 0
                position = offsets.index(at) if at in offsets else None
                size = rec.stat().st_size
                reason = broken.reason
                if reason.startswith(("truncated record", "past the end")):
                    reason = (
                        f"file cut short at the record at byte {at} (it ends at byte "
                        f"{size}): {reason}; {len(walked)} intact record(s) before it "
                        "(`gpurec index --intact` indexes them, on_error='skip' loads them)"
                    )
                report.bad.append(BadRecord(str(rec), position, at, reason))
            listed = None
            lst = rec.with_suffix(".lst")
            if lst.is_file():
                try:
                    listed = {e.index: e.labels for e in read_lst(lst)}
                except RecordIOError as exc:
                    report.bad.append(BadRecord(str(rec), None, 0, f"{lst.name}: {exc}"))
            reported = {b.offset for b in report.bad if b.shard == str(rec)}
            with RecordReader(rec, idx_path=None) as reader:
                known = np.array([o for o in offsets if o not in reported], dtype=np.int64)
                ok = known[~reader.misplaced(known)]
                # header-only records (InsightFace's header and identity records) hold no
                # image: their header is checked, not decoded
                headers = set(ok[reader.header_only(ok)].tolist())

                def check(
                    item: tuple[int, int], reader=reader, listed=listed, headers=headers
                ) -> tuple[int, int, str | None]:
                    i, offset = item
                    try:
                        record = reader.read_at(offset)[0]
                        if offset in headers:
                            unpack(record)
                            return i, offset, None
                        return i, offset, _record_problem(record, listed)
                    except RecordIOError as exc:
                        return i, offset, exc.reason

                for i, offset, problem in pool.map(check, enumerate(offsets)):
                    report.records += 1
                    if problem is not None and offset not in reported:
                        report.bad.append(BadRecord(str(rec), i, offset, problem))
                    if progress is not None:
                        progress(1)
    return report
