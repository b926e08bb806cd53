"""TensorRT calibration caches: read every cache TensorRT writes, write one `trtexec --calib=` accepts.

    TRT-8601-EntropyCalibration2          header: TRT-<version code>-<calibration algorithm>
    input: 3c010a14                       then one line per tensor: <name>: <scale as big-endian float32, hex>
    /model.0/conv/Conv_output_0: 3e6c71c3

scale = amax / 127. What real caches contain (examples in tests/fixtures/caches/SOURCES.md), all accepted here:
- version codes `major*1000 + minor*100 + patch` up to TensorRT 8 (8.6.1 -> 8601) and `major*10000 + minor*100 +
  patch` from TensorRT 10 (10.3.0 -> 100300), as `NV_TENSORRT_VERSION` in `NvInferVersion.h`; caches of TensorRT
  5.0 and older have a bare `1` as header;
- hex without zero padding (`0` for a zero scale), and infinite scales (`7f800000`);
- names with spaces, brackets and colons (`(Unnamed Layer* 3) [Convolution]_output`, `input_1:0`,
  `onnx::MatMul_12_output`): the scale is whatever follows the last colon.
CRLF line ends, a UTF-8 byte order mark, blank lines and a missing final newline are tolerated too. (ONNX Runtime's
TensorRT EP reads these caches splitting at the *first* colon, so give it the `.flatbuffers` table instead when
tensor names contain colons.)

Reading gives amax = scale * 127 in float64, which is exact, so writing it back (scale = float32(amax / 127))
reproduces every scale bit for bit.
"""

from __future__ import annotations

import math
import os
import re
import struct
from typing import Any

from quantlab.atomic import atomic_write
from quantlab.errors import QuantlabError
from quantlab.formats import Thresholds, read_bytes

# TensorRT 10 is the last release line that builds engines from calibration caches (calibrators are deprecated since
# 10.1; TensorRT 11 removed BuilderFlag.INT8 and int8_calibrator in favour of Q/DQ models), and 10.3.0 is what
# JetPack 6.1/6.2 ships, where implicit INT8 calibration is still common; real caches with this header exist.
# TensorRT ignores a cache whose header it does not accept, so pass the version of the TensorRT that will read it.
DEFAULT_TRT_VERSION = "10.3.0"
DEFAULT_ALGORITHM = "EntropyCalibration2"

_HEADER = re.compile(r"TRT-(\d+)-([A-Za-z0-9_]+)")
_LEGACY_HEADER = re.compile(r"\d+")
_HEX = re.compile(r"[0-9a-fA-F]{1,8}")
_BOM = "\ufeff"


def looks_like_cache(head: bytes) -> bool:
    """True when a file starting with `head` is a TensorRT cache with a `TRT-` header (used to detect the format)."""
    return head.removeprefix(_BOM.encode()).startswith(b"TRT-")


def trt_version_code(version: str | int) -> int:
    """TensorRT's version code for a release: "8.6.1" -> 8601, "10.3.0" -> 100300; a code (8601) passes through.

    Extra components are ignored, so `tensorrt.__version__` ("8.6.1.post1", "10.3.0.26") works as is.
    """
    text = str(version).strip()
    if text.isdigit() and int(text) >= 5000:  # already a code (5.0.0 is the oldest with a TRT- header)
        return int(text)
    parts = text.split(".")
    if len(parts) < 2 or not all(part.isdigit() for part in parts[:3]):
        raise QuantlabError(f"TensorRT version {version!r}: expected major.minor[.patch], e.g. '8.6.1' or '10.3.0'")
    major, minor, patch = (int(part) for part in [*parts[:3], "0"][:3])
    if major >= 10 and minor < 100 and patch < 100:
        return major * 10000 + minor * 100 + patch
    if 5 <= major <= 8 and minor < 10 and patch < 100:
        return major * 1000 + minor * 100 + patch
    raise QuantlabError(f"TensorRT version {version!r}: no known cache version code; pass the code itself, e.g. 8601")


def trt_version_name(code: int) -> str:
    """The release a version code stands for: 8601 -> "8.6.1", 100300 -> "10.3.0"."""
    if code >= 10000:
        return f"{code // 10000}.{code // 100 % 100}.{code % 100}"
    return f"{code // 1000}.{code // 100 % 10}.{code % 100}"


def _header_metadata(header: str, path: str | os.PathLike) -> dict[str, Any]:
    if match := _HEADER.fullmatch(header):
        code = int(match[1])
        return {"header": header, "trt_version": trt_version_name(code), "trt_version_code": code,
                "algorithm": match[2]}
    if _LEGACY_HEADER.fullmatch(header):
        return {"header": header, "trt_version": None, "trt_version_code": None, "algorithm": None}
    expected = "expected a 'TRT-<version>-<algorithm>' header"
    raise QuantlabError(f"{path}:1: not a TensorRT calibration cache: {expected}, got {_clip(header)}")


def _clip(text: str, width: int = 60) -> str:
    """repr of a line for an error message, shortened so the message stays one readable line."""
    return repr(text if len(text) <= width else text[:width] + "...")


def _decode_scale(digits: str, line: str, where: str) -> float:
    if not _HEX.fullmatch(digits):
        problem = "missing" if not digits else f"{_clip(digits)} is not 1-8 hex digits"
        raise QuantlabError(f"{where}: scale {problem} in {_clip(line)}")
    scale = struct.unpack(">f", int(digits, 16).to_bytes(4, "big"))[0]
    if math.isnan(scale):
        raise QuantlabError(f"{where}: scale {digits} is NaN")
    if math.copysign(1.0, scale) < 0:
        raise QuantlabError(f"{where}: scale {digits} is negative ({scale!r})")
    return scale


def parse_cache(data: bytes, path: str | os.PathLike = "<cache>") -> Thresholds:
    """Parse the bytes of a calibration cache; errors name `path` and the line."""
    if not data.strip():
        raise QuantlabError(f"{path}: empty file, not a TensorRT calibration cache")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise QuantlabError(f"{path}:{line}: not UTF-8 text") from None
    lines = text.removeprefix(_BOM).split("\n")
    metadata = _header_metadata(lines[0].strip(), path)
    amax: dict[str, float] = {}
    first_seen: dict[str, int] = {}
    for number, raw in enumerate(lines[1:], start=2):
        line = raw.removesuffix("\r")
        if not line.strip():
            continue
        where = f"{path}:{number}"
        name, colon, digits = line.rpartition(":")
        if not colon:
            raise QuantlabError(f"{where}: expected '<tensor name>: <hex scale>', got {_clip(line)}")
        if not name:
            raise QuantlabError(f"{where}: empty tensor name in {_clip(line)}")
        digits = digits.strip()
        if number == len(lines) and len(digits) < 8:
            raise QuantlabError(f"{where}: truncated: the last line has no newline and a short scale {_clip(digits)}")
        scale = _decode_scale(digits, line, where)
        if name in first_seen:
            raise QuantlabError(f"{where}: duplicate tensor {_clip(name)} (first on line {first_seen[name]})")
        first_seen[name] = number
        amax[name] = scale * 127.0  # exact in float64: 24-bit mantissa times a 7-bit integer
    return Thresholds(amax, metadata)


def read_cache(path: str | os.PathLike) -> Thresholds:
    """Read a TensorRT calibration cache; amax = scale * 127, metadata = header, trt_version(_code), algorithm."""
    return parse_cache(read_bytes(path), path)


def _scale_hex(name: str, amax: float) -> str:
    try:
        return struct.pack(">f", amax / 127.0).hex()
    except OverflowError:
        raise QuantlabError(f"tensor {_clip(name)}: amax {amax!r} is too large for a float32 scale") from None


def _check_name(name: str) -> None:
    if any(char in name for char in "\n\r\0"):
        raise QuantlabError(f"tensor {_clip(name)}: a name in a TensorRT cache cannot contain a newline or NUL")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise QuantlabError(f"tensor {_clip(name)}: not encodable as UTF-8") from None


def format_cache(
    thresholds: Thresholds, *, trt_version: str | int = DEFAULT_TRT_VERSION, algorithm: str = DEFAULT_ALGORITHM
) -> bytes:
    """The bytes of a cache: header, then `name: %08x` per tensor in `thresholds` order, LF line ends."""
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", algorithm):
        raise QuantlabError(f"calibration algorithm {algorithm!r}: expected a name like 'EntropyCalibration2'")
    lines = [f"TRT-{trt_version_code(trt_version)}-{algorithm}"]
    for name, amax in thresholds.amax.items():
        _check_name(name)
        lines.append(f"{name}: {_scale_hex(name, amax)}")
    return ("\n".join(lines) + "\n").encode("utf-8")


def write_cache(
    path: str | os.PathLike,
    thresholds: Thresholds,
    *,
    trt_version: str | int = DEFAULT_TRT_VERSION,
    algorithm: str = DEFAULT_ALGORITHM,
) -> None:
    """Write a TensorRT calibration cache atomically; scale = float32(amax / 127), rounded to nearest."""
    data = format_cache(thresholds, trt_version=trt_version, algorithm=algorithm)
    with atomic_write(path, "wb") as handle:
        handle.write(data)
