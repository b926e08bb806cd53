"""Mixed precision on the real-model benchmark set: how many layers each order keeps in float to reach a target, held out.

Per model of the set (benchmarks/realmodels.py): histograms collected on calib/, thresholds of --method (default
auto) for the tensorrt target, and the model's quantizable layers (the Conv, ConvTranspose, MatMul and Gemm its Q/DQ
model quantizes). Four orders in which to keep layers in float, each made on calib/ only:

- quantlab: `quantlab.mixed.rank_layers`, each layer quantized alone with every other in float, worst SQNR first;
- random: a random permutation, for --seeds seeds (the table gives their mean);
- ORT xmodel: ONNX Runtime's `onnxruntime.quantization.qdq_loss_debug` (`modify_model_output_intermediate_tensors`,
  `collect_activations` on the Q/DQ model and on the FP32 model, `create_activation_matching`,
  `compute_activation_error`): a layer's score is the lowest `xmodel_err` (SQNR of the FP32 activation against the
  Q/DQ model's dequantized one) of the activations it reads, lowest first;
- ORT qdq: the same with `qdq_err` (SQNR of an activation before against after its own Q/DQ pair).

Then, on eval/ only, the SQNR (dB) of the worst float output against FP32 with each order's first k layers in float:
at 1%, 5% and 10% of the quantizable layers (rounded down, at least 1: what `--max-fp32` allows), and the fewest
layers that reach --target dB and that reach what quantlab's order reaches with 10%: exact up to 10% (every count
measured), beyond it a bracket "low-high" found by doubling then bisection (at most half the 10% count wide; random:
the mean of the seeds' brackets), "-" where even every layer in float falls short. Every model variant is one run of quantlab's
switch model (`quantlab.mixed.SwitchModel`, which for the tensorrt target computes what the export with those layers
kept computes; one line per model compares it with the real export at quantlab's 10%, which ONNX Runtime runs with
some integer kernels). Last, per model, what `quantlab drift --target-sqnr <target>` says (`mixed_precision` with the
ranking above: the count chosen on eval/, as drift chooses it on --data), and a table of which order wins: the
highest SQNR at 10%, and the fewest layers to the target (by the bracket's upper end).

Usage: python benchmarks/realmodels.py prepare; python benchmarks/mixed_precision.py [--models a,b] [--method auto]
       [--target 30] [--seeds 3]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import realmodels
from rich.console import Console
from rich.table import Table

FRACTIONS = (0.01, 0.05, 0.10)


def thresholds_for(case, method: str):
    """quantlab's thresholds of `method` on calib/ (histograms collected first), with min/max, for the tensorrt target."""
    import quantlab
    from quantlab.formats import Thresholds

    histograms = quantlab.collect(case.model, case.calib)
    options = {"model": case.model, "data": case.calib, "target": "tensorrt"} if method == "auto" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        amax = quantlab.calibrate(histograms, method=method, **options)
    return amax if isinstance(amax, Thresholds) else Thresholds(dict(amax), min_max=histograms.min_max())


def ort_orders(case, qdq, layer_inputs: dict[str, list[str]]) -> dict[str, list[str]]:
    """The two orders of ONNX Runtime's qdq_loss_debug per-tensor errors, measured on calib/ (module docstring)."""
    import onnx
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_activation_error,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    from quantlab.formats.qdq import WEIGHTED_OPS

    feeds = realmodels.load_samples(case.model, case.calib)
    with tempfile.TemporaryDirectory() as tmp:
        qdq_path, qdq_augmented, fp32_augmented = (str(Path(tmp) / name) for name in ("q.onnx", "qa.onnx", "fa.onnx"))
        onnx.save(qdq, qdq_path)
        modify_model_output_intermediate_tensors(qdq_path, qdq_augmented, ["QuantizeLinear", "DequantizeLinear"])
        modify_model_output_intermediate_tensors(str(case.model), fp32_augmented, list(WEIGHTED_OPS))
        matched = create_activation_matching(collect_activations(qdq_augmented, iter(feeds)), collect_activations(fp32_augmented, iter(feeds)))
    # the FP32 side saved the weighted ops' tensors only (all of det's would take GBs): the pairs the layers read
    errors = compute_activation_error({name: match for name, match in matched.items() if "float" in match})
    layers = list(layer_inputs)
    orders = {}
    for label, key in (("ORT xmodel", "xmodel_err"), ("ORT qdq", "qdq_err")):
        score = {
            layer: min((errors[name][key] for name in names if key in errors.get(name, {})), default=math.inf)
            for layer, names in layer_inputs.items()
        }
        orders[label] = sorted(layers, key=lambda layer: (score[layer], layers.index(layer)))
    return orders


class Curve:
    """The SQNR on eval/ of an order's prefixes, each measured once (the empty prefix once for every order)."""

    def __init__(self, search, scorer, order: list[str], shared: dict) -> None:
        self.search, self.scorer, self.order, self.values, self.shared = search, scorer, order, {}, shared

    def __call__(self, count: int) -> float:
        cache = self.shared if count == 0 else self.values
        if count not in cache:
            cache[count] = self.scorer.score(self.search.session, self.search.switch.feed(self.order[:count])).sqnr_db
        return cache[count]

    def layers_to(self, target: float, scanned: int) -> tuple[int, int] | None:
        """The fewest layers whose prefix reaches `target`, as (low, high): exact (low == high) up to `scanned`, every
        count of which is measured; beyond it, doubling from `scanned` then bisection down to a bracket of at most
        `scanned` // 2 counts (assuming that more layers in float do not lower the SQNR). None where even every layer
        in float falls short."""
        for count in range(scanned + 1):
            if self(count) >= target:
                return count, count
        low, high, total = scanned, scanned, len(self.order)
        while high < total:
            low, high = high, min(total, max(1, high) * 2)
            if self(high) >= target:
                break
        if self(high) < target:
            return None
        while high - low > max(1, scanned // 2):  # low falls short, high reaches it
            middle = (low + high) // 2
            low, high = (low, middle) if self(middle) >= target else (middle, high)
        return low + 1, high


def measure(name: str, method: str, target: float, seeds: int) -> dict:
    from quantlab.data import open_data
    from quantlab.mixed import MixedSearch, Scorer, max_layers, mixed_precision
    from quantlab.model import create_session, input_specs

    case = realmodels.prepare(name)
    started = time.perf_counter()
    thresholds = thresholds_for(case, method)
    seconds = {"thresholds": time.perf_counter() - started}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        search = MixedSearch(case.model, thresholds, "max", "tensorrt")
    layers = search.layers
    counts = {fraction: max_layers(fraction, len(layers)) for fraction in FRACTIONS}
    bound = counts[max(FRACTIONS)]
    specs = input_specs(search.fp32)
    with open_data(case.calib, specs) as calib, open_data(case.eval, specs) as held_out:
        started = time.perf_counter()
        ranking = search.rank(Scorer(search.fp32, calib))
        orders = {"quantlab": [entry.layer for entry in ranking]}
        seconds["rank"] = time.perf_counter() - started
        started = time.perf_counter()
        layer_inputs = {layer: [] for layer in layers}
        for _, tensor, reader, _ in search.switch._edges:
            if tensor and reader in layer_inputs and tensor not in layer_inputs[reader]:
                layer_inputs[reader].append(tensor)
        orders.update(ort_orders(case, search.export([]), layer_inputs))
        seconds["ORT debug"] = time.perf_counter() - started
        rng = np.random.default_rng(0)
        for seed in range(seeds):
            orders[f"random {seed}"] = list(rng.permutation(layers))
        started = time.perf_counter()
        scorer, shared = Scorer(search.fp32, held_out), {}
        curves = {label: Curve(search, scorer, order, shared) for label, order in orders.items()}
        quantlab_at_bound = curves["quantlab"](bound)
        results = {}
        for label, curve in curves.items():
            results[label] = {
                "sqnr": {fraction: curve(count) for fraction, count in counts.items()},
                "to target": curve.layers_to(target, bound),
                "to quantlab 10%": curve.layers_to(quantlab_at_bound, bound),
            }
        seconds["evaluate"] = time.perf_counter() - started
        started = time.perf_counter()
        exported = Scorer(search.fp32, held_out).score(create_session(search.export(orders["quantlab"][:bound]))).sqnr_db
        seconds["export check"] = time.perf_counter() - started
    started = time.perf_counter()
    proposal = mixed_precision(case.model, thresholds, case.calib, data=case.eval, target_sqnr=target, ranking=ranking, samples=None)
    seconds["--target-sqnr"] = time.perf_counter() - started
    return {
        "layers": len(layers), "counts": counts, "base": curves["quantlab"](0), "results": results, "seeds": seeds,
        "switch": quantlab_at_bound, "exported": exported, "proposal": proposal, "eval samples": scorer.samples,
        "seconds": seconds, "runs": scorer.runs,
    }


def merged(row: dict) -> dict[str, dict]:
    """quantlab's and ORT's rows, and the random seeds' mean (counts: the mean of the brackets' ends, where every seed
    reached the target)."""
    results = row["results"]
    seeds = [results[f"random {seed}"] for seed in range(row["seeds"])]
    rows = {label: values for label, values in results.items() if not label.startswith("random")}

    def mean(key: str) -> tuple[float, float] | None:
        brackets = [seed[key] for seed in seeds]
        if any(bracket is None for bracket in brackets):
            return None
        return statistics.fmean(low for low, _ in brackets), statistics.fmean(high for _, high in brackets)

    rows[f"random (mean of {row['seeds']})"] = {
        "sqnr": {fraction: statistics.fmean(seed["sqnr"][fraction] for seed in seeds) for fraction in FRACTIONS},
        "to target": mean("to target"),
        "to quantlab 10%": mean("to quantlab 10%"),
    }
    return {label: rows[label] for label in ("quantlab", f"random (mean of {row['seeds']})", "ORT xmodel", "ORT qdq")}


def _count(bracket) -> str:
    if bracket is None:
        return "-"
    low, high = bracket
    number = "{:g}" if isinstance(low, int) else "{:.1f}"
    return number.format(low) if low == high else f"{number.format(low)}-{number.format(high)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    realmodels.add_models_option(parser)
    parser.add_argument("--method", default="auto", help="quantlab's calibration method (default auto)")
    parser.add_argument("--target", type=float, default=30.0, help="target SQNR of the worst float output, dB (default 30)")
    parser.add_argument("--seeds", type=int, default=3, help="random orders to average (default 3)")
    args = parser.parse_args()
    names = realmodels.chosen_models(parser, args)
    console = Console(width=200)
    started = time.perf_counter()
    summary = []
    for name in names:
        row = measure(name, args.method, args.target, args.seeds)
        rows = merged(row)
        counts, layers = row["counts"], row["layers"]
        table = Table(
            title=f"{name}: {layers} quantizable layers, every layer INT8 {row['base']:.2f} dB (worst float output, "
            f"{row['eval samples']} eval samples; {args.method} thresholds, tensorrt target)"
        )
        columns = [f"{fraction:.0%} in float ({counts[fraction]})" for fraction in FRACTIONS]
        at_bound = row["switch"]
        for column in ("order", *[f"SQNR dB, {c}" for c in columns], f"layers to {args.target:g} dB", f"layers to {at_bound:.2f} dB (quantlab's 10%)"):
            table.add_column(column, justify="left" if column == "order" else "right")
        for label, values in rows.items():
            table.add_row(
                label,
                *[f"{values['sqnr'][fraction]:.2f}" for fraction in FRACTIONS],
                _count(values["to target"]),
                _count(values["to quantlab 10%"]),
            )
        console.print(table)
        reach = {label: values["to target"][1] for label, values in rows.items() if values["to target"] is not None}
        best_at_bound = max(rows, key=lambda label: rows[label]["sqnr"][max(FRACTIONS)])
        fewest = [label for label, value in reach.items() if value == min(reach.values())]
        proposal = row["proposal"]
        console.print(f"quantlab drift --target-sqnr {args.target:g}: {proposal.message('eval/')}", soft_wrap=True)
        console.print(
            f"switch model vs export, quantlab's {counts[max(FRACTIONS)]} layers: {at_bound:.3f} vs {row['exported']:.3f} dB;"
            f" seconds: " + ", ".join(f"{key} {value:.1f}" for key, value in row["seconds"].items()) + f"; {row['runs']} eval runs",
            soft_wrap=True,
        )
        summary.append((name, best_at_bound, fewest, proposal))
        console.print()
    table = Table(title="which order wins (held out: ordered on calib/, measured on eval/)")
    for column in ("model", "highest SQNR at 10%", f"fewest layers to {args.target:g} dB", f"--target-sqnr {args.target:g}"):
        table.add_column(column)
    for name, best, fewest, proposal in summary:
        reached = "reached" if proposal.reached else "not reached"
        table.add_row(name, best, ", ".join(fewest) or "none reaches it", f"{reached}: {proposal.measured.sqnr_db:.2f} dB, {proposal.share()}")
    console.print(table)
    console.print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
