"""Several `.rec`/`.idx` shards read as one dataset.

Resolves what a user passes as a source (a `.rec`, a prefix, a glob, or a list of
those) into shards, numbers their records globally in shard order, and writes the one
global `.idx` DALI's ``readers.mxnet`` needs when given several `.rec` files (its
offsets count from the start of the concatenation of the files).
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gpurec.recordio import RecordIOError, RecordReader, idx_path_for, write_idx

__all__ = ["Dataset", "resolve_source"]

_SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.rec$")


def _resolve_one(item: str | os.PathLike) -> list[Path]:
    text = os.fspath(item)
    if any(c in text for c in "*?["):
        found = sorted(Path(p) for p in glob.glob(text) if p.endswith(".rec"))
        if not found:
            raise FileNotFoundError(f"no .rec files match {text!r}")
        return found
    path = Path(text)
    if path.suffix == ".rec":
        if not path.is_file():
            raise FileNotFoundError(f"record file not found: {path}")
        return [path]
    single = Path(text + ".rec")
    if single.is_file():
        return [single]
    shards = sorted(Path(p) for p in glob.glob(glob.escape(text) + "-[0-9]*-of-[0-9]*.rec"))
    if not shards:
        raise FileNotFoundError(f"no {text}.rec nor shards {text}-KKKKK-of-NNNNN.rec found")
    total = int(_SHARD.search(shards[0].name).group(2))
    have = {int(_SHARD.search(p.name).group(1)) for p in shards}
    missing = sorted(set(range(total)) - have)
    if missing:
        raise FileNotFoundError(
            f"{text}: shard(s) {', '.join(map(str, missing))} of {total} are missing"
        )
    return shards


def resolve_source(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The `.rec` files a source names: a path, a prefix (``PREFIX.rec`` or all of
    ``PREFIX-KKKKK-of-NNNNN.rec``), a glob, or a list of any of these, in order."""
    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not items:
        raise ValueError("source is empty: give a .rec path, a prefix, a glob or a list")
    out: list[Path] = []
    for item in items:
        out += _resolve_one(item)
    return out


class Dataset:
    """The records of several shards, numbered 0..N-1 in shard order, then `.idx` order."""

    def __init__(self, recs: Sequence[Path]) -> None:
        self.readers: list[RecordReader] = []
        for rec in recs:
            idx = idx_path_for(rec)
            if not idx.is_file():
                raise RecordIOError(
                    f"no index {idx.name} beside the shard (rebuild it with "
                    "gpurec.recordio.rebuild_idx)",
                    rec,
                )
            self.readers.append(RecordReader(rec, idx))
        sizes = np.array([len(r) for r in self.readers], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])
        if self.starts[-1] == 0:
            raise ValueError(f"the source holds no records: {', '.join(map(str, recs))}")

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def paths(self) -> list[Path]:
        return [r.path for r in self.readers]

    def locate(self, i: int) -> tuple[int, int]:
        """(shard number, position in that shard) of global record ``i``."""
        shard = int(np.searchsorted(self.starts, i, side="right")) - 1
        return shard, int(i - self.starts[shard])

    def read(self, i: int) -> bytes:
        shard, pos = self.locate(i)
        return self.readers[shard][pos]

    def where(self, i: int) -> str:
        """``shard.rec record K at byte B``: how errors name a record."""
        shard, pos = self.locate(i)
        reader = self.readers[shard]
        return f"{reader.path} record {pos} at byte {int(reader.offsets[pos])}"

    def write_global_idx(self, path: Path) -> Path:
        """One `.idx` whose offsets count over the concatenation of the shards."""
        bases = np.concatenate([[0], np.cumsum([r.size for r in self.readers])])
        offsets = np.concatenate([r.offsets + bases[k] for k, r in enumerate(self.readers)])
        write_idx(path, np.arange(len(offsets)), offsets)
        return path

    def close(self) -> None:
        for reader in self.readers:
            reader.close()
