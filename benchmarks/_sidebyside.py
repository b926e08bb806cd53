"""Shared by the benchmarks: run one measurement in a fresh interpreter, print 1x-vs-Nx comparisons."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any


def measure_in_fresh_process(module: str, function: str, *args: str) -> dict:
    """`benchmarks/<module>.py:<function>(*args)` in a new Python; its result dict plus that process's peak RSS.

    Peak RSS is VmHWM, which starts afresh at exec (getrusage's ru_maxrss would carry the parent's over).
    """
    code = (
        "import json, sys; sys.path.insert(0, %r); import %s as b; r = b.%s(*%r); "
        "r['peak_rss_mb'] = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) / 1024; "
        "print(json.dumps(r))"
    ) % (str(Path(__file__).parent), module, function, list(args))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure_interleaved(processes: int, jobs: dict[Any, tuple[str, ...]]) -> dict[Any, dict]:
    """Each job `(module, function, *args)` measured in `processes` fresh processes, the jobs taking turns (so that a
    slow spell of the machine hits every job alike): per job, the median seconds and peak RSS (a fresh process's
    timing and memory layout vary by 10-30% on these machines) and the spread over all its rounds."""
    runs: dict[Any, list[dict]] = {key: [] for key in jobs}
    for _ in range(processes):
        for key, job in jobs.items():
            runs[key].append(measure_in_fresh_process(*job))
    results = {}
    for key, measured in runs.items():
        result = dict(measured[0])
        for field in ("seconds", "peak_rss_mb"):
            result[field] = statistics.median(run[field] for run in measured)
        result["spread"] = [min(run["spread"][0] for run in measured), max(run["spread"][1] for run in measured)]
        results[key] = result
    return results


def print_comparison(results: dict[tuple[str, str], dict], sizes: list[str], versus: str, target: str = "") -> None:
    """Table of seconds and peak RSS per (tool, size), quantlab's speed ratio per size and RSS growth per tool."""
    print(f"{'tool':<12} {'data':>5} {'tensors':>8} {'seconds':>9} {'peak RSS MB':>12}  {'(min-max of rounds)'}")
    for (tool, size), r in results.items():
        spread = "  ({:.3f}-{:.3f})".format(*r["spread"]) if "spread" in r else ""
        print(f"{tool:<12} {size:>5} {r['tensors']:>8} {r['seconds']:>9.3f} {r['peak_rss_mb']:>12.1f}{spread}")
    for size in sizes:
        ratio = results[("onnxruntime", size)]["seconds"] / results[("quantlab", size)]["seconds"]
        print(f"speed ratio at {size}: quantlab is {ratio:.2f}x faster than {versus}{target}")
    for tool in ("quantlab", "onnxruntime"):
        growth = results[(tool, sizes[-1])]["peak_rss_mb"] / results[(tool, sizes[0])]["peak_rss_mb"] - 1
        print(f"peak RSS growth {sizes[0]} -> {sizes[-1]} for {tool}: {growth:+.1%}")
