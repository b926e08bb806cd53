"""quantlab collect vs ONNX Runtime's entropy calibrator (create_calibrator + collect_data), same model and data.

Each measurement runs in a fresh subprocess so its peak RSS is its own; each tool first runs `--warmup` times on the
same data outside the timer (imports, first allocations, ONNX Runtime's first runs: both tools take about three runs
to settle), then `--rounds` timed runs, of which the median counts. That in `--processes` fresh processes per tool
and size, taking turns, whose medians count (these 2-core machines are noisy, and so is a fresh process's memory
layout). Prints wall time, peak RSS, and the ratios:
  - time: ORT / quantlab (target >= 2x) at 1x and 10x the data,
  - memory: quantlab's peak RSS growth from 1x to 10x the data (target < 20%), next to ORT's.
Usage: python benchmarks/collect.py [--repeat 10] [--bins 2048] [--rounds 15] [--warmup 3] [--processes 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from _sidebyside import measure_interleaved, print_comparison

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


def median_of_rounds(run, rounds: int, warmup: int) -> dict:
    """`run()` `warmup` times untimed, then `rounds` times; the median time and the tensor count."""
    for _ in range(warmup):
        run()
    results = [run() for _ in range(rounds)]
    seconds = [r["seconds"] for r in results]
    return {"seconds": statistics.median(seconds), "spread": [min(seconds), max(seconds)], "tensors": results[0]["tensors"]}


def run_quantlab(data: str, bins: str, rounds: str = "1", warmup: str = "1") -> dict:
    import quantlab

    data, bins = Path(data), int(bins)

    def once() -> dict:
        start = time.perf_counter()
        histograms = quantlab.collect(MODEL, data, bins=bins)
        return {"seconds": time.perf_counter() - start, "tensors": len(histograms)}

    return median_of_rounds(once, int(rounds), int(warmup))


def run_onnxruntime(data: str, bins: str, rounds: str = "1", warmup: str = "1") -> dict:
    data, bins = Path(data), int(bins)
    return median_of_rounds(lambda: onnxruntime_once(data, bins), int(rounds), int(warmup))


def onnxruntime_once(data: Path, bins: int) -> dict:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, create_calibrator

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
    parser.add_argument("--rounds", type=int, default=15, help="timed runs per process; the median counts")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs per process before the timed ones")
    parser.add_argument("--processes", type=int, default=3, help="fresh processes per tool and size; the median counts")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sizes = {"1x": replicate(Path(tmp) / "x1", 1), f"{args.repeat}x": replicate(Path(tmp) / "xn", args.repeat)}
        jobs = {
            (tool, size): ("collect", f"run_{tool}", str(path), str(args.bins), str(args.rounds), str(args.warmup))
            for size, path in sizes.items()
            for tool in ("quantlab", "onnxruntime")
        }
        results = measure_interleaved(args.processes, jobs)
    print(f"model {MODEL.name}, {args.bins} |x| bins ({2 * args.bins} signed), samples: 320 x {{1, {args.repeat}}}")
    print_comparison(results, list(sizes), "ONNX Runtime's entropy calibrator", " (target >= 2x)")
    print("(target for memory: quantlab's peak RSS grows < 20% from 1x to 10x)")

if __name__ == "__main__":
    main()
