"""Activation caches: a sharded, resumable, memory-mapped store of per-token activations, and the
extractor that fills one from a model and a dataset."""

from mechsink.cache.extract import TOKENS, cache_command, extract, model_fingerprint
from mechsink.cache.store import (
    ROW_COLUMNS,
    Store,
    StoreConfig,
    StoreError,
    StoreWriter,
    merge,
    store_id,
)

__all__ = [
    "ROW_COLUMNS",
    "TOKENS",
    "Store",
    "StoreConfig",
    "StoreError",
    "StoreWriter",
    "cache_command",
    "extract",
    "merge",
    "model_fingerprint",
    "store_id",
]
