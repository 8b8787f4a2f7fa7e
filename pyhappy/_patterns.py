"""Sparsity patterns for sparse fine-tuning: which entries of an [N, K] weight a delta trains.

Patterns are int32 flat indices (row·K + col), sorted and unique, as
``pyhappy.ops.sparse_delta_linear`` and ``pyhappy.nn.SparseDeltaLinear`` take them. The public names
are pyhappy.sparse's (see there); this module depends on torch only, so the modules that build
patterns can import it without importing the model-level tools of pyhappy.sparse.
"""

from __future__ import annotations

import torch

_INT32_MAX = 2**31 - 1


def _nnz(N: int, K: int, density=None, nnz=None, who="pattern") -> int:
    if (density is None) == (nnz is None):
        raise ValueError(f"{who}: give exactly one of density and nnz")
    if nnz is None:
        if not isinstance(density, (int, float)) or not (0.0 < float(density) <= 1.0):
            raise ValueError(f"{who}: density must be in (0, 1], got {density!r}")
        nnz = max(1, int(round(float(density) * N * K)))
    if not isinstance(nnz, int) or not (1 <= nnz <= N * K):
        raise ValueError(f"{who}: nnz must be an int in [1, N·K = {N * K}], got {nnz!r}")
    if N * K > _INT32_MAX:
        raise ValueError(f"{who}: an [{N}, {K}] weight has more than 2^31 - 1 entries (int32 flat indices)")
    return nnz


def random_pattern(N: int, K: int, density: float | None = None, *, nnz: int | None = None, seed: int | None = None,
                   device=None) -> torch.Tensor:
    """``nnz`` (or density·N·K) distinct positions drawn uniformly; ``seed`` makes it reproducible."""
    n = _nnz(N, K, density, nnz, "random_pattern")
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    idx = torch.randperm(N * K, generator=g)[:n]
    return idx.sort().values.to(device=device, dtype=torch.int32)


def topk_pattern(scores: torch.Tensor, density: float | None = None, *, nnz: int | None = None) -> torch.Tensor:
    """Positions of the ``nnz`` largest |scores| of an [N, K] score matrix (ties: lowest index)."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise ValueError(f"topk_pattern: scores must be a 2-D [N, K] tensor, got "
                         f"{tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__}")
    N, K = scores.shape
    n = _nnz(N, K, density, nnz, "topk_pattern")
    s = scores.detach().float().abs().flatten()
    if not bool(torch.isfinite(s).all()):
        raise ValueError("topk_pattern: scores hold NaN or inf")
    idx = torch.topk(s, n, sorted=False).indices
    return idx.sort().values.to(torch.int32)


def structured_pattern(N: int, K: int, rows=None, cols=None, *, device=None) -> torch.Tensor:
    """Every position in the given whole rows and/or columns (S2FT-style slabs)."""
    mask = torch.zeros(N, K, dtype=torch.bool)
    for name, sel, size in (("rows", rows, N), ("cols", cols, K)):
        if sel is None:
            continue
        sel = torch.as_tensor(sel, dtype=torch.long).flatten()
        if sel.numel() and (int(sel.min()) < 0 or int(sel.max()) >= size):
            raise ValueError(f"structured_pattern: {name} must lie in [0, {size}), got [{int(sel.min())}, "
                             f"{int(sel.max())}]")
        if name == "rows":
            mask[sel] = True
        else:
            mask[:, sel] = True
    if not bool(mask.any()):
        raise ValueError("structured_pattern: give at least one row or column")
    return mask.flatten().nonzero().flatten().to(device=device, dtype=torch.int32)


def pick_slabs(scores: torch.Tensor, density: float, axis: str) -> torch.Tensor:
    """The rows (axis="rows") or columns ("cols") with the largest score norms, density of them."""
    if axis not in ("rows", "cols"):
        raise ValueError(f"pick_slabs: axis must be 'rows' or 'cols', got {axis!r}")
    norms = scores.detach().float().norm(dim=1 if axis == "rows" else 0)
    k = max(1, int(round(float(density) * norms.numel())))
    return torch.topk(norms, k).indices.sort().values
