"""The calibration API: registry, options and errors, the documented edge cases, KL curves, properties.

Agreement with the reference implementations is in test_kl_references.py.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from quantlab.calibration import METHODS, calibrate, compute_amax, kl, kl_curve
from quantlab.errors import QuantlabError
from quantlab.histogram import Histogram, HistogramSet
from test_kl_references import absolute, mirrored

VARIANTS = ["tensorrt", "modelopt", "onnxruntime"]
EVERY_METHOD = [("kl", {"variant": v}) for v in VARIANTS] + [("max", {}), ("percentile", {}), ("mse", {})]


@pytest.fixture(scope="module")
def demo_set(demo_activations) -> HistogramSet:
    return HistogramSet({name: Histogram.from_values(v) for name, v in demo_activations.items()}, {"bins": 2048})


# --- registry, options, errors -----------------------------------------------------------------------------------


def test_registry_holds_the_methods():
    assert set(METHODS) == {"kl", "max", "percentile", "mse"}


def test_a_new_method_is_one_registry_entry(monkeypatch):
    monkeypatch.setitem(METHODS, "half-max", lambda hist, *, fraction=0.5: fraction * hist.amax)
    hist = Histogram.from_values(np.array([-4.0, 1.0, 2.0], dtype=np.float32))
    assert compute_amax(hist, "half-max") == 2.0
    assert calibrate({"t": hist}, "half-max", fraction=0.25) == {"t": 1.0}
    with pytest.raises(QuantlabError, match="unknown option 'percent'.*valid: fraction"):
        compute_amax(hist, "half-max", percent=3)


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("entropy", {}, "unknown calibration method 'entropy'"),
        ("kl", {"variant": "trt"}, "unknown KL variant 'trt'"),
        ("kl", {"bins": 128}, "unknown option 'bins' for KL variant 'tensorrt'"),
        ("kl", {"variant": "onnxruntime", "stride": 2}, "unknown option 'stride' for KL variant 'onnxruntime'"),
        ("kl", {"variant": "modelopt", "exact_zeros": False}, "unknown option 'exact_zeros'"),
        ("kl", {"num_bits": 1}, "num_bits must be in \\[2, 16\\]"),
        ("kl", {"stride": 0}, "stride must be >= 1"),
        ("kl", {"start_bin": 1.5}, "start_bin must be an integer"),
        ("kl", {"unsigned": "yes"}, "unsigned must be true or false"),
        ("kl", {"variant": "onnxruntime", "num_quantized_bins": 1}, "num_quantized_bins must be >= 2"),
        ("max", {"percentile": 99.0}, "unknown option 'percentile' for method 'max' \\(valid: none\\)"),
        ("percentile", {"percentile": 101}, "percentile must be in \\[0, 100\\]"),
        ("percentile", {"percentile": "99"}, "percentile must be a number"),
        ("percentile", {"variant": "tensorrt"}, "unknown percentile variant"),
        ("percentile", {"two_tailed": True}, "two_tailed is ONNX Runtime's"),
        ("mse", {"num_bits": True}, "num_bits must be an integer"),
    ],
)
def test_bad_methods_and_options_raise_one_line_errors(method, options, message):
    hist = Histogram.from_values(np.linspace(-1, 1, 1001, dtype=np.float32), bins=256)
    with pytest.raises(QuantlabError, match=message) as info:
        compute_amax(hist, method, **options)
    assert "\n" not in str(info.value)
    with pytest.raises(QuantlabError, match=message):
        calibrate({"t": hist}, method, **options)


def test_bad_histograms_raise():
    with pytest.raises(QuantlabError, match="expected a quantlab Histogram"):
        compute_amax(np.ones(2048), "kl")
    with pytest.raises(QuantlabError, match="NaN"):
        Histogram(np.array([1.0, np.nan]), np.array([0.0, 1.0, 2.0]))
    with pytest.raises(QuantlabError, match="negative"):
        Histogram(np.array([1, -1]), np.array([0.0, 1.0, 2.0]))
    with pytest.raises(QuantlabError, match="integer counts"):
        compute_amax(Histogram(np.full(300, 0.5), np.linspace(0, 1, 301)), variant="onnxruntime")
    lopsided = Histogram(np.ones(300), np.linspace(-1.0, 2.0, 301))
    with pytest.raises(QuantlabError, match="symmetric around zero"):
        compute_amax(lopsided, variant="onnxruntime")
    with pytest.raises(QuantlabError, match="tensor 'b'"):
        calibrate({"a": absolute(np.ones(300)), "b": lopsided}, "kl", variant="onnxruntime")


# --- edge cases (docs/kl.md, "Edge cases") ------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "options"), EVERY_METHOD)
def test_empty_and_all_zero_histograms_give_zero_with_a_warning(method, options):
    empty = Histogram.from_values(np.array([], dtype=np.float32))
    zeros = Histogram.from_values(np.zeros(1000, dtype=np.float32))
    for hist in (empty, zeros, absolute(np.zeros(2048))):
        with pytest.warns(UserWarning, match="amax = 0"):
            assert compute_amax(hist, method, **options) == 0.0
    with pytest.warns(UserWarning, match="tensor 'dead' is all zeros"):
        assert calibrate({"dead": zeros}, method, **options) == {"dead": 0.0}


def test_kl_curve_of_an_empty_histogram_raises():
    with pytest.raises(QuantlabError, match="holds no values"):
        kl_curve(absolute(np.zeros(2048)))


@pytest.mark.parametrize("variant", VARIANTS)
def test_mass_in_the_first_128_bins_keeps_every_value(variant):
    counts = np.zeros(2048, dtype=np.int64)
    counts[:100] = np.random.default_rng(0).poisson(30, 100)
    hist = absolute(counts)
    amax = compute_amax(hist, variant=variant)
    assert hist.edges[100] <= amax <= hist.edges[135]  # nothing clipped; at most a few empty bins above the data
    if variant == "tensorrt":
        assert amax == hist.edges[128]  # the first candidate: every value has its own level there


@pytest.mark.parametrize("position", [3, 127, 128, 700, 2047])
def test_a_single_non_empty_bin_is_kept(position):
    counts = np.zeros(2048, dtype=np.int64)
    counts[position] = 42
    hist = absolute(counts)
    # TensorRT: the first window that holds the bin is exact (KL = 0), and the first minimum wins
    assert compute_amax(hist) == hist.edges[max(position + 1, 128)]
    # ModelOpt: its NaN rule (position > 1) or its last-minimum rule picks another edge that still keeps the bin
    assert compute_amax(hist, variant="modelopt") >= hist.edges[position]


def test_a_far_outlier_is_clipped_by_tensorrt_and_kept_by_modelopt():
    values = np.append(np.random.default_rng(1).normal(size=100_000), 1000.0).astype(np.float32)
    hist = Histogram.from_values(values)
    assert compute_amax(hist) < 0.1 * hist.amax
    assert compute_amax(hist, variant="onnxruntime") < 0.1 * hist.amax
    assert compute_amax(hist, variant="modelopt") == pytest.approx(hist.amax)


@pytest.mark.parametrize("bins", [1, 2, 64, 127])
def test_fewer_bins_than_start_bin_give_the_top_edge(bins):
    hist = Histogram.from_values(np.random.default_rng(2).normal(size=5000).astype(np.float32), bins=bins)
    for variant in ("tensorrt", "modelopt"):
        assert compute_amax(hist, variant=variant) == hist.edges[-1]
    assert compute_amax(hist, variant="onnxruntime", num_quantized_bins=2 * bins + 2) == hist.edges[-1]
    assert compute_amax(hist, "mse") <= hist.edges[-1]


@pytest.mark.parametrize("bins", [129, 200, 1000, 3001])
def test_bin_counts_that_are_not_multiples_of_128(bins):
    values = np.random.default_rng(3).gamma(2.0, size=20_000).astype(np.float32)
    hist = Histogram.from_values(values, bins=bins)
    for variant in VARIANTS:
        thresholds, divergence = kl_curve(hist, variant=variant)
        amax = compute_amax(hist, variant=variant)
        assert amax in thresholds and np.isfinite(divergence[thresholds == amax]).all()


def test_exact_zeros_are_their_own_level():
    """A ReLU output: half its values are exactly 0. Smearing them over the first group (exact_zeros=False, the
    slides literally) drags the threshold far down; with the zeros as a level of their own it is not."""
    values = np.maximum(np.random.default_rng(4).normal(size=200_000), 0).astype(np.float32)
    hist = Histogram.from_values(values)
    literal = compute_amax(hist, exact_zeros=False)
    assert literal < 0.5 * compute_amax(hist)
    without_stats = Histogram(hist.counts, hist.edges)  # no zero_count: nothing to separate
    assert compute_amax(without_stats) == literal


def test_signed_and_folded_histograms_agree(demo_set):
    """Every |x| method folds; onnxruntime mirrors an |x| histogram instead, which loses the sign of the data."""
    for hist in list(demo_set.values())[:4]:
        folded = hist.fold()
        for method, options in EVERY_METHOD:
            if options.get("variant") != "onnxruntime":
                assert compute_amax(folded, method, **options) == compute_amax(hist, method, **options)
        assert compute_amax(folded, variant="onnxruntime") == compute_amax(mirrored(folded), variant="onnxruntime")


# --- calibrate over a model -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "options"), EVERY_METHOD)
def test_calibrate_is_compute_amax_per_tensor(demo_set, method, options):
    amaxes = calibrate(demo_set, method, **options)
    assert list(amaxes) == list(demo_set)
    for name, hist in demo_set.items():
        assert amaxes[name] == compute_amax(hist, method, **options)
        assert 0 < amaxes[name] <= hist.fold().edges[-1]


def test_calibrate_builds_the_tables_once_per_bin_count(demo_set):
    kl._group_table.cache_clear()
    kl._ort_table.cache_clear()
    calibrate(demo_set, "kl")
    calibrate(demo_set, "kl", variant="onnxruntime")
    distinct = len({hist.counts.tobytes() for hist in demo_set.values()})  # tensors sharing a histogram: computed once
    assert kl._group_table.cache_info().misses == 1 and kl._group_table.cache_info().hits == distinct - 1
    assert kl._ort_table.cache_info().misses == 1


def test_inputs_are_never_modified(demo_set):
    hist = next(iter(demo_set.values()))
    counts, edges = hist.counts.copy(), hist.edges.copy()
    for method, options in EVERY_METHOD:
        compute_amax(hist, method, **options)
        compute_amax(hist.fold(), method, **options)
    np.testing.assert_array_equal(hist.counts, counts)
    np.testing.assert_array_equal(hist.edges, edges)


# --- KL curves --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_kl_curve_is_the_searched_curve(demo_set, variant):
    hist = list(demo_set.values())[3]
    thresholds, divergence = kl_curve(hist, variant=variant)
    assert thresholds.shape == divergence.shape and np.all(np.diff(thresholds) >= 0)  # ORT: last two share an edge
    best = thresholds[np.nanargmin(divergence)]
    amax = compute_amax(hist, variant=variant)
    if variant == "onnxruntime":  # the curve is float64; ORT's own float32 values may order near-ties differently
        assert abs(np.searchsorted(thresholds, amax) - np.searchsorted(thresholds, best)) <= 2
    else:
        assert amax == best
    assert np.all(divergence[np.isfinite(divergence)] > -1e-9)


# --- properties ---------------------------------------------------------------------------------------------------

histograms = st.builds(
    lambda counts, top, signed: Histogram(
        np.concatenate([counts[::-1], counts]) if signed else counts,
        np.linspace(-top if signed else 0.0, top, (2 if signed else 1) * counts.size + 1),
    ),
    arrays(np.int64, st.integers(1, 400), elements=st.sampled_from([0, 0, 0, 1, 2, 3, 10, 500, 100_000])),
    st.floats(1e-3, 1e4),
    st.booleans(),
)
quick = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@quick
@given(histograms)
def test_kl_amax_is_within_the_histogram_range(hist):
    assume(hist.total > 0)
    for variant in VARIANTS:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no stray numpy warnings either
            amax = compute_amax(hist, variant=variant)
        assert 0 < amax <= hist.edges[-1]


@quick
@given(histograms, st.floats(1e-3, 1e3))
def test_kl_amax_does_not_depend_on_the_count_unit(hist, scale):
    """tensorrt and modelopt normalize the distributions; onnxruntime truncates counts to int64 and smooths them
    with an absolute epsilon, so scaling its counts changes its answer by design (as in ORT)."""
    assume(hist.total > 0)
    scaled = Histogram(hist.counts * scale, hist.edges)
    for variant in ("tensorrt", "modelopt"):
        assert compute_amax(scaled, variant=variant) == compute_amax(hist, variant=variant)
