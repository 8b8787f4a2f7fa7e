"""Fine-tune a tiny Llama with each pyhappy adapter family, offline.

    python -m pyhappy.examples.finetune                      # every family, 200 steps each
    python -m pyhappy.examples.finetune --family qlora --steps 50 --out /tmp/adapters

The model is built from a config (transformers' LlamaForCausalLM when transformers is installed,
else a small built-in causal transformer); the text is generated here (arithmetic sentences,
byte-level tokens), so nothing is downloaded. For each family it trains the adapter, shows a
progress bar, saves the adapter, and prints the loss, tokens/s and peak memory next to the same
run with PEFT (LoRA, when peft is installed) or with the unfused PyTorch formulation (pyhappy's
reference backend: plain torch ops, no fused kernels); a table of every family ends the run.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import torch
from torch import nn

import pyhappy
from pyhappy import backends

FAMILIES = ("lora", "qlora", "sparse", "tt")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---- data ----------------------------------------------------------------------------------------


def corpus(n_sentences: int = 4000, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    out = []
    for _ in range(n_sentences):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op, val = rng.choice((("plus", a + b), ("minus", a - b), ("times", a * b)))
        out.append(f"{a} {op} {b} is {val}.")
    return " ".join(out).encode()


def batches(data: bytes, batch: int, seq: int, seed: int = 0):
    t = torch.tensor(list(data), dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, t.numel() - seq - 1, (batch,), generator=g)
        yield torch.stack([t[s:s + seq] for s in starts.tolist()])


# ---- model ---------------------------------------------------------------------------------------


class TinyCausalLM(nn.Module):
    """Fallback when transformers is absent: Llama-like names (q/k/v/o_proj, gate/up/down_proj)."""

    def __init__(self, vocab=256, d=128, layers=2, heads=4, ff=256):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            blk = nn.Module()
            blk.q_proj, blk.k_proj, blk.v_proj, blk.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))
            blk.gate_proj, blk.up_proj = nn.Linear(d, ff, bias=False), nn.Linear(d, ff, bias=False)
            blk.down_proj = nn.Linear(ff, d, bias=False)
            blk.n1, blk.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.blocks.append(blk)
        self.heads = heads
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        h = self.emb(ids)
        B, T, D = h.shape
        for blk in self.blocks:
            x = blk.n1(h)
            q, k, v = (p(x).view(B, T, self.heads, -1).transpose(1, 2) for p in (blk.q_proj, blk.k_proj, blk.v_proj))
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            h = h + blk.o_proj(a.transpose(1, 2).reshape(B, T, D))
            x = blk.n2(h)
            h = h + blk.down_proj(torch.nn.functional.silu(blk.gate_proj(x)) * blk.up_proj(x))
        return self.lm_head(self.norm(h))


def build_model(seed: int = 0):
    torch.manual_seed(seed)
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return TinyCausalLM(), False
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg), True


def logits_of(model, ids, is_hf):
    return model(input_ids=ids).logits if is_hf else model(ids)


# ---- measurement -----------------------------------------------------------------------------------


def _reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def proc_status_mib(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmHWM: peak RSS, VmRSS: RSS) in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _peak_mib():
    return proc_status_mib("VmHWM")


def progress(i, n, loss, width=30, stream=None):
    """A progress bar on ``stream`` (default: sys.stderr as it is at the call)."""
    stream = sys.stderr if stream is None else stream
    done = int(width * i / n)
    stream.write(f"\r  [{'#' * done}{'.' * (width - done)}] {i}/{n} loss {loss:.3f}")
    if i == n:
        stream.write("\n")
    stream.flush()


def adapt(model, family):
    if family == "lora":
        return pyhappy.inject(model, TARGETS, r=8, alpha=16)
    if family == "qlora":
        return pyhappy.inject(model, TARGETS, r=8, alpha=16, quantize="nf4", group_size=64)
    if family == "sparse":
        return pyhappy.inject(model, TARGETS, adapter="sparse", density=0.01, seed=0)
    if family == "tt":
        return pyhappy.inject(model, TARGETS, adapter="tt", tt_rank=4, r=8, alpha=16)
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def train_step(model, is_hf, ids, opt) -> float:
    """One next-token step on ``ids`` [batch, seq]; returns the loss."""
    logits = logits_of(model, ids[:, :-1], is_hf)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def train(model, is_hf, steps, batch, seq, lr, show=True):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    data = batches(corpus(), batch, seq)
    losses = []
    _reset_peak()
    t0 = time.perf_counter()
    for i in range(1, steps + 1):
        losses.append(train_step(model, is_hf, next(data), opt))
        if show:
            progress(i, steps, losses[-1])
    dt = time.perf_counter() - t0
    return {"first_loss": losses[0], "last_loss": sum(losses[-10:]) / len(losses[-10:]),
            "tokens_per_s": steps * batch * (seq - 1) / dt, "peak_mib": _peak_mib(), "seconds": dt}


def save_adapter(model, family, out):
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, family)
    if family == "lora":
        pyhappy.save_peft_adapter(model, path)
    elif family == "sparse":
        pyhappy.sparse.save_sparse_deltas(path + ".safetensors", model)
        path += ".safetensors"
    else:
        trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        pyhappy.sparse.write_safetensors(path + ".safetensors", trainable, {"family": family})
        path += ".safetensors"
    return path


def compare_run(family, is_hf, steps, batch, seq, lr):
    """The same training with PEFT (LoRA, when installed), else with the unfused formulation."""
    model, _ = build_model()
    if family == "lora":
        try:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
            return "peft", train(model, is_hf, steps, batch, seq, lr, show=False)
        except ImportError:
            pass
    adapt(model, family)
    with backends.force("reference"):
        return "unfused", train(model, is_hf, steps, batch, seq, lr, show=False)


def summary_table(results: dict) -> str:
    """One row per family and run (pyhappy, then its comparison run): loss at the first step and over
    the last ten, tokens/s, peak RSS, and pyhappy's time per step as a multiple of the comparison's."""
    head = ("family", "run", "loss first -> last", "tokens/s", "peak RSS MiB", "pyhappy's time")
    rows = []
    for family, r in results.items():
        runs = [("pyhappy", r)] + list(r.get("compare", {}).items())
        for i, (name, m) in enumerate(runs):
            ratio = ""
            if i == 0 and len(runs) > 1:  # time per step is inverse to tokens/s at equal tokens per step
                other, c = runs[1]
                ratio = f"{c['tokens_per_s'] / m['tokens_per_s']:.2f}× the time of {other}"
            rows.append((family if i == 0 else "", name, f"{m['first_loss']:.3f} -> {m['last_loss']:.3f}",
                         f"{m['tokens_per_s']:,.0f}", f"{m['peak_mib']:,.0f}", ratio))
    widths = [max(len(row[j]) for row in (head, *rows)) for j in range(len(head))]
    right = (False, False, False, True, True, False)

    def fmt(row):
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)).rstrip()

    lines = [fmt(head), "  ".join("-" * w for w in widths)] + [fmt(row) for row in rows]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", action="append", choices=FAMILIES, help="repeatable; default: all")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--out", default="finetune_out")
    ap.add_argument("--no-compare", action="store_true", help="skip the PEFT / unfused comparison run")
    a = ap.parse_args(argv)
    results = {}
    for family in a.family or FAMILIES:
        model, is_hf = build_model()
        model.train()
        rep = adapt(model, family)
        print(f"{family}: {rep}")
        r = train(model, is_hf, a.steps, a.batch, a.seq, a.lr)
        path = save_adapter(model, family, a.out)
        line = (f"{family}: loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}, {r['tokens_per_s']:.0f} tokens/s, "
                f"peak RSS {r['peak_mib']:.0f} MiB; adapter saved to {path}")
        if not a.no_compare:
            name, c = compare_run(family, is_hf, a.steps, a.batch, a.seq, a.lr)
            line += (f"\n{' ' * len(family)}  {name}: loss {c['first_loss']:.3f} -> {c['last_loss']:.3f}, "
                     f"{c['tokens_per_s']:.0f} tokens/s, peak RSS {c['peak_mib']:.0f} MiB")
            r["compare"] = {name: c}
        print(line)
        results[family] = r
    print()
    print(summary_table(results))
    return results


if __name__ == "__main__":
    main()
