"""collect: histograms are exactly np.histogram of every activation, whatever the batching; models of many shapes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import quantlab
import quantlab.lanes
from quantlab import collection
from conftest import CALIB_DIR, DEMO_MODEL, run_all_float_outputs
from models import save_multi_input_data, save_multi_input_model, save_rearranging_model
from quantlab.errors import QuantlabError
from quantlab.data import CalibrationData
from quantlab.model import file_sha256, input_specs, load_model


@pytest.fixture(scope="module")
def demo_histograms():
    return quantlab.collect(DEMO_MODEL, CALIB_DIR)


def assert_exact(histograms, activations, bins=2048):
    """Each histogram equals np.histogram of the concatenated values over [-max|x|, +max|x|], edges included."""
    assert list(histograms) == list(activations)
    for name, values in activations.items():
        finite = values[np.isfinite(values)]
        amax = np.abs(finite).max()
        counts, edges = np.histogram(finite, bins=2 * bins, range=(-amax, amax))
        hist = histograms[name]
        np.testing.assert_array_equal(hist.counts, counts, err_msg=name)
        np.testing.assert_array_equal(hist.edges, edges, err_msg=name)
        assert hist.min == float(finite.min()) and hist.max == float(finite.max())
        assert hist.count == finite.size == hist.counts.sum()
        assert hist.zero_count == np.count_nonzero(finite == 0)
        assert hist.nan_count == np.isnan(values).sum() and hist.inf_count == np.isinf(values).sum()


def test_demo_histograms_are_exact_for_every_float_tensor(demo_histograms, demo_activations):
    assert len(demo_activations) == 15  # input + 14 node outputs of the digits CNN
    assert_exact(demo_histograms, demo_activations)
    assert demo_histograms.metadata["data"]["samples"] == 320
    assert demo_histograms.metadata["model_sha256"] == file_sha256(DEMO_MODEL)


@pytest.mark.parametrize("batch_size", [1, 7, 320])
def test_batch_size_does_not_change_the_histograms(demo_histograms, batch_size):
    other = quantlab.collect(DEMO_MODEL, CALIB_DIR, batch_size=batch_size)
    for name, hist in demo_histograms.items():
        np.testing.assert_array_equal(other[name].counts, hist.counts)
        np.testing.assert_array_equal(other[name].edges, hist.edges)
        assert other[name].stats() == hist.stats()


def test_default_batches_are_sized_by_the_activations(demo_histograms, demo_activations, monkeypatch):
    # Bytes of activations per sample, the Flatten output aside (it holds its input's values, measured once).
    per_sample = sum(v.nbytes for name, v in demo_activations.items() if "Flatten" not in name) // 320
    cases = [  # (whole data set's budget, per batch budget) -> samples per batch
        ((320 * per_sample + 320, 0), 320),  # the whole set fits: one batch
        ((320 * per_sample - 320, 3 * per_sample + 1), 3),
        ((0, per_sample // 2), 1),
        ((0, 100 * per_sample), 100),
    ]
    for (one_batch, per_batch), expected in cases:
        monkeypatch.setattr(collection, "ONE_BATCH_BUDGET", one_batch)
        monkeypatch.setattr(collection, "ACTIVATION_BUDGET", per_batch)
        histograms = quantlab.collect(DEMO_MODEL, CALIB_DIR)
        assert histograms.metadata["data"]["batch_size"] == expected
        for name, hist in demo_histograms.items():
            np.testing.assert_array_equal(histograms[name].counts, hist.counts)


def test_bytes_per_sample_from_inferred_shapes_are_those_of_a_run(tmp_path):
    """Where shape inference fixes every dim but the batch, batches are sized without a probe run, from the same
    figure a run gives; where it does not (the multi-input model has a tensor of shape [2]), a run tells."""
    rng = np.random.default_rng(3)
    rearranging = tmp_path / "r"
    rearranging.mkdir()
    np.save(rearranging / "0.npy", rng.normal(size=(2, 4, 6)).astype(np.float32))
    cases = [
        (DEMO_MODEL, CALIB_DIR, True),
        (save_rearranging_model(tmp_path / "r.onnx"), rearranging, True),
        (save_multi_input_model(tmp_path / "m.onnx"), save_multi_input_data(tmp_path / "m"), False),
    ]
    for model, data, static in cases:
        runner = collection._Runner(model, None, 0)
        sample = CalibrationData(data, runner.inputs).first_sample()
        measured = sum(values.nbytes for values in runner.values(sample))
        assert runner.sample_bytes == (measured if static else None)


@pytest.mark.parametrize("batch_size, runs", [(50, 7 + 6), (320, 1), (None, 1)])  # None: one batch, sized without a probe
def test_histogram_pass_reuses_the_range_pass_last_batch(demo_histograms, monkeypatch, batch_size, runs):
    calls = []
    real_run = collection.run_session
    monkeypatch.setattr(collection, "run_session", lambda *args: calls.append(1) or real_run(*args))
    histograms = quantlab.collect(DEMO_MODEL, CALIB_DIR, batch_size=batch_size)  # 50: 6 batches of 50 samples, then 20
    assert len(calls) == runs
    for name, hist in demo_histograms.items():
        np.testing.assert_array_equal(histograms[name].counts, hist.counts)
        assert histograms[name].stats() == hist.stats()


def test_relu_outputs_with_their_input_range_are_derived_not_binned(demo_histograms, demo_activations):
    model = onnx.load(DEMO_MODEL)
    relus = [(node.output[0], node.input[0]) for node in model.graph.node if node.op_type == "Relu"]
    same_range = [y for y, x in relus if np.abs(demo_activations[y]).max() == np.abs(demo_activations[x]).max()]
    assert 0 < len(same_range) < len(relus)  # both kinds occur in the demo model, and both are exact (test above)
    assert demo_histograms.metadata["binned_tensors"] == demo_histograms.metadata["measured_tensors"] - len(same_range)


def test_limit_and_tensor_globs(demo_activations):
    histograms = quantlab.collect(DEMO_MODEL, CALIB_DIR, limit=50, tensors=["*Relu*"])
    assert list(histograms) == [name for name in demo_activations if "Relu" in name]
    assert histograms.metadata["data"]["samples"] == 50
    assert all(h.count == h.counts.sum() for h in histograms.values())
    with pytest.raises(QuantlabError, match="match no activation tensor"):
        quantlab.collect(DEMO_MODEL, CALIB_DIR, tensors=["*nothing*"])


def test_several_inputs_dynamic_batch_constants_and_int_side_tensors(tmp_path):
    model = save_multi_input_model(tmp_path / "multi.onnx")
    data = save_multi_input_data(tmp_path / "data")
    as_stored = CalibrationData(data, input_specs(load_model(model)))  # a feed per file, like the reference below
    histograms = quantlab.collect(model, as_stored, bins=64)
    # Float tensors that depend on the inputs; not the Constant weight, its Identity, nor the int64 shape.
    assert list(histograms) == ["a", "b", "sum", "proj", "act", "emb", "out", "width"]
    feeds = []
    for path in sorted(data.glob("*.npz")):
        with np.load(path) as npz:
            feeds.append({k: npz[k] if npz[k].ndim == {"ids": 1}.get(k, 2) else npz[k][None] for k in npz.files})
    activations = run_all_float_outputs(model, feeds)
    assert_exact(histograms, {name: activations[name] for name in histograms}, bins=64)
    assert histograms["a"].count == 16 * 4  # 3 files of 5 samples + one single-sample file
    for rebatched in (quantlab.collect(model, data, bins=64), quantlab.collect(model, data, bins=64, batch_size=4)):
        for name in ("a", "b", "sum", "proj", "act", "emb", "out"):  # "width" is the batch size itself
            np.testing.assert_array_equal(rebatched[name].counts, histograms[name].counts)


def test_rearranged_tensors_are_measured_once_and_still_exact(tmp_path):
    """Transpose/Reshape/Squeeze/Unsqueeze/Identity/Flatten outputs hold their input's values: measured once,
    reported under every name, each exactly np.histogram of its own values (gathered independently)."""
    model = save_rearranging_model(tmp_path / "rearranging.onnx")
    rng = np.random.default_rng(7)
    data = tmp_path / "data"
    data.mkdir()
    batches = [rng.normal(size=(n, 4, 6)).astype(np.float32) for n in (3, 5, 1)]
    for i, batch in enumerate(batches):
        np.save(data / f"{i}.npy", batch)
    histograms = quantlab.collect(model, data, bins=128)
    assert list(histograms) == ["x", "xt", "act", "flat", "u", "s", "same", "xf", "part", "out"]
    assert histograms.metadata["measured_tensors"] == 4  # x, act, part, out
    assert_exact(histograms, run_all_float_outputs(model, [{"x": b} for b in batches]), bins=128)
    alone = quantlab.collect(model, data, bins=128, tensors=["same"])
    assert list(alone) == ["same"] and alone.metadata["measured_tensors"] == 1
    np.testing.assert_array_equal(alone["same"].counts, histograms["act"].counts)


def test_nan_and_inf_inputs_are_counted_and_left_out(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    batch = np.load(sorted(CALIB_DIR.glob("*.npy"))[0])
    batch[0, 0, 0, :3] = [np.nan, np.inf, -np.inf]
    np.save(data / "x.npy", batch)
    histograms = quantlab.collect(DEMO_MODEL, data)
    assert histograms["input"].nan_count == 1 and histograms["input"].inf_count == 2
    values = run_all_float_outputs(DEMO_MODEL, [{"input": batch}])
    assert_exact(histograms, values)  # downstream tensors hold NaN too: their Relu outputs are binned, not derived
    assert histograms.metadata["binned_tensors"] == histograms.metadata["measured_tensors"]


def test_histogram_file_round_trip_and_merge(demo_histograms, tmp_path):
    path = demo_histograms.save(tmp_path / "h.npz")
    loaded = quantlab.load_histograms(path)
    assert loaded.metadata == demo_histograms.metadata
    for name, hist in demo_histograms.items():
        np.testing.assert_array_equal(loaded[name].counts, hist.counts)
        np.testing.assert_array_equal(loaded[name].edges, hist.edges)
        assert loaded[name].stats() == hist.stats()
    other = quantlab.collect(DEMO_MODEL, CALIB_DIR, limit=32)
    with pytest.raises(QuantlabError, match="different ranges"):
        quantlab.HistogramSet.merge([demo_histograms, other])


@pytest.mark.parametrize("count", [2, 3])
def test_shards_over_shared_ranges_merge_to_the_single_process_histograms(demo_histograms, tmp_path, count):
    ranges_file = quantlab.collect_ranges(DEMO_MODEL, CALIB_DIR).save(tmp_path / "ranges.npz")
    parts = [
        quantlab.collect(DEMO_MODEL, CALIB_DIR, ranges=ranges_file, shard=(i, count), batch_size=13).save(tmp_path / f"p{i}.npz")
        for i in range(count)
    ]
    merged = quantlab.HistogramSet.merge(quantlab.load_histograms(p) for p in parts)
    assert merged.metadata["data"]["samples"] == 320 and merged.metadata["data"]["shards"] == [(i, count) for i in range(count)]
    for name, hist in demo_histograms.items():
        np.testing.assert_array_equal(merged[name].counts, hist.counts)
        np.testing.assert_array_equal(merged[name].edges, hist.edges)
        assert merged[name].stats() == hist.stats()
    first = quantlab.load_histograms(parts[0])
    with pytest.raises(QuantlabError, match="shard 0/%d is given more than once" % count):
        quantlab.HistogramSet.merge([first, first])


def test_merge_refuses_parts_of_other_models_or_ranges(demo_histograms, tmp_path):
    ranges = quantlab.collect_ranges(DEMO_MODEL, CALIB_DIR, limit=64)
    part = quantlab.collect(DEMO_MODEL, CALIB_DIR, ranges=ranges, shard=(0, 2), limit=64)
    with pytest.raises(QuantlabError, match="different ranges"):
        quantlab.HistogramSet.merge([demo_histograms, part])
    with pytest.raises(QuantlabError, match="beyond the given ranges"):
        quantlab.collect(DEMO_MODEL, CALIB_DIR, ranges=ranges, shard=(1, 2))
    coarse = quantlab.collect(DEMO_MODEL, CALIB_DIR, bins=128)
    with pytest.raises(QuantlabError, match="different bin counts"):
        quantlab.HistogramSet.merge([demo_histograms, coarse])
    model = save_multi_input_model(tmp_path / "multi.onnx")
    with pytest.raises(QuantlabError, match="another model"):
        quantlab.collect(model, save_multi_input_data(tmp_path / "data"), ranges=ranges)


def test_fold_gives_the_abs_histogram(demo_activations, demo_histograms):
    for name, values in demo_activations.items():
        amax = np.abs(values).max()
        expected = np.histogram(np.abs(values), bins=2048, range=(0, amax))[0]
        folded = demo_histograms[name].fold()
        assert folded.bins == 2048 and folded.edges[0] == 0 and np.isclose(folded.edges[-1], amax)
        assert folded.counts.sum() == expected.sum()
        # Only values lying on an edge (or within float32 rounding of one) may land one bin apart.
        absolute = np.abs(values)
        edges = folded.edges.astype(values.dtype)
        right = np.clip(np.searchsorted(edges, absolute), 1, edges.size - 1)
        distance = np.minimum(absolute - edges[right - 1], edges[right] - absolute)
        on_edge = np.count_nonzero(np.abs(distance) <= 4 * np.spacing(absolute))
        assert np.abs(np.cumsum(folded.counts) - np.cumsum(expected)).max() <= on_edge, name


@pytest.mark.parametrize("lanes", [1, 3])
def test_lanes_give_the_same_exact_histograms(demo_histograms, demo_activations, monkeypatch, lanes):
    """Tensors reduced and binned in several threads, each binning with its own work arrays, give exactly the ranges
    and counts of one thread."""
    monkeypatch.setattr(quantlab.lanes, "MAX_LANES", lanes)
    monkeypatch.setattr(quantlab.lanes, "usable_cores", lambda: 8)
    monkeypatch.setattr(quantlab.lanes, "MIN_SPREAD_VALUES", 0)
    histograms = quantlab.collect(DEMO_MODEL, CALIB_DIR, batch_size=16)
    assert_exact(histograms, demo_activations)
