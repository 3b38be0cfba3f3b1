"""Errors raised by mechsink.data: bad dataset specs and unreadable images."""

from __future__ import annotations


def _bases() -> tuple[type, ...]:
    # Join the project-wide error family when it exists; stay a ValueError either way.
    try:
        from mechsink.errors import MechsinkError
    except ModuleNotFoundError as e:
        if e.name not in ("mechsink.errors", "mechsink"):
            raise
        return (ValueError,)
    return (MechsinkError,) if issubclass(MechsinkError, ValueError) else (MechsinkError, ValueError)


class DataError(*_bases()):
    """A dataset cannot be opened or is malformed (one-line message)."""


class ImageError(DataError):
    """One image cannot be read.

    `kind` is a short machine-readable cause: missing, empty, not_an_image, truncated,
    too_large, corrupt, no_image.
    """

    def __init__(self, message: str, *, kind: str = "corrupt", path: str | None = None):
        super().__init__(message)
        self.kind = kind
        self.path = path
