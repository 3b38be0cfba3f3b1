"""Reproducible reports: figures, a self-contained HTML page, and a manifest of every number."""

from mechsink.report.html import Report, format_number
from mechsink.report.manifest import (
    ReportError,
    build_manifest,
    canonical_json,
    hash_directory,
    hash_file,
    package_versions,
    sha256_json,
    to_jsonable,
    write_manifest,
)

__all__ = [
    "Report",
    "ReportError",
    "build_manifest",
    "canonical_json",
    "format_number",
    "hash_directory",
    "hash_file",
    "package_versions",
    "sha256_json",
    "to_jsonable",
    "write_manifest",
]
