"""INT8 that runs as INT8: quantlab's onnxruntime-target model against ONNX Runtime's own quantizer, per real model.

Per model of the benchmark set (benchmarks/realmodels.py), calibrated on its calib samples, evaluated on its held-out
eval samples, in one process:

- quantlab: `collect` over calib, `calibrate` with each method (kl, max, percentile, mse; amax and the tensors'
  min/max, as `quantlab calibrate` writes a JSON table), `quantize_qdq(..., target="onnxruntime")`;
- ONNX Runtime: `quantize_static` on the model as shipped, QDQ, uint8 activations, int8 per-channel weights, MinMax
  over the same calib samples, asymmetric (`ActivationSymmetric=False`, its default) and symmetric;
- FP32 ms per sample, and the ms per sample of quantlab's model (--method) and of ONNX Runtime's asymmetric one, in
  the same run: fresh plain sessions, default threads and optimizations, one sample per run, each model timed alone
  in blocks of passes over the eval samples (a warm-up pass, then two timed ones) that take turns between the three
  models in a rotating order, the median pass (`quantlab.engine.measure_latency`), all of it repeated --rounds times
  (the median round is printed, the spread in brackets);
- integer-kernel coverage of both INT8 models: how many of the FP32 model's Conv/ConvTranspose/MatMul/Gemm ONNX
  Runtime's optimized graph runs as integer kernels (QLinearConv, QLinearMatMul, MatMulIntegerToFloat, QGemm, ...);
- final-output SQNR on the eval samples (the first float graph output, summed over samples) of quantlab's model for
  every method, of ONNX Runtime's asymmetric and symmetric models; and the task metric of realmodels.task_metric for
  quantlab (--method) and ONNX Runtime (asymmetric);
- issue 18's criteria for the timed quantlab model: >= 1.5x FP32's speed, at least as fast as ONNX Runtime's model,
  >= 90% of Conv/MatMul/Gemm as integer kernels, final SQNR >= ONNX Runtime's asymmetric model's ("met", or what
  is missed).

Prints one table. Usage: python benchmarks/int8_speed.py [--models a,b] [--method mse] [--rounds 3]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import realmodels
from rich.console import Console
from rich.table import Table

import quantlab
from quantlab.data import open_data
from quantlab.drift import measure_final
from quantlab.engine import integer_kernels, measure_latency, onnxruntime_engine, optimized_graph, single_samples
from quantlab.formats import Thresholds
from quantlab.formats.qdq import quantize_qdq
from quantlab.model import input_specs, load_model

METHODS = ("kl", "max", "percentile", "mse")
SPEEDUP, KERNEL_SHARE = 1.5, 0.9  # issue 18: the onnxruntime target's model vs FP32, and its integer-kernel share


def samples(model: onnx.ModelProto, directory: Path) -> list[dict[str, np.ndarray]]:
    """Every sample of a directory, one feed per sample."""
    with open_data(directory, input_specs(model), batch_size=1) as opened:
        return single_samples(opened, opened.inputs, count=10**9)


def ort_quantized(
    model_path: Path,
    calib: list[dict[str, np.ndarray]],
    symmetric: bool,
    calibrate_method: str = "MinMax",
    activation_type: str = "QUInt8",
) -> onnx.ModelProto:
    """ONNX Runtime's `quantize_static` output: QDQ, int8 per-channel weights, uint8 activations (or
    `activation_type`), MinMax (or `calibrate_method`: Percentile, Entropy) on calib."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(calib)

        def get_next(self):
            return next(self.feeds, None)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ort.qdq.onnx"
        quantize_static(
            str(model_path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType[activation_type], weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod[calibrate_method],
            extra_options={"ActivationSymmetric": symmetric},
        )
        return onnx.load(str(out))


def outputs(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    from quantlab.model import create_session

    session = create_session(model)
    names = [output.name for output in session.get_outputs()]
    return [dict(zip(names, session.run(names, feed))) for feed in feeds]


def measure(name: str, method: str, rounds: int) -> dict:
    """Every figure of one model's row."""
    case = realmodels.prepare(name)
    fp32 = load_model(case.model)
    calib, held_out = samples(fp32, case.calib), samples(fp32, case.eval)
    histograms = quantlab.collect(case.model, case.calib)
    min_max = histograms.min_max()
    with warnings.catch_warnings():  # KL's and the unquantizable tensors' warnings: the SQNR column shows the effect
        warnings.simplefilter("ignore")
        quantlab_models = {
            each: quantize_qdq(
                case.model, Thresholds(quantlab.calibrate(histograms, each), min_max=min_max), target="onnxruntime"
            )
            for each in METHODS
        }
    ort_models = {"asymmetric": ort_quantized(case.model, calib, False), "symmetric": ort_quantized(case.model, calib, True)}
    timed = {"fp32": fp32, "quantlab": quantlab_models[method], "onnxruntime": ort_models["asymmetric"]}
    latencies = [
        measure_latency(timed, held_out, min_passes=5, min_seconds=2.0, max_passes=50).ms_per_sample for _ in range(rounds)
    ]
    row = {
        "ms": {label: statistics.median(run[label] for run in latencies) for label in timed},
        "spread": {label: (min(run[label] for run in latencies), max(run[label] for run in latencies)) for label in timed},
        "kernels": {
            "quantlab": integer_kernels(fp32, optimized_graph(timed["quantlab"])),
            "onnxruntime": integer_kernels(fp32, optimized_graph(timed["onnxruntime"])),
        },
        "sqnr": {
            **{f"quantlab {each}": measure_final(fp32, model, held_out).sqnr_db for each, model in quantlab_models.items()},
            **{f"onnxruntime {each}": measure_final(fp32, model, held_out).sqnr_db for each, model in ort_models.items()},
        },
    }
    reference = outputs(fp32, held_out)
    row["task"] = {
        label: realmodels.task_metric(name, reference, outputs(timed[label], held_out)) for label in ("quantlab", "onnxruntime")
    }
    return row


def criteria(row: dict, method: str) -> str:
    """Issue 18's criteria for the timed quantlab model of one row: "met", or what is missed."""
    ms, kernels, sqnr = row["ms"], row["kernels"]["quantlab"], row["sqnr"]
    speedup, share = ms["fp32"] / ms["quantlab"], kernels["integer"] / kernels["weighted"]
    missed = [
        f"{speedup:.2f}x FP32 < {SPEEDUP}x" if speedup < SPEEDUP else "",
        f"slower than ORT ({ms['quantlab']:.2f} > {ms['onnxruntime']:.2f} ms)" if ms["quantlab"] > ms["onnxruntime"] else "",
        f"{share:.0%} integer < {KERNEL_SHARE:.0%}" if share < KERNEL_SHARE else "",
        "SQNR < ORT's" if sqnr[f"quantlab {method}"] < sqnr["onnxruntime asymmetric"] else "",
    ]
    missed = [each for each in missed if each]
    return "missed: " + "; ".join(missed) if missed else "met"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    realmodels.add_models_option(parser)
    parser.add_argument("--method", default="mse", choices=METHODS, help="quantlab's calibration method for the timed model")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds per model (the median is printed)")
    args = parser.parse_args()
    names = realmodels.chosen_models(parser, args)
    logging.disable(logging.WARNING)  # quantize_static's advice to pre-process, once per call

    table = Table(title=f"INT8 on {onnxruntime_engine()}: quantlab --target onnxruntime vs ONNX Runtime quantize_static")
    columns = (
        "model", "FP32 ms", f"quantlab ({args.method}) ms", "ORT ms", "integer kernels quantlab / ORT",
        "SQNR dB quantlab kl / max / pct / mse", "SQNR dB ORT asym / sym", "task metric quantlab / ORT", "issue 18",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "model" else "right", overflow="fold")
    for name in names:
        row = measure(name, args.method, args.rounds)
        ms, spread, kernels, sqnr = row["ms"], row["spread"], row["kernels"], row["sqnr"]

        def timing(label: str) -> str:
            low, high = spread[label]
            speedup = f" ({ms['fp32'] / ms[label]:.2f}x)" if label != "fp32" else ""
            return f"{ms[label]:.2f}{speedup} [{low:.2f}-{high:.2f}]"

        metric, ours = row["task"]["quantlab"]
        table.add_row(
            name,
            timing("fp32"),
            timing("quantlab"),
            timing("onnxruntime"),
            " / ".join(f"{k['integer']} of {k['weighted']}" for k in kernels.values()),
            " / ".join(f"{sqnr[f'quantlab {each}']:.2f}" for each in METHODS),
            f"{sqnr['onnxruntime asymmetric']:.2f} / {sqnr['onnxruntime symmetric']:.2f}",
            f"{metric}: {ours:.3f} / {row['task']['onnxruntime'][1]:.3f}",
            criteria(row, args.method),
        )
        print(f"{name} done", flush=True)
    table.caption = (
        "ms per sample: median of the rounds, \\[min-max] of the rounds, FP32 speed-up in brackets; each model timed "
        "alone in blocks of passes, the blocks taking turns. "
        "ORT: quantize_static, uint8 activations, int8 per-channel weights, MinMax on the calib samples (asym for "
        "timing and kernels). SQNR: first float output over the held-out eval samples. Issue 18 (for the CNNs): "
        f">= {SPEEDUP}x FP32's speed, at least ORT's, >= {KERNEL_SHARE:.0%} of Conv/MatMul/Gemm as integer kernels, "
        "SQNR >= ORT asym's, for the timed quantlab model."
    )
    console = Console()
    if not console.is_terminal:
        console = Console(width=220)
    console.print(table)


if __name__ == "__main__":
    main()
