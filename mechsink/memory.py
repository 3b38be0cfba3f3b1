"""Handing freed memory back to the operating system between the phases of a long run.

Arrow's pool keeps freed pages for reuse, and glibc keeps freed heap pages that a few live
objects pin; over a run of many large, short-lived arrays resident memory then creeps up to the
sum of the phases' peaks instead of the largest one. ``trim()`` at a phase boundary costs about a
millisecond.
"""
from __future__ import annotations

_LIBC: list = []


def trim() -> None:
    """Release Arrow's unused pool memory and glibc's free heap pages (a no-op elsewhere)."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    if not _LIBC:
        try:
            import ctypes
            _LIBC.append(ctypes.CDLL("libc.so.6").malloc_trim)
        except (OSError, AttributeError):
            _LIBC.append(None)
    if _LIBC[0] is not None:
        _LIBC[0](0)
