"""TensorRanges: a batch of every tensor at once gives exactly the per-tensor min, max and counts."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from quantlab.ranges import GROUPED, TensorRanges

SPECIAL = [np.nan, np.inf, -np.inf, 0.0, -0.0]


def batches(rng: np.random.Generator, tensors: int, rounds: int) -> list[list[np.ndarray]]:
    """Rounds of tensors of mixed sizes (empty, small, over GROUPED) and dtypes, some holding NaN, Inf or zeros."""
    dtypes = [np.float32 if i % 3 else np.float64 for i in range(tensors)]
    out = []
    for _ in range(rounds):
        batch = []
        for i in range(tensors):
            size = int(rng.choice([0, 1, 7, 300, GROUPED, GROUPED + 1, 3 * GROUPED]))
            values = (rng.standard_normal(size) * 10.0 ** rng.integers(-3, 4)).astype(dtypes[i])
            if size and rng.random() < 0.3:
                values[rng.integers(size)] = rng.choice(SPECIAL)
            batch.append(values)
        out.append(batch)
    return out


def assert_same(a: TensorRanges, b: TensorRanges) -> None:
    assert a.dtypes == b.dtypes
    assert [a.stats(i) for i in range(len(a.names))] == [b.stats(i) for i in range(len(b.names))]
    assert a.digest() == b.digest()


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), tensors=st.integers(1, 12), rounds=st.integers(1, 4))
def test_update_batch_equals_updating_tensor_by_tensor(seed: int, tensors: int, rounds: int) -> None:
    names = [f"t{i}" for i in range(tensors)]
    grouped, single = TensorRanges(names), TensorRanges(names)
    rounds_of = batches(np.random.default_rng(seed), tensors, rounds)
    for batch in rounds_of:
        grouped.update_batch(batch)
        for i, values in enumerate(batch):
            single.update(i, values)
    assert_same(grouped, single)
    for i in range(tensors):  # and both give the plain NumPy answer over all rounds
        values = np.concatenate([batch[i] for batch in rounds_of])
        finite = values[np.isfinite(values)]
        stats = grouped.stats(i)
        assert stats["count"] == finite.size
        assert stats["nan_count"] == np.isnan(values).sum() and stats["inf_count"] == np.isinf(values).sum()
        if finite.size:
            assert stats["min"] == finite.min() and stats["max"] == finite.max()
        else:
            assert stats["min"] is None and stats["max"] is None


def test_a_tensor_of_signed_zeros_has_max_abs_plus_zero():
    """-0.0 and 0.0 compare equal, so min and max may keep either: max|x| must still be +0.0, or two shards of the
    same data could fingerprint their ranges differently."""
    for values in ([-0.0, 0.0], [0.0, -0.0], [-0.0]):
        for update in ("update", "update_batch"):
            ranges = TensorRanges(["t"])
            batch = np.array(values, np.float32)
            ranges.update(0, batch) if update == "update" else ranges.update_batch([batch])
            assert repr(ranges.amax(0)) == repr(np.float32(0.0))
