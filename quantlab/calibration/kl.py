"""KL-divergence (entropy) calibration in three variants, each a closed form over prefix sums (no loop over thresholds).

- ``tensorrt`` (default): the algorithm of S. Migacz, "8-bit Inference with TensorRT" (GTC 2017) on the |x|
  histogram: candidates i = 128..N, P = the first i bins with the outliers added to its last bin, Q = those bins merged
  into 128 groups and spread back over the non-empty bins of P, smoothed KL(P||Q), first minimum, threshold = edge i.
  With ``exact_zeros`` (default) the values that are exactly 0 form a level of their own (0 is exact in int8).
- ``modelopt``: the threshold of ModelOpt's ``_compute_amax_entropy``, quirks included (bin 0 replaced by bin 1,
  the NaN rule, last minimum wins, +inf for an empty last bin with outliers beyond it).
- ``onnxruntime``: the threshold of ONNX Runtime's ``HistogramCollector.get_entropy_threshold`` on the signed
  histogram (asymmetric windows, int64 truncation, smoothing, float32 entropy), before ORT clips it to the data range.

Per candidate, KL(P||Q) splits into per-group terms ``sum_j b_j log b_j - P_g log(P_g / n_g)`` plus a correction for
the last bin, so every candidate costs O(groups) lookups in cumulative sums of b, [b != 0] and b log b. Group
boundaries depend only on the bin count and are cached: calibrating a model builds them once. See docs/kl.md.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from quantlab.calibration._common import abs_histogram, check_bool, check_int, check_options, pick, signed_histogram
from quantlab.errors import QuantlabError
from quantlab.histogram import Histogram

DEFAULT_VARIANT = "tensorrt"
TINY = np.finfo(np.float64).tiny
SMOOTHING = 1e-4  # MXNet's and ONNX Runtime's epsilon, in counts
ORT_TAYLOR_TERMS = 8  # series terms for sum((c - e) log(c - e)), c >= 1; e = 1e-4 x zeros / non-zeros of the window
ORT_MARGIN = 1e-5  # float64 candidates this close to the best are re-evaluated in ORT's float32 (its error is < 1e-6)
CHUNK_ELEMENTS = 16384  # table entries per block of candidates

Search = tuple[np.ndarray, np.ndarray, int | None]  # thresholds, divergences, index of the chosen one


def _xlogx(x: np.ndarray) -> np.ndarray:
    """x log x with 0 log 0 = 0."""
    out = np.zeros_like(x, dtype=np.float64)
    np.multiply(x, np.log(x, where=x > 0, out=np.ones_like(out)), out=out, where=x > 0)
    return out


def _cumsum0(x: np.ndarray) -> np.ndarray:
    """Cumulative sum with a leading 0, so that sum(x[a:b]) = c[b] - c[a]."""
    return np.concatenate([[0.0], np.cumsum(x, dtype=np.float64)])


def _frozen(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    for a in arrays:
        a.flags.writeable = False
    return arrays


def _chunked(bounds: np.ndarray) -> tuple[tuple[slice, np.ndarray], ...]:
    """A (groups + 1, candidates) bounds table cut into contiguous column blocks of ~CHUNK_ELEMENTS entries.

    Candidates are processed a block at a time only to keep temporaries small and in cache: a whole table's
    temporaries are megabytes, and fresh pages from the OS cost more than the arithmetic.
    """
    step = max(1, CHUNK_ELEMENTS // bounds.shape[0])
    cols = [slice(lo, lo + step) for lo in range(0, bounds.shape[1], step)]
    return tuple(zip(cols, _frozen(*(np.ascontiguousarray(bounds[:, c]) for c in cols))))


@lru_cache(maxsize=32)
def _group_table(n_bins: int, start: int, stride: int, groups: int):
    """Candidates i, the group of bin i - 1 in each, and the bounds of the groups bin j -> floor(groups * j / i).

    This is exactly ModelOpt's `np.digitize(range(i), np.linspace(0, i, groups + 1)) - 1` (groups is a power of 2,
    so the linspace is exact); group g holds bins [ceil(g i / groups), ceil((g + 1) i / groups)).
    """
    cands = np.arange(start, n_bins + 1, stride)
    bounds = (np.arange(groups + 1)[:, None] * cands[None, :] + groups - 1) // groups
    return *_frozen(cands, (groups * (cands - 1)) // cands), _chunked(bounds)


def _diff_at(prefix: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Sums over consecutive bounds from a cumulative sum: one row per group."""
    at = np.take(prefix, bounds)
    return at[1:] - at[:-1]


def _group_terms(csum: np.ndarray, nonzero: np.ndarray, chunks, last: np.ndarray, extra: np.ndarray):
    """Per candidate: sum_g P_g log(P_g / n_g), and P_g, n_g of the group of bin i - 1 (whose n_g gets `extra`)."""
    plogq, p_last, n_last = (np.empty(last.size) for _ in range(3))
    for cols, bounds in chunks:
        group_sum, group_nonzero = _diff_at(csum, bounds), _diff_at(nonzero, bounds)
        where = (last[cols], np.arange(bounds.shape[1]))
        group_nonzero[where] += extra[cols]
        log_q = np.log(np.maximum(group_sum / np.maximum(group_nonzero, 1), TINY))
        plogq[cols] = np.einsum("gc,gc->c", group_sum, log_q)
        p_last[cols], n_last[cols] = group_sum[where], group_nonzero[where]
    return plogq, p_last, n_last


def _abs_search(counts: np.ndarray, start: int, stride: int, groups: int, modelopt: bool, zeros: float = 0) -> Search:
    """KL of every candidate of an |x| histogram, TensorRT's or ModelOpt's way (see the module docstring).

    `zeros` exact zeros are taken out of bin 0 and kept as a level of their own, identical in P and Q (TensorRT only).
    """
    n = counts.size
    cands, last, chunks = _group_table(n, min(start, n), stride, groups)
    smallest = np.min(counts, where=counts > 0, initial=np.inf)
    counts = counts.copy()
    counts[0] -= zeros
    csum = _cumsum0(counts)
    total = csum[-1] + zeros  # from the same running sum, so that no outliers is exactly 0
    inside = csum[cands] + zeros
    outliers = total - inside
    last_bin = counts[cands - 1]
    folded_only = (last_bin == 0) & (outliers > 0)  # P's last bin is non-empty only because of the outliers
    # TensorRT keeps the empty bins of P empty, and that bin is not empty in P; ModelOpt looks at the bins alone
    extra = np.zeros(cands.size) if modelopt else folded_only.astype(np.float64)
    plogq, p_last, n_last = _group_terms(csum, _cumsum0(counts > 0), chunks, last, extra)

    with np.errstate(divide="ignore", invalid="ignore"):
        q_last = np.where((p_last > 0) & ~(folded_only & modelopt), p_last / n_last, 0.0)
        q_total = inside.copy()
        if not modelopt:  # smoothing: a zero of Q where P has mass becomes SMOOTHING x the smallest non-empty count
            smoothed = (q_last == 0) & (outliers > 0) & (inside > 0)
            q_last[smoothed] = SMOOTHING * smallest
            q_total[smoothed] += q_last[smoothed]
        # sum_j P_j log(P_j / Q_j): the sum of b log b telescopes to its prefix sum; the last bin adds the outliers
        fold = _xlogx(last_bin + outliers) - _xlogx(last_bin) - outliers * np.log(np.where(outliers > 0, q_last, 1.0))
        fold[(outliers > 0) & (q_last == 0)] = np.inf  # ModelOpt: Q is empty where P holds the outliers
        divergence = (_cumsum0(_xlogx(counts))[cands] - plogq + fold) / total + np.log(q_total / total)
        divergence[inside == 0] = np.nan if modelopt else np.inf  # nothing inside the window: Q is 0/0

    if modelopt:
        nan = np.flatnonzero(np.isnan(divergence))  # ModelOpt's reversed argmin returns the last NaN
        best = int(nan[-1]) if nan.size else pick(divergence, last=True)
    else:
        best = pick(divergence, last=False)
    return cands, divergence, best


def _grid(start_bin: int, stride: int, num_bits: int, unsigned: bool) -> tuple[int, int, int]:
    """Validated (first candidate, stride, number of groups): 128 groups for int8."""
    groups = 1 << (check_int("num_bits", num_bits, 2, 16) - 1 + int(check_bool("unsigned", unsigned)))
    return check_int("start_bin", start_bin, 1), check_int("stride", stride, 1), groups


def _tensorrt(
    hist: Histogram,
    *,
    num_bits: int = 8,
    unsigned: bool = False,
    start_bin: int = 128,
    stride: int = 1,
    exact_zeros: bool = True,
) -> Search:
    """The published algorithm; with exact_zeros, values exactly 0 (hist.zero_count) are a level of their own."""
    counts, edges = abs_histogram(hist)
    zeros = min(hist.zero_count or 0, counts[0]) if check_bool("exact_zeros", exact_zeros) else 0
    cands, divergence, best = _abs_search(counts, *_grid(start_bin, stride, num_bits, unsigned), False, zeros)
    return edges[cands], divergence, best


def _modelopt(
    hist: Histogram, *, num_bits: int = 8, unsigned: bool = False, start_bin: int = 128, stride: int = 1
) -> Search:
    counts, edges = abs_histogram(hist)
    if counts.size > 1:
        counts[0] = counts[1]  # ModelOpt's `bins[0] = bins[1]` (done on a copy here)
    cands, divergence, best = _abs_search(counts, *_grid(start_bin, stride, num_bits, unsigned), True)
    return edges[cands], divergence, best


@lru_cache(maxsize=32)
def _ort_table(n_bins: int, levels: int):
    """ORT's windows [zero - i, zero + i + 1) and the bounds of their `levels` blocks of L // levels bins."""
    zero = n_bins // 2
    cands = np.arange(levels // 2, zero + 1)
    start = zero - cands
    end = np.minimum(zero + cands + 1, n_bins)
    width = (end - start) // levels
    bounds = start[None, :] + np.arange(levels + 1)[:, None] * width[None, :]
    return *_frozen(start, end, width), _chunked(bounds)


def _smooth32(x: np.ndarray) -> np.ndarray | None:
    """ORT's `smooth_distribution` (zeros -> 1e-4, the rest lowered to keep the sum), in its float32 steps."""
    zeros = float((x == 0).astype(np.float32).sum())
    if zeros == x.size:
        return None
    shift = SMOOTHING * zeros / float(x.size - zeros)
    out = x.astype(np.float32)
    out += np.where(x == 0, np.float32(SMOOTHING), np.float32(-shift))
    return out


def _ort_float32_divergence(hist: np.ndarray, start: int, end: int, levels: int) -> float:
    """One candidate's divergence exactly as ORT computes it (int64 blocks, float32 smoothing and entropy)."""
    sliced = hist[start:end]
    p = sliced.copy()
    p[0] += hist[:start].sum()
    p[-1] += hist[end:].sum()
    width = p.size // levels
    blocks = sliced[: levels * width].reshape(levels, width).sum(axis=1)
    blocks[-1] += sliced[levels * width :].sum()
    norm = (p[: levels * width] != 0).reshape(levels, width).sum(axis=1)
    level = np.trunc(np.divide(blocks, norm, where=norm > 0, out=np.zeros(levels))).astype(np.int64)
    q = np.zeros(p.size, dtype=np.int64)
    q[: levels * width] = np.repeat(level, width)
    p32, q32 = _smooth32(p), _smooth32(q)
    if p32 is None or q32 is None:
        return np.inf
    p32 = p32 / np.sum(p32, axis=0, keepdims=True)
    q32 = q32 / np.sum(q32, axis=0, keepdims=True)
    return float(np.sum(p32 * np.log(p32 / q32), axis=0))


def _smoothed_xlogx(c: np.ndarray, e: np.ndarray) -> np.ndarray:
    """(c - e) log(c - e) for c > 0, 0 for c = 0."""
    return np.where(c > 0, (c - e) * np.log(np.where(c > 0, c - e, 1.0)), 0.0)


def _smoothed_xlogx_sum(c: np.ndarray, start: np.ndarray, end: np.ndarray, e: np.ndarray) -> np.ndarray:
    """sum((c - e) log(c - e)) over the non-empty counts of each window [start, end), for integer counts.

    (c - e) log(c - e) = c log c - e (log c + 1) + sum_k>=2 e^k / (k (k - 1) c^(k - 1)), over cumulative sums of
    c log c, log c + 1 and c^-k; with c >= 1 and e < 0.5 the series converges fast (ORT_TAYLOR_TERMS).
    """
    pos = c > 0
    log_c = np.log(c, where=pos, out=np.zeros_like(c))
    inv = np.divide(1.0, c, where=pos, out=np.zeros_like(c))
    total = _cumsum0(c * log_c)
    total = total[end] - total[start]
    series = _cumsum0(log_c + pos)
    total -= e * (series[end] - series[start])
    power = inv.copy()
    for k in range(2, ORT_TAYLOR_TERMS + 1):
        series = _cumsum0(power)
        total += e**k / (k * (k - 1)) * (series[end] - series[start])
        power *= inv
    return total


def _ort_block_terms(csum, nonzero, chunks, fixes, p_shift):
    """Per candidate: q's total and non-empty bins, and sum_j p'_j log q'_j over the blocks (smoothed p', q')."""
    tail_sum, left, right_in_block, first_fix, end_fix, width, length = fixes
    q_total, q_nonzero, p_log_q = (np.empty(width.size) for _ in range(3))
    for cols, bounds in chunks:
        block, block_nonzero = _diff_at(csum, bounds), _diff_at(nonzero, bounds)  # slice sums; non-empty bins of p
        block_nonzero[0] += first_fix[cols]
        block_nonzero[-1] += end_fix[cols]
        block[-1] += tail_sum[cols]  # ORT's quantized bins: the tail goes into the last one
        level = np.trunc(block / np.maximum(block_nonzero, 1)) * (block_nonzero > 0)  # int64 q, whole block
        block[-1] -= tail_sum[cols]
        block[0] += left[cols]  # p's block sums: outliers in its end bins
        block[-1] += right_in_block[cols]
        w = width[cols]
        q_total[cols] = w * level.sum(axis=0)
        q_nonzero[cols] = w * (level > 0).sum(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            q_shift = SMOOTHING * (length[cols] - q_nonzero[cols]) / q_nonzero[cols]
        p_smoothed = block - p_shift[cols] * block_nonzero + SMOOTHING * (w - block_nonzero)
        log_q = np.log(np.where(level > 0, level - q_shift, SMOOTHING))
        p_log_q[cols] = np.einsum("kc,kc->c", p_smoothed, log_q)
    return q_total, q_nonzero, p_log_q


def _onnxruntime(hist: Histogram, *, num_quantized_bins: int = 128) -> Search:
    """ORT's search, closed form in float64, then ORT's own float32 arithmetic for the candidates near the minimum.

    p is the window with the outliers in its end bins, smoothed (zeros -> 1e-4, non-zeros lowered by e); q is the
    window's blocks, truncated to int64 per non-empty bin of p, smoothed likewise. Smoothing keeps each sum, so
    KL = (sum p' log p' - sum p' log q') / T + log(sum q / T) with sum p' log p' from a series in e.
    """
    levels = check_int("num_quantized_bins", num_quantized_bins, 2)
    counts, edges = signed_histogram(hist)
    if not np.array_equal(counts, np.round(counts)):
        raise QuantlabError("the onnxruntime KL variant needs integer counts (ORT's histograms are int64)")
    ints = counts.astype(np.int64)
    if ints.size // 2 < levels // 2:
        return np.empty(0), np.empty(0), None
    start, end, width, chunks = _ort_table(ints.size, levels)
    c = ints.astype(np.float64)
    csum, nonzero = _cumsum0(c), _cumsum0(c > 0)
    total = csum[-1]
    length = end - start
    tail = length - levels * width  # bins after the last full block: q = 0 there
    left, right = csum[start], total - csum[end]
    first, final = c[start] + left, c[end - 1] + right  # p's end bins
    end_in_tail = tail > 0
    first_fix = (c[start] == 0) & (left > 0)
    end_fix = (c[end - 1] == 0) & (right > 0)
    tail_from = end - tail
    tail_sum = csum[end] - csum[tail_from]
    tail_nonzero = nonzero[end] - nonzero[tail_from] + end_fix * end_in_tail
    p_nonzero = nonzero[end] - nonzero[start] + first_fix + end_fix
    p_shift = SMOOTHING * (length - p_nonzero) / p_nonzero

    fixes = (tail_sum, left, right * ~end_in_tail, first_fix, end_fix * ~end_in_tail, width, length)
    q_total, q_nonzero, p_log_q = _ort_block_terms(csum, nonzero, chunks, fixes, p_shift)
    p_tail = tail_sum + right * end_in_tail - p_shift * tail_nonzero + SMOOTHING * (tail - tail_nonzero)
    p_log_q += p_tail * np.log(SMOOTHING)

    p_log_p = _smoothed_xlogx_sum(c, start, end, p_shift)
    for bin_, value in ((start, first), (end - 1, final)):  # swap the end bins' counts for p's
        p_log_p += _smoothed_xlogx(value, p_shift) - _smoothed_xlogx(c[bin_], p_shift)
    p_log_p += (length - p_nonzero) * SMOOTHING * np.log(SMOOTHING)
    with np.errstate(divide="ignore"):
        divergence = (p_log_p - p_log_q) / total + np.log(q_total / total)
    divergence[q_nonzero == 0] = np.inf  # ORT: smooth_distribution(q) is None

    # the series' remainder (counts >= 1) widens the margin; e >= 1 (ORT asserts there) forces re-evaluation
    k = ORT_TAYLOR_TERMS
    with np.errstate(divide="ignore", over="ignore"):
        remainder = p_nonzero * p_shift ** (k + 1) / (k * (k + 1) * (1 - p_shift)) / total
    remainder[p_shift >= 1] = np.inf
    best = np.min(divergence + remainder)
    near = np.flatnonzero(divergence - remainder <= best + ORT_MARGIN * (1.0 + abs(best)))
    exact = [_ort_float32_divergence(ints, start[k], end[k], levels) for k in near]
    return edges[end], divergence, int(near[np.argmin(exact)])


VARIANTS = {"tensorrt": _tensorrt, "modelopt": _modelopt, "onnxruntime": _onnxruntime}


def _search(hist: Histogram, variant: str, options: dict) -> Search:
    if variant not in VARIANTS:
        raise QuantlabError(f"unknown KL variant {variant!r} (choose from {', '.join(VARIANTS)})")
    check_options(VARIANTS[variant], options, f"KL variant {variant!r}")
    if not isinstance(hist, Histogram):
        raise QuantlabError(f"expected a quantlab Histogram, got {type(hist).__name__}")
    if hist.total == 0:
        raise QuantlabError("the histogram holds no values: there is no KL divergence to minimize")
    return VARIANTS[variant](hist, **options)


def amax(hist: Histogram, *, variant: str = DEFAULT_VARIANT, **options) -> float:
    """The threshold minimizing the KL divergence, as the chosen variant computes it (docs/kl.md)."""
    thresholds, _, best = _search(hist, variant, options)
    return float(hist.edges[-1] if best is None else thresholds[best])


def kl_curve(hist: Histogram, variant: str = DEFAULT_VARIANT, **options) -> tuple[np.ndarray, np.ndarray]:
    """(candidate thresholds, their KL divergence) for plotting; NaN/inf where the variant defines them so.

    The onnxruntime curve is the float64 closed form; ORT's float32 values differ by ~1e-6.
    """
    thresholds, divergence, _ = _search(hist, variant, options)
    return thresholds, divergence
