"""quantlab collect on the real-model benchmark set, side by side with a plain ONNX Runtime pass and ONNX Runtime's
entropy calibrator, each measurement in a fresh process.

Per model of benchmarks/realmodels.py (its cache; `python benchmarks/realmodels.py prepare` builds it), two data
directories of symlinks to the model's calibration files as stored (.npy, or .npz for silero's two inputs; one
sample per file):
  1x   the calibration samples repeated until one plain ONNX Runtime pass over them takes about --seconds s (so that
       start-up costs do not decide the ratios), from a probe of the per-sample time. The issue's figures are at
       --seconds 3; the default is 1, which keeps the whole run near 15 minutes on 2 cores while quantlab's collect
       is 7-25x a plain pass (the 10x runs take most of it; at 3 s the run takes about three times as long);
  10x  1x ten times over: quantlab's memory check (ONNX Runtime's calibrator only with --ort-10x: it holds every
       activation of every sample).
Measured, each in its own fresh process (the median of --processes), wall seconds and peak RSS (VmHWM):
  plain     one pass of a plain InferenceSession (default options; created, and run once on the first sample,
            before the timer): each file read and run, one sample per run as stored;
  quantlab  `quantlab.collect(model, data, bins=2048)` (4096 signed bins), the whole call: model load, shape
            inference, session creation and both passes (imports before the timer);
  ORT       `create_calibrator(model, calibrate_method=CalibrationMethod.Entropy, extra_options={"num_bins": 4096})`
            (ORT's entropy num_bins are signed bins over [-max|x|, +max|x|]: quantlab's 2048 |x| bins), then
            `collect_data` over a CalibrationDataReader of the same files, timed alone: that is the comparison
            with quantlab's collect, which includes its set-up; ORT's create_calibrator (augmented model written,
            session created) is shown apart, and `compute_data` (ORT's KL loop, per tensor in Python: minutes on
            these models) only with --ort-compute. Its process runs with its address space capped at
            --ort-memory-gb, so that holding every activation shows as "out of memory" instead of swamping the machine.
Printed, one table per section:
  collection  per model: samples at 1x; plain s; quantlab s and quantlab/plain (target <= 2.5); ORT collect_data s
              and ORT/quantlab (target >= 5); quantlab's peak RSS at 1x and 10x and their ratio (target < 1.2); ORT's
              peak RSS at 1x; "exact": quantlab's counts and edges of a handful of tensors (one of them a Relu
              output, whose counts quantlab derives from its input's) equal to np.histogram over [-max|x|, max|x|]
              of the values a plain ONNX Runtime session gives over the calibration samples (a session with every
              tensor quantlab measures as an output, as quantlab's: fused nodes differ in their last bits);
  start-up    the calibration samples as stored (8-16, no repeat): whole-process wall time of
              `python -c "import quantlab; quantlab.collect(...)"` and of a process running ORT's create_calibrator +
              collect_data (interpreter start-up, imports, session creation included); target: quantlab not
              slower (ORT/quantlab >= 1);
  calibrate   `quantlab.calibrate` of the 1x histograms with the most tensors (ppocrv4_rec's 404) for every method and
              KL variant, in one process after a warm-up call each, median of 3 calls (target <= 1 s).
Usage: python benchmarks/collect.py [--models a,b] [--seconds 1] [--processes 1] [--skip-ort] [--ort-10x]
       [--ort-compute] [--ort-memory-gb 16] [--bins 2048]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import realmodels

HERE = Path(__file__).resolve().parent
EXACT_TENSORS = 6  # tensors checked against np.histogram per model
TARGETS = {"plain": 2.5, "ort": 5.0, "rss": 1.2, "calibrate": 1.0}
# The whole-process runs of the start-up section: nothing imported but what each tool needs.
QUANTLAB_PROCESS = "import sys, quantlab; quantlab.collect(sys.argv[1], sys.argv[2], bins=int(sys.argv[3]))"
ORT_PROCESS = (
    "import sys; sys.path.insert(0, %r); import collect; collect.ort_collect(sys.argv[1], sys.argv[2], int(sys.argv[3]))"
) % str(HERE)


def sample_files(directory: str | Path) -> list[Path]:
    """The sample files of a data directory, in the order quantlab reads them."""
    return sorted(p for p in Path(directory).iterdir() if p.suffix in (".npy", ".npz"))


def replicate(calib: Path, directory: Path, samples: int) -> Path:
    """A data directory of `samples` symlinks to the calibration files, cycling through them in order."""
    directory.mkdir(parents=True)
    files = sample_files(calib)
    for index in range(samples):
        source = files[index % len(files)]
        os.symlink(source, directory / f"{index:07d}_{source.name}")
    return directory


def _session(model: str):
    import onnxruntime as ort

    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return session, [spec.name for spec in session.get_inputs()]


def run_probe(model: str, calib: str) -> dict:
    """Seconds per sample of a plain pass (file read and run): passes over the calibration files for about a second
    (at least two), their mean (the fastest pass would undercount what a busy machine gives a longer pass)."""
    session, names = _session(model)
    files = sample_files(calib)
    session.run(None, realmodels.load_sample(files[0], names))
    passes, start = 0, time.perf_counter()
    while passes < 2 or time.perf_counter() - start < 1.0:
        for path in files:
            session.run(None, realmodels.load_sample(path, names))
        passes += 1
    return {"seconds": (time.perf_counter() - start) / (passes * len(files))}


def run_plain(model: str, data: str) -> dict:
    """One plain ONNX Runtime pass over the data directory, after one warm-up run."""
    session, names = _session(model)
    files = sample_files(data)
    session.run(None, realmodels.load_sample(files[0], names))
    start = time.perf_counter()
    for path in files:
        session.run(None, realmodels.load_sample(path, names))
    return {"seconds": time.perf_counter() - start, "samples": len(files)}


def run_quantlab(model: str, data: str, bins: str, save: str = "") -> dict:
    """`quantlab.collect` over the data directory; the histograms are saved to `save` (outside the timer) if given."""
    import quantlab
    import quantlab.collection  # noqa: F401  (imported before the timer: the start-up section measures imports)

    start = time.perf_counter()
    histograms = quantlab.collect(model, data, bins=int(bins))
    seconds = time.perf_counter() - start
    if save:
        histograms.save(save)
    return {"seconds": seconds, "tensors": len(histograms), "binned": histograms.metadata.get("binned_tensors")}


def ort_collect(model: str, data: str, bins: int, augmented: Path | None = None):
    """ONNX Runtime's entropy calibrator over the data directory: create_calibrator, then collect_data. Returns the
    calibrator and the seconds of each step."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, create_calibrator

    class Reader(CalibrationDataReader):
        def __init__(self, names: list[str]) -> None:
            self.names, self.files = names, iter(sample_files(data))

        def get_next(self):
            path = next(self.files, None)
            return None if path is None else realmodels.load_sample(path, self.names)

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        calibrator = create_calibrator(
            model,
            augmented_model_path=str(augmented or Path(tmp) / "augmented.onnx"),
            calibrate_method=CalibrationMethod.Entropy,
            extra_options={"num_bins": 2 * bins},
        )
        created = time.perf_counter()
        calibrator.collect_data(Reader([spec.name for spec in calibrator.infer_session.get_inputs()]))
        collected = time.perf_counter()
    return calibrator, created - start, collected - created


def run_onnxruntime(model: str, data: str, bins: str, compute: str = "0") -> dict:
    """ORT's entropy calibrator: create_calibrator and collect_data timed apart, compute_data if `compute` is "1". An
    allocation failure (the process runs under an address-space cap) is reported as out of memory."""
    try:
        calibrator, create, collect = ort_collect(model, data, int(bins))
        tensors = len(calibrator.collector.histogram_dict)
        computed = None
        if compute == "1":
            start = time.perf_counter()
            calibrator.compute_data()
            computed = time.perf_counter() - start
    except MemoryError:
        raise
    except Exception as exc:  # ONNX Runtime's own allocation failures are RuntimeExceptions
        if "alloc" not in str(exc).lower():
            raise
        return {"out_of_memory": True, "seconds": None, "error": str(exc).splitlines()[0][:200]}
    return {"seconds": collect, "create_seconds": create, "compute_seconds": computed, "tensors": tensors}


def run_exactness(model: str, calib: str, bins: str, count: str) -> dict:
    """quantlab's histograms of `count` activations (spread over the model, one Relu output among them where there
    is one) against np.histogram of their values from a plain ONNX Runtime session over the calibration samples, one
    sample per run. That session has every tensor quantlab measures as a graph output too, as quantlab's has: ONNX
    Runtime fuses nodes only across tensors that are not graph outputs (Conv + BatchNormalization, HardSwish), and
    a fused node's values differ in their last bits."""
    import onnx
    import onnxruntime as ort

    import quantlab

    bins = int(bins)
    histograms = quantlab.collect(model, calib, bins=bins)
    proto = onnx.load(model)
    inputs = {info.name for info in proto.graph.input}
    usable = [
        name for name, h in histograms.items()
        if name not in inputs and h.max != h.min and not (h.nan_count or h.inf_count)
    ]
    picked = [usable[i] for i in np.linspace(0, len(usable) - 1, min(int(count), len(usable))).round().astype(int)]
    relus = [node.output[0] for node in proto.graph.node if node.op_type == "Relu" and node.output[0] in usable]
    if relus and not set(relus) & set(picked):
        picked[len(picked) // 2] = relus[len(relus) // 2]
    picked = list(dict.fromkeys(picked))
    inferred = onnx.shape_inference.infer_shapes(proto).graph
    types = {info.name: info.type.tensor_type.elem_type for info in (*inferred.value_info, *inferred.output)}
    outputs = {info.name for info in proto.graph.output}
    for name in histograms:
        if name not in inputs and name not in outputs:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.FLOAT), None))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [spec.name for spec in session.get_inputs()]
    values: dict[str, list[np.ndarray]] = {name: [] for name in picked}
    for path in sample_files(calib):
        for name, array in zip(picked, session.run(picked, realmodels.load_sample(path, names))):
            values[name].append(array.ravel())
    mismatches = []
    for name in picked:
        flat = np.concatenate(values[name])
        finite = flat[np.isfinite(flat)]
        amax = np.abs(finite).max()
        counts, edges = np.histogram(finite, bins=2 * bins, range=(-amax, amax))
        hist = histograms[name]
        if not (np.array_equal(hist.counts, counts) and np.array_equal(hist.edges, edges)):
            mismatches.append(name)
    return {"checked": picked, "mismatches": mismatches, "relu": [name for name in picked if name in relus]}


def run_calibrate(path: str) -> dict:
    """`quantlab.calibrate` of a histogram file for every method and KL variant: a warm-up call, then the median of 3."""
    import warnings

    import quantlab
    from quantlab.calibration import kl

    histograms = quantlab.load_histograms(path)
    cases = [("kl", {"variant": variant}) for variant in kl.VARIANTS] + [("max", {}), ("percentile", {}), ("mse", {})]
    timings = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tensors left in float are named once per call
        for method, options in cases:
            quantlab.calibrate(histograms, method, **options)
            seconds = []
            for _ in range(3):
                start = time.perf_counter()
                quantlab.calibrate(histograms, method, **options)
                seconds.append(time.perf_counter() - start)
            label = method + "".join(f" {key}={value}" for key, value in options.items())
            timings[label] = statistics.median(seconds)
    return {"tensors": len(histograms), "timings": timings}


def process_seconds(code: str, *args: str) -> float:
    """Wall seconds of a whole `python -c code args` process."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True)
    return time.perf_counter() - start


def startup(case, bins: int, processes: int, skip_ort: bool) -> dict:
    """The start-up row: both whole processes over the calibration samples as stored, taking turns."""
    runs: dict[str, list[float]] = {"quantlab": [], "ort": []}
    args = (str(case.model), str(case.calib), str(bins))
    for _ in range(processes):
        runs["quantlab"].append(process_seconds(QUANTLAB_PROCESS, *args))
        if not skip_ort:
            runs["ort"].append(process_seconds(ORT_PROCESS, *args))
    return {tool: statistics.median(seconds) if seconds else None for tool, seconds in runs.items()}


def measure_model(case, args, work: Path) -> dict:
    """Every measurement of one model; its data directories are removed afterwards."""
    from _sidebyside import measure_in_fresh_process, measure_interleaved

    began = time.perf_counter()
    model, bins = str(case.model), str(args.bins)
    per_sample = measure_in_fresh_process("collect", "run_probe", model, str(case.calib))["seconds"]
    samples = max(1, round(args.seconds / per_sample))
    directory = work / case.name
    x1 = replicate(case.calib, directory / "x1", samples)
    x10 = replicate(case.calib, directory / "x10", 10 * samples)
    saved = directory / "histograms.npz"
    jobs = {
        "plain": ("collect", "run_plain", model, str(x1)),
        "quantlab": ("collect", "run_quantlab", model, str(x1), bins, str(saved)),
        "quantlab 10x": ("collect", "run_quantlab", model, str(x10), bins),
    }
    compute = "1" if args.ort_compute else "0"
    if not args.skip_ort:
        jobs["ort"] = ("collect", "run_onnxruntime", model, str(x1), bins, compute)
        if args.ort_10x:
            jobs["ort 10x"] = ("collect", "run_onnxruntime", model, str(x10), bins, "0")
    limits = {key: args.ort_memory_gb for key in jobs if key.startswith("ort")}
    results = measure_interleaved(args.processes, jobs, limits)
    results["samples"] = samples
    results["exact"] = measure_in_fresh_process("collect", "run_exactness", model, str(case.calib), bins, str(EXACT_TENSORS))
    results["startup"] = startup(case, args.bins, args.processes, args.skip_ort)
    results["calib_samples"] = len(sample_files(case.calib))
    results["histograms"] = saved
    for path in (x1, x10):
        for link in path.iterdir():
            link.unlink()
        path.rmdir()
    print(f"{case.name}: {samples} samples at 1x ({per_sample * 1e3:.2f} ms each), measured in "
          f"{time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)
    return results


def _ratio(value: float | None, target: float, at_most: bool) -> str:
    if value is None:
        return "-"
    met = value <= target if at_most else value >= target
    return f"{value:.2f}" + ("" if met else " (miss)")


def _ort_cell(result: dict | None, field: str = "seconds") -> str:
    if result is None:
        return "skipped"
    if result.get("out_of_memory"):
        peak = f", peak {result['peak_rss_mb'] / 1024:.1f} GB" if result.get("peak_rss_mb") else ""
        return f"out of memory at {result['memory_limit_gb']:g} GB{peak}"
    value = result.get(field)
    return "-" if value is None else f"{value:.2f}" if field.endswith("seconds") else f"{value:.0f}"


def print_tables(measured: dict[str, dict], calibrate: dict | None, args) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # a log or a pipe: wide enough for the collection table's columns
        console = Console(width=200)
    width = max(map(len, measured))
    table = Table(title=f"collect on the real-model set: 1x = one plain ONNX Runtime pass of about {args.seconds:g} s; "
                        f"{args.bins} |x| bins ({2 * args.bins} signed); median of {args.processes} fresh process(es)")
    table.add_column("model", no_wrap=True, min_width=width)
    columns = ["samples 1x", "plain s", "quantlab s", "quantlab / plain (<= 2.5)", "ORT create s", "ORT collect_data s",
               "ORT / quantlab (>= 5)", "quantlab RSS MB 1x", "quantlab RSS MB 10x", "10x / 1x (< 1.2)", "ORT RSS MB 1x"]
    columns += ["ORT compute_data s"] * args.ort_compute + ["ORT 10x collect_data s / RSS MB"] * args.ort_10x
    for column in columns:
        table.add_column(column, justify="right")
    table.add_column("exact")
    mismatched = []
    for name, r in measured.items():
        plain, ql, ql10, ort = r["plain"], r["quantlab"], r["quantlab 10x"], r.get("ort")
        ort_ok = ort is not None and not ort.get("out_of_memory")
        row = [
            name, str(r["samples"]), f"{plain['seconds']:.2f}", f"{ql['seconds']:.2f}",
            _ratio(ql["seconds"] / plain["seconds"], TARGETS["plain"], True),
            _ort_cell(ort, "create_seconds") if ort_ok else "-", _ort_cell(ort),
            _ratio(ort["seconds"] / ql["seconds"], TARGETS["ort"], False) if ort_ok else "-",
            f"{ql['peak_rss_mb']:.0f}", f"{ql10['peak_rss_mb']:.0f}",
            _ratio(ql10["peak_rss_mb"] / ql["peak_rss_mb"], TARGETS["rss"], True),
            _ort_cell(ort, "peak_rss_mb") if ort_ok else "-",
        ]
        if args.ort_compute:
            row.append(_ort_cell(ort, "compute_seconds") if ort_ok else "-")
        if args.ort_10x:
            ort10 = r.get("ort 10x")
            row.append(_ort_cell(ort10) if not ort10 or ort10.get("out_of_memory")
                       else f"{ort10['seconds']:.2f} / {ort10['peak_rss_mb']:.0f}")
        exact = r["exact"]
        row.append(f"ok ({len(exact['checked'])})" if not exact["mismatches"] else f"MISMATCH ({len(exact['mismatches'])})")
        mismatched += [f"{name}: {tensor}" for tensor in exact["mismatches"]]
        table.add_row(*row)
    table.caption = (
        "plain: read + run each sample, session made before the timer. quantlab: the whole collect call. "
        "ORT: create_calibrator (Entropy, num_bins = signed bins) apart, collect_data alone against quantlab's whole "
        f"call; under a {args.ort_memory_gb:g} GB address-space cap. exact: the tensors checked equal np.histogram."
    )
    console.print(table)
    for line in mismatched:
        console.print(f"counts differ from np.histogram: {line}")

    table = Table(title="start-up: the calibration samples as stored, whole-process wall time "
                        f"(interpreter, imports, session; median of {args.processes} process(es))")
    table.add_column("model", no_wrap=True, min_width=width)
    for column in ("samples", "quantlab process s", "ORT process s", "ORT / quantlab (>= 1)"):
        table.add_column(column, justify="right")
    for name, r in measured.items():
        ql, ort = r["startup"]["quantlab"], r["startup"]["ort"]
        table.add_row(name, str(r["calib_samples"]), f"{ql:.2f}", "skipped" if ort is None else f"{ort:.2f}",
                      "-" if ort is None else _ratio(ort / ql, 1.0, False))
    console.print(table)

    if calibrate:
        table = Table(title=f"calibrate: {calibrate['tensors']} tensors of {calibrate['model']} (its 1x histograms), "
                            "median of 3 calls after a warm-up")
        for column in ("method", "seconds", "<= 1 s"):
            table.add_column(column, justify="left" if column == "method" else "right")
        for label, seconds in calibrate["timings"].items():
            table.add_row(label, f"{seconds:.3f}", "ok" if seconds <= TARGETS["calibrate"] else "MISS")
        console.print(table)


def main() -> None:
    from _sidebyside import measure_in_fresh_process

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    realmodels.add_models_option(parser)
    parser.add_argument("--seconds", type=float, default=1.0, help="1x: samples for one plain pass of about this long")
    parser.add_argument("--processes", type=int, default=1, help="fresh processes per measurement; the median counts")
    parser.add_argument("--bins", type=int, default=2048, help="|x| bins (signed histograms have twice as many)")
    parser.add_argument("--skip-ort", action="store_true", help="leave ONNX Runtime's calibrator out")
    parser.add_argument("--ort-10x", action="store_true", help="ORT's calibrator on 10x too (it holds every activation)")
    parser.add_argument("--ort-compute", action="store_true", help="time ORT's compute_data (its KL loop: minutes)")
    parser.add_argument("--ort-memory-gb", type=float, default=16.0, help="address-space cap of ORT's processes")
    args = parser.parse_args()
    names = realmodels.chosen_models(parser, args)
    began = time.perf_counter()
    measured, calibrate = {}, None
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            measured[name] = measure_model(realmodels.prepare(name), args, Path(tmp))
        largest = max(measured, key=lambda name: measured[name]["quantlab"]["tensors"])
        calibrate = measure_in_fresh_process("collect", "run_calibrate", str(measured[largest]["histograms"]))
        calibrate["model"] = largest
    print_tables(measured, calibrate, args)
    print(f"whole run: {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
