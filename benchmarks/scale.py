"""Collection throughput with 1 process vs N local worker processes vs Ray tasks, and peak RSS per worker.

Two models built here (fixed-seed random weights and inputs, which is all a throughput figure needs): a conv net on
3x64x64 inputs, whose big convs ONNX Runtime already spreads over the cores, and a deep MLP run one sample at a time,
whose many small ops it cannot. Every run's histograms are checked to be bit-identical to the single-process ones.
Prints samples/s, cores kept busy, and the speedup ratios (target >= 1.6x with 2 workers).
Usage: python benchmarks/scale.py [--samples 384] [--sequential-samples 12000] [--workers 2] [--ray]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _sidebyside import measure_in_fresh_process
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


def build_mlp(path: Path, width: int = 128, layers: int = 24) -> Path:
    """A deep stack of small MatMul+Add+Tanh layers, run one sample at a time (as sequence and speech models often
    are): many small ops that ONNX Runtime cannot spread over cores, so a second process has a core to use."""
    rng = np.random.default_rng(0)
    inits, nodes, x = [], [], "input"
    for layer in range(layers):
        weight = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        inits += [numpy_helper.from_array(weight, f"w{layer}"), numpy_helper.from_array(np.zeros(width, np.float32), f"b{layer}")]
        nodes += [
            helper.make_node("MatMul", [x, f"w{layer}"], [f"mm{layer}"]),
            helper.make_node("Add", [f"mm{layer}", f"b{layer}"], [f"pre{layer}"]),
            helper.make_node("Tanh", [f"pre{layer}"], [f"act{layer}"]),
        ]
        x = f"act{layer}"
    graph = helper.make_graph(
        nodes, "scale_bench_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", width])],
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


def run_collect(model: str, data: str, batch_size: str, out: str, ranges: str = "", shard: str = "") -> dict:
    """One process's work, in a fresh interpreter: a whole collect (or, with ranges and shard, one worker's
    histogram pass); saves the histograms to `out` and returns the time (warm-up excluded)."""
    import quantlab

    options = {"batch_size": int(batch_size) if batch_size else None}
    if shard:
        index, count = (int(part) for part in shard.split("/"))
        options.update(ranges=ranges, shard=(index, count))
    quantlab.collect(model, data, limit=16, batch_size=options["batch_size"])  # warm-up, untimed
    start = time.perf_counter()
    histograms = quantlab.collect(model, data, **options)
    seconds = time.perf_counter() - start
    histograms.save(out)
    return {"seconds": seconds, "tensors": len(histograms)}


def compare(label: str, model: Path, data: Path, samples: int, workers: int, use_ray: bool, batch_size: int | None = None) -> None:
    """One process vs `workers` local processes (and Ray tasks): time, peak RSS, identical counts."""
    import quantlab
    from quantlab.shards import collect_parallel

    size = str(batch_size or "")
    with tempfile.TemporaryDirectory() as tmp:
        single = measure_in_fresh_process("scale", "run_collect", str(model), str(data), size, f"{tmp}/single.npz")
        reference = quantlab.load_histograms(f"{tmp}/single.npz")
        ranges = quantlab.collect_ranges(model, data, batch_size=batch_size).save(Path(tmp) / "ranges.npz")
        worker = measure_in_fresh_process(
            "scale", "run_collect", str(model), str(data), size, f"{tmp}/shard.npz", str(ranges), f"0/{workers}"
        )
    rows = [("1 process", single["seconds"], single["peak_rss_mb"])]
    runs = [(f"{workers} local workers", {})] + ([(f"Ray, {workers} tasks", {"use_ray": True})] if use_ray else [])
    for name, extra in runs:
        start = time.perf_counter()
        merged = collect_parallel(model, data, workers, batch_size=batch_size, **extra)
        seconds = time.perf_counter() - start
        if not all(np.array_equal(merged[n].counts, reference[n].counts) for n in reference):
            sys.exit(f"{label}, {name}: histograms differ from the single-process run")
        rows.append((name, seconds, worker["peak_rss_mb"]))
    print(f"\n{label}: {len(reference)} activation tensors, {samples} samples")
    print(f"{'run':<20} {'seconds':>8} {'samples/s':>10} {'speedup':>8} {'peak RSS MB':>12}")
    for name, seconds, rss in rows:
        print(f"{name:<20} {seconds:>8.2f} {samples / seconds:>10.1f} {rows[0][1] / seconds:>7.2f}x {rss:>12.1f}")
    print("histograms bit-identical in every run; peak RSS per process: the single process, one worker on its shard")
    print(f"speedup with {workers} local workers: {rows[0][1] / rows[1][1]:.2f}x (target >= 1.6x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=384, help="samples for the conv model")
    parser.add_argument("--sequential-samples", type=int, default=12000, help="samples for the MLP, one per run")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--ray", action="store_true", help="also run the shards as Ray tasks (needs the ray extra)")
    args = parser.parse_args()
    if args.ray:
        import ray

        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        conv = build_model(Path(tmp) / "conv.onnx")
        conv_data = build_data(Path(tmp) / "conv_data", args.samples, (3, 64, 64), per_file=16)
        compare("conv net, 5 convs x 48 channels on 3x64x64, batches of 16", conv, conv_data, args.samples, args.workers, args.ray, batch_size=16)
        mlp = build_mlp(Path(tmp) / "mlp.onnx")
        mlp_data = build_data(Path(tmp) / "mlp_data", args.sequential_samples, (128,), per_file=1000)
        compare("24-layer MLP (width 128), one sample per run", mlp, mlp_data, args.sequential_samples, args.workers, args.ray, batch_size=1)


if __name__ == "__main__":
    main()
