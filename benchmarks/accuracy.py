"""INT8 accuracy on the real-model benchmark set: quantlab against ONNX Runtime's and ModelOpt's quantizers, held out.

Per model of the set (benchmarks/realmodels.py), every configuration is calibrated on the model's calib/ samples and
measured on its held-out eval/ samples, all in one run, one table per model:

- quantlab, through the library API: histograms collected once per model on calib/ (`quantlab.collect`), then per
  method (kl, max, percentile, mse, and auto where `"auto" in quantlab.calibration.METHODS`, called as
  `quantlab.calibrate(histograms, method="auto", model=..., data=calib, target=...)`; "not available" otherwise)
  `quantlab.calibrate` and `quantlab.export_qdq` for both export targets, tensorrt (the default) and onnxruntime
  (amax plus the tensors' min/max, as `quantlab calibrate` writes them). Mixed precision: the default method's model
  (default target) with ceil(1%, 5%, 10%) of its quantizable weighted layers kept in float, chosen by
  `quantlab.drift.propose_fp32` (its sensitivity ranking, measured on calib/); one call for the largest count, whose
  ranking gives the smaller ones too.
- ONNX Runtime `quantize_static` (benchmarks/int8_speed.py's runner): QDQ, int8 per-channel weights, MinMax,
  Percentile and Entropy calibration, each with symmetric int8 and asymmetric uint8 activations.
- ModelOpt `modelopt.onnx.quantization.quantize`, int8, entropy and max, `high_precision_dtype="fp32"`, CPU
  calibration, run by the interpreter of --modelopt-python (a virtual environment holding torch and ModelOpt, below).

Every configuration runs in a fresh process (benchmarks/_sidebyside.py) with a time limit (--timeout, 300 s; the
mixed-precision process, which makes 3 rows, --mixed-timeout, 1500 s): a hanging peer shows as "timeout", a failing
one as "error: <its last stderr line>"; and, to spare the machine, an address-space cap (--memory-limit-gb, 12). Its
row gives:
- seconds: wall time of calibration and quantization inside that process (imports not counted); quantlab's rows add
  the seconds of their model's one collection process;
- peak RSS: VmHWM of that process (/proc/self/status, read at its end: interpreter and imports included); quantlab's
  rows take the larger of it and the collection process's;
- SQNR: of INT8 against FP32 per float graph output, summed over the eval samples, the worst output's (its name in
  brackets where the model has several), and that output's cosine;
- the model's task metric (realmodels.task_metric) of INT8 against FP32 on the eval samples.
Every model, FP32 and INT8, is evaluated in this process, on ONNX Runtime's CPU provider (the engine that runs here).
After each table, one line: quantlab's default (calibrate's default method, export's default target) against the best
peer configuration (highest SQNR), met when the default's SQNR and task metric are both at least that configuration's
(issue 19's criterion).

Usage:
  python benchmarks/realmodels.py prepare     # once: the models and their calib/ and eval/ samples
  python -m venv --system-site-packages /tmp/mo-venv && /tmp/mo-venv/bin/pip install torch==2.13.0 \\
      && /tmp/mo-venv/bin/pip install nvidia-modelopt==0.47.0 cppimport==26.4.17 lief==1.0.0 \\
      onnx-graphsurgeon==0.6.1 onnxconverter-common==1.16.0 onnxscript==0.7.2 onnx-ir==1.1.0 onnxslim==0.1.98 \\
      polygraphy==0.53.6
  python benchmarks/accuracy.py [--models a,b] [--quick] [--timeout 300] [--modelopt-python /tmp/mo-venv/bin/python]
The venv is ModelOpt's alone: `nvidia-modelopt[onnx]` would put onnx 1.21 and onnxruntime-gpu 1.24 in place of
quantlab's, so its onnx dependencies are installed one by one, pinned, over the system's onnx and onnxruntime (and
torch, ModelOpt stay out of quantlab's runtime and test dependencies). Without ModelOpt its rows say "not available".
--quick: the default target only, no mixed precision, no ORT Entropy (MODELS.md: it gives MinMax's scales).
--keep keeps the work folder (histograms, every INT8 model) under the cache's work/.

Time on 2 cores: the mixed-precision rows take most of it (propose_fp32 measures the model once per weighted layer, on
calib/; 5-7 min for each of det, rec and YOLOv8n on a loaded machine), then ONNX Runtime's Percentile/Entropy and
ModelOpt's entropy (ORT's entropy search in Python over ModelOpt's histograms: 2 min on Silero alone); --quick skips
the first. Progress goes to stderr, one line per configuration; the tables and summary lines to stdout.
"""

from __future__ import annotations

import argparse
import inspect
import math
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import realmodels

QUANTLAB_METHODS = ("kl", "max", "percentile", "mse", "auto")
TARGETS = ("tensorrt", "onnxruntime")
MIXED_FRACTIONS = (0.01, 0.05, 0.10)
ORT_METHODS = ("MinMax", "Percentile", "Entropy")
ORT_ACTIVATIONS = {"int8": ("QInt8", True), "uint8": ("QUInt8", False)}  # name: (QuantType, ActivationSymmetric)
MODELOPT_METHODS = ("entropy", "max")
DEFAULT_MODELOPT_PYTHON = "/tmp/mo-venv/bin/python"


# ---- jobs: each runs in a fresh process and returns {"seconds": ...} (plus what the parent needs) ----


def collect_job(model: str, calib: str, out: str) -> dict:
    """quantlab's histograms of every activation over calib/, saved to `out`."""
    import quantlab

    start = time.perf_counter()
    quantlab.collect(model, calib).save(out)
    return {"seconds": time.perf_counter() - start}


def _quantlab_thresholds(model: str, calib: str, histograms, method: str, target: str):
    """`quantlab.calibrate`'s thresholds with the histograms' min/max (the onnxruntime target's asymmetric ranges)."""
    import quantlab
    from quantlab.formats import Thresholds

    options = {"model": model, "data": calib, "target": target} if method == "auto" else {}
    amax = quantlab.calibrate(histograms, method=method, **options)
    return amax if isinstance(amax, Thresholds) else Thresholds(dict(amax), min_max=histograms.min_max())


def quantlab_job(model: str, calib: str, histograms: str, method: str, target: str, out: str) -> dict:
    """One method's thresholds from the saved histograms, exported as a Q/DQ model for `target`."""
    import quantlab

    start = time.perf_counter()
    with warnings.catch_warnings():  # KL's and the unquantizable tensors' warnings: the SQNR column shows the effect
        warnings.simplefilter("ignore")
        thresholds = _quantlab_thresholds(model, calib, quantlab.load_histograms(histograms), method, target)
        quantlab.export_qdq(model, thresholds, out, target=target, data=calib)
    return {"seconds": time.perf_counter() - start}


def mixed_job(model: str, calib: str, histograms: str, method: str, target: str, fractions: str, out_dir: str) -> dict:
    """The method's model with ceil(fraction x layers) of the quantizable weighted layers in float, for each fraction:
    one `propose_fp32` call (ranking on calib) for the largest count; the smaller ones are prefixes of its ranking.
    Writes `out_dir`/keep-<fraction>.onnx."""
    import quantlab
    from quantlab.drift import _layers, propose_fp32
    from quantlab.formats.qdq import quantize_qdq

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        thresholds = _quantlab_thresholds(model, calib, quantlab.load_histograms(histograms), method, target)
        layers = len(_layers(quantize_qdq(model, thresholds, target=target)))
        counts = {fraction: math.ceil(float(fraction) * layers) for fraction in fractions.split(",")}
        history, _ = propose_fp32(model, thresholds, calib, keep=max(counts.values()), target=target)
        kept = {fraction: history[min(count, len(history) - 1)].kept_fp32 for fraction, count in counts.items()}
        for fraction, names in kept.items():
            quantlab.export_qdq(model, thresholds, Path(out_dir) / f"keep-{fraction}.onnx", keep_fp32=names, target=target, data=calib)
    return {"seconds": time.perf_counter() - start, "layers": layers, "kept": kept}


def ort_job(model: str, calib: str, method: str, activations: str, out: str) -> dict:
    """ONNX Runtime's quantize_static (int8_speed.ort_quantized) with `method` and int8 or uint8 activations."""
    import onnx
    from int8_speed import ort_quantized

    feeds = realmodels.load_samples(Path(model), Path(calib))
    activation_type, symmetric = ORT_ACTIVATIONS[activations]
    start = time.perf_counter()
    quantized = ort_quantized(Path(model), feeds, symmetric, calibrate_method=method, activation_type=activation_type)
    seconds = time.perf_counter() - start
    onnx.save(quantized, out)
    return {"seconds": seconds}


def modelopt_job(model: str, calib: str, method: str, out: str) -> dict:
    """ModelOpt's ONNX int8 quantization with `method`, float32 elsewhere, calibrated on the CPU. ModelOpt reads the
    model from a copy in a temp folder (it may write beside its input)."""
    from modelopt.onnx.quantization import quantize
    from onnxruntime.quantization import CalibrationDataReader

    class Feeds(CalibrationDataReader):  # ModelOpt reads the data several times: get_first and rewind too
        def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
            self.feeds = feeds
            self.rewind()

        def get_next(self):
            return next(self.iterator, None)

        def get_first(self):
            return self.feeds[0]

        def rewind(self) -> None:
            self.iterator = iter(self.feeds)

    reader = Feeds(realmodels.load_samples(Path(model), Path(calib)))
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "model.onnx"
        shutil.copyfile(model, source)
        start = time.perf_counter()
        quantize(
            str(source), quantize_mode="int8", calibration_data_reader=reader, calibration_method=method,
            calibration_eps=["cpu"], high_precision_dtype="fp32", output_path=out, log_level="WARNING",
        )
        return {"seconds": time.perf_counter() - start}


# ---- the parent: runs the jobs, evaluates their models, prints the tables ----


@dataclass
class Row:
    """One configuration's line of a model's table."""

    tool: str
    config: str
    status: str = "ok"  # ok, timeout, out of memory, error: ..., not available: ...
    seconds: float | None = None
    peak_mb: float | None = None
    sqnr: float | None = None
    cosine: float | None = None
    output: str = ""
    metric: float | None = None
    default: bool = False
    note: str = ""
    extra: dict = field(default_factory=dict)


@dataclass
class Settings:
    timeout: float
    mixed_timeout: float
    memory_limit_gb: float | None
    modelopt_python: str | None  # None: ModelOpt not available (the reason in modelopt_missing)
    modelopt_missing: str = ""


def one_line(text: str, width: int = 110) -> str:
    """The last non-empty line of a process's stderr, cut to `width` characters."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[-1] if lines else "no stderr"
    return line if len(line) <= width else line[: width - 3] + "..."


def run_job(settings: Settings, job: str, *args: str, python: str | None = None, timeout: float | None = None) -> dict:
    """A job in a fresh process: its result dict with peak_rss_mb, or {"status": why it has none}."""
    from _sidebyside import measure_in_fresh_process

    timeout = timeout or settings.timeout
    try:
        result = measure_in_fresh_process(
            "accuracy", job, *args, memory_limit_gb=settings.memory_limit_gb, timeout=timeout, python=python,
            echo_stderr=False,
        )
    except subprocess.TimeoutExpired:
        return {"status": f"timeout ({timeout:.0f} s)"}
    except subprocess.CalledProcessError as exc:
        return {"status": f"error: {one_line(exc.stderr or '')}"}
    if result.get("out_of_memory"):
        return {"status": f"out of memory ({settings.memory_limit_gb:g} GB cap): {result.get('error', '')}"[:120]}
    return {"status": "ok", **result}


def float_outputs(reference: list[dict[str, np.ndarray]]) -> list[str]:
    return [name for name, value in reference[0].items() if np.issubdtype(value.dtype, np.floating)]


def evaluate(row: Row, case: realmodels.Case, reference: list[dict[str, np.ndarray]], path: Path) -> None:
    """Fill the row's SQNR, cosine (worst float output over the eval samples) and task metric from the INT8 model."""
    from quantlab.drift import PairSums

    try:
        observed = realmodels.run_model(path, case.eval)
        names = float_outputs(reference)
        sums = {name: PairSums() for name in names}
        for fp32, int8 in zip(reference, observed):
            for name in names:
                sums[name].add(fp32[name], int8[name])
        worst = min((sums[name].result(name, "") for name in names), key=lambda drift: drift.sqnr_db)
        row.sqnr, row.cosine = worst.sqnr_db, worst.cosine
        row.output = worst.name if len(names) > 1 else ""
        row.metric = realmodels.task_metric(case.name, reference, observed)[1]
    except Exception as exc:  # a peer's model ONNX Runtime cannot run, say
        row.status = f"error: evaluation: {one_line(str(exc) or type(exc).__name__)}"


def add_times(row: Row, result: dict, collected: dict | None = None) -> None:
    """The row's seconds and peak RSS from its job's result (plus the collection process's, for quantlab's rows)."""
    row.seconds = result["seconds"] + (collected["seconds"] if collected else 0.0)
    row.peak_mb = max(result["peak_rss_mb"], collected["peak_rss_mb"] if collected else 0.0)


def quantlab_rows(case, reference, work: Path, settings: Settings, targets, mixed: bool) -> tuple[list[Row], dict]:
    """quantlab's rows: every method per target, then mixed precision of the default method and target; and the
    collection process's result."""
    import quantlab
    from quantlab.formats.qdq import DEFAULT_TARGET

    default_method = inspect.signature(quantlab.calibrate).parameters["method"].default
    rows = []
    histograms = work / "histograms.npz"
    collected = run_job(settings, "collect_job", str(case.model), str(case.calib), str(histograms))
    progress(case.name, "quantlab collect", collected)
    for target in targets:
        for method in QUANTLAB_METHODS:
            row = Row("quantlab", f"{method} ({target})", default=(method, target) == (default_method, DEFAULT_TARGET))
            rows.append(row)
            if not method_available(method):
                row.status, row.note = "not available", f"quantlab has no {method} calibration yet"
                continue
            if collected["status"] != "ok":
                row.status = f"collect {collected['status']}"
                continue
            out = work / f"quantlab-{method}-{target}.onnx"
            result = run_job(settings, "quantlab_job", str(case.model), str(case.calib), str(histograms), method, target, str(out))
            finish(row, case, reference, result, out, collected)
    if mixed:
        fractions = ",".join(f"{fraction:g}" for fraction in MIXED_FRACTIONS)
        mixed_rows = {
            fraction: Row("quantlab", f"{default_method} ({DEFAULT_TARGET}) + {float(fraction):.0%} of layers in float")
            for fraction in fractions.split(",")
        }
        rows.extend(mixed_rows.values())
        if collected["status"] != "ok":
            result = {"status": f"collect {collected['status']}"}
        else:
            result = run_job(
                settings, "mixed_job", str(case.model), str(case.calib), str(histograms), default_method, DEFAULT_TARGET,
                fractions, str(work), timeout=settings.mixed_timeout,
            )
        for fraction, row in mixed_rows.items():
            if result["status"] == "ok":
                kept = result["kept"][fraction]
                row.config = f"{default_method} ({DEFAULT_TARGET}) + {float(fraction):.0%}: {len(kept)} of {result['layers']} layers in float"
                row.note = "one ranking for the 3 rows"
            finish(row, case, reference, result, work / f"keep-{fraction}.onnx", collected)
    return rows, collected


def method_available(method: str) -> bool:
    """Whether quantlab.calibrate takes `method`: a histogram method of METHODS, or auto (registered there, or handled
    by calibrate itself from quantlab/calibration/auto.py)."""
    import importlib.util

    import quantlab.calibration

    if method in quantlab.calibration.METHODS:
        return True
    return method == "auto" and importlib.util.find_spec("quantlab.calibration.auto") is not None


def finish(row: Row, case, reference, result: dict, out: Path, collected: dict | None = None) -> None:
    """A job's result into its row: the status, or the times and the evaluation of the model it wrote."""
    if result["status"] != "ok":
        row.status = result["status"]
    else:
        add_times(row, result, collected)
        evaluate(row, case, reference, out)
    progress(case.name, f"{row.tool} {row.config}", {"status": row.status, "seconds": row.seconds})


def peer_rows(case, reference, work: Path, settings: Settings, quick: bool) -> list[Row]:
    """ONNX Runtime's quantize_static and ModelOpt's rows."""
    rows = []
    for method in ORT_METHODS:
        if quick and method == "Entropy":
            continue
        for activations, (_, symmetric) in ORT_ACTIVATIONS.items():
            row = Row("ORT", f"{method}, {activations} {'sym' if symmetric else 'asym'}")
            rows.append(row)
            out = work / f"ort-{method}-{activations}.onnx"
            finish(row, case, reference, run_job(settings, "ort_job", str(case.model), str(case.calib), method, activations, str(out)), out)
    for method in MODELOPT_METHODS:
        row = Row("ModelOpt", f"{method}, fp32")
        rows.append(row)
        if settings.modelopt_python is None:
            row.status = f"not available: {settings.modelopt_missing}"
            continue
        out = work / f"modelopt-{method}.onnx"
        result = run_job(settings, "modelopt_job", str(case.model), str(case.calib), method, str(out), python=settings.modelopt_python)
        finish(row, case, reference, result, out)
    return rows


def progress(model: str, what: str, result: dict) -> None:
    seconds = f" {result['seconds']:.1f} s" if result.get("seconds") is not None else ""
    print(f"{model} {what}: {result['status']}{seconds}", file=sys.stderr, flush=True)


def better(name: str, a: float, b: float) -> bool:
    """Whether task-metric value a is at least as good as b."""
    return a <= b if name in realmodels.LOWER_IS_BETTER else a >= b


def summary(name: str, metric: str, rows: list[Row]) -> tuple[str, bool | None]:
    """The line: quantlab's default against the best peer configuration (highest SQNR, then task metric), whether the
    criterion is met, and quantlab's best row for reference."""
    measured = [row for row in rows if row.status == "ok"]
    default = next((row for row in measured if row.default), None)
    peers = [row for row in measured if row.tool != "quantlab"]
    if default is None or not peers:
        return f"{name}: no comparison (quantlab's default or every peer did not run)", None

    def rank(row: Row) -> tuple[float, float]:
        return row.sqnr, -row.metric if name in realmodels.LOWER_IS_BETTER else row.metric

    best = max(peers, key=rank)
    ours = max((row for row in measured if row.tool == "quantlab"), key=rank)
    sqnr_met, metric_met = default.sqnr >= best.sqnr, better(name, default.metric, best.metric)
    line = (
        f"{name}: quantlab default {default.config} {default.sqnr:.2f} dB, {metric} {default.metric:.3f} | best peer "
        f"{best.tool} {best.config} {best.sqnr:.2f} dB, {best.metric:.3f} -> SQNR {'met' if sqnr_met else 'miss'} "
        f"({default.sqnr - best.sqnr:+.2f} dB), task metric {'met' if metric_met else 'miss'}: "
        f"{'MET' if sqnr_met and metric_met else 'MISSED'} | quantlab's best: {ours.config} {ours.sqnr:.2f} dB, {ours.metric:.3f}"
    )
    return line, sqnr_met and metric_met


def print_model(console, case, rows: list[Row], metric: str, outputs: list[str], collected: dict) -> None:
    from rich.table import Table

    direction = "lower is better" if case.name in realmodels.LOWER_IS_BETTER else "higher is better"
    table = Table(title=f"{case.name}: INT8 vs FP32 on {len(list(case.eval.iterdir()))} held-out samples "
                        f"(float outputs: {', '.join(outputs)})")
    for column in ("tool", "configuration", "SQNR dB", "cosine", f"{metric} ({direction})", "seconds", "peak RSS MB", "note"):
        table.add_column(column, justify="left" if column in ("tool", "configuration", "note") else "right", overflow="fold")
    for row in rows:
        label = row.config + (" [default]" if row.default else "")
        if row.status != "ok":
            table.add_row(row.tool, label, row.status, "", "", "", "", row.note)
            continue
        sqnr = f"{row.sqnr:.2f}" + (f" ({row.output})" if row.output else "")
        table.add_row(
            row.tool, label, sqnr, f"{row.cosine:.6f}", f"{row.metric:.3f}", f"{row.seconds:.1f}", f"{row.peak_mb:.0f}", row.note
        )
    if collected["status"] == "ok":
        table.caption = (
            f"quantlab's histograms, collected once on calib/ and counted in every quantlab row: "
            f"{collected['seconds']:.1f} s, {collected['peak_rss_mb']:.0f} MB peak RSS"
        )
    console.print(table)


def modelopt_interpreter(python: str) -> tuple[str | None, str]:
    """The interpreter that imports ModelOpt's ONNX quantization, or None and why not."""
    if not Path(python).exists():
        return None, f"{python} not found (see the docstring to make it)"
    check = subprocess.run(
        [python, "-c", "import modelopt, modelopt.onnx.quantization; print(modelopt.__version__)"],
        capture_output=True, text=True,
    )
    if check.returncode != 0:
        return None, one_line(check.stderr)
    return python, check.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    realmodels.add_models_option(parser)
    parser.add_argument("--quick", action="store_true", help="default target only, no mixed precision, no ORT Entropy")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per configuration's process (default 300)")
    parser.add_argument(
        "--mixed-timeout", type=float, default=1500, help="seconds for the mixed-precision process (its 3 rows; default 1500)"
    )
    parser.add_argument("--memory-limit-gb", type=float, default=12, help="address-space cap per process (0: none)")
    parser.add_argument("--modelopt-python", default=DEFAULT_MODELOPT_PYTHON, help="interpreter with torch and ModelOpt")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (histograms, INT8 models)")
    args = parser.parse_args()
    names = realmodels.chosen_models(parser, args)
    from quantlab.formats.qdq import DEFAULT_TARGET
    from rich.console import Console

    python, version = modelopt_interpreter(args.modelopt_python)
    settings = Settings(args.timeout, args.mixed_timeout, args.memory_limit_gb or None, python, "" if python else version)
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    started = time.perf_counter()
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)  # the evaluation sessions' warnings about peers' unused initializers
    print(
        f"ONNX Runtime {onnxruntime.__version__} CPU; ModelOpt: {version if python else 'not available: ' + version}; "
        f"limit per configuration {args.timeout:.0f} s, mixed precision {args.mixed_timeout:.0f} s"
        + (" (--quick)" if args.quick else ""), flush=True
    )
    targets = (DEFAULT_TARGET,) if args.quick else TARGETS
    lines, kept = [], []
    for name in names:
        case = realmodels.prepare(name)
        reference = realmodels.run_model(case.model, case.eval)
        metric = realmodels.task_metric(name, reference, reference)[0]
        (realmodels.cache_dir() / "work").mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f"accuracy-{name}-", dir=realmodels.cache_dir() / "work"))
        model_started = time.perf_counter()
        try:
            rows, collected = quantlab_rows(case, reference, work, settings, targets, mixed=not args.quick)
            rows += peer_rows(case, reference, work, settings, args.quick)
        finally:
            if args.keep:
                kept.append(str(work))
            else:
                shutil.rmtree(work, ignore_errors=True)
        print_model(console, case, rows, metric, float_outputs(reference), collected)
        line, met = summary(name, metric, rows)
        lines.append((line, met))
        print(f"{line}\n({name}: {time.perf_counter() - model_started:.0f} s)\n", flush=True)
    print("Summary (issue 19: quantlab's default >= the best peer configuration on SQNR and task metric):")
    for line, _ in lines:
        print("  " + line)
    met = sum(1 for _, ok in lines if ok)
    print(f"criterion met on {met} of {len(lines)} models; total {time.perf_counter() - started:.0f} s")
    if kept:
        print("work folders kept: " + ", ".join(kept))


if __name__ == "__main__":
    main()
