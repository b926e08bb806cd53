"""Calibration: histogram -> amax (the clipping threshold; the int8 scale is amax / 127).

Methods live in one module each and are registered in `METHODS` by name; a method is a function
``(hist, *, option=default, ...) -> float``. Adding a method = one module + one entry below.
Tables that depend only on the number of bins are cached, so calibrating a whole model builds them once. A method
may also register a function computing a list of histograms at once in `BATCHED` (kl, mse: histograms of one bin count
share arrays and matrix products); `calibrate` then hands it every distinct histogram of the set (tensors that share a
histogram, as Reshape outputs do, are computed once). `calibrate` leaves out the tensors INT8 cannot represent
(`unquantizable`), so that they stay in float.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping

from quantlab.calibration import kl, mse, percentile
from quantlab.calibration import max as max_method  # binds `max` here to that module: no builtin max() in this file
from quantlab.calibration._common import check_options
from quantlab.calibration.kl import kl_curve
from quantlab.calibration.unquantizable import unquantizable
from quantlab.errors import QuantlabError
from quantlab.histogram import Histogram

METHODS: dict[str, Callable[..., float]] = {
    "kl": kl.amax,
    "max": max_method.amax,
    "percentile": percentile.amax,
    "mse": mse.amax,
}

BATCHED: dict[str, Callable[..., list[float]]] = {"kl": kl.amaxes, "mse": mse.amaxes}

AUTO = "auto"  # chooses among METHODS per group of tensors by measured output error (calibration/auto.py)

__all__ = ["METHODS", "calibrate", "compute_amax", "kl_curve", "unquantizable"]


def _method(method: str, options: Mapping) -> Callable[..., float]:
    if method not in METHODS:
        raise QuantlabError(f"unknown calibration method {method!r} (choose from {', '.join([AUTO, *METHODS])})")
    check_options(METHODS[method], options, f"method {method!r}")
    return METHODS[method]


def _histogram(hist: Histogram, name: str | None) -> Histogram:
    """`hist`, checked to be a Histogram; the error names the tensor when `name` is given."""
    if not isinstance(hist, Histogram):
        what = f"tensor {name!r}: " if name else ""
        raise QuantlabError(f"{what}expected a quantlab Histogram, got {type(hist).__name__}")
    return hist


def _amax(hist: Histogram, func: Callable[..., float], options: Mapping, name: str | None) -> float:
    """amax of one histogram; every error and warning names the tensor (once) when `name` is given."""
    what = f"tensor {name!r}" if name else "histogram"
    _histogram(hist, name)
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


def _key(hist: Histogram) -> tuple:
    """What a threshold depends on: two histograms with the same key get the same amax from every method."""
    stats = (hist.min, hist.max, hist.count, hist.zero_count, hist.nan_count, hist.inf_count)
    return hist.counts.dtype.str, hist.counts.tobytes(), hist.edges.tobytes(), stats


def _batched(hists: Mapping[str, Histogram], method: str, func: Callable[..., float], options: Mapping) -> dict:
    """amax of each histogram (none empty or all zeros) by the method's batched function, each distinct one once; an
    error is raised again, naming its tensor, by computing the histograms one at a time."""
    distinct: dict[tuple, int] = {}
    firsts: list[Histogram] = []
    slots: dict[str, int] = {}
    for name, hist in hists.items():
        slots[name] = distinct.setdefault(_key(hist), len(firsts))
        if slots[name] == len(firsts):
            firsts.append(hist)
    try:
        values = BATCHED[method](firsts, **options)
    except QuantlabError:
        return {name: _amax(hist, func, options, name) for name, hist in hists.items()}
    return {name: float(values[slot]) for name, slot in slots.items()}


def compute_amax(hist: Histogram, method: str = "kl", **options) -> float:
    """amax of one histogram by `method` ("kl", "max", "percentile", "mse") with its options (docs/kl.md).

    An empty or all-zero histogram gives 0.0 with a warning; bad methods, options or histograms raise QuantlabError.
    The threshold is finite for any histogram with a finite value, also where `unquantizable(hist)` says the tensor
    is better left in float (`calibrate` leaves those out).
    """
    return _amax(hist, _method(method, options), options, None)


def calibrate(histograms: Mapping[str, Histogram], method: str = "auto", **options) -> dict[str, float]:
    """amax of every tensor of a histogram set (name -> amax, in the set's order) that INT8 can represent.

    The others (`unquantizable`: no finite value, Inf values, a range set by a mask sentinel) get no threshold, so
    that export leaves them in float; one warning names them, by reason. QuantlabError when no tensor is left.
    `method="auto"` (the default) chooses among the other methods by the model's output error and takes the options of
    `quantlab.calibration.auto.auto_calibrate` (model, data, target, samples, weight_method).
    """
    if method == AUTO:
        from quantlab.calibration.auto import auto_calibrate

        check_options(auto_calibrate, options, f"method {AUTO!r}")
        return auto_calibrate(histograms, **options).amax
    func = _method(method, options)
    amaxes: dict[str, float] = {}
    left_out: dict[str, list[str]] = {}
    together: dict[str, Histogram] = {}
    for name, hist in histograms.items():  # a loop, not a comprehension: _amax's warnings point at our caller
        reason = unquantizable(_histogram(hist, name))
        if reason:
            left_out.setdefault(reason, []).append(name)
        elif method in BATCHED and hist.total != 0 and hist.amax != 0:
            amaxes[name] = 0.0  # its place in the order; computed below with the others
            together[name] = hist
        else:
            amaxes[name] = _amax(hist, func, options, name)
    if together:
        amaxes.update(_batched(together, method, func, options))
    if left_out:
        named = "; ".join(f"{', '.join(map(repr, names))} ({reason})" for reason, names in left_out.items())
        if not amaxes:
            raise QuantlabError(f"no tensor can be quantized: {named}")
        count = sum(map(len, left_out.values()))
        warnings.warn(f"{count} tensors left unquantized (no threshold): {named}", stacklevel=2)
    return amaxes
