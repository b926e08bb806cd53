"""Calibration inputs, from wherever the user has them, checked against the model and streamed as batches.

`open_data` is the one place that decides what a `data` argument is:

- a directory of `.npy` / `.npz` files (a `str` or `Path`): every file is checked from its headers before anything
  runs, then read in sorted order, one at a time (memory-mapped when large);
- a data-loader script, `"loader.py"` or `"loader.py:function"` (`load_data` unless named; Polygraphy's convention,
  see `quantlab.loaders`): the function runs again for each read, and each read after the first is checked against
  the first (samples yielded, their shapes and values), so that a loader whose samples differ between runs is
  reported rather than quietly mixed into the histograms;
- a list or tuple of feeds: every item is checked before anything runs;
- any other iterable, such as a generator or an ONNX Runtime `CalibrationDataReader` (`get_next()` until None): read
  once, each item checked as it comes. Where the data is read again (collection makes two passes), the first read also
  writes the samples to a temporary directory of `.npy`/`.npz` files ("spills" them), and later reads read that.

A file holds, and an item is, a dict {input name: array} or, for a single-input model, a bare array (`.npy`). Each
array is one sample or a stack of samples along a new first axis; for an input with a batch dim, one sample is the
input without it, so a stack is a batch (`InputSpec.has_batch_dim`). Files and items pass the same checks
(`CalibrationData._check_arrays`) and are regrouped into batches of `batch_size` samples; a model with an input that
has no batch dim (a recurrent state, a scalar) runs its samples one at a time. Memory holds one item and one batch,
whatever the source and the size of the data set.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import itertools
import os
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np

from quantlab.atomic import atomic_directory
from quantlab.errors import QuantlabError, reading
from quantlab.loaders import LoaderScript
from quantlab.model import InputSpec, input_specs, load_model

Batch = dict[str, np.ndarray]
Progress = Callable[[str, int, "int | None"], None]  # (stage, samples done, samples in all or None while unknown)
# Files larger than this are memory-mapped, so a file of many samples never sits in memory whole.
_MMAP_THRESHOLD = 64 << 20
_ITEM_DIGITS = 8  # written items are named by their index, zero-padded so that sorted order is item order


@dataclass(frozen=True)
class _NpyHeader:
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    data_offset: int  # bytes from the start of the .npy (or of the .npz member) to the data


@functools.lru_cache(maxsize=256)
def _parse_npy_header(raw: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) from a whole .npy header, by np.lib.format's own parser."""
    stream = io.BytesIO(raw)
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(stream)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(stream)
    raise ValueError(f"unsupported .npy version {version}")


def _read_npy_header(handle) -> _NpyHeader:
    """The header of the .npy that starts at the handle's position. Each distinct header is parsed once: parsing costs
    more than reading a small file, and the files of a calibration set mostly share one header."""
    start = handle.read(8)  # magic string and version
    length = handle.read(2 if start[6:7] == b"\x01" else 4)  # a 2-byte header length in version 1, 4 bytes after
    raw = start + length + handle.read(int.from_bytes(length, "little"))
    shape, fortran_order, dtype = _parse_npy_header(raw)
    return _NpyHeader(shape, dtype, fortran_order, len(raw))


def _peek(path: Path) -> dict[str, _NpyHeader]:
    """Array name -> header of a data file, from its headers only."""
    with reading(path, f"not a readable {path.suffix} file"):
        if path.suffix == ".npy":
            with open(path, "rb") as handle:
                return {"": _read_npy_header(handle)}
        with zipfile.ZipFile(path) as archive:
            arrays = {}
            for member in archive.namelist():
                if not member.endswith(".npy"):
                    raise ValueError(f"member {member} is not an array")
                with archive.open(member) as handle:
                    arrays[member[: -len(".npy")]] = _read_npy_header(handle)
            return arrays


def _read_npy(path: Path, header: _NpyHeader, large: bool) -> np.ndarray:
    """The data of a .npy whose header was read at scan time, read straight into its array: np.load would parse the
    header again, which costs more than the read itself for the small files calibration sets are often made of.
    Memory-mapped when large."""
    if large:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    values = np.empty(header.shape, header.dtype, order="F" if header.fortran_order else "C")
    with open(path, "rb", buffering=0) as handle:
        handle.seek(header.data_offset)
        read = handle.readinto(values.ravel(order="K").view(np.uint8))
    if read != values.nbytes:
        raise ValueError(f"file is truncated: {read} of {values.nbytes} data bytes")
    return values


@dataclass(frozen=True)
class _FilePlan:
    """A data file, checked from its headers."""

    path: Path
    samples: int
    stacked: dict[str, bool]  # per input: the array holds a stack of samples along its first axis
    header: _NpyHeader | None  # of a .npy file
    large: bool  # over _MMAP_THRESHOLD: memory-mapped

    def load(self) -> Batch:
        """The file's arrays, stacked along a first axis. The headers were checked before the run; the data behind
        them is read (and CRC-checked) only now."""
        with reading(self.path, f"not a readable {self.path.suffix} file"):
            if self.header is not None:
                (name,) = self.stacked
                arrays = {name: _read_npy(self.path, self.header, self.large)}
            else:
                with np.load(self.path, allow_pickle=False) as npz:
                    arrays = {name: npz[name] for name in npz.files}
        return {name: (a if self.stacked[name] else a[np.newaxis]) for name, a in arrays.items()}


@dataclass(frozen=True)
class _ArrayPlan:
    """An item of a list or tuple of feeds, checked and stacked along a first axis up front."""

    arrays: Batch
    samples: int

    def load(self) -> Batch:
        return self.arrays


class _Read:
    """What one read of a stream yielded: its samples up to the limit, the items and samples kept (the shard's), and,
    where reads are compared (a loader's), digests of the kept samples' shapes and values."""

    def __init__(self, digests: bool) -> None:
        self.yielded = 0
        self.items = 0
        self.kept = 0
        self._shapes = hashlib.blake2b(digest_size=16) if digests else None
        self._values = hashlib.blake2b(digest_size=16) if digests else None

    def keep(self, arrays: Batch) -> None:
        self.items += 1
        self.kept += _samples_in(arrays)
        if self._shapes is not None:
            for name, values in arrays.items():
                self._shapes.update(f"{name} {values.dtype.str} {values.shape};".encode())
                self._values.update(np.ascontiguousarray(values))

    def record(self, shard: tuple[int, int] | None) -> dict[str, Any]:
        """For the data summary (the metadata of what was collected), and what later reads are checked against."""
        record: dict[str, Any] = {"yielded": self.yielded}
        if self._shapes is not None:
            digests = {"shapes": self._shapes.hexdigest(), "values": self._values.hexdigest()}
            record["digests"] = {"shard": list(shard) if shard else None, **digests}
        return record


class CalibrationData:
    """The calibration set of one model, from any source `open_data` accepts, checked against the model's inputs.

    Iterating yields feeds {input name: array} of up to `batch_size` samples, a feed never mixing samples of different
    shapes (a dynamic dim may vary between items); with `batch_size=None` each item (a file, a yielded feed) is one
    feed, as stored, unless `size_batches_by` lets the first read choose. `limit` stops after that many samples.
    `shard=(i, n)` keeps the i-th of n near-equal parts of those samples, for collecting in several processes: a
    contiguous slice where their number is known before reading (a directory, a list), else every n-th sample from the
    i-th (a stream, which each shard reads whole, up to the limit). `reread=False` tells that the data will be read
    once, so a one-shot iterable need not be spilled. Leaving it as a context manager removes the spilled files.
    """

    def __init__(
        self,
        data: DataSource,
        inputs: list[InputSpec],
        batch_size: int | None = None,
        limit: int | None = None,
        shard: tuple[int, int] | None = None,
        *,
        reread: bool = True,
    ) -> None:
        self.inputs = inputs
        if batch_size is not None and batch_size < 1:
            raise QuantlabError(f"--batch-size must be at least 1, got {batch_size}")
        if limit is not None and limit < 1:
            raise QuantlabError(f"--limit must be at least 1, got {limit}")
        if shard is not None and not (shard[1] >= 1 and 0 <= shard[0] < shard[1]):
            raise QuantlabError(f"--shard {shard[0]}/{shard[1]}: expected I/N with 0 <= I < N")
        # Samples batch only where every input has a batch dim; a fixed one sets the batch size.
        self.batchable = all(spec.has_batch_dim for spec in inputs)
        fixed = {spec.shape[0] for spec in inputs if spec.has_batch_dim and isinstance(spec.shape[0], int)}
        self.batch_size = fixed.pop() if batch_size is None and len(fixed) == 1 else batch_size
        if not self.batchable:
            self.batch_size = 1
        self._check_batch_dims(batch_size)
        self.limit, self.shard = limit, shard
        self.reruns = False  # each read runs the source again (a loader script), so reads may differ
        self._plans: list[_FilePlan] | list[_ArrayPlan] | None = None  # a directory's files or a list's items
        self._read: Callable[[], Iterator[Any]] | None = None  # otherwise: starts a read of the stream
        self._spill: tempfile.TemporaryDirectory | None = None
        self._reference: dict[str, Any] | None = None  # the read that a loader's later reads must repeat
        self._last_read: dict[str, Any] = {}
        self._fit_batches: Callable[[Batch, int | None], int] | None = None
        self._open_source(data, reread)
        self._place()

    def _open_source(self, data: DataSource, reread: bool) -> None:
        """What `data` is (see the module docstring): its name for messages (`source`) and the metadata (`origin`),
        and how it is read: planned up front, or streamed."""
        if isinstance(data, (str, os.PathLike)):
            script = LoaderScript.parse(data)
            if script is None:
                self.source = str(data)
                self._plans = self._scan(Path(data))
                self.origin = {"directory": self.source, "files": len(self._plans)}
            else:
                script.loader  # imported now: a missing script or function is reported before anything runs
                self.source, self.reruns, self._read = str(script), True, script.run
                self.origin = {"loader": self.source}
        elif isinstance(data, Mapping):
            raise QuantlabError("data is one feed (a dict); pass an iterable of feeds, e.g. [feed]")
        elif isinstance(data, (list, tuple)):
            self.source = type(data).__name__
            self.origin = {"list": len(data)}
            self._plans = self._check_items(data)
        elif callable(getattr(data, "get_next", None)):  # ONNX Runtime's CalibrationDataReader (without importing it)
            self._read_once(iter(data.get_next, None), type(data).__name__, reread)
        elif isinstance(data, Iterable):
            self._read_once(iter(data), type(data).__name__, reread)
        else:
            raise QuantlabError(
                "data must be a directory, a loader script (loader.py[:function]) or an iterable of feeds, "
                f"not a {type(data).__name__}"
            )

    def _place(self) -> None:
        """The planned samples kept, [start, stop); a stream's number is known after its first read."""
        self.num_samples: int | None = None
        if self._plans is None:
            return
        available = sum(plan.samples for plan in self._plans)
        total = min(available, self.limit) if self.limit else available
        index, count = self.shard or (0, 1)
        self.start, self.stop = index * total // count, (index + 1) * total // count
        self.num_samples = self.stop - self.start

    def _read_once(self, values: Iterator[Any], name: str, reread: bool) -> None:
        """A one-shot iterable: read once; spilled while it is, where it will be read again."""
        self.source, self.origin = name, {"iterable": name}
        if reread:
            self._spill = tempfile.TemporaryDirectory(prefix="quantlab-data-")
        unread = [values]

        def read() -> Iterator[Any]:
            if not unread:
                raise QuantlabError(
                    f"{name} can be read only once and was read before: pass a list, or a loader script (which runs again)"
                )
            return unread.pop()

        self._read = read

    def _check_batch_dims(self, requested: int | None) -> None:
        """A requested batch size must fit every input: a fixed batch dim, or none (samples then run alone)."""
        if requested in (None, 1):
            return
        for spec in self.inputs:
            if not spec.has_batch_dim:
                raise QuantlabError(
                    f"--batch-size {requested} does not fit input {spec.describe()}, which has no batch dimension "
                    "(its samples run one at a time)"
                )
            fixed = spec.shape[0]
            if isinstance(fixed, int) and fixed != requested:
                raise QuantlabError(
                    f"--batch-size {requested} does not fit input {spec.name!r}, whose batch dimension is fixed to {fixed}"
                )

    def _scan(self, directory: Path) -> list[_FilePlan]:
        if not directory.is_dir():
            raise QuantlabError(f"{directory}: data directory not found")
        files = sorted(p for p in directory.iterdir() if not p.name.startswith("."))
        if not files:
            raise QuantlabError(f"{directory}: data directory is empty (expected .npy or .npz files)")
        for path in files:
            if path.suffix not in (".npy", ".npz") or not path.is_file():
                raise QuantlabError(f"{path}: not a .npy or .npz file (a data directory holds only those)")
        if len(self.inputs) > 1 and any(p.suffix == ".npy" for p in files):
            raise QuantlabError(f"{directory}: the model has several inputs ({self._names()}); use .npz files keyed by input name")
        return [self._plan(path) for path in files]

    def _plan(self, path: Path) -> _FilePlan:
        arrays = _peek(path)
        if path.suffix == ".npy":
            arrays = {self.inputs[0].name: arrays[""]}
        stacked, samples = self._check_arrays(str(path), arrays)
        header = arrays[self.inputs[0].name] if path.suffix == ".npy" else None
        return _FilePlan(path, samples, stacked, header, path.stat().st_size > _MMAP_THRESHOLD)

    def _check_items(self, items: list | tuple) -> list[_ArrayPlan]:
        if not items:
            raise QuantlabError(f"the {type(items).__name__} of feeds is empty")
        plans, offset = [], 0
        for index, item in enumerate(items):
            arrays, samples = self._stack(self._where(index, offset), item)
            plans.append(_ArrayPlan(arrays, samples))
            offset += samples
        return plans

    def _where(self, index: int, offset: int) -> str:
        """An item, for messages: its index, and the index of its first sample where that differs."""
        return f"{self.source} item {index}" + (f" (samples from {offset})" if offset != index else "")

    def _stack(self, where: str, item: Any) -> tuple[Batch, int]:
        """A yielded item as arrays stacked along a first axis, checked as a file's are; and its number of samples."""
        if isinstance(item, Mapping):
            arrays = {str(name): np.asarray(value) for name, value in item.items()}
        elif isinstance(item, np.ndarray) or hasattr(item, "__array__"):
            if len(self.inputs) > 1:
                raise QuantlabError(f"{where}: an array, but the model has several inputs ({self._names()}); yield dicts keyed by input name")
            arrays = {self.inputs[0].name: np.asarray(item)}
        else:
            raise QuantlabError(
                f"{where}: a {type(item).__name__}, expected a dict of input name -> array (or an array, for a single-input model)"
            )
        stacked, samples = self._check_arrays(where, arrays)
        return {name: (a if stacked[name] else a[np.newaxis]) for name, a in arrays.items()}, samples

    def _names(self) -> str:
        return ", ".join(spec.name for spec in self.inputs)

    def _check_arrays(self, where: str, arrays: Mapping[str, Any]) -> tuple[dict[str, bool], int]:
        """Whether each array (anything with `.shape` and `.dtype`: a header, an array) is a stack of samples, and how
        many samples they hold; one-line errors naming `where` (a file, an item) for names, dtypes and shapes the model
        does not take."""
        expected = {spec.name for spec in self.inputs}
        if set(arrays) != expected:
            missing, extra = sorted(expected - set(arrays)), sorted(set(arrays) - expected)
            parts = ([f"missing input(s) {', '.join(missing)}"] if missing else []) + (
                [f"unknown name(s) {', '.join(extra)}"] if extra else []
            )
            raise QuantlabError(f"{where}: {'; '.join(parts)} (model inputs: {', '.join(sorted(expected))})")
        stacked, samples = {}, {}
        for spec in self.inputs:
            shape, dtype = tuple(arrays[spec.name].shape), arrays[spec.name].dtype
            if dtype != spec.dtype:
                raise QuantlabError(f"{where}: input {spec.name!r} has dtype {dtype}, the model expects {spec.dtype}")
            stacked[spec.name] = len(shape) == len(spec.sample_shape) + 1
            sample_shape = shape[1:] if stacked[spec.name] else shape
            if len(sample_shape) != len(spec.sample_shape):
                expected = "one sample without the batch dim, or a batch" if spec.has_batch_dim else "one sample, or a stack of samples"
                raise QuantlabError(f"{where}: input {spec.name!r} has shape {shape}, the model expects {spec.describe()} ({expected})")
            offset = 1 if spec.has_batch_dim else 0
            for axis, (got, want) in enumerate(zip(sample_shape, spec.sample_shape), start=offset):
                if isinstance(want, int) and got != want:
                    raise QuantlabError(
                        f"{where}: input {spec.name!r} has shape {shape}, the model expects {spec.describe()} (dim {axis})"
                    )
            samples[spec.name] = shape[0] if stacked[spec.name] else 1
        if len(set(samples.values())) != 1:
            counts = ", ".join(f"{name} {count}" for name, count in samples.items())
            raise QuantlabError(f"{where}: inputs hold different numbers of samples ({counts})")
        return stacked, next(iter(samples.values()))

    def size_batches_by(self, fit: Callable[[Batch, int | None], int]) -> None:
        """Let the first read choose the batch size: `fit(its first sample as a feed, the number of samples, or None
        while a stream's is unknown)`. A stream's first sample is known only once it is read."""
        self._fit_batches = fit

    def check_against(self, summary: Mapping[str, Any]) -> None:
        """Check each read of a loader against the data summary of an earlier read of the same data (the metadata of
        a range pass, a shard's in another process): the samples yielded, and, for the same shard, their shapes and
        values."""
        if self.reruns and "yielded" in summary:
            self._reference = dict(summary)

    def summary(self) -> dict:
        """What was fed: for the metadata of what is collected from it."""
        return {
            **self.origin,
            **self._last_read,
            "samples": self.num_samples,
            "shard": list(self.shard) if self.shard else None,
            "batch_size": self.batch_size,
            "inputs": [spec.describe() for spec in self.inputs],
        }

    def __len__(self) -> int:
        if self.num_samples is None:
            raise TypeError(f"the number of samples of {self.source} is known only once it has been read")
        return self.num_samples

    def __enter__(self) -> CalibrationData:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove the spilled files of a one-shot iterable, if any."""
        if self._spill is not None:
            self._spill.cleanup()

    def first_sample(self) -> Batch:
        """The first sample (of the shard), as a feed of one. A stream is read up to it: a one-shot iterable cannot
        be read again after."""
        items = self._items()
        first = next(items, None)
        items.close()
        if first is None:
            raise QuantlabError("the calibration data holds no samples")
        return self._feed({name: a[:1] for name, a in first.items()})

    def _feed(self, stacks: Batch) -> Batch:
        """The model's feed for samples stacked along a first axis: the stack itself where the input has a batch dim,
        its one sample where it has none (such data runs a sample at a time). Contiguous, as ONNX Runtime wants."""
        return {
            spec.name: np.ascontiguousarray(stacks[spec.name] if spec.has_batch_dim else stacks[spec.name][0])
            for spec in self.inputs
        }

    def _items(self) -> Iterator[Batch]:
        """The samples kept, stacked along a first axis, a dict per file or item."""
        return self._planned_items() if self._plans is not None else self._streamed_items()

    def _planned_items(self) -> Iterator[Batch]:
        offset = 0  # index of the first sample of the current file or item
        for plan in self._plans:
            begin, end = max(self.start - offset, 0), min(self.stop - offset, plan.samples)
            offset += plan.samples
            if begin < end:
                yield {name: a[begin:end] for name, a in plan.load().items()}
            elif offset >= self.stop:
                break

    def _streamed_items(self) -> Iterator[Batch]:
        """One read of a stream, each item checked as it comes; the items kept are spilled where they are to be read
        again. A complete read is then checked (`_finish_read`)."""
        read = _Read(digests=self.reruns)
        spill = Path(self._spill.name) if self._spill is not None else None
        values = self._read()
        try:
            for index, value in enumerate(values):
                arrays, count = self._stack(self._where(index, read.yielded), value)
                taken = count if self.limit is None else min(count, self.limit - read.yielded)
                kept = self._kept(arrays, read.yielded, taken)
                read.yielded += taken
                if kept is not None:
                    if spill is not None:
                        _write_item(spill, read.items, kept)
                    read.keep(kept)
                    yield kept
                if read.yielded == self.limit:
                    break
        finally:
            close = getattr(values, "close", None)
            if close is not None:
                close()
        self._finish_read(read)

    def _kept(self, arrays: Batch, offset: int, taken: int) -> Batch | None:
        """The samples of an item (its first `taken`, within the limit) that the shard keeps: every n-th sample of the
        stream from the i-th. None where it keeps none."""
        index, count = self.shard or (0, 1)
        first = (index - offset) % count
        if first >= taken:
            return None
        return {name: a[first:taken:count] for name, a in arrays.items()}

    def _finish_read(self, read: _Read) -> None:
        """A complete read of a stream: an empty one is an error; a loader's must repeat the first (or the reference
        given); a spilled one leaves its directory to be read from then on."""
        if read.yielded == 0:
            raise QuantlabError(f"{self.source} yielded no samples")
        record = read.record(self.shard)
        if self._reference is None:
            self._reference = record
        else:
            self._check_same(record)
        self._last_read = record
        self.num_samples = read.kept
        if self._spill is not None and read.kept:
            self._plans = self._scan(Path(self._spill.name))
            self.start, self.stop, self._read = 0, read.kept, None

    def _check_same(self, read: dict[str, Any]) -> None:
        reference = self._reference
        if reference["yielded"] != read["yielded"]:
            raise reads_differ(self.source, f"{read['yielded']} samples in this run and {reference['yielded']} in an earlier one")
        ours, theirs = read.get("digests"), reference.get("digests")
        if ours and theirs and ours["shard"] == theirs["shard"]:
            for kind, what in (("shapes", "samples of other shapes"), ("values", "other values")):
                if ours[kind] != theirs[kind]:
                    raise reads_differ(self.source, f"{what} in this run than in an earlier one")

    def __iter__(self) -> Iterator[Batch]:
        return self.batches()

    def batches(self, count: int | None = None) -> Iterator[Batch]:
        """The feeds, or only the first `count` of them. A stream is still read to its end (the rest not batched), so
        that the read is complete: checked against the first, spilled whole."""
        if count == 0:
            return
        streamed = self._plans is None
        items = self._items()
        feeds = self._batched(items)
        yield from feeds if count is None else itertools.islice(feeds, count)
        if streamed:
            for _ in items:
                pass

    def _batched(self, items: Iterator[Batch]) -> Iterator[Batch]:
        first = next(items, None)
        if first is None:
            return
        if self.batch_size is None and self._fit_batches is not None:
            self.batch_size = self._fit_batches(self._feed({name: a[:1] for name, a in first.items()}), self.num_samples)
        items = itertools.chain([first], items)
        if self.batch_size is None:
            yield from map(self._feed, items)
            return
        pending: list[Batch] = []
        pending_samples = 0
        for arrays in items:
            if pending and _sample_shapes(arrays) != _sample_shapes(pending[0]):
                yield self._feed(_concat(pending))
                pending, pending_samples = [], 0
            begin, end = 0, _samples_in(arrays)
            while begin < end:
                step = min(self.batch_size - pending_samples, end - begin)
                pending.append({name: a[begin : begin + step] for name, a in arrays.items()})
                pending_samples += step
                begin += step
                if pending_samples == self.batch_size:
                    yield self._feed(_concat(pending))
                    pending, pending_samples = [], 0
        if pending:
            yield self._feed(_concat(pending))

    def save(self, directory: str | os.PathLike, progress: Progress | None = None) -> Path:
        """Write the samples kept (of the shard, within the limit) to `directory`, new or empty: one `.npy`
        (single-input model) or `.npz` file per file or item, in order, each a stack of samples. Atomic: the files go
        to a temporary directory beside it, renamed once all are written."""
        samples = 0
        with atomic_directory(directory) as written:
            for index, arrays in enumerate(self._items()):
                _write_item(written, index, arrays)
                samples += _samples_in(arrays)
                if progress:
                    progress("read", samples, self.num_samples)
        return Path(directory)


# Anything `open_data` accepts: a data directory or loader script, a CalibrationData, an iterable of feeds.
DataSource = Union[str, os.PathLike, CalibrationData, Iterable[Any]]


@contextlib.contextmanager
def open_data(data: DataSource, inputs: list[InputSpec], **options: Any) -> Iterator[CalibrationData]:
    """`data` as the CalibrationData of a model with these inputs, for the length of a `with` block: the one place
    that decides what a data argument is (see the module docstring). A CalibrationData is used as it is and stays the
    caller's; any other source is opened with CalibrationData's options (batch_size, limit, shard, reread), and what
    it spilled is removed at the end."""
    if isinstance(data, CalibrationData):
        yield data
        return
    with CalibrationData(data, inputs, **options) as opened:
        yield opened


def save_data(
    model: str | os.PathLike,
    data: DataSource,
    directory: str | os.PathLike,
    *,
    limit: int | None = None,
    progress: Progress | None = None,
) -> CalibrationData:
    """Read `data` once (run a loader script, exhaust a generator), check every item against the inputs of `model`,
    and write the samples to `directory` (new or empty) as `.npy`/`.npz` files: every later run then reads the same
    samples, and shards split them by file. Returns the written directory as CalibrationData."""
    inputs = input_specs(load_model(model))
    with open_data(data, inputs, limit=limit, reread=False) as opened:
        opened.save(directory, progress)
    return CalibrationData(directory, inputs)


def reads_differ(source: str, what: str) -> QuantlabError:
    """The error for a data loader whose runs differ: in one of them it yielded `what`."""
    return QuantlabError(
        f"{source} yielded {what}: a data loader must yield the same samples on every run (seed any randomness), or "
        "write them to a directory once with `quantlab save-data`"
    )


def feed_samples(feed: Batch, inputs: list[InputSpec]) -> int:
    """Samples in a feed: the batch dim of an input that has one, else 1 (the inputs are one sample)."""
    for spec in inputs:
        if spec.has_batch_dim and spec.name in feed:
            return len(feed[spec.name])
    return 1


def _samples_in(stacks: Batch) -> int:
    """Samples in arrays stacked along a first axis (every input's holds the same number)."""
    return len(next(iter(stacks.values())))


def _write_item(directory: Path, index: int, stacks: Batch) -> None:
    """Samples stacked along a first axis as the `index`-th file of a data directory: `.npy` for a single input,
    `.npz` keyed by input name for several."""
    if index >= 10**_ITEM_DIGITS:
        raise QuantlabError(f"more than 10^{_ITEM_DIGITS} items to write: yield the samples in batches")
    path = directory / f"{index:0{_ITEM_DIGITS}d}"
    if len(stacks) == 1:
        np.save(path.with_suffix(".npy"), next(iter(stacks.values())))
    else:
        np.savez(path.with_suffix(".npz"), **stacks)


def _sample_shapes(feed: Batch) -> dict[str, tuple[int, ...]]:
    return {name: a.shape[1:] for name, a in feed.items()}


def _concat(parts: list[Batch]) -> Batch:
    if len(parts) == 1:
        return parts[0]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
