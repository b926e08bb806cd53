"""Plots carry the real numbers: bar heights are the counts, lines sit at the thresholds, labels give clipped mass."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.lines import Line2D
from matplotlib.patches import StepPatch

import quantlab
from conftest import CALIB_DIR, DEMO_MODEL
from quantlab.plots import clipped_fraction, plot_histogram, plot_threshold_comparison


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


def test_show_plot_from_the_cli(histograms, tmp_path):
    from test_cli import assert_one_line_error, run

    path = histograms.save(tmp_path / "h.npz")
    quantlab.write_thresholds(tmp_path / "half.json", {n: h.amax / 2 for n, h in histograms.items()})
    out = tmp_path / "add.png"
    result = run("show", str(path), "/Add_output_0", "--plot", str(out), "--thresholds", str(tmp_path / "half.json"))
    assert result.returncode == 0, result.stderr
    assert out.stat().st_size > 5000
    assert_one_line_error(run("show", str(path), "--plot", str(out)), 2, "--plot needs a TENSOR")
