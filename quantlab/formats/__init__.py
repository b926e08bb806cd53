"""Threshold files: one `Thresholds` object, read from and written to every format quantlab knows.

A threshold file maps activation tensor names to amax, the clipping threshold of symmetric INT8 quantization
(scale = amax / 127), and may hold beside it each tensor's smallest and largest value over the calibration data, which
asymmetric (uint8) ranges need: [max(min, -amax), min(max, amax)]. Formats, each one reader and one writer registered
in `formats()`:

- `trt-cache` (`.cache`): TensorRT calibration cache, for `trtexec --calib=` and `IInt8Calibrator`; see `trt_cache`.
- `json` (`.json`): quantlab's own table, amax in full float64 precision, min/max and free-form metadata; see `table`.
- `ort-table` (`.flatbuffers`): the calibration table ONNX Runtime's TensorRT execution provider reads; see `table`.

`Q/DQ` export lives in `formats/qdq.py` and is not a threshold file.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from quantlab.errors import QuantlabError

# amax ratios beyond these count as "differs by more than 1% / 10%" in `diff_thresholds`.
DIFF_LEVELS = (1.01, 1.10)


@dataclass
class Thresholds:
    """Per-tensor amax plus metadata describing where they came from, and the tensors' observed min/max.

    `amax` keeps insertion (file) order; every value is a float >= 0, and +inf is allowed because TensorRT itself
    writes infinite scales. `metadata` is format specific: for a TensorRT cache `header`, `trt_version`,
    `trt_version_code` and `algorithm`; for a JSON table its `method`, `variant`, `options`, `source` and any other
    top-level keys; empty for an ONNX Runtime table. `min_max` maps a tensor to the smallest and largest finite value
    it took over the calibration data (`HistogramSet.min_max()`); only the JSON table stores it (TensorRT caches and
    ONNX Runtime tables hold amax alone), and a tensor without it gets the symmetric range [-amax, amax].
    """

    amax: dict[str, float]
    metadata: dict[str, Any] = field(default_factory=dict)
    min_max: dict[str, tuple[float, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        checked = {}
        for name, value in self.amax.items():
            if not isinstance(name, str) or not name:
                raise QuantlabError(f"tensor names must be non-empty strings, got {name!r}")
            try:
                amax = float(value)
            except (TypeError, ValueError):
                raise QuantlabError(f"tensor {name!r}: amax must be a number, got {value!r}") from None
            if math.isnan(amax) or amax < 0:
                raise QuantlabError(f"tensor {name!r}: amax must be >= 0, got {amax!r}")
            checked[name] = amax + 0.0  # -0.0 -> 0.0, so no writer ever emits a negative zero
        self.amax = checked
        self.min_max = {name: _checked_min_max(name, pair) for name, pair in self.min_max.items()}


def _checked_min_max(name: str, pair: Any) -> tuple[float, float]:
    """A tensor's (min, max) as two finite floats, min <= max; a one-line `QuantlabError` naming the tensor otherwise."""
    try:
        low, high = (float(value) for value in pair)
    except (TypeError, ValueError):
        raise QuantlabError(f"tensor {name!r}: min_max must be two numbers [min, max], got {pair!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low <= high):
        raise QuantlabError(f"tensor {name!r}: min_max must be finite with min <= max, got [{low!r}, {high!r}]")
    return low + 0.0, high + 0.0


class ThresholdFormat(NamedTuple):
    """One file format: its name, the extensions that select it, and its reader and writer."""

    name: str
    extensions: tuple[str, ...]
    read: Callable[[Path], Thresholds]
    write: Callable[..., None]


@functools.cache
def formats() -> dict[str, ThresholdFormat]:
    """The format registry, the one place a format is added. Imported lazily so `quantlab.formats` stays light."""
    from quantlab.formats import table, trt_cache

    return {
        fmt.name: fmt
        for fmt in (
            ThresholdFormat("trt-cache", (".cache",), trt_cache.read_cache, trt_cache.write_cache),
            ThresholdFormat("json", (".json",), table.read_json_table, table.write_json_table),
            ThresholdFormat("ort-table", (".flatbuffers",), table.read_ort_table, table.write_ort_table),
        )
    }


def read_bytes(path: str | os.PathLike, size: int = -1) -> bytes:
    """The file's first `size` bytes (all by default), or a one-line `QuantlabError` naming what is wrong with it."""
    try:
        with open(path, "rb") as handle:
            return handle.read(size)
    except FileNotFoundError:
        raise QuantlabError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise QuantlabError(f"{path}: is a directory, not a threshold file") from None
    except OSError as exc:
        raise QuantlabError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _format_named(name: str) -> ThresholdFormat:
    try:
        return formats()[name]
    except KeyError:
        raise QuantlabError(f"unknown threshold format {name!r} (known: {', '.join(formats())})") from None


def _format_by_extension(path: Path) -> ThresholdFormat:
    suffix = path.suffix.lower()
    for fmt in formats().values():
        if suffix in fmt.extensions:
            return fmt
    known = ", ".join(f"{ext} ({fmt.name})" for fmt in formats().values() for ext in fmt.extensions)
    raise QuantlabError(f"{path}: cannot tell the threshold format from the extension {suffix!r}; use {known}")


def detect_format(path: str | os.PathLike) -> str:
    """Format of an existing file: a TensorRT cache by its `TRT-` header (whatever the extension), else by extension."""
    from quantlab.formats.trt_cache import looks_like_cache

    if looks_like_cache(read_bytes(path, 8)):
        return "trt-cache"
    return _format_by_extension(Path(path)).name


def read_thresholds(path: str | os.PathLike, format: str | None = None) -> Thresholds:
    """Read a threshold file; `format` (a name from `formats()`) overrides detection by header and extension."""
    fmt = _format_named(format) if format else _format_named(detect_format(path))
    return fmt.read(Path(path))


def write_thresholds(
    path: str | os.PathLike,
    thresholds: Thresholds | Mapping[str, float],
    format: str | None = None,
    **format_options: Any,
) -> None:
    """Write thresholds atomically in the format named by `format` or by the extension of `path`.

    `format_options` go to that format's writer (e.g. `trt_version="8.6.1"`, `algorithm=` for `trt-cache`);
    an option the format does not take is a `QuantlabError`, checked before anything is written.
    """
    path = Path(path)
    fmt = _format_named(format) if format else _format_by_extension(path)
    if not isinstance(thresholds, Thresholds):
        thresholds = Thresholds(dict(thresholds))
    accepted = [p.name for p in inspect.signature(fmt.write).parameters.values() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(format_options) - set(accepted))
    if unknown:
        options = ", ".join(accepted) or "none"
        raise QuantlabError(f"format {fmt.name!r} has no option {', '.join(unknown)} (its options: {options})")
    fmt.write(path, thresholds, **format_options)


class DiffRow(NamedTuple):
    """One tensor of a comparison. A side where the tensor is missing is None, and then so is `ratio`."""

    name: str
    amax_a: float | None
    amax_b: float | None
    ratio: float | None  # amax_b / amax_a; 1.0 when equal (also 0 vs 0 and inf vs inf), inf when only amax_a is 0

    @property
    def missing(self) -> bool:
        return self.ratio is None

    @property
    def log_ratio(self) -> float:
        """|log(amax_b / amax_a)|: how far apart, symmetric in a and b; inf for missing, zero-vs-nonzero or inf."""
        if self.ratio is None or self.ratio in (0.0, math.inf):
            return math.inf
        return abs(math.log(self.ratio))


@dataclass
class ThresholdDiff:
    """`diff_thresholds` result: rows worst first and counts for a summary line."""

    rows: list[DiffRow]
    compared: int  # tensors present in both
    over_1pct: int  # of those, how many differ by more than 1% (larger / smaller > 1.01)
    over_10pct: int  # ... by more than 10%
    only_a: int
    only_b: int


def _ratio(a: float, b: float) -> float:
    if a == b:
        return 1.0
    if a == 0.0:
        return math.inf
    return b / a


def diff_thresholds(a: Thresholds | Mapping[str, float], b: Thresholds | Mapping[str, float]) -> ThresholdDiff:
    """Compare two threshold sets per tensor: tensors missing on one side first, then by |log ratio| descending."""
    amax_a = a.amax if isinstance(a, Thresholds) else Thresholds(dict(a)).amax
    amax_b = b.amax if isinstance(b, Thresholds) else Thresholds(dict(b)).amax
    rows = []
    for name in {**amax_a, **amax_b}:
        both = name in amax_a and name in amax_b
        ratio = _ratio(amax_a[name], amax_b[name]) if both else None
        rows.append(DiffRow(name, amax_a.get(name), amax_b.get(name), ratio))
    rows.sort(key=lambda row: (not row.missing, -row.log_ratio, row.name))
    common = [row for row in rows if not row.missing]
    over_1pct, over_10pct = (sum(row.log_ratio > math.log(level) for row in common) for level in DIFF_LEVELS)
    return ThresholdDiff(
        rows=rows,
        compared=len(common),
        over_1pct=over_1pct,
        over_10pct=over_10pct,
        only_a=sum(row.amax_b is None for row in rows),
        only_b=sum(row.amax_a is None for row in rows),
    )
