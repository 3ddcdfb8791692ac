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

__all__ = ["folder_for", "folder_names", "folder_of", "write_folder"]


def folder_names(names: list[str]) -> list[str]:
    """The class folders for labels ``0..K-1`` with these class names: the names
    themselves when a folder reader numbers them back as the labels were numbered
    (unique, each a relative path of plain parts, in walk order: sorted, parents
    first), else ``<label>_<name>`` (the label zero-padded to one width, a ``/`` in a
    name written ``_``): sorted, those number as the labels did, whatever the names.
    Names in label order that are not sorted (a ClassLabel's, ImageNet's), repeated
    (ImageNet has two "crane"s) or such as ``../x`` would otherwise swap labels, merge
    two classes into one folder, or leave the destination."""

    def plain(name: str) -> bool:
        parts = name.split("/")
        return all(p not in ("", ".", "..") and "\0" not in p for p in parts)

    keys = [n.split("/") for n in names]
    if len(set(names)) == len(names) and all(map(plain, names)) and keys == sorted(keys):
        return list(names)
    width = len(str(max(len(names) - 1, 0)))
    return [f"{k:0{width}d}_" + n.replace("/", "_").replace("\0", "_") for k, n in enumerate(names)]


def folder_for(label: float, names: list[str]) -> str:
    """The class folder of a first label: its folder name (:func:`folder_names`);
    numbers that are not whole or have no name are written as they are."""
    if float(label).is_integer() and 0 <= int(label) < len(names):
        return names[int(label)]
    return f"{label:g}"


def folder_of(record: Record, names: list[str]) -> str:
    """The class folder of a record (:func:`folder_for` its first label)."""
    return folder_for(record.label, names)


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
