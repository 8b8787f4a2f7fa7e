"""VeRALinear / PVeRALinear: drop-in nn.Linear replacements running pyhappy::vera_linear /
pyhappy::pvera_linear, with the frozen random projections shared by every layer of a model."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._transaction import TransactionalLoad, check_merged_state, restores_on_failure
from ..ops.vera_linear import pvera_linear, vera_linear


def _kaiming_init(shape, generator: torch.Generator) -> torch.Tensor:
    """PEFT's VeRA projection init (peft/tuners/vera/model.py ``_kaiming_init``): Kaiming-uniform with
    gain √2 on fan_in = shape[1], drawn from ``generator`` (torch.nn.init.kaiming_uniform_'s default,
    which PVeRA calls, draws the same numbers)."""
    t = torch.empty(shape)
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    with torch.no_grad():
        return t.uniform_(-bound, bound, generator=generator)


class VeRAProjections(nn.Module):
    """The frozen random projections A [rows, in_features] and B [out_features, r] that every
    VeRA (kind="vera") or PVeRA (kind="pvera", rows = 2r) layer of a model shares, sized to the largest
    layer and sliced per layer (A[:rows, :in], B[:out, :r]) as PEFT does.

    Drawn on the CPU from ``torch.Generator().manual_seed(projection_prng_key)``, A first, then B,
    with PEFT's initialisation, so for the same key and sizes they equal PEFT's vera_A / vera_B
    (pvera_A / pvera_B) bit for bit. Buffers named as PEFT's (vera_A, vera_B or pvera_A, pvera_B),
    float32 (cast to a layer's dtype when it runs); persistent (in the state dict) iff
    ``save_projection``: otherwise the key regenerates them.
    """

    def __init__(self, r: int, in_features: int, out_features: int, projection_prng_key: int = 0,
                 save_projection: bool = True, kind: str = "vera"):
        super().__init__()
        if kind not in ("vera", "pvera"):
            raise ValueError(f"VeRAProjections: kind must be 'vera' or 'pvera', got {kind!r}")
        for name, v in (("r", r), ("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"VeRAProjections: {name} must be a positive int, got {v!r}")
        if not isinstance(projection_prng_key, int) or isinstance(projection_prng_key, bool):
            raise TypeError(f"VeRAProjections: projection_prng_key must be an int, got {projection_prng_key!r}")
        self.kind, self.r, self.projection_prng_key = kind, r, projection_prng_key
        self.save_projection = bool(save_projection)
        g = torch.Generator(device="cpu").manual_seed(projection_prng_key)
        rows = 2 * r if kind == "pvera" else r
        A = _kaiming_init((rows, in_features), g)
        B = _kaiming_init((out_features, r), g)
        self.register_buffer(f"{kind}_A", A, persistent=self.save_projection)
        self.register_buffer(f"{kind}_B", B, persistent=self.save_projection)

    @classmethod
    def from_tensors(cls, A: torch.Tensor, B: torch.Tensor, projection_prng_key: int = 0,
                     save_projection: bool = True, kind: str = "vera") -> "VeRAProjections":
        """Projections holding the given A [rows, in] and B [out, r] (shared, not copied), e.g. the ones
        a PEFT model or checkpoint holds; rows = r (VeRA) or 2r (PVeRA). ``projection_prng_key`` is
        recorded as the key they came from (PEFT's config field; it is not used to redraw them)."""
        if kind not in ("vera", "pvera"):
            raise ValueError(f"VeRAProjections.from_tensors: kind must be 'vera' or 'pvera', got {kind!r}")
        for name, t in (("A", A), ("B", B)):
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
                raise TypeError(f"VeRAProjections.from_tensors: {name} must be a 2-D float tensor, got "
                                f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        r = B.shape[1]
        if A.shape[0] != (2 * r if kind == "pvera" else r):
            raise ValueError(f"VeRAProjections.from_tensors: A has {A.shape[0]} rows, kind {kind!r} with B's r={r} "
                             f"needs {2 * r if kind == 'pvera' else r}")
        if not isinstance(projection_prng_key, int) or isinstance(projection_prng_key, bool):
            raise TypeError(f"VeRAProjections.from_tensors: projection_prng_key must be an int, got "
                            f"{projection_prng_key!r}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.kind, self.r, self.projection_prng_key = kind, r, projection_prng_key
        self.save_projection = bool(save_projection)
        self.register_buffer(f"{kind}_A", A, persistent=self.save_projection)
        self.register_buffer(f"{kind}_B", B, persistent=self.save_projection)
        return self

    @property
    def A(self) -> torch.Tensor:
        return getattr(self, f"{self.kind}_A")

    @property
    def B(self) -> torch.Tensor:
        return getattr(self, f"{self.kind}_B")

    def check_fits(self, who: str, r: int, in_features: int, out_features: int, kind: str):
        """Raise ValueError (naming ``projections``) unless a layer of this size and kind can slice these."""
        rows = 2 * r if kind == "pvera" else r
        if kind != self.kind:
            raise ValueError(f"{who}: projections are for kind {self.kind!r}, the layer needs {kind!r}")
        if self.A.shape[0] < rows or self.B.shape[1] < r or self.A.shape[1] < in_features or \
                self.B.shape[0] < out_features:
            raise ValueError(f"{who}: projections (A {tuple(self.A.shape)}, B {tuple(self.B.shape)}) are too small "
                             f"for r={r}, in_features={in_features}, out_features={out_features}")

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, A={tuple(self.A.shape)}, B={tuple(self.B.shape)}, "
                f"projection_prng_key={self.projection_prng_key}, save_projection={self.save_projection}")


class _VeRABase(TransactionalLoad, nn.Module):
    """What VeRALinear and PVeRALinear share: the base layer, the projections, merge / unmerge / unload."""

    KIND = "vera"

    def __init__(self, in_features: int, out_features: int, r: int = 256, dropout: float = 0.0,
                 d_initial: float = 0.1, bias: bool = True, projections: VeRAProjections | None = None,
                 projection_prng_key: int = 0, save_projection: bool = True, init_weights: bool = True,
                 device=None, dtype=None, **kw):
        super().__init__()
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup(base, r, dropout, d_initial, projections, projection_prng_key, save_projection, init_weights,
                    **kw)

    @classmethod
    @restores_on_failure
    def from_linear(cls, linear: nn.Linear, r: int = 256, dropout: float = 0.0, d_initial: float = 0.1,
                    projections: VeRAProjections | None = None, projection_prng_key: int = 0,
                    save_projection: bool = True, init_weights: bool = True, **kw):
        """Wrap an existing nn.Linear: its weight and bias are shared (not copied) and frozen.
        projections: the model's shared VeRAProjections (pyhappy.inject passes one); None draws a
        new one of this layer's size from ``projection_prng_key``."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{cls.__name__}.from_linear: linear must be an nn.Linear, got {type(linear).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(linear, r, dropout, d_initial, projections, projection_prng_key, save_projection, init_weights,
                    **kw)
        return self

    def _setup(self, base, r, dropout, d_initial, projections, key, save_projection, init_weights, **kw):
        name, kind = type(self).__name__, self.KIND
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"{name}: r must be a positive int, got {r!r}")
        if not (0.0 <= float(dropout) < 1.0):
            raise ValueError(f"{name}: dropout must be in [0, 1), got {dropout!r}")
        if not math.isfinite(float(d_initial)):
            raise ValueError(f"{name}: d_initial must be a finite number, got {d_initial!r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        if projections is None:
            projections = VeRAProjections(r, self.in_features, self.out_features, key, save_projection, kind)
        elif not isinstance(projections, VeRAProjections):
            raise TypeError(f"{name}: projections must be a VeRAProjections, got {type(projections).__name__}")
        projections.check_fits(name, r, self.in_features, self.out_features, kind)
        self._setup_extra(**kw)
        self.r, self.d_initial, self.dropout = r, float(d_initial), float(dropout)
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.projections = projections
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        rows = 2 * r if kind == "pvera" else r
        setattr(self, f"{kind}_lambda_b", nn.Parameter(torch.ones(self.out_features, **kw)))
        setattr(self, f"{kind}_lambda_d", nn.Parameter(torch.randn(rows, **kw)))
        self.merged = False
        if init_weights:
            self.reset_parameters()

    def _setup_extra(self, **kw):
        """Settings of one kind only (PVeRA's sample_at_inference): none for VeRA."""
        if kw:
            raise TypeError(f"{type(self).__name__}: unexpected argument(s) {sorted(kw)} (sample_at_inference is "
                            "PVeRALinear's)")

    @torch.no_grad()
    def reset_parameters(self):
        """PEFT's initialisation (init_weights=True): λ_b = 0, λ_d = d_initial, so a fresh adapter
        leaves the base output unchanged."""
        self.lambda_b.zero_()
        self.lambda_d.fill_(self.d_initial)

    @property
    def lambda_b(self) -> nn.Parameter:
        return getattr(self, f"{self.KIND}_lambda_b")

    @property
    def lambda_d(self) -> nn.Parameter:
        return getattr(self, f"{self.KIND}_lambda_d")

    def sliced_projections(self):
        """(A [rows, in], B [out, r]) of this layer in its dtype and device, contiguous."""
        rows = self.lambda_d.shape[0]
        A = self.projections.A[:rows, :self.in_features]
        B = self.projections.B[:self.out_features, :self.r]
        dt, dev = self.weight.dtype, self.weight.device
        return A.to(device=dev, dtype=dt).contiguous(), B.to(device=dev, dtype=dt).contiguous()

    def delta_weight(self) -> torch.Tensor:
        """ΔW = diag(λ_b) B diag(λ_d) A [out, in] (PVeRA: the μ half of A and λ_d, as PEFT merges),
        computed in float32 (float64 for float64), returned in the weight's dtype."""
        acc = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        A, B = self.sliced_projections()
        r = self.r
        ld, lb = self.lambda_d.detach().to(acc)[:r], self.lambda_b.detach().to(acc)
        return ((lb[:, None] * B.to(acc)) @ (ld[:, None] * A[:r].to(acc))).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self):
        """Fold the adapter into the base weight (in place); forward then runs F.linear."""
        if self.merged:
            raise RuntimeError(f"{type(self).__name__}.merge: the adapter is already merged")
        self._add_delta(1.0)
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Undo merge(): subtract the same delta (exact up to one rounding of the weight's dtype)."""
        if not self.merged:
            raise RuntimeError(f"{type(self).__name__}.unmerge: the adapter is not merged")
        self._add_delta(-1.0)
        self.merged = False

    def _add_delta(self, sign: float):
        acc = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        A, B = self.sliced_projections()
        r = self.r
        ld, lb = self.lambda_d.detach().to(acc)[:r], self.lambda_b.detach().to(acc)
        w = self.weight.to(acc).addmm_(lb[:, None] * B.to(acc), ld[:, None] * A[:r].to(acc), alpha=sign)
        self.weight.copy_(w)

    def _validate_state_dict(self, state_dict, prefix: str, who: str):
        """Check this module's own keys in ``state_dict``, its extra state included, before a load
        changes anything (see _transaction.check_state_dict)."""
        return check_merged_state(self, state_dict, prefix, who)

    def get_extra_state(self):
        # Saved so that a state dict taken from a merged module does not get the delta added twice.
        return {"merged": self.merged}

    def set_extra_state(self, state):
        self.merged = bool(state["merged"])

    def to_linear(self) -> nn.Linear:
        """An nn.Linear holding the base weights (merged ones if merged), sharing storage."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        lin.weight = self.weight
        lin.bias = self.bias
        return lin

    def unload(self) -> nn.Linear:
        """The original nn.Linear back, adapter dropped (unmerged first if merged), sharing storage."""
        if self.merged:
            self.unmerge()
        return self.to_linear()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"r={self.r}, dropout={self.dropout:g}, d_initial={self.d_initial:g}, merged={self.merged}")


class VeRALinear(_VeRABase):
    """VeRA (vector-based random matrix adaptation): ``y = x Wᵀ + b + λ_b ⊙ ((λ_d ⊙ (dropout(x) Aᵀ)) Bᵀ)``
    with W, b frozen and A, B frozen random projections shared across the model's layers
    (``projections``, a VeRAProjections module referenced by every layer).

    Parameters (names as PEFT's): weight [out, in], bias [out] | None (frozen, shared with the
    wrapped nn.Linear); vera_lambda_d [r] (init d_initial = 0.1), vera_lambda_b [out] (init 0), trainable.
    PEFT's VeraConfig defaults: r=256, vera_dropout=0, d_initial=0.1, projection_prng_key=0,
    save_projection=True.
    """

    KIND = "vera"
    TRAINABLE_PREFIXES = ("vera_lambda_",)  # parameters inject() leaves trainable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        A, B = self.sliced_projections()
        return vera_linear(x, self.weight, self.bias, A, B, self.vera_lambda_d, self.vera_lambda_b,
                           self.dropout if self.training else 0.0)


class PVeRALinear(_VeRABase):
    """PVeRA (probabilistic VeRA): the rank-space hidden λ_d ⊙ (dropout(x) Aᵀ), A [2r, in], is split
    into (μ, log σ²); in training (or in eval with ``sample_at_inference``) h = μ + ε ⊙ exp(½ log σ²),
    ε from pyhappy's counter-based hash seeded from torch's generator (so torch.manual_seed
    reproduces a step, and the backward regenerates ε), else h = μ; ``y = x Wᵀ + b + λ_b ⊙ (h Bᵀ)``.

    Parameters: pvera_lambda_d [2r] (init d_initial), pvera_lambda_b [out] (init 0); projections
    pvera_A [2r, in], pvera_B [out, r] shared. merge() folds the mean path (PEFT's merge).
    """

    KIND = "pvera"
    TRAINABLE_PREFIXES = ("pvera_lambda_",)

    def _setup_extra(self, sample_at_inference: bool = False):
        if not isinstance(sample_at_inference, bool):
            raise TypeError(f"PVeRALinear: sample_at_inference must be True or False, got {sample_at_inference!r}")
        self.sample_at_inference = sample_at_inference

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        A, B = self.sliced_projections()
        return pvera_linear(x, self.weight, self.bias, A, B, self.pvera_lambda_d, self.pvera_lambda_b,
                            self.dropout if self.training else 0.0,
                            sample=bool(self.training or self.sample_at_inference))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", sample_at_inference={self.sample_at_inference}"
