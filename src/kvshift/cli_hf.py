"""`kvshift export` and `kvshift convert-llama` (the `hf` extra, plus the `gguf` extra for a .gguf SRC;
transformers is imported only when they run).

A ValueError (bad input) is printed as one line with exit status 2 by kvshift.errors.run_command,
which kvshift.cli runs every verb through."""

from __future__ import annotations

import torch

from kvshift.layers.attention import IDENTITY_KINDS

_DTYPES = ("float32", "bfloat16", "float16")


def _dtype(name):
    return None if name is None else getattr(torch, name)


def cmd_export(args) -> int:
    from kvshift.hf.convert import export_checkpoint  # kvshift.hf imports transformers (the hf extra)

    dst = export_checkpoint(args.src, args.dst, tokenizer=args.tokenizer, dtype=_dtype(args.dtype))
    print(f"wrote {dst} (load with: import kvshift.hf; AutoModelForCausalLM.from_pretrained({str(dst)!r}))")
    return 0


def cmd_convert_llama(args) -> int:
    from kvshift.hf.convert import convert_llama  # kvshift.hf imports transformers (the hf extra)

    dst = convert_llama(args.src, args.dst, attention=args.attention, dtype=_dtype(args.dtype))
    print(f"wrote {dst}: {args.attention} attention with the identity shift (logits equal the Llama model's)")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="training run or checkpoint -> transformers KVShiftForCausalLM directory")
    p.add_argument("src", metavar="RUN_OR_CKPT", help="run directory (newest checkpoint) or checkpoint directory")
    p.add_argument("dst", metavar="DST", help="output directory (save_pretrained layout, safetensors)")
    p.add_argument("--tokenizer", help="tokenizer.json or a saved transformers tokenizer directory "
                                       "(default: one found next to the checkpoint or in the run config)")
    p.add_argument("--dtype", choices=_DTYPES, help="store weights in this dtype (default: as trained)")
    p.set_defaults(func=cmd_export)

    c = subparsers.add_parser("convert-llama", help="local LlamaForCausalLM directory or Llama GGUF file -> "
                                                    "KVShiftForCausalLM with the identity shift (same logits)")
    c.add_argument("src", metavar="SRC", help="directory of a saved LlamaForCausalLM, or a Llama .gguf file "
                                              "(dequantized to float32, tokenizer included; needs "
                                              "`pip install gguf accelerate`)")
    c.add_argument("dst", metavar="DST", help="output directory")
    c.add_argument("--attention", default="kvshift", choices=IDENTITY_KINDS,
                   help="attention kind of the converted model (default kvshift)")
    c.add_argument("--dtype", choices=_DTYPES, help="store weights in this dtype (default: the source's; "
                                                    "float32 for a GGUF)")
    c.set_defaults(func=cmd_convert_llama)
