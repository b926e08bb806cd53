"""Shared by the benchmarks: run one measurement in a fresh interpreter, print 1x-vs-Nx comparisons."""

from __future__ import annotations

import json
import os
import resource
import signal
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

# What a process that ran out of its address space leaves on stderr (Python's, NumPy's and ONNX Runtime's words).
_OUT_OF_MEMORY = ("MemoryError", "bad_alloc", "Failed to allocate", "Unable to allocate", "out of memory")


def measure_in_fresh_process(
    module: str,
    function: str,
    *args: str,
    memory_limit_gb: float | None = None,
    timeout: float | None = None,
    python: str | None = None,
    echo_stderr: bool = True,
) -> dict:
    """`benchmarks/<module>.py:<function>(*args)` in a new Python; its result dict plus that process's peak RSS.

    Peak RSS is VmHWM, which starts afresh at exec (getrusage's ru_maxrss would carry the parent's over).
    With `memory_limit_gb`, the process's address space is capped there (RLIMIT_AS), so that a tool that holds
    everything in memory fails alone instead of taking the machine down: a MemoryError in the function, or the process
    dying of an allocation failure, gives {"out_of_memory": True, "memory_limit_gb": ..., "seconds": None} (with the
    peak RSS reached where the function itself caught it), any other failure raises CalledProcessError with the
    process's stderr (also echoed to ours unless not `echo_stderr`). With `timeout` (seconds), the process runs in a
    session of its own, which is killed whole when the time is up (subprocess.TimeoutExpired). `python`: the
    interpreter (default: this one), e.g. a virtual environment's with a peer tool installed.
    """
    code = (
        "import json, sys; sys.path.insert(0, %r); import %s as b\n"
        "try:\n    r = b.%s(*%r)\n"
        "except MemoryError as e:\n    r = {'out_of_memory': True, 'seconds': None, 'error': repr(e)[:200]}\n"
        "r['peak_rss_mb'] = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) / 1024\n"
        "print(json.dumps(r))"
    ) % (str(Path(__file__).parent), module, function, list(args))
    limit = None if memory_limit_gb is None else int(memory_limit_gb * (1 << 30))

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    process = subprocess.Popen(
        [python or sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=cap if limit is not None else None, start_new_session=timeout is not None,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except BaseException:  # the time is up, or Ctrl-C here: the process and any it started go too
        if timeout is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.kill()
        process.communicate()
        raise
    done = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    if done.returncode == 0:
        result = json.loads(done.stdout.strip().splitlines()[-1])
    elif limit is not None and (
        any(word in done.stderr for word in _OUT_OF_MEMORY) or done.returncode in (-signal.SIGABRT, -signal.SIGSEGV, -signal.SIGKILL)
    ):
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        result = {"out_of_memory": True, "seconds": None, "peak_rss_mb": None, "error": lines[-1][:200] if lines else ""}
    else:
        if echo_stderr:
            sys.stderr.write(done.stderr[-4000:])
        raise subprocess.CalledProcessError(done.returncode, f"{module}.{function}{tuple(args)}", done.stdout, done.stderr)
    if result.get("out_of_memory"):
        result["memory_limit_gb"] = memory_limit_gb
    return result


def measure_interleaved(
    processes: int, jobs: dict[Any, tuple[str, ...]], memory_limits_gb: dict[Any, float] | None = None
) -> dict[Any, dict]:
    """Each job `(module, function, *args)` measured in `processes` fresh processes, the jobs taking turns (so that a
    slow spell of the machine hits every job alike): per job, the median seconds and peak RSS (a fresh process's
    timing and memory layout vary by 10-30% on these machines) and the spread: over all its rounds where a job
    reports its own "spread", else over its processes' seconds. `memory_limits_gb` caps the address space of some
    jobs' processes (`measure_in_fresh_process`); a job that runs out of memory in any process is reported as such."""
    limits = memory_limits_gb or {}
    runs: dict[Any, list[dict]] = {key: [] for key in jobs}
    for _ in range(processes):
        for key, job in jobs.items():
            runs[key].append(measure_in_fresh_process(*job, memory_limit_gb=limits.get(key)))
    results = {}
    for key, measured in runs.items():
        failed = [run for run in measured if run.get("out_of_memory")]
        if failed:
            results[key] = failed[0]
            continue
        result = dict(measured[0])
        for field in ("seconds", "peak_rss_mb"):
            result[field] = statistics.median(run[field] for run in measured)
        if all("spread" in run for run in measured):
            result["spread"] = [min(run["spread"][0] for run in measured), max(run["spread"][1] for run in measured)]
        else:
            result["spread"] = [min(run["seconds"] for run in measured), max(run["seconds"] for run in measured)]
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
