"""The run manifest: what was run (config, seeds, models, data), with what software, and every number.

The JSON is canonical (sorted keys, floats rounded to 12 significant digits, NaN -> null) so two
runs of the same analysis produce byte-identical manifests apart from ``created``, which is kept
out of ``content_sha256``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from mechsink.atomic import write_text
from mechsink.errors import MechsinkError

MANIFEST_VERSION = 1
FLOAT_DIGITS = 12  # significant digits kept: absorbs last-bit noise, far below any reported precision

# (manifest key, distribution name) — read from package metadata so nothing heavy is imported
_PACKAGES = [
    ("torch", "torch"),
    ("transformers", "transformers"),
    ("nnsight", "nnsight"),
    ("transformer_lens", "transformer-lens"),
    ("numpy", "numpy"),
    ("pandas", "pandas"),
    ("sklearn", "scikit-learn"),
    ("mechsink", "mechsink"),
]


class ReportError(MechsinkError, ValueError):
    """Bad input to the report or manifest (unserialisable value, clashing key, missing path)."""


def to_jsonable(obj: Any, *, where: str = "value") -> Any:
    """Normalise obj into plain JSON types: dicts with str keys, lists, str, int, float, bool, None.

    Floats are rounded to FLOAT_DIGITS significant digits; NaN becomes None and +-inf the
    strings "inf" / "-inf" (JSON has no infinities). numpy scalars/arrays, tuples, Paths,
    dataclasses and objects with ``to_dict()`` are converted; anything else is an error rather
    than a silent ``str()``.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        if math.isnan(x):
            return None
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return float(f"{x:.{FLOAT_DIGITS}g}")
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v, where=f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, where=f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist(), where=where)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj), where=where)
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        return to_jsonable(obj.to_dict(), where=where)
    raise ReportError(f"{where} has type {type(obj).__name__}, which cannot go into a JSON manifest")


def canonical_json(obj: Any, *, indent: int | None = 2) -> str:
    """Deterministic JSON text of obj (normalised with :func:`to_jsonable`, keys sorted)."""
    separators = (",", ": ") if indent else (",", ":")
    return json.dumps(to_jsonable(obj), sort_keys=True, indent=indent, separators=separators, allow_nan=False, ensure_ascii=False)


def sha256_json(obj: Any) -> str:
    """sha256 of the compact canonical JSON of obj, as 'sha256:<hex>'."""
    return "sha256:" + hashlib.sha256(canonical_json(obj, indent=None).encode()).hexdigest()


def hash_file(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, as 'sha256:<hex>'."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def hash_directory(path: str | os.PathLike) -> str:
    """sha256 over every file under path, in sorted relative-path order, as 'sha256:<hex>'.

    Each file contributes its POSIX relative path and its content hash, so renaming, adding or
    changing a file changes the result; timestamps and the directory's own location do not.
    A single file is hashed by content.
    """
    root = Path(path)
    if root.is_file():
        return hash_file(root)
    if not root.is_dir():
        raise ReportError(f"cannot hash {root}: no such file or directory")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for p in files:
        rel = p.relative_to(root).as_posix()
        h.update(rel.encode() + b"\0" + hash_file(p).encode() + b"\n")
    return "sha256:" + h.hexdigest()


def package_versions() -> dict[str, str | None]:
    """Versions of python and the packages results depend on (None: not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for key, dist in _PACKAGES:
        try:
            versions[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[key] = None
    if versions["mechsink"] is None:  # running from a source checkout that is not installed
        versions["mechsink"] = _source_version()
    return versions


def _source_version() -> str | None:
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    if not pyproject.is_file():
        return None
    try:
        import tomllib
    except ImportError:  # python 3.10
        return None
    return tomllib.loads(pyproject.read_text()).get("project", {}).get("version")


def platform_info() -> dict[str, str]:
    return {
        "system": platform.system(),
        "release": platform.release(),
        "machine": platform.machine(),
        "python_implementation": platform.python_implementation(),
        "byteorder": sys.byteorder,
    }


def _describe_model(name: str, ref: Any) -> dict:
    """A local path is hashed by content; anything else (a hub id, a given hash) is kept as given."""
    if isinstance(ref, (str, os.PathLike)) and os.path.exists(ref):
        return {"path": os.fspath(ref), "sha256": hash_directory(ref)}
    if isinstance(ref, str):
        return {"ref": ref}
    return {"ref": to_jsonable(ref, where=f"models.{name}")}


def build_manifest(
    config: Mapping | None = None,
    seeds: Mapping | None = None,
    numbers: Mapping | None = None,
    models: Mapping | None = None,
    data: Mapping | None = None,
    *,
    extra: Mapping | None = None,
) -> dict:
    """Assemble the manifest as a JSON-ready dict.

    config: the analysis configs (anything :func:`to_jsonable` accepts); seeds: name -> seed;
    numbers: dotted key -> value (every number shown in the report); models: name -> local
    path (hashed with :func:`hash_directory`) or an id/hash string; data: name -> fingerprint.
    ``config_sha256`` hashes the config alone; ``content_sha256`` hashes everything except
    ``created``, so identical runs give identical hashes.
    """
    body = {
        "manifest_version": MANIFEST_VERSION,
        "config": to_jsonable(dict(config or {}), where="config"),
        "seeds": to_jsonable(dict(seeds or {}), where="seeds"),
        "numbers": to_jsonable(dict(numbers or {}), where="numbers"),
        "models": {str(k): _describe_model(str(k), v) for k, v in (models or {}).items()},
        "data": to_jsonable(dict(data or {}), where="data"),
        "versions": package_versions(),
        "platform": platform_info(),
    }
    if extra:
        body.update(to_jsonable(dict(extra), where="extra"))
    body["config_sha256"] = sha256_json(body["config"])
    body["content_sha256"] = sha256_json(body)
    body["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return body


def write_manifest(manifest: Mapping, path: str | os.PathLike) -> Path:
    """Write the manifest as canonical JSON (atomically, so a crash never leaves half a file)."""
    return write_text(path, canonical_json(manifest) + "\n")
