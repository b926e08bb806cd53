"""Classes of third-party models that `export` and `drift` must take (issue 17), each built small with onnx.helper and
run through the four commands as a user runs them: collect, calibrate, export, drift.

Weights held in Constant nodes (PaddlePaddle, tf2onnx), opset 11 models, graph outputs that are inputs passed through
or that other nodes also read (a BERT encoder returning its token ids), exported models ONNX Runtime cannot run, and
recurrent, transposed-convolution, Resize, decomposed-LayerNorm and integer-input models.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantlab.formats import read_thresholds
from quantlab.formats.qdq import fp32_names
from quantlab.mixed import quantized_layers
from test_cli import assert_one_line_error, run

RNG = np.random.default_rng(0)


def weights(*shape: int, dtype=np.float32) -> np.ndarray:
    return (RNG.normal(size=shape) * 0.5).astype(dtype)


def constant(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name))


def save(path: Path, nodes, inputs, outputs, initializers=(), opset: int = 17, ir_version: int | None = None) -> Path:
    graph = helper.make_graph(nodes, path.stem, inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    if ir_version is not None:
        model.ir_version = ir_version
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def four_commands(model: Path, data: Path, tmp_path: Path, *calibrate_options: str) -> dict:
    """collect, calibrate, export, drift in subprocesses; each must succeed. Returns the drift report (JSON)."""
    histograms, thresholds, qdq, report = (tmp_path / name for name in ("h.npz", "t.json", "q.onnx", "d.json"))
    commands = [
        ("collect", str(model), "--data", str(data), "-o", str(histograms), "-q"),
        ("calibrate", str(histograms), "-o", str(thresholds), *calibrate_options),
        ("export", str(model), "--thresholds", str(thresholds), "-o", str(qdq)),
        ("drift", str(model), "--data", str(data), "--qdq", str(qdq), "--json", str(report)),
    ]
    for command in commands:
        result = run(*command)
        assert result.returncode == 0, (command[0], result.stderr)
        assert "Traceback" not in result.stderr
    return json.loads(report.read_text())


def producer_of(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {name: node for node in model.graph.node for name in node.output}


def node_named(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(node for node in model.graph.node if node.name == name)


def assert_thresholds_name_qdq_tensors(thresholds: Path, qdq: onnx.ModelProto) -> None:
    """The tensors the thresholds were calibrated for all still stand in the Q/DQ model, by their FP32 names."""
    assert set(read_thresholds(thresholds).amax) <= set(fp32_names(qdq).values())


# A. Weights in Constant nodes -----------------------------------------------------------------------------------------


def save_constant_weights_model(path: Path) -> dict[str, tuple[np.ndarray, int]]:
    """A model without a single initializer: every weight is a Constant node, directly or behind a chain.

    x [N, 3, 8, 8] -> conv (Constant) -> Relu -> conv2 (Unsqueeze of a Constant: a 3x1 kernel) -> Relu
    -> deconv (ConvTranspose to 16 channels, Reshape of a flat Constant) -> Relu -> GlobalAveragePool -> Flatten
    -> fc (Gemm transB, Transpose of a Constant) -> proj (MatMul, Identity of a Cast of a float16 Constant): y [N, 16].
    fc and proj are 16 x 16 (a MatMul or Gemm below MIN_GEMM_DIM stays in float).
    Returns node name -> (its weight's FP32 value, output-channel axis).
    """
    conv_w, conv_b = weights(4, 3, 3, 3), weights(4)
    conv2_w = weights(4, 4, 3)
    deconv_w = weights(4, 16, 2, 2)
    fc_w, fc_b = weights(16, 16), weights(16)
    proj_w = weights(16, 16, dtype=np.float16)
    nodes = [
        constant("conv.w", conv_w),
        constant("conv.b", conv_b),
        helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["c1"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        constant("conv2.w3", conv2_w),
        constant("axis3", np.array([3], np.int64)),
        helper.make_node("Unsqueeze", ["conv2.w3", "axis3"], ["conv2.w"]),
        helper.make_node("Conv", ["r1", "conv2.w"], ["c2"], name="conv2", pads=[1, 0, 1, 0]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        constant("deconv.flat", deconv_w.ravel()),
        constant("deconv.shape", np.array(deconv_w.shape, np.int64)),
        helper.make_node("Reshape", ["deconv.flat", "deconv.shape"], ["deconv.w"]),
        helper.make_node("ConvTranspose", ["r2", "deconv.w"], ["d"], name="deconv", strides=[2, 2]),
        helper.make_node("Relu", ["d"], ["r3"]),
        helper.make_node("GlobalAveragePool", ["r3"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
        constant("fc.wt", fc_w.T.copy()),
        helper.make_node("Transpose", ["fc.wt"], ["fc.w"], perm=[1, 0]),
        constant("fc.b", fc_b),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["g"], name="fc", transB=1),
        constant("proj.w16", proj_w),
        helper.make_node("Cast", ["proj.w16"], ["proj.w32"], to=TensorProto.FLOAT),
        helper.make_node("Identity", ["proj.w32"], ["proj.w"]),
        helper.make_node("MatMul", ["g", "proj.w"], ["y"], name="proj"),
    ]
    save(
        path,
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
    )
    return {
        "conv": (conv_w, 0),
        "conv2": (conv2_w[..., np.newaxis], 0),
        "deconv": (deconv_w, 1),
        "fc": (fc_w, 0),
        "proj": (proj_w.astype(np.float32), 1),
    }


def image_data(directory: Path, shape: tuple[int, ...] = (3, 8, 8), files: int = 2, samples: int = 4) -> Path:
    directory.mkdir()
    rng = np.random.default_rng(1)
    for index in range(files):
        np.save(directory / f"x{index}.npy", rng.normal(size=(samples, *shape)).astype(np.float32))
    return directory


def test_weights_in_constant_nodes_are_quantized_per_output_channel(tmp_path):
    model = tmp_path / "paddle.onnx"
    expected = save_constant_weights_model(model)
    report = four_commands(model, image_data(tmp_path / "data"), tmp_path, "--method", "max")  # KL clips 8 samples hard

    qdq = onnx.load(str(tmp_path / "q.onnx"))
    values = {init.name: numpy_helper.to_array(init) for init in qdq.graph.initializer}
    made_by = producer_of(qdq)
    for name, (weight, axis) in expected.items():
        dequantize = made_by[node_named(qdq, name).input[1]]
        assert dequantize.op_type == "DequantizeLinear", name
        int8_weight, scale, zero_point = (values[input_name] for input_name in dequantize.input)
        assert int8_weight.dtype == np.int8 and int8_weight.shape == weight.shape and not zero_point.any(), name
        assert scale.shape == (weight.shape[axis],), name  # one scale per output channel
        assert next(attr.i for attr in dequantize.attribute if attr.name == "axis") == axis, name
        channel_max = np.abs(np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)).max(axis=1)
        np.testing.assert_allclose(scale, channel_max / 127, rtol=1e-6)
    assert not any(node.op_type == "Constant" and node.output[0].startswith(tuple(expected)) for node in qdq.graph.node)
    assert_thresholds_name_qdq_tensors(tmp_path / "t.json", qdq)
    (final,) = report["final"]["outputs"]
    assert final["name"] == "y" and final["sqnr_db"] > 25


# B. Opset 11 ----------------------------------------------------------------------------------------------------------


def save_opset11_model(path: Path, ir_version: int) -> Path:
    """An opset 11 model of the ops whose attributes became inputs at 13 (Split, Squeeze, Unsqueeze, ReduceSum), with
    Resize and Pad as opset 11 has them, a Softmax whose meaning changed at 13, Clip with min/max inputs and Constant
    weights. IR 3 lists every initializer as a graph input too, as the old converters wrote.

    x [N, 3, 8, 8] -> Pad (reflect) -> conv (Constant weights) -> Relu -> Split [2, 2] -> Concat (swapped) -> Resize x2
    -> deconv (ConvTranspose) -> ReduceSum (axes 3) -> Softmax (axis 1 of a 3-D tensor) -> Clip -> Unsqueeze (axes 1)
    -> Squeeze (axes 1) -> Flatten -> fc (Gemm, 64 -> 16): y [N, 16].
    """
    nodes = [
        constant("conv.w", weights(4, 3, 3, 3)),
        constant("conv.b", weights(4)),
        helper.make_node("Pad", ["x", "pads"], ["padded"], mode="reflect"),
        helper.make_node("Conv", ["padded", "conv.w", "conv.b"], ["c1"], name="conv"),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Split", ["r1"], ["s1", "s2"], axis=1, split=[2, 2]),
        helper.make_node("Concat", ["s2", "s1"], ["swapped"], axis=1),
        helper.make_node("Resize", ["swapped", "roi", "scales"], ["up"], mode="nearest"),
        helper.make_node("ConvTranspose", ["up", "deconv.w"], ["d"], name="deconv", strides=[2, 2]),
        helper.make_node("ReduceSum", ["d"], ["rows"], axes=[3], keepdims=0),
        helper.make_node("Softmax", ["rows"], ["soft"], axis=1),
        helper.make_node("Clip", ["soft", "low", "high"], ["clipped"]),
        helper.make_node("Unsqueeze", ["clipped"], ["u"], axes=[1]),
        helper.make_node("Squeeze", ["u"], ["sq"], axes=[1]),
        helper.make_node("Flatten", ["sq"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["y"], name="fc", transB=1),
    ]
    initializers = [
        numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"),
        numpy_helper.from_array(np.array([], np.float32), "roi"),
        numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
        numpy_helper.from_array(weights(4, 2, 2, 2), "deconv.w"),
        numpy_helper.from_array(np.array(0.001, np.float32), "low"),
        numpy_helper.from_array(np.array(0.5, np.float32), "high"),
        numpy_helper.from_array(weights(16, 2 * 32), "fc.w"),
        numpy_helper.from_array(weights(16), "fc.b"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])]
    if ir_version < 4:
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in initializers]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])]
    return save(path, nodes, inputs, outputs, initializers, opset=11, ir_version=ir_version)


@pytest.mark.parametrize("ir_version", [6, 3])
def test_opset_11_model_is_converted_and_keeps_every_tensor_name(tmp_path, ir_version):
    model = tmp_path / "opset11.onnx"
    save_opset11_model(model, ir_version)
    report = four_commands(model, image_data(tmp_path / "data"), tmp_path)

    qdq = onnx.load(str(tmp_path / "q.onnx"))
    onnx.checker.check_model(qdq, full_check=True)
    assert next(entry.version for entry in qdq.opset_import if entry.domain == "") == 13
    assert_thresholds_name_qdq_tensors(tmp_path / "t.json", qdq)
    made_by = producer_of(qdq)
    for name, axis in (("conv", 0), ("deconv", 1), ("fc", 0)):
        dequantize = made_by[node_named(qdq, name).input[1]]
        assert dequantize.op_type == "DequantizeLinear"
        assert next(attr.i for attr in dequantize.attribute if attr.name == "axis") == axis
    (final,) = report["final"]["outputs"]
    assert final["name"] == "y" and final["sqnr_db"] > 25
    assert {layer["name"] for layer in report["layers"]} >= {"swapped", "up", "d", "soft", "flat"}


# C. Graph outputs: inputs passed through, read by other nodes, several of them ----------------------------------------


def layer_norm(x: str, out: str, prefix: str, width: int) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """LayerNormalization written out as ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, Mul, Add (opset 17)."""
    p = prefix
    nodes = [
        helper.make_node("ReduceMean", [x], [p + "mean"], axes=[-1]),
        helper.make_node("Sub", [x, p + "mean"], [p + "centered"]),
        helper.make_node("Pow", [p + "centered", p + "two"], [p + "squared"]),
        helper.make_node("ReduceMean", [p + "squared"], [p + "variance"], axes=[-1]),
        helper.make_node("Add", [p + "variance", p + "epsilon"], [p + "shifted"]),
        helper.make_node("Sqrt", [p + "shifted"], [p + "std"]),
        helper.make_node("Div", [p + "centered", p + "std"], [p + "normalized"]),
        helper.make_node("Mul", [p + "normalized", p + "gamma"], [p + "scaled"]),
        helper.make_node("Add", [p + "scaled", p + "beta"], [out]),
    ]
    initializers = [
        numpy_helper.from_array(np.array(2.0, np.float32), p + "two"),
        numpy_helper.from_array(np.array(1e-5, np.float32), p + "epsilon"),
        numpy_helper.from_array(1 + weights(width) * 0.1, p + "gamma"),
        numpy_helper.from_array(weights(width) * 0.1, p + "beta"),
    ]
    return nodes, initializers


def save_encoder_model(path: Path) -> Path:
    """A BERT-like encoder returning its token ids and attention mask (int64 graph inputs that are graph outputs), its
    token embeddings `463` (also read by the pooler) and the pooled `output` (also read by a classifier), then logits.

    ids -> Gather -> LayerNorm -> ffn1 (MatMul) -> Relu -> ffn2 (MatMul) -> + residual -> LayerNorm -> `463`;
    mask -> Cast -> Unsqueeze -> x `463` -> ReduceSum over tokens -> pool (Gemm) -> Tanh -> `output` -> head (MatMul).
    Width 16, ffn 32: ffn1, ffn2 and pool are quantized; head, making 3 logits, stays in float (N < MIN_GEMM_DIM).
    """
    width = 16
    norm0, init0 = layer_norm("embedded", "normed", "ln0/", width)
    norm1, init1 = layer_norm("residual", "463", "ln1/", width)
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["embedded"], axis=0),
        *norm0,
        helper.make_node("MatMul", ["normed", "ffn1.w"], ["h1"], name="ffn1"),
        helper.make_node("Relu", ["h1"], ["a1"]),
        helper.make_node("MatMul", ["a1", "ffn2.w"], ["h2"], name="ffn2"),
        helper.make_node("Add", ["h2", "normed"], ["residual"]),
        *norm1,
        helper.make_node("Cast", ["attention_mask"], ["mask"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask", "last"], ["mask3"]),
        helper.make_node("Mul", ["463", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "tokens"], ["summed"], keepdims=0),
        helper.make_node("Gemm", ["summed", "pool.w", "pool.b"], ["pooled"], name="pool", transB=1),
        helper.make_node("Tanh", ["pooled"], ["output"]),
        helper.make_node("MatMul", ["output", "head.w"], ["logits"], name="head"),
    ]
    initializers = [
        numpy_helper.from_array(weights(20, width), "table"),
        numpy_helper.from_array(weights(width, 32), "ffn1.w"),
        numpy_helper.from_array(weights(32, width), "ffn2.w"),
        numpy_helper.from_array(weights(width, width) * 0.3, "pool.w"),
        numpy_helper.from_array(weights(width), "pool.b"),
        numpy_helper.from_array(weights(width, 3), "head.w"),
        numpy_helper.from_array(np.array([2], np.int64), "last"),
        numpy_helper.from_array(np.array([1], np.int64), "tokens"),
        *init0,
        *init1,
    ]
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])
    outputs = [
        ids,
        mask,
        helper.make_tensor_value_info("463", TensorProto.FLOAT, ["batch", "sequence", width]),
        helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", width]),
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3]),
    ]
    return save(path, nodes, [ids, mask], outputs, initializers)


def token_data(directory: Path, files: int = 3, samples: int = 4, tokens: int = 6) -> Path:
    directory.mkdir()
    rng = np.random.default_rng(2)
    for index in range(files):
        mask = (rng.random((samples, tokens)) > 0.2).astype(np.int64)
        mask[:, 0] = 1
        np.savez(directory / f"batch{index}.npz", input_ids=rng.integers(0, 20, (samples, tokens)), attention_mask=mask)
    return directory


def test_encoder_outputs_keep_names_types_and_order_and_drift_reports_each(tmp_path):
    model = tmp_path / "encoder.onnx"
    save_encoder_model(model)
    data = token_data(tmp_path / "data")
    labels = tmp_path / "labels.npy"
    np.save(labels, np.arange(12) % 3)
    report = four_commands(model, data, tmp_path)

    fp32, qdq = onnx.load(str(model)), onnx.load(str(tmp_path / "q.onnx"))
    assert list(qdq.graph.output) == list(fp32.graph.output)  # names, order, element types and shapes
    assert [node.op_type for node in qdq.graph.node if node.output[0] == "463"] == ["Add"]  # still computed, in float
    assert quantized_layers(qdq) == ["ffn1", "ffn2", "pool"]  # head makes 3 logits: below MIN_GEMM_DIM, left in float
    outputs = report["final"]["outputs"]
    assert [o["name"] for o in outputs] == ["463", "output", "logits"]
    assert all(o["sqnr_db"] > 20 and o["values"] > 0 for o in outputs)
    others = report["final"]["other_outputs"]
    assert [(o["name"], o["dtype"], o["mismatches"], o["skipped"]) for o in others] == [
        ("input_ids", "int64", 0, ""),
        ("attention_mask", "int64", 0, ""),
    ]
    assert all(o["values"] == 12 * 6 for o in others)

    labelled = run("drift", str(model), "--data", str(data), "--qdq", str(tmp_path / "q.onnx"), "--labels", str(labels))
    assert labelled.returncode == 0, labelled.stderr
    assert "output input_ids (int64): exact (72 values)" in labelled.stdout and "top-1 FP32" in labelled.stdout


def test_float_input_passed_through_and_quantized_stays_an_output(tmp_path):
    """x is read by a MatMul (so quantized) and returned as it is: ONNX Runtime's quantizer alone loops x's Q/DQ."""
    model = save(
        tmp_path / "passthrough.onnx",
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"), helper.make_node("Relu", ["h"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16]), helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [numpy_helper.from_array(weights(16, 16), "w")],  # 16 x 16: a smaller MatMul stays in float
    )
    report = four_commands(model, image_data(tmp_path / "data", shape=(16,)), tmp_path)
    qdq = onnx.load(str(tmp_path / "q.onnx"))
    assert [output.name for output in qdq.graph.output] == ["y", "x"]
    assert producer_of(qdq)[node_named(qdq, "proj").input[0]].op_type == "DequantizeLinear"
    y, x = report["final"]["outputs"]
    assert y["name"] == "y" and y["sqnr_db"] > 25
    assert x["name"] == "x" and x["sqnr_db"] is None and x["max_abs_err"] == 0  # passed through exactly (SQNR inf)


# D. Exported models ONNX Runtime cannot run ---------------------------------------------------------------------------


def save_frame_count_model(path: Path) -> Path:
    """A model that takes a shape from a float activation, as audio front ends count frames: length = x @ S, where
    every column of S [21, 16] selects x[0] (a MatMul large enough to be quantized, so its input is), frames =
    int(max(length)), y = sum(Reshape(x, [frames, -1])). With x[0] = 3 and max|x| = 4, INT8 rounds 3 to
    95 x 4/127 = 2.99, so the Q/DQ model asks to reshape 21 values into 2 rows."""
    selector = np.zeros((21, 16), np.float32)
    selector[0, :] = 1
    nodes = [
        helper.make_node("MatMul", ["x", "selector"], ["length"], name="length"),
        helper.make_node("ReduceMax", ["length"], ["longest"], keepdims=0),
        helper.make_node("Cast", ["longest"], ["count"], to=TensorProto.INT64),
        helper.make_node("Unsqueeze", ["count", "zero"], ["count1"]),
        helper.make_node("Concat", ["count1", "rest"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["framed"], name="frames"),
        helper.make_node("ReduceSum", ["framed", "one"], ["y"], keepdims=0),
    ]
    initializers = [
        numpy_helper.from_array(selector, "selector"),
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([-1], np.int64), "rest"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 21])]
    return save(path, nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])], initializers, opset=13)


def test_export_that_onnx_runtime_cannot_run_names_the_node_and_keeps_the_previous_file(tmp_path):
    model = save_frame_count_model(tmp_path / "frames.onnx")
    data = tmp_path / "data"
    data.mkdir()
    x = np.zeros((3, 21), np.float32)
    x[:, 0], x[:, 1] = 3, 4
    np.save(data / "x.npy", x)
    for command in (
        ("collect", str(model), "--data", str(data), "-o", str(tmp_path / "h.npz"), "-q"),
        ("calibrate", str(tmp_path / "h.npz"), "--method", "max", "-o", str(tmp_path / "t.json")),
    ):
        assert run(*command).returncode == 0
    out = tmp_path / "q.onnx"
    out.write_bytes(b"previous export")
    before = sorted(path.name for path in tmp_path.iterdir())

    result = run("export", str(model), "--thresholds", str(tmp_path / "t.json"), "-o", str(out))
    assert_one_line_error(
        result, 1, f"{out} not written", f"on the first sample of {data}", "node frames (Reshape) failed",
        "cannot be reshaped", "--keep-fp32",
    )
    assert out.read_bytes() == b"previous export"
    assert sorted(path.name for path in tmp_path.iterdir()) == before

    kept = run("export", str(model), "--thresholds", str(tmp_path / "t.json"), "-o", str(out), "--keep-fp32", "length")
    assert kept.returncode == 0 and f"wrote {out} (ONNX Runtime ran it on the first sample of {data})" in kept.stdout


def test_batched_matmul_weight_is_quantized_per_tensor_so_onnx_runtime_runs_it(tmp_path):
    """A MatMul whose weight is a stack of matrices [2, 16, 16]: per channel, ONNX Runtime's quantizer scales along
    axis 1 (the reduction axis), and its INT8 MatMul kernel refuses any per-channel scale on a 3-D weight."""
    weight = weights(2, 16, 16)
    model = save(
        tmp_path / "batched.onnx",
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="heads"), helper.make_node("Relu", ["h"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 5, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 5, 16])],
        [numpy_helper.from_array(weight, "w")],
    )
    report = four_commands(model, image_data(tmp_path / "data", shape=(2, 5, 16)), tmp_path, "--method", "max")
    qdq = onnx.load(str(tmp_path / "q.onnx"))
    dequantize = producer_of(qdq)[node_named(qdq, "heads").input[1]]
    scale = next(numpy_helper.to_array(init) for init in qdq.graph.initializer if init.name == dequantize.input[1])
    assert scale.shape == () and scale == np.float32(np.abs(weight).max() / 127)
    assert report["final"]["outputs"][0]["sqnr_db"] > 25


def test_float16_model_gets_float16_scales_at_opset_19(tmp_path):
    """DequantizeLinear takes float16 scales from opset 19 on; below it, ONNX Runtime refuses to load the model."""
    model = save(
        tmp_path / "half.onnx",
        [
            helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["y"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N", 4, 8, 8])],
        [numpy_helper.from_array(weights(4, 3, 3, 3, dtype=np.float16), "w"), numpy_helper.from_array(weights(4, dtype=np.float16), "b")],
    )
    data = tmp_path / "data"
    data.mkdir()
    np.save(data / "x.npy", np.random.default_rng(4).normal(size=(8, 3, 8, 8)).astype(np.float16))
    report = four_commands(model, data, tmp_path, "--method", "max")
    qdq = onnx.load(str(tmp_path / "q.onnx"))
    assert next(entry.version for entry in qdq.opset_import if entry.domain == "") == 19
    scales = [init for init in qdq.graph.initializer if init.name.endswith("_scale")]
    assert scales and all(init.data_type == TensorProto.FLOAT16 for init in scales)
    assert report["final"]["outputs"][0]["sqnr_db"] > 25


# E. Recurrent layers, ConvTranspose, Resize, decomposed LayerNorm, integer inputs -------------------------------------


def save_mixed_model(path: Path) -> Path:
    """Three inputs: token ids (int64), raw bytes (int32) and a spectrogram (float).

    ids -> Gather -> LayerNorm (written out) -> Transpose -> LSTM -> Squeeze -> GRU -> Squeeze -> seq (MatMul);
    bytes -> Cast -> Div 255 -> byte (MatMul);
    spectrogram -> conv -> Relu -> Resize x2 -> deconv (ConvTranspose) -> Relu -> GlobalAveragePool -> Flatten
    -> image (Gemm); logits = seq + byte + image. The MatMuls and the Gemm are 16 x 16 (smaller ones stay in float).
    """
    hidden, width = 16, 8
    norm, norm_init = layer_norm("embedded", "normed", "ln/", width)
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["embedded"], axis=0),
        *norm,
        helper.make_node("Transpose", ["normed"], ["time_major"], perm=[1, 0, 2]),
        helper.make_node("LSTM", ["time_major", "lstm.W", "lstm.R", "lstm.B"], ["lstm_y", ""], name="lstm", hidden_size=hidden),
        helper.make_node("Squeeze", ["lstm_y", "one"], ["lstm_seq"]),
        helper.make_node("GRU", ["lstm_seq", "gru.W", "gru.R", "gru.B"], ["", "gru_h"], name="gru", hidden_size=hidden),
        helper.make_node("Squeeze", ["gru_h", "zero"], ["gru_last"]),
        helper.make_node("MatMul", ["gru_last", "seq.w"], ["seq"], name="seq"),
        helper.make_node("Cast", ["bytes"], ["bytes_f"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["bytes_f", "byte_range"], ["bytes_unit"]),
        helper.make_node("MatMul", ["bytes_unit", "byte.w"], ["byte"], name="byte"),
        helper.make_node("Conv", ["spectrogram", "conv.w", "conv.b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Resize", ["r", "", "scales"], ["up"], mode="linear"),
        helper.make_node("ConvTranspose", ["up", "deconv.w", "deconv.b"], ["d"], name="deconv", strides=[2, 2]),
        helper.make_node("Relu", ["d"], ["rd"]),
        helper.make_node("GlobalAveragePool", ["rd"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
        helper.make_node("Gemm", ["flat", "image.w", "image.b"], ["image"], name="image"),
        helper.make_node("Add", ["seq", "byte"], ["seq_byte"]),
        helper.make_node("Add", ["seq_byte", "image"], ["logits"]),
    ]
    initializers = [
        numpy_helper.from_array(weights(30, width), "table"),
        numpy_helper.from_array(weights(1, 4 * hidden, width), "lstm.W"),
        numpy_helper.from_array(weights(1, 4 * hidden, hidden), "lstm.R"),
        numpy_helper.from_array(weights(1, 8 * hidden), "lstm.B"),
        numpy_helper.from_array(weights(1, 3 * hidden, hidden), "gru.W"),
        numpy_helper.from_array(weights(1, 3 * hidden, hidden), "gru.R"),
        numpy_helper.from_array(weights(1, 6 * hidden), "gru.B"),
        numpy_helper.from_array(weights(hidden, 16), "seq.w"),
        numpy_helper.from_array(np.array(255, np.float32), "byte_range"),
        numpy_helper.from_array(weights(16, 16), "byte.w"),
        numpy_helper.from_array(weights(4, 1, 3, 3), "conv.w"),
        numpy_helper.from_array(weights(4), "conv.b"),
        numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
        numpy_helper.from_array(weights(4, 16, 2, 2), "deconv.w"),
        numpy_helper.from_array(weights(16), "deconv.b"),
        numpy_helper.from_array(weights(16, 16), "image.w"),
        numpy_helper.from_array(weights(16), "image.b"),
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
        *norm_init,
    ]
    inputs = [
        helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 5]),
        helper.make_tensor_value_info("bytes", TensorProto.INT32, ["N", 16]),
        helper.make_tensor_value_info("spectrogram", TensorProto.FLOAT, ["N", 1, 6, 6]),
    ]
    return save(path, nodes, inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 16])], initializers)


def mixed_data(directory: Path, files: int = 3, samples: int = 4) -> Path:
    directory.mkdir()
    rng = np.random.default_rng(3)
    for index in range(files):
        np.savez(
            directory / f"batch{index}.npz",
            ids=rng.integers(0, 30, (samples, 5)),
            bytes=rng.integers(0, 256, (samples, 16)).astype(np.int32),
            spectrogram=rng.normal(size=(samples, 1, 6, 6)).astype(np.float32),
        )
    return directory


def test_recurrent_transposed_resized_layer_normed_model_with_integer_inputs(tmp_path):
    model = save_mixed_model(tmp_path / "mixed.onnx")
    data = mixed_data(tmp_path / "data")
    report = four_commands(model, data, tmp_path, "--method", "max")

    fp32, qdq = onnx.load(str(model)), onnx.load(str(tmp_path / "q.onnx"))
    for name in ("lstm", "gru"):  # not quantized: they read their float weights as they are
        assert list(node_named(qdq, name).input) == list(node_named(fp32, name).input)
    made_by = producer_of(qdq)
    for name in ("seq", "byte", "conv", "deconv", "image"):
        assert all(made_by[x].op_type == "DequantizeLinear" for x in node_named(qdq, name).input[:2]), name
    assert_thresholds_name_qdq_tensors(tmp_path / "t.json", qdq)
    (final,) = report["final"]["outputs"]
    assert final["name"] == "logits" and final["sqnr_db"] > 20
    assert {layer["name"] for layer in report["layers"]} >= {"normed", "lstm_y", "gru_last", "up", "d", "bytes_unit"}

    cache = tmp_path / "t.cache"  # a TensorRT cache records no data: export checks on a synthesized sample
    assert run("calibrate", str(tmp_path / "h.npz"), "-o", str(cache)).returncode == 0
    result = run("export", str(model), "--thresholds", str(cache), "-o", str(tmp_path / "cache.onnx"))
    assert result.returncode == 0, result.stderr
    assert "ONNX Runtime ran it on a sample synthesized from the input shapes" in result.stdout
