"""What a probing run does: ``ProbeConfig`` (a :class:`mechsink.config.Config`) and its vocabulary.

Token sets are token selections (:mod:`mechsink.selection`) plus one aggregate:

- ``sinks`` / ``nonsinks`` / ``image``: image tokens with ``is_sink`` true / false / either; every
  token is one training sample (at most ``max_tokens_per_image`` per image).
- ``cls``: the CLS rows (image-level labels only).
- ``mean``: *not a selection* but an aggregate: the mean of each image's image tokens, one
  training sample per image (image-level labels only).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import Config
from ..errors import MechsinkError
from ..selection import Selection, SelectionError

SELECTIONS = ("sinks", "nonsinks", "cls", "image")   # token sets that are token selections
AGGREGATES = ("mean",)                                # token sets that pool an image's tokens
TOKEN_SETS = ("sinks", "nonsinks", "cls", "mean")     # the default; order fixes the control seeds
_SEED_ORDER = ("sinks", "nonsinks", "cls", "mean", "image")
MODELS = ("logistic", "ridge")
LEVELS = ("auto", "image", "patch")


class ProbeError(MechsinkError, ValueError):
    """A probe cannot be trained or loaded as asked (one-line message)."""


def _token_set(name) -> str:
    if isinstance(name, str) and name in AGGREGATES:
        return name
    try:
        sel = Selection.parse(name)
    except SelectionError:
        sel = None
    if sel is None or str(sel) not in SELECTIONS:
        raise ProbeError(f"token_sets must be distinct names from {list(SELECTIONS + AGGREGATES)} "
                         f"('image' is every image token, 'mean' their per-image mean), got {name!r}")
    return str(sel)


@dataclass(frozen=True)
class ProbeConfig(Config):
    """What a probing run does; JSON round-trips and its full-sha256 fingerprint names the run.

    label: index column to predict. token_sets: names from SELECTIONS + AGGREGATES (see the module
    docstring). sites: cached sites to probe (None: all). model: "logistic" (inverse regularisation
    C) or "ridge" (penalty alpha). k: CV folds. n_boot: bootstrap draws for the CIs. control: run
    the control task. level: "auto" | "image" | "patch". max_tokens_per_image: cap on the tokens
    one image contributes to a token-level set (a fixed random subset), bounding memory on large
    models; None keeps all.
    """

    label: str = ""
    token_sets: tuple[str, ...] = TOKEN_SETS
    sites: tuple[str, ...] | None = None
    model: str = "logistic"
    C: float = 1.0
    alpha: float = 1.0
    k: int = 5
    n_boot: int = 1000
    seed: int = 0
    control: bool = True
    level: str = "auto"
    max_tokens_per_image: int | None = 64
    max_iter: int = 1000

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen dataclass
        if not isinstance(self.label, str) or not self.label:
            raise ProbeError("label must be the name of an index column")
        raw = (self.token_sets,) if isinstance(self.token_sets, (str, Selection)) else tuple(self.token_sets)
        sets = tuple(_token_set(s) for s in raw)
        if not sets or len(set(sets)) != len(sets):
            raise ProbeError(f"token_sets must be distinct names from {list(SELECTIONS + AGGREGATES)}, got {list(raw)}")
        set_("token_sets", sets)
        if self.sites is not None:
            set_("sites", (self.sites,) if isinstance(self.sites, str) else tuple(self.sites))
        if self.model not in MODELS:
            raise ProbeError(f"model must be one of {list(MODELS)}, got {self.model!r}")
        if self.level not in LEVELS:
            raise ProbeError(f"level must be one of {list(LEVELS)}, got {self.level!r}")
        if not (self.C > 0 and self.alpha > 0):
            raise ProbeError(f"C and alpha must be > 0, got C={self.C}, alpha={self.alpha}")
        if int(self.k) != self.k or self.k < 2:
            raise ProbeError(f"k (folds) must be an integer >= 2, got {self.k}")
        if self.n_boot < 100:
            raise ProbeError(f"n_boot must be at least 100, got {self.n_boot}")
        if self.max_tokens_per_image is not None and self.max_tokens_per_image < 1:
            raise ProbeError(f"max_tokens_per_image must be >= 1 or None, got {self.max_tokens_per_image}")
