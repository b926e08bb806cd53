"""Load and validate an ONNX model, find its activation tensors, and expose them as outputs for ONNX Runtime."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from quantlab.digest import file_sha256  # noqa: F401  (here too for the model's callers)
from quantlab.errors import QuantlabError, QuantlabRuntimeError, first_line

FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)
# Serialized protobufs are capped at 2 GiB; larger models go to ONNX Runtime through a file with external data.
_PROTOBUF_LIMIT = 2**31 - 2**24
# ONNX Runtime logs fatal errors only: a failed load or run raises, and quantlab reports that as its one line, so
# ORT's own error log (printed to stderr before it raises) would be a second, duplicate one.
ORT_LOG_SEVERITY = 4


@dataclass(frozen=True)
class InputSpec:
    """A graph input: name, shape (int for a fixed dim, str or None for a dynamic one), NumPy dtype, and whether its
    first dim is a batch dim that samples are stacked along (see `input_specs`)."""

    name: str
    shape: tuple[int | str | None, ...]
    dtype: np.dtype
    has_batch_dim: bool = True

    @property
    def sample_shape(self) -> tuple[int | str | None, ...]:
        """The shape of one sample: without the batch dim where the input has one, else the whole input."""
        return self.shape[1:] if self.has_batch_dim else self.shape

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name} [{dims}] {self.dtype}"


def load_model(path: str | Path) -> onnx.ModelProto:
    """Read and check an ONNX model (external data included); any problem becomes a one-line QuantlabError."""
    path = Path(path)
    if not path.is_file():
        raise QuantlabError(f"{path}: model file not found")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends: all mean "not an ONNX model"
        raise QuantlabError(f"{path}: not a valid ONNX model ({type(exc).__name__})") from None
    _load_external_data(model, path)
    if not model.graph.node:
        raise QuantlabError(f"{path}: not a valid ONNX model (the graph has no nodes)")
    _unfix_nonpositive_dims(model)
    try:
        if model.ByteSize() < _PROTOBUF_LIMIT:
            onnx.checker.check_model(model)
        else:
            onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise QuantlabError(f"{path}: invalid ONNX model ({first_line(exc)})") from None
    return model


def _unfix_nonpositive_dims(model: onnx.ModelProto) -> None:
    """Make the dims a graph declares as -1 or 0 (PaddlePaddle's way of saying "dynamic") dynamic: ONNX Runtime would
    refuse every input whose dim is not 0, and shape inference would carry the bogus sizes on."""
    graph = model.graph
    for value in [*graph.input, *graph.output, *graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value <= 0:
                dim.Clear()


def _load_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Read the weights a model keeps in files beside it; a missing one is named (onnx's own errors vary by version)."""
    from onnx.external_data_helper import ExternalDataInfo, load_external_data_for_model, uses_external_data

    try:
        load_external_data_for_model(model, str(path.parent))
    except Exception as exc:
        locations = [ExternalDataInfo(t).location for t in model.graph.initializer if uses_external_data(t)]
        missing = [name for name in dict.fromkeys(locations) if not (path.parent / name).is_file()]
        if missing:
            raise QuantlabError(f"{path}: external data file missing ({', '.join(missing)})") from None
        raise QuantlabError(f"{path}: cannot read its external data ({first_line(exc)})") from None


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a caller must feed (graph inputs that are not initializers), in graph order.

    A dim stored as a value <= 0 (PaddlePaddle writes -1) is dynamic, like a named or missing one. Each input has its
    own batch dim, or none: the first dim is a batch dim where it is dynamic, or where every input's first dim is the
    same fixed size (a model exported for batches of 1 or 8). Otherwise (a recurrent state [2, 1, 128] beside an audio
    window [1, 576], a scalar) the input is fed whole, and its samples run one at a time.
    """
    initializers = {init.name for init in model.graph.initializer}
    shapes = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dims = tuple(_dim(d) for d in tensor_type.shape.dim)
        shapes.append((value.name, dims, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))))
    first_dims = {dims[0] if dims else () for _, dims, _ in shapes}
    common_fixed = len(first_dims) == 1 and isinstance(next(iter(first_dims)), int)
    return [
        InputSpec(name, dims, dtype, has_batch_dim=bool(dims) and (common_fixed or not isinstance(dims[0], int)))
        for name, dims, dtype in shapes
    ]


def _dim(dim: onnx.TensorShapeProto.Dimension) -> int | str | None:
    """A fixed size (> 0), the name of a dynamic dim, or None for an unnamed dynamic one."""
    if dim.HasField("dim_value"):
        return dim.dim_value if dim.dim_value > 0 else None
    return dim.dim_param or None


def value_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto.Tensor]:
    """Tensor name -> type (element type and shape), as the graph declares it or ONNX shape inference finds it. The
    inference costs a copy of the model: callers that need the types twice pass them on."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # custom ops, broken value_info, over protobuf's 2 GB: fall back to what the graph declares
        inferred = model
    graph = inferred.graph
    return {v.name: v.type.tensor_type for v in [*graph.input, *graph.value_info, *graph.output]}


def tensor_types(model: onnx.ModelProto, values: dict[str, onnx.TypeProto.Tensor] | None = None) -> dict[str, int]:
    """Tensor name -> ONNX element type: activations' from `values` (value_types), weights' from the initializers."""
    types = {name: value.elem_type for name, value in (value_types(model) if values is None else values).items()}
    types.update({init.name: init.data_type for init in model.graph.initializer})
    return types


def bytes_per_sample(values: dict[str, onnx.TypeProto.Tensor], names: list[str], batch: str) -> int | None:
    """Bytes of the tensors `names` per sample (as collection holds them: float32, float64 for doubles), where each
    one's inferred shape is the batch dim `batch` followed by fixed dims; None where any is not (a run must tell)."""
    total = 0
    for name in names:
        value = values.get(name)
        dims = list(value.shape.dim) if value is not None and value.HasField("shape") else []
        if not dims or dims[0].HasField("dim_value") or dims[0].dim_param != batch:
            return None
        if not all(dim.HasField("dim_value") and dim.dim_value > 0 for dim in dims[1:]):
            return None
        total += int(np.prod([dim.dim_value for dim in dims[1:]])) * (8 if value.elem_type == TensorProto.DOUBLE else 4)
    return total


def activation_tensors(model: onnx.ModelProto, types: dict[str, int] | None = None) -> list[str]:
    """Names of the float tensors that depend on the model's inputs, in graph order: fed inputs, then node outputs.

    Weights are left out even where a graph computes them (Constant nodes, Cast/Reshape/DequantizeLinear of
    initializers), as are integer side tensors (shapes, indices) and tensors of unknown type. `types`: tensor_types.
    """
    types = tensor_types(model) if types is None else types
    dynamic = {spec.name for spec in input_specs(model)}
    names = [name for name in dynamic if types.get(name) in FLOAT_TYPES]
    names.sort(key=[spec.name for spec in input_specs(model)].index)
    for node in model.graph.node:
        if not has_subgraph(node) and not any(name in dynamic for name in node.input if name):
            continue
        for name in node.output:
            if name:
                dynamic.add(name)
                if types.get(name) in FLOAT_TYPES:
                    names.append(name)
    return names


# Ops whose output is drawn at random, not computed from their inputs: never folded into a constant.
_RANDOM_OPS = frozenset(
    {"Bernoulli", "Multinomial", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike"}
)


def fold_constants(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """The model with those of the tensors `names` that it computes from constants alone stored as initializers.

    A tensor is constant when it is an initializer or the output of a node of the default domain, without subgraphs
    and not random, whose inputs are all constant: a Constant node, and Cast, Reshape, Transpose, ... chains of
    constants (how PaddlePaddle and tf2onnx exports hold their weights). Each such tensor of `names` is evaluated once
    with ONNX Runtime and keeps its name; the nodes that computed it are dropped where nothing else reads them. Tensors
    that depend on a graph input are never touched, so every activation keeps its name and its producer.
    """
    nodes = list(model.graph.node)
    constant, producer = {init.name for init in model.graph.initializer}, {}  # producer: tensor -> node index
    for index, node in enumerate(nodes):
        if _computes_constant(node, constant):
            outputs = [name for name in node.output if name]
            constant.update(outputs)
            producer.update(dict.fromkeys(outputs, index))
    targets = {producer[name] for name in names if name in producer}
    folded = [name for index in sorted(targets) for name in nodes[index].output if name]
    if not folded:
        return model
    values = _evaluate(model, folded, producer)
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    graph.initializer.extend(onnx.numpy_helper.from_array(value, name) for name, value in zip(folded, values))
    kept = [index for index in range(len(nodes)) if index not in targets]
    while True:  # drop the constant nodes that nothing reads any more, from the folded tensors' producers back
        read = _names_read([nodes[index] for index in kept]) | {output.name for output in graph.output}
        unread = set(producer) - read
        dropped = {index for index in kept if {name for name in nodes[index].output if name} <= unread}
        if not dropped:
            break
        kept = [index for index in kept if index not in dropped]
    del graph.node[:]
    graph.node.extend(nodes[index] for index in kept)
    return result


def _computes_constant(node: onnx.NodeProto, constant: set[str]) -> bool:
    """Whether the node's outputs are constants: a deterministic default-domain op with only constant inputs."""
    return (
        node.domain in ("", "ai.onnx")
        and node.op_type not in _RANDOM_OPS
        and not has_subgraph(node)
        and all(name in constant for name in node.input if name)
    )


def has_subgraph(node: onnx.NodeProto) -> bool:
    """Whether the node runs a subgraph (If, Loop, Scan), which may read any tensor of the graph around it."""
    return any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for attr in node.attribute)


def _evaluate(model: onnx.ModelProto, names: list[str], producer: dict[str, int]) -> list[np.ndarray]:
    """The values of the constant tensors `names` (`producer`: tensor -> index of its node): the nodes computing them,
    alone, run in ONNX Runtime."""
    needed, pending = set(), list(names)
    while pending:
        index = producer.get(pending.pop())
        if index is not None and index not in needed:
            needed.add(index)
            pending.extend(name for name in model.graph.node[index].input if name)
    nodes = [model.graph.node[index] for index in sorted(needed)]
    read = {name for node in nodes for name in node.input}
    graph = onnx.helper.make_graph(
        nodes,
        "constants",
        [],
        [onnx.ValueInfoProto(name=name) for name in names],
        initializer=[init for init in model.graph.initializer if init.name in read],
    )
    opsets = list(model.opset_import)
    ir_version = max(model.ir_version, onnx.helper.find_min_ir_version_for(opsets, ignore_unknown=True))
    constants = onnx.helper.make_model(graph, opset_imports=opsets, ir_version=ir_version)
    return run_session(create_session(constants), names, {})


def _names_read(nodes: list[onnx.NodeProto]) -> set[str]:
    """Every tensor name the nodes read, those read inside their subgraphs (If, Loop, Scan bodies) included."""
    read = set()
    for node in nodes:
        read.update(node.input)
        for attr in node.attribute:
            for subgraph in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                read |= _names_read(list(subgraph.node)) | {output.name for output in subgraph.output}
    return read


# Ops whose output holds exactly its first input's values, only rearranged: the same values, so the same histogram.
_REARRANGING_OPS = frozenset({"Flatten", "Identity", "Reshape", "Squeeze", "Transpose", "Unsqueeze"})


def value_sources(model: onnx.ModelProto, names: list[str]) -> dict[str, str]:
    """Activation tensor -> the tensor whose values it holds rearranged (through Reshape, Transpose, ...), or itself.

    `names` are the model's activation tensors. A tensor and its source have the same histogram, so collection
    measures each source once: detection and transformer graphs hold many such reshapes of large tensors.
    """
    source = {name: name for name in names}
    for node in model.graph.node:
        rearranges = node.op_type in _REARRANGING_OPS and node.domain in ("", "ai.onnx")
        if rearranges and node.input and node.input[0] in source and node.output[0] in source:
            source[node.output[0]] = source[node.input[0]]
    return source


def relu_inputs(model: onnx.ModelProto) -> dict[str, str]:
    """Relu output -> its input: a Relu's values are its input's values with the negative ones made zero."""
    return {
        node.output[0]: node.input[0]
        for node in model.graph.node
        if node.op_type == "Relu" and node.domain in ("", "ai.onnx") and node.input and node.output
    }


def producers(model: onnx.ModelProto) -> dict[str, str]:
    """Tensor name -> op type of the node that produces it ("Input" for graph inputs)."""
    ops = {spec.name: "Input" for spec in input_specs(model)}
    for node in model.graph.node:
        ops.update({name: node.op_type for name in node.output if name})
    return ops


def tensor_readers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it, in graph order, each node once."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in dict.fromkeys(node.input):
            readers.setdefault(name, []).append(node)
    return readers


def with_outputs(model: onnx.ModelProto, names: list[str], types: dict[str, int] | None = None) -> onnx.ModelProto:
    """A copy of the model whose graph outputs also include `names` (graph inputs are skipped: they are fed)."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    types = tensor_types(model) if types is None else types
    fed = {spec.name for spec in input_specs(model)}
    present = {output.name for output in exposed.graph.output}
    for name in names:
        if name not in present and name not in fed:
            exposed.graph.output.append(onnx.helper.make_tensor_value_info(name, types.get(name, TensorProto.FLOAT), None))
    return exposed


def run_session(session, outputs: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """`session.run`, with any ONNX Runtime failure as a one-line QuantlabRuntimeError (exit 1)."""
    try:
        return session.run(outputs, feed)
    except Exception as exc:
        raise QuantlabRuntimeError(f"inference failed: {first_line(exc)}") from None


def create_session(model: onnx.ModelProto, threads: int = 0):
    """An ONNX Runtime CPU session for an in-memory model (through a temp file when it is over protobuf's limit)."""
    import tempfile

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = ORT_LOG_SEVERITY
    providers = ["CPUExecutionProvider"]
    try:
        serialized = model.SerializeToString()
    except Exception:  # over protobuf's 2 GB limit
        serialized = b""
    try:
        if 0 < len(serialized) < _PROTOBUF_LIMIT:
            return ort.InferenceSession(serialized, options, providers=providers)
        del serialized
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            onnx.save(model, str(path), save_as_external_data=True, location="weights.bin")
            return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:
        message = first_line(exc)
        raise QuantlabError(f"ONNX Runtime cannot load the model: {message}") from None
