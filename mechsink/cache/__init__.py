"""Activation caches: a sharded, resumable, memory-mapped store of per-token activations."""

from mechsink.cache.store import (
    ROW_COLUMNS,
    Store,
    StoreConfig,
    StoreError,
    StoreWriter,
    merge,
    store_id,
)

__all__ = ["ROW_COLUMNS", "Store", "StoreConfig", "StoreError", "StoreWriter", "merge", "store_id"]
