"""Explicit quantization: an FP32 ONNX model plus thresholds -> a Q/DQ ONNX model for TensorRT and ONNX Runtime.

ONNX Runtime's own QDQ quantizer (`onnxruntime.quantization.qdq_quantizer.QDQQuantizer`) does the graph work; quantlab
hands it the ranges (lowest = -amax, highest = amax, so scale = amax / 127) instead of letting it calibrate, and tells
it which tensors to quantize. Symmetric INT8 throughout, zero point 0: activations per tensor, weights per output
channel, stored as INT8 initializers behind a DequantizeLinear. Biases stay float, as in the Q/DQ models NVIDIA's
ModelOpt exports: TensorRT folds them into the layer in high precision.

Placement follows TensorRT's "Q/DQ Layer-Placement Recommendations" (TensorRT Developer Guide, Explicit Quantization,
https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/quantized-types-explicit-quantization.html):

- "Quantize all inputs of weighted-operations (Convolution, Transposed Convolution and GEMM)": the activation inputs
  of every Conv, ConvTranspose, Gemm and MatMul, and their weights.
- "By default, do not quantize the outputs of weighted-operations."
- "Do not simulate batch-normalization and ReLU fusions": Relu stays in the graph as it is.
- "Quantize the residual input in skip-connections": an Add with a weighted op on one input gets Q/DQ on its other
  input, so TensorRT can fuse the Add into that op with an INT8 output; the weighted op's own output stays float.
- "Use per-tensor quantization for activations; and per-channel quantization for weights."

One addition lets ONNX Runtime's CPU provider run the layers with INT8 kernels (QLinearConv, QGemm): where a weighted
op's output reaches a quantized tensor only through single-consumer ops that commute with symmetric quantization
(Relu, MaxPool and reshapes: `Q(op(x)) == op(Q(x))` for zero point 0), its output gets a Q/DQ pair that shares that
tensor's scale. The results are unchanged bit for bit (quantizing twice with one scale is quantizing once); it is the
backward Q propagation TensorRT's optimizer applies itself ("Q/DQ propagation", same guide), made explicit because
ONNX Runtime only fuses a Conv whose output is quantized. (ONNX Runtime 1.21 or later is needed for these fusions: it
quantizes the float biases itself when the model loads.)

Weights: `weight_method="max"` (default) takes max|w| of each output channel: weights are known exactly, and with a
scale per channel the largest value of a channel rarely sits far from the rest, so nothing is clipped (TensorRT's
and ModelOpt's default). `"mse"` picks, per channel, the amax in 0.25..1.0 x max|w| (steps of 0.01) with the least
mean squared error after rounding, trading clipped outliers for finer steps.

`keep_fp32` names nodes, by node name or by the name of one of their outputs (the drift report lists tensors), to
leave in float: they get no Q/DQ on their inputs or weights, and read the float value of a tensor that other
consumers read through Q/DQ.

Tensor names in the Q/DQ model (see `fp32_names`): every FP32 tensor keeps its name and its float value as computed
by the quantized upstream layers. A quantized tensor `X` is read by its consumers as `X_DequantizeLinear_Output`
(X rounded to its INT8 grid). A graph output that is quantized is the exception: its producer then writes
`X_QuantizeLinear_Input`, and `X` is the DequantizeLinear output.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx

from quantlab.atomic import atomic_write, check_writable
from quantlab.errors import QuantlabError, first_line
from quantlab.formats import Thresholds
from quantlab.model import activation_tensors, load_model

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Ops through which a Q/DQ moves without changing any value when the zero point is 0.
COMMUTING_OPS = ("Relu", "MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze")
WEIGHT_METHODS = ("max", "mse")
QUANTIZABLE_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)  # what ONNX Runtime's quantizer quantizes
MIN_OPSET = 13  # per-channel DequantizeLinear (its `axis` attribute) needs opset 13
MSE_FRACTIONS = np.linspace(0.25, 1.0, 76)  # candidate amax as fractions of max|w| for weight_method="mse"


class Placement(NamedTuple):
    """Where the Q/DQ pairs go, decided before ONNX Runtime's quantizer runs."""

    ranged: list[str]  # activation tensors quantized with their own threshold, in graph order
    residual: list[str]  # those that only a residual Add asks for (the quantizer does not mark them itself)
    shared: list[tuple[str, str, str]]  # (weighted-op output, quantized tensor whose scale it takes, its consumer)


def export_qdq(
    model_path: str | os.PathLike,
    thresholds: Thresholds | Mapping[str, float],
    out_path: str | os.PathLike,
    *,
    weight_method: str = "max",
    keep_fp32: Sequence[str] = (),
) -> Path:
    """Write the Q/DQ model of `model_path` (see `quantize_qdq`) to `out_path` atomically; returns `out_path`."""
    out = check_writable(out_path)
    model = quantize_qdq(model_path, thresholds, weight_method=weight_method, keep_fp32=keep_fp32)
    with atomic_write(out) as handle:
        handle.write(model.SerializeToString())
    return out


def quantize_qdq(
    model_path: str | os.PathLike,
    thresholds: Thresholds | Mapping[str, float],
    *,
    weight_method: str = "max",
    keep_fp32: Sequence[str] = (),
) -> onnx.ModelProto:
    """The Q/DQ model in memory: TensorRT's placement, ranges from `thresholds` (tensor name -> amax)."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

    if weight_method not in WEIGHT_METHODS:
        raise QuantlabError(f"unknown weight method {weight_method!r} (known: {', '.join(WEIGHT_METHODS)})")
    amax = thresholds.amax if isinstance(thresholds, Thresholds) else Thresholds(dict(thresholds)).amax
    path = Path(model_path)
    model = _with_min_opset(load_model(path), path)
    excluded = _nodes_named(model, keep_fp32)
    activations = activation_tensors(model)
    placement = _placement(model, activations, excluded)
    _check_thresholds(amax, activations, placement.ranged, path.name)

    ranges = {
        name: TensorData(lowest=np.float32(-amax[name]), highest=np.float32(amax[name])) for name in placement.ranged
    }
    options = {
        "ActivationSymmetric": True,
        "WeightSymmetric": True,
        "QuantizeBias": False,
        "QDQDisableWeightAdjustForInt32Bias": True,  # keep weight scales at amax / 127 exactly
        "OpTypesToExcludeOutputQuantization": list(WEIGHTED_OPS),
    }
    if weight_method == "mse":
        options["TensorQuantOverrides"] = _mse_overrides(model, excluded)
    quantizer = QDQQuantizer(
        model,
        per_channel=True,
        reduce_range=False,
        weight_qType=QuantType.QInt8,
        activation_qType=QuantType.QInt8,
        tensors_range=TensorsData(CalibrationMethod.MinMax, ranges),
        nodes_to_quantize=None,
        nodes_to_exclude=sorted(excluded),
        op_types_to_quantize=list(WEIGHTED_OPS),
        extra_options=options,
    )
    types = {name: info.type.tensor_type.elem_type for name, info in quantizer.value_infos.items()}
    unsupported = [name for name in placement.ranged if types.get(name) not in QUANTIZABLE_TYPES]
    if unsupported:  # the quantizer would skip them, and wait forever for those that lend their scale
        raise QuantlabError(f"{path}: Q/DQ export takes float32 and float16 tensors, not {_few(unsupported)}")
    for name in placement.residual:
        quantizer.quantize_activation_tensor(name)
    for output, source, consumer in placement.shared:
        quantizer.quantize_output_same_as_input(output, source, consumer)
    try:
        quantizer.quantize_model()
    except ValueError as exc:
        message = f"{path}: ONNX Runtime's quantizer cannot quantize this model ({first_line(exc)})"
        raise QuantlabError(message) from None
    quantizer.model.topological_sort()
    qdq = quantizer.model.model
    _read_float_inputs(qdq.graph, excluded)
    return qdq


def fp32_names(qdq_model: onnx.ModelProto) -> dict[str, str]:
    """Q/DQ-model tensor name -> FP32-model tensor name, for every tensor of the Q/DQ model that stands for one.

    Graph inputs and outputs of nodes other than Q/DQ map to themselves (same tensor, computed from quantized layers);
    a quantized tensor's DequantizeLinear output (`X_DequantizeLinear_Output`: X on its INT8 grid, what its
    consumers read) and, for a quantized graph output, the float value its producer writes (`X_QuantizeLinear_Input`)
    map to X. INT8 tensors and dequantized weights are left out. For per-layer drift compare the FP32 `X` with the
    DequantizeLinear output where there is one (the tensor as INT8 consumers see it), else with `X` itself.
    """
    graph = qdq_model.graph
    initializers = {init.name for init in graph.initializer}
    producer = {name: node for node in graph.node for name in node.output}
    graph_outputs = {output.name for output in graph.output}
    names = {value.name: value.name for value in graph.input if value.name not in initializers}
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            names.update({name: name for name in node.output if name})
        quantize = producer.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if quantize is not None and quantize.op_type == "QuantizeLinear":
            original = node.output[0] if node.output[0] in graph_outputs else quantize.input[0]
            names[quantize.input[0]] = names[node.output[0]] = original
    return names


def _placement(model: onnx.ModelProto, activations: list[str], excluded: set[str]) -> Placement:
    """Apply the placement rules (module docstring) to the FP32 graph."""
    graph = model.graph
    dynamic = set(activations)
    weighted = [node for node in graph.node if node.op_type in WEIGHTED_OPS and node.name not in excluded]
    inputs = {name for node in weighted for name in node.input[:2] if name in dynamic}
    weighted_outputs = {node.output[0] for node in weighted}
    residual = set()
    for node in graph.node:
        if node.op_type != "Add" or node.name in excluded or len(node.input) != 2:
            continue
        first, second = node.input
        if first in weighted_outputs and second in dynamic:
            residual.add(second)
        elif second in weighted_outputs and first in dynamic:
            residual.add(first)
    quantized = inputs | residual

    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in set(node.input):
            consumers.setdefault(name, []).append(node)
    graph_outputs = {output.name for output in graph.output}
    shared = []
    for node in weighted:
        tensor = node.output[0]
        while tensor not in quantized and tensor not in graph_outputs and len(consumers.get(tensor, [])) == 1:
            user = consumers[tensor][0]
            if user.op_type not in COMMUTING_OPS or user.name in excluded or user.input[0] != tensor:
                break
            tensor = user.output[0]
        if tensor in quantized and tensor != node.output[0]:
            shared.append((node.output[0], tensor, consumers[tensor][0].name))
    ranged = [name for name in activations if name in quantized]
    return Placement(ranged, [name for name in ranged if name not in inputs], shared)


def _check_thresholds(amax: dict[str, float], activations: list[str], needed: list[str], model_name: str) -> None:
    """Every tensor to quantize has a finite threshold, and every threshold names an activation tensor."""
    missing = [name for name in needed if name not in amax]
    if missing:
        raise QuantlabError(
            f"no threshold for {len(missing)} of the {len(needed)} tensors {model_name} quantizes: {_few(missing)}"
            " (are the thresholds for another model?)"
        )
    known = set(activations)
    unknown = [name for name in amax if name not in known]
    if unknown:
        raise QuantlabError(
            f"{len(unknown)} tensors in the thresholds are not activation tensors of {model_name}: {_few(unknown)}"
        )
    infinite = [name for name in needed if not math.isfinite(amax[name])]
    if infinite:
        raise QuantlabError(f"infinite threshold for {len(infinite)} tensors to quantize: {_few(infinite)}")


def _nodes_named(model: onnx.ModelProto, names: Sequence[str]) -> set[str]:
    """Node names for `keep_fp32` entries, each a node name or the name of a node's output."""
    if isinstance(names, str):
        names = [names]
    node_names = {node.name for node in model.graph.node if node.name}
    by_output = {output: node.name for node in model.graph.node for output in node.output if output}
    unknown = [name for name in names if name not in node_names and name not in by_output]
    if unknown:
        raise QuantlabError(f"keep_fp32: no node or node output named {_few(unknown)}")
    unnamed = [name for name in names if name not in node_names and not by_output[name]]
    if unnamed:
        raise QuantlabError(f"keep_fp32: the nodes writing {_few(unnamed)} have no name, so they cannot be kept")
    return {name if name in node_names else by_output[name] for name in names}


def _read_float_inputs(graph: onnx.GraphProto, excluded: set[str]) -> None:
    """Point the inputs of `keep_fp32` nodes back at the float tensors the quantizer routed through Q/DQ."""
    producer = {name: node for node in graph.node for name in node.output}
    for node in graph.node:
        if node.name not in excluded:
            continue
        for i, name in enumerate(node.input):
            dequantize = producer.get(name)
            if dequantize is None or dequantize.op_type != "DequantizeLinear":
                continue
            quantize = producer.get(dequantize.input[0])
            if quantize is not None and quantize.op_type == "QuantizeLinear":
                node.input[i] = quantize.input[0]


def _with_min_opset(model: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    """The model at opset `MIN_OPSET` or later, converted when older."""
    opset = next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), MIN_OPSET)
    if opset >= MIN_OPSET:
        return model
    try:
        return onnx.version_converter.convert_version(model, MIN_OPSET)
    except Exception as exc:  # the converter raises RuntimeError, ValueError, ...: all mean "cannot convert"
        raise QuantlabError(
            f"{path}: opset {opset} is too old for per-channel Q/DQ and converting it to {MIN_OPSET} failed"
            f" ({first_line(exc)})"
        ) from None


def _weight_axis(node: onnx.NodeProto) -> int:
    """The output-channel axis of a weighted op's weight (input 1), as ONNX Runtime's quantizer uses it."""
    if node.op_type == "Gemm":
        return 0 if any(attr.name == "transB" and attr.i for attr in node.attribute) else 1
    return {"Conv": 0, "ConvTranspose": 1, "MatMul": 1}[node.op_type]


def _mse_amax(weight: np.ndarray, axis: int) -> np.ndarray:
    """Per-channel amax along `axis` with the least mean squared INT8 rounding error, from `MSE_FRACTIONS` x max|w|."""
    rows = np.moveaxis(np.asarray(weight, dtype=np.float64), axis, 0).reshape(weight.shape[axis], -1)
    top = np.abs(rows).max(axis=1)
    best, best_error = top.copy(), np.full(top.shape, np.inf)
    for fraction in MSE_FRACTIONS:
        amax = top * fraction
        scale = np.where(amax > 0, amax / 127, 1.0)[:, None]
        error = np.mean((np.clip(np.round(rows / scale), -127, 127) * scale - rows) ** 2, axis=1)
        better = error < best_error
        best[better], best_error[better] = amax[better], error[better]
    return best


def _mse_overrides(model: onnx.ModelProto, excluded: set[str]) -> dict[str, list[dict]]:
    """ONNX Runtime `TensorQuantOverrides` giving each weight of a quantized weighted op its per-channel MSE range."""
    weights = {init.name: init for init in model.graph.initializer}
    overrides = {}
    for node in model.graph.node:
        if node.op_type not in WEIGHTED_OPS or node.name in excluded or node.input[1] not in weights:
            continue
        weight = onnx.numpy_helper.to_array(weights[node.input[1]])
        axis = _weight_axis(node)
        channels = [{"rmin": -float(a), "rmax": float(a)} for a in _mse_amax(weight, axis)]
        channels[0]["axis"] = axis
        overrides[node.input[1]] = channels
    return overrides


def _few(names: Sequence[str], shown: int = 3) -> str:
    listed = ", ".join(names[:shown])
    return f"{listed} and {len(names) - shown} more" if len(names) > shown else listed


