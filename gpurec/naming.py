"""Shard and manifest names: written, parsed and resolved here, and only here.

A pack writes ``PREFIX[_split].rec`` (one shard) or ``PREFIX[_split]-KKKKK-of-NNNNN.rec``
(``KKKKK`` of ``NNNNN``, five digits each), and ``PREFIX.classes.json`` beside them. A
file that is not exactly such a name (a backup ``ds-00001-of-00002-copy.rec``, a hand
made ``ds-1-of-2.rec``) is not a shard of ``PREFIX``: resolving a prefix passes over it.
The functions work on names (the last part of a path or a URL), so local folders and
object-store listings are resolved by the same rules.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ShardName",
    "cache_home",
    "classes_candidates",
    "classes_name",
    "dataset_stem",
    "is_url",
    "parse_shard",
    "scan_cache_name",
    "select_shards",
    "shard_stem",
]

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_SHARD = re.compile(r"^(?P<stem>.*)-(?P<shard>\d{5})-of-(?P<shards>\d{5})\.rec$")
_SPLITS = re.compile(r"_(train|val|test)$")
CLASSES_SUFFIX = ".classes.json"


@dataclass(frozen=True)
class ShardName:
    """``stem-KKKKK-of-NNNNN.rec`` taken apart: shard ``shard`` of ``shards``."""

    stem: str  # PREFIX[_split]
    shard: int
    shards: int


def is_url(path: object) -> bool:
    """Whether ``path`` is a URL with a protocol (``s3://b/k``); ``file://`` counts too."""
    return isinstance(path, str) and bool(_URL.match(path))


def shard_stem(prefix: str, split: str, shard: int, shards: int) -> str:
    """``PREFIX[_split][-KKKKK-of-NNNNN]``: the name of one shard, without extension."""
    name = prefix + (f"_{split}" if split else "")
    if shards > 1:
        name += f"-{shard:05d}-of-{shards:05d}"
    return name


def parse_shard(name: str) -> ShardName | None:
    """The parts of a shard file name (``ds_train-00003-of-00064.rec``), or None for a
    name that is not exactly one (``ds.rec``, ``ds-1-of-2.rec``, ``ds-00001-of-00002-copy.rec``)."""
    match = _SHARD.match(name)
    if match is None:
        return None
    return ShardName(match["stem"], int(match["shard"]), int(match["shards"]))


def dataset_stem(name: str) -> str:
    """``PREFIX[_split]`` of a `.rec` file name: its shard number and extension removed."""
    parsed = parse_shard(name)
    if parsed is not None:
        return parsed.stem
    return name.removesuffix(".rec")


def classes_name(prefix: str) -> str:
    """The name of the class names file a pack writes beside its shards."""
    return prefix + CLASSES_SUFFIX


def classes_candidates(rec_name: str) -> list[str]:
    """Where the class names of a shard are, first found first: ``PREFIX[_split].classes.json``
    then, for a split, ``PREFIX.classes.json`` (``ds_train-00000-of-00004.rec`` ->
    ``ds_train.classes.json``, ``ds.classes.json``)."""
    stem = dataset_stem(rec_name)
    names = [classes_name(stem)]
    base = _SPLITS.sub("", stem)
    if base != stem:
        names.append(classes_name(base))
    return names


def cache_home(part: str) -> Path:
    """gpurec's one cache root, ``$GPUREC_CACHE`` else ``~/.cache/gpurec``, and its
    ``part`` below it (``shards``: fetched shards, ``index``: scans of index-less files)."""
    return Path(os.environ.get("GPUREC_CACHE") or Path.home() / ".cache" / "gpurec") / part


def scan_cache_name(rec_name: str) -> str:
    """The file name of the cached scan of an index-less `.rec` (beside it or in the cache)."""
    return rec_name + ".gpurec-index.npz"


def select_shards(prefix: str, names: Iterable[str], shown: str) -> list[str]:
    """The names among ``names`` (a folder's listing) that are exactly the shards
    ``prefix-KKKKK-of-NNNNN.rec``, in shard order. Every shard of the count they name
    must be there: a missing one, or shards that disagree on the count, is an error
    that says which (``shown`` is the prefix as the user wrote it)."""
    found: dict[int, list[tuple[int, str]]] = {}
    for name in names:
        parsed = parse_shard(name)
        if parsed is not None and parsed.stem == prefix and parsed.shard < parsed.shards:
            found.setdefault(parsed.shards, []).append((parsed.shard, name))
    if not found:
        raise FileNotFoundError(f"no {shown}.rec nor shards {shown}-KKKKK-of-NNNNN.rec found")
    if len(found) > 1:
        counts = " and ".join(f"{n:05d}" for n in sorted(found))
        raise FileNotFoundError(f"{shown}: shards of -of-{counts} stand side by side")
    ((total, shards),) = found.items()
    have = {k for k, _ in shards}
    missing = sorted(set(range(total)) - have)
    if missing:
        first = shard_stem(shown, "", missing[0], total)
        raise FileNotFoundError(
            f"{shown}: shard(s) {', '.join(map(str, missing))} of {total} are missing"
            f" ({first}.rec{' and more' if len(missing) > 1 else ''})"
        )
    return [name for _, name in sorted(shards)]
