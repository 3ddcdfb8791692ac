"""Image folders: ``DEST/<class>/<name>``, read back by ``gpurec pack DEST`` and by
torchvision's ``ImageFolder``.

The class folder is the class name where known (``classes.json``, the `.lst` paths),
else the label zero-padded to one width, so that a sorted listing numbers the classes
as the records were numbered; the file name is the `.lst` path's where known. Every
record's labels also go into a `.lst` (``index<TAB>labels...<TAB>class/name``) beside
the classes, for multi-label records: ``gpurec pack DEST OUT --list DEST/export.lst
--pack-label`` packs them with all their labels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from gpurec.formats import Record
from gpurec.recordio import ListEntry, format_lst_line

__all__ = ["folder_of", "write_folder"]


def folder_of(record: Record, names: list[str]) -> str:
    """The class folder of a record: its first label's name (numbers that are not whole
    or have no name are written as they are)."""
    label = record.label
    if float(label).is_integer() and 0 <= int(label) < len(names):
        return names[int(label)]
    return f"{label:g}"


def write_folder(
    records: Iterable[Record], put: Callable[[str, bytes | memoryview], None], names: list[str]
) -> list[str]:
    """Write each record's image with ``put(relative path, bytes)``; returns the `.lst`
    lines of what was written (the key is the record's index in the export)."""
    lines = []
    for record in records:
        rel = f"{folder_of(record, names)}/{record.name}"
        put(rel, record.data)
        lines.append(format_lst_line(ListEntry(int(record.key), record.labels, rel)))
    return lines
