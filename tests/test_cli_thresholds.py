"""calibrate, cache show, diff and export through the CLI, on real files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import quantlab
from conftest import CALIB_DIR, DEMO_MODEL, ROOT
from quantlab.model import file_sha256
from test_cli import assert_one_line_error, run

FIXTURES = ROOT / "tests" / "fixtures" / "caches"


@pytest.fixture(scope="module")
def histogram_file(tmp_path_factory) -> Path:
    return quantlab.collect(DEMO_MODEL, CALIB_DIR).save(tmp_path_factory.mktemp("h") / "histograms.npz")


def test_calibrate_writes_the_library_thresholds_with_metadata(histogram_file, tmp_path):
    out = tmp_path / "kl.json"
    result = run("calibrate", str(histogram_file), "--method", "kl", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and "clipped the most" in result.stdout
    table = json.loads(out.read_text())
    assert table["method"] == "kl" and table["variant"] == "tensorrt"
    assert table["source"]["sha256"] == file_sha256(histogram_file)
    expected = quantlab.calibrate(quantlab.load_histograms(histogram_file), "kl")
    assert table["thresholds"] == pytest.approx(expected, rel=1e-12)


def test_calibrate_to_a_tensorrt_cache_and_show_it(histogram_file, tmp_path):
    cache = tmp_path / "model.cache"
    result = run("calibrate", str(histogram_file), "--method", "percentile", "--percentile", "99.9", "--out", str(cache), "--trt-version", "8.6.1")
    assert result.returncode == 0, result.stderr
    lines = cache.read_text().splitlines()
    assert lines[0] == "TRT-8601-EntropyCalibration2" and len(lines) == 16
    expected = quantlab.calibrate(quantlab.load_histograms(histogram_file), "percentile", percentile=99.9)
    name, hex_scale = lines[1].rsplit(": ", 1)
    assert np.frombuffer(bytes.fromhex(hex_scale), ">f4")[0] == np.float32(expected[name] / 127)
    shown = run("cache", "show", str(cache))
    assert shown.returncode == 0 and "15 tensors" in shown.stdout and f"{expected[name]:.6g}" in shown.stdout


def test_compare_methods_and_plot(histogram_file, tmp_path):
    plot = tmp_path / "compare.png"
    result = run("calibrate", str(histogram_file), "-o", str(tmp_path / "t.json"), "--compare", "max,kl:modelopt,mse", "--plot", str(plot))
    assert result.returncode == 0, result.stderr
    header = next(line for line in result.stdout.splitlines() if "kl:modelopt" in line)
    assert "max" in header and "mse" in header
    assert plot.stat().st_size > 5000


def test_show_real_tensorrt_caches():
    for path in sorted(FIXTURES.glob("*.cache")):
        result = run("cache", "show", str(path))
        assert result.returncode == 0, (path, result.stderr)
        assert "tensors" in result.stdout


def test_diff_summarizes_two_calibrations(histogram_file, tmp_path):
    for method in ("max", "kl"):
        assert run("calibrate", str(histogram_file), "--method", method, "-o", str(tmp_path / f"{method}.cache")).returncode == 0
    result = run("diff", str(tmp_path / "max.cache"), str(tmp_path / "kl.cache"))
    assert result.returncode == 0, result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    max_t = quantlab.read_thresholds(tmp_path / "max.cache").amax
    kl_t = quantlab.read_thresholds(tmp_path / "kl.cache").amax
    over_10 = sum(max(a, b) / min(a, b) > 1.10 for a, b in zip(max_t.values(), kl_t.values()))
    assert summary.startswith("15 tensors in both") and f"{over_10} by more than 10%" in summary


def test_export_writes_a_valid_qdq_model(histogram_file, tmp_path):
    table = tmp_path / "t.json"
    run("calibrate", str(histogram_file), "-o", str(table))
    out = tmp_path / "model.qdq.onnx"
    result = run("export", str(DEMO_MODEL), "--thresholds", str(table), "--out", str(out))
    assert result.returncode == 0, result.stderr
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    assert sum(node.op_type == "QuantizeLinear" for node in model.graph.node) >= 6


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--method", "nope"], ["unknown calibration method 'nope'"]),
        (["--method", "percentile", "--percentile", "120"], ["120"]),
        (["--method", "kl", "--variant", "trt"], ["trt"]),
        (["--percentile", "99"], ["--percentile goes with --method percentile"]),
    ],
)
def test_bad_calibrate_options(histogram_file, tmp_path, args, fragments):
    out = tmp_path / "t.json"
    assert_one_line_error(run("calibrate", str(histogram_file), "-o", str(out), *args), 2, *fragments)
    assert not out.exists()


def test_malformed_cache_and_unknown_tensors(tmp_path):
    broken = tmp_path / "broken.cache"
    broken.write_text("TRT-8601-EntropyCalibration2\ninput: 3c01\nconv: zz\n")
    assert_one_line_error(run("cache", "show", str(broken)), 2, "broken.cache", "3")
    foreign = FIXTURES / "trt8400_minmax_vgg16.cache"
    out = tmp_path / "m.onnx"
    assert_one_line_error(run("export", str(DEMO_MODEL), "--thresholds", str(foreign), "-o", str(out)), 2)
    assert not out.exists()


def test_all_nan_tensor_is_an_error_at_calibration(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    np.save(data / "x.npy", np.full((4, 1, 8, 8), np.nan, np.float32))
    histograms = tmp_path / "h.npz"
    assert run("collect", str(DEMO_MODEL), "-d", str(data), "-o", str(histograms)).returncode == 0
    out = tmp_path / "t.cache"
    result = run("calibrate", str(histograms), "-o", str(out))
    assert_one_line_error(result, 2, "no tensor can be quantized: 'input', ", "'logits' (only NaN/Inf values)")
    assert not out.exists()
