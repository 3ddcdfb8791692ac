"""gpurec: image folders to MXNet RecordIO shards, and shards to training batches.

``gpurec.pack(root, prefix, ...)`` packs a tree into shards; ``gpurec.Pipeline(...)``
streams shards as augmented batches; ``gpurec.export(source, dest, format=...)`` writes
them out as image folders, WebDataset tars or parquet. The format itself is
:mod:`gpurec.recordio`.
"""

from gpurec.export import ExportSummary
from gpurec.export import export as export  # the function, as gpurec.pack is
from gpurec.pack import PackOptions
from gpurec.pack import pack as pack  # the function; the module stays gpurec.pack in imports
from gpurec.pipeline import Batch, Pipeline
from gpurec.recordio import IRHeader, ListEntry, RecordIOError, RecordReader, RecordWriter
from gpurec.workers import PackSummary

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "ExportSummary",
    "IRHeader",
    "ListEntry",
    "PackOptions",
    "PackSummary",
    "Pipeline",
    "RecordIOError",
    "RecordReader",
    "RecordWriter",
    "__version__",
    "export",
    "pack",
]
