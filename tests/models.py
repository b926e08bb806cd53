"""Small ONNX models built in the tests, shaped like the third-party models quantlab must handle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def save_multi_input_model(path: Path) -> Path:
    """Two float inputs and an int64 input, dynamic batch, weights in Constant nodes, int side tensors.

    a, b: [batch, 4] float; ids: [batch] int64.
    sum = a + b; proj = sum @ W (W from a Constant node, through Identity); act = Relu(proj);
    emb = Gather(table, ids) (a float activation computed from an int input); shape = Shape(a) (int64, not an
    activation); width = Cast(shape) (float, but depends on the input: kept); out = act * emb.
    """
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(4, 3)).astype(np.float32)
    table = rng.normal(size=(10, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["W_const"], value=numpy_helper.from_array(weight)),
        helper.make_node("Identity", ["W_const"], ["W"]),
        helper.make_node("Add", ["a", "b"], ["sum"]),
        helper.make_node("MatMul", ["sum", "W"], ["proj"]),
        helper.make_node("Relu", ["proj"], ["act"]),
        helper.make_node("Gather", ["table", "ids"], ["emb"], axis=0),
        helper.make_node("Mul", ["act", "emb"], ["out"]),
        helper.make_node("Shape", ["a"], ["shape"]),
        helper.make_node("Cast", ["shape"], ["width"], to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(
        nodes,
        "multi_input",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch"]),
        ],
        [
            helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("width", TensorProto.FLOAT, [2]),
        ],
        initializer=[numpy_helper.from_array(table, "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def save_rearranging_model(path: Path) -> Path:
    """Tensors that hold other tensors' values rearranged, next to ones that compute or select values.

    x: [batch, 4, 6] float. xt = Transpose(x); act = Relu(xt); flat = Reshape(act, [-1, 24]); u = Unsqueeze(flat);
    s = Squeeze(u); same = Identity(s); xf = Flatten(x); part = Slice(act) (a subset: its own values);
    out = same * 2. Four tensors compute or select values: x, act, part, out; the other six rearrange them.
    """
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
        helper.make_node("Relu", ["xt"], ["act"]),
        helper.make_node("Reshape", ["act", "shape"], ["flat"]),
        helper.make_node("Unsqueeze", ["flat", "axis1"], ["u"]),
        helper.make_node("Squeeze", ["u", "axis1"], ["s"]),
        helper.make_node("Identity", ["s"], ["same"]),
        helper.make_node("Flatten", ["x"], ["xf"], axis=1),
        helper.make_node("Slice", ["act", "zero", "two", "axis1"], ["part"]),
        helper.make_node("Mul", ["same", "two_f"], ["out"]),
    ]
    initializers = [
        numpy_helper.from_array(np.array([-1, 24], np.int64), "shape"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([2], np.int64), "two"),
        numpy_helper.from_array(np.array(2.0, np.float32), "two_f"),
    ]
    graph = helper.make_graph(
        nodes,
        "rearranging",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 6])],
        [
            helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 24]),
            helper.make_tensor_value_info("part", TensorProto.FLOAT, ["batch", 2, 4]),
            helper.make_tensor_value_info("xf", TensorProto.FLOAT, ["batch", 24]),
        ],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def save_multi_input_data(directory: Path, files: int = 3, samples_per_file: int = 5, seed: int = 1) -> Path:
    """`.npz` files keyed by input name for the multi-input model (batches, one sample per file for the last)."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        n = samples_per_file
        np.savez(
            directory / f"part_{i:02d}.npz",
            a=rng.normal(size=(n, 4)).astype(np.float32),
            b=rng.standard_t(3, size=(n, 4)).astype(np.float32),
            ids=rng.integers(0, 10, size=n).astype(np.int64),
        )
    np.savez(
        directory / f"part_{files:02d}.npz",
        a=rng.normal(size=4).astype(np.float32),
        b=rng.normal(size=4).astype(np.float32),
        ids=np.array(3, dtype=np.int64),
    )
    return directory
