"""Eager training calls of an op without the custom-op dispatcher.

Each op is registered with torch.library (schema, fake kernel, autograd formula), which is what
torch.compile traces. In eager mode the dispatcher's autograd wrapper around a registered op costs
a fixed amount of Python work per call, forward and backward, that is measurable next to a small
product's kernels (benchmarks/README.md, "Design measurements"). ``eager_function`` builds a
``torch.autograd.Function`` from the same pieces the op registers (its checked forward body, its
``setup_context`` and its ``backward``), so an eager call that autograd records runs the same
implementation and the same gradient formula without that wrapper; the op's backward reads
``ctx.backward_op`` (the backward body, called directly) where the registered path calls the
backward op through the dispatcher.

lora_linear and quant_linear go one step further once the measured dispatch has decided a layer's
passes: their training calls run as one C++ autograd node with the same kernels and gradient
formula (``pyhappy._C.lora_linear_step`` / ``quant_linear_step``; ``_serving`` in each op's module),
without this Function's Python work in the forward and backward. A small layer's whole step is
timed as those nodes against the unfused formulation (``offered_nodes``, ``step_way``).
"""

from __future__ import annotations

import torch

from .. import _ext


def body(op_def):
    """The Python function a torch.library op was defined from (``custom_op`` / ``triton_op``), called
    directly; the registered op (through the dispatcher) where torch keeps it elsewhere."""
    fn = getattr(op_def, "_init_fn", None)
    return fn if callable(fn) else op_def


class EagerOp:
    """Runs an op's training call: through the registered op while torch.compile traces (what Dynamo
    records), else through ``apply``, the autograd.Function built by ``eager_function``."""

    def __init__(self, op_name: str, function):
        self.op_name, self.function, self.apply = op_name, function, function.apply

    def __call__(self, *args):
        if torch.compiler.is_compiling():
            return getattr(torch.ops.pyhappy, self.op_name)(*args)
        return self.apply(*args)


def eager_function(name: str, op_def, setup_context, backward, backward_def=None) -> EagerOp:
    """An ``EagerOp`` whose autograd.Function runs ``op_def``'s body, then
    ``setup_context(ctx, inputs, output)`` with ``ctx.backward_op`` = ``backward_def``'s body (an op
    whose backward calls no backward op passes None); its backward is ``backward(ctx, *grads)``.
    Inputs and outputs are the op's, one gradient (or None) per input. ``name`` names the Function."""
    forward, backward_op = body(op_def), (None if backward_def is None else body(backward_def))

    def fwd(ctx, *inputs):
        out = forward(*inputs)
        setup_context(ctx, inputs, out)
        if backward_op is not None:
            ctx.backward_op = backward_op
        return out

    def bwd(ctx, *grads):
        return backward(ctx, *grads)

    fn = type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(bwd),
                                                  "__doc__": f"Eager autograd of {name}, see pyhappy/ops/_eager.py."})
    return EagerOp(op_def._name if hasattr(op_def, "_name") else op_def.__name__, fn)


# The C++ node running the unfused formulation's products in both passes: those products without the
# formulation's Python autograd layers (what a large layer with two "torch" picks runs too); a traced
# call keeps the plain products where it serves.
UNFUSED_NODE = "step:torch/torch"


def offered_nodes(picks, table, step_fn) -> tuple:
    """The C++ nodes (keys of ``table``, an op's _NODES) a small layer's whole-step measurement times
    against the unfused formulation (lora_linear's and quant_linear's ``_serving``), all in the same
    rounds: the node of its passes' picks (``node_passes``, first); the node with pyhappy's kernels
    on both passes, so that a pass whose measurement called a near tie for the unfused products
    does not decide alone which node meets the unfused formulation; and the node running the
    unfused products on both passes, the unfused formulation's own products without its Python
    autograd layers, where the passes' kernels win alone but not inside a step. The nodes are the
    measurement's incumbents (``whole_call_pick``): the fastest serves unless the unfused
    formulation beats it by the margin (serving that formulation from the op's entry point adds the
    entry's Python work to each call, which its measurement does not see). (None,) (the registered
    op) where the extension lacks the node's function ``step_fn`` or a pass is undecided."""
    first = "step:{}/{}".format(*picks)
    if first not in table or not hasattr(_ext.load(), step_fn):
        return (None,)
    return tuple(dict.fromkeys((first, "step:cpp/cpp", UNFUSED_NODE)))


def step_way(hit, nodes):
    """How a training call is served from its whole-step decision ``hit`` (``whole_call_pick``) and the
    nodes it was offered (the first: the passes' picks): "unfused", the node that won, the passes'
    node where the step was not measured (large layers, "op"), or None (undecided: the registered op)."""
    if hit == "torch":
        return "unfused"
    if hit in nodes:
        return hit
    return nodes[0] if hit is not None else None
