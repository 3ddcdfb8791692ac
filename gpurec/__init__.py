"""gpurec: image folders to MXNet RecordIO shards, and shards to GPU training batches."""

from gpurec.recordio import (
    IRHeader,
    ListEntry,
    RecordIOError,
    RecordReader,
    RecordWriter,
    pack,
    unpack,
)

__version__ = "0.1.0"

__all__ = [
    "IRHeader",
    "ListEntry",
    "RecordIOError",
    "RecordReader",
    "RecordWriter",
    "__version__",
    "pack",
    "unpack",
]
