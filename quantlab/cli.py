"""The `quantlab` command: a thin typer layer over the library. Heavy imports happen inside the commands."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer

try:  # typer 0.20+ runs on its own copy of click (and no longer installs click): catch that copy's exceptions
    from typer._click import exceptions as click_exceptions
except ImportError:  # older typer runs on click itself
    from click import exceptions as click_exceptions

from quantlab.errors import QuantlabError, first_line

app = typer.Typer(
    name="quantlab",
    help="INT8 calibration analysis: model + data -> histograms -> thresholds -> caches / Q/DQ model -> drift report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
_settings = {"debug": False}


def _console(stderr: bool = False):
    from rich.console import Console

    console = Console(stderr=stderr, highlight=False)
    # Piped output (logs, CI) gets wide tables instead of rich's 80-column default.
    return console if console.is_terminal else Console(stderr=stderr, highlight=False, width=160)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors.")) -> None:
    _settings["debug"] = debug


@contextmanager
def _progress(quiet: bool) -> Iterator:
    """A rich progress bar per stage (shown only on a terminal and without --quiet); yields the progress callback."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = _console(stderr=True)
    bar = Progress(
        TextColumn("{task.description:>12}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("samples"),
        TimeElapsedColumn(),
        console=console,
        disable=quiet or not console.is_terminal,
    )
    tasks: dict[str, int] = {}

    def update(stage: str, samples: int, total: int | None) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.update(tasks[stage], completed=samples, total=total)

    with bar:
        yield update


def _split_patterns(values: Optional[list[str]]) -> list[str] | None:
    patterns = [p.strip() for value in values or [] for p in value.split(",") if p.strip()]
    return patterns or None


def _warn_nonfinite(histograms) -> None:
    console = _console(stderr=True)
    for name, hist in histograms.items():
        if hist.nan_count or hist.inf_count:
            console.print(
                f"[yellow]warning:[/] {name}: {hist.nan_count} NaN and {hist.inf_count} Inf values left out of its histogram"
            )


TARGET_HELP = (
    "Engine the Q/DQ model is for: tensorrt (TensorRT's placement, symmetric int8) or onnxruntime (the placement ONNX "
    "Runtime's CPU provider runs with integer kernels, uint8 activations with asymmetric ranges from a .json table)."
)
DATA_HELP = (
    "A directory of .npy (single input) or .npz (keyed by input name) files, or a data-loader script "
    "loader.py[:FUNCTION] whose function (default load_data) yields dicts of input name -> array."
)


def _parse_shard(value: Optional[str]) -> tuple[int, int] | None:
    if value is None:
        return None
    index, _, count = value.partition("/")
    if not (index.isdigit() and count.isdigit()):
        raise QuantlabError(f"--shard {value}: expected I/N, e.g. 0/4")
    return int(index), int(count)


@app.command()
def collect(
    model: Path = typer.Argument(..., help="FP32 ONNX model."),
    data: str = typer.Option(..., "--data", "-d", metavar="PATH", help=DATA_HELP),
    out: Path = typer.Option(Path("histograms.npz"), "--out", "-o", help="Histogram file (or ranges file with --ranges-only) to write."),
    bins: int = typer.Option(2048, "--bins", help="Bins of |x| per tensor (the signed histogram has twice as many)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Samples per inference run (default: as many as fit in 4 MB of activations)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use only the first N samples."),
    tensors: Optional[list[str]] = typer.Option(None, "--tensors", "-t", help="Only tensors matching these globs (repeat or comma-separate)."),
    ranges_only: bool = typer.Option(False, "--ranges-only", help="Run the range pass alone and write the ranges file."),
    ranges: Optional[Path] = typer.Option(None, "--ranges", help="Ranges file from --ranges-only: run only the histogram pass."),
    shard: Optional[str] = typer.Option(None, "--shard", help="I/N: only the I-th of N parts of the data (with --ranges): a slice of a directory, every N-th sample of a loader's."),
    workers: int = typer.Option(1, "--workers", "-w", help="Run the shards in N local processes and merge."),
    ray: Optional[str] = typer.Option(None, "--ray", help="Run the shards as Ray tasks: a cluster address, 'auto', or 'local'."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Stream every float activation tensor of MODEL over the data into exact histograms."""
    from quantlab.atomic import check_writable
    from quantlab.collection import check_bins

    check_writable(out)
    check_bins(bins)
    shard_index = _parse_shard(shard)
    if shard_index and not (ranges or ranges_only):
        raise QuantlabError("--shard needs --ranges (shards merge exactly only over shared ranges) or --ranges-only")
    if (workers > 1 or ray) and (shard_index or ranges or ranges_only):
        raise QuantlabError("--workers/--ray run every shard themselves; leave out --shard, --ranges and --ranges-only")
    options = dict(batch_size=batch_size, limit=limit, tensors=_split_patterns(tensors))
    with _progress(quiet) as progress:
        if ranges_only:
            from quantlab.collection import collect_ranges

            result = collect_ranges(model, data, shard=shard_index, progress=progress, **options)
        elif workers > 1 or ray:
            from quantlab.shards import collect_parallel

            address = None if ray in (None, "local") else ray
            result = collect_parallel(
                model, data, max(workers, 1), bins=bins, ray_address=address, use_ray=bool(ray), progress=progress, **options
            )
        else:
            from quantlab.collection import collect as collect_histograms

            result = collect_histograms(model, data, bins=bins, ranges=ranges, shard=shard_index, progress=progress, **options)
    result.save(out)
    samples = result.metadata["data"]["samples"]
    if ranges_only:
        _console().print(f"wrote {out}: ranges of {len(result.names)} tensors from {samples} samples")
        return
    _warn_nonfinite(result)
    _console().print(
        f"wrote {out}: {len(result)} tensors x {bins} bins of |x| from {samples} samples in {result.metadata['seconds']:.2f} s"
    )


@app.command("save-data")
def save_data(
    model: Path = typer.Argument(..., help="ONNX model whose inputs the samples are checked against."),
    data: str = typer.Option(..., "--data", "-d", metavar="PATH", help=DATA_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Directory to write (new or empty): one .npy/.npz file per item the data yields."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Write only the first N samples."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Read the data once (run a loader script) and write its samples, checked against MODEL, as a data directory: every later run reads exactly these samples, and --workers/--shard split them by file."""
    from quantlab.data import save_data as save

    with _progress(quiet) as progress:
        saved = save(model, data, out, limit=limit, progress=progress)
    _console().print(f"wrote {out}: {saved.num_samples} samples in {saved.origin['files']} files")


@app.command()
def merge(
    parts: list[Path] = typer.Argument(..., help="Histogram files collected with the same --ranges (e.g. part-*.npz)."),
    out: Path = typer.Option(Path("histograms.npz"), "--out", "-o", help="Merged histogram file to write."),
) -> None:
    """Add up histogram parts collected over shared ranges: exactly the single-process histograms."""
    from quantlab.atomic import check_writable
    from quantlab.histogram import HistogramSet, load_histograms

    check_writable(out)
    merged = HistogramSet.merge(load_histograms(part) for part in parts)
    merged.save(out)
    _console().print(f"wrote {out}: {len(merged)} tensors from {len(parts)} parts, {merged.metadata['data']['samples']} samples")


@app.command()
def show(
    histograms_file: Path = typer.Argument(..., metavar="HISTOGRAMS", help="Histogram file from `quantlab collect`."),
    tensor: Optional[str] = typer.Argument(None, help="One tensor to show in detail."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="With TENSOR: write its histogram with the thresholds as an image."),
    thresholds: Optional[list[Path]] = typer.Option(None, "--thresholds", help="Threshold files to mark on the plot (repeatable)."),
) -> None:
    """Table of every tensor's histogram statistics, or one tensor's histogram in detail."""
    from quantlab.histogram import load_histograms
    from quantlab.report import histogram_table, tensor_detail

    if plot is not None:
        from quantlab.plots import check_figure_path

        if tensor is None:
            raise QuantlabError("--plot needs a TENSOR")
        check_figure_path(plot)
    histograms = load_histograms(histograms_file)
    console = _console()
    if tensor is None:
        console.print(histogram_table(histograms))
        return
    if tensor not in histograms:
        import difflib

        close = difflib.get_close_matches(tensor, list(histograms), n=3, cutoff=0.3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise QuantlabError(f"{histograms_file}: no tensor named {tensor!r}{hint}")
    hist = histograms[tensor]
    console.print(tensor_detail(tensor, hist))
    if plot is not None:
        from quantlab.calibration import compute_amax
        from quantlab.formats import read_thresholds
        from quantlab.plots import plot_histogram, save_figure

        # each method's threshold, also for a tensor calibrate leaves in float (see the histogram it would have had)
        marks = {method: compute_amax(hist, method) for method in ("max", "kl", "percentile", "mse")}
        for path in thresholds or []:
            table = read_thresholds(path)
            if tensor not in table.amax:
                raise QuantlabError(f"{path}: no threshold for tensor {tensor!r}")
            marks[path.name] = table.amax[tensor]
        save_figure(plot_histogram(hist, marks, title=tensor), plot)
        console.print(f"wrote {plot}")


def _method_options(method: str, variant: Optional[str], percentile: Optional[float], exact_zeros: Optional[bool]) -> dict:
    options: dict = {}
    if variant is not None:
        options["variant"] = variant
    if percentile is not None:
        if method != "percentile":
            raise QuantlabError("--percentile goes with --method percentile")
        options["percentile"] = percentile
    if exact_zeros is not None:
        options["exact_zeros"] = exact_zeros
    return options


@app.command()
def calibrate(
    histograms_file: Path = typer.Argument(..., metavar="HISTOGRAMS", help="Histogram file from `quantlab collect`."),
    method: str = typer.Option("auto", "--method", "-m", help="auto (default: the method whose thresholds give the model's worst output the highest SQNR, run with ONNX Runtime on calibration samples; with 32 samples or more, chosen per group of tensors), kl, max, percentile or mse."),
    variant: Optional[str] = typer.Option(None, "--variant", help="kl: tensorrt (default), modelopt, onnxruntime; percentile: modelopt, onnxruntime."),
    percentile: Optional[float] = typer.Option(None, "--percentile", help="Percentile of |x| for --method percentile (default 99.99)."),
    exact_zeros: Optional[bool] = typer.Option(None, "--exact-zeros/--literal", help="kl tensorrt: exact zeros as their own level (default) or the slides verbatim."),
    out: Path = typer.Option(Path("thresholds.json"), "--out", "-o", help="Output: .json (quantlab table), .cache (TensorRT), .flatbuffers (ORT TensorRT EP)."),
    format: Optional[str] = typer.Option(None, "--format", help="json, trt-cache or ort-table (default: from the extension)."),
    trt_version: Optional[str] = typer.Option(None, "--trt-version", help="TensorRT version the cache is for (header code), e.g. 8.6.1 or 10.3.0."),
    compare: Optional[str] = typer.Option(None, "--compare", help="Comma-separated methods (or method:variant) to show side by side, e.g. max,kl,percentile."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="With --compare: write amax per tensor per method as an image."),
    model: Optional[Path] = typer.Option(None, "--model", help="auto: the FP32 model (default: the one the histograms were collected from)."),
    data: Optional[str] = typer.Option(None, "--data", "-d", metavar="PATH", help=f"auto: calibration samples to run (default: those the histograms were collected from). {DATA_HELP}"),
    target: Optional[str] = typer.Option(None, "--target", help=f"auto: the export target the thresholds are for (default tensorrt). {TARGET_HELP}"),
    samples: Optional[int] = typer.Option(None, "--samples", help="auto: run the first N samples (default 32)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Per-tensor thresholds (amax) from histograms, written as a JSON table, TensorRT cache or ORT table."""
    import time

    from quantlab.atomic import check_writable
    from quantlab.calibration import calibrate as calibrate_all
    from quantlab.formats import Thresholds, write_thresholds
    from quantlab.histogram import load_histograms
    from quantlab.digest import file_sha256
    from quantlab.report import auto_summary, clipping_table, comparison_table

    check_writable(out)
    if plot is not None:
        from quantlab.plots import check_figure_path

        if compare is None:
            raise QuantlabError("--plot goes with --compare")
        check_figure_path(plot)
    options = _method_options(method, variant, percentile, exact_zeros)
    measured = {"model": model, "data": data, "target": target, "samples": samples}
    measured = {key: value for key, value in measured.items() if value is not None}
    if method != "auto" and measured:
        raise QuantlabError(f"--{next(iter(measured))} goes with --method auto")
    histograms = load_histograms(histograms_file)
    started = time.perf_counter()
    search = None
    if method == "auto":
        from quantlab.calibration.auto import auto_calibrate

        with _progress(quiet) as progress:
            search = auto_calibrate(histograms, **options, **measured, progress=progress)
        amax = search.amax
    else:
        amax = calibrate_all(histograms, method, **options)
    seconds = time.perf_counter() - started
    metadata = {
        "method": method,
        "variant": options.get("variant", "tensorrt" if method == "kl" else None),
        "options": options,
        "source": {
            "histograms": str(histograms_file),
            "sha256": file_sha256(histograms_file),
            "model_sha256": histograms.metadata.get("model_sha256"),
        },
    }
    if search is not None:
        metadata["auto"] = search.summary()
    tables = {}  # the --compare methods run before anything is written: a bad one leaves no output behind
    for spec in (item.strip() for item in (compare or "").split(",") if item.strip()):
        name, _, spec_variant = spec.partition(":")
        tables[spec] = calibrate_all(histograms, name, **({"variant": spec_variant} if spec_variant else {}))
    write_options = {"trt_version": trt_version} if trt_version else {}
    min_max = histograms.min_max(amax)  # for asymmetric ranges
    write_thresholds(out, Thresholds(amax, metadata, min_max), format=format, **write_options)
    console = _console()
    console.print(clipping_table(histograms, amax))
    described = " ".join([method, *(f"{key}={value}" for key, value in options.items())])
    if search is not None:
        console.print(auto_summary(search))
    console.print(f"wrote {out}: {len(amax)} tensors, method {described}, {seconds * 1000:.1f} ms")
    if compare is not None:
        console.print(comparison_table(histograms, tables))
        if plot is not None:
            from quantlab.plots import plot_threshold_comparison, save_figure

            save_figure(plot_threshold_comparison(tables), plot)
            console.print(f"wrote {plot}")


cache_app = typer.Typer(help="Inspect threshold files (TensorRT caches, JSON tables, ORT tables).", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@cache_app.command("show")
def cache_show(path: Path = typer.Argument(..., help="A .cache, .json or .flatbuffers threshold file.")) -> None:
    """Print a threshold file as a table: tensor, scale (amax/127), amax."""
    from quantlab.formats import read_thresholds
    from quantlab.report import thresholds_table

    table = read_thresholds(path)
    _console().print(thresholds_table(table, title=str(path)))


@app.command()
def diff(
    first: Path = typer.Argument(..., metavar="A", help="Threshold file (cache or table)."),
    second: Path = typer.Argument(..., metavar="B", help="Threshold file to compare with."),
    top: int = typer.Option(30, "--top", help="Rows to show (worst first); 0 for all."),
) -> None:
    """amax per tensor of two threshold files, ratio B/A, worst first; how many differ by more than 1% and 10%."""
    from quantlab.formats import diff_thresholds, read_thresholds
    from quantlab.report import diff_table

    result = diff_thresholds(read_thresholds(first), read_thresholds(second))
    console = _console()
    console.print(diff_table(result, str(first), str(second), top))
    console.print(
        f"{result.compared} tensors in both: {result.over_1pct} differ by more than 1%, {result.over_10pct} by more "
        f"than 10%; only in A: {result.only_a}, only in B: {result.only_b}"
    )


@app.command()
def export(
    model: Path = typer.Argument(..., help="FP32 ONNX model."),
    thresholds: Path = typer.Option(..., "--thresholds", help="Threshold file (.cache, .json or .flatbuffers)."),
    out: Path = typer.Option(Path("model.qdq.onnx"), "--out", "-o", help="Q/DQ ONNX model to write."),
    weights: str = typer.Option("max", "--weights", help="Per-channel weight amax: max or mse."),
    keep_fp32: Optional[list[str]] = typer.Option(None, "--keep-fp32", help="Node (or output tensor) names to leave in FP32."),
    data: Optional[str] = typer.Option(None, "--data", "-d", metavar="PATH", help=f"Inputs whose first sample ONNX Runtime runs the model on before it is written (default: the directory the thresholds' histograms were collected from, else a sample synthesized from the input shapes). {DATA_HELP}"),
    target: str = typer.Option("tensorrt", "--target", help=TARGET_HELP),
    keep_shapes: bool = typer.Option(False, "--keep-shapes", help="Every tensor keeps the FP32 model's shape: the onnxruntime target then widens no depthwise convolution to a multiple of 16 channels (the same values, slower)."),
) -> None:
    """Explicit quantization: write the Q/DQ model for TensorRT 10-11 (symmetric int8) or ONNX Runtime's integer kernels (uint8, asymmetric)."""
    from quantlab.atomic import check_writable
    from quantlab.formats import read_thresholds
    from quantlab.formats.qdq import check_sample, export_qdq, export_target

    check_writable(out)
    export_target(target)  # an unknown target is refused before any work
    table = read_thresholds(thresholds)
    sample = check_sample(model, table, data)
    written = export_qdq(
        model,
        table,
        out,
        weight_method=weights,
        keep_fp32=_split_patterns(keep_fp32) or (),
        data=sample,
        target=target,
        keep_shapes=keep_shapes,
    )
    _console().print(f"wrote {written} (ONNX Runtime ran it on {sample.source})", soft_wrap=True)


def _int8_model(model: Path, thresholds: Optional[Path], qdq: Optional[Path], weights: str, target: str):
    """The INT8 model to compare with: a Q/DQ file as given, or one built in memory from a threshold file."""
    from quantlab.formats import read_thresholds
    from quantlab.formats.qdq import quantize_qdq
    from quantlab.model import load_model

    if (thresholds is None) == (qdq is None):
        raise QuantlabError("give exactly one of --thresholds FILE and --qdq MODEL")
    if qdq is not None:
        return load_model(qdq), {"qdq_model": str(qdq)}
    table = read_thresholds(thresholds)
    method = table.metadata.get("method") or table.metadata.get("algorithm") or "thresholds"
    int8 = quantize_qdq(model, table, weight_method=weights, target=target)
    return int8, {"thresholds": str(thresholds), "method": method, "target": target}


def _tensorrt_drift(model: Path, cache: Optional[Path], qdq: Optional[Path], data, labels, unsupported) -> object:
    """Accumulated drift against a TensorRT engine built from the cache (TensorRT 8-10) or the Q/DQ model."""
    from quantlab.backends.tensorrt import TensorRTPairedRunner
    from quantlab.drift import paired_report

    if unsupported:
        raise QuantlabError("--engine tensorrt measures accumulated drift only (no --isolated, --against, --keep-fp32)")
    if (cache is None) == (qdq is None):
        raise QuantlabError("give exactly one of --thresholds FILE.cache and --qdq MODEL")
    runner = TensorRTPairedRunner(model, cache_path=cache, qdq_model_path=qdq)
    report = paired_report(runner, model, data, labels=labels)
    report.metadata["engine"] = runner.engine
    return report


@app.command()
def build(
    model: Path = typer.Argument(..., help="FP32 ONNX model with --cache (TensorRT 8-10), or a Q/DQ model (TensorRT 10-11)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="quantlab's TensorRT calibration cache (implicit INT8)."),
    out: Path = typer.Option(Path("model.engine"), "--out", "-o", help="Serialized TensorRT engine to write."),
    fp16: bool = typer.Option(True, "--fp16/--no-fp16", help="Let TensorRT use FP16 where INT8 does not apply."),
    keep_fp32: Optional[list[str]] = typer.Option(None, "--layer-fp32", help="Layers (or their output tensors) to keep in FP32 (cache path)."),
) -> None:
    """Build a TensorRT engine from a calibration cache or a Q/DQ model (needs the tensorrt extra and a GPU)."""
    from quantlab.backends.tensorrt import build_engine_from_cache, build_engine_from_qdq

    if cache is not None:
        precisions = {name: "fp32" for name in _split_patterns(keep_fp32) or []}
        written = build_engine_from_cache(model, cache, out, fp16=fp16, layer_precisions=precisions or None)
    else:
        if keep_fp32:
            raise QuantlabError("--layer-fp32 goes with --cache; for a Q/DQ model use `quantlab export --keep-fp32`")
        written = build_engine_from_qdq(model, out, fp16=fp16)
    _console().print(f"wrote {written}")


@app.command()
def drift(
    model: Path = typer.Argument(..., help="FP32 ONNX model."),
    data: str = typer.Option(..., "--data", "-d", metavar="PATH", help=f"The inputs to compare on (e.g. a held-out set). {DATA_HELP}"),
    thresholds: Optional[Path] = typer.Option(None, "--thresholds", help="Threshold file (.cache, .json, .flatbuffers) to build the INT8 model from."),
    qdq: Optional[Path] = typer.Option(None, "--qdq", help="An INT8 Q/DQ model to compare instead."),
    against: Optional[Path] = typer.Option(None, "--against", help="A second threshold file: per-layer SQNR of both side by side."),
    labels: Optional[Path] = typer.Option(None, "--labels", help=".npy of integer labels, one per sample: adds top-1 of FP32 and INT8."),
    isolated: bool = typer.Option(False, "--isolated", help="Each layer's own error, fed the FP32 activations."),
    keep_fp32: Optional[int] = typer.Option(None, "--keep-fp32", help="Keep the K most sensitive layers in FP32 and re-measure."),
    target_sqnr: Optional[float] = typer.Option(None, "--target-sqnr", help="Keep the fewest layers in FP32 (most sensitive first, ranked on --calib-data) for the worst float output to reach DB on --data; exit 1 where it cannot within --max-fp32."),
    max_fp32: str = typer.Option("10%", "--max-fp32", help="With --target-sqnr: the most layers to keep in FP32, a count (6) or a share of the quantizable Conv/ConvTranspose/MatMul/Gemm (10%, rounded down, at least 1)."),
    calib_data: Optional[str] = typer.Option(None, "--calib-data", metavar="PATH", help="Samples to rank the layers on for --target-sqnr/--keep-fp32 (the first 32; default: the data the thresholds' histograms were collected from, else --data)."),
    mixed_out: Path = typer.Option(Path("mixed.qdq.onnx"), "--mixed-out", help="Where --keep-fp32/--target-sqnr write their Q/DQ model."),
    weights: str = typer.Option("max", "--weights", help="Per-channel weight amax: max or mse."),
    target: str = typer.Option("tensorrt", "--target", help=f"With --thresholds: the export target of the INT8 model. {TARGET_HELP}"),
    engine: str = typer.Option("onnxruntime", "--engine", help="INT8 engine to compare: onnxruntime, or tensorrt (optional extra)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write SQNR per layer as an image (.png, .svg, .pdf)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b"),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use only the first N samples."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> Optional[int]:
    """Per-layer FP32 vs INT8 drift (SQNR, cosine, relative and max error), worst first."""
    from quantlab.atomic import check_writable
    from quantlab.data import CalibrationData
    from quantlab.drift import load_labels, measure_drift, measure_isolated
    from quantlab.model import input_specs, load_model
    from quantlab.report import drift_table, sqnr_comparison_table

    proposing = keep_fp32 is not None or target_sqnr is not None
    if proposing:  # checked before anything runs or is written, as every option
        if thresholds is None:
            raise QuantlabError("--keep-fp32/--target-sqnr rebuild the INT8 model: give --thresholds, not --qdq")
        if keep_fp32 is not None and target_sqnr is not None:
            raise QuantlabError("give exactly one of --keep-fp32 K and --target-sqnr DB")
        if keep_fp32 is not None and keep_fp32 < 0:
            raise QuantlabError(f"--keep-fp32 must be >= 0, got {keep_fp32}")
        from quantlab.mixed import max_layers

        max_layers(max_fp32, 1)  # a malformed bound is refused before anything runs
    elif calib_data is not None:
        raise QuantlabError("--calib-data goes with --target-sqnr or --keep-fp32")
    for path in (json_out,) + ((mixed_out,) if proposing else ()):
        if path is not None:
            check_writable(path)
    if plot is not None:
        from quantlab.plots import check_figure_path

        check_figure_path(plot)
    calibration = CalibrationData(data, input_specs(load_model(model)), batch_size=batch_size, limit=limit)
    expected = load_labels(labels)
    if engine == "tensorrt":
        report = _tensorrt_drift(model, thresholds, qdq, calibration, expected, isolated or against or keep_fp32 or target_sqnr)
        source = {"thresholds": str(thresholds or qdq)}
    elif engine == "onnxruntime":
        int8, source = _int8_model(model, thresholds, qdq, weights, target)
        measure = measure_isolated if isolated else measure_drift
        options = {} if isolated else {"labels": expected}
        report = measure(model, int8, calibration, **options)
    else:
        raise QuantlabError(f"--engine {engine}: expected onnxruntime or tensorrt")
    report.metadata.update(source)
    console = _console()
    console.print(drift_table(report, title=f"{report.metadata['mode']} drift, worst first ({source.get('method', 'Q/DQ model')})"))
    if against is not None:
        other_model, other_source = _int8_model(model, against, None, weights, target)
        other = measure(model, other_model, calibration, **options)
        console.print(sqnr_comparison_table(report, other, str(thresholds or qdq), str(against)))
    if plot is not None:
        from quantlab.plots import plot_drift, save_figure

        save_figure(plot_drift(report), plot)
        console.print(f"wrote {plot}")
    mixed = None
    if proposing:
        mixed = _mixed_precision(
            model, thresholds, calibration, calib_data, keep_fp32, target_sqnr, max_fp32, expected, weights, target,
            mixed_out, report, quiet,
        )
    if json_out is not None:
        report.save_json(json_out)
        console.print(f"wrote {json_out}")
    if mixed is not None:  # the last line: what was kept and reached, or (exit 1) why the target was not reached
        line = mixed.message(f"--data ({mixed.samples} samples)")
        if mixed.reached is False:
            print(f"quantlab: {line}", file=sys.stderr)
            return 1
        console.print(line, soft_wrap=True)
    return None


def _mixed_precision(
    model, thresholds, measured, calib_data, keep, target_sqnr, max_fp32, labels, weights, target, mixed_out, report, quiet
):
    """--target-sqnr / --keep-fp32: rank on calibration samples, export, measure on --data; the table, the model and
    the report's "mixed_precision" record. Returns the `MixedPrecision`."""
    from quantlab.atomic import atomic_write
    from quantlab.formats import read_thresholds
    from quantlab.mixed import DEFAULT_SAMPLES, mixed_precision, recorded_calibration
    from quantlab.report import mixed_precision_table

    table = read_thresholds(thresholds)
    calibration = calib_data or recorded_calibration(table)
    ranked_on = f"{calibration}" if calibration else f"--data (no --calib-data, and {thresholds} records no calibration data)"
    with _progress(quiet) as progress:
        result = mixed_precision(
            model, table, calibration or measured, data=measured, target_sqnr=target_sqnr, keep=keep,
            max_fp32=max_fp32, labels=labels, samples=DEFAULT_SAMPLES, weight_method=weights, target=target,
            progress=progress,
        )
    console = _console()
    console.print(mixed_precision_table(result))
    with atomic_write(mixed_out) as handle:
        handle.write(result.model.SerializeToString())
    report.mixed_precision = {**result.summary(), "calibration_data": str(calibration or "--data"), "model": str(mixed_out)}
    if result.ranking:
        console.print(f"layers ranked on {result.calibration_samples} samples of {ranked_on}", soft_wrap=True)
    kept = ", ".join(result.kept_fp32) or "none"
    console.print(f"wrote {mixed_out}: layers kept in FP32: {kept}", soft_wrap=True)
    return result


@app.command()
def demo(
    out: Path = typer.Option(Path("quantlab-demo"), "--out", "-o", help="Directory for every artifact of the demo."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Run every stage on the bundled digits CNN and calib_data/, writing the artifacts to --out."""
    from quantlab.demo import demo_paths, run_demo

    paths = demo_paths()
    console = _console()
    console.print(f"demo model {paths.model}\ncalibration data {paths.calib}")
    from quantlab.report import drift_table

    with _progress(quiet) as progress:
        result = run_demo(out, progress=progress)
    for label, path in result.written.items():
        console.print(f"  wrote {path}  ({label})")
    final = result.report.final
    console.print(
        f"\nheld-out top-1 ({final['samples']} samples): FP32 {final['top1_fp32']:.2%}, "
        f"INT8 Q/DQ in ONNX Runtime {final['top1_int8']:.2%}"
    )
    console.print(drift_table(result.report, title="INT8 drift per tensor, worst first (auto thresholds)"))
    histograms, written = result.written["histograms"], result.written
    console.print("\nnext:")
    console.print(f"  quantlab show {histograms} {result.most_clipped_tensor}   # the tensor the thresholds clip the most")
    console.print(f"  quantlab calibrate {histograms} --compare max,kl,percentile,mse")
    console.print(f"  quantlab drift {written['FP32 model']} -d {paths.eval_inputs} --thresholds {written['auto thresholds']} --isolated")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Python warnings (e.g. a tensor that is all zeros gets amax 0) on one line, like quantlab's own warnings."""
    print(f"warning: {message}", file=sys.stderr)


def main() -> None:
    """Entry point: one-line errors (exit 2 for bad input, 1 for failures, 130 for Ctrl-C) unless --debug."""
    import warnings

    warnings.showwarning = _show_warning
    try:
        result = app(standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except click_exceptions.ClickException as exc:
        if isinstance(exc, getattr(click_exceptions, "NoArgsIsHelpError", ())):
            exc.show()  # `quantlab` or `quantlab cache` alone: the help text
        else:  # a usage error (unknown option, bad value, missing argument): one line, like every other error
            print(f"quantlab: error: {exc.format_message()}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except typer.Abort:
        print("quantlab: aborted", file=sys.stderr)
        sys.exit(1)
    except QuantlabError as exc:
        if _settings["debug"]:
            raise
        print(f"quantlab: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("quantlab: interrupted; nothing written", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        if _settings["debug"]:
            raise
        print(f"quantlab: internal error: {type(exc).__name__}: {first_line(exc)} (run with --debug for the traceback)", file=sys.stderr)
        sys.exit(1)
    sys.exit(result if isinstance(result, int) else 0)
