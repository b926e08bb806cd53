"""Properties (hypothesis) of the parsers and of the histogram algebra, over inputs nobody would write by hand.

- Every threshold-file reader, on arbitrary bytes and on mangled caches, returns valid thresholds or raises quantlab's
  own one-line QuantlabError, nothing else. (The bit-exact write/read round trip of the cache is in test_formats.py.)
- The histogram file loader, on a real file with flipped, truncated or replaced bytes or arrays, does the same; so do
  the ranges file loader and the calibration data reader (.npy and .npz) on flipped and truncated bytes.
- Merging shards collected over shared ranges is associative and commutative, in counts, statistics and metadata,
  and equals collecting all the data at once.
- KL on histograms with exact zeros (what collect records): amax within the histogram, and for the tensorrt and
  modelopt variants invariant to scaling every count by a positive integer. (test_calibrate.py covers histograms
  without statistics; onnxruntime is not scale invariant by design, see docs/kl.md.)
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays, scalar_dtypes

import quantlab
from conftest import CALIB_DIR, DEMO_MODEL
from quantlab.data import CalibrationData
from quantlab.errors import QuantlabError
from quantlab.formats import Thresholds, read_thresholds
from quantlab.formats.trt_cache import parse_cache
from quantlab.histogram import Histogram, HistogramSet, load_histograms
from quantlab.ranges import TensorRanges

fuzz = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
few = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def assert_one_line(error: QuantlabError, where: str) -> None:
    message = str(error)
    assert message and "\n" not in message and where in message


def read_or_one_line_error(read: Callable[[], Any], where: str) -> Any:
    """What `read()` returns, or None once its QuantlabError is checked to be one line naming `where`."""
    try:
        return read()
    except QuantlabError as exc:
        assert_one_line(exc, where)
        return None


def assert_valid(thresholds: Thresholds) -> None:
    """What a reader may return: non-empty single-line names, amax a float >= 0 (inf allowed, as TensorRT writes)."""
    assert isinstance(thresholds, Thresholds)
    for name, amax in thresholds.amax.items():
        assert isinstance(name, str) and name and "\n" not in name
        assert isinstance(amax, float) and amax >= 0


# --- threshold files ------------------------------------------------------------------------------------------------

HEADERS = st.sampled_from(["TRT-8601-EntropyCalibration2", "TRT-100300-MinMaxCalibration", "1", "TRT-", "TRT-86x1-A", ""])
HEX = st.text("0123456789abcdefABCDEFxz-+. ", max_size=10)
NAMES = st.text(st.characters(blacklist_characters="\n", blacklist_categories=("Cs",)), max_size=20)
LINE = st.tuples(NAMES, st.sampled_from([": ", ":", " : ", " ", ""]), HEX).map("".join)
ENDINGS = st.sampled_from(["\n", "\r\n", ""])


@st.composite
def cache_like(draw) -> bytes:
    """Text that is nearly a TensorRT cache: a header (maybe broken), lines of name/separator/hex, odd line ends,
    a byte order mark, then a few random byte edits."""
    bom = draw(st.sampled_from(["", "\ufeff"]))
    ending = draw(ENDINGS)
    text = bom + draw(HEADERS) + "\n" + "".join(line + draw(ENDINGS) for line in draw(st.lists(LINE, max_size=8)))
    data = bytearray((text + ending).encode("utf-8"))
    for position, value in draw(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=3)):
        if data:
            data[position % len(data)] = value
    return bytes(data)


@fuzz
@given(st.one_of(st.binary(max_size=200), cache_like()))
def test_cache_parser_returns_thresholds_or_one_line_quantlab_error(data):
    thresholds = read_or_one_line_error(lambda: parse_cache(data, "fuzz.cache"), "fuzz.cache")
    if thresholds is not None:
        assert_valid(thresholds)
        assert thresholds.metadata["header"] == data.decode("utf-8").removeprefix("\ufeff").split("\n")[0].strip()


@fuzz
@given(data=st.one_of(st.binary(max_size=200), cache_like(), st.text(max_size=100).map(str.encode)),
       suffix=st.sampled_from([".cache", ".json", ".flatbuffers", ".txt", ""]))
def test_every_threshold_reader_returns_thresholds_or_one_line_quantlab_error(tmp_path_factory, data, suffix):
    """Through read_thresholds on a real file: detection by header and extension, then the TensorRT, JSON or ONNX
    Runtime reader (or the unknown-extension error), on any bytes."""
    path = tmp_path_factory.mktemp("fuzz") / f"thresholds{suffix}"
    path.write_bytes(data)
    thresholds = read_or_one_line_error(lambda: read_thresholds(path), str(path))
    if thresholds is not None:
        assert_valid(thresholds)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@fuzz
@given(version=st.sampled_from([1, 1, 2, "1", None]), thresholds=JSON_VALUES | st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=4))
def test_json_table_reader_on_well_formed_json_of_any_shape(tmp_path_factory, version, thresholds):
    """JSON that parses but holds anything: only a table with numbers >= 0 under "thresholds" is accepted."""
    path = tmp_path_factory.mktemp("json") / "t.json"
    document = {"format": "quantlab-thresholds", "version": version, "thresholds": thresholds}
    path.write_text(json.dumps(document))  # NaN and Infinity too, as Python's json writes them
    result = read_or_one_line_error(lambda: read_thresholds(path), str(path))
    if result is not None:
        assert_valid(result)
        assert version == 1 and set(result.amax) == set(thresholds)


# --- histogram files ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def histogram_file(tmp_path_factory) -> Path:
    """A real histogram file, small: the demo model over 64 samples, 64 bins of |x|."""
    return quantlab.collect(DEMO_MODEL, CALIB_DIR, bins=64, limit=64).save(tmp_path_factory.mktemp("h") / "h.npz")


def check_loader(path: Path) -> None:
    histograms = read_or_one_line_error(lambda: load_histograms(path), str(path))
    if histograms is not None:
        assert isinstance(histograms, HistogramSet) and len(histograms) > 0
        for hist in histograms.values():
            assert isinstance(hist, Histogram) and np.all(hist.counts >= 0)


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> dict[str, Path]:
    """Real files of the other kinds quantlab reads: a ranges file and calibration data as .npy and as .npz."""
    root = tmp_path_factory.mktemp("real")
    batch = np.load(CALIB_DIR / "calib_000.npy")[:4]
    np.save(root / "x.npy", batch)
    np.savez(root / "x.npz", input=batch)
    ranges = quantlab.collect_ranges(DEMO_MODEL, CALIB_DIR, limit=64).save(root / "ranges.npz")
    return {"ranges": ranges, "data .npy": root / "x.npy", "data .npz": root / "x.npz"}


def read_data_dir(path: Path) -> None:
    """Calibration data as collect reads it: every header checked, then every batch loaded."""
    from quantlab.model import input_specs, load_model

    for batch in CalibrationData(path.parent, input_specs(load_model(DEMO_MODEL))):
        assert batch["input"].shape[1:] == (1, 8, 8)


READERS = {"histograms": lambda path: check_loader(path), "ranges": TensorRanges.load, "data .npy": read_data_dir, "data .npz": read_data_dir}


@fuzz
@pytest.mark.parametrize("kind", list(READERS))
@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), max_size=4),
       keep=st.none() | st.floats(0, 1))
def test_readers_on_flipped_and_truncated_bytes(histogram_file, data_files, tmp_path_factory, kind, flips, keep):
    """A real file of each kind with bytes flipped and/or cut off: read, or refused with a one-line QuantlabError."""
    assume(flips or keep is not None)
    original = histogram_file if kind == "histograms" else data_files[kind]
    data = bytearray(original.read_bytes())
    for where, mask in flips:
        data[int(where * len(data))] ^= mask
    if keep is not None:
        data = data[: int(keep * len(data))]
    path = tmp_path_factory.mktemp("corrupt") / original.name
    path.write_bytes(bytes(data))
    read_or_one_line_error(lambda: READERS[kind](path), str(path))


MEMBERS = ["meta", "names", "counts", "edges", "min", "max", "count", "zero_count", "nan_count", "inf_count"]


@fuzz
@given(member=st.sampled_from(MEMBERS),
       replacement=st.none() | arrays(scalar_dtypes() | st.just(np.dtype("U8")), array_shapes(min_dims=0, max_dims=3, max_side=6)))
def test_histogram_loader_on_arrays_of_the_wrong_kind(histogram_file, tmp_path_factory, member, replacement):
    """A well-formed .npz whose arrays are not what a histogram file holds: one missing, or of another dtype/shape."""
    with np.load(histogram_file, allow_pickle=False) as npz:
        arrays_ = {key: npz[key] for key in npz.files}
    if replacement is None:
        del arrays_[member]
    else:
        arrays_[member] = replacement
    buffer = io.BytesIO()
    np.savez(buffer, **arrays_)
    path = tmp_path_factory.mktemp("wrong") / "h.npz"
    path.write_bytes(buffer.getvalue())
    check_loader(path)


@few
@given(meta=JSON_VALUES | st.fixed_dictionaries({"format": st.just("quantlab-histograms"), "format_version": JSON_VALUES}))
def test_histogram_loader_on_any_metadata(histogram_file, tmp_path_factory, meta):
    with np.load(histogram_file, allow_pickle=False) as npz:
        arrays_ = {key: npz[key] for key in npz.files}
    arrays_["meta"] = np.array(json.dumps(meta))
    path = tmp_path_factory.mktemp("meta") / "h.npz"
    np.savez(path, **arrays_)
    check_loader(path)


# --- merge ----------------------------------------------------------------------------------------------------------

SHARDS = 5


@pytest.fixture(scope="module")
def shards() -> tuple[list[HistogramSet], HistogramSet]:
    """The demo data in 5 shards over shared ranges, and the same data collected at once (no ranges given)."""
    ranges = quantlab.collect_ranges(DEMO_MODEL, CALIB_DIR, limit=200)
    parts = [quantlab.collect(DEMO_MODEL, CALIB_DIR, bins=256, limit=200, ranges=ranges, shard=(i, SHARDS)) for i in range(SHARDS)]
    return parts, quantlab.collect(DEMO_MODEL, CALIB_DIR, bins=256, limit=200)


@st.composite
def merge_trees(draw, leaves: list[int]):
    """A random bracketing of `leaves` (already in a random order): a leaf, or a list of 2+ subtrees."""
    if len(leaves) == 1:
        return leaves[0]
    cuts = sorted(draw(st.sets(st.integers(1, len(leaves) - 1), min_size=1)))
    bounds = [0, *cuts, len(leaves)]
    return [draw(merge_trees(leaves[a:b])) for a, b in zip(bounds, bounds[1:])]


def merge_tree(tree, parts: list[HistogramSet]) -> HistogramSet:
    if isinstance(tree, int):
        return parts[tree]
    return HistogramSet.merge(merge_tree(subtree, parts) for subtree in tree)


def assert_same_histograms(a: HistogramSet, b: HistogramSet) -> None:
    assert list(a) == list(b)
    for name in a:
        np.testing.assert_array_equal(a[name].counts, b[name].counts)
        np.testing.assert_array_equal(a[name].edges, b[name].edges)
        assert a[name].stats() == b[name].stats()


@few
@given(st.data())
def test_merge_in_any_order_and_grouping_is_collecting_at_once(shards, data):
    parts, whole = shards
    chosen = data.draw(st.lists(st.sampled_from(range(SHARDS)), min_size=2, max_size=SHARDS, unique=True), "parts")
    flat = HistogramSet.merge(parts[i] for i in sorted(chosen))
    merged = merge_tree(data.draw(merge_trees(chosen), "tree"), parts)
    assert_same_histograms(merged, flat)  # associative and commutative
    assert merged.metadata == flat.metadata  # shards, samples and parts included
    if len(chosen) == SHARDS:
        assert_same_histograms(merged, whole)
        assert merged.metadata["data"]["samples"] == whole.metadata["data"]["samples"]


@few
@given(st.data())
def test_a_shard_inside_a_merged_part_cannot_be_merged_again(shards, data):
    """Counting a shard twice is refused however deep in earlier merges it sits."""
    parts, _ = shards
    chosen = data.draw(st.lists(st.sampled_from(range(SHARDS)), min_size=2, max_size=SHARDS, unique=True))
    again = data.draw(st.sampled_from(chosen))
    merged = merge_tree(data.draw(merge_trees(chosen)), parts)
    with pytest.raises(QuantlabError, match=f"shard {again}/{SHARDS} is given more than once"):
        HistogramSet.merge(data.draw(st.permutations([merged, parts[again]])))


# --- KL -------------------------------------------------------------------------------------------------------------

VARIANTS = ("tensorrt", "modelopt", "onnxruntime")
# Activation-like values: ReLU outputs (many exact zeros), a long tail, a few outliers.
activations = st.builds(
    lambda values, zero_fraction, outliers: np.concatenate([np.where(np.arange(values.size) % 100 < zero_fraction, 0.0, values), outliers]).astype(np.float32),
    arrays(np.float64, st.integers(50, 3000), elements=st.floats(-50, 50, allow_nan=False, width=32)),
    st.integers(0, 60),
    arrays(np.float64, st.integers(0, 3), elements=st.floats(-1e4, 1e4, allow_nan=False, width=32)),
)


def scaled(hist: Histogram, factor: int) -> Histogram:
    """The histogram of the same values each seen `factor` times: counts and statistics scaled."""
    return Histogram(hist.counts * factor, hist.edges, hist.min, hist.max, hist.count * factor, hist.zero_count * factor,
                     hist.nan_count * factor, hist.inf_count * factor)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=activations, bins=st.sampled_from([128, 300, 2048]), factor=st.integers(2, 10**6))
def test_kl_on_collected_histograms_is_within_range_and_scale_free(values, bins, factor):
    hist = Histogram.from_values(values, bins=bins)
    assume(hist.amax > 0)
    for variant in VARIANTS:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            amax = quantlab.compute_amax(hist, "kl", variant=variant)
        assert 0 < amax <= hist.edges[-1]
    for variant in ("tensorrt", "modelopt"):
        assert quantlab.compute_amax(scaled(hist, factor), "kl", variant=variant) == quantlab.compute_amax(hist, "kl", variant=variant)
