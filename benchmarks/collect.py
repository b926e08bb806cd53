"""quantlab collect vs ONNX Runtime's entropy calibrator (create_calibrator + collect_data), same model and data.

Each measurement runs in a fresh subprocess so its peak RSS is its own; each tool first runs once on the bundled
calibration set (warm-up: imports, first allocations, ONNX Runtime's first runs) outside the timer. Prints wall time, peak RSS, and the ratios:
  - time: ORT / quantlab (target >= 2x) at 1x and 10x the data,
  - memory: quantlab's peak RSS growth from 1x to 10x the data (target < 20%), next to ORT's.
Usage: python benchmarks/collect.py [--repeat 10] [--bins 2048]
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
CALIB = ROOT / "calib_data" / "calib"


def replicate(directory: Path, times: int) -> Path:
    """A data directory holding the bundled calibration files `times` times over."""
    directory.mkdir(parents=True, exist_ok=True)
    for copy in range(times):
        for path in sorted(CALIB.glob("*.npy")):
            (directory / f"{copy:03d}_{path.name}").write_bytes(path.read_bytes())
    return directory


def run_quantlab(data: str, bins: str, warm_up: bool = True) -> dict:
    import quantlab

    data, bins = Path(data), int(bins)
    if warm_up:  # imports, first allocations and ONNX Runtime's first runs outside the timer, as for ONNX Runtime
        quantlab.collect(MODEL, CALIB, bins=bins, limit=32)
    start = time.perf_counter()
    histograms = quantlab.collect(MODEL, data, bins=bins)
    return {"seconds": time.perf_counter() - start, "tensors": len(histograms)}


def run_onnxruntime(data: str, bins: str, warm_up: bool = True) -> dict:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, create_calibrator

    data, bins = Path(data), int(bins)
    if warm_up:
        run_onnxruntime(CALIB, bins, warm_up=False)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.files = iter(sorted(data.glob("*.npy")))

        def get_next(self):
            path = next(self.files, None)
            return None if path is None else {"input": np.load(path)}

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        calibrator = create_calibrator(
            MODEL,
            augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=CalibrationMethod.Entropy,
            extra_options={"num_bins": 2 * bins},
        )
        calibrator.collect_data(Reader())
        seconds = time.perf_counter() - start
        tensors = len(calibrator.collector.histogram_dict)
    return {"seconds": seconds, "tensors": tensors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10, help="the large data set is this many copies of calib_data/calib")
    parser.add_argument("--bins", type=int, default=2048, help="|x| bins (signed histograms have twice as many)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sizes = {"1x": replicate(Path(tmp) / "x1", 1), f"{args.repeat}x": replicate(Path(tmp) / "xn", args.repeat)}
        results = {
            (tool, size): measure_in_fresh_process("collect", f"run_{tool}", str(path), str(args.bins))
            for size, path in sizes.items()
            for tool in ("quantlab", "onnxruntime")
        }
    print(f"model {MODEL.name}, {args.bins} |x| bins ({2 * args.bins} signed), samples: 320 x {{1, {args.repeat}}}")
    print_comparison(results, list(sizes), "ONNX Runtime's entropy calibrator", " (target >= 2x)")
    print("(target for memory: quantlab's peak RSS grows < 20% from 1x to 10x)")

if __name__ == "__main__":
    main()
