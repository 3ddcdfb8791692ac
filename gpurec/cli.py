"""The `gpurec` command: a thin typer layer that parses, calls the library and prints."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from gpurec.recordio import IRHeader, ListEntry, RecordReader, RecordWriter, pack, unpack, write_lst

app = typer.Typer(
    help="Pack image folders into MXNet RecordIO shards and stream them into training.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()


@app.callback()
def main() -> None:
    """gpurec: image folders -> .rec/.idx shards -> batches on the GPU."""


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for everything.")] = Path(
        "demo-out"
    ),
    per_class: Annotated[int, typer.Option(help="Generated images per class.")] = 16,
) -> None:
    """Generate a small sample dataset, write it as RecordIO and read it back.

    Example: gpurec demo --out /tmp/gpurec-demo
    """
    from gpurec.sample import make_sample_tree

    start = time.perf_counter()
    images = make_sample_tree(out / "images", per_class=per_class)
    classes = sorted(p.name for p in images.iterdir() if p.is_dir())
    entries: list[ListEntry] = []
    for label, name in enumerate(classes):
        for f in sorted((images / name).glob("*.jpg")):
            entries.append(ListEntry(len(entries), (float(label),), f"{name}/{f.name}"))
    prefix = out / "sample"
    write_lst(prefix.with_suffix(".lst"), entries)
    with RecordWriter(prefix.with_suffix(".rec"), prefix.with_suffix(".idx")) as writer:
        for e in entries:
            data = (images / e.path).read_bytes()
            writer.write(pack(IRHeader(0, e.labels[0], e.index, 0), data), key=e.index)
    with RecordReader(prefix.with_suffix(".rec")) as reader:
        for i, e in enumerate(entries):
            header, payload = unpack(reader[i])
            want = hashlib.sha256((images / e.path).read_bytes()).digest()
            if header.label != e.labels[0] or hashlib.sha256(payload).digest() != want:
                raise typer.Exit(f"record {i} does not read back as {e.path}")
        size = reader.size
    seconds = time.perf_counter() - start
    console.print(f"images: {images}\nrecords: {prefix}.rec/.idx/.lst")
    console.print(
        f"demo: {len(entries)} images in {len(classes)} classes -> {size} bytes, "
        f"all read back identical, {seconds:.2f} s"
    )
