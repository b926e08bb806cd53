"""Threshold files: real TensorRT caches parse, every format round-trips, bad files fail on one line naming the line."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quantlab.errors import QuantlabError
from quantlab.formats import (
    Thresholds,
    detect_format,
    diff_thresholds,
    read_thresholds,
    write_thresholds,
)
from quantlab.formats.trt_cache import (
    DEFAULT_TRT_VERSION,
    format_cache,
    read_cache,
    trt_version_code,
    trt_version_name,
)

CACHES = Path(__file__).parent / "fixtures" / "caches"
REAL_CACHES = sorted(CACHES.glob("*.cache"))
HEADER = "TRT-8601-EntropyCalibration2"


def scale_of(hex_digits: str) -> float:
    """The float32 a TensorRT hex scale stands for, decoded independently of quantlab."""
    return struct.unpack(">f", bytes.fromhex(hex_digits.zfill(8)))[0]


def cache_lines(path: Path) -> list[tuple[str, str]]:
    """(name, hex) of every tensor line, split by hand at the last ': '."""
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    return [tuple(line.rsplit(": ", 1)) for line in lines]


def write_bytes(tmp_path: Path, data: bytes, name: str = "bad.cache") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# --- real caches -------------------------------------------------------------------------------------------------


def test_fixtures_are_present():
    assert len(REAL_CACHES) == 5


@pytest.mark.parametrize("path", REAL_CACHES, ids=lambda p: p.name)
def test_every_real_cache_parses_to_its_hex_scales(path):
    thresholds = read_thresholds(path)
    expected = cache_lines(path)
    assert list(thresholds.amax) == [name for name, _ in expected]
    for name, digits in expected:
        assert thresholds.amax[name] == scale_of(digits) * 127
    assert thresholds.metadata["header"] == path.read_text().splitlines()[0]


SPOT_CHECKS = [
    ("trt7203_entropy2_ssd_tf.cache", "input_image", "400054a6"),
    ("trt7203_entropy2_ssd_tf.cache", "ssd_300_vgg/Relu:0", "3d7588c3"),
    ("trt7203_entropy2_ssd_tf.cache", "(Unnamed Layer* 37) [Constant]_output", "280de15b"),
    ("trt8400_minmax_vgg16.cache", "(Unnamed Layer* 50) [Shuffle]_output", "3955c66c"),
    ("trt8400_minmax_vgg16.cache", "346", "398b1d4b"),
    ("trt8601_entropy2_diffusion.cache", "sample", "00000000"),
    ("trt8601_entropy2_diffusion.cache", "(Unnamed Layer* 273) [Constant]_output", "7f800000"),
    ("trt8601_entropy2_diffusion.cache", "/decoder/layers.0/self_attn/Where_output_0", "7b17af5f"),
    ("trt101303_minmax_mpnet.cache", "onnx::MatMul_1472_output", "3b4eb613"),
    ("trt101303_minmax_mpnet.cache", "/encoder/Log_output_0", "7f800000"),
    ("trt101303_minmax_mpnet.cache", "/Sub_output_0", "00000000"),
    ("legacy_header_yolov2.cache", "(Unnamed ITensor* 71) copy", "3d2ca9c7"),
    ("legacy_header_yolov2.cache", "data", "40000889"),
]


@pytest.mark.parametrize(("file", "name", "digits"), SPOT_CHECKS)
def test_spot_checked_scales(file, name, digits):
    scale = struct.unpack(">f", bytes.fromhex(digits))[0]
    assert read_cache(CACHES / file).amax[name] == scale * 127


def test_spot_values_by_hand():
    mpnet = read_cache(CACHES / "trt101303_minmax_mpnet.cache")
    assert mpnet.amax["/encoder/Cast_2_output_0"] == 127.0  # 3f800000 is 1.0
    assert mpnet.amax["/encoder/Div_output_0"] == 127.0 / 8  # 3e000000 is 0.125
    assert math.isinf(mpnet.amax["/encoder/Mul_1_output_0"])


@pytest.mark.parametrize(
    ("file", "version", "code", "algorithm"),
    [
        ("trt7203_entropy2_ssd_tf.cache", "7.2.3", 7203, "EntropyCalibration2"),
        ("trt8400_minmax_vgg16.cache", "8.4.0", 8400, "MinMaxCalibration"),
        ("trt8601_entropy2_diffusion.cache", "8.6.1", 8601, "EntropyCalibration2"),
        ("trt101303_minmax_mpnet.cache", "10.13.3", 101303, "MinMaxCalibration"),
        ("legacy_header_yolov2.cache", None, None, None),
    ],
)
def test_header_metadata(file, version, code, algorithm):
    metadata = read_cache(CACHES / file).metadata
    assert (metadata["trt_version"], metadata["trt_version_code"], metadata["algorithm"]) == (version, code, algorithm)


@pytest.mark.parametrize("path", [p for p in REAL_CACHES if "legacy" not in p.name], ids=lambda p: p.name)
def test_rewriting_a_real_cache_reproduces_it_up_to_zero_padding(path, tmp_path):
    thresholds = read_cache(path)
    out = tmp_path / "out.cache"
    meta = thresholds.metadata
    write_thresholds(out, thresholds, trt_version=meta["trt_version_code"], algorithm=meta["algorithm"])
    padded = [meta["header"]] + [f"{name}: {int(digits, 16):08x}" for name, digits in cache_lines(path)]
    assert out.read_text(encoding="utf-8") == "\n".join(padded) + "\n"


@pytest.mark.parametrize(
    "mangle",
    [
        lambda data: data.replace(b"\n", b"\r\n"),
        lambda data: data.rstrip(b"\n"),
        lambda data: b"\xef\xbb\xbf" + data,
        lambda data: data.replace(b"\n", b"\n\n"),
    ],
    ids=["crlf", "no-final-newline", "utf8-bom", "blank-lines"],
)
def test_edited_copies_of_a_real_cache_read_the_same(mangle, tmp_path):
    original = CACHES / "trt7203_entropy2_ssd_tf.cache"
    edited = write_bytes(tmp_path, mangle(original.read_bytes()), "edited.txt")
    assert detect_format(edited) == "trt-cache"
    assert read_thresholds(edited) == read_cache(original)


# --- bit-exact round trip ------------------------------------------------------------------------------------------

# Names: any text TensorRT could hold on one line (no newline, carriage return or NUL), colons and spaces included.
names = st.text(st.characters(blacklist_characters="\n\r\x00", blacklist_categories=("Cs",)), min_size=1, max_size=40)
float32_scales = st.floats(min_value=0.0, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(names | st.sampled_from(["a:b", "x: y", "(Unnamed Layer* 3) [Convolution]_output"]),
                       float32_scales, min_size=1, max_size=30))
def test_cache_round_trip_is_bit_exact(tmp_path_factory, scales):
    path = tmp_path_factory.mktemp("roundtrip") / "t.cache"
    write_thresholds(path, {name: scale * 127 for name, scale in scales.items()})
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[0] == f"TRT-{trt_version_code(DEFAULT_TRT_VERSION)}-EntropyCalibration2"
    assert lines[1:] == [f"{name}: {struct.pack('>f', scale).hex()}" for name, scale in scales.items()] + [""]
    back = read_thresholds(path)
    assert list(back.amax) == list(scales)
    for name, scale in scales.items():
        assert struct.pack(">f", back.amax[name] / 127) == struct.pack(">f", scale)
        assert back.amax[name] == scale * 127


@settings(max_examples=100, deadline=None)
@given(st.floats(min_value=0.0, max_value=1e30, allow_nan=False))
def test_writer_rounds_amax_over_127_to_the_nearest_float32(amax):
    line = format_cache(Thresholds({"t": amax})).decode().split("\n")[1]
    assert line == f"t: {np.array([amax / 127], dtype='>f4').tobytes().hex()}"


def test_negative_zero_amax_is_written_as_zero():
    assert format_cache(Thresholds({"t": -0.0})).decode().split("\n")[1] == "t: 00000000"


# --- malformed caches ----------------------------------------------------------------------------------------------

MALFORMED = [
    (b"", None, "empty file"),
    (b"\n  \n", None, "empty file"),
    (b"hello world\nx: 3c010a14\n", 1, "TRT-<version>-<algorithm>"),
    (b"TRT-8601\nx: 3c010a14\n", 1, "TRT-<version>-<algorithm>"),
    (b"data 2.640000104904175\nconv 31.45\n", 1, "TRT-<version>-<algorithm>"),  # ORT's plain-text calibration.cache
    (f"{HEADER}\nx: 3c010a14\ny: 3c01".encode(), 3, "truncated"),
    (f"{HEADER}\nx: 3c010a14\ny:".encode(), 3, "truncated"),
    (f"{HEADER}\nx: 3c01zz14\n".encode(), 2, "hex"),
    (f"{HEADER}\nx: 3c010a140\n".encode(), 2, "hex"),
    (f"{HEADER}\nx: 0x3c010a\n".encode(), 2, "hex"),
    (f"{HEADER}\nx: \ny: 3c010a14\n".encode(), 2, "missing"),
    (f"{HEADER}\nx 3c010a14\n".encode(), 2, "<tensor name>: <hex scale>"),
    (f"{HEADER}\n: 3c010a14\n".encode(), 2, "empty tensor name"),
    (f"{HEADER}\na: 3c010a14\nb: 3c010a14\na: 3c010a15\n".encode(), 4, "duplicate tensor 'a' (first on line 2)"),
    (f"{HEADER}\nx: 7fc00000\n".encode(), 2, "NaN"),
    (f"{HEADER}\nx: bf800000\n".encode(), 2, "negative"),
    (f"{HEADER}\nx: 80000000\n".encode(), 2, "negative"),
    (f"{HEADER}\nx: ff800000\n".encode(), 2, "negative"),
    (HEADER.encode() + b"\nx\xff: 3c010a14\n", 2, "UTF-8"),
]


@pytest.mark.parametrize(("data", "line", "fragment"), MALFORMED)
def test_malformed_cache_is_one_line_error_naming_file_and_line(data, line, fragment, tmp_path):
    path = write_bytes(tmp_path, data)
    with pytest.raises(QuantlabError) as caught:
        read_thresholds(path, format="trt-cache")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:{line}: " if line else f"{path}: ")
    assert fragment in message


def test_missing_file_is_a_quantlab_error(tmp_path):
    with pytest.raises(QuantlabError, match="file not found"):
        read_thresholds(tmp_path / "nope.cache")


@pytest.mark.parametrize(
    ("thresholds", "fragment"),
    [({"a\nb": 1.0}, "newline"), ({"a\x00": 1.0}, "NUL"), ({"big": 1e300}, "too large"), ({"\ud800": 1.0}, "UTF-8")],
)
def test_cache_writer_rejects_what_a_cache_cannot_hold(thresholds, fragment, tmp_path):
    with pytest.raises(QuantlabError, match=fragment):
        write_thresholds(tmp_path / "t.cache", thresholds)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("amax", [-1.0, float("nan"), "x"])
def test_thresholds_reject_negative_nan_and_non_numbers(amax):
    with pytest.raises(QuantlabError, match="amax must be"):
        Thresholds({"t": amax})


# --- TensorRT version codes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "code"),
    [("7.2.3", 7203), ("8.4.0", 8400), ("8.6.1", 8601), ("8.6.1.post1", 8601), ("8.6", 8600), ("10.3.0", 100300),
     ("10.3.0.26", 100300), ("10.13.3", 101303), (8601, 8601), ("100300", 100300)],
)
def test_trt_version_codes(version, code):
    assert trt_version_code(version) == code


@pytest.mark.parametrize("code", [7203, 8400, 8601, 100300, 101303, 101401])
def test_version_names_invert_codes(code):
    assert trt_version_code(trt_version_name(code)) == code


@pytest.mark.parametrize("version", ["9.2.0", "4.0.1", "8.10.0", "latest", "10"])
def test_unknown_trt_versions_are_rejected(version):
    with pytest.raises(QuantlabError, match="TensorRT version"):
        trt_version_code(version)


@pytest.mark.parametrize(("version", "header"), [("8.6.1", "TRT-8601-MinMaxCalibration"),
                                                 ("10.3.0", "TRT-100300-MinMaxCalibration")])
def test_trt_version_option_sets_the_header(version, header, tmp_path):
    path = tmp_path / "t.cache"
    write_thresholds(path, {"x": 1.0}, trt_version=version, algorithm="MinMaxCalibration")
    assert path.read_text().split("\n")[0] == header


def test_default_header_is_tensorrt_10_3():
    assert format_cache(Thresholds({})).decode() == "TRT-100300-EntropyCalibration2\n"


# --- format dispatch -----------------------------------------------------------------------------------------------

SAMPLE = Thresholds({"input": 2.64, "conv1:0": 31.458948135375977, "(Unnamed Layer* 3) [Convolution]_output": 0.0})


@pytest.mark.parametrize(("name", "fmt"), [("t.cache", "trt-cache"), ("t.json", "json"),
                                           ("t.flatbuffers", "ort-table"), ("T.CACHE", "trt-cache")])
def test_extension_picks_the_format(name, fmt, tmp_path):
    path = tmp_path / name
    write_thresholds(path, SAMPLE)
    assert detect_format(path) == fmt
    assert read_thresholds(path).amax.keys() == SAMPLE.amax.keys()


@pytest.mark.parametrize("name", ["calib.table", "cal.bin", "model.json", "int8.txt"])
def test_trt_header_wins_over_the_extension(name, tmp_path):
    path = tmp_path / name
    path.write_bytes((CACHES / "trt8400_minmax_vgg16.cache").read_bytes())
    assert detect_format(path) == "trt-cache"
    assert read_thresholds(path) == read_cache(CACHES / "trt8400_minmax_vgg16.cache")


def test_explicit_format_overrides_the_extension(tmp_path):
    path = tmp_path / "thresholds.bin"
    write_thresholds(path, SAMPLE, format="json")
    assert json.loads(path.read_text())["format"] == "quantlab-thresholds"
    assert read_thresholds(path, format="json").amax == SAMPLE.amax
    legacy = tmp_path / "yolo.table"
    legacy.write_bytes((CACHES / "legacy_header_yolov2.cache").read_bytes())
    assert len(read_thresholds(legacy, format="trt-cache").amax) == 57


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda d: write_thresholds(d / "t.txt", SAMPLE), "cannot tell the threshold format"),
        (lambda d: write_thresholds(d / "t.cache", SAMPLE, format="onnx"), "unknown threshold format 'onnx'"),
        (lambda d: write_thresholds(d / "t.json", SAMPLE, trt_version="8.6.1"), "has no option trt_version"),
        (lambda d: write_thresholds(d / "t.cache", SAMPLE, trt_version="9.1.0"), "TensorRT version"),
        (lambda d: write_thresholds(d / "t.cache", SAMPLE, algorithm="Entropy 2"), "calibration algorithm"),
        (lambda d: write_thresholds(d / "missing" / "t.cache", SAMPLE), "does not exist"),
    ],
)
def test_bad_write_requests_fail_before_writing(call, fragment, tmp_path):
    with pytest.raises(QuantlabError, match=fragment):
        call(tmp_path)
    assert not list(tmp_path.iterdir())


def test_unknown_extension_on_read_names_the_known_ones(tmp_path):
    path = write_bytes(tmp_path, b"input 2.64\n", "calibration.txt")
    with pytest.raises(QuantlabError, match=r"\.cache \(trt-cache\), \.json \(json\), \.flatbuffers \(ort-table\)"):
        read_thresholds(path)


# --- JSON table ----------------------------------------------------------------------------------------------------


def test_json_round_trip_keeps_float64_and_metadata(tmp_path):
    path = tmp_path / "t.json"
    amax = {"a": 0.1 + 0.2, "b": 1e-300, "c": 123456789.123456789, "d": 0.0}
    metadata = {"method": "kl", "variant": "tensorrt", "options": {"bins": 2048, "stride": [1, 2]},
                "source": {"histograms": "h.npz", "model_sha256": "ab" * 32}, "notes": "free-form"}
    write_thresholds(path, Thresholds(amax, metadata))
    document = json.loads(path.read_text())
    assert list(document) == ["format", "version", "method", "variant", "options", "source", "notes", "thresholds"]
    assert read_thresholds(path) == Thresholds(amax, metadata)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('{\n  "format": "quantlab-thresholds",\n  "version": 1,\n  "thresholds": {"a": }\n}', ":4: invalid JSON"),
        ('[1, 2]', "not a quantlab threshold table"),
        ('{"format": "other", "version": 1, "thresholds": {}}', "not a quantlab threshold table"),
        ('{"format": "quantlab-thresholds", "version": 2, "thresholds": {}}', "version 2"),
        ('{"format": "quantlab-thresholds", "version": 1, "thresholds": [1]}', '"thresholds" must be an object'),
        ('{"format": "quantlab-thresholds", "version": 1, "thresholds": {"a": "1"}}', "amax must be a number"),
        ('{"format": "quantlab-thresholds", "version": 1, "thresholds": {"a": true}}', "amax must be a number"),
        ('{"format": "quantlab-thresholds", "version": 1, "thresholds": {"a": -1}}', "amax must be >= 0"),
        ('{"format": "quantlab-thresholds", "version": 1, "thresholds": {"a": 1, "a": 2}}', "duplicate key 'a'"),
    ],
)
def test_malformed_json_tables(text, fragment, tmp_path):
    path = write_bytes(tmp_path, text.encode(), "t.json")
    with pytest.raises(QuantlabError) as caught:
        read_thresholds(path)
    assert str(caught.value).startswith(str(path)) and fragment in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("thresholds", "fragment"),
    [
        (Thresholds({"a": math.inf}), "infinite amax"),
        (Thresholds({"a": 1.0}, {"source": {"path": Path("x")}}), "not plain JSON"),
        (Thresholds({"a": 1.0}, {"options": {"eps": math.nan}}), "not plain JSON"),
        (Thresholds({"a": 1.0}, {"format": "mine"}), "reserved"),
    ],
)
def test_json_writer_rejects_what_json_cannot_hold(thresholds, fragment, tmp_path):
    with pytest.raises(QuantlabError, match=fragment):
        write_thresholds(tmp_path / "t.json", thresholds)
    assert not list(tmp_path.iterdir())


# --- ONNX Runtime calibration table --------------------------------------------------------------------------------


def ort_entries(path: Path) -> dict[str, str]:
    """key -> value strings of an ORT table, read with ORT's generated flatbuffers classes."""
    from onnxruntime.quantization.CalTableFlatBuffers.TrtTable import TrtTable

    table = TrtTable.GetRootAs(path.read_bytes(), 0)
    return {table.Dict(i).Key().decode(): table.Dict(i).Value().decode() for i in range(table.DictLength())}


def test_ort_table_round_trip_at_float32_precision(tmp_path):
    thresholds = read_cache(CACHES / "trt7203_entropy2_ssd_tf.cache")
    path = tmp_path / "calibration.flatbuffers"
    write_thresholds(path, thresholds)
    back = read_thresholds(path)
    assert back.amax == {name: float(np.float32(amax)) for name, amax in thresholds.amax.items()}
    assert ort_entries(path) == {name: str(float(np.float32(amax))) for name, amax in thresholds.amax.items()}
    assert not [p for p in tmp_path.iterdir() if p != path]


def test_ort_table_is_what_ort_writes_for_the_symmetric_range(tmp_path):
    from onnxruntime.quantization.calibrate import TensorData
    from onnxruntime.quantization.quant_utils import write_calibration_table

    ours = tmp_path / "ours.flatbuffers"
    write_thresholds(ours, SAMPLE)
    write_calibration_table(
        {name: TensorData(lowest=np.float32(-amax), highest=np.float32(amax)) for name, amax in SAMPLE.amax.items()},
        dir=str(tmp_path),
    )
    assert ours.read_bytes() == (tmp_path / "calibration.flatbuffers").read_bytes()


def test_float32_amax_round_trips_exactly_through_the_ort_table(tmp_path):
    amax = {f"t{i}": float(v) for i, v in enumerate(np.float32([0.0, 1e-40, 2.5, 3.4028235e38, 1 / 3]))}
    path = tmp_path / "t.flatbuffers"
    write_thresholds(path, amax)
    assert read_thresholds(path).amax == amax


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00\x01", b'{"format": "quantlab-thresholds"}', (CACHES / "trt8400_minmax_vgg16.cache").read_bytes()],
    ids=["empty", "short", "json", "trt-cache"],
)
def test_malformed_ort_tables(data, tmp_path):
    path = write_bytes(tmp_path, data, "t.flatbuffers")
    with pytest.raises(QuantlabError) as caught:
        read_thresholds(path, format="ort-table")
    assert str(caught.value).startswith(f"{path}: ") and "\n" not in str(caught.value)


# --- atomic writes -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("t.cache", Thresholds({"ok": 1.0, "bad\nname": 1.0})),
        ("t.json", Thresholds({"ok": 1.0, "inf": math.inf})),
        ("t.flatbuffers", Thresholds({"ok": 1.0, "huge": 1e300})),
    ],
)
def test_failed_write_leaves_the_old_file_untouched(name, bad, tmp_path):
    path = tmp_path / name
    write_thresholds(path, SAMPLE)
    before = path.read_bytes()
    with pytest.raises(QuantlabError):
        write_thresholds(path, bad)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_write_replaces_the_file_without_leaving_temporaries(tmp_path):
    path = tmp_path / "t.cache"
    for scale in (1.0, 2.0, 3.0):
        write_thresholds(path, {"x": scale * 127})
    assert read_thresholds(path).amax == {"x": 3.0 * 127}
    assert os.listdir(tmp_path) == ["t.cache"]


# --- diff ----------------------------------------------------------------------------------------------------------


def test_diff_orders_missing_then_worst_ratio_first_and_counts():
    a = {"same": 1.0, "tiny": 1.0, "five_pct": 2.0, "up_20pct": 1.0, "half": 4.0, "zeros": 0.0, "gone": 3.0,
         "from_zero": 0.0, "both_inf": math.inf}
    b = {"same": 1.0, "tiny": 1.005, "five_pct": 2.1, "up_20pct": 1.2, "half": 2.0, "zeros": 0.0, "new": 5.0,
         "from_zero": 0.5, "both_inf": math.inf}
    diff = diff_thresholds(Thresholds(a), b)
    assert [row.name for row in diff.rows] == [
        "gone", "new", "from_zero", "half", "up_20pct", "five_pct", "tiny", "both_inf", "same", "zeros",
    ]
    rows = {row.name: row for row in diff.rows}
    assert rows["gone"] == ("gone", 3.0, None, None) and rows["new"] == ("new", None, 5.0, None)
    assert rows["half"].ratio == 0.5 and rows["up_20pct"].ratio == pytest.approx(1.2)
    assert rows["from_zero"].ratio == math.inf and rows["zeros"].ratio == 1.0 and rows["both_inf"].ratio == 1.0
    assert (diff.compared, diff.over_1pct, diff.over_10pct, diff.only_a, diff.only_b) == (8, 4, 3, 1, 1)


def test_diff_is_symmetric_in_its_counts():
    a = read_cache(CACHES / "trt8400_minmax_vgg16.cache")
    b = Thresholds({name: amax * (1 + 0.03 * (i % 7)) for i, (name, amax) in enumerate(a.amax.items())})
    forward, backward = diff_thresholds(a, b), diff_thresholds(b, a)
    assert (forward.over_1pct, forward.over_10pct) == (backward.over_1pct, backward.over_10pct)
    for diff in (forward, backward):
        distances = [row.log_ratio for row in diff.rows]
        assert distances == sorted(distances, reverse=True)
    worst = {row.name for row in forward.rows if row.log_ratio > math.log(1.165)}
    assert worst == {row.name for row in backward.rows if row.log_ratio > math.log(1.165)} and len(worst) == 9
    assert forward.rows[0].ratio == pytest.approx(1.18)
