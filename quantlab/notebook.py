"""Notebook views: HTML tables of histogram sets and drift reports, and the same rows as pandas DataFrames.

`HistogramSet._repr_html_` / `DriftReport._repr_html_` and their `to_pandas()` forward here, so that Jupyter shows a
table instead of a one-line repr. The tables hold what `quantlab show` and `quantlab drift` print in the terminal
(same columns, same severity colors); pandas is optional and imported only by `to_pandas()`.
"""

from __future__ import annotations

import html
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np

from quantlab.errors import QuantlabError
from quantlab.histogram import Histogram, HistogramSet
from quantlab.report import _fmt, _severity, engine_lines, tail_mass

if TYPE_CHECKING:
    import pandas

    from quantlab.drift import DriftReport

MAX_ROWS = 200  # rows an HTML table shows; to_pandas() has them all
SPARK_COLUMNS = 40
_CSS = {"bold red": "color:#c62828;font-weight:bold", "yellow": "color:#b26a00", "green": "color:#2e7d32"}


def histogram_rows(histograms: HistogramSet) -> list[dict[str, Any]]:
    """One record per tensor, in graph order: the statistics of `quantlab show` (None where unknown)."""
    return [
        {
            "name": name,
            "min": hist.min,
            "max": hist.max,
            "amax": hist.amax,
            "count": hist.count,
            "zero_fraction": hist.zero_count / hist.count if hist.count and hist.zero_count is not None else None,
            "nan_count": hist.nan_count,
            "inf_count": hist.inf_count,
            "top1_mass": tail_mass(hist),
        }
        for name, hist in histograms.items()
    ]


def drift_rows(report: DriftReport) -> list[dict[str, Any]]:
    """One record per tensor, worst SQNR first, the final outputs included and flagged."""
    outputs = report.final["outputs"]
    tensors = sorted([*report.layers, *outputs], key=lambda layer: layer.sqnr_db)
    return [{**asdict(layer), "final_output": any(layer is output for output in outputs)} for layer in tensors]


def sparkline_svg(hist: Histogram, width: int = 120, height: int = 18) -> str:
    """The |x| histogram as a tiny inline SVG: SPARK_COLUMNS columns, log-scaled counts, like `quantlab show`'s bars."""
    folded = hist.fold()
    starts = np.linspace(0, folded.bins, min(SPARK_COLUMNS, folded.bins), endpoint=False).astype(int)
    levels = np.log1p(np.add.reduceat(folded.counts, starts).astype(np.float64))
    tops = height * (1 - levels / levels.max()) if levels.max() > 0 else np.full(levels.size, float(height))
    step = width / levels.size
    path = "".join(f"V{top:.1f}H{(i + 1) * step:.1f}" for i, top in enumerate(tops))
    return (
        f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">'
        f"<title>|x| from 0 to {_fmt(folded.edges[-1])}, log-scaled counts</title>"
        f'<path d="M0,{height}{path}V{height}Z" fill="#4c8bc9"/></svg>'
    )


def histograms_html(histograms: HistogramSet, max_rows: int = MAX_ROWS) -> str:
    """The histogram set as an HTML table: statistics per tensor and a sparkline of its |x| histogram."""
    rows = []
    for record in histogram_rows(histograms)[:max_rows]:
        name = record["name"]
        nonfinite = record["nan_count"] + record["inf_count"]
        zeros = record["zero_fraction"]
        cells = [
            _fmt(record["min"]),
            _fmt(record["max"]),
            _fmt(record["amax"]),
            "-" if record["count"] is None else f"{record['count']:,}",
            "-" if zeros is None else f"{zeros:.1%}",
            _span(f"{record['nan_count']:,}/{record['inf_count']:,}", "bold red" if nonfinite else None),
            f"{record['top1_mass']:.1e}",
            sparkline_svg(histograms[name]),
        ]
        rows.append(_row(name, cells))
    title = f"{len(histograms)} tensors, {histograms.metadata.get('bins', '?')} bins of |x|"
    headers = ["min", "max", "max|x|", "count", "zeros", "NaN/Inf", "top 1% mass", "|x| histogram (log)"]
    return _table(title, headers, rows, _more(len(histograms), max_rows))


def drift_html(report: DriftReport, max_rows: int = MAX_ROWS) -> str:
    """The drift report as an HTML table, worst SQNR first, colored by severity; final outputs and top-1 below."""
    layers = report.worst_first()
    rows = [
        _row(
            layer.name,
            [
                html.escape(layer.op_type),
                _span(f"{layer.sqnr_db:.2f}", _severity(layer.sqnr_db)),
                f"{layer.cosine:.6f}",
                f"{layer.rel_err:.4f}",
                f"{layer.max_abs_err:.4g}",
            ],
        )
        for layer in layers[:max_rows]
    ]
    final = report.final
    notes = [
        f"final {html.escape(o.name)}: SQNR {_span(f'{o.sqnr_db:.2f}', _severity(o.sqnr_db))} dB, cosine {o.cosine:.6f}"
        for o in final["outputs"]
    ]
    notes += [html.escape(other.describe()) for other in final.get("other_outputs", [])]
    if "top1_fp32" in final:
        notes.append(
            f"top-1 FP32 {final['top1_fp32']:.2%}, INT8 {final['top1_int8']:.2%}, "
            f"agreement {final['top1_agreement']:.2%} ({final['samples']} samples)"
        )
    notes += [html.escape(line) for line in engine_lines(report.metadata)]
    title = f"{report.metadata.get('mode', '')} drift per tensor, worst first".strip()
    headers = ["op", "SQNR dB", "cosine", "rel err", "max abs err"]
    return _table(title, headers, rows, "<br>".join(filter(None, [*notes, _more(len(layers), max_rows)])))


def histograms_frame(histograms: HistogramSet) -> pandas.DataFrame:
    """One row per tensor (graph order), indexed by tensor name; the set's metadata in `.attrs`."""
    frame = _frame(histogram_rows(histograms))
    frame.attrs.update(histograms.metadata)
    return frame


def drift_frame(report: DriftReport) -> pandas.DataFrame:
    """One row per tensor, worst SQNR first, indexed by tensor name; top-1 and metadata in `.attrs`."""
    frame = _frame(drift_rows(report))
    frame.attrs.update(report.metadata)
    frame.attrs.update({key: value for key, value in report.final.items() if key != "outputs"})
    return frame


def _frame(records: list[dict[str, Any]]) -> pandas.DataFrame:
    """The records as a DataFrame indexed by tensor name (an empty one when there are none)."""
    try:
        import pandas
    except ImportError:
        raise QuantlabError("to_pandas() needs pandas, an optional dependency: pip install pandas") from None
    frame = pandas.DataFrame(records)
    return frame.set_index("name") if records else frame


def _span(text: str, style: str | None) -> str:
    return f'<span style="{_CSS[style]}">{text}</span>' if style else text


def _more(total: int, shown: int) -> str:
    return f"{total - shown} more tensors not shown (to_pandas() has them all)" if total > shown else ""


def _row(name: str, cells: list[str]) -> str:
    """A table row: the escaped tensor name (left-aligned), then already-formatted cells (Jupyter right-aligns them)."""
    body = "".join(f"<td>{cell}</td>" for cell in cells)
    return f'<tr><td style="text-align:left">{html.escape(name)}</td>{body}</tr>'


def _table(title: str, headers: list[str], rows: list[str], caption: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ["tensor", *headers])
    foot = f'<div style="font-size:smaller">{caption}</div>' if caption else ""
    return (
        f'<div><strong>{html.escape(title)}</strong><table style="font-variant-numeric:tabular-nums">'
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>{foot}</div>"
    )
