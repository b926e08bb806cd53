"""The `quantlab` command, run as a user runs it: a subprocess, real files, exit codes and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import quantlab
from quantlab.calibration.auto import CANDIDATES
from conftest import CALIB_DIR, DEMO_MODEL, ROOT


def run(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "quantlab", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout
    )


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("quantlab: error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[0]


def test_help_lists_the_commands():
    result = run("--help")
    assert result.returncode == 0
    for command in ("collect", "show", "demo"):
        assert command in result.stdout


def test_help_imports_no_heavy_module():
    code = "import sys; sys.argv = ['quantlab', '--help']\ntry:\n    import quantlab.cli as c; c.main()\nexcept SystemExit: pass\n"
    code += "print(sorted(m for m in ('numpy', 'onnx', 'onnxruntime', 'matplotlib') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_collect_then_show(tmp_path):
    out = tmp_path / "h.npz"
    result = run("collect", str(DEMO_MODEL), "--data", str(CALIB_DIR), "--out", str(out), "--batch-size", "64")
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}: 15 tensors x 2048 bins" in result.stdout and "320 samples" in result.stdout
    histograms = quantlab.load_histograms(out)
    reference = quantlab.collect(DEMO_MODEL, CALIB_DIR)
    np.testing.assert_array_equal(histograms["logits"].counts, reference["logits"].counts)

    table = run("show", str(out))
    assert table.returncode == 0
    for name, hist in histograms.items():
        row = next(line for line in table.stdout.splitlines() if f" {name} " in line)
        assert f"{hist.count:,}" in row and f"{hist.amax:.6g}" in row

    detail = run("show", str(out), "logits")
    assert detail.returncode == 0 and "max|x|" in detail.stdout and "█" in detail.stdout
    assert_one_line_error(run("show", str(out), "logit"), 2, "no tensor named 'logit'", "did you mean logits")


def test_demo_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    result = run("demo", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert (out / "model.onnx").read_bytes() == DEMO_MODEL.read_bytes()
    histograms = quantlab.load_histograms(out / "histograms.npz")
    assert len(histograms) == 15
    table = quantlab.read_thresholds(out / "thresholds.json")
    assert table.metadata["method"] == "auto"
    methods = {label: (method, options) for label, method, options in CANDIDATES}
    for name, label in table.metadata["auto"]["choices"].items():  # each tensor has its chosen method's threshold
        method, options = methods[label]
        assert table.amax[name] == pytest.approx(quantlab.compute_amax(histograms[name], method, **options), rel=1e-6)
    assert table.amax == pytest.approx(quantlab.calibrate(histograms), rel=1e-6)  # the API's default: the same search
    cache = quantlab.read_thresholds(out / "model.cache")
    assert cache.amax == pytest.approx(table.amax, rel=1e-6)
    report = json.loads((out / "drift.json").read_text())
    top1 = report["final"]["top1_int8"]
    assert abs(top1 - report["final"]["top1_fp32"]) <= 0.01
    assert f"INT8 Q/DQ in ONNX Runtime {top1:.2%}" in result.stdout and "worst first" in result.stdout
    assert (out / "model.qdq.onnx").stat().st_size > 0 and (out / "drift.png").stat().st_size > 5000
    assert "quantlab show" in result.stdout


def bad_model(tmp_path: Path) -> Path:
    path = tmp_path / "bad.onnx"
    path.write_bytes(DEMO_MODEL.read_bytes()[:1000])
    return path


def wrong_dtype_data(tmp_path: Path) -> Path:
    np.save(tmp_path / "x.npy", np.zeros((2, 1, 8, 8), np.float64))
    return tmp_path


@pytest.mark.parametrize(
    "args, fragments",
    [
        (lambda t: ["collect", str(t / "missing.onnx"), "--data", str(CALIB_DIR)], ["missing.onnx", "model file not found"]),
        (lambda t: ["collect", str(bad_model(t)), "--data", str(CALIB_DIR)], ["bad.onnx", "not a valid ONNX model"]),
        (lambda t: ["collect", str(DEMO_MODEL), "--data", str(t)], ["data directory is empty"]),
        (lambda t: ["collect", str(DEMO_MODEL), "--data", str(t / "nope")], ["data directory not found"]),
        (lambda t: ["collect", str(DEMO_MODEL), "--data", str(wrong_dtype_data(t))], ["x.npy", "dtype float64"]),
        (lambda t: ["collect", str(DEMO_MODEL), "--data", str(CALIB_DIR), "--bins", "0"], ["--bins must be between 1 and 65536"]),
        (lambda t: ["collect", str(DEMO_MODEL), "--data", str(CALIB_DIR), "--out", str(t)], ["output path is a directory"]),
        (lambda t: ["show", str(DEMO_MODEL)], ["digits_cnn.onnx", "not a quantlab histogram file"]),
    ],
)
def test_bad_input_gets_one_line_and_exit_2(tmp_path, args, fragments):
    argv = args(tmp_path)
    before = set(tmp_path.rglob("*"))
    result = run(*argv, cwd=tmp_path)
    assert_one_line_error(result, 2, *fragments)
    assert set(tmp_path.rglob("*")) == before


def test_unwritable_output_leaves_no_file(tmp_path):
    out = tmp_path / "missing_dir" / "h.npz"
    result = run("collect", str(DEMO_MODEL), "--data", str(CALIB_DIR), "--out", str(out))
    assert_one_line_error(result, 2, "does not exist")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = run("collect", str(DEMO_MODEL), "--data", str(CALIB_DIR), "--out", str(blocker / "h.npz"))
    assert_one_line_error(result, 2, "a_file is not a directory")
    assert [p.name for p in tmp_path.iterdir()] == ["a_file"]


def test_failed_run_keeps_the_previous_output(tmp_path):
    out = tmp_path / "h.npz"
    out.write_bytes(b"previous")
    data = tmp_path / "data"
    data.mkdir()
    np.save(data / "x.npy", np.zeros((2, 1, 8, 7), np.float32))
    result = run("collect", str(DEMO_MODEL), "--data", str(data), "--out", str(out))
    assert_one_line_error(result, 2, "dim 3")
    assert out.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir() if p.is_file()] == ["h.npz"]


def test_nan_inputs_warn_and_continue(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    batch = np.load(sorted(CALIB_DIR.glob("*.npy"))[0])
    batch[1, 0, 2, 2] = np.nan
    np.save(data / "x.npy", batch)
    result = run("collect", str(DEMO_MODEL), "--data", str(data), "--out", str(tmp_path / "h.npz"))
    assert result.returncode == 0
    assert "warning: input: 1 NaN and 0 Inf values left out" in result.stderr
    assert quantlab.load_histograms(tmp_path / "h.npz")["input"].nan_count == 1


def test_readme_and_ci_run_the_same_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = [line.strip() for line in readme.split("```")[1].strip().splitlines() if line.strip()]
    assert len(commands) == 2, "the README opens with exactly two commands: the demo and the tests"
    demo, tests = commands
    assert "quantlab demo" in demo and "pytest" in tests
    assert "README.md" in ci and os.access(ROOT / ".ci" / "run", os.X_OK)
