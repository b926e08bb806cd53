"""The real-model benchmark set: five trained FP32 ONNX models that PyPI wheels ship, with real samples made offline.

The models and the recipes of their samples are those of the team's MODELS.md notes: PP-OCRv4 text detection and
recognition and the PP-OCR v2 direction classifier (RapidOCR), NudeNet's YOLOv8n and Silero VAD. Their inputs come
from material that wheels ship too: scikit-image's and scikit-learn's photos, scikit-learn's dataset descriptions
rendered as pages, and pyannote.audio's 30 s speech sample. Every wheel is pinned (the peers' numbers in MODELS.md
were taken with these files) and fetched with `pip download --no-deps` into the cache once; nothing else is downloaded.

Per model the cache holds `<name>/model.onnx`, `<name>/calib/` (even-numbered samples) and `<name>/eval/`
(odd-numbered ones), one file per sample in the form `quantlab collect --data` reads: a `.npy` of the input's full
shape (batch dim 1) for a single-input model, an `.npz` keyed by input name otherwise. A set is built once and reused
while its `manifest.json` names the current recipe; the same inputs give byte-identical files.

Benchmark-only dependencies, not quantlab's: opencv-python-headless, pyclipper, shapely, Pillow and PyYAML (what
RapidOCR 1.4.4 imports; RapidOCR itself is imported from its cached wheel, so its pinned version is the one used).

Usage: python benchmarks/realmodels.py prepare [NAME ...] [--force]
Cache: ~/.cache/quantlab-benchmarks, or $QUANTLAB_BENCH_CACHE.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import shutil
import subprocess
import sys
import time
import wave
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MODELS = ("ppocrv4_det", "ppocrv4_rec", "ppocr_mobile_v2_cls", "nudenet_yolov8n_320", "silero_vad_16k")

# Bump when a sample recipe changes: cached sets made by another recipe are rebuilt.
RECIPE = 1

RAPIDOCR = ("rapidocr_onnxruntime", "1.4.4")
NUDENET = ("nudenet", "3.4.2")
SILERO = ("silero-vad", "6.2.3")
SKIMAGE = ("scikit-image", "0.26.0")
SKLEARN = ("scikit-learn", "1.9.1")
PYANNOTE = ("pyannote.audio", "4.0.7")

_MODEL_MEMBERS = {
    "ppocrv4_det": (RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"),
    "ppocrv4_rec": (RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"),
    "ppocr_mobile_v2_cls": (RAPIDOCR, "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
    "nudenet_yolov8n_320": (NUDENET, "nudenet/320n.onnx"),
    "silero_vad_16k": (SILERO, "silero_vad/data/silero_vad_openvino_16k.onnx"),
}
# The output each task metric reads (the others, e.g. silero's next state, are covered by drift's SQNR).
_METRIC_OUTPUTS = {
    "ppocrv4_det": "sigmoid_0.tmp_0",
    "ppocrv4_rec": "softmax_11.tmp_0",
    "ppocr_mobile_v2_cls": "save_infer_model/scale_0.tmp_1",
    "nudenet_yolov8n_320": "output0",
    "silero_vad_16k": "output",
}

# Photos in wheel order: scikit-image's (all but the synthetic charts) and scikit-learn's two.
_PHOTOS = tuple(
    [(SKIMAGE, f"skimage/data/{name}") for name in (
        "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png", "coffee.png",
        "coins.png", "grass.png", "gravel.png", "horse.png", "hubble_deep_field.jpg", "ihc.png", "logo.png",
        "microaneurysms.png", "moon.png", "motorcycle_left.png", "motorcycle_right.png", "page.png", "retina.jpg",
        "rocket.jpg", "text.png",
    )]
    + [(SKLEARN, f"sklearn/datasets/images/{name}") for name in ("china.jpg", "flower.jpg")]
)
# The text detector's photos: those with text first, then a spread of scenes.
_DET_PHOTOS = ("page.png", "text.png", "astronaut.png", "coffee.png", "rocket.jpg", "china.jpg", "motorcycle_left.png", "chelsea.png")
# The photos whose text lines join the pages' as recognizer and classifier crops (the detector finds little else).
_CROP_PHOTOS = ("page.png", "text.png")
_DESCRIPTIONS = (
    "breast_cancer", "california_housing", "covtype", "diabetes", "digits", "iris", "kddcup99", "lfw", "linnerud",
    "olivetti_faces", "rcv1", "species_distributions", "twenty_newsgroups", "wine_data",
)
_SAMPLE_COUNTS = {"ppocrv4_det": 16, "ppocrv4_rec": 32, "ppocr_mobile_v2_cls": 32, "nudenet_yolov8n_320": 24, "silero_vad_16k": 32}


@dataclass(frozen=True)
class Case:
    """One benchmark model: the FP32 model and its calibration and held-out evaluation sample directories."""

    name: str
    model: Path
    calib: Path
    eval: Path


def cache_dir() -> Path:
    """The cache root: $QUANTLAB_BENCH_CACHE, else ~/.cache/quantlab-benchmarks (outside the repository)."""
    return Path(os.environ.get("QUANTLAB_BENCH_CACHE") or Path.home() / ".cache" / "quantlab-benchmarks")


def wheel(package: tuple[str, str]) -> Path:
    """The cached wheel of the pinned `(name, version)`, downloaded with `pip download --no-deps` only when absent."""
    name, version = package
    directory = cache_dir() / "wheels"
    pattern = f"{name.replace('-', '_').replace('.', '_')}-{version}-*.whl"
    found = sorted(directory.glob(pattern))
    if not found:
        directory.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
             f"{name}=={version}", "-d", str(directory)],
            check=True,
        )
        found = sorted(directory.glob(pattern))
        if not found:
            raise RuntimeError(f"pip download {name}=={version} left no wheel matching {directory / pattern}")
    return found[0]


def _extract(package: tuple[str, str], prefix: str, target: Path) -> None:
    """Unzip the wheel's members under `prefix` into `target`, skipping those already there at their size."""
    with zipfile.ZipFile(wheel(package)) as archive:
        for info in archive.infolist():
            if not info.filename.startswith(prefix) or info.is_dir():
                continue
            path = target / info.filename
            if path.is_file() and path.stat().st_size == info.file_size:
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(path.name + ".partial")
            with archive.open(info) as source, open(partial, "wb") as sink:
                shutil.copyfileobj(source, sink)
            partial.replace(path)


def member(package: tuple[str, str], path: str) -> Path:
    """One file of a pinned wheel, unzipped under the cache's files/ (once)."""
    _extract(package, path, cache_dir() / "files")
    return cache_dir() / "files" / path


@functools.lru_cache(maxsize=None)
def _rapidocr():
    """RapidOCR 1.4.4 from its cached wheel (unzipped under lib/, which goes first on sys.path), default config."""
    library = cache_dir() / "lib"
    _extract(RAPIDOCR, "rapidocr_onnxruntime/", library)
    if str(library) not in sys.path:
        sys.path.insert(0, str(library))
    from rapidocr_onnxruntime import RapidOCR

    return RapidOCR()


def _photo(name: str) -> np.ndarray:
    """A photo as BGR uint8 (grey and RGBA files made three-channel, as RapidOCR and NudeNet load them)."""
    from PIL import Image

    package, path = next(source for source in _PHOTOS if source[1].endswith("/" + name))
    with Image.open(member(package, path)) as image:
        return np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])


def _wrap(text: str, font, width: float) -> list[str]:
    """Words of `text` in lines no wider than `width` pixels; a word wider than a line is split where it must be."""
    lines, line = [], ""
    for word in text.split():
        while font.getlength(word) > width:
            cut = max(i for i in range(1, len(word) + 1) if font.getlength(word[:i]) <= width)
            if line:
                lines.append(line)
                line = ""
            lines.append(word[:cut])
            word = word[cut:]
        candidate = f"{line} {word}" if line else word
        if line and font.getlength(candidate) > width:
            lines.append(line)
            candidate = word
        line = candidate
    return lines + ([line] if line else [])


@functools.lru_cache(maxsize=None)
def _pages() -> tuple[np.ndarray, ...]:
    """One BGR 960x720 page per scikit-learn dataset description: its prose in three columns, in Pillow's bundled
    font at a size that varies by page (20-28 px). Columns keep lines short enough for the recognizer's 48x320 input
    to hold them nearly unsqueezed; the wide gutters keep the detector from joining lines across columns."""
    from PIL import Image, ImageDraw, ImageFont

    width, height, margin, gutter, columns = 960, 720, 32, 80, 3
    column_width = (width - 2 * margin - (columns - 1) * gutter) / columns
    pages = []
    for index, name in enumerate(_DESCRIPTIONS):
        size = (20, 24, 28, 22, 26)[index % 5]
        font = ImageFont.load_default(size=size)
        step = round(size * 1.5)
        rows = (height - 2 * margin) // step
        page = Image.new("RGB", (width, height), "white")
        draw = ImageDraw.Draw(page)
        text = member(SKLEARN, f"sklearn/datasets/descr/{name}.rst").read_text(encoding="utf-8")
        for number, line in enumerate(_wrap(text, font, column_width)[: rows * columns]):
            column, row = divmod(number, rows)
            draw.text((margin + column * (column_width + gutter), margin + row * step), line, fill="black", font=font)
        pages.append(np.ascontiguousarray(np.asarray(page)[:, :, ::-1]))
    return tuple(pages)


@functools.lru_cache(maxsize=None)
def _text_crops() -> tuple[np.ndarray, ...]:
    """Text-line crops (BGR) as RapidOCR's own pipeline cuts them: 4 spread over those of the text photos, then 28
    spread over those of the pages."""
    ocr = _rapidocr()

    def crops(image: np.ndarray) -> list[np.ndarray]:
        image, _, _ = ocr.preprocess(image)
        image, _ = ocr.maybe_add_letterbox(image, {})
        boxes, _ = ocr.auto_text_det(image)
        return [] if boxes is None else ocr.get_crop_img_list(image, boxes)

    def spread(items: list[np.ndarray], count: int) -> list[np.ndarray]:
        return [items[i] for i in np.linspace(0, len(items) - 1, count).round().astype(int)]

    from_photos = [crop for name in _CROP_PHOTOS for crop in crops(_photo(name))]
    from_pages = [crop for page in _pages() for crop in crops(page)]
    return tuple(spread(from_photos, 4) + spread(from_pages, 28))


def _det_samples() -> list[np.ndarray]:
    """Pages and photos, two of each in turn (so calibration and evaluation both get both): BGR, longer side resized
    to 640, padded to 640x640 at the bottom right, (x/255 - 0.5)/0.5, CHW."""
    import cv2

    pages, photos = _pages(), [_photo(name) for name in _DET_PHOTOS]
    images = [image for pair in range(4) for image in (*pages[2 * pair : 2 * pair + 2], *photos[2 * pair : 2 * pair + 2])]
    samples = []
    for image in images:
        scale = 640 / max(image.shape[:2])
        h, w = round(image.shape[0] * scale), round(image.shape[1] * scale)
        padded = np.zeros((640, 640, 3), np.float32)
        padded[:h, :w] = cv2.resize(image, (w, h))
        samples.append(((padded / 255 - 0.5) / 0.5).transpose(2, 0, 1)[np.newaxis])
    return samples


def _rec_samples() -> list[np.ndarray]:
    """The text crops through RapidOCR's recognizer preprocessing at 48x320."""
    recognizer = _rapidocr().text_rec
    return [recognizer.resize_norm_img(crop, 320 / 48)[np.newaxis] for crop in _text_crops()]


def _cls_samples() -> list[np.ndarray]:
    """The text crops through RapidOCR's classifier preprocessing at 48x192; crops 2, 3 of every 4 turned 180 degrees
    (so both the even and the odd samples are half upright, half upside down)."""
    import cv2

    classifier = _rapidocr().text_cls
    return [
        classifier.resize_norm_img(cv2.rotate(crop, cv2.ROTATE_180) if index % 4 >= 2 else crop)[np.newaxis]
        for index, crop in enumerate(_text_crops())
    ]


def _yolo_samples() -> list[np.ndarray]:
    """Every photo as NudeNet feeds it: BGR padded to a square at the bottom right, resized to 320, RGB, /255, CHW."""
    import cv2

    samples = []
    for _, path in _PHOTOS:
        image = _photo(path.rsplit("/", 1)[1])
        side = max(image.shape[:2])
        square = cv2.copyMakeBorder(image, 0, side - image.shape[0], 0, side - image.shape[1], cv2.BORDER_CONSTANT)
        samples.append(cv2.dnn.blobFromImage(square, 1 / 255.0, (320, 320), (0, 0, 0), swapRB=True, crop=False))
    return samples


def _silero_samples(model: Path) -> list[dict[str, np.ndarray]]:
    """32 chunks spread over the 30 s speech sample, each as Silero's wrapper feeds it: 512 new samples after the
    previous chunk's last 64 (`input` [1, 576]), and the `state` [2, 1, 128] the FP32 model returned for the chunk
    before, carried from zeros through every chunk of the file."""
    import onnxruntime as ort

    with wave.open(str(member(PYANNOTE, "pyannote/audio/sample/sample.wav"))) as audio:
        if (audio.getnchannels(), audio.getsampwidth(), audio.getframerate()) != (1, 2, 16000):
            raise RuntimeError("sample.wav: expected 16 kHz mono 16-bit PCM")
        signal = np.frombuffer(audio.readframes(audio.getnframes()), "<i2").astype(np.float32) / 32768
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    chunks = len(signal) // 512
    picked = set(np.linspace(0, chunks - 1, _SAMPLE_COUNTS["silero_vad_16k"]).round().astype(int).tolist())
    state, context = np.zeros((2, 1, 128), np.float32), np.zeros(64, np.float32)
    samples = []
    for index in range(chunks):
        chunk = signal[index * 512 : (index + 1) * 512]
        feed = {"input": np.concatenate([context, chunk])[np.newaxis], "state": state}
        if index in picked:
            samples.append(feed)
        _, state = session.run(["output", "stateN"], feed)
        context = chunk[-64:]
    return samples


_BUILDERS: dict[str, Callable[[Path], list]] = {
    "ppocrv4_det": lambda model: _det_samples(),
    "ppocrv4_rec": lambda model: _rec_samples(),
    "ppocr_mobile_v2_cls": lambda model: _cls_samples(),
    "nudenet_yolov8n_320": lambda model: _yolo_samples(),
    "silero_vad_16k": _silero_samples,
}


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """An .npz of the arrays with fixed member timestamps (np.savez stamps the current time), so a rebuild of the
    same samples gives the same bytes."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buffer.getvalue())


def _case(name: str) -> Case:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; the set is {', '.join(MODELS)}")
    directory = cache_dir() / name
    return Case(name, directory / "model.onnx", directory / "calib", directory / "eval")


def prepare(name: str, force: bool = False) -> Case:
    """The model's case, built first when the cache lacks it, holds another recipe's, or `force`: the model copied out
    of its wheel, the samples made and written even-numbered to calib/, odd-numbered to eval/ (0000.npy, 0001.npy,
    ...). The manifest is written last, so an interrupted build is redone by the next call, never used half-made."""
    case = _case(name)
    manifest = case.model.parent / "manifest.json"
    if not force and manifest.is_file() and json.loads(manifest.read_text()).get("recipe") == RECIPE:
        return case
    package, path = _MODEL_MEMBERS[name]
    case.model.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(member(package, path), case.model)
    samples = _BUILDERS[name](case.model)
    building = case.model.parent / ".building"
    shutil.rmtree(building, ignore_errors=True)
    for index, sample in enumerate(samples):
        target = building / ("calib" if index % 2 == 0 else "eval")
        target.mkdir(parents=True, exist_ok=True)
        if isinstance(sample, dict):
            _save_npz(target / f"{index:04d}.npz", sample)
        else:
            np.save(target / f"{index:04d}.npy", np.ascontiguousarray(sample, dtype=np.float32))
    manifest.unlink(missing_ok=True)
    for directory in (case.calib, case.eval):
        shutil.rmtree(directory, ignore_errors=True)
        (building / directory.name).rename(directory)
    building.rmdir()
    first = samples[0] if isinstance(samples[0], dict) else {_input_names(case.model)[0]: samples[0]}
    manifest.write_text(json.dumps({
        "recipe": RECIPE,
        "samples": len(samples),
        "calib": len(samples[::2]),
        "eval": len(samples[1::2]),
        "shapes": {key: list(array.shape) for key, array in first.items()},
    }, indent=2))
    return case


def _input_names(model: Path) -> list[str]:
    """The model's graph inputs (initializers left out), in order."""
    import onnx

    graph = onnx.load(str(model)).graph
    weights = {tensor.name for tensor in graph.initializer}
    return [value.name for value in graph.input if value.name not in weights]


def load_sample(path: Path, input_names: list[str]) -> dict[str, np.ndarray]:
    """One sample file as an ONNX Runtime feed: a .npy feeds the single input, an .npz its arrays by name."""
    if path.suffix == ".npy":
        return {input_names[0]: np.load(path)}
    with np.load(path) as arrays:
        return {key: arrays[key] for key in arrays.files}


def _sample_files(directory: Path) -> list[Path]:
    return sorted(path for path in directory.iterdir() if path.suffix in (".npy", ".npz"))


def load_samples(model: Path, directory: Path) -> list[dict[str, np.ndarray]]:
    """Every sample of `directory`, in file order, as an ONNX Runtime feed of `model` (one sample each)."""
    inputs = _input_names(model)
    return [load_sample(path, inputs) for path in _sample_files(directory)]


def run_model(model: Path, directory: Path) -> list[dict[str, np.ndarray]]:
    """Every graph output, by name, of `model` in ONNX Runtime (CPU) on each sample of `directory`, in file order."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    inputs = [spec.name for spec in session.get_inputs()]
    outputs = [spec.name for spec in session.get_outputs()]
    return [dict(zip(outputs, session.run(outputs, load_sample(path, inputs)))) for path in _sample_files(directory)]


def _ctc_greedy(probabilities: np.ndarray) -> tuple[int, ...]:
    """CTC greedy decode of one [T, C] prediction: argmax per step, repeats collapsed, blanks (0) dropped."""
    best = probabilities.argmax(-1)
    keep = np.concatenate([[True], best[1:] != best[:-1]]) & (best != 0)
    return tuple(best[keep].tolist())


def _top_box_class(prediction: np.ndarray) -> int:
    """YOLOv8 output [1, 4 + C, N]: the class of the box with the highest class score."""
    scores = prediction[0, 4:, :]
    return int(scores[:, scores.max(axis=0).argmax()].argmax())


# The task metrics where less is better (all others: more is better).
LOWER_IS_BETTER = frozenset({"silero_vad_16k"})


def task_metric(name: str, fp32_outputs: list[dict[str, np.ndarray]], int8_outputs: list[dict[str, np.ndarray]]) -> tuple[str, float]:
    """How far INT8 moves the model's task answer from FP32's over the same samples, as (metric name, value).

    ppocrv4_det: IoU of the text maps (p > 0.3, the detector's binarization threshold), pooled over all samples.
    ppocrv4_rec: fraction of samples whose CTC greedy decodes (index strings) are identical.
    ppocr_mobile_v2_cls: top-1 agreement. nudenet_yolov8n_320: agreement of the top box's class.
    silero_vad_16k: mean absolute difference of the speech probability (lower is better; all others higher).
    """
    if len(fp32_outputs) != len(int8_outputs) or not fp32_outputs:
        raise ValueError(f"{len(fp32_outputs)} FP32 against {len(int8_outputs)} INT8 results")
    output = _METRIC_OUTPUTS[name]
    pairs = [(a[output], b[output]) for a, b in zip(fp32_outputs, int8_outputs)]
    if name == "ppocrv4_det":
        intersection = sum(int(np.count_nonzero((a > 0.3) & (b > 0.3))) for a, b in pairs)
        union = sum(int(np.count_nonzero((a > 0.3) | (b > 0.3))) for a, b in pairs)
        return "text-map IoU (p>0.3)", intersection / union if union else 1.0
    if name == "ppocrv4_rec":
        return "CTC string agreement", float(np.mean([_ctc_greedy(a[0]) == _ctc_greedy(b[0]) for a, b in pairs]))
    if name == "ppocr_mobile_v2_cls":
        return "top-1 agreement", float(np.mean([a.argmax() == b.argmax() for a, b in pairs]))
    if name == "nudenet_yolov8n_320":
        return "top-box class agreement", float(np.mean([_top_box_class(a) == _top_box_class(b) for a, b in pairs]))
    if name == "silero_vad_16k":
        return "speech-prob MAE", float(np.mean([abs(float(a.ravel()[0]) - float(b.ravel()[0])) for a, b in pairs]))
    raise ValueError(f"unknown model {name!r}")


def add_models_option(parser: argparse.ArgumentParser) -> None:
    """A benchmark's --models option: comma-separated names of the set, all by default (`chosen_models`)."""
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated names (default: all)")


def chosen_models(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The names --models gives, in its order; an unknown one is the parser's usage error."""
    names = [name for name in args.models.split(",") if name]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; the set is {', '.join(MODELS)}")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("prepare", help="download what is missing and build the sample sets")
    build.add_argument("names", nargs="*", metavar="NAME", help=f"models to prepare (default: all of {', '.join(MODELS)})")
    build.add_argument("--force", action="store_true", help="rebuild the sample sets even when cached")
    args = parser.parse_args()
    unknown = sorted(set(args.names) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; the set is {', '.join(MODELS)}")
    for name in args.names or MODELS:
        start = time.perf_counter()
        case = prepare(name, force=args.force)
        manifest = json.loads((case.model.parent / "manifest.json").read_text())
        shapes = ", ".join(f"{key} {shape}" for key, shape in manifest["shapes"].items())
        print(f"{name:<20} {manifest['calib']:>3} calib + {manifest['eval']:>3} eval   {shapes:<40} "
              f"{time.perf_counter() - start:6.1f} s   {case.model.parent}")


if __name__ == "__main__":
    main()
