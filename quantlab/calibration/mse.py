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

Speed: scoring every candidate on every bin is candidates x bins float32 operations (4M for 2048 bins). On the
histograms `collect` writes (bins of equal width from 0) the search first bounds every candidate's error without
float32: with bin width d, candidate c's amax is (c + 1/2) d and bin j's center (j + 1/2) d up to float32 rounding,
so bin j quantizes to the level k = rint(bound (2j + 1) / (2c + 1)) (capped at bound; never a tie: the numerator is
even, the denominator odd) and the error is d^2 sum_j counts_j T[c, j] with T[c, j] = ((k (2c + 1) - bound (2j + 1))
/ (2 bound))^2, a table that depends on the bin count alone: one matrix product scores every candidate of every
histogram of that bin count at once. The float32 steps move each term by a bounded amount (their rounding and the
centers' distance from (j + 1/2) d, measured per histogram; the table is used only where those cannot move a bin
across a rounding boundary), so every candidate's error lies in a known interval around its table estimate; the
candidates whose interval reaches the lowest upper end (a handful) are then scored with the float32 operations above,
and the first minimum among them is the threshold of the full search, exactly. Other histograms (uneven bins,
amax near float32's smallest numbers, more than TABLE_LIMIT table entries) are scored in full.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from quantlab.calibration._common import abs_histogram, check_bool, check_int
from quantlab.histogram import Histogram

CHUNK_ELEMENTS = 1 << 15  # candidates x bins per block: small temporaries stay in cache
ZERO_AMAX = np.float32(1.0 / (1 << 24))  # ModelOpt quantizes everything to 0 for amax below this
LARGEST_EXPONENT = 32  # edges up to 2**32: squared errors up to 2**64 times counts up to 2**63 stay within float32
TABLE_LIMIT = 1 << 24  # candidates x bins of a cached error table (64 MB of float32); beyond, every bin is scored
TABLE_ROWS = 128  # candidates per block while a table is built
STACK = 256  # histograms per matrix product
SMALLEST = 2.0**-60  # the table is used only where bin widths and non-zero counts are at least this (no subnormals)
U32 = 2.0**-24  # float32's unit roundoff


def _options(num_bits: int, unsigned: bool, start_bin: int, stride: int) -> tuple[np.float32, np.float32, int, int]:
    """(bound, lowest level, start_bin, stride), validated: 127 and -127 for int8."""
    magnitude_bits = check_int("num_bits", num_bits, 2, 16) - 1 + int(check_bool("unsigned", unsigned))
    bound = np.float32(2.0**magnitude_bits - 1)
    low = np.float32(0) if unsigned else -bound
    return bound, low, check_int("start_bin", start_bin, 0), check_int("stride", stride, 1)


def _errors(values: np.ndarray, weights: np.ndarray, amaxes: np.ndarray, bound: np.float32, low: np.float32):
    """Each amax's error sum(weights * (fake-quantized values - values)^2): float32 per bin, as ModelOpt; float64 sum.

    A row's sum does not depend on the other rows of its block, so any subset of candidates scores as in the full search.
    """
    errors = np.empty(amaxes.size)
    step = max(1, CHUNK_ELEMENTS // max(1, values.size))
    for lo in range(0, amaxes.size, step):
        amax = amaxes[lo : lo + step, None]
        scale = bound / amax
        zero = amax <= ZERO_AMAX
        scale[zero] = 0
        quantized = np.clip(np.rint(values * scale), low, bound) / np.where(zero, np.float32(1), scale)
        errors[lo : lo + step] = (np.square(quantized - values) * weights).sum(axis=1, dtype=np.float64)
    return errors


@lru_cache(maxsize=4)
def _table(n_bins: int, first: int, stride: int, bound: float) -> tuple[np.ndarray, float]:
    """(T, slack): T[c, j] (float32) for the candidates first, first + stride, ... < n_bins (module docstring), and
    how far any ratio bound (2j + 1) / (2c + 1) up to bound + 1 lies at the least from a rounding boundary, in units of
    1 / (4c + 2), less the float32 rounding of v * (bound / amax) there: `_deviation` checks a histogram against it.
    """
    cands = np.arange(first, n_bins, stride, dtype=np.float64)
    numer = 2 * bound * (2 * np.arange(n_bins, dtype=np.float64) + 1)  # the ratio is numer / denom, numer even
    table = np.empty((cands.size, n_bins), dtype=np.float32)
    for lo in range(0, cands.size, TABLE_ROWS):
        odd = 2 * cands[lo : lo + TABLE_ROWS, None] + 1  # 2c + 1
        # rint(numer / (2 odd)): the half-integers are the odd multiples of odd over 2 odd, and numer is even, so the
        # quotient below is never an integer, nor within 1 / (2 odd) of one: float64 floors it exactly
        level = np.minimum(np.floor((numer + odd) / (2 * odd)), bound)
        level *= odd
        level -= numer / 2
        level *= 1 / (2 * bound)  # float64 rounding, far below the float32 rounding of the table
        table[lo : lo + TABLE_ROWS] = np.square(level)
    table.flags.writeable = False
    # numer - (half-integer) x denom is a non-zero even - odd: at least 1 in numerator units
    return table, 1 - 2.02 * U32 * (bound + 1) * 2 * (2 * cands[-1] + 1)


def _prepared(hist: Histogram, start_bin: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(float32 counts, float32 centers, first candidate, scale exponent) of the |x| histogram, as the search sees it."""
    counts, edges = abs_histogram(hist)
    shift = max(0, int(np.frexp(edges[-1])[1]) - LARGEST_EXPONENT)
    counts, edges = counts.astype(np.float32), np.ldexp(edges, -shift).astype(np.float32)
    centers = (edges[1:] + edges[:-1]) / np.float32(2)
    # ModelOpt searches centers[start_bin:]; with fewer bins its list is empty (it raises): use the last center
    return counts, centers, min(start_bin, centers.size - 1), shift


def _deviation(weights: np.ndarray, centers: np.ndarray, first: int, bound: float, slack: float) -> float | None:
    """delta, the largest distance of a center from (j + 1/2) d in bins, where it leaves every bin at the table's level;
    else None. With v = v° + alpha, amax = A° + beta (|alpha|, |beta| <= delta d), v * bound / amax lies within
    delta (bound + ratio) / (c + 1/2 - delta) of the table's ratio, and float32 adds 2.01u of it."""
    n = centers.size
    width = float(centers[-1]) / (n - 0.5)
    positive = weights[weights > 0]
    if not (centers[first] > ZERO_AMAX and width >= SMALLEST and positive.size and SMALLEST <= positive.min()):
        return None
    if positive.max() > 2.0**64:  # the float32 product could overflow
        return None
    delta = float(np.max(np.abs(centers - (np.arange(n) + 0.5) * width))) / width * (1 + 1e-9) + 1e-12
    top = bound * (2 * n - 1) / (2 * first + 1)  # the largest ratio
    clipped = delta * (bound + top) / (first + 0.5 - delta) * 1.01 + 2.02 * U32 * top < 0.5  # beyond bound + 1
    if delta < 0.01 and (8 * bound + 4) * delta / (1 - 2 * delta) * 1.01 < slack and clipped:
        return delta
    return None


def _near(estimate: np.ndarray, total: float, width: float, cands: np.ndarray, n: int, delta: float) -> np.ndarray:
    """Indices of the candidates whose float32 error can be the smallest, from the table's estimates (module docstring).

    estimate[c]: the float32 product of T's row and the weights, times width^2; the exact product lies within
    gamma = (n + 4) u of it. Per bin, |r - r°| <= (1 + u) g + u |r°| with g = 2 delta d + 2.01u (A° + delta d) (the
    quantized value and the center each within delta d of the table's, float32 rounding), so that
    |term - w r°^2| <= w [(1 + 2.01u)((1 + u)|r°| + (1 + u) g)^2 - r°^2]; summed with Cauchy-Schwarz
    (sum w |r°| <= sqrt(W E)), then the float64 sum's rounding and float32 underflow; widened by 10%.
    """
    u = U32
    gamma = (n + 4) * u / (1 - (n + 4) * u)
    high, low = estimate * (1 + 2 * gamma), estimate * (1 - 2 * gamma)
    spread = (1 + u) * (2 * delta * width * (1 + 1.01 * u) + 2.01 * u * (cands + 0.5) * width)  # (1 + u) g
    lam1, lam2, lam3 = (1 + 2.01 * u) * (1 + u) ** 2 - 1, 2 * (1 + 2.01 * u) * (1 + u), 1 + 2.01 * u
    margin = lam1 * high + lam2 * spread * np.sqrt(total * high) + lam3 * spread**2 * total
    margin += (n + 1) * 2.0**-52 * (high + margin) + 2.0**-149 * (total + n)
    margin *= 1.1
    return np.flatnonzero(low - margin <= np.min(high + margin))


def _best(weights: np.ndarray, centers: np.ndarray, cands: np.ndarray, bound: np.float32, low: np.float32) -> int:
    """The candidate (a bin index) of least float32 error, first on ties."""
    if cands.size == 1:
        return int(cands[0])
    used = weights > 0  # empty bins add exactly 0
    return int(cands[np.argmin(_errors(centers[used], weights[used], centers[cands], bound, low))])


def amaxes(
    hists: Sequence[Histogram], *, num_bits: int = 8, unsigned: bool = False, start_bin: int = 128, stride: int = 1
) -> list[float]:
    """`amax` of each histogram; those of one bin count share the error table and one matrix product."""
    bound, low, start_bin, stride = _options(num_bits, unsigned, start_bin, stride)
    prepared = [_prepared(hist, start_bin) for hist in hists]
    best: list[int | None] = [None] * len(hists)
    tabled: dict[tuple[int, int], list[tuple[int, float]]] = {}
    for i, (weights, centers, first, _) in enumerate(prepared):
        cands = np.arange(first, centers.size, stride)
        if cands.size > 1 and cands.size * centers.size <= TABLE_LIMIT:
            slack = _table(centers.size, first, stride, float(bound))[1]
            delta = _deviation(weights, centers, first, float(bound), slack)
            if delta is not None:
                tabled.setdefault((centers.size, first), []).append((i, delta))
                continue
        best[i] = _best(weights, centers, cands, bound, low)
    for (n, first), members in tabled.items():
        table, _ = _table(n, first, stride, float(bound))
        cands = np.arange(first, n, stride)
        for lo in range(0, len(members), STACK):
            group = members[lo : lo + STACK]
            stacked = np.stack([prepared[i][0] for i, _ in group], axis=1)
            products = table @ stacked  # float32: (candidates, histograms)
            for column, (i, delta) in enumerate(group):
                weights, centers = prepared[i][:2]
                width = float(centers[-1]) / (n - 0.5)
                total = float(np.sum(weights, dtype=np.float64)) * (1 + 1e-9)
                near = _near(products[:, column].astype(np.float64) * width**2, total, width, cands, n, delta)
                best[i] = _best(weights, centers, cands[near], bound, low)
    return [float(np.ldexp(np.float64(centers[k]), shift)) for k, (_, centers, _, shift) in zip(best, prepared)]


def amax(hist: Histogram, *, num_bits: int = 8, unsigned: bool = False, start_bin: int = 128, stride: int = 1) -> float:
    """The bin center minimizing the mean squared quantization error of the |x| histogram."""
    return amaxes([hist], num_bits=num_bits, unsigned=unsigned, start_bin=start_bin, stride=stride)[0]
