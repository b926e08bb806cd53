"""MSE calibration: the bin center that, used as amax, minimizes the histogram's quantization error.

The threshold of ModelOpt's ``_compute_amax_mse`` as intended: candidates are the centers of bins start_bin .. N-1
(stride); each candidate fake-quantizes every bin center in float32 (round half to even, narrow range) and scores
``mean(counts * (quantized - center)^2)``; the first minimum wins. The per-bin errors use the same float32 operations
as ModelOpt; only the sum is float64 (torch's float32 reduction order cannot be reproduced), which decides the same
argmin unless two candidates tie to ~1e-7. (ModelOpt 0.47 passes num_bits where `fake_tensor_quant` now expects a
bias, which breaks its search; see docs/kl.md.)

Beyond 2**32 those float32 operations could overflow (squared errors times counts past float32's 3.4e38, as an
attention mask of -3.4e38 makes them): such a histogram is searched on its edges scaled by a power of two down to
2**32, which rounds nothing differently (float32 rounding commutes with powers of two), and the center found is
scaled back: the same threshold, finite.
"""

from __future__ import annotations

import numpy as np

from quantlab.calibration._common import abs_histogram, check_bool, check_int
from quantlab.histogram import Histogram

CHUNK_ELEMENTS = 1 << 15  # candidates x bins per block: small temporaries stay in cache
ZERO_AMAX = np.float32(1.0 / (1 << 24))  # ModelOpt quantizes everything to 0 for amax below this
LARGEST_EXPONENT = 32  # edges up to 2**32: squared errors up to 2**64 times counts up to 2**63 stay within float32


def amax(hist: Histogram, *, num_bits: int = 8, unsigned: bool = False, start_bin: int = 128, stride: int = 1) -> float:
    """The bin center minimizing the mean squared quantization error of the |x| histogram."""
    magnitude_bits = check_int("num_bits", num_bits, 2, 16) - 1 + int(check_bool("unsigned", unsigned))
    bound = np.float32(2.0**magnitude_bits - 1)  # 127 for int8
    counts, edges = abs_histogram(hist)
    shift = max(0, int(np.frexp(edges[-1])[1]) - LARGEST_EXPONENT)
    counts, edges = counts.astype(np.float32), np.ldexp(edges, -shift).astype(np.float32)
    centers = (edges[1:] + edges[:-1]) / np.float32(2)
    # ModelOpt searches centers[start_bin:]; with fewer bins its list is empty (it raises): use the last center
    first = min(check_int("start_bin", start_bin, 0), centers.size - 1)
    cands = np.arange(first, centers.size, check_int("stride", stride, 1))
    low = np.float32(0) if unsigned else -bound
    used = counts > 0  # empty bins add exactly 0
    values, weights = centers[used], counts[used]
    errors = np.empty(cands.size)
    step = max(1, CHUNK_ELEMENTS // max(1, values.size))
    for lo in range(0, cands.size, step):
        amaxes = centers[cands[lo : lo + step], None]
        scale = bound / amaxes
        zero = amaxes <= ZERO_AMAX
        scale[zero] = 0
        quantized = np.clip(np.rint(values * scale), low, bound) / np.where(zero, np.float32(1), scale)
        errors[lo : lo + step] = (np.square(quantized - values) * weights).sum(axis=1, dtype=np.float64)
    return float(np.ldexp(np.float64(centers[cands[np.argmin(errors)]]), shift))
