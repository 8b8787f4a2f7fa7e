"""Sparse fine-tuning tools: pattern selection, extraction from a full fine-tune, delta files.

Patterns are int32 flat indices (row·K + col), sorted and unique — what
``pyhappy.ops.sparse_delta_linear`` and ``pyhappy.nn.SparseDeltaLinear`` take.

* ``random_pattern``      uniform without replacement (seeded)
* ``topk_pattern``        largest |scores|: |W_finetuned − W_base| (lottery-ticket sparse
                          fine-tuning), accumulated gradient magnitude (``GradientScorer``), |W|
* ``structured_pattern``  whole rows / columns (S2FT-style slabs), picked by score norm or given
* ``extract_sparse_delta`` / ``extract_lora``: turn a fully fine-tuned weight into an adapter
  without data (top-k of the difference / truncated SVD of it)
* ``save_sparse_deltas`` / ``load_sparse_deltas``: a model's deltas with their patterns in one
  safetensors file (format written here: 8-byte header length, JSON header, raw little-endian data)
"""

from __future__ import annotations

import torch
from torch import nn

from ._patterns import pick_slabs, random_pattern, structured_pattern, topk_pattern  # noqa: F401  (public here)
from ._safetensors import FLOAT_DTYPES, atomic_write, read_safetensors, write_safetensors  # noqa: F401  (public here)
from ._transaction import Transaction
from .inject import _matcher
from .nn import SparseDeltaLinear
from .ops._checks import finite_number
from .ops.sparse_delta_linear import check_pattern


class GradientScorer:
    """Accumulates |∂L/∂W| of dense weights over a few warm-up steps, for ``topk_pattern``.

        scorer = GradientScorer(model, ["q_proj", "v_proj"])   # names as inject's target_modules
        for batch in warmup: loss_fn(model(batch)).backward()
        scores = scorer.scores            # {qualified name: [N, K] fp32}
        scorer.remove()

    The weights are made to require grad while scoring (their grads are consumed by the hook, so
    no [N, K] .grad stays allocated); remove() restores them.
    """

    def __init__(self, model: nn.Module, target_modules):
        match = _matcher(target_modules)
        self.scores, self._hooks, self._prev = {}, [], {}
        for name, mod in model.named_modules():
            if name and match(name) and isinstance(mod, nn.Linear):
                w = mod.weight
                self.scores[name] = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
                self._prev[name] = (w, w.requires_grad)
                w.requires_grad_(True)
                self._hooks.append(w.register_post_accumulate_grad_hook(self._hook(name)))
        if not self.scores:
            raise ValueError(f"GradientScorer: target_modules={target_modules!r} matched no nn.Linear")

    def _hook(self, name):
        def fn(p):
            self.scores[name].add_(p.grad.detach().float().abs())
            p.grad = None
        return fn

    def remove(self):
        for h in self._hooks:
            h.remove()
        for w, rg in self._prev.values():
            w.requires_grad_(rg)
        self._hooks = []


def extract_sparse_delta(w_ft: torch.Tensor, w_base: torch.Tensor, density: float | None = None, *,
                         nnz: int | None = None):
    """(values, indices): the ``nnz`` largest entries of w_ft − w_base, values in w_ft's dtype.
    Adding them at the pattern to w_base gives w_ft exactly there (and w_base elsewhere)."""
    if w_ft.shape != w_base.shape or w_ft.dim() != 2:
        raise ValueError(f"extract_sparse_delta: w_ft and w_base must be [N, K] of one shape, got "
                         f"{tuple(w_ft.shape)} and {tuple(w_base.shape)}")
    diff = w_ft.detach().double() - w_base.detach().double()
    idx = topk_pattern(diff, density, nnz=nnz)
    return diff.flatten()[idx.long()].to(w_ft.dtype), idx


def extract_lora(w_ft: torch.Tensor, w_base: torch.Tensor, r: int):
    """(lora_A [r, K], lora_B [N, r]) with B·A the best rank-r approximation of w_ft − w_base
    (truncated SVD, Eckart–Young), singular values split evenly: A = √S·Vᵀ, B = U·√S. Use with
    scaling 1 (LoRALinear alpha = r)."""
    if w_ft.shape != w_base.shape or w_ft.dim() != 2:
        raise ValueError(f"extract_lora: w_ft and w_base must be [N, K] of one shape, got {tuple(w_ft.shape)} "
                         f"and {tuple(w_base.shape)}")
    if not isinstance(r, int) or not (1 <= r <= min(w_ft.shape)):
        raise ValueError(f"extract_lora: r must be an int in [1, min(N, K) = {min(w_ft.shape)}], got {r!r}")
    diff = w_ft.detach().double() - w_base.detach().double()
    U, S, Vh = torch.linalg.svd(diff, full_matrices=False)
    sq = S[:r].sqrt()
    A = sq[:, None] * Vh[:r]
    B = U[:, :r] * sq[None, :]
    return A.to(w_ft.dtype), B.to(w_ft.dtype)


def _sparse_modules(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SparseDeltaLinear)]


def save_sparse_deltas(path, model: nn.Module, name: str = "default") -> int:
    """Save delta ``name`` of every SparseDeltaLinear in ``model`` (or ``model`` itself) to a
    safetensors file: ``<module>.values`` and ``<module>.indices`` (int32 flat row·K + col), with
    each module's [N, K] and the delta's scale in the metadata. Returns the number of deltas saved."""
    tensors, meta = {}, {"format": "pyhappy.sparse_delta", "delta": name}
    for mname, mod in _sparse_modules(model):
        if name not in mod.deltas:
            continue
        d = mod.deltas[name]
        key = mname or "_"
        tensors[f"{key}.values"] = d.values
        tensors[f"{key}.indices"] = d.indices
        meta[f"{key}.shape"] = f"{mod.out_features},{mod.in_features}"
        meta[f"{key}.scale"] = repr(float(d.scale))
    if not tensors:
        raise ValueError(f"save_sparse_deltas: no SparseDeltaLinear in the model has a delta named {name!r}")
    write_safetensors(path, tensors, meta)
    return len(tensors) // 2


def load_sparse_deltas(path, model: nn.Module, name: str | None = None, *, strict: bool = True) -> int:
    """Load a file written by ``save_sparse_deltas`` into ``model``'s SparseDeltaLinear modules as
    delta ``name`` (default: the saved name), replacing a delta of that name (pattern included).
    strict: every module in the file must exist in the model with the same [N, K].

    All or nothing: the whole file (header, dtypes, metadata, every pattern and size) is checked
    before any module changes, and the changes run inside a Transaction, so a failure leaves the
    model as it was."""
    who = "load_sparse_deltas"

    def expected(key):
        part = key.rsplit(".", 1)[-1]
        return (torch.int32,) if part == "indices" else FLOAT_DTYPES if part == "values" else None

    tensors, meta = read_safetensors(path, dtypes=expected)
    if meta.get("format") != "pyhappy.sparse_delta":
        raise ValueError(f"{who}: {path} is not a pyhappy sparse-delta file")
    name = name or meta.get("delta", "default")
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"{who}: name must be a non-empty str without '.', got {name!r}")
    groups = {}
    for k in tensors:
        key, _, part = k.rpartition(".")
        if not key or part not in ("values", "indices"):
            raise ValueError(f"{who}: {path}: tensor {k!r} is not '<module>.values' or '<module>.indices'")
        groups.setdefault(key, set()).add(part)
    mods = dict(_sparse_modules(model))
    plan = []
    for key in sorted(groups):
        for part in ("values", "indices"):
            if part not in groups[key]:
                raise ValueError(f"{who}: {path}: module {key!r} has no tensor {key + '.' + part!r}")
        raw = meta.get(f"{key}.shape")
        try:
            shape = tuple(int(s) for s in raw.split(","))
            if len(shape) != 2 or min(shape) < 1:
                raise ValueError
        except (AttributeError, ValueError):
            raise ValueError(f"{who}: {path}: metadata {key + '.shape'!r} must be 'N,K' (two positive ints), got "
                             f"{raw!r}") from None
        try:
            scale = finite_number(who, f"metadata {key + '.scale'!r} of {path}", float(meta.get(f"{key}.scale", "1.0")))
        except ValueError as e:
            if "finite" in str(e):
                raise
            raise ValueError(f"{who}: {path}: metadata {key + '.scale'!r} must be a number, got "
                             f"{meta.get(key + '.scale')!r}") from None
        mname = "" if key == "_" else key
        mod = mods.get(mname)
        if mod is None or (mod.out_features, mod.in_features) != shape:
            if strict:
                raise ValueError(f"{who}: {path} holds a delta for {key!r} {list(shape)} but the model has "
                                 f"{'no SparseDeltaLinear there' if mod is None else 'a different shape there'}")
            continue
        idx, vals = tensors[f"{key}.indices"], tensors[f"{key}.values"]
        check_pattern(idx, *shape, name=f"tensor {key + '.indices'!r}", who=f"{who}: {path}")
        if vals.shape != idx.shape:
            raise ValueError(f"{who}: {path}: tensor {key + '.values'!r} has {vals.numel()} entries, "
                             f"{key + '.indices'!r} {idx.numel()} (one value per index)")
        if name in mod.deltas and mod.deltas[name].merged:
            raise RuntimeError(f"{who}: delta {name!r} of {key!r} is merged; unmerge it before replacing it")
        plan.append((mod, idx, vals, scale))
    with Transaction(model):
        for mod, idx, vals, scale in plan:
            mod.add_delta(name, idx, values=vals, scale=scale, replace=True)
    return len(plan)
