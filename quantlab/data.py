"""Calibration inputs: a directory of `.npy` / `.npz` files, validated against the model, streamed as batches.

A `.npy` file feeds a single-input model; a `.npz` file holds one array per input name. Each array is one sample
or a stack of samples along a new first axis; for an input with a batch dim, one sample is the input without it, so a
stack is a batch (`InputSpec.has_batch_dim`). Files are read in sorted order, one at a time (memory-mapped where
possible), and regrouped into batches of `batch_size` samples; a model with an input that has no batch dim (a
recurrent state, a scalar) runs its samples one at a time.
"""

from __future__ import annotations

import functools
import io
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quantlab.errors import QuantlabError, reading
from quantlab.model import InputSpec

Batch = dict[str, np.ndarray]
# Files larger than this are memory-mapped, so a file of many samples never sits in memory whole.
_MMAP_THRESHOLD = 64 << 20


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
    path: Path
    samples: int
    stacked: dict[str, bool]  # per input: the array holds a stack of samples along its first axis
    header: _NpyHeader | None  # of a .npy file
    large: bool  # over _MMAP_THRESHOLD: memory-mapped


class CalibrationData:
    """The calibration set of one model: every file checked against the model's inputs before anything runs.

    Iterating yields feeds `{input name: array}` of up to `batch_size` samples, a feed never mixing samples of
    different shapes (a dynamic dim may vary between files); with `batch_size=None` each file is one feed, as stored.
    `limit` stops after that many samples. `shard=(i, n)` keeps the i-th of n contiguous, near-equal slices of those
    samples (for collecting in several processes).
    """

    def __init__(
        self,
        directory: str | Path,
        inputs: list[InputSpec],
        batch_size: int | None = None,
        limit: int | None = None,
        shard: tuple[int, int] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.inputs = inputs
        if batch_size is not None and batch_size < 1:
            raise QuantlabError(f"--batch-size must be at least 1, got {batch_size}")
        if limit is not None and limit < 1:
            raise QuantlabError(f"--limit must be at least 1, got {limit}")
        # Samples batch only where every input has a batch dim; a fixed one sets the batch size.
        self.batchable = all(spec.has_batch_dim for spec in inputs)
        fixed = {spec.shape[0] for spec in inputs if spec.has_batch_dim and isinstance(spec.shape[0], int)}
        self.batch_size = fixed.pop() if batch_size is None and len(fixed) == 1 else batch_size
        if not self.batchable:
            self.batch_size = 1
        self._check_batch_dims(batch_size)
        self._plans = self._scan()
        available = sum(plan.samples for plan in self._plans)
        total = min(available, limit) if limit else available
        self.shard = shard
        if shard is None:
            self.start, self.stop = 0, total
        else:
            index, count = shard
            if not (count >= 1 and 0 <= index < count):
                raise QuantlabError(f"--shard {index}/{count}: expected I/N with 0 <= I < N")
            self.start, self.stop = index * total // count, (index + 1) * total // count
        self.num_samples = self.stop - self.start

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

    def _scan(self) -> list[_FilePlan]:
        if not self.directory.is_dir():
            raise QuantlabError(f"{self.directory}: data directory not found")
        files = sorted(p for p in self.directory.iterdir() if not p.name.startswith("."))
        if not files:
            raise QuantlabError(f"{self.directory}: data directory is empty (expected .npy or .npz files)")
        for path in files:
            if path.suffix not in (".npy", ".npz") or not path.is_file():
                raise QuantlabError(f"{path}: not a .npy or .npz file (a data directory holds only those)")
        if len(self.inputs) > 1 and any(p.suffix == ".npy" for p in files):
            names = ", ".join(spec.name for spec in self.inputs)
            raise QuantlabError(f"{self.directory}: the model has several inputs ({names}); use .npz files keyed by input name")
        return [self._plan(path) for path in files]

    def _plan(self, path: Path) -> _FilePlan:
        arrays = _peek(path)
        if path.suffix == ".npy":
            arrays = {self.inputs[0].name: arrays[""]}
        expected = {spec.name for spec in self.inputs}
        if set(arrays) != expected:
            missing, extra = sorted(expected - set(arrays)), sorted(set(arrays) - expected)
            parts = ([f"missing input(s) {', '.join(missing)}"] if missing else []) + (
                [f"unknown name(s) {', '.join(extra)}"] if extra else []
            )
            raise QuantlabError(f"{path}: {'; '.join(parts)} (model inputs: {', '.join(sorted(expected))})")
        stacked, samples = {}, {}
        for spec in self.inputs:
            shape, dtype = arrays[spec.name].shape, arrays[spec.name].dtype
            if dtype != spec.dtype:
                raise QuantlabError(f"{path}: input {spec.name!r} has dtype {dtype}, the model expects {spec.dtype}")
            stacked[spec.name] = len(shape) == len(spec.sample_shape) + 1
            sample_shape = shape[1:] if stacked[spec.name] else shape
            if len(sample_shape) != len(spec.sample_shape):
                expected = "one sample without the batch dim, or a batch" if spec.has_batch_dim else "one sample, or a stack of samples"
                raise QuantlabError(f"{path}: input {spec.name!r} has shape {shape}, the model expects {spec.describe()} ({expected})")
            offset = 1 if spec.has_batch_dim else 0
            for axis, (got, want) in enumerate(zip(sample_shape, spec.sample_shape), start=offset):
                if isinstance(want, int) and got != want:
                    raise QuantlabError(
                        f"{path}: input {spec.name!r} has shape {shape}, the model expects {spec.describe()} (dim {axis})"
                    )
            samples[spec.name] = shape[0] if stacked[spec.name] else 1
        if len(set(samples.values())) != 1:
            counts = ", ".join(f"{name} {count}" for name, count in samples.items())
            raise QuantlabError(f"{path}: inputs hold different numbers of samples ({counts})")
        header = arrays[self.inputs[0].name] if path.suffix == ".npy" else None
        count = next(iter(samples.values()))
        return _FilePlan(path, count, stacked, header, path.stat().st_size > _MMAP_THRESHOLD)

    def summary(self) -> dict:
        """What was fed: for the histogram file's metadata."""
        return {
            "directory": str(self.directory),
            "files": len(self._plans),
            "samples": self.num_samples,
            "shard": list(self.shard) if self.shard else None,
            "batch_size": self.batch_size,
            "inputs": [spec.describe() for spec in self.inputs],
        }

    def _load(self, plan: _FilePlan) -> Batch:
        # The headers were checked before the run; the data behind them is read (and CRC-checked) only now.
        with reading(plan.path, f"not a readable {plan.path.suffix} file"):
            if plan.header is not None:
                arrays = {self.inputs[0].name: _read_npy(plan.path, plan.header, plan.large)}
            else:
                with np.load(plan.path, allow_pickle=False) as npz:
                    arrays = {name: npz[name] for name in npz.files}
        return {name: (a if plan.stacked[name] else a[np.newaxis]) for name, a in arrays.items()}

    def __len__(self) -> int:
        return self.num_samples

    def first_sample(self) -> Batch:
        """The first sample (of the shard), as a feed of one."""
        if self.num_samples == 0:
            raise QuantlabError("the calibration data holds no samples")
        offset = 0
        for plan in self._plans:
            if self.start < offset + plan.samples:
                index = self.start - offset
                return self._feed({name: a[index : index + 1] for name, a in self._load(plan).items()})
            offset += plan.samples
        raise AssertionError("start lies within the samples")

    def _feed(self, stacks: Batch) -> Batch:
        """The model's feed for samples stacked along a first axis: the stack itself where the input has a batch dim,
        its one sample where it has none (such data runs a sample at a time). Contiguous, as ONNX Runtime wants."""
        return {
            spec.name: np.ascontiguousarray(stacks[spec.name] if spec.has_batch_dim else stacks[spec.name][0])
            for spec in self.inputs
        }

    def _files(self) -> Iterator[Batch]:
        """The samples of each file within [start, stop), stacked along a first axis, a dict per file."""
        offset = 0  # index of the first sample of the current file
        for plan in self._plans:
            begin, end = max(self.start - offset, 0), min(self.stop - offset, plan.samples)
            offset += plan.samples
            if begin < end:
                yield {name: a[begin:end] for name, a in self._load(plan).items()}
            elif offset >= self.stop:
                break

    def __iter__(self) -> Iterator[Batch]:
        if self.batch_size is None:
            for arrays in self._files():
                yield self._feed(arrays)
            return
        pending: list[Batch] = []
        pending_samples = 0
        for arrays in self._files():
            if pending and _sample_shapes(arrays) != _sample_shapes(pending[0]):
                yield self._feed(_concat(pending))
                pending, pending_samples = [], 0
            begin, end = 0, len(next(iter(arrays.values())))
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


def feed_samples(feed: Batch, inputs: list[InputSpec]) -> int:
    """Samples in a feed: the batch dim of an input that has one, else 1 (the inputs are one sample)."""
    for spec in inputs:
        if spec.has_batch_dim and spec.name in feed:
            return len(feed[spec.name])
    return 1


def _sample_shapes(feed: Batch) -> dict[str, tuple[int, ...]]:
    return {name: a.shape[1:] for name, a in feed.items()}


def _concat(parts: list[Batch]) -> Batch:
    if len(parts) == 1:
        return parts[0]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
