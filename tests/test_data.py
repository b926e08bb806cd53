"""CalibrationData: every file is checked against the model's inputs before anything runs; batching is exact."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import CALIB_DIR, DEMO_MODEL
from models import save_multi_input_data, save_multi_input_model
from quantlab.data import CalibrationData
from quantlab.errors import QuantlabError
from quantlab.model import InputSpec, input_specs, load_model


@pytest.fixture(scope="module")
def demo_inputs():
    return input_specs(load_model(DEMO_MODEL))


def stored_samples() -> np.ndarray:
    return np.concatenate([np.load(p) for p in sorted(CALIB_DIR.glob("*.npy"))])


@pytest.mark.parametrize("batch_size", [None, 1, 5, 32, 100, 1000])
def test_batches_hold_every_sample_in_sorted_file_order(demo_inputs, batch_size):
    data = CalibrationData(CALIB_DIR, demo_inputs, batch_size=batch_size)
    batches = [feed["input"] for feed in data]
    expected = stored_samples()
    np.testing.assert_array_equal(np.concatenate(batches), expected)
    assert len(data) == expected.shape[0] == 320
    if batch_size:
        assert all(b.shape[0] == batch_size for b in batches[:-1]) and 0 < batches[-1].shape[0] <= batch_size
    else:
        assert len(batches) == 10


def test_fortran_ordered_files_read_as_their_values(tmp_path, demo_inputs):
    samples = stored_samples()[:6]
    np.save(tmp_path / "a.npy", np.asfortranarray(samples[:4]))
    np.save(tmp_path / "b.npy", samples[4])  # one sample, C order
    np.testing.assert_array_equal(np.concatenate([f["input"] for f in CalibrationData(tmp_path, demo_inputs)]), samples[:5])


def test_version_2_headers_and_shared_headers_read_as_their_values(tmp_path, demo_inputs):
    samples = stored_samples()[:8]
    with open(tmp_path / "a.npy", "wb") as handle:  # a version 2.0 header (4-byte length), as for huge headers
        np.lib.format.write_array(handle, samples[:4], version=(2, 0))
    np.save(tmp_path / "b.npy", samples[4:8])
    np.save(tmp_path / "c.npy", samples[4:8] + 1)  # the same header as b.npy, other data
    feeds = [f["input"] for f in CalibrationData(tmp_path, demo_inputs)]
    np.testing.assert_array_equal(np.concatenate(feeds), np.concatenate([samples, samples[4:8] + 1]))


def test_large_files_are_memory_mapped_and_read_alike(demo_inputs, monkeypatch):
    monkeypatch.setattr("quantlab.data._MMAP_THRESHOLD", 0)  # every file counts as large
    feeds = list(CalibrationData(CALIB_DIR, demo_inputs))
    np.testing.assert_array_equal(np.concatenate([f["input"] for f in feeds]), stored_samples())


def test_limit_stops_after_n_samples(demo_inputs):
    data = CalibrationData(CALIB_DIR, demo_inputs, batch_size=16, limit=40)
    np.testing.assert_array_equal(np.concatenate([f["input"] for f in data]), stored_samples()[:40])
    assert len(data) == 40


def test_single_sample_files_mixed_with_batches(tmp_path, demo_inputs):
    samples = stored_samples()[:4]
    np.save(tmp_path / "s0.npy", samples[:2])  # a batch of two
    np.save(tmp_path / "s1.npy", samples[2])  # one sample, no batch dim
    np.save(tmp_path / "s2.npy", samples[3])
    np.testing.assert_array_equal(np.concatenate([f["input"] for f in CalibrationData(tmp_path, demo_inputs)]), samples)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: None, "data directory is empty"),
        (lambda d: (d / "notes.txt").write_text("x"), "not a .npy or .npz file"),
        (lambda d: (d / "x.npy").write_bytes(b"garbage"), "not a readable .npy file"),
        (lambda d: np.save(d / "x.npy", np.zeros((2, 1, 8, 8), np.float64)), "dtype float64, the model expects float32"),
        (lambda d: np.save(d / "x.npy", np.zeros((2, 1, 9, 8), np.float32)), r"shape \(2, 1, 9, 8\).*dim 2"),
        (lambda d: np.save(d / "x.npy", np.zeros((8, 8), np.float32)), "one sample without the batch dim"),
        (lambda d: np.savez(d / "x.npz", image=np.zeros((2, 1, 8, 8), np.float32)), "missing input.*unknown name"),
    ],
)
def test_bad_data_is_rejected_with_the_file_named(tmp_path, demo_inputs, make, message):
    make(tmp_path)
    with pytest.raises(QuantlabError, match=message):
        CalibrationData(tmp_path, demo_inputs)


def test_missing_directory_and_bad_options(tmp_path, demo_inputs):
    with pytest.raises(QuantlabError, match="data directory not found"):
        CalibrationData(tmp_path / "nope", demo_inputs)
    with pytest.raises(QuantlabError, match="--batch-size must be at least 1"):
        CalibrationData(CALIB_DIR, demo_inputs, batch_size=0)
    with pytest.raises(QuantlabError, match="--limit must be at least 1"):
        CalibrationData(CALIB_DIR, demo_inputs, limit=0)


def test_several_inputs_need_npz_keyed_by_name(tmp_path):
    specs = input_specs(load_model(save_multi_input_model(tmp_path / "m.onnx")))
    data = save_multi_input_data(tmp_path / "data")
    feeds = list(CalibrationData(data, specs, batch_size=6))
    assert [f["a"].shape[0] for f in feeds] == [6, 6, 4] and feeds[0]["ids"].dtype == np.int64
    np.save(data / "zz.npy", np.zeros((1, 4), np.float32))
    with pytest.raises(QuantlabError, match="several inputs"):
        CalibrationData(data, specs)


@pytest.mark.parametrize("count", [1, 2, 3, 7])
@pytest.mark.parametrize("batch_size", [None, 16])
def test_shards_partition_the_samples_in_order(demo_inputs, count, batch_size):
    parts = []
    for index in range(count):
        shard = CalibrationData(CALIB_DIR, demo_inputs, batch_size=batch_size, limit=300, shard=(index, count))
        parts.extend(feed["input"] for feed in shard)
        assert abs(len(shard) - 300 / count) < 1
    np.testing.assert_array_equal(np.concatenate(parts), stored_samples()[:300])


def test_bad_shard_is_rejected(demo_inputs):
    with pytest.raises(QuantlabError, match="--shard 2/2"):
        CalibrationData(CALIB_DIR, demo_inputs, shard=(2, 2))


def test_a_batch_never_mixes_sample_shapes(tmp_path):
    """A dynamic dim may differ between files: batches of up to batch_size samples, of one shape each, in order."""
    spec = InputSpec("x", ("n", 3, "t"), np.dtype(np.float32))
    rng = np.random.default_rng(0)
    stored = [rng.standard_normal(shape).astype(np.float32) for shape in [(4, 3, 5), (3, 3, 5), (2, 3, 7), (3, 5)]]
    for i, array in enumerate(stored):
        np.save(tmp_path / f"{i}.npy", array)
    feeds = [feed["x"] for feed in CalibrationData(tmp_path, [spec], batch_size=3)]
    assert [f.shape for f in feeds] == [(3, 3, 5), (3, 3, 5), (1, 3, 5), (2, 3, 7), (1, 3, 5)]
    samples = [s for a in stored for s in (a if a.ndim == 3 else a[None])]
    np.testing.assert_array_equal(np.concatenate([f.reshape(-1) for f in feeds]), np.concatenate([s.reshape(-1) for s in samples]))


def test_first_sample_is_the_first_of_the_shard(demo_inputs):
    data = CalibrationData(CALIB_DIR, demo_inputs, shard=(1, 3))
    np.testing.assert_array_equal(data.first_sample()["input"], stored_samples()[data.start : data.start + 1])
    with pytest.raises(QuantlabError, match="no samples"):
        CalibrationData(CALIB_DIR, demo_inputs, limit=2, shard=(0, 3)).first_sample()
