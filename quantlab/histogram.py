"""Histograms of activation tensors and the self-describing `.npz` file that holds them.

Two kinds share one class: *signed* histograms, symmetric around zero (what `collect` records and ONNX Runtime's
entropy calibrator uses) and *|x|* histograms with edges starting at 0 (TensorRT's and ModelOpt's convention).
A signed histogram of 2N bins over [-a, a] folds into the |x| histogram of N bins over [0, a].
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from quantlab.errors import QuantlabError
from quantlab.npzfile import read_npz, write_npz

FORMAT_NAME = "quantlab-histograms"
FORMAT_VERSION = 1
STAT_FIELDS = ("min", "max", "count", "zero_count", "nan_count", "inf_count")


@dataclass(eq=False)
class Histogram:
    """Bin counts of one tensor's values, with the statistics of the finite values they were built from.

    `counts` has N entries and `edges` N+1 ascending entries. `min`/`max` are the smallest and largest finite value
    seen; `count` the number of finite values (equal to `counts.sum()` for a collected histogram); `nan_count` and
    `inf_count` the values left out of the histogram.
    """

    counts: np.ndarray
    edges: np.ndarray
    min: float | None = None
    max: float | None = None
    count: int | None = None
    zero_count: int | None = None
    nan_count: int = 0
    inf_count: int = 0

    def __post_init__(self) -> None:
        counts = np.asarray(self.counts)
        edges = np.asarray(self.edges, dtype=np.float64)
        if counts.ndim != 1 or edges.ndim != 1 or counts.size == 0:
            raise QuantlabError("histogram counts and edges must be non-empty 1-D arrays")
        if edges.size != counts.size + 1:
            raise QuantlabError(f"histogram has {counts.size} counts but {edges.size} edges (expected {counts.size + 1})")
        if not np.all(np.isfinite(edges)) or np.any(np.diff(edges) <= 0):
            raise QuantlabError("histogram edges must be finite and strictly ascending")
        if not np.issubdtype(counts.dtype, np.number) or np.issubdtype(counts.dtype, np.complexfloating):
            raise QuantlabError(f"histogram counts must be real numbers, got dtype {counts.dtype}")
        if counts.dtype.kind == "f" and not np.all(np.isfinite(counts)):
            raise QuantlabError("histogram counts contain NaN or Inf")
        if counts.min() < 0:
            raise QuantlabError("histogram counts contain negative values")
        self.counts = counts
        self.edges = edges

    @classmethod
    def from_values(cls, values: Any, bins: int = 2048, signed: bool = True) -> Histogram:
        """Histogram of an array: signed (2*bins over [-max|x|, max|x|]) or |x| (bins over [0, max|x|])."""
        data = np.asarray(values)
        finite = data[np.isfinite(data)]
        amax = float(np.max(np.abs(finite))) if finite.size else 0.0
        if signed:
            counts, edges = histogram_of(finite, 2 * bins, (-amax, amax))
        else:
            counts, edges = histogram_of(np.abs(finite), bins, (0.0, amax))
        return cls(
            counts=counts,
            edges=edges,
            min=float(finite.min()) if finite.size else None,
            max=float(finite.max()) if finite.size else None,
            count=int(finite.size),
            zero_count=int(finite.size - np.count_nonzero(finite)),
            nan_count=int(np.isnan(data).sum()),
            inf_count=int(np.isinf(data).sum()),
        )

    @property
    def bins(self) -> int:
        return int(self.counts.size)

    @property
    def is_signed(self) -> bool:
        """True for a histogram that spans negative values (ONNX Runtime's convention)."""
        return bool(self.edges[0] < 0)

    @property
    def amax(self) -> float:
        """max|x| of the data when known, else the outermost edge."""
        if self.min is not None and self.max is not None:
            return float(max(abs(self.min), abs(self.max)))
        return float(max(abs(self.edges[0]), abs(self.edges[-1])))

    @property
    def total(self) -> float:
        return float(self.counts.sum())

    def fold(self) -> Histogram:
        """The |x| histogram: bins mirrored around zero added together (itself when already |x|).

        Equal to `np.histogram(|x|, N, (0, a))` but for values lying exactly on a bin edge, which the signed
        histogram puts in the bin to their right on both sides of zero.
        """
        if not self.is_signed:
            return self
        half = self.bins // 2
        if self.bins % 2 or not np.isclose(self.edges[0], -self.edges[-1]) or not np.isclose(self.edges[half], 0.0):
            raise QuantlabError("only a histogram symmetric around zero with an even number of bins can be folded")
        folded = self.counts[half:] + self.counts[:half][::-1]
        edges = np.abs(self.edges[half:])
        edges[0] = 0.0
        return Histogram(folded, edges, self.min, self.max, self.count, self.zero_count, self.nan_count, self.inf_count)

    def stats(self) -> dict[str, float | int | None]:
        return {name: getattr(self, name) for name in STAT_FIELDS}


def histogram_of(values: np.ndarray, bins: int, value_range: tuple) -> tuple[np.ndarray, np.ndarray]:
    """`np.histogram(values, bins, range=value_range)`, in float64 where the values' own float type cannot hold the
    range's width (a float32 max|x| beyond half float32's max, e.g. an attention mask of -3.4e38: np.histogram's
    arithmetic overflows, to NaN bin indices) or `bins` distinct edges over it (a float32 max|x| among the
    subnormals, e.g. 1e-44: np.histogram refuses those)."""
    low, high = map(float, value_range)
    if not (np.issubdtype(values.dtype, np.floating) and high - low > float(np.finfo(values.dtype).max)):
        try:
            return np.histogram(values, bins=bins, range=value_range)
        except ValueError:
            pass
    return np.histogram(np.asarray(values, np.float64), bins=bins, range=(low, high))


def _combine_stats(parts: list[Histogram]) -> dict[str, Any]:
    def pick(name: str, reduce):
        values = [getattr(h, name) for h in parts if getattr(h, name) is not None]
        return reduce(values) if values else None

    return {
        "min": pick("min", min),
        "max": pick("max", max),
        "count": pick("count", sum),
        "zero_count": pick("zero_count", sum),
        "nan_count": sum(h.nan_count for h in parts),
        "inf_count": sum(h.inf_count for h in parts),
    }


@dataclass(eq=False)
class HistogramSet(Mapping):
    """Tensor name -> Histogram, in graph order, with the metadata that says where they came from."""

    histograms: dict[str, Histogram]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Histogram:
        try:
            return self.histograms[name]
        except KeyError:
            raise KeyError(f"no histogram for tensor {name!r}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.histograms)

    def __len__(self) -> int:
        return len(self.histograms)

    def __repr__(self) -> str:
        bins = self.metadata.get("bins", "?")
        return f"HistogramSet({len(self)} tensors, bins={bins}, model={self.metadata.get('model_name', '?')})"

    def _repr_html_(self) -> str:
        from quantlab.notebook import histograms_html

        return histograms_html(self)

    def to_pandas(self):
        """One row per tensor, indexed by name (needs pandas)."""
        from quantlab.notebook import histograms_frame

        return histograms_frame(self)

    def min_max(self, names: Container[str] | None = None) -> dict[str, tuple[float, float]]:
        """Tensor name -> (smallest, largest) finite value seen, for every tensor where both are known (of `names`
        only, where given: e.g. the tensors a threshold table holds): what an asymmetric (uint8) range needs beside a
        threshold (`Thresholds.min_max`)."""
        return {
            name: (hist.min, hist.max)
            for name, hist in self.histograms.items()
            if None not in (hist.min, hist.max) and (names is None or name in names)
        }

    def save(self, path: str | Path) -> Path:
        """Write one `.npz` (no pickle) atomically: counts, edges and statistics stacked per tensor, JSON metadata."""
        names = list(self.histograms)
        if not names:
            raise QuantlabError("refusing to save an empty histogram set")
        sizes = {self.histograms[n].bins for n in names}
        if len(sizes) != 1:
            raise QuantlabError(f"all histograms in a file must have the same number of bins, got {sorted(sizes)}")
        hists = [self.histograms[n] for n in names]
        arrays: dict[str, np.ndarray] = {
            "names": np.array(names, dtype=str),
            "counts": np.stack([h.counts for h in hists]).astype(np.int64),
            "edges": np.stack([h.edges for h in hists]),
        }
        for name in STAT_FIELDS:
            values = [getattr(h, name) for h in hists]
            missing = np.array([v is None for v in values])
            arrays[name] = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
            arrays[name][missing] = np.nan
        return write_npz(path, FORMAT_NAME, FORMAT_VERSION, self.metadata, arrays)

    @classmethod
    def merge(cls, parts: Iterable[HistogramSet]) -> HistogramSet:
        """Add the counts of parts collected over the same ranges (exact: counts are additive).

        Parts must come from the same model, bins and ranges (`collect(..., ranges=...)`); a shard given twice is
        refused, since its samples would count double.
        """
        parts = list(parts)
        if not parts:
            raise QuantlabError("nothing to merge")
        for key, what in (("model_sha256", "models"), ("bins", "bin counts"), ("ranges_digest", "ranges")):
            values = {str(part.metadata.get(key)) for part in parts}
            if len(values) > 1:
                raise QuantlabError(f"cannot merge histograms of different {what}; collect every part with the same --ranges")
        shards = [shard for part in parts for shard in _shards_of(part)]
        if len(shards) != len(set(shards)):
            twice = next(s for s in shards if shards.count(s) > 1)
            raise QuantlabError(f"shard {twice[0]}/{twice[1]} is given more than once")
        names = list(parts[0])
        for i, part in enumerate(parts[1:], start=1):
            if list(part) != names:
                raise QuantlabError(f"part {i} holds other tensors than part 0; cannot merge")
        merged: dict[str, Histogram] = {}
        for name in names:
            hists = [part[name] for part in parts]
            if any(h.bins != hists[0].bins or not np.array_equal(h.edges, hists[0].edges) for h in hists):
                raise QuantlabError(f"tensor {name!r} was histogrammed over different ranges in different parts")
            merged[name] = Histogram(sum(h.counts for h in hists), hists[0].edges, **_combine_stats(hists))
        metadata = {key: value for key, value in parts[0].metadata.items() if key != "seconds"}
        metadata["data"] = {
            "merged_parts": sum(part.metadata.get("data", {}).get("merged_parts", 1) for part in parts),
            "samples": sum(part.metadata.get("data", {}).get("samples", 0) for part in parts),
            "shards": sorted(shards),
        }
        return cls(merged, metadata)


def _shards_of(part: HistogramSet) -> list[tuple[int, int]]:
    """The shards a part holds: its own (`collect(..., shard=)`) or, for an earlier merge, every shard merged into it."""
    data = part.metadata.get("data", {})
    if data.get("shard"):
        return [tuple(data["shard"])]
    return [tuple(shard) for shard in data.get("shards", [])]


def load_histograms(path: str | Path) -> HistogramSet:
    """Read a histogram file written by `quantlab collect` (validates its format and every histogram)."""
    arrays, meta = read_npz(path, FORMAT_NAME, FORMAT_VERSION, "histogram", "collect again")
    try:
        names = arrays["names"]
        counts, edges = arrays["counts"], arrays["edges"]
        stats = {name: arrays[name] for name in STAT_FIELDS}
    except KeyError as exc:
        raise QuantlabError(f"{path}: histogram file is missing array {exc}") from None
    if names.ndim != 1 or names.dtype.kind != "U":
        raise QuantlabError(f"{path}: 'names' is not a list of tensor names")
    names = [str(name) for name in names]
    if len(set(names)) != len(names):
        raise QuantlabError(f"{path}: tensor {next(n for n in names if names.count(n) > 1)!r} appears twice")
    for key, array in {"counts": counts, "edges": edges, **stats}.items():
        if array.dtype.kind not in "iuf":
            raise QuantlabError(f"{path}: array {key!r} does not hold numbers (dtype {array.dtype})")
        if key in STAT_FIELDS and np.isinf(array).any():  # NaN stands for "unknown"; Inf is never a statistic
            raise QuantlabError(f"{path}: array {key!r} holds an infinite value")
    n = len(names)
    if counts.ndim != 2 or edges.ndim != 2 or counts.shape[0] != n or edges.shape[0] != n:
        raise QuantlabError(f"{path}: histogram arrays do not match the {n} tensor names")
    if any(np.shape(v) != (n,) for v in stats.values()):
        raise QuantlabError(f"{path}: statistics arrays do not match the {n} tensor names")

    def stat(name: str, i: int, kind: type):
        value = stats[name][i]
        return None if np.isnan(value) else kind(value)

    histograms: dict[str, Histogram] = {}
    for i, name in enumerate(names):
        try:
            histograms[name] = Histogram(
                counts[i],
                edges[i],
                min=stat("min", i, float),
                max=stat("max", i, float),
                count=stat("count", i, int),
                zero_count=stat("zero_count", i, int),
                nan_count=stat("nan_count", i, int) or 0,
                inf_count=stat("inf_count", i, int) or 0,
            )
        except QuantlabError as exc:
            raise QuantlabError(f"{path}: tensor {name!r}: {exc}") from None
    return HistogramSet(histograms, meta)
