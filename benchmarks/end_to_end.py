"""quantlab's CLI end to end on the real-model benchmark set (benchmarks/realmodels.py): which stage breaks where.

Per model, each stage in its own process with a time limit (a hang shows as a timeout, the run goes on):
  quantlab collect MODEL --data CALIB --out W/hist.npz -q
  quantlab calibrate W/hist.npz --out W/thresholds.json            (default method)
  quantlab export MODEL --thresholds W/thresholds.json --out W/model.qdq.onnx
  quantlab drift MODEL --data EVAL --qdq W/model.qdq.onnx --json W/drift.json
  task metric: FP32 model.onnx and W/model.qdq.onnx in ONNX Runtime on EVAL, realmodels.task_metric
Prints one table: per stage "ok" or the last line of its stderr, and its seconds (a stage whose input a failed stage
should have made is skipped); the final-output SQNR of drift.json (its worst output) and the task metric. W is a work
folder under the cache's work/, removed afterwards unless --keep (each stage's stdout and stderr are kept there).
The exit code is 0 whenever the table is printed, however many stages failed: the table is the report.
Usage: python benchmarks/end_to_end.py [--models a,b] [--keep] [--timeout 300]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import realmodels
from rich.console import Console
from rich.table import Table

# The task-metric stage's process: realmodels.task_metric over the eval samples, written as JSON [name, value].
_METRIC_CODE = (
    "import json, sys; from pathlib import Path; sys.path.insert(0, %r); import realmodels as r; "
    "name, model, data, qdq, out = sys.argv[1:]; "
    "metric = r.task_metric(name, r.run_model(Path(model), Path(data)), r.run_model(Path(qdq), Path(data))); "
    "Path(out).write_text(json.dumps(metric))"
) % str(Path(__file__).resolve().parent)


@dataclass
class StageResult:
    """How one stage ended: status is ok, failed, timeout or skipped; message is the failure's one line."""

    status: str
    seconds: float | None = None
    message: str = ""


def last_line(path: Path) -> str:
    """The last non-empty line of a log file ('' for an empty or missing file)."""
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()] if path.exists() else []
    return lines[-1] if lines else ""


def short_message(message: str, case: realmodels.Case, work: Path, width: int = 130) -> str:
    """A stage's error line for the table: the model's path dropped where it leads the message, the other cache paths
    written as the names the docstring uses (calib, eval, W), quantlab's "quantlab: " prefix dropped, cut to `width`
    characters; what identifies the failure (a tensor name, say) then mostly survives the cut."""
    for path, name in ((f"{case.model}: ", ""), (work, "W"), (case.model, "model.onnx"), (case.calib, "calib"), (case.eval, "eval")):
        message = message.replace(str(path), name)
    message = message.removeprefix("quantlab: ")
    return message if len(message) <= width else message[: width - 3] + "..."


def run_stage(command: list[str], log: Path, timeout: float, produces: Path) -> StageResult:
    """`command` in a new process group, stdout and stderr to `log`.out / `log`.err; killed (the whole group) after
    `timeout` seconds. Ok only when it exits 0 and wrote `produces`."""
    out, err = log.with_suffix(".out"), log.with_suffix(".err")
    start = time.perf_counter()
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:  # on a timeout, and on Ctrl-C here (the new session does not get the terminal's SIGINT)
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    seconds = time.perf_counter() - start
    if code is None:
        return StageResult("timeout", seconds, f"killed after {timeout:.0f} s")
    if code != 0:
        return StageResult("failed", seconds, last_line(err) or f"exit code {code}, no stderr")
    if not produces.is_file():
        return StageResult("failed", seconds, f"exit code 0 but {produces.name} was not written")
    return StageResult("ok", seconds)


def worst_final_sqnr(drift_json: Path) -> str:
    """The lowest final-output SQNR of a drift report, in dB (the output named when the model has several)."""
    outputs = json.loads(drift_json.read_text())["final"]["outputs"]
    # drift writes an infinite SQNR (identical outputs) as null
    worst = min(outputs, key=lambda o: math.inf if o["sqnr_db"] is None else o["sqnr_db"])
    value = "inf" if worst["sqnr_db"] is None else f"{worst['sqnr_db']:.2f}"
    return value if len(outputs) == 1 else f"{value} ({worst['name']})"


def run_model_stages(case: realmodels.Case, work: Path, timeout: float) -> tuple[dict[str, StageResult], str, str]:
    """The stages on one model, in order, each skipped once one before it failed; also the SQNR and metric cells."""
    quantlab = [sys.executable, "-m", "quantlab"]
    hist, thresholds, qdq, drift, metric = (work / f for f in ("hist.npz", "thresholds.json", "model.qdq.onnx", "drift.json", "metric.json"))
    commands = {
        "collect": (quantlab + ["collect", str(case.model), "--data", str(case.calib), "--out", str(hist), "-q"], hist),
        "calibrate": (quantlab + ["calibrate", str(hist), "--out", str(thresholds)], thresholds),
        "export": (quantlab + ["export", str(case.model), "--thresholds", str(thresholds), "--out", str(qdq)], qdq),
        "drift": (quantlab + ["drift", str(case.model), "--data", str(case.eval), "--qdq", str(qdq), "--json", str(drift)], drift),
        "task metric": ([sys.executable, "-c", _METRIC_CODE, case.name, str(case.model), str(case.eval), str(qdq), str(metric)], metric),
    }
    # What each stage needs: the task metric needs the exported model only, not drift.
    needs = {"calibrate": "collect", "export": "calibrate", "drift": "export", "task metric": "export"}
    results: dict[str, StageResult] = {}
    for stage, (command, produces) in commands.items():
        if stage in needs and results[needs[stage]].status != "ok":
            results[stage] = StageResult("skipped")
        else:
            results[stage] = run_stage(command, work / stage.replace(" ", "_"), timeout, produces)
        result = results[stage]
        result.message = short_message(result.message, case, work)
        seconds = "" if result.seconds is None else f" ({result.seconds:.1f} s)"
        print(f"{case.name} {stage}: {result.status}{seconds} {result.message}".rstrip(), file=sys.stderr, flush=True)
    sqnr = worst_final_sqnr(drift) if results["drift"].status == "ok" else ""
    task = "{}: {:.3f}".format(*json.loads(metric.read_text())) if results["task metric"].status == "ok" else ""
    return results, sqnr, task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    realmodels.add_models_option(parser)
    parser.add_argument("--keep", action="store_true", help="keep the work folders (stage logs, histograms, models)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per stage before it is killed")
    args = parser.parse_args()
    names = realmodels.chosen_models(parser, args)

    table = Table(title="quantlab end to end on the real-model set (FP32 vs Q/DQ INT8, held-out samples)")
    table.caption = "SQNR: drift's final output SQNR (the worst output's); task metric: FP32 vs Q/DQ on the eval samples"
    for column in ("model", "stage", "result", "seconds", "SQNR dB", "task metric"):
        table.add_column(column, overflow="fold")
    kept = []
    for name in names:
        try:
            case = realmodels.prepare(name)
        except Exception as exc:  # a model whose data cannot be made is reported like a failed stage
            message = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:100]
            table.add_row(name, "prepare", f"failed: {message}", "", "", "")
            table.add_section()
            continue
        (realmodels.cache_dir() / "work").mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=realmodels.cache_dir() / "work"))
        try:
            results, sqnr, task = run_model_stages(case, work, args.timeout)
        finally:
            if args.keep:
                kept.append(str(work))
            else:
                shutil.rmtree(work, ignore_errors=True)
        for index, (stage, result) in enumerate(results.items()):
            text = result.status if result.status in ("ok", "skipped") else f"{result.status}: {result.message}"
            seconds = "" if result.seconds is None else f"{result.seconds:.1f}"
            table.add_row(
                "" if index else name, stage, text, seconds,
                sqnr if stage == "drift" else "", task if stage == "task metric" else "",
            )
        table.add_section()
    if kept:
        table.caption += "\nwork folders kept: " + ", ".join(kept)
    console = Console()
    if not console.is_terminal:  # a log or a pipe: wide enough that the one-line errors stay nearly one line
        console = Console(width=240)
    console.print(table)


if __name__ == "__main__":
    main()
