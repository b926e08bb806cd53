"""Automatic calibration: each tensor's threshold chosen among the histogram methods' by the error of the model's
final outputs, measured with ONNX Runtime on calibration samples.

Why: each histogram method optimizes a proxy on the tensor's own values (a KL divergence, a mean squared error, a
percentile), and which proxy suits a tensor depends on what reads it and on how its error travels to the outputs. A
Sigmoid hardly notices clipped large inputs; a box regression, a Softmax or a recurrent state the opposite. Clipping
errors are biased and add up over layers where rounding noise averages out, so a tensor's own error (or its layer's)
does not rank the candidates the way the outputs do: measured on the real-model benchmark set, choosing per tensor by
the consuming layer's isolated output error lost to the best single method on three of four models. No single method
is best on every model either (`benchmarks/accuracy.py`).

How, with a bounded number of runs over the first `samples` calibration samples:

1. Candidates: every method of `CANDIDATES` gives a threshold per tensor, and the export target's Q/DQ model of each
   gives the exact quantization (scale, zero point, integer type) of every tensor the target quantizes.
2. One search model: the Q/DQ model with the initializers that differ between candidates (activation scales and zero
   points, and the int32 biases derived from them) turned into inputs, so one ONNX Runtime session runs every candidate
   and any mix of them. Each run is scored by the SQNR of the worst float output against FP32.
3. Every candidate alone (one run each). The first of `CANDIDATES` is the start; the best of the others replaces it
   when it scores more than `MIN_GAIN_DB` higher on all samples and on each half of them (even- and odd-numbered
   samples). The margin is wide because the thresholds were fitted on these very samples, which favours the tighter
   ones: on the benchmark set (8-16 calibration samples, as many others held out) MSE beat percentile 99.99 on both
   halves of the direction classifier's calibration samples by 0.8-27 dB and lost 18 dB held out, where values reach
   1.4x the calibration range (0.2 dB, and a rule letting one half lose, were tried; the margin was set with the
   held-out results in view, so it is a judgement, not a fit).
4. Refinement, with at least `REFINE_MIN_SAMPLES` samples (or `groups=` given): the quantized tensors, in graph order,
   are cut into `GROUPS` contiguous groups, and each group in turn tries every other candidate (one run each),
   keeping one by the same rule. That is len(CANDIDATES) x (1 + GROUPS) runs at most, whatever the number of tensors.
   With fewer samples the halves are too small to tell a gain from noise: on the benchmark set's 8-16 calibration
   samples, refinement raised the calibration samples' SQNR on every model but moved the held-out SQNR by -7 to +10 dB
   (PP-OCR cls, 4 and 8 groups) and lost 0.3-0.9 dB on the others, while step 3 alone picked the best or nearly best
   method for held-out data on each of them.

Thresholds are per export target (the tensors it quantizes, its integer types): calibrate for the target you export to.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from quantlab.calibration._common import check_int
from quantlab.errors import QuantlabError
from quantlab.histogram import Histogram

# (label, method, options): the candidate thresholds, in order of preference where two score the same.
CANDIDATES: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("percentile 99.99", "percentile", {"percentile": 99.99}),
    ("mse", "mse", {}),
    ("max", "max", {}),
    ("percentile 99.999", "percentile", {"percentile": 99.999}),
    ("percentile 99.9", "percentile", {"percentile": 99.9}),
    ("kl", "kl", {}),
)
GROUPS = 8  # contiguous groups of quantized tensors that choose their candidate together
REFINE_MIN_SAMPLES = 32  # refinement by groups needs halves of at least 16 samples
MIN_GAIN_DB = 1.0  # a change must gain more than this on all samples and on each half of them (`_wins`)
DEFAULT_SAMPLES = 32

Progress = Callable[[str, int, int | None], None]


@dataclass
class AutoCalibration:
    """What `auto_calibrate` chose and what it measured on the calibration samples.

    `amax`: the thresholds (tensor -> amax), as `calibrate` returns them. `choices`: tensor -> the candidate whose
    threshold it got. `candidate_sqnr`: candidate -> SQNR (dB) of the worst float output with every tensor on that
    candidate; `sqnr`: the same for the chosen mix (at least the best of those). `runs`: the INT8 runs it took.
    """

    amax: dict[str, float]
    choices: dict[str, str]
    candidate_sqnr: dict[str, float]
    sqnr: float
    samples: int
    runs: int
    target: str

    def summary(self) -> dict[str, Any]:
        """The JSON-able record `quantlab calibrate` stores in the threshold table's metadata."""
        counts: dict[str, int] = {}
        for label in self.choices.values():
            counts[label] = counts.get(label, 0) + 1
        return {
            "target": self.target,
            "samples": self.samples,
            "runs": self.runs,
            "final_sqnr_db": _json_float(self.sqnr),
            "candidate_sqnr_db": {label: _json_float(value) for label, value in self.candidate_sqnr.items()},
            "tensors_per_candidate": counts,
            "choices": self.choices,
        }


def _json_float(value: float) -> float | str:
    return round(value, 4) if math.isfinite(value) else str(value)


def auto_calibrate(
    histograms: Mapping[str, Histogram],
    *,
    model: str | os.PathLike | None = None,
    data: Any = None,
    target: str | None = None,
    samples: int = DEFAULT_SAMPLES,
    groups: int | None = None,
    weight_method: str = "max",
    progress: Progress | None = None,
) -> AutoCalibration:
    """Thresholds chosen by the final outputs' error (module docstring) for export target `target`'s Q/DQ model.

    `model` is the FP32 model the histograms were collected from, `data` its calibration samples (anything
    `quantlab.data.open_data` takes; the first `samples` are run, 1 + `groups` times). `groups`: how many groups of
    tensors refinement cuts the model into; 0 for none; default `GROUPS` where `samples` samples are at least
    `REFINE_MIN_SAMPLES`, else none. Either of `model` and `data` defaults to what a
    histogram file of `quantlab collect` records: the model's path (while the file there is still the model it
    hashed) and the data's directory or loader script.
    """
    from quantlab.calibration import calibrate
    from quantlab.data import open_data
    from quantlab.formats import Thresholds
    from quantlab.formats.qdq import DEFAULT_TARGET, export_target, quantize_qdq
    from quantlab.model import input_specs, load_model

    target = DEFAULT_TARGET if target is None else target
    export_target(target)  # a bad name fails before any work
    samples = check_int("samples", samples, 1)
    groups = None if groups is None else check_int("groups", groups, 0)
    path, data = _model_and_data(histograms, model, data)
    fp32 = load_model(path)
    tables: dict[str, dict[str, float]] = {}
    for index, (label, method, options) in enumerate(CANDIDATES):
        with warnings.catch_warnings():
            if index:  # the tensors left unquantized are the same for every method: warn once
                warnings.simplefilter("ignore")
            tables[label] = calibrate(histograms, method, **options)
    labels = list(tables)

    models = {}
    for label in labels:
        table = Thresholds(tables[label], {}, histograms.min_max(tables[label]) if hasattr(histograms, "min_max") else {})
        models[label] = quantize_qdq(path, table, weight_method=weight_method, target=target)
    search = _SearchModel(models, groups or GROUPS)
    with open_data(data, input_specs(fp32), limit=samples, batch_size=1) as opened:
        scorer = _Scorer(fp32, search, opened, progress)
        start = {label: {group: label for group in range(len(search.groups))} for label in labels}
        started = scorer.scores(list(start.values()))
        candidate_sqnr = {label: score[0] for label, score in zip(labels, started)}
        winners = [label for label, tried in zip(labels, started) if _wins(tried, started[0])]
        best = max(winners, key=lambda label: candidate_sqnr[label], default=labels[0])
        choice, score = start[best], started[labels.index(best)]
        refine = groups if groups is not None else (GROUPS if scorer.samples >= REFINE_MIN_SAMPLES else 0)
        refine = refine if search.mixable else 0
        scorer.planned = len(labels) + (len(labels) - 1) * len(search.groups) if refine else len(labels)
        for group in range(len(search.groups) if refine else 0):
            trials = [{**choice, group: label} for label in labels if label != choice[group]]
            scores = scorer.scores(trials)
            top = int(np.argmax([tried[0] for tried in scores]))
            if _wins(scores[top], score):
                choice, score = trials[top], scores[top]
    per_tensor = {tensor: choice[group] for group, tensors in enumerate(search.groups) for tensor in tensors}
    choices = {name: per_tensor.get(name, best) for name in tables[best]}
    amax = {name: tables[label][name] for name, label in choices.items()}
    return AutoCalibration(amax, choices, candidate_sqnr, score[0], scorer.samples, scorer.runs, target)


def _wins(tried: tuple[float, float, float], current: tuple[float, float, float]) -> bool:
    """Whether scores (all samples, even half, odd half) beat the current ones by more than MIN_GAIN_DB on all samples
    and on each half: a gain that one half does not confirm is noise, and a method chosen on it (a tighter threshold,
    as a rule) loses on data it has not seen."""
    return bool(min(np.subtract(tried, current)) > MIN_GAIN_DB)


def _model_and_data(histograms: Mapping[str, Histogram], model: Any, data: Any) -> tuple[Path, Any]:
    """The model and data to measure on: those given, else those the histogram set's metadata records."""
    from quantlab.model import file_sha256

    metadata = getattr(histograms, "metadata", {}) or {}
    hint = "or choose another method (kl, max, percentile, mse), which needs neither"
    if model is None:
        recorded = metadata.get("model_path")
        if not recorded or not Path(recorded).is_file():
            where = f"the histograms' model {recorded} is not there" if recorded else "the histograms record no model path"
            raise QuantlabError(f"method 'auto' runs the model: pass model= (--model), since {where}; {hint}")
        if metadata.get("model_sha256") and file_sha256(recorded) != metadata["model_sha256"]:
            raise QuantlabError(f"method 'auto': {recorded} changed since the histograms were collected; pass model= (--model)")
        model = recorded
    if data is None:
        origin = metadata.get("data", {}) or {}
        data = origin.get("directory") or origin.get("loader")
        if not data:
            raise QuantlabError(f"method 'auto' runs the model on calibration samples: pass data= (--data); {hint}")
    return Path(model), data


class _SearchModel:
    """The candidates' Q/DQ models as one: where they differ only in initializer values (scales, zero points, and
    the int32 biases an onnxruntime-target model derives from them), those initializers become graph inputs and one
    session runs every candidate, exactly as its own model would. Mixing candidates across groups of tensors
    (`mixable`) needs every differing initializer to be a scale or zero point an activation's QuantizeLinear reads, so
    that a group's choice moves nothing else; models that differ in structure run one session each, unmixed."""

    def __init__(self, models: dict[str, onnx.ModelProto], groups: int) -> None:
        from quantlab.model import create_session

        self.models = models
        first = next(iter(models.values()))
        values = {label: {init.name: numpy_helper.to_array(init) for init in model.graph.initializer} for label, model in models.items()}
        base = values[next(iter(values))]
        self.shared = all(_structure(model) == _structure(first) for model in models.values())
        differing = [
            name for name in base if self.shared and any(not np.array_equal(found[name], base[name]) for found in values.values())
        ]
        self.differing = set(differing)
        self.values = {label: {name: found[name] for name in differing} for label, found in values.items()}
        owner = _activation_parameters(first)  # scale/zero point -> the tensor whose QuantizeLinear reads it
        tensors = list(dict.fromkeys(owner.values()))
        count = min(groups, len(tensors))
        self.groups = [list(part) for part in np.array_split(np.array(tensors, dtype=object), count)] if count else []
        self.group_of = {tensor: group for group, part in enumerate(self.groups) for tensor in part}
        self.owner = owner
        self.mixable = self.shared and all(name in owner for name in differing)
        self.sessions: dict[str, Any] = {}
        if self.shared:
            model = onnx.ModelProto()
            model.CopyFrom(first)
            graph = model.graph
            moved = [init for init in graph.initializer if init.name in self.differing]
            kept = [init for init in graph.initializer if init.name not in self.differing]
            del graph.initializer[:]
            graph.initializer.extend(kept)
            graph.input.extend(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)) for init in moved)
            self.sessions[""] = create_session(model)

    def run(self, choice: dict[int, str], outputs: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The outputs of the mix `choice` (group -> candidate) on one feed."""
        from quantlab.model import create_session, run_session

        labels = set(choice.values())
        if not self.shared:  # one model per candidate: only unmixed choices exist (mixable is False)
            (label,) = labels
            if label not in self.sessions:
                self.sessions[label] = create_session(self.models[label])
            return run_session(self.sessions[label], outputs, feed)
        uniform = next(iter(labels)) if len(labels) == 1 else None
        params = {name: self.values[uniform or choice[self.group_of[self.owner[name]]]][name] for name in self.differing}
        return run_session(self.sessions[""], outputs, {**feed, **params})


def _structure(model: onnx.ModelProto) -> list[tuple]:
    """A Q/DQ model's graph without initializer values: its nodes and the initializers' names and shapes."""
    nodes = [(node.op_type, tuple(node.input), tuple(node.output)) for node in model.graph.node]
    return [nodes, sorted((init.name, tuple(init.dims), init.data_type) for init in model.graph.initializer)]


def _activation_parameters(qdq: onnx.ModelProto) -> dict[str, str]:
    """Scale or zero-point initializer -> the activation tensor whose QuantizeLinear reads it (the first, where a
    scale is shared)."""
    initializers = {init.name for init in qdq.graph.initializer}
    owner: dict[str, str] = {}
    for node in qdq.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in initializers:
            tensor = node.input[0].removesuffix("_QuantizeLinear_Input")
            for name in node.input[1:3]:
                if name in initializers:
                    owner.setdefault(name, tensor)
    return owner


class _Scorer:
    """Scores mixes of candidates: the SQNR (dB) of the worst float output against FP32 over the samples."""

    def __init__(self, fp32: onnx.ModelProto, search: _SearchModel, data, progress: Progress | None) -> None:
        from quantlab.mixed import ReferenceOutputs

        self.references = ReferenceOutputs(fp32)
        self.outputs = self.references.names
        self.search, self.data, self.progress = search, data, progress
        self.samples = self.runs = 0
        self.planned = len(CANDIDATES) * (1 + len(search.groups))  # the most runs the search can take

    def scores(self, choices: list[dict[int, str]]) -> list[tuple[float, float, float]]:
        """One pass over the data (one sample per run), each mix run beside the FP32 model: per mix the SQNR of the
        worst float output over all samples, over the even-numbered ones and over the odd-numbered ones."""
        from quantlab.data import feed_samples
        from quantlab.drift import PairSums

        sums = [[[PairSums() for _ in self.outputs] for _ in range(3)] for _ in choices]
        samples = 0
        for index, batch in enumerate(self.data):
            references = self.references(index, batch)
            for parts, choice in zip(sums, choices):
                observed = self.search.run(choice, self.outputs, batch)
                for pairs in (parts[0], parts[1 + samples % 2]):
                    for pair, expected, got in zip(pairs, references, observed):
                        pair.add(expected, got.astype(np.float64))
            samples += feed_samples(batch, self.data.inputs)
            if self.progress:  # in sample runs, of the most the search can take
                total = self.data.num_samples and self.data.num_samples * self.planned
                self.progress("auto", (self.samples or samples) * self.runs + samples * len(choices), total)
        if samples == 0:
            raise QuantlabError("the data holds no samples")
        self.samples = samples
        self.runs += len(choices)
        return [tuple(self._worst(pairs) for pairs in parts) for parts in sums]

    def _worst(self, pairs: list) -> float:
        """SQNR (dB) of the worst output; +inf where a part holds no sample."""
        return min((pair.result(name, "").sqnr_db for pair, name in zip(pairs, self.outputs) if pair.values), default=math.inf)
