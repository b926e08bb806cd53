"""Threshold tables: quantlab's JSON table and ONNX Runtime's TensorRT-EP calibration table (flatbuffers).

JSON table (`.json`), amax in full float64 precision (Python's shortest round-trip repr):

    {"format": "quantlab-thresholds", "version": 1, "method": "kl", "variant": "tensorrt",
     "options": {...}, "source": {...}, "thresholds": {"input": 2.64, ...}, "min_max": {"input": [-1.0, 2.64], ...}}

`min_max` (optional; `quantlab calibrate` writes it from the histograms) holds each tensor's smallest and largest value
over the calibration data, for asymmetric ranges (`Thresholds.min_max`). Everything except `format`, `version`,
`thresholds` and `min_max` is metadata (any JSON) and lands in `Thresholds.metadata`.
JSON has no infinity, so an infinite amax (possible in a TensorRT cache) cannot be written as a JSON table.

ONNX Runtime table (`.flatbuffers`), the file the TensorRT execution provider reads through
`trt_int8_calibration_table_name` when `trt_int8_use_native_calibration_table` is off: a flatbuffers `TrtTable` of
`KeyValue(key=tensor name, value=decimal string)`. ORT's writer `quant_utils.write_calibration_table` takes a
`TensorData` (float32 `lowest`/`highest`) per tensor and stores `str(max(highest, lowest))` (so for an asymmetric
range it keeps `highest`, not max |x|); the execution provider parses it with `std::stof` and sets the dynamic range
to [-value, value]. The value is therefore amax at float32 precision. We write through that same writer with the
symmetric range (-amax, amax), so an amax comes back as float32(amax); its other outputs (calibration.json and a
plain-text calibration.cache of `name value` lines) are discarded.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

from quantlab.atomic import atomic_write, check_writable
from quantlab.errors import QuantlabError
from quantlab.formats import Thresholds, read_bytes

JSON_FORMAT = "quantlab-thresholds"
JSON_VERSION = 1
_TABLE_KEYS = ("format", "version", "thresholds", "min_max")  # the table's own keys; the others are metadata
_FLOAT32_MAX = struct.unpack(">f", bytes.fromhex("7f7fffff"))[0]


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise ValueError(f"duplicate key {duplicates[0]!r}")
    return dict(pairs)


def read_json_table(path: str | os.PathLike) -> Thresholds:
    """Read a quantlab JSON table; malformed JSON is reported with its line number."""
    try:
        document = json.loads(read_bytes(path), object_pairs_hook=_reject_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise QuantlabError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise QuantlabError(f"{path}: invalid JSON table ({exc})") from None
    if not isinstance(document, dict) or document.get("format") != JSON_FORMAT:
        raise QuantlabError(f"{path}: not a quantlab threshold table (no \"format\": \"{JSON_FORMAT}\")")
    version = document.get("version")
    if version != JSON_VERSION:
        raise QuantlabError(f"{path}: threshold table version {version!r}, this quantlab reads version {JSON_VERSION}")
    thresholds = document.get("thresholds")
    if not isinstance(thresholds, dict):
        raise QuantlabError(f"{path}: \"thresholds\" must be an object mapping tensor names to amax")
    for name, amax in thresholds.items():
        if isinstance(amax, bool) or not isinstance(amax, (int, float)):
            raise QuantlabError(f"{path}: tensor {name!r}: amax must be a number, got {amax!r}")
    min_max = document.get("min_max", {})
    if not isinstance(min_max, dict):
        raise QuantlabError(f"{path}: \"min_max\" must be an object mapping tensor names to [min, max]")
    metadata = {key: value for key, value in document.items() if key not in _TABLE_KEYS}
    try:
        return Thresholds(thresholds, metadata, min_max)
    except QuantlabError as exc:
        raise QuantlabError(f"{path}: {exc}") from None


def write_json_table(path: str | os.PathLike, thresholds: Thresholds) -> None:
    """Write a quantlab JSON table atomically: format, version, method, variant, options, source, other metadata,
    then thresholds and, where known, min_max."""
    for name, amax in thresholds.amax.items():
        if math.isinf(amax):
            raise QuantlabError(f"{path}: tensor {name!r} has an infinite amax, which JSON cannot store")
    reserved = sorted(set(thresholds.metadata) & set(_TABLE_KEYS))
    if reserved:
        raise QuantlabError(f"{path}: metadata key {reserved[0]!r} is reserved by the table format")
    metadata = {"method": None, "variant": None, "options": {}, "source": {}, **thresholds.metadata}
    document = {"format": JSON_FORMAT, "version": JSON_VERSION, **metadata, "thresholds": thresholds.amax}
    if thresholds.min_max:
        document["min_max"] = {name: list(pair) for name, pair in thresholds.min_max.items()}
    try:
        text = json.dumps(document, indent=2, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise QuantlabError(f"{path}: metadata is not plain JSON ({exc})") from None
    with atomic_write(path, "wb") as handle:
        handle.write((text + "\n").encode("ascii"))


def read_ort_table(path: str | os.PathLike) -> Thresholds:
    """Read ONNX Runtime's TensorRT-EP calibration table (`calibration.flatbuffers`): amax = float(value)."""
    from onnxruntime.quantization.CalTableFlatBuffers.TrtTable import TrtTable

    data = read_bytes(path)
    if len(data) < 8:
        raise QuantlabError(f"{path}: {len(data)} bytes, too short for an ONNX Runtime calibration table")
    try:
        table = TrtTable.GetRootAs(data, 0)
        if table.DictLength() * 4 > len(data):
            raise ValueError("entry count larger than the file")
        entries = [(entry.Key(), entry.Value()) for entry in map(table.Dict, range(table.DictLength()))]
        names = [key.decode("utf-8") for key, _ in entries]
        values = [value.decode("ascii") for _, value in entries]
    except Exception as exc:  # a malformed buffer fails anywhere inside the generated flatbuffers accessors
        raise QuantlabError(f"{path}: not an ONNX Runtime calibration table ({type(exc).__name__}: {exc})") from None
    amax: dict[str, float] = {}
    for index, (name, value) in enumerate(zip(names, values)):
        if name in amax:
            raise QuantlabError(f"{path}: entry {index}: duplicate tensor {name!r}")
        try:
            amax[name] = float(value)
        except ValueError:
            raise QuantlabError(f"{path}: entry {index} ({name!r}): value {value!r} is not a number") from None
    try:
        return Thresholds(amax)
    except QuantlabError as exc:
        raise QuantlabError(f"{path}: {exc}") from None


def write_ort_table(path: str | os.PathLike, thresholds: Thresholds) -> None:
    """Write ONNX Runtime's calibration table atomically, with ORT's own `write_calibration_table`.

    That function writes calibration.{json,flatbuffers,cache} into a directory; it runs in a temporary directory
    and only the flatbuffers file is kept, copied to `path` through `atomic_write`.
    """
    import numpy as np
    from onnxruntime.quantization.calibrate import TensorData
    from onnxruntime.quantization.quant_utils import write_calibration_table

    check_writable(path)  # before any work, as every writer
    ranges = {}
    for name, amax in thresholds.amax.items():
        if math.isfinite(amax) and amax > _FLOAT32_MAX:
            raise QuantlabError(f"{path}: tensor {name!r}: amax {amax!r} is too large for float32")
        ranges[name] = TensorData(lowest=np.float32(-amax), highest=np.float32(amax))
    with tempfile.TemporaryDirectory(prefix="quantlab-ort-table-") as tmp:
        write_calibration_table(ranges, dir=tmp)
        data = (Path(tmp) / "calibration.flatbuffers").read_bytes()
    with atomic_write(path, "wb") as handle:
        handle.write(data)
