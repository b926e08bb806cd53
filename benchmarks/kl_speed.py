"""KL calibration speed and agreement: quantlab's variants vs ModelOpt and ONNX Runtime, per tensor, in one run.

Histograms: every activation of the bundled demo model (collected with quantlab, 2048 bins) plus synthetic shapes
(Gaussian, ReLU-like, heavy-tailed, sparse discrete, mirrored |x|, far outlier). For each: the threshold of
quantlab's `modelopt` variant next to ModelOpt's `_compute_amax_entropy`, its `onnxruntime` variant next to ORT's
`get_entropy_threshold`, the default `tensorrt` variant, the times and the speed ratios (targets: >= 500x ModelOpt,
>= 100x ORT, identical thresholds). Then `calibrate` over the whole demo HistogramSet, cold (tables built) and warm.
quantlab times are the median of --repeat runs with the bin-count tables cached; the references run once.
Usage: python benchmarks/kl_speed.py [--limit N] [--repeat 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import quantlab  # noqa: E402
from quantlab.calibration import calibrate, compute_amax, kl  # noqa: E402
from quantlab.histogram import Histogram  # noqa: E402


def synthetic(bins: int = 2048) -> dict[str, Histogram]:
    rng = np.random.default_rng(0)
    values = {
        "gaussian": rng.normal(size=1_000_000),
        "relu-like": np.maximum(rng.normal(size=1_000_000), 0),
        "heavy-tailed": rng.standard_t(2, size=1_000_000),
        "sparse-discrete": np.maximum(rng.integers(-3, 6, 200_000), 0) * 0.25,
        "far-outlier": np.append(rng.normal(size=1_000_000), 300.0),
    }
    hists = {f"synthetic {k}": Histogram.from_values(v.astype(np.float32), bins) for k, v in values.items()}
    absolute = Histogram.from_values(np.abs(rng.laplace(size=1_000_000)).astype(np.float32), bins, signed=False)
    hists["synthetic mirrored |x|"] = absolute
    return hists


def signed(hist: Histogram) -> Histogram:
    """ORT needs a signed histogram: an |x| one is mirrored (as the onnxruntime variant does)."""
    if hist.is_signed:
        return hist
    return Histogram(np.concatenate([hist.counts[::-1], hist.counts]), np.concatenate([-hist.edges[:0:-1], hist.edges]))


def median_time(func, repeat: int) -> tuple[float, float]:
    result = func()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def once(func) -> tuple[float, float]:
    start = time.perf_counter()
    result = func()
    return result, time.perf_counter() - start


def load_modelopt():
    try:
        import modelopt.torch.quantization.calib.histogram as module
    except ImportError as exc:  # the optional `bench` extra
        print(f"ModelOpt not available ({exc}); its columns are skipped")
        return None
    return module


def modelopt_entropy(module, hist: Histogram) -> float:
    folded = hist.fold()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(module._compute_amax_entropy(folded.counts.copy(), folded.edges, 8, False, 1, 128))


def ort_entropy(hist: Histogram) -> float:
    from onnxruntime.quantization.calibrate import HistogramCollector

    hist = signed(hist)
    collector = HistogramCollector("entropy", True, hist.bins, 128, 99.99, "same")
    return float(collector.get_entropy_threshold((hist.counts.astype(np.int64), hist.edges, -np.inf, np.inf), 128)[1])


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="compare only the first N histograms")
    parser.add_argument("--repeat", type=int, default=7, help="timed runs of quantlab per histogram (median)")
    args = parser.parse_args()

    demo = quantlab.collect(ROOT / "calib_data" / "digits_cnn.onnx", ROOT / "calib_data" / "calib")
    cases = {**{f"demo {k}": h for k, h in demo.items()}, **synthetic()}
    cases = dict(list(cases.items())[: args.limit])
    modelopt = load_modelopt()

    columns = [("ql-trt", 9), ("ql-mo", 9), ("modelopt", 9), ("ql-ort", 9), ("ORT", 9), ("t trt", 7), ("t ql-mo", 7)]
    columns += [("t MO", 7), ("t ql-ort", 8), ("t ORT", 7), ("x MO", 6), ("x ORT", 6)]
    print(f"{'histogram':44s}" + "".join(f" {title:>{width}s}" for title, width in columns))
    rows = []
    for name, hist in cases.items():
        trt, t_trt = median_time(lambda: compute_amax(hist), args.repeat)
        mo, t_mo = median_time(lambda: compute_amax(hist, variant="modelopt"), args.repeat)
        ort, t_ort = median_time(lambda: compute_amax(hist, variant="onnxruntime"), args.repeat)
        ref_mo, t_ref_mo = once(lambda: modelopt_entropy(modelopt, hist)) if modelopt else (np.nan, np.nan)
        ref_ort, t_ref_ort = once(lambda: ort_entropy(hist))
        rows.append((rel(mo, ref_mo), rel(ort, ref_ort), t_ref_mo / t_mo, t_ref_ort / t_ort, t_trt, t_mo, t_ort))
        print(
            f"{name[-44:]:44s} {trt:9.5g} {mo:9.5g} {ref_mo:9.5g} {ort:9.5g} {ref_ort:9.5g} "
            f"{t_trt * 1e3:5.2f}ms {t_mo * 1e3:5.2f}ms {t_ref_mo:6.2f}s {t_ort * 1e3:6.2f}ms {t_ref_ort:6.2f}s "
            f"{t_ref_mo / t_mo:6.0f} {t_ref_ort / t_ort:6.0f}"
        )

    rel_mo, rel_ort, x_mo, x_ort, t_trt, t_mo, t_ort = (np.array(column) for column in zip(*rows))
    print(f"\n{len(rows)} histograms")
    print(f"max relative difference: modelopt {np.nanmax(rel_mo):.1e}, onnxruntime {np.max(rel_ort):.1e}")
    print(f"quantlab median time per tensor: tensorrt {np.median(t_trt) * 1e3:.2f} ms, "
          f"modelopt {np.median(t_mo) * 1e3:.2f} ms, onnxruntime {np.median(t_ort) * 1e3:.2f} ms")
    if modelopt:
        print(f"speed-up vs ModelOpt: min {np.min(x_mo):.0f}x, median {np.median(x_mo):.0f}x (target >= 500x)")
    print(f"speed-up vs ONNX Runtime: min {np.min(x_ort):.0f}x, median {np.median(x_ort):.0f}x (target >= 100x)")

    for variant in kl.VARIANTS:
        kl._group_table.cache_clear()
        kl._ort_table.cache_clear()
        _, cold = once(lambda: calibrate(demo, variant=variant))
        _, warm = median_time(lambda: calibrate(demo, variant=variant), args.repeat)
        print(f"calibrate({len(demo)} tensors, variant={variant!r}): {cold * 1e3:.1f} ms cold,"
              f" {warm * 1e3:.1f} ms warm")
    for method in ("max", "percentile", "mse"):
        _, warm = median_time(lambda: calibrate(demo, method), args.repeat)
        print(f"calibrate({len(demo)} demo tensors, method={method!r}): {warm * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
