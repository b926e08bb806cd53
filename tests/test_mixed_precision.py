"""Mixed precision (`quantlab drift --target-sqnr`): the fewest layers kept in float to reach a target, judged on the
worst float output; the switch model computes what the real export with those layers kept computes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import quantlab
from conftest import CALIB_DIR, DEMO_MODEL
from quantlab.formats import Thresholds, write_thresholds
from quantlab.formats.qdq import quantize_qdq
from quantlab.mixed import SwitchModel, max_layers, mixed_precision, quantized_layers, rank_layers, tensorrt_quantized
from test_cli import assert_one_line_error, run

WIDTH = 16
LAYERS = 8


def save_chain(path: Path, side_output: bool = False) -> Path:
    """x [batch, 16] -> 8 x (MatMul "layer<i>" -> Relu) -> y. With `side_output`, a second output z [batch, 16], from a
    MatMul "side" of side_in = 3 * act2 (a tensor only that layer reads)."""
    rng = np.random.default_rng(0)
    nodes, initializers = [], []
    current = "x"
    for index in range(LAYERS):
        weight = (rng.normal(size=(WIDTH, WIDTH)) / np.sqrt(WIDTH) * 1.4).astype(np.float32)
        initializers.append(numpy_helper.from_array(weight, f"w{index}"))
        nodes.append(helper.make_node("MatMul", [current, f"w{index}"], [f"mm{index}"], name=f"layer{index}"))
        nodes.append(helper.make_node("Relu", [f"mm{index}"], [f"act{index}"], name=f"relu{index}"))
        current = f"act{index}"
    nodes.append(helper.make_node("Identity", [current], ["y"], name="out"))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", WIDTH])]
    if side_output:
        weight = rng.normal(size=(WIDTH, WIDTH)).astype(np.float32)  # 16 x 16: a smaller MatMul stays in float
        initializers += [numpy_helper.from_array(weight, "ws"), numpy_helper.from_array(np.float32(3.0), "three")]
        nodes.append(helper.make_node("Mul", ["act2", "three"], ["side_in"], name="scale"))
        nodes.append(helper.make_node("MatMul", ["side_in", "ws"], ["z"], name="side"))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", WIDTH]))
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])], outputs, initializers
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def save_data(directory: Path, count: int, seed: int) -> Path:
    directory.mkdir()
    rng = np.random.default_rng(seed)
    for index in range(count):
        np.save(directory / f"{index:03d}.npy", rng.normal(size=(4, WIDTH)).astype(np.float32))
    return directory


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The chain model, its calibration and evaluation data, and max|x| thresholds."""
    root = tmp_path_factory.mktemp("chain")
    model = save_chain(root / "chain.onnx")
    side = save_chain(root / "side.onnx", side_output=True)
    calib, held_out = save_data(root / "calib", 8, 0), save_data(root / "eval", 8, 1)
    histograms = quantlab.collect(side, calib)
    amax = {name: hist.amax for name, hist in histograms.items()}
    return root, model, side, calib, held_out, amax


def clipped(amax: dict[str, float], *tensors: str) -> dict[str, float]:
    """The thresholds with `tensors` clipped to 5% of their range: the layers reading them become sensitive."""
    return {name: value * (0.05 if name in tensors else 1.0) for name, value in amax.items()}


def chain_amax(amax: dict[str, float]) -> dict[str, float]:
    """The thresholds of the chain alone (collected on the model with the side output)."""
    return {name: value for name, value in amax.items() if name not in ("side_in", "z")}


def test_one_sensitive_layer_is_the_one_kept(chain):
    _, model, _, calib, held_out, amax = chain
    thresholds = clipped(chain_amax(amax), "act4")  # layer5 reads act4
    ranking = rank_layers(model, thresholds, calib)
    assert ranking[0].layer == "layer5" and len(ranking) == LAYERS
    assert ranking[0].sqnr_db < 20 < min(entry.sqnr_db for entry in ranking[1:])
    result = mixed_precision(model, thresholds, calib, data=held_out, target_sqnr=25)
    assert result.kept_fp32 == ["layer5"]
    assert result.reached and result.measured.sqnr_db >= 25 > result.steps[0][1].sqnr_db
    assert result.layers == LAYERS and result.bound == 1  # 10% of 8 layers, at least one
    assert [len(kept) for kept, _ in result.steps] == [0, 1]
    kept = {node.name for node in result.model.graph.node if node.op_type == "MatMul"} - set(quantized_layers(result.model))
    assert kept == {"layer5"}  # the exported model keeps exactly that layer in float


def test_nothing_kept_when_the_int8_model_reaches_the_target(chain):
    _, model, _, calib, held_out, amax = chain
    result = mixed_precision(model, chain_amax(amax), calib, data=held_out, target_sqnr=20)
    assert result.kept_fp32 == [] and result.reached and result.ranking == [] and result.runs == 3  # every layer INT8 on --data; the export on both


def test_two_sensitive_layers_need_two_and_the_bound_says_so(chain):
    _, model, _, calib, held_out, amax = chain
    thresholds = clipped(chain_amax(amax), "act1", "act5")  # layer2 and layer6
    short = mixed_precision(model, thresholds, calib, data=held_out, target_sqnr=25)
    assert short.reached is False and short.bound == 1 and len(short.kept_fp32) == 1
    assert short.kept_fp32[0] in ("layer2", "layer6")
    message = short.message("--data")
    assert message.startswith("target 25 dB not reached within 1 of 8 layers in FP32 (--max-fp32): the best is ")
    assert message.endswith(f"{short.measured.sqnr_db:.2f} dB on --data, with 1 kept")
    enough = mixed_precision(model, thresholds, calib, data=held_out, target_sqnr=25, max_fp32=2)
    assert enough.reached and sorted(enough.kept_fp32) == ["layer2", "layer6"]
    assert mixed_precision(model, thresholds, calib, data=held_out, target_sqnr=25, max_fp32="25%").kept_fp32 == enough.kept_fp32


def test_the_worst_output_decides(chain):
    """The second output alone suffers (its layer reads a clipped tensor): the first output reaches the target with
    every layer INT8, the worst only with that layer kept."""
    _, _, side, calib, held_out, amax = chain
    result = mixed_precision(side, clipped(amax, "side_in"), calib, data=held_out, target_sqnr=25)
    first = result.steps[0][1]
    assert first.outputs["y"] > 25 > first.outputs["z"] and first.worst_output == "z"
    assert result.kept_fp32 == ["side"] and result.reached and result.ranking[0].layer == "side"
    assert result.summary()["outputs_sqnr_db"].keys() == {"y", "z"}


def test_onnxruntime_target(chain):
    """ONNX Runtime's quantizer gives a Relu's input its output's range, so a clipped Relu output clips the layer
    that writes it too: both are kept, and the answer is the real export's."""
    _, model, _, calib, held_out, amax = chain
    histograms = quantlab.collect(model, calib)
    thresholds = Thresholds(clipped(chain_amax(amax), "act4"), min_max=histograms.min_max())
    result = mixed_precision(model, thresholds, calib, data=held_out, target_sqnr=25, max_fp32=2, target="onnxruntime")
    assert sorted(result.kept_fp32) == ["layer4", "layer5"] and result.reached and not result.exact
    assert result.target == "onnxruntime" and result.summary()["switch_model_exact"] is False


def test_max_layers():
    assert [max_layers(value, 64) for value in (0.10, "10%", "5%", "1%", 6, "6", None, 100)] == [6, 6, 3, 1, 6, 6, 64, 64]
    assert max_layers(0.10, 8) == 1 and max_layers(0, 8) == 0
    for bad in ("ten", "0%", "150%", -1, 1.5):
        with pytest.raises(quantlab.QuantlabError):
            max_layers(bad, 8)


def _plain_session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # no integer kernels: Q/DQ as written
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def test_switch_model_computes_what_the_export_computes(demo_feeds):
    """Residual Add, Relu/MaxPool chains sharing a scale, a Gemm: for any kept set the tensorrt target's switch model
    gives the outputs of `quantize_qdq(keep_fp32=kept)` (both run without ONNX Runtime's fusions). The 5 layers are
    the 4 Conv and head.5's Gemm: the logits Gemm (10 outputs, below MIN_GEMM_DIM) stays in float in every export."""
    thresholds = {name: hist.amax for name, hist in quantlab.collect(DEMO_MODEL, CALIB_DIR).items()}
    base = quantize_qdq(DEMO_MODEL, thresholds)
    layers = quantized_layers(base)
    switch = SwitchModel(base, quantize_qdq(DEMO_MODEL, thresholds, keep_fp32=layers), tensorrt_quantized(DEMO_MODEL, thresholds))
    assert switch.exact and len(layers) == 5 and "/head/head.7/Gemm" not in layers
    session = _plain_session(switch.model)
    batch = {"input": np.concatenate([feed["input"] for feed in demo_feeds[:16]])}
    rng = np.random.default_rng(0)
    subsets = [[], layers, *[list(rng.choice(layers, size=size, replace=False)) for size in (1, 2, 3, 4)]]
    for kept in subsets:
        expected = _plain_session(quantize_qdq(DEMO_MODEL, thresholds, keep_fp32=kept)).run(None, batch)
        got = session.run(None, {**batch, **switch.feed(kept)})
        for want, have in zip(expected, got):
            np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-5, err_msg=f"kept {kept}")


def test_cli_target_sqnr(chain, tmp_path):
    root, model, _, calib, held_out, amax = chain
    table = tmp_path / "t.json"
    write_thresholds(table, Thresholds(clipped(chain_amax(amax), "act4")))
    out, mixed = tmp_path / "d.json", tmp_path / "mixed.onnx"
    common = ["drift", str(model), "-d", str(held_out), "--thresholds", str(table), "--calib-data", str(calib)]
    done = run(*common, "--target-sqnr", "25", "--json", str(out), "--mixed-out", str(mixed))
    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("target 25 dB reached: ") and "with 1 of 8 quantizable layers (12.5%) in FP32" in last
    record = json.loads(out.read_text())["mixed_precision"]
    assert record["kept_fp32"] == ["layer5"] and record["reached"] is True and record["sqnr_db"] >= 25
    assert record["quantizable_layers"] == 8 and record["bound"] == 1 and record["calibration_data"] == str(calib)
    assert mixed.is_file()

    missed = run(*common, "--target-sqnr", "80", "--json", str(out), "--mixed-out", str(mixed))
    assert missed.returncode == 1, missed.stderr
    lines = missed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("quantlab: target 80 dB not reached within 1 of 8 layers in FP32")
    assert "Traceback" not in missed.stdout + missed.stderr
    assert json.loads(out.read_text())["mixed_precision"]["reached"] is False  # the report and model are still written

    assert_one_line_error(run(*common, "--target-sqnr", "25", "--max-fp32", "ten"), 2, "--max-fp32 'ten'")
    assert_one_line_error(run("drift", str(model), "-d", str(held_out), "--thresholds", str(table), "--calib-data", str(calib)), 2, "--calib-data goes with")
