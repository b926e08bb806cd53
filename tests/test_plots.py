"""Plots carry the real numbers: bar heights are the counts, lines sit at the thresholds, labels give clipped mass."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.lines import Line2D
from matplotlib.patches import StepPatch

import quantlab
from conftest import CALIB_DIR, DEMO_MODEL
from quantlab.errors import QuantlabError
from quantlab.plots import clipped_fraction, plot_histogram, plot_kl_curve, plot_threshold_comparison


@pytest.fixture(scope="module")
def histograms():
    return quantlab.collect(DEMO_MODEL, CALIB_DIR)


def test_histogram_plot_shows_counts_and_thresholds(histograms, tmp_path):
    hist = histograms["/Add_output_0"]
    thresholds = {"max": hist.amax, "tight": hist.amax / 3}
    figure = plot_histogram(hist, thresholds)
    ax = figure.axes[0]
    (steps,) = [p for p in ax.patches if isinstance(p, StepPatch)]
    values, edges, _ = steps.get_data()
    np.testing.assert_array_equal(values, hist.fold().counts)
    np.testing.assert_array_equal(edges, hist.fold().edges)
    lines = [line for line in ax.lines if isinstance(line, Line2D)]
    assert [line.get_xdata()[0] for line in lines] == list(thresholds.values())
    tight = lines[1].get_label()
    expected = (np.abs(np.asarray(hist.fold().edges[:-1])) >= hist.amax / 3) @ hist.fold().counts / hist.fold().total
    assert f"{expected:.3%}" in tight and clipped_fraction(hist, hist.amax) == 0.0
    assert ax.get_yscale() == "log"
    figure.savefig(tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 1000


def test_signed_view_mirrors_the_lines(histograms):
    hist = histograms["input"]
    ax = plot_histogram(hist, {"max": 0.5}, signed=True, log=False).axes[0]
    assert sorted(line.get_xdata()[0] for line in ax.lines) == [-0.5, 0.5]
    values = next(p for p in ax.patches if isinstance(p, StepPatch)).get_data()[0]
    np.testing.assert_array_equal(values, hist.counts)


def test_threshold_comparison_plots_every_table(histograms):
    tables = {"max": {n: h.amax for n, h in histograms.items()}, "half": {n: h.amax / 2 for n, h in histograms.items()}}
    ax = plot_threshold_comparison(tables).axes[0]
    assert [line.get_label() for line in ax.lines] == ["max", "half"]
    np.testing.assert_allclose(ax.lines[1].get_ydata(), [h.amax / 2 for h in histograms.values()])
    assert len(ax.get_xticklabels()) == len(histograms)


def _kl_lines(ax) -> tuple[list[Line2D], list[Line2D], list[Line2D]]:
    """(curves, amax lines, dots) drawn by plot_kl_curve: many points, two points at one x, one marker."""
    curves = [line for line in ax.lines if len(line.get_xdata()) > 2]
    verticals = [line for line in ax.lines if len(line.get_xdata()) == 2]
    dots = [line for line in ax.lines if line.get_marker() == "o"]
    return curves, verticals, dots


def test_kl_curve_plot_draws_kl_curve_and_marks_the_kl_amax(histograms):
    hist = histograms["/head/head.1/Conv_output_0"]
    thresholds, divergence = quantlab.kl_curve(hist)
    amax = quantlab.compute_amax(hist, "kl")
    ax = plot_kl_curve(hist).axes[0]
    (curve,), (vertical,), (dot,) = _kl_lines(ax)
    np.testing.assert_array_equal(curve.get_xdata(), thresholds)
    np.testing.assert_array_equal(curve.get_ydata(), divergence)
    assert list(vertical.get_xdata()) == [amax, amax]
    assert dot.get_xdata()[0] == amax
    assert dot.get_ydata()[0] == divergence[thresholds == amax].min() == np.nanmin(divergence)
    assert f"clips {clipped_fraction(hist, amax):.3%}" in vertical.get_label()
    assert ax.get_ylabel() == "KL divergence" and ax.get_yscale() == "linear"


def test_kl_curve_overlays_variants_each_scaled_and_marked(histograms):
    """On the demo input ModelOpt's NaN rule picks 0.1245, a candidate without a divergence: a line but no dot."""
    hist = histograms["input"]
    variants = ["tensorrt", "modelopt", "onnxruntime"]
    ax = plot_kl_curve(hist, variants, log=True).axes[0]
    curves, verticals, dots = _kl_lines(ax)
    assert [curve.get_label() for curve in curves] == variants
    for variant, curve, vertical in zip(variants, curves, verticals):
        thresholds, divergence = quantlab.kl_curve(hist, variant)
        largest = np.max(np.abs(divergence[np.isfinite(divergence)]))
        np.testing.assert_array_equal(curve.get_xdata(), thresholds)
        np.testing.assert_allclose(curve.get_ydata(), divergence / largest, rtol=1e-15)
        assert vertical.get_xdata()[0] == quantlab.compute_amax(hist, "kl", variant=variant)
        assert vertical.get_color() == curve.get_color()
    assert verticals[1].get_xdata()[0] == pytest.approx(0.1245, abs=1e-4)
    assert sorted(dot.get_color() for dot in dots) == sorted([curves[0].get_color(), curves[2].get_color()])
    assert ax.get_yscale() == "log" and "largest" in ax.get_ylabel()


def test_kl_curve_passes_options_and_draws_into_given_axes(histograms):
    from matplotlib.figure import Figure

    hist = histograms["/stem/stem.5/Relu_output_0"]
    ax = Figure().add_subplot()
    assert plot_kl_curve(hist, exact_zeros=False, ax=ax) is ax.figure
    _, (vertical,), _ = _kl_lines(ax)
    literal = quantlab.compute_amax(hist, "kl", exact_zeros=False)
    assert vertical.get_xdata()[0] == literal < quantlab.compute_amax(hist, "kl") / 2
    assert vertical.get_label().startswith("tensorrt (exact_zeros=False): amax")
    with pytest.raises(QuantlabError, match="unknown KL variant"):
        plot_kl_curve(hist, ["tensorrt", "tensorflow"])
    with pytest.raises(ValueError, match="at least one variant"):
        plot_kl_curve(hist, [])


def test_show_plot_from_the_cli(histograms, tmp_path):
    from test_cli import assert_one_line_error, run

    path = histograms.save(tmp_path / "h.npz")
    quantlab.write_thresholds(tmp_path / "half.json", {n: h.amax / 2 for n, h in histograms.items()})
    out = tmp_path / "add.png"
    result = run("show", str(path), "/Add_output_0", "--plot", str(out), "--thresholds", str(tmp_path / "half.json"))
    assert result.returncode == 0, result.stderr
    assert out.stat().st_size > 5000
    assert_one_line_error(run("show", str(path), "--plot", str(out)), 2, "--plot needs a TENSOR")
