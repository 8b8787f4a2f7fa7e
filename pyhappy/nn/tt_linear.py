"""TTLinear (TT-LoRA / LoRETTA-rep / TT-matrix delta) and TTAdapter (LoRETTA-adp bottleneck)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._transaction import TransactionalLoad, check_local, restores_on_failure
from ..ops._checks import finite_number
from ..ops.quant_linear import quant_linear
from ..ops.tt_linear import factorize, tt_lowrank_factors, tt_lowrank_linear, tt_matrix_full, tt_matrix_linear
from .quant_linear import QuantLinear

FORMS = ("lowrank", "matrix")


def _ranks(tt_rank, n_internal: int, who: str) -> list:
    if isinstance(tt_rank, int) and not isinstance(tt_rank, bool):
        ranks = [tt_rank] * n_internal
    else:
        ranks = list(tt_rank)
    if len(ranks) != n_internal or any(not isinstance(t, int) or t < 1 for t in ranks):
        raise ValueError(f"{who}: tt_rank must be a positive int or {n_internal} positive ints (one per internal "
                         f"bond), got {tt_rank!r}")
    return ranks


def _entries(cores: nn.ParameterList) -> list:
    """A ParameterList's entries as a list, looked up by index in its parameter dict (``list()`` goes
    through the list's ``__getitem__`` per entry, a few microseconds a call that a small layer's
    forward notices); ``list()`` where an entry is not a registered Parameter."""
    ps = cores._parameters
    try:
        return [ps[str(i)] for i in range(len(cores))]
    except KeyError:
        return list(cores)


def _init_cores(shapes, target_var: float, zero_last: bool, device, dtype) -> nn.ParameterList:
    """Cores N(0, σ²) with σ such that the reconstructed entries have variance target_var
    (σ^{2·d} · Π internal ranks = target_var); the last core zero for a zero-output start."""
    inner = math.prod(s[-1] for s in shapes[:-1])
    sigma = (target_var / inner) ** (1.0 / (2 * len(shapes)))
    out = nn.ParameterList()
    for i, s in enumerate(shapes):
        p = torch.empty(s, device=device, dtype=dtype)
        if zero_last and i == len(shapes) - 1:
            nn.init.zeros_(p)
        else:
            nn.init.normal_(p, std=sigma)
        out.append(nn.Parameter(p))
    return out


def matrix_core_shapes(n_factors, k_factors, ranks):
    d = len(n_factors)
    rr = [1, *ranks, 1]
    return [(rr[i], n_factors[i], k_factors[i], rr[i + 1]) for i in range(d)]


def chain_core_shapes(factors, last_mode: int, ranks):
    """Cores of a TT tensor over modes (*factors, last_mode)."""
    modes = [*factors, last_mode]
    rr = [1, *ranks, 1]
    return [(rr[i], modes[i], rr[i + 1]) for i in range(len(modes))]


class TTLinear(TransactionalLoad, nn.Module):
    """``y = x Wᵀ + b + ΔW x`` with W, b frozen and ΔW given by tensor-train cores.

    form="lowrank" (TT-LoRA / LoRETTA-rep): ΔW = s · B A, A [r, K] and B [N, r] each a TT tensor over
        a factorisation of K (resp. N) and the rank mode r; cores at ``tt_cores_A`` / ``tt_cores_B``
        ([t_{i-1}, m_i, t_i]); runs as the fused pyhappy::lora_linear op on the rebuilt A, B.
    form="matrix" (TT-matrix delta): ΔW = s · TT-matrix of cores ``tt_cores`` [r_{i-1}, n_i, k_i, r_i].
    Sizes that factor badly are padded (zero inputs, sliced outputs): any hidden size works.
    B's (resp. the last matrix core's) last core starts at zero, so a fresh adapter leaves the
    model unchanged. ``delta_weight()`` gives the dense ΔW; ``merge`` / ``unmerge`` fold it in.
    """

    TRAINABLE_PREFIXES = ("tt_cores",)

    def __init__(self, in_features: int, out_features: int, tt_rank=4, form: str = "lowrank", r: int = 8,
                 alpha: float | None = None, d: int | None = None, dropout: float = 0.0, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup(base, tt_rank, form, r, alpha, d, dropout)

    @classmethod
    @restores_on_failure
    def from_linear(cls, linear: nn.Linear, tt_rank=4, form: str = "lowrank", r: int = 8, alpha: float | None = None,
                    d: int | None = None, dropout: float = 0.0, *, quantize: str | None = None,
                    group_size: int | None = None, method="rtn", calib=None) -> "TTLinear":
        """Wrap an nn.Linear (weight and bias shared, frozen). tt_rank: the TT bond rank (int, or one
        per internal bond); r: the low-rank form's LoRA rank; d: number of factors per dimension
        (default: factors near 16); alpha: the scale, as alpha / r for form="lowrank" (default
        alpha = r: scaling 1) and alpha itself for form="matrix" (default 1). quantize: "nf4" |
        "int4" | "int3" packs the base (a QuantLinear at ``base``; the lowrank form then runs as
        pyhappy::quant_linear with the rebuilt A, B; the matrix form adds its contraction)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{cls.__name__}.from_linear: linear must be an nn.Linear, got {type(linear).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(linear, tt_rank, form, r, alpha, d, dropout)
        if quantize is not None:
            q = QuantLinear.from_linear(linear, quantize, group_size, method=method, calib=calib)
            self.weight = None
            self.base = q
            self.bias = q.bias
        return self

    def _setup(self, base: nn.Linear, tt_rank, form, r, alpha, d, dropout):
        name = type(self).__name__
        if form not in FORMS:
            raise ValueError(f"{name}: form must be one of {FORMS}, got {form!r}")
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"{name}: r must be a positive int, got {r!r}")
        if not (0.0 <= float(dropout) < 1.0):
            raise ValueError(f"{name}: dropout must be in [0, 1), got {dropout!r}")
        if form == "matrix" and dropout:
            raise ValueError(f"{name}: dropout applies to form='lowrank' only")
        if alpha is not None:
            alpha = finite_number(name, "alpha", alpha)
        K, N = base.in_features, base.out_features
        self.in_features, self.out_features, self.form = K, N, form
        kf = factorize(K, d)
        nf = factorize(N, len(kf))
        self.k_factors, self.n_factors = kf, nf
        dev, dt = base.weight.device, base.weight.dtype
        if form == "lowrank":
            ranks = _ranks(tt_rank, len(kf), name)
            self.r = r
            self.scaling = float(r if alpha is None else alpha) / r
            self.tt_cores_A = _init_cores(chain_core_shapes(kf, r, ranks), 1.0 / (3 * K), False, dev, dt)
            self.tt_cores_B = _init_cores(chain_core_shapes(nf, r, ranks), 1.0 / r, True, dev, dt)
        else:
            ranks = _ranks(tt_rank, len(kf) - 1, name)
            self.r = None
            self.scaling = float(1.0 if alpha is None else alpha)
            self.tt_cores = _init_cores(matrix_core_shapes(nf, kf, ranks), 1.0 / K, True, dev, dt)
        self.tt_rank = ranks
        self.lora_dropout = float(dropout)
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.base = None
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.merged = False

    @property
    def _dtype(self):
        return self.weight.dtype if self.weight is not None else self.base.weight_dtype

    def num_adapter_parameters(self) -> int:
        """Trainable parameters of the adapter (the TT cores)."""
        return sum(p.numel() for n, p in self.named_parameters() if n.startswith("tt_cores"))

    def delta_weight(self) -> torch.Tensor:
        """The dense update ΔW [out, in] (scale included), computed in float32, in W's dtype."""
        with torch.no_grad():
            if self.form == "lowrank":
                A, B = tt_lowrank_factors([c.float() for c in self.tt_cores_A], [c.float() for c in self.tt_cores_B],
                                          self.in_features, self.out_features)
                d = self.scaling * (B @ A)
            else:
                d = self.scaling * tt_matrix_full([c.float() for c in self.tt_cores], self.out_features,
                                                  self.in_features)
        return d.to(self._dtype)

    @torch.no_grad()
    def merge(self):
        if self.weight is None:
            raise RuntimeError("TTLinear.merge: the base is quantized; merging needs a dense weight")
        if self.merged:
            raise RuntimeError("TTLinear.merge: already merged")
        self.weight.copy_((self.weight.float() + self.delta_weight().float()).to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            raise RuntimeError("TTLinear.unmerge: not merged")
        self.weight.copy_((self.weight.float() - self.delta_weight().float()).to(self.weight.dtype))
        self.merged = False

    def get_extra_state(self):
        return {"merged": self.merged}

    def _check_extra_state(self, state, who: str, key: str = "_extra_state") -> bool:
        if not isinstance(state, dict) or not isinstance(state.get("merged"), bool):
            raise ValueError(f"{who}: {key} must be a dict with a bool 'merged', got {state!r}")
        if state["merged"] and self.weight is None:
            raise ValueError(f"{who}: {key} says merged, but this module's base is quantized (no dense weight)")
        return state["merged"]

    def set_extra_state(self, state):
        self.merged = self._check_extra_state(state, f"{type(self).__name__}.load_state_dict")

    def _validate_state_dict(self, state_dict, prefix: str, who: str):
        """Check this module's own keys (see _transaction.check_state_dict); change nothing."""
        claimed, required = check_local(self, state_dict, prefix, who)
        key = prefix + "_extra_state"
        if key in state_dict:
            self._check_extra_state(state_dict[key], who, key)
        return claimed, required

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._validate_state_dict(state_dict, prefix, f"{type(self).__name__}.load_state_dict")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        if self.weight is None:  # packed base
            if self.form == "lowrank":
                p = self.lora_dropout if self.training else 0.0
                A, B = tt_lowrank_factors(_entries(self.tt_cores_A), _entries(self.tt_cores_B), self.in_features,
                                          self.out_features)
                return quant_linear(x, self.base.qweight, self.bias, A, B, self.scaling, dropout_p=p)
            return self.base(x) + tt_matrix_linear(x, None, None, _entries(self.tt_cores), self.scaling,
                                                   N=self.out_features)
        if self.form == "lowrank":
            p = self.lora_dropout if self.training else 0.0
            return tt_lowrank_linear(x, self.weight, self.bias, _entries(self.tt_cores_A), _entries(self.tt_cores_B),
                                     self.scaling, p)
        return tt_matrix_linear(x, self.weight, self.bias, _entries(self.tt_cores), self.scaling)

    def extra_repr(self) -> str:
        shape = f"K={self.in_features}->{'x'.join(map(str, self.k_factors))}, " \
                f"N={self.out_features}->{'x'.join(map(str, self.n_factors))}"
        r = f", r={self.r}" if self.r else ""
        base = "dense" if self.weight is not None else f"{self.base.format}/g{self.base.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, form={self.form}, base={base}, "
                f"tt_rank={self.tt_rank}{r}, {shape}, adapter_params={self.num_adapter_parameters()}, "
                f"merged={self.merged}")


_ACTS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "tanh": torch.tanh}


class TTAdapter(nn.Module):
    """LoRETTA-adp bottleneck adapter: ``h + up(act(down(h)))`` with TT-matrix down [bottleneck,
    features] and up [features, bottleneck] projections (cores at ``tt_cores_down`` /
    ``tt_cores_up``, biases ``bias_down`` / ``bias_up``). up's last core and bias start at zero, so
    a fresh adapter is the identity. Insert after a sublayer: ``nn.Sequential(block, TTAdapter(d))``."""

    TRAINABLE_PREFIXES = ("tt_cores", "bias_")

    def __init__(self, features: int, bottleneck: int = 64, tt_rank=4, act: str = "gelu", d: int | None = None,
                 device=None, dtype=None):
        super().__init__()
        if act not in _ACTS:
            raise ValueError(f"TTAdapter: act must be one of {sorted(_ACTS)}, got {act!r}")
        if not isinstance(bottleneck, int) or bottleneck < 1:
            raise ValueError(f"TTAdapter: bottleneck must be a positive int, got {bottleneck!r}")
        self.features, self.bottleneck, self.act = features, bottleneck, act
        ff = factorize(features, d)
        bf = factorize(bottleneck, len(ff))
        ranks = _ranks(tt_rank, len(ff) - 1, "TTAdapter")
        self.tt_rank = ranks
        self.tt_cores_down = _init_cores(matrix_core_shapes(bf, ff, ranks), 1.0 / features, False, device, dtype)
        self.tt_cores_up = _init_cores(matrix_core_shapes(ff, bf, ranks), 1.0 / bottleneck, True, device, dtype)
        self.bias_down = nn.Parameter(torch.zeros(bottleneck, device=device, dtype=dtype))
        self.bias_up = nn.Parameter(torch.zeros(features, device=device, dtype=dtype))

    def num_adapter_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not isinstance(h, torch.Tensor) or h.dim() < 1 or h.shape[-1] != self.features:
            got = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
            raise ValueError(f"TTAdapter: h must be [..., features] = [..., {self.features}], got {got}")
        z = tt_matrix_linear(h, None, self.bias_down, _entries(self.tt_cores_down), 1.0, N=self.bottleneck)
        z = _ACTS[self.act](z)
        return h + tt_matrix_linear(z, None, self.bias_up, _entries(self.tt_cores_up), 1.0, N=self.features)

    def extra_repr(self) -> str:
        return (f"features={self.features}, bottleneck={self.bottleneck}, tt_rank={self.tt_rank}, act={self.act}, "
                f"params={self.num_adapter_parameters()}")
