"""The test zoo: models with known structure or known answers, reachable by name in `load`.

- ``tiny-*``: seeded random, architecture-faithful models built offline from configs.
- ``planted-llava`` / ``planted-llava-null``: sinks created by the weights at known patches.
- ``toy-llava``: the bundled trained toy LVLM.
- ``twin-*``: real configs, processors and tokenizers at full width, random weights, cut depth
  (``twin-llava-1.5-7b:vit=4,llm=2``; ``:full`` on the meta device). See `mechsink.zoo.twins`.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

from PIL import Image

from .data.images import test_image  # noqa: F401  (kept here for the tests)
from .models import wrap

TOY_DIR = Path(__file__).parent / "zoo" / "toy_llava"


def _builders() -> dict[str, Callable]:
    table: dict[str, Callable] = {}
    for mod in ("tiny", "planted", "twins"):
        try:
            table.update(importlib.import_module(f"mechsink.zoo.{mod}").BUILDERS)
        except ModuleNotFoundError as e:
            if e.name != f"mechsink.zoo.{mod}":
                raise
    return table


class _Zoo(dict):
    """Names are resolved lazily so that importing mechsink stays cheap."""
    def _table(self):
        t = _builders()
        t["toy-llava"] = None
        return t

    def __contains__(self, name) -> bool:
        name = str(name)
        table = self._table()
        return name in table or (":" in name and name.startswith("twin-") and name.partition(":")[0] in table)

    def __iter__(self):
        return iter(self._table())

    def keys(self):
        return self._table().keys()


ZOO = _Zoo()


def build(name: str, seed: int = 0, **kw):
    """Build a zoo model by name -> mechsink Model."""
    if name == "toy-llava":
        from .models import load
        m = load(TOY_DIR)
        m.name = "toy-llava"
        return m
    if name.startswith("twin-"):
        from .zoo import twins
        hf, proc = twins.build(name, seed=seed, **kw)
        return wrap(hf, proc, name=name, source=f"zoo:{name}")
    hf, proc = _builders()[name](seed=seed, **kw)
    return wrap(hf, proc, name=name, source=f"zoo:{name}")
