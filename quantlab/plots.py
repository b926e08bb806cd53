"""Figures of histograms, thresholds and drift, for notebooks and design reviews.

Every function returns a matplotlib Figure and draws into `ax` when one is given. Figures are built without pyplot
(no global state, no backend choice), and matplotlib is imported only when a function is called.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from quantlab.calibration import compute_amax, kl_curve
from quantlab.atomic import atomic_write, check_writable
from quantlab.errors import QuantlabError
from quantlab.histogram import Histogram

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def _axes(ax: Axes | None, size: tuple[float, float] = (8, 4)) -> Axes:
    if ax is not None:
        return ax
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, layout="constrained")
    return figure.add_subplot()


_THRESHOLD_COLORS = ("tab:red", "tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive")


def clipped_fraction(hist: Histogram, amax: float) -> float:
    """Share of the values with |x| beyond `amax` (bins wholly above it): what a threshold saturates."""
    folded = hist.fold()
    total = folded.total
    return 0.0 if total == 0 else float(folded.counts[folded.edges[:-1] >= amax].sum() / total)


def plot_histogram(
    hist: Histogram,
    thresholds: Mapping[str, float] | None = None,
    *,
    log: bool = True,
    signed: bool = False,
    title: str | None = None,
    ax: Axes | None = None,
) -> Figure:
    """The |x| histogram (or the signed one) as steps, each threshold a labelled vertical line with its clipped mass."""
    ax = _axes(ax)
    shown = hist if signed else hist.fold()
    ax.stairs(shown.counts, shown.edges, fill=True, alpha=0.6, color="tab:blue", label="counts")
    colors = iter(_THRESHOLD_COLORS)
    for name, amax in (thresholds or {}).items():
        color = next(colors, "black")
        label = f"{name}: {amax:.4g} (clips {clipped_fraction(hist, amax):.3%})"
        ax.axvline(amax, color=color, linestyle="--", label=label)
        if signed:
            ax.axvline(-amax, color=color, linestyle="--")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("x" if signed else "|x|")
    ax.set_ylabel("count")
    ax.set_title(title or f"{hist.bins} bins, max|x| = {hist.amax:.4g}")
    ax.legend(loc="upper right", fontsize="small")
    return ax.figure


def plot_kl_curve(
    hist: Histogram,
    variant: str | Sequence[str] = "tensorrt",
    *,
    normalize: bool | None = None,
    log: bool = False,
    title: str | None = None,
    ax: Axes | None = None,
    **options,
) -> Figure:
    """KL divergence per candidate threshold (`kl_curve`), each variant's chosen amax marked on its curve.

    The variants' divergences live on different scales (other windows, smoothing and zero handling), so when several
    are overlaid each curve is divided by its largest finite value (`normalize=None` means: only then); what matters is
    where each minimum lies. A dashed line marks the amax `compute_amax` returns, with the share of values it clips, and
    a dot the divergence there (the line alone where ModelOpt's NaN rule picks a candidate without a finite
    divergence). `log` draws the divergence on a log scale, where a divergence of exactly 0 is not shown.
    `options` go to every variant.
    """
    variants = [variant] if isinstance(variant, str) else list(variant)
    if not variants:
        raise ValueError("plot_kl_curve needs at least one variant")
    normalize = len(variants) > 1 if normalize is None else normalize
    ax = _axes(ax)
    suffix = ", ".join(f"{key}={value}" for key, value in options.items())
    for name, color in zip(variants, _THRESHOLD_COLORS):
        thresholds, divergence = kl_curve(hist, name, **options)
        amax = compute_amax(hist, "kl", variant=name, **options)
        shown = _over_largest(divergence) if normalize else divergence
        label = f"{name} ({suffix})" if suffix else name
        ax.plot(thresholds, shown, color=color, linewidth=1, label=label)
        marked = f"{label}: amax {amax:.4g} (clips {clipped_fraction(hist, amax):.3%})"
        ax.axvline(amax, color=color, linestyle="--", linewidth=1, label=marked)
        chosen = shown[(thresholds == amax) & np.isfinite(shown)]
        if chosen.size:
            ax.plot([amax], [chosen.min()], marker="o", color=color, linestyle="none")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("candidate threshold (amax)")
    ax.set_ylabel("KL divergence / its largest value" if normalize else "KL divergence")
    ax.set_title(title or f"KL divergence per candidate threshold, max|x| = {hist.amax:.4g}")
    ax.legend(fontsize="small")
    return ax.figure


def _over_largest(values: np.ndarray) -> np.ndarray:
    """Values divided by their largest finite magnitude, so curves of different scales share one axis."""
    finite = np.abs(values[np.isfinite(values)])
    largest = finite.max() if finite.size else 0.0
    return values / largest if largest > 0 else values


def plot_threshold_comparison(tables: Mapping[str, Mapping[str, float]], *, ax: Axes | None = None) -> Figure:
    """amax per tensor (x: tensors in the first table's order) for several methods or caches, one marker series each."""
    if not tables:
        raise ValueError("plot_threshold_comparison needs at least one table")
    names = list(next(iter(tables.values())))
    for table in list(tables.values())[1:]:
        names += [name for name in table if name not in names]
    ax = _axes(ax, size=(max(8.0, 0.35 * len(names)), 4.5))
    positions = np.arange(len(names))
    for label, table in tables.items():
        values = np.array([table.get(name, np.nan) for name in names], dtype=float)
        ax.plot(positions, values, marker="o", linestyle="-", linewidth=0.8, label=label)
    ax.set_xticks(positions, [_short(name) for name in names], rotation=75, fontsize="x-small")
    ax.set_ylabel("amax")
    ax.set_yscale("log")
    ax.set_title("thresholds per tensor")
    ax.legend(fontsize="small")
    return ax.figure


def _short(name: str, width: int = 28) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def plot_drift(report, *, title: str | None = None, ax: Axes | None = None) -> Figure:
    """SQNR per tensor in graph order, the worst marked, final outputs as dashed lines."""
    layers = report.layers
    ax = _axes(ax, size=(max(8.0, 0.4 * len(layers)), 4.5))
    positions = np.arange(len(layers))
    sqnr = np.array([layer.sqnr_db for layer in layers], dtype=float)
    ax.plot(positions, sqnr, marker="o", color="tab:blue", label="SQNR per tensor")
    if len(layers):
        worst = int(np.nanargmin(sqnr))
        ax.plot([worst], [sqnr[worst]], marker="o", markersize=12, fillstyle="none", color="tab:red", linestyle="none",
                label=f"worst: {layers[worst].name} ({sqnr[worst]:.1f} dB)")
    for output in report.final["outputs"]:
        ax.axhline(output.sqnr_db, color="tab:gray", linestyle="--", label=f"final {output.name}: {output.sqnr_db:.1f} dB")
    ax.set_xticks(positions, [_short(layer.name) for layer in layers], rotation=75, fontsize="x-small")
    ax.set_ylabel("SQNR (dB)")
    method = report.metadata.get("method")
    ax.set_title(title or "INT8 drift per tensor" + (f" ({method})" if method else ""))
    ax.legend(fontsize="small")
    return ax.figure


def _figure_format(path: Path) -> str:
    return path.suffix.lstrip(".").lower() or "png"


def check_figure_path(path: str | Path) -> None:
    """Before any work: the image can be written, in a format matplotlib writes (named by the extension)."""
    from matplotlib.backend_bases import FigureCanvasBase

    path = check_writable(path)
    formats = FigureCanvasBase.get_supported_filetypes()
    if _figure_format(path) not in formats:
        raise QuantlabError(f"{path}: cannot write a plot as {_figure_format(path)!r}; use {', '.join(sorted(formats))}")


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Write a figure atomically, in the format its extension names (png when it has none)."""
    path = Path(path)
    with atomic_write(path) as handle:
        figure.savefig(handle, format=_figure_format(path), dpi=120)
    return path
