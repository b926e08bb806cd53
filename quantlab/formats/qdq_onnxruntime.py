"""Export target `onnxruntime`: the Q/DQ model that ONNX Runtime's CPU provider runs with integer kernels.

ONNX Runtime fuses a DequantizeLinear -> op -> QuantizeLinear group into one integer kernel (QLinearConv,
QLinearMatMul / MatMulIntegerToFloat, QGemm, QLinearAdd, QLinearMul, QLinearConcat, QLinearSigmoid,
QLinearAveragePool, QLinearGlobalAveragePool, ...) only where every input and the output of the op are quantized, and
its QLinearConv wants uint8 activations. TensorRT's placement quantizes no weighted-op output, so a Conv followed by
anything but Relu (SiLU, HardSwish written out) stays an FP32 Conv fed by DequantizeLinear: 0 integer kernels on
YOLOv8n, slower than FP32. This target quantizes what ONNX Runtime's own `quantize_static` quantizes, with
quantlab's ranges, plus the changes below, each measured on the real-model benchmark set (benchmarks/int8_speed.py):

Scheme. Activations uint8 per tensor, weights int8 symmetric per output channel, biases int32 (scale = input scale x
weight scale, ONNX Runtime's defaults). A tensor with a min/max beside its threshold (`Thresholds.min_max`, which
`quantlab calibrate` writes to a JSON table) gets the asymmetric range [max(min, -amax), min(max, amax)], widened to
hold 0 so that 0 is exact: a Relu output uses all 256 levels. A threshold alone (a TensorRT cache) gives [-amax,
amax], zero point 128. Removable activations (Relu, Clip) stay in the model; ONNX Runtime drops them itself where the
range makes them redundant, and keeps them where it does not (a symmetric range).

Placement. The op types of `quantize_static` (ONNX Runtime's QLinearOps and QDQ registries), except:

- post-processing: nodes from which no Conv, MatMul or Gemm can be reached (YOLO's box decoding, a detector's
  output head after its last Conv, a final Softmax) stay in float. They gain no integer kernel, and quantizing them
  only loses accuracy: YOLOv8n's class scores and box coordinates, concatenated into one output, shared one scale
  over 0-320 pixels and 0-1 scores, which zeroed every score;
- graph outputs are computed in float: a quantized output's Q/DQ pair moves off the output to its other readers;
- `keep_fp32` nodes stay in float and read the float tensors, as with the tensorrt target (reading a dequantized
  input and writing a quantized output, a Conv would still run as QLinearConv: ONNX Runtime quantizes a float weight
  itself); nodes reading or writing a tensor without a threshold stay in float too (a warning names the tensors), and
  read the dequantized tensor where their producer's output is quantized, so that the producer keeps its kernel;
- a Concat whose inputs and output have alike ranges (none narrower than half the union's width: YOLOv8's C2f
  blocks, which join Split halves and bottleneck outputs) gives them all the union of their ranges, one scale and zero
  point: ONNX Runtime's QLinearConcat then copies each input's bytes, where it would otherwise requantize them through
  a lookup table, a pixel at a time in channels-last layout (YOLOv8n, 2 cores: its 17 QLinearConcat 0.77 -> 0.45 ms a
  sample; final SQNR 29.03 -> 29.43 dB). Unrelated ranges keep their own (a Concat of 0-320 pixels and 0-1 scores).

Scalar steps last (`_scalar_steps_to_scales`, on the Q/DQ model): a Mul or Div of a quantized tensor by a positive
scalar constant (HardSwish written out ends in / 6; PaddlePaddle's learnable scales multiply by one number) folds
into the scale of the DequantizeLinear its readers read: the integers stay as they are, the result is exact on its
grid, and ONNX Runtime runs one QLinearMul fewer per step (PP-OCRv4 det, 2 cores: 48 of its 82 QLinearMul gone,
1.43x -> 1.64x FP32's speed).

Rewrites first (`_rewritten`; every tensor the rewritten model computes keeps its name, so the thresholds match; the
few it adds take the range of a tensor of the model):
constants held in Constant nodes become initializers (the quantizer quantizes only those, and ONNX Runtime fuses a
QLinearAdd or QLinearMul only with a quantized constant); a Conv followed by a per-channel scale and shift
(BatchNormalization, or Mul/Add/Sub/Div by constants: PaddlePaddle's learnable affine blocks) takes them into its
weights and bias, as ONNX Runtime folds a BatchNormalization into an FP32 Conv (a quantized Conv output between them
would stop that); a HardSigmoid after such a Conv (the gate of a squeeze-and-excitation block) folds its alpha and
beta into the Conv too and leaves a Clip to [0, 1], which ONNX Runtime drops: the QLinearConv writes the gate on its
uint8 range, where DQ -> HardSigmoid -> Q ran in float (PP-OCR cls: 9 such float groups gone, held-out SQNR 26.4 ->
28.2 dB); a Div by a constant becomes a Mul by its reciprocal (ONNX Runtime has an integer Mul, no integer Div).

Depthwise channels last (`_widen_depthwise_channels`, unless `keep_shapes`): ONNX Runtime runs a depthwise
QLinearConv with MLAS's fast symmetric kernel only where its channel count is a multiple of 16, and with a generic one
2-5x slower otherwise (benchmarks/conv_kernels.py: PP-OCR cls's 5x5 depthwise on 200 channels, FP32 9 us, INT8 48-67
us). A depthwise Conv of another width is widened to the next multiple, and so is every tensor that channelwise ops
(elementwise, pooling) or other depthwise Convs join to it, up to the dense Convs that write and read them: those
get zero filters and biases for the new channels and zero weights for reading them, per-channel constants zeros (ones
for a divisor). The new channels hold zeros and no original channel reads them, so the INT8 model computes what it did
before, only in wider tensors; drift compares the FP32 model's channels. A region that reaches anything else (a graph
input or output, a node kept in float, a Concat, Reshape, MatMul, ...) stays as it is. PP-OCR cls: 8 of its 11
depthwise Convs widened, 0.96 -> 0.77 ms a sample on 2 cores, the same outputs.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from quantlab.formats import Thresholds
from quantlab.formats.qdq import (
    DEQUANTIZED_SUFFIX,
    QUANTIZABLE_TYPES,
    ExportTarget,
    QuantizationPlan,
    unique_name,
    unthresholded,
)
from quantlab.model import activation_tensors, fold_constants, tensor_readers, tensor_types, value_types

# The weighted ops ONNX Runtime's CPU provider runs as integer kernels (ConvTranspose it does not).
INTEGER_KERNEL_OPS = ("Conv", "MatMul", "Gemm")
QUANTIZER_OPTIONS = {
    "ActivationSymmetric": False,  # the ranges decide: asymmetric from min/max, symmetric from a threshold alone
    "WeightSymmetric": True,
    "QDQKeepRemovableActivations": True,
}
# Ops whose quantized output ONNX Runtime's quantizer gives their input's scale and zero point (the same integers).
_SAME_SCALE_OPS = ("Flatten", "MaxPool", "Reshape", "Resize", "Slice", "Split", "Squeeze", "Transpose", "Unsqueeze")
# A Concat's inputs and output share one range where no member's range is narrower than the union by more than this.
CONCAT_RANGE_RATIO = 2.0
# ONNX Runtime's fast depthwise QLinearConv (MLAS's symmetric kernel) wants a channel count that is a multiple of this.
DEPTHWISE_CHANNEL_MULTIPLE = 16
# Ops that keep channels apart (an output channel reads the same channel of each input, or a constant): a channel
# added to all the tensors they read and write changes no other channel.
_CHANNELWISE_OPS = (
    "Relu", "Clip", "HardSigmoid", "Sigmoid", "HardSwish", "LeakyRelu", "Tanh", "Identity", "Add", "Sub", "Mul", "Div",
    "GlobalAveragePool", "GlobalMaxPool", "MaxPool", "AveragePool",
)
# The elementwise ops that fold into a Conv as a per-channel step -> whether the Conv's output may be either input
# (Mul, Add) or only the first (x - c, x / c).
_FOLDABLE = {"Mul": True, "Add": True, "Sub": False, "Div": False}


class OnnxRuntimeTarget(ExportTarget):
    """ONNX Runtime's integer-kernel placement, uint8 activations (module docstring)."""

    name = "onnxruntime"

    def plan(
        self, model: onnx.ModelProto, kept: set[str], thresholds: Thresholds, path: Path, keep_shapes: bool = False
    ) -> tuple[onnx.ModelProto, QuantizationPlan]:
        if not thresholds.min_max:
            warnings.warn(
                f"{path.name}: the thresholds hold no min/max (a TensorRT cache or an ONNX Runtime table), so every"
                " range is symmetric, [-amax, amax]; calibrate to a .json table for asymmetric ranges",
                stacklevel=4,
            )
        known = activation_tensors(model)  # threshold names are checked against the model as given
        model, ranged_as = _rewritten(model, kept, widen=not keep_shapes)
        thresholds = _with_borrowed_ranges(thresholds, ranged_as)
        known += list(ranged_as)
        types = tensor_types(model)
        floats = [name for name in activation_tensors(model, types) if types.get(name) in QUANTIZABLE_TYPES]
        op_types = list(quantized_op_types())
        excluded = kept | _post_processing(model, kept)

        def touched(node: onnx.NodeProto) -> set[str]:
            return set(node.input) | set(node.output)

        quantized = [node for node in model.graph.node if node.op_type in op_types and node.name not in excluded]
        needed = set().union(*map(touched, quantized)) if quantized else set()
        missing = set(unthresholded(thresholds.amax, known, [name for name in floats if name in needed], path))
        excluded |= {node.name for node in quantized if touched(node) & missing}
        ranged = [name for name in floats if name in thresholds.amax]
        ranges = {name: self.tensor_range(name, thresholds) for name in ranged}
        plan = QuantizationPlan(
            op_types=op_types,
            excluded=excluded,
            ranged=ranged,
            activation_type="QUInt8",
            options=QUANTIZER_OPTIONS,
            types=types,
            float_readers=kept,
            ranges=ranges | _concat_ranges(model, excluded, ranges),
        )
        return model, plan

    def tensor_range(self, name: str, thresholds: Thresholds) -> tuple[float, float]:
        amax = thresholds.amax[name]
        if name not in thresholds.min_max:
            return -amax, amax
        low, high = thresholds.min_max[name]
        return min(max(low, -amax), 0.0), max(min(high, amax), 0.0)

    def finish(self, qdq: onnx.ModelProto, plan: QuantizationPlan) -> None:
        _float_graph_outputs(qdq.graph)
        _scalar_steps_to_scales(qdq, plan.excluded)


TARGET = OnnxRuntimeTarget()


@functools.cache
def quantized_op_types() -> tuple[str, ...]:
    """The op types ONNX Runtime's `quantize_static` quantizes by default in QDQ format."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return tuple(sorted(set(QLinearOpsRegistry) | set(QDQRegistry)))


def _rewritten(model: onnx.ModelProto, kept: set[str], widen: bool = True) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The model with the rewrites of the module docstring (nodes in `kept` are left as they are; depthwise regions
    widened where `widen`), and the tensors it adds, each mapped to the tensor whose range it takes."""
    model = copy.deepcopy(model)
    types = tensor_types(model)
    floats = [name for node in model.graph.node for name in node.input if types.get(name) in QUANTIZABLE_TYPES]
    model = fold_constants(model, floats)
    ranged_as = _fold_into_convs(model.graph, kept)
    _divisions_to_multiplications(model.graph, kept)
    if widen:
        _widen_depthwise_channels(model.graph, kept)
    return model, ranged_as


def _with_borrowed_ranges(thresholds: Thresholds, ranged_as: dict[str, str]) -> Thresholds:
    """`thresholds` plus, for each added tensor, the threshold and min/max of the tensor it takes them from."""
    amax, min_max = dict(thresholds.amax), dict(thresholds.min_max)
    for added, source in ranged_as.items():
        if source in amax:
            amax[added] = amax[source]
        if source in min_max:
            min_max[added] = min_max[source]
    return Thresholds(amax, thresholds.metadata, min_max)


def _tensor_names(graph: onnx.GraphProto) -> set[str]:
    names = {init.name for init in graph.initializer} | {value.name for value in graph.input}
    return names | {name for node in graph.node for name in node.output}


def _channel_vector(value: np.ndarray, channels: int, rank: int) -> np.ndarray | None:
    """`value` as one number per output channel of a Conv output of that rank, where it broadcasts so (a scalar, or
    [C, 1, ...] / [1, C, 1, ...]); else None."""
    if value.ndim > rank:
        return None
    shape = (1,) * (rank - value.ndim) + value.shape
    if shape[0] != 1 or shape[1] not in (1, channels) or any(dim != 1 for dim in shape[2:]):
        return None
    vector = value.reshape(-1).astype(np.float64)
    return vector if shape[1] == channels else np.full(channels, vector[0])


def _affine_step(
    node: onnx.NodeProto, tensor: str, constants: dict[str, np.ndarray], channels: int, rank: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """(scale, shift) per channel of `node` applied to `tensor` (y = scale * x + shift), where it is a per-channel
    affine step with constant parameters; else None."""
    if node.op_type == "BatchNormalization":
        training = any(attr.name == "training_mode" and attr.i for attr in node.attribute)
        if training or node.input[0] != tensor or len([name for name in node.output if name]) != 1:
            return None
        if not all(name in constants for name in node.input[1:5]):
            return None
        gamma, beta, mean, variance = (constants[name].astype(np.float64) for name in node.input[1:5])
        epsilon = next((attr.f for attr in node.attribute if attr.name == "epsilon"), 1e-5)
        scale = gamma / np.sqrt(variance + epsilon)
        return scale, beta - mean * scale
    if node.op_type not in _FOLDABLE or len(node.input) != 2 or tensor not in node.input:
        return None
    other = node.input[1] if node.input[0] == tensor else node.input[0]
    if other == tensor or other not in constants or (node.input[1] == tensor and not _FOLDABLE[node.op_type]):
        return None
    value = _channel_vector(constants[other], channels, rank)
    if value is None or (node.op_type == "Div" and not np.all(value)):
        return None
    ones, zeros = np.ones(channels), np.zeros(channels)
    return {"Mul": (value, zeros), "Add": (ones, value), "Sub": (ones, -value), "Div": (1 / value, zeros)}[node.op_type]


def _fold_into_convs(graph: onnx.GraphProto, kept: set[str]) -> dict[str, str]:
    """Fold the per-channel affine steps that follow a Conv (module docstring) into its weight and bias. The Conv
    then writes the last step's output; the steps' nodes, and the tensors between them, are gone.

    A HardSigmoid after them (clip(alpha * x + beta, 0, 1): the gate of a squeeze-and-excitation block) folds its
    alpha and beta too and becomes a Clip to [0, 1] of the Conv's output, a new tensor that takes the HardSigmoid
    output's range: ONNX Runtime then drops the Clip, and the QLinearConv writes the gate itself, where it ran DQ ->
    HardSigmoid -> Q in float after it (the saturation of the uint8 range [0, <= 1] is the clip). Returns each new
    tensor -> the tensor whose range it takes."""
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    readers, outputs = tensor_readers(graph), {output.name for output in graph.output}
    used, dropped, ranged_as = _tensor_names(graph), set(), {}
    for conv in graph.node:
        if conv.op_type != "Conv" or conv.name in kept or conv.input[1] not in constants:
            continue
        weight = constants[conv.input[1]]
        channels, rank = weight.shape[0], weight.ndim
        has_bias = len(conv.input) > 2 and conv.input[2]
        if has_bias and conv.input[2] not in constants:
            continue
        scale, shift = np.ones(channels), np.zeros(channels)
        tensor, steps = conv.output[0], []
        while tensor not in outputs and len(readers.get(tensor, [])) == 1 and readers[tensor][0].name not in kept:
            step = _affine_step(readers[tensor][0], tensor, constants, channels, rank)
            if step is None:
                break
            scale, shift = scale * step[0], shift * step[0] + step[1]
            steps.append(readers[tensor][0])
            tensor = readers[tensor][0].output[0]
        gate = _single_hard_sigmoid_reader(tensor, readers, outputs, kept)
        if gate is not None:
            alpha, beta = _hard_sigmoid_parameters(gate)
            scale, shift = scale * alpha, shift * alpha + beta
            tensor = unique_name(f"{gate.output[0]}_unclipped", used)
            ranged_as[tensor] = gate.output[0]
            bounds = [unique_name(f"{gate.name}_{end}", used) for end in ("low", "high")]
            ends = (np.array(end, weight.dtype) for end in (0, 1))
            graph.initializer.extend(map(numpy_helper.from_array, ends, bounds))
            gate.op_type = "Clip"
            del gate.attribute[:], gate.input[:]
            gate.input.extend([tensor, *bounds])
        elif not steps:
            continue
        bias = constants[conv.input[2]].astype(np.float64) if has_bias else np.zeros(channels)
        folded_weight = (weight * scale.reshape(-1, *[1] * (rank - 1))).astype(weight.dtype)
        folded_bias = (bias * scale + shift).astype(weight.dtype)
        names = [unique_name(f"{conv.name}_{part}_folded", used) for part in ("weight", "bias")]
        graph.initializer.extend(map(numpy_helper.from_array, (folded_weight, folded_bias), names))
        del conv.input[1:]
        conv.input.extend(names)
        conv.output[0] = tensor
        dropped.update(id(node) for node in steps)
    if dropped:
        nodes = [node for node in graph.node if id(node) not in dropped]
        del graph.node[:]
        graph.node.extend(nodes)
    return ranged_as


def _single_hard_sigmoid_reader(
    tensor: str, readers: dict[str, list[onnx.NodeProto]], outputs: set[str], kept: set[str]
) -> onnx.NodeProto | None:
    """The HardSigmoid that alone reads `tensor` (not a graph output), unless kept in float; else None."""
    if tensor in outputs or len(readers.get(tensor, [])) != 1:
        return None
    node = readers[tensor][0]
    return node if node.op_type == "HardSigmoid" and node.name not in kept else None


def _hard_sigmoid_parameters(node: onnx.NodeProto) -> tuple[float, float]:
    """A HardSigmoid's (alpha, beta), ONNX's defaults (0.2, 0.5) where unset."""
    values = {attr.name: attr.f for attr in node.attribute}
    return values.get("alpha", 0.2), values.get("beta", 0.5)


@dataclass
class _ChannelRegion:
    """Activation tensors of one channel count that only channelwise ops and depthwise Convs join, by name: the dense
    Convs writing them (`sources`), reading them (`sinks`), and the nodes between (`depthwise`, `channelwise`)."""

    tensors: set[str] = field(default_factory=set)
    sources: dict[str, onnx.NodeProto] = field(default_factory=dict)
    sinks: dict[str, onnx.NodeProto] = field(default_factory=dict)
    depthwise: dict[str, onnx.NodeProto] = field(default_factory=dict)
    channelwise: dict[str, onnx.NodeProto] = field(default_factory=dict)


def _widen_depthwise_channels(graph: onnx.GraphProto, kept: set[str]) -> None:
    """Widen each depthwise Conv whose channel count is not a multiple of DEPTHWISE_CHANNEL_MULTIPLE, and the tensors
    joined to it (`_channel_region`), to the next multiple (module docstring): the dense Convs writing those tensors
    get zero filters and biases for the new channels, the depthwise Convs too, the dense Convs reading them zero
    weights for them, and per-channel constants between them zeros (ones for a divisor). The new channels hold zeros,
    and no other channel reads them. A region that reaches anything else stays as it is."""
    constants = {init.name: init for init in graph.initializer}
    producer = {name: node for node in graph.node for name in node.output}
    readers, used = tensor_readers(graph), _tensor_names(graph)
    stops = {value.name for value in graph.input} | {value.name for value in graph.output} | kept
    widened: set[str] = set()
    for conv in graph.node:
        channels = _depthwise_channels(conv, constants)
        if not channels or channels % DEPTHWISE_CHANNEL_MULTIPLE == 0 or conv.output[0] in widened:
            continue
        region = _channel_region(conv, channels, constants, producer, readers, stops)
        if region is None:
            continue
        widened |= region.tensors
        extra = -channels % DEPTHWISE_CHANNEL_MULTIPLE
        rank = len(constants[conv.input[1]].dims)

        def widen(node: onnx.NodeProto, index: int, axis: int, fill: float = 0.0) -> None:
            """Point input `index` of `node` at a copy of its constant with `extra` entries of `fill` on `axis`."""
            value = numpy_helper.to_array(constants[node.input[index]])
            shape = list(value.shape)
            shape[axis] = extra
            name = unique_name(f"{node.input[index]}_widened", used)
            widened_value = np.concatenate([value, np.full(shape, fill, value.dtype)], axis)
            constants[name] = numpy_helper.from_array(widened_value, name)
            graph.initializer.append(constants[name])
            node.input[index] = name

        for node in [*region.sources.values(), *region.depthwise.values()]:
            for index in range(1, len(node.input)):
                if node.input[index]:
                    widen(node, index, 0)
        for node in region.sinks.values():
            widen(node, 1, 1)
        for node in region.depthwise.values():
            next(attr for attr in node.attribute if attr.name == "group").i = channels + extra
        for node in region.channelwise.values():
            for index, name in enumerate(node.input):
                axis = _channel_axis(constants.get(name), channels, rank)
                if axis is not None:
                    widen(node, index, axis, 1.0 if node.op_type == "Div" and index == 1 else 0.0)
    if widened:  # their recorded shapes no longer hold
        kept_info = [value for value in graph.value_info if value.name not in widened]
        del graph.value_info[:]
        graph.value_info.extend(kept_info)


def _channel_region(
    start: onnx.NodeProto,
    channels: int,
    constants: dict[str, onnx.TensorProto],
    producer: dict[str, onnx.NodeProto],
    readers: dict[str, list[onnx.NodeProto]],
    stops: set[str],
) -> _ChannelRegion | None:
    """The region of depthwise Conv `start` (`_ChannelRegion`): from its input, every tensor that a channelwise op or
    depthwise Conv of `channels` channels joins to it, up to the dense Convs (group 1, constant weights) that write or
    read them. None where it reaches anything else, or a tensor or node in `stops`."""
    region = _ChannelRegion()
    rank = len(constants[start.input[1]].dims)
    pending = [start.input[0]]
    while pending:
        tensor = pending.pop()
        if tensor in region.tensors:
            continue
        if tensor in stops or tensor in constants or tensor not in producer:
            return None
        region.tensors.add(tensor)
        for node in [producer[tensor], *readers.get(tensor, [])]:
            writes = tensor in node.output
            if node.name in stops:
                return None
            if _depthwise_channels(node, constants) == channels:
                region.depthwise[node.name] = node
                pending += [node.input[0], node.output[0]]
            elif _dense_conv(node, constants) and (node.output[0] == tensor or node.input[0] == tensor):
                weight = constants[node.input[1]].dims
                if (writes and weight[0] != channels) or (not writes and weight[1] != channels):
                    return None
                (region.sources if writes else region.sinks)[node.name] = node
            elif node.op_type in _CHANNELWISE_OPS and len(node.output) == 1:
                if node.op_type == "Div" and node.input[1] not in constants:
                    return None  # a new channel's 0 would divide
                region.channelwise[node.name] = node
                for name in node.input:
                    if name in constants:
                        scalar = math.prod(constants[name].dims) == 1
                        if not scalar and _channel_axis(constants[name], channels, rank) is None:
                            return None
                    elif name:
                        pending.append(name)
                pending.append(node.output[0])
            else:
                return None
    return region


def _group(conv: onnx.NodeProto) -> int:
    """A Conv's `group` attribute (1 where unset)."""
    return next((attr.i for attr in conv.attribute if attr.name == "group"), 1)


def _dense_conv(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto]) -> bool:
    """Whether `node` is a Conv of one group with a constant weight (and bias, where it has one)."""
    return node.op_type == "Conv" and _group(node) == 1 and all(name in constants for name in node.input[1:] if name)


def _depthwise_channels(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto]) -> int:
    """The channel count of a depthwise Conv (as many groups as filters, one input channel each) with constant
    weights (and bias); 0 for any other node."""
    if node.op_type != "Conv" or not all(name in constants for name in node.input[1:] if name):
        return 0
    filters, inputs = constants[node.input[1]].dims[:2]
    return filters if _group(node) == filters > 1 and inputs == 1 else 0


def _channel_axis(constant: onnx.TensorProto | None, channels: int, rank: int) -> int | None:
    """The axis of `constant` that holds one value per channel when it broadcasts against a tensor of `rank` dims
    whose axis 1 has `channels` entries ([C, 1, 1], [1, C, 1, 1], ...); None for any other constant (or none)."""
    if constant is None:
        return None
    dims = list(constant.dims)
    axis = 1 - (rank - len(dims))  # axis 1 of the tensor, on the constant's dims aligned from the right
    if not 0 <= axis < len(dims) or dims[axis] != channels:
        return None
    return axis if all(size == 1 for i, size in enumerate(dims) if i != axis) else None


def _divisions_to_multiplications(graph: onnx.GraphProto, kept: set[str]) -> None:
    """Div(x, c) by a float constant without zeros -> Mul(x, 1 / c): ONNX Runtime has an integer Mul kernel."""
    constants = {init.name: init for init in graph.initializer}
    used = _tensor_names(graph)
    for node in graph.node:
        if node.op_type != "Div" or node.name in kept or node.input[1] not in constants:
            continue
        divisor = numpy_helper.to_array(constants[node.input[1]])
        if divisor.dtype.kind != "f" or not np.all(divisor):
            continue
        name = unique_name(f"{node.input[1]}_reciprocal", used)
        graph.initializer.append(numpy_helper.from_array((1 / divisor).astype(divisor.dtype), name))
        node.op_type, node.input[1] = "Mul", name


def _post_processing(model: onnx.ModelProto, kept: set[str]) -> set[str]:
    """Names of the nodes from which no integer-kernel op (Conv, MatMul, Gemm; not kept in float) can be reached."""
    feeds_kernel: set[str] = set()  # tensors from which such an op can be reached
    tail = set()
    for node in reversed(model.graph.node):  # the graph is in topological order: readers come later
        is_kernel = node.op_type in INTEGER_KERNEL_OPS and node.name not in kept
        reaches = is_kernel or any(output in feeds_kernel for output in node.output)
        if reaches:
            feeds_kernel.update(node.input)
        else:
            tail.add(node.name)
    return tail


def _float_graph_outputs(graph: onnx.GraphProto) -> None:
    """Move the Q/DQ pair of every quantized graph output off the output: its producer writes the output itself (in
    float), the pair reads it, and the output's other readers read the pair's DequantizeLinear output; a pair that
    nothing else reads is removed, with its scale and zero point where nothing else uses them."""
    producer = {name: node for node in graph.node for name in node.output}
    readers = tensor_readers(graph)
    removed = []
    for output in graph.output:
        dequantize = producer.get(output.name)
        if dequantize is None or dequantize.op_type != "DequantizeLinear":
            continue
        quantize = producer.get(dequantize.input[0])
        source = producer.get(quantize.input[0]) if quantize is not None and quantize.op_type == "QuantizeLinear" else None
        if source is None:
            continue
        source.output[list(source.output).index(quantize.input[0])] = output.name
        quantize.input[0] = output.name
        others = readers.get(output.name, [])
        if others:
            dequantize.output[0] = f"{output.name}_DequantizeLinear_Output"
            for node in others:
                node.input[:] = [dequantize.output[0] if name == output.name else name for name in node.input]
        else:
            removed += [quantize, dequantize]
    if not removed:
        return
    gone = {id(node) for node in removed}
    remaining = [node for node in graph.node if id(node) not in gone]
    del graph.node[:]
    graph.node.extend(remaining)
    parameters = {name for node in removed for name in node.input[1:]}
    read = {name for node in remaining for name in node.input}
    for init in [init for init in graph.initializer if init.name in parameters - read]:
        graph.initializer.remove(init)


def _concat_ranges(
    model: onnx.ModelProto, excluded: set[str], ranges: dict[str, tuple[float, float]]
) -> dict[str, tuple[float, float]]:
    """One range for the inputs and the output of each quantized Concat whose ranges are alike (module docstring):
    tensor -> the union of the ranges of its group. A Concat input that a same-scale op (Split, MaxPool, Resize, ...)
    writes stands for the tensor that op reads. Groups that share a tensor merge; a Concat joins its group only where
    every member's range stays at least 1 / CONCAT_RANGE_RATIO of the union's width."""
    producer = {name: node for node in model.graph.node for name in node.output}

    def source(tensor: str) -> str:
        node = producer.get(tensor)
        while node is not None and node.op_type in _SAME_SCALE_OPS and node.name not in excluded:
            tensor = node.input[0]
            node = producer.get(tensor)
        return tensor

    group: dict[str, str] = {}  # tensor -> its group's first tensor

    def members(tensor: str) -> set[str]:
        root = group.get(tensor, tensor)
        return {name for name, first in group.items() if first == root} | {tensor}

    for node in model.graph.node:
        if node.op_type != "Concat" or node.name in excluded:
            continue
        tensors = {source(name) for name in node.input} | {node.output[0]}
        if not all(name in ranges for name in tensors):
            continue
        joined = set().union(*map(members, tensors))
        low, high = min(ranges[name][0] for name in joined), max(ranges[name][1] for name in joined)
        if any(ranges[name][1] - ranges[name][0] < (high - low) / CONCAT_RANGE_RATIO for name in joined):
            continue
        first = next(iter(sorted(joined)))
        group.update(dict.fromkeys(joined, first))
    shared: dict[str, tuple[float, float]] = {}
    for first in set(group.values()):
        names = [name for name, root in group.items() if root == first]
        union = (min(ranges[name][0] for name in names), max(ranges[name][1] for name in names))
        shared.update(dict.fromkeys(names, union))
    return shared


def _scalar_steps_to_scales(qdq: onnx.ModelProto, excluded: set[str]) -> None:
    """Mul (or Div) of a quantized tensor X by a positive scalar constant c (of no higher rank than X), whose output Y
    is quantized: Y's readers read X's integers through one DequantizeLinear of scale scale_X * c and X's zero point
    (`Y_DequantizeLinear_Output`), and the Mul and Y's Q/DQ pair are gone. Y on its INT8 grid is exact (the step
    leaves the integers as they are), and ONNX Runtime runs no kernel for it (HardSwish's / 6, PaddlePaddle's
    learnable scales)."""
    ranks = {name: len(value.shape.dim) for name, value in value_types(qdq).items() if value.HasField("shape")}
    while _fold_one_scalar_step(qdq.graph, excluded, ranks):
        pass


def _fold_one_scalar_step(graph: onnx.GraphProto, excluded: set[str], ranks: dict[str, int]) -> bool:
    """Fold the first step `_scalar_steps_to_scales` describes (`ranks`: tensor -> rank, where known); whether there
    was one."""
    values = {init.name: init for init in graph.initializer}
    producer = {name: node for node in graph.node for name in node.output}
    readers = tensor_readers(graph)
    outputs = {output.name for output in graph.output}
    for node in graph.node:
        if node.op_type not in ("Mul", "Div") or node.name in excluded or node.output[0] in outputs:
            continue
        quantizes = readers.get(node.output[0], [])
        dequantizes = [reader for quantize in quantizes for reader in readers.get(quantize.output[0], [])]
        if not quantizes or any(each.op_type != "QuantizeLinear" or len(each.input) < 3 for each in quantizes):
            continue
        if any(each.op_type != "DequantizeLinear" for each in dequantizes):
            continue
        for position in (0, 1) if node.op_type == "Mul" else (0,):
            dequantize = producer.get(node.input[position])
            constant = _constant(node.input[1 - position], values, producer)
            if dequantize is None or dequantize.op_type != "DequantizeLinear" or constant is None or constant.size != 1:
                continue
            if constant.ndim > max(ranks.get(node.input[position], 1), 1) or not constant.all():
                continue  # a constant of higher rank broadcasts X to it
            parameters = dequantize.input[1:]
            if len(parameters) < 2 or dequantize.input[0] in values or not all(name in values for name in parameters):
                continue  # a constant's DequantizeLinear, or parameters computed at run time
            factor = float(constant.reshape(-1)[0]) ** (-1 if node.op_type == "Div" else 1)
            if not 0 < factor < np.inf or numpy_helper.to_array(values[dequantize.input[1]]).size != 1:
                continue
            _fold_scalar_step(graph, node, dequantize, factor, quantizes + dequantizes)
            return True
    return False


def _constant(name: str, values: dict[str, onnx.TensorProto], producer: dict[str, onnx.NodeProto]) -> np.ndarray | None:
    """The value of `name` (float64) where it is a constant: an initializer, or the DequantizeLinear of one."""
    node = producer.get(name)
    if name in values:
        return numpy_helper.to_array(values[name]).astype(np.float64)
    if node is not None and node.op_type == "DequantizeLinear" and all(part in values for part in node.input):
        parts = [numpy_helper.to_array(values[part]).astype(np.float64) for part in node.input]
        return (parts[0] - (parts[2] if len(parts) > 2 else 0)) * parts[1]
    return None


def _fold_scalar_step(
    graph: onnx.GraphProto, node: onnx.NodeProto, dequantize: onnx.NodeProto, factor: float, pair: list[onnx.NodeProto]
) -> None:
    """Replace `node` (Y = X * factor, X read through `dequantize`) and Y's Q/DQ nodes (`pair`) with one
    DequantizeLinear of X's integers. It takes Y's scale and zero point initializers, set to X's scale * factor and
    X's zero point, so that Y's same-scale successors (a MaxPool, a Reshape: their Q/DQ share them) keep carrying the
    same integers. DequantizeLinear nodes nothing reads any more go, with the initializers only they read."""
    values = {init.name: init for init in graph.initializer}
    scale, zero_point = pair[0].input[1], pair[0].input[2]
    source = numpy_helper.to_array(values[dequantize.input[1]])
    values[scale].CopyFrom(numpy_helper.from_array((source * factor).astype(source.dtype), scale))
    values[zero_point].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(values[dequantize.input[2]]), zero_point))
    output = f"{node.output[0]}{DEQUANTIZED_SUFFIX}"
    name = f"{node.output[0]}_DequantizeLinear"
    rescaled = onnx.helper.make_node("DequantizeLinear", [dequantize.input[0], scale, zero_point], [output], name=name)
    renamed = {each.output[0]: output for each in pair if each.op_type == "DequantizeLinear"}
    gone = {id(each) for each in pair}
    nodes = []
    for other in graph.node:
        if other is node:
            nodes.append(rescaled)
        elif id(other) not in gone:
            other.input[:] = [renamed.get(name, name) for name in other.input]
            nodes.append(other)
    _drop_unread_dequantizes(graph, nodes, removed=[node, *pair])


def _drop_unread_dequantizes(
    graph: onnx.GraphProto, nodes: list[onnx.NodeProto], removed: list[onnx.NodeProto]
) -> None:
    """Set the graph's nodes to `nodes` less the DequantizeLinear nodes whose output nothing reads, and remove the
    initializers that the `removed` nodes and those read and nothing else does."""
    outputs = {output.name for output in graph.output}
    while True:
        read = {name for other in nodes for name in other.input} | outputs
        unread = [other for other in nodes if other.op_type == "DequantizeLinear" and other.output[0] not in read]
        if not unread:
            break
        removed += unread
        nodes = [other for other in nodes if all(other is not each for each in unread)]
    del graph.node[:]
    graph.node.extend(nodes)
    candidates = {name for each in removed for name in each.input}
    for init in [init for init in graph.initializer if init.name in candidates and init.name not in read]:
        graph.initializer.remove(init)
