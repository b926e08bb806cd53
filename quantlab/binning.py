"""Counting values into fixed uniform bins exactly as `np.histogram` does, at a fraction of its cost.

`np.histogram(values, bins, range=r)` puts a value in the bin whose edges (its own float edges, not ideal ones) enclose
it, the last bin including its right edge. `ExactBins` gives the same counts: an arithmetic estimate, shifted up by
more than its worst error (measured on the actual edges at set-up), names the true bin except for values whose estimate
falls within that shift of a bin boundary; only those few are settled against the edges. Collection calls it once per
tensor and batch, so the per-call cost is kept low too: small batches are gathered, and the work arrays are shared.
"""

from __future__ import annotations

import numpy as np

from quantlab.histogram import histogram_of

SMALL_BATCH = 8192  # values: a batch below this is gathered with others before counting (per-call cost dominates)


class Workspace:
    """Work arrays for counting one chunk, shared by every ExactBins used from one thread (memory: ~chunk x 14 bytes
    per working dtype, whatever the number of tensors)."""

    def __init__(self, chunk: int = 1 << 17) -> None:
        self.chunk = chunk
        self._arrays: dict[np.dtype, tuple[np.ndarray, ...]] = {}

    def arrays(self, dtype: np.dtype, size: int) -> tuple[np.ndarray, ...]:
        """(estimate, floor as float, floor as int32, ambiguous mask, non-zero mask) views of `size` entries."""
        if dtype not in self._arrays:
            chunk = self.chunk
            self._arrays[dtype] = (
                np.empty(chunk, dtype),
                np.empty(chunk, dtype),
                np.empty(chunk, np.int32),
                np.empty(chunk, bool),
                np.empty(chunk, bool),
            )
        return tuple(array[:size] for array in self._arrays[dtype])


class ExactBins:
    """Running counts of `np.histogram(values, bins, range=(-amax, amax))` over every batch passed to `add`.

    `dtype` is the values' dtype (it decides np.histogram's edges); `buffer_size` values of small batches are gathered
    before counting. Read `counts`, and `zeros` (exact zeros, which the same pass finds for free), after `flush()`.
    """

    def __init__(self, amax: np.generic, bins: int, dtype: np.dtype, buffer_size: int, workspace: Workspace) -> None:
        self.edges = histogram_of(np.empty(0, dtype), bins, (-amax, amax))[1]
        self._zero_edge = int(np.searchsorted(self.edges, 0))  # the first edge >= 0
        self.bins = bins
        self.workspace = workspace
        self.counts = np.zeros(bins, np.int64)
        self.zeros = 0
        self.buffer = np.empty(buffer_size, dtype)
        self.filled = 0
        edges = self.edges.astype(np.float64)
        with np.errstate(over="ignore"):
            width = edges[-1] - edges[0]
        # float32 arithmetic when the edges are float32 and nothing comes near overflow; float64 otherwise
        limit = np.finfo(np.float32).max / 4
        narrow = self.edges.dtype == np.float32 and width <= limit and bins / width <= limit
        self.work = np.dtype(np.float32 if narrow else np.float64)
        # estimate = x * scale + offset, i.e. (x - first edge) * scale + shift
        self.scale = self.work.type(bins / width)
        # How far, in bins, the actual edges stray from an ideal uniform grid, plus the arithmetic's own worst error:
        # three roundings (x * scale, the offset, their sum) of half an ulp of at most bins/2, bins/2 + 1 and bins + 1,
        # that is (bins + 1) * eps. Both doubled for margin; the estimate must exceed the true position by more than
        # their sum, and stays within 2 * shift above it.
        stray = np.abs((edges - edges[0]) * self.scale - np.arange(bins + 1)).max()
        shift = 2 * stray + 2 * (bins + 1) * np.finfo(self.work).eps
        self.offset = self.work.type(shift - edges[0] * float(self.scale))
        self.window = self.work.type(2 * shift)
        # No usable estimate (edges far from uniform among the subnormals, or a width beyond float64): search them all.
        self.search_all = not (np.isfinite(width) and shift <= 0.25)
        zero = np.zeros(1, dtype)
        if self.search_all:
            self.zero_settled = False
        else:
            estimate = self._estimate(zero)
            self.zero_settled = bool(estimate[0] == self._settle(zero, estimate)[0])

    def rectifiable(self) -> bool:
        """Whether an edge is exactly 0, so that the bins below it hold exactly the negative values."""
        return self._zero_edge < self.bins and self.edges[self._zero_edge] == 0

    def rectified(self) -> tuple[np.ndarray, int]:
        """Counts and zero count of max(x, 0) over the values counted (a Relu of them), binned over the same edges:
        the negative values become zeros. Exact only where `rectifiable()`, after `flush()`."""
        zero = self._zero_edge
        counts = self.counts.copy()
        negatives = int(counts[:zero].sum())
        counts[:zero] = 0
        counts[zero] += negatives
        return counts, self.zeros + negatives

    def add(self, values: np.ndarray) -> None:
        """Count one batch of finite values within the range."""
        if values.size >= SMALL_BATCH or values.size >= self.buffer.size:
            self._count(values)
            return
        if self.filled + values.size > self.buffer.size:
            self.flush()
        self.buffer[self.filled : self.filled + values.size] = values
        self.filled += values.size

    def flush(self) -> None:
        """Count what the buffer holds."""
        self._count(self.buffer[: self.filled])
        self.filled = 0

    def _estimate(self, values: np.ndarray) -> np.ndarray:
        return np.floor(values * self.scale + self.offset).astype(np.intp)

    def _settle(self, values: np.ndarray, estimate: np.ndarray) -> np.ndarray:
        """The true bins of values whose estimate is the true bin or the next one."""
        return np.minimum(estimate - (values < self.edges[estimate]), self.bins - 1)

    def _count(self, values: np.ndarray) -> None:
        if self.search_all:
            index = np.clip(np.searchsorted(self.edges, values, side="right") - 1, 0, self.bins - 1)
            self.counts += np.bincount(index, minlength=self.bins)
            self.zeros += values.size - np.count_nonzero(values)
            return
        for start in range(0, values.size, self.workspace.chunk):
            chunk = values[start : start + self.workspace.chunk]
            estimate, floor, index, ambiguous, nonzero = self.workspace.arrays(self.work, chunk.size)
            np.multiply(chunk, self.scale, out=estimate)
            estimate += self.offset
            np.floor(estimate, out=floor)
            index[...] = floor
            # The estimate is the true bin unless it lies within `window` above a boundary: then it may be one high.
            np.subtract(estimate, floor, out=estimate)
            np.less(estimate, self.window, out=ambiguous)
            np.not_equal(chunk, 0, out=nonzero)
            self.zeros += chunk.size - np.count_nonzero(nonzero)
            if self.zero_settled:  # exact zeros (half of a ReLU's output) all estimate the same, right, bin
                ambiguous &= nonzero
            unsure = np.flatnonzero(ambiguous)
            index[unsure] = self._settle(chunk[unsure], index[unsure].astype(np.intp))
            self.counts += np.bincount(index, minlength=self.bins)
