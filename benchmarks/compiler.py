"""Benchmark family ``compiler``: a PEFT LoRA model's training step, compiled three ways.

Variants (tiny-to-small Llama built from a config; LoRA r=16 on q/k/v/o/gate/up/down; fwd+bwd):
  pyhappy_backend  torch.compile(peft_model, backend=pyhappy.compiler.backend): the unfused LoRA
                   rewritten into pyhappy::lora_linear in the graph
  inductor         torch.compile(peft_model) with plain Inductor
  from_peft        the same model converted with pyhappy.from_peft, compiled with plain Inductor
Needs peft and transformers (optional): without them the family has no LoRA cases.

Sparse fine-tuning written by hand as ``F.linear(x, W.reshape(-1).index_add(0, idx, v).view_as(W), b)``
(1% of a 4096² weight, M=512, fwd+bwd, v trainable), compiled two ways, and the pyhappy module:
  pyhappy_backend  torch.compile(model, backend=pyhappy.compiler.backend): pyhappy::sparse_delta_linear
  inductor         plain Inductor (the merged [N, K] weight and its dense gradient materialise)
  module           pyhappy.nn.SparseDeltaLinear on the same pattern, compiled with Inductor

QLoRA as bitsandbytes + PEFT write it (an NF4 ``Linear4bit`` 4096², double-quantized, PEFT LoRA r=16,
M=512, fwd+bwd; needs bitsandbytes and peft):
  pyhappy_backend  the PEFT model compiled with pyhappy.compiler.backend: pyhappy::quant_linear
  inductor         the PEFT model compiled with plain Inductor (bitsandbytes' own kernels)
  module           pyhappy.nn.QLoRALinear on the same weight (QuantizedWeight.from_bnb), compiled
"""

from __future__ import annotations

import copy
import importlib.util

import torch

from .common import Case, Variant, compare, extended, find_result, target

FAMILY = "compiler"
VARIANTS = ("pyhappy_backend", "inductor", "from_peft")


def _available():
    return importlib.util.find_spec("peft") is not None and importlib.util.find_spec("transformers") is not None


def case(device, hidden, layers, batch, seq, *, budget_s=8.0, headline=False):
    def setup():
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaConfig, LlamaForCausalLM

        import pyhappy
        import pyhappy.compiler as pc

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64,
                          num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                          max_position_embeddings=seq)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        lc = LoraConfig(r=16, lora_alpha=32, target_modules=targets, init_lora_weights=False)
        pm = get_peft_model(LlamaForCausalLM(cfg).to(device), lc).train()
        pm2 = get_peft_model(LlamaForCausalLM(cfg).to(device), lc).train()
        pm2.load_state_dict(pm.state_dict())
        conv = pyhappy.from_peft(copy.deepcopy(pm)).train()
        ids = torch.randint(0, 1024, (batch, seq), generator=torch.Generator().manual_seed(1)).to(device)
        torch._dynamo.reset()
        compiled = {"pyhappy_backend": torch.compile(pm, backend=pc.backend),
                    "inductor": torch.compile(pm2), "from_peft": torch.compile(conv)}
        models = {"pyhappy_backend": pm, "inductor": pm2, "from_peft": conv}

        def run(name):
            params = [p for p in models[name].parameters() if p.requires_grad]

            def fn():
                loss = compiled[name](input_ids=ids, labels=ids).loss
                loss.backward()
                return (loss.detach(),)
            return Variant(fn, params)

        return {k: run(k) for k in VARIANTS}

    M = batch * seq
    inter = hidden * 8 // 3 // 64 * 64
    lin = layers * (4 * hidden * hidden + 3 * hidden * inter)
    f = 3 * 2 * M * lin  # fwd + bwd(dx, and the small adapter grads) of the linear layers
    return Case(op=FAMILY, shape=f"llama h={hidden} L={layers} M={M} r=16", params={"hidden": hidden, "M": M},
                dtype=torch.float32, pass_="fwd+bwd", variants=VARIANTS, setup=setup,
                work={k: (f, 4 * lin) for k in VARIANTS}, budget_s=budget_s, headline=headline, min_rounds=5)


SPARSE_VARIANTS = ("pyhappy_backend", "inductor", "module")


def sparse_case(device, M, K, N, density, *, budget_s=8.0):
    def setup():
        import torch.nn.functional as F
        from torch import nn

        import pyhappy.compiler as pc
        from pyhappy.nn import SparseDeltaLinear

        class HandSparse(nn.Module):
            def __init__(self, lin, idx):
                super().__init__()
                self.lin = lin
                self.register_buffer("idx", idx)
                self.values = nn.Parameter(torch.zeros(idx.numel(), device=device).normal_(std=0.01))

            def forward(self, x):
                W = self.lin.weight
                return F.linear(x, W.reshape(-1).index_add(0, self.idx, self.values).view_as(W), self.lin.bias)

        g = torch.Generator().manual_seed(0)
        lin = nn.Linear(K, N).to(device).requires_grad_(False)
        idx = torch.randperm(N * K, generator=g)[: int(density * N * K)].to(device)
        hand, hand2 = HandSparse(lin, idx), HandSparse(lin, idx)
        mod = SparseDeltaLinear.from_linear(lin, pattern=idx.sort().values.to(torch.int32))
        x = torch.randn(M, K, generator=g).to(device).requires_grad_()
        gout = torch.randn(M, N, generator=g).to(device)
        torch._dynamo.reset()
        compiled = {"pyhappy_backend": torch.compile(hand, backend=pc.backend), "inductor": torch.compile(hand2),
                    "module": torch.compile(mod)}
        params = {"pyhappy_backend": [x, hand.values], "inductor": [x, hand2.values],
                  "module": [x, mod.deltas["default"].values]}

        def run(name):
            def fn():
                y = compiled[name](x)
                y.backward(gout)
                return (y.detach(),)
            return Variant(fn, params[name])

        return {k: run(k) for k in SPARSE_VARIANTS}

    nnz = int(density * N * K)
    f = 2 * 2 * M * N * K + 3 * 2 * M * nnz
    return Case(op=FAMILY, shape=f"sparse delta {density:.0%} M={M} K={K} N={N}",
                params={"kind": "sparse", "M": M, "K": K, "N": N, "density": density}, dtype=torch.float32,
                pass_="fwd+bwd", variants=SPARSE_VARIANTS, setup=setup,
                work={k: (f, 4 * N * K) for k in SPARSE_VARIANTS}, budget_s=budget_s, min_rounds=5)


QLORA_VARIANTS = ("pyhappy_backend", "inductor", "module")


def qlora_case(device, M, K, N, r, *, budget_s=8.0):
    def setup():
        import warnings

        import bitsandbytes as bnb
        from peft import LoraConfig, get_peft_model
        from torch import nn

        import pyhappy.compiler as pc
        from pyhappy.nn import QLoRALinear
        from pyhappy.quant import QuantizedWeight

        warnings.filterwarnings("ignore", module="bitsandbytes")

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.proj = bnb.nn.Linear4bit(K, N, bias=False, quant_type="nf4", compute_dtype=torch.float32)

            def forward(self, x):
                return self.proj(x)

        def peft_model():
            torch.manual_seed(0)
            m = Net()
            m.proj.load_state_dict(nn.Linear(K, N, bias=False).state_dict())
            m = m.to(device)
            return get_peft_model(m, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"], lora_dropout=0.0,
                                                init_lora_weights=False))

        pm, pm2 = peft_model(), peft_model()
        base = pm.base_model.model.proj
        qw = QuantizedWeight.from_bnb(base.base_layer.weight, base.base_layer.weight.quant_state)
        mod = QLoRALinear.from_quantized(qw, None, r=r, alpha=2 * r)
        with torch.no_grad():
            mod.lora_A.weight.copy_(base.lora_A["default"].weight)
            mod.lora_B.weight.copy_(base.lora_B["default"].weight)
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(1)).to(device).requires_grad_()
        gout = torch.randn(M, N, generator=torch.Generator().manual_seed(2)).to(device)
        torch._dynamo.reset()
        compiled = {"pyhappy_backend": torch.compile(pm, backend=pc.backend), "inductor": torch.compile(pm2),
                    "module": torch.compile(mod)}
        models = {"pyhappy_backend": pm, "inductor": pm2, "module": mod}

        def run(name):
            params = [x] + [p for p in models[name].parameters() if p.requires_grad]

            def fn():
                y = compiled[name](x)
                y.backward(gout)
                return (y.detach(),)
            return Variant(fn, params)

        return {k: run(k) for k in QLORA_VARIANTS}

    f = 2 * 2 * M * N * K + 3 * 2 * M * r * (K + N)
    return Case(op=FAMILY, shape=f"QLoRA bnb nf4 M={M} K={K} N={N} r={r}",
                params={"kind": "qlora", "M": M, "K": K, "N": N, "r": r}, dtype=torch.float32, pass_="fwd+bwd",
                variants=QLORA_VARIANTS, setup=setup, work={k: (f, N * K // 2) for k in QLORA_VARIANTS},
                budget_s=budget_s, min_rounds=5)


def _has_bnb():
    return importlib.util.find_spec("bitsandbytes") is not None and importlib.util.find_spec("peft") is not None


def cases(device, quick):
    if device.type != "cpu":
        return []
    out = []
    if _available():
        out.append(case(device, 128, 1, 2, 32, budget_s=0.5, headline=True) if quick else
                   case(device, 512, 2, 4, 128, headline=True))
    out.append(sparse_case(device, 64, 512, 512, 0.01, budget_s=0.5) if quick else
               extended(sparse_case(device, 512, 4096, 4096, 0.01)))
    if _has_bnb() and not quick:
        out.append(extended(qlora_case(device, 512, 4096, 4096, 16)))
    return out


def not_run(device, quick, full):
    """Why parts of this family did not run here, and how to enable them."""
    if device.type != "cpu":
        return ["the compiler cases are CPU-only (run with --device cpu)"]
    out = []
    if not _available():
        out.append("the tiny-Llama PEFT model cases need peft and transformers (pip install peft transformers)")
    if not quick and not full:
        out.append("the sparse-delta and QLoRA cases run with --full only")
    elif not quick and not _has_bnb():
        out.append("the QLoRA case needs bitsandbytes and peft (pip install bitsandbytes peft)")
    return out


def summary(results, device):
    lines = []
    r = find_result(results, hidden=512)
    if r is not None:
        v = r["ratios"]["from_peft"]["paired_median"]
        lines.append(f"PEFT model + pyhappy backend: {compare(v, 'the model converted with from_peft')}, "
                     f"{compare(r['ratios']['inductor']['paired_median'], 'plain Inductor')}")
        lines.append(target("PEFT model + pyhappy backend / from_peft", v, "<=", 1.03))
    r = find_result(results, kind="sparse", M=512)
    if r is not None:
        lines.append(f"sparse delta 1% fwd+bwd, hand-written index_add + pyhappy backend: "
                     f"{compare(r['ratios']['inductor']['paired_median'], 'plain Inductor')}, "
                     f"{compare(r['ratios']['module']['paired_median'], 'SparseDeltaLinear')}")
    r = find_result(results, kind="qlora")
    if r is not None:
        lines.append(f"QLoRA (bitsandbytes + PEFT) fwd+bwd with the pyhappy backend: "
                     f"{compare(r['ratios']['inductor']['paired_median'], 'plain Inductor')}, "
                     f"{compare(r['ratios']['module']['paired_median'], 'QLoRALinear')}")
    return lines


__all__ = ["FAMILY", "cases", "not_run", "summary"]
