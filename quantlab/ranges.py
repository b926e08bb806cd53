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
from quantlab.npzfile import read_npz, write_npz

FORMAT_NAME = "quantlab-ranges"
FORMAT_VERSION = 2  # 2: no zero counts (the histogram pass counts zeros)
GROUPED = 4096  # values: a tensor this small is reduced together with the batch's other small tensors


class TensorRanges:
    """Running min, max and counts (values, NaN, Inf) of each tensor's values, finite values only for min/max.

    min and max are kept as scalars of the tensor's own dtype, so that the histogram edges built from them are the
    ones np.histogram computes for that data.
    """

    def __init__(self, names: list[str], metadata: dict[str, Any] | None = None) -> None:
        size = len(names)
        self.names = list(names)
        self.metadata = dict(metadata or {})
        self.dtypes: list[np.dtype | None] = [None] * size
        self.low: list[np.generic | None] = [None] * size
        self.high: list[np.generic | None] = [None] * size
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
        self._extend(i, low, high)
        self.count[i] += values.size
        return float(max(-low, high))

    def update_batch(self, batch: list[np.ndarray]) -> np.ndarray:
        """Add one batch of every tensor (flat, float, in `names` order); returns each tensor's max|x| in the batch.

        Small tensors of one dtype are reduced together in a few NumPy calls, since calling min and max per tensor
        would cost more than the reductions themselves (a model run one sample at a time has hundreds of small tensors
        per run)."""
        amax = np.zeros(len(batch))
        groups: dict[np.dtype, list[int]] = {}
        for i, values in enumerate(batch):
            if 0 < values.size <= GROUPED:
                groups.setdefault(values.dtype, []).append(i)
            else:
                amax[i] = self.update(i, values)
        for members in groups.values():
            sizes = [batch[i].size for i in members]
            starts = np.cumsum([0, *sizes[:-1]])
            joined = np.concatenate([batch[i] for i in members])
            lows, highs = np.minimum.reduceat(joined, starts), np.maximum.reduceat(joined, starts)
            finite = np.isfinite(lows) & np.isfinite(highs)
            amax[members] = np.where(finite, np.maximum(-lows, highs), 0)
            for k, i in enumerate(members):
                if finite[k]:
                    self.dtypes[i] = self.dtypes[i] or batch[i].dtype
                    self._extend(i, lows[k], highs[k])
                    self.count[i] += sizes[k]
                else:  # NaN or Inf: counted one by one
                    amax[i] = self.update(i, batch[i])
        return amax

    def _extend(self, i: int, low: np.generic, high: np.generic) -> None:
        self.low[i] = low if self.low[i] is None else min(self.low[i], low)
        self.high[i] = high if self.high[i] is None else max(self.high[i], high)

    def amax(self, i: int) -> np.generic:
        """max|x| of tensor i as a scalar of its dtype (0 when it had no finite value)."""
        if self.low[i] is None:
            return (self.dtypes[i] or np.dtype(np.float32)).type(0)
        return max(abs(self.low[i]), abs(self.high[i]))

    def digest(self) -> str:
        """A fingerprint of the binning ranges: histogram parts merge exactly only when theirs are equal."""
        text = json.dumps([self.names, [str(d) for d in self.dtypes], [repr(self.amax(i)) for i in range(len(self.names))]])
        return hashlib.sha256(text.encode()).hexdigest()

    def has_nonfinite(self, i: int) -> bool:
        return bool(self.nans[i] or self.infs[i])

    def stats(self, i: int) -> dict[str, Any]:
        """Keyword arguments for Histogram: min, max and the counts of tensor i."""
        return {
            "min": None if self.low[i] is None else float(self.low[i]),
            "max": None if self.high[i] is None else float(self.high[i]),
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
            for i in range(len(merged.names)):
                merged.dtypes[i] = merged.dtypes[i] or part.dtypes[i]
                if part.low[i] is not None:
                    merged._extend(i, part.low[i], part.high[i])
            for counter in ("count", "nans", "infs"):
                getattr(merged, counter)[:] += getattr(part, counter)
        samples = sum(part.metadata.get("data", {}).get("samples", 0) for part in parts)
        merged.metadata["data"] = {**merged.metadata.get("data", {}), "samples": samples, "shard": None, "merged_parts": len(parts)}
        return merged

    def save(self, path: str | Path) -> Path:
        """Write the ranges as one `.npz` (no pickle), atomically."""
        arrays = {
            "names": np.array(self.names, dtype=str),
            "dtypes": np.array([str(d or "float32") for d in self.dtypes], dtype=str),
            "min": np.array([np.nan if v is None else float(v) for v in self.low]),
            "max": np.array([np.nan if v is None else float(v) for v in self.high]),
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
            for i, dtype in enumerate(arrays["dtypes"]):
                ranges.dtypes[i] = np.dtype(str(dtype))
                if not np.isnan(arrays["min"][i]):
                    ranges.low[i] = ranges.dtypes[i].type(arrays["min"][i])
                    ranges.high[i] = ranges.dtypes[i].type(arrays["max"][i])
            for counter in ("count", "nans", "infs"):
                getattr(ranges, counter)[:] = arrays[counter]
        except (KeyError, ValueError, TypeError, IndexError):
            raise QuantlabError(f"{path}: ranges file is incomplete or corrupt") from None
        return ranges
