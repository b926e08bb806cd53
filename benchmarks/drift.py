"""quantlab drift vs ONNX Runtime's qdq_loss_debug flow: time and peak RSS on the demo model, 1x and 10x the data.

Both compare the FP32 demo model with the same Q/DQ model (KL thresholds) over the held-out inputs (450 samples, or
10 copies of them). quantlab: `measure_drift` (running sums; the INT8 side is ORT's optimized graph with its INT8
kernels). ONNX Runtime: `modify_model_output_intermediate_tensors` on both models, `collect_activations` (every
activation of every sample kept in memory), `create_activation_matching`, `compute_activation_error`.
Each measurement runs in a fresh process, so its peak RSS is its own; each first runs once (warm-up) untimed.
Usage: python benchmarks/drift.py [--repeat 10]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from _sidebyside import measure_in_fresh_process, print_comparison

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "calib_data" / "digits_cnn.onnx"
EVAL = ROOT / "calib_data" / "eval" / "inputs"


def prepare(directory: Path, repeat: int) -> tuple[Path, Path, Path]:
    """The Q/DQ model (KL thresholds from the bundled calibration set) and 1x / `repeat`x copies of the eval inputs."""
    import quantlab

    histograms = quantlab.collect(MODEL, ROOT / "calib_data" / "calib")
    qdq = quantlab.export_qdq(MODEL, quantlab.calibrate(histograms, "kl"), directory / "model.qdq.onnx")
    copies = {}
    for label, times in (("x1", 1), ("xn", repeat)):
        target = directory / label
        target.mkdir()
        for copy in range(times):
            for path in sorted(EVAL.glob("*.npy")):
                (target / f"{copy:03d}_{path.name}").write_bytes(path.read_bytes())
        copies[label] = target
    return qdq, copies["x1"], copies["xn"]


def run_quantlab(qdq: str, data: str) -> dict:
    from quantlab.drift import measure_drift

    measure_drift(MODEL, qdq, EVAL)  # warm-up
    start = time.perf_counter()
    report = measure_drift(MODEL, qdq, data)
    return {"seconds": time.perf_counter() - start, "tensors": len(report.layers) + len(report.final["outputs"])}


def run_onnxruntime(qdq: str, data: str) -> dict:
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_activation_error,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    class Reader(CalibrationDataReader):
        def __init__(self, directory: Path) -> None:
            self.files = iter(sorted(directory.glob("*.npy")))

        def get_next(self):
            path = next(self.files, None)
            return None if path is None else {"input": np.load(path)}

    def flow(directory: Path) -> int:
        with tempfile.TemporaryDirectory() as tmp:
            float_aug, qdq_aug = Path(tmp) / "float.onnx", Path(tmp) / "qdq.onnx"
            modify_model_output_intermediate_tensors(str(MODEL), str(float_aug))
            modify_model_output_intermediate_tensors(qdq, str(qdq_aug))
            float_acts = collect_activations(str(float_aug), Reader(directory))
            qdq_acts = collect_activations(str(qdq_aug), Reader(directory))
            errors = compute_activation_error(create_activation_matching(qdq_acts, float_acts))
            return len(errors)

    flow(EVAL)  # warm-up
    start = time.perf_counter()
    tensors = flow(Path(data))
    return {"seconds": time.perf_counter() - start, "tensors": tensors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        qdq, x1, xn = prepare(Path(tmp), args.repeat)
        sizes = {"1x": x1, f"{args.repeat}x": xn}
        results = {
            (tool, size): measure_in_fresh_process("drift", f"run_{tool}", str(qdq), str(path))
            for size, path in sizes.items()
            for tool in ("quantlab", "onnxruntime")
        }
    print(f"FP32 demo model vs its Q/DQ model (KL), held-out inputs: 450 x {{1, {args.repeat}}} samples")
    print_comparison(results, list(sizes), "the qdq_loss_debug flow")

if __name__ == "__main__":
    main()
