"""`--method auto`: thresholds chosen by the model's final-output error, measured with ONNX Runtime.

The oracle is independent of auto's own search model: each threshold table is exported by `quantlab export`'s code
path, and plain ONNX Runtime runs the written Q/DQ model and the FP32 model on the same samples; SQNR is computed
with NumPy here.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import quantlab
from quantlab.calibration import calibrate
from quantlab.calibration.auto import CANDIDATES, GROUPS, auto_calibrate
from quantlab.errors import QuantlabError
from quantlab.formats import Thresholds
from quantlab.formats.qdq import quantize_qdq
from tests.conftest import CALIB_DIR, DEMO_MODEL
from tests.test_cli import assert_one_line_error, run

SAMPLES = 32  # the first calibration file holds 32 samples


@pytest.fixture(scope="module")
def histogram_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("auto") / "h.npz"
    assert run("collect", str(DEMO_MODEL), "--data", str(CALIB_DIR), "-o", str(out), "-q").returncode == 0
    return out


@pytest.fixture(scope="module")
def histograms(histogram_file):
    return quantlab.load_histograms(histogram_file)


def _first_samples() -> dict[str, np.ndarray]:
    batch = np.concatenate([np.load(path) for path in sorted(CALIB_DIR.glob("*.npy"))])[:SAMPLES]
    return {"input": batch}


def _worst_output_sqnr(qdq: onnx.ModelProto, feed: dict[str, np.ndarray]) -> float:
    fp32 = ort.InferenceSession(str(DEMO_MODEL), providers=["CPUExecutionProvider"])
    int8 = ort.InferenceSession(qdq.SerializeToString(), providers=["CPUExecutionProvider"])
    worst = np.inf
    for reference, observed in zip(fp32.run(None, feed), int8.run(None, feed)):
        reference, observed = reference.astype(np.float64), observed.astype(np.float64)
        worst = min(worst, 10 * np.log10(np.sum(reference**2) / np.sum((reference - observed) ** 2)))
    return float(worst)


def _exported_sqnr(histograms, amax: dict[str, float], target: str) -> float:
    table = Thresholds(amax, {}, histograms.min_max(amax))
    return _worst_output_sqnr(quantize_qdq(DEMO_MODEL, table, target=target), _first_samples())


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
def test_auto_is_at_least_the_best_single_method_measured_independently(histograms, target):
    result = auto_calibrate(histograms, model=DEMO_MODEL, data=CALIB_DIR, target=target, samples=SAMPLES)
    assert result.samples == SAMPLES and result.target == target
    assert list(result.amax) == list(calibrate(histograms, "max"))
    assert len(CANDIDATES) <= result.runs <= len(CANDIDATES) * (1 + GROUPS)  # bounded, whatever the tensor count
    chosen = _exported_sqnr(histograms, result.amax, target)
    singles = {label: _exported_sqnr(histograms, calibrate(histograms, method, **options), target) for label, method, options in CANDIDATES}
    tolerance = 0.05 if target == "tensorrt" else 0.5  # ORT fuses the exported model into integer kernels
    first = CANDIDATES[0][0]  # the start, left only for a method better on all samples and on each half of them
    assert chosen >= singles[first] - tolerance, (chosen, singles)
    for label, sqnr in singles.items():  # the search scored each method as the exported model scores
        assert result.candidate_sqnr[label] == pytest.approx(sqnr, abs=tolerance)
    assert result.sqnr == pytest.approx(chosen, abs=tolerance)
    assert set(result.choices) == set(result.amax)
    for name, label in result.choices.items():
        method, options = next((method, options) for candidate, method, options in CANDIDATES if candidate == label)
        assert result.amax[name] == calibrate({name: histograms[name]}, method, **options)[name]


def test_auto_finds_the_model_and_data_the_histograms_record(histograms):
    given = auto_calibrate(histograms, model=DEMO_MODEL, data=CALIB_DIR, samples=8)
    recorded = auto_calibrate(histograms, samples=8)
    assert recorded.amax == given.amax
    assert calibrate(histograms, "auto", samples=8) == given.amax


def test_auto_without_a_model_or_with_a_changed_one_says_what_to_pass(histograms, tmp_path):
    plain = dict(histograms.histograms)
    with pytest.raises(QuantlabError, match=r"^method 'auto' runs the model: pass model= \(--model\)"):
        calibrate(plain, "auto")
    with pytest.raises(QuantlabError, match=r"pass data= \(--data\)"):
        calibrate(plain, "auto", model=DEMO_MODEL)
    moved = tmp_path / "model.onnx"
    shutil.copy(DEMO_MODEL, moved)
    changed = quantlab.HistogramSet(histograms.histograms, {**histograms.metadata, "model_path": str(moved)})
    model = onnx.load(str(moved))
    model.doc_string = "edited"
    onnx.save(model, str(moved))
    with pytest.raises(QuantlabError, match="changed since the histograms were collected"):
        calibrate(changed, "auto")
    with pytest.raises(QuantlabError, match="unknown option 'variant' for method 'auto'"):
        calibrate(histograms, "auto", variant="modelopt")
    with pytest.raises(QuantlabError, match="option samples must be >= 1, got 0"):
        calibrate(histograms, "auto", samples=0)


def test_cli_auto_writes_its_choices_and_the_export_runs(histogram_file, tmp_path):
    table = tmp_path / "t.json"
    result = run("calibrate", str(histogram_file), "--method", "auto", "--samples", "16", "-o", str(table))
    assert result.returncode == 0, result.stderr
    assert "final-output SQNR" in result.stdout
    written = json.loads(table.read_text())
    record = written["metadata"]["auto"] if "metadata" in written else written["auto"]
    assert record["samples"] == 16 and record["target"] == "tensorrt"
    assert sum(record["tensors_per_candidate"].values()) == len(record["choices"])
    assert record["final_sqnr_db"] >= record["candidate_sqnr_db"][CANDIDATES[0][0]]
    exported = tmp_path / "m.qdq.onnx"
    assert run("export", str(DEMO_MODEL), "--thresholds", str(table), "-o", str(exported)).returncode == 0
    assert_one_line_error(
        run("calibrate", str(histogram_file), "--method", "auto", "--model", str(tmp_path / "none.onnx"), "-o", str(table)),
        2,
        "none.onnx",
    )
