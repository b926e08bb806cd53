"""Collection throughput with 1 process vs N local worker processes vs Ray tasks, and peak RSS per worker.

The model is built here: a convolutional net on 3x64x64 inputs (fixed-seed random weights and inputs, which is all
a throughput figure needs), heavy enough that inference, not histogramming, dominates. Every run's histograms are
checked to be bit-identical to the single-process ones. Prints samples/s and the speedup ratios (target >= 1.6x
with 2 workers).
Usage: python benchmarks/scale.py [--samples 384] [--workers 2] [--ray]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build_model(path: Path, channels: int = 48, blocks: int = 4) -> Path:
    """Conv(3->C) then `blocks` x (Conv C->C + Relu) with a residual Add every second block, global pool, Gemm."""
    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def conv(name: str, source: str, cin: int, cout: int) -> str:
        weight = (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2 / (9 * cin))).astype(np.float32)
        inits.extend([numpy_helper.from_array(weight, f"{name}.w"), numpy_helper.from_array(np.zeros(cout, np.float32), f"{name}.b")])
        nodes.append(helper.make_node("Conv", [source, f"{name}.w", f"{name}.b"], [f"{name}.out"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"{name}.out"], [f"{name}.relu"]))
        return f"{name}.relu"

    x = conv("stem", "input", 3, channels)
    for block in range(blocks):
        y = conv(f"block{block}", x, channels, channels)
        if block % 2:
            nodes.append(helper.make_node("Add", [x, y], [f"add{block}"]))
            y = f"add{block}"
        x = y
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pooled"]))
    nodes.append(helper.make_node("Flatten", ["pooled"], ["flat"]))
    inits.append(numpy_helper.from_array(rng.standard_normal((channels, 10)).astype(np.float32), "fc.w"))
    nodes.append(helper.make_node("MatMul", ["flat", "fc.w"], ["logits"]))
    graph = helper.make_graph(
        nodes, "scale_bench",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 64, 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def build_data(directory: Path, samples: int, shape: tuple[int, ...], per_file: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(0, samples, per_file):
        np.save(directory / f"x{i:05d}.npy", rng.standard_normal((min(per_file, samples - i), *shape)).astype(np.float32))
    return directory


def children_peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=384)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--ray", action="store_true", help="also run the shards as Ray tasks (needs the ray extra)")
    args = parser.parse_args()

    import quantlab
    from quantlab.shards import collect_parallel

    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp) / "model.onnx")
        data = build_data(Path(tmp) / "data", args.samples, (3, 64, 64), per_file=16)
        quantlab.collect(model, data, limit=16)  # warm-up: imports and first runs outside the timers
        rows = []
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        reference = quantlab.collect(model, data)
        single = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_SELF)
        cores_busy = (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) / single
        rows.append(("1 process", single, after.ru_maxrss / 1024))

        def timed(label: str, **options) -> None:
            start = time.perf_counter()
            merged = collect_parallel(model, data, args.workers, **options)
            seconds = time.perf_counter() - start
            same = all(np.array_equal(merged[n].counts, reference[n].counts) for n in reference)
            if not same:
                sys.exit(f"{label}: histograms differ from the single-process run")
            rows.append((label, seconds, children_peak_rss_mb()))

        timed(f"{args.workers} local workers")
        if args.ray:
            import ray

            ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
            timed(f"Ray, {args.workers} tasks", use_ray=True)
            ray.shutdown()

    print(f"model: 5 convs x 48 channels on 3x64x64, {len(reference)} activation tensors; {args.samples} samples")
    print(f"{'run':<20} {'seconds':>8} {'samples/s':>10} {'speedup':>8} {'peak RSS MB':>12}")
    for label, seconds, rss in rows:
        print(f"{label:<20} {seconds:>8.2f} {args.samples / seconds:>10.1f} {single / seconds:>7.2f}x {rss:>12.1f}")
    print("(peak RSS: the single process's own; for workers, the largest worker process's)")
    print(f"the single process kept {cores_busy:.2f} of {os.cpu_count()} cores busy (ONNX Runtime's threads + binning overlapped)")
    print(f"speedup with {args.workers} local workers: {single / rows[1][1]:.2f}x (target >= 1.6x); histograms bit-identical")


if __name__ == "__main__":
    main()
