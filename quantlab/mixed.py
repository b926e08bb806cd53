"""Mixed precision: the fewest weighted layers to keep in float so that the INT8 model reaches a target SQNR.

The layers are the ones the export target quantizes: the Conv, ConvTranspose, MatMul and Gemm nodes that read a
DequantizeLinear output. A model is scored by the SQNR (dB) of its worst float output against the FP32 model, over all
samples (the measure of `quantlab calibrate --method auto`; a model with several outputs, such as a recurrent state
beside a probability, is as good as its worst).

**One session for every choice** (`SwitchModel`). The Q/DQ model in which every input read through a
DequantizeLinear goes through `Where(flag, <the float value>, <the dequantized value>)`, with one boolean graph input
per such read: any set of layers kept in float is one run of one ONNX Runtime session, not an export and a session
each (on YOLOv8n an export takes seconds, a run a fraction of one). What a kept layer reads is taken, input by input,
from the export with every layer kept (its float weights after the target's folds). For the tensorrt target the
flags follow its placement run for the kept set (`tensorrt_quantized`): a residual input or a Q/DQ pair shared with
a kept layer's output goes when the export drops it, so the session computes what that export computes. For the
onnxruntime target, whose placement ONNX Runtime's quantizer decides, the kept layers' inputs and the Q/DQ pairs on
their outputs switch (the quantizer gives a Relu's input its output's range, so a layer's output pair is its own);
there the answer is measured on the real export and the walk goes on with real exports where that falls short.

**The sensitivity order** (`rank_layers`): each layer's SQNR with that layer alone quantized and every other layer
in float, worst first: the error the layer itself brings to the outputs. One run per layer. Errors of layers
interact: they cancel, or one hides another, so the order "gain when that layer alone is kept in float" (this
module's predecessor) often finds that keeping a layer gains nothing, or loses, where keeping it with another gains
much. On YOLOv8n's calibration samples, /model.2/cv1 kept alone gains 1.6 dB and /model.2/m.0/cv1 alone loses 0.1,
the two together gain 5.7; held out, 6 layers in float by that order gave 30.7 dB, by this one 40.2 dB. On Silero
VAD one layer gave 32.1 dB against 35.2.
`benchmarks/mixed_precision.py` compares it with random orders and ONNX Runtime's `qdq_loss_debug`.

**The search** (`mixed_precision`): the model with nothing kept, measured on the data to report on (done if it
reaches the target); the ranking, made on calibration samples; then the ranking's prefixes, one layer more per run
up to the bound (`max_fp32`, default 10% of the quantizable layers, rounded down, at least 1), measured on that data,
stopping at the first that reaches the target; where none does, the prefix with the highest SQNR. The order comes
from calibration samples only; the number of layers is the one that reaches the target on the data it is reported
on. The chosen layers are exported for real, and that model is measured as it is, on both.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from quantlab.errors import QuantlabError

FLAG_PREFIX = "quantlab_keep_fp32::"
FLOAT_PREFIX = "quantlab_fp32::"
REFERENCE_BYTES = 256 << 20  # FP32 outputs up to this size are kept between runs instead of computed again


def quantized_layers(qdq: onnx.ModelProto) -> list[str]:
    """Names of the weighted ops (Conv, ConvTranspose, MatMul, Gemm) that read a DequantizeLinear output, in graph
    order: the layers a target quantizes, and that can be kept in float."""
    from quantlab.formats.qdq import WEIGHTED_OPS

    dequantized = {name for node in qdq.graph.node if node.op_type == "DequantizeLinear" for name in node.output}
    return [
        node.name
        for node in qdq.graph.node
        if node.op_type in WEIGHTED_OPS and node.name and any(name in dequantized for name in node.input)
    ]


class SwitchModel:
    """The Q/DQ model `base` in which any set of its quantized layers is kept in float by its inputs (module
    docstring): `model`, `layers` (node names, graph order), `feed(kept)` the boolean inputs for a set of kept layers.

    `all_kept` is the export with every layer kept: what each layer reads in float, input by input. `quantized(kept)`,
    where the target's placement is known (`tensorrt_quantized`), gives the FP32 tensors the export with `kept` still
    quantizes, and then every reader of a Q/DQ pair is switched, not only the layers: the model computes what that
    export computes (`exact`). Without it only the kept layers' own inputs are switched.
    """

    def __init__(self, base: onnx.ModelProto, all_kept: onnx.ModelProto, quantized=None) -> None:
        self.layers = quantized_layers(base)
        layer_set = set(self.layers)
        floats = {node.name: node for node in all_kept.graph.node if node.name}
        float_initializers = {init.name: init for init in all_kept.graph.initializer}
        model = onnx.ModelProto()
        model.CopyFrom(base)
        graph = model.graph
        producer = {name: node for node in graph.node for name in node.output}
        present = set(producer) | {value.name for value in graph.input} | {init.name for init in graph.initializer}
        self.quantized = quantized
        self.partial: list[str] = []  # layers with an input that could not be switched
        self.tensors: set[str] = set()  # FP32 names of the activations the base model quantizes
        copied: dict[str, str] = {}
        self._edges: list[tuple[str, str, str, str]] = []  # (flag input, FP32 tensor or "", reader, writing layer or "")
        inserted: dict[str, list[onnx.NodeProto]] = {}  # reader -> the Where nodes before it

        def float_copy(name: str) -> str:
            if name not in copied:
                copied[name] = FLOAT_PREFIX + name
                init = onnx.TensorProto()
                init.CopyFrom(float_initializers[name])
                init.name = copied[name]
                graph.initializer.append(init)
            return copied[name]

        for node in graph.node:
            is_layer = node.name in layer_set
            kept = floats.get(node.name) if is_layer else None
            for slot, name in enumerate(node.input):
                dequantize = producer.get(name)
                if not name or dequantize is None or dequantize.op_type != "DequantizeLinear":
                    continue
                quantize = producer.get(dequantize.input[0])
                activation = quantize is not None and quantize.op_type == "QuantizeLinear"
                tensor = quantize.input[0].removesuffix("_QuantizeLinear_Input") if activation else ""
                writer = producer.get(quantize.input[0]) if activation else None
                writer_name = writer.name if writer is not None and writer.name in layer_set else ""
                if activation:
                    self.tensors.add(tensor)
                if not is_layer and not (activation and (quantized is not None or writer_name)):
                    continue  # read by no layer, written by none: switched only where the placement is known
                source = quantize.input[0] if activation else None
                if activation and dequantize.input[1:2] != quantize.input[1:2]:
                    source = None  # a DequantizeLinear rescaled for a step folded into it: no float tensor holds that
                if is_layer:
                    alternative = kept.input[slot] if kept is not None and slot < len(kept.input) else None
                    if alternative in float_initializers:
                        source = float_copy(alternative)
                    elif alternative in present:
                        source = alternative
                    elif alternative != name:
                        source = None
                if source is None:
                    self.partial.append(node.name)
                    continue
                flag = f"{FLAG_PREFIX}{len(self._edges)}"
                switched = f"{name}{FLAG_PREFIX}{len(self._edges)}"
                inserted.setdefault(node.name or id(node), []).append(
                    helper.make_node("Where", [flag, source, name], [switched], name=switched)
                )
                node.input[slot] = switched
                self._edges.append((flag, tensor, node.name, writer_name))
        nodes = list(graph.node)
        del graph.node[:]
        for node in nodes:
            graph.node.extend(inserted.get(node.name or id(node), []))
            graph.node.append(node)
        graph.input.extend(helper.make_tensor_value_info(edge[0], onnx.TensorProto.BOOL, []) for edge in self._edges)
        self.model = model
        self.exact = quantized is not None and not self.partial and quantized(set()) == self.tensors
        self._true, self._false = np.array(True), np.array(False)

    def feed(self, kept: Collection[str]) -> dict[str, np.ndarray]:
        """The boolean inputs that keep the layers `kept` in float: their inputs read float values, and where the
        placement is known the Q/DQ pairs the export with them kept drops go too; where it is not, the pairs on
        their outputs."""
        kept = set(kept)
        quantized = self.quantized(kept) if self.quantized is not None else None

        def floats(tensor: str, reader: str, writer: str) -> bool:
            if reader in kept:
                return True
            if quantized is not None:
                return bool(tensor) and tensor not in quantized
            return writer in kept

        return {flag: self._true if floats(*edge) else self._false for flag, *edge in self._edges}


def tensorrt_quantized(model_path: str | Path, thresholds):
    """For the tensorrt target: kept layers -> the FP32 tensors its export quantizes (its placement, run alone)."""
    from quantlab.formats import Thresholds
    from quantlab.formats.qdq import prepared_model, small_gemms
    from quantlab.formats.qdq_tensorrt import _thresholded_placement
    from quantlab.model import activation_tensors, load_model, tensor_types

    path = Path(model_path)
    prepared = prepared_model(load_model(path), path)
    activations = activation_tensors(prepared, tensor_types(prepared))
    amax = thresholds.amax if isinstance(thresholds, Thresholds) else dict(thresholds)
    small = small_gemms(prepared)  # kept in float by every export, as quantize_qdq keeps them

    def quantized(kept: set[str]) -> set[str]:
        with warnings.catch_warnings():  # quantize_qdq has warned of the tensors without a threshold already
            warnings.simplefilter("ignore")
            placement, _ = _thresholded_placement(prepared, activations, set(kept) | small, amax, path)
        return set(placement.ranged) | {shared[0] for shared in placement.shared}

    return quantized


DEFAULT_MAX_FP32 = 0.10  # the bound: at most this fraction of the quantizable layers (rounded down, at least 1)
DEFAULT_SAMPLES = 32  # calibration samples the search runs on


def max_layers(max_fp32: int | float | str | None, layers: int) -> int:
    """The most layers the search may keep in float: a count (an int, "6"), a fraction of `layers` (a float in
    (0, 1], "10%"; rounded down, at least 1), or None for all of them."""
    if max_fp32 is None:
        return layers
    value: int | float = max_fp32  # type: ignore[assignment]
    if isinstance(max_fp32, str):
        text = max_fp32.strip()
        try:
            value = float(text[:-1]) / 100 if text.endswith("%") else int(text)
        except ValueError:
            raise QuantlabError(f"--max-fp32 {max_fp32!r}: expected a count (6) or a percentage (10%)") from None
        if text.endswith("%") and not 0 < value <= 1:
            raise QuantlabError(f"--max-fp32 {max_fp32}: a percentage must be in (0%, 100%]")
    if isinstance(value, bool) or (isinstance(value, float) and not 0 < value <= 1) or (isinstance(value, int) and value < 0):
        raise QuantlabError(f"--max-fp32 must be a count >= 0 or a fraction in (0, 1], got {max_fp32!r}")
    if isinstance(value, float):
        return min(layers, max(1, math.floor(value * layers + 1e-9)))
    return min(layers, value)


def float_outputs(fp32: onnx.ModelProto) -> list[str]:
    """The graph outputs of a float type (not graph inputs passed through): the ones scored."""
    from quantlab.model import FLOAT_TYPES, input_specs

    fed = {spec.name for spec in input_specs(fp32)}
    names = [o.name for o in fp32.graph.output if o.type.tensor_type.elem_type in FLOAT_TYPES and o.name not in fed]
    if not names:
        raise QuantlabError("the model has no float output to take the SQNR from")
    return names


class ReferenceOutputs:
    """The FP32 model's float outputs (`float_outputs`) per batch, in float64: computed on the first pass over the data
    and kept while they fit REFERENCE_BYTES, else computed again on every pass. What scored INT8 variants compare with
    (here and in `quantlab.calibration.auto`)."""

    def __init__(self, fp32: onnx.ModelProto) -> None:
        from quantlab.model import create_session

        self.names = float_outputs(fp32)
        self.session = create_session(fp32)
        self.kept: list[list[np.ndarray]] | None = []

    def __call__(self, index: int, batch: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The outputs of the `index`-th batch of the data."""
        from quantlab.model import run_session

        if self.kept is not None and index < len(self.kept):
            return self.kept[index]
        references = [output.astype(np.float64) for output in run_session(self.session, self.names, batch)]
        if self.kept is not None:
            self.kept.append(references)
            if sum(output.nbytes for outputs in self.kept for output in outputs) > REFERENCE_BYTES:
                self.kept = None
        return references


@dataclass
class Score:
    """One INT8 variant on one data set: SQNR (dB) per float output and of the worst, top-1 where labelled."""

    outputs: dict[str, float]
    top1_int8: float | None = None
    top1_fp32: float | None = None

    @property
    def sqnr_db(self) -> float:
        return min(self.outputs.values())

    @property
    def worst_output(self) -> str:
        return min(self.outputs, key=self.outputs.get)


class Scorer:
    """Scores INT8 variants of one model on one data set (`Score`). The FP32 outputs are computed once and kept (up
    to REFERENCE_BYTES). With `labels` (one class per sample), top-1 of the first float output, as drift counts it."""

    def __init__(self, fp32: onnx.ModelProto, data, *, labels: np.ndarray | None = None, progress=None, stage: str = "mixed") -> None:
        self.references = ReferenceOutputs(fp32)
        self.outputs = self.references.names
        self.data, self.labels, self.progress, self.stage = data, labels, progress, stage
        self.runs = self.samples = self.sample_runs = 0
        self.expected_runs: int | None = None  # for the progress bar's total

    def score(self, session, extra: Mapping[str, np.ndarray] | None = None) -> Score:
        """`session` (an INT8 variant of the model; `extra`: inputs beside the data's) over every sample."""
        from quantlab.data import feed_samples
        from quantlab.drift import PairSums, _count_top1
        from quantlab.model import run_session

        pairs = [PairSums() for _ in self.outputs]
        top1 = {"fp32": 0, "int8": 0, "agree": 0}
        samples = 0
        for index, batch in enumerate(self.data):
            references = self.references(index, batch)
            observed = run_session(session, self.outputs, {**batch, **(extra or {})})
            for pair, expected, got in zip(pairs, references, observed):
                pair.add(expected, got.astype(np.float64))
            count = feed_samples(batch, self.data.inputs)
            if self.labels is not None:
                _count_top1(top1, references[0], observed[0], self.labels, samples, count)
            samples += count
            self.sample_runs += count
            if self.progress:
                total = self.expected_runs * self.samples if self.expected_runs and self.samples else None
                self.progress(self.stage, self.sample_runs, total)
        if samples == 0:
            raise QuantlabError("the data holds no samples")
        if self.labels is not None and self.labels.size != samples:
            raise QuantlabError(f"{self.labels.size} labels for {samples} samples")
        self.samples = samples
        self.runs += 1
        outputs = {name: pair.result(name, "").sqnr_db for name, pair in zip(self.outputs, pairs)}
        if self.labels is None:
            return Score(outputs)
        return Score(outputs, top1["int8"] / samples, top1["fp32"] / samples)


@dataclass
class LayerSensitivity:
    """One quantized layer: the SQNR (dB) of the worst float output with this layer alone quantized (every other
    layer in float), on the samples ranked on. Lower is more sensitive."""

    layer: str
    op_type: str
    sqnr_db: float


@dataclass
class MixedPrecision:
    """What `mixed_precision` chose and measured.

    `kept_fp32`: the layers kept in float (node names, most sensitive first); `layers`: the quantizable layers;
    `bound`: the most it could keep; `ranking`: every layer, most sensitive first (empty where the INT8 model
    reached the target); `steps`: (layers kept, `Score`) of each model the search measured on the data to report on
    (the switch model); `measured`: the exported model's `Score` there (`samples` samples), `calibration` on the
    calibration samples it was ranked on; `reached`: whether `measured` reaches `target_sqnr`. `model`: the exported
    Q/DQ model.
    """

    target_sqnr: float | None
    keep: int | None
    kept_fp32: list[str]
    layers: int
    bound: int
    ranking: list[LayerSensitivity]
    steps: list[tuple[list[str], Score]]
    calibration: Score
    measured: Score
    calibration_samples: int
    samples: int
    runs: int
    exact: bool
    target: str
    model: onnx.ModelProto = field(repr=False, default=None)  # type: ignore[assignment]

    @property
    def reached(self) -> bool | None:
        return None if self.target_sqnr is None else self.measured.sqnr_db >= self.target_sqnr

    def share(self, count: int | None = None) -> str:
        count = len(self.kept_fp32) if count is None else count
        return f"{count} of {self.layers} quantizable layers ({count / self.layers:.1%})"

    def message(self, where: str = "the data") -> str:
        """One line: what was kept and the SQNR reached, or that the target was not reached within the bound."""
        sqnr = _db(self.measured.sqnr_db)
        if self.target_sqnr is None:
            return f"kept {self.share()} in FP32: worst-output SQNR {sqnr} on {where}"
        if self.reached:
            return f"target {self.target_sqnr:g} dB reached: {sqnr} on {where} with {self.share()} in FP32"
        return (
            f"target {self.target_sqnr:g} dB not reached within {self.bound} of {self.layers} layers in FP32"
            f" (--max-fp32): the best is {sqnr} on {where}, with {len(self.kept_fp32)} kept"
        )

    def summary(self) -> dict[str, Any]:
        """The JSON record `quantlab drift --json` stores under "mixed_precision"."""
        return {
            "target_sqnr_db": self.target_sqnr,
            "keep": self.keep,
            "reached": self.reached,
            "kept_fp32": self.kept_fp32,
            "kept": len(self.kept_fp32),
            "quantizable_layers": self.layers,
            "bound": self.bound,
            "sqnr_db": _json(self.measured.sqnr_db),
            "outputs_sqnr_db": {name: _json(value) for name, value in self.measured.outputs.items()},
            "worst_output": self.measured.worst_output,
            "samples": self.samples,
            "calibration_sqnr_db": _json(self.calibration.sqnr_db),
            "calibration_samples": self.calibration_samples,
            "runs": self.runs,
            "switch_model_exact": self.exact,
            "target": self.target,
            "ranking": [{"layer": r.layer, "op_type": r.op_type, "sqnr_db_quantized_alone": _json(r.sqnr_db)} for r in self.ranking],
            "steps": [{"kept": len(kept), "added": kept[-1] if kept else None, "calibration_sqnr_db": _json(score.sqnr_db)} for kept, score in self.steps],
        }


def _db(value: float) -> str:
    return f"{value:.2f} dB" if math.isfinite(value) else f"{value} dB"


def _json(value: float) -> float | None:
    return round(value, 4) if math.isfinite(value) else None


class MixedSearch:
    """The switch model of one model and thresholds (`switch`), its ONNX Runtime `session`, the quantizable `layers`
    and their op types; `export(kept)` the real Q/DQ model with `kept` in float, `rank(scorer)` the sensitivity order."""

    def __init__(self, model, thresholds, weight_method: str, target: str) -> None:
        from quantlab.formats.qdq import quantize_qdq
        from quantlab.model import create_session, load_model

        self.path, self.thresholds = Path(model), thresholds
        self.options = {"weight_method": weight_method, "target": target}
        self.fp32 = load_model(self.path)
        base = quantize_qdq(self.path, thresholds, keep_shapes=True, **self.options)  # switchable with all_kept's
        self.layers = quantized_layers(base)
        if not self.layers:
            raise QuantlabError(f"{self.path.name}: the Q/DQ model quantizes no Conv, ConvTranspose, MatMul or Gemm to keep in float")
        with warnings.catch_warnings():  # quantize_qdq has just warned of anything these exports would warn of
            warnings.simplefilter("ignore")
            all_kept = quantize_qdq(self.path, thresholds, keep_fp32=self.layers, keep_shapes=True, **self.options)
        placement = tensorrt_quantized(self.path, thresholds) if target == "tensorrt" else None
        self.switch = SwitchModel(base, all_kept, placement)
        self.session = create_session(self.switch.model)
        ops = {node.name: node.op_type for node in base.graph.node}
        self.op_types = {layer: ops[layer] for layer in self.layers}

    def export(self, kept: Sequence[str]) -> onnx.ModelProto:
        from quantlab.formats.qdq import quantize_qdq

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return quantize_qdq(self.path, self.thresholds, keep_fp32=list(kept), **self.options)

    def rank(self, scorer: Scorer) -> list[LayerSensitivity]:
        """Each layer quantized alone, every other in float: worst first (graph order among equals)."""
        results = []
        for layer in self.layers:
            score = scorer.score(self.session, self.switch.feed([other for other in self.layers if other != layer]))
            results.append(LayerSensitivity(layer, self.op_types[layer], score.sqnr_db))
        return sorted(results, key=lambda result: result.sqnr_db)


def rank_layers(
    model: str | Path,
    thresholds,
    data,
    *,
    samples: int | None = DEFAULT_SAMPLES,
    weight_method: str = "max",
    target: str | None = None,
    progress=None,
) -> list[LayerSensitivity]:
    """Every quantized layer of the Q/DQ model of `thresholds` (export target `target`), most sensitive first: the
    worst float output's SQNR with that layer alone quantized, on the first `samples` samples of `data`."""
    from quantlab.data import open_data
    from quantlab.formats.qdq import DEFAULT_TARGET
    from quantlab.model import input_specs

    search = MixedSearch(model, thresholds, weight_method, target or DEFAULT_TARGET)
    with open_data(data, input_specs(search.fp32), limit=samples) as opened:
        scorer = Scorer(search.fp32, opened, progress=progress, stage="rank")
        scorer.expected_runs = len(search.layers)
        return search.rank(scorer)


def mixed_precision(
    model: str | Path,
    thresholds,
    calibration,
    *,
    data=None,
    target_sqnr: float | None = None,
    keep: int | None = None,
    max_fp32: int | float | str | None = DEFAULT_MAX_FP32,
    labels: np.ndarray | None = None,
    samples: int | None = DEFAULT_SAMPLES,
    weight_method: str = "max",
    target: str | None = None,
    progress=None,
    ranking: Sequence[LayerSensitivity] | None = None,
) -> MixedPrecision:
    """The fewest layers of the Q/DQ model of `thresholds` to keep in float, most sensitive first, for its worst
    float output to reach `target_sqnr` dB on `data`, at most `max_fp32` of them; or the `keep` most sensitive.

    The layers are ranked on the first `samples` samples of `calibration` (`rank_layers`; or `ranking`, one made
    there before); the models with the ranking's first layers in float are measured on `data` (all of it, with
    top-1 of the first float output where `labels` are given), or on those calibration samples where `data` is None.
    The chosen model is exported and measured as it is on both. Either data argument is anything
    `quantlab.data.open_data` takes.
    """
    from contextlib import nullcontext

    from quantlab.data import open_data
    from quantlab.formats.qdq import DEFAULT_TARGET
    from quantlab.model import create_session, input_specs

    if (keep is None) == (target_sqnr is None):
        raise QuantlabError("give exactly one of --keep-fp32 K and --target-sqnr DB")
    if keep is not None and (isinstance(keep, bool) or keep < 0):
        raise QuantlabError(f"--keep-fp32 must be >= 0, got {keep}")
    if target_sqnr is not None and not math.isfinite(target_sqnr):
        raise QuantlabError(f"--target-sqnr must be a finite number of dB, got {target_sqnr}")
    target = target or DEFAULT_TARGET
    search = MixedSearch(model, thresholds, weight_method, target)
    layers = search.layers
    bound = min(keep, len(layers)) if keep is not None else max_layers(max_fp32, len(layers))
    specs = input_specs(search.fp32)

    def reaches(score: Score) -> bool:
        return keep is None and score.sqnr_db >= target_sqnr  # type: ignore[operator]

    with open_data(calibration, specs, limit=samples) as calib, (
        nullcontext(None) if data is None else open_data(data, specs)
    ) as opened:
        walk = Scorer(search.fp32, calib if opened is None else opened, labels=labels, progress=progress, stage="measure")
        walk.expected_runs = 1 + bound
        first = walk.score(search.session, search.switch.feed(()))
        steps: list[tuple[list[str], Score]] = [([], first)]
        ranked: list[LayerSensitivity] = []
        ranker = Scorer(search.fp32, calib, progress=progress, stage="rank") if opened is not None else walk
        chosen: list[str] = []
        if not reaches(first) and bound:
            ranker.expected_runs = len(layers)
            ranked = list(ranking) if ranking else search.rank(ranker)
            order = [entry.layer for entry in ranked]
            for count in range(1, bound + 1):
                steps.append((order[:count], walk.score(search.session, search.switch.feed(order[:count]))))
                if reaches(steps[-1][1]):
                    break
            reaching = [kept for kept, score in steps if reaches(score)]
            best = max(steps, key=lambda step: (step[1].sqnr_db, -len(step[0])))[0]
            chosen = order[:bound] if keep is not None else reaching[0] if reaching else best
        mixed = search.export(chosen)
        measured = walk.score(create_session(mixed))
        if keep is None and ranked and not reaches(measured) and not search.switch.exact:
            order = [entry.layer for entry in ranked]  # the switch model was approximate: real exports go on
            for count in range(len(chosen) + 1, bound + 1):
                candidate = search.export(order[:count])
                score = walk.score(create_session(candidate))
                if score.sqnr_db > measured.sqnr_db:
                    chosen, mixed, measured = order[:count], candidate, score
                if reaches(score):
                    break
        calibration_score = measured if opened is None else ranker.score(create_session(mixed))
        runs = walk.runs + (ranker.runs if ranker is not walk else 0)
        calibration_samples = ranker.samples if ranker.samples else walk.samples
    return MixedPrecision(
        target_sqnr, keep, list(chosen), len(layers), bound, ranked, steps, calibration_score, measured,
        calibration_samples, walk.samples, runs, search.switch.exact, target, mixed,
    )


def recorded_calibration(thresholds) -> str | None:
    """The calibration data the thresholds' histograms were collected from (a directory or a loader script), where the
    threshold file records its histogram file (`quantlab calibrate` does) and both are still there."""
    from quantlab.formats import Thresholds
    from quantlab.histogram import load_histograms

    source = thresholds.metadata.get("source") if isinstance(thresholds, Thresholds) else None
    histograms = Path(source["histograms"]) if isinstance(source, dict) and source.get("histograms") else None
    if histograms is None or not histograms.is_file():
        return None
    try:
        origin = load_histograms(histograms).metadata.get("data", {}) or {}
    except QuantlabError:
        return None
    recorded = origin.get("directory") or origin.get("loader")
    if not recorded or not Path(str(recorded).partition(":")[0] if origin.get("loader") else recorded).exists():
        return None
    return str(recorded)
