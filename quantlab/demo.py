"""`quantlab demo`: every stage of the pipeline on the bundled digits CNN and its real calibration data."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from quantlab.atomic import atomic_write
from quantlab.collection import Progress, collect
from quantlab.errors import QuantlabError

if TYPE_CHECKING:
    from quantlab.drift import DriftReport

_DATA_DIR_NAME = "calib_data"


@dataclass(frozen=True)
class DemoPaths:
    """Where the bundled model and data live."""

    root: Path

    @property
    def model(self) -> Path:
        return self.root / "digits_cnn.onnx"

    @property
    def calib(self) -> Path:
        return self.root / "calib"

    @property
    def eval_inputs(self) -> Path:
        return self.root / "eval" / "inputs"

    @property
    def eval_labels(self) -> Path:
        return self.root / "eval" / "labels.npy"


@dataclass
class DemoResult:
    """What the demo wrote (label -> path), the drift report, and the tensor KL clips the most."""

    written: dict[str, Path] = field(default_factory=dict)
    most_clipped_tensor: str = ""
    report: DriftReport | None = None


def demo_paths() -> DemoPaths:
    """The bundled calib_data/ beside the package (a source checkout or editable install), else in the working dir."""
    for root in (Path(__file__).resolve().parent.parent / _DATA_DIR_NAME, Path.cwd() / _DATA_DIR_NAME):
        paths = DemoPaths(root)
        if paths.model.is_file() and paths.calib.is_dir():
            return paths
    raise QuantlabError(
        "bundled demo data not found: run from a quantlab checkout installed with `pip install -e .` "
        f"(it looks for {_DATA_DIR_NAME}/ beside the package and in the current directory)"
    )


def run_demo(out: str | Path, progress: Progress | None = None) -> DemoResult:
    """Run the pipeline on the bundled model into directory `out`; returns what was written."""
    from quantlab.calibration.auto import auto_calibrate
    from quantlab.drift import measure_drift
    from quantlab.formats import Thresholds, write_thresholds
    from quantlab.formats.qdq import export_qdq
    from quantlab.plots import plot_drift, save_figure

    paths = demo_paths()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise QuantlabError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    result = DemoResult()

    model_copy = out / "model.onnx"
    with atomic_write(model_copy) as handle:
        handle.write(paths.model.read_bytes())
    result.written["FP32 model"] = model_copy

    histograms = collect(model_copy, paths.calib, progress=progress)
    result.written["histograms"] = histograms.save(out / "histograms.npz")

    search = auto_calibrate(histograms, model=model_copy, data=paths.calib, progress=progress)
    amax = search.amax
    metadata = {"method": "auto", "auto": search.summary(), "source": {"histograms": "histograms.npz"}}
    thresholds = Thresholds(amax, metadata, histograms.min_max(amax))
    for name, path in (("auto thresholds", out / "thresholds.json"), ("TensorRT calibration cache", out / "model.cache")):
        write_thresholds(path, thresholds)
        result.written[name] = path
    result.most_clipped_tensor = min(amax, key=lambda name: amax[name] / (histograms[name].amax or 1.0))

    qdq_path = export_qdq(model_copy, thresholds, out / "model.qdq.onnx")
    result.written["Q/DQ INT8 model"] = qdq_path
    result.report = measure_drift(model_copy, qdq_path, paths.eval_inputs, labels=paths.eval_labels)
    result.report.metadata["method"] = "auto: " + ", ".join(sorted(set(search.choices.values())))
    result.written["drift report"] = result.report.save_json(out / "drift.json")
    result.written["drift plot"] = save_figure(plot_drift(result.report), out / "drift.png")
    return result
