"""Calibration data as users have it: a loader script (`--data loader.py[:function]`), a generator, a list, an ONNX
Runtime CalibrationDataReader. Each gives, bit for bit, the histograms of the .npy directory of the same samples."""

from __future__ import annotations

import json
import re
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from onnxruntime.quantization import CalibrationDataReader

import quantlab
from conftest import CALIB_DIR, DEMO_MODEL, EVAL_INPUTS, EVAL_LABELS
from models import save_multi_input_data, save_multi_input_model
from quantlab.data import CalibrationData, save_data
from quantlab.errors import QuantlabError
from quantlab.model import input_specs, load_model
from test_cli import assert_one_line_error, run
from test_shards import assert_same

LOADER = '''
from pathlib import Path

import numpy as np

IMAGES = Path({images!r})
CALIB = Path({calib!r})
RUNS = Path(__file__).with_name("runs")


def run_number():
    """0 on the loader's first run, 1 on the next, ...: claimed by creating a file, so that runs in parallel
    processes (shards) get different numbers too."""
    import os

    number = 0
    while True:
        try:
            os.close(os.open(str(RUNS) + "." + str(number), os.O_CREAT | os.O_EXCL))
            return number
        except FileExistsError:
            number += 1


def read_pgm(path):
    """A binary PGM image: a header (P5, width, height, maxval), then one byte per pixel."""
    data = path.read_bytes()
    width, height = (int(field) for field in data.split(maxsplit=3)[1:3])
    return np.frombuffer(data[-width * height :], np.uint8).reshape(height, width)


def load_data():
    """The image folder and the model's preprocessing: grey levels 0..16 to [-1, 1], one sample (1, 8, 8) a time."""
    for path in sorted(IMAGES.glob("*.pgm")):
        yield {{"input": (read_pgm(path).astype(np.float32) / 16 * 2 - 1)[None]}}


def batches():
    """Bare arrays for the single-input model, a batch at a time, as the files hold them."""
    for path in sorted(CALIB.glob("*.npy")):
        yield np.load(path)


def raising():
    for index, batch in enumerate(batches()):
        if index == 2:
            raise ValueError("image 70 is truncated")
        yield batch


def wrong_dtype():
    for index, sample in enumerate(load_data()):
        yield {{"input": sample["input"].astype(np.float64)}} if index == 5 else sample


def empty():
    return iter(())


def one_more_each_run():
    """300 samples on its first run, 301 on the next: a loader that does not repeat itself."""
    runs = run_number()
    for index, sample in enumerate(load_data()):
        if index < 300 + runs:
            yield sample


def not_iterable():
    return 3
'''


def stored_samples(directory: Path = CALIB_DIR) -> np.ndarray:
    return np.concatenate([np.load(path) for path in sorted(directory.glob("*.npy"))])


@pytest.fixture(scope="module")
def reference():
    return quantlab.collect(DEMO_MODEL, CALIB_DIR)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """The calibration samples as an image folder: 8x8 PGM files of grey levels 0..16, the digits as scanned."""
    folder = tmp_path_factory.mktemp("images")
    levels = np.round((stored_samples()[:, 0] + 1) / 2 * 16).astype(np.uint8)
    for index, pixels in enumerate(levels):
        (folder / f"digit_{index:03d}.pgm").write_bytes(b"P5\n8 8\n16\n" + pixels.tobytes())
    return folder


@pytest.fixture()
def loader(tmp_path, images) -> Path:
    script = tmp_path / "loader.py"
    script.write_text(LOADER.format(images=str(images), calib=str(CALIB_DIR)))
    return script


def line_of(script: Path, text: str) -> int:
    return next(number for number, line in enumerate(script.read_text().splitlines(), start=1) if text in line)


class DigitsReader(CalibrationDataReader):
    """An ONNX Runtime data reader, as ORT users write them: one feed per get_next(), None at the end; no rewind."""

    def __init__(self, feeds):
        self.feeds = iter(feeds)

    def get_next(self):
        return next(self.feeds, None)


def test_an_image_folder_loader_script_gives_the_directory_histograms(reference, loader, tmp_path):
    """No file written first: the loader reads the images and preprocesses them; default and named functions."""
    for data in (str(loader), f"{loader}:batches"):
        out = tmp_path / "histograms.npz"
        result = run("collect", str(DEMO_MODEL), "--data", data, "-o", str(out))
        assert result.returncode == 0, result.stderr
        assert "from 320 samples" in result.stdout
        histograms = quantlab.load_histograms(out)
        assert_same(histograms, reference)
        assert histograms.metadata["data"]["loader"] == (data if ":" in data else f"{loader}:load_data")


@pytest.mark.parametrize("form", ["loader", "generator", "list", "tuple", "reader", "array batches"])
def test_every_api_form_gives_the_directory_histograms(reference, loader, form):
    samples = stored_samples()
    data = {
        "loader": str(loader),
        "generator": ({"input": sample} for sample in samples),
        "list": [{"input": sample} for sample in samples],
        "tuple": tuple({"input": batch} for batch in np.split(samples, 10)),
        "reader": DigitsReader({"input": sample[None]} for sample in samples),  # batches of one, ORT's usual feeds
        "array batches": (batch for batch in np.split(samples, 40)),
    }[form]
    histograms = quantlab.collect(DEMO_MODEL, data)
    assert_same(histograms, reference)
    assert histograms.metadata["data"]["samples"] == 320


def test_several_inputs_from_a_loader_script_a_generator_and_a_list(tmp_path):
    model = save_multi_input_model(tmp_path / "multi.onnx")
    directory = save_multi_input_data(tmp_path / "data")
    reference = quantlab.collect(model, directory, bins=64)
    feeds = []
    for path in sorted(directory.glob("*.npz")):
        with np.load(path) as npz:
            feeds.append({name: npz[name] for name in npz.files})
    script = tmp_path / "multi_loader.py"
    script.write_text(textwrap.dedent(f'''
        from pathlib import Path
        import numpy as np

        def load_data():
            for path in sorted(Path({str(directory)!r}).glob("*.npz")):
                with np.load(path) as npz:
                    yield {{name: npz[name] for name in npz.files}}
    '''))
    out = tmp_path / "h.npz"
    result = run("collect", str(model), "--data", str(script), "--bins", "64", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert_same(quantlab.load_histograms(out), reference)
    assert_same(quantlab.collect(model, iter(feeds), bins=64), reference)
    assert_same(quantlab.collect(model, feeds, bins=64), reference)  # (its "width" tensor is the batch size)
    with pytest.raises(QuantlabError, match=r"^list item 0: an array, but the model has several inputs \(a, b, ids\)"):
        quantlab.collect(model, [feeds[0]["a"]])


@pytest.mark.parametrize(
    "function, fragments",
    [
        ("raising", lambda s: [f"{s}:{line_of(s, 'raise ValueError')}: data loader raising() raised ValueError: image 70 is truncated"]),
        ("empty", lambda s: [f"{s}:empty yielded no samples"]),
        ("wrong_dtype", lambda s: [f"{s}:wrong_dtype item 5: input 'input' has dtype float64, the model expects float32"]),
        ("one_more_each_run", lambda s: [f"{s}:one_more_each_run yielded 301 samples in this run and 300 in an earlier one", "seed"]),
        ("missing", lambda s: [f"{s}: no function 'missing' in the data loader script (it defines run_number, read_pgm, load_data, batches"]),
        ("not_iterable", lambda s: [f"{s}:not_iterable: returned int, not an iterable of feeds"]),
    ],
)
def test_a_bad_loader_gets_one_line_naming_the_script_and_exit_2(loader, tmp_path, function, fragments):
    out = tmp_path / "h.npz"
    result = run("collect", str(DEMO_MODEL), "--data", f"{loader}:{function}", "-o", str(out))
    assert_one_line_error(result, 2, *fragments(loader))
    assert not out.exists()


def test_a_script_that_does_not_import_is_named_with_its_line(tmp_path):
    inputs = input_specs(load_model(DEMO_MODEL))
    cases = {
        "syntax.py": ("def load_data():\n    yield {\n", ":2: importing the data loader script failed: SyntaxError"),
        "raises.py": ("import numpy\n\nraise RuntimeError('no images in /data')\n", ":3: importing the data loader script raised RuntimeError: no images in /data"),
        "helper.py": ("from helper_sibling import load_data\n", ":1: importing the data loader script raised ModuleNotFoundError"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(QuantlabError, match="^" + re.escape(f"{tmp_path / name}{message}")):
            CalibrationData(tmp_path / name, inputs)
    (tmp_path / "helper_sibling.py").write_text("def load_data():\n    yield __import__('numpy').zeros((1, 1, 8, 8), 'float32')\n")
    assert len(list(CalibrationData(tmp_path / "helper.py", inputs))) == 1  # the script's folder is on sys.path
    with pytest.raises(QuantlabError, match="missing.py: data loader script not found"):
        CalibrationData(tmp_path / "missing.py", inputs)
    with pytest.raises(QuantlabError, match="a Python function name after the colon"):
        CalibrationData(f"{tmp_path / 'helper.py'}:", inputs)


def test_a_loader_whose_values_differ_between_runs_is_detected(tmp_path, images):
    """Augmentation that differs between runs: the same count and shapes, other values. Caught by the ranges where
    values go beyond them (before they reach the binning), else by the digest of the samples, after the run."""
    script = tmp_path / "augmenting.py"
    script.write_text(LOADER.format(images=str(images), calib=str(CALIB_DIR)) + textwrap.dedent('''
        def scaled_on_later_runs(scale, index=None):
            runs = run_number()
            for position, sample in enumerate(load_data()):
                changed = runs and index in (None, position)
                yield {"input": sample["input"] * np.float32(scale)} if changed else sample

        def brighter():
            return scaled_on_later_runs(1.5)

        def one_darker():
            return scaled_on_later_runs(0.5, index=3)
    '''))
    with pytest.raises(QuantlabError, match=r"brighter yielded other values in this run than in an earlier one \(tensor 'input' has max\|x\| 1.5 > 1\)"):
        quantlab.collect(DEMO_MODEL, f"{script}:brighter")
    for claimed in tmp_path.glob("runs.*"):  # the loader starts again from its first run
        claimed.unlink()
    with pytest.raises(QuantlabError, match="one_darker yielded other values in this run than in an earlier one: a data loader must"):
        quantlab.collect(DEMO_MODEL, f"{script}:one_darker")


def test_save_data_writes_the_loaders_samples_for_exact_and_sharded_reruns(reference, loader, tmp_path):
    out = tmp_path / "saved"
    result = run("save-data", str(DEMO_MODEL), "--data", str(loader), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {out}: 320 samples in 320 files"
    np.testing.assert_array_equal(stored_samples(out), stored_samples())
    assert_same(quantlab.collect(DEMO_MODEL, out), reference)
    parts = [quantlab.collect(DEMO_MODEL, out, ranges=reference_ranges(), shard=(i, 3)) for i in range(3)]
    assert_same(quantlab.HistogramSet.merge(parts), reference)

    again = run("save-data", str(DEMO_MODEL), "--data", str(loader), "-o", str(out))
    assert_one_line_error(again, 2, f"{out}: output directory exists and is not empty")
    empty = run("save-data", str(DEMO_MODEL), "--data", f"{loader}:empty", "-o", str(tmp_path / "none"))
    assert_one_line_error(empty, 2, "empty yielded no samples")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["loader.py", "saved"]  # nothing half-written


def reference_ranges():
    return quantlab.collect_ranges(DEMO_MODEL, CALIB_DIR)


def test_save_data_api_writes_a_generator_in_batches(tmp_path):
    batches = np.split(stored_samples()[:100], [30, 64])
    saved = save_data(DEMO_MODEL, iter(batches), tmp_path / "saved", limit=90)
    assert len(saved) == 90 and saved.origin["files"] == 3
    np.testing.assert_array_equal(stored_samples(tmp_path / "saved"), stored_samples()[:90])


def test_workers_run_the_loader_in_each_shard(reference, loader, tmp_path):
    result = run("collect", str(DEMO_MODEL), "--data", str(loader), "--workers", "2", "-o", str(tmp_path / "h.npz"))
    assert result.returncode == 0, result.stderr
    merged = quantlab.load_histograms(tmp_path / "h.npz")
    assert_same(merged, reference)
    assert merged.metadata["data"]["shards"] == [[0, 2], [1, 2]]
    differing = run("collect", str(DEMO_MODEL), "--data", f"{loader}:one_more_each_run", "--workers", "2", "-o", str(tmp_path / "x.npz"))
    # the shards run at once: either may run the loader first
    assert_one_line_error(differing, 2, "one_more_each_run yielded 30", "300 samples in shard", "301 samples in shard")


def test_a_shard_of_a_stream_keeps_every_nth_sample(loader):
    inputs = input_specs(load_model(DEMO_MODEL))
    parts = [CalibrationData(f"{loader}:batches", inputs, batch_size=16, limit=100, shard=(i, 3)) for i in range(3)]
    kept = [np.concatenate([feed["input"] for feed in part]) for part in parts]
    assert [len(part) for part in parts] == [34, 33, 33]
    for index, samples in enumerate(kept):
        np.testing.assert_array_equal(samples, stored_samples()[index:100:3])


def test_a_one_shot_iterable_is_spilled_for_the_second_pass_and_the_spill_removed(reference, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    pulled = []

    def feeds():
        for sample in stored_samples():
            pulled.append(1)
            yield sample

    histograms = quantlab.collect(DEMO_MODEL, feeds(), batch_size=50)  # 7 batches: the histogram pass reads 6 again
    assert_same(histograms, reference)
    assert len(pulled) == 320 and list(tmp_path.iterdir()) == []
    inputs = input_specs(load_model(DEMO_MODEL))
    with CalibrationData(iter(stored_samples()), inputs, reread=False) as once:
        assert len(list(once)) == 320  # a feed per item, each a sample
        with pytest.raises(QuantlabError, match="iterator can be read only once and was read before"):
            list(once)


def test_progress_counts_samples_as_they_come(loader):
    calls = []
    quantlab.collect(DEMO_MODEL, str(loader), batch_size=100, progress=lambda *call: calls.append(call))
    assert calls == [
        ("ranges", 100, None), ("ranges", 200, None), ("ranges", 300, None), ("ranges", 320, 320),
        ("histograms", 20, 320), ("histograms", 120, 320), ("histograms", 220, 320), ("histograms", 320, 320),
    ]


@pytest.fixture(scope="module")
def int8_model(reference, tmp_path_factory):
    return quantlab.export_qdq(DEMO_MODEL, quantlab.calibrate(reference, "kl"), tmp_path_factory.mktemp("qdq") / "int8.onnx")


def test_drift_takes_every_form_and_reports_as_for_the_directory(reference, int8_model, tmp_path):
    from quantlab.drift import measure_drift, measure_isolated, propose_fp32

    samples = stored_samples(EVAL_INPUTS)
    batches = np.split(samples, 9)  # as the files hold them: drift sums per batch, so the same batches give the same sums
    labels = np.load(EVAL_LABELS)
    accumulated = measure_drift(DEMO_MODEL, int8_model, EVAL_INPUTS, labels=labels).to_dict()
    for data in (iter(batches), DigitsReader({"input": batch} for batch in batches)):
        report = measure_drift(DEMO_MODEL, int8_model, data, labels=labels).to_dict()
        assert report["layers"] == accumulated["layers"] and report["final"] == accumulated["final"]
    isolated = measure_isolated(DEMO_MODEL, int8_model, EVAL_INPUTS).to_dict()["layers"]
    assert measure_isolated(DEMO_MODEL, int8_model, [{"input": batch} for batch in batches]).to_dict()["layers"] == isolated
    thresholds = quantlab.calibrate(reference, "kl")
    steps, _ = propose_fp32(DEMO_MODEL, thresholds, EVAL_INPUTS, keep=1, labels=labels)
    from_generator, _ = propose_fp32(DEMO_MODEL, thresholds, iter(batches), keep=1, labels=labels)  # read many times: spilled
    assert from_generator == steps

    script = tmp_path / "eval_loader.py"
    script.write_text(f"import numpy as np\n\ndef load_data():\n    yield from np.load({str(tmp_path / 'eval.npy')!r})\n")
    np.save(tmp_path / "eval.npy", samples)
    reports = []
    for data in (EVAL_INPUTS, script):
        out = tmp_path / f"drift-{len(reports)}.json"
        args = ["--qdq", str(int8_model), "--labels", str(EVAL_LABELS), "--batch-size", "50", "--json", str(out)]
        result = run("drift", str(DEMO_MODEL), "--data", str(data), *args)  # the loader's samples batched as the files
        assert result.returncode == 0, result.stderr
        reports.append(json.loads(out.read_text()))
    assert reports[1]["layers"] == reports[0]["layers"] and reports[1]["final"] == reports[0]["final"]
