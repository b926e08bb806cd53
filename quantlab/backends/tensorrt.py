"""## TensorRT backend (optional)

Build an INT8 TensorRT engine from quantlab's thresholds, and compare a TensorRT engine with the FP32 model layer by
layer. Install with `pip install 'quantlab[tensorrt]'` (tensorrt + cuda-python; the tensorrt wheels download their
libraries from NVIDIA's index, pypi.nvidia.com; on Jetson use JetPack's TensorRT). Two ways to an engine:

| path | function | TensorRT | what TensorRT gets |
|---|---|---|---|
| calibration cache (implicit INT8) | `build_engine_from_cache` | 8, 9, 10 | the FP32 ONNX model and quantlab's `.cache`, read through an `IInt8EntropyCalibrator2` that never supplies data |
| Q/DQ model (explicit INT8) | `build_engine_from_qdq` | 10 and later | the model from `quantlab export`; a strongly typed network from TensorRT 11 |

TensorRT 11 removed implicit INT8 calibration, so on 11 only the Q/DQ path works; TensorRT 7 and older are refused.

**Never run against a real TensorRT.** TensorRT cannot be installed where quantlab is developed, and no machine of
ours has it, so no line of this module has ever driven a real TensorRT or a GPU: engine building, TensorRT's reading
of the cache, per-layer precision overrides, marking tensors as outputs, device buffers, inference, and the TensorRT
drift runner are all unexercised. The tests check, without TensorRT: the one-line error when it is missing, the
version dispatch, the exact bytes handed to TensorRT (header rewrite included), and which network flags, builder
flags and layer precisions are set, against a minimal stand-in of the `tensorrt` module. That shows which calls
quantlab makes, not that TensorRT accepts them. Reports from real runs are welcome.

Details:
- Cache header: TensorRT skips a cache it finds incompatible (NVIDIA/TensorRT#1378), judging by the
  `TRT-<version code>-<algorithm>` header, and would then calibrate with no data. Which headers it accepts is not
  documented, so the cache handed to TensorRT always carries the running release's code and the calibrator's
  algorithm (`EntropyCalibration2`): a file with another header is rewritten in memory, with a warning; the file is
  left alone and the scale lines, whose format is the same in every release, are passed on byte for byte. Should
  TensorRT still ask for data, the build stops with an error instead of producing an uncalibrated engine.
- Layer precisions (cache path): a layer named in `layer_precisions`, by its name or the name of one of its output
  tensors (the ONNX tensor names drift reports), runs in and outputs that precision, under
  `OBEY_PRECISION_CONSTRAINTS` (`STRICT_TYPES` before 8.2): a kept-in-FP32 layer is then really FP32, or the build
  fails, rather than TensorRT quietly preferring INT8. Names TensorRT's network does not have are warned about.
- Per-layer outputs, as Polygraphy compares layer by layer: the requested tensors are marked as network outputs
  before building. This stops TensorRT fusing across them, so the observed engine is less fused than the deployed
  one; drift measured this way is that of the marked engine. Tensors with data-dependent shapes are not supported,
  and a model with dynamic input dimensions needs `input_shapes` (the largest feed per input; the batch may shrink
  to 1).
"""

from __future__ import annotations

import functools
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from quantlab.atomic import atomic_write, check_writable
from quantlab.drift import FP32Side, observable_tensors
from quantlab.errors import QuantlabError, QuantlabRuntimeError, first_line
from quantlab.formats import read_bytes
from quantlab.formats.trt_cache import parse_cache, trt_version_code
from quantlab.model import activation_tensors, load_model

MISSING_TENSORRT = (
    "TensorRT is not installed: pip install 'quantlab[tensorrt]' (the wheels download their libraries from NVIDIA's "
    "package index, pypi.nvidia.com; on Jetson use JetPack's TensorRT)"
)
MISSING_CUDA = "running a TensorRT engine needs cuda-python (or pycuda): pip install 'quantlab[tensorrt]'"
CALIBRATOR_ALGORITHM = "EntropyCalibration2"  # what IInt8EntropyCalibrator2 writes in a cache header
LAYER_PRECISIONS = ("fp32", "fp16")


@dataclass(frozen=True)
class Capabilities:
    """What quantlab does with a TensorRT release; `capabilities(version)` derives it, nothing here imports TensorRT."""

    version: str
    major: int
    minor: int

    @property
    def implicit_int8(self) -> bool:
        """Calibration cache + INT8 calibrator: TensorRT 8 to 10 (deprecated in 10.1, removed in 11)."""
        return 8 <= self.major <= 10

    @property
    def explicit_int8(self) -> bool:
        """Q/DQ model: TensorRT 10 and later."""
        return self.major >= 10

    @property
    def strongly_typed(self) -> bool:
        """The Q/DQ path builds a strongly typed network (types from the model, no precision flags): 11 and later."""
        return self.major >= 11

    @property
    def explicit_batch_flag(self) -> bool:
        """ONNX networks need NetworkDefinitionCreationFlag.EXPLICIT_BATCH before 10 (deprecated in 10)."""
        return self.major < 10

    @property
    def precision_flag(self) -> str:
        """The BuilderFlag making layer precisions binding: OBEY_PRECISION_CONSTRAINTS from 8.2, else STRICT_TYPES."""
        return "OBEY_PRECISION_CONSTRAINTS" if (self.major, self.minor) >= (8, 2) else "STRICT_TYPES"

    @property
    def memory_pools(self) -> bool:
        """config.set_memory_pool_limit from 8.4; max_workspace_size before."""
        return (self.major, self.minor) >= (8, 4)

    @property
    def tensor_api(self) -> bool:
        """Named I/O tensors and execute_async_v3 from 8.5; bindings and execute_v2 before."""
        return (self.major, self.minor) >= (8, 5)

    def require(self, path: Literal["cache", "qdq"]) -> None:
        """Raise a one-line QuantlabError when this release cannot build an engine the given way."""
        if self.major < 8:
            raise QuantlabError(f"TensorRT {self.version} is not supported: quantlab needs TensorRT 8 or newer")
        if path == "cache" and not self.implicit_int8:
            raise QuantlabError(
                f"TensorRT {self.version}: TensorRT 11 removed implicit INT8 calibration, so a calibration cache "
                "cannot be used; export a Q/DQ model with `quantlab export` and build from it (the Q/DQ path)"
            )
        if path == "qdq" and not self.explicit_int8:
            raise QuantlabError(
                f"TensorRT {self.version}: building from a Q/DQ model needs TensorRT 10 or newer here; "
                "build from the calibration cache instead"
            )


def capabilities(version: str) -> Capabilities:
    """The capabilities of a TensorRT release from its version string (`tensorrt.__version__`, e.g. "10.3.0.26")."""
    match = re.match(r"\s*(\d+)\.(\d+)", str(version))
    if not match:
        raise QuantlabError(f"TensorRT version {version!r}: expected major.minor, e.g. '10.3.0'")
    return Capabilities(str(version).strip(), int(match[1]), int(match[2]))


def cache_for_tensorrt(data: bytes, trt_version: str, source: str | os.PathLike = "<cache>") -> bytes:
    """The cache bytes to hand a TensorRT release: `data` itself when its header is that release's, else `data` with
    the header line replaced (warned about). The cache is parsed first, so a broken one fails here, not in TensorRT."""
    thresholds = parse_cache(data, source)
    if not thresholds.amax:
        raise QuantlabError(f"{source}: the cache holds no tensors")
    header = f"TRT-{trt_version_code(trt_version)}-{CALIBRATOR_ALGORITHM}".encode()
    if data.startswith(header + b"\n"):
        return data
    if thresholds.metadata["header"] != header.decode():
        warnings.warn(
            f"{source}: header {thresholds.metadata['header']!r} is not what TensorRT {trt_version} reads; "
            f"handing it {header.decode()!r} instead (the scales are unchanged, the file is not modified)",
            stacklevel=2,
        )
    body = data.split(b"\n", 1)[1]  # there is one: a cache with tensors has more than a header line
    return header + b"\n" + body


def build_engine_from_cache(
    model_path: str | os.PathLike,
    cache_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    fp16: bool = True,
    layer_precisions: Mapping[str, str] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    workspace_mb: int | None = None,
) -> Path:
    """Build and save an implicit-INT8 engine (TensorRT 8-10) from the FP32 ONNX model and a calibration cache.

    `fp16` also allows FP16 kernels; `layer_precisions` maps layer (or output tensor) names to "fp32" or "fp16";
    `input_shapes` fixes dynamic input dimensions; `workspace_mb` caps TensorRT's scratch memory (None: its default).
    """
    trt = _import_tensorrt()
    caps = capabilities(trt.__version__)
    caps.require("cache")
    check_writable(out_path)
    cache = cache_for_tensorrt(read_bytes(cache_path), trt.__version__, cache_path)
    engine, _ = _build(
        trt, caps, model_path, cache=cache, fp16=fp16, layer_precisions=layer_precisions,
        input_shapes=input_shapes, workspace_mb=workspace_mb,
    )
    return _save(engine, out_path)


def build_engine_from_qdq(
    qdq_model_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    fp16: bool = True,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    workspace_mb: int | None = None,
) -> Path:
    """Build and save an explicit-INT8 engine (TensorRT 10 and later) from a Q/DQ ONNX model.

    On TensorRT 10 the INT8 (and with `fp16` the FP16) builder flag is set; from 11 the network is strongly typed and
    takes every precision from the model, so `fp16` has no effect there (convert the model's floats to FP16 instead).
    """
    trt = _import_tensorrt()
    caps = capabilities(trt.__version__)
    caps.require("qdq")
    check_writable(out_path)
    engine, _ = _build(trt, caps, qdq_model_path, fp16=fp16, input_shapes=input_shapes, workspace_mb=workspace_mb)
    return _save(engine, out_path)


def engine_layer_outputs(
    model_path: str | os.PathLike,
    feed: Mapping[str, np.ndarray],
    *,
    cache_path: str | os.PathLike | None = None,
    names: Sequence[str] | None = None,
    fp16: bool = True,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    workspace_mb: int | None = None,
) -> dict[str, np.ndarray]:
    """Tensor name -> value of every marked tensor in a TensorRT engine run on one `feed`.

    With `cache_path` the engine is built from the FP32 `model_path` and the cache (implicit INT8), without it from
    `model_path` as a Q/DQ model (explicit INT8). `names` (default: the model's float activation tensors) are marked
    as network outputs before building; those TensorRT's network does not have are left out of the result.
    """
    trt = _import_tensorrt()
    model = load_model(model_path)
    marked = list(names) if names is not None else activation_tensors(model)
    shapes = input_shapes or {name: np.shape(value) for name, value in feed.items()}
    engine = _LayerwiseEngine(trt, model_path, marked, cache_path=cache_path, fp16=fp16, input_shapes=shapes,
                              workspace_mb=workspace_mb)
    return engine.run(feed)


class TensorRTPairedRunner(FP32Side):
    """The FP32 model in ONNX Runtime and its INT8 TensorRT engine, run on the same feeds, for `quantlab drift`.

    Same interface as drift's ONNX Runtime runner: `inputs` (InputSpecs), `outputs` (the FP32 graph outputs), `ops`
    (tensor -> op type), `mapping` (FP32 tensor -> the engine tensor compared with it) and `run(feed)` ->
    (FP32 values, TensorRT values), both keyed by FP32 tensor name. Give exactly one of `cache_path` (implicit INT8
    from `model_path` and the cache, TensorRT 8-10) and `qdq_model_path` (explicit INT8, TensorRT 10 and later);
    on the Q/DQ path a quantized tensor X is observed as `X_DequantizeLinear_Output`, as in drift with ONNX Runtime.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        cache_path: str | os.PathLike | None = None,
        qdq_model_path: str | os.PathLike | None = None,
        fp16: bool = True,
        layer_precisions: Mapping[str, str] | None = None,
        input_shapes: Mapping[str, Sequence[int]] | None = None,
        workspace_mb: int | None = None,
    ) -> None:
        trt = _import_tensorrt()
        if (cache_path is None) == (qdq_model_path is None):
            raise QuantlabError("give exactly one of a calibration cache and a Q/DQ model to build the engine from")
        self.engine = f"TensorRT {trt.__version__}"  # what the drift report names as the engine
        super().__init__(load_model(model_path))
        if qdq_model_path is None:
            targets = {name: name for name in self.activations}
        else:
            targets = observable_tensors(self.activations, load_model(qdq_model_path))
        engine_model = model_path if qdq_model_path is None else qdq_model_path
        self._engine = _LayerwiseEngine(
            trt, engine_model, list(targets.values()), cache_path=cache_path, fp16=fp16,
            layer_precisions=layer_precisions, input_shapes=input_shapes, workspace_mb=workspace_mb,
        )
        marked = set(self._engine.marked)
        self.pair({name: target for name, target in targets.items() if target in marked}, "TensorRT engine", marked)

    def run(self, feed: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        reference = self.reference(dict(feed))
        values = self._engine.run(feed)
        return reference, {name: values[target] for name, target in self.mapping.items()}


def _import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError:
        raise QuantlabError(MISSING_TENSORRT) from None
    except OSError as exc:  # the package is there but its libraries (libnvinfer) are not
        raise QuantlabError(f"TensorRT cannot be loaded: {first_line(exc)}") from None
    return tensorrt



@functools.cache
def _logger(trt: Any) -> Any:
    """One logger per process (TensorRT keeps the first one globally), with TensorRT's own plugins registered."""
    logger = trt.Logger(trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")
    return logger


def _layers(network: Any) -> Iterator[Any]:
    return (network.get_layer(index) for index in range(network.num_layers))


def _outputs(layer: Any) -> list[Any]:
    return [layer.get_output(index) for index in range(layer.num_outputs)]


def _save(engine: Any, out_path: str | os.PathLike) -> Path:
    with atomic_write(out_path, "wb") as handle:
        handle.write(engine)
    return Path(out_path)


def _build(
    trt: Any,
    caps: Capabilities,
    model_path: str | os.PathLike,
    *,
    cache: bytes | None = None,
    fp16: bool,
    layer_precisions: Mapping[str, str] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    workspace_mb: int | None = None,
    mark: Sequence[str] = (),
) -> tuple[Any, list[str]]:
    """Parse, configure and build: the serialized engine and the names of the tensors marked as outputs."""
    if not Path(model_path).is_file():
        raise QuantlabError(f"{model_path}: model file not found")
    if layer_precisions and cache is None:
        raise QuantlabError("layer precisions apply to the cache path; a Q/DQ model keeps layers float at export")
    strongly_typed = cache is None and caps.strongly_typed
    flags = 0
    if caps.explicit_batch_flag:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    logger = _logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)  # owns the weights: keep it alive until the engine is built
    if not parser.parse_from_file(str(model_path)):
        errors = [str(parser.get_error(index)) for index in range(parser.num_errors)] or ["unknown error"]
        raise QuantlabError(f"{model_path}: TensorRT cannot parse the model: {errors[0].strip().splitlines()[0]}")
    config = builder.create_builder_config()
    if workspace_mb is not None:
        if caps.memory_pools:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
        else:
            config.max_workspace_size = workspace_mb << 20
    if not strongly_typed:
        config.set_flag(trt.BuilderFlag.INT8)
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
    calibrator = None
    if cache is not None:
        _check_cache_matches(cache, network, model_path)
        calibrator = _calibrator(trt, cache)
        config.int8_calibrator = calibrator
    if layer_precisions:
        _set_precisions(trt, caps, network, config, layer_precisions, fp16)
    _add_profile(trt, builder, network, config, input_shapes or {}, calibrating=cache is not None)
    marked = _mark_outputs(network, mark)
    engine = builder.build_serialized_network(network, config)
    if calibrator is not None and calibrator.asked_for_data:
        raise QuantlabRuntimeError(
            "TensorRT did not accept the calibration cache and asked for calibration data (quantlab supplies none)"
        )
    if engine is None:
        raise QuantlabRuntimeError("TensorRT could not build the engine (its messages above say why)")
    return engine, marked


def _check_cache_matches(cache: bytes, network: Any, model_path: str | os.PathLike) -> None:
    """A cache none of whose tensors is in the network is another model's: TensorRT would use no scale at all."""
    names = set(parse_cache(cache).amax)
    present = {network.get_input(index).name for index in range(network.num_inputs)}
    present |= {tensor.name for layer in _layers(network) for tensor in _outputs(layer)}
    if not names & present:
        raise QuantlabError(f"none of the cache's {len(names)} tensors is in {model_path}: another model's cache?")


def _calibrator(trt: Any, cache: bytes) -> Any:
    """An IInt8EntropyCalibrator2 that hands TensorRT `cache` and never supplies data."""

    class CacheCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)  # TensorRT's Python base classes must be initialised
            self.asked_for_data = False

        def get_batch_size(self) -> int:
            return 1

        def get_batch(self, names: list[str]) -> None:
            self.asked_for_data = True  # only happens when TensorRT rejected the cache
            return None

        def read_calibration_cache(self) -> bytes:
            return cache

        def write_calibration_cache(self, data: Any) -> None:
            return None

    return CacheCalibrator()


def _set_precisions(
    trt: Any, caps: Capabilities, network: Any, config: Any, layer_precisions: Mapping[str, str], fp16: bool
) -> None:
    """Set precision and output types of the named layers (by layer or output tensor name) and make them binding."""
    bad = sorted({value for value in layer_precisions.values() if value not in LAYER_PRECISIONS})
    if bad:
        raise QuantlabError(f"layer precision {', '.join(bad)}: expected one of {', '.join(LAYER_PRECISIONS)}")
    if not fp16 and "fp16" in layer_precisions.values():
        raise QuantlabError("a layer precision of fp16 needs fp16=True")
    types = {"fp32": trt.float32, "fp16": trt.float16}
    found = set()
    for layer in _layers(network):
        outputs = _outputs(layer)
        keys = [layer.name, *(tensor.name for tensor in outputs)]
        key = next((key for key in keys if key in layer_precisions), None)
        if key is None:
            continue
        dtype = types[layer_precisions[key]]
        layer.precision = dtype
        for index, tensor in enumerate(outputs):
            if tensor.dtype in (trt.float32, trt.float16):
                layer.set_output_type(index, dtype)
        found.add(key)
    missing = [name for name in layer_precisions if name not in found]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        warnings.warn(f"layer precisions: no layer or layer output named {shown} in TensorRT's network", stacklevel=3)
    config.set_flag(getattr(trt.BuilderFlag, caps.precision_flag))


def _add_profile(
    trt: Any, builder: Any, network: Any, config: Any, input_shapes: Mapping[str, Sequence[int]], calibrating: bool
) -> None:
    """An optimization profile for inputs with dynamic dimensions: max = opt = the given shape, min batch 1."""
    inputs = [network.get_input(index) for index in range(network.num_inputs)]
    dynamic = [tensor for tensor in inputs if any(dim < 0 for dim in tuple(tensor.shape))]
    if not dynamic:
        return
    missing = [f"{tensor.name} {tuple(tensor.shape)}" for tensor in dynamic if tensor.name not in input_shapes]
    if missing:
        raise QuantlabError(f"input(s) with dynamic dimensions need a shape (input_shapes): {', '.join(missing)}")
    profile = builder.create_optimization_profile()
    for tensor in dynamic:
        shape = tuple(int(dim) for dim in input_shapes[tensor.name])
        smallest = tuple(1 if index == 0 and dim < 0 else shape[index] for index, dim in enumerate(tuple(tensor.shape)))
        profile.set_shape(tensor.name, smallest, shape, shape)
    config.add_optimization_profile(profile)
    if calibrating:
        config.set_calibration_profile(profile)


def _mark_outputs(network: Any, names: Sequence[str]) -> list[str]:
    """Mark the layer outputs named in `names` as network outputs; the names marked (or already outputs)."""
    wanted = set(names)
    marked = []
    for layer in _layers(network):
        for tensor in _outputs(layer):
            if tensor.name in wanted and tensor.name not in marked:
                if not tensor.is_network_output:
                    network.mark_output(tensor)
                marked.append(tensor.name)
    return marked


class _LayerwiseEngine:
    """An engine built with `names` marked as outputs, deserialized and ready to `run` feeds."""

    def __init__(
        self,
        trt: Any,
        model_path: str | os.PathLike,
        names: Sequence[str],
        *,
        cache_path: str | os.PathLike | None,
        fp16: bool,
        layer_precisions: Mapping[str, str] | None = None,
        input_shapes: Mapping[str, Sequence[int]] | None = None,
        workspace_mb: int | None = None,
    ) -> None:
        self.trt = trt
        self.caps = capabilities(trt.__version__)
        self.caps.require("qdq" if cache_path is None else "cache")
        self.device = _device()  # before the build, which can take minutes
        cache = None if cache_path is None else cache_for_tensorrt(read_bytes(cache_path), trt.__version__, cache_path)
        serialized, self.marked = _build(
            trt, self.caps, model_path, cache=cache, fp16=fp16, layer_precisions=layer_precisions,
            input_shapes=input_shapes, workspace_mb=workspace_mb, mark=names,
        )
        self.runtime = trt.Runtime(_logger(trt))
        self.engine = self.runtime.deserialize_cuda_engine(serialized)
        if self.engine is None:
            raise QuantlabRuntimeError("TensorRT could not load the engine it built")
        self.context = self.engine.create_execution_context()
        engine = self.engine
        if self.caps.tensor_api:
            self.names = [engine.get_tensor_name(index) for index in range(engine.num_io_tensors)]
            self.inputs = [name for name in self.names if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT]
        else:
            self.names = [engine.get_binding_name(index) for index in range(engine.num_bindings)]
            self.inputs = [name for index, name in enumerate(self.names) if engine.binding_is_input(index)]

    def _dtype(self, name: str) -> np.dtype:
        if self.caps.tensor_api:
            return np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name)))
        return np.dtype(self.trt.nptype(self.engine.get_binding_dtype(self.names.index(name))))

    def _set_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        if self.caps.tensor_api:
            return self.context.set_input_shape(name, shape)
        return self.context.set_binding_shape(self.names.index(name), shape)

    def _shape(self, name: str) -> tuple[int, ...]:
        if self.caps.tensor_api:
            return tuple(self.context.get_tensor_shape(name))
        return tuple(self.context.get_binding_shape(self.names.index(name)))

    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Copy `feed` in, execute, copy every output back: output name -> array."""
        names, inputs, context = self.names, self.inputs, self.context
        missing = [name for name in inputs if name not in feed]
        if missing:
            raise QuantlabError(f"the feed has no value for engine input(s) {', '.join(missing)}")
        host = {}
        for name in inputs:
            host[name] = np.ascontiguousarray(feed[name], dtype=self._dtype(name))
            if not self._set_shape(name, host[name].shape):
                raise QuantlabRuntimeError(f"input {name}: shape {host[name].shape} is outside the engine's profile")
        for name in names:
            if name not in host:
                shape = self._shape(name)
                if any(dim < 0 for dim in shape):
                    raise QuantlabRuntimeError(f"tensor {name}: data-dependent shape {shape} is not supported")
                host[name] = np.empty(shape, dtype=self._dtype(name))
        try:
            pointers = {name: self.device.alloc(host[name].nbytes) for name in names}
            for name in inputs:
                self.device.upload(pointers[name], host[name])
            if self.caps.tensor_api:
                for name in names:
                    context.set_tensor_address(name, pointers[name])
                ok = context.execute_async_v3(self.device.stream)
            else:
                ok = context.execute_v2([pointers[name] for name in names])
            self.device.synchronize()
            if not ok:
                raise QuantlabRuntimeError("TensorRT inference failed (its messages above say why)")
            for name in names:
                if name not in inputs:
                    self.device.download(host[name], pointers[name])
        finally:
            self.device.free()
        return {name: host[name] for name in names if name not in inputs}


def _device() -> Any:
    """Device memory through cuda-python's runtime API, or through pycuda when cuda-python is missing."""
    try:
        try:
            from cuda.bindings import runtime as cudart  # cuda-python 12.6 and later
        except ImportError:
            from cuda import cudart  # older cuda-python (removed in 13)
        return _CudaRuntime(cudart)
    except ImportError:
        pass
    try:
        import pycuda.autoinit  # noqa: F401  (creates the CUDA context)
        import pycuda.driver
    except ImportError:
        raise QuantlabError(MISSING_CUDA) from None
    return _PyCuda(pycuda.driver)


class _CudaRuntime:
    """Buffers, copies and one stream through cuda-python (`cudart`); every call's error code is checked."""

    def __init__(self, cudart: Any) -> None:
        self.cudart = cudart
        self.pointers: list[int] = []
        self._stream = self._call(cudart.cudaStreamCreate())
        self.stream = int(self._stream)

    def _call(self, result: tuple) -> Any:
        if result[0] != self.cudart.cudaError_t.cudaSuccess:
            raise QuantlabRuntimeError(f"CUDA error: {result[0]}")
        return result[1] if len(result) > 1 else None

    def alloc(self, nbytes: int) -> int:
        pointer = self._call(self.cudart.cudaMalloc(max(nbytes, 1)))
        self.pointers.append(pointer)
        return int(pointer)

    def upload(self, pointer: int, array: np.ndarray) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call(self.cudart.cudaMemcpy(pointer, array.ctypes.data, array.nbytes, kind))

    def download(self, array: np.ndarray, pointer: int) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call(self.cudart.cudaMemcpy(array.ctypes.data, pointer, array.nbytes, kind))

    def synchronize(self) -> None:
        self._call(self.cudart.cudaStreamSynchronize(self._stream))

    def free(self) -> None:
        for pointer in self.pointers:
            self.cudart.cudaFree(pointer)
        self.pointers.clear()


class _PyCuda:
    """The same operations through pycuda."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver
        self.allocations: list[Any] = []
        self._stream = driver.Stream()
        self.stream = self._stream.handle

    def alloc(self, nbytes: int) -> int:
        allocation = self.driver.mem_alloc(max(nbytes, 1))
        self.allocations.append(allocation)
        return int(allocation)

    def upload(self, pointer: int, array: np.ndarray) -> None:
        self.driver.memcpy_htod(pointer, array)

    def download(self, array: np.ndarray, pointer: int) -> None:
        self.driver.memcpy_dtoh(array, pointer)

    def synchronize(self) -> None:
        self._stream.synchronize()

    def free(self) -> None:
        for allocation in self.allocations:
            allocation.free()
        self.allocations.clear()
