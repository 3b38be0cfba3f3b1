"""Activation caches: a sharded, resumable, checksummed, memory-mapped store of per-token
activations, and the extractor that fills one from a model and a dataset."""

from mechsink.cache.extract import TOKENS, extract, model_fingerprint
from mechsink.cache.store import (
    SampleSet,
    ROW_COLUMNS,
    Store,
    StoreConfig,
    StoreCorrupt,
    StoreError,
    StoreLocked,
    StoreWriteError,
    StoreWriter,
    merge,
    store_id,
    verify,
)

__all__ = [
    "ROW_COLUMNS",
    "SampleSet",
    "TOKENS",
    "Store",
    "StoreConfig",
    "StoreCorrupt",
    "StoreError",
    "StoreLocked",
    "StoreWriteError",
    "StoreWriter",
    "extract",
    "merge",
    "model_fingerprint",
    "store_id",
    "verify",
]
