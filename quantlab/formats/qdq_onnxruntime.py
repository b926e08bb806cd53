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
  read the dequantized tensor where their producer's output is quantized, so that the producer keeps its kernel.

Rewrites first (`_rewritten`; every tensor the rewritten model computes keeps its name, so the thresholds match):
constants held in Constant nodes become initializers (the quantizer quantizes only those, and ONNX Runtime fuses a
QLinearAdd or QLinearMul only with a quantized constant); a Conv followed by a per-channel scale and shift
(BatchNormalization, or Mul/Add/Sub/Div by constants: PaddlePaddle's learnable affine blocks) takes them into its
weights and bias, as ONNX Runtime folds a BatchNormalization into an FP32 Conv (a quantized Conv output between them
would stop that); a Div by a constant becomes a Mul by its reciprocal (ONNX Runtime has an integer Mul, no integer
Div). Unnamed nodes get names, so that they can be left in float.
"""

from __future__ import annotations

import copy
import functools
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from quantlab.formats import Thresholds
from quantlab.formats.qdq import QUANTIZABLE_TYPES, ExportTarget, QuantizationPlan, unthresholded
from quantlab.model import activation_tensors, fold_constants, tensor_types

# The weighted ops ONNX Runtime's CPU provider runs as integer kernels (ConvTranspose it does not).
INTEGER_KERNEL_OPS = ("Conv", "MatMul", "Gemm")
QUANTIZER_OPTIONS = {
    "ActivationSymmetric": False,  # the ranges decide: asymmetric from min/max, symmetric from a threshold alone
    "WeightSymmetric": True,
    "QDQKeepRemovableActivations": True,
}
# The elementwise ops that fold into a Conv as a per-channel step -> whether the Conv's output may be either input
# (Mul, Add) or only the first (x - c, x / c).
_FOLDABLE = {"Mul": True, "Add": True, "Sub": False, "Div": False}


class OnnxRuntimeTarget(ExportTarget):
    """ONNX Runtime's integer-kernel placement, uint8 activations (module docstring)."""

    name = "onnxruntime"

    def plan(
        self, model: onnx.ModelProto, kept: set[str], thresholds: Thresholds, path: Path
    ) -> tuple[onnx.ModelProto, QuantizationPlan]:
        if not thresholds.min_max:
            warnings.warn(
                f"{path.name}: the thresholds hold no min/max (a TensorRT cache or an ONNX Runtime table), so every"
                " range is symmetric, [-amax, amax]; calibrate to a .json table for asymmetric ranges",
                stacklevel=4,
            )
        known = activation_tensors(model)  # threshold names are checked against the model as given
        model = _rewritten(model, kept)
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
        plan = QuantizationPlan(
            op_types=op_types,
            excluded=excluded,
            ranged=[name for name in floats if name in thresholds.amax],
            activation_type="QUInt8",
            options=QUANTIZER_OPTIONS,
            types=types,
            float_readers=kept,
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


TARGET = OnnxRuntimeTarget()


@functools.cache
def quantized_op_types() -> tuple[str, ...]:
    """The op types ONNX Runtime's `quantize_static` quantizes by default in QDQ format."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return tuple(sorted(set(QLinearOpsRegistry) | set(QDQRegistry)))


def _rewritten(model: onnx.ModelProto, kept: set[str]) -> onnx.ModelProto:
    """The model with the rewrites of the module docstring; nodes in `kept` are left as they are."""
    model = copy.deepcopy(model)
    _name_nodes(model.graph)
    types = tensor_types(model)
    floats = [name for node in model.graph.node for name in node.input if types.get(name) in QUANTIZABLE_TYPES]
    model = fold_constants(model, floats)
    _fold_into_convs(model.graph, kept)
    _divisions_to_multiplications(model.graph, kept)
    return model


def _name_nodes(graph: onnx.GraphProto) -> None:
    """Give every unnamed node a name of its own, `<op type>_<index>`."""
    used = {node.name for node in graph.node}
    for index, node in enumerate(graph.node):
        if not node.name:
            node.name = _unique(f"{node.op_type}_{index}", used)


def _unique(base: str, used: set[str]) -> str:
    """`base`, or `base_2`, `base_3`, ... where taken; the name is added to `used`."""
    name, count = base, 1
    while name in used:
        count += 1
        name = f"{base}_{count}"
    used.add(name)
    return name


def _tensor_names(graph: onnx.GraphProto) -> set[str]:
    names = {init.name for init in graph.initializer} | {value.name for value in graph.input}
    return names | {name for node in graph.node for name in node.output}


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in dict.fromkeys(node.input):
            readers.setdefault(name, []).append(node)
    return readers


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


def _fold_into_convs(graph: onnx.GraphProto, kept: set[str]) -> None:
    """Fold the per-channel affine steps that follow a Conv (module docstring) into its weight and bias. The Conv
    then writes the last step's output; the steps' nodes, and the tensors between them, are gone."""
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    readers, outputs = _consumers(graph), {output.name for output in graph.output}
    used, dropped = _tensor_names(graph), set()
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
        if not steps:
            continue
        bias = constants[conv.input[2]].astype(np.float64) if has_bias else np.zeros(channels)
        folded_weight = (weight * scale.reshape(-1, *[1] * (rank - 1))).astype(weight.dtype)
        folded_bias = (bias * scale + shift).astype(weight.dtype)
        names = [_unique(f"{conv.name}_{part}_folded", used) for part in ("weight", "bias")]
        graph.initializer.extend(map(numpy_helper.from_array, (folded_weight, folded_bias), names))
        del conv.input[1:]
        conv.input.extend(names)
        conv.output[0] = tensor
        dropped.update(id(node) for node in steps)
    if dropped:
        nodes = [node for node in graph.node if id(node) not in dropped]
        del graph.node[:]
        graph.node.extend(nodes)


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
        name = _unique(f"{node.input[1]}_reciprocal", used)
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
    readers = _consumers(graph)
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
