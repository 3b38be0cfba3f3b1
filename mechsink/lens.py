"""TransformerLens interop: build a TransformerBridge around a module mechsink already opened.

TransformerLens 4 has no HookedTransformer; its TransformerBridge wraps HF modules and offers
`run_with_cache` and the patching utilities. Its processor loader pip-installs torchvision when a
multimodal processor needs it, which would replace a CPU torch build: `no_torchvision_install()`
turns that into a plain failure.
"""
from __future__ import annotations

import contextlib


@contextlib.contextmanager
def no_torchvision_install():
    """Within this block TransformerLens never tries to install torchvision."""
    from transformer_lens.model_bridge.sources.transformers import helpers
    original = helpers._ensure_torchvision

    def importable_only() -> bool:
        try:
            import torchvision  # noqa: F401
            return True
        except Exception:
            return False
    helpers._ensure_torchvision = importable_only
    try:
        yield
    finally:
        helpers._ensure_torchvision = original
