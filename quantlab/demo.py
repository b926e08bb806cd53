"""`quantlab demo`: every stage of the pipeline on the bundled digits CNN and its real calibration data."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from quantlab.atomic import atomic_write
from quantlab.collection import Progress, collect
from quantlab.errors import QuantlabError

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
    """What the demo wrote (label -> path) and the tensor worth a first look."""

    written: dict[str, Path] = field(default_factory=dict)
    long_tail_tensor: str = ""


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
    from quantlab.report import tail_mass

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
    result.long_tail_tensor = max(histograms, key=lambda name: tail_mass(histograms[name]))
    return result
