"""The `gpurec` command: a thin typer layer that parses, calls the library and prints.

Exit codes: 0 done; 1 done but images were skipped under ``--strict``; 2 an error
(bad arguments, unreadable input), printed without a traceback unless ``--debug``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from gpurec.recordio import RecordIOError

app = typer.Typer(
    help="Pack image folders into MXNet RecordIO shards and stream them into training.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(
    stderr=True, soft_wrap=True
)  # progress, warnings and errors; results go to stdout
_state = {"debug": False}


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    """gpurec: image folders -> .rec/.idx shards -> training batches."""
    _state["debug"] = debug


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Errors become one red line and exit code 2 (a traceback only with --debug)."""
    try:
        yield
    except (RecordIOError, ValueError, OSError, RuntimeError) as exc:
        if _state["debug"]:
            raise
        console.print(f"[red]error:[/red] {exc}", markup=True, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: nothing partial was left under a final name[/]")
        raise typer.Exit(130) from None


@contextlib.contextmanager
def _progress(what: str) -> Iterator[tuple[Callable[[int], None], Callable[[int], None]]]:
    """A rich bar with images/s and ETA; yields (set total, advance) callbacks."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("[cyan]{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(
        *columns, console=console, transient=True, disable=not console.is_terminal
    ) as bar:
        task = bar.add_task(what, total=None, rate="")
        start = time.perf_counter()
        done = [0]

        def advance(n: int) -> None:
            done[0] += n
            rate = done[0] / max(time.perf_counter() - start, 1e-9)
            bar.update(task, advance=n, rate=f"{rate:,.0f} img/s")

        yield (lambda total: bar.update(task, total=total)), advance


def _given(**options: Any) -> dict[str, Any]:
    return {k: v for k, v in options.items() if v is not None}


@app.command(
    epilog="Examples:\n\n"
    "  gpurec pack train/ out/imagenet --resize 256 --shards 64\n\n"
    "  gpurec pack pets/images out/pets --label-from-name default --train-ratio 0.8\n\n"
    "  gpurec pack train/ out/in --config configs/imagenet-pack.yaml --num-parts 8 --part 3\n\n"
    "  gpurec pack s3://bucket/train s3://bucket/shards/in --resize 256 --shards 1024\n\n"
    "  gpurec pack /shared/train /shared/out/in --shards 4096 --executor ray"
)
def pack(
    root: Annotated[
        str, typer.Argument(help="Folder of images (class folders, or flat); or a URL.")
    ],
    prefix: Annotated[
        str, typer.Argument(help="Output prefix; its folder is created. Or a URL (s3://...).")
    ],
    config: Annotated[
        Path | None, typer.Option(help="YAML preset; flags given here override it.")
    ] = None,
    label_from_name: Annotated[
        str | None,
        typer.Option(
            help="Class from the file name: a regex whose first group is the class, or "
            "'default' for <class>_<number>.<ext>. [default: class folders]"
        ),
    ] = None,
    exts: Annotated[
        str | None, typer.Option(help="Comma-separated extensions. [default: .jpeg,.jpg,.png]")
    ] = None,
    lst: Annotated[
        Path | None, typer.Option("--list", help="Pack this .lst instead of listing ROOT.")
    ] = None,
    follow_links: Annotated[
        bool | None, typer.Option("--follow-links", help="Follow symlinks out of ROOT.")
    ] = None,
    allow_outside_root: Annotated[
        bool | None,
        typer.Option("--allow-outside-root", help="Read absolute or '..' paths of --list."),
    ] = None,
    shuffle: Annotated[
        bool | None, typer.Option("--shuffle/--no-shuffle", help="[default: shuffle]")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Shuffle and split seed. [default: 0]")] = None,
    train_ratio: Annotated[
        float | None, typer.Option(help="Share for train; val gets the rest. [default: 1]")
    ] = None,
    test_ratio: Annotated[float | None, typer.Option(help="Share for test. [default: 0]")] = None,
    resize: Annotated[
        int | None, typer.Option(help="Shorter edge in pixels; 0 keeps size. [default: 0]")
    ] = None,
    center_crop: Annotated[
        bool | None, typer.Option("--center-crop", help="Crop the central square first.")
    ] = None,
    quality: Annotated[
        int | None, typer.Option(help="JPEG quality, or PNG level. [default: 95]")
    ] = None,
    encoding: Annotated[str | None, typer.Option(help="'.jpg' or '.png'. [default: .jpg]")] = None,
    color: Annotated[
        int | None, typer.Option(help="1 color, 0 grayscale, -1 unchanged. [default: 1]")
    ] = None,
    pass_through: Annotated[
        bool | None, typer.Option("--pass-through", help="Store files as they are.")
    ] = None,
    max_pixels: Annotated[
        int | None, typer.Option(help="Refuse larger images. [default: 100000000]")
    ] = None,
    pack_label: Annotated[
        bool | None, typer.Option("--pack-label", help="Multi-label .lst lines as multi-label.")
    ] = None,
    shards: Annotated[int | None, typer.Option(help="Shards per split. [default: 1]")] = None,
    num_parts: Annotated[
        int | None, typer.Option(help="Job-array size: shards are dealt to parts. [default: 1]")
    ] = None,
    part: Annotated[
        int | None, typer.Option(help="This job's part, 0..num-parts-1. [default: 0]")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Worker processes. [default: all cores]")
    ] = None,
    executor: Annotated[
        str | None,
        typer.Option(
            help="'processes', 'threads', or 'ray' (shards as tasks on the Ray cluster at "
            "RAY_ADDRESS, a local one when unset). [default: processes]"
        ),
    ] = None,
    storage_option: Annotated[
        list[str] | None,
        typer.Option(
            "--storage-option",
            help="key=value for the fsspec filesystem of a URL ROOT or PREFIX (repeat it), "
            "e.g. endpoint_url=http://127.0.0.1:9000 or anon=true.",
        ),
    ] = None,
    strict: Annotated[
        bool, typer.Option("--strict", help="Exit 1 when any image was skipped.")
    ] = False,
) -> None:
    """Pack a folder of images into .rec/.idx shards (plus .lst, classes, skip report)."""
    from gpurec.config import load_config
    from gpurec.pack import pack as pack_tree

    with _errors():
        options = load_config(config) if config else {}
        options.update(
            _given(
                label_from_name=label_from_name,
                exts=None if exts is None else tuple(e.strip() for e in exts.split(",")),
                lst=None if lst is None else str(lst),
                follow_links=follow_links,
                allow_outside_root=allow_outside_root,
                shuffle=shuffle,
                seed=seed,
                train_ratio=train_ratio,
                test_ratio=test_ratio,
                resize=resize,
                center_crop=center_crop,
                quality=quality,
                encoding=encoding,
                color=color,
                pass_through=pass_through,
                max_pixels=max_pixels,
                pack_label=pack_label,
                shards=shards,
                num_parts=num_parts,
                part=part,
                workers=workers,
                executor=executor,
            )
        )
        if storage_option:
            from gpurec.storage import parse_storage_options

            options["storage_options"] = {
                **(options.get("storage_options") or {}),
                **parse_storage_options(storage_option),
            }
        with _progress("packing") as (set_total, advance):
            summary = pack_tree(root, prefix, progress=advance, on_plan=set_total, **options)
    for path, reason in summary.skipped[:5]:
        console.print(f"[yellow]skipped[/] {path}: {reason}", highlight=False)
    if len(summary.skipped) > 5:
        console.print(f"[yellow]... and {len(summary.skipped) - 5} more[/]")
    if summary.report:
        console.print(f"skip report: {summary.report}", highlight=False)
    typer.echo(summary.line())
    if strict and summary.skipped:
        raise typer.Exit(1)


@app.command(
    epilog="Examples:\n\n"
    "  gpurec export out/faces_train out/faces --format folder\n\n"
    "  gpurec export 'out/in_train-*.rec' s3://bucket/in-wds --format webdataset\n\n"
    "  gpurec export ms1m/train.rec hf/ms1m --format parquet --num-parts 8 --part 3\n\n"
    "  gpurec export lfw.bin out/lfw --format folder"
)
def export(
    source: Annotated[
        str, typer.Argument(help="A .rec, a shard prefix, a glob, a URL; or a verification .bin.")
    ],
    dest: Annotated[str, typer.Argument(help="Output folder, or a URL (s3://...).")],
    format: Annotated[str, typer.Option(help="'folder', 'webdataset' or 'parquet'.")] = "folder",
    max_samples: Annotated[
        int, typer.Option(help="Samples per tar or parquet file, at most.")
    ] = 10_000,
    max_mb: Annotated[float, typer.Option(help="MB per tar or parquet file, about.")] = 1024.0,
    num_parts: Annotated[
        int, typer.Option(help="Job-array size: output files are dealt to parts.")
    ] = 1,
    part: Annotated[int, typer.Option(help="This job's part, 0..num-parts-1.")] = 0,
    on_error: Annotated[
        str, typer.Option(help="'raise' (stop, naming the record) or 'skip' an unreadable one.")
    ] = "raise",
    workers: Annotated[
        int | None, typer.Option(help="Worker processes. [default: all cores]")
    ] = None,
    storage_option: Annotated[
        list[str] | None,
        typer.Option("--storage-option", help="key=value for the fsspec filesystem of a URL."),
    ] = None,
) -> None:
    """Write a dataset's images, bytes unchanged, as class folders, WebDataset tars or
    Hugging Face parquet (labels, class names and header fields kept)."""
    from gpurec.export import export as export_dataset

    with _errors():
        options = None
        if storage_option:
            from gpurec.storage import parse_storage_options

            options = parse_storage_options(storage_option)
        with _progress("exporting") as (set_total, advance):
            summary = export_dataset(
                source, dest, format=format, max_samples=max_samples,
                max_bytes=max(1, int(max_mb * 1e6)), num_parts=num_parts, part=part,
                on_error=on_error, workers=workers, storage_options=options,
                progress=advance, on_plan=set_total,
            )  # fmt: skip
    for where, reason in summary.skipped[:5]:
        console.print(f"[yellow]skipped[/] {where}: {reason}", highlight=False)
    if len(summary.skipped) > 5:
        console.print(f"[yellow]... and {len(summary.skipped) - 5} more[/]")
    for cut in summary.cuts:
        console.print(f"[yellow]cut short[/] {cut}", highlight=False)
    if summary.report:
        console.print(f"skip report: {summary.report}", highlight=False)
    typer.echo(summary.line())


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def im2rec(ctx: typer.Context) -> None:
    """MXNet's im2rec.py, flag for flag: PREFIX ROOT [--list] [--recursive] ... (see -h)."""
    from gpurec.im2rec import build_parser, run

    try:
        args = build_parser().parse_args(ctx.args)
    except SystemExit as exc:  # argparse printed --help or a usage error
        raise typer.Exit(0 if exc.code in (0, None) else 2) from None
    with _errors(), _progress("im2rec") as (set_total, advance):
        lists, summary, listing = run(args, progress=advance, on_plan=set_total)
    if summary is None:
        if args.recursive:  # im2rec prints the folder -> label mapping
            for label, name in enumerate(listing.classes):
                typer.echo(f"{name} {label}")
        for path, reason in listing.skipped:
            console.print(f"[yellow]skipped[/] {path}: {reason}", highlight=False)
        typer.echo(f"wrote {len(lists)} list(s): {', '.join(str(p) for p in lists)}")
        return
    for path, reason in summary.skipped[:5]:
        console.print(f"[yellow]skipped[/] {path}: {reason}", highlight=False)
    typer.echo(summary.line())


@app.command(
    epilog="Examples:\n\n  gpurec info out/imagenet_train\n\n  gpurec info 'out/*.rec' --json"
)
def info(
    source: Annotated[str, typer.Argument(help="A .rec, a shard prefix, or a glob.")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    sample: Annotated[int, typer.Option(help="Records sampled for image sizes.")] = 200,
) -> None:
    """Records, shards, bytes, label histogram, header kind and image sizes of a dataset."""
    from gpurec.inspection import info as dataset_info

    if source.endswith(".bin"):  # an InsightFace verification set
        return _bin_info(source, as_json)
    with _errors(), _progress("reading headers") as (_, advance):
        result = dataset_info(source, sample=sample, progress=advance)
    if as_json:
        typer.echo(result.to_json())
        return
    show = Console(highlight=False, soft_wrap=True)
    for shard in result.shards:
        notes = []
        if shard["layout"] == "insightface":
            notes.append(f"InsightFace layout: {shard['other_records']} header/identity records")
        elif shard["other_records"]:
            notes.append(f"{shard['other_records']} header-only records (no image) left out")
        if not shard["indexed"]:
            cached = shard["index_file"] or "nowhere (no writable place)"
            notes.append(f"no .idx: index from one scan, cached in {cached}")
        if shard.get("unindexed_bytes"):
            notes.append(
                f"[yellow]{shard['unindexed_bytes']:,} bytes after the last indexed record[/] "
                "(an .idx cut short? `gpurec index` rebuilds it)"
            )
        if shard["cut"]:
            notes.append(f"[red]cut short[/]: {shard['lost_records']} record(s) lost")
        extra = f" ({'; '.join(notes)})" if notes else ""
        show.print(
            f"shard   {shard['path']}: {shard['records']} images, {shard['bytes']:,} bytes{extra}"
        )
    show.print(f"labels  {result.label_kind}; by {'class' if result.classes else 'label'}:")
    for name, count in result.labels.items():
        show.print(f"        {name}: {count}")
    sample_ = result.sample
    if sample_.get("width"):
        w, h = sample_["width"], sample_["height"]
        show.print(
            f"images  ({sample_['records']} sampled) {sample_['formats']}; "
            f"width {w['min']}..{w['median']:g}..{w['max']}, "
            f"height {h['min']}..{h['median']:g}..{h['max']}"
        )
    typer.echo(
        f"{result.records} images in {len(result.shards)} shard(s), {result.bytes / 1e6:.1f} MB, "
        f"{len(result.labels)} label value(s), {result.label_kind}"
    )


def _bin_info(source: str, as_json: bool) -> None:
    """``gpurec info lfw.bin``: the pairs of an InsightFace verification set."""
    import json

    from gpurec.formats.verification import read_bin

    with _errors():
        result = read_bin(source).summary()
    if as_json:
        typer.echo(json.dumps(result, indent=1))
        return
    typer.echo(
        f"{result['pairs']} pairs ({result['same']} same, {result['different']} different), "
        f"{result['images']} images {result['formats']}: InsightFace verification set {source}"
    )


@app.command(epilog="Example:\n\n  gpurec verify out/imagenet_train && echo intact")
def verify(
    source: Annotated[str, typer.Argument(help="A .rec, a shard prefix, or a glob.")],
    workers: Annotated[int, typer.Option(help="Decoding threads. [default: all cores]")] = 0,
    show_max: Annotated[int, typer.Option("--show", help="Bad records to list.")] = 50,
) -> None:
    """Check every frame, the .idx against the .rec, and that every image decodes.

    Exit code 0: intact; 1: bad records (listed); 2: could not check.
    """
    from gpurec.dataset import resolve_source
    from gpurec.inspection import verify as verify_dataset
    from gpurec.recordio import RecordReader

    with _errors():
        recs = resolve_source(source)
        total = 0
        for rec in recs:
            try:
                with RecordReader(rec) as reader:
                    total += len(reader)
            except RecordIOError:
                pass  # verify itself reports what is wrong with this shard
        with _progress("verifying") as (set_total, advance):
            set_total(total or None)
            report = verify_dataset(recs, workers=workers, progress=advance)
    show = Console(highlight=False, soft_wrap=True)
    for note in report.notes:
        show.print(f"note {note}")
    for bad in report.bad[:show_max]:
        index = "-" if bad.index is None else str(bad.index)
        show.print(f"[red]bad[/]  {bad.shard}  index {index}  offset {bad.offset}  {bad.reason}")
    if len(report.bad) > show_max:
        show.print(f"... and {len(report.bad) - show_max} more")
    verdict = "intact" if report.ok else f"{len(report.bad)} problem(s)"
    typer.echo(f"verified {report.records} records in {len(recs)} shard(s): {verdict}")
    if not report.ok:
        raise typer.Exit(1)


@app.command(epilog="Example:\n\n  gpurec index out/imagenet_train-00003-of-00064.rec")
def index(
    rec: Annotated[Path, typer.Argument(help="The .rec whose index to rebuild.")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="[default: the .idx beside REC]")
    ] = None,
    keys: Annotated[str, typer.Option(help="'id' (IRHeader ids, as im2rec) or 'position'.")] = "id",
    intact: Annotated[
        bool, typer.Option("--intact", help="Index the records before a cut or broken part.")
    ] = False,
) -> None:
    """Rebuild a lost or wrong .idx by scanning the .rec.

    A .rec cut short is an error (naming the byte) unless --intact: then the records
    before the cut are indexed, so MXNet, DALI and gpurec can read them.
    """
    from gpurec.recordio import read_idx, rebuild_idx

    with _errors():
        if keys not in ("id", "position"):
            raise ValueError(f"--keys must be 'id' or 'position', got {keys!r}")
        if not rec.is_file():
            raise FileNotFoundError(f"record file not found: {rec}")
        start = time.perf_counter()
        try:
            path = rebuild_idx(rec, output, keys=keys, intact=intact)  # type: ignore[arg-type]
        except RecordIOError as exc:
            raise RecordIOError(
                f"{exc.reason} (--intact indexes the records before it)",
                exc.path,
                offset=exc.offset,
            ) from None
        offsets = read_idx(path)[1]
    end = _record_end(rec, offsets)
    left = rec.stat().st_size - end
    cut = f"; {left} bytes after byte {end} left out (cut short)" if left else ""
    typer.echo(
        f"wrote {path}: {len(offsets)} records indexed in {time.perf_counter() - start:.2f} s{cut}"
    )


def _record_end(rec: Path, offsets) -> int:
    """Where the last indexed record of ``rec`` ends (0 for none)."""
    from gpurec.recordio import RecordReader

    if not len(offsets):
        return 0
    with RecordReader(rec, idx_path=None) as reader:
        return reader.skip_at(int(max(offsets)))


@app.command(
    epilog="Examples:\n\n  gpurec show out/pets_train -o grid.png\n\n"
    "  gpurec show out/pets_train -o five.png -n 5 --config configs/oxford-pets-train.yaml"
)
def show(
    source: Annotated[str, typer.Argument(help="A .rec, a shard prefix, or a glob.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="PNG to write.")] = Path(
        "grid.png"
    ),
    config: Annotated[
        Path | None, typer.Option(help="Pipeline preset (YAML) to show the effect of.")
    ] = None,
    n: Annotated[int, typer.Option("-n", help="Images in the grid.")] = 16,
    raw: Annotated[bool, typer.Option("--raw", help="Bare tiles, no captions.")] = False,
    seed: Annotated[int, typer.Option(help="Pipeline seed.")] = 0,
    device: Annotated[str, typer.Option(help="'cpu' or 'gpu'.")] = "cpu",
) -> None:
    """A PNG grid of samples as the Pipeline produces them, captioned with class names.

    ``--config`` takes a Pipeline preset, or one whose only key is ``ImageRecordIter``
    holding MXNet's keywords (configs/pets-imagerecorditer.yaml): then the images are
    the ones ``gpurec.mxnet.io.ImageRecordIter`` hands a training script."""
    from gpurec.config import load_config
    from gpurec.grid import picture, write_grid
    from gpurec.inspection import find_classes
    from gpurec.pipeline import Pipeline

    with _errors():
        if n < 1:
            raise ValueError(f"-n must be >= 1, got {n}")
        options = load_config(config) if config else {}
        if "ImageRecordIter" in options:
            pipe = _mxnet_pipeline(options, str(config), source, n, seed, device)
        else:
            options.update(source=source, batch_size=n, seed=seed, device=device,
                           last_batch="partial", num_shards=1, shard_id=0)  # fmt: skip
            options.pop("backend", None)
            options.setdefault("on_error", "skip")  # show what can be shown, say what could not
            pipe = Pipeline.from_config_dict(options, str(config or "show"))
        with pipe:
            batch = next(iter(pipe))
            classes = find_classes(pipe.dataset.paths[0])
            path = write_grid(output, picture(batch, pipe.spec, classes, raw=raw))
    h, w = pipe.spec.height, pipe.spec.width
    skipped = f" ({pipe.skipped} unreadable record(s) skipped)" if pipe.skipped else ""
    typer.echo(f"wrote {path}: {len(batch.label)} images of {h}x{w}{skipped}")


def _mxnet_pipeline(options: dict, origin: str, source: str, n: int, seed: int, device: str):
    """The Pipeline under ``gpurec.mxnet.io.ImageRecordIter`` for a config of MXNet's
    keywords (``{"ImageRecordIter": {...}}``), reading ``source`` ``n`` images at a time."""
    import gpurec.mxnet as mx

    if set(options) != {"ImageRecordIter"} or not isinstance(options["ImageRecordIter"], dict):
        raise ValueError(f"{origin}: an ImageRecordIter config holds one key, ImageRecordIter, "
                         "a mapping of MXNet's keywords")  # fmt: skip
    rec = source if source.endswith(".rec") else source + ".rec"
    kwargs = {**options["ImageRecordIter"], "path_imgrec": rec, "path_imgidx": "",
              "batch_size": n, "seed": seed, "round_batch": False, "verbose": False,
              "ctx": mx.gpu(0) if device == "gpu" else mx.cpu()}  # fmt: skip
    try:  # show what can be shown, say what could not (as for a Pipeline preset)
        it = mx.io.ImageRecordIter.with_pipeline_options({"on_error": "skip"}, **kwargs)
    except TypeError as exc:  # a misspelt keyword: the file's mistake, not a crash
        raise ValueError(f"{origin}: {exc}") from None
    return it.pipe


@app.command(
    epilog="Examples:\n\n  gpurec bench out/imagenet_train --epochs 3\n\n"
    "  gpurec bench out/imagenet_train --device gpu --config configs/imagenet-train.yaml"
)
def bench(
    source: Annotated[str, typer.Argument(help="A .rec, a shard prefix, or a glob.")],
    device: Annotated[str, typer.Option(help="'cpu' or 'gpu'.")] = "cpu",
    backend: Annotated[str, typer.Option(help="'auto', 'dali' or 'cpu'.")] = "auto",
    epochs: Annotated[int, typer.Option(help="Pipeline epochs to time.")] = 3,
    config: Annotated[
        Path | None, typer.Option(help="Pipeline preset (YAML): the transform to time.")
    ] = None,
    limit: Annotated[int, typer.Option(help="Records for the read and decode stages.")] = 2000,
    batch_size: Annotated[int | None, typer.Option(help="[default: the config's, or 64]")] = None,
) -> None:
    """Images/s on your data, stage by stage: read, decode, and the full Pipeline."""
    from gpurec.bench import bench as run_bench
    from gpurec.config import load_config

    with _errors():
        if epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {epochs}")
        options = load_config(config) if config else {}
        batch_size = batch_size or options.pop("batch_size", 64)
        options.pop("batch_size", None)
        data_shape = tuple(options.pop("data_shape", (3, 224, 224)))
        for key in ("source", "device", "backend"):
            options.pop(key, None)
        with _progress("benchmarking") as (_, advance):
            result = run_bench(source, device=device, backend=backend, epochs=epochs,
                               batch_size=batch_size, data_shape=data_shape, limit=limit,
                               progress=advance, **options)  # fmt: skip
    show = Console(highlight=False, soft_wrap=True)
    show.print(f"read     {result.read_per_s:10,.0f} records/s  ({result.read_mb_per_s:,.0f} MB/s, "
               f"{result.records} records)")  # fmt: skip
    show.print(f"decode   {result.decode_per_s:10,.0f} images/s   (OpenCV, all cores)")
    for i, rate in enumerate(result.epochs):
        show.print(f"epoch {i}  {rate:10,.0f} images/s   ({result.backend} on {result.device})")
    show.print(f"startup  {result.startup_s:10.2f} s          (construction to first batch)")
    typer.echo(
        f"bench: {result.pipeline_per_s:,.0f} images/s with {result.backend} on "
        f"{result.device} = {result.pipeline_per_s / result.decode_per_s:.2f}x the decode limit"
    )


def _best_device() -> str:
    """'gpu' when CuPy sees a CUDA device and DALI is installed, else 'cpu'."""
    try:
        import cupy
        import nvidia.dali  # noqa: F401

        return "gpu" if cupy.cuda.runtime.getDeviceCount() > 0 else "cpu"
    except Exception:
        return "cpu"


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for everything.")] = Path(
        "demo-out"
    ),
    per_class: Annotated[int, typer.Option(help="Generated images per class.")] = 64,
    device: Annotated[
        str | None, typer.Option(help="'gpu' or 'cpu'. [default: gpu when available]")
    ] = None,
) -> None:
    """The whole job on built-in sample data: generate images (a few broken), pack them
    into shards, stream them through the augmenting Pipeline, report throughput.

    Example: gpurec demo --out /tmp/gpurec-demo
    """
    from gpurec.grid import picture, write_grid
    from gpurec.pack import pack as pack_tree
    from gpurec.pipeline import Pipeline
    from gpurec.sample import make_sample_tree

    show = Console(highlight=False, soft_wrap=True)
    device = device or _best_device()
    with _errors():
        images = make_sample_tree(out / "images", per_class=per_class, bad_files=True)
        with _progress("packing") as (set_total, advance):
            summary = pack_tree(
                images,
                out / "sample",
                resize=96,
                train_ratio=0.75,
                shards=2,
                progress=advance,
                on_plan=set_total,
            )
        show.print(f"images:    {images}")
        for rec in summary.outputs:
            show.print(f"shard:     {rec} (+ .idx, .lst)")
        show.print(f"classes:   {out / 'sample.classes.json'} {summary.classes}")
        for path, reason in summary.skipped:
            show.print(f"[yellow]skipped[/]   {path}: {reason}")
        show.print(f"report:    {summary.report}")
        show.print(summary.line())

        train = Pipeline(
            out / "sample_train",
            16,
            (3, 64, 64),
            device=device,
            max_rotate_angle=15,
            brightness=0.2,
            mean=(123.68, 116.28, 103.53),
            std=(58.395, 57.12, 57.375),
        )
        start, seen = time.perf_counter(), 0
        epochs = 3
        with _progress(f"loading ({device})") as (set_total, advance):
            set_total(epochs * len(train) * train.batch_size)
            for _ in range(epochs):
                for batch in train:
                    seen += len(batch.label)
                    advance(len(batch.label))
        seconds = time.perf_counter() - start
        show.print(
            f"loaded:    {seen} augmented images ({epochs} epochs, batch {train.batch_size}, "
            f"{tuple(batch.data.shape[1:])}) with {type(train.backend).__name__} on {device}"
        )
        grid = write_grid(out / "grid.png", picture(batch, train.spec, summary.classes))
        train.close()
    show.print(f"grid:      {grid} (the last batch, as the model sees it)")
    show.print(
        f"demo: packed {summary.images} images ({len(summary.skipped)} skipped), then loaded "
        f"{seen} augmented images at {seen / seconds:.0f} images/s on {device}"
    )
