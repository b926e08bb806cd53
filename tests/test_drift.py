"""Drift: metrics equal a NumPy computation over independently gathered activations; final SQNR matches a plain run."""

from __future__ import annotations

import json
import math

import numpy as np
import onnxruntime as ort
import pytest

import quantlab
from conftest import CALIB_DIR, DEMO_MODEL, EVAL_INPUTS, EVAL_LABELS, run_all_float_outputs
from quantlab.data import CalibrationData
from quantlab.drift import measure_drift, measure_isolated, propose_fp32
from quantlab.formats.qdq import quantize_qdq
from quantlab.model import input_specs, load_model
from test_cli import assert_one_line_error, run


@pytest.fixture(scope="module")
def thresholds():
    return {name: hist.amax for name, hist in quantlab.collect(DEMO_MODEL, CALIB_DIR).items()}


@pytest.fixture(scope="module")
def qdq(thresholds):
    return quantize_qdq(DEMO_MODEL, thresholds)


@pytest.fixture(scope="module")
def eval_feeds():
    return [{"input": np.load(path)} for path in sorted(EVAL_INPUTS.glob("*.npy"))]


@pytest.fixture(scope="module")
def report(qdq):
    return measure_drift(DEMO_MODEL, qdq, EVAL_INPUTS, labels=EVAL_LABELS)


def numpy_metrics(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    x, y = x.astype(np.float64), y.astype(np.float64)
    error = x - y
    return {
        "sqnr_db": 10 * np.log10(np.sum(x * x) / np.sum(error * error)),
        "cosine": np.sum(x * y) / np.sqrt(np.sum(x * x) * np.sum(y * y)),
        "rel_err": np.linalg.norm(error) / np.linalg.norm(x),
        "max_abs_err": np.max(np.abs(error)),
    }


def test_layer_metrics_equal_numpy_over_independently_gathered_activations(report, qdq, eval_feeds, tmp_path):
    fp32 = run_all_float_outputs(DEMO_MODEL, eval_feeds)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "int8.onnx")
    ort.InferenceSession(qdq.SerializeToString(), options, providers=["CPUExecutionProvider"])
    int8 = run_all_float_outputs(tmp_path / "int8.onnx", eval_feeds)
    assert len(report.layers) >= 10
    for layer in [*report.layers, *report.final["outputs"]]:
        observed = int8.get(layer.name + "_DequantizeLinear_Output", int8.get(layer.name))
        expected = numpy_metrics(fp32[layer.name], observed)
        for key, value in expected.items():
            assert getattr(layer, key) == pytest.approx(value, rel=1e-6, abs=1e-9), (layer.name, key)
        assert layer.values == fp32[layer.name].size


def test_final_sqnr_and_top1_match_a_plain_run_of_both_models(report, qdq, eval_feeds):
    fp32 = ort.InferenceSession(str(DEMO_MODEL), providers=["CPUExecutionProvider"])
    int8 = ort.InferenceSession(qdq.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.concatenate([fp32.run(["logits"], feed)[0] for feed in eval_feeds])
    y = np.concatenate([int8.run(["logits"], feed)[0] for feed in eval_feeds])
    (final,) = report.final["outputs"]
    assert abs(final.sqnr_db - numpy_metrics(x, y)["sqnr_db"]) < 0.1
    labels = np.load(EVAL_LABELS)
    assert report.final["top1_fp32"] == pytest.approx(np.mean(x.argmax(1) == labels))
    assert report.final["top1_int8"] == pytest.approx(np.mean(y.argmax(1) == labels))
    assert report.final["top1_int8"] >= report.final["top1_fp32"] - 0.01


def test_isolated_first_conv_equals_accumulated(report, qdq):
    isolated = measure_isolated(DEMO_MODEL, qdq, EVAL_INPUTS)
    first = isolated.layers[0]
    assert first.name == "/stem/stem.0/Conv_output_0"
    accumulated = next(layer for layer in report.layers if layer.name == first.name)
    assert first.sqnr_db == pytest.approx(accumulated.sqnr_db, rel=1e-9)
    assert first.max_abs_err == pytest.approx(accumulated.max_abs_err, rel=1e-9)
    # Deeper layers inherit error upstream: accumulated is worse than isolated for the last conv.
    last_conv = next(layer for layer in isolated.layers if layer.name == "/head/head.1/Conv_output_0")
    assert next(l for l in report.layers if l.name == last_conv.name).sqnr_db < last_conv.sqnr_db


def test_keeping_the_worst_layers_in_fp32_improves_final_sqnr(thresholds):
    data = CalibrationData(EVAL_INPUTS, input_specs(load_model(DEMO_MODEL)))
    steps, mixed = propose_fp32(DEMO_MODEL, thresholds, data, keep=2, labels=np.load(EVAL_LABELS))
    assert [len(step.kept_fp32) for step in steps] == [0, 1, 2]
    assert steps[-1].sqnr_db > steps[1].sqnr_db > steps[0].sqnr_db
    kept = {node.name for node in mixed.graph.node if node.op_type in ("Conv", "Gemm")}
    assert set(steps[-1].kept_fp32) <= kept
    # A target between none kept and the worst layer kept is reached with that layer alone. Halfway, not the
    # one-layer SQNR itself: the steps are measured on the switch model, the chosen export as ONNX Runtime runs it
    # (integer kernels), which rounds a few thousandths of a dB either way.
    target = (steps[0].sqnr_db + steps[1].sqnr_db) / 2
    by_target, _ = propose_fp32(DEMO_MODEL, thresholds, data, target_sqnr=target)
    assert by_target[-1].sqnr_db >= target and len(by_target) == 2
    assert by_target[-1].kept_fp32 == steps[1].kept_fp32


def test_cli_drift_writes_json_and_plot(tmp_path, thresholds):
    table = tmp_path / "t.json"
    quantlab.write_thresholds(table, thresholds)
    out_json, out_png = tmp_path / "drift.json", tmp_path / "drift.png"
    result = run(
        "drift", str(DEMO_MODEL), "-d", str(EVAL_INPUTS), "--thresholds", str(table), "--labels", str(EVAL_LABELS),
        "--json", str(out_json), "--plot", str(out_png),
    )
    assert result.returncode == 0, result.stderr
    assert "worst first" in result.stdout and "top-1 FP32 99.33%" in result.stdout
    written = json.loads(out_json.read_text())
    records = written["layers"]
    assert set(records[0]) >= {"name", "op_type", "sqnr_db", "cosine", "rel_err", "max_abs_err"}
    assert [r["sqnr_db"] for r in records] == sorted(r["sqnr_db"] for r in records)
    assert written["final"]["outputs"][0]["name"] == "logits" and math.isfinite(written["final"]["outputs"][0]["sqnr_db"])
    assert out_png.stat().st_size > 5000

    assert_one_line_error(run("drift", str(DEMO_MODEL), "-d", str(EVAL_INPUTS)), 2, "exactly one of --thresholds")
    bad = tmp_path / "bad.json"
    quantlab.write_thresholds(bad, {**thresholds, "not_a_tensor": 1.0})
    assert_one_line_error(run("drift", str(DEMO_MODEL), "-d", str(EVAL_INPUTS), "--thresholds", str(bad)), 2, "not_a_tensor")
