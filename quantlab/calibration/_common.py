"""Helpers shared by the calibration methods: histogram views, option checks, candidate picking."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from quantlab.errors import QuantlabError
from quantlab.histogram import Histogram


def abs_histogram(hist: Histogram) -> tuple[np.ndarray, np.ndarray]:
    """(counts as a float64 copy, edges) of the |x| histogram: signed ones are folded, |x| ones used as they are."""
    if hist.is_signed:
        hist = hist.fold()
    return np.array(hist.counts, dtype=np.float64), hist.edges


def signed_histogram(hist: Histogram) -> tuple[np.ndarray, np.ndarray]:
    """(counts, edges) of a histogram symmetric around zero; an |x| histogram is mirrored around 0."""
    counts, edges = np.asarray(hist.counts), hist.edges
    if hist.is_signed:
        if not np.isclose(edges[0], -edges[-1]):
            raise QuantlabError("this method needs a signed histogram symmetric around zero")
        return counts, edges
    if edges[0] != 0:
        raise QuantlabError("an |x| histogram must start at 0 to be mirrored into a signed one")
    return np.concatenate([counts[::-1], counts]), np.concatenate([-edges[:0:-1], edges])


def check_options(func: Callable, options: Mapping[str, Any], what: str) -> None:
    """Reject keyword options that `func` does not take, naming the ones it does."""
    params = inspect.signature(func).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    valid = [p.name for p in params if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise QuantlabError(f"unknown option {unknown[0]!r} for {what} (valid: {', '.join(valid) or 'none'})")


def check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    """An integer option within [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise QuantlabError(f"option {name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise QuantlabError(f"option {name} must be {bounds}, got {value}")
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise QuantlabError(f"option {name} must be true or false, got {value!r}")
    return bool(value)


def pick(values: np.ndarray, last: bool, tol: float = 1e-12) -> int:
    """Index of the minimum of `values`, counting values within `tol` of it as ties: the first or the last of them.

    The closed forms are accurate to ~1e-13 while distinct candidates differ by far more, so a tolerance turns the
    references' exact ties (often exact zeros) into ties here too. NaNs are never picked; all-NaN is the caller's job.
    """
    best = np.nanmin(values)
    tied = np.flatnonzero(values <= best + tol * max(1.0, abs(best)) if np.isfinite(best) else values == best)
    return int(tied[-1] if last else tied[0])
