"""Results derived from a tensor, kept while that tensor is alive and unchanged.

pyhappy.compiler inserts ops (sparse_pattern, bnb_nf4_pack) that derive a kernel layout from a
module's buffer or parameter; the compiled graph calls them on every step with the same tensor,
and the derivation (a sort, a repack) need not repeat. An entry is keyed on the tensors' identity,
holds them (so their memory cannot be reused by another tensor) and records their in-place version
counters (an in-place change misses). Results are returned as clones: a custom op's outputs must not
alias anything the caller could mutate.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch


class ByTensor:
    """A bounded cache of ``build()`` results keyed on ``tensors`` (identity + version) and ``extra``."""

    def __init__(self, max_entries: int = 256):
        self.max_entries = max_entries
        self._entries: dict = {}

    def get(self, tensors: Sequence[torch.Tensor], extra: tuple, build: Callable[[], tuple]) -> tuple:
        key = (tuple(id(t) for t in tensors), extra)
        versions = tuple(t._version for t in tensors)
        hit = self._entries.get(key)
        if hit is None or any(a is not b for a, b in zip(hit[0], tensors)) or hit[1] != versions:
            if len(self._entries) >= self.max_entries:
                self._entries.pop(next(iter(self._entries)))
            hit = (tuple(tensors), versions, tuple(build()))
            self._entries[key] = hit
        return tuple(t.clone() for t in hit[2])
