"""Percentile calibration: the bin edge below which `percentile` % of the |x| values lie.

Both references compute, on the |x| histogram, ``edges[searchsorted(cumsum(counts / total), p / 100)]``: the *lower*
edge of the bin where the cumulative fraction reaches p. They differ in one step after it:

- ``variant="modelopt"`` (default): that edge, as ModelOpt's ``_compute_amax_percentile`` returns it.
- ``variant="onnxruntime"``: ONNX Runtime's percentile calibrator clips the pair (-edge, edge) to the data's (min, max)
  and symmetric quantization takes the larger magnitude. That only changes tensors of one sign whose magnitudes all
  lie above the edge (e.g. a constant tensor: ORT gives the constant, ModelOpt the lower edge of its bin).
  ``two_tailed=True`` is ORT's asymmetric calibrator (its default): (100 - p) / 2 % cut from each tail of the signed
  histogram, clipped likewise.

The default needs nothing but the histogram, and is the rule both libraries share.
"""

from __future__ import annotations

import numpy as np

from quantlab.calibration._common import abs_histogram, check_bool, signed_histogram
from quantlab.errors import QuantlabError
from quantlab.histogram import Histogram

VARIANTS = ("modelopt", "onnxruntime")


def _edge_at(counts: np.ndarray, edges: np.ndarray, fraction: float) -> float:
    """The references' rule: the edge indexed by the first cumulative fraction >= `fraction`."""
    cdf = np.cumsum(counts / counts.sum())
    return float(edges[np.searchsorted(cdf, fraction)])


def amax(hist: Histogram, *, percentile: float = 99.99, variant: str = "modelopt", two_tailed: bool = False) -> float:
    """amax keeping `percentile` % of the |x| values (of each tail of x with two_tailed, ORT only)."""
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float, np.integer, np.floating)):
        raise QuantlabError(f"option percentile must be a number, got {percentile!r}")
    if not 0 <= percentile <= 100:
        raise QuantlabError(f"option percentile must be in [0, 100], got {percentile}")
    if variant not in VARIANTS:
        raise QuantlabError(f"unknown percentile variant {variant!r} (choose from {', '.join(VARIANTS)})")
    if check_bool("two_tailed", two_tailed) and variant != "onnxruntime":
        raise QuantlabError("two_tailed is ONNX Runtime's asymmetric percentile: use it with variant='onnxruntime'")
    if two_tailed:
        counts, edges = signed_histogram(hist)
        cut = (100.0 - percentile) / 200.0
        low, high = _edge_at(counts, edges, cut), _edge_at(counts, edges, 1.0 - cut)
    else:
        counts, edges = abs_histogram(hist)
        high = _edge_at(counts, edges, percentile / 100)
        low = -high
    if variant == "onnxruntime" and hist.min is not None and hist.max is not None:
        low, high = max(low, hist.min), min(high, hist.max)
    return max(abs(low), abs(high))
