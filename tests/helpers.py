"""Shared test helpers: principled tolerances and device/backend parametrisation."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from pyhappy import _ext, backends

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CPP = _ext.available()


def has_cpp_op(name: str) -> bool:
    """The extension is loaded and registers torch.ops.pyhappy.<name> (a stale build may not)."""
    return HAS_CPP and hasattr(torch.ops.pyhappy, name)


def cpu_backends(cpp_op: str | None = None):
    """(backend, marks) for every backend that can run on CPU tensors here; ``cpp_op``: the C++ op
    the family needs (skipped, with the reason, when the loaded extension lacks it)."""
    cpp_ok = HAS_CPP if cpp_op is None else has_cpp_op(cpp_op)
    why = str(_ext.problem()) if not HAS_CPP else f"pyhappy._C without {cpp_op}"
    return [
        pytest.param("reference", id="reference"),
        pytest.param("cpp", id="cpp", marks=pytest.mark.skipif(not cpp_ok, reason=why)),
        pytest.param("triton", id="triton", marks=pytest.mark.skipif(
            not (HAS_TRITON and backends.triton_interpreting()), reason="triton interpreter unavailable")),
    ]


def run_in_threads(worker, args) -> None:
    """``worker(a)`` for each ``a`` of ``args``, each on its own thread, all at once; the first
    exception a worker raised is raised here."""
    import threading

    errors = []

    def run(a):
        try:
            worker(a)
        except Exception as e:  # surfaced below
            errors.append(e)
    ts = [threading.Thread(target=run, args=(a,)) for a in args]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]


def assert_settings_take_the_full_path(call, checks: list, monkeypatch) -> None:
    """A forced candidate, a requested backend and PYHAPPY_TUNE=off each send a call whose
    signature an entry point remembered back through that entry point's checks (``checks`` grows);
    tuning is left on."""
    from pyhappy import _tune

    for ctx in (lambda: _tune.forced("cpp"), lambda: backends.force("reference")):
        n = len(checks)
        with ctx():
            call()
        assert len(checks) > n
    monkeypatch.setenv("PYHAPPY_TUNE", "off")
    n = len(checks)
    call()
    assert len(checks) > n
    monkeypatch.setenv("PYHAPPY_TUNE", "on")


def output_and_grads(f, params) -> list:
    """[f()'s output, then each of ``params``' gradient] after backpropagating a fixed ramp from f()'s
    output (the gradients cleared before): what two formulations of one call are compared by."""
    for t in params:
        t.grad = None
    y = f()
    y.backward(torch.linspace(-1, 1, y.numel()).view(y.shape))
    return [y.detach()] + [t.grad.clone() for t in params]


def compiled_agrees(model, x, backend, params=None, fullgraph: bool = True) -> None:
    """torch.compile(model, backend) on x: its output and the gradients of its sum (params: x and the
    model's trainable parameters by default) agree with the eager model's."""
    cm = torch.compile(model, backend=backend, fullgraph=fullgraph)
    y = cm(x)
    params = [x] + [p for p in model.parameters() if p.requires_grad] if params is None else params
    g = torch.autograd.grad(y.sum(), params)
    y0 = model(x)
    g0 = torch.autograd.grad(y0.sum(), params)
    torch.testing.assert_close(y, y0, atol=1e-5, rtol=1e-5)
    for a, b in zip(g, g0):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def assert_close_to_oracle(got, oracle_fn, inputs, *, name="output", slack=2.0, k_eps=8.0):
    """Tolerance from principle, elementwise:

        |got - truth| <= slack * err_torch + k_eps * eps(dtype) * (|f|)(|inputs|)

    truth = oracle_fn on float64 inputs; err_torch = max error of plain PyTorch doing the same math
    in got's dtype; (|f|)(|inputs|) = the oracle on the absolute values of the inputs, i.e. the sum
    of the magnitudes of the terms each output adds up (the classic rounding-error bound of a dot
    product, Higham's |A||B|): it covers results that cancel, where torch's own error can be lucky.
    Every oracle here is multilinear in its inputs, so that bound is valid."""
    if got is None:
        raise AssertionError(f"{name}: got None")

    def f64(ts, fn=lambda t: t):
        return [None if t is None else fn(t.double()) if t.is_floating_point() else t for t in ts]

    truth = oracle_fn(*f64(inputs)).double()
    same = oracle_fn(*inputs).double()
    magnitude = oracle_fn(*f64(inputs, torch.abs)).double().abs()
    err = (got.double() - truth).abs()
    base_err = (same - truth).abs().max().item() if same.numel() else 0.0
    tol = slack * base_err + k_eps * torch.finfo(got.dtype).eps * magnitude
    bad = err > tol
    if bad.any():
        i = bad.flatten().nonzero()[0].item()
        raise AssertionError(
            f"{name}: error {err.flatten()[i].item():.3e} > tolerance {tol.flatten()[i].item():.3e} at flat index {i} "
            f"(torch same-dtype max error {base_err:.3e}; term magnitude {magnitude.flatten()[i].item():.3e})")


# ---- tiny transformers models for the PEFT interop tests (transformers imported on first use) ---------

HF_VOCAB = 96


def hf_model(arch: str = "llama", seed: int = 0):
    """A two-layer transformers model of ``arch`` (llama, gpt2, gpt2-cls (sequence classification,
    head ``score``), qwen2, falcon, bert (sequence classification, head ``classifier``), roberta
    (sequence classification, a head with sub-modules), t5, vit)
    with seeded random weights, in eval mode: small enough that PEFT, the oracle, runs in
    milliseconds."""
    import transformers as T

    T.logging.set_verbosity_error()
    torch.manual_seed(seed)
    if arch == "llama":
        m = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=HF_VOCAB, hidden_size=32, intermediate_size=48,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    elif arch in ("gpt2", "gpt2-cls"):
        cfg = T.GPT2Config(vocab_size=HF_VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32, bos_token_id=0,
                           eos_token_id=0, pad_token_id=0, num_labels=3)
        m = T.GPT2LMHeadModel(cfg) if arch == "gpt2" else T.GPT2ForSequenceClassification(cfg)
    elif arch == "qwen2":
        m = T.Qwen2ForCausalLM(T.Qwen2Config(vocab_size=HF_VOCAB, hidden_size=32, intermediate_size=48,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    elif arch == "falcon":
        m = T.FalconForCausalLM(T.FalconConfig(vocab_size=HF_VOCAB, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=4, bias=True))
    elif arch == "bert":
        m = T.BertForSequenceClassification(T.BertConfig(vocab_size=HF_VOCAB, hidden_size=32, num_hidden_layers=2,
                                                         num_attention_heads=4, intermediate_size=48, num_labels=3,
                                                         max_position_embeddings=32))
    elif arch == "roberta":
        m = T.RobertaForSequenceClassification(T.RobertaConfig(vocab_size=HF_VOCAB, hidden_size=32, num_hidden_layers=2,
                                                               num_attention_heads=4, intermediate_size=48,
                                                               num_labels=3, max_position_embeddings=40,
                                                               pad_token_id=0))
    elif arch == "t5":
        m = T.T5ForConditionalGeneration(T.T5Config(vocab_size=HF_VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                                    num_heads=4, decoder_start_token_id=0))
    elif arch == "vit":
        m = T.ViTForImageClassification(T.ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=32,
                                                    num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                                                    num_labels=3))
    else:
        raise ValueError(f"hf_model: no tiny {arch!r} model")
    return m.eval()


def bnb_float_path(model):
    """``model`` with every bitsandbytes Linear4bit kept on its float path, so that PEFT on it is an
    exact oracle on any CPU. On CPUs with AVX512-BF16, Linear4bit's no-grad eval forward otherwise
    repacks its weight into a CPU layout whose kernel multiplies by a bfloat16 absmax and rounds the
    activations to bfloat16 (about 1e-3 relative), and bitsandbytes' dequantize_4bit, which PEFT's
    DoRA takes the norm of, does not read that layout. pyhappy reading the repacked layout is tested
    in test_compiler_models."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model


def hf_inputs(arch: str = "llama") -> dict:
    """Seeded keyword inputs for ``hf_model(arch)``: token ids (and decoder ids for t5), or images for vit."""
    g = torch.Generator().manual_seed(1)
    if arch == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
    ids = torch.randint(1, HF_VOCAB, (2, 7), generator=g)
    if arch == "t5":
        return {"input_ids": ids, "decoder_input_ids": torch.randint(1, HF_VOCAB, (2, 5), generator=g)}
    return {"input_ids": ids}


def train_like(model, seed: int = 3, scale: float = 0.1) -> None:
    """Perturb every trainable tensor by seeded noise of std ``scale``, as training would: a freshly
    initialised adapter is often a no-op (LoRA's B, VeRA's lambda_b start at 0) and would hide errors."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def logits_and_grads(model, x: dict):
    """(logits, {name: grad} of every trainable parameter) for one forward and backward of a loss
    that reaches every logit."""
    model.zero_grad(set_to_none=True)
    out = model(**x).logits
    out.float().pow(2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_close_rel(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> None:
    """|a - b| <= rel · max|b| everywhere (the oracle b computes the same float32 math in another order)."""
    scale = max(b.abs().max().item(), 1e-6)
    assert (a - b).abs().max().item() <= rel * scale, (a - b).abs().max().item()


def module_state(model):
    """Everything a failed call must leave as it was: module types and modes, parameters (values and
    requires_grad) and buffers."""
    return ([(n, type(m).__name__, m.training) for n, m in model.named_modules()],
            [(n, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()],
            [(n, b.clone()) for n, b in model.named_buffers()])


def assert_same_state(a, b) -> None:
    """Two ``module_state`` snapshots are equal, to the bit."""
    assert a[0] == b[0]
    assert [(n, g) for n, _, g in a[1]] == [(n, g) for n, _, g in b[1]]
    assert all(torch.equal(x, y) for (_, x, _), (_, y, _) in zip(a[1], b[1]))
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(a[2], b[2]))


def assert_unload_matches_peft(conv, pm, arch: str, x: dict, want: torch.Tensor) -> None:
    """``conv`` (pyhappy's conversion of the PEFT model ``pm`` on ``hf_model(arch)``, whose logits on
    ``x`` are ``want``): unload(merge=True) keeps the trained function in the original module types
    (PEFT's merge_and_unload); unload() gives back the base model as PEFT runs it with its adapters
    disabled (the original modules_to_save modules; trained biases kept, as they are base tensors).
    ``conv`` is unloaded in the end."""
    import copy

    import pyhappy

    kinds = {n: type(m) for n, m in hf_model(arch).named_modules()}
    merged = pyhappy.unload(copy.deepcopy(conv), merge=True)
    assert_close_rel(merged(**x).logits, want)
    assert {n: type(m) for n, m in merged.named_modules()} == kinds
    plain = pyhappy.unload(conv)
    assert {n: type(m) for n, m in plain.named_modules()} == kinds
    with pm.disable_adapter():
        assert_close_rel(plain(**x).logits, pm(**x).logits)


def assert_failed_apply_rolls_back(monkeypatch, model, call, at: int = 3) -> None:
    """``call(model)`` (a pyhappy.interop entry point) with the ``at``-th module swap raising, as an
    out-of-memory error would after validation passed: the call raises and ``model`` is left exactly
    as it was (the apply step runs under a Transaction)."""
    import importlib

    interop = importlib.import_module("pyhappy.interop")
    real, calls = interop._set, []

    def flaky(model, name, new):
        calls.append(name)
        if len(calls) == at:
            raise RuntimeError("out of memory (simulated)")
        real(model, name, new)

    before = module_state(model)
    monkeypatch.setattr(interop, "_set", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        call(model)
    assert len(calls) == at
    assert_same_state(module_state(model), before)
