"""All-or-nothing changes to a module tree: validate first, apply second, roll back on surprise.

Every loader in pyhappy (state dicts, delta files, quantized checkpoints, adapter injection)
follows one discipline:

1. **Validate** the whole input before anything is changed: every key, shape, dtype, pattern and
   setting is checked and every new module is built off to the side. Errors raised here name
   what is wrong and leave the model untouched, because nothing was touched yet.
2. **Apply** what was validated: swap modules in, assign new tensors, copy into existing ones.
   Validation has made this phase one that should not fail.
3. If the apply phase fails anyway (an out-of-memory error, a bug, a failing hook), the
   :class:`Transaction` around it restores the tree as it was: every module's parameters,
   buffers, sub-modules (placements), plain attributes (flags, settings, caches, one level of
   dict/list/set contents) and every parameter's ``requires_grad``.

What a snapshot holds is references, not copies of tensor data: taking one costs a few dict
copies per module, whatever the size of the weights. Data written *in place* into an existing
tensor is therefore not undone by a rollback unless that tensor was registered first with
:meth:`Transaction.protect` (which clones it: use it for small tensors only). Loaders keep
in-place writes after all validation, so that they cannot fail halfway.

Use::

    from pyhappy._transaction import Transaction, check_state_dict

    with Transaction(model):
        plan = validate(model, inputs)     # raises before any change
        apply(model, plan)                 # any exception here rolls the model back

``load_state_dict(module, state_dict)`` is ``Module.load_state_dict`` made all-or-nothing the
same way: ``check_state_dict`` first (shapes, keys, and each pyhappy module's own checks through
its ``_validate_state_dict`` hook), the load second, inside a Transaction.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

_MODULE_DICTS = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")
_CONTAINERS = (dict, list, set)


def _copy_container(v):
    return v.copy()


def _restore_container(obj, saved):
    """Put ``saved``'s contents back into ``obj`` in place (so other references to it see them)."""
    if isinstance(obj, dict):
        obj.clear()
        obj.update(saved)
    elif isinstance(obj, list):
        obj[:] = saved
    else:
        obj.clear()
        obj.update(saved)


class _ModuleSnapshot:
    __slots__ = ("module", "dicts", "attrs", "containers")

    def __init__(self, module: nn.Module):
        d = module.__dict__
        self.module = module
        self.dicts = {k: (d[k], d[k].copy()) for k in _MODULE_DICTS if k in d}
        self.attrs = {k: v for k, v in d.items() if k not in _MODULE_DICTS}
        self.containers = {k: (v, _copy_container(v)) for k, v in self.attrs.items()
                           if type(v) in _CONTAINERS}

    def restore(self):
        d = self.module.__dict__
        for k, (obj, saved) in self.dicts.items():
            _restore_container(obj, saved)
            d[k] = obj
        for k in [k for k in d if k not in _MODULE_DICTS and k not in self.attrs]:
            del d[k]
        for k, v in self.attrs.items():
            d[k] = v
        for obj, saved in self.containers.values():
            _restore_container(obj, saved)


class Transaction:
    """Snapshot of one or more module trees, restored if the ``with`` block raises.

    ``Transaction(*modules)``: every module reachable from the given ones (sub-modules included)
    is recorded when the block is entered. On an exception inside the block the snapshot is
    restored and the exception propagates; on success nothing is done. See the module docstring
    for what is and is not restored.
    """

    def __init__(self, *modules: nn.Module):
        for m in modules:
            if not isinstance(m, nn.Module):
                raise TypeError(f"Transaction: expected nn.Module objects, got {type(m).__name__}")
        self._roots = modules
        self._snaps: list[_ModuleSnapshot] = []
        self._grads: list[tuple[torch.Tensor, bool]] = []
        self._protected: list[tuple[torch.Tensor, torch.Tensor]] = []

    def snapshot(self) -> "Transaction":
        """Record the trees now (``__enter__`` does this)."""
        seen, snaps, grads = set(), [], []
        for root in self._roots:
            for m in root.modules():
                if id(m) in seen:
                    continue
                seen.add(id(m))
                snaps.append(_ModuleSnapshot(m))
                grads.extend((p, p.requires_grad) for p in m._parameters.values() if p is not None)
        self._snaps, self._grads, self._protected = snaps, grads, []
        return self

    def protect(self, *tensors: torch.Tensor) -> None:
        """Clone ``tensors`` now so that a rollback also undoes in-place writes into them."""
        for t in tensors:
            if t is not None:
                self._protected.append((t, t.detach().clone()))

    def rollback(self) -> None:
        """Restore the recorded state (placements, tensors' identities, attributes, flags)."""
        for s in self._snaps:
            s.restore()
        with torch.no_grad():
            for t, saved in reversed(self._protected):
                t.copy_(saved)
        for p, rg in self._grads:
            p.requires_grad_(rg)

    def __enter__(self) -> "Transaction":
        return self.snapshot()

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self.rollback()
        self._snaps, self._grads, self._protected = [], [], []
        return False


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the qualified ``name`` in ``model`` (its parent must exist)."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


# ---- state dicts ------------------------------------------------------------------------------------


def check_state_dict(module: nn.Module, state_dict, *, strict: bool = True, who: str = "load_state_dict"):
    """Raise a ValueError / KeyError naming the key at fault unless ``module.load_state_dict(
    state_dict, strict)`` would load without error; change nothing. Returns (missing, unexpected)
    key lists (what a strict=False load reports).

    Plain parameters and buffers are checked for shape (as load_state_dict does, ``check_local``).
    A module with a ``_validate_state_dict(state_dict, prefix, who)`` method checks its own keys
    with it instead; the method returns (claimed, required): the full keys it consumes and those
    it needs (reported missing when absent). Sub-modules are walked the same way, except those
    named in the module's ``_STATE_DICT_OWNS`` (its hook checks their keys: e.g. children that a
    load creates).
    """
    claimed, missing = set(), []
    keys = set(state_dict)

    def walk(m: nn.Module, prefix: str):
        hook = getattr(m, "_validate_state_dict", None)
        got, required = hook(state_dict, prefix, who) if hook is not None else \
            check_local(m, state_dict, prefix, who)
        claimed.update(got)
        missing.extend(k for k in required if k not in keys)
        owned = getattr(m, "_STATE_DICT_OWNS", ())
        for n, c in m._modules.items():
            if c is not None and n not in owned:
                walk(c, prefix + n + ".")

    walk(module, "")
    unexpected = sorted(keys - claimed)
    if strict and (missing or unexpected):
        raise KeyError(f"{who}: the state dict does not match the model: missing keys {missing[:8]}, unexpected "
                       f"keys {unexpected[:8]}")
    return missing, unexpected


def check_local(m: nn.Module, state_dict, prefix: str, who: str, *, skip=()):
    """The plain checks of ``m``'s own parameters, persistent buffers and extra state (not its
    sub-modules, nor the names in ``skip``): present keys must be tensors of the same shape.
    Returns (claimed, required) full keys, as a ``_validate_state_dict`` hook does."""
    claimed, required = set(), []
    local = [(n, t) for n, t in m._parameters.items() if t is not None and n not in skip]
    local += [(n, t) for n, t in m._buffers.items()
              if t is not None and n not in m._non_persistent_buffers_set and n not in skip]
    for n, t in local:
        key = prefix + n
        required.append(key)
        if key not in state_dict:
            continue
        v = state_dict[key]
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{who}: {key} must be a tensor, got {type(v).__name__}")
        if tuple(v.shape) != tuple(t.shape):
            raise ValueError(f"{who}: {key} has shape {tuple(v.shape)}, the model's is {tuple(t.shape)}")
        claimed.add(key)
    if type(m).set_extra_state is not nn.Module.set_extra_state:
        key = prefix + "_extra_state"
        required.append(key)
        if key in state_dict:
            claimed.add(key)
    return claimed, required


def load_state_dict(module: nn.Module, state_dict, strict: bool = True, assign: bool = False, *,
                    who: str = "load_state_dict"):
    """``module.load_state_dict(state_dict, strict, assign)``, all or nothing: the whole state dict
    is checked first (``check_state_dict``) and the load runs inside a Transaction."""
    with Transaction(module):
        check_state_dict(module, state_dict, strict=strict, who=who)
        return nn.Module.load_state_dict(module, state_dict, strict=strict, assign=assign)


class TransactionalLoad:
    """Mixin for nn.Module subclasses: ``load_state_dict`` checks everything first and changes
    nothing on failure (see ``load_state_dict`` above). The class names itself in errors."""

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return load_state_dict(self, state_dict, strict, assign, who=f"{type(self).__name__}.load_state_dict")


def check_merged_state(m: nn.Module, state_dict, prefix: str, who: str):
    """A ``_validate_state_dict`` hook for modules whose extra state is ``{"merged": bool}`` (and,
    for a merged DoRA layer, ``"dora_merge_norm"``: a tensor of the layer's out_features): their own
    tensors checked as ``check_local`` does and the extra state checked before a load sets it."""
    claimed, required = check_local(m, state_dict, prefix, who)
    key = prefix + "_extra_state"
    if key in state_dict:
        st = state_dict[key]
        if not isinstance(st, dict) or not isinstance(st.get("merged"), bool) or \
                not set(st) <= {"merged", "dora_merge_norm"}:
            raise ValueError(f"{who}: {key} must be a dict with a bool 'merged' (and a merged DoRA layer's "
                             f"'dora_merge_norm'), got {st!r}")
        norm = st.get("dora_merge_norm")
        if norm is not None and (not isinstance(norm, torch.Tensor) or tuple(norm.shape) != (m.out_features,)):
            raise ValueError(f"{who}: {key}['dora_merge_norm'] must be a tensor of {m.out_features} entries, got "
                             f"{tuple(norm.shape) if isinstance(norm, torch.Tensor) else type(norm).__name__}")
    return claimed, required


def restores_on_failure(from_linear):
    """For a module's ``from_linear(cls, linear, ...)`` classmethod: the call runs in a Transaction
    over the caller's ``linear``, so where it raises the layer is as it was (the constructors share
    its weight and bias and freeze them before their later checks run)."""

    @functools.wraps(from_linear)
    def wrapper(cls, linear, *args, **kwargs):
        if not isinstance(linear, nn.Module):  # (from_linear's own check names it)
            return from_linear(cls, linear, *args, **kwargs)
        with Transaction(linear):
            return from_linear(cls, linear, *args, **kwargs)

    return wrapper
