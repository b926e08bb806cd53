"""Collection over several processes: shard the data, run each shard, merge. Histograms add up exactly.

One code path for every executor: both passes run as N shard tasks (`collect_ranges` on shard i, then `collect` with
the merged ranges on shard i) and their results merge (ranges by min/max, histograms by adding counts). The tasks run
in local processes or as Ray tasks. The data travels as its path: a directory (each shard reads its slice of the
files) or a loader script (each shard runs the loader and keeps every n-th sample; the shards must all have read the
same number of samples, and each shard's histogram pass must read what its range pass read).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import queue
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantlab.collection import Progress, collect, collect_ranges
from quantlab.data import reads_differ
from quantlab.errors import QuantlabError
from quantlab.histogram import HistogramSet
from quantlab.ranges import TensorRanges


@dataclass(frozen=True)
class ShardJob:
    """Everything one shard task needs; plain data, so it travels to another process or a Ray worker."""

    model: str
    data: str  # a data directory or loader script
    shard: tuple[int, int]
    bins: int = 2048
    batch_size: int | None = None
    limit: int | None = None
    tensors: tuple[str, ...] | None = None
    threads: int = 1
    options: dict[str, Any] = field(default_factory=dict)
    own_ranges: TensorRanges | None = None  # this shard's range pass, once run: its histogram pass need not measure again

    def run(self, ranges: TensorRanges | None, report: Callable[[int, str, int, int | None], None] | None) -> Any:
        """The range pass on this shard (without `ranges`), else the histogram pass over `ranges`."""
        progress = None if report is None else (lambda stage, samples, total: report(self.shard[0], stage, samples, total))
        common = dict(batch_size=self.batch_size, limit=self.limit, shard=self.shard, threads=self.threads,
                      tensors=list(self.tensors) if self.tensors else None, progress=progress)
        if ranges is None:
            return collect_ranges(self.model, self.data, **common)
        return collect(self.model, self.data, bins=self.bins, ranges=ranges, shard_ranges=self.own_ranges, **common)


_updates = None  # the progress queue of a local worker process, set by its initializer


def _init_worker(updates) -> None:
    global _updates
    _updates = updates


PROGRESS_INTERVAL = 0.2  # seconds between a worker's progress reports: a queue put per batch would slow small batches


def _run_local(job: ShardJob, ranges: TensorRanges | None) -> Any:
    last = [0.0]

    def report(shard: int, stage: str, samples: int, total: int | None) -> None:
        now = time.monotonic()
        if now - last[0] >= PROGRESS_INTERVAL:
            last[0] = now
            _updates.put((shard, stage, samples, total))

    result = job.run(ranges, report)
    samples = result.metadata["data"]["samples"]
    _updates.put((job.shard[0], "ranges" if ranges is None else "histograms", samples, samples))
    return result


def shard_jobs(model: str | Path, data: str | Path, workers: int, **options: Any) -> list[ShardJob]:
    """One job per worker, each with its slice of the data and a fair share of the cores for ONNX Runtime."""
    if workers < 1:
        raise QuantlabError(f"--workers must be at least 1, got {workers}")
    threads = max(1, (os.cpu_count() or 1) // workers)
    tensors = tuple(options.pop("tensors") or ()) or None
    return [
        ShardJob(str(model), str(data), (i, workers), tensors=tensors, threads=threads, **options) for i in range(workers)
    ]


def collect_parallel(
    model: str | Path,
    data: str | os.PathLike,
    workers: int,
    *,
    bins: int = 2048,
    batch_size: int | None = None,
    limit: int | None = None,
    tensors: list[str] | None = None,
    ray_address: str | None = None,
    use_ray: bool = False,
    progress: Progress | None = None,
) -> HistogramSet:
    """`collect` with the data (a directory or loader script) split over `workers` local processes (or Ray tasks);
    bit-identical counts."""
    if not isinstance(data, (str, os.PathLike)):
        raise QuantlabError(
            f"data for workers must be a directory or a loader script, not a {type(data).__name__} (it cannot travel "
            "to other processes): write it to a directory with quantlab.save_data first"
        )
    started = time.perf_counter()
    jobs = shard_jobs(model, data, workers, bins=bins, batch_size=batch_size, limit=limit, tensors=tensors)
    executor = _RayExecutor(ray_address) if use_ray else _ProcessExecutor(workers)
    with executor:
        parts = executor.run(jobs, None, progress)
        _check_same_reads(parts)
        ranges = TensorRanges.merge(parts)
        jobs = [dataclasses.replace(job, own_ranges=part) for job, part in zip(jobs, parts)]
        merged = HistogramSet.merge(executor.run(jobs, ranges, progress))
    merged.metadata["workers"] = workers
    merged.metadata["executor"] = "ray" if use_ray else "processes"
    merged.metadata["seconds"] = round(time.perf_counter() - started, 3)
    return merged


def _check_same_reads(parts: list[TensorRanges]) -> None:
    """Each shard runs a loader script whole: all must have read as many samples (a directory's shards read slices)."""
    counts = [part.metadata["data"].get("yielded") for part in parts]
    if len(set(counts)) > 1:
        runs = ", ".join(f"{count} samples in shard {i}'s run" for i, count in enumerate(counts))
        raise reads_differ(parts[0].metadata["data"]["loader"], runs)


class _ProgressTotals:
    """Adds up what each shard reports into one figure per stage; the total is known once every shard has reported."""

    def __init__(self, progress: Progress | None, shards: int) -> None:
        self.progress = progress
        self.shards = shards
        self.reports: dict[tuple[int, str], tuple[int, int | None]] = {}

    def __call__(self, shard: int, stage: str, samples: int, total: int | None) -> None:
        self.reports[(shard, stage)] = (samples, total)
        if self.progress:
            stage_reports = [report for (_, s), report in self.reports.items() if s == stage]
            totals = [t for _, t in stage_reports]
            known = len(totals) == self.shards and None not in totals
            self.progress(stage, sum(n for n, _ in stage_reports), sum(totals) if known else None)


class _ProcessExecutor:
    """Shard tasks in a pool of local processes (spawned: ONNX Runtime and threads do not survive a fork)."""

    def __init__(self, workers: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.updates = context.Queue()
        self.pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(self.updates,))

    def __enter__(self) -> _ProcessExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(cancel_futures=True)

    def run(self, jobs: list[ShardJob], ranges: TensorRanges | None, progress: Progress | None) -> list[Any]:
        totals = _ProgressTotals(progress, len(jobs))
        futures = [self.pool.submit(_run_local, job, ranges) for job in jobs]
        pending: set[Future] = set(futures)
        while pending:
            _, pending = wait(pending, timeout=0.1)
            while True:
                try:
                    totals(*self.updates.get_nowait())
                except queue.Empty:
                    break
        return [future.result() for future in futures]


class _RayExecutor:
    """Shard tasks as Ray tasks, on the cluster at `address` (or a local Ray started on demand)."""

    def __init__(self, address: str | None) -> None:
        try:
            import ray
        except ImportError:
            raise QuantlabError("--ray needs Ray: pip install 'quantlab[ray]'") from None
        self.ray = ray
        self.address = address

    def __enter__(self) -> _RayExecutor:
        if not self.ray.is_initialized():
            self.ray.init(address=self.address, ignore_reinit_error=True, log_to_driver=False)
        self.task = self.ray.remote(_run_ray_task)
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def run(self, jobs: list[ShardJob], ranges: TensorRanges | None, progress: Progress | None) -> list[Any]:
        futures = [self.task.remote(job, ranges) for job in jobs]
        results: list[Any] = [None] * len(futures)
        remaining = list(futures)
        while remaining:
            done, remaining = self.ray.wait(remaining, num_returns=1)
            results[futures.index(done[0])] = self.ray.get(done[0])
            if progress:  # Ray reports whole shards: the samples of the shards finished so far
                samples = sum(r.metadata["data"]["samples"] for r in results if r is not None)
                progress("ranges" if ranges is None else "histograms", samples, None)
        return results


def _run_ray_task(job: ShardJob, ranges: TensorRanges | None) -> Any:
    return job.run(ranges, None)
