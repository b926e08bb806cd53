"""Train the bundled demo CNN on scikit-learn's digits and write its calibration/eval data.

Everything is reproducible: fixed seeds, deterministic single-threaded torch, no
downloads (the digits ship inside the scikit-learn wheel). Rerunning rewrites
bit-identical .npy files and the same accuracy.

    pip install torch==2.13.0 scikit-learn && python calib_data/make_demo.py
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

SEED = 20240517
EVAL_SAMPLES = 450
CALIB_SAMPLES = 320
CALIB_BATCH = 32
EVAL_BATCH = 50
EPOCHS = 40
TRAIN_BATCH = 32
LEARNING_RATE = 1e-3
OPSET = 17
MAX_ONNX_BYTES = 300_000

OUT_DIR = Path(__file__).resolve().parent
ONNX_PATH = OUT_DIR / "digits_cnn.onnx"
CALIB_DIR = OUT_DIR / "calib"
EVAL_INPUTS_DIR = OUT_DIR / "eval" / "inputs"
EVAL_LABELS_PATH = OUT_DIR / "eval" / "labels.npy"
METRICS_PATH = OUT_DIR / "metrics.json"


def make_deterministic() -> None:
    """Seed every RNG and pin torch to deterministic single-threaded kernels."""
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)


def load_splits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (x_train, y_train, x_eval, y_eval, x_calib); pixels scaled to [-1, 1], NCHW.

    The eval split is stratified by digit; the calibration set is drawn from the
    training split only, so eval accuracy is never measured on calibration data.
    """
    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0 * 2.0 - 1.0)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    x_train, x_eval, y_train, y_eval = train_test_split(
        images, labels, test_size=EVAL_SAMPLES, stratify=labels, random_state=SEED
    )
    calib_index = np.random.choice(len(x_train), size=CALIB_SAMPLES, replace=False)
    return x_train, y_train, x_eval, y_eval, x_train[calib_index]


class DigitsCNN(nn.Module):
    """Small CNN with one residual Add, so the exported graph is not a plain chain."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        )
        self.residual = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.head = nn.Sequential(
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
            nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.stem(x)
        features = torch.relu(self.residual(features) + features)
        return self.head(features)


def train(model: DigitsCNN, x_train: np.ndarray, y_train: np.ndarray) -> None:
    """Train with Adam on seeded mini-batch shuffles; cosine decay settles the final weights."""
    inputs, targets = torch.from_numpy(x_train), torch.from_numpy(y_train)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=EPOCHS)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for epoch in range(EPOCHS):
        epoch_loss = 0.0
        for batch in torch.randperm(len(inputs)).split(TRAIN_BATCH):
            optimizer.zero_grad()
            loss = loss_fn(model(inputs[batch]), targets[batch])
            loss.backward()
            optimizer.step()
            epoch_loss += loss.item() * len(batch)
        scheduler.step()
        if (epoch + 1) % 10 == 0:
            print(f"epoch {epoch + 1:3d}  train loss {epoch_loss / len(inputs):.4f}")
    model.eval()


def export_onnx(model: DigitsCNN, path: Path) -> None:
    """Export in eval mode with constant folding, which folds BatchNorm into the convs."""
    with warnings.catch_warnings():
        # The legacy TorchScript exporter is chosen on purpose (plain, BN-folded graph);
        # silence only its deprecation notice.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            model,
            (torch.zeros(1, 1, 8, 8),),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            do_constant_folding=True,
            training=torch.onnx.TrainingMode.EVAL,
        )
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    op_types = [node.op_type for node in proto.graph.node]
    assert "BatchNormalization" not in op_types and "Constant" not in op_types, op_types
    assert path.stat().st_size < MAX_ONNX_BYTES, path.stat().st_size


def ort_logits(path: Path, inputs: np.ndarray) -> np.ndarray:
    """Run the exported model in onnxruntime (single-threaded, CPU)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": inputs})[0]


def write_batches(array: np.ndarray, directory: Path, prefix: str, batch_size: int) -> None:
    """Write `array` as prefix_000.npy, prefix_001.npy, ... replacing any earlier batches."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(f"{prefix}_*.npy"):
        stale.unlink()
    for index, start in enumerate(range(0, len(array), batch_size)):
        np.save(directory / f"{prefix}_{index:03d}.npy", array[start : start + batch_size])


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of samples whose arg-max logit is the label."""
    return float(np.mean(logits.argmax(axis=1) == labels))


def main() -> None:
    """Train, export, verify ORT against torch, and write all artifacts."""
    make_deterministic()
    x_train, y_train, x_eval, y_eval, x_calib = load_splits()
    model = DigitsCNN()
    train(model, x_train, y_train)
    with torch.no_grad():
        torch_eval_logits = model(torch.from_numpy(x_eval)).numpy()

    export_onnx(model, ONNX_PATH)
    eval_logits = ort_logits(ONNX_PATH, x_eval)
    train_logits = ort_logits(ONNX_PATH, x_train)
    max_diff = float(np.abs(eval_logits - torch_eval_logits).max())
    assert max_diff < 1e-3, max_diff
    assert top1(eval_logits, y_eval) == top1(torch_eval_logits, y_eval)

    write_batches(x_calib, CALIB_DIR, "calib", CALIB_BATCH)
    write_batches(x_eval, EVAL_INPUTS_DIR, "eval", EVAL_BATCH)
    np.save(EVAL_LABELS_PATH, y_eval)

    metrics = {
        "eval_top1": top1(eval_logits, y_eval),
        "train_top1": top1(train_logits, y_train),
        "eval_samples": len(x_eval),
        "calib_samples": len(x_calib),
        "seed": SEED,
    }
    METRICS_PATH.write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"ORT vs torch max |logit diff| {max_diff:.2e}")
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
