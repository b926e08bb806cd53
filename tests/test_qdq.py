"""Q/DQ export on the bundled digits CNN: valid ONNX, INT8 kernels in ONNX Runtime, TensorRT placement, exact scales."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import quantlab
from conftest import CALIB_DIR, DEMO_MODEL, EVAL_INPUTS, EVAL_LABELS
from models import save_multi_input_data, save_multi_input_model
from quantlab.errors import QuantlabError
from quantlab.formats.qdq import export_qdq, fp32_names, quantize_qdq, small_gemms
from quantlab.model import activation_tensors, create_session, with_outputs

WEIGHTED = ("Conv", "Gemm")  # the weighted ops of the demo model
# The demo's last Gemm makes 10 logits from 64 features: N = 10 < MIN_GEMM_DIM, so both targets leave it in float.
LOGITS_GEMM = "/head/head.7/Gemm"


def percentile_amax(hist: quantlab.Histogram, percent: float = 99.99) -> float:
    """Upper edge of the |x| bin holding the `percent` percentile, computed here with NumPy."""
    folded = hist.fold()
    cdf = np.cumsum(folded.counts) / folded.counts.sum()
    return float(folded.edges[np.searchsorted(cdf, percent / 100) + 1])


def f32_scale(amax: float) -> np.float32:
    """amax / 127 as a float32 scale, rounded once from float64 (how ONNX Runtime's quantizer computes it)."""
    return np.float32(np.float64(np.float32(amax)) / 127)


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {name: node for node in model.graph.node for name in node.output}


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def nodes_named(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {node.name: node for node in model.graph.node}


def fp32_weight(fp32: onnx.ModelProto, node_name: str) -> np.ndarray:
    return initializers(fp32)[nodes_named(fp32)[node_name].input[1]]


def top1(model: onnx.ModelProto, eval_set) -> float:
    inputs, labels = eval_set
    logits = create_session(model).run(None, {"input": inputs})[0]
    return float(np.mean(logits.argmax(axis=1) == labels))


@pytest.fixture(scope="module")
def histograms() -> quantlab.HistogramSet:
    return quantlab.collect(DEMO_MODEL, CALIB_DIR)


@pytest.fixture(scope="module")
def max_amax(histograms) -> dict[str, float]:
    return {name: hist.amax for name, hist in histograms.items()}


@pytest.fixture(scope="module")
def percentile_thresholds(histograms) -> dict[str, float]:
    return {name: percentile_amax(hist) for name, hist in histograms.items()}


@pytest.fixture(scope="module")
def eval_set() -> tuple[np.ndarray, np.ndarray]:
    inputs = np.concatenate([np.load(path) for path in sorted(EVAL_INPUTS.glob("*.npy"))])
    return inputs, np.load(EVAL_LABELS)


@pytest.fixture(scope="module")
def fp32() -> onnx.ModelProto:
    return onnx.load(str(DEMO_MODEL))


@pytest.fixture(scope="module")
def qdq(max_amax) -> onnx.ModelProto:
    return quantize_qdq(DEMO_MODEL, max_amax)


@pytest.mark.parametrize("method", ["max", "percentile"])
def test_exported_model_validates_runs_and_keeps_accuracy(
    method, max_amax, percentile_thresholds, eval_set, fp32, tmp_path
):
    thresholds = max_amax if method == "max" else percentile_thresholds
    out = export_qdq(DEMO_MODEL, quantlab.Thresholds(thresholds), tmp_path / "model.qdq.onnx")
    onnx.checker.check_model(str(out), full_check=True)
    model = onnx.load(str(out))
    assert {node.op_type for node in model.graph.node} >= {"QuantizeLinear", "DequantizeLinear"}
    fp32_top1, int8_top1 = top1(fp32, eval_set), top1(model, eval_set)
    assert fp32_top1 == pytest.approx(0.9933, abs=1e-3)
    assert abs(int8_top1 - fp32_top1) <= 0.010


def test_onnx_runtime_runs_the_convs_with_int8_kernels(qdq, tmp_path):
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(qdq.SerializeToString(), options, providers=["CPUExecutionProvider"])
    ops = [node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    # stem.0, stem.3 and head.1 become QLinearConv (their outputs share the scale of the Relu or MaxPool output the
    # next layer reads). The residual conv, whose output goes into the Add (float by TensorRT's rules), runs in float
    # on dequantized inputs. So does head.5: the Relu after it fed the logits Gemm, which stays in float (N = 10),
    # so nothing quantizes that Relu output and head.5's output has no Q/DQ to fuse a QGemm with.
    assert ops.count("QLinearConv") == 3
    assert sum(op in ("Conv", "FusedConv") for op in ops) == 1
    assert "QGemm" not in ops and sum(op in ("Gemm", "FusedGemm") for op in ops) == 2


def test_every_weighted_op_reads_dequantized_activation_and_per_channel_weight(qdq, fp32):
    made_by, values = producers(qdq), initializers(qdq)
    weighted = [node for node in qdq.graph.node if node.op_type in WEIGHTED and node.name != LOGITS_GEMM]
    assert len(weighted) == 5  # 4 Conv and head.5's Gemm (64 x 512); the logits Gemm reads its FP32 inputs
    assert list(nodes_named(qdq)[LOGITS_GEMM].input) == list(nodes_named(fp32)[LOGITS_GEMM].input)
    for node in weighted:
        activation, weight = made_by[node.input[0]], made_by[node.input[1]]
        assert activation.op_type == weight.op_type == "DequantizeLinear", node.name
        assert made_by[activation.input[0]].op_type == "QuantizeLinear"
        int8_weight, scale, zero_point = (values[name] for name in weight.input)
        weight_fp32 = fp32_weight(fp32, node.name)
        assert int8_weight.dtype == np.int8 and zero_point.dtype == np.int8 and not zero_point.any()
        assert scale.shape == (weight_fp32.shape[0],)  # one scale per output channel (Conv, and Gemm with transB)
        assert next(attr.i for attr in weight.attribute if attr.name == "axis") == 0
        expected = (np.abs(weight_fp32).reshape(len(scale), -1).max(axis=1).astype(np.float64) / 127).astype(np.float32)
        np.testing.assert_array_equal(scale, expected)
        broadcast = scale.reshape(-1, *[1] * (weight_fp32.ndim - 1))
        assert np.all(np.abs(int8_weight * broadcast - weight_fp32) <= broadcast / 2 * (1 + 1e-6))
        assert node.input[2] in values and values[node.input[2]].dtype == np.float32  # bias stays float


def test_activation_scales_are_amax_over_127_with_zero_point_zero(qdq, fp32, max_amax):
    values, fp32_nodes = initializers(qdq), nodes_named(fp32)
    made_by = producers(qdq)
    for node in (node for node in qdq.graph.node if node.op_type in WEIGHTED and node.name != LOGITS_GEMM):
        source = fp32_nodes[node.name].input[0]  # the FP32 tensor this op reads
        _, scale, zero_point = made_by[node.input[0]].input
        assert values[scale] == f32_scale(max_amax[source]), source
        assert values[zero_point].dtype == np.int8 and values[zero_point] == 0


def test_relu_and_reshapes_carry_the_scale_back_to_the_layer_output_without_changing_values(qdq, max_amax, demo_feeds):
    """stem.0 -> Relu -> stem.3: the conv output's Q/DQ shares the Relu output's scale, and quantizing twice with
    one scale equals quantizing the Relu output once (TensorRT's placement) bit for bit."""
    made_by, values = producers(qdq), initializers(qdq)
    conv_out, relu_out = "/stem/stem.0/Conv_output_0", "/stem/stem.2/Relu_output_0"
    relu = next(node for node in qdq.graph.node if node.output[0] == relu_out)
    conv_dq = made_by[relu.input[0]]
    relu_q = next(node for node in qdq.graph.node if node.op_type == "QuantizeLinear" and node.input[0] == relu_out)
    assert conv_dq.op_type == "DequantizeLinear" and made_by[conv_dq.input[0]].input[0] == conv_out
    assert conv_dq.input[1:] == relu_q.input[1:]  # the same scale and zero-point initializers
    scale = values[relu_q.input[1]]
    assert scale == f32_scale(max_amax[relu_out])

    relu_dq = f"{relu_out}_DequantizeLinear_Output"
    session = create_session(with_outputs(qdq, [conv_out, relu_dq]))
    conv, dequantized = session.run([conv_out, relu_dq], demo_feeds[0])
    expected = np.clip(np.round(np.maximum(conv, 0) / scale), -128, 127).astype(np.float32) * scale
    np.testing.assert_array_equal(dequantized, expected)


def test_residual_add_quantizes_only_the_skip_input_and_relus_stay(qdq, fp32):
    made_by = producers(qdq)
    add = next(node for node in qdq.graph.node if node.op_type == "Add")
    conv_side, skip_side = (made_by[name] for name in add.input)
    assert conv_side.op_type == "Conv"  # TensorRT fuses the Add into this conv: its output stays float
    assert skip_side.op_type == "DequantizeLinear"
    assert made_by[skip_side.input[0]].input[0] == "/stem/stem.5/Relu_output_0"
    assert [n.op_type for n in qdq.graph.node].count("Relu") == [n.op_type for n in fp32.graph.node].count("Relu")
    logits = next(node for node in qdq.graph.node if node.output[0] == "logits")
    assert logits.op_type == "Gemm"  # no Q/DQ on the model's output


def test_skip_input_used_only_by_the_residual_add_gets_its_own_q_dq(tmp_path):
    """Add(Conv(x), Sigmoid(x)): no conv reads the Sigmoid output, so the residual rule alone quantizes it."""
    weight = np.random.default_rng(0).normal(size=(2, 2, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node("Sigmoid", ["x"], ["gate"], name="sigmoid"),
            helper.make_node("Add", ["conv", "gate"], ["y"], name="add"),
        ],
        "residual",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2, 4, 4])],
        initializer=[numpy_helper.from_array(weight, "w")],
    )
    path = tmp_path / "residual.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    model = quantize_qdq(path, {"x": 3.0, "conv": 9.0, "gate": 0.95, "y": 9.5})
    onnx.checker.check_model(model)
    made_by, values = producers(model), initializers(model)
    add = nodes_named(model)["add"]
    assert add.input[0] == "conv"
    gate_dq = made_by[add.input[1]]
    assert gate_dq.op_type == "DequantizeLinear" and made_by[gate_dq.input[0]].input[0] == "gate"
    assert values[gate_dq.input[1]] == f32_scale(0.95)
    assert made_by[nodes_named(model)["sigmoid"].input[0]].op_type == "DequantizeLinear"  # x is the conv's input too
    create_session(model).run(None, {"x": np.ones((1, 2, 4, 4), np.float32)})


def test_fp32_names_maps_every_qdq_activation_back(qdq, fp32, demo_feeds, max_amax):
    names = fp32_names(qdq)
    fp32_tensors = {name for node in fp32.graph.node for name in node.output} | {"input"}
    assert set(names.values()) == fp32_tensors
    assert set(activation_tensors(fp32)) <= set(names.values())
    assert names["input_DequantizeLinear_Output"] == "input"
    assert names["/head/head.1/Conv_output_0_DequantizeLinear_Output"] == "/head/head.1/Conv_output_0"
    values = initializers(qdq)
    int8_tensors = {node.output[0] for node in qdq.graph.node if node.op_type == "QuantizeLinear"}
    weights = {n.output[0] for n in qdq.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in values}
    assert len(weights) == 5 and not (int8_tensors | weights) & set(names)  # the logits Gemm's weight stays float

    feed = demo_feeds[0]
    dequantized = create_session(with_outputs(qdq, ["input_DequantizeLinear_Output"])).run(
        ["input_DequantizeLinear_Output"], feed
    )[0]
    scale = f32_scale(max_amax["input"])
    np.testing.assert_array_equal(dequantized, np.clip(np.round(feed["input"] / scale), -128, 127) * scale)


def test_mse_weights_clip_per_channel_and_never_round_worse(max_amax, fp32, eval_set):
    mse, plain = quantize_qdq(DEMO_MODEL, max_amax, weight_method="mse"), quantize_qdq(DEMO_MODEL, max_amax)
    assert abs(top1(mse, eval_set) - top1(fp32, eval_set)) <= 0.010
    clipped = 0
    for node_name in ("/stem/stem.3/Conv", "/head/head.5/Gemm"):
        weight = fp32_weight(fp32, node_name)
        errors, scales = [], []
        for model in (mse, plain):
            dq = producers(model)[nodes_named(model)[node_name].input[1]]
            int8_weight, scale, _ = (initializers(model)[name] for name in dq.input)
            rows = (int8_weight * scale.reshape(-1, *[1] * (weight.ndim - 1)) - weight).reshape(len(scale), -1)
            errors.append(np.mean(rows.astype(np.float64) ** 2, axis=1))
            scales.append(scale)
        assert np.all(scales[0] <= scales[1]) and np.all(errors[0] <= errors[1] * (1 + 1e-6))
        clipped += int(np.sum(scales[0] < scales[1]))
    assert clipped > 0


def test_keep_fp32_by_node_or_output_name_leaves_layers_float(max_amax, fp32, eval_set):
    model = quantize_qdq(  # head.5's Gemm: the logits Gemm stays in float without being named
        DEMO_MODEL, max_amax, keep_fp32=["/head/head.5/Gemm", "/residual/residual.0/Conv_output_0"]
    )
    onnx.checker.check_model(model)
    made_by, fp32_nodes = producers(model), nodes_named(fp32)
    for name in ("/head/head.5/Gemm", "/residual/residual.0/Conv"):
        node = nodes_named(model)[name]
        assert list(node.input) == list(fp32_nodes[name].input)  # original float activation, weight and bias
        assert all(made_by.get(x) is None or made_by[x].op_type != "DequantizeLinear" for x in node.input)
    # With the residual conv in float there is no conv to fuse the Add into: no Q/DQ on the skip input either.
    assert list(nodes_named(model)["/Add"].input) == list(fp32_nodes["/Add"].input)
    assert abs(top1(model, eval_set) - top1(fp32, eval_set)) <= 0.010


def test_keep_fp32_node_reads_the_float_tensor_that_other_consumers_read_quantized(max_amax):
    model = quantize_qdq(DEMO_MODEL, max_amax, keep_fp32=["/Add"])
    skip = "/stem/stem.5/Relu_output_0"
    assert nodes_named(model)["/Add"].input[1] == skip
    assert producers(model)[nodes_named(model)["/residual/residual.0/Conv"].input[0]].op_type == "DequantizeLinear"


def test_old_opset_is_converted_for_per_channel_dequantize(max_amax, tmp_path):
    model = onnx.load(str(DEMO_MODEL))
    model.opset_import[0].version = 12  # the demo's ops mean the same at opset 12 (ONNX cannot convert downwards)
    old = tmp_path / "opset12.onnx"
    onnx.save(model, str(old))
    model = quantize_qdq(old, max_amax)
    onnx.checker.check_model(model)
    assert next(entry.version for entry in model.opset_import if entry.domain == "") == 13
    create_session(model)


def test_thresholds_naming_unknown_tensors_are_refused(max_amax):
    extra = {**max_amax, "conv9_out": 1.0, "(Unnamed Layer* 3) [Shuffle]_output": 2.0}
    with pytest.raises(QuantlabError, match=r"^2 tensors in the thresholds are not activation tensors of "
                       r"digits_cnn\.onnx: conv9_out, \(Unnamed Layer\* 3\) \[Shuffle\]_output$"):
        quantize_qdq(DEMO_MODEL, extra)


def test_a_tensor_without_a_threshold_stays_in_float_and_so_does_its_weighted_op(max_amax):
    """Calibrate leaves out the tensors INT8 cannot represent; export keeps them in float, as TensorRT keeps a tensor
    its cache lacks, with the Gemm reading it (ONNX Runtime quantizes a weighted op's inputs together)."""
    partial = {name: amax for name, amax in max_amax.items() if name != "/head/head.4/Flatten_output_0"}
    # 5 tensors: input, the two stem Relu outputs, the MaxPool and Flatten outputs; head.6's Relu output is read by
    # the logits Gemm alone, which stays in float (N = 10 < MIN_GEMM_DIM)
    with pytest.warns(UserWarning, match=r"^no threshold for 1 of the 5 tensors digits_cnn\.onnx quantizes, left in "
                      r"float: /head/head\.4/Flatten_output_0$"):
        model = quantize_qdq(DEMO_MODEL, partial)
    quantized = {node.input[0] for node in model.graph.node if node.op_type == "QuantizeLinear"}
    assert "/head/head.4/Flatten_output_0" not in quantized and "/head/head.0/MaxPool_output_0" in quantized
    gemm = next(node for node in model.graph.node if node.name == "/head/head.5/Gemm")
    assert list(gemm.input[:2]) == ["/head/head.4/Flatten_output_0", "head.5.weight"]  # float input, float weight
    create_session(model)


def test_thresholds_of_another_model_are_refused(tmp_path):
    other = save_multi_input_model(tmp_path / "other.onnx")
    histograms = quantlab.collect(other, save_multi_input_data(tmp_path / "data"))
    cache = {name: hist.amax for name, hist in histograms.items()}
    with pytest.raises(QuantlabError, match=r"no threshold for 5 of the 5 tensors digits_cnn\.onnx quantizes: "
                       r"input, /stem/stem\.2/Relu_output_0, /stem/stem\.5/Relu_output_0 and 2 more"):
        quantize_qdq(DEMO_MODEL, cache)


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "model file not found"), (b"\x08\x07garbage, not protobuf", "not a valid ONNX model")],
)
def test_missing_or_corrupt_model_is_refused(content, message, max_amax, tmp_path):
    path = tmp_path / "model.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(QuantlabError, match=message):
        export_qdq(path, max_amax, tmp_path / "out.onnx")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"weight_method": "percentile"}, "unknown weight method 'percentile'"),
        ({"keep_fp32": ["/no/such/Conv"]}, "keep_fp32: no node or node output named /no/such/Conv"),
    ],
)
def test_bad_options_are_refused(options, message, max_amax):
    with pytest.raises(QuantlabError, match=message):
        quantize_qdq(DEMO_MODEL, max_amax, **options)


def test_float64_model_is_refused(tmp_path):
    graph = helper.make_graph(  # a 16 x 16 weight: a smaller MatMul would stay in float, with nothing to refuse
        [helper.make_node("MatMul", ["x", "weight"], ["y"], name="matmul")],
        "float64",
        [helper.make_tensor_value_info("x", onnx.TensorProto.DOUBLE, [1, 16])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.DOUBLE, [1, 16])],
        initializer=[numpy_helper.from_array(np.ones((16, 16)), "weight")],
    )
    path = tmp_path / "float64.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(QuantlabError, match="Q/DQ export takes float32 and float16 tensors, not x$"):
        quantize_qdq(path, {"x": 1.0, "y": 4.0})


def test_infinite_threshold_is_refused(max_amax):
    with pytest.raises(QuantlabError, match="infinite threshold for 1 tensors to quantize: input"):
        quantize_qdq(DEMO_MODEL, {**max_amax, "input": float("inf")})


def test_failed_export_leaves_no_file_and_keeps_an_existing_one(max_amax, tmp_path):
    bad = {**max_amax, "not_a_tensor": 1.0}
    with pytest.raises(QuantlabError):
        export_qdq(DEMO_MODEL, bad, tmp_path / "new.onnx")
    assert list(tmp_path.iterdir()) == []

    existing = tmp_path / "model.qdq.onnx"
    existing.write_bytes(b"previous export")
    with pytest.raises(QuantlabError):
        export_qdq(DEMO_MODEL, bad, existing)
    assert existing.read_bytes() == b"previous export"
    assert list(tmp_path.iterdir()) == [existing]

    assert export_qdq(DEMO_MODEL, max_amax, existing) == existing
    assert onnx.load(str(existing)).graph.node and list(tmp_path.iterdir()) == [existing]


def test_unwritable_output_fails_before_any_work(max_amax, tmp_path):
    with pytest.raises(QuantlabError, match="does not exist"):
        export_qdq(DEMO_MODEL, max_amax, tmp_path / "missing" / "model.qdq.onnx")


# The small-GEMM rule (`small_gemms`): a MatMul or Gemm whose weight (second input) has K or N below MIN_GEMM_DIM = 16
# stays in float for either target and reads the float tensors, while one with K, N >= 16 in the same model is
# quantized. Each model is calibrated (max, with min/max) on random data and exported with `quantlab.export_qdq`,
# which runs it in ONNX Runtime; the export must then stay close to the FP32 model on another sample.

TARGETS = ("tensorrt", "onnxruntime")


def save_rule_model(path, nodes, inputs: dict, outputs: dict, weights: dict[str, np.ndarray]):
    """A float32 opset 17 model of `nodes`; inputs and outputs map names to shapes, `weights` are its initializers."""
    graph = helper.make_graph(
        nodes,
        path.stem,
        [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape) for name, shape in inputs.items()],
        [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape) for name, shape in outputs.items()],
        initializer=[numpy_helper.from_array(value, name) for name, value in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def rule_weights(**shapes: tuple[int, ...]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {name: (rng.normal(size=shape) / np.sqrt(shape[-1])).astype(np.float32) for name, shape in shapes.items()}


def export_for(path, target: str, tmp_path, sample: tuple[int, ...]) -> onnx.ModelProto:
    """The Q/DQ model `quantlab.export_qdq` writes for `target`, checked against FP32 on a held-out sample of x."""
    rng = np.random.default_rng(1)
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    for index in range(4):
        np.save(data / f"{index}.npy", rng.normal(size=(4, *sample)).astype(np.float32))
    histograms = quantlab.collect(path, data)
    thresholds = quantlab.Thresholds(quantlab.calibrate(histograms, "max"), min_max=histograms.min_max())
    out = quantlab.export_qdq(path, thresholds, tmp_path / f"{target}.onnx", data=data, target=target)
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    feed = {"x": rng.normal(size=(2, *sample)).astype(np.float32)}
    for want, have in zip(create_session(onnx.load(str(path))).run(None, feed), create_session(model).run(None, feed)):
        assert 10 * np.log10(np.sum(want.astype(np.float64) ** 2) / np.sum((want - have) ** 2.0)) > 25
    return model


def assert_reads_float(model: onnx.ModelProto, name: str, inputs: list[str]) -> None:
    """Node `name` reads `inputs`, the FP32 tensors and weights, none of them through a DequantizeLinear."""
    node, made_by = nodes_named(model)[name], producers(model)
    assert list(node.input) == inputs, name
    assert all(made_by.get(x) is None or made_by[x].op_type != "DequantizeLinear" for x in node.input), name
    assert all(initializers(model)[x].dtype == np.float32 for x in inputs if x in initializers(model)), name


def assert_quantized(model: onnx.ModelProto, name: str, weight: np.ndarray | None) -> None:
    """Node `name` reads both its inputs through DequantizeLinear; a `weight` as int8 per output channel."""
    node, made_by, values = nodes_named(model)[name], producers(model), initializers(model)
    dequantized = [made_by[x] for x in node.input[:2]]
    assert all(dq.op_type == "DequantizeLinear" for dq in dequantized), name
    assert made_by[dequantized[0].input[0]].op_type == "QuantizeLinear", name  # an activation's Q/DQ pair
    if weight is not None:
        int8_weight, scale, _ = (values[x] for x in dequantized[1].input)
        axis = next(attr.i for attr in dequantized[1].attribute if attr.name == "axis")
        assert int8_weight.dtype == np.int8 and scale.shape == (weight.shape[axis],), name
        broadcast = np.expand_dims(scale, 1 - axis)
        assert np.all(np.abs(int8_weight * broadcast - weight) <= broadcast / 2 * (1 + 1e-6)), name


@pytest.mark.parametrize("target", TARGETS)
def test_matmul_with_a_weight_below_16_stays_float_beside_a_quantized_one(target, tmp_path):
    """big (32 x 16) -> Relu -> act, read by side (16 x 16), few_out (16 x 4: N = 4) and, after it, few_in (4 x 16:
    K = 4). act is quantized for side, and few_out still reads it in float."""
    weights = rule_weights(w_big=(32, 16), w_side=(16, 16), w_few_out=(16, 4), w_few_in=(4, 16))
    path = save_rule_model(
        tmp_path / "matmuls.onnx",
        [
            helper.make_node("MatMul", ["x", "w_big"], ["h"], name="big"),
            helper.make_node("Relu", ["h"], ["act"], name="relu"),
            helper.make_node("MatMul", ["act", "w_side"], ["z"], name="side"),
            helper.make_node("MatMul", ["act", "w_few_out"], ["logits"], name="few_out"),
            helper.make_node("MatMul", ["logits", "w_few_in"], ["y"], name="few_in"),
        ],
        {"x": ["batch", 32]},
        {"z": ["batch", 16], "y": ["batch", 16]},
        weights,
    )
    assert small_gemms(onnx.load(str(path))) == {"few_out", "few_in"}
    model = export_for(path, target, tmp_path, (32,))
    assert_quantized(model, "big", weights["w_big"])
    assert_quantized(model, "side", weights["w_side"])
    assert fp32_names(model)[nodes_named(model)["side"].input[0]] == "act"
    assert_reads_float(model, "few_out", ["act", "w_few_out"])
    assert_reads_float(model, "few_in", ["logits", "w_few_in"])


@pytest.mark.parametrize("target", TARGETS)
def test_gemm_with_trans_b_and_10_outputs_stays_float(target, tmp_path):
    """transB = 1 stores the weight as [N, K]: hidden's [32, 32] is quantized, head's [10, 32] (N = 10, a
    classifier's logits, as in the demo model) is not, whichever of the two dims is small."""
    weights = rule_weights(b_hidden=(32, 32), c_hidden=(32,), b_head=(10, 32), c_head=(10,))
    path = save_rule_model(
        tmp_path / "gemms.onnx",
        [
            helper.make_node("Gemm", ["x", "b_hidden", "c_hidden"], ["h"], name="hidden", transB=1),
            helper.make_node("Relu", ["h"], ["act"], name="relu"),
            helper.make_node("Gemm", ["act", "b_head", "c_head"], ["logits"], name="head", transB=1),
        ],
        {"x": ["batch", 32]},
        {"logits": ["batch", 10]},
        weights,
    )
    model = export_for(path, target, tmp_path, (32,))
    assert_quantized(model, "hidden", weights["b_hidden"])
    assert_reads_float(model, "head", ["act", "b_head", "c_head"])


@pytest.mark.parametrize("target", TARGETS)
def test_matmul_weights_held_in_constant_nodes_are_judged_by_their_value(target, tmp_path):
    """Weights as PaddlePaddle and tf2onnx export them, in Constant nodes (folded into initializers of the same name):
    big's [32, 16] is quantized, small's [16, 4] stays in float, its value as the Constant held it."""
    weights = rule_weights(w_big=(32, 16), w_small=(16, 4))
    path = save_rule_model(
        tmp_path / "constants.onnx",
        [
            *(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value)) for name, value in weights.items()),
            helper.make_node("MatMul", ["x", "w_big"], ["h"], name="big"),
            helper.make_node("Relu", ["h"], ["act"], name="relu"),
            helper.make_node("MatMul", ["act", "w_small"], ["y"], name="small"),
        ],
        {"x": ["batch", 32]},
        {"y": ["batch", 4]},
        {},
    )
    model = export_for(path, target, tmp_path, (32,))
    assert_quantized(model, "big", weights["w_big"])
    assert_reads_float(model, "small", ["act", "w_small"])
    np.testing.assert_array_equal(initializers(model)["w_small"], weights["w_small"])
    assert "Constant" not in {node.op_type for node in model.graph.node}


@pytest.mark.parametrize("target", TARGETS)
def test_matmul_of_two_activations_is_judged_by_the_inferred_shape(target, tmp_path):
    """No weight initializer: p = x @ w [batch, tokens, 32], pt = p transposed [batch, 32, tokens]. gram = p @ pt
    (N = tokens, a dynamic dim: not known to be small) is quantized on both inputs; narrow = pt @ p[..., :4] (shape
    inference gives the Slice output [batch, tokens, 4]: N = 4) stays in float, reading pt and p4 as they are."""
    weights = rule_weights(w=(32, 32))
    weights.update(start=np.array([0], np.int64), end=np.array([4], np.int64), last=np.array([2], np.int64))
    path = save_rule_model(
        tmp_path / "dynamic.onnx",
        [
            helper.make_node("MatMul", ["x", "w"], ["p"], name="proj"),
            helper.make_node("Transpose", ["p"], ["pt"], name="transpose", perm=[0, 2, 1]),
            helper.make_node("MatMul", ["p", "pt"], ["gram"], name="gram"),
            helper.make_node("Slice", ["p", "start", "end", "last"], ["p4"], name="slice"),
            helper.make_node("MatMul", ["pt", "p4"], ["narrow"], name="narrow"),
        ],
        {"x": ["batch", "tokens", 32]},
        {"gram": ["batch", "tokens", "tokens"], "narrow": ["batch", 32, 4]},
        weights,
    )
    assert small_gemms(onnx.load(str(path))) == {"narrow"}
    model = export_for(path, target, tmp_path, (16, 32))
    assert_quantized(model, "proj", weights["w"])
    assert_quantized(model, "gram", None)
    assert_reads_float(model, "narrow", ["pt", "p4"])


@pytest.mark.parametrize("target", TARGETS)
def test_unnamed_nodes_get_names_so_the_rules_and_keep_fp32_reach_them(target, tmp_path):
    """A model whose nodes have no names (as some exporters write them): the small MatMul (16 x 4) stays in float by
    the small-GEMM rule, and keep_fp32 given the output of an unnamed 16 x 16 MatMul keeps that one in float; the
    unnamed 32 x 16 MatMul is quantized. Names are `<op type>_<index>`."""
    weights = rule_weights(w_big=(32, 16), w_side=(16, 16), w_small=(16, 4))
    path = save_rule_model(
        tmp_path / "unnamed.onnx",
        [
            helper.make_node("MatMul", ["x", "w_big"], ["h"]),
            helper.make_node("Relu", ["h"], ["act"]),
            helper.make_node("MatMul", ["act", "w_side"], ["z"]),
            helper.make_node("MatMul", ["act", "w_small"], ["y"]),
        ],
        {"x": ["batch", 32]},
        {"z": ["batch", 16], "y": ["batch", 4]},
        weights,
    )
    model = export_for(path, target, tmp_path, (32,))
    assert {"MatMul_0", "Relu_1", "MatMul_2", "MatMul_3"} <= set(nodes_named(model))
    assert_quantized(model, "MatMul_0", weights["w_big"])
    assert_quantized(model, "MatMul_2", weights["w_side"])
    assert_reads_float(model, "MatMul_3", ["act", "w_small"])
    names = ("x", "h", "act", "z", "y")
    thresholds = quantlab.Thresholds(dict.fromkeys(names, 4.0), min_max=dict.fromkeys(names, (-4.0, 4.0)))
    kept = quantize_qdq(path, thresholds, keep_fp32=["z"], target=target)
    assert_reads_float(kept, "MatMul_2", ["act", "w_side"])
    assert_quantized(kept, "MatMul_0", weights["w_big"])
