"""Tensors that stay in float whatever the method: those whose values INT8 cannot represent.

`calibrate` leaves them out of its thresholds (with one warning naming them), and export then leaves them in float.
Four kinds, each told from the histogram alone:

- **no finite value** (every value NaN or Inf): there is no range to take a threshold from.
- **Inf values** (an attention mask of -inf, the logits it is added to, a log of 0): INT8 has no infinity, so a
  Q/DQ pair turns -inf into -amax, a finite value the next op (a Softmax) never saw in float; a mask of {0, -inf},
  whose finite values are all 0, would even become 0 everywhere.
- **a range set by a sentinel**: values near 0 and values near max|x| with nothing in between, as in the logits an
  additive mask of -1e4 or -3.4e38 (float32's lowest) was added to. Every value below max|x| / 2 then lies below
  max|x| / 254, half an INT8 step at amax = max|x|: that threshold rounds them all to 0, and any threshold low
  enough to keep them clips the sentinel to a value the next op never saw in float. On the histogram: its
  non-empty bins (exact zeros aside) span |x| either wholly at or above top / 2 or wholly below top / 254, some of
  each, top being the largest |x| a non-empty bin reaches. The mask itself, {0, -1e4}, has nothing below max|x| / 2
  but exact zeros: amax = max|x| quantizes it exactly, and it is kept.
- **values at float32's limit** (a mask of float32's lowest, -3.4028235e38, as `torch.finfo(torch.float32).min`
  makes it): INT8's top level over that range, 127 x float32(max|x| / 127), overflows to Inf, so Q/DQ would turn
  the sentinel into -inf (a fully masked row would then give NaN out of a Softmax instead of uniform weights).

A tensor with NaN values among finite ones is calibrated on its finite values (`collect` warns about the NaN).
"""

from __future__ import annotations

import numpy as np

from quantlab.histogram import Histogram

NO_FINITE_VALUE = "only NaN/Inf values"
INF_VALUES = "Inf values, which INT8 cannot represent"
SENTINEL_RANGE = "values near 0 and near max|x| with nothing in between, a mask sentinel's: no INT8 amax keeps both"
FLOAT32_LIMIT = "values at float32's limit, a mask sentinel's: INT8 levels over that range overflow to Inf"
SENTINEL_GAP = 254  # values below max|x| / 254 round to 0 at amax = max|x| (half of one of 127 steps)


def unquantizable(hist: Histogram) -> str | None:
    """Why the tensor of `hist` must stay in float whatever the method (one of the reasons above), or None."""
    if hist.total == 0:
        return NO_FINITE_VALUE if hist.nan_count or hist.inf_count else None
    if hist.inf_count:
        return INF_VALUES
    if _range_set_by_sentinel(hist):
        return SENTINEL_RANGE
    with np.errstate(over="ignore"):
        top_level = np.float32(127) * np.float32(hist.amax / 127)
    return FLOAT32_LIMIT if np.isinf(top_level) else None


def _range_set_by_sentinel(hist: Histogram) -> bool:
    """Whether every non-empty bin (exact zeros aside) lies within top / SENTINEL_GAP of 0 or at top / 2 or beyond,
    with bins of both kinds.

    Read on the bins as they are, signed or |x|, symmetric or not: a bin spans |x| from its edge nearer 0 (0 where
    it straddles 0) to the farther one, and top is the farthest |x| of any non-empty bin."""
    counts, edges = hist.counts.copy(), hist.edges
    zero_bin = int(np.searchsorted(edges, 0.0, side="right")) - 1  # where np.histogram puts exact zeros
    if 0 <= zero_bin < counts.size:
        counts[zero_bin] -= min(hist.zero_count or 0, counts[zero_bin])
    filled = np.flatnonzero(counts)
    if filled.size == 0:
        return False
    low, high = edges[filled], edges[filled + 1]
    farthest = np.maximum(np.abs(low), np.abs(high))
    nearest = np.where((low < 0) & (high > 0), 0.0, np.minimum(np.abs(low), np.abs(high)))
    top = farthest.max()
    near_zero = farthest <= top / SENTINEL_GAP
    near_top = nearest >= top / 2
    return bool(near_zero.any() and near_top.any() and np.all(near_zero | near_top))
