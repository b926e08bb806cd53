"""quantlab collect vs ONNX Runtime's entropy calibrator (create_calibrator + collect_data), same model and data.

Each measurement runs in a fresh subprocess so its peak RSS is its own; each tool first runs once on the bundled
calibration set (warm-up: imports, first allocations, ONNX Runtime's first runs) outside the timer. Prints wall time, peak RSS, and the ratios:
  - time: ORT / quantlab (target >= 2x) at 1x and 10x the data,
  - memory: quantlab's peak RSS growth from 1x to 10x the data (target < 20%), next to ORT's.
Usage: python benchmarks/collect.py [--repeat 10] [--bins 2048]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

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


def run_quantlab(data: Path, bins: int, warm_up: bool = True) -> dict:
    import quantlab

    if warm_up:  # imports, first allocations and ONNX Runtime's first runs outside the timer, as for ONNX Runtime
        quantlab.collect(MODEL, CALIB, bins=bins, limit=32)
    start = time.perf_counter()
    histograms = quantlab.collect(MODEL, data, bins=bins)
    return {"seconds": time.perf_counter() - start, "tensors": len(histograms)}


def run_onnxruntime(data: Path, bins: int, warm_up: bool = True) -> dict:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, create_calibrator

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


def measure(tool: str, data: Path, bins: int) -> dict:
    """Run one tool in a fresh interpreter; returns its time and its own peak RSS."""
    code = (
        "import json, resource, sys; sys.path.insert(0, %r); import collect as b; "
        "r = b.run_%s(b.Path(%r), %d); r['peak_rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024; "
        "print(json.dumps(r))"
    ) % (str(Path(__file__).parent), tool, str(data), bins)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10, help="the large data set is this many copies of calib_data/calib")
    parser.add_argument("--bins", type=int, default=2048, help="|x| bins (signed histograms have twice as many)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sizes = {"1x": replicate(Path(tmp) / "x1", 1), f"{args.repeat}x": replicate(Path(tmp) / "xn", args.repeat)}
        results = {(tool, size): measure(tool, path, args.bins) for size, path in sizes.items() for tool in ("quantlab", "onnxruntime")}
    print(f"model {MODEL.name}, {args.bins} |x| bins ({2 * args.bins} signed), samples: 320 x {{1, {args.repeat}}}")
    print(f"{'tool':<12} {'data':>5} {'tensors':>8} {'seconds':>9} {'peak RSS MB':>12}")
    for (tool, size), r in results.items():
        print(f"{tool:<12} {size:>5} {r['tensors']:>8} {r['seconds']:>9.3f} {r['peak_rss_mb']:>12.1f}")
    large = f"{args.repeat}x"
    for size in sizes:
        ratio = results[("onnxruntime", size)]["seconds"] / results[("quantlab", size)]["seconds"]
        print(f"speed ratio at {size}: quantlab is {ratio:.2f}x faster than ONNX Runtime (target >= 2x)")
    for tool in ("quantlab", "onnxruntime"):
        growth = results[(tool, large)]["peak_rss_mb"] / results[(tool, "1x")]["peak_rss_mb"] - 1
        print(f"peak RSS growth 1x -> {large} for {tool}: {growth:+.1%}" + ("  (target < 20%)" if tool == "quantlab" else ""))


if __name__ == "__main__":
    main()
