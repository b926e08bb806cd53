"""Max calibration: amax = max|x|, no clipping."""

from __future__ import annotations

from quantlab.histogram import Histogram


def amax(hist: Histogram) -> float:
    """max|x| of the data (the histogram's statistics when present, else its outermost edge)."""
    return hist.amax
