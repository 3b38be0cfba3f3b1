"""Activation caches: a sharded, resumable, checksummed, memory-mapped store of per-token
activations, and the extractor that fills one from a model and a dataset."""

from mechsink.cache.extract import TOKENS, extract, model_fingerprint
from mechsink.cache.index import merge
from mechsink.cache.integrity import verify
from mechsink.cache.layout import StoreConfig, StoreCorrupt, StoreError, StoreLocked, StoreWriteError, store_id
from mechsink.cache.rows import ROW_COLUMNS
from mechsink.cache.samples import SampleSet
from mechsink.cache.store import Store
from mechsink.cache.writer import StoreWriter

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
