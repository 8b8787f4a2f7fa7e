"""pyhappy.compiler: a torch.compile backend that rewrites unfused LoRA code into pyhappy's fused op.

    model = torch.compile(peft_model, backend=pyhappy.compiler.backend)        # PEFT model as is
    model = torch.compile(model, backend=pyhappy.compiler.make_backend(dropout="pyhappy"))

The backend rewrites the Dynamo FX graph (torch-level IR, before AOTAutograd), then hands it to
Inductor; AOTAutograd then differentiates the registered pyhappy::lora_linear op with its own
fused backward. ``rewrite(gm)`` does the rewrite alone and returns a report (sites and near-misses).

Pattern (matched structurally on the graph, never by module names):

    out = linear(x, W, b) + Σ_i  s_i · linear(linear(drop_i(x), A_i), B_i)

with each term spelled ``mul(t, s)``, ``mul(s, t)``, ``div(t, d)`` or plain ``t`` (scale inside B);
drop_i either absent, a dropout with p = 0 or training=False (identity), or with
``dropout="pyhappy"`` an active dropout (then replaced by pyhappy's counter-hash dropout: the same
distribution, a different random draw than torch's — hence opt-in). Several adapters summed on one
base become one lora_linear of rank Σ r_i with A = cat(A_i) and B = cat(s_i·B_i) (built in the
graph, so gradients reach every A_i, B_i). A site whose shapes, dtypes or form do not fit exactly is
left alone and reported as a near-miss with the reason: the rewrite never changes results beyond
float rounding.

Not yet rewritten (reported by nothing, left to Inductor): bitsandbytes dequantize-then-matmul
(quantized base) and clone+scatter sparse deltas — see the issue notes.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

_LINEAR = (torch._C._nn.linear, F.linear)
_ADD = (operator.add, torch.add, operator.iadd)
_MUL = (operator.mul, torch.mul, operator.imul)
_DIV = (operator.truediv, torch.div)
_DROPOUT = (F.dropout, torch.dropout, torch.nn.functional.dropout)


@dataclasses.dataclass
class Report:
    """What ``rewrite`` did: each site (the base linear's node name and the adapters' ranks) and each
    near-miss (node name, reason)."""

    sites: list = dataclasses.field(default_factory=list)
    near_misses: list = dataclasses.field(default_factory=list)

    def __len__(self):
        return len(self.sites)

    def __str__(self):
        lines = [f"pyhappy.compiler: {len(self.sites)} LoRA site(s) fused"]
        lines += [f"  fused {s['node']}: ranks {s['ranks']}" for s in self.sites]
        lines += [f"  left alone {n}: {why}" for n, why in self.near_misses]
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


def _term(node, dropout_mode):
    """Parse ``s · linear(linear(drop(x), A), B)``: (x, A, B, s, p, reason_if_not)."""
    scale = 1.0
    if _is_call(node, _MUL):
        a, b = node.args[0], node.args[1]
        if isinstance(b, (int, float)) and isinstance(a, fx.Node):
            node, scale = a, float(b)
        elif isinstance(a, (int, float)) and isinstance(b, fx.Node):
            node, scale = b, float(a)
        else:
            return None, "scale is not a Python number"
    elif _is_call(node, _DIV) and isinstance(node.args[1], (int, float)):
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
    p = 0.0
    if _is_call(xd, _DROPOUT):
        args = list(xd.args) + [None] * 4
        prob = xd.kwargs.get("p", args[1] if args[1] is not None else 0.5)
        training = xd.kwargs.get("training", args[2] if args[2] is not None else True)
        if not isinstance(prob, (int, float)) or not isinstance(training, bool):
            return None, "dropout arguments are not constants"
        x = xd.args[0]
        if training and prob > 0:
            if dropout_mode != "pyhappy":
                return None, (f"active dropout (p={prob}): pyhappy's dropout is a different random draw; "
                              "make_backend(dropout='pyhappy') fuses it anyway")
            p = float(prob)
    else:
        x = xd
    return (x, A, B, scale, p, u, node), None


def _shapes_ok(x, W, b, terms):
    xv, Wv = _val(x), _val(W)
    if xv is None or Wv is None:
        return "no shape information on the graph"
    if Wv.dim() != 2 or xv.shape[-1] != Wv.shape[1]:
        return "base weight is not [N, K] for this input"
    dt = xv.dtype
    if Wv.dtype != dt or (b is not None and (_val(b) is None or _val(b).dtype != dt)):
        return "base weight / bias dtype differs from the input's"
    for (_, A, B, *_rest) in terms:
        Av, Bv = _val(A), _val(B)
        if Av is None or Bv is None or Av.dim() != 2 or Bv.dim() != 2:
            return "adapter weights are not 2-D"
        if Av.shape[1] != Wv.shape[1] or Bv.shape[0] != Wv.shape[0] or Bv.shape[1] != Av.shape[0]:
            return "adapter shapes do not fit the base"
        if Av.dtype != dt or Bv.dtype != dt:
            return "adapter dtype differs from the input's (autocast / mixed dtypes)"
        if xv.device != Av.device:
            return "adapter on another device"
    return None


def rewrite(gm: fx.GraphModule, *, dropout: str = "exact") -> Report:
    """Rewrite ``linear(x, W, b) + Σ s·linear(linear(drop(x), A), B)`` sites of a Dynamo graph into
    pyhappy::lora_linear, in place; returns the Report. dropout: "exact" (fuse only when dropout is
    the identity) or "pyhappy" (also replace active dropouts by pyhappy's)."""
    if dropout not in ("exact", "pyhappy"):
        raise ValueError(f"pyhappy.compiler.rewrite: dropout must be 'exact' or 'pyhappy', got {dropout!r}")
    g = gm.graph
    report = Report()
    for first in list(g.nodes):
        # A chain starts at add(linear(x, W, b), term) and extends outward while each next add takes the
        # previous one as its first argument and a term that parses (several adapters on one base).
        if not _is_call(first, _ADD) or first.graph is not g or len(first.args) != 2 or first.kwargs:
            continue
        base = first.args[0]
        if not _is_call(base, _LINEAR):
            continue
        x, W, b = _linear_args(base)
        parsed, why = _term(first.args[1], dropout)
        if parsed is not None and parsed[0] is not x:
            parsed, why = None, "the adapter reads another input than the base layer"
        if parsed is None:
            if _is_call(first.args[1], _MUL + _DIV + _LINEAR):
                report.near_misses.append((first.name, why))
            continue
        terms, adds, node = [parsed], [first], first
        while len(node.users) == 1:
            nxt = next(iter(node.users))
            if not (_is_call(nxt, _ADD) and len(nxt.args) == 2 and nxt.args[0] is node and not nxt.kwargs):
                break
            more, _ = _term(nxt.args[1], dropout)
            if more is None or more[0] is not x:
                break
            terms.append(more)
            adds.append(nxt)
            node = nxt
        terms_nodes = [a.args[1] for a in adds]
        why = _shapes_ok(x, W, b, terms)
        if why is None and len({t[4] for t in terms}) > 1:
            why = "adapters with different dropout probabilities on one base"
        if why is None:
            intermediates = [base] + [n for t in terms for n in (t[5], t[6])] + terms_nodes + adds
            if not all(all(u in intermediates for u in n.users) for n in intermediates if n is not node):
                why = "an intermediate result (base output or adapter hidden state) is used elsewhere"
        if why is not None:
            report.near_misses.append((node.name, why))
            continue
        p = terms[0][4]
        with g.inserting_before(node):
            if len(terms) == 1:
                _, A, B, s, _, _, _ = terms[0]
            else:
                A = g.call_function(torch.cat, ([t[1] for t in terms], 0))
                Bs = [g.call_function(operator.mul, (t[2], t[3])) if t[3] != 1.0 else t[2] for t in terms]
                B = g.call_function(torch.cat, (Bs, 1))
                s = 1.0
            seed = None
            if p > 0:
                seed = g.call_function(torch.randint, (0, 2**31 - 1, (1,)),
                                       {"dtype": torch.int64, "device": _val(x).device})
            fused = g.call_function(torch.ops.pyhappy.lora_linear.default, (x, W, b, A, B, None, float(s), p, seed))
            out = g.call_function(operator.getitem, (fused, 0))
        out.meta.update(node.meta)
        node.replace_all_uses_with(out)
        report.sites.append({"node": node.name, "ranks": [tuple(_val(t[1]).shape)[0] for t in terms],
                             "dropout": p})
    g.eliminate_dead_code()
    gm.recompile()
    return report


def make_backend(inner="inductor", dropout: str = "exact", verbose: bool = False):
    """A torch.compile backend: ``rewrite`` then ``inner`` ("inductor", or any backend callable)."""
    if dropout not in ("exact", "pyhappy"):
        raise ValueError(f"pyhappy.compiler.make_backend: dropout must be 'exact' or 'pyhappy', got {dropout!r}")

    def _backend(gm: fx.GraphModule, example_inputs):
        import pyhappy.ops  # noqa: F401  (registers the op and its fakes)

        rep = rewrite(gm, dropout=dropout)
        _backend.reports.append(rep)
        if verbose:
            print(rep)
        if inner == "inductor":
            from torch._inductor.compile_fx import compile_fx

            return compile_fx(gm, example_inputs)
        if callable(inner):
            return inner(gm, example_inputs)
        from torch._dynamo import lookup_backend

        return lookup_backend(inner)(gm, example_inputs)

    _backend.reports = []
    return _backend


def backend(gm: fx.GraphModule, example_inputs):
    """``torch.compile(model, backend=pyhappy.compiler.backend)``: rewrite LoRA sites, then Inductor."""
    return _default(gm, example_inputs)


_default = make_backend()


__all__ = ["Report", "backend", "make_backend", "rewrite"]
