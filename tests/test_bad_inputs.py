"""The bad-input corpus: every command fed broken models, data, histogram files, threshold files and options.

Each case runs `python -m quantlab ...` in a subprocess, as a user would, and must end with exactly one line on
stderr (`quantlab: error: ...`) naming the problem and the file at fault, exit code 2 (bad input) or 1 (the work
itself failed), no traceback, and no output written: no new file, no temporary left behind, and an existing output
(pre-filled with sentinel bytes in about half the cases) left byte for byte as it was. The inputs are generated once
per module from the bundled demo model and data.

NaN and Inf values are not errors: they are counted, left out of the histograms and reported as warnings (the
`WARNINGS` table at the end).
"""

from __future__ import annotations

import importlib.util
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import quantlab
from conftest import CALIB_DIR, DEMO_MODEL, EVAL_INPUTS, ROOT
from models import save_multi_input_model
from quantlab.formats import Thresholds, write_thresholds
from quantlab.histogram import HistogramSet
from test_cli import assert_one_line_error, run

SENTINEL = b"sentinel: a previous output that a failed run must leave as it is\n"
FOREIGN_CACHE = ROOT / "tests" / "fixtures" / "caches" / "trt8400_minmax_vgg16.cache"


# --- small models ---------------------------------------------------------------------------------------------------


def save_model(path: Path, nodes: list, inputs: list, outputs: list) -> Path:
    model = helper.make_model(helper.make_graph(nodes, path.stem, inputs, outputs), opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def value_info(name: str, shape=("batch", 4), elem_type=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem_type, list(shape))


def save_int_only_model(path: Path) -> Path:
    """c = a + b on int64 tensors: nothing to calibrate."""
    a, b, c = (value_info(name, elem_type=TensorProto.INT64) for name in "abc")
    return save_model(path, [helper.make_node("Add", ["a", "b"], ["c"])], [a, b], [c])


def save_nonfinite_model(path: Path) -> Path:
    """From finite inputs: log_x = Log(x) (-inf at 0, NaN below 0) and ratio = Div(x, x) (NaN at 0)."""
    nodes = [helper.make_node("Log", ["x"], ["log_x"]), helper.make_node("Div", ["x", "x"], ["ratio"])]
    return save_model(path, nodes, [value_info("x")], [value_info("log_x"), value_info("ratio")])


def save_bad_reshape_model(path: Path) -> Path:
    """Reshape to [3, -1]: valid ONNX, but inference fails for any batch whose size is not a multiple of 3."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [3, -1])
    nodes = [helper.make_node("Constant", [], ["target"], value=shape), helper.make_node("Reshape", ["x", "target"], ["y"])]
    return save_model(path, nodes, [value_info("x")], [value_info("y", shape=(3, None))])


def save_subnormal_model(path: Path) -> Path:
    """tiny = x * 1e-44: every value a float32 subnormal, too close together for 4096 float32 histogram edges."""
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [], [1e-44])
    nodes = [helper.make_node("Constant", [], ["s"], value=scale), helper.make_node("Mul", ["x", "s"], ["tiny"])]
    return save_model(path, nodes, [value_info("x")], [value_info("tiny")])


def save_missing_external_data_model(directory: Path) -> Path:
    """The demo model with its weights in a side file, then that side file deleted."""
    directory.mkdir()
    path = directory / "external.onnx"
    model = onnx.load(str(DEMO_MODEL))
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="external.weights", size_threshold=0)
    (directory / "external.weights").unlink()
    return path


# --- files derived from good ones -----------------------------------------------------------------------------------


def data_dir(path: Path, files: dict[str, object]) -> Path:
    """A data directory: name -> array (.npy), dict of arrays (.npz) or bytes (written as they are)."""
    path.mkdir()
    for name, content in files.items():
        if isinstance(content, bytes):
            (path / name).write_bytes(content)
        elif isinstance(content, dict):
            np.savez(path / name, **content)
        else:
            np.save(path / name, content)
    return path


def rewrite_npz(source: Path, target: Path, edit: Callable[[dict[str, np.ndarray]], None]) -> Path:
    """A copy of a histogram file with some arrays changed (read and written with plain NumPy, no quantlab)."""
    with np.load(source, allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in npz.files}
    edit(arrays)
    np.savez(target, **arrays)
    return target


def flip_byte(path: Path, where: float) -> None:
    data = bytearray(path.read_bytes())
    data[int(where * len(data))] ^= 0xFF
    path.write_bytes(bytes(data))


def set_meta(**changes):
    def edit(arrays):
        arrays["meta"] = np.array(json.dumps({**json.loads(str(arrays["meta"])), **changes}))

    return edit


def set_count(value):
    def edit(arrays):
        counts = arrays["counts"].astype(np.float64)
        counts[1, 100] = value
        arrays["counts"] = counts

    return edit


@pytest.fixture(scope="module")
def f(tmp_path_factory) -> SimpleNamespace:
    """Every input of the corpus, good and bad, as strings ready for the command line."""
    root = tmp_path_factory.mktemp("corpus")
    batch = np.load(CALIB_DIR / "calib_000.npy")[:4]  # (4, 1, 8, 8) float32
    files: dict[str, Path] = {}

    # models
    files["truncated_onnx"] = root / "truncated.onnx"
    files["truncated_onnx"].write_bytes(DEMO_MODEL.read_bytes()[: DEMO_MODEL.stat().st_size // 2])
    files["text_onnx"] = root / "notes.onnx"
    files["text_onnx"].write_text("this is a text file, not a model\n")
    files["external_onnx"] = save_missing_external_data_model(root / "external")
    files["int_onnx"] = save_int_only_model(root / "int_add.onnx")
    files["multi_onnx"] = save_multi_input_model(root / "multi.onnx")
    files["nonfinite_onnx"] = save_nonfinite_model(root / "log_div.onnx")
    files["reshape_onnx"] = save_bad_reshape_model(root / "reshape3.onnx")
    files["subnormal_onnx"] = save_subnormal_model(root / "subnormal.onnx")

    # data directories
    ints = np.arange(8, dtype=np.int64).reshape(2, 4)
    a, ids = np.ones((2, 4), np.float32), np.zeros(2, np.int64)
    files["int_data"] = data_dir(root / "int_data", {"x.npz": {"a": ints, "b": ints}})
    files["multi_data"] = data_dir(root / "multi_data", {"x.npz": {"a": a, "b": a, "ids": ids}})
    files["wrong_name_data"] = data_dir(root / "wrong_name", {"x.npz": {"a": a, "b": a, "idz": ids}})
    files["wrong_dtype_data"] = data_dir(root / "wrong_dtype", {"x.npz": {"a": a.astype(np.float64), "b": a, "ids": ids}})
    files["wrong_rank_data"] = data_dir(root / "wrong_rank", {"x.npy": batch.reshape(4, 64)})
    files["wrong_shape_data"] = data_dir(root / "wrong_shape", {"x.npy": batch[..., :7]})
    files["empty_data"] = data_dir(root / "empty_data", {})
    files["text_data"] = data_dir(root / "text_data", {"x.npy": batch, "notes.txt": b"hello\n"})
    files["fake_npy_data"] = data_dir(root / "fake_npy", {"x.npy": b"not an array\n"})
    npy = io.BytesIO()
    np.save(npy, batch)  # then a header NumPy's parser warns about before it fails
    garbled = npy.getvalue().replace(b"'descr'", b"'desc:'").replace(b"'fortran_order'", b"0for\tran_order'")
    files["garbled_npy_data"] = data_dir(root / "garbled_npy", {"x.npy": garbled})
    files["truncated_npy_data"] = data_dir(root / "truncated_npy", {"x.npy": npy.getvalue()[:-10]})  # header intact
    files["damaged_npz_data"] = data_dir(root / "damaged_npz", {"x.npz": {"input": batch}})
    flip_byte(Path(files["damaged_npz_data"]) / "x.npz", 0.5)  # in the array data: the headers still read fine
    files["small_data"] = data_dir(root / "small", {"x.npy": np.load(EVAL_INPUTS / "eval_000.npy")[:16]})
    files["rows2_data"] = data_dir(root / "rows2", {"x.npy": np.ones((2, 4), np.float32)})
    files["rows_data"] = data_dir(root / "rows", {"x.npy": np.random.default_rng(0).uniform(-1, 1, (8, 4)).astype(np.float32)})

    # labels for the 16 samples of small_data
    for name, labels in {"labels_short": np.zeros(10, np.int64), "labels_long": np.zeros(20, np.int64), "labels_float": np.zeros(16)}.items():
        files[name] = root / f"{name}.npy"
        np.save(files[name], labels)
    files["labels_npz"] = root / "labels_npz.npy"
    with open(files["labels_npz"], "wb") as handle:  # an .npz archive under an .npy name
        np.savez(handle, labels=np.zeros(16, np.int64))

    # histogram files
    histograms = quantlab.collect(DEMO_MODEL, CALIB_DIR)
    files["hist"] = histograms.save(root / "histograms.npz")
    files["hist_multi"] = quantlab.collect(files["multi_onnx"], files["multi_data"]).save(root / "multi_histograms.npz")
    files["hist_v2"] = rewrite_npz(files["hist"], root / "version2.npz", set_meta(format_version=2))
    files["hist_negative"] = rewrite_npz(files["hist"], root / "negative.npz", set_count(-3))
    files["hist_nan"] = rewrite_npz(files["hist"], root / "nan_counts.npz", set_count(np.nan))
    nan_data = data_dir(root / "nan_data", {"x.npy": np.full((4, 1, 8, 8), np.nan, np.float32)})
    files["hist_all_nan"] = quantlab.collect(DEMO_MODEL, nan_data).save(root / "all_nan.npz")
    files["hist_truncated"] = root / "truncated.npz"
    files["hist_truncated"].write_bytes(files["hist"].read_bytes()[:5000])
    encrypted = bytearray(files["hist"].read_bytes())
    encrypted[encrypted.find(b"PK\x01\x02") + 8] |= 1  # central directory: "this member is encrypted"
    files["hist_encrypted"] = root / "encrypted.npz"
    files["hist_encrypted"].write_bytes(bytes(encrypted))
    ranges = quantlab.collect_ranges(DEMO_MODEL, CALIB_DIR)
    files["ranges"] = ranges.save(root / "ranges.npz")
    shards = [quantlab.collect(DEMO_MODEL, CALIB_DIR, ranges=ranges, shard=(i, 2)) for i in range(2)]
    files["shard0"] = shards[0].save(root / "shard0.npz")
    files["shard0_again"] = shards[0].save(root / "shard0_again.npz")
    files["shard1"] = shards[1].save(root / "shard1.npz")
    files["merged"] = HistogramSet.merge(shards).save(root / "merged.npz")

    # threshold files
    amax = quantlab.calibrate(histograms, "max")
    write_thresholds(root / "demo.cache", Thresholds(amax))
    files["cache"] = root / "demo.cache"
    files["qdq"] = quantlab.export_qdq(DEMO_MODEL, Thresholds(amax), root / "model.qdq.onnx")
    good_lines = files["cache"].read_text().splitlines()
    texts = {
        "malformed.cache": "\n".join(good_lines[:3] + [good_lines[3].rsplit(":", 1)[0] + ": 3f8zz000"] + good_lines[4:]) + "\n",
        "empty.cache": "",
        "duplicate.cache": "\n".join(good_lines + [good_lines[2]]) + "\n",
        "unknown_tensor.cache": "\n".join(good_lines + ["bogus_tensor: 3c000000"]) + "\n",
        "broken.json": '{"format": "quantlab-thresholds", "version": 1,\n "thresholds": {"input": 1.0,}}\n',
        "other_table.json": json.dumps({"format": "something-else", "thresholds": {}}),
    }
    for name, text in texts.items():
        (root / name).write_text(text)
        files[name.replace(".", "_")] = root / name
    files["png_cache"] = root / "picture.cache"
    files["png_cache"].write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    files["garbage_flatbuffers"] = root / "garbage.flatbuffers"
    files["garbage_flatbuffers"].write_bytes(b"\xff" * 64)

    # a regular file where a directory is expected
    files["blocker"] = root / "blocker"
    files["blocker"].write_bytes(b"")
    namespace = {name: str(path) for name, path in files.items()}
    return SimpleNamespace(**namespace, root=root, model=str(DEMO_MODEL), calib=str(CALIB_DIR))


# --- the corpus -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One bad input: the command line (`f`: corpus files, `out`: the case's output path), the expected exit code and
    fragments of the one-line error, and whether the output already exists (with sentinel bytes) before the run."""

    id: str
    argv: Callable[[SimpleNamespace, str], list[str]]
    code: int
    fragments: tuple[str, ...]
    out: str = "out.npz"
    sentinel: bool = False
    marks: object = ()


C = Case
CASES = [
    # models
    C("collect-truncated-onnx", lambda f, o: ["collect", f.truncated_onnx, "-d", f.calib, "-o", o], 2, ("truncated.onnx", "not a valid ONNX model"), sentinel=True),
    C("collect-text-file-as-onnx", lambda f, o: ["collect", f.text_onnx, "-d", f.calib, "-o", o], 2, ("notes.onnx", "not a valid ONNX model")),
    C("collect-external-data-missing", lambda f, o: ["collect", f.external_onnx, "-d", f.calib, "-o", o], 2, ("external.onnx", "external data file missing", "external.weights"), sentinel=True),
    C("collect-int64-only-model", lambda f, o: ["collect", f.int_onnx, "-d", f.int_data, "-o", o], 2, ("int_add.onnx", "no float activation tensors")),
    C("export-truncated-onnx", lambda f, o: ["export", f.truncated_onnx, "--thresholds", f.cache, "-o", o], 2, ("truncated.onnx", "not a valid ONNX model"), out="q.onnx", sentinel=True),
    C("drift-external-data-missing", lambda f, o: ["drift", f.external_onnx, "-d", f.small_data, "--thresholds", f.cache, "--json", o], 2, ("external.onnx", "external data file missing"), out="d.json"),
    # calibration data
    C("collect-wrong-input-name", lambda f, o: ["collect", f.multi_onnx, "-d", f.wrong_name_data, "-o", o], 2, ("x.npz", "missing input(s) ids", "unknown name(s) idz")),
    C("collect-wrong-rank", lambda f, o: ["collect", f.model, "-d", f.wrong_rank_data, "-o", o], 2, ("x.npy", "shape (4, 64)", "one sample without the batch dim, or a batch"), sentinel=True),
    C("collect-wrong-shape", lambda f, o: ["collect", f.model, "-d", f.wrong_shape_data, "-o", o], 2, ("x.npy", "shape (4, 1, 8, 7)", "(dim 3)")),
    C("collect-wrong-dtype", lambda f, o: ["collect", f.multi_onnx, "-d", f.wrong_dtype_data, "-o", o], 2, ("x.npz", "input 'a' has dtype float64", "expects float32"), sentinel=True),
    C("collect-empty-data-dir", lambda f, o: ["collect", f.model, "-d", f.empty_data, "-o", o], 2, ("empty_data", "data directory is empty")),
    C("collect-data-file-not-npy", lambda f, o: ["collect", f.model, "-d", f.text_data, "-o", o], 2, ("notes.txt", "not a .npy or .npz file"), sentinel=True),
    C("collect-npy-header-garbled", lambda f, o: ["collect", f.model, "-d", f.garbled_npy_data, "-o", o], 2, ("x.npy", "not a readable .npy file", "Cannot parse header")),
    C("collect-npz-data-damaged", lambda f, o: ["collect", f.model, "-d", f.damaged_npz_data, "-o", o], 2, ("x.npz", "not a readable .npz file", "Bad CRC-32"), sentinel=True),
    C("collect-npy-data-truncated", lambda f, o: ["collect", f.model, "-d", f.truncated_npy_data, "-o", o], 2, ("x.npy", "not a readable .npy file", "truncated: 1014 of 1024 data bytes"), sentinel=True),
    C("collect-corrupt-npy", lambda f, o: ["collect", f.model, "-d", f.fake_npy_data, "-o", o], 2, ("x.npy", "not a readable .npy file")),
    C("collect-inference-fails", lambda f, o: ["collect", f.reshape_onnx, "-d", f.rows2_data, "-o", o], 1, ("inference failed",), sentinel=True),
    C("drift-wrong-shape", lambda f, o: ["drift", f.model, "-d", f.wrong_shape_data, "--thresholds", f.cache, "--json", o], 2, ("x.npy", "(dim 3)"), out="d.json", sentinel=True),
    # options
    C("collect-bins-0", lambda f, o: ["collect", f.model, "-d", f.calib, "--bins", "0", "-o", o], 2, ("--bins must be between 1 and 65536, got 0",), sentinel=True),
    C("collect-bins-too-many", lambda f, o: ["collect", f.model, "-d", f.calib, "--bins", "100000", "-o", o], 2, ("--bins must be between 1 and 65536, got 100000",), sentinel=True),
    C("collect-bins-not-a-number", lambda f, o: ["collect", f.model, "-d", f.calib, "--bins", "many", "-o", o], 2, ("Invalid value for '--bins'", "valid integer")),
    C("collect-batch-size-0", lambda f, o: ["collect", f.model, "-d", f.calib, "--batch-size", "0", "-o", o], 2, ("--batch-size must be at least 1, got 0",)),
    C("collect-shard-3-of-2", lambda f, o: ["collect", f.model, "-d", f.calib, "--ranges", f.ranges, "--shard", "3/2", "-o", o], 2, ("--shard 3/2", "0 <= I < N"), sentinel=True),
    C("collect-ranges-of-another-file-kind", lambda f, o: ["collect", f.model, "-d", f.calib, "--ranges", f.hist, "--shard", "0/2", "-o", o], 2, ("histograms.npz", "not a quantlab ranges file")),
    C("calibrate-percentile-120", lambda f, o: ["calibrate", f.hist, "-m", "percentile", "--percentile", "120", "-o", o], 2, ("percentile must be in [0, 100], got 120",), out="t.json", sentinel=True),
    C("calibrate-compare-unknown-method", lambda f, o: ["calibrate", f.hist, "-o", o, "--compare", "max,nope"], 2, ("unknown calibration method 'nope'",), out="t.json", sentinel=True),
    C("calibrate-unknown-method", lambda f, o: ["calibrate", f.hist, "-m", "entropy", "-o", o], 2, ("unknown calibration method 'entropy'",), out="t.cache"),
    C("drift-batch-size-0", lambda f, o: ["drift", f.model, "-d", f.small_data, "--thresholds", f.cache, "-b", "0", "--json", o], 2, ("--batch-size must be at least 1, got 0",), out="d.json"),
    C("missing-required-argument", lambda f, o: ["collect", "-d", f.calib, "-o", o], 2, ("Missing argument 'model'",)),
    # histogram files
    C("merge-other-format-version", lambda f, o: ["merge", f.hist, f.hist_v2, "-o", o], 2, ("version2.npz", "histogram format version 2 is not supported"), sentinel=True),
    C("merge-other-model", lambda f, o: ["merge", f.hist, f.hist_multi, "-o", o], 2, ("cannot merge histograms of different models",)),
    C("merge-same-shard-twice", lambda f, o: ["merge", f.shard0, f.shard0_again, "-o", o], 2, ("shard 0/2 is given more than once",), sentinel=True),
    C("merge-a-merged-file-with-one-of-its-parts", lambda f, o: ["merge", f.merged, f.shard1, "-o", o], 2, ("shard 1/2 is given more than once",)),
    C("merge-negative-counts", lambda f, o: ["merge", f.hist, f.hist_negative, "-o", o], 2, ("negative.npz", "counts contain negative values")),
    C("calibrate-all-nan-tensor", lambda f, o: ["calibrate", f.hist_all_nan, "-o", o], 2, ("no tensor can be quantized: 'input', ", "'logits' (only NaN/Inf values)"), out="t.cache"),
    C("calibrate-nan-counts", lambda f, o: ["calibrate", f.hist_nan, "-o", o], 2, ("nan_counts.npz", "counts contain NaN or Inf"), out="t.json", sentinel=True),
    C("show-truncated-histograms", lambda f, o: ["show", f.hist_truncated], 2, ("truncated.npz", "not a quantlab histogram file")),
    C("show-encrypted-zip-member", lambda f, o: ["show", f.hist_encrypted], 2, ("encrypted.npz", "not a quantlab histogram file", "encrypted")),
    C("show-model-as-histograms", lambda f, o: ["show", f.model], 2, ("digits_cnn.onnx", "not a quantlab histogram file (not an .npz archive)")),
    C("show-npy-array-as-histograms", lambda f, o: ["show", str(Path(f.small_data) / "x.npy")], 2, ("x.npy", "not a quantlab histogram file (not an .npz archive)")),
    C("show-plot-unknown-tensor", lambda f, o: ["show", f.hist, "logit", "--plot", o], 2, ("no tensor named 'logit'", "did you mean logits"), out="h.png", sentinel=True),
    # threshold files
    C("cache-show-malformed-hex", lambda f, o: ["cache", "show", f.malformed_cache], 2, ("malformed.cache:4:", "'3f8zz000' is not 1-8 hex digits")),
    C("cache-show-png-as-cache", lambda f, o: ["cache", "show", f.png_cache], 2, ("picture.cache:1:", "not UTF-8 text")),
    C("cache-show-empty-cache", lambda f, o: ["cache", "show", f.empty_cache], 2, ("empty.cache", "empty file")),
    C("cache-show-duplicate-tensor", lambda f, o: ["cache", "show", f.duplicate_cache], 2, ("duplicate.cache:17:", "duplicate tensor", "first on line 3")),
    C("cache-show-a-directory", lambda f, o: ["cache", "show", f.empty_data], 2, ("empty_data", "is a directory")),
    C("diff-malformed-json", lambda f, o: ["diff", f.cache, f.broken_json], 2, ("broken.json:2:", "invalid JSON")),
    C("diff-foreign-json", lambda f, o: ["diff", f.other_table_json, f.cache], 2, ("other_table.json", "not a quantlab threshold table")),
    C("diff-garbage-ort-table", lambda f, o: ["diff", f.cache, f.garbage_flatbuffers], 2, ("garbage.flatbuffers", "not an ONNX Runtime calibration table")),
    C("export-thresholds-of-another-model", lambda f, o: ["export", f.model, "--thresholds", str(FOREIGN_CACHE), "-o", o], 2, ("no threshold for", "digits_cnn.onnx", "another model"), out="q.onnx"),
    C("export-unknown-tensor", lambda f, o: ["export", f.model, "--thresholds", f.unknown_tensor_cache, "-o", o], 2, ("not activation tensors of digits_cnn.onnx", "bogus_tensor"), out="q.onnx", sentinel=True),
    C("drift-unknown-tensor", lambda f, o: ["drift", f.model, "-d", f.small_data, "--thresholds", f.unknown_tensor_cache, "--json", o], 2, ("not activation tensors of digits_cnn.onnx", "bogus_tensor"), out="d.json"),
    C("drift-too-few-labels", lambda f, o: ["drift", f.model, "-d", f.small_data, "--thresholds", f.cache, "--labels", f.labels_short, "--json", o], 2, ("fewer labels (10) than samples",), out="d.json", sentinel=True),
    C("drift-too-many-labels", lambda f, o: ["drift", f.model, "-d", f.small_data, "--thresholds", f.cache, "--labels", f.labels_long, "--json", o], 2, ("20 labels for 16 samples",), out="d.json"),
    C("drift-float-labels", lambda f, o: ["drift", f.model, "-d", f.small_data, "--thresholds", f.cache, "--labels", f.labels_float, "--json", o], 2, ("labels_float.npy", "1-D integer array"), out="d.json", sentinel=True),
    C("drift-labels-in-an-npz-archive", lambda f, o: ["drift", f.model, "-d", f.small_data, "--thresholds", f.cache, "--labels", f.labels_npz, "--json", o], 2, ("labels_npz.npy", "not an .npz archive"), out="d.json"),
    C("drift-keep-fp32-with-a-qdq-model", lambda f, o: ["drift", f.model, "-d", f.small_data, "--qdq", f.qdq, "--keep-fp32", "1", "--json", o], 2, ("--keep-fp32/--target-sqnr rebuild the INT8 model", "not --qdq"), out="d.json", sentinel=True),
    C("drift-keep-fp32-negative", lambda f, o: ["drift", f.model, "-d", f.small_data, "--thresholds", f.cache, "--keep-fp32", "-1", "--json", o], 2, ("--keep-fp32 must be >= 0, got -1",), out="d.json"),
    C("drift-keep-fp32-and-target-sqnr", lambda f, o: ["drift", f.model, "-d", f.small_data, "--thresholds", f.cache, "--keep-fp32", "1", "--target-sqnr", "30", "--json", o], 2, ("exactly one of --keep-fp32 K and --target-sqnr DB",), out="d.json"),
    C("build-without-tensorrt", lambda f, o: ["build", f.model, "--cache", f.cache, "-o", o], 2, ("TensorRT is not installed",), out="m.engine", sentinel=True,
      marks=pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed")),
    # outputs
    C("collect-output-parent-is-a-file", lambda f, o: ["collect", f.model, "-d", f.calib, "-o", str(Path(f.blocker) / "h.npz")], 2, ("blocker is not a directory",)),
    C("collect-output-is-a-directory", lambda f, o: ["collect", f.model, "-d", f.calib, "-o", str(Path(o).parent)], 2, ("output path is a directory",)),
    C("merge-output-parent-is-a-file", lambda f, o: ["merge", f.shard0, "-o", str(Path(f.blocker) / "m.npz")], 2, ("blocker is not a directory",)),
    C("calibrate-output-is-a-directory", lambda f, o: ["calibrate", f.hist, "-o", str(Path(o).parent)], 2, ("output path is a directory",)),
    C("calibrate-unknown-output-extension", lambda f, o: ["calibrate", f.hist, "-o", o], 2, ("t.txt", "cannot tell the threshold format"), out="t.txt", sentinel=True),
    C("export-output-parent-is-a-file", lambda f, o: ["export", f.model, "--thresholds", f.cache, "-o", str(Path(f.blocker) / "q.onnx")], 2, ("blocker is not a directory",)),
    C("drift-json-output-is-a-directory", lambda f, o: ["drift", f.model, "-d", f.small_data, "--thresholds", f.cache, "--json", str(Path(o).parent)], 2, ("output path is a directory",)),
    C("show-plot-unknown-image-format", lambda f, o: ["show", f.hist, "logits", "--plot", o], 2, ("h.xyz", "cannot write a plot as 'xyz'", "png"), out="h.xyz"),
    C("calibrate-plot-unknown-image-format", lambda f, o: ["calibrate", f.hist, "-o", o, "--compare", "max,kl", "--plot", str(Path(o).with_name("c.xyz"))], 2, ("c.xyz", "cannot write a plot as 'xyz'"), out="t.json", sentinel=True),
    C("drift-plot-unknown-image-format", lambda f, o: ["drift", f.model, "-d", f.small_data, "--thresholds", f.cache, "--json", o, "--plot", str(Path(o).with_name("d.xyz"))], 2, ("d.xyz", "cannot write a plot as 'xyz'"), out="d.json"),
    C("demo-out-is-a-file", lambda f, o: ["demo", "--out", o], 2, ("demo.out", "exists and is not a directory"), out="demo.out", sentinel=True),
]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", [pytest.param(case, id=case.id, marks=case.marks) for case in CASES])
def test_bad_input_is_one_line_and_writes_nothing(case, f, tmp_path):
    out = tmp_path / case.out
    if case.sentinel:
        out.write_bytes(SENTINEL)
    before, corpus_before = snapshot(tmp_path), sorted(p.name for p in f.root.rglob("*"))
    result = run(*case.argv(f, str(out)), cwd=tmp_path)
    assert_one_line_error(result, case.code, *case.fragments)
    assert snapshot(tmp_path) == before  # no output, no temp file, the previous output untouched
    assert sorted(p.name for p in f.root.rglob("*")) == corpus_before
    assert Path(f.blocker).read_bytes() == b""


class _Names:
    """Stands in for the corpus files: every attribute is its own name."""

    def __getattr__(self, name: str) -> str:
        return name


def test_the_corpus_covers_every_command():
    commands = {case.argv(_Names(), "out")[0] for case in CASES}
    assert commands == {"collect", "merge", "show", "calibrate", "cache", "diff", "export", "drift", "demo", "build"}
    assert len(CASES) >= 30 and len({case.id for case in CASES}) == len(CASES)
    assert 0.35 <= sum(case.sentinel for case in CASES) / len(CASES) <= 0.65


# --- NaN and Inf: counted, left out, reported; the run succeeds -------------------------------------------------------


def nan_inf_inputs(directory: Path) -> Path:
    batch = np.load(CALIB_DIR / "calib_000.npy")
    batch[0, 0, 1, 1] = batch[3, 0, 4, 4] = np.nan
    batch[2, 0, 0, 0] = np.inf
    batch[5, 0, 7, 7] = -np.inf
    return data_dir(directory, {"x.npy": batch})


def zeros_and_negatives(directory: Path) -> Path:
    """Finite inputs that make Log give -inf (at 0) and NaN (below 0), and Div(x, x) give NaN (at 0)."""
    x = np.array([[1.0, 2.0, 0.0, -1.0], [0.5, 0.0, 3.0, -2.0], [4.0, 1.0, 2.0, 8.0]], np.float32)
    return data_dir(directory, {"x.npy": x})


@dataclass(frozen=True)
class Warned:
    id: str
    model: Callable[[SimpleNamespace], str]
    data: Callable[[Path], Path]
    counts: dict[str, tuple[int, int]]  # tensor -> (NaN, Inf) values it must have left out (downstream ones may too)


WARNINGS = [
    Warned("nan-and-inf-in-inputs", lambda f: f.model, nan_inf_inputs, {"input": (2, 2)}),
    Warned("log-and-div-make-nan-and-inf", lambda f: f.nonfinite_onnx, zeros_and_negatives, {"x": (0, 0), "log_x": (2, 2), "ratio": (2, 0)}),
]


@pytest.mark.parametrize("case", [pytest.param(case, id=case.id) for case in WARNINGS])
def test_nan_and_inf_are_counted_left_out_and_reported(case, f, tmp_path):
    out = tmp_path / "h.npz"
    data = case.data(tmp_path / "data")
    result = run("collect", case.model(f), "-d", str(data), "-o", str(out))
    assert result.returncode == 0, result.stderr
    histograms = quantlab.load_histograms(out)
    for name, counts in case.counts.items():
        assert (histograms[name].nan_count, histograms[name].inf_count) == counts
    # one warning line per tensor with NaN or Inf, with its counts, and nothing else on stderr
    expected = [
        f"warning: {name}: {hist.nan_count} NaN and {hist.inf_count} Inf values left out of its histogram"
        for name, hist in histograms.items() if hist.nan_count or hist.inf_count
    ]
    assert expected and result.stderr.strip().splitlines() == expected
    reference = quantlab.collect(case.model(f), data)
    for name, hist in histograms.items():
        assert hist.counts.sum() == hist.count  # only the finite values are binned
        np.testing.assert_array_equal(hist.counts, reference[name].counts)
    calibrated = run("calibrate", str(out), "-o", str(tmp_path / "t.json"))
    assert calibrated.returncode == 0, calibrated.stderr


def test_a_tensor_of_subnormal_values_is_collected(f, tmp_path):
    """Not an error: np.histogram refuses 4096 float32 bins over [-1e-44, 1e-44], so collect bins it in float64."""
    out = tmp_path / "h.npz"
    result = run("collect", f.subnormal_onnx, "-d", f.rows_data, "-o", str(out))
    assert result.returncode == 0 and not result.stderr, result.stderr
    values = np.load(Path(f.rows_data) / "x.npy") * np.float32(1e-44)
    amax = float(np.abs(values).max())
    counts, edges = np.histogram(values.astype(np.float64), bins=4096, range=(-amax, amax))
    tiny = quantlab.load_histograms(out)["tiny"]
    np.testing.assert_array_equal(tiny.counts, counts)
    np.testing.assert_array_equal(tiny.edges, edges)


def test_python_warnings_are_one_line_too(tmp_path):
    """A tensor that is all zeros gets amax 0 with a warning: one line per tensor, not Python's two-line format."""
    data = data_dir(tmp_path / "zeros", {"x.npy": np.zeros((4, 1, 8, 8), np.float32)})
    assert run("collect", str(DEMO_MODEL), "-d", str(data), "-o", str(tmp_path / "h.npz")).returncode == 0
    result = run("calibrate", str(tmp_path / "h.npz"), "-o", str(tmp_path / "t.json"))
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "warning: tensor 'input' is all zeros: amax = 0" in lines
    assert all(line.startswith("warning: tensor ") and line.endswith(": amax = 0") for line in lines)
