"""pyhappy.compiler: the torch.compile backend rewriting unfused LoRA into pyhappy::lora_linear."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyhappy.compiler as pc

from helpers import HAS_CPP, compiled_agrees

HAS_PEFT = importlib.util.find_spec("peft") is not None and importlib.util.find_spec("transformers") is not None
needs_peft = pytest.mark.skipif(not HAS_PEFT, reason="peft + transformers not installed (optional oracles)")


class HandLoRA(nn.Module):
    """LoRA spelled by hand, the ways people write it."""

    def __init__(self, K=32, N=24, r=4, spelling="mul", dropout=0.0, adapters=1):
        super().__init__()
        self.base = nn.Linear(K, N)
        self.A = nn.ModuleList(nn.Linear(K, r + i, bias=False) for i in range(adapters))
        self.B = nn.ModuleList(nn.Linear(r + i, N, bias=False) for i in range(adapters))
        for B in self.B:
            nn.init.normal_(B.weight)
        self.drop = nn.Dropout(dropout)
        self.spelling = spelling

    def forward(self, x):
        y = self.base(x)
        for i, (A, B) in enumerate(zip(self.A, self.B)):
            t = B(A(self.drop(x)))
            if self.spelling == "mul":
                y = y + t * (2.0 + i)
            elif self.spelling == "rmul":
                y = y + (0.5 + i) * t
            elif self.spelling == "div":
                y = y + t / 4.0
            else:
                y = y + t
        return y


def run(model, x, be, fullgraph=True):
    compiled_agrees(model, x, be, fullgraph=fullgraph)


@pytest.mark.skipif(not HAS_CPP, reason="pyhappy._C not built")
@pytest.mark.parametrize("spelling", ["mul", "rmul", "div", "inside_B"])
def test_hand_written_spellings_fuse_and_match(spelling):
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = HandLoRA(spelling=spelling)
    be = pc.make_backend()
    run(m, torch.randn(2, 5, 32, requires_grad=True), be)
    (rep,) = be.reports
    assert len(rep) == 1 and rep.sites[0]["ranks"] == [4], str(rep)


class SpelledBase(nn.Module):
    """A LoRA on a base layer spelled as transformers writes it: GPT-2's Conv1D (addmm on a [K, N]
    weight between views), Falcon's ``x @ W.T + b``, ``torch.matmul(x, W.t())``, ``x @ W`` on a [K, N]
    weight. The base weight and bias train too, so their gradients are checked as well."""

    def __init__(self, spelling, K=32, N=24, r=4, bias=True):
        super().__init__()
        kn = spelling in ("conv1d", "matmul_kn")
        self.W = nn.Parameter(torch.randn((K, N) if kn else (N, K)) * 0.1)
        self.b = nn.Parameter(torch.randn(N)) if bias else None
        self.A, self.B = nn.Linear(K, r, bias=False), nn.Linear(r, N, bias=False)
        nn.init.normal_(self.B.weight)
        self.spelling = spelling

    def base(self, x):
        if self.spelling == "conv1d":
            out = torch.addmm(self.b, x.view(-1, x.size(-1)), self.W)
            return out.view(x.size()[:-1] + (self.W.shape[1],))
        y = {"weight_T": lambda: x @ self.W.T, "matmul_t": lambda: torch.matmul(x, self.W.t()),
             "matmul_kn": lambda: x @ self.W}[self.spelling]()
        return y if self.b is None else y + self.b

    def forward(self, x):
        return self.base(x) + self.B(self.A(x)) * 2.0


@pytest.mark.skipif(not HAS_CPP, reason="pyhappy._C not built")
@pytest.mark.parametrize("spelling,bias", [("conv1d", True), ("weight_T", True), ("weight_T", False),
                                           ("matmul_t", True), ("matmul_kn", False)])
def test_transformers_base_spellings_fuse_and_match(spelling, bias):
    torch._dynamo.reset()
    torch.manual_seed(0)
    be = pc.make_backend()
    run(SpelledBase(spelling, bias=bias), torch.randn(2, 5, 32, requires_grad=True), be)
    (rep,) = be.reports
    assert len(rep) == 1 and rep.sites[0]["ranks"] == [4] and not rep.near_misses, str(rep)


@pytest.mark.skipif(not HAS_CPP, reason="pyhappy._C not built")
def test_own_dropout_before_the_layer_is_not_taken_for_the_adapters():
    """The model's dropout feeds both the base and the adapter (BERT q/k/v, T5 wo): fused, the dropout
    stays where it is; an active one is one draw shared by both, so still exact."""

    class Block(HandLoRA):
        def forward(self, x):
            h = F.dropout(x, 0.3, self.training)
            return self.base(h) + self.B[0](self.A[0](h)) * 2.0

    for train in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        m = Block().train(train)
        be = pc.make_backend(inner=lambda gm, ex: gm.forward)  # the graph's own dropout: eager's random draw
        x = torch.randn(4, 32, requires_grad=True)
        torch.manual_seed(1)
        y = torch.compile(m, backend=be, fullgraph=True)(x)
        torch.manual_seed(1)
        torch.testing.assert_close(y, m(x), atol=1e-5, rtol=1e-5)
        rep = be.reports[0]
        assert len(rep) == 1 and not rep.near_misses, str(rep)


@pytest.mark.skipif(not HAS_CPP, reason="pyhappy._C not built")
def test_several_adapters_on_one_base_become_one_op():
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = HandLoRA(adapters=3)
    be = pc.make_backend()
    run(m, torch.randn(6, 32, requires_grad=True), be)
    assert be.reports[0].sites[0]["ranks"] == [4, 5, 6]


@pytest.mark.skipif(not HAS_CPP, reason="pyhappy._C not built")
def test_active_dropout_is_a_near_miss_unless_opted_in():
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = HandLoRA(dropout=0.2).train()
    be = pc.make_backend()
    torch.compile(m, backend=be, fullgraph=True)(torch.randn(4, 32))
    rep = be.reports[0]
    assert len(rep) == 0 and "dropout" in rep.near_misses[0][1]
    torch._dynamo.reset()
    be = pc.make_backend(dropout="pyhappy")
    y = torch.compile(m, backend=be, fullgraph=True)(torch.randn(4, 32))
    assert len(be.reports[0]) == 1 and be.reports[0].sites[0]["dropout"] == 0.2 and torch.isfinite(y).all()
    m.eval()  # eval: dropout is the identity, fused exactly
    torch._dynamo.reset()
    be = pc.make_backend()
    with torch.no_grad():
        x = torch.randn(4, 32)
        torch.testing.assert_close(torch.compile(m, backend=be)(x), m(x), atol=1e-5, rtol=1e-5)
    assert len(be.reports[0]) == 1


def test_non_matching_code_is_left_alone():
    class NotLoRA(nn.Module):
        def __init__(self):
            super().__init__()
            self.base, self.A, self.B = nn.Linear(16, 8), nn.Linear(16, 4, bias=True), nn.Linear(4, 8, bias=False)

        def forward(self, x):
            h = self.A(x)
            return self.base(x) + self.B(h) * 2.0 + h.sum()  # hidden state used elsewhere, A with bias

    torch._dynamo.reset()
    be = pc.make_backend()
    m = NotLoRA()
    x = torch.randn(3, 16)
    torch.testing.assert_close(torch.compile(m, backend=be)(x), m(x))
    rep = be.reports[0]
    assert len(rep) == 0 and rep.near_misses


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


@needs_peft
@pytest.mark.parametrize("variant", ["plain", "rslora", "two_adapters"])
def test_peft_llama_compiled_with_the_backend_matches_eager(variant):
    from peft import LoraConfig, get_peft_model

    torch._dynamo.reset()
    targets = ["q_proj", "v_proj", "down_proj"]
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                                                 use_rslora=(variant == "rslora")))
    n_sites = 2 * len(targets)
    if variant == "two_adapters":
        pm.add_adapter("second", LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False))
        pm.base_model.set_adapter(["default", "second"])
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.requires_grad_(True)
    pm.train()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    be = pc.make_backend()
    cm = torch.compile(pm, backend=be, fullgraph=True)
    params = [p for n, p in pm.named_parameters() if p.requires_grad]
    logits = cm(input_ids=ids).logits
    grads = torch.autograd.grad(logits.float().pow(2).mean(), params)
    want = pm(input_ids=ids).logits
    want_grads = torch.autograd.grad(want.float().pow(2).mean(), params)
    torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-4 * (1 + b.abs().max().item()), rtol=1e-3)
    rep = be.reports[0]
    assert len(rep) == n_sites, str(rep)
    if variant == "two_adapters":
        assert all(s["ranks"] == [4, 2] for s in rep.sites)
    # the profiler sees the fused op and no separate low-rank matmuls
    with torch.profiler.profile() as prof:
        cm(input_ids=ids).logits.sum().backward()
    names = [e.name for e in prof.events()]
    assert any("pyhappy::lora_linear" in n for n in names)


@pytest.mark.skipif(not HAS_CPP, reason="pyhappy._C not built")
def test_lora_inside_a_residual_sum_still_fuses():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.base, self.A, self.B = nn.Linear(16, 16), nn.Linear(16, 4, bias=False), nn.Linear(4, 16, bias=False)
            nn.init.normal_(self.B.weight)

        def forward(self, x):
            return self.base(x) + self.B(self.A(x)) * 2.0 + x  # residual added after the adapter

    torch._dynamo.reset()
    be = pc.make_backend()
    run(Block(), torch.randn(3, 16, requires_grad=True), be)
    assert len(be.reports[0]) == 1


# ------------------------------------------------------------------------------------------------
# sparse deltas written as a merged dense weight -> pyhappy::sparse_delta_linear
# ------------------------------------------------------------------------------------------------


class HandSparse(nn.Module):
    """Sparse fine-tuning spelled the ways users write it: merge the delta into a dense weight."""

    def __init__(self, K=32, N=24, nnz=40, spelling="index_add", dup=False, train_base=False):
        super().__init__()
        self.base = nn.Linear(K, N)
        self.base.requires_grad_(train_base)
        g = torch.Generator().manual_seed(1)
        idx = torch.randperm(N * K, generator=g)[:nnz]  # unsorted, as users' code keeps them
        if dup:
            idx[1::7] = idx[0]  # repeated entries: index_add sums them
        self.register_buffer("idx", idx)
        self.values = nn.Parameter(torch.randn(nnz, generator=g))
        self.spelling = spelling

    def merged(self):
        W = self.base.weight
        N, K = W.shape
        if self.spelling == "index_add":
            return W.reshape(-1).index_add(0, self.idx, self.values).view_as(W)
        if self.spelling == "index_add_alpha":
            return torch.index_add(W.flatten(), 0, self.idx, self.values, alpha=0.25).reshape(N, K)
        if self.spelling == "zeros_scatter_add":
            return W + torch.zeros(N * K, device=W.device).scatter_add(0, self.idx, self.values).view(N, K) * 0.5
        if self.spelling == "zeros_div":
            return W + W.new_zeros(N * K).index_add(0, self.idx, self.values).view(N, K) / 4.0
        if self.spelling == "index_put":
            return W.index_put((self.idx // K, self.idx % K), self.values, accumulate=True)
        raise ValueError(self.spelling)

    def forward(self, x):
        return F.linear(x, self.merged(), self.base.bias)


SPARSE_SPELLINGS = ["index_add", "index_add_alpha", "zeros_scatter_add", "zeros_div", "index_put"]


@pytest.mark.skipif(not HAS_CPP, reason="pyhappy._C not built")
@pytest.mark.parametrize("spelling", SPARSE_SPELLINGS)
@pytest.mark.parametrize("dup", [False, True], ids=["unique", "duplicates"])
def test_sparse_delta_spellings_fuse_and_match(spelling, dup):
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = HandSparse(spelling=spelling, dup=dup, train_base=spelling == "index_add")
    be = pc.make_backend()
    run(m, torch.randn(2, 5, 32, requires_grad=True), be)
    (rep,) = be.reports
    assert len(rep) == 1 and rep.sites[0]["kind"] == "sparse_delta" and rep.sites[0]["nnz"] == 40, str(rep)


@pytest.mark.skipif(not HAS_CPP, reason="pyhappy._C not built")
def test_sparse_delta_near_misses_are_left_alone():
    class Near(HandSparse):
        def forward(self, x):
            W = self.base.weight
            rows = W.index_add(0, self.idx[:3] % 24, W[:3])  # whole-row index_add on the 2-D weight
            last = W.index_put((self.idx // 32, self.idx % 32), self.values)  # last write wins
            merged = self.merged()
            return F.linear(x, rows) + F.linear(x, last) + F.linear(x, merged) + merged.sum()  # merged reused

    torch._dynamo.reset()
    m = Near()
    be = pc.make_backend()
    x = torch.randn(3, 32)
    torch.testing.assert_close(torch.compile(m, backend=be, fullgraph=True)(x), m(x))
    rep = be.reports[0]
    reasons = " | ".join(why for _, why in rep.near_misses)
    assert len(rep) == 0, str(rep)
    assert "accumulate=True" in reasons and "used elsewhere" in reasons, reasons


@pytest.mark.skipif(not HAS_CPP, reason="pyhappy._C not built")
def test_sparse_pattern_op_sorts_caches_and_sees_in_place_changes():
    from pyhappy.ops.sparse_delta_linear import layout_size, sparse_layout

    idx = torch.tensor([17, 3, 40, 3, 0], dtype=torch.int64)
    ind, perm, lay = torch.ops.pyhappy.sparse_pattern(idx, 6, 8)
    assert ind.tolist() == [0, 3, 3, 17, 40] and ind.dtype == torch.int32
    torch.testing.assert_close(idx[perm].int(), ind)
    assert lay.shape == (layout_size(6, 8, 5),)
    uniq = torch.tensor([0, 3, 17, 40], dtype=torch.int32)
    torch.testing.assert_close(torch.ops.pyhappy.sparse_pattern(uniq, 6, 8)[2], sparse_layout(uniq, 6, 8))
    idx[0] = 41  # in place: the cached pattern must not be reused
    assert torch.ops.pyhappy.sparse_pattern(idx, 6, 8)[0].tolist() == [0, 3, 3, 40, 41]
    with pytest.raises(IndexError, match="out of range"):
        torch.ops.pyhappy.sparse_pattern(torch.tensor([48]), 6, 8)
    torch.library.opcheck(torch.ops.pyhappy.sparse_pattern, (torch.tensor([5, 1, 2]), 2, 4))


# ------------------------------------------------------------------------------------------------
# QLoRA as bitsandbytes + PEFT write it -> pyhappy::quant_linear on the same (repacked) NF4 weight
# ------------------------------------------------------------------------------------------------

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not (HAS_BNB and HAS_CPP), reason="bitsandbytes not installed (optional oracle)")


def _bnb_model(nested, quant_type="nf4", lora=True, frozen_bias=True):
    import bitsandbytes as bnb

    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = bnb.nn.Linear4bit(64, 32, bias=True, quant_type=quant_type, compute_dtype=torch.float32,
                                          compress_statistics=nested)
            self.out = nn.Linear(32, 8)

        def forward(self, x):
            return self.out(self.proj(x).relu())

    m = Net()
    m.proj.load_state_dict(nn.Linear(64, 32).state_dict())
    m = m.to("cpu")  # bitsandbytes quantizes on the move
    if lora:
        from peft import LoraConfig, get_peft_model

        m = get_peft_model(m, LoraConfig(r=4, target_modules=["proj"], lora_dropout=0.0, init_lora_weights=False))
    elif frozen_bias:
        m.proj.bias.requires_grad_(False)
    return m


@needs_bnb
@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "double_quant"])
def test_bnb_qlora_fuses_into_quant_linear_and_matches(nested):
    if not HAS_PEFT:
        pytest.skip("peft not installed")
    torch._dynamo.reset()
    m = _bnb_model(nested)
    be = pc.make_backend()
    run(m, torch.randn(2, 20, 64, requires_grad=True), be)
    (rep,) = be.reports
    assert [s["kind"] for s in rep.sites] == ["qlora"] and rep.sites[0]["ranks"] == [4], str(rep)


@needs_bnb
def test_bnb_quantized_base_alone_and_near_misses():
    torch._dynamo.reset()
    m = _bnb_model(True, lora=False)
    be = pc.make_backend()
    run(m, torch.randn(40, 64, requires_grad=True), be)
    assert [s["kind"] for s in be.reports[0].sites] == ["quant"], str(be.reports[0])
    cases = [(_bnb_model(False, lora=False, frozen_bias=False), torch.randn(40, 64), "bias requires grad", {}),
             (_bnb_model(False, quant_type="fp4", lora=False), torch.randn(40, 64), "quant_type 'fp4'", {})]
    for model, x, reason, kw in cases:
        torch._dynamo.reset()
        be = pc.make_backend(**kw)
        with torch.no_grad():
            torch.testing.assert_close(torch.compile(model, backend=be, fullgraph=True)(x), model(x))
        rep = be.reports[0]
        assert len(rep) == 0 and any(reason in why for _, why in rep.near_misses), str(rep)
    # CPU decode sizes fuse too: the default decode kernel is exact
    model, x = _bnb_model(False, lora=False), torch.randn(3, 64)
    for int8_decode in (False, True):
        torch._dynamo.reset()
        be = pc.make_backend(int8_decode=int8_decode)
        with torch.no_grad():
            got, want = torch.compile(model, backend=be, fullgraph=True)(x), model(x)
        assert len(be.reports[0]) == 1, str(be.reports[0])
        if int8_decode:  # opted in: within the int8-activation kernel's error
            assert (10 * torch.log10(want.pow(2).sum() / (got - want).pow(2).sum())).item() > 30
        else:
            torch.testing.assert_close(got, want)
    with pytest.raises(TypeError, match="int8_decode"):
        pc.make_backend(int8_decode="yes")


@needs_bnb
@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "double_quant"])
def test_bnb_nf4_pack_is_bit_exact_and_cached(nested):
    import bitsandbytes.functional as bF

    from pyhappy.ops.quant_linear import bnb_nf4_pack

    w = torch.randn(40, 128)
    p, st = bF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=nested)
    args = ((p, st.state2.absmax, st.absmax, st.state2.code, st.offset) if nested else
            (p, st.absmax, None, None, None)) + (40, 128, 64, st.state2.blocksize if nested else 256, 3)
    with pytest.raises(ValueError, match="layout_version must be 3"):
        bnb_nf4_pack(*args[:-1], 2)  # a graph compiled for the tile-by-tile layout
    qd, am = bnb_nf4_pack(*args)
    got = torch.ops.pyhappy.quant_dequantize_cpu(qd, am, None, 0, 40, 128, 64, torch.float32)
    assert torch.equal(got, bF.dequantize_4bit(p, st))
    qd2, _ = bnb_nf4_pack(*args)
    assert torch.equal(qd, qd2) and qd.data_ptr() != qd2.data_ptr()  # cached, but never aliased
    p[0] ^= 0xFF  # in place: the cache must not serve the old weight
    assert not torch.equal(bnb_nf4_pack(*args)[0], qd)
    torch.library.opcheck(torch.ops.pyhappy.bnb_nf4_pack, args)
    # QDoRA's ‖W_n‖² from the same arguments: the dequantized weight's row norms, kept per weight version
    from pyhappy.ops.quant_linear import bnb_nf4_row_sqnorm

    sq = bnb_nf4_row_sqnorm(*args[:-1])
    want = torch.linalg.vector_norm(bF.dequantize_4bit(p, st), dim=1).double().square()
    assert sq.dtype == torch.float64 and sq.shape == (40,)
    torch.testing.assert_close(sq, want, rtol=1e-6, atol=0)
    p[1] ^= 0xFF
    assert not torch.equal(bnb_nf4_row_sqnorm(*args[:-1]), sq)
    torch.library.opcheck(torch.ops.pyhappy.bnb_nf4_row_sqnorm, args[:-1])


@pytest.mark.parametrize("module", ["lora", "tt_lowrank", "multi"])
def test_modules_whose_calls_take_the_unfused_formulation_compile_in_one_graph(module, monkeypatch):
    """Where the measured dispatch serves a layer with the unfused formulation, torch.compile traces
    that formulation's torch ops (not the custom op): they must trace with fullgraph=True and agree
    with eager."""
    from pyhappy.nn import LoRALinear, MultiLoRALinear, TTLinear

    ll = importlib.import_module("pyhappy.ops.lora_linear")  # the module, not the op function it exports
    monkeypatch.setattr(ll, "_traced_unfused", lambda *a: True)
    torch.manual_seed(0)
    if module == "lora":
        m = LoRALinear(64, 48, r=8)
    elif module == "tt_lowrank":
        m = TTLinear(64, 64)
    else:
        m = MultiLoRALinear.from_linear(nn.Linear(64, 48))
        m.add_adapter("a", r=4)
    for p in m.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(5, 64)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(m, fullgraph=True)(x), m(x))
