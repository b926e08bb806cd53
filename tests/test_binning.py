"""ExactBins gives np.histogram's counts to the last value: on every edge and its float neighbours, at zero, at the
range ends, across chunk and buffer boundaries, and on ranges where np.histogram's own edges are far from uniform."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quantlab.binning import ExactBins, Workspace
from quantlab.histogram import histogram_of

AMAXES = [1.0, 3.7, 0.1, 6.1e5, 1e-30, 1e-38, 1e-44, 0.0, 3e38, 1.7e38, "max"]
BINS = [1, 2, 3, 10, 4096, 4097, 131072]


def edge_values(amax: np.generic, bins: int, dtype: type, rng: np.random.Generator) -> np.ndarray:
    """Every edge, its two float neighbours, signed zeros, the range ends and random values, all within range."""
    edges = histogram_of(np.empty(0, dtype), bins, (-amax, amax))[1].astype(dtype)
    parts = [
        edges,
        np.nextafter(edges, np.inf, dtype=dtype),
        np.nextafter(edges, -np.inf, dtype=dtype),
        np.array([0.0, -0.0, 0.0, amax, -amax], dtype),
        (rng.uniform(-1, 1, 5000) * amax).astype(dtype),
        (rng.standard_cauchy(5000) * amax / 50).astype(dtype),
    ]
    values = np.concatenate(parts)
    values = values[np.isfinite(values) & (np.abs(values) <= amax)]
    return rng.permutation(values)


def by_edges(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """np.histogram's documented rule: each bin holds [left edge, right edge), the last one its right edge too."""
    bins = edges.size - 1
    return np.bincount(np.clip(np.searchsorted(edges, values, side="right") - 1, 0, bins - 1), minlength=bins)


def np_histogram_keeps_its_rule(binner: ExactBins, amax: np.generic) -> bool:
    """np.histogram follows its rule unless the range's width overflows the values' dtype, or its own edges are so
    far from uniform (float32 ranges among the subnormals) that its estimate misses by more than a bin."""
    with np.errstate(over="ignore"):
        return bool(np.isfinite(amax - (-amax))) and not binner.search_all


def count(values: np.ndarray, amax: np.generic, bins: int, chunk: int = 1 << 16, batch: int | None = None) -> ExactBins:
    binner = ExactBins(amax, bins, values.dtype, buffer_size=3000, workspace=Workspace(chunk))
    step = batch or max(values.size, 1)
    for start in range(0, values.size, step):
        binner.add(values[start : start + step])
    binner.flush()
    return binner


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the extreme ranges overflow numpy's own edge arithmetic
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("amax", AMAXES)
@pytest.mark.parametrize("bins", BINS)
def test_counts_and_edges_equal_np_histogram(dtype: type, amax: float | str, bins: int) -> None:
    amax = np.finfo(dtype).max if amax == "max" else dtype(amax)
    try:
        edges = histogram_of(np.empty(0, dtype), bins, (-amax, amax))[1]
    except ValueError:  # np.histogram cannot make that many distinct edges over the range at all
        pytest.skip("np.histogram refuses this range and bin count")
    values = edge_values(amax, bins, dtype, np.random.default_rng(bins))
    binner = count(values, amax, bins)
    np.testing.assert_array_equal(binner.edges, edges)
    np.testing.assert_array_equal(binner.counts, by_edges(values, edges))
    if np_histogram_keeps_its_rule(binner, amax):
        np.testing.assert_array_equal(binner.counts, histogram_of(values, bins, (-amax, amax))[0])
    assert binner.counts.sum() == values.size
    assert binner.zeros == np.count_nonzero(values == 0)


@pytest.mark.parametrize("chunk, batch", [(7, None), (1 << 16, 100), (1000, 2999), (64, 5000)])
def test_chunking_and_small_batch_gathering_do_not_change_counts(chunk: int, batch: int | None) -> None:
    values = edge_values(np.float32(2.5), 2048, np.float32, np.random.default_rng(0))
    expected = histogram_of(values, 2048, (np.float32(-2.5), np.float32(2.5)))[0]
    np.testing.assert_array_equal(count(values, np.float32(2.5), 2048, chunk, batch).counts, expected)


def test_relu_like_data_with_many_exact_zeros() -> None:
    rng = np.random.default_rng(3)
    values = np.maximum(rng.standard_normal(200_000).astype(np.float32), 0)
    amax = values.max()
    expected = histogram_of(values, 4096, (-amax, amax))[0]
    binner = count(values, amax, 4096)
    np.testing.assert_array_equal(binner.counts, expected)
    assert binner.zeros == np.count_nonzero(values == 0) > 90_000


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@settings(max_examples=150, deadline=None)
@given(
    amax=st.floats(min_value=0, max_value=float(np.finfo(np.float32).max), allow_subnormal=True, width=32),
    bins=st.integers(1, 70000),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_float32_range_and_bin_count(amax: float, bins: int, seed: int) -> None:
    amax = np.float32(amax)
    try:
        edges = histogram_of(np.empty(0, np.float32), bins, (-amax, amax))[1]
    except ValueError:
        return
    values = edge_values(amax, bins, np.float32, np.random.default_rng(seed))[:20000]
    binner = count(values, amax, bins)
    np.testing.assert_array_equal(binner.counts, by_edges(values, edges))
    if np_histogram_keeps_its_rule(binner, amax):
        np.testing.assert_array_equal(binner.counts, histogram_of(values, bins, (-amax, amax))[0])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("amax", [1.0, 3.7, 6.1e5, 1e-30])
@pytest.mark.parametrize("bins", [2, 3, 10, 4096, 2000, 4097])
def test_rectified_counts_are_those_of_the_relu_of_the_values(dtype: type, amax: float, bins: int) -> None:
    """With an edge exactly at 0, max(x, 0) binned over the same edges is the counts with the negative bins moved to
    the bin of 0; without one (odd bin counts), rectifiable() says so."""
    amax = dtype(amax)
    values = edge_values(amax, bins, dtype, np.random.default_rng(bins))
    binner = count(values, amax, bins)
    edges = histogram_of(np.empty(0, dtype), bins, (-amax, amax))[1]
    assert binner.rectifiable() == bool(np.any(edges == 0))
    if not binner.rectifiable():
        assert bins % 2 == 1
        return
    relu = np.maximum(values, dtype(0))
    counts, zeros = binner.rectified()
    np.testing.assert_array_equal(counts, by_edges(relu, edges))
    assert zeros == np.count_nonzero(relu == 0)
