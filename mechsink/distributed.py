"""Data parallelism under ``torchrun``: which rank this process is, and per-rank results merged.

Analyses shard their data by chunk (``batching.batches(..., shard=True)``: chunk ``j`` runs on rank
``j % world()``) and merge what the ranks made with ``gather``/``gather_frames``, ordered by the
chunk number, so a run on any number of ranks gives exactly the numbers of a single process. Under
``torchrun`` without a process group, a CPU (gloo) group is started on first use. A model split over
several GPUs of one rank (``device_map="auto"``) is left as it is.
"""
from __future__ import annotations

import os
from typing import Any, Iterable

import pandas as pd


def _dist():
    import torch.distributed as dist
    if not dist.is_available():
        return None
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1 and "MASTER_ADDR" in os.environ:
        dist.init_process_group("gloo")
    return dist if dist.is_initialized() else None


def rank() -> int:
    """This process's rank (0 without torchrun)."""
    d = _dist()
    return d.get_rank() if d else 0


def world() -> int:
    """How many ranks share the work (1 without torchrun)."""
    d = _dist()
    return d.get_world_size() if d else 1


def mine(number: int) -> bool:
    """Whether work item ``number`` (a chunk, a probe) runs on this rank."""
    return number % world() == rank()


def gather(parts: Iterable[tuple[int, Any]]) -> list[Any]:
    """Every rank's (number, item) pairs, merged and ordered by number: the items a single process
    would have made, in its order. Without torchrun, the items as given (ordered)."""
    parts = list(parts)
    d = _dist()
    if d is not None and d.get_world_size() > 1:
        every: list = [None] * d.get_world_size()
        d.all_gather_object(every, parts)
        parts = [p for r in every for p in r]
    return [item for _, item in sorted(parts, key=lambda p: p[0])]


def gather_frames(parts: Iterable[tuple[int, pd.DataFrame]]) -> pd.DataFrame:
    """``gather`` of per-chunk frames, concatenated (an empty frame when no rank made any)."""
    frames = gather(parts)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


__all__ = ["gather", "gather_frames", "mine", "rank", "world"]
