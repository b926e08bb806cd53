"""What an INT8 model is worth on the engine that runs it: integer-kernel coverage and latency beside FP32.

A Q/DQ model is only a description; ONNX Runtime decides at load time which DequantizeLinear -> op -> QuantizeLinear
groups become integer kernels (QLinearConv, QGemm, ...), and the rest runs in float between Q/DQ pairs, which can be
slower than the FP32 model. So the drift report (and benchmarks/int8_speed.py) says which engine ran, how many of the
model's weighted ops (Conv, ConvTranspose counted as Conv, MatMul, Gemm) ran as integer kernels, read from the graph
ONNX Runtime optimized (`SessionOptions.optimized_model_filepath`), and the latency per sample of the FP32 and INT8
models measured in the same run: plain sessions (no exposed intermediate outputs, which slow a session), default
threads and optimizations, one sample per run, each model timed alone in short blocks of passes that take turns
between the models (`measure_latency`), the median pass.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from quantlab.data import Batch, feed_samples
from quantlab.errors import QuantlabError, first_line
from quantlab.formats.qdq import WEIGHTED_OPS
from quantlab.model import ORT_LOG_SEVERITY, InputSpec, create_session, run_session

# What ONNX Runtime's CPU provider runs weighted ops as when their inputs are integers.
INTEGER_KERNELS = (
    "QLinearConv",
    "QLinearMatMul",
    "MatMulIntegerToFloat",
    "QGemm",
    "QLinearConvTranspose",
    "ConvInteger",
    "MatMulInteger",
    "DynamicQuantizeMatMul",
)
LATENCY_SAMPLES = 16  # the first samples of the data that latency is timed on
MIN_PASSES, MAX_PASSES = 3, 10  # timed passes over them per model: at least 3, more while under MIN_SECONDS
MIN_SECONDS = 0.25
BLOCK_PASSES = 2  # timed passes in a row per model, after a warm-up pass, before the next model's turn


@dataclass
class Latency:
    """Milliseconds per sample of each model (median over passes), timed in the same run."""

    ms_per_sample: dict[str, float]
    samples: int
    passes: int


def onnxruntime_engine() -> str:
    """The engine drift and the benchmarks run INT8 models on, e.g. "ONNX Runtime 1.32.0 (CPUExecutionProvider)"."""
    import onnxruntime as ort

    return f"ONNX Runtime {ort.__version__} (CPUExecutionProvider)"


def optimized_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model after ONNX Runtime's portable (extended) optimizations on the CPU provider: for a Q/DQ model, the
    integer kernels it will run."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.log_severity_level = ORT_LOG_SEVERITY
        try:
            ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise QuantlabError(f"ONNX Runtime cannot load the INT8 model: {first_line(exc)}") from None
        return onnx.load(options.optimized_model_filepath)


def integer_kernels(fp32_model: onnx.ModelProto, optimized: onnx.ModelProto) -> dict[str, int]:
    """How many of the FP32 model's weighted ops (`WEIGHTED_OPS`) the optimized INT8 graph runs as integer kernels:
    {"integer": ..., "weighted": ...}."""
    return {
        "integer": sum(node.op_type in INTEGER_KERNELS for node in optimized.graph.node),
        "weighted": sum(node.op_type in WEIGHTED_OPS for node in fp32_model.graph.node),
    }


def single_samples(data: Iterable[Batch], inputs: list[InputSpec], count: int = LATENCY_SAMPLES) -> list[Batch]:
    """The first `count` samples of `data` (feeds of any batch size), each as a feed of one sample."""
    feeds: list[Batch] = []
    for feed in data:
        size = feed_samples(feed, inputs)
        for index in range(size):
            if len(feeds) == count:
                return feeds
            feeds.append(feed if size == 1 else {name: value[index : index + 1] for name, value in feed.items()})
    return feeds


def measure_latency(
    models: Mapping[str, onnx.ModelProto],
    feeds: list[Batch],
    *,
    min_passes: int = MIN_PASSES,
    min_seconds: float = MIN_SECONDS,
    max_passes: int = MAX_PASSES,
) -> Latency:
    """Milliseconds per sample of each model on `feeds`, one sample per run: a fresh plain session per model, each
    timed alone in blocks of BLOCK_PASSES passes over the feeds, after an untimed pass that warms its weights and
    threads again, the blocks taking turns between the models (a slow spell of the machine hits every model alike;
    the order rotates by one model every round, so that each model comes first, and after each other one, as often),
    until each model ran at least `min_passes` timed passes and `min_seconds` (at most `max_passes`); the median
    pass.

    One model at a time is what a user's process runs. Passes that take turns one by one measure something else: the
    models evict each other's weights from the caches, and a session starts while the one before still spins its
    threads. On 2 cores of a Xeon that slowed the FP32 models more than the INT8 ones (YOLOv8n FP32 8.7 -> 18.2 ms
    median, INT8 6.9 -> 12.3 ms) and overstated the INT8 speed-up (1.27x -> 1.48x)."""
    if not feeds:
        raise QuantlabError("no samples to time the models on")
    sessions = {label: create_session(model) for label, model in models.items()}
    outputs = {label: [output.name for output in session.get_outputs()] for label, session in sessions.items()}

    def one_pass(label: str) -> float:
        started = time.perf_counter()
        for feed in feeds:
            run_session(sessions[label], outputs[label], feed)
        return time.perf_counter() - started

    passes: dict[str, list[float]] = {label: [] for label in sessions}
    order = list(sessions)
    while True:
        for label in order:
            one_pass(label)  # warm-up
            passes[label] += [one_pass(label) for _ in range(BLOCK_PASSES)]
        order = order[1:] + order[:1]
        count = len(passes[order[0]])
        if count >= max_passes or (count >= min_passes and min(map(sum, passes.values())) >= min_seconds):
            break
    per_sample = {label: statistics.median(times) * 1000 / len(feeds) for label, times in passes.items()}
    return Latency(per_sample, len(feeds), count)


def engine_summary(
    fp32_model: onnx.ModelProto, int8_model: onnx.ModelProto, feeds: list[Batch], optimized: onnx.ModelProto | None = None
) -> dict[str, Any]:
    """The drift report's metadata on the engine: `engine` (its name and version), `integer_kernels` and
    `latency_ms` ({"fp32", "int8", "samples", "passes"}) of the INT8 model against the FP32 one on `feeds`."""
    latency = measure_latency({"fp32": fp32_model, "int8": int8_model}, feeds)
    return {
        "engine": onnxruntime_engine(),
        "integer_kernels": integer_kernels(fp32_model, optimized or optimized_graph(int8_model)),
        "latency_ms": {**latency.ms_per_sample, "samples": latency.samples, "passes": latency.passes},
    }

