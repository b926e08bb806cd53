"""Run a model in ONNX Runtime and stream every float activation tensor into an exact histogram.

Two passes over the data: the first finds each tensor's max|x| (and its min, max, counts of values, NaN and Inf);
the second bins each batch over the fixed range [-max|x|, +max|x|], exactly as `np.histogram` would, and counts the
exact zeros. With the range fixed, a value's bin does not depend on the batch it came in, so the sum over batches is
exactly `np.histogram` of all values at once. Memory is one batch of activations plus tensors x bins counts, whatever
the size of the data set.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from quantlab.binning import ExactBins, Workspace
from quantlab.data import Batch, CalibrationData, DataSource, Progress, feed_samples, open_data, reads_differ
from quantlab.errors import QuantlabError, QuantlabInterrupted
from quantlab.histogram import Histogram, HistogramSet
from quantlab.lanes import Lanes
from quantlab.ranges import TensorRanges
from quantlab.model import (
    activation_tensors,
    bytes_per_sample,
    create_session,
    file_sha256,
    input_specs,
    load_model,
    relu_inputs,
    run_session,
    tensor_types,
    value_sources,
    value_types,
    with_outputs,
)

BUFFER_BUDGET = 64 << 20  # bytes, over all tensors, for gathering small batches before counting them
GATHERED = 1 << 16  # values of a tensor gathered from small batches: enough that a count's per-call cost fades
# Bytes of activations per inference run when the batch size is quantlab's choice: large enough that per-run costs
# (ONNX Runtime's and the binning's) fade, small enough that a batch's activations stay in the cache while binned.
ACTIVATION_BUDGET = 4 << 20
# ... unless the whole data set's activations fit in this many bytes: then it is one batch, which runs only once (the
# histogram pass bins the range pass's last batch without running it again), and that saves more than the cache costs.
ONE_BATCH_BUDGET = 16 << 20
MAX_BINS = 65536  # |x| bins; beyond, float32 edges over a small range are too close to be of any use


def check_bins(bins: int) -> None:
    """--bins must be a count the exact binning handles."""
    if not 1 <= bins <= MAX_BINS:
        raise QuantlabError(f"--bins must be between 1 and {MAX_BINS}, got {bins}")


def select_tensors(names: list[str], patterns: Sequence[str] | None) -> list[str]:
    """The names matching any of the glob patterns (all names without patterns); an unmatched pattern is an error."""
    if not patterns:
        return names
    selected = [name for name in names if any(fnmatch.fnmatchcase(name, p) for p in patterns)]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(name, p) for name in names)]
    if unmatched:
        raise QuantlabError(f"--tensors pattern(s) {', '.join(unmatched)} match no activation tensor of the model")
    return selected


def _as_float(values: np.ndarray) -> np.ndarray:
    """Flattened values; float16/bfloat16 widened to float32 (np.histogram has no half-precision path)."""
    flat = np.asarray(values).reshape(-1)
    return flat if flat.dtype in (np.float32, np.float64) else flat.astype(np.float32)


def _buffer_size(tensors: int, itemsize: int) -> int:
    """Per-tensor buffer for small batches: GATHERED values, within BUFFER_BUDGET bytes over all tensors."""
    return int(min(GATHERED, BUFFER_BUDGET // max(tensors * itemsize, 1)))


class _Runner:
    """Feeds batches through one session and hands out, per batch, the values of the tensors it measures.

    `names` are the selected tensors; `measured` the ones that hold their values (a Reshape or Transpose output holds
    its input's values, so only the input is measured); `measured_index[k]` is where names[k]'s values are measured.
    """

    def __init__(self, model_path: Path, tensors: Sequence[str] | None, threads: int) -> None:
        self.model = load_model(model_path)
        self.inputs = input_specs(self.model)
        values = value_types(self.model)
        types = tensor_types(self.model, values)
        names = activation_tensors(self.model, types)
        if not names:
            raise QuantlabError(f"{model_path}: the model has no float activation tensors to calibrate")
        self.names = select_tensors(names, tensors)
        sources = value_sources(self.model, names)
        self.measured = list(dict.fromkeys(sources[name] for name in self.names))
        self.measured_index = [self.measured.index(sources[name]) for name in self.names]
        # measured Relu output -> where its input's values are measured, when that input is not a Relu output itself
        index = {name: k for k, name in enumerate(self.measured)}
        relus = relu_inputs(self.model)
        self.relu_of = {
            index[out]: index[sources[given]]
            for out, given in relus.items()
            if out in index and sources.get(given) in index and sources[given] not in relus
        }
        self.session = create_session(with_outputs(self.model, self.measured, types), threads=threads)
        fed = {spec.name for spec in self.inputs}
        self.outputs = [name for name in self.measured if name not in fed]
        batch_dims = {spec.shape[0] if spec.has_batch_dim else None for spec in self.inputs}
        batch = batch_dims.pop() if len(batch_dims) == 1 else None
        # bytes of measured activations per sample, from the inferred shapes where they are fixed but for the batch
        self.sample_bytes = bytes_per_sample(values, self.measured, batch) if isinstance(batch, str) else None

    def fitting_batch_size(self, sample: Batch, samples: int | None) -> int:
        """Samples per run: all `samples` if their activations (those measured) fit in ONE_BATCH_BUDGET bytes, else
        (or while their number is unknown, in a stream's first read) as many as fit in ACTIVATION_BUDGET bytes, at
        least one. Per sample, the bytes the inferred shapes give, else those of a run of `sample`, the first."""
        per_sample = self.sample_bytes or sum(values.nbytes for values in self.values(sample))
        if samples is not None and per_sample * samples <= ONE_BATCH_BUDGET:
            return samples
        return max(1, ACTIVATION_BUDGET // max(per_sample, 1))

    def values(self, feed: Batch) -> list[np.ndarray]:
        produced = dict(zip(self.outputs, run_session(self.session, self.outputs, feed)))
        return [_as_float(feed[name] if name in feed else produced[name]) for name in self.measured]


@contextlib.contextmanager
def _open(
    model: str | Path,
    data: DataSource,
    tensors: Sequence[str] | None,
    threads: int,
    batch_size: int | None,
    limit: int | None,
    shard: tuple[int, int] | None,
    passes: int,
) -> Iterator[tuple[_Runner, CalibrationData]]:
    """The session and the data of one collection run of `passes` passes over the data.

    Data opened here without a batch size (from the caller or the model) is fed in batches sized by its activations
    (`fitting_batch_size`), whatever size its files or items are.
    """
    runner = _Runner(Path(model), tensors, threads)
    with open_data(data, runner.inputs, batch_size=batch_size, limit=limit, shard=shard, reread=passes > 1) as opened:
        if opened is not data and opened.batch_size is None:
            opened.size_batches_by(runner.fitting_batch_size)
        yield runner, opened


def _metadata(model: Path, runner: _Runner, data: CalibrationData, samples: int, started: float) -> dict:
    return {
        "model_name": model.name,
        "model_path": str(model.resolve()),  # where `calibrate --method auto` finds the model again
        "model_sha256": file_sha256(model),
        "tensors": len(runner.names),
        "measured_tensors": len(runner.measured),  # the others hold a measured tensor's values, rearranged
        "data": {**data.summary(), "samples": samples},
        "seconds": round(time.perf_counter() - started, 3),
    }


def collect_ranges(
    model: str | Path,
    data: DataSource,
    *,
    batch_size: int | None = None,
    limit: int | None = None,
    shard: tuple[int, int] | None = None,
    tensors: Sequence[str] | None = None,
    threads: int = 0,
    progress: Progress | None = None,
) -> TensorRanges:
    """The range pass alone: per-tensor min, max and counts over the data (or one shard of it)."""
    started = time.perf_counter()
    with _open(model, data, tensors, threads, batch_size, limit, shard, passes=1) as (runner, data), Lanes() as lanes:
        ranges = TensorRanges(runner.measured)
        samples = _run_pass(runner, data, "ranges", progress, functools.partial(ranges.update_batch, lanes=lanes))
        if samples == 0:
            raise QuantlabError("the calibration data holds no samples")
        ranges.metadata = _metadata(Path(model), runner, data, samples, started)
    return ranges


def collect(
    model: str | Path,
    data: DataSource,
    *,
    bins: int = 2048,
    batch_size: int | None = None,
    limit: int | None = None,
    tensors: Sequence[str] | None = None,
    ranges: TensorRanges | str | Path | None = None,
    shard: tuple[int, int] | None = None,
    shard_ranges: TensorRanges | None = None,
    threads: int = 0,
    progress: Progress | None = None,
) -> HistogramSet:
    """Histograms (signed, 2*bins bins over [-max|x|, +max|x|]) of every float activation tensor of `model`.

    `data` is anything `quantlab.data.open_data` takes: a directory of .npy/.npz files, a loader script
    (`"loader.py[:function]"`), a CalibrationData, a list of feeds {input name: array}, a generator of them or an
    ONNX Runtime CalibrationDataReader (read once: spilled to a temporary directory for the second pass).
    `tensors` keeps only the names matching these globs; `threads` is ONNX Runtime's intra-op thread count (0: its
    default); `progress(stage, samples, total)` is called after each batch. Without `ranges`, a range pass over the data
    comes first. With `ranges` (from `collect_ranges` over the whole data set, or its file), only the histogram pass
    runs, here over the `shard=(i, n)` part of the data: the parts then merge exactly (`HistogramSet.merge`). The
    shard's own statistics (min, max, counts) are measured again in that pass, unless `shard_ranges` gives them: the
    range pass over this same shard, as `collect_parallel` has it.
    """
    check_bins(bins)
    started = time.perf_counter()
    passes = 1 if ranges is not None else 2
    with _open(model, data, tensors, threads, batch_size, limit, shard, passes=passes) as (runner, opened), Lanes() as lanes:
        return _collect(Path(model), runner, opened, bins, ranges, shard_ranges, progress, started, lanes)


def _collect(
    model: Path,
    runner: _Runner,
    data: CalibrationData,
    bins: int,
    ranges: TensorRanges | str | Path | None,
    shard_ranges: TensorRanges | None,
    progress: Progress | None,
    started: float,
    lanes: Lanes,
) -> HistogramSet:
    """`collect` over opened data, the NumPy work of each batch in `lanes`."""
    last = _LastBatch()
    if ranges is None:
        ranges = TensorRanges(runner.measured)
        if _run_pass(runner, data, "ranges", progress, functools.partial(ranges.update_batch, lanes=lanes), last) == 0:
            raise QuantlabError("the calibration data holds no samples")
        seen = ranges
    else:
        ranges = _check_ranges(ranges, runner, model)
        seen = TensorRanges(runner.measured) if shard_ranges is None else _check_shard_ranges(shard_ranges, ranges)
        data.check_against((shard_ranges or ranges).metadata.get("data", {}))
    measuring = seen is not ranges and shard_ranges is None  # the shard's statistics, measured in this pass
    # Values are checked against ranges measured in another read: over other data, or a loader's earlier run, whose
    # values may differ (the binning takes values within the range only).
    checker = seen if measuring else TensorRanges(runner.measured) if data.reruns else None
    workspaces = [Workspace() for _ in range(lanes.count)]  # one per lane: the work arrays of the binning
    buffer = _buffer_size(len(runner.measured), 8)
    # A Relu output with its input's range has its input's edges and counts, the negative ones moved to the bin of 0:
    # derived after the pass rather than binned (in a CNN, the Relu outputs hold half the values).
    binners: list[ExactBins | None] = []
    rectified: dict[int, int] = {}
    for j in range(len(runner.measured)):
        i = runner.relu_of.get(j, j)
        if (
            i < j  # the input's binner exists (graph order)
            and ranges.dtypes[j] == ranges.dtypes[i]
            and ranges.amax(j) == ranges.amax(i)
            and not (ranges.has_nonfinite(i) or ranges.has_nonfinite(j))
            and binners[i].rectifiable()
        ):
            rectified[j] = i
            binners.append(None)
        else:
            binners.append(ExactBins(ranges.amax(j), 2 * bins, ranges.dtypes[j], buffer, workspaces[0]))
    nonfinite = [ranges.has_nonfinite(i) for i in range(len(runner.measured))]
    limits = np.array([float(ranges.amax(i)) for i in range(len(runner.measured))])

    binned = [i for i, binner in enumerate(binners) if binner is not None]
    groups: list[list[int]] = []  # the tensors each lane bins, split by size at the first batch

    def add(batch: list[np.ndarray]) -> None:
        if checker is not None:
            beyond = np.flatnonzero(checker.update_batch(batch, lanes) > limits)
            if beyond.size:
                i = int(beyond[0])
                found = f"tensor {runner.measured[i]!r} has max|x| {float(checker.amax(i)):.6g} > {limits[i]:.6g}"
                if data.reruns:
                    raise reads_differ(data.source, f"other values in this run than in an earlier one ({found})")
                raise QuantlabError(f"{found}, beyond the given ranges: collect the ranges over the same data")
        if not groups:
            groups.extend(lanes.split(binned, [batch[i].size for i in binned]))
            for lane, members in enumerate(groups):
                for i in members:
                    binners[i].workspace = workspaces[lane]

        def count(lane: int, members: list[int]) -> None:
            for i in members:
                binners[i].add(batch[i][np.isfinite(batch[i])] if nonfinite[i] else batch[i])

        lanes.run(count, groups)

    samples = _run_pass(runner, data, "histograms", progress, add, last)
    if samples == 0:
        raise QuantlabError("the calibration data holds no samples")
    counted = {}
    for i, binner in enumerate(binners):
        if binner is not None:
            binner.flush()
            counted[i] = (binner.counts, binner.zeros, binner.edges)
    for j, i in rectified.items():
        counted[j] = (*binners[i].rectified(), binners[i].edges)
    histograms = {
        name: Histogram(counted[i][0].copy(), counted[i][2], zero_count=counted[i][1], **seen.stats(i))
        for name, i in zip(runner.names, runner.measured_index)
    }
    metadata = {
        "bins": bins,
        "collection": "exact: range pass then histogram pass over [-max|x|, +max|x|], signed, 2*bins bins",
        "binned_tensors": len(runner.measured) - len(rectified),  # the others: Relu outputs, from their input's counts
        "ranges_digest": ranges.digest(),
        **_metadata(model, runner, data, samples, started),
    }
    return HistogramSet(histograms, metadata)


def _check_shard_ranges(shard_ranges: TensorRanges, ranges: TensorRanges) -> TensorRanges:
    """A shard's own range-pass result, checked to be a part of `ranges` (the same tensors, within their ranges)."""
    inside = all(shard_ranges.amax(i) <= ranges.amax(i) for i in range(len(ranges.names)))
    if shard_ranges.names != ranges.names or not inside:
        raise QuantlabError("shard_ranges are not a part of the given ranges (another model, data or --tensors filter?)")
    return shard_ranges


def _check_ranges(ranges: TensorRanges | str | Path, runner: _Runner, model: Path) -> TensorRanges:
    """Ranges loaded (from a file) and checked against this model and tensor selection."""
    if not isinstance(ranges, TensorRanges):
        ranges = TensorRanges.load(ranges)
    if ranges.metadata.get("model_sha256") not in (None, file_sha256(model)):
        raise QuantlabError(f"the ranges were collected on another model (not {model.name})")
    if ranges.names != runner.measured:
        raise QuantlabError("the ranges hold other tensors than this run (another --tensors filter?)")
    return ranges


class _LastBatch:
    """A range pass's last batch of activations and its number of batches. The histogram pass over the same data bins
    that batch first and runs only the ones before it: a data set of one batch runs once. Memory stays one batch."""

    def __init__(self) -> None:
        self.values: list[np.ndarray] | None = None
        self.samples = 0
        self.batches = 0


def _run_pass(
    runner: _Runner,
    data: CalibrationData,
    stage: str,
    progress: Progress | None,
    consume: Callable[[list[np.ndarray]], None],
    last: _LastBatch | None = None,
) -> int:
    """One pass over the data: the measured tensors of each batch go to `consume(values)`. With `last`, a pass records
    its last batch there, or, when it holds one (from the range pass), starts with it.

    Batches run one after the other: on 2 cores, overlapping inference with binning in a second thread measured ~7%
    slower (ONNX Runtime's own threads already use both cores, and the two compete).
    """
    samples = 0

    def take(values: list[np.ndarray], count: int) -> None:
        nonlocal samples
        consume(values)
        samples += count
        if progress:
            progress(stage, samples, data.num_samples)

    try:
        if last is not None and last.values is not None:
            recorded, last.values = last.values, None
            take(recorded, last.samples)
            del recorded
            feeds, last = data.batches(last.batches - 1), None
        else:
            feeds = data.batches()
        for feed in feeds:
            if last is not None:
                last.values = None  # released before the next batch runs: one batch in memory
            values, count = runner.values(feed), feed_samples(feed, runner.inputs)
            take(values, count)
            if last is not None:
                last.values, last.samples, last.batches = values, count, last.batches + 1
            del values
    except KeyboardInterrupt:
        raise QuantlabInterrupted(f"interrupted during the {stage} pass after {samples} samples; nothing written") from None
    return samples
