"""``python -m pyhappy.tune``: pre-tune a model's pyhappy layers, or show / clear the tuning cache.

    python -m pyhappy.tune                                  # the cache in use and what it holds
    python -m pyhappy.tune --clear                          # delete it
    python -m pyhappy.tune --model path/to/config.json --r 16 --tokens 1 512
    python -m pyhappy.tune --build mypkg.models:make --tokens 512

``--model`` builds a transformers model from its config (a directory holding config.json, or the
file) with one decoder layer (``--layers``): the measured dispatch decides per layer shape, and one
decoder layer has every shape the model's adapted layers have, so tuning it tunes the whole model
at a fraction of its memory. Its Linear layers but the output head are injected with the adapter
(``--adapter``, ``--r``, ``--target``, ``--quantize``). ``--build MODULE:FUNCTION`` calls the
function, which returns a model (with pyhappy layers already, or injected here when ``--adapter`` is
given) or ``(model, example_args)``. Each ``--tokens`` count runs one forward, and one backward
unless ``--inference``, through ``pyhappy.tune`` (pyhappy/_tune.py), which measures the keys not in
the cache yet, stores the winners and prints what it picked.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

import torch

from pyhappy import _tune

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parse(argv):
    ap = argparse.ArgumentParser(prog="python -m pyhappy.tune", description=__doc__.split("\n")[0])
    ap.add_argument("--clear", action="store_true", help="delete the cache file in use")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="CONFIG", help="a transformers config: a directory with config.json, or the file")
    src.add_argument("--build", metavar="MODULE:FUNCTION", help="a function returning a model or (model, example_args)")
    ap.add_argument("--layers", type=int, default=1, help="decoder layers built for --model (default 1)")
    ap.add_argument("--adapter", default=None, choices=("lora", "dora", "vera", "pvera", "molora", "sparse", "tt"),
                    help="adapter injected into the Linear layers (--model default: lora)")
    ap.add_argument("--r", type=int, default=16, help="adapter rank (default 16)")
    ap.add_argument("--target", default=None, help="comma-separated layer names or suffixes (default: every Linear "
                                                   "but the output head)")
    ap.add_argument("--quantize", default=None, help="quantize the base weights (nf4, int4, int3)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[512], help="row counts to tune for (default 512)")
    ap.add_argument("--batch", type=int, default=1, help="sequences per example (default 1)")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="model dtype (default float32)")
    ap.add_argument("--inference", action="store_true", help="forward only (no backward)")
    args = ap.parse_args(argv)
    if (args.model or args.build) and args.clear:
        ap.error("--clear takes no model")
    for name in ("layers", "r", "batch"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if any(t < 1 for t in args.tokens):
        ap.error(f"--tokens must be >= 1, got {args.tokens}")
    return ap, args


def _from_config(ap, args):
    try:
        import transformers
    except ImportError:
        ap.error("--model needs transformers (pip install transformers)")
    path = args.model
    if os.path.isfile(path):
        with open(path) as f:
            cfg = transformers.AutoConfig.for_model(**json.load(f))
    elif os.path.isfile(os.path.join(path, "config.json")):
        cfg = transformers.AutoConfig.from_pretrained(path)
    else:
        ap.error(f"--model: {path!r} is neither a config.json nor a directory holding one")
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        if hasattr(cfg, name):
            setattr(cfg, name, args.layers)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(DTYPES[args.dtype])
    return model, getattr(cfg, "vocab_size", None)


def _inject(ap, args, model):
    import pyhappy

    if args.target is not None:
        targets = [t for t in args.target.split(",") if t]
    else:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]
    if not targets:
        ap.error("no Linear layer to adapt (use --target)")
    kind = args.adapter or "lora"
    kw = {"r": args.r, "quantize": args.quantize}
    if kind == "dora":
        kw["use_dora"] = True
        kind = "lora"
    pyhappy.inject(model, targets, adapter=kind, **kw)


def _examples(ap, args, model, given, vocab):
    """One argument tuple per --tokens count."""
    if given is not None:
        return [tuple(given)]
    if vocab is None:
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None:
        ap.error("--build: the function returned no example arguments and the model has no config.vocab_size")
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, vocab, (args.batch, t), generator=g),) for t in args.tokens]


def main(argv=None) -> int:
    ap, args = _parse(argv)
    if not (args.model or args.build):
        if args.adapter or args.target or args.quantize:
            ap.error("--adapter, --target and --quantize need --model or --build")
        _tune.main(["--clear"] if args.clear else [])
        return 0
    if _tune.mode() != "on":
        ap.error(f"PYHAPPY_TUNE={_tune.mode()!r} measures nothing; unset it or set it to 'on'")
    given, vocab = None, None
    if args.model:
        model, vocab = _from_config(ap, args)
        _inject(ap, args, model)
    else:
        mod, sep, fn = args.build.partition(":")
        if not sep or not mod or not fn:
            ap.error(f"--build must be MODULE:FUNCTION, got {args.build!r}")
        sys.path.insert(0, os.getcwd())
        try:
            make = getattr(importlib.import_module(mod), fn)
        except ModuleNotFoundError as e:
            ap.error(f"--build: cannot import {mod!r} ({e}); run from the folder that holds it or install it")
        except AttributeError:
            ap.error(f"--build: module {mod!r} has no {fn!r}")
        built = make()
        model, given = (built if isinstance(built, tuple) else (built, None))
        if args.adapter is not None:
            _inject(ap, args, model)
        if not _tune._adapter_modules(model):
            ap.error("--build: the model has no pyhappy layer (give --adapter to inject one)")
    model.train(not args.inference)
    for ex in _examples(ap, args, model, given, vocab):
        shape = tuple(ex[0].shape) if isinstance(ex[0], torch.Tensor) else "?"
        print(f"pyhappy.tune: {len(_tune._adapter_modules(model))} layers, example input {shape}", file=sys.stderr)
        with torch.set_grad_enabled(not args.inference):  # inference: the no-grad calls' keys
            _tune.tune(model, *ex, backward=not args.inference)
    t = _tune.tuner()
    print(f"cache: {t.path} ({len(t.entries())} keys)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
