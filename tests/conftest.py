"""Shared fixtures: the bundled demo model and data, and its activations gathered independently of quantlab."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ROOT / "calib_data" / "digits_cnn.onnx"
CALIB_DIR = ROOT / "calib_data" / "calib"
EVAL_INPUTS = ROOT / "calib_data" / "eval" / "inputs"
EVAL_LABELS = ROOT / "calib_data" / "eval" / "labels.npy"


def run_all_float_outputs(model_path: Path, feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Every float tensor of the model (inputs and node outputs) over all feeds, concatenated, via plain ONNX Runtime.

    Written independently of quantlab's own model/collect code so tests can use it as the oracle.
    """
    import onnxruntime as ort

    model = onnx.shape_inference.infer_shapes(onnx.load(str(model_path)))
    graph = model.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*graph.input, *graph.value_info, *graph.output]}
    initializers = {init.name for init in graph.initializer}
    existing = {o.name for o in graph.output}
    float_names = [i.name for i in graph.input if i.name not in initializers and types[i.name] == onnx.TensorProto.FLOAT]
    for node in graph.node:
        for name in node.output:
            if name and types.get(name) == onnx.TensorProto.FLOAT:
                float_names.append(name)
                if name not in existing:
                    graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    gathered: dict[str, list[np.ndarray]] = {name: [] for name in float_names}
    for feed in feeds:
        values = dict(zip(outputs, session.run(None, feed)))
        values.update(feed)
        for name in float_names:
            gathered[name].append(np.asarray(values[name]).ravel())
    return {name: np.concatenate(parts) for name, parts in gathered.items()}


@pytest.fixture(scope="session")
def demo_feeds() -> list[dict[str, np.ndarray]]:
    """The bundled calibration files, one feed per file, read with plain NumPy."""
    return [{"input": np.load(path)} for path in sorted(CALIB_DIR.glob("*.npy"))]


@pytest.fixture(scope="session")
def demo_activations(demo_feeds) -> dict[str, np.ndarray]:
    """name -> all values of that float tensor of the demo model over the whole calibration set."""
    return run_all_float_outputs(DEMO_MODEL, demo_feeds)
