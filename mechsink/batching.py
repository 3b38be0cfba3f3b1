"""The one loop from data to prepared batches.

``batches(model, data)`` takes a mechsink Dataset, a list of Samples, a Batch or a list of
Batches and yields ``Chunk(samples, batch, start)``: the samples of the batch (None for Batches
given as such), the prepared Batch and the global index of its first sample (what seeds per-sample
random draws, so results never depend on the batch size). One policy for bad input everywhere:
an image that fails to decode *or* to process (extreme aspect ratio, a processor error) is skipped
and listed in ``errors`` (a mechsink.data.ErrorLog) with the reason, and the run goes on; a prompt
with the wrong number of image placeholders is a one-line error naming the sample.
"""
from __future__ import annotations

import random as _random
from typing import Iterator, NamedTuple

from tqdm.auto import tqdm

from .data import ErrorLog, ImageError, Sample, iter_images
from .errors import MechsinkError, PromptError
from .models.base import Batch


class BatchingError(MechsinkError, ValueError):
    """Data that cannot be batched (no answers where they are needed, nothing readable)."""


# What processors raise for an image they cannot take (LLaVA-NeXT's IndexError at ~10:1, Qwen2-VL's
# ValueError at >= 200:1); anything else is a bug and propagates.
_REFUSED = (ValueError, IndexError, RuntimeError)


class Chunk(NamedTuple):
    samples: list[Sample] | None
    batch: Batch
    start: int
    number: int = 0                         # the chunk's place in the whole run (0, 1, ...)
    index: tuple[int, ...] | None = None    # global indices when not start, start + 1, ... (shard)

    @property
    def ids(self) -> list[str]:
        """Sample ids (dataset ids, or the global indices for Batches given as such)."""
        if self.samples is None:
            return [str(self.start + i) for i in range(self.batch.size)]
        return [s.id for s in self.samples]

    @property
    def indices(self) -> list[int]:
        if self.index is not None:
            return list(self.index)
        return list(range(self.start, self.start + self.batch.size))


def _is_batches(data) -> bool:
    if isinstance(data, Batch):
        return True
    return isinstance(data, (list, tuple)) and len(data) > 0 and all(isinstance(b, Batch) for b in data)


def batches(model, data, batch_size: int = 8, *, answers: bool | str = "auto", prompt: str | None = None,
            errors: ErrorLog | None = None, progress: bool | str = False,
            shuffle: _random.Random | None = None, shard: bool = False, min_batch: int = 1) -> Iterator[Chunk]:
    """Prepared batches of ``data`` (see the module docstring).

    answers: True appends every sample's gold answer (role "answer"; a sample without one is an
    error), False never, "auto" when every sample of the chunk has one. prompt: replaces every
    sample's prompt (None keeps the dataset's; the model's neutral question where a sample has
    none). shuffle: a random.Random that draws the samples in random order. shard: under torchrun
    this rank yields only its chunks (``distributed.mine(chunk.number)``); every rank reads every
    image, so chunks and global indices are those of a single process (a sample the processor
    refuses keeps its index, so indices may skip it); the progress bar is then rank 0's. min_batch: a last group smaller than this
    joins the one before (analyses that pair images within a batch need two).
    """
    from .distributed import mine, rank
    if batch_size < 1:
        raise BatchingError(f"batch_size must be at least 1, got {batch_size}")
    if _is_batches(data):
        start = 0
        for j, b in enumerate([data] if isinstance(data, Batch) else data):
            if not shard or mine(j):
                yield Chunk(None, b, start, j)
            start += b.size
        return
    samples = list(data)
    if answers is True:
        missing = [s.id for s in samples if s.answer is None]
        if missing:
            raise BatchingError(f"this analysis needs the gold answer of every sample; sample {missing[0]!r}"
                                f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''} has none")
    if shuffle is not None:
        shuffle.shuffle(samples)
    errors = errors if errors is not None else ErrorLog()
    desc = progress if isinstance(progress, str) else getattr(model, "name", "model")
    bar = tqdm(total=len(samples), desc=desc, unit="img", disable=not progress or (shard and rank() != 0), leave=False)
    start, number = 0, 0
    try:
        for buf in _groups(iter_images(samples, errors=errors), batch_size, min_batch):
            chunk = _sharded(model, buf, answers, prompt, errors, start, number, shard)
            bar.update(len(buf))
            start += len(buf) if shard else (chunk.batch.size if chunk is not None else 0)
            number += 1
            if chunk is not None:
                yield chunk
    finally:
        bar.close()


def _groups(pairs, size: int, min_batch: int):
    """Lists of ``size`` (sample, image) pairs; a short last list joins the previous one when it
    holds fewer than ``min_batch``."""
    held = None
    buf: list = []
    for pair in pairs:
        buf.append(pair)
        if len(buf) == size:
            if held is not None:
                yield held
            held, buf = buf, []
    if buf and held is not None and len(buf) < min_batch:
        held, buf = held + buf, []
    if held is not None:
        yield held
    if buf:
        yield buf


def _sharded(model, buf: list, answers, prompt, errors: ErrorLog, start: int, number: int, shard: bool) -> Chunk | None:
    """Chunk ``number`` (None when it is another rank's or nothing in it is readable)."""
    from .distributed import mine
    if shard and not mine(number):
        return None
    chunk = _prepare(model, buf, answers, prompt, errors, start)
    if chunk is None:
        return None
    kept = {id(s) for s in chunk.samples}
    index = tuple(start + i for i, (s, _) in enumerate(buf) if id(s) in kept) if shard else None
    return chunk._replace(number=number, index=index)


def prepare(model, pairs: list, *, answers: bool | str = "auto", prompt: str | None = None,
            errors: ErrorLog | None = None, start: int = 0) -> Chunk | None:
    """One Batch of (sample, image) pairs already read, under the skip-and-list policy: a sample
    the processor refuses is listed in ``errors`` and left out (None when none is left)."""
    return _prepare(model, pairs, answers, prompt, errors if errors is not None else ErrorLog(), start)


def _prepare(model, buf: list, answers, prompt: str | None, errors: ErrorLog, start: int) -> Chunk | None:
    """One Batch of the readable samples; a sample the processor cannot take is logged and left
    out (found by preparing the samples one at a time only when the batch fails)."""
    try:
        return Chunk([s for s, _ in buf], _prepare_batch(model, buf, answers, prompt), start)
    except PromptError as e:
        raise _named(e, buf) from None
    except _REFUSED:                        # find the sample(s) the processor refuses
        pass
    ok = []
    for s, im in buf:
        try:
            _prepare_batch(model, [(s, im)], answers, prompt)
            ok.append((s, im))
        except PromptError as e:
            raise _named(e, [(s, im)]) from None
        except _REFUSED as e:               # processor errors: aspect ratio, size, ...
            reason = f"the processor of {getattr(model, 'name', 'the model')} refused the image: {_first_line(e)}"
            errors.add(s.id, s.image_path, ImageError(reason, kind="processing"))
    if not ok:
        return None
    return Chunk([s for s, _ in ok], _prepare_batch(model, ok, answers, prompt), start)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def _named(e: PromptError, buf: list) -> PromptError:
    if len(buf) == 1:
        return PromptError(f"sample {buf[0][0].id!r}: {e}")
    return e


def _prepare_batch(model, buf: list, answers, prompt: str | None) -> Batch:
    samples = [s for s, _ in buf]
    gold = [s.answer for s in samples]
    use = answers is True or (answers == "auto" and all(a is not None for a in gold))
    prompts = [prompt if prompt is not None else s.prompt for s in samples]
    return model.prepare([im for _, im in buf], prompts, gold if use else None)


def first_batch(model, data, batch_size: int = 8, **kw) -> Batch:
    """The first prepared batch of ``data`` (a one-line error when nothing is readable)."""
    for chunk in batches(model, data, batch_size, **kw):
        return chunk.batch
    raise BatchingError("no readable images in the data")


__all__ = ["Batch", "BatchingError", "Chunk", "batches", "first_batch", "prepare"]
