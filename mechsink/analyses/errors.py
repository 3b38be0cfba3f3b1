"""The error every analysis in :mod:`mechsink.analyses` raises for input it cannot use."""
from __future__ import annotations

from ..errors import MechsinkError


class AnalysisError(MechsinkError, ValueError):
    """An analysis asked for something the model or batch does not have."""
