"""Hugging Face parquet: an ``image`` column (the ``Image`` feature: bytes and path), a
``label`` column (a ``ClassLabel`` with the class names), and the features in the
file's ``huggingface`` metadata, as ``datasets``' ``to_parquet`` writes them; so
``datasets.load_dataset("parquet", data_files=...)`` gives the images and the names.

Multi-label records keep all their labels in a ``labels`` column (a sequence of floats;
``label`` is the first). Labels that are not whole numbers go in a float ``label``.
Writing and reading need pyarrow (``pip install 'gpurec[parquet]'``).

Reading (``gpurec pack``): :class:`ParquetRoot` finds the image and label columns from
the features metadata (or by their types), and copies the images once, in file order,
into a local spool file, from which the pack's workers read them by offset: parquet has
no random access below a row group, and a shuffled pack would read each row group once
per image it holds.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from gpurec.formats import FilesRoot, Record, absolute, extension, files_of, short_names
from gpurec.listing import Listing
from gpurec.recordio import ListEntry
from gpurec.storage import RemoteRoot
from gpurec.transcode import ImageError

__all__ = ["LabelSpec", "ParquetRoot", "write_parquet"]

ROWS_PER_GROUP = 100  # datasets' row groups for image datasets: the hub's viewer reads them


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("parquet needs pyarrow: pip install 'gpurec[parquet]'") from None
    return pa, pq


@dataclass(frozen=True)
class LabelSpec:
    """How labels go into the columns: whole numbers with class names (a ClassLabel),
    or floats; ``width`` labels per record (more than 1: a ``labels`` column too)."""

    names: list[str] | None  # None: labels are not all whole numbers
    width: int = 1

    def features(self) -> dict:
        label = (
            {"names": self.names, "_type": "ClassLabel"}
            if self.names is not None
            else {"dtype": "float32", "_type": "Value"}
        )
        out = {"image": {"_type": "Image"}, "label": label}
        if self.width > 1:
            out["labels"] = {"feature": {"dtype": "float32", "_type": "Value"},
                             "_type": "Sequence"}  # fmt: skip
        out["id"] = {"dtype": "int64", "_type": "Value"}
        return out

    def schema(self):
        pa, _ = _pyarrow()
        fields = [
            pa.field("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            pa.field("label", pa.int64() if self.names is not None else pa.float32()),
        ]
        if self.width > 1:
            fields.append(pa.field("labels", pa.list_(pa.float32())))
        fields.append(pa.field("id", pa.int64()))
        meta = {"huggingface": json.dumps({"info": {"features": self.features()}})}
        return pa.schema(fields, metadata=meta)


def write_parquet(out, records: Iterable[Record], spec: LabelSpec) -> int:
    """Write ``records`` to the open binary file ``out`` as one parquet file, in row
    groups of :data:`ROWS_PER_GROUP`; the image bytes are stored uncompressed (they are
    compressed images already). Returns the rows written."""
    pa, pq = _pyarrow()
    schema = spec.schema()
    n = 0
    # no min/max statistics of the image bytes: comparing every image with the others
    # took most of the writer's time, and no reader filters on them
    with pq.ParquetWriter(out, schema, compression="none", use_dictionary=False,
                          write_statistics=["label", "id"]) as writer:  # fmt: skip
        batch: list[Record] = []
        for record in records:
            batch.append(record)
            if len(batch) == ROWS_PER_GROUP:
                writer.write_table(_table(pa, schema, batch, spec))
                n += len(batch)
                batch = []
        if batch or not n:
            writer.write_table(_table(pa, schema, batch, spec))
            n += len(batch)
    return n


def _table(pa, schema, records: list[Record], spec: LabelSpec):
    images = pa.StructArray.from_arrays(
        [pa.array([r.data for r in records], pa.binary()),  # views: copied once, here
         pa.array([r.name for r in records], pa.string())],
        names=["bytes", "path"],
    )  # fmt: skip
    if spec.names is not None:
        label = pa.array([int(r.label) for r in records], pa.int64())
    else:
        label = pa.array([r.label for r in records], pa.float32())
    columns = [images, label]
    if spec.width > 1:
        columns.append(pa.array([list(r.labels) for r in records], pa.list_(pa.float32())))
    columns.append(pa.array([int(r.fields.get("id", 0)) for r in records], pa.int64()))
    return pa.Table.from_arrays(columns, schema=schema)


# ----------------------------------------------------------------------------- reading


def _features(schema) -> dict:
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return {}
    try:
        return json.loads(raw).get("info", {}).get("features", {}) or {}
    except (ValueError, AttributeError):
        return {}


def _columns(schema, features: dict) -> tuple[str, str | None, str | None, list[str] | None]:
    """(image column, label column, multi-label column, class names) of a parquet file."""
    pa, _ = _pyarrow()
    image = next((k for k, f in features.items() if isinstance(f, dict)
                  and f.get("_type") == "Image"), None)  # fmt: skip
    if image is None:  # by type: a struct holding binary 'bytes', or a binary column
        for field in schema:
            t = field.type
            if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
                image = field.name
                break
        else:
            image = next((f.name for f in schema if pa.types.is_binary(f.type)), None)
    if image is None:
        raise ValueError("no image column: neither an Image feature nor a binary column")
    label = next((k for k, f in features.items() if isinstance(f, dict)
                  and f.get("_type") == "ClassLabel"), None)  # fmt: skip
    names = features[label].get("names") if label is not None else None
    if label is None:
        label = next((n for n in ("label", "labels", "cls", "class") if n in schema.names), None)
    multi = "labels" if "labels" in schema.names and label != "labels" else None
    return image, label, multi, names


class ParquetRoot(FilesRoot, RemoteRoot):
    """Parquet files (a ``.parquet``, a glob, a folder of them; local or at a URL) as a
    root ``gpurec pack`` reads images from. :meth:`list_samples` reads the label columns
    and copies the images into a local spool file (removed when this object goes, in
    the process that made it); :meth:`read_many` reads them from there."""

    labels_from = "parquet: the ClassLabel (or label) column"

    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        super().__init__(absolute(url), storage_options)
        self._where: dict[str, tuple[int, int]] = {}
        self._spool: str | None = None
        self._fd: int | None = None

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "where": self._where, "spool": self._spool}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._where, self._spool, self._fd = state["where"], state["spool"], None

    def list_samples(self) -> Listing:
        """Every row with image bytes, in file order, labelled from the ClassLabel
        column (or a ``label`` column; string labels become classes in sorted order);
        rows without image bytes or a label are skipped with a reason. The spool file
        is removed at once when listing fails."""
        _pyarrow()
        # in $TMPDIR: it holds every image once, so point TMPDIR at a disk with room
        fd, self._spool = tempfile.mkstemp(prefix="gpurec-parquet-", suffix=".spool")
        self._where = {}
        weakref.finalize(self, _remove, self._spool)
        try:
            return self._copy_into_spool(fd)
        except BaseException:  # an error, Ctrl-C: the copy goes now, not when this root does
            self.release()
            raise

    def _copy_into_spool(self, fd: int) -> Listing:
        pa, pq = _pyarrow()
        entries: list[ListEntry] = []
        skipped: list[tuple[str, str]] = []
        names: list[str] | None = None
        strings: list[tuple[int, str]] = []  # entries labelled by a string column
        at = 0
        with os.fdopen(fd, "wb") as spool:
            for path, file_name in short_names(files_of(self, ".parquet")).items():
                with self.fs.open(path, "rb") as f:
                    try:
                        pf = pq.ParquetFile(f)
                        schema = pf.schema_arrow
                        image, label, multi, found_names = _columns(schema, _features(schema))
                    except (ValueError, OSError) as exc:
                        skipped.append((file_name, f"not a readable parquet file: {exc}"))
                        continue
                    if label is None:
                        raise ValueError(f"{path}: no label column (a ClassLabel or 'label')")
                    names = names or found_names
                    columns = [image, label] + ([multi] if multi else [])
                    row = 0
                    for group in range(pf.num_row_groups):
                        table = pf.read_row_group(group, columns=columns)
                        col = table.column(image).combine_chunks()
                        datas = col.field("bytes") if pa.types.is_struct(col.type) else col
                        firsts = table.column(label).to_pylist()
                        rests = table.column(multi).to_pylist() if multi else None
                        for k in range(len(table)):
                            rel = f"{file_name}/{row:08d}"
                            row += 1
                            value = datas[k].as_py()
                            first = firsts[k]
                            if not value:
                                skipped.append((rel, "no image bytes in the row"))
                                continue
                            if first is None:
                                skipped.append((rel, "no label in the row"))
                                continue
                            try:
                                rel += "." + extension(value)
                            except ImageError as exc:
                                skipped.append((rel, str(exc)))
                                continue
                            spool.write(value)
                            self._where[rel] = (at, len(value))
                            at += len(value)
                            if isinstance(first, str):
                                strings.append((len(entries), first))
                                labels: tuple[float, ...] = (0.0,)
                            else:
                                labels = _all_labels(first, rests[k] if rests else None)
                            entries.append(ListEntry(len(entries), labels, rel))
        if strings:  # class names from string labels, numbered in sorted order
            names = sorted({s for _, s in strings})
            number = {s: float(i) for i, s in enumerate(names)}
            for i, s in strings:
                entries[i] = ListEntry(entries[i].index, (number[s],), entries[i].path)
        top = max((int(e.labels[0]) for e in entries if e.labels[0].is_integer()), default=-1)
        names = list(names or [])
        names += [str(k) for k in range(len(names), top + 1)]
        return Listing(entries, names, skipped)

    def release(self) -> None:
        """Remove the spool file now (``gpurec pack`` calls it when it ends, done or
        not: an error's traceback would keep this root, and its copy of every image,
        for as long as it is kept)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._spool is not None:
            _remove(self._spool)
            self._spool, self._where = None, {}

    def read_many(self, rels: Sequence[str], max_size: int) -> list[bytes | str]:
        if self._fd is None and self._spool is not None:
            self._fd = os.open(self._spool, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        out: list[bytes | str] = []
        for rel in rels:
            where = self._where.get(rel)
            if where is None or self._fd is None:
                out.append("not in the parquet files' listing")
            elif where[1] > max_size:
                out.append(f"image of {where[1]} bytes is over a record's maximum of {max_size}")
            else:
                out.append(os.pread(self._fd, where[1], where[0]))
        return out


def _all_labels(first, rest) -> tuple[float, ...]:
    """A row's labels: its ``labels`` list where that is every label (numbers, the
    first the ``label`` column's, as ``gpurec export`` writes them), else the ``label``
    alone: another dataset's ``labels`` (tags, strings) is not the class's."""
    numbers = (
        isinstance(rest, list)
        and rest
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in rest)
    )
    if numbers and float(rest[0]) == float(first):
        return tuple(float(x) for x in rest)
    return (float(first),)


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
