"""TensorRT backend without TensorRT: the missing-TensorRT error, the version dispatch, the cache handed to TensorRT,
and the flags and precisions set on a minimal stand-in of the `tensorrt` module (TensorRT cannot be installed here)."""

from __future__ import annotations

import enum
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest

from quantlab.backends import tensorrt as backend
from quantlab.errors import QuantlabError
from quantlab.formats import Thresholds
from quantlab.formats.trt_cache import format_cache

CACHES = Path(__file__).parent / "fixtures" / "caches"
DEMO_MODEL = Path(__file__).resolve().parents[1] / "calib_data" / "digits_cnn.onnx"
THRESHOLDS = Thresholds({"input": 1.0, "conv_out": 6.5, "relu_out": 6.5})


# ---------------------------------------------------------------------------------------------------------------
# STAND-IN, NOT TENSORRT. TensorRT cannot be installed here (its wheels fetch their libraries from NVIDIA's index)
# and no machine of ours has it. This module has just the names quantlab's backend calls, records what it is told,
# and "parses" every model into the same two layers: Conv_0 -> conv_out, Relu_1 -> relu_out (the network output).
# It checks which calls quantlab makes; it says nothing about whether a real TensorRT accepts them.
# ---------------------------------------------------------------------------------------------------------------
def stand_in_tensorrt(version: str) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.float32, trt.float16 = "float32", "float16"
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("CreationFlag", "EXPLICIT_BATCH STRONGLY_TYPED", start=0)
    trt.BuilderFlag = enum.Enum(
        "BuilderFlag", "INT8 FP16 OBEY_PRECISION_CONSTRAINTS PREFER_PRECISION_CONSTRAINTS STRICT_TYPES"
    )
    trt.MemoryPoolType = enum.Enum("MemoryPoolType", "WORKSPACE")
    trt.built = []  # (network, config) of every build_serialized_network call

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            self.severity = severity

    class Tensor:
        def __init__(self, name, shape=(1, 4, 8, 8)):
            self.name, self.shape, self.dtype, self.is_network_output = name, shape, trt.float32, False

    class Layer:
        def __init__(self, name, output):
            self.name, self.output, self.precision, self.output_types = name, output, None, {}
            self.num_outputs = 1

        def get_output(self, index):
            return self.output

        def set_output_type(self, index, dtype):
            self.output_types[index] = dtype

    class Network:
        def __init__(self, flags):
            self.flags, self.layers, self.inputs, self.marked = flags, [], [], []

        num_layers = property(lambda self: len(self.layers))
        num_inputs = property(lambda self: len(self.inputs))

        def get_layer(self, index):
            return self.layers[index]

        def get_input(self, index):
            return self.inputs[index]

        def mark_output(self, tensor):
            tensor.is_network_output = True
            self.marked.append(tensor.name)

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path):
            relu_out = Tensor("relu_out")
            relu_out.is_network_output = True
            self.network.inputs = [Tensor("input", (1, 1, 8, 8))]
            self.network.layers = [Layer("Conv_0", Tensor("conv_out")), Layer("Relu_1", relu_out)]
            return True

    class Config:
        def __init__(self):
            self.flags, self.pools, self.int8_calibrator, self.max_workspace_size = set(), {}, None, None

        def set_flag(self, flag):
            self.flags.add(flag)

        def set_memory_pool_limit(self, pool, size):
            self.pools[pool] = size

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def build_serialized_network(self, network, config):
            trt.built.append((network, config))
            return b"stand-in engine"

    class IInt8EntropyCalibrator2:
        def __init__(self):
            self.base_initialised = True

    trt.Logger, trt.OnnxParser, trt.Builder = Logger, OnnxParser, Builder
    trt.IInt8EntropyCalibrator2 = IInt8EntropyCalibrator2
    trt.init_libnvinfer_plugins = lambda logger, namespace: True
    return trt


@pytest.fixture
def use_tensorrt(monkeypatch):
    """Install a stand-in `tensorrt` of the given version (and make sure no CUDA binding can be imported)."""

    def install(version: str) -> types.ModuleType:
        trt = stand_in_tensorrt(version)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        for name in ("cuda", "cuda.bindings", "pycuda"):
            monkeypatch.setitem(sys.modules, name, None)
        return trt

    return install


@pytest.fixture
def model_file(tmp_path) -> Path:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"not read by the stand-in parser")
    return path


def write_cache(path: Path, trt_version: str) -> bytes:
    data = format_cache(THRESHOLDS, trt_version=trt_version)
    path.write_bytes(data)
    return data


# (a) without TensorRT ------------------------------------------------------------------------------------------

def test_importing_the_backend_does_not_import_tensorrt():
    code = "import sys, quantlab.backends.tensorrt; assert 'tensorrt' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "call",
    [
        lambda tmp: backend.build_engine_from_cache(tmp / "m.onnx", tmp / "m.cache", tmp / "m.plan"),
        lambda tmp: backend.build_engine_from_qdq(tmp / "m.qdq.onnx", tmp / "m.plan"),
        lambda tmp: backend.engine_layer_outputs(tmp / "m.onnx", {}),
        lambda tmp: backend.TensorRTPairedRunner(tmp / "m.onnx", cache_path=tmp / "m.cache"),
    ],
    ids=["build_engine_from_cache", "build_engine_from_qdq", "engine_layer_outputs", "TensorRTPairedRunner"],
)
def test_missing_tensorrt_is_one_line_error(call, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` now fails, installed or not
    with pytest.raises(QuantlabError) as caught:
        call(tmp_path)
    message = str(caught.value)
    assert message.startswith("TensorRT is not installed: pip install 'quantlab[tensorrt]'")
    assert "pypi.nvidia.com" in message and "\n" not in message
    assert caught.value.exit_code == 2
    assert not list(tmp_path.iterdir())


# version dispatch (pure) ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "version, implicit, explicit, strongly_typed, explicit_batch, precision_flag, memory_pools, tensor_api",
    [
        ("8.0.1.6", True, False, False, True, "STRICT_TYPES", False, False),
        ("8.2.1.8", True, False, False, True, "OBEY_PRECISION_CONSTRAINTS", False, False),
        ("8.6.1.post1", True, False, False, True, "OBEY_PRECISION_CONSTRAINTS", True, True),
        ("10.3.0.26", True, True, False, False, "OBEY_PRECISION_CONSTRAINTS", True, True),
        ("11.0.0", False, True, True, False, "OBEY_PRECISION_CONSTRAINTS", True, True),
    ],
)
def test_capabilities(
    version, implicit, explicit, strongly_typed, explicit_batch, precision_flag, memory_pools, tensor_api
):
    caps = backend.capabilities(version)
    assert (caps.implicit_int8, caps.explicit_int8, caps.strongly_typed, caps.explicit_batch_flag) == (
        implicit, explicit, strongly_typed, explicit_batch
    )
    assert (caps.precision_flag, caps.memory_pools, caps.tensor_api) == (precision_flag, memory_pools, tensor_api)


@pytest.mark.parametrize(
    "version, path, message",
    [
        ("7.2.3", "cache", "TensorRT 7.2.3 is not supported: quantlab needs TensorRT 8 or newer"),
        ("11.0.0", "cache", "TensorRT 11 removed implicit INT8 calibration"),
        ("12.1.0", "cache", "export a Q/DQ model with `quantlab export`"),
        ("8.6.1", "qdq", "building from a Q/DQ model needs TensorRT 10 or newer"),
    ],
)
def test_require_refuses_unsupported_paths(version, path, message):
    with pytest.raises(QuantlabError, match=message.replace("`", ".").replace("/", ".")):
        backend.capabilities(version).require(path)


@pytest.mark.parametrize(
    "version, path", [("8.0.1", "cache"), ("10.3.0", "cache"), ("10.3.0", "qdq"), ("11.0.0", "qdq")]
)
def test_require_allows_supported_paths(version, path):
    backend.capabilities(version).require(path)


def test_capabilities_rejects_a_non_version():
    with pytest.raises(QuantlabError, match="expected major.minor"):
        backend.capabilities("ten")


# the cache handed to TensorRT ----------------------------------------------------------------------------------

def test_cache_with_the_right_header_is_handed_over_byte_for_byte():
    data = format_cache(THRESHOLDS, trt_version="10.3.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backend.cache_for_tensorrt(data, "10.3.0.26") is data


@pytest.mark.parametrize(
    "fixture, version, header",
    [
        ("trt8601_entropy2_diffusion.cache", "10.3.0", b"TRT-100300-EntropyCalibration2"),
        ("trt101303_minmax_mpnet.cache", "10.13.3", b"TRT-101303-EntropyCalibration2"),  # algorithm differs
        ("legacy_header_yolov2.cache", "8.6.1", b"TRT-8601-EntropyCalibration2"),
    ],
)
def test_cache_with_another_header_gets_the_running_tensorrts(fixture, version, header):
    data = (CACHES / fixture).read_bytes()
    with pytest.warns(UserWarning, match=f"not what TensorRT {version} reads"):
        handed = backend.cache_for_tensorrt(data, version, fixture)
    assert handed == header + b"\n" + data.split(b"\n", 1)[1]


def test_cache_without_tensors_is_refused():
    with pytest.raises(QuantlabError, match="holds no tensors"):
        backend.cache_for_tensorrt(b"TRT-8601-EntropyCalibration2\n", "8.6.1")


# the cache path on the stand-in --------------------------------------------------------------------------------

@pytest.mark.parametrize("version", ["8.0.1", "8.6.1", "10.3.0"])
def test_cache_path_calibrator_flags_and_precisions(version, use_tensorrt, model_file, tmp_path):
    trt = use_tensorrt(version)
    cache = write_cache(tmp_path / "model.cache", version)
    out = backend.build_engine_from_cache(
        model_file, tmp_path / "model.cache", tmp_path / "model.plan", layer_precisions={"relu_out": "fp32"},
        workspace_mb=256,
    )
    assert out.read_bytes() == b"stand-in engine"
    (network, config), = trt.built
    explicit_batch = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    assert network.flags == (explicit_batch if version.startswith("8.") else 0)
    precision_flag = trt.BuilderFlag.STRICT_TYPES if version == "8.0.1" else trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS
    assert config.flags == {trt.BuilderFlag.INT8, trt.BuilderFlag.FP16, precision_flag}
    if version == "8.0.1":
        assert (config.max_workspace_size, config.pools) == (256 << 20, {})
    else:
        assert config.pools == {trt.MemoryPoolType.WORKSPACE: 256 << 20}
    conv, relu = network.layers
    assert (relu.precision, relu.output_types) == (trt.float32, {0: trt.float32})
    assert (conv.precision, conv.output_types) == (None, {})
    calibrator = config.int8_calibrator
    assert isinstance(calibrator, trt.IInt8EntropyCalibrator2) and calibrator.base_initialised
    assert calibrator.read_calibration_cache() == cache
    assert calibrator.get_batch_size() == 1
    assert calibrator.write_calibration_cache(b"anything") is None
    assert not calibrator.asked_for_data
    assert calibrator.get_batch(["input"]) is None


def test_cache_path_rewrites_another_releases_header(use_tensorrt, model_file, tmp_path):
    trt = use_tensorrt("10.3.0.26")
    cache = write_cache(tmp_path / "model.cache", "8.6.1")
    with pytest.warns(UserWarning, match="'TRT-8601-EntropyCalibration2' is not what TensorRT 10.3.0.26 reads"):
        backend.build_engine_from_cache(model_file, tmp_path / "model.cache", tmp_path / "model.plan", fp16=False)
    (_, config), = trt.built
    assert config.flags == {trt.BuilderFlag.INT8}
    handed = config.int8_calibrator.read_calibration_cache()
    assert handed == b"TRT-100300-EntropyCalibration2\n" + cache.split(b"\n", 1)[1]
    assert (tmp_path / "model.cache").read_bytes() == cache


def test_tensorrt_11_refuses_the_cache_path(use_tensorrt, model_file, tmp_path):
    trt = use_tensorrt("11.0.0")
    write_cache(tmp_path / "model.cache", "10.3.0")
    with pytest.raises(QuantlabError) as caught:
        backend.build_engine_from_cache(model_file, tmp_path / "model.cache", tmp_path / "model.plan")
    assert str(caught.value) == (
        "TensorRT 11.0.0: TensorRT 11 removed implicit INT8 calibration, so a calibration cache cannot be used; "
        "export a Q/DQ model with `quantlab export` and build from it (the Q/DQ path)"
    )
    assert trt.built == [] and not (tmp_path / "model.plan").exists()


def test_cache_of_another_model_is_refused(use_tensorrt, model_file, tmp_path):
    use_tensorrt("8.6.1")
    (tmp_path / "other.cache").write_bytes(format_cache(Thresholds({"features.0": 2.0}), trt_version="8.6.1"))
    with pytest.raises(QuantlabError, match="none of the cache's 1 tensors is in"):
        backend.build_engine_from_cache(model_file, tmp_path / "other.cache", tmp_path / "model.plan")


def test_layer_precisions_by_layer_name_unknown_names_and_bad_values(use_tensorrt, model_file, tmp_path):
    trt = use_tensorrt("10.3.0")
    write_cache(tmp_path / "model.cache", "10.3.0")
    with pytest.warns(UserWarning, match="no layer or layer output named Gone_7"):
        backend.build_engine_from_cache(
            model_file, tmp_path / "model.cache", tmp_path / "model.plan",
            layer_precisions={"Conv_0": "fp16", "Gone_7": "fp32"},
        )
    (network, _), = trt.built
    assert (network.layers[0].precision, network.layers[0].output_types) == (trt.float16, {0: trt.float16})
    with pytest.raises(QuantlabError, match="layer precision int8: expected one of fp32, fp16"):
        backend.build_engine_from_cache(
            model_file, tmp_path / "model.cache", tmp_path / "model.plan", layer_precisions={"Conv_0": "int8"}
        )


# the Q/DQ path on the stand-in ---------------------------------------------------------------------------------

def test_qdq_path_on_tensorrt_10_sets_int8_and_fp16_without_calibrator(use_tensorrt, model_file, tmp_path):
    trt = use_tensorrt("10.3.0")
    backend.build_engine_from_qdq(model_file, tmp_path / "model.plan")
    (network, config), = trt.built
    assert network.flags == 0
    assert config.flags == {trt.BuilderFlag.INT8, trt.BuilderFlag.FP16}
    assert config.int8_calibrator is None


def test_qdq_path_on_tensorrt_11_is_strongly_typed_without_precision_flags(use_tensorrt, model_file, tmp_path):
    trt = use_tensorrt("11.0.0")
    backend.build_engine_from_qdq(model_file, tmp_path / "model.plan")
    (network, config), = trt.built
    assert network.flags == 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert config.flags == set() and config.int8_calibrator is None


def test_qdq_path_refused_before_tensorrt_10(use_tensorrt, model_file, tmp_path):
    use_tensorrt("8.6.1")
    with pytest.raises(QuantlabError, match="needs TensorRT 10 or newer"):
        backend.build_engine_from_qdq(model_file, tmp_path / "model.plan")


# per-layer outputs ---------------------------------------------------------------------------------------------

def test_mark_outputs_marks_named_layer_outputs_once(use_tensorrt):
    trt = use_tensorrt("10.3.0")
    network = trt.Builder(None).create_network(0)
    trt.OnnxParser(network, None).parse_from_file("model.onnx")
    marked = backend._mark_outputs(network, ["conv_out", "relu_out", "conv_out", "folded_away"])
    assert marked == ["conv_out", "relu_out"]
    assert network.marked == ["conv_out"]  # relu_out is already a network output


def test_layer_outputs_need_cuda_bindings_and_fail_before_building(use_tensorrt):
    trt = use_tensorrt("10.3.0")
    with pytest.raises(QuantlabError, match=r"needs cuda-python \(or pycuda\)"):
        backend.engine_layer_outputs(DEMO_MODEL, {})
    assert trt.built == []


@pytest.mark.parametrize(
    "args",
    [
        ["build", "{model}", "--cache", "{cache}", "-o", "{out}"],
        ["build", "{model}", "-o", "{out}"],
        ["drift", "{model}", "-d", "{data}", "--thresholds", "{cache}", "--engine", "tensorrt"],
    ],
    ids=["build-from-cache", "build-from-qdq", "drift-engine-tensorrt"],
)
def test_cli_without_tensorrt_says_how_to_get_it(tmp_path, args):
    """Through the real CLI, in a subprocess: one line naming the extra, exit 2, no engine file."""
    from conftest import DEMO_MODEL, EVAL_INPUTS, ROOT
    from test_cli import assert_one_line_error, run

    cache = ROOT / "tests" / "fixtures" / "caches" / "trt8601_entropy2_diffusion.cache"
    out = tmp_path / "model.engine"
    filled = [a.format(model=DEMO_MODEL, cache=cache, out=out, data=EVAL_INPUTS) for a in args]
    assert_one_line_error(run(*filled), 2, "TensorRT is not installed", "quantlab[tensorrt]")
    assert not out.exists()
