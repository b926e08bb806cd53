"""Export target `onnxruntime` (issue 18): the Q/DQ model ONNX Runtime's CPU provider runs with integer kernels.

One small model built with onnx.helper holds the classes that matter on the real models: a Conv whose weight is a
Constant node, followed by SiLU (Sigmoid * Mul, as after every YOLOv8 Conv); a Conv followed by BatchNormalization
and Relu; a residual Add; a Concat of tensors of unrelated ranges feeding a Conv; GlobalAveragePool; MatMul and Gemm
(16 x 16: smaller ones stay in float); and YOLO's post-processing after the last weighted op: class scores (0-1) and
box pixels (0-320) concatenated into the graph output. It goes through the CLI as a user runs it (collect, calibrate to JSON, export --target onnxruntime,
drift), and the tests read what ONNX Runtime made of it from its optimized graph.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import quantlab
from quantlab.engine import INTEGER_KERNELS, optimized_graph
from quantlab.formats import Thresholds, read_thresholds, write_thresholds
from quantlab.formats.qdq import export_qdq, fp32_names, quantize_qdq
from quantlab.model import create_session
from test_cli import assert_one_line_error, run

WEIGHTED = {"conv1": "Conv", "conv2": "Conv", "conv3": "Conv", "conv4": "Conv", "matmul": "MatMul", "gemm": "Gemm"}


def save_zoo(path: Path) -> Path:
    """x [batch, 3, 16, 16] -> out [batch, 32] (module docstring); node names as in WEIGHTED."""
    rng = np.random.default_rng(0)

    def weight(*shape: int) -> np.ndarray:
        return (rng.normal(size=shape) * 0.3).astype(np.float32)

    initializers = {
        "w2": weight(8, 8, 3, 3), "b2": weight(8), "w3": weight(8, 8, 3, 3), "w4": weight(16, 16, 1, 1),
        "b4": weight(16), "wm": weight(16, 16), "wg": weight(16, 16), "bg": weight(16), "gamma": 1 + weight(8),
        "beta": weight(8), "mean": weight(8), "var": np.abs(weight(8)) + 0.5, "hundredth": np.float32(0.01),
        "pixels": np.float32(320.0),
    }
    nodes = [
        helper.make_node("Constant", [], ["w1"], value=numpy_helper.from_array(weight(8, 3, 3, 3), "w1")),
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["c1"], ["s1"], name="silu1_sigmoid"),
        helper.make_node("Mul", ["c1", "s1"], ["m1"], name="silu1_mul"),
        helper.make_node("Conv", ["m1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c2", "gamma", "beta", "mean", "var"], ["n2"], name="bn2"),
        helper.make_node("Relu", ["n2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3"], ["c3"], name="conv3", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c3", "m1"], ["a3"], name="residual"),
        helper.make_node("Sigmoid", ["a3"], ["gate"], name="gate"),
        helper.make_node("Mul", ["gate", "hundredth"], ["small"], name="shrink"),
        helper.make_node("Concat", ["a3", "small"], ["cat"], name="concat", axis=1),
        helper.make_node("Conv", ["cat", "w4", "b4"], ["c4"], name="conv4"),
        helper.make_node("GlobalAveragePool", ["c4"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "wm"], ["mm"], name="matmul"),
        helper.make_node("Gemm", ["mm", "wg", "bg"], ["logits"], name="gemm", transB=1),
        helper.make_node("Sigmoid", ["logits"], ["scores"], name="scores"),
        helper.make_node("Mul", ["scores", "pixels"], ["boxes"], name="boxes"),
        helper.make_node("Concat", ["boxes", "scores"], ["out"], name="output_concat", axis=1),
    ]
    return save_graph(path, "zoo", nodes, initializers, ["batch", 3, 16, 16], ["batch", 32])


def save_graph(path: Path, name: str, nodes: list, initializers: dict, x_shape: list, out_shape: list) -> Path:
    """An opset 17 model of `nodes` from input x to output out, checked and saved to `path`."""
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, out_shape)],
        initializer=[numpy_helper.from_array(np.asarray(value), key) for key, value in initializers.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """The model, its data (calib and held-out), and what collect, calibrate (JSON, with min/max) and
    `export --target onnxruntime` wrote through the CLI."""
    root = tmp_path_factory.mktemp("zoo")
    rng = np.random.default_rng(1)
    paths = {"model": save_zoo(root / "zoo.onnx"), "calib": root / "calib", "eval": root / "eval"}
    for directory in (paths["calib"], paths["eval"]):
        directory.mkdir()
        for index in range(6):
            np.save(directory / f"{index:02d}.npy", rng.normal(size=(4, 3, 16, 16)).astype(np.float32))
    paths.update(histograms=root / "h.npz", thresholds=root / "t.json", qdq=root / "q.onnx")
    for command in (
        ("collect", paths["model"], "-d", paths["calib"], "-o", paths["histograms"], "-q"),
        ("calibrate", paths["histograms"], "-m", "max", "-o", paths["thresholds"]),
        ("export", paths["model"], "--thresholds", paths["thresholds"], "--target", "onnxruntime", "-o", paths["qdq"]),
    ):
        result = run(*map(str, command))
        assert result.returncode == 0, (command[0], result.stderr)
    return paths


def qdq_of(zoo) -> onnx.ModelProto:
    return onnx.load(str(zoo["qdq"]))


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def final_sqnr(fp32: onnx.ModelProto, int8: onnx.ModelProto, directory: Path) -> float:
    feeds = [{"x": np.load(path)} for path in sorted(directory.glob("*.npy"))]
    reference = np.concatenate([create_session(fp32).run(None, feed)[0] for feed in feeds])
    observed = np.concatenate([create_session(int8).run(None, feed)[0] for feed in feeds])
    return float(10 * np.log10(np.sum(reference.astype(np.float64) ** 2) / np.sum((reference - observed) ** 2.0)))


def test_onnx_runtime_runs_every_weighted_op_as_an_integer_kernel(zoo):
    optimized = optimized_graph(qdq_of(zoo))
    kernels = {node.name: node.op_type for node in optimized.graph.node if node.op_type in INTEGER_KERNELS}
    assert set(kernels) == set(WEIGHTED)
    assert {name: kernels[name] for name in WEIGHTED} == {
        "conv1": "QLinearConv", "conv2": "QLinearConv", "conv3": "QLinearConv", "conv4": "QLinearConv",
        "matmul": "QLinearMatMul", "gemm": "QGemm",
    }
    ops = {node.op_type for node in optimized.graph.node}
    assert {"QLinearSigmoid", "QLinearMul", "QLinearAdd", "QLinearConcat", "QLinearGlobalAveragePool"} <= ops
    assert not ops & {"Conv", "FusedConv", "MatMul", "Gemm", "BatchNormalization"}  # BatchNormalization folded


def test_activation_scales_and_zero_points_come_from_the_thresholds_and_min_max(zoo):
    """uint8, asymmetric: scale = (hi - lo) / 255 and zero point round(-lo / scale), with [lo, hi] = [max(min,
    -amax), min(max, amax)] widened to hold 0, from calibrate's JSON (amax and min_max) for every quantized tensor."""
    table = json.loads(zoo["thresholds"].read_text())
    model, fp32 = qdq_of(zoo), onnx.load(str(zoo["model"]))
    values = initializers(model)
    readers = {name: [node for node in fp32.graph.node if name in node.input] for name in table["thresholds"]}
    checked = set()
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] not in table["thresholds"]:
            continue
        tensor = node.input[0]
        # ONNX Runtime gives a Relu's input the Relu output's range (the Relu is then redundant and dropped).
        relu = [reader for reader in readers[tensor] if reader.op_type == "Relu"]
        source = relu[0].output[0] if len(readers[tensor]) == 1 and relu else tensor
        amax, (low, high) = table["thresholds"][source], table["min_max"][source]
        low, high = np.float32(min(max(low, -amax), 0.0)), np.float32(max(min(high, amax), 0.0))
        span = (np.float64(high) - np.float64(low)) / 255
        scale, zero_point = values[node.input[1]], values[node.input[2]]
        assert zero_point.dtype == np.uint8, tensor
        assert scale == np.float32(span), tensor
        assert zero_point == np.round(-np.float64(low) / span), tensor
        checked.add(tensor)
    assert {"x", "m1", "a3", "gate", "cat", "c4", "pooled", "mm"} <= checked  # small = gate * 0.01 has no Q of its own
    assert table["min_max"]["r2"][0] == 0.0 and values["r2_zero_point"] == 0  # a Relu output uses all 256 levels


def test_each_concat_input_keeps_its_own_range(zoo):
    """Concat of unrelated ranges (a3: several units, small: 0-0.01): each input is quantized with its own range, the
    output with the concatenation's, so the small one is not rounded on the large one's grid before the Concat."""
    values = initializers(qdq_of(zoo))
    assert values["small_scale"] < values["a3_scale"] / 100
    assert values["cat_scale"] == pytest.approx(values["a3_scale"], rel=0.5)


def test_weights_int8_per_channel_from_constant_node_and_folded_batch_norm(zoo):
    model = qdq_of(zoo)
    values = initializers(model)
    producer = {name: node for node in model.graph.node for name in node.output}
    for name, channels in (("conv1", 8), ("conv2", 8), ("conv3", 8), ("conv4", 16)):
        conv = next(node for node in model.graph.node if node.name == name)
        weight = producer[conv.input[1]]
        int8_weight, scale, zero_point = (values[tensor] for tensor in weight.input)
        assert weight.op_type == "DequantizeLinear" and int8_weight.dtype == np.int8 and not zero_point.any(), name
        assert scale.shape == (channels,) and int8_weight.shape[0] == channels, name  # one scale per output channel
    assert "bn2" not in {node.name for node in model.graph.node}  # folded into conv2's weight and bias
    assert next(node for node in model.graph.node if node.name == "conv2").output[0] == "n2"


def test_post_processing_and_the_graph_output_stay_in_float(zoo):
    """After the last weighted op (the Gemm), the scores, box pixels and their Concat run in float: one scale over
    0-320 pixels and 0-1 scores would round every score away (YOLOv8's output)."""
    model = qdq_of(zoo)
    producer = {name: node for node in model.graph.node for name in node.output}
    quantized = {node.input[0] for node in model.graph.node if node.op_type == "QuantizeLinear"}
    assert not {"scores", "boxes", "out"} & quantized
    assert producer["out"].op_type == "Concat" and producer["out"].name == "output_concat"
    assert all(producer[name].op_type != "DequantizeLinear" for name in producer["out"].input)
    assert final_sqnr(onnx.load(str(zoo["model"])), model, zoo["eval"]) > 30


def test_close_to_fp32_on_held_out_data_and_tensorrt_target_unchanged(zoo):
    fp32 = onnx.load(str(zoo["model"]))
    table = read_thresholds(zoo["thresholds"])
    assert final_sqnr(fp32, qdq_of(zoo), zoo["eval"]) > 30
    tensorrt = quantize_qdq(zoo["model"], table)  # the default target: TensorRT's placement, symmetric int8
    zero_points = [numpy_helper.to_array(init) for init in tensorrt.graph.initializer if init.name.endswith("_zero_point")]
    assert zero_points and all(point.dtype == np.int8 and not point.any() for point in zero_points)
    kernels = [node.op_type for node in optimized_graph(tensorrt).graph.node if node.op_type in INTEGER_KERNELS]
    assert len(kernels) < len(WEIGHTED)  # SiLU after conv1: TensorRT's placement leaves it an FP32 Conv here


def test_drift_reports_engine_integer_kernels_and_both_latencies(zoo, tmp_path):
    report = tmp_path / "drift.json"
    result = run("drift", str(zoo["model"]), "-d", str(zoo["eval"]), "--qdq", str(zoo["qdq"]), "--json", str(report))
    assert result.returncode == 0, result.stderr
    metadata = json.loads(report.read_text())["metadata"]
    assert metadata["engine"].startswith("ONNX Runtime ") and "CPUExecutionProvider" in metadata["engine"]
    assert metadata["integer_kernels"] == {"integer": 6, "weighted": 6}
    latency = metadata["latency_ms"]
    assert latency["fp32"] > 0 and latency["int8"] > 0 and latency["samples"] == 16 and latency["passes"] >= 3
    text = " ".join(result.stdout.split())
    assert "engine: ONNX Runtime" in text and "Conv/MatMul/Gemm as integer kernels: 6 of 6" in text
    assert "latency per sample: FP32 " in text and " ms, INT8 " in text

    rebuilt = run("drift", str(zoo["model"]), "-d", str(zoo["eval"]), "--thresholds", str(zoo["thresholds"]),
                  "--target", "onnxruntime", "--isolated", "--json", str(report))
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert json.loads(report.read_text())["metadata"]["integer_kernels"] == {"integer": 6, "weighted": 6}


def test_drift_of_the_tensorrt_placement_names_the_onnxruntime_target(zoo, tmp_path):
    cache = tmp_path / "t.cache"
    write_thresholds(cache, read_thresholds(zoo["thresholds"]))
    result = run("drift", str(zoo["model"]), "-d", str(zoo["eval"]), "--thresholds", str(cache))
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "--target onnxruntime" in text


def test_notebook_view_shows_the_engine_lines(zoo):
    report = quantlab.measure_drift(zoo["model"], zoo["qdq"], zoo["eval"])
    html = report._repr_html_()
    assert "engine: ONNX Runtime" in html and "integer kernels: 6 of 6" in html and "latency per sample" in html


def test_a_threshold_without_min_max_gives_a_symmetric_uint8_range(zoo, tmp_path):
    """A TensorRT cache holds amax alone: [-amax, amax], zero point 128, and a warning says how to get asymmetric
    ranges; Relu stays correct (ONNX Runtime keeps the Relu where the range does not make it redundant)."""
    table = read_thresholds(zoo["thresholds"])
    cache = tmp_path / "t.cache"
    write_thresholds(cache, table)
    with pytest.warns(UserWarning, match="no min/max .* symmetric, \\[-amax, amax\\]; calibrate to a .json"):
        model = export_qdq(zoo["model"], read_thresholds(cache), tmp_path / "q.onnx", target="onnxruntime")
    values = initializers(onnx.load(str(model)))
    assert values["x_zero_point"] == 128
    assert values["x_scale"] == np.float32(2 * np.float64(np.float32(read_thresholds(cache).amax["x"])) / 255)
    assert final_sqnr(onnx.load(str(zoo["model"])), onnx.load(str(model)), zoo["eval"]) > 25


def test_any_method_and_keep_fp32(zoo):
    histograms = quantlab.load_histograms(zoo["histograms"])
    fp32 = onnx.load(str(zoo["model"]))
    for method, least in (("kl", 5), ("percentile", 20), ("mse", 20)):  # KL clips hard here, as on the real models
        table = Thresholds(quantlab.calibrate(histograms, method), min_max=histograms.min_max())
        model = quantize_qdq(zoo["model"], table, target="onnxruntime")
        assert final_sqnr(fp32, model, zoo["eval"]) > least, method
    table = read_thresholds(zoo["thresholds"])
    kept = quantize_qdq(zoo["model"], table, target="onnxruntime", keep_fp32=["conv3"])
    conv3 = next(node for node in kept.graph.node if node.name == "conv3")
    assert conv3.input[1] == "w3"  # its float weight
    kernels = {node.name for node in optimized_graph(kept).graph.node if node.op_type in INTEGER_KERNELS}
    assert kernels == set(WEIGHTED) - {"conv3"}  # conv2 still runs as QLinearConv: conv3 reads its dequantized output


def test_unknown_target_is_one_line_error(zoo, tmp_path):
    result = run("export", str(zoo["model"]), "--thresholds", str(zoo["thresholds"]), "--target", "tflite",
                 "-o", str(tmp_path / "q.onnx"))
    assert_one_line_error(result, 2, "unknown export target 'tflite'", "tensorrt, onnxruntime")
    assert not (tmp_path / "q.onnx").exists()


def test_json_table_round_trips_min_max_and_refuses_bad_ones(tmp_path):
    table = Thresholds({"a": 2.0, "b": 1.5}, {"method": "max"}, {"a": (-0.5, 2.0)})
    write_thresholds(tmp_path / "t.json", table)
    back = read_thresholds(tmp_path / "t.json")
    assert back.min_max == {"a": (-0.5, 2.0)} and back.amax == table.amax and "min_max" not in back.metadata
    with pytest.raises(quantlab.QuantlabError, match="tensor 'a': min_max must be finite with min <= max"):
        Thresholds({"a": 1.0}, min_max={"a": (1.0, -1.0)})
    with pytest.raises(quantlab.QuantlabError, match="tensor 'a': min_max must be two numbers"):
        Thresholds({"a": 1.0}, min_max={"a": "wide"})


def save_mobile_block(path: Path) -> Path:
    """x [batch, 4, 12, 12] -> out [batch, 16]: a PP-LCNet / MobileNetV3 block as exported: Conv, HardSwish written out
    (Add 3, Clip 0..6, Mul, Div 6), a learnable scale (Mul by a scalar), MaxPool, a depthwise Conv, and a C2f-like
    Split -> Conv -> Concat of alike ranges feeding a 1x1 Conv to 16 channels; GlobalAveragePool and a 16 x 16 Gemm
    head (a smaller one would stay in float)."""
    rng = np.random.default_rng(2)

    def weight(*shape: int) -> np.ndarray:
        return (rng.normal(size=shape) * 0.4).astype(np.float32)

    initializers = {
        "w1": weight(8, 4, 3, 3), "b1": weight(8), "three": np.float32(3.0), "zero": np.float32(0.0),
        "six": np.float32(6.0), "lab_scale": np.array([1.3], np.float32), "wd": weight(8, 1, 3, 3),
        "w2": weight(8, 4, 3, 3), "w3": weight(16, 16, 1, 1), "wg": weight(16, 16), "split": np.array([4, 4], np.int64),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c1", "three"], ["plus3"], name="hs_add"),
        helper.make_node("Clip", ["plus3", "zero", "six"], ["clipped"], name="hs_clip"),
        helper.make_node("Mul", ["c1", "clipped"], ["hs_mul"], name="hs_mul"),
        helper.make_node("Div", ["hs_mul", "six"], ["hs"], name="hs_div"),
        helper.make_node("Mul", ["hs", "lab_scale"], ["scaled"], name="lab"),
        helper.make_node("MaxPool", ["scaled"], ["pooled"], name="maxpool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["pooled", "wd"], ["dw"], name="depthwise", group=8, pads=[1, 1, 1, 1]),
        helper.make_node("Split", ["dw", "split"], ["left", "right"], name="split", axis=1),
        helper.make_node("Conv", ["right", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Concat", ["left", "right", "r2"], ["cat"], name="concat", axis=1),
        helper.make_node("Conv", ["cat", "w3"], ["c3"], name="conv3"),
        helper.make_node("GlobalAveragePool", ["c3"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "wg"], ["out"], name="gemm"),
    ]
    return save_graph(path, "mobile_block", nodes, initializers, ["batch", 4, 12, 12], ["batch", 16])


def calibrated(model: Path, sample_shape: tuple[int, ...], seed: int) -> dict:
    """`model` with 4 calibration and 4 held-out files of random samples (4 per file) beside it, and the thresholds
    (max, with min/max) that collect and calibrate give on the calibration ones."""
    rng = np.random.default_rng(seed)
    calib, held_out = model.parent / "calib", model.parent / "eval"
    for directory in (calib, held_out):
        directory.mkdir()
        for index in range(4):
            np.save(directory / f"{index:02d}.npy", rng.normal(size=(4, *sample_shape)).astype(np.float32))
    histograms = quantlab.collect(model, calib)
    table = Thresholds(quantlab.calibrate(histograms, "max"), min_max=histograms.min_max())
    return {"model": model, "eval": held_out, "table": table}


@pytest.fixture(scope="module")
def mobile_block(tmp_path_factory) -> dict:
    case = calibrated(save_mobile_block(tmp_path_factory.mktemp("mobile") / "block.onnx"), (4, 12, 12), seed=3)
    qdq = quantize_qdq(case["model"], case["table"], target="onnxruntime")
    return {**case, "qdq": qdq, "optimized": optimized_graph(qdq)}


def test_scalar_steps_fold_into_the_dequantize_scale(mobile_block):
    """HardSwish's Div by 6 and the learnable scale (Mul by 1.3) run no kernel: the tensor after them is the Mul's
    integers read through one DequantizeLinear of scale scale(hs_mul) / 6 * 1.3, exact on its grid, and the MaxPool
    after them carries the same integers (uint8, not dequantized around it); one QLinearMul is left (x * Clip)."""
    qdq, optimized = mobile_block["qdq"], mobile_block["optimized"]
    assert not {"hs_div", "lab"} & {node.name for node in qdq.graph.node}
    values = initializers(qdq)
    producer = {name: node for node in qdq.graph.node for name in node.output}
    rescaled = producer["scaled_DequantizeLinear_Output"]
    assert rescaled.op_type == "DequantizeLinear" and rescaled.input[0] == "hs_mul_QuantizeLinear_Output"
    assert values[rescaled.input[1]] == pytest.approx(values["hs_mul_scale"] / 6 * 1.3, rel=1e-6)
    assert values[rescaled.input[2]] == values["hs_mul_zero_point"]
    ops = [node.op_type for node in optimized.graph.node]
    assert ops.count("QLinearMul") == 1 and "Div" not in ops and "Mul" not in ops
    assert {"QLinearConv", "QLinearAdd", "QLinearConcat"} <= set(ops)
    dequantized = {node.output[0] for node in optimized.graph.node if node.op_type == "DequantizeLinear"}
    pools = [node for node in optimized.graph.node if "MaxPool" in node.op_type]
    assert len(pools) == 1 and not set(pools[0].input) & dequantized  # the pool runs on uint8
    kernels = [node for node in optimized.graph.node if node.op_type in INTEGER_KERNELS]
    assert len(kernels) == 5  # 4 Conv + Gemm
    fp32 = onnx.load(str(mobile_block["model"]))
    assert final_sqnr(fp32, qdq, mobile_block["eval"]) > 30


def test_scalar_steps_drift_names_the_folded_tensors(mobile_block):
    """A folded tensor (scaled: no node of its own) is named by its rescaled DequantizeLinear, and drift measures the
    block as ONNX Runtime runs it."""
    names = fp32_names(mobile_block["qdq"])
    assert names["scaled_DequantizeLinear_Output"] == "scaled" and names["hs_mul"] == "hs_mul"
    report = quantlab.measure_drift(mobile_block["model"], mobile_block["qdq"], mobile_block["eval"])
    assert report.final["outputs"][0].sqnr_db > 30 and report.metadata["integer_kernels"]["integer"] == 5


def test_concat_of_alike_ranges_shares_one_range(mobile_block):
    """The C2f-like Concat (the halves of a Split and a Relu branch, ranges within 2x of each other)
    gets one scale and zero point for its inputs and output, so that ONNX Runtime's QLinearConcat copies bytes instead
    of requantizing each input; the Split halves keep the scale of the tensor they split."""
    optimized = mobile_block["optimized"]
    values = initializers(optimized)
    (concat,) = [node for node in optimized.graph.node if node.op_type == "QLinearConcat"]
    scales, zero_points = concat.input[::3], concat.input[1::3]  # (output, then each input) scale, zero point
    parameters = [(float(values[scale]), int(values[point])) for scale, point in zip(scales, zero_points)]
    assert len(parameters) == 4 and len(set(parameters)) == 1
    table = mobile_block["table"]
    widths = {name: min(table.min_max[name][1], table.amax[name]) - max(table.min_max[name][0], -table.amax[name], 0)
              for name in ("dw", "r2", "cat")}
    assert max(widths.values()) < 2 * min(widths.values())  # alike: the case this test is about


def test_latency_times_each_model_alone_in_blocks_that_take_turns(monkeypatch, tmp_path):
    """measure_latency runs one model at a time: per turn an untimed warm-up pass, then BLOCK_PASSES timed passes,
    the order of the turns rotating by one model every round; the median timed pass."""
    import quantlab.engine as engine

    def relu_model(name: str) -> onnx.ModelProto:
        relu = helper.make_node("Relu", ["x"], ["out"])
        path = save_graph(tmp_path / f"{name}.onnx", name, [relu], {}, [1, 4], [1, 4])
        return onnx.load(str(path))

    runs = []
    run_session = engine.run_session

    def recording(session, outputs, feed):
        runs.append(session)
        return run_session(session, outputs, feed)

    monkeypatch.setattr(engine, "run_session", recording)
    feeds = [{"x": np.ones((1, 4), np.float32)}] * 3
    models = {"fp32": relu_model("a"), "int8": relu_model("b"), "other": relu_model("c")}
    latency = engine.measure_latency(models, feeds, min_passes=3, min_seconds=0)
    assert latency.passes == 4 and latency.samples == 3 and set(latency.ms_per_sample) == set(models)
    per_turn = 3 * (1 + engine.BLOCK_PASSES)  # runs of one model's turn: 3 feeds x (warm-up + timed passes)
    turns = [runs[start : start + per_turn] for start in range(0, len(runs), per_turn)]
    assert len(turns) == 6 and all(len(set(map(id, turn))) == 1 for turn in turns)
    a, b, c = (turn[0] for turn in turns[:3])
    assert len({id(a), id(b), id(c)}) == 3 and [turn[0] for turn in turns[3:]] == [b, c, a]


def save_squeeze_excitation(path: Path) -> Path:
    """x [batch, 4, 10, 10] -> out [batch, 16]: a MobileNetV3 / PP-LCNet squeeze-and-excitation block as PaddlePaddle
    exports it (GlobalAveragePool, Conv + bias, Relu, Conv, Add of a reshaped offset, HardSigmoid(0.2, 0.5) gating the
    block's input by Mul), then HardSwish as PyTorch exported it before opset 14 (x * HardSigmoid(x; 1/6, 0.5)),
    whose HardSigmoid reads a tensor that the Mul reads too, and a 16 x 16 Gemm head."""
    rng = np.random.default_rng(4)

    def weight(*shape: int) -> np.ndarray:
        return (rng.normal(size=shape) * 0.5).astype(np.float32)

    initializers = {
        "w1": weight(8, 4, 3, 3), "b1": weight(8), "ws1": weight(4, 8, 1, 1), "bs1": weight(4),
        "ws2": weight(8, 4, 1, 1), "offset": weight(8), "offset_shape": np.array([1, 8, 1, 1], np.int64),
        "w3": weight(16, 8, 1, 1), "wg": weight(16, 16),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("GlobalAveragePool", ["r1"], ["squeezed"], name="squeeze"),
        helper.make_node("Conv", ["squeezed", "ws1", "bs1"], ["s1"], name="se_conv1"),
        helper.make_node("Relu", ["s1"], ["s1_relu"], name="se_relu"),
        helper.make_node("Conv", ["s1_relu", "ws2"], ["s2"], name="se_conv2"),
        helper.make_node("Reshape", ["offset", "offset_shape"], ["offset_4d"], name="offset_reshape"),
        helper.make_node("Add", ["s2", "offset_4d"], ["s2_biased"], name="se_offset"),
        helper.make_node("HardSigmoid", ["s2_biased"], ["gate"], name="se_gate", alpha=0.2, beta=0.5),
        helper.make_node("Mul", ["r1", "gate"], ["excited"], name="excite"),
        helper.make_node("Conv", ["excited", "w3"], ["c3"], name="conv3"),
        helper.make_node("HardSigmoid", ["c3"], ["c3_gate"], name="hs_gate", alpha=1 / 6, beta=0.5),
        helper.make_node("Mul", ["c3", "c3_gate"], ["hs"], name="hs_mul"),
        helper.make_node("GlobalAveragePool", ["hs"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "wg"], ["out"], name="gemm"),
    ]
    return save_graph(path, "squeeze_excitation", nodes, initializers, ["batch", 4, 10, 10], ["batch", 16])


@pytest.fixture(scope="module")
def squeeze_excitation(tmp_path_factory) -> dict:
    case = calibrated(save_squeeze_excitation(tmp_path_factory.mktemp("se") / "se.onnx"), (4, 10, 10), seed=5)
    return {**case, "qdq": quantize_qdq(case["model"], case["table"], target="onnxruntime")}


def test_squeeze_excitation_gate_folds_into_its_conv(squeeze_excitation):
    """The gate's HardSigmoid (after Conv and Add of a constant offset) folds into the Conv's weight and bias and
    leaves a Clip to [0, 1] that ONNX Runtime drops: its QLinearConv writes the gate on the gate's own uint8 range,
    with no float HardSigmoid between DequantizeLinear and QuantizeLinear; the HardSigmoid whose input the HardSwish
    Mul reads too stays as it is. The fold is exact in float, and the INT8 model stays close to FP32."""
    from quantlab.formats.qdq_onnxruntime import _rewritten

    fp32 = onnx.load(str(squeeze_excitation["model"]))
    rewritten, ranged_as = _rewritten(fp32, set())
    (clip,) = [node for node in rewritten.graph.node if node.name == "se_gate"]
    assert clip.op_type == "Clip" and ranged_as == {clip.input[0]: "gate"}
    assert [node.op_type for node in rewritten.graph.node if node.name == "hs_gate"] == ["HardSigmoid"]
    x = np.load(next(squeeze_excitation["eval"].glob("*.npy")))
    (expected,), (folded,) = (create_session(model).run(["out"], {"x": x}) for model in (fp32, rewritten))
    np.testing.assert_allclose(folded, expected, rtol=1e-4, atol=1e-4)

    qdq = squeeze_excitation["qdq"]
    optimized = optimized_graph(qdq)
    assert [node.name for node in optimized.graph.node if node.op_type == "HardSigmoid"] == ["hs_gate"]
    assert "Clip" not in {node.op_type for node in optimized.graph.node}
    (se_conv2,) = [node for node in optimized.graph.node if node.name == "se_conv2"]
    assert se_conv2.op_type == "QLinearConv"
    values = initializers(qdq) | initializers(optimized)
    low, high = squeeze_excitation["table"].min_max["gate"]
    assert 0 <= low and high <= 1
    assert values[se_conv2.input[6]] == pytest.approx(high / 255, rel=1e-6) and values[se_conv2.input[7]] == 0
    assert final_sqnr(fp32, qdq, squeeze_excitation["eval"]) > 30


def test_squeeze_excitation_gate_kept_in_float_or_symmetric_stays_correct(squeeze_excitation, tmp_path):
    """A gate kept in float stays a HardSigmoid; a gate given only a threshold (a symmetric range around 0, which
    no longer clips at 0) keeps its Clip in the INT8 model: both stay close to FP32."""
    fp32 = onnx.load(str(squeeze_excitation["model"]))
    table = squeeze_excitation["table"]
    kept = quantize_qdq(squeeze_excitation["model"], table, target="onnxruntime", keep_fp32=["se_gate"])
    assert [node.op_type for node in kept.graph.node if node.name == "se_gate"] == ["HardSigmoid"]
    with pytest.warns(UserWarning, match="no min/max"):
        symmetric = quantize_qdq(squeeze_excitation["model"], Thresholds(table.amax), target="onnxruntime")
    assert "Clip" in {node.op_type for node in optimized_graph(symmetric).graph.node}
    for model in (kept, symmetric):
        assert final_sqnr(fp32, model, squeeze_excitation["eval"]) > 25


def save_depthwise_regions(path: Path) -> Path:
    """x [batch, 4, 10, 10] -> out [batch, 16]: MobileNetV3 blocks whose depthwise convs have 24 channels (not a
    multiple of 16). `expand` (dense 4 -> 24) -> HardSwish written out -> `dw` (depthwise 3x3) -> Relu -> squeeze-and-
    excitation (GlobalAveragePool, `se_reduce` 24 -> 8, Relu, `se_expand` 8 -> 24, HardSigmoid) -> Mul -> a per-channel
    Div by a [24, 1, 1] constant -> `project` (dense 24 -> 16). Beside it, `side_dw` (depthwise, 24 channels) reads
    the same HardSwish output, and its output joins a Concat: that region stays as it is, and so does `dw`'s, which it
    shares."""
    rng = np.random.default_rng(6)

    def weight(*shape: int) -> np.ndarray:
        return (rng.normal(size=shape) * 0.5).astype(np.float32)

    initializers = {
        "we": weight(24, 4, 1, 1), "be": weight(24), "three": np.float32(3.0), "zero": np.float32(0.0),
        "six": np.float32(6.0), "wd": weight(24, 1, 3, 3), "bd": weight(24), "wr": weight(8, 24, 1, 1), "br": weight(8),
        "wx": weight(24, 8, 1, 1), "bx": weight(24), "divisor": 1.5 + np.abs(weight(24, 1, 1)),
        "wp": weight(16, 24, 1, 1), "wg": weight(16, 16),
    }
    nodes = [
        helper.make_node("Conv", ["x", "we", "be"], ["e"], name="expand"),
        helper.make_node("Add", ["e", "three"], ["e3"], name="hs_add"),
        helper.make_node("Clip", ["e3", "zero", "six"], ["e3c"], name="hs_clip"),
        helper.make_node("Mul", ["e", "e3c"], ["em"], name="hs_mul"),
        helper.make_node("Div", ["em", "six"], ["hs"], name="hs_div"),
        helper.make_node("Conv", ["hs", "wd", "bd"], ["d"], name="dw", group=24, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["d"], ["dr"], name="dw_relu"),
        helper.make_node("GlobalAveragePool", ["dr"], ["squeezed"], name="squeeze"),
        helper.make_node("Conv", ["squeezed", "wr", "br"], ["r"], name="se_reduce"),
        helper.make_node("Relu", ["r"], ["rr"], name="se_relu"),
        helper.make_node("Conv", ["rr", "wx", "bx"], ["g"], name="se_expand"),
        helper.make_node("HardSigmoid", ["g"], ["gate"], name="se_gate"),
        helper.make_node("Mul", ["dr", "gate"], ["excited"], name="excite"),
        helper.make_node("Div", ["excited", "divisor"], ["scaled"], name="per_channel"),
        helper.make_node("Conv", ["scaled", "wp"], ["p"], name="project"),
        helper.make_node("GlobalAveragePool", ["p"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "wg"], ["out"], name="gemm"),
    ]
    return save_graph(path, "depthwise_regions", nodes, initializers, ["batch", 4, 10, 10], ["batch", 16])


@pytest.fixture(scope="module")
def depthwise_regions(tmp_path_factory) -> dict:
    return calibrated(save_depthwise_regions(tmp_path_factory.mktemp("dw") / "dw.onnx"), (4, 10, 10), seed=7)


def depthwise_groups(model: onnx.ModelProto) -> dict[str, int]:
    return {node.name: next(attr.i for attr in node.attribute if attr.name == "group")
            for node in model.graph.node if any(attr.name == "group" and attr.i > 1 for attr in node.attribute)}


def test_depthwise_region_widened_to_16_channels_computes_the_same(depthwise_regions):
    """The depthwise conv runs on 32 channels (MLAS's fast symmetric kernel wants multiples of 16): its input's
    writer gets 8 zero filters, the squeeze-and-excitation convs and the projection zero weights for them, the
    per-channel divisor 8 ones; every weighted op is still an integer kernel; and the INT8 model computes what the
    export with every shape kept computes. Drift, accumulated and per layer alone, compares the FP32 channels."""
    model, table = depthwise_regions["model"], depthwise_regions["table"]
    widened = quantize_qdq(model, table, target="onnxruntime")
    same_shapes = quantize_qdq(model, table, target="onnxruntime", keep_shapes=True)
    assert depthwise_groups(widened) == {"dw": 32} and depthwise_groups(same_shapes) == {"dw": 24}
    optimized = optimized_graph(widened)
    kernels = [node for node in optimized.graph.node if node.op_type in INTEGER_KERNELS]
    assert {node.name for node in kernels} == {"expand", "dw", "se_reduce", "se_expand", "project", "gemm"}
    weights = {node.name: initializers(optimized)[node.input[3]] for node in kernels if node.op_type == "QLinearConv"}
    assert weights["expand"].shape == (32, 4, 1, 1) and not weights["expand"][24:].any()
    assert weights["dw"].shape == (32, 1, 3, 3) and not weights["dw"][24:].any()
    assert weights["se_reduce"].shape == (8, 32, 1, 1) and not weights["se_reduce"][:, 24:].any()
    assert weights["project"].shape == (16, 32, 1, 1) and not weights["project"][:, 24:].any()
    x = np.concatenate([np.load(path) for path in sorted(depthwise_regions["eval"].glob("*.npy"))])
    (got,), (expected,) = (create_session(each).run(["out"], {"x": x}) for each in (widened, same_shapes))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    fp32 = onnx.load(str(model))
    assert final_sqnr(fp32, widened, depthwise_regions["eval"]) > 25
    reports = [quantlab.measure_drift(model, each, depthwise_regions["eval"]) for each in (widened, same_shapes)]
    (widened_layers, same_layers) = ({layer.name: layer.sqnr_db for layer in report.worst_first()} for report in reports)
    assert widened_layers.keys() == same_layers.keys() and "d" in widened_layers
    assert list(widened_layers.values()) == pytest.approx(list(same_layers.values()), abs=0.01)
    isolated = quantlab.measure_isolated(model, widened, depthwise_regions["eval"], latency=False)
    layers = {layer.name: layer.sqnr_db for layer in isolated.worst_first()}
    assert {"e", "d", "r", "gate", "p"} <= set(layers) and all(np.isfinite(list(layers.values())))


def test_depthwise_region_that_reaches_a_concat_or_a_kept_node_stays(depthwise_regions, tmp_path):
    """A depthwise conv whose region reaches a Concat (channels would shift) is not widened, nor is the other one of
    that region; one kept in float is not either, nor any with `export --keep-shapes`. Mixed precision's search (which switches between this export's
    tensors and the all-float export's) runs on the model."""
    model = onnx.load(str(depthwise_regions["model"]))
    side = [
        helper.make_node("Conv", ["hs", "wd"], ["side"], name="side_dw", group=24, pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["side", "dr"], ["joined"], name="join", axis=1),
        helper.make_node("GlobalAveragePool", ["joined"], ["side_pooled"], name="side_pool"),
    ]
    model.graph.node.extend(side)
    model.graph.output.append(helper.make_tensor_value_info("side_pooled", TensorProto.FLOAT, ["batch", 48, 1, 1]))
    onnx.checker.check_model(model, full_check=True)
    joined = tmp_path / "joined.onnx"
    onnx.save(model, str(joined))
    histograms = quantlab.collect(joined, depthwise_regions["eval"])
    table = Thresholds(quantlab.calibrate(histograms, "max"), min_max=histograms.min_max())
    assert depthwise_groups(quantize_qdq(joined, table, target="onnxruntime")) == {"dw": 24, "side_dw": 24}
    table = depthwise_regions["table"]
    thresholds, same_shapes = tmp_path / "t.json", tmp_path / "same.onnx"
    write_thresholds(thresholds, table)
    result = run("export", str(depthwise_regions["model"]), "--thresholds", str(thresholds), "--target", "onnxruntime",
                 "--keep-shapes", "-o", str(same_shapes), "-d", str(depthwise_regions["eval"]))
    assert result.returncode == 0, result.stderr
    assert depthwise_groups(onnx.load(str(same_shapes))) == {"dw": 24}
    kept = quantize_qdq(depthwise_regions["model"], table, target="onnxruntime", keep_fp32=["dw"])
    assert depthwise_groups(kept) == {"dw": 24}
    ranking = quantlab.rank_sensitivity(depthwise_regions["model"], table, depthwise_regions["eval"], target="onnxruntime")
    assert {layer.layer for layer in ranking} == {"expand", "dw", "se_reduce", "se_expand", "project", "gemm"}


def test_depthwise_region_whose_tensor_divides_stays(depthwise_regions, tmp_path):
    """A region tensor used as a divisor would divide by the new channels' zeros: that region is not widened."""
    model = onnx.load(str(depthwise_regions["model"]))
    (per_channel,) = [node for node in model.graph.node if node.name == "per_channel"]
    per_channel.input[:] = ["divisor", "excited"]  # divisor / excited, read by project as before
    divided = tmp_path / "divided.onnx"
    onnx.save(model, str(divided))
    assert depthwise_groups(quantize_qdq(divided, depthwise_regions["table"], target="onnxruntime")) == {"dw": 24}
