"""quantlab's self-describing `.npz` files (histograms, ranges): named arrays plus a JSON `meta` naming the format.

One reader and one writer, so every such file is written atomically, read without pickle, and refused with the same
one-line messages when it is not the kind expected or comes from another format version.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from quantlab.atomic import atomic_write
from quantlab.errors import QuantlabError, reading


def write_npz(path: str | Path, format_name: str, version: int, metadata: dict[str, Any], arrays: dict[str, np.ndarray]) -> Path:
    """Write `arrays` and the metadata (with the format's name and version) as one `.npz`, atomically."""
    meta = np.array(json.dumps({"format": format_name, "format_version": version, **metadata}))
    with atomic_write(path) as handle:
        np.savez(handle, meta=meta, **arrays)
    return Path(path)


def read_npz(path: str | Path, format_name: str, version: int, kind: str, again: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays and metadata of a file written by `write_npz` for `format_name`; QuantlabError for anything else.

    `kind` names the file in messages ("histogram"), `again` says what to do about another version ("collect again").
    """
    path = Path(path)
    if not path.is_file():
        raise QuantlabError(f"{path}: {kind} file not found")
    if not zipfile.is_zipfile(path):  # else np.load tries it as a pickle and suggests allow_pickle
        raise QuantlabError(f"{path}: not a quantlab {kind} file (not an .npz archive)")
    with reading(path, f"not a quantlab {kind} file"), np.load(path, allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in npz.files}
    try:
        meta = json.loads(str(arrays.pop("meta")))
    except (KeyError, json.JSONDecodeError):
        raise QuantlabError(f"{path}: not a quantlab {kind} file (no metadata)") from None
    if not isinstance(meta, dict) or meta.pop("format", None) != format_name:
        raise QuantlabError(f"{path}: not a quantlab {kind} file")
    found = meta.pop("format_version", None)
    if found != version:
        raise QuantlabError(f"{path}: {kind} format version {found} is not supported (this quantlab reads version {version}); {again}")
    return arrays, meta
