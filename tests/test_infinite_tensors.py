"""Tensors that hold -inf, +inf or float32's lowest by design: the attention masks of BERT-like encoders.

`(1 - mask) * -3.4028235e38` (float32's lowest, torch.finfo(torch.float32).min), `* -10000`, or a literal -inf are
added to the attention scores before a Softmax. Every calibration method must give a finite threshold for the tensors
it quantizes, and leave the others (`quantlab.calibration.unquantizable`) out of the threshold file with one warning
naming them; export then keeps those in float, and the INT8 model stays close to the FP32 one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import quantlab
from quantlab.calibration import calibrate, compute_amax, unquantizable
from quantlab.calibration.unquantizable import FLOAT32_LIMIT, INF_VALUES, NO_FINITE_VALUE, SENTINEL_RANGE
from quantlab.errors import QuantlabError
from quantlab.histogram import Histogram, HistogramSet
from quantlab.model import create_session
from test_cli import run

FLOAT32_LOWEST = float(np.finfo(np.float32).min)
MASKS = ("min_mask", "ten_thousand_mask", "inf_mask")  # additive masks of float32's lowest, -10000 and -inf
SEQUENCE = 16
# Every method and KL variant, as `quantlab calibrate` options (every option of each: EVERY_API_METHOD).
EVERY_METHOD = [
    ["--method", "kl"],
    ["--method", "kl", "--variant", "modelopt"],
    ["--method", "kl", "--variant", "onnxruntime"],
    ["--method", "max"],
    ["--method", "percentile"],
    ["--method", "mse"],
]
EXPORT_WARNING = (
    "warning: no threshold for 2 of the 5 tensors masked_attention.onnx quantizes, left in float:"
    " min_mask_3d, inf_mask_3d"
)
# The tensors of the model below that no INT8 threshold can represent, by reason.
LEFT_OUT = {
    "inf_mask_2d": INF_VALUES,
    "inf_mask": INF_VALUES,
    "inf_mask_3d": INF_VALUES,
    "inf_mask_logits": INF_VALUES,
    "all_minus_inf": NO_FINITE_VALUE,
    "min_mask_logits": SENTINEL_RANGE,
    "ten_thousand_mask_logits": SENTINEL_RANGE,
    "min_mask": FLOAT32_LIMIT,
    "min_mask_3d": FLOAT32_LIMIT,
}
EVERY_API_METHOD = [("kl", {"variant": v}) for v in ("tensorrt", "modelopt", "onnxruntime")] + [
    ("kl", {"exact_zeros": False}),
    ("max", {}),
    ("percentile", {}),
    ("percentile", {"variant": "onnxruntime"}),
    ("percentile", {"variant": "onnxruntime", "two_tailed": True}),
    ("mse", {}),
]


def save_masked_attention_model(path: Path) -> Path:
    """One attention head three times over, each with its own additive padding mask.

    x: [batch, 8, 16] float, attention_mask: [batch, 16] int64 (1 = attend). padding = 1 - Cast(attention_mask);
    min_mask = padding * float32's lowest, ten_thousand_mask = padding * -10000, inf_mask = Max(Where(mask == 0, -inf,
    0), all_minus_inf), where all_minus_inf = Where(mask < 0, 0, -inf) is -inf everywhere. scores = x @ w_key; per
    mask: logits = scores + Unsqueeze(mask), probs = Softmax(logits); context = (sum of the probs) @ w_value.
    """
    rng = np.random.default_rng(0)
    constants = {
        "one": np.array(1, np.float32),
        "zero": np.array(0, np.float32),
        "zero_int": np.array(0, np.int64),
        "float32_lowest": np.array(FLOAT32_LOWEST, np.float32),
        "minus_10000": np.array(-10000, np.float32),
        "minus_inf": np.array(-np.inf, np.float32),
        "axis_1": np.array([1], np.int64),
        "w_key": (rng.normal(size=(SEQUENCE, SEQUENCE)) / 2).astype(np.float32),
        "w_value": rng.normal(size=(SEQUENCE, SEQUENCE)).astype(np.float32),
    }

    def node(op: str, inputs: list[str], output: str, **attributes) -> onnx.NodeProto:
        return helper.make_node(op, inputs, [output], name=output, **attributes)

    nodes = [
        node("Cast", ["attention_mask"], "mask_float", to=TensorProto.FLOAT),
        node("Sub", ["one", "mask_float"], "padding"),
        node("Mul", ["padding", "float32_lowest"], "min_mask"),
        node("Mul", ["padding", "minus_10000"], "ten_thousand_mask"),
        node("Equal", ["attention_mask", "zero_int"], "is_padding"),
        node("Where", ["is_padding", "minus_inf", "zero"], "inf_mask_2d"),
        node("Less", ["attention_mask", "zero_int"], "never"),
        node("Where", ["never", "zero", "minus_inf"], "all_minus_inf"),
        node("Max", ["inf_mask_2d", "all_minus_inf"], "inf_mask"),
        node("MatMul", ["x", "w_key"], "scores"),
    ]
    for mask in MASKS:
        nodes += [
            node("Unsqueeze", [mask, "axis_1"], f"{mask}_3d"),
            node("Add", ["scores", f"{mask}_3d"], f"{mask}_logits"),
            node("Softmax", [f"{mask}_logits"], f"{mask}_probs", axis=-1),
        ]
    nodes += [
        node("Sum", [f"{mask}_probs" for mask in MASKS], "probs"),
        node("MatMul", ["probs", "w_value"], "context"),
    ]
    graph = helper.make_graph(
        nodes,
        "masked_attention",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8, SEQUENCE]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", SEQUENCE]),
        ],
        [helper.make_tensor_value_info("context", TensorProto.FLOAT, ["batch", 8, SEQUENCE])],
        initializer=[numpy_helper.from_array(value, name) for name, value in constants.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def save_masked_attention_data(directory: Path, seed: int, files: int = 4, samples: int = 16) -> Path:
    """Samples of x and of padding masks of random lengths (at least one token attended in each)."""
    rng = np.random.default_rng(seed)
    directory.mkdir()
    for index in range(files):
        lengths = rng.integers(1, SEQUENCE + 1, size=samples)
        mask = (np.arange(SEQUENCE) < lengths[:, None]).astype(np.int64)
        x = rng.normal(size=(samples, 8, SEQUENCE)).astype(np.float32)
        np.savez(directory / f"{index}.npz", x=x, attention_mask=mask)
    return directory


@pytest.fixture(scope="module")
def masked(tmp_path_factory) -> dict[str, Path]:
    """The model, its held-out data and its histograms, collected through the CLI."""
    root = tmp_path_factory.mktemp("masked")
    model = save_masked_attention_model(root / "masked_attention.onnx")
    histograms = root / "histograms.npz"
    calib = save_masked_attention_data(root / "calib", 1)
    result = run("collect", str(model), "-d", str(calib), "-o", str(histograms))
    assert result.returncode == 0, result.stderr
    assert "overflow" not in result.stderr and "invalid value" not in result.stderr  # float32's lowest bins quietly
    held_out = save_masked_attention_data(root / "eval", 2)
    return {"root": root, "model": model, "eval": held_out, "histograms": histograms}


@pytest.mark.parametrize("method", EVERY_METHOD, ids=" ".join)
def test_every_method_leaves_the_same_tensors_out_and_the_int8_model_stays_close(masked, method):
    thresholds = masked["root"] / f"{'-'.join(part.strip('-') for part in method)}.json"
    result = run("calibrate", str(masked["histograms"]), *method, "-o", str(thresholds))
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: 9 tensors left unquantized (no threshold): ")
    for tensor, reason in LEFT_OUT.items():
        assert f"'{tensor}'" in warnings[0] and f"({reason})" in warnings[0]

    amax = json.loads(thresholds.read_text())["thresholds"]
    assert set(amax).isdisjoint(LEFT_OUT) and len(amax) == 20 - len(LEFT_OUT)
    assert all(math.isfinite(value) for value in amax.values()), amax
    assert 9990 <= amax["ten_thousand_mask"] <= 10000  # a {0, -10000} mask is kept: INT8 holds it exactly

    # drift exports the Q/DQ model in memory, as `quantlab export` does (below), and compares it with the FP32 model
    report = masked["root"] / f"{thresholds.stem}.drift.json"
    drift = run(
        "drift", str(masked["model"]), "-d", str(masked["eval"]), "--thresholds", str(thresholds), "--json", str(report)
    )
    assert drift.returncode == 0, drift.stderr
    assert EXPORT_WARNING in drift.stderr.splitlines()
    (output,) = json.loads(report.read_text())["final"]["outputs"]
    assert output["name"] == "context" and math.isfinite(output["sqnr_db"]) and output["sqnr_db"] > 20, output


@pytest.mark.parametrize("suffix", [".json", ".cache"])
def test_export_keeps_the_tensors_left_out_in_float(masked, suffix):
    thresholds = masked["root"] / f"kl{suffix}"
    assert run("calibrate", str(masked["histograms"]), "-o", str(thresholds)).returncode == 0
    assert set(quantlab.read_thresholds(thresholds).amax).isdisjoint(LEFT_OUT)
    qdq = masked["root"] / f"kl{suffix}.qdq.onnx"
    result = run("export", str(masked["model"]), "--thresholds", str(thresholds), "-o", str(qdq))
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == EXPORT_WARNING
    model = onnx.load(str(qdq))
    quantized = {node.input[0] for node in model.graph.node if node.op_type == "QuantizeLinear"}
    assert quantized == {"x", "ten_thousand_mask_3d", "probs"}  # the MatMul inputs, the -10000 mask beside one
    create_session(model)


def test_show_plots_the_thresholds_of_a_tensor_left_out(masked):
    plot = masked["root"] / "logits.png"
    result = run("show", str(masked["histograms"]), "min_mask_logits", "--plot", str(plot))
    assert result.returncode == 0, result.stderr
    assert plot.stat().st_size > 5000


# --- the API, on histograms built from values --------------------------------------------------------------------


def scores(size: int = 20_000, seed: int = 0) -> np.ndarray:
    """Attention scores before any mask."""
    return np.random.default_rng(seed).normal(scale=3.0, size=size).astype(np.float32)


def masked_scores(sentinel: float, masked_share: float = 0.4) -> np.ndarray:
    """Attention logits: scores, a share of them pushed down by an additive mask of `sentinel`."""
    values = scores()
    padded = np.random.default_rng(1).random(values.size) < masked_share
    values[padded] += np.float32(sentinel)
    return values


def two_valued_mask(sentinel: float) -> np.ndarray:
    """An additive padding mask: 0 where attended, `sentinel` on a third of the positions."""
    return np.where(np.arange(1000) % 3 == 0, np.float32(sentinel), np.float32(0.0)).astype(np.float32)


@pytest.mark.parametrize(("method", "options"), EVERY_API_METHOD)
@pytest.mark.parametrize(
    "values",
    [
        masked_scores(FLOAT32_LOWEST),
        two_valued_mask(FLOAT32_LOWEST),
        np.concatenate([scores(), [np.finfo(np.float32).max, FLOAT32_LOWEST]]).astype(np.float32),
        np.linspace(FLOAT32_LOWEST, -FLOAT32_LOWEST, 100_001, dtype=np.float32),
        scores() * np.float32(1e37),
    ],
    ids=["logits-masked-by-float32-lowest", "mask-of-float32-lowest", "two-extremes", "uniform-to-float32-max", "1e37"],
)
def test_every_method_gives_a_finite_threshold_for_values_up_to_float32_max(values, method, options):
    hist = Histogram.from_values(values)
    amax = compute_amax(hist, method, **options)
    assert math.isfinite(amax) and 0 <= amax <= hist.amax  # 0: percentile, where 99.99% of the values lie in bin 0


def test_mse_on_a_range_scaled_by_a_power_of_two_scales_its_threshold_exactly():
    """The search runs on edges scaled down to 2**32 where the range is larger: float32 rounding commutes with powers of
    two, so the threshold is the one of the unscaled histogram, scaled (before, the squared errors overflowed)."""
    hist = Histogram.from_values(np.abs(scores()) ** 1.5)
    for exponent in (40, 100, 120):
        scaled = Histogram(hist.counts, np.ldexp(hist.edges, exponent), zero_count=hist.zero_count)
        assert compute_amax(scaled, "mse") == np.ldexp(compute_amax(hist, "mse"), exponent)


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        (np.full(100, -np.inf, np.float32), NO_FINITE_VALUE),
        (np.full(100, np.nan, np.float32), NO_FINITE_VALUE),
        (two_valued_mask(-np.inf), INF_VALUES),
        (np.append(scores(), [-np.inf, np.inf]).astype(np.float32), INF_VALUES),
        (masked_scores(FLOAT32_LOWEST), SENTINEL_RANGE),
        (masked_scores(FLOAT32_LOWEST, masked_share=0.9), SENTINEL_RANGE),
        (masked_scores(-10000.0), SENTINEL_RANGE),
        (masked_scores(-1e9, masked_share=0.001), SENTINEL_RANGE),
        (two_valued_mask(FLOAT32_LOWEST), FLOAT32_LIMIT),
        (two_valued_mask(-10000.0), None),
        (two_valued_mask(-1e30), None),
        (scores(), None),
        (np.append(scores(), np.nan).astype(np.float32), None),  # calibrated on its finite values
        (np.append(np.random.default_rng(1).normal(size=100_000), 1000.0).astype(np.float32), None),  # an outlier
        (np.random.default_rng(2).dirichlet(np.full(512, 0.05), size=40).astype(np.float32), None),  # peaky Softmax
        (np.zeros(100, np.float32), None),
    ],
    ids=[
        "all-minus-inf", "all-nan", "mask-of-minus-inf", "scores-and-inf", "logits-masked-by-float32-lowest",
        "logits-mostly-masked", "logits-masked-by-minus-10000", "logits-rarely-masked-by-minus-1e9",
        "mask-of-float32-lowest", "mask-of-minus-10000", "mask-of-minus-1e30", "scores", "scores-and-nan",
        "far-outlier", "softmax", "zeros",
    ],
)
def test_unquantizable_tells_the_tensors_int8_cannot_represent(values, reason):
    hist = Histogram.from_values(values)
    assert unquantizable(hist) == reason
    assert unquantizable(hist.fold()) == reason  # the same on the |x| histogram


def test_calibrate_leaves_them_out_with_one_warning_naming_them():
    histograms = HistogramSet(
        {
            "scores": Histogram.from_values(scores()),
            "mask": Histogram.from_values(two_valued_mask(FLOAT32_LOWEST)),
            "logits": Histogram.from_values(masked_scores(FLOAT32_LOWEST)),
            "inf_mask": Histogram.from_values(two_valued_mask(-np.inf)),
            "ten_thousand_mask": Histogram.from_values(two_valued_mask(-10000.0)),
        }
    )
    for method, options in EVERY_API_METHOD:
        with pytest.warns(UserWarning) as caught:
            amax = calibrate(histograms, method, **options)
        assert [str(w.message) for w in caught] == [
            f"3 tensors left unquantized (no threshold): 'mask' ({FLOAT32_LIMIT}); 'logits' ({SENTINEL_RANGE});"
            f" 'inf_mask' ({INF_VALUES})"
        ]
        assert list(amax) == ["scores", "ten_thousand_mask"]
        assert amax["ten_thousand_mask"] == compute_amax(histograms["ten_thousand_mask"], method, **options)
    with pytest.raises(QuantlabError, match=r"^no tensor can be quantized: 'inf_mask' \(Inf values"):
        calibrate({"inf_mask": histograms["inf_mask"]}, "kl")
