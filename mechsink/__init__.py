"""mechsink: mechanistic interpretability of ViT attention sinks in vision-language models."""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import MechsinkError
from .models import Model, load, wrap
from .sites import Site

__all__ = ["MechsinkError", "Model", "Site", "load", "wrap", "__version__"]
