"""Per-layer accuracy drift between an FP32 model and its INT8 (Q/DQ) version, run side by side on the same inputs.

The INT8 side is the Q/DQ model as ONNX Runtime really runs it: the model is first optimized by ORT (which fuses
DequantizeLinear -> Conv -> QuantizeLinear into QLinearConv and friends), then the tensors that survive the fusion
are exposed, so observing them does not undo the INT8 kernels. An FP32 tensor X is compared with
`X_DequantizeLinear_Output` (X as the INT8 engine carries it) where that exists, else with X itself where the INT8
graph still computes it in float; tensors fused away entirely (e.g. a MaxPool on int8 data) are not observable.

Metrics accumulate as running sums over the data set, so memory does not grow with it:
SQNR = 10 log10(sum x^2 / sum (x - y)^2), cosine = sum xy / sqrt(sum x^2 sum y^2),
relative error = sqrt(sum (x - y)^2 / sum x^2), max abs error = max |x - y|.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from quantlab.atomic import atomic_write
from quantlab.data import Batch, CalibrationData, DataSource, feed_samples, open_data
from quantlab.engine import engine_summary, optimized_graph, single_samples
from quantlab.errors import QuantlabError, QuantlabRuntimeError, reading
from quantlab.formats import Thresholds
from quantlab.formats.qdq import DEFAULT_TARGET, DEQUANTIZED_SUFFIX
from quantlab.model import (
    FLOAT_TYPES,
    ORT_LOG_SEVERITY,
    activation_tensors,
    create_session,
    input_specs,
    load_model,
    producers,
    run_session,
    tensor_readers,
    tensor_types,
    with_outputs,
)


@dataclass
class TensorDrift:
    """Drift of one tensor over the whole data set."""

    name: str
    op_type: str
    sqnr_db: float
    cosine: float
    rel_err: float
    max_abs_err: float
    values: int


@dataclass
class OutputMatch:
    """A graph output that is not float (token ids, a mask, class indices), compared value for value; or, where it
    cannot be compared (not a tensor, or the INT8 side does not produce it), the reason it is skipped."""

    name: str
    dtype: str
    values: int = 0
    mismatches: int = 0
    skipped: str = ""

    def describe(self) -> str:
        if self.skipped:
            return f"output {self.name}: not compared ({self.skipped})"
        if self.mismatches:
            return f"output {self.name} ({self.dtype}): {self.mismatches:,} of {self.values:,} values differ"
        return f"output {self.name} ({self.dtype}): exact ({self.values:,} values)"


class _Matches:
    """Running count of the values in which two non-float tensors differ."""

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = str(dtype)
        self.values = self.mismatches = 0

    def add(self, reference: np.ndarray, observed: np.ndarray) -> None:
        if reference.shape != observed.shape:
            raise QuantlabRuntimeError(f"shape mismatch between FP32 {reference.shape} and INT8 {observed.shape} tensors")
        self.mismatches += int(np.count_nonzero(reference != observed))
        self.values += reference.size

    def result(self, name: str) -> OutputMatch:
        return OutputMatch(name, self.dtype, self.values, self.mismatches)


class PairSums:
    """Running sums of one tensor pair (reference x, quantized y), in float64."""

    def __init__(self) -> None:
        self.xx = self.yy = self.xy = self.ee = 0.0
        self.max_abs = 0.0
        self.values = 0

    def add(self, reference: np.ndarray, observed: np.ndarray) -> None:
        if reference.shape != observed.shape:
            raise QuantlabRuntimeError(f"shape mismatch between FP32 {reference.shape} and INT8 {observed.shape} tensors")
        pair = np.empty((2, reference.size))
        pair[0], pair[1] = reference.ravel(), observed.ravel()
        gram = pair @ pair.T  # xx, xy, yy in one BLAS pass over float64 copies
        xx, xy, yy = float(gram[0, 0]), float(gram[0, 1]), float(gram[1, 1])
        ee = xx + yy - 2 * xy
        if ee <= 1e-6 * (xx + yy):  # nearly equal tensors: the difference form cancels, compute it directly
            error = pair[0] - pair[1]
            ee = float(error @ error)
        self.xx += xx
        self.yy += yy
        self.xy += xy
        self.ee += ee
        self.max_abs = max(self.max_abs, float(np.max(np.abs(reference - observed), initial=0.0)))
        self.values += reference.size

    def result(self, name: str, op_type: str) -> TensorDrift:
        sqnr = math.inf if self.ee == 0 else (10 * math.log10(self.xx / self.ee) if self.xx > 0 else -math.inf)
        if self.xx == 0 or self.yy == 0:
            cosine = 1.0 if self.xx == self.yy else 0.0
        else:
            cosine = self.xy / math.sqrt(self.xx * self.yy)
        rel = 0.0 if self.ee == 0 else (math.sqrt(self.ee / self.xx) if self.xx > 0 else math.inf)
        return TensorDrift(name, op_type, sqnr, cosine, rel, self.max_abs, self.values)


@dataclass
class DriftReport:
    """Drift of every observable activation tensor (graph order) and of the final outputs, plus top-1 if labelled."""

    layers: list[TensorDrift]
    final: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    mixed_precision: dict[str, Any] | None = None  # what --target-sqnr / --keep-fp32 chose (MixedPrecision.summary)

    def worst_first(self) -> list[TensorDrift]:
        return sorted(self.layers, key=lambda layer: layer.sqnr_db)

    def _repr_html_(self) -> str:
        from quantlab.notebook import drift_html

        return drift_html(self)

    def to_pandas(self):
        """One row per tensor, worst first, final outputs flagged (needs pandas)."""
        from quantlab.notebook import drift_frame

        return drift_frame(self)

    def to_dict(self) -> dict[str, Any]:
        records = ("outputs", "other_outputs")
        written = {
            "metadata": self.metadata,
            "layers": [_finite(asdict(layer)) for layer in self.worst_first()],
            "final": {
                **{key: [_finite(asdict(o)) for o in self.final.get(key, [])] for key in records},
                **{k: v for k, v in self.final.items() if k not in records},
            },
        }
        if self.mixed_precision is not None:
            written["mixed_precision"] = self.mixed_precision
        return written

    def save_json(self, path: str | Path) -> Path:
        """Write the report as JSON (records worst first; infinite SQNR written as null), atomically."""
        with atomic_write(path, "w") as handle:
            json.dump(self.to_dict(), handle, indent=2)
        return Path(path)


def _finite(record: dict[str, Any]) -> dict[str, Any]:
    """JSON has no infinity: an infinite or NaN metric becomes null (no error at all, or nothing to compare)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


def observable_tensors(fp32_names: Sequence[str], int8_graph: onnx.ModelProto) -> dict[str, str]:
    """FP32 tensor name -> the INT8 graph's tensor that carries it (dequantized where it is quantized)."""
    present = {name for node in int8_graph.graph.node for name in node.output}
    present |= {value.name for value in int8_graph.graph.input}
    mapping = {}
    for name in fp32_names:
        if name + DEQUANTIZED_SUFFIX in present:
            mapping[name] = name + DEQUANTIZED_SUFFIX
        elif name in present:
            mapping[name] = name
    return mapping


class FP32Side:
    """The FP32 half of a paired runner (ONNX Runtime's below, TensorRT's in backends): the model's `inputs`,
    `outputs` (every graph output, whatever its type) and `ops`, its `activations` (computed tensors, to pair), and,
    once `pair` is given the `mapping` FP32 tensor -> the tensor compared with it, an ONNX Runtime session that
    exposes them."""

    def __init__(self, fp32: onnx.ModelProto) -> None:
        self.model = fp32
        self.inputs = input_specs(fp32)
        fed = {spec.name for spec in self.inputs}
        self.types = tensor_types(fp32)  # one shape inference for the activations and the session
        self.activations = [name for name in activation_tensors(fp32, self.types) if name not in fed]
        self.outputs = [output.name for output in fp32.graph.output]
        self.ops = producers(fp32)

    def pair(self, mapping: dict[str, str], other: str, produced: set[str]) -> None:
        """Keep `mapping`, with each graph output paired with the INT8 side's output of that name where that side
        produces it (`produced`: its tensors; `other` names it in `unpaired`, the reason for each output it lacks),
        and open the FP32 session."""
        self.mapping = {**mapping, **{name: name for name in self.outputs if name in produced}}
        self.unpaired = {name: f"the {other} does not produce it" for name in self.outputs if name not in produced}
        self.fp32 = create_session(with_outputs(self.model, list(self.mapping), self.types))

    def reference(self, feed: Batch) -> dict[str, np.ndarray]:
        """The FP32 values of the paired tensors."""
        names = list(self.mapping)
        return dict(zip(names, run_session(self.fp32, names, feed)))


class _PairedRunner(FP32Side):
    """Runs the FP32 model and the INT8 model on the same feed, returning the paired tensors."""

    def __init__(self, fp32: onnx.ModelProto, qdq: onnx.ModelProto) -> None:
        import onnxruntime as ort

        super().__init__(fp32)
        self.optimized = int8_graph = optimized_graph(qdq)
        produced = {output.name for output in int8_graph.graph.output}
        self.pair(observable_tensors(self.activations, int8_graph), "INT8 model", produced)
        exposed = onnx.ModelProto()
        exposed.CopyFrom(int8_graph)
        declared = {output.name for output in exposed.graph.output}
        for target in self.mapping.values():
            if target not in declared:
                exposed.graph.output.append(onnx.helper.make_tensor_value_info(target, onnx.TensorProto.FLOAT, None))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # already optimized: keep it as is
        options.log_severity_level = ORT_LOG_SEVERITY
        self.int8 = ort.InferenceSession(exposed.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def run(self, feed: Batch) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        names = list(self.mapping)
        observed = dict(zip(names, run_session(self.int8, [self.mapping[n] for n in names], feed)))
        return self.reference(feed), observed


def measure_drift(
    model: str | Path,
    qdq_model: str | Path | onnx.ModelProto,
    data: DataSource,
    *,
    labels: str | Path | np.ndarray | None = None,
    batch_size: int | None = None,
    limit: int | None = None,
    progress=None,
    latency: bool = True,
) -> DriftReport:
    """Drift of every observable tensor of `model` in its INT8 version `qdq_model`, over `data` (accumulated mode).

    `data` is anything `quantlab.data.open_data` takes (a directory, a loader script, a list, a generator, an ORT
    CalibrationDataReader). With `labels` (one integer class per sample, in data order) the report also holds top-1
    accuracy of both. With `latency` the metadata says which engine ran, how many weighted ops it ran as integer
    kernels and the latency per sample of both models, timed on the first samples (`quantlab.engine`).
    """
    fp32 = load_model(model)
    qdq = qdq_model if isinstance(qdq_model, onnx.ModelProto) else load_model(qdq_model)
    runner = _PairedRunner(fp32, qdq)
    with open_data(data, runner.inputs, batch_size=batch_size, limit=limit, reread=latency) as opened:
        report = paired_report(runner, model, opened, labels=labels, progress=progress)
        if latency:
            report.metadata.update(engine_summary(fp32, qdq, single_samples(opened, runner.inputs), runner.optimized))
    return report


def paired_report(
    runner,
    model: str | Path,
    data: Iterable[Batch],
    *,
    labels: str | Path | np.ndarray | None = None,
    progress=None,
) -> DriftReport:
    """The accumulated report of any paired runner: `runner.run(feed)` gives (FP32, INT8) tensors keyed by FP32 name,
    `runner.mapping` the observed names, `runner.outputs` the model outputs (`runner.unpaired`: those the INT8 side
    lacks, with the reason), `runner.ops` their op types, `runner.types` their element types. ONNX Runtime's runner
    is `_PairedRunner`; the TensorRT backend has its own.

    Float tensors get the metrics; graph outputs of other types (token ids, masks, indices) are compared value for
    value (`final["other_outputs"]`, with the outputs that could not be compared and why). Top-1 is taken from the
    first float output.
    """
    expected = load_labels(labels)
    top1_output = _first_float_output(runner.outputs, runner.types) if expected is not None else None
    pairs: dict[str, PairSums | _Matches | str] = {}
    top1 = {"fp32": 0, "int8": 0, "agree": 0}
    samples, total = 0, data.num_samples if isinstance(data, CalibrationData) else None
    for feed in data:
        reference, observed = runner.run(feed)
        for name in runner.mapping:
            pair = pairs.setdefault(name, _comparison(reference[name], observed[name]))
            if not isinstance(pair, str):
                pair.add(reference[name], fp32_channels(observed[name], reference[name]))
        batch = feed_samples(feed, runner.inputs)
        if top1_output is not None:
            _count_top1(top1, reference[top1_output], observed[top1_output], expected, samples, batch)
        samples += batch
        if progress:
            progress("drift", samples, total)
    if samples == 0:
        raise QuantlabError("the data holds no samples")
    skipped = {**runner.unpaired, **{name: pair for name, pair in pairs.items() if isinstance(pair, str)}}
    results = {name: OutputMatch(name, _type_name(runner.types.get(name)), skipped=reason) for name, reason in skipped.items()}
    for name, pair in pairs.items():
        if isinstance(pair, PairSums):
            results[name] = pair.result(name, runner.ops.get(name, "?"))
        elif isinstance(pair, _Matches):
            results[name] = pair.result(name)
    final: dict[str, Any] = {
        "outputs": [results[name] for name in runner.outputs if isinstance(results[name], TensorDrift)],
        "other_outputs": [results[name] for name in runner.outputs if isinstance(results[name], OutputMatch)],
        "samples": samples,
    }
    if expected is not None:
        if expected.size != samples:
            raise QuantlabError(f"{expected.size} labels for {samples} samples")
        final["top1_fp32"] = top1["fp32"] / samples
        final["top1_int8"] = top1["int8"] / samples
        final["top1_agreement"] = top1["agree"] / samples
    layers = [results[name] for name in runner.mapping if name not in runner.outputs]
    return DriftReport(layers, final, {"mode": "accumulated", "model": str(model), "samples": samples})


def fp32_channels(observed: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """`observed` cut to the channels (axis 1) of the FP32 tensor `reference` where the export widened it: the
    onnxruntime target appends zero channels to depthwise convolutions and the tensors around them
    (`formats.qdq_onnxruntime`); the FP32 model's channels come first."""
    if (
        observed.ndim == reference.ndim > 1
        and observed.shape[1] > reference.shape[1]
        and observed.shape[:1] + observed.shape[2:] == reference.shape[:1] + reference.shape[2:]
    ):
        return observed[:, : reference.shape[1]]
    return observed


def with_channels(value: np.ndarray, channels: Any) -> np.ndarray:
    """`value` with zero channels appended on axis 1 up to `channels` where the export's tensor is that wide (a
    widened tensor fed from the FP32 model, `fp32_channels`'s converse); as it is otherwise."""
    if not isinstance(channels, int) or value.ndim < 2 or value.shape[1] >= channels:
        return value
    widths = [(0, 0)] * value.ndim
    widths[1] = (0, channels - value.shape[1])
    return np.pad(value, widths)


def _comparison(reference: Any, observed: Any) -> PairSums | _Matches | str:
    """How to compare a tensor pair: metrics for float tensors, value for value for others; for values that are not
    tensors (the sequences and maps some graph outputs hold), the reason they are not compared."""
    if not (isinstance(reference, np.ndarray) and isinstance(observed, np.ndarray)):
        return "not a tensor"
    return PairSums() if np.issubdtype(reference.dtype, np.floating) else _Matches(reference.dtype)


def _type_name(elem_type: int | None) -> str:
    """NumPy's name of an ONNX element type ("?" where unknown)."""
    try:
        return str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)))
    except (KeyError, TypeError, ValueError):
        return "?"


def _first_float_output(outputs: Sequence[str], types: Mapping[str, int]) -> str:
    """The first graph output of a float type: final SQNR and top-1 are taken from it (a model may return its integer
    token ids or a mask first)."""
    for name in outputs:
        if types.get(name) in FLOAT_TYPES:
            return name
    raise QuantlabError("the model has no float output to take the final SQNR or top-1 from")


def load_labels(labels: str | Path | np.ndarray | None) -> np.ndarray | None:
    """Integer class labels, one per sample in data order, from a .npy file (or passed through as an array)."""
    if labels is None or isinstance(labels, np.ndarray):
        return labels
    with reading(labels, "cannot read labels"):
        array = np.load(labels, allow_pickle=False)
    if not isinstance(array, np.ndarray):  # np.load opens any zip archive as an .npz, whatever the file is called
        array.close()
        raise QuantlabError(f"{labels}: labels must be one .npy array, not an .npz archive")
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise QuantlabError(f"{labels}: labels must be a 1-D integer array, got shape {array.shape} {array.dtype}")
    return array


def _count_top1(counts: dict[str, int], reference: np.ndarray, observed: np.ndarray, labels: np.ndarray, start: int, batch: int) -> None:
    truth = labels[start : start + batch]
    if truth.size != batch:
        raise QuantlabError(f"fewer labels ({labels.size}) than samples")
    fp32, int8 = reference.reshape(batch, -1).argmax(axis=1), observed.reshape(batch, -1).argmax(axis=1)
    counts["fp32"] += int((fp32 == truth).sum())
    counts["int8"] += int((int8 == truth).sum())
    counts["agree"] += int((fp32 == int8).sum())


@dataclass(frozen=True)
class _Layer:
    """One weighted op of the Q/DQ model: its node, the FP32 tensors it reads, and where its output is observed."""

    node: str
    op_type: str
    sources: tuple[str, ...]  # FP32 activation tensors the layer reads (before their Q/DQ)
    output: str  # FP32 name of its output
    observed: str  # the Q/DQ model's tensor that carries that output


def _layers(qdq: onnx.ModelProto, fp32_tensors: set[str]) -> list[_Layer]:
    """The weighted ops (Conv, Gemm, MatMul, ConvTranspose) of a Q/DQ model, in graph order. A layer whose output is
    not a tensor of the FP32 model (`fp32_tensors`: the onnxruntime target's Conv that writes a folded gate before its
    Clip) is observed at the first tensor of the FP32 model that its output alone leads to; one that leads to none is
    left out."""
    from quantlab.formats.qdq import WEIGHTED_OPS

    graph = qdq.graph
    producer = {name: node for node in graph.node for name in node.output}
    readers = tensor_readers(graph)
    initializers = {init.name for init in graph.initializer}
    present = set(producer) | {value.name for value in graph.input}
    graph_outputs = {output.name for output in graph.output}
    layers = []
    for node in graph.node:
        if node.op_type not in WEIGHTED_OPS:
            continue
        sources = []
        for name in node.input:
            source = producer.get(name)
            if source is not None and source.op_type == "DequantizeLinear":
                quantize = producer.get(source.input[0])
                if quantize is None or quantize.op_type != "QuantizeLinear":
                    continue  # a weight: an INT8 initializer behind its DequantizeLinear
                name = quantize.input[0]
            if name and name not in initializers:
                sources.append(name)
        output = node.output[0]
        while True:
            fp32 = output.removesuffix("_QuantizeLinear_Input")
            if fp32 != output and fp32 in graph_outputs:
                observed = fp32
            else:
                observed = fp32 + DEQUANTIZED_SUFFIX if fp32 + DEQUANTIZED_SUFFIX in present else fp32
            following = readers.get(observed, [])
            if fp32 in fp32_tensors or len(following) != 1 or following[0].op_type in WEIGHTED_OPS:
                break
            output = following[0].output[0]
        if fp32 in fp32_tensors:
            layers.append(_Layer(node.name, node.op_type, tuple(sources), fp32, observed))
    return layers


def measure_isolated(
    model: str | Path,
    qdq_model: str | Path | onnx.ModelProto,
    data: DataSource,
    *,
    batch_size: int | None = None,
    limit: int | None = None,
    progress=None,
    latency: bool = True,
) -> DriftReport:
    """Each weighted layer's own error: its piece of the Q/DQ model (input and output Q/DQ, INT8 weights) run on the
    FP32 model's activations, compared with the FP32 output. Nothing upstream contributes, so a layer that is
    sensitive stands out from one that only inherits error. `latency` as in `measure_drift`.
    """
    fp32 = load_model(model)
    qdq = qdq_model if isinstance(qdq_model, onnx.ModelProto) else load_model(qdq_model)
    layers = _layers(qdq, set(activation_tensors(fp32)))
    extractor = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(qdq))
    pieces = [create_session(extractor.extract_model(list(layer.sources), [layer.observed])) for layer in layers]
    piece_channels = [  # each piece's input channels: a widened layer reads more than the FP32 tensor has
        {value.name: value.shape[1] if len(value.shape) > 1 else None for value in piece.get_inputs()} for piece in pieces
    ]
    needed = list(dict.fromkeys(name for layer in layers for name in (*layer.sources, layer.output)))
    reference_session = create_session(with_outputs(fp32, needed))
    fed = {spec.name for spec in input_specs(fp32)}
    sums = [PairSums() for _ in layers]
    computed = [name for name in needed if name not in fed]
    samples = 0
    with open_data(data, input_specs(fp32), batch_size=batch_size, limit=limit, reread=latency) as opened:
        for feed in opened:
            values = {**feed, **dict(zip(computed, run_session(reference_session, computed, feed)))}
            for layer, piece, pair, widths in zip(layers, pieces, sums, piece_channels):
                inputs = {name: with_channels(values[name], widths[name]) for name in layer.sources}
                (observed,) = run_session(piece, [layer.observed], inputs)
                pair.add(values[layer.output], fp32_channels(observed, values[layer.output]))
            samples += feed_samples(feed, opened.inputs)
            if progress:
                progress("isolated", samples, opened.num_samples)
        if samples == 0:
            raise QuantlabError("the data holds no samples")
        metadata = {"mode": "isolated", "model": str(model), "samples": samples}
        if latency:
            metadata.update(engine_summary(fp32, qdq, single_samples(opened, opened.inputs)))
    results = [pair.result(layer.output, layer.op_type) for layer, pair in zip(layers, sums)]
    return DriftReport(results, {"outputs": [], "samples": samples}, metadata)


@dataclass
class FinalDrift:
    """Drift of the final outputs of one INT8 variant of a model: the SQNR of its worst float output (`outputs`: of
    each), and top-1 of the first float output when labels are given."""

    kept_fp32: list[str]
    sqnr_db: float
    top1_int8: float | None = None
    top1_fp32: float | None = None
    outputs: dict[str, float] = field(default_factory=dict)


def measure_final(
    fp32_model: onnx.ModelProto,
    qdq_model: onnx.ModelProto,
    data: Iterable[Batch],
    labels: np.ndarray | None = None,
    kept_fp32: Sequence[str] = (),
) -> FinalDrift:
    """SQNR of the worst float output (and top-1 of the first) of a Q/DQ model against the FP32 model, both run as
    they are."""
    from quantlab.mixed import Scorer

    with open_data(data, input_specs(fp32_model)) as opened:
        score = Scorer(fp32_model, opened, labels=labels).score(create_session(qdq_model))
    return FinalDrift(list(kept_fp32), score.sqnr_db, score.top1_int8, score.top1_fp32, score.outputs)


def rank_sensitivity(
    model: str | Path,
    thresholds: Thresholds | Mapping[str, float],
    data: DataSource,
    *,
    weight_method: str = "max",
    target: str = DEFAULT_TARGET,
    samples: int | None = None,
):
    """Every quantized layer (Conv, ConvTranspose, MatMul, Gemm), most sensitive first: the SQNR of the worst float
    output with that layer alone quantized and every other in float (`quantlab.mixed.rank_layers`), on the first
    `samples` samples of `data` (all by default). A list of `quantlab.mixed.LayerSensitivity`."""
    from quantlab.mixed import rank_layers

    return rank_layers(model, thresholds, data, samples=samples, weight_method=weight_method, target=target)


def propose_fp32(
    model: str | Path,
    thresholds: Thresholds | Mapping[str, float],
    data: DataSource,
    *,
    keep: int | None = None,
    target_sqnr: float | None = None,
    labels: np.ndarray | None = None,
    weight_method: str = "max",
    target: str = DEFAULT_TARGET,
    max_fp32: int | float | str | None = None,
) -> tuple[list[FinalDrift], onnx.ModelProto]:
    """The layers to keep in FP32, ranked and measured on `data`: the `keep` most sensitive, or the fewest that
    reach `target_sqnr` dB on the worst float output (at most `max_fp32`: a count or a fraction of the quantizable
    layers; all by default). `quantlab.mixed.mixed_precision` does the search; this returns its steps (none kept
    first; the last is the exported model, measured as it runs) and the Q/DQ model. `mixed_precision` itself ranks on
    calibration data and measures on other data.
    """
    from quantlab.mixed import mixed_precision

    result = mixed_precision(
        model, thresholds, data, keep=keep, target_sqnr=target_sqnr, labels=labels, max_fp32=max_fp32, samples=None,
        weight_method=weight_method, target=target,
    )
    steps = [step for step in result.steps if len(step[0]) < len(result.kept_fp32)]
    history = [FinalDrift(kept, score.sqnr_db, score.top1_int8, score.top1_fp32, score.outputs) for kept, score in steps]
    final = result.measured
    history.append(FinalDrift(result.kept_fp32, final.sqnr_db, final.top1_int8, final.top1_fp32, final.outputs))
    return history, result.model
