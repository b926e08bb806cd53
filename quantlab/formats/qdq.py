"""Explicit quantization: an FP32 ONNX model plus thresholds -> a Q/DQ ONNX model, for an engine (an export target).

ONNX Runtime's own QDQ quantizer (`onnxruntime.quantization.qdq_quantizer.QDQQuantizer`) does the graph work; quantlab
hands it the ranges computed from its own thresholds instead of letting it calibrate, and tells it which tensors to
quantize. An export target is a placement policy (which tensors get a Q/DQ pair) and a quantization scheme (integer
types, symmetric or asymmetric ranges), one module each; the graph work they share is here:

- `tensorrt` (`qdq_tensorrt`, the default): TensorRT's explicit-quantization placement, symmetric int8.
- `onnxruntime` (`qdq_onnxruntime`): the placement ONNX Runtime's CPU provider fuses into integer kernels (QLinearConv,
  QLinearMatMul, QGemm, QLinearAdd, ...), uint8 activations with asymmetric ranges.

Both quantize weights per output channel, int8 and symmetric. `weight_method="max"` (default) takes max|w| of each
output channel: weights are known exactly, and with a scale per channel the largest value of a channel rarely sits far
from the rest, so nothing is clipped (TensorRT's and ModelOpt's default). `"mse"` picks, per channel, the amax in
0.25..1.0 x max|w| (steps of 0.01) with the least mean squared error after rounding, trading clipped outliers for
finer steps.

Models as exporters write them (`prepared_model`): weights held in Constant nodes or computed from constants alone are
folded into initializers, quantized per channel like the others; models below opset 13 are converted; float16 models
go to opset 19 (float16 scales). The Q/DQ model keeps the FP32 model's graph outputs exactly (names, order, types,
shapes), inputs passed through as outputs included.

`keep_fp32` names nodes, by node name or by the name of one of their outputs (the drift report lists tensors), to
leave in float: they get no Q/DQ of their own (what the target does with the tensors they read is in its module).
Small GEMMs stay in float the same way, for either target (`small_gemms`: a MatMul or Gemm whose weight has K or N
below `MIN_GEMM_DIM`, as ModelOpt leaves them): on the PP-OCR direction classifier, whose last MatMul makes 2 logits
from 200 features, this raised the held-out SQNR from 35.2 to 38.3 dB (benchmarks/accuracy.py).

Tensor names in the Q/DQ model (see `fp32_names`): every FP32 tensor that the model still computes keeps its name and
its float value as computed by the quantized upstream layers. A quantized tensor `X` is read by its consumers as
`X_DequantizeLinear_Output` (X rounded to its integer grid). A graph output that the tensorrt target quantizes is the
exception: its producer then writes `X_QuantizeLinear_Input`, and `X` is the DequantizeLinear output.
"""

from __future__ import annotations

import copy
import importlib
import math
import os
import re
import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnx

from quantlab.atomic import atomic_write, check_writable
from quantlab.data import DataSource, open_data
from quantlab.errors import QuantlabError, QuantlabRuntimeError, first_line
from quantlab.formats import Thresholds
from quantlab.model import (
    InputSpec,
    create_session,
    fold_constants,
    input_specs,
    load_model,
    tensor_types,
    value_types,
)

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
WEIGHT_METHODS = ("max", "mse")
# The export targets, each a module of this package; the default is justified in the README (`quantlab export`).
TARGETS = {"tensorrt": "quantlab.formats.qdq_tensorrt", "onnxruntime": "quantlab.formats.qdq_onnxruntime"}
DEFAULT_TARGET = "tensorrt"
QUANTIZABLE_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)  # what ONNX Runtime's quantizer quantizes
MIN_OPSET = 13  # per-channel DequantizeLinear (its `axis` attribute) needs opset 13
FLOAT16_OPSET = 19  # and float16 scales opset 19
SYNTHETIC_DIM = 32  # the size a synthesized sample gives a dynamic dim other than the batch dim
# Where ONNX Runtime names the node in its load and run errors: "... node. Name:'conv'", "in node (conv)", "Node (conv)".
_ORT_NODE_PATTERNS = (r"Name:'([^']+)'", r"[Nn]ode \(([^)]+)\)")
DEQUANTIZED_SUFFIX = "_DequantizeLinear_Output"  # what ONNX Runtime's quantizer names the DequantizeLinear of a tensor
# A MatMul or Gemm whose weight has fewer rows (K) or columns (N) than this stays in float, as ModelOpt's int8
# quantization leaves it: its work is too small for an integer kernel to pay off (TensorRT's INT8 kernels need K, N >= 16),
# and these are mostly a model's last layers (a classifier's few logits), where rounding costs the most accuracy.
MIN_GEMM_DIM = 16
MSE_FRACTIONS = np.linspace(0.25, 1.0, 76)  # candidate amax as fractions of max|w| for weight_method="mse"


class QuantizationPlan(NamedTuple):
    """What an export target decided for one model, handed to ONNX Runtime's quantizer."""

    op_types: list[str]  # the node types the quantizer quantizes (inputs and outputs, as its op quantizers do)
    excluded: set[str]  # names of the nodes it leaves in float
    ranged: list[str]  # activation tensors given a range (`ExportTarget.tensor_range`), in graph order
    activation_type: str  # onnxruntime.quantization.QuantType member for activations: "QInt8" or "QUInt8"
    options: dict[str, Any]  # the quantizer's extra options (symmetry, bias, output exclusions)
    types: dict[str, int]  # element type of every tensor of the model (float16 tensors get float16 scales)
    float_readers: set[str]  # excluded nodes that read the float tensors, not their Q/DQ (`read_float_inputs`)
    residual: list[str] = []  # tensors to quantize that no quantized node marks itself
    shared: list[tuple[str, str, str]] = []  # (tensor, quantized tensor whose scale it takes, that one's consumer)
    ranges: dict[str, tuple[float, float]] = {}  # tensors whose range the target set itself, not `tensor_range`'s


class ExportTarget(ABC):
    """An engine to export for: where the Q/DQ pairs go (`plan`) and how a range follows from a threshold
    (`tensor_range`); `finish` edits the Q/DQ model the quantizer wrote. `quantize_qdq` does the rest."""

    name: str

    @abstractmethod
    def plan(
        self, model: onnx.ModelProto, kept: set[str], thresholds: Thresholds, path: Path, keep_shapes: bool = False
    ) -> tuple[onnx.ModelProto, QuantizationPlan]:
        """The model to quantize (`model`, or a rewrite of it that keeps the names of the tensors it still computes)
        and the plan; `kept` names the nodes `keep_fp32` leaves in float; `keep_shapes`: every tensor it still
        computes keeps its shape too (no rewrite widens one)."""

    @abstractmethod
    def tensor_range(self, name: str, thresholds: Thresholds) -> tuple[float, float]:
        """The (lowest, highest) value the quantized tensor `name` represents."""

    def finish(self, qdq: onnx.ModelProto, plan: QuantizationPlan) -> None:
        """Edit the quantizer's Q/DQ model in place (nothing by default)."""


def export_target(name: str) -> ExportTarget:
    """The export target named `name` (one of `TARGETS`)."""
    if name not in TARGETS:
        raise QuantlabError(f"unknown export target {name!r} (known: {', '.join(TARGETS)})")
    return importlib.import_module(TARGETS[name]).TARGET


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
    target: str = DEFAULT_TARGET,
    keep_shapes: bool = False,
) -> Path:
    """Write the Q/DQ model of `model_path` for `target` (see `quantize_qdq`, also for `keep_shapes`) to `out_path`;
    returns `out_path`.

    Only a model ONNX Runtime loads and runs on one sample is written (`data`: what `quantlab.data.open_data` takes,
    or a `Sample`; see `check_sample`); otherwise a one-line `QuantlabRuntimeError` names the node that failed, and nothing is written.
    The write is atomic, so a previous file at `out_path` stays as it was until the new model has passed.
    """
    out = check_writable(out_path)
    model = quantize_qdq(
        model_path, thresholds, weight_method=weight_method, keep_fp32=keep_fp32, target=target, keep_shapes=keep_shapes
    )
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
    target: str = DEFAULT_TARGET,
    keep_shapes: bool = False,
) -> onnx.ModelProto:
    """The Q/DQ model in memory: `target`'s placement (`TARGETS`), ranges from `thresholds` (tensor name -> amax, or
    a `Thresholds` whose `min_max` the onnxruntime target turns into asymmetric ranges). `keep_shapes`: every tensor
    keeps the FP32 model's shape (the onnxruntime target then widens no depthwise convolution: the same values, a
    little slower), as models that mix the export's tensors with the FP32 model's need."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

    if weight_method not in WEIGHT_METHODS:
        raise QuantlabError(f"unknown weight method {weight_method!r} (known: {', '.join(WEIGHT_METHODS)})")
    chosen = export_target(target)
    table = thresholds if isinstance(thresholds, Thresholds) else Thresholds(dict(thresholds))
    path = Path(model_path)
    fp32 = load_model(path)
    outputs = copy.deepcopy(list(fp32.graph.output))
    model = prepared_model(fp32, path)
    model, plan = chosen.plan(model, _nodes_named(model, keep_fp32) | small_gemms(model), table, path, keep_shapes)

    ranges = {}
    for name in plan.ranged:  # float16 tensors get float16 scales, as their Q/DQ nodes need
        dtype = np.float16 if plan.types.get(name) == onnx.TensorProto.FLOAT16 else np.float32
        low, high = plan.ranges[name] if name in plan.ranges else chosen.tensor_range(name, table)
        ranges[name] = TensorData(lowest=dtype(low), highest=dtype(high))
    options = {**plan.options, "TensorQuantOverrides": _weight_overrides(model, plan.excluded, weight_method)}
    quantizer = QDQQuantizer(
        model,
        per_channel=True,
        reduce_range=False,
        weight_qType=QuantType.QInt8,
        activation_qType=QuantType[plan.activation_type],
        tensors_range=TensorsData(CalibrationMethod.MinMax, ranges),
        nodes_to_quantize=None,
        nodes_to_exclude=sorted(plan.excluded),
        op_types_to_quantize=plan.op_types,
        extra_options=options,
    )
    types = {name: info.type.tensor_type.elem_type for name, info in quantizer.value_infos.items()}
    unsupported = [name for name in plan.ranged if types.get(name) not in QUANTIZABLE_TYPES]
    if unsupported:  # the quantizer would skip them, and wait forever for those that lend their scale
        raise QuantlabError(f"{path}: Q/DQ export takes float32 and float16 tensors, not {_few(unsupported)}")
    for name in plan.residual:
        quantizer.quantize_activation_tensor(name)
    for output, source, consumer in plan.shared:
        quantizer.quantize_output_same_as_input(output, source, consumer)
    try:
        quantizer.quantize_model()
    except ValueError as exc:
        message = f"{path}: ONNX Runtime's quantizer cannot quantize this model ({first_line(exc)})"
        raise QuantlabError(message) from None
    quantizer.model.topological_sort()
    qdq = quantizer.model.model
    read_float_inputs(qdq.graph, plan.float_readers)
    chosen.finish(qdq, plan)
    del qdq.graph.output[:]
    qdq.graph.output.extend(outputs)  # every output as the FP32 model declares it, passed-through ones too
    return qdq


def prepared_model(fp32: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    """The model as ONNX Runtime's quantizer can take it, every activation tensor keeping its name.

    The opset is raised to what the Q/DQ nodes need (`_with_min_opset`: 19 where a weighted op reads float16, for
    float16 scales); weights computed from constants become initializers (`fold_constants`: the quantizer quantizes
    initializers only); unnamed nodes get names (`<op type>_<index>`), so that every node can be kept in float (by
    `keep_fp32`, by its output's name, or by the small-GEMM rule) and named in reports; graph outputs that are graph
    inputs passed through are taken out (the quantizer would route a quantized input's Q/DQ into a cycle through its
    own output; `quantize_qdq` puts every FP32 output back).
    """
    weighted_inputs = [name for node in fp32.graph.node if node.op_type in WEIGHTED_OPS for name in node.input if name]
    types = tensor_types(fp32)
    reads_float16 = any(types.get(name) == onnx.TensorProto.FLOAT16 for name in weighted_inputs)
    model = _with_min_opset(fp32, path, FLOAT16_OPSET if reads_float16 else MIN_OPSET)
    model = fold_constants(model, weighted_inputs)
    if not all(node.name for node in model.graph.node):
        model = copy.deepcopy(model) if model is fp32 else model
        _name_nodes(model.graph)
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
    DequantizeLinear output where there is one (the tensor as INT8 consumers see it), else with `X` itself. A
    DequantizeLinear with a scale of its own (`Y_DequantizeLinear_Output` reading X's integers: the onnxruntime target
    folds Y = X * c into the scale) maps to Y.
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
            if node.input[1] != quantize.input[1] and node.output[0].endswith(DEQUANTIZED_SUFFIX):
                names[node.output[0]] = node.output[0][: -len(DEQUANTIZED_SUFFIX)]
    return names


def unthresholded(amax: dict[str, float], activations: list[str], needed: list[str], path: Path) -> list[str]:
    """The tensors of `needed` (those a target quantizes) that have no threshold, named in a warning: they stay in
    float. Thresholds for another model (that name tensors which are not in `activations`, the model's activation
    tensors, or none of those to quantize) and infinite thresholds are refused."""
    missing = [name for name in needed if name not in amax]
    if missing and len(missing) == len(needed):
        raise QuantlabError(
            f"no threshold for {len(missing)} of the {len(needed)} tensors {path.name} quantizes: {_few(missing)}"
            " (are the thresholds for another model?)"
        )
    known = set(activations)
    unknown = [name for name in amax if name not in known]
    if unknown:
        raise QuantlabError(
            f"{len(unknown)} tensors in the thresholds are not activation tensors of {path.name}: {_few(unknown)}"
        )
    infinite = [name for name in needed if not math.isfinite(amax.get(name, 0.0))]
    if infinite:
        raise QuantlabError(f"infinite threshold for {len(infinite)} tensors to quantize: {_few(infinite)}")
    if missing:
        warnings.warn(
            f"no threshold for {len(missing)} of the {len(needed)} tensors {path.name} quantizes, left in float:"
            f" {', '.join(missing)}",
            stacklevel=5,  # the caller of quantize_qdq
        )
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
    return {name if name in node_names else by_output[name] for name in names}


def _name_nodes(graph: onnx.GraphProto) -> None:
    """Give every unnamed node a name of its own, `<op type>_<index>`."""
    used = {node.name for node in graph.node}
    for index, node in enumerate(graph.node):
        if not node.name:
            node.name = unique_name(f"{node.op_type}_{index}", used)


def unique_name(base: str, used: set[str]) -> str:
    """`base`, or `base_2`, `base_3`, ... where taken; the name is added to `used`."""
    name, count = base, 1
    while name in used:
        count += 1
        name = f"{base}_{count}"
    used.add(name)
    return name


def small_gemms(model: onnx.ModelProto) -> set[str]:
    """Names of the MatMul and Gemm nodes whose weight (second input) has K or N below `MIN_GEMM_DIM`, as its
    initializer or the inferred shape gives them; such nodes stay in float (see `MIN_GEMM_DIM`)."""
    shapes = {init.name: list(init.dims) for init in model.graph.initializer}
    gemms = [node for node in model.graph.node if node.op_type in ("MatMul", "Gemm")]
    if any(node.input[1] not in shapes for node in gemms):
        for name, value in value_types(model).items():
            if name not in shapes and value.HasField("shape"):
                shapes[name] = [dim.dim_value if dim.HasField("dim_value") else 0 for dim in value.shape.dim]
    small = set()
    for node in gemms:
        shape = shapes.get(node.input[1], [])
        known = [size for size in shape[-2:] if size > 0]  # K and N (N and K for a Gemm with transB), where fixed
        if len(shape) >= 2 and any(size < MIN_GEMM_DIM for size in known):
            small.add(node.name)
    return small


def read_float_inputs(graph: onnx.GraphProto, excluded: set[str]) -> None:
    """Point the inputs of the `excluded` nodes back at the float tensors the quantizer routed through Q/DQ."""
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


