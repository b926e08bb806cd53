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

Models as exporters write them (`_prepared`): weights held in Constant nodes or computed from constants alone are
folded into initializers, quantized per channel like the others; models below opset 13 are converted; float16 models
go to opset 19 (float16 scales). The Q/DQ model keeps the FP32 model's graph outputs exactly (names, order, types,
shapes), inputs passed through as outputs included.

`keep_fp32` names nodes, by node name or by the name of one of their outputs (the drift report lists tensors), to
leave in float: they get no Q/DQ on their inputs or weights, and read the float value of a tensor that other
consumers read through Q/DQ.

Tensor names in the Q/DQ model (see `fp32_names`): every FP32 tensor keeps its name and its float value as computed
by the quantized upstream layers. A quantized tensor `X` is read by its consumers as `X_DequantizeLinear_Output`
(X rounded to its INT8 grid). A graph output that is quantized is the exception: its producer then writes
`X_QuantizeLinear_Input`, and `X` is the DequantizeLinear output.
"""

from __future__ import annotations

import copy
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx

from quantlab.atomic import atomic_write, check_writable
from quantlab.data import DataSource, open_data
from quantlab.errors import QuantlabError, QuantlabRuntimeError, first_line
from quantlab.formats import Thresholds
from quantlab.model import (
    InputSpec,
    activation_tensors,
    create_session,
    fold_constants,
    input_specs,
    load_model,
    tensor_types,
)

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Ops through which a Q/DQ moves without changing any value when the zero point is 0.
COMMUTING_OPS = ("Relu", "MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze")
WEIGHT_METHODS = ("max", "mse")
QUANTIZABLE_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)  # what ONNX Runtime's quantizer quantizes
MIN_OPSET = 13  # per-channel DequantizeLinear (its `axis` attribute) needs opset 13
FLOAT16_OPSET = 19  # and float16 scales opset 19
SYNTHETIC_DIM = 32  # the size a synthesized sample gives a dynamic dim other than the batch dim
# Where ONNX Runtime names the node in its load and run errors: "... node. Name:'conv'", "in node (conv)", "Node (conv)".
_ORT_NODE_PATTERNS = (r"Name:'([^']+)'", r"[Nn]ode \(([^)]+)\)")
MSE_FRACTIONS = np.linspace(0.25, 1.0, 76)  # candidate amax as fractions of max|w| for weight_method="mse"


class Placement(NamedTuple):
    """Where the Q/DQ pairs go, decided before ONNX Runtime's quantizer runs."""

    ranged: list[str]  # activation tensors quantized with their own threshold, in graph order
    residual: list[str]  # those that only a residual Add asks for (the quantizer does not mark them itself)
    shared: list[tuple[str, str, str]]  # (weighted-op output, quantized tensor whose scale it takes, its consumer)


class Sample(NamedTuple):
    """One feed to run an exported model on, and where it comes from (for messages)."""

    feed: dict[str, np.ndarray]
    source: str


def export_qdq(
    model_path: str | os.PathLike,
    thresholds: Thresholds | Mapping[str, float],
    out_path: str | os.PathLike,
    *,
    weight_method: str = "max",
    keep_fp32: Sequence[str] = (),
    data: DataSource | Sample | None = None,
) -> Path:
    """Write the Q/DQ model of `model_path` (see `quantize_qdq`) to `out_path`; returns `out_path`.

    Only a model ONNX Runtime loads and runs on one sample is written (`data`: what `quantlab.data.open_data` takes,
    or a `Sample`; see `check_sample`); otherwise a one-line `QuantlabRuntimeError` names the node that failed, and nothing is written.
    The write is atomic, so a previous file at `out_path` stays as it was until the new model has passed.
    """
    out = check_writable(out_path)
    model = quantize_qdq(model_path, thresholds, weight_method=weight_method, keep_fp32=keep_fp32)
    sample = data if isinstance(data, Sample) else check_sample(model_path, thresholds, data)
    _check_runs(model, model_path, sample, out)
    with atomic_write(out) as handle:
        handle.write(model.SerializeToString())
    return out


def check_sample(
    model_path: str | os.PathLike, thresholds: Thresholds | Mapping[str, float], data: DataSource | None = None
) -> Sample:
    """The sample `export_qdq` runs the Q/DQ model on: the first of `data` (a directory, a loader script, feeds: what
    `quantlab.data.open_data` takes); without it, the first of the directory the thresholds' histograms were collected from, where that is still there and fits the model;
    else one synthesized from the input specs (a dynamic batch dim 1, other dynamic dims `SYNTHETIC_DIM`; floats
    drawn from a fixed normal distribution, integers and booleans 0)."""
    specs = input_specs(load_model(model_path))
    if data is not None:
        return _first_sample(data, specs)
    recorded = _recorded_data_directory(thresholds)
    if recorded is not None:
        try:
            return _first_sample(recorded, specs)
        except QuantlabError:  # the data no longer fits this model: a synthesized sample serves instead
            pass
    rng = np.random.default_rng(0)
    feed = {}
    for spec in specs:
        shape = [
            dim if isinstance(dim, int) else 1 if axis == 0 and spec.has_batch_dim else SYNTHETIC_DIM
            for axis, dim in enumerate(spec.shape)
        ]
        floating = np.issubdtype(spec.dtype, np.floating)
        feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype) if floating else np.zeros(shape, spec.dtype)
    return Sample(feed, "a sample synthesized from the input shapes (--data DIR gives a real one)")


def _first_sample(data: DataSource, specs: list[InputSpec]) -> Sample:
    """The first sample of `data`, read alone (a loader stops there)."""
    with open_data(data, specs, reread=False) as opened:
        return Sample(opened.first_sample(), f"the first sample of {opened.source}")


def _recorded_data_directory(thresholds: Thresholds | Mapping[str, float]) -> Path | None:
    """The data directory that the histograms the thresholds were calibrated from were collected over, if it exists."""
    from quantlab.histogram import load_histograms

    source = thresholds.metadata.get("source") if isinstance(thresholds, Thresholds) else None
    histograms = Path(source["histograms"]) if isinstance(source, dict) and source.get("histograms") else None
    if histograms is None or not histograms.is_file():
        return None
    try:
        directory = load_histograms(histograms).metadata.get("data", {}).get("directory")
    except QuantlabError:
        return None
    return Path(directory) if directory and Path(directory).is_dir() else None


def _check_runs(qdq: onnx.ModelProto, model_path: str | os.PathLike, sample: Sample, out: Path) -> None:
    """ONNX Runtime loads the Q/DQ model and runs it on the sample; if it cannot, a one-line error names the node that
    failed, unless the FP32 model fails on that sample too (then the sample is the problem)."""
    try:
        create_session(qdq).run(None, sample.feed)
        return
    except Exception as exc:  # a load failure (QuantlabError) or any error ONNX Runtime raises while running
        failure = first_line(exc)
    try:
        create_session(load_model(model_path)).run(None, sample.feed)
    except Exception as exc:
        raise QuantlabError(
            f"{model_path}: the FP32 model does not run on {sample.source} either ({first_line(exc)}), so the Q/DQ"
            " model cannot be checked; give --data DIR with inputs the model takes"
        ) from None
    op_types = {node.name: node.op_type for node in qdq.graph.node if node.name}
    named = [name for pattern in _ORT_NODE_PATTERNS for name in re.findall(pattern, failure) if name in op_types]
    failed = f"node {named[0]} ({op_types[named[0]]})" if named else "it"
    raise QuantlabRuntimeError(
        f"{out} not written: ONNX Runtime cannot run the Q/DQ model on {sample.source}: {failed} failed:"
        f" {_ort_reason(failure)}; keep that node, or the layers that feed it, in FP32 with --keep-fp32 NODE"
    )


def _ort_reason(message: str) -> str:
    """The cause in an ONNX Runtime error message, without its status prefix, source location or C++ signature."""
    reason = message.split("Status Message: ", 1)[-1]
    reason = re.sub(r"^\S+\.(?:cc|cpp|h):\d+ (?:.*?\) (?:const )?)?", "", reason)
    return reason.split(" was false. ", 1)[-1]


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
    fp32 = load_model(path)
    outputs = copy.deepcopy(list(fp32.graph.output))
    model = _prepared(fp32, path)
    excluded = _nodes_named(model, keep_fp32)
    types = tensor_types(model)
    activations = activation_tensors(model, types)
    placement, excluded = _thresholded_placement(model, activations, excluded, amax, path)

    ranges = {}
    for name in placement.ranged:  # float16 tensors get float16 scales, as their Q/DQ nodes need
        dtype = np.float16 if types.get(name) == onnx.TensorProto.FLOAT16 else np.float32
        ranges[name] = TensorData(lowest=dtype(-amax[name]), highest=dtype(amax[name]))
    options = {
        "ActivationSymmetric": True,
        "WeightSymmetric": True,
        "QuantizeBias": False,
        "QDQDisableWeightAdjustForInt32Bias": True,  # keep weight scales at amax / 127 exactly
        "OpTypesToExcludeOutputQuantization": list(WEIGHTED_OPS),
        "TensorQuantOverrides": _weight_overrides(model, excluded, weight_method),
    }
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
    del qdq.graph.output[:]
    qdq.graph.output.extend(outputs)  # every output as the FP32 model declares it, passed-through ones too
    return qdq


def _prepared(fp32: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    """The model as ONNX Runtime's quantizer can take it, every activation tensor keeping its name.

    The opset is raised to what the Q/DQ nodes need (`_with_min_opset`: 19 where a weighted op reads float16, for
    float16 scales); weights computed from constants become initializers (`fold_constants`: the quantizer quantizes
    initializers only); graph outputs that are graph inputs passed through are taken out (the quantizer would route a
    quantized input's Q/DQ into a cycle through its own output; `quantize_qdq` puts every FP32 output back).
    """
    weighted_inputs = [name for node in fp32.graph.node if node.op_type in WEIGHTED_OPS for name in node.input if name]
    reads_float16 = any(tensor_types(fp32).get(name) == onnx.TensorProto.FLOAT16 for name in weighted_inputs)
    model = _with_min_opset(fp32, path, FLOAT16_OPSET if reads_float16 else MIN_OPSET)
    model = fold_constants(model, weighted_inputs)
    fed = {spec.name for spec in input_specs(model)}
    computed = [output for output in model.graph.output if output.name not in fed]
    if len(computed) < len(model.graph.output):
        model = copy.deepcopy(model) if model is fp32 else model
        del model.graph.output[:]
        model.graph.output.extend(computed)
    return model


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


def _thresholded_placement(
    model: onnx.ModelProto, activations: list[str], excluded: set[str], amax: dict[str, float], path: Path
) -> tuple[Placement, set[str]]:
    """The placement and the nodes kept in float, for these thresholds.

    A tensor to quantize without a threshold stays in float, with a warning naming it: calibrate leaves out the tensors
    INT8 cannot represent (Inf values, a mask sentinel), as TensorRT keeps a tensor its cache lacks in float. The
    weighted ops reading it stay in float too (ONNX Runtime's quantizer needs the ranges of all their inputs).
    """
    placement = _placement(model, activations, excluded)
    missing = _check_thresholds(amax, activations, placement.ranged, path.name)
    if not missing:
        return placement, excluded
    warnings.warn(
        f"no threshold for {len(missing)} of the {len(placement.ranged)} tensors {path.name} quantizes, left in float:"
        f" {', '.join(missing)}",
        stacklevel=3,
    )
    weighted = [node for node in model.graph.node if node.op_type in WEIGHTED_OPS and node.name not in excluded]
    readers = [node for node in weighted if set(node.input[:2]) & set(missing)]
    unnamed = next((node for node in readers if not node.name), None)
    if unnamed is not None:
        tensor = next(name for name in unnamed.input[:2] if name in missing)
        raise QuantlabError(
            f"{path}: {tensor} has no threshold and the {unnamed.op_type} reading it has no name, so that node cannot"
            " be kept in float"
        )
    excluded = excluded | {node.name for node in readers}
    placement = _placement(model, activations, excluded)
    ranged = [name for name in placement.ranged if name in amax]
    residual = [name for name in placement.residual if name in amax]
    return Placement(ranged, residual, [shared for shared in placement.shared if shared[1] in amax]), excluded


def _check_thresholds(amax: dict[str, float], activations: list[str], needed: list[str], model_name: str) -> list[str]:
    """The tensors to quantize that have no threshold. Thresholds for another model (that name tensors which are not
    activation tensors, or none of those to quantize) and infinite thresholds are refused."""
    missing = [name for name in needed if name not in amax]
    if missing and len(missing) == len(needed):
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
    infinite = [name for name in needed if not math.isfinite(amax.get(name, 0.0))]
    if infinite:
        raise QuantlabError(f"infinite threshold for {len(infinite)} tensors to quantize: {_few(infinite)}")
    return missing


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


def _with_min_opset(model: onnx.ModelProto, path: Path, min_opset: int) -> onnx.ModelProto:
    """The model at opset `min_opset` or later, converted when older (tensor names are kept), at an IR version that
    opset allows (an IR 3 model must list every initializer as a graph input, which the converter and the Q/DQ
    nodes' own initializers do not)."""
    opset = next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), min_opset)
    others = [entry for entry in model.opset_import if entry.domain not in ("", "ai.onnx")]
    ir_version = onnx.helper.find_min_ir_version_for(
        [onnx.helper.make_opsetid("", max(opset, min_opset)), *others], ignore_unknown=True
    )
    if model.ir_version < ir_version:
        model = copy.deepcopy(model)
        model.ir_version = ir_version
    if opset >= min_opset:
        return model
    try:
        return onnx.version_converter.convert_version(model, min_opset)
    except Exception as exc:  # the converter raises RuntimeError, ValueError, ...: all mean "cannot convert"
        raise QuantlabError(
            f"{path}: opset {opset} is too old for per-channel Q/DQ and converting it to {min_opset} failed"
            f" ({first_line(exc)})"
        ) from None


def _weight_axis(node: onnx.NodeProto, rank: int) -> int | None:
    """The output-channel axis of a weighted op's weight (input 1) of that rank, as ONNX Runtime's quantizer uses it;
    None for a MatMul weight that is not a matrix, quantized per tensor: ONNX Runtime's INT8 MatMul kernels take a
    batched (3-D or more) weight only with one scale, and a vector has a single output channel."""
    if node.op_type == "Gemm":
        return 0 if any(attr.name == "transB" and attr.i for attr in node.attribute) else 1
    if node.op_type == "MatMul":
        return 1 if rank == 2 else None
    return {"Conv": 0, "ConvTranspose": 1}[node.op_type]


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


def _weight_overrides(model: onnx.ModelProto, excluded: set[str], weight_method: str) -> dict[str, list[dict]]:
    """ONNX Runtime `TensorQuantOverrides` for the weights of the quantized weighted ops: the one range of a weight
    quantized per tensor (`_weight_axis`), and with `weight_method="mse"` each channel's MSE range."""
    weights = {init.name: init for init in model.graph.initializer}
    overrides = {}
    for node in model.graph.node:
        if node.op_type not in WEIGHTED_OPS or node.name in excluded or node.input[1] not in weights:
            continue
        weight = onnx.numpy_helper.to_array(weights[node.input[1]])
        axis = _weight_axis(node, weight.ndim)
        if axis is None:
            (amax,) = _mse_amax(weight.reshape(1, -1), 0) if weight_method == "mse" else [np.abs(weight).max()]
            overrides[node.input[1]] = [{"rmin": -float(amax), "rmax": float(amax)}]
        elif weight_method == "mse":
            channels = [{"rmin": -float(a), "rmax": float(a)} for a in _mse_amax(weight, axis)]
            channels[0]["axis"] = axis
            overrides[node.input[1]] = channels
    return overrides


def _few(names: Sequence[str], shown: int = 3) -> str:
    listed = ", ".join(names[:shown])
    return f"{listed} and {len(names) - shown} more" if len(names) > shown else listed


