"""Rich renderings of quantlab's artifacts for the terminal: tables of histograms and a bar view of one histogram."""

from __future__ import annotations

import numpy as np
from rich.console import Group
from rich.table import Table
from rich.text import Text

from quantlab.histogram import Histogram, HistogramSet

_BLOCKS = " ▁▂▃▄▅▆▇█"


def tail_mass(hist: Histogram, fraction: float = 0.01) -> float:
    """Share of the values whose |x| lies in the top `fraction` of the range: how long-tailed a tensor is."""
    folded = hist.fold()
    total = folded.total
    if total == 0:
        return 0.0
    start = int(np.floor(folded.bins * (1.0 - fraction)))
    return float(folded.counts[start:].sum() / total)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


def histogram_table(histograms: HistogramSet) -> Table:
    """One row per tensor: range, counts, zeros, non-finite values and tail mass."""
    table = Table(title=f"{len(histograms)} tensors, {histograms.metadata.get('bins', '?')} bins of |x|")
    for column in ("tensor", "min", "max", "max|x|", "count", "zeros", "NaN/Inf", "top 1% mass"):
        if column == "tensor":
            table.add_column(column, overflow="fold", min_width=16)
        else:
            table.add_column(column, justify="right", no_wrap=True)
    for name, hist in histograms.items():
        nonfinite = hist.nan_count + hist.inf_count
        zeros = "-" if not hist.count else f"{hist.zero_count / hist.count:.1%}"
        table.add_row(
            name,
            _fmt(hist.min),
            _fmt(hist.max),
            _fmt(hist.amax),
            f"{hist.count:,}" if hist.count is not None else "-",
            zeros,
            Text(f"{hist.nan_count:,}/{hist.inf_count:,}", style="bold red" if nonfinite else ""),
            f"{tail_mass(hist):.1e}",
        )
    return table


def bar_view(hist: Histogram, width: int = 64, height: int = 8) -> Group:
    """The |x| histogram regrouped into `width` columns, log-scaled counts drawn `height` rows tall."""
    folded = hist.fold()
    columns = np.add.reduceat(folded.counts, np.linspace(0, folded.bins, min(width, folded.bins), endpoint=False).astype(int))
    levels = np.log1p(columns.astype(np.float64))
    eighths = np.zeros_like(levels) if levels.max() == 0 else np.round(levels / levels.max() * height * 8)
    rows = []
    for row in range(height - 1, -1, -1):
        cells = np.clip(eighths - row * 8, 0, 8).astype(int)
        rows.append(Text("".join(_BLOCKS[c] for c in cells), style="cyan"))
    axis = f"0{' ' * (len(columns) - 1 - len(_fmt(folded.edges[-1])))}{_fmt(folded.edges[-1])}"
    return Group(*rows, Text(axis, style="dim"), Text("|x|, log-scaled counts", style="dim"))


def tensor_detail(name: str, hist: Histogram) -> Group:
    """Statistics and the bar view of one tensor."""
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    for label, value in (
        ("tensor", name),
        ("bins", f"{hist.bins} ({'signed' if hist.is_signed else '|x|'})"),
        ("min / max", f"{_fmt(hist.min)} / {_fmt(hist.max)}"),
        ("max|x|", _fmt(hist.amax)),
        ("values", f"{hist.count:,}" if hist.count is not None else "-"),
        ("zeros", "-" if not hist.count else f"{hist.zero_count / hist.count:.2%}"),
        ("NaN / Inf", f"{hist.nan_count:,} / {hist.inf_count:,} (left out of the histogram)"),
        ("top 1% mass", f"{tail_mass(hist):.3e}"),
    ):
        table.add_row(label, value)
    return Group(table, Text(""), bar_view(hist))


def _severity(sqnr_db: float) -> str:
    """Rich style for an SQNR: below 20 dB is severe, below 30 dB worth a look."""
    return "bold red" if sqnr_db < 20 else "yellow" if sqnr_db < 30 else "green"


def engine_lines(metadata: dict) -> list[str]:
    """What ran the INT8 model (`quantlab.engine`): the engine, how many weighted ops ran as integer kernels (with a
    hint where fewer than half did) and the latency per sample of FP32 and INT8; for the terminal and the notebook."""
    lines = [f"engine: {metadata['engine']}"] if metadata.get("engine") else []
    kernels = metadata.get("integer_kernels")
    if kernels:
        line = f"Conv/MatMul/Gemm as integer kernels: {kernels['integer']} of {kernels['weighted']}"
        if kernels["integer"] < kernels["weighted"] / 2:
            line += " (quantlab export --target onnxruntime places Q/DQ for ONNX Runtime's integer kernels)"
        lines.append(line)
    latency = metadata.get("latency_ms")
    if latency:
        ratio = latency["fp32"] / latency["int8"]
        speed = f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"
        lines.append(
            f"latency per sample: FP32 {latency['fp32']:.3g} ms, INT8 {latency['int8']:.3g} ms ({speed}; "
            f"{latency['samples']} samples, median of {latency['passes']} passes)"
        )
    return lines


def drift_table(report, title: str = "per-layer drift, worst first") -> Table:
    """One row per tensor, worst SQNR first, colored by severity; the final outputs and top-1 in the caption."""
    table = Table(title=title)
    for column in ("tensor", "op", "SQNR dB", "cosine", "rel err", "max abs err"):
        if column == "tensor":
            table.add_column(column, overflow="fold", min_width=16)
        else:
            table.add_column(column, justify="right", no_wrap=True)
    for layer in report.worst_first():
        table.add_row(
            layer.name,
            layer.op_type,
            Text(f"{layer.sqnr_db:.2f}", style=_severity(layer.sqnr_db)),
            f"{layer.cosine:.6f}",
            f"{layer.rel_err:.4f}",
            f"{layer.max_abs_err:.4g}",
        )
    final = report.final
    lines = [f"final {o.name}: SQNR {o.sqnr_db:.2f} dB, cosine {o.cosine:.6f}" for o in final["outputs"]]
    lines += [other.describe() for other in final.get("other_outputs", [])]
    if "top1_fp32" in final:
        lines.append(
            f"top-1 FP32 {final['top1_fp32']:.2%}  INT8 {final['top1_int8']:.2%}  "
            f"agreement {final['top1_agreement']:.2%}  ({final['samples']} samples)"
        )
    lines += engine_lines(report.metadata)
    table.caption = "\n".join(lines)
    return table


def sqnr_comparison_table(first, second, first_label: str, second_label: str) -> Table:
    """Per-tensor SQNR of two INT8 variants side by side (graph order), with the difference."""
    table = Table(title="SQNR per tensor (dB), two calibrations")
    table.add_column("tensor", overflow="fold", min_width=16)
    for column in (first_label, second_label, "difference"):
        table.add_column(column, justify="right", no_wrap=True)
    other = {layer.name: layer.sqnr_db for layer in [*second.layers, *second.final["outputs"]]}
    for layer in [*first.layers, *first.final["outputs"]]:
        theirs = other.get(layer.name)
        table.add_row(
            layer.name,
            Text(f"{layer.sqnr_db:.2f}", style=_severity(layer.sqnr_db)),
            "-" if theirs is None else Text(f"{theirs:.2f}", style=_severity(theirs)),
            "-" if theirs is None else f"{theirs - layer.sqnr_db:+.2f}",
        )
    return table


def mixed_precision_table(result) -> Table:
    """What `--target-sqnr` / `--keep-fp32` ran (a `quantlab.mixed.MixedPrecision`): the most sensitive layers kept in
    FP32 one more at a time, with the worst float output's SQNR on the measured samples and the SQNR of the layer
    quantized alone (on the calibration samples); the chosen row in bold."""
    table = Table(title=f"keeping the most sensitive layers in FP32 (worst float output, {result.samples} samples)")
    for column in ("kept", "layer added", "SQNR dB", "quantized alone dB"):
        table.add_column(column, justify="left" if column == "layer added" else "right", overflow="fold")
    alone = {entry.layer: entry.sqnr_db for entry in result.ranking}
    for kept, score in result.steps:
        added = kept[-1] if kept else "(none: every layer INT8)"
        chosen = kept == result.kept_fp32
        table.add_row(
            Text(str(len(kept)), style="bold" if chosen else ""),
            Text(added, style="bold" if chosen else ""),
            Text(f"{score.sqnr_db:.2f}", style=_severity(score.sqnr_db)),
            f"{alone[kept[-1]]:.2f}" if kept else "",
        )
    return table


def auto_summary(search) -> Table:
    """What `--method auto` measured: the final-output SQNR of each method alone and of the chosen mix, and how many
    tensors took each method (an `AutoCalibration`)."""
    table = Table(title=f"auto ({search.target} target): final-output SQNR on {search.samples} calibration samples, worst output")
    for column in ("thresholds", "final-output SQNR dB", "tensors"):
        table.add_column(column, justify="left" if column == "thresholds" else "right")
    counts = search.summary()["tensors_per_candidate"]
    for label, sqnr in search.candidate_sqnr.items():
        table.add_row(f"{label} alone", Text(f"{sqnr:.2f}", style=_severity(sqnr)), "")
    mix = ", ".join(f"{label} {count}" for label, count in sorted(counts.items(), key=lambda item: -item[1]))
    table.add_row(Text("chosen", style="bold"), Text(f"{search.sqnr:.2f}", style=_severity(search.sqnr)), mix)
    return table


def clipping_table(histograms: HistogramSet, amax: dict[str, float], rows: int = 10) -> Table:
    """The tensors the thresholds clip the most (lowest amax / max|x|), with the share of values clipped."""
    from quantlab.plots import clipped_fraction

    table = Table(title=f"the {rows} tensors clipped the most")
    for column in ("tensor", "amax", "max|x|", "amax / max|x|", "values clipped"):
        table.add_column(column, justify="left" if column == "tensor" else "right", overflow="fold")
    ratio = {name: (amax[name] / hist.amax if hist.amax else 1.0) for name, hist in histograms.items() if name in amax}
    for name in sorted(ratio, key=ratio.get)[:rows]:
        hist = histograms[name]
        table.add_row(name, _fmt(amax[name]), _fmt(hist.amax), f"{ratio[name]:.3f}", f"{clipped_fraction(hist, amax[name]):.4%}")
    return table


def comparison_table(histograms: HistogramSet, tables: dict[str, dict[str, float]]) -> Table:
    """amax per tensor for several methods side by side, with max|x| for scale."""
    table = Table(title="amax per tensor and method")
    table.add_column("tensor", overflow="fold", min_width=16)
    table.add_column("max|x|", justify="right", no_wrap=True)
    for label in tables:
        table.add_column(label, justify="right", no_wrap=True)
    for name, hist in histograms.items():
        table.add_row(name, _fmt(hist.amax), *(_fmt(values.get(name)) for values in tables.values()))
    return table


def thresholds_table(thresholds, title: str) -> Table:
    """A threshold file's tensors: scale (amax/127, as TensorRT stores it) and amax; the header in the caption."""
    table = Table(title=title)
    for column in ("tensor", "scale", "amax"):
        table.add_column(column, justify="left" if column == "tensor" else "right", overflow="fold")
    for name, amax in thresholds.amax.items():
        table.add_row(name, f"{amax / 127:.6g}", f"{amax:.6g}")
    meta = thresholds.metadata
    details = [f"{key}: {meta[key]}" for key in ("header", "trt_version", "algorithm", "method", "variant") if meta.get(key)]
    table.caption = f"{len(thresholds.amax)} tensors" + (f"; {', '.join(details)}" if details else "")
    return table


def diff_table(result, first: str, second: str, top: int = 30) -> Table:
    """Per-tensor amax of two threshold files and their ratio, worst first."""
    table = Table(title=f"A = {first}, B = {second}")
    for column in ("tensor", "amax A", "amax B", "B / A"):
        table.add_column(column, justify="left" if column == "tensor" else "right", overflow="fold")
    rows = result.rows if top <= 0 else result.rows[:top]
    for row in rows:
        ratio = "missing" if row.missing else f"{row.ratio:.4f}"
        style = "bold red" if row.missing or row.log_ratio > 0.0953 else "yellow" if row.log_ratio > 0.00995 else ""
        table.add_row(row.name, _fmt(row.amax_a), _fmt(row.amax_b), Text(ratio, style=style))
    if top > 0 and len(result.rows) > top:
        table.caption = f"{len(result.rows) - top} more rows (--top 0 shows all)"
    return table
