"""Export target `tensorrt`: TensorRT's explicit-quantization placement, symmetric int8 (zero point 0).

Activations are quantized per tensor with the range [-amax, amax] (scale = amax / 127), weights per output channel,
stored as INT8 initializers behind a DequantizeLinear. Biases stay float, as in the Q/DQ models NVIDIA's ModelOpt
exports: TensorRT folds them into the layer in high precision.

Placement follows TensorRT's "Q/DQ Layer-Placement Recommendations" (TensorRT Developer Guide, Explicit Quantization,
https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/quantized-types-explicit-quantization.html):

- "Quantize all inputs of weighted-operations (Convolution, Transposed Convolution and GEMM)": the activation inputs
  of every Conv, ConvTranspose, Gemm and MatMul, and their weights.
- "By default, do not quantize the outputs of weighted-operations."
- "Do not simulate batch-normalization and ReLU fusions": Relu stays in the graph as it is.
- "Quantize the residual input in skip-connections": an Add with a weighted op on one input gets Q/DQ on its other
  input, so TensorRT can fuse the Add into that op with an INT8 output; the weighted op's own output stays float.
- "Use per-tensor quantization for activations; and per-channel quantization for weights."

One addition lets ONNX Runtime's CPU provider run some layers with INT8 kernels (QLinearConv, QGemm): where a weighted
op's output reaches a quantized tensor only through single-consumer ops that commute with symmetric quantization
(Relu, MaxPool and reshapes: `Q(op(x)) == op(Q(x))` for zero point 0), its output gets a Q/DQ pair that shares that
tensor's scale. The results are unchanged bit for bit (quantizing twice with one scale is quantizing once); it is the
backward Q propagation TensorRT's optimizer applies itself ("Q/DQ propagation", same guide), made explicit because
ONNX Runtime only fuses a Conv whose output is quantized. (ONNX Runtime 1.21 or later is needed for these fusions: it
quantizes the float biases itself when the model loads.) A model whose weighted ops are followed by anything else
(SiLU, a written-out activation) runs them in float in ONNX Runtime: the `onnxruntime` target is for that engine.

A node kept in float (`keep_fp32`) gets no Q/DQ on its inputs or weights and reads the float value of a tensor that
other consumers read through Q/DQ. A tensor to quantize without a threshold stays in float, with a warning naming it:
calibrate leaves out the tensors INT8 cannot represent (Inf values, a mask sentinel), as TensorRT keeps a tensor its
cache lacks in float; the weighted ops reading it stay in float too (ONNX Runtime's quantizer needs the ranges of all
their inputs).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import onnx

from quantlab.formats import Thresholds
from quantlab.formats.qdq import (
    WEIGHTED_OPS,
    ExportTarget,
    QuantizationPlan,
    unthresholded,
)
from quantlab.model import activation_tensors, tensor_readers, tensor_types

# Ops through which a Q/DQ moves without changing any value when the zero point is 0.
COMMUTING_OPS = ("Relu", "MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze")
QUANTIZER_OPTIONS = {
    "ActivationSymmetric": True,
    "WeightSymmetric": True,
    "QuantizeBias": False,
    "QDQDisableWeightAdjustForInt32Bias": True,  # keep weight scales at amax / 127 exactly
    "OpTypesToExcludeOutputQuantization": list(WEIGHTED_OPS),
}


class Placement(NamedTuple):
    """Where the Q/DQ pairs go, decided before ONNX Runtime's quantizer runs."""

    ranged: list[str]  # activation tensors quantized with their own threshold, in graph order
    residual: list[str]  # those that only a residual Add asks for (the quantizer does not mark them itself)
    shared: list[tuple[str, str, str]]  # (weighted-op output, quantized tensor whose scale it takes, its consumer)


class TensorRTTarget(ExportTarget):
    """TensorRT's placement (module docstring), symmetric int8."""

    name = "tensorrt"

    def plan(
        self, model: onnx.ModelProto, kept: set[str], thresholds: Thresholds, path: Path, keep_shapes: bool = False
    ) -> tuple[onnx.ModelProto, QuantizationPlan]:
        types = tensor_types(model)
        activations = activation_tensors(model, types)
        placement, excluded = _thresholded_placement(model, activations, kept, thresholds.amax, path)
        plan = QuantizationPlan(
            op_types=list(WEIGHTED_OPS),
            excluded=excluded,
            ranged=placement.ranged,
            activation_type="QInt8",
            options=QUANTIZER_OPTIONS,
            types=types,
            float_readers=excluded,
            residual=placement.residual,
            shared=placement.shared,
        )
        return model, plan

    def tensor_range(self, name: str, thresholds: Thresholds) -> tuple[float, float]:
        return -thresholds.amax[name], thresholds.amax[name]


TARGET = TensorRTTarget()


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

    consumers = tensor_readers(graph)
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
    """The placement and the nodes kept in float, for these thresholds: a tensor to quantize without a threshold
    stays in float, and so do the weighted ops reading it (module docstring)."""
    placement = _placement(model, activations, excluded)
    missing = unthresholded(amax, activations, placement.ranged, path)
    if not missing:
        return placement, excluded
    weighted = [node for node in model.graph.node if node.op_type in WEIGHTED_OPS and node.name not in excluded]
    readers = [node for node in weighted if set(node.input[:2]) & set(missing)]
    excluded = excluded | {node.name for node in readers}
    placement = _placement(model, activations, excluded)
    ranged = [name for name in placement.ranged if name in amax]
    residual = [name for name in placement.residual if name in amax]
    return Placement(ranged, residual, [shared for shared in placement.shared if shared[1] in amax]), excluded
