"""Live comparisons: every calibration variant against its reference implementation, on the demo model's real
activations and on every edge case (relative difference <= 1e-6 each).

References: ModelOpt's `_compute_amax_entropy` / `_compute_amax_percentile` / `_compute_amax_mse` (skipped without
nvidia-modelopt + torch), ONNX Runtime's `HistogramCollector` (always), and for the `tensorrt` variant, which has no
public implementation, `tensorrt_reference` below: the published pseudo-code, one candidate at a time.
The references take ~1 s per 2048-bin histogram, so the slowest ones see most demo tensors with a stride or fewer bins.
"""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest

from quantlab.calibration import compute_amax
from quantlab.histogram import Histogram

RTOL = 1e-6
MODELOPT_FULL = 2  # demo tensors compared with ModelOpt at stride 1; the others at MODELOPT_STRIDE
MODELOPT_STRIDE = 9
ORT_FULL = 3  # demo tensors compared with ORT at 2048 |x| bins; the others at ORT_SMALL_BINS
ORT_SMALL_BINS = 256
OPTION_CASES = ("gaussian", "relu-like", "sparse-discrete", "first-128-bins", "far-outlier")  # for option sweeps


def absolute(counts, top: float = 1.0, **stats) -> Histogram:
    """An |x| histogram (edges from 0) of the given counts."""
    counts = np.asarray(counts, dtype=np.int64)
    return Histogram(counts, np.linspace(0.0, top, counts.size + 1), **stats)


def mirrored(hist: Histogram) -> Histogram:
    """The signed histogram ORT needs, from an |x| one (documented behaviour of the onnxruntime variant)."""
    if hist.is_signed:
        return hist
    return Histogram(np.concatenate([hist.counts[::-1], hist.counts]), np.concatenate([-hist.edges[:0:-1], hist.edges]))


def synthetic_cases() -> dict[str, Histogram]:
    """Realistic shapes and every KL edge case, small enough for the slow references."""
    rng = np.random.default_rng(20240517)
    bins = 384
    first = np.zeros(bins, dtype=np.int64)
    first[:100] = rng.poisson(40, 100)
    lone_high, lone_low = np.zeros(bins, dtype=np.int64), np.zeros(bins, dtype=np.int64)
    lone_high[300], lone_low[5] = 70, 70
    values = {
        "gaussian": rng.normal(size=50_000),
        "relu-like": np.maximum(rng.normal(size=50_000), 0),
        "heavy-tailed": rng.standard_t(2, size=50_000),
        "sparse-discrete": np.maximum(rng.integers(-3, 6, 5_000), 0) * 0.25,
        "far-outlier": np.append(rng.normal(size=50_000), 400.0),
        "far-from-zero": rng.uniform(3, 4, 10_000),
        "constant": np.full(1000, -2.5),
    }
    cases = {name: Histogram.from_values(v.astype(np.float32), bins=bins) for name, v in values.items()}
    laplace = np.abs(rng.laplace(size=20_000)).astype(np.float32)
    cases["mirrored-abs"] = Histogram.from_values(laplace, bins, signed=False)
    cases["first-128-bins"] = absolute(first)
    cases["single-bin-high"] = absolute(lone_high)
    cases["single-bin-low"] = absolute(lone_low)
    cases["1000-bins"] = Histogram.from_values(rng.gamma(2.0, size=20_000).astype(np.float32), bins=1000)
    cases["100-bins"] = Histogram.from_values(rng.normal(size=5_000).astype(np.float32), bins=100)
    return cases


def option_cases() -> dict[str, Histogram]:
    return {case: hist for case, hist in synthetic_cases().items() if case in OPTION_CASES}


@pytest.fixture(scope="module")
def demo_cases(demo_activations) -> dict[str, Histogram]:
    return {name: Histogram.from_values(values, bins=2048) for name, values in demo_activations.items()}


@pytest.fixture(scope="module")
def cases(demo_cases) -> dict[str, Histogram]:
    return {**{f"demo {name}": h for name, h in demo_cases.items()}, **synthetic_cases()}


@pytest.fixture(scope="module")
def modelopt_histogram():
    pytest.importorskip("torch", reason="ModelOpt comparisons need torch (pip install torch==2.13.0)")
    return pytest.importorskip(
        "modelopt.torch.quantization.calib.histogram",
        reason="ModelOpt comparisons need nvidia-modelopt (pip install -e '.[bench]')",
    )


def data_range(hist: Histogram) -> tuple[float, float]:
    """(min, max) for ORT's final clipping; unknown statistics clip nothing (quantlab does the same)."""
    return (-np.inf if hist.min is None else hist.min), (np.inf if hist.max is None else hist.max)


def collector(method: str, num_bins: int, num_quantized_bins: int = 128, percentile: float = 99.99, symmetric=True):
    from onnxruntime.quantization.calibrate import HistogramCollector

    return HistogramCollector(method, symmetric, num_bins, num_quantized_bins, percentile, "same")


def ort_entropy(hist: Histogram, num_quantized_bins: int = 128) -> float:
    """ORT's search threshold: data range (-inf, inf) so that its final clipping does nothing."""
    signed = mirrored(hist)
    counts = signed.counts.astype(np.int64)
    pair = collector("entropy", counts.size, num_quantized_bins).get_entropy_threshold(
        (counts, signed.edges, -np.inf, np.inf), num_quantized_bins
    )
    return float(pair[1])


def modelopt_entropy(module, hist: Histogram, **options) -> float:
    folded = hist.fold()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its NaN candidates warn
        amax = module._compute_amax_entropy(
            folded.counts.copy(),  # it writes bins[0] = bins[1] into the array it gets
            folded.edges,
            options.get("num_bits", 8),
            options.get("unsigned", False),
            options.get("stride", 1),
            options.get("start_bin", 128),
        )
    return float(amax)


def tensorrt_reference(hist: Histogram, exact_zeros: bool = True, start_bin: int = 128, levels: int = 128) -> float:
    """The published algorithm literally, one candidate at a time, with quantlab's documented choices (docs/kl.md):
    candidates up to N, Q kept empty where P is, a zero of Q under P's mass smoothed to 1e-4 x the smallest non-empty
    count, the exact zeros as their own level, first minimum, threshold = edge i."""
    folded = hist.fold()
    bins = folded.counts.astype(np.float64)
    smallest = bins[bins > 0].min()
    zeros = min(hist.zero_count or 0, bins[0]) if exact_zeros else 0
    bins[0] -= zeros
    candidates = list(range(min(start_bin, bins.size), bins.size + 1))
    divergences = []
    for i in candidates:
        p = bins[:i].copy()
        p[-1] += bins[i:].sum()
        group = (levels * np.arange(i)) // i
        sums = np.bincount(group, weights=bins[:i], minlength=levels)
        nonempty = np.bincount(group, weights=p > 0, minlength=levels)
        q = np.where(p > 0, sums[group] / np.maximum(nonempty[group], 1), 0.0)
        p, q = np.append(p, zeros), np.append(q, zeros)
        if q.sum() == 0:
            divergences.append(np.inf)
            continue
        q[(p > 0) & (q == 0)] = 1e-4 * smallest
        p, q = p / p.sum(), q / q.sum()
        mass = p > 0
        divergences.append(np.sum(p[mass] * np.log(p[mass] / q[mass])))
    divergences = np.array(divergences)
    first = np.flatnonzero(divergences <= divergences.min() + 1e-12 * max(1.0, divergences.min()))[0]
    return float(folded.edges[candidates[first]])


def close(ours: float, ref: float) -> bool:
    return bool(np.isclose(ours, ref, rtol=RTOL, atol=0.0))


def assert_match(results: list[tuple[str, float, float]], at_least: int = 12) -> None:
    """Every (case, quantlab, reference) within RTOL; the message lists all mismatches."""
    assert len(results) >= at_least
    bad = [f"{case}: quantlab {ours!r}, reference {ref!r}" for case, ours, ref in results if not close(ours, ref)]
    assert not bad, "\n".join(bad)


def test_modelopt_variant_matches_modelopt(cases, modelopt_histogram):
    results = []
    for k, (case, hist) in enumerate(cases.items()):
        if hist.fold().bins < 128:
            continue  # ModelOpt raises there: test_modelopt_variant_defines_what_modelopt_cannot
        stride = MODELOPT_STRIDE if case.startswith("demo") and k >= MODELOPT_FULL else 1
        before = hist.counts.copy()
        ref = modelopt_entropy(modelopt_histogram, hist, stride=stride)
        results.append((case, compute_amax(hist, variant="modelopt", stride=stride), ref))
        np.testing.assert_array_equal(hist.counts, before)  # never written to, unlike ModelOpt
    assert_match(results)


@pytest.mark.parametrize(
    "options",
    [{"num_bits": 6}, {"unsigned": True}, {"stride": 3, "start_bin": 200}, {"start_bin": 40}, {"num_bits": 4}],
)
def test_modelopt_variant_options_match_modelopt(options, modelopt_histogram):
    results = [
        (case, compute_amax(hist, variant="modelopt", **options), modelopt_entropy(modelopt_histogram, hist, **options))
        for case, hist in option_cases().items()
    ]
    assert_match(results, at_least=len(OPTION_CASES))


def test_modelopt_variant_defines_what_modelopt_cannot(modelopt_histogram):
    """Fewer bins than start_bin: ModelOpt's candidate list is empty (argmin raises); quantlab returns the top edge."""
    hist = synthetic_cases()["100-bins"]
    with pytest.raises(ValueError):
        modelopt_entropy(modelopt_histogram, hist)
    assert compute_amax(hist, variant="modelopt") == compute_amax(hist, variant="tensorrt") == hist.fold().edges[-1]
    assert compute_amax(hist, variant="modelopt", start_bin=64) == pytest.approx(
        modelopt_entropy(modelopt_histogram, hist, start_bin=64), rel=RTOL
    )


def test_onnxruntime_variant_matches_onnxruntime(cases, demo_activations):
    results = []
    for k, (case, hist) in enumerate(cases.items()):
        if case.startswith("demo") and k >= ORT_FULL:
            hist = Histogram.from_values(demo_activations[case.removeprefix("demo ")], bins=ORT_SMALL_BINS)
        if hist.fold().bins >= 64:  # fewer: ORT raises, test_onnxruntime_variant_defines_what_onnxruntime_cannot
            results.append((case, compute_amax(hist, variant="onnxruntime"), ort_entropy(hist)))
    assert_match(results)


def test_onnxruntime_variant_defines_what_onnxruntime_cannot():
    """Fewer signed bins than the quantized bins: ORT has no candidate (np.zeros(negative) raises); quantlab returns
    the top edge, like the other variants."""
    hist = synthetic_cases()["100-bins"]
    with pytest.raises(ValueError):
        ort_entropy(hist, 255)
    assert compute_amax(hist, variant="onnxruntime", num_quantized_bins=255) == hist.edges[-1]


@pytest.mark.parametrize("levels", [64, 100, 129, 255])
def test_onnxruntime_variant_quantized_bins_match_onnxruntime(levels):
    results = [
        (case, compute_amax(hist, variant="onnxruntime", num_quantized_bins=levels), ort_entropy(hist, levels))
        for case, hist in {**option_cases(), "100-bins": synthetic_cases()["100-bins"]}.items()
        if levels // 2 <= hist.fold().bins
    ]
    assert_match(results, at_least=len(OPTION_CASES))


def test_tensorrt_variant_matches_the_published_algorithm(cases):
    results = [(case, compute_amax(hist, variant="tensorrt"), tensorrt_reference(hist)) for case, hist in cases.items()]
    assert_match(results)
    literal = [
        (case, compute_amax(hist, variant="tensorrt", exact_zeros=False), tensorrt_reference(hist, exact_zeros=False))
        for case, hist in synthetic_cases().items()
    ]
    assert_match(literal)


PERCENTILES = [99.99, 99.9, 99.0, 50.0, 100.0]


@pytest.mark.parametrize("percentile", PERCENTILES)
def test_percentile_matches_modelopt(cases, modelopt_histogram, percentile):
    results = []
    for case, hist in cases.items():
        folded = hist.fold()
        ref = modelopt_histogram._compute_amax_percentile(folded.counts, folded.edges, percentile)
        results.append((case, compute_amax(hist, "percentile", percentile=percentile), float(ref)))
    assert_match(results)


@pytest.mark.parametrize("percentile", PERCENTILES)
def test_percentile_matches_onnxruntime_symmetric(cases, percentile, capsys):
    results = []
    for case, hist in cases.items():
        folded = hist.fold()
        ort = collector("percentile", folded.bins, percentile=percentile)
        ort.histogram_dict = {"t": (folded.counts, folded.edges, *data_range(hist))}
        low, high = ort.compute_percentile()["t"][:2]
        ours = compute_amax(hist, "percentile", percentile=percentile, variant="onnxruntime")
        results.append((case, ours, max(abs(float(low)), abs(float(high)))))
        if hist.min is None or hist.min < 0 < hist.max:  # the two variants differ only for one-signed data
            assert compute_amax(hist, "percentile", percentile=percentile) == ours
    assert_match(results)


@pytest.mark.parametrize("percentile", [99.99, 99.0, 90.0])
def test_two_tailed_percentile_matches_onnxruntime_asymmetric(cases, percentile, capsys):
    results = []
    for case, hist in cases.items():
        signed = mirrored(hist)
        ort = collector("percentile", signed.bins, percentile=percentile, symmetric=False)
        ort.histogram_dict = {"t": (signed.counts, signed.edges, *data_range(hist))}
        low, high = ort.compute_percentile()["t"][:2]
        ours = compute_amax(hist, "percentile", percentile=percentile, variant="onnxruntime", two_tailed=True)
        results.append((case, ours, max(abs(low), abs(high))))
    assert_match(results)


def test_mse_matches_modelopt(cases, modelopt_histogram, monkeypatch):
    """ModelOpt 0.47 calls `fake_tensor_quant(centers, amax, num_bits, unsigned)` positionally, but the function's third
    parameter is now `bias`: num_bits=8 becomes a bias of 8 and every candidate the same constant. The comparison is
    with its loop as intended (arguments by name), patched only while that signature bug is present."""
    from modelopt.torch.quantization.tensor_quant import FakeTensorQuantFunction

    def by_name(inputs, amax, num_bits, unsigned):
        return FakeTensorQuantFunction.apply(inputs, amax, None, num_bits, unsigned)

    if list(inspect.signature(FakeTensorQuantFunction.forward).parameters)[3] == "bias":
        monkeypatch.setattr(modelopt_histogram, "fake_tensor_quant", by_name)
    results = []
    for case, hist in cases.items():
        folded = hist.fold()
        if folded.bins <= 128:
            continue  # ModelOpt's candidate list is empty
        ref = modelopt_histogram._compute_amax_mse(folded.counts.copy(), folded.edges, 8, False, 1, 128)
        results.append((case, compute_amax(hist, "mse"), float(ref)))
    assert_match(results)


def test_max_is_the_largest_magnitude(demo_cases, demo_activations):
    for name, hist in demo_cases.items():
        assert compute_amax(hist, "max") == float(np.abs(demo_activations[name]).max())
