"""The INT8 conv floor: each Conv of a CNN as ONNX Runtime's CPU integer kernel (QLinearConv) against its FP32 kernel.

A Q/DQ model is only as fast as the integer kernels ONNX Runtime fuses it into. Whatever the Q/DQ placement, an INT8
model whose every Conv runs as QLinearConv takes at least the sum of those kernels' times; where that sum is above
the FP32 model's time / 1.5, no placement gives a 1.5x speed-up (ORT's QLinearConv for depthwise convs is much slower
than its FP32 NCHWc depthwise conv, e.g. in the PP-OCR direction classifier).

Per model of the benchmark set (default: the CNNs), input shape of one eval sample:
- every Conv's input shape from ONNX shape inference with data propagation (the graph input fixed to the sample's
  shape; weights held in Constant nodes folded to initializers first);
- per Conv, a model of COPIES independent copies of it (its real weight, bias and attributes, distinct weight copies)
  reading one input, each copy a graph output; FP32 = that model, INT8 = ONNX Runtime's `quantize_static` of it
  (QDQ, per-channel int8 weights, uint8 activations, calibrated on one random input: timings do not depend on values);
  a depthwise conv whose channel count is not a multiple of 16 is timed a second time in INT8 widened to the next
  multiple (zero filters), as quantlab's onnxruntime target exports it (MLAS's fast symmetric depthwise kernel);
- each optimized by ONNX Runtime (all levels, as a session loads it: FP32 convs become NCHWc convs, INT8 ones
  QLinearConv in NHWC, checked), then cut down to the conv kernels alone: the layout and Q/DQ ops at the graph's
  edges (ReorderInput/Output, Transpose, QuantizeLinear, DequantizeLinear) are dropped and the kernels read the
  tensor they read in place, as inside a chain of convs; so per conv a kernel time, edges and other ops excluded;
- timed with default threads and with intra_op_num_threads=1: min over blocks of the mean run, divided by COPIES
  (session.run overhead is not subtracted; the caption gives an Identity model's, spread over COPIES);
- the whole FP32 model on its first eval samples, ms per sample, min over passes.

Prints a summary per model and threads (convs summed per kind: depthwise = group == in channels > 1, dense = the
rest; INT8 conv floor = the sum of all INT8 kernels, beside FP32 model / 1.5) and the convs that INT8 slows most.
Usage: python benchmarks/conv_kernels.py [--models ppocr_mobile_v2_cls] [--worst 5]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import realmodels
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console
from rich.table import Table

from quantlab.engine import INTEGER_KERNELS, onnxruntime_engine
from quantlab.formats.qdq_onnxruntime import DEPTHWISE_CHANNEL_MULTIPLE
from quantlab.model import ORT_LOG_SEVERITY, fold_constants, load_model

CNNS = ("ppocrv4_det", "ppocr_mobile_v2_cls", "nudenet_yolov8n_320")
COPIES = 8  # conv copies per timed model: session.run overhead spread over them
THREADS = {"default": 0, "1": 1}  # intra_op_num_threads
TARGET = 1.5  # the INT8 speed-up asked for
BLOCK_SECONDS, BLOCKS = 0.01, 7  # timing: blocks of runs at least this long (or one run), the fastest block's mean
MODEL_SAMPLES = 4  # eval samples per timed pass of the whole model


@dataclass
class ConvLayer:
    """One Conv of a model: its node, weight, bias, input shape, and kernel times in us per variant and threads."""

    node: onnx.NodeProto
    weight: np.ndarray
    bias: np.ndarray | None
    shape: list[int]
    us: dict[tuple[str, str], float] = field(default_factory=dict)  # ("fp32" | "int8", threads) -> us

    @property
    def kind(self) -> str:
        group = next((a.i for a in self.node.attribute if a.name == "group"), 1)
        return "depthwise" if group == self.shape[1] > 1 else "dense"

    def describe(self) -> list[str]:
        strides = next((list(a.ints) for a in self.node.attribute if a.name == "strides"), [1, 1])
        kernel = "x".join(map(str, self.weight.shape[2:])) + (f" s{max(strides)}" if max(strides) > 1 else "")
        return [self.node.name or self.node.output[0], self.kind, kernel, f"{self.shape[1]}->{self.weight.shape[0]}",
                "x".join(map(str, self.shape[2:]))]


def conv_layers(path: Path, sample: dict[str, np.ndarray]) -> list[ConvLayer]:
    """Every Conv of the model, in graph order, with its input shape for `sample`."""
    model = load_model(path)
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    model = fold_constants(model, [name for node in convs for name in node.input[1:] if name])
    for value in model.graph.input:
        if value.name in sample:
            for dim, size in zip(value.type.tensor_type.shape.dim, sample[value.name].shape):
                dim.Clear()
                dim.dim_value = size
    graph = onnx.shape_inference.infer_shapes(model, data_prop=True).graph  # data_prop: Shape -> Reshape chains
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in [*graph.input, *graph.value_info]}
    weights = {init.name: init for init in model.graph.initializer}
    layers = []
    for node in convs:
        shape = shapes.get(node.input[0], [])
        if not shape or 0 in shape:
            raise RuntimeError(f"{path}: shape inference leaves {node.name}'s input shape unknown ({shape})")
        bias = numpy_helper.to_array(weights[node.input[2]]) if len(node.input) > 2 and node.input[2] else None
        layers.append(ConvLayer(node, numpy_helper.to_array(weights[node.input[1]]), bias, shape))
    return layers


def copies_model(layer: ConvLayer) -> onnx.ModelProto:
    """COPIES copies of the conv on one input "x", each with its own weight (and bias) and its own graph output."""
    nodes, weights, outputs = [], [], []
    for copy in range(COPIES):
        params = {f"w{copy}": layer.weight} | ({f"b{copy}": layer.bias} if layer.bias is not None else {})
        weights += [numpy_helper.from_array(value, name) for name, value in params.items()]
        nodes.append(helper.make_node("Conv", ["x", *params], [f"y{copy}"], name=f"conv{copy}"))
        nodes[-1].attribute.extend(layer.node.attribute)
        outputs.append(helper.make_tensor_value_info(f"y{copy}", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, layer.shape)],
                              outputs, weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def quantized(model: onnx.ModelProto, tmp: Path) -> onnx.ModelProto:
    """ONNX Runtime's `quantize_static` of the copies model: QDQ, per-channel int8 weights, uint8 activations."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter([{"x": np.random.default_rng(0).standard_normal(shape, dtype=np.float32)}])

        def get_next(self):
            return next(self.feeds, None)

    onnx.save(model, tmp / "fp32.onnx")
    quantize_static(str(tmp / "fp32.onnx"), str(tmp / "int8.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return onnx.load(str(tmp / "int8.onnx"))


def session(model: onnx.ModelProto, threads: int = 0, optimize: bool = True, save: Path | None = None) -> ort.InferenceSession:
    """A CPU session: all of ORT's optimizations (the optimized graph saved to `save`), or none (for a graph that ORT
    optimized already)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = ORT_LOG_SEVERITY
    if save is not None:
        options.optimized_model_filepath = str(save)
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def kernels_only(model: onnx.ModelProto, integer: bool, tmp: Path) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The conv kernels of ORT's optimized graph of `model` alone, and a feed of the tensor they read (made by the
    dropped edge ops from a random input)."""
    x = model.graph.input[0]
    feed = {x.name: np.random.default_rng(0).standard_normal([d.dim_value for d in x.type.tensor_type.shape.dim],
                                                             dtype=np.float32)}
    session(model, save=tmp / "optimized.onnx")
    optimized = onnx.load(str(tmp / "optimized.onnx"))
    kernels = [node for node in optimized.graph.node if node.op_type in ("Conv", *INTEGER_KERNELS)]
    wanted = "QLinearConv" if integer else "Conv"
    if len(kernels) != COPIES or any(node.op_type != wanted for node in kernels):
        raise RuntimeError(f"ONNX Runtime runs {[n.op_type for n in kernels]}, not {COPIES} {wanted}")
    (head,) = {node.input[0] for node in kernels}
    if head != x.name:  # the tensor that the dropped edge ops make of x
        optimized.graph.output.append(onnx.ValueInfoProto(name=head))
        feed = {head: session(optimized, optimize=False).run([head], feed)[0]}
    read = {name for node in kernels for name in node.input}
    graph = helper.make_graph(
        kernels, "kernels",
        [helper.make_tensor_value_info(head, helper.np_dtype_to_tensor_dtype(feed[head].dtype), feed[head].shape)],
        [onnx.ValueInfoProto(name=node.output[0]) for node in kernels],
        [init for init in optimized.graph.initializer if init.name in read],
    )
    return helper.make_model(graph, opset_imports=optimized.opset_import, ir_version=optimized.ir_version), feed


def best_seconds(runs: dict[str, Callable[[], object]], blocks: int = BLOCKS) -> dict[str, float]:
    """Seconds per call of each of `runs`: after two warm-up calls, the fastest of `blocks` blocks of calls (each at
    least BLOCK_SECONDS long, or one call), its mean; the runs' blocks take turns, so a busy spell of the shared
    machine hits them alike."""
    calls = {}
    for label, run in runs.items():
        run()
        start = time.perf_counter()
        run()
        calls[label] = max(1, round(BLOCK_SECONDS / (time.perf_counter() - start)))
    means: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(blocks):
        for label, run in runs.items():
            start = time.perf_counter()
            for _ in range(calls[label]):
                run()
            means[label].append((time.perf_counter() - start) / calls[label])
    return {label: min(values) for label, values in means.items()}


def runner(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], threads: int, optimize: bool) -> Callable[[], object]:
    """One call = a run per feed of a session of the model (optimized fully or, for a kernels-only graph, not again)."""
    timed = session(model, threads, optimize=optimize)
    return lambda: [timed.run(None, feed) for feed in feeds]


def measure(name: str) -> tuple[dict[str, float], list[ConvLayer]]:
    """The whole FP32 model's ms per sample per threads setting, and its convs with their kernel times."""
    case = realmodels.prepare(name)
    samples = realmodels.load_samples(case.model, case.eval)[:MODEL_SAMPLES]
    model = load_model(case.model)
    model_ms = {  # one threads setting at a time: a default session's threads spin on a while after each run
        label: best_seconds({"fp32": runner(model, samples, threads, optimize=True)}, blocks=3)["fp32"] * 1e3 / len(samples)
        for label, threads in THREADS.items()
    }
    layers = conv_layers(case.model, samples[0])
    for layer in layers:
        with tempfile.TemporaryDirectory() as tmp:
            fp32 = copies_model(layer)
            kernels = {"fp32": kernels_only(fp32, False, Path(tmp)), "int8": kernels_only(quantized(fp32, Path(tmp)), True, Path(tmp))}
            wider = widened(layer)
            if wider is not None:
                kernels["int8 widened"] = kernels_only(quantized(copies_model(wider), Path(tmp)), True, Path(tmp))
        for label, threads in THREADS.items():
            runs = {variant: runner(graph, [feed], threads, optimize=False) for variant, (graph, feed) in kernels.items()}
            for variant, seconds in best_seconds(runs).items():
                layer.us[variant, label] = seconds * 1e6 / COPIES
            layer.us.setdefault(("int8 widened", label), layer.us["int8", label])
    return model_ms, layers


def widened(layer: ConvLayer) -> ConvLayer | None:
    """A depthwise conv whose channel count is not a multiple of DEPTHWISE_CHANNEL_MULTIPLE as quantlab's onnxruntime
    target exports it, widened to the next multiple with zero filters (and biases); None for any other conv."""
    channels = layer.weight.shape[0]
    if layer.kind != "depthwise" or channels % DEPTHWISE_CHANNEL_MULTIPLE == 0:
        return None
    extra = -channels % DEPTHWISE_CHANNEL_MULTIPLE
    node = onnx.NodeProto()
    node.CopyFrom(layer.node)
    next(attr for attr in node.attribute if attr.name == "group").i = channels + extra
    weight = np.concatenate([layer.weight, np.zeros((extra, *layer.weight.shape[1:]), layer.weight.dtype)])
    bias = None if layer.bias is None else np.concatenate([layer.bias, np.zeros(extra, layer.bias.dtype)])
    return ConvLayer(node, weight, bias, [layer.shape[0], channels + extra, *layer.shape[2:]])


def overhead_us() -> float:
    """session.run of an Identity model on a small tensor, us: what each COPIES-conv timing carries once."""
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 4, 4])])
    run = runner(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
                 [{"x": np.zeros([1, 8, 4, 4], np.float32)}], 0, optimize=True)
    return best_seconds({"identity": run})["identity"] * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    realmodels.add_models_option(parser)
    parser.set_defaults(models=",".join(CNNS))
    parser.add_argument("--worst", type=int, default=5, help="convs listed per model (most INT8 us over FP32 us)")
    args = parser.parse_args()
    names = realmodels.chosen_models(parser, args)
    logging.disable(logging.WARNING)  # quantize_static's advice to pre-process, once per call

    summary = Table(title=f"Conv kernels on {onnxruntime_engine()}: FP32 vs INT8 (QLinearConv), {COPIES} copies per conv")
    worst = Table(title=f"Convs that INT8 slows most (default threads, top {args.worst} per model by INT8 - FP32 us)")
    for column in ("model", "threads", "FP32 model ms", "FP32 convs ms", "depthwise FP32 -> INT8 (widened) us",
                   "dense FP32 -> INT8 us", "INT8 conv floor (widened) ms", f"FP32 model / {TARGET} ms"):
        summary.add_column(column, justify="left" if column in ("model", "threads") else "right")
    for column in ("model", "conv", "kind", "kernel", "channels", "input HxW", "FP32 us", "INT8 us", "INT8/FP32",
                   "1 thread FP32 / INT8 us"):
        worst.add_column(column, justify="right" if "us" in column or "/" in column else "left")
    started = time.perf_counter()
    for name in names:
        model_ms, layers = measure(name)
        for label in THREADS:
            def total(variant: str, kind: str | None = None) -> float:
                return sum(layer.us[variant, label] for layer in layers if kind in (None, layer.kind))

            def kind_cell(kind: str) -> str:
                count, fp32, int8 = sum(layer.kind == kind for layer in layers), total("fp32", kind), total("int8", kind)
                if not count:
                    return "-"
                wide = total("int8 widened", kind)
                return f"{count}: {fp32:.0f} -> {int8:.0f} ({int8 / fp32:.2f}x)" + (f" ({wide:.0f})" if wide != int8 else "")

            floor = f"{total('int8') / 1e3:.2f} ({total('int8 widened') / 1e3:.2f})"
            summary.add_row(name, label, f"{model_ms[label]:.2f}", f"{total('fp32') / 1e3:.2f}", kind_cell("depthwise"),
                            kind_cell("dense"), floor, f"{model_ms[label] / TARGET:.2f}")
        slowest = sorted(layers, key=lambda layer: layer.us["fp32", "default"] - layer.us["int8", "default"])
        for layer in slowest[: args.worst]:
            fp32, int8 = layer.us["fp32", "default"], layer.us["int8", "default"]
            worst.add_row(name, *layer.describe(), f"{fp32:.1f}", f"{int8:.1f}", f"{int8 / fp32:.2f}x",
                          f"{layer.us['fp32', '1']:.1f} / {layer.us['int8', '1']:.1f}")
        print(f"{name} done ({len(layers)} convs, {time.perf_counter() - started:.0f} s)", flush=True)
    summary.caption = (
        f"Per conv: its kernel alone (ORT's optimized graph without its edge layout and Q/DQ ops), us per run of "
        f"{COPIES} copies / {COPIES}, fastest block; session.run overhead ({overhead_us():.1f} us for an Identity "
        f"model) not subtracted. Per kind: 'n: FP32 -> INT8 us (INT8/FP32)', and in brackets with the depthwise convs "
        f"widened to a multiple of {DEPTHWISE_CHANNEL_MULTIPLE} channels as quantlab's onnxruntime target exports "
        f"them. INT8 conv floor: sum of all INT8 convs, the least an INT8 model running them all as QLinearConv "
        f"takes; FP32 model: ms per sample over "
        f"{MODEL_SAMPLES} eval samples, fastest pass."
    )
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    console.print(summary)
    console.print(worst)


if __name__ == "__main__":
    main()
