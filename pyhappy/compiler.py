"""pyhappy.compiler: a torch.compile backend that rewrites unfused LoRA code into pyhappy's fused op.

    model = torch.compile(peft_model, backend=pyhappy.compiler.backend)        # PEFT model as is
    model = torch.compile(model, backend=pyhappy.compiler.make_backend(dropout="pyhappy"))

The backend rewrites the Dynamo FX graph (torch-level IR, before AOTAutograd), then hands it to
Inductor; AOTAutograd then differentiates the registered pyhappy::lora_linear op with its own
fused backward. ``rewrite(gm)`` does the rewrite alone and returns a report (sites and near-misses).

Pattern (matched structurally on the graph, never by module names):

    out = base(x) + Σ_i  s_i · linear(linear(drop_i(x), A_i), B_i)

with the base layer spelled ``linear(x, W, b)``; ``x @ W.T [+ b]`` / ``matmul(x, W.t()) [+ b]`` (Falcon's
FalconLinear; any transpose spelling of an [N, K] W); ``x @ W [+ b]`` on a [K, N] W; or GPT-2's
Conv1D, ``addmm(b, x.view(-1, K), W).view(*x.shape[:-1], N)`` on a [K, N] W (the fused op then reads
``W.t()``, a view: no copy of the weight, and its gradient, if W trains, flows back through it). The
base output may pass through ``.clone()`` and no-op ``.to(dtype)`` casts before the adds, and each term
through a no-op cast (PEFT's bitsandbytes forward does both). Each term is spelled ``mul(t, s)``,
``mul(s, t)``, ``div(t, d)`` or plain ``t`` (scale inside B). The adapter must read the base layer's
input; a dropout whose output *is* that input is the model's own (BERT's q/k/v, T5's ``wo``, cross
attention), computed once for both, and stays as it is. drop_i (the adapter's own) is either absent, a
dropout with p = 0 or training=False (identity), or with
``dropout="pyhappy"`` an active dropout (then replaced by pyhappy's counter-hash dropout: the same
distribution, a different random draw than torch's — hence opt-in). Several adapters summed on one
base become one lora_linear of rank Σ r_i with A = cat(A_i) and B = cat(s_i·B_i) (built in the
graph, so gradients reach every A_i, B_i). A dense site without dropout whose shapes pyhappy's measured
dispatch serves with the unfused formulation (small layers, where the fused op's Python layers cost more
than its kernels save: ``_unfused_measured``) is kept as it is for Inductor and reported under ``kept``.
A site whose shapes, dtypes or form do not fit exactly is
left alone and reported as a near-miss with the reason: the rewrite never changes results beyond
float rounding. Every low-rank product ``linear(linear(·, A), B)`` (r < min(N, K)) left in the graph
is in the report, with what its output feeds; a graph where nothing fused but something was left alone
logs one warning (logger ``pyhappy.compiler``) listing the reasons.

Sparse deltas (sparse fine-tuning written as a dense merged weight) become
pyhappy::sparse_delta_linear, so neither the merged [N, K] weight nor its dense gradient exists:

    linear(x, view(index_add(W.reshape(-1), 0, idx, v[, alpha=s]), [N, K]), b)
    linear(x, W + s · view(scatter_add / index_add(zeros(N·K), 0, idx, v), [N, K]), b)
    linear(x, W.index_put((rows, cols), v, accumulate=True), b)

(view / view_as / reshape / flatten in any of their spellings; s a Python number, as a multiply or a
division). The indices may come in any order and repeat (pyhappy::sparse_pattern sorts them once per
index tensor and keeps duplicates, which the kernels sum as index_add does); gradients reach v, and W
and b when they require it. A non-accumulating scatter / index_put (last write wins on duplicates)
is left alone.

Quantized base (QLoRA as bitsandbytes + PEFT write it): bitsandbytes' 4-bit matmul (its
MatMul4Bit autograd.Function, which Dynamo traces into ``autograd_function_apply`` around
``bitsandbytes::gemm_4bit``, or that op called directly under no_grad) with an NF4 weight becomes
pyhappy::quant_linear on the same weight, repacked once per weight by pyhappy::bnb_nf4_pack (bit
exact, double-quantized absmax included); a LoRA summed on it as above joins the same op. The
backward then reads the packed weight (no dequantized copy) and gives the adapter its grads. FP4
weights, a bias that requires grad (bitsandbytes gives it none) and blocks that do not tile K are
left alone.

A weight bitsandbytes has repacked into its CPU layout (``quant_state.packing_format_for_cpu``, done by
Linear4bit's no-grad eval forward on CPUs with AVX512-BF16; matmul_4bit then calls
``bitsandbytes::gemv_4bit`` on uint8 [N, K/2] codes with a bfloat16 [K/blocksize, N] absmax, then adds
the bias) is recognised by those shapes and read back by pyhappy::bnb_nf4_cpu_pack
(nf4.bnb_cpu_layout_to_standard: the codes bit exact, absmax the bfloat16 values bitsandbytes now holds
and multiplies by). bitsandbytes' CPU kernel rounds the activations to bfloat16 on the way in; pyhappy
keeps their dtype, so the fused result differs from that kernel's by its bfloat16 rounding (and equals
a float32 product with the same weight). Its code table must be visible (a module buffer) and nf4;
otherwise the site is a near-miss saying so. When the repack itself happens inside the traced forward
(the first no-grad eval call compiled), the graph still reads the weight from before the repack, so
that site is a near-miss too (one eager forward before compiling avoids it).

PEFT's other low-rank variants, as its forwards write them (matched on the graph like LoRA):

* DoRA (peft/tuners/lora/dora.py): the row norm ``linalg_norm(W + s · linear(linear(eye(K), A), B).T,
  dim=1)``, detached, gives ``ms = (m / norm).view(1, -1)``, and the layer adds
  ``(ms - 1) * base_result + ms * linear(linear(xd, A), B) * s`` to its base output ``linear(x, W, b)``
  (base_result: that output, minus b when there is a bias, or ``linear(dropout(x), W)`` while dropout
  is active). It becomes pyhappy::dora_weight_norm + pyhappy::dora_linear: W + s·BA is never formed.
  On GPT-2's Conv1D (fan_in_fan_out: W stored [K, N], the norm over ``transpose(W)``) both ops read
  ``W.t()``, a view (no [N, K] copy). On a bitsandbytes NF4 base (QDoRA: the base is the 4-bit matmul
  above, W PEFT's ``dequantize_4bit`` of the same packed weight) the layer becomes QLoRALinear's QDoRA
  forward on the packed weight: ``quant_linear(x, W, A, B, s) * (m / norm) [+ b]``, the norm from one
  quant_linear of A's r rows and ‖W_n‖² (pyhappy::bnb_nf4_row_sqnorm, computed once per weight): the
  dequantized [N, K] weight PEFT builds every step is never formed. Near-misses: a DoRA term on a
  base that already has an adapter (PEFT scales the running result, base and earlier adapters, by
  this adapter's m / ‖·‖: no single dora_linear), an active dropout without ``dropout="pyhappy"``, an
  active dropout on a trainable fan_in_fan_out weight (PEFT's transpose gives W no gradient from the
  dropped-out base term), QDoRA with active dropout, and QDoRA on a weight in bitsandbytes' CPU layout.
* VeRA (peft/tuners/vera): ``base + λ_b * linear(λ_d * linear(drop(x), A), B)`` (A, B the sliced
  shared projections) becomes pyhappy::vera_linear.
* PVeRA (peft/tuners/pvera): the mean path ``base + λ_b * linear(chunk(λ_d * linear(drop(x), A), 2,
  -1)[0], B)`` (eval, no sample_at_inference) becomes pyhappy::pvera_linear; the sampled path
  (``mu + randn_like(std) * std``) is a near-miss, pyhappy's noise being a different draw.

PEFT's DoRA forward breaks Dynamo's graph once per layer at ``dequantize_module_weight`` (and, with
fan_in_fan_out, at ``transpose``, which builds an nn.Parameter); the polyfills ``register_peft_polyfills``
installs (when peft is imported) keep the model in one graph, a bitsandbytes 4-bit weight dequantized
in the graph by bitsandbytes' own ``dequantize_4bit``.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
from typing import NamedTuple

import torch
import torch.fx as fx
import torch.nn.functional as F

_LINEAR = (torch._C._nn.linear, F.linear)
_ADD = (operator.add, torch.add, operator.iadd)
_MUL = (operator.mul, torch.mul, operator.imul)
_DIV = (operator.truediv, torch.div)
_DROPOUT = (F.dropout, torch.dropout, torch.nn.functional.dropout)
_MATMUL = (operator.matmul, torch.matmul, torch.mm)
_ADDMM = (torch.addmm,)

logger = logging.getLogger(__name__)


_VIEW_METHODS = ("view", "reshape", "view_as", "flatten")
_VIEW_FUNCS = (torch.reshape, torch.flatten)


def _unview(node):
    """Strip view-like calls: (the node under them, the nodes stripped)."""
    chain = []
    while isinstance(node, fx.Node) and (
            (node.op == "call_method" and node.target in _VIEW_METHODS) or _is_call(node, _VIEW_FUNCS)):
        chain.append(node)
        node = node.args[0]
    return node, chain


def _is_method(node, names):
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target in names


def _scatter_parts(node):
    """(target, idx, values, alpha) of ``target.index_add(0, idx, v[, alpha])`` / ``scatter_add(0, idx, v)``
    (method or torch function), or None."""
    if _is_method(node, ("index_add", "scatter_add")) or _is_call(node, (torch.index_add, torch.scatter_add)):
        args = list(node.args) + [None] * 5
        tgt, dim, idx = args[0], node.kwargs.get("dim", args[1]), node.kwargs.get("index", args[2])
        src = node.kwargs.get("source", node.kwargs.get("src", args[3]))
        alpha = node.kwargs.get("alpha", args[4] if node.target in ("index_add", torch.index_add) else None)
        alpha = 1.0 if alpha is None else alpha
        if dim != 0 or not isinstance(alpha, (int, float)) or not isinstance(src, fx.Node):
            return None
        return tgt, idx, src, float(alpha)
    return None


def _is_zeros(node, numel):
    v = _val(node)
    if v is None or v.numel() != numel:
        return False
    base, _ = _unview(node)
    return (_is_call(base, (torch.zeros, torch.zeros_like)) or _is_method(base, ("new_zeros", "zero_"))) and \
        not any(k in base.kwargs for k in ("out",))


def _strip_to(node):
    """Under ``.to(dtype)`` calls that do not change the dtype (bitsandbytes and PEFT add them)."""
    while _is_method(node, ("to",)) and len(node.args) == 2 and not node.kwargs and \
            isinstance(node.args[1], torch.dtype) and _val(node.args[0]) is not None and \
            _val(node.args[0]).dtype == node.args[1]:
        node = node.args[0]
    return node


def _strip_noop(node):
    """Under no-op ``.to(dtype)`` and ``.clone()`` calls (PEFT's bitsandbytes forward clones the base
    output before adding the adapters): (the node under them, the nodes stripped)."""
    chain = []
    while True:
        under = _strip_to(node)
        if under is not node:
            chain.append(node)
            node = under
        elif (_is_method(node, ("clone",)) or _is_call(node, (torch.clone,))) and len(node.args) == 1 and \
                not node.kwargs:
            chain.append(node)
            node = node.args[0]
        else:
            return node, chain


def _untranspose(node):
    """(W, True) when ``node`` is the transpose of a 2-D W (``W.T``, ``W.t()``, ``torch.t(W)``, ``W.mT``,
    ``W.transpose(0, 1)`` / ``(-1, -2)``, ``W.permute(1, 0)``), else (node, False)."""
    if not isinstance(node, fx.Node):
        return node, False
    src = None
    if _is_call(node, (getattr,)) and len(node.args) == 2 and node.args[1] in ("T", "mT"):
        src = node.args[0]
    elif (_is_method(node, ("t",)) or _is_call(node, (torch.t,))) and len(node.args) == 1:
        src = node.args[0]
    elif (_is_method(node, ("transpose",)) or _is_call(node, (torch.transpose,))) and len(node.args) == 3 and \
            sorted(node.args[1:]) in ([0, 1], [-2, -1]):
        src = node.args[0]
    elif _is_method(node, ("permute",)) and (list(node.args[1:]) == [1, 0] or
                                             (len(node.args) == 2 and list(node.args[1]) == [1, 0])):
        src = node.args[0]
    if src is not None and _val(src) is not None and _val(src).dim() == 2:
        return src, True
    return node, False


def _dense_base(node):
    """Parse a dense base layer's output: (dict(x, W, transposed, b, N, K, nodes), None), (None, reason)
    or (None, None) when ``node`` is not one. Spellings:
    ``linear(x, W, b)``; ``x @ W.T [+ b]`` / ``matmul(x, W.t()) [+ b]`` (W [N, K]) and ``x @ W [+ b]``
    (W [K, N]); GPT-2's Conv1D ``addmm(b, x.view(-1, K), W).view(*x.shape[:-1], N)`` (W [K, N]).
    ``transposed``: W is stored [K, N] and the fused op reads ``W.t()``."""
    if _is_call(node, _LINEAR):
        x, W, b = _linear_args(node)
        Wv = _val(W)
        if Wv is None or Wv.dim() != 2:
            return None, None
        return {"x": x, "W": W, "transposed": False, "b": b, "N": Wv.shape[0], "K": Wv.shape[1], "nodes": [node]}, None
    nodes, b = [], None
    if _is_call(node, _ADD) and len(node.args) == 2 and not node.kwargs:
        for mm, bb in (node.args, node.args[::-1]):
            if _is_call(mm, _MATMUL) and isinstance(bb, fx.Node) and _val(bb) is not None and _val(bb).dim() == 1:
                nodes, b, node = [node], bb, mm
                break
    if _is_call(node, _MATMUL) and len(node.args) == 2 and not node.kwargs:
        x, wt = node.args
        W, transposed = _untranspose(wt)
        Wv, xv = _val(W), _val(x)
        if Wv is None or xv is None or Wv.dim() != 2 or xv.dim() < 1:
            return None, None
        if node.target is torch.mm and xv.dim() != 2:
            return None, None
        N, K = (Wv.shape[0], Wv.shape[1]) if transposed else (Wv.shape[1], Wv.shape[0])
        if b is not None and tuple(_val(b).shape) != (N,):
            return None, "the bias added to the matmul is not [N]"
        return {"x": x, "W": W, "transposed": not transposed, "b": b, "N": N, "K": K,
                "nodes": nodes + [node]}, None
    out = None
    if (_is_method(node, ("view", "reshape")) or _is_call(node, (torch.reshape,))) and \
            _is_call(node.args[0], _ADDMM):
        out, node = node, node.args[0]
    if not _is_call(node, _ADDMM):
        return None, None
    args = list(node.args) + [None] * 3
    b, x2, W = node.kwargs.get("input", args[0]), node.kwargs.get("mat1", args[1]), node.kwargs.get("mat2", args[2])
    if any(node.kwargs.get(k, 1) != 1 for k in ("beta", "alpha")) or len(node.args) > 3:
        return None, "addmm with beta / alpha other than 1"
    Wv, x2v = _val(W), _val(x2)
    if Wv is None or x2v is None or Wv.dim() != 2 or x2v.dim() != 2 or not isinstance(b, fx.Node) or \
            _val(b) is None or tuple(_val(b).shape) != (Wv.shape[1],):
        return None, "addmm is not bias [N] + x [M, K] @ W [K, N]"
    K, N = Wv.shape
    x = x2
    if out is not None:  # Conv1D: x.view(-1, K) in, .view(*x.shape[:-1], N) out
        ov = _val(out)
        if _is_method(x2, ("view", "reshape")) or _is_call(x2, (torch.reshape,)):
            xv = _val(x2.args[0])
            if xv is not None and xv.dim() >= 1 and ov is not None and xv.shape[-1] == K and \
                    tuple(xv.shape[:-1]) == tuple(ov.shape[:-1]) and ov.shape[-1] == N:
                x = x2.args[0]
        if x is x2:
            return None, "addmm between views that do not keep the input's leading dimensions"
    return {"x": x, "W": W, "transposed": True, "b": b, "N": N, "K": K,
            "nodes": ([out] if out is not None else []) + [node]}, None


def _bnb_base(gm, node):
    """Parse bitsandbytes' 4-bit matmul — ``bitsandbytes::gemm_4bit`` called directly (no grad) or
    inside MatMul4Bit's ``autograd_function_apply`` — into (dict(x, packed, absmax, absmax_8bit, code,
    offset, bias, N, K, blocksize, nested_blocksize, nodes), None), or (None, reason), or (None, None)
    when ``node`` is not one at all."""
    top = _strip_to(node)
    extra = [node] if node is not top else []
    if not _has_bnb_ops():
        return None, None
    gemv = (torch.ops.bitsandbytes.gemv_4bit.default,)
    if _is_call(top, _ADD) and len(top.args) == 2 and not top.kwargs and _is_call(top.args[0], gemv):
        return _bnb_gemv(top.args[0], top.args[1], [top] + extra)
    if _is_call(top, gemv):
        return _bnb_gemv(top, None, [top] + extra)
    if _is_call(top, (torch.ops.bitsandbytes.gemm_4bit.default,)):
        return _bnb_gemm(top, lambda n: n, [top] + extra)
    if not (_is_call(top, (operator.getitem,)) and top.args[1] == 0):
        return None, None
    afa = top.args[0]
    if not _is_call(afa, (torch.ops.higher_order.autograd_function_apply,)):
        return None, None
    fwd = afa.args[0]
    if not (isinstance(fwd, fx.Node) and fwd.op == "get_attr"):
        return None, None
    try:
        body = gm.get_submodule(fwd.target)
    except AttributeError:
        return None, None
    calls = [n for n in body.graph.nodes if n.op == "call_function" and
             getattr(n.target, "namespace", None) == "bitsandbytes"]
    if not calls:
        return None, None
    names = [getattr(n.target, "_opname", str(n.target)) for n in calls]
    if names != ["gemm_4bit"]:
        return None, f"bitsandbytes matmul spelled {names} (pyhappy recognises one gemm_4bit)"
    outer = dict(zip([n for n in body.graph.nodes if n.op == "placeholder"], afa.args[2:]))

    def out_of(n):  # the graph node a body value comes from (through views in the body)
        n, _ = _unview(n)
        return outer.get(n) if isinstance(n, fx.Node) else n

    return _bnb_gemm(calls[0], out_of, [top, afa] + extra)


def _has_bnb_ops():
    return hasattr(torch.ops, "bitsandbytes") and hasattr(torch.ops.bitsandbytes, "gemm_4bit")


def _example(node):
    """The real tensor behind a Dynamo placeholder (a parameter or buffer), or None."""
    ga = node.meta.get("grapharg") if isinstance(node, fx.Node) and node.op == "placeholder" else None
    t = getattr(ga, "example", None)
    return t if isinstance(t, torch.Tensor) and not isinstance(t, torch._subclasses.FakeTensor) else None


def _bnb_gemv(gop, bias, nodes):
    """bitsandbytes' ``gemv_4bit(x, B, shape, absmax, code, blocksize)`` [+ bias], which bitsandbytes'
    matmul_4bit calls on CPU once the weight is repacked into its CPU layout (``packing_format_for_cpu``:
    B uint8 [N, K/2], absmax bfloat16 [K/blocksize, N]). Parsed like _bnb_base; anything else through
    gemv_4bit (the standard packing) is reported, not fused."""
    from .quant.nf4 import BNB_CPU_BLOCK_N, NF4_TABLE

    a = list(gop.args) + [None] * 6
    x, packed, shape, absmax, code, bs = a[:6]
    if gop.kwargs or not (isinstance(shape, (tuple, list)) and len(shape) == 2 and isinstance(bs, int)):
        return None, "bitsandbytes gemv_4bit with arguments that are not constants"
    N, K = (int(v) for v in shape)
    pv, av, xv = _val(packed), _val(absmax), _val(x)
    if pv is None or av is None or xv is None:
        return None, "bitsandbytes gemv_4bit operands are not graph values"
    cpu_layout = (pv.dim() == 2 and tuple(pv.shape) == (N, K // 2) and pv.dtype == torch.uint8 and
                  av.dim() == 2 and tuple(av.shape) == (K // bs, N) and av.dtype == torch.bfloat16)
    if not cpu_layout:
        return None, ("bitsandbytes gemv_4bit on a weight in its standard packing (pyhappy fuses gemv_4bit only "
                      "for bitsandbytes' CPU layout)")
    real = _example(packed)
    if not (isinstance(absmax, fx.Node) and absmax.op == "placeholder") or \
            (real is not None and tuple(real.shape) != (N, K // 2)):
        return None, ("bitsandbytes repacks this weight into its CPU layout inside the compiled graph (its first "
                      "no-grad eval forward), and the graph still reads the weight as it was before; run one eager "
                      "forward before compiling")
    if N % BNB_CPU_BLOCK_N:
        return None, f"bitsandbytes CPU layout with N = {N} not a multiple of {BNB_CPU_BLOCK_N}"
    ct = _example(code)
    if ct is None:
        return None, "bitsandbytes CPU-layout weight whose code table is not visible to the compiler (nf4 or fp4?)"
    if not torch.equal(ct.detach().float().cpu().reshape(-1), NF4_TABLE):
        return None, "bitsandbytes CPU-layout weight with a code table other than nf4 (fp4; pyhappy imports nf4)"
    if bs % 32 or K % bs:
        return None, f"bitsandbytes blocks of {bs} do not tile K = {K} in rows (pyhappy groups run along K)"
    if bias is not None and (_val(bias) is None or tuple(_val(bias).shape) != (N,) or _val(bias).requires_grad):
        return None, "the bias added to bitsandbytes' gemv_4bit is not a frozen [N] vector"
    return {"x": _strip_to(x), "packed": packed, "absmax": absmax, "absmax_8bit": None, "code": None,
            "offset": None, "bias": _strip_to(bias) if bias is not None else None, "N": N, "K": K,
            "blocksize": bs, "nested_blocksize": 256, "nodes": nodes, "cpu_layout": True}, None


def _bnb_cpu_pack_op():
    """pyhappy::bnb_nf4_cpu_pack (registered on first use): a bitsandbytes CPU-layout NF4 weight -> pyhappy's
    kernel layout, through nf4.bnb_cpu_layout_to_standard and from_bnb; cached per weight like
    pyhappy::bnb_nf4_pack (never aliased)."""
    global _CPU_PACK
    if _CPU_PACK is not None:
        return _CPU_PACK
    from .ops._cache import ByTensor
    from .ops.quant_linear import check_layout_version
    from .quant import layout
    from .quant.nf4 import from_bnb

    cache = ByTensor()

    @torch.library.custom_op("pyhappy::bnb_nf4_cpu_pack", mutates_args=())
    def bnb_nf4_cpu_pack(packed: torch.Tensor, absmax: torch.Tensor, N: int, K: int,
                         blocksize: int, layout_version: int) -> tuple[torch.Tensor, torch.Tensor]:
        check_layout_version("bnb_nf4_cpu_pack", layout_version)  # as bnb_nf4_pack's

        def build():
            qw = from_bnb(packed, {"quant_type": "nf4", "blocksize": blocksize, "dtype": "float32", "shape": (N, K),
                                   "absmax": absmax, "packing_format_for_cpu": True})
            return qw.data["qdata"], qw.data["absmax"]

        return cache.get([packed, absmax], (N, K, blocksize), build)

    @bnb_nf4_cpu_pack.register_fake
    def _(packed, absmax, N, K, blocksize, layout_version):
        check_layout_version("bnb_nf4_cpu_pack", layout_version)
        n8 = layout.n_tiles(N)
        return (packed.new_empty(n8 // 2, K // layout.BLOCK_K, 2 * layout.BYTES_PER_BLOCK[4], dtype=torch.uint8),
                packed.new_empty(n8, K // blocksize, layout.TILE_N, dtype=torch.float32))

    _CPU_PACK = torch.ops.pyhappy.bnb_nf4_cpu_pack.default
    return _CPU_PACK


_CPU_PACK = None


def _bnb_gemm(bop, out_of, nodes):
    """gemm_4bit(x, B, shape, absmax, blocksize, quant_type, bias=, absmax_8bit=, absmax_code=,
    absmax_offset=) with its tensors mapped to graph nodes by ``out_of``."""
    a = list(bop.args) + [None] * 6
    x, packed, shape, absmax, bs, qt = a[:6]
    kw = bop.kwargs
    bias, a8, code, off = (out_of(kw[k]) if kw.get(k) is not None else None
                           for k in ("bias", "absmax_8bit", "absmax_code", "absmax_offset"))
    x, packed, absmax = out_of(x), out_of(packed), out_of(absmax)
    if qt != "nf4":
        return None, f"bitsandbytes quant_type {qt!r} (pyhappy imports nf4)"
    if not (isinstance(shape, (tuple, list)) and len(shape) == 2 and isinstance(bs, int)):
        return None, "bitsandbytes weight shape / blocksize are not constants"
    N, K = (int(v) for v in shape)
    if bs % 32 or K % bs:
        return None, f"bitsandbytes blocks of {bs} do not tile K = {K} in rows (pyhappy groups run along K)"
    if not all(isinstance(t, fx.Node) and _val(t) is not None for t in (x, packed, absmax)):
        return None, "bitsandbytes matmul operands are not graph values"
    nb = 256
    if a8 is not None:
        G, n2 = _val(a8).numel(), _val(absmax).numel()
        nb = next((c for c in (256, 128, 64, 512, 1024, 2048, 4096) if -(-G // c) == n2), None)
        if nb is None:
            return None, "double-quantized absmax with a nested block size that cannot be inferred"
    if bias is not None and (_val(bias) is None or _val(bias).requires_grad):
        return None, "the bias requires grad (bitsandbytes' backward gives it none)"
    return {"x": _strip_to(x), "packed": packed, "absmax": absmax, "absmax_8bit": a8, "code": code, "offset": off,
            "bias": bias, "N": N, "K": K, "blocksize": bs, "nested_blocksize": nb, "nodes": nodes}, None


def _bnb_packed(g, q):
    """Insert pyhappy::bnb_nf4_pack for a parsed bitsandbytes base: (qdata, absmax) nodes."""
    from .ops import quant_linear  # noqa: F401  (registers pyhappy::bnb_nf4_pack)
    from .quant.layout import LAYOUT_VERSION

    if q.get("cpu_layout"):
        pk = g.call_function(_bnb_cpu_pack_op(),
                             (q["packed"], q["absmax"], q["N"], q["K"], q["blocksize"], LAYOUT_VERSION))
        return g.call_function(operator.getitem, (pk, 0)), g.call_function(operator.getitem, (pk, 1))
    pk = g.call_function(torch.ops.pyhappy.bnb_nf4_pack.default,
                         (q["packed"], q["absmax"], q["absmax_8bit"], q["code"], q["offset"], q["N"], q["K"],
                          q["blocksize"], q["nested_blocksize"], LAYOUT_VERSION))
    return g.call_function(operator.getitem, (pk, 0)), g.call_function(operator.getitem, (pk, 1))


def _sparse_weight(wnode):
    """Parse a linear's weight built as W + sparse delta: ((W, idx, rows_cols, v, s, nodes), None) or
    (None, reason); rows_cols is (rows, cols) for index_put, else None (idx flat)."""
    s = 1.0
    top, chain = _unview(wnode)
    parts = _scatter_parts(top)
    if parts is not None:  # W.reshape(-1).index_add(0, idx, v).view(N, K)
        tgt, idx, v, alpha = parts
        W, inner = _unview(tgt)
        if _val(tgt) is None or _val(tgt).dim() != 1:
            return None, "index_add / scatter_add is not over the flattened weight"
        if _is_zeros(tgt, (_val(W).numel() if _val(W) is not None else -1)):
            return None, "a scatter into zeros is the delta alone, not a merged weight"
        return (W, idx, None, v, alpha, chain + [top] + inner), None
    if _is_method(top, ("index_put",)) or _is_call(top, (torch.index_put,)):
        args = list(top.args) + [None] * 4
        W, ind, v = args[0], args[1], args[2]
        acc = top.kwargs.get("accumulate", args[3] if args[3] is not None else False)
        if acc is not True:
            return None, "index_put without accumulate=True (last write wins on duplicates)"
        if not (isinstance(ind, (tuple, list)) and len(ind) == 2 and all(isinstance(t, fx.Node) for t in ind)):
            return None, "index_put indices are not (rows, cols)"
        return (W, None, tuple(ind), v, 1.0, chain + [top]), None
    if _is_call(top, _ADD) and len(top.args) == 2 and not top.kwargs:
        W, d = top.args
        if not isinstance(d, fx.Node) or not isinstance(W, fx.Node):
            return None, "not W + delta"
        if _is_call(d, _MUL):
            a, b = d.args
            num, d2 = (b, a) if isinstance(b, (int, float)) else (a, b)
            if not isinstance(num, (int, float)) or not isinstance(d2, fx.Node):
                return None, "the delta's scale is not a Python number"
            mul, d, s = [d], d2, float(num)
        elif _is_call(d, _DIV) and isinstance(d.args[1], (int, float)):
            mul, d, s = [d], d.args[0], 1.0 / float(d.args[1])
        else:
            mul = []
        dtop, dchain = _unview(d)
        parts = _scatter_parts(dtop)
        Wv = _val(W)
        if parts is None or Wv is None or not _is_zeros(parts[0], Wv.numel()) or _val(parts[0]).dim() != 1:
            return None, "the added delta is not a scatter_add / index_add into flat zeros"
        _, idx, v, alpha = parts
        zbase, zchain = _unview(parts[0])
        return (W, idx, None, v, s * alpha, chain + [top] + mul + dchain + [dtop] + zchain + [zbase]), None
    return None, "not a merged sparse weight"


@dataclasses.dataclass
class Report:
    """What ``rewrite`` did: each site (the base linear's node name and the adapters' ranks), each
    near-miss (node name, reason) and each site kept unfused by the measured dispatch (node name,
    reason)."""

    sites: list = dataclasses.field(default_factory=list)
    near_misses: list = dataclasses.field(default_factory=list)
    kept: list = dataclasses.field(default_factory=list)  # (node name, why): sites the measured dispatch leaves unfused

    def __len__(self):
        return len(self.sites)

    def __str__(self):
        lines = [f"pyhappy.compiler: {len(self.sites)} site(s) fused"]
        what = {"lora": lambda s: f"LoRA ranks {s['ranks']}", "qlora": lambda s: f"QLoRA (nf4 base) ranks {s['ranks']}",
                "quant": lambda s: f"quantized base ({s['format']}, blocks of {s['blocksize']})",
                "sparse_delta": lambda s: f"sparse delta, {s['nnz']} entries",
                "dora": lambda s: f"DoRA rank {s['ranks'][0]}",
                "qdora": lambda s: f"QDoRA (nf4 base) rank {s['ranks'][0]}", "vera": lambda s: f"VeRA rank {s['ranks'][0]}",
                "pvera": lambda s: f"PVeRA (mean path) rank {s['ranks'][0]}"}
        lines += [f"  fused {s['node']}: {what[s['kind']](s)}" for s in self.sites]
        lines += [f"  left alone {n}: {why}" for n, why in self.near_misses]
        lines += [f"  kept unfused {n}: {why}" for n, why in self.kept]
        return "\n".join(lines)


def _val(node):
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None


def _is_call(node, targets):
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _linear_args(node):
    """(input, weight, bias) of a linear call node."""
    args = list(node.args) + [None] * 3
    x, w, b = args[0], node.kwargs.get("weight", args[1]), node.kwargs.get("bias", args[2])
    return x, w, b


class _Term(NamedTuple):
    x: fx.Node  # the adapter's input (under lora dropout)
    A: fx.Node
    B: fx.Node
    scale: float
    p: float  # lora dropout probability (0: none / identity)
    nodes: list  # the term's own nodes, top (outermost) first, down to lora_A's linear


def _same_input(a, b):
    return a is not None and _strip_to(a) is _strip_to(b)


def _term(node, dropout_mode, x_base):
    """Parse ``s · linear(linear(drop(x), A), B)`` (under a no-op ``.to(dtype)``) on the base layer's
    input ``x_base``: (_Term, None) or (None, reason). A dropout whose output is ``x_base`` itself is the
    model's own, before the layer (both the base and the adapter read its output), not the adapter's."""
    nodes = []
    under = _strip_to(node)
    if under is not node:
        nodes.append(node)
        node = under
    scale = 1.0
    if _is_call(node, _MUL):
        a, b = node.args[0], node.args[1]
        if isinstance(b, (int, float)) and isinstance(a, fx.Node):
            nodes.append(node)
            node, scale = a, float(b)
        elif isinstance(a, (int, float)) and isinstance(b, fx.Node):
            nodes.append(node)
            node, scale = b, float(a)
        else:
            return None, "scale is not a Python number"
    elif _is_call(node, _DIV) and isinstance(node.args[1], (int, float)):
        nodes.append(node)
        node, scale = node.args[0], 1.0 / float(node.args[1])
    if not _is_call(node, _LINEAR):
        return None, "not a linear"
    u, B, bB = _linear_args(node)
    if bB is not None:
        return None, "lora_B has a bias"
    if not _is_call(u, _LINEAR):
        return None, "lora_B's input is not a linear"
    xd, A, bA = _linear_args(u)
    if bA is not None:
        return None, "lora_A has a bias"
    nodes += [node, u]
    p = 0.0
    if _is_call(xd, _DROPOUT) and not _same_input(xd, x_base):
        args = list(xd.args) + [None] * 4
        prob = xd.kwargs.get("p", args[1] if args[1] is not None else 0.5)
        training = xd.kwargs.get("training", args[2] if args[2] is not None else True)
        if not isinstance(prob, (int, float)) or not isinstance(training, bool):
            return None, "dropout arguments are not constants"
        x = xd.args[0]
        if training and prob > 0:
            if not _same_input(x, x_base):
                return None, "the adapter reads another input than the base layer"
            if dropout_mode != "pyhappy":
                return None, (f"active dropout (p={prob}): pyhappy's dropout is a different random draw; "
                              "make_backend(dropout='pyhappy') fuses it anyway")
            p = float(prob)
    else:
        x = xd
    if not _same_input(x, x_base):
        return None, "the adapter reads another input than the base layer"
    return _Term(x, A, B, scale, p, nodes), None


def _lowrank_product(node):
    """The ``linear(linear(·, A), B)`` under scale / no-op casts of ``node`` (its lora_B linear), or None."""
    node = _strip_to(node)
    if _is_call(node, _MUL + _DIV):
        node = next((a for a in node.args if isinstance(a, fx.Node)), None)
    node = _strip_to(node)
    if _is_call(node, _LINEAR) and _is_call(_linear_args(node)[0], _LINEAR):
        return node
    return None


def _shapes_ok(x, NK, wdtype, b, terms, quant=False):
    """Why the site's shapes / dtypes do not fit pyhappy's op, or None. NK: the base weight's (N, K);
    wdtype: its dtype (None for a quantized base)."""
    xv = _val(x)
    if xv is None:
        return "no shape information on the graph"
    N, K = NK
    if xv.dim() < 1 or xv.shape[-1] != K:
        return "base weight is not [N, K] for this input"
    dt = xv.dtype
    if (wdtype is not None and wdtype != dt) or (b is not None and (_val(b) is None or _val(b).dtype != dt)):
        return "base weight / bias dtype differs from the input's"
    if b is not None and tuple(_val(b).shape) != (N,):
        return "the bias is not [N]"
    for t in terms:
        Av, Bv = _val(t.A), _val(t.B)
        if Av is None or Bv is None or Av.dim() != 2 or Bv.dim() != 2:
            return "adapter weights are not 2-D"
        if Av.shape[1] != K or Bv.shape[0] != N or Bv.shape[1] != Av.shape[0]:
            return "adapter shapes do not fit the base"
        if Av.dtype != dt or Bv.dtype != dt:
            return "adapter dtype differs from the input's (autocast / mixed dtypes)"
        if xv.device != Av.device:
            return "adapter on another device"
    if quant and dt not in (torch.float32, torch.bfloat16, torch.float16):
        return f"quantized base with {dt} activations"
    return None


def rewrite(gm: fx.GraphModule, *, dropout: str = "exact", int8_decode: bool = False) -> Report:
    """Rewrite ``base(x) + Σ s·linear(linear(drop(x), A), B)`` sites of a Dynamo graph (base: the
    spellings in the module docstring) into
    pyhappy::lora_linear (pyhappy::quant_linear on a bitsandbytes NF4 base) and linears on a merged
    sparse-delta weight into pyhappy::sparse_delta_linear, in place; returns the Report.
    int8_decode: the fused quantized bases run with pyhappy::quant_linear's int8_decode=True (CPU
    decode sizes quantize the activations to int8: faster, approximate); by default they are exact.
    dropout: "exact" (fuse only when dropout is the identity) or "pyhappy" (also replace active
    dropouts by pyhappy's)."""
    if dropout not in ("exact", "pyhappy"):
        raise ValueError(f"pyhappy.compiler.rewrite: dropout must be 'exact' or 'pyhappy', got {dropout!r}")
    if not isinstance(int8_decode, bool):
        raise TypeError(f"pyhappy.compiler.rewrite: int8_decode must be a bool, got {int8_decode!r}")
    g = gm.graph
    report = Report()
    explained = set()  # lora_B linears of LoRA-looking sites already in the report
    _rewrite_dora(gm, report, dropout, explained)
    _rewrite_vera(g, report, dropout, explained)
    g.eliminate_dead_code()
    for first in list(g.nodes):
        # A chain starts at add(base output, term) and extends outward while each next add takes the
        # previous one as its first argument and a term that parses (several adapters on one base).
        if not _is_call(first, _ADD) or first.graph is not g or len(first.args) != 2 or first.kwargs:
            continue
        lowrank = _lowrank_product(first.args[1])
        base, stripped = _strip_noop(first.args[0])
        q, d = None, None
        d, why = _dense_base(base)
        if d is None and why is None:
            q, why = _bnb_base(gm, base)
        if d is None and q is None:
            if why is not None and lowrank is not None:
                report.near_misses.append((first.name, why))
                explained.add(lowrank)
            continue
        if d is not None:
            x, b, NK, wdtype = d["x"], d["b"], (d["N"], d["K"]), _val(d["W"]).dtype
            base_nodes = d["nodes"]
        else:
            x, b, NK, wdtype = q["x"], q["bias"], (q["N"], q["K"]), None
            base_nodes = q["nodes"]
        parsed, why = _term(first.args[1], dropout, x)
        if parsed is None:
            if lowrank is not None:
                report.near_misses.append((first.name, why))
                explained.add(lowrank)
            continue
        terms, adds, node = [parsed], [first], first
        while len(node.users) == 1:
            nxt = next(iter(node.users))
            if not (_is_call(nxt, _ADD) and len(nxt.args) == 2 and nxt.args[0] is node and not nxt.kwargs):
                break
            more, why = _term(nxt.args[1], dropout, x)
            if more is None:
                lowrank = _lowrank_product(nxt.args[1])
                if lowrank is not None:
                    report.near_misses.append((nxt.name, f"a further adapter on the same base: {why}"))
                    explained.add(lowrank)
                break
            terms.append(more)
            adds.append(nxt)
            node = nxt
        x = _strip_to(x)
        explained.update(t.nodes[-2] for t in terms)
        why = _shapes_ok(x, NK, wdtype, b, terms, quant=q is not None)
        if why is None and len({t.p for t in terms}) > 1:
            why = "adapters with different dropout probabilities on one base"
        if why is None:
            intermediates = base_nodes + stripped + [n for t in terms for n in t.nodes] + adds
            if not all(all(u in intermediates for u in n.users) for n in intermediates if n is not node):
                why = "an intermediate result (base output or adapter hidden state) is used elsewhere"
        if why is not None:
            report.near_misses.append((node.name, why))
            continue
        p = terms[0].p
        if q is None and p == 0.0:
            why = _unfused_measured(x, (d["N"], d["K"]), b, terms)
            if why is not None:
                report.kept.append((node.name, why))
                continue
        with g.inserting_before(node):
            if len(terms) == 1:
                A, B, s = terms[0].A, terms[0].B, terms[0].scale
            else:
                A = g.call_function(torch.cat, ([t.A for t in terms], 0))
                Bs = [g.call_function(operator.mul, (t.B, t.scale)) if t.scale != 1.0 else t.B for t in terms]
                B = g.call_function(torch.cat, (Bs, 1))
                s = 1.0
            seed = None
            if p > 0:
                seed = g.call_function(torch.randint, (0, 2**31 - 1, (1,)),
                                       {"dtype": torch.int64, "device": _val(x).device})
            if q is None:
                W = g.call_method("t", (d["W"],)) if d["transposed"] else d["W"]
                fused = g.call_function(torch.ops.pyhappy.lora_linear.default, (x, W, b, A, B, None, float(s), p, seed))
            else:
                qd, am = _bnb_packed(g, q)
                fused = g.call_function(torch.ops.pyhappy.quant_linear.default,
                                        (x, qd, am, None, 0, q["N"], q["blocksize"], b, A, B, None, float(s), p, seed)
                                        + ((True,) if int8_decode else ()))
            out = g.call_function(operator.getitem, (fused, 0))
        out.meta.update(node.meta)
        node.replace_all_uses_with(out)
        site = {"kind": "lora" if q is None else "qlora", "node": node.name,
                "ranks": [tuple(_val(t.A).shape)[0] for t in terms], "dropout": p}
        if d is not None and d["transposed"]:
            site["weight"] = "[K, N]"
        report.sites.append(site)
    g.eliminate_dead_code()  # the LoRA sites' replaced nodes, before the bare quantized bases are looked for
    _rewrite_bnb(gm, report, int8_decode)
    _rewrite_sparse(g, report)
    g.eliminate_dead_code()
    _report_unexplained(g, report, explained)
    gm.recompile()
    return report


def _unfused_measured(x, NK, b, terms) -> str | None:
    """Why a dense LoRA site (dropout off) stays unfused, or None to fuse it: where pyhappy's measured
    dispatch serves an eager call of the site's shapes with the unfused formulation (its passes, or
    at small layers its whole step, measured against the op's: pyhappy._tune), the fused op in the
    graph would run those same products behind its own Python layers, and Inductor compiles the
    unfused ones as they are (``pyhappy.ops.lora_linear.unfused_verdict``: read from the tuning cache
    or measured now on synthetic tensors of the site's shapes). PYHAPPY_TUNE=off, another backend
    requested for lora_linear, non-CPU devices and symbolic shapes fuse."""
    import importlib

    ll = importlib.import_module("pyhappy.ops.lora_linear")
    xv, bv = _val(x), _val(b) if b is not None else None
    avs, bvs = [_val(t.A) for t in terms], [_val(t.B) for t in terms]
    vals = [xv, *avs, *bvs]
    if any(v is None for v in vals) or (b is not None and bv is None) or xv.device.type != "cpu":
        return None
    if xv.dtype not in ll.DTYPE_NAMES or not all(type(d) is int for v in vals for d in v.shape):
        return None  # (_shapes_ok has checked that every tensor of the site has x's dtype)
    N, K = NK
    M, r = xv.numel() // max(K, 1), sum(a.shape[0] for a in avs)
    recording = any(v.requires_grad for v in vals) or (bv is not None and bv.requires_grad)
    scale = 1.0 if len(terms) > 1 else float(terms[0].scale)  # several adapters: s folded into B
    dtype = ll.DTYPE_NAMES[xv.dtype]
    if not ll.unfused_verdict(M, K, N, r, dtype, bv is not None, recording, xv.requires_grad,
                              bv is not None and bv.requires_grad, scale):
        return None
    return (f"the measured dispatch serves this shape (M={M}, K={K}, N={N}, r={r}, {dtype}) with the "
            "unfused formulation; Inductor compiles it as it is")


# ---- PEFT's DoRA, VeRA and PVeRA forwards ------------------------------------------------------------


def _adapter_input(xd, x_base, dropout_mode):
    """(x, p, None) when the adapter input ``xd`` is the base layer's input ``x_base``, directly or
    through an adapter dropout (p its probability, 0 for an identity dropout), else (None, 0, reason)."""
    p = 0.0
    if _is_call(xd, _DROPOUT) and not _same_input(xd, x_base):
        args = list(xd.args) + [None] * 4
        prob = xd.kwargs.get("p", args[1] if args[1] is not None else 0.5)
        training = xd.kwargs.get("training", args[2] if args[2] is not None else True)
        if not isinstance(prob, (int, float)) or not isinstance(training, bool):
            return None, 0.0, "dropout arguments are not constants"
        if training and prob > 0:
            if dropout_mode != "pyhappy":
                return None, 0.0, (f"active dropout (p={prob}): pyhappy's dropout is a different random draw; "
                                   "make_backend(dropout='pyhappy') fuses it anyway")
            p = float(prob)
        xd = xd.args[0]
    if not _same_input(xd, x_base):
        return None, 0.0, "the adapter reads another input than the base layer"
    return xd, p, None


def _vec(node, n=None):
    """``node`` is a 1-D tensor (of length n)."""
    v = _val(node)
    return v is not None and v.dim() == 1 and (n is None or v.shape[0] == n)


def _mul_pair(node):
    """(a, b) of a two-operand multiply, else None."""
    if _is_call(node, _MUL) and len(node.args) == 2 and not node.kwargs:
        return node.args
    return None


def _vera_term(node, dropout_mode, x_base):
    """Parse PEFT's VeRA / PVeRA term on the base input ``x_base``:
    ``λ_b * linear(h, B)`` with ``h = λ_d * linear(drop(x), A)`` (VeRA) or ``h = chunk(λ_d * linear(drop(x),
    A), 2, dim=-1)[0]`` (PVeRA's mean path). Returns (dict(kind, x, A, B, ld, lb, p, nodes), None),
    (None, reason) for a VeRA-shaped term that does not fit, or (None, None) when it is no VeRA term."""
    pair = _mul_pair(_strip_to(node))
    if pair is None:
        return None, None
    top = _strip_to(node)
    lin = next((a for a in pair if _is_call(a, _LINEAR)), None)
    lb = next((a for a in pair if a is not lin), None)
    if lin is None or not _vec(lb):
        return None, None
    h, B, bB = _linear_args(lin)
    nodes = ([node] if node is not top else []) + [top, lin]
    kind = "vera"
    if _is_call(h, (operator.getitem,)) and h.args[1] == 0 and _is_method(h.args[0], ("chunk",)):
        ch = h.args[0]
        cargs = list(ch.args) + [None] * 3
        chunks, dim = ch.kwargs.get("chunks", cargs[1]), ch.kwargs.get("dim", cargs[2] if cargs[2] is not None else 0)
        hv = _val(ch.args[0])
        if chunks != 2 or hv is None or dim not in (-1, hv.dim() - 1):
            return None, None
        nodes += [h, ch]
        h, kind = ch.args[0], "pvera"
    elif _is_call(h, _ADD) and any(_is_call(a, (operator.getitem,)) and a.args[1] == 0 and
                                   _is_method(a.args[0], ("chunk",)) for a in h.args):
        return None, ("PVeRA sampling (training, or sample_at_inference): pyhappy's noise is a different draw "
                      "than torch.randn_like's")
    hp = _mul_pair(h)
    if hp is None:
        return None, None
    u = next((a for a in hp if _is_call(a, _LINEAR)), None)
    ld = next((a for a in hp if a is not u), None)
    if u is None or not _vec(ld):
        return None, None
    xd, A, bA = _linear_args(u)
    nodes += [h, u]
    if bA is not None or bB is not None:
        return None, f"{kind.upper()}'s projections with a bias"
    x, p, why = _adapter_input(xd, x_base, dropout_mode)
    if x is None:
        return None, why
    if xd is not x:
        nodes.append(xd)
    return {"kind": kind, "x": x, "A": A, "B": B, "ld": ld, "lb": lb, "p": p, "nodes": nodes}, None


def _vera_shapes_ok(x, NK, wdtype, b, t):
    """Why a VeRA / PVeRA site does not fit pyhappy's op, or None."""
    xv = _val(x)
    if xv is None:
        return "no shape information on the graph"
    N, K = NK
    if xv.dim() < 1 or xv.shape[-1] != K:
        return "base weight is not [N, K] for this input"
    dt = xv.dtype
    if wdtype != dt or (b is not None and (_val(b) is None or _val(b).dtype != dt or tuple(_val(b).shape) != (N,))):
        return "base weight / bias dtype or shape differs from the input's"
    Av, Bv = _val(t["A"]), _val(t["B"])
    if Av is None or Bv is None or Av.dim() != 2 or Bv.dim() != 2:
        return "projections are not 2-D"
    r = Bv.shape[1]
    rows = 2 * r if t["kind"] == "pvera" else r
    if Av.shape != (rows, K) or Bv.shape[0] != N or not _vec(t["ld"], rows) or not _vec(t["lb"], N):
        return "projection / lambda shapes do not fit the base"
    if any(_val(n).dtype != dt or _val(n).device != xv.device for n in (t["A"], t["B"], t["ld"], t["lb"])):
        return "projections / lambdas differ from the input in dtype or device"
    return None


def _site_closed(nodes, top):
    """Every node of a site other than ``top`` feeds only nodes of the site."""
    s = set(nodes)
    return all(all(u in s for u in n.users) for n in nodes if n is not top)


def _rewrite_vera(g: fx.Graph, report: Report, dropout_mode: str, explained: set) -> None:
    """``base(x) + λ_b * linear(λ_d * linear(drop(x), A), B)`` (PEFT's VeRA forward) ->
    pyhappy::vera_linear; with ``h = chunk(·, 2, -1)[0]`` (PVeRA's mean path) -> pyhappy::pvera_linear."""
    for top in list(g.nodes):
        if not _is_call(top, _ADD) or top.graph is not g or len(top.args) != 2 or top.kwargs:
            continue
        base, stripped = _strip_noop(top.args[0])
        d, why = _dense_base(base)
        t, twhy = _vera_term(top.args[1], dropout_mode, d["x"] if d is not None else None)
        if t is None and twhy is None:
            continue
        lin = t["nodes"][[n.op == "call_function" and _is_call(n, _LINEAR) for n in t["nodes"]].index(True)] \
            if t is not None else None
        if d is None:
            why = why or "a VeRA term not added to a base layer pyhappy recognises (linear, x @ W.T, addmm)"
        elif t is None:
            why = twhy
        else:
            x = _strip_to(t["x"])
            why = _vera_shapes_ok(x, (d["N"], d["K"]), _val(d["W"]).dtype, d["b"], t)
            if why is None and not _site_closed(d["nodes"] + stripped + t["nodes"] + [top], top):
                why = "an intermediate result (base output or adapter hidden state) is used elsewhere"
        if lin is not None:
            explained.add(lin)
        if why is not None:
            report.near_misses.append((top.name, why))
            continue
        p = t["p"]
        with g.inserting_before(top):
            seed = g.call_function(torch.randint, (0, 2**31 - 1, (1,)), {"dtype": torch.int64,
                                                                         "device": _val(x).device}) if p > 0 else None
            W = g.call_method("t", (d["W"],)) if d["transposed"] else d["W"]
            args = (x, W, d["b"], t["A"], t["B"], t["ld"], t["lb"], p)
            # z, the adapter's output before λ_b, saved for λ_b's gradient (as PEFT's autograd saves it)
            save_z = bool(getattr(_val(t["lb"]), "requires_grad", False))
            if t["kind"] == "vera":
                fused = g.call_function(torch.ops.pyhappy.vera_linear.default, (*args, seed, save_z))
            else:
                fused = g.call_function(torch.ops.pyhappy.pvera_linear.default, (*args, False, seed, None, save_z))
            out = g.call_function(operator.getitem, (fused, 0))
        out.meta.update(top.meta)
        top.replace_all_uses_with(out)
        report.sites.append({"kind": t["kind"], "node": top.name, "ranks": [tuple(_val(t["B"]).shape)[1]], "dropout": p})


_NORM = (torch._C._linalg.linalg_norm, torch.linalg.norm)


def _strip_detach(node, nodes):
    """Under no-op casts and ``.detach()`` (appending what it strips to ``nodes``)."""
    while True:
        under = _strip_to(node)
        if under is node and _is_method(node, ("detach",)) and len(node.args) == 1:
            under = node.args[0]
        if under is node:
            return node
        nodes.append(node)
        node = under


def _dora_weight(node, nodes):
    """The base weight under PEFT's ``transpose(weight, fan_in_fan_out)`` (the polyfill's ``W.T.detach()``),
    no-op casts and detaches: (W, True when it is read transposed), appending what it strips to ``nodes``."""
    W = _strip_detach(node, nodes)
    under, transposed = _untranspose(W)
    if transposed:
        nodes.append(W)
        W = _strip_detach(under, nodes)
    return W, transposed


def _dora_norm(node):
    """Parse PEFT's DoRA weight norm ``linalg_norm(W + s * linear(linear(eye(K), A), B).T, dim=1)`` (under
    no-op casts and detaches): dict(W, A, B, s, nodes) or None."""
    if not _is_call(node, _NORM) or len(node.args) != 1:
        return None
    if node.kwargs.get("dim") not in (1, -1, (1,), [1], (-1,), [-1]) or \
            any(node.kwargs.get(k) not in (None, False) for k in ("ord", "keepdim", "dtype")):
        return None
    nodes = [node]
    add = node.args[0]
    if not _is_call(add, _ADD) or len(add.args) != 2:
        return None
    nodes.append(add)
    for wc, term in (add.args, add.args[::-1]):
        pair = _mul_pair(term)
        if pair is None:
            continue
        s = next((a for a in pair if isinstance(a, (int, float)) and not isinstance(a, bool)), None)
        lw = next((a for a in pair if isinstance(a, fx.Node)), None)
        if s is None or lw is None:
            continue
        sub = [term]
        lw = _strip_detach(lw, sub)
        l2, transposed = _untranspose(lw)
        if not transposed or not _is_call(l2, _LINEAR):
            continue
        l1, B, bB = _linear_args(l2)
        if bB is not None or not _is_call(l1, _LINEAR):
            continue
        eye, A, bA = _linear_args(l1)
        if bA is not None or not _is_call(eye, (torch.eye,)):
            continue
        wnodes = []
        W, wt = _dora_weight(wc, wnodes)
        if _val(W) is None or _val(W).dim() != 2:
            continue
        return {"W": W, "transposed": wt, "A": A, "B": B, "s": float(s), "l2": l2,
                "nodes": nodes + sub + [lw, l2, l1, eye] + wnodes}
    return None


def _bnb_dequantized(W, q):
    """``W`` is bitsandbytes' ``dequantize_4bit`` of the weight the parsed 4-bit base ``q`` multiplies by
    (PEFT's dequantize_module_weight, traced): the same packed codes (its ``.data``), nf4, shape and
    blocksize, and the same absmax — or, double-quantized, ``dequantize_blockwise(absmax_8bit, absmax,
    code, nested_blocksize) + offset`` of the same tensors."""
    bnb = torch.ops.bitsandbytes
    if not (_is_call(W, (bnb.dequantize_4bit.default,)) and len(W.args) == 6 and not W.kwargs):
        return False
    data, absmax, bs, qt, shape, _ = W.args
    if bs != q["blocksize"] or qt != "nf4" or tuple(shape) != (q["N"], q["K"]):
        return False
    if _is_call(data, (torch._C._autograd._get_data_attr,)):
        data = data.args[0]
    if _unview(data)[0] is not _unview(q["packed"])[0]:
        return False
    if q["absmax_8bit"] is None:
        return _strip_to(absmax) is q["absmax"]
    if not (_is_call(absmax, _ADD) and len(absmax.args) == 2 and absmax.args[1] is q["offset"]):
        return False
    db = absmax.args[0]
    if not (_is_call(db, (bnb.dequantize_blockwise.default,)) and len(db.args) == 5 and not db.kwargs):
        return False
    code = db.args[2]
    if _is_method(code, ("to",)) and len(code.args) == 2 and not code.kwargs and \
            isinstance(code.args[1], torch.device) and _val(code.args[0]) is not None and \
            _val(code.args[0]).device == code.args[1]:
        code = code.args[0]
    return db.args[0] is q["absmax_8bit"] and db.args[1] is q["absmax"] and code is q["code"] and \
        db.args[3] == q["nested_blocksize"] and db.args[4] == torch.float32


def _qdora_norm(qdata, absmax, sqnorm, lora_A, lora_B, N: int, blocksize: int, scaling: float):
    """QDoRA's detached row norm ‖W_n + s·B_n A‖ of a packed NF4 weight, as QLoRALinear.dora_norm takes
    it: W Aᵀ one pyhappy::quant_linear of A's r rows, ‖W_n‖² from bnb_nf4_row_sqnorm, no [N, K] W."""
    from .ops.dora_linear import factored_weight_norm

    A, B = lora_A.detach(), lora_B.detach()
    P = torch.ops.pyhappy.quant_linear.default(A, qdata, absmax, None, 0, N, blocksize, None, None, None, None, 1.0,
                                               0.0, None)[0]
    return factored_weight_norm(P.t(), A, B, sqnorm, scaling, A.dtype)


def _single_user(node):
    return next(iter(node.users)) if len(node.users) == 1 else None


def _dora_site(gm, norm, dropout_mode):
    """From a parsed DoRA norm, PEFT's DoRA forward (peft/tuners/lora/dora.py, ``DoraLinearLayer.forward``
    added to the base output):

        ms = (m / norm.detach()).view(1, -1)
        top = result + ((ms - 1) * base_result + ms * linear(linear(xd, A), B) * s)

    base_result: ``result`` (no bias), ``result - b``, or ``linear(xd, W)`` while dropout is active.
    Returns (site dict, None) or (None, reason); the reason names the first step that does not fit."""
    nodes = list(norm["nodes"])
    n = norm["nodes"][0]
    while True:
        u = _single_user(n)
        if u is not None and (_strip_to(u) is n or (_is_method(u, ("detach",)) and len(u.args) == 1)):
            nodes.append(u)
            n = u
        else:
            break
    div = _single_user(n)
    if not (_is_call(div, _DIV) and len(div.args) == 2 and div.args[1] is n and _vec(div.args[0])):
        return None, "the DoRA norm does not divide a magnitude vector"
    mag = div.args[0]
    ms = _single_user(div)
    if not ((_is_method(ms, ("view", "reshape"))) and list(ms.args[1:]) in ([1, -1], [(1, -1)])):
        return None, "the DoRA scale is not (m / norm).view(1, -1)"
    nodes += [div, ms]
    users = list(ms.users)
    sub = next((u for u in users if _is_call(u, (operator.sub, torch.sub)) and u.args[0] is ms and u.args[1] == 1), None)
    mul7 = next((u for u in users if u is not sub and _mul_pair(u) is not None), None)
    if len(users) != 2 or sub is None or mul7 is None:
        return None, "the DoRA scale is not used as (ms - 1) * base + ms * lora"
    P = _single_user(sub)
    Q = _single_user(mul7)
    if _mul_pair(P) is None or _mul_pair(Q) is None:
        return None, "the DoRA scale is not used as (ms - 1) * base + ms * lora"
    base_result = next(a for a in P.args if a is not sub)
    lora_result = next(a for a in mul7.args if a is not ms)
    s2 = next((a for a in Q.args if a is not mul7), None)
    if not isinstance(s2, (int, float)) or float(s2) != norm["s"]:
        return None, "the DoRA term's scale differs from the norm's"
    nodes += [sub, P, mul7, Q]
    rd = _single_user(P)
    if rd is None or rd is not _single_user(Q) or not _is_call(rd, _ADD):
        return None, "the DoRA terms are not summed"
    top = _single_user(rd)
    if not (_is_call(top, _ADD) and len(top.args) == 2 and top.args[1] is rd and not top.kwargs):
        return None, "the DoRA term is not added to the base output"
    nodes += [rd, top]
    if not (_is_call(lora_result, _LINEAR) and _linear_args(lora_result)[2] is None and
            _linear_args(lora_result)[1] is norm["B"]):
        return None, "the DoRA term's low-rank product does not use the norm's lora_B"
    norm["lora_B"] = lora_result  # the term's low-rank product: explained by this site's report entry
    u1 = _linear_args(lora_result)[0]
    if not (_is_call(u1, _LINEAR) and _linear_args(u1)[1] is norm["A"] and _linear_args(u1)[2] is None):
        return None, "the DoRA term's low-rank product does not use the norm's lora_A"
    nodes += [lora_result, u1]
    base, stripped = _strip_noop(top.args[0])
    d, why = _dense_base(base)
    if d is None and why is None:  # QDoRA: a bitsandbytes 4-bit base, the norm over its dequantized weight
        q, why = _bnb_base(gm, base)
        if q is not None:
            if q.get("cpu_layout"):
                return None, "QDoRA on a weight bitsandbytes has repacked into its CPU layout"
            if norm["transposed"] or not _bnb_dequantized(norm["W"], q):
                return None, "QDoRA's norm is not taken over the base layer's dequantized 4-bit weight"
            d = {"x": q["x"], "W": norm["W"], "transposed": False, "b": q["bias"], "N": q["N"], "K": q["K"],
                 "nodes": q["nodes"], "q": q}
    if d is None and why is None and (_is_call(base, _ADD + _MUL) or (
            _is_call(base, (operator.getitem,)) and getattr(base.args[0].target, "namespace", None) == "pyhappy")):
        # PEFT's DoRA takes the running result (base + the adapters before it) as its base term
        return None, ("a further adapter on the same base: PEFT scales the base and the adapters before this DoRA "
                      "adapter by its m / ‖W + s·BA‖, which one dora_linear (one magnitude) does not compute")
    if d is None:
        return None, why or "DoRA on a base pyhappy does not recognise here (a linear, addmm, bitsandbytes 4-bit)"
    if d["W"] is not norm["W"] or d["transposed"] != norm["transposed"]:
        return None, "DoRA's norm is not taken over the base layer's weight as the layer reads it ([N, K])"
    nodes += d["nodes"] + stripped
    x_base, xd = d["x"], _linear_args(u1)[0]
    dropped = False
    if base_result is top.args[0] or base_result is base:
        if d["b"] is not None:
            return None, "DoRA with a bias but the base result is not result - bias"
        lora_x = xd
    elif _is_call(base_result, (operator.sub, torch.sub)) and base_result.args[0] in (top.args[0], base) and \
            base_result.args[1] is d["b"] and d["b"] is not None:
        nodes.append(base_result)
        lora_x = xd
    elif _is_call(base_result, _LINEAR) and _linear_args(base_result)[0] is xd and \
            _dora_weight(_linear_args(base_result)[1], []) == (norm["W"], norm["transposed"]) and \
            _linear_args(base_result)[2] is None:
        nodes.append(base_result)
        _dora_weight(_linear_args(base_result)[1], nodes)
        if not _is_call(xd, _DROPOUT):
            return None, "DoRA's base term reads another input than the base layer"
        lora_x, dropped = xd, True
    else:
        return None, "DoRA's base term is not the base output (or its dropped-out product)"
    x, p, why = _adapter_input(lora_x, x_base, dropout_mode)
    if x is None:
        return None, why
    if lora_x is not x:
        nodes.append(lora_x)
    if p == 0.0 and dropped:
        return None, "DoRA's base term on a dropout that is off"
    return {"top": top, "x": _strip_to(x), "d": d, "mag": mag, "p": p, "nodes": list(dict.fromkeys(nodes)),
            "lora_B": lora_result}, None


def _rewrite_dora(gm: fx.GraphModule, report: Report, dropout_mode: str, explained: set) -> None:
    """PEFT's DoRA forward (the norm of W + s·BA formed from ``linear(linear(eye(K), A), B).T``, see
    _dora_site) -> pyhappy::dora_weight_norm + pyhappy::dora_linear, which never form W + s·BA; on a
    bitsandbytes NF4 base (QDoRA) -> QLoRALinear's QDoRA forward: ms = m / _qdora_norm(...) and
    ``quant_linear(x, W, A, B, s) * ms (+ b)`` on the packed weight."""
    g = gm.graph
    for node in list(g.nodes):
        if node.graph is not g:
            continue
        norm = _dora_norm(node)
        if norm is None:
            continue
        explained.add(norm["l2"])
        site, why = _dora_site(gm, norm, dropout_mode)
        if "lora_B" in norm:
            explained.add(norm["lora_B"])
        if site is not None:
            d, x, top = site["d"], site["x"], site["top"]
            term = _Term(x, norm["A"], norm["B"], norm["s"], site["p"], [])
            why = _shapes_ok(x, (d["N"], d["K"]), None if "q" in d else _val(d["W"]).dtype, d["b"], [term],
                             quant="q" in d)
            mv = _val(site["mag"])
            if why is None and (mv.shape != (d["N"],) or mv.dtype != _val(x).dtype or mv.device != _val(x).device):
                why = "the DoRA magnitude is not [N] in the input's dtype and device"
            if why is None and not _site_closed(site["nodes"], top):
                why = "an intermediate result (base output, norm or adapter hidden state) is used elsewhere"
            if why is None and site["p"] > 0 and "q" in d:
                why = ("QDoRA with active dropout (PEFT's base term on the dropped-out input): pyhappy fuses "
                       "QDoRA with dropout off")
            if why is None and site["p"] > 0 and d["transposed"] and _val(d["W"]).requires_grad:
                # PEFT's transpose makes a fresh Parameter of W.T for the dropped-out base term, so W gets
                # no gradient from that term; dora_linear's weight gradient includes it
                why = "active dropout on a trainable fan_in_fan_out weight (PEFT gives W no gradient from its base term)"
        if why is not None:
            report.near_misses.append((node.name, f"DoRA: {why}"))
            continue
        if "q" in d:
            _rewrite_qdora(g, site, norm)
            report.sites.append({"kind": "qdora", "node": top.name, "ranks": [tuple(_val(norm["A"]).shape)[0]],
                                 "dropout": 0.0})
            continue
        p = site["p"]
        with g.inserting_before(top):
            # a Conv1D weight [K, N] is read as W.t(), a view: the ops take strided weights, no [N, K] copy
            W = g.call_method("t", (d["W"],)) if d["transposed"] else d["W"]
            wn = g.call_function(torch.ops.pyhappy.dora_weight_norm.default, (W, norm["A"], norm["B"], None, norm["s"]))
            seed = g.call_function(torch.randint, (0, 2**31 - 1, (1,)), {"dtype": torch.int64,
                                                                         "device": _val(x).device}) if p > 0 else None
            fused = g.call_function(torch.ops.pyhappy.dora_linear.default,
                                    (x, W, d["b"], norm["A"], norm["B"], site["mag"], wn, norm["s"], p, seed))
            out = g.call_function(operator.getitem, (fused, 0))
        out.meta.update(top.meta)
        top.replace_all_uses_with(out)
        site = {"kind": "dora", "node": top.name, "ranks": [tuple(_val(norm["A"]).shape)[0]], "dropout": p}
        if d["transposed"]:
            site["weight"] = "[K, N]"
        report.sites.append(site)


def _rewrite_qdora(g: fx.Graph, site: dict, norm: dict) -> None:
    """Replace a parsed QDoRA site (dropout off) by ``quant_linear(x, W, A, B, s) * (m / norm) (+ b)`` on
    the packed weight (QLoRALinear's QDoRA forward), the norm from _qdora_norm."""
    from .ops import quant_linear  # noqa: F401  (registers pyhappy::bnb_nf4_row_sqnorm)

    q, x, top = site["d"]["q"], site["x"], site["top"]
    with g.inserting_before(top):
        qd, am = _bnb_packed(g, q)
        sq = g.call_function(torch.ops.pyhappy.bnb_nf4_row_sqnorm.default,
                             (q["packed"], q["absmax"], q["absmax_8bit"], q["code"], q["offset"], q["N"], q["K"],
                              q["blocksize"], q["nested_blocksize"]))
        wn = g.call_function(_qdora_norm, (qd, am, sq, norm["A"], norm["B"], q["N"], q["blocksize"], norm["s"]))
        ms = g.call_function(operator.truediv, (site["mag"], wn))
        fused = g.call_function(torch.ops.pyhappy.quant_linear.default,
                                (x, qd, am, None, 0, q["N"], q["blocksize"], None, norm["A"], norm["B"], None,
                                 norm["s"], 0.0, None))
        out = g.call_function(operator.mul, (g.call_function(operator.getitem, (fused, 0)), ms))
        if q["bias"] is not None:
            out = g.call_function(operator.add, (out, q["bias"]))
    out.meta.update(top.meta)
    top.replace_all_uses_with(out)


def _report_unexplained(g: fx.Graph, report: Report, explained: set) -> None:
    """Every low-rank product ``linear(linear(·, A), B)`` (r < min(N, K)) still in the graph that no
    fused site took and no near-miss names goes into the report, with what its output feeds."""
    for node in g.nodes:
        if not _is_call(node, _LINEAR) or node in explained:
            continue
        u, B, bB = _linear_args(node)
        if not _is_call(u, _LINEAR):
            continue
        A = _linear_args(u)[1]
        Av, Bv = _val(A), _val(B)
        if Av is None or Bv is None or Av.dim() != 2 or Bv.dim() != 2 or \
                Av.shape[0] >= min(Av.shape[1], Bv.shape[0]):
            continue
        top = node
        while len(top.users) == 1 and (_is_call(next(iter(top.users)), _MUL + _DIV) or
                                       _strip_to(next(iter(top.users))) is top):
            top = next(iter(top.users))
        users = list(top.users)
        add = users[0] if len(users) == 1 and _is_call(users[0], _ADD) and len(users[0].args) == 2 else None
        if add is not None:
            other = next((a for a in add.args if a is not top), None)
            desc = getattr(other, "target", other) if isinstance(other, fx.Node) else repr(other)
            desc = getattr(desc, "__name__", str(desc))
            why = (f"a low-rank product added to {desc}, which is not a base layer pyhappy recognises "
                   "(linear, x @ W.T, addmm, bitsandbytes 4-bit)")
        else:
            names = sorted({getattr(getattr(n, "target", None), "__name__", str(getattr(n, "target", n))) for n in users})
            why = f"a low-rank product not added to a base layer's output (it feeds {', '.join(names) or 'nothing'})"
        if bB is not None or _linear_args(u)[2] is not None:
            why = "a low-rank product with a bias on lora_A / lora_B"
        report.near_misses.append((top.name, why))


def _rewrite_bnb(gm: fx.GraphModule, report: Report, int8_decode: bool) -> None:
    """bitsandbytes 4-bit matmuls left without a LoRA -> pyhappy::quant_linear (frozen quantized base)."""
    g = gm.graph
    seen = set()  # nodes of a base already fused or reported (outermost first: its cast / bias add included)
    for node in reversed(list(g.nodes)):
        if node.op != "call_function" or node.graph is not g or not node.users or node in seen:
            continue
        q, why = _bnb_base(gm, node)
        if q is None:
            if why is not None:
                report.near_misses.append((node.name, why))
                n = node
                while isinstance(n, fx.Node) and n.op == "call_function" and n.args:  # the base under it
                    seen.add(n)
                    n = _strip_to(n.args[0]) if _is_call(n, _ADD + (operator.getitem,)) else _strip_to(n)
                    if n in seen:
                        break
            continue
        seen.update(q["nodes"])
        xv = _val(q["x"])
        if xv is None or xv.shape[-1] != q["K"] or xv.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            report.near_misses.append((node.name, "the input does not fit the quantized weight"))
            continue
        with g.inserting_before(node):
            qd, am = _bnb_packed(g, q)
            fused = g.call_function(torch.ops.pyhappy.quant_linear.default,
                                    (q["x"], qd, am, None, 0, q["N"], q["blocksize"], q["bias"], None, None, None,
                                     1.0, 0.0, None) + ((True,) if int8_decode else ()))
            out = g.call_function(operator.getitem, (fused, 0))
        out.meta.update(node.meta)
        node.replace_all_uses_with(out)
        report.sites.append({"kind": "quant", "node": node.name, "format": "nf4", "blocksize": q["blocksize"]})


def _sparse_shapes_ok(x, W, b, idx, rc, v):
    xv, Wv, vv = _val(x), _val(W), _val(v)
    if xv is None or Wv is None or vv is None:
        return "no shape information on the graph"
    if Wv.dim() != 2 or xv.shape[-1] != Wv.shape[1]:
        return "base weight is not [N, K] for this input"
    if Wv.numel() >= 2**31:
        return "the weight has 2^31 or more entries (int32 indices)"
    if Wv.dtype != xv.dtype or vv.dtype != xv.dtype or (b is not None and (_val(b) is None or _val(b).dtype != xv.dtype)):
        return "weight / delta values / bias dtype differs from the input's"
    if vv.dim() != 1:
        return "delta values are not 1-D"
    for t in ((idx,) if rc is None else rc):
        tv = _val(t)
        if tv is None or tv.dim() != 1 or tv.dtype not in (torch.int32, torch.int64) or tv.shape[0] != vv.shape[0]:
            return "delta indices are not 1-D integers, one per value"
    if any(_val(t) is not None and _val(t).device != xv.device for t in (W, v)):
        return "delta on another device"
    return None


def _rewrite_sparse(g: fx.Graph, report: Report) -> None:
    """linear(x, W + sparse delta, b) -> pyhappy::sparse_delta_linear (see the module docstring)."""
    from .ops import sparse_delta_linear  # noqa: F401  (registers pyhappy::sparse_pattern)

    for lin in list(g.nodes):
        if not _is_call(lin, _LINEAR):
            continue
        x, wnode, b = _linear_args(lin)
        if not isinstance(wnode, fx.Node) or wnode.op in ("placeholder", "get_attr"):
            continue
        parsed, why = _sparse_weight(wnode)
        if parsed is None:
            if why != "not a merged sparse weight":
                report.near_misses.append((lin.name, why))
            continue
        W, idx, rc, v, s, nodes = parsed
        why = _sparse_shapes_ok(x, W, b, idx, rc, v)
        if why is None and tuple(_val(wnode).shape) != tuple(_val(W).shape):
            why = "the merged weight's shape differs from the base weight's"
        if why is None and not all(all(u in nodes or u is lin for u in n.users) for n in nodes):
            why = "the merged weight (or a piece of it) is used elsewhere"
        if why is not None:
            report.near_misses.append((lin.name, why))
            continue
        N, K = _val(W).shape
        with g.inserting_before(lin):
            if rc is not None:
                flat = g.call_function(operator.add, (g.call_function(operator.mul, (rc[0], K)), rc[1]))
            else:
                flat = idx
            pat = g.call_function(torch.ops.pyhappy.sparse_pattern.default, (flat, N, K))
            ind = g.call_function(operator.getitem, (pat, 0))
            perm = g.call_function(operator.getitem, (pat, 1))
            lay = g.call_function(operator.getitem, (pat, 2))
            vs = g.call_function(torch.index_select, (v, 0, perm))
            out = g.call_function(torch.ops.pyhappy.sparse_delta_linear.default, (x, W, b, vs, ind, lay, int(N), s))
        out.meta.update(lin.meta)
        lin.replace_all_uses_with(out)
        report.sites.append({"kind": "sparse_delta", "node": lin.name, "nnz": int(_val(v).shape[0]), "scale": s})


_POLYFILLED = set()


def _bnb_dequantize_4bit(weight):
    """What PEFT's dequantize_module_weight returns for a bitsandbytes 4-bit weight (its
    ``dequantize_bnb_weight``: ``bitsandbytes.functional.dequantize_4bit``), traced into the graph."""
    import bitsandbytes as bnb

    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)


def register_peft_polyfills() -> bool:
    """Let Dynamo trace PEFT's DoRA forward in one graph. Two PEFT helpers break the graph once per
    DoRA layer (and split the DoRA pattern across graphs):

    * ``peft.utils.integrations.dequantize_module_weight`` asks
      ``type(module.weight).__module__.startswith("torchao.")``, which Dynamo cannot trace. Its stand-in
      returns ``module.weight`` when it is a plain Parameter or Tensor on a module without HQQ's W_q —
      what PEFT's function returns for those — and calls PEFT's function, outside the graph, for
      anything else.
    * ``peft.utils.other.transpose(weight, fan_in_fan_out)`` (DoRA on GPT-2's Conv1D) wraps ``weight.T``
      in a fresh ``nn.Parameter`` when weight is one, a constructor Dynamo refuses. That Parameter is a
      new leaf sharing W's storage: nothing flows from it back to W. Its stand-in returns
      ``weight.T.detach()`` for a Parameter (the same values, the same gradients of everything upstream:
      none reach W through it) and ``weight.T`` for any other tensor, as PEFT's function does.

    The stand-ins (``torch._dynamo.substitute_in_graph``) are used only while Dynamo traces. Done only
    when peft is already imported (pyhappy never imports it); called by ``make_backend``, when this
    module is imported and whenever the backend runs. A program that imports pyhappy.compiler before
    peft and compiles with ``pyhappy.compiler.backend`` should call it once before its first compile
    (later compiles find it in place). Returns whether both stand-ins are in place."""
    import sys

    def dequantize_module_weight(eager):
        def dequantize_module_weight(module):
            if not hasattr(module, "W_q"):
                w = module.weight
                if type(w) is torch.nn.Parameter or type(w) is torch.Tensor:
                    return w
                if type(w).__name__ == "Params4bit" and getattr(w, "quant_state", None) is not None:
                    return _bnb_dequantize_4bit(w)
            return eager(module)

        return dequantize_module_weight

    def transpose(eager):
        def transpose(weight, fan_in_fan_out):
            if not fan_in_fan_out:
                return weight
            if isinstance(weight, torch.nn.Parameter):
                return weight.T.detach()
            return weight.T

        return transpose

    ok = True
    for modname, name, make in (("peft.utils.integrations", "dequantize_module_weight", dequantize_module_weight),
                                ("peft.utils.other", "transpose", transpose)):
        fn = getattr(sys.modules.get(modname), name, None)
        if fn is None:
            ok = False
            continue
        if id(fn) in _POLYFILLED:
            continue
        try:
            torch._dynamo.substitute_in_graph(fn, skip_signature_check=True)(make(torch.compiler.disable(fn)))
        except (TypeError, ValueError, RuntimeError, AttributeError) as e:  # another torch's rules: stay unfused
            logger.info("pyhappy.compiler: PEFT's %s not polyfilled (%s)", name, e)
            ok = False
            continue
        _POLYFILLED.add(id(fn))
    return ok


def make_backend(inner="inductor", dropout: str = "exact", verbose: bool = False, int8_decode: bool = False):
    """A torch.compile backend: ``rewrite`` then ``inner`` ("inductor", or any backend callable).
    Also registers the PEFT polyfill (``register_peft_polyfills``) if peft is imported."""
    if dropout not in ("exact", "pyhappy"):
        raise ValueError(f"pyhappy.compiler.make_backend: dropout must be 'exact' or 'pyhappy', got {dropout!r}")
    if not isinstance(int8_decode, bool):
        raise TypeError(f"pyhappy.compiler.make_backend: int8_decode must be a bool, got {int8_decode!r}")
    register_peft_polyfills()

    def _backend(gm: fx.GraphModule, example_inputs):
        import pyhappy.ops  # noqa: F401  (registers the op and its fakes)

        register_peft_polyfills()
        rep = rewrite(gm, dropout=dropout, int8_decode=int8_decode)
        _backend.reports.append(rep)
        if verbose:
            print(rep)
        if not rep.sites and rep.near_misses:
            msg = _nothing_fused_message(rep)
            if msg not in _backend.warned:  # recompiles of the same code say it once
                _backend.warned.add(msg)
                logger.warning(msg)
        if inner == "inductor":
            from torch._inductor.compile_fx import compile_fx

            return compile_fx(gm, example_inputs)
        if callable(inner):
            return inner(gm, example_inputs)
        from torch._dynamo import lookup_backend

        return lookup_backend(inner)(gm, example_inputs)

    _backend.reports = []
    _backend.warned = set()
    return _backend


def _nothing_fused_message(rep: Report) -> str:
    """One line: nothing fused in a graph, and each distinct reason with how many sites it covers."""
    counts = {}
    for _, why in rep.near_misses:
        counts[why] = counts.get(why, 0) + 1
    reasons = "; ".join(f"{why} ({n} site{'s' if n > 1 else ''})" for why, n in counts.items())
    return (f"pyhappy.compiler: nothing fused in this graph; {len(rep.near_misses)} LoRA-looking / quantized "
            f"site(s) left alone: {reasons}")


def backend(gm: fx.GraphModule, example_inputs):
    """``torch.compile(model, backend=pyhappy.compiler.backend)``: rewrite LoRA and sparse-delta sites,
    then Inductor."""
    return _default(gm, example_inputs)


_default = make_backend()


__all__ = ["Report", "backend", "make_backend", "register_peft_polyfills", "rewrite"]
