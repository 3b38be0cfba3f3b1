"""One Config base for every analysis: plain values in, JSON out, a full-sha256 fingerprint.

A Config is a frozen dataclass. ``to_dict`` spells out every field (tuples as lists, nested
configs as their dicts), ``from_dict`` refuses unknown keys in one line, and ``fingerprint`` hashes
the canonical JSON, so equal settings give equal fingerprints in any process. A subclass
normalises its own fields in ``__post_init__`` (e.g. ``Metric.coerce``), which is also what turns
the nested dicts of ``from_dict`` back into values.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Mapping, TypeVar

from .errors import MechsinkError

C = TypeVar("C", bound="Config")


class ConfigError(MechsinkError, ValueError):
    """Settings that cannot be read (unknown keys, bad JSON)."""


def plain(v: Any) -> Any:
    """A JSON-ready copy of a config value."""
    if hasattr(v, "to_dict"):
        return v.to_dict()
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): plain(x) for k, x in v.items()}
    if hasattr(v, "item") and not hasattr(v, "__len__"):   # numpy scalars
        return v.item()
    return v


def frozen(v: Any) -> Any:
    """Lists (from JSON) back into tuples, recursively."""
    if isinstance(v, list):
        return tuple(frozen(x) for x in v)
    return v


class Config:
    """Base of every settings object (use with ``@dataclass(frozen=True)``)."""

    def to_dict(self) -> dict:
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: type[C], d: Mapping[str, Any] | None) -> C:
        d = dict(d or {})
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ConfigError(f"{cls.__name__} has no setting {', '.join(unknown)}; "
                              f"settings: {', '.join(known)}")
        return cls(**{k: v if isinstance(v, Mapping) else frozen(v) for k, v in d.items()})

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=indent)

    @classmethod
    def from_json(cls: type[C], text: str) -> C:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cls.__name__}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{cls.__name__}: expected a JSON object, got {type(d).__name__}")
        return cls.from_dict(d)

    def fingerprint(self) -> str:
        """sha256 hex of the canonical JSON (sorted keys): equal settings, equal fingerprints."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def replace(self: C, **changes) -> C:
        return dataclasses.replace(self, **changes)


def coerce(cls: type[C], value: Any) -> C:
    """``value`` as a ``cls``: an instance as it is, a dict through ``from_dict``, None as the default."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        return cls.from_dict(value)
    raise ConfigError(f"expected {cls.__name__} or a dict of its settings, got {type(value).__name__}")
