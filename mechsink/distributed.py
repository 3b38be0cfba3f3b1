"""Data parallelism under ``torchrun``: which rank this process is, and per-rank results merged.

Analyses shard their data by chunk (``batching.batches(..., shard=True)``: chunk ``j`` runs on rank
``j % world()``) and merge what the ranks made with ``gather``/``gather_frames``, ordered by the
chunk number, so a run on any number of ranks gives exactly the numbers of a single process. Under
``torchrun`` without a process group, a CPU (gloo) group is started on first use. A model split over
several GPUs (``device_map="auto"``) takes its rank's share of the node's GPUs (``local_gpus``).

Failures: a sharded loop runs inside ``fail_together()``, so an error on one rank is raised on every
rank (the others raise ``RankFailed``; a MechsinkError stays one, with the same message) instead of leaving
them waiting in the next collective. An error outside such a block (a crash, a kill) ends that
process; ``torchrun`` then stops the other workers, and a rank blocked in a collective without
torchrun gives up after the process group's timeout (``MECHSINK_DIST_TIMEOUT`` seconds, default 1800).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Iterable, Iterator

import pandas as pd

from .errors import MechsinkError


def _dist():
    import torch.distributed as dist
    if not dist.is_available():
        return None
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1 and "MASTER_ADDR" in os.environ:
        dist.init_process_group("gloo", timeout=timedelta(seconds=float(os.environ.get("MECHSINK_DIST_TIMEOUT", 1800))))
    return dist if dist.is_initialized() else None


def rank() -> int:
    """This process's rank (0 without torchrun)."""
    d = _dist()
    return d.get_rank() if d else 0


def world() -> int:
    """How many ranks share the work (1 without torchrun)."""
    d = _dist()
    return d.get_world_size() if d else 1


def local_gpus(n_gpus: int) -> list[int]:
    """The GPUs of this node that this process may use: all of them without torchrun, else an equal,
    contiguous share per local rank (``LOCAL_RANK`` of ``LOCAL_WORLD_SIZE``), so that ranks that each
    spread a model over several GPUs do not all spread it over the same ones."""
    procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if procs <= 1:
        return list(range(n_gpus))
    if n_gpus < procs:
        raise MechsinkError(f"{procs} processes on this node share {n_gpus} GPU(s): a model spread over GPUs "
                            "(device_map='auto') needs at least one GPU per process; start fewer processes")
    per, local = n_gpus // procs, int(os.environ.get("LOCAL_RANK", "0"))
    return list(range(local * per, (local + 1) * per))


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


def barrier() -> None:
    """Wait until every rank is here (nothing without torchrun)."""
    d = _dist()
    if d is not None and d.get_world_size() > 1:
        d.barrier()


class RankFailed(RuntimeError):
    """Another rank failed inside a ``fail_together`` block; the message is its error's."""


class RankFailedError(RankFailed, MechsinkError):
    """Another rank failed with a MechsinkError (so the same handling applies on every rank)."""


@contextmanager
def fail_together() -> Iterator[None]:
    """Run a block on every rank and agree on its outcome: when it raises on any rank, it raises on
    every rank (the failing rank its own error; the others ``RankFailed`` naming the lowest failing
    rank, or ``RankFailedError``, a MechsinkError with the same one-line message, when the error was
    one, so that a report records the same "not run" line whichever rank met it). One small
    collective after the block, so the block itself must hold none (gather after it); nothing
    without torchrun."""
    d = _dist()
    if d is None or d.get_world_size() <= 1:
        yield
        return
    failure = None
    try:
        yield
    except Exception as e:                  # interrupts and exits are not caught: torchrun stops the rest
        failure = e
    said = None if failure is None else (isinstance(failure, MechsinkError), type(failure).__name__,
                                         str(failure).strip().splitlines()[0] if str(failure).strip() else "")
    every: list = [None] * d.get_world_size()
    d.all_gather_object(every, said)
    if failure is not None:
        raise failure
    bad = [(r, s) for r, s in enumerate(every) if s is not None]
    if bad:
        r, (user, kind, text) = bad[0]
        e = RankFailedError(text) if user else RankFailed(f"rank {r} failed with {kind}: {text}")
        e.rank = r
        raise e


__all__ = ["RankFailed", "RankFailedError", "barrier", "fail_together", "gather", "gather_frames", "mine", "rank",
           "world"]
