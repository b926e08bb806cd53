"""Calibration: histogram -> amax (the clipping threshold; the int8 scale is amax / 127).

Methods live in one module each and are registered in `METHODS` by name; a method is a function
``(hist, *, option=default, ...) -> float``. Adding a method = one module + one entry below.
Tables that depend only on the number of bins are cached, so calibrating a whole model builds them once.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping

from quantlab.calibration import kl, mse, percentile
from quantlab.calibration import max as max_method  # binds `max` here to that module: no builtin max() in this file
from quantlab.calibration._common import check_options
from quantlab.calibration.kl import kl_curve
from quantlab.errors import QuantlabError
from quantlab.histogram import Histogram

METHODS: dict[str, Callable[..., float]] = {
    "kl": kl.amax,
    "max": max_method.amax,
    "percentile": percentile.amax,
    "mse": mse.amax,
}

__all__ = ["METHODS", "calibrate", "compute_amax", "kl_curve"]


def _method(method: str, options: Mapping) -> Callable[..., float]:
    if method not in METHODS:
        raise QuantlabError(f"unknown calibration method {method!r} (choose from {', '.join(METHODS)})")
    check_options(METHODS[method], options, f"method {method!r}")
    return METHODS[method]


def _amax(hist: Histogram, func: Callable[..., float], options: Mapping, name: str | None) -> float:
    """amax of one histogram; every error and warning names the tensor (once) when `name` is given."""
    what = f"tensor {name!r}" if name else "histogram"
    if not isinstance(hist, Histogram):
        raise QuantlabError(f"{what + ': ' if name else ''}expected a quantlab Histogram, got {type(hist).__name__}")
    if hist.total == 0 and (hist.nan_count or hist.inf_count):
        raise QuantlabError(f"{what} has only NaN/Inf values ({hist.nan_count} NaN, {hist.inf_count} Inf): no threshold")
    if hist.total == 0 or hist.amax == 0:
        warnings.warn(f"{what} {'holds no values' if hist.total == 0 else 'is all zeros'}: amax = 0", stacklevel=3)
        return 0.0
    try:
        return float(func(hist, **options))
    except QuantlabError as exc:
        if name is None:
            raise
        raise QuantlabError(f"{what}: {exc}") from None


def compute_amax(hist: Histogram, method: str = "kl", **options) -> float:
    """amax of one histogram by `method` ("kl", "max", "percentile", "mse") with its options (docs/kl.md).

    An empty or all-zero histogram gives 0.0 with a warning; bad methods, options or histograms raise QuantlabError.
    """
    return _amax(hist, _method(method, options), options, None)


def calibrate(histograms: Mapping[str, Histogram], method: str = "kl", **options) -> dict[str, float]:
    """amax of every tensor of a histogram set (name -> amax, in the set's order)."""
    func = _method(method, options)
    amaxes = {}
    for name, hist in histograms.items():  # a loop, not a comprehension: _amax's warnings point at our caller
        amaxes[name] = _amax(hist, func, options, name)
    return amaxes
