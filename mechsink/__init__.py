"""mechsink: mechanistic interpretability of ViT attention sinks in vision-language models."""
from __future__ import annotations

__version__ = "0.1.0"

import os as _os

# Arrow's default allocator (mimalloc) keeps freed pages in per-thread heaps: the resident memory
# of a long activation cache then grows with the dataset (7.9 -> 21.4 MB added for 200 -> 2,000
# tiny-llava images, against 2.7 -> 6.0 MB with the system allocator). Arrow reads this once, when
# it first allocates, so it is set before anything imports pyarrow; set it yourself to choose another.
_os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")

from .errors import MechsinkError
from .models import Model, load, wrap
from .sites import Site

__all__ = ["MechsinkError", "Model", "Site", "load", "wrap", "__version__"]
