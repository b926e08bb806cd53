"""Inputs as real models declare them: dims stored as -1 or 0 (PaddlePaddle), symbolic or missing dims, a recurrent
state whose first dim is not a batch dim, scalar inputs. Collection must never hang on them, must feed each input as
the model declares it, and the four commands must go through."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import quantlab
from conftest import run_all_float_outputs
from quantlab.data import CalibrationData
from quantlab.model import input_specs, load_model
from test_cli import assert_one_line_error, run
from test_collect import assert_exact


def save_conv_model(path, dims) -> None:
    """x [dims] -> Conv(3->4, 3x3, pad 1) -> Relu -> GlobalAveragePool -> Flatten: y [N, 4]. `dims` are the input's
    four dims as stored: an int (dim_value, -1 and 0 included), a str (dim_param) or None (no value at all)."""
    rng = np.random.default_rng(0)
    shape = helper.make_tensor_type_proto(TensorProto.FLOAT, None).tensor_type.shape
    for dim in dims:
        entry = shape.dim.add()
        if isinstance(dim, int):
            entry.dim_value = dim
        elif isinstance(dim, str):
            entry.dim_param = dim
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, None)
    x.type.tensor_type.shape.CopyFrom(shape)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["act"]),
        helper.make_node("GlobalAveragePool", ["act"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["y"]),
    ]
    weights = [
        numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "b"),
    ]
    graph = helper.make_graph(nodes, "dims", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])], weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


@pytest.mark.parametrize(
    "dims",
    [(-1, 3, -1, -1), (0, 3, 0, 0), ("N", 3, "H", "W"), (None, None, None, None), (-1, -1, -1, -1)],
    ids=["minus-one", "zero", "symbolic", "unset", "all-minus-one"],
)
def test_collect_ends_and_is_exact_on_dynamic_dims_however_stored(tmp_path, dims):
    model = tmp_path / "model.onnx"
    save_conv_model(model, dims)
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(1)
    sizes = [(8, 12)] * 3 + [(10, 6)] * 2 + [(8, 12)]  # the dynamic dims change between files
    samples = [rng.normal(size=(3, h, w)).astype(np.float32) for h, w in sizes]
    for i, sample in enumerate(samples):
        np.save(data / f"{i:02d}.npy", sample)
    specs = input_specs(load_model(model))
    assert specs[0].has_batch_dim and all(not isinstance(d, int) or d > 0 for d in specs[0].shape)
    out = tmp_path / "h.npz"
    result = run("collect", str(model), "--data", str(data), "--out", str(out), "--bins", "64", "-q", timeout=60)
    assert result.returncode == 0, result.stderr
    oracle = tmp_path / "symbolic.onnx"  # the same model as ONNX Runtime runs it (it refuses every input of a dim 0)
    save_conv_model(oracle, ("N", 3, "H", "W"))
    activations = run_all_float_outputs(oracle, [{"x": s[None]} for s in samples])
    assert_exact(quantlab.load_histograms(out), activations, bins=64)


def save_recurrent_model(path) -> None:
    """A voice-activity-like model: an audio window `input` [1, 16] and a recurrent `state` [2, 1, 8] (h and c of an
    LSTM) whose first dims differ and are fixed. input -> MatMul (16 x 16, quantized; the 8 -> 1 head stays in float
    as a small GEMM) -> LSTM (state as initial h, c) -> GRU (initial h from the state) -> MatMul -> Sigmoid: `output`
    [1, 1]; the new state `stateN` [2, 1, 8] = Concat(Y_h, Y_c)."""
    rng = np.random.default_rng(2)
    hidden = 8

    def weight(name, *shape):
        return numpy_helper.from_array((rng.normal(size=shape) / np.sqrt(shape[-1])).astype(np.float32), name)

    nodes = [
        helper.make_node("MatMul", ["input", "w_in"], ["features"]),  # [1, 16]
        helper.make_node("Unsqueeze", ["features", "axis0"], ["sequence"]),  # [1 step, 1 batch, 16]
        helper.make_node("Split", ["state"], ["h0", "c0"], axis=0),  # [1, 1, 8] each
        helper.make_node("LSTM", ["sequence", "lstm_w", "lstm_r", "lstm_b", "", "h0", "c0"], ["lstm_y", "h1", "c1"], hidden_size=hidden),
        helper.make_node("Squeeze", ["lstm_y", "axis1"], ["lstm_seq"]),  # [1, 1, 8]
        helper.make_node("GRU", ["lstm_seq", "gru_w", "gru_r", "gru_b", "", "h0"], ["", "gru_h"], hidden_size=hidden, linear_before_reset=1),
        helper.make_node("Squeeze", ["gru_h", "axis0"], ["last"]),  # [1, 8]
        helper.make_node("MatMul", ["last", "w_out"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["output"]),
        helper.make_node("Concat", ["h1", "c1"], ["stateN"], axis=0),
    ]
    initializers = [
        weight("w_in", 16, 16),
        weight("lstm_w", 1, 4 * hidden, 16),
        weight("lstm_r", 1, 4 * hidden, hidden),
        weight("lstm_b", 1, 8 * hidden),
        weight("gru_w", 1, 3 * hidden, hidden),
        weight("gru_r", 1, 3 * hidden, hidden),
        weight("gru_b", 1, 6 * hidden),
        weight("w_out", hidden, 1),
        numpy_helper.from_array(np.array([0], np.int64), "axis0"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
    ]
    graph = helper.make_graph(
        nodes,
        "recurrent",
        [  # the state first: a feed's first array is not its sample count
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, 1, hidden]),
            helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 16]),
        ],
        [
            helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1]),
            helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, 1, hidden]),
        ],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def save_stream(model, directory, chunks: int, seed: int) -> list[dict[str, np.ndarray]]:
    """`.npz` samples of a stream as a voice-activity model sees it: each chunk with the state the FP32 model returned
    for the chunk before (zeros first). Returns the feeds."""
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    directory.mkdir()
    state = np.zeros((2, 1, 8), np.float32)
    feeds = []
    for i in range(chunks):
        feed = {"input": rng.normal(size=(1, 16)).astype(np.float32), "state": state}
        np.savez(directory / f"{i:03d}.npz", **feed)
        feeds.append(feed)
        _, state = session.run(["output", "stateN"], feed)
    return feeds


def test_a_recurrent_state_input_is_fed_as_declared_through_all_four_commands(tmp_path):
    model = tmp_path / "vad.onnx"
    save_recurrent_model(model)
    specs = {spec.name: spec for spec in input_specs(load_model(model))}
    assert not specs["input"].has_batch_dim and not specs["state"].has_batch_dim
    calib = save_stream(model, tmp_path / "calib", chunks=12, seed=3)
    save_stream(model, tmp_path / "eval", chunks=9, seed=4)
    histograms, thresholds, qdq, report = (tmp_path / name for name in ("h.npz", "t.json", "q.onnx", "d.json"))

    result = run("collect", str(model), "--data", str(tmp_path / "calib"), "--out", str(histograms), "-q")
    assert result.returncode == 0, result.stderr
    collected = quantlab.load_histograms(histograms)
    activations = run_all_float_outputs(model, calib)
    assert_exact(collected, {name: activations[name] for name in collected})
    assert collected["state"].count == 12 * 2 * 8 and collected["input"].count == 12 * 16
    assert {"h1", "c1", "gru_h", "stateN", "output"} <= set(collected)

    for args in (
        ("calibrate", str(histograms), "--out", str(thresholds)),
        ("export", str(model), "--thresholds", str(thresholds), "--out", str(qdq)),
        ("drift", str(model), "--data", str(tmp_path / "eval"), "--qdq", str(qdq), "--json", str(report)),
    ):
        result = run(*args)
        assert result.returncode == 0, result.stderr
    drift = json.loads(report.read_text())
    assert drift["final"]["samples"] == drift["metadata"]["samples"] == 9
    final = {output["name"]: output for output in drift["final"]["outputs"]}
    assert set(final) == {"output", "stateN"}
    assert all(output["sqnr_db"] is not None and output["sqnr_db"] > 20 for output in final.values()), final


def test_samples_of_inputs_without_a_batch_dim_may_come_stacked_but_run_one_at_a_time(tmp_path):
    model = tmp_path / "vad.onnx"
    save_recurrent_model(model)
    feeds = save_stream(model, tmp_path / "single", chunks=5, seed=5)
    stacked = tmp_path / "stacked"
    stacked.mkdir()
    np.savez(stacked / "all.npz", **{name: np.stack([feed[name] for feed in feeds]) for name in ("input", "state")})
    data = CalibrationData(stacked, input_specs(load_model(model)))
    assert len(data) == 5 and data.batch_size == 1
    for feed, expected in zip(data, feeds, strict=True):
        assert {name: a.shape for name, a in feed.items()} == {"input": (1, 16), "state": (2, 1, 8)}
        for name in feed:
            np.testing.assert_array_equal(feed[name], expected[name])
    single = quantlab.collect(model, tmp_path / "single", bins=64)
    together = quantlab.collect(model, stacked, bins=64)
    for name in single:
        np.testing.assert_array_equal(single[name].counts, together[name].counts)
    result = run("collect", str(model), "--data", str(stacked), "--batch-size", "4", "-o", str(tmp_path / "h.npz"))
    assert_one_line_error(result, 2, "--batch-size 4", "no batch dimension")


def test_a_scalar_input_is_fed_with_every_sample(tmp_path):
    """A scalar int64 input (a sample rate, a step count) beside a batched float input: each sample runs alone."""
    nodes = [
        helper.make_node("Cast", ["rate"], ["rate_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x", "rate_f"], ["scaled"]),
        helper.make_node("Relu", ["scaled"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "scalar",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5]), helper.make_tensor_value_info("rate", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
    )
    model = tmp_path / "scalar.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(model))
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(6)
    feeds = [{"x": rng.normal(size=(1, 5)).astype(np.float32), "rate": np.array(r, np.int64)} for r in (1, 2, 3, 4)]
    for i, feed in enumerate(feeds):
        np.savez(data / f"{i}.npz", **feed)
    histograms = quantlab.collect(model, data, bins=32)
    activations = run_all_float_outputs(model, feeds)
    assert_exact(histograms, {name: activations[name] for name in histograms}, bins=32)
