"""The fast searches give exactly the thresholds of the plain ones.

- MSE: the error-table search (a matrix product bounds every candidate, the near ones are scored with ModelOpt's
  float32 steps) against scoring every candidate that way, the search as it was before the table: collected
  histograms of many shapes and bin counts, random counts, huge counts, ranges far from 1, other bit widths, unsigned,
  start bins and strides, and hypothesis' histograms. (The comparison with ModelOpt itself is in
  test_kl_references.py; every tensor of the five real models' histograms was checked against the plain search too.)
- Histograms computed together (`kl.amaxes`, `mse.amaxes`, `calibrate`'s batches, shared histograms computed once)
  against one at a time.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantlab.calibration import calibrate, compute_amax, kl, mse
from quantlab.histogram import Histogram, HistogramSet

RNG_SEED = 20261206


def plain_mse(hist: Histogram, num_bits: int = 8, unsigned: bool = False, start_bin: int = 128, stride: int = 1) -> float:
    """MSE by scoring every candidate on every bin (mse._errors over all candidates): the search without the table."""
    bound, low, start_bin, stride = mse._options(num_bits, unsigned, start_bin, stride)
    weights, centers, first, shift = mse._prepared(hist, start_bin)
    best = mse._best(weights, centers, np.arange(first, centers.size, stride), bound, low)
    return float(np.ldexp(np.float64(centers[best]), shift))


def shapes(rng: np.random.Generator, size: int) -> dict[str, np.ndarray]:
    return {
        "gaussian": rng.normal(size=size),
        "relu": np.maximum(rng.normal(size=size), 0),
        "heavy-tailed": rng.standard_t(2, size=size),
        "laplace": rng.laplace(size=size),
        "discrete": np.maximum(rng.integers(-3, 6, size // 10), 0) * 0.25,
        "far-outlier": np.append(rng.normal(size=size), 300.0),
        "far-from-zero": rng.uniform(3, 4, size // 10),
        "uniform": rng.uniform(-1, 1, size),
        "gelu-like": rng.normal(size=size) * (rng.random(size) > 0.3),
    }


def collected_cases() -> dict[str, Histogram]:
    rng = np.random.default_rng(RNG_SEED)
    cases = {}
    for bins in (100, 129, 256, 1000, 2048):
        for name, values in shapes(rng, 20_000).items():
            scale = float(rng.choice([1e-6, 0.01, 1.0, 37.0, 3e5]))
            values = (values * scale).astype(np.float32)
            cases[f"{name} x{scale:g} {bins} bins"] = Histogram.from_values(values, bins)
            cases[f"|{name}| x{scale:g} {bins} bins"] = Histogram.from_values(np.abs(values), bins, signed=False)
    return cases


def counted_cases() -> dict[str, Histogram]:
    rng = np.random.default_rng(RNG_SEED + 1)
    cases = {}
    for bins in (300, 2048):
        for top in (1.0, 2.0**-40, 3.5e9, 2.0**70, 3.4e38):
            counts = rng.poisson(rng.gamma(0.5, 50, bins))
            cases[f"poisson {bins} top {top:g}"] = Histogram(counts, np.linspace(0.0, top, bins + 1))
        sparse = np.zeros(bins, dtype=np.int64)
        sparse[rng.choice(bins, 7, replace=False)] = rng.integers(1, 10**6, 7)
        cases[f"sparse {bins}"] = Histogram(sparse, np.linspace(0.0, 5.0, bins + 1))
        huge = rng.integers(0, 2**62, bins)
        cases[f"huge counts {bins}"] = Histogram(huge, np.linspace(0.0, 1.0, bins + 1))
        uneven = np.sort(rng.uniform(0, 4, bins + 1))
        uneven[0] = 0.0
        cases[f"uneven edges {bins}"] = Histogram(rng.integers(0, 100, bins), uneven)
    return cases


@pytest.fixture(scope="module")
def cases() -> dict[str, Histogram]:
    return {**collected_cases(), **counted_cases()}


def test_mse_is_the_plain_search_on_every_case(cases):
    hists = list(cases.values())
    fast = mse.amaxes(hists)
    for (name, hist), value in zip(cases.items(), fast):
        assert value == plain_mse(hist), name
        assert compute_amax(hist, "mse") == value, name


@pytest.mark.parametrize(
    "options",
    [{"num_bits": 4}, {"num_bits": 7}, {"unsigned": True}, {"num_bits": 12}, {"start_bin": 0}, {"start_bin": 700},
     {"stride": 3}, {"stride": 17, "start_bin": 5}],
)
def test_mse_options_are_the_plain_search(cases, options):
    hists = [hist for name, hist in cases.items() if "1000 bins" in name or "2048" in name]
    for hist, value in zip(hists, mse.amaxes(hists, **options)):
        assert value == plain_mse(hist, **options)


def test_mse_table_is_used_on_collected_histograms(monkeypatch, cases):
    scored = []
    monkeypatch.setattr(mse, "_near", lambda *args: scored.append(1) or np.arange(args[3].size))
    mse.amaxes([hist for name, hist in cases.items() if name.endswith("2048 bins")])
    assert len(scored) == sum(name.endswith("2048 bins") for name in cases)


def test_mse_table_scores_few_candidates_in_float32(cases):
    widths = []
    original = mse._near
    try:
        mse._near = lambda *args: (widths.append(original(*args).size), original(*args))[1]
        mse.amaxes([hist for name, hist in cases.items() if name.endswith("2048 bins")])
    finally:
        mse._near = original
    assert np.median(widths) <= 40 and max(widths) < 1920  # of 1920 candidates


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    counts=st.lists(st.integers(0, 10**9), min_size=129, max_size=700),
    exponent=st.integers(-60, 60),
    unsigned=st.booleans(),
    start_bin=st.sampled_from([0, 1, 64, 128]),
)
def test_mse_matches_the_plain_search_on_arbitrary_histograms(counts, exponent, unsigned, start_bin):
    counts = np.array(counts, dtype=np.int64)
    if not counts.any():
        counts[-1] = 1
    hist = Histogram(counts, np.linspace(0.0, np.ldexp(1.0, exponent), counts.size + 1))
    assert mse.amax(hist, unsigned=unsigned, start_bin=start_bin) == plain_mse(hist, unsigned=unsigned, start_bin=start_bin)


@pytest.mark.parametrize("variant", list(kl.VARIANTS))
def test_kl_together_is_kl_one_at_a_time(cases, variant):
    hists = [hist for name, hist in cases.items() if "x37" in name or "x0.01" in name]
    assert len({hist.bins for hist in hists}) > 2
    assert kl.amaxes(hists, variant=variant) == [kl.amax(hist, variant=variant) for hist in hists]


def test_calibrate_computes_a_shared_histogram_once_and_keeps_the_order(cases, monkeypatch):
    picked = [hist for name, hist in cases.items() if name.startswith(("gaussian", "relu"))]
    histograms = HistogramSet({f"t{i}": hist for i, hist in enumerate(picked)} | {"shared": picked[0]}, {})
    seen = []
    batched = dict(calibrate.__globals__["BATCHED"])
    monkeypatch.setitem(calibrate.__globals__["BATCHED"], "mse", lambda hists, **o: seen.append(len(hists)) or batched["mse"](hists, **o))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        amaxes = calibrate(histograms, "mse")
    assert list(amaxes) == list(histograms) and seen == [len(picked)]
    assert amaxes["shared"] == amaxes["t0"] == compute_amax(picked[0], "mse")
    for name, hist in histograms.items():
        assert amaxes[name] == compute_amax(hist, "mse")


def test_calibrate_names_the_tensor_of_an_error_raised_in_a_batch():
    hists = {"good": Histogram(np.array([1, 2, 3] * 100), np.linspace(-1, 1, 301)),
             "fractional": Histogram(np.array([0.5] * 300), np.linspace(-1, 1, 301))}
    with pytest.raises(Exception, match="tensor 'fractional'.*integer counts"):
        calibrate(HistogramSet(hists, {}), "kl", variant="onnxruntime")
