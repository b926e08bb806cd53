"""quantlab: INT8 calibration analysis.

model + data -> histograms -> thresholds -> caches / Q/DQ model -> drift report. The public API is re-exported here
and imported lazily, so `import quantlab` (and `quantlab --help`) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Histogram": "quantlab.histogram",
    "HistogramSet": "quantlab.histogram",
    "load_histograms": "quantlab.histogram",
    "collect": "quantlab.collection",
    "collect_ranges": "quantlab.collection",
    "TensorRanges": "quantlab.ranges",
    "Thresholds": "quantlab.formats",
    "read_thresholds": "quantlab.formats",
    "write_thresholds": "quantlab.formats",
    "diff_thresholds": "quantlab.formats",
    "read_cache": "quantlab.formats.trt_cache",
    "export_qdq": "quantlab.formats.qdq",
    "quantize_qdq": "quantlab.formats.qdq",
    "measure_drift": "quantlab.drift",
    "measure_isolated": "quantlab.drift",
    "rank_sensitivity": "quantlab.drift",
    "propose_fp32": "quantlab.drift",
    "DriftReport": "quantlab.drift",
    "write_cache": "quantlab.formats.trt_cache",
    "CalibrationData": "quantlab.data",
    "save_data": "quantlab.data",
    "compute_amax": "quantlab.calibration",
    "calibrate": "quantlab.calibration",
    "kl_curve": "quantlab.calibration",
    "METHODS": "quantlab.calibration",
    "unquantizable": "quantlab.calibration",
    "QuantlabError": "quantlab.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'quantlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
