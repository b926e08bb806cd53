"""Per-tensor ranges: what collect's first pass finds, and the file that lets shards share it.

Histograms of several shards add up exactly to the histogram of all the data only when every shard bins over the same
range; `quantlab collect --ranges-only` writes that range once, and each `--shard I/N` run reads it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from quantlab.errors import QuantlabError
from quantlab.lanes import Lanes
from quantlab.npzfile import read_npz, write_npz

FORMAT_NAME = "quantlab-ranges"
FORMAT_VERSION = 2  # 2: no zero counts (the histogram pass counts zeros)
GROUPED = 4096  # values: a tensor this small is reduced together with the batch's other small tensors


class TensorRanges:
    """Running min, max and counts (values, NaN, Inf) of each tensor's values, finite values only for min/max.

    min and max are kept in float64, which holds every float32 and float64 value exactly; `amax` gives max|x| back as
    a scalar of the tensor's own dtype, so that the histogram edges built from it are the ones np.histogram computes
    for that data. A tensor without finite values has count 0 (and min +inf, max -inf).
    """

    def __init__(self, names: list[str], metadata: dict[str, Any] | None = None) -> None:
        size = len(names)
        self.names = list(names)
        self.metadata = dict(metadata or {})
        self.dtypes: list[np.dtype | None] = [None] * size
        self.low = np.full(size, np.inf)
        self.high = np.full(size, -np.inf)
        self.count = np.zeros(size, np.int64)
        self.nans = np.zeros(size, np.int64)
        self.infs = np.zeros(size, np.int64)

    def update(self, i: int, values: np.ndarray) -> float:
        """Add one batch of tensor i's values (flat, float); returns the batch's max|x| (0 without finite values)."""
        self.dtypes[i] = self.dtypes[i] or values.dtype
        if values.size == 0:
            return 0.0
        low, high = values.min(), values.max()
        if not (np.isfinite(low) and np.isfinite(high)):
            self.nans[i] += np.count_nonzero(np.isnan(values))
            self.infs[i] += np.count_nonzero(np.isinf(values))
            values = values[np.isfinite(values)]
            if values.size == 0:
                return 0.0
            low, high = values.min(), values.max()
        self.low[i] = min(self.low[i], low)
        self.high[i] = max(self.high[i], high)
        self.count[i] += values.size
        return float(max(-low, high))

    def update_batch(self, batch: list[np.ndarray], lanes: Lanes | None = None) -> np.ndarray:
        """Add one batch of every tensor (flat, float, in `names` order); returns each tensor's max|x| in the batch.

        Small tensors of one dtype are reduced together in a few NumPy calls, since calling min and max per tensor
        would cost more than the reductions themselves (a model run one sample at a time has hundreds of small tensors
        per run); the large ones are reduced one by one, spread over `lanes` where given."""
        amax = np.zeros(len(batch))
        groups: dict[np.dtype, list[int]] = {}
        large = []
        for i, values in enumerate(batch):
            if 0 < values.size <= GROUPED:
                groups.setdefault(values.dtype, []).append(i)
                self.dtypes[i] = self.dtypes[i] or values.dtype
            else:
                large.append(i)

        def reduce(lane: int, members: list[int]) -> None:
            for i in members:  # each tensor's own entries: lanes never write the same one
                amax[i] = self.update(i, batch[i])

        if lanes is None:
            reduce(0, large)
        else:
            lanes.run(reduce, lanes.split(large, [batch[i].size for i in large]))
        for members in groups.values():
            sizes = np.array([batch[i].size for i in members])
            joined = np.concatenate([batch[i] for i in members])
            starts = np.cumsum(sizes) - sizes
            lows, highs = np.minimum.reduceat(joined, starts), np.maximum.reduceat(joined, starts)
            finite = np.isfinite(lows) & np.isfinite(highs)
            index = np.array(members)
            taken = index[finite]
            self.low[taken] = np.minimum(self.low[taken], lows[finite])
            self.high[taken] = np.maximum(self.high[taken], highs[finite])
            self.count[taken] += sizes[finite]
            amax[taken] = np.maximum(-lows[finite], highs[finite])
            for i in index[~finite]:  # NaN or Inf: counted one by one
                amax[i] = self.update(int(i), batch[i])
        return amax

    def amax(self, i: int) -> np.generic:
        """max|x| of tensor i as a scalar of its dtype (0 when it had no finite value)."""
        dtype = self.dtypes[i] or np.dtype(np.float32)
        return dtype.type(max(abs(self.low[i]), abs(self.high[i])) if self.count[i] else 0)  # abs: never -0.0

    def digest(self) -> str:
        """A fingerprint of the binning ranges: histogram parts merge exactly only when theirs are equal."""
        text = json.dumps([self.names, [str(d) for d in self.dtypes], [repr(self.amax(i)) for i in range(len(self.names))]])
        return hashlib.sha256(text.encode()).hexdigest()

    def has_nonfinite(self, i: int) -> bool:
        return bool(self.nans[i] or self.infs[i])

    def stats(self, i: int) -> dict[str, Any]:
        """Keyword arguments for Histogram: min, max and the counts of tensor i."""
        return {
            "min": float(self.low[i]) if self.count[i] else None,
            "max": float(self.high[i]) if self.count[i] else None,
            "count": int(self.count[i]),
            "nan_count": int(self.nans[i]),
            "inf_count": int(self.infs[i]),
        }

    @classmethod
    def merge(cls, parts: Iterable[TensorRanges]) -> TensorRanges:
        """Ranges of all the parts' data together: min of mins, max of maxes, counts added."""
        parts = list(parts)
        if not parts:
            raise QuantlabError("nothing to merge")
        merged = cls(parts[0].names, parts[0].metadata)
        for part in parts:
            if part.names != merged.names:
                raise QuantlabError("cannot merge ranges of different tensors (another model or --tensors filter?)")
            merged.dtypes = [mine or theirs for mine, theirs in zip(merged.dtypes, part.dtypes)]
            merged.low = np.minimum(merged.low, part.low)
            merged.high = np.maximum(merged.high, part.high)
            for counter in ("count", "nans", "infs"):
                getattr(merged, counter)[:] += getattr(part, counter)
        samples = sum(part.metadata.get("data", {}).get("samples", 0) for part in parts)
        # the first part's data summary, less what holds for that part alone (a loader's digests of its samples)
        data = {key: value for key, value in merged.metadata.get("data", {}).items() if key != "digests"}
        merged.metadata["data"] = {**data, "samples": samples, "shard": None, "merged_parts": len(parts)}
        return merged

    def save(self, path: str | Path) -> Path:
        """Write the ranges as one `.npz` (no pickle), atomically."""
        arrays = {
            "names": np.array(self.names, dtype=str),
            "dtypes": np.array([str(d or "float32") for d in self.dtypes], dtype=str),
            "min": np.where(self.count > 0, self.low, np.nan),
            "max": np.where(self.count > 0, self.high, np.nan),
            "count": self.count,
            "nans": self.nans,
            "infs": self.infs,
        }
        return write_npz(path, FORMAT_NAME, FORMAT_VERSION, self.metadata, arrays)

    @classmethod
    def load(cls, path: str | Path) -> TensorRanges:
        """Read a ranges file written by `quantlab collect --ranges-only`."""
        arrays, meta = read_npz(path, FORMAT_NAME, FORMAT_VERSION, "ranges", "collect the ranges again")
        try:
            names = [str(n) for n in arrays["names"]]
            ranges = cls(names, meta)
            ranges.dtypes = [np.dtype(str(dtype)) for dtype in arrays["dtypes"]]
            for counter in ("count", "nans", "infs"):
                getattr(ranges, counter)[:] = arrays[counter]
            seen = ranges.count > 0
            low, high = np.asarray(arrays["min"], np.float64)[seen], np.asarray(arrays["max"], np.float64)[seen]
            if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high)) and np.all(low <= high)):
                raise ValueError("min/max missing where values were counted")
            ranges.low[seen], ranges.high[seen] = low, high
        except (KeyError, ValueError, TypeError, IndexError):
            raise QuantlabError(f"{path}: ranges file is incomplete or corrupt") from None
        return ranges
