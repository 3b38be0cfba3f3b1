"""Which samples a writer holds: sample indices as a bitmap, a bit per index."""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

from mechsink.cache.layout import StoreError


class SampleSet:
    """Sample indices as a bitmap: one bit per index, where a Python set costs ~70 bytes per
    sample (a writer holds every sample it was given; 10^6 images would be 70 MB). Set-like:
    ``in``, ``len``, sorted iteration, ``add``/``update``, ``|``, and equality with a set."""

    def __init__(self, items: Iterable[int] = ()) -> None:
        self._bits = np.zeros(0, dtype=bool)
        self._n = 0
        self.update(items)

    def update(self, items: Iterable[int]) -> None:
        idx = np.fromiter((int(i) for i in items), dtype=np.int64) if not isinstance(items, np.ndarray) \
            else items.astype(np.int64, copy=False)
        if not len(idx):
            return
        if idx.min() < 0:
            raise StoreError(f"sample_idx must be >= 0, got {int(idx.min())}")
        idx = np.unique(idx)
        top = int(idx[-1]) + 1
        if top > len(self._bits):
            grown = np.zeros(max(top, 2 * len(self._bits)), dtype=bool)
            grown[: len(self._bits)] = self._bits
            self._bits = grown
        self._n += int((~self._bits[idx]).sum())
        self._bits[idx] = True

    def contains(self, idx: np.ndarray) -> np.ndarray:
        """Membership of every index of an int array, as a bool array."""
        idx = np.asarray(idx, dtype=np.int64)
        out = np.zeros(len(idx), dtype=bool)
        ok = (idx >= 0) & (idx < len(self._bits))
        out[ok] = self._bits[idx[ok]]
        return out

    def add(self, i: int) -> None:
        self.update((i,))

    def __contains__(self, i: object) -> bool:
        try:
            k = int(i)                           # type: ignore[call-overload]
        except (TypeError, ValueError):
            return False
        return 0 <= k < len(self._bits) and bool(self._bits[k])

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[int]:
        return iter(np.flatnonzero(self._bits).tolist())

    def __or__(self, other: Iterable[int]) -> "SampleSet":
        out = SampleSet()
        out._bits, out._n = self._bits.copy(), self._n
        out.update(other._indices() if isinstance(other, SampleSet) else other)
        return out

    def _indices(self) -> np.ndarray:
        return np.flatnonzero(self._bits)

    def __rsub__(self, other: Iterable[int]) -> set[int]:
        return {i for i in other if i not in self}

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SampleSet):
            return np.array_equal(self._indices(), other._indices())
        if isinstance(other, (set, frozenset)):
            return len(other) == self._n and all(i in self for i in other)
        return NotImplemented

    __hash__ = None                              # type: ignore[assignment] - mutable

    def __repr__(self) -> str:
        return f"SampleSet({len(self)} samples)"
