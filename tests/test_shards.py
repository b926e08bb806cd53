"""Sharded collection: parts over shared ranges merge to exactly the single-process histograms, in every executor."""

from __future__ import annotations

import numpy as np
import pytest

import quantlab
from conftest import CALIB_DIR, DEMO_MODEL
from quantlab.errors import QuantlabError
from quantlab.shards import collect_parallel
from test_cli import assert_one_line_error, run


@pytest.fixture(scope="module")
def reference():
    return quantlab.collect(DEMO_MODEL, CALIB_DIR, limit=200)


def assert_same(histograms, reference):
    assert list(histograms) == list(reference)
    for name, hist in reference.items():
        np.testing.assert_array_equal(histograms[name].counts, hist.counts)
        np.testing.assert_array_equal(histograms[name].edges, hist.edges)
        assert histograms[name].stats() == hist.stats()


def test_local_workers_give_the_single_process_histograms(reference):
    merged = collect_parallel(DEMO_MODEL, CALIB_DIR, 2, limit=200, batch_size=24)
    assert_same(merged, reference)
    assert merged.metadata["data"]["shards"] == [(0, 2), (1, 2)] and merged.metadata["executor"] == "processes"


def test_a_shards_own_ranges_give_its_statistics_without_measuring_again(reference):
    ranges = quantlab.collect_ranges(DEMO_MODEL, CALIB_DIR, limit=200)
    parts = []
    for index in range(3):
        own = quantlab.collect_ranges(DEMO_MODEL, CALIB_DIR, limit=200, shard=(index, 3))
        given = quantlab.collect(DEMO_MODEL, CALIB_DIR, limit=200, ranges=ranges, shard=(index, 3), shard_ranges=own)
        measured = quantlab.collect(DEMO_MODEL, CALIB_DIR, limit=200, ranges=ranges, shard=(index, 3))
        assert_same(given, measured)
        parts.append(given)
    assert_same(quantlab.HistogramSet.merge(parts), reference)
    other = quantlab.collect_ranges(DEMO_MODEL, CALIB_DIR, limit=200, tensors=["*Relu*"])
    with pytest.raises(QuantlabError, match="not a part of the given ranges"):
        quantlab.collect(DEMO_MODEL, CALIB_DIR, limit=200, ranges=ranges, shard=(0, 3), shard_ranges=other)


def test_cli_ranges_shards_and_merge(reference, tmp_path):
    model, data = str(DEMO_MODEL), str(CALIB_DIR)
    ranges = tmp_path / "ranges.npz"
    assert run("collect", model, "-d", data, "--limit", "200", "--ranges-only", "-o", str(ranges)).returncode == 0
    for i in range(3):
        result = run("collect", model, "-d", data, "--limit", "200", "--ranges", str(ranges), "--shard", f"{i}/3", "-o", str(tmp_path / f"part-{i}.npz"))
        assert result.returncode == 0, result.stderr
    result = run("merge", *[str(tmp_path / f"part-{i}.npz") for i in range(3)], "-o", str(tmp_path / "merged.npz"))
    assert result.returncode == 0 and "from 3 parts, 200 samples" in result.stdout
    assert_same(quantlab.load_histograms(tmp_path / "merged.npz"), reference)

    coarse = tmp_path / "coarse.npz"
    run("collect", model, "-d", data, "--limit", "200", "--ranges", str(ranges), "--shard", "0/3", "--bins", "64", "-o", str(coarse))
    refused = run("merge", str(tmp_path / "part-1.npz"), str(coarse), "-o", str(tmp_path / "bad.npz"))
    assert_one_line_error(refused, 2, "different bin counts")
    assert not (tmp_path / "bad.npz").exists()
    assert_one_line_error(run("collect", model, "-d", data, "--shard", "0/2", "-o", str(tmp_path / "x.npz")), 2, "--shard needs --ranges")
    assert_one_line_error(run("collect", model, "-d", data, "--ranges", str(DEMO_MODEL), "-o", str(tmp_path / "x.npz")), 2, "not a quantlab ranges file")


def test_cli_workers(reference, tmp_path):
    result = run("collect", str(DEMO_MODEL), "-d", str(CALIB_DIR), "--limit", "200", "--workers", "2", "-o", str(tmp_path / "h.npz"))
    assert result.returncode == 0, result.stderr
    assert_same(quantlab.load_histograms(tmp_path / "h.npz"), reference)


def test_ray_tasks_give_the_single_process_histograms(reference):
    ray = pytest.importorskip("ray", reason="Ray is the optional `ray` extra: pip install 'quantlab[ray]'")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        merged = collect_parallel(DEMO_MODEL, CALIB_DIR, 2, limit=200, use_ray=True)
    finally:
        ray.shutdown()
    assert_same(merged, reference)
    assert merged.metadata["executor"] == "ray"
