"""Notebook views carry the real numbers (every tensor, its count, its severity), and the notebooks ship clean."""

from __future__ import annotations

import html
import re
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest

import quantlab
from conftest import CALIB_DIR, DEMO_MODEL, EVAL_INPUTS, EVAL_LABELS, ROOT
from quantlab.drift import DriftReport, TensorDrift
from quantlab.histogram import Histogram, HistogramSet
from quantlab.notebook import histogram_rows, histograms_html, sparkline_svg

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def histograms():
    return quantlab.collect(DEMO_MODEL, CALIB_DIR)


def _drift(sqnr: dict[str, float], outputs: dict[str, float], **final) -> DriftReport:
    def record(name: str, db: float) -> TensorDrift:
        return TensorDrift(name, "Conv", db, 0.99, 10 ** (-db / 20), 0.5, 100)

    layers = [record(name, db) for name, db in sqnr.items()]
    return DriftReport(layers, {"outputs": [record(n, db) for n, db in outputs.items()], "samples": 450, **final})


def _rows(markup: str) -> list[str]:
    return re.findall(r"<tr><td.*?</tr>", markup)


def test_histogram_table_lists_every_tensor_with_its_count(histograms):
    markup = histograms._repr_html_()
    rows = _rows(markup)
    assert len(rows) == len(histograms) == markup.count("<svg")
    for row, (name, hist) in zip(rows, histograms.items()):
        assert f">{html.escape(name)}</td>" in row and f"<td>{hist.count:,}</td>" in row
        assert f"<td>{hist.zero_count / hist.count:.1%}</td>" in row
    assert f"{len(histograms)} tensors, 2048 bins of |x|" in markup


def test_histogram_table_escapes_names_flags_nonfinite_and_stops_at_max_rows():
    values = np.array([1.0, -2.0, 0.0, np.nan, np.inf], dtype=np.float32)
    hists = {f"t<{i}>&": Histogram.from_values(values * (i + 1), bins=8) for i in range(5)}
    markup = histograms_html(HistogramSet(hists), max_rows=3)
    assert len(_rows(markup)) == 3 and "t&lt;0&gt;&amp;" in markup and "t<0>" not in markup
    assert "2 more tensors not shown" in markup
    assert markup.count('<span style="color:#c62828;font-weight:bold">1/1</span>') == 3
    (first,) = [r for r in histogram_rows(HistogramSet(hists)) if r["name"] == "t<0>&"]
    assert (first["count"], first["nan_count"], first["inf_count"], first["zero_fraction"]) == (3, 1, 1, 1 / 3)


def test_sparkline_columns_follow_the_counts():
    """80 |x| bins, the lower half full: 40 columns of 2 bins, the first 20 at full height, the rest empty."""
    counts = np.r_[np.full(40, 100), np.zeros(40)]
    svg = sparkline_svg(Histogram(counts, np.linspace(0, 4, 81)), width=120, height=18)
    tops = [float(v) for v in re.findall(r"V([\d.]+)H", svg)]
    assert tops == [0.0] * 20 + [18.0] * 20
    assert "|x| from 0 to 4" in svg


def test_drift_table_of_a_measured_report(histograms):
    int8 = quantlab.quantize_qdq(DEMO_MODEL, quantlab.calibrate(histograms, "kl"))
    report = quantlab.measure_drift(DEMO_MODEL, int8, EVAL_INPUTS, labels=EVAL_LABELS)
    markup = report._repr_html_()
    rows = _rows(markup)
    assert len(rows) == len(report.layers)
    for row, layer in zip(rows, report.worst_first()):
        assert f">{html.escape(layer.name)}</td>" in row and f">{layer.sqnr_db:.2f}</span>" in row
    assert markup.startswith("<div><strong>accumulated drift per tensor, worst first</strong>")
    assert "final logits: SQNR" in markup and "(450 samples)" in markup


def test_drift_table_is_worst_first_and_colored_by_severity():
    top1 = {"top1_fp32": 0.99, "top1_int8": 0.98, "top1_agreement": 0.97}
    report = _drift({"good": 45.0, "bad": 12.5, "fair": 25.0}, {"logits": 38.4}, **top1)
    markup = report._repr_html_()
    names = [re.search(r'left">(.*?)</td>', row).group(1) for row in _rows(markup)]
    assert names == ["bad", "fair", "good"]
    assert '<span style="color:#c62828;font-weight:bold">12.50</span>' in markup
    assert '<span style="color:#b26a00">25.00</span>' in markup
    assert '<span style="color:#2e7d32">45.00</span>' in markup
    assert 'final logits: SQNR <span style="color:#2e7d32">38.40</span> dB' in markup
    assert "top-1 FP32 99.00%, INT8 98.00%, agreement 97.00% (450 samples)" in markup


def test_to_pandas_without_pandas_says_how_to_install_it(histograms, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # makes `import pandas` raise ImportError
    for thing in (histograms, _drift({"a": 30.0}, {})):
        with pytest.raises(quantlab.QuantlabError, match=r"needs pandas.*pip install pandas"):
            thing.to_pandas()


def test_to_pandas_frames_hold_the_rows(histograms):
    pytest.importorskip("pandas", reason="pandas is an optional dependency; the error path is tested without it")
    frame = histograms.to_pandas()
    assert list(frame.index) == list(histograms)
    assert list(frame["count"]) == [h.count for h in histograms.values()]
    assert frame.attrs["bins"] == 2048
    report = _drift({"good": 45.0, "bad": 12.5}, {"logits": 38.4}, top1_int8=0.98)
    drift = report.to_pandas()
    assert list(drift.index) == ["bad", "logits", "good"]
    assert list(drift["final_output"]) == [False, True, False]
    assert drift.loc["bad", "sqnr_db"] == 12.5 and drift.attrs["top1_int8"] == 0.98


def test_notebooks_are_committed_without_outputs():
    expected = ["01_histograms.ipynb", "02_calibration_methods.ipynb", "03_drift.ipynb", "04_data_loaders.ipynb"]
    assert [path.name for path in NOTEBOOKS] == expected
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: cell {cell.id} has outputs"


def test_notebooks_use_only_the_public_api_and_bundled_data():
    """quantlab.* imports only from the package, quantlab.plots and quantlab.drift; data only under ../calib_data."""
    for path in NOTEBOOKS:
        code = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
        modules = set(re.findall(r"^\s*(?:from|import) (quantlab[\w.]*)", code, flags=re.M))
        assert modules <= {"quantlab", "quantlab.plots", "quantlab.drift"}, f"{path.name}: {modules}"
        assert 'DATA = Path("../calib_data")' in code and "/work/" not in code
        assert (Path(path).parent / "../calib_data/digits_cnn.onnx").is_file()
