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
from numpy.lib.stride_tricks import as_strided

from quantlab.calibration._common import abs_histogram, check_bool, check_int, check_options, pick, signed_histogram
from quantlab.errors import QuantlabError
from quantlab.histogram import Histogram

DEFAULT_VARIANT = "tensorrt"
TINY = np.finfo(np.float64).tiny
SMOOTHING = 1e-4  # MXNet's and ONNX Runtime's epsilon, in counts
ORT_TAYLOR_TERMS = 8  # series terms for sum((c - e) log(c - e)), c >= 1; e = 1e-4 x zeros / non-zeros of the window
ORT_MARGIN = 1e-5  # float64 candidates this close to the best are re-evaluated in ORT's float32 (its error is < 1e-6)
CHUNK_ELEMENTS = 16384  # table entries per block of candidates
ORT_STACK = 64  # histograms searched together by the onnxruntime variant
ORT_CHUNK_ELEMENTS = 32768  # blocks x candidates x histograms per step of the onnxruntime variant

Search = tuple[np.ndarray, np.ndarray, int | None]  # thresholds, divergences, index of the chosen one


def _xlogx(x: np.ndarray) -> np.ndarray:
    """x log x with 0 log 0 = 0."""
    out = np.zeros_like(x, dtype=np.float64)
    np.multiply(x, np.log(x, where=x > 0, out=np.ones_like(out)), out=out, where=x > 0)
    return out


def _cumsum0(x: np.ndarray) -> np.ndarray:
    """Cumulative sum along the last axis with a leading 0, so that sum(x[..., a:b]) = c[..., b] - c[..., a]."""
    out = np.zeros((*x.shape[:-1], x.shape[-1] + 1))
    np.cumsum(x, axis=-1, dtype=np.float64, out=out[..., 1:])
    return out


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
    """ORT's windows [zero - i, zero + i + 1) and their `levels` blocks of L // levels bins, by runs of one block width.

    Within a run the candidates' block bounds start + k width are a strided view of a cumulative sum (no gather): a run
    is (first candidate, end, width, smallest start), its candidates taken from the widest window down.
    """
    zero = n_bins // 2
    cands = np.arange(levels // 2, zero + 1)
    start = zero - cands
    end = np.minimum(zero + cands + 1, n_bins)
    width = (end - start) // levels
    cuts = [0, *(np.flatnonzero(np.diff(width)) + 1), cands.size]
    runs = tuple((lo, hi, int(width[lo]), int(start[hi - 1])) for lo, hi in zip(cuts[:-1], cuts[1:]))
    return *_frozen(start, end, width), runs


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
    """sum((c - e) log(c - e)) over the non-empty counts of each window [start, end), for integer counts (rows of c).

    (c - e) log(c - e) = c log c - e (log c + 1) + sum_k>=2 e^k / (k (k - 1) c^(k - 1)), over cumulative sums of
    c log c, log c + 1 and c^-k; with c >= 1 and e < 0.5 the series converges fast (ORT_TAYLOR_TERMS).
    """
    pos = c > 0
    log_c = np.log(c, where=pos, out=np.zeros_like(c))
    inv = np.divide(1.0, c, where=pos, out=np.zeros_like(c))

    def window_sums(x: np.ndarray) -> np.ndarray:
        prefix = _cumsum0(x)
        return np.take_along_axis(prefix, end, -1) - np.take_along_axis(prefix, start, -1)

    total = window_sums(c * log_c) - e * window_sums(log_c + pos)
    power = inv.copy()
    for k in range(2, ORT_TAYLOR_TERMS + 1):
        total += e**k / (k * (k - 1)) * window_sums(power)
        power *= inv
    return total


def _ort_block_terms(csum, nonzero, runs, fixes, p_shift, levels):
    """Per histogram (row) and candidate: q's total and non-empty bins, and sum_j p'_j log q'_j over the blocks.

    A run's block sums are differences of strided views of the cumulative sums, a few histograms at a time, worked in
    place in buffers allocated once (fresh pages from the OS would cost more than the arithmetic).
    """
    tail_sum, left, right_in_block, first_fix, end_fix, width, length = fixes
    q_total, q_nonzero, p_log_q = (np.empty(p_shift.shape) for _ in range(3))
    guard = SMOOTHING * (levels + 1) >= 1 - SMOOTHING  # q's shift could reach 1: keep level 0 apart explicitly
    rows = csum.shape[0]
    longest = max(hi - lo for lo, hi, _, _ in runs)
    step = max(1, min(rows, ORT_CHUNK_ELEMENTS // (levels * longest)))
    buffers = np.empty((3, step * levels * longest))
    for lo, hi, w, first_start in runs:
        count = hi - lo
        cols = slice(hi - 1, lo - 1 if lo else None, -1)  # the run's candidates, widest window (first_start) first
        for top in range(0, rows, step):
            part = slice(top, top + step)
            shape = (min(step, rows - top), levels, count)
            size = shape[0] * levels * count
            block, block_nonzero, level = (buffers[i, :size].reshape(shape) for i in range(3))
            for prefix, out in ((csum, block), (nonzero, block_nonzero)):  # slice sums; non-empty bins of p
                base = prefix[part, first_start:]
                bounds = as_strided(base, (shape[0], levels + 1, count), (base.strides[0], w * 8, 8))
                np.subtract(bounds[:, 1:], bounds[:, :-1], out=out)
            block_nonzero[:, 0] += first_fix[part, cols]
            block_nonzero[:, -1] += end_fix[part, cols]
            block[:, -1] += tail_sum[part, cols]  # ORT's quantized bins: the tail goes into the last one
            np.maximum(block_nonzero, 1, out=level)  # int64 q, whole block; 0 where p's block is empty
            np.trunc(np.divide(block, level, out=level), out=level)
            level[:, -1] *= block_nonzero[:, -1] > 0  # (only the last block can hold a sum without non-empty bins)
            block[:, -1] -= tail_sum[part, cols]
            block[:, 0] += left[part, cols]  # p's block sums: outliers in its end bins
            block[:, -1] += right_in_block[part, cols]
            q_total[part, cols] = w * level.sum(axis=1)
            nonempty = w * np.count_nonzero(level, axis=1)
            q_nonzero[part, cols] = nonempty
            with np.errstate(divide="ignore", invalid="ignore"):
                q_shift = SMOOTHING * (length[cols] - nonempty) / nonempty
            if guard:
                log_q = np.log(np.where(level > 0, level - q_shift[:, None], SMOOTHING))
            else:  # level >= 1 gives level - q_shift >= 1 - SMOOTHING (levels + 1) > SMOOTHING, level 0 gives <= 0
                log_q = np.subtract(level, q_shift[:, None], out=level)
                np.log(np.maximum(log_q, SMOOTHING, out=log_q), out=log_q)
            # sum_k p'_k log q'_k with p' = block - p_shift nonzero + SMOOTHING (w - nonzero), term by term
            p_log_q[part, cols] = (
                np.einsum("rkc,rkc->rc", block, log_q)
                - (p_shift[part, cols] + SMOOTHING) * np.einsum("rkc,rkc->rc", block_nonzero, log_q)
                + SMOOTHING * w * log_q.sum(axis=1)
            )
    return q_total, q_nonzero, p_log_q


def _onnxruntime_searches(hists: list[Histogram], *, num_quantized_bins: int = 128) -> list[Search]:
    """ORT's search, closed form in float64, then ORT's own float32 arithmetic for the candidates near the minimum.

    p is the window with the outliers in its end bins, smoothed (zeros -> 1e-4, non-zeros lowered by e); q is the
    window's blocks, truncated to int64 per non-empty bin of p, smoothed likewise. Smoothing keeps each sum, so
    KL = (sum p' log p' - sum p' log q') / T + log(sum q / T) with sum p' log p' from a series in e. Histograms of
    one bin count are searched together, one per row.
    """
    levels = check_int("num_quantized_bins", num_quantized_bins, 2)
    signed = [signed_histogram(hist) for hist in hists]
    for counts, _ in signed:
        if not np.array_equal(counts, np.round(counts)):
            raise QuantlabError("the onnxruntime KL variant needs integer counts (ORT's histograms are int64)")
    searches: list[Search] = [(np.empty(0), np.empty(0), None)] * len(hists)
    by_bins: dict[int, list[int]] = {}
    for i, (counts, _) in enumerate(signed):
        by_bins.setdefault(counts.size, []).append(i)
    for n_bins, members in by_bins.items():
        if n_bins // 2 < levels // 2:
            continue
        for lo in range(0, len(members), ORT_STACK):
            group = members[lo : lo + ORT_STACK]
            ints = np.stack([signed[i][0] for i in group]).astype(np.int64)
            for i, (divergence, best) in zip(group, _ort_rows(ints, levels)):
                searches[i] = signed[i][1][_ort_table(n_bins, levels)[1]], divergence, best
    return searches


def _ort_rows(ints: np.ndarray, levels: int) -> list[tuple[np.ndarray, int]]:
    """(divergence of every candidate, index of ORT's choice) for each row of a stack of signed int64 histograms."""
    start, end, width, runs = _ort_table(ints.shape[1], levels)
    c = ints.astype(np.float64)
    csum, nonzero = _cumsum0(c), _cumsum0(c > 0)
    total = csum[:, -1:]
    length = end - start
    tail = length - levels * width  # bins after the last full block: q = 0 there
    left, right = csum[:, start], total - csum[:, end]
    first, final = c[:, start] + left, c[:, end - 1] + right  # p's end bins
    end_in_tail = tail > 0
    first_fix = (c[:, start] == 0) & (left > 0)
    end_fix = (c[:, end - 1] == 0) & (right > 0)
    tail_from = end - tail
    tail_sum = csum[:, end] - csum[:, tail_from]
    tail_nonzero = nonzero[:, end] - nonzero[:, tail_from] + end_fix * end_in_tail
    p_nonzero = nonzero[:, end] - nonzero[:, start] + first_fix + end_fix
    p_shift = SMOOTHING * (length - p_nonzero) / p_nonzero

    fixes = (tail_sum, left, right * ~end_in_tail, first_fix, end_fix * ~end_in_tail, width, length)
    q_total, q_nonzero, p_log_q = _ort_block_terms(csum, nonzero, runs, fixes, p_shift, levels)
    p_tail = tail_sum + right * end_in_tail - p_shift * tail_nonzero + SMOOTHING * (tail - tail_nonzero)
    p_log_q += p_tail * np.log(SMOOTHING)

    rows = ints.shape[0]
    p_log_p = _smoothed_xlogx_sum(c, np.broadcast_to(start, (rows, start.size)), np.broadcast_to(end, (rows, end.size)), p_shift)
    for bin_, value in ((start, first), (end - 1, final)):  # swap the end bins' counts for p's
        p_log_p += _smoothed_xlogx(value, p_shift) - _smoothed_xlogx(c[:, bin_], p_shift)
    p_log_p += (length - p_nonzero) * SMOOTHING * np.log(SMOOTHING)
    with np.errstate(divide="ignore"):
        divergence = (p_log_p - p_log_q) / total + np.log(q_total / total)
    divergence[q_nonzero == 0] = np.inf  # ORT: smooth_distribution(q) is None

    # the series' remainder (counts >= 1) widens the margin; e >= 1 (ORT asserts there) forces re-evaluation
    k = ORT_TAYLOR_TERMS
    with np.errstate(divide="ignore", over="ignore"):
        remainder = p_nonzero * p_shift ** (k + 1) / (k * (k + 1) * (1 - p_shift)) / total
    remainder[p_shift >= 1] = np.inf
    results = []
    for row in range(rows):
        best = np.min(divergence[row] + remainder[row])
        near = np.flatnonzero(divergence[row] - remainder[row] <= best + ORT_MARGIN * (1.0 + abs(best)))
        exact = [_ort_float32_divergence(ints[row], start[k], end[k], levels) for k in near]
        results.append((divergence[row], int(near[np.argmin(exact)])))
    return results


def _onnxruntime(hist: Histogram, *, num_quantized_bins: int = 128) -> Search:
    """ORT's search on one histogram (`_onnxruntime_searches`)."""
    return _onnxruntime_searches([hist], num_quantized_bins=num_quantized_bins)[0]


VARIANTS = {"tensorrt": _tensorrt, "modelopt": _modelopt, "onnxruntime": _onnxruntime}


def _checked(hist: Histogram, variant: str, options: dict) -> Histogram:
    if variant not in VARIANTS:
        raise QuantlabError(f"unknown KL variant {variant!r} (choose from {', '.join(VARIANTS)})")
    check_options(VARIANTS[variant], options, f"KL variant {variant!r}")
    if not isinstance(hist, Histogram):
        raise QuantlabError(f"expected a quantlab Histogram, got {type(hist).__name__}")
    if hist.total == 0:
        raise QuantlabError("the histogram holds no values: there is no KL divergence to minimize")
    return hist


def _searches(hists: list[Histogram], variant: str, options: dict) -> list[Search]:
    """The search of each histogram; the onnxruntime variant searches those of one bin count together."""
    hists = [_checked(hist, variant, options) for hist in hists]
    if variant == "onnxruntime":
        return _onnxruntime_searches(hists, **options)
    return [VARIANTS[variant](hist, **options) for hist in hists]


def amaxes(hists: list[Histogram], *, variant: str = DEFAULT_VARIANT, **options) -> list[float]:
    """`amax` of each histogram, computed together where the variant gains from it."""
    searches = _searches(list(hists), variant, options)
    return [float(hist.edges[-1] if best is None else thresholds[best]) for hist, (thresholds, _, best) in zip(hists, searches)]


def amax(hist: Histogram, *, variant: str = DEFAULT_VARIANT, **options) -> float:
    """The threshold minimizing the KL divergence, as the chosen variant computes it (docs/kl.md)."""
    return amaxes([hist], variant=variant, **options)[0]


def kl_curve(hist: Histogram, variant: str = DEFAULT_VARIANT, **options) -> tuple[np.ndarray, np.ndarray]:
    """(candidate thresholds, their KL divergence) for plotting; NaN/inf where the variant defines them so.

    The onnxruntime curve is the float64 closed form; ORT's float32 values differ by ~1e-6.
    """
    thresholds, divergence, _ = _searches([hist], variant, options)[0]
    return thresholds, divergence
