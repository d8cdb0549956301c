"""`kvshift data ...`: build-corpus, train-tokenizer, tokenize, pack, unpack, split, join, sources.

Registered by kvshift.cli through `register(subparsers)`; each handler takes the argparse
namespace and returns an exit code.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from kvshift.data.corpus import build_corpus
from kvshift.data.parts import MANIFEST_SUFFIX, join_file, split_file
from kvshift.data.shards import (
    pack_shards,
    subset_shards,
    tokenize_corpus,
    unpack_shards,
)
from kvshift.data.sources import SOURCES
from kvshift.data.tokenizer import train_tokenizer
from kvshift.errors import command_name, run_command

__all__ = ["register"]


def _csv(s: str) -> list[str]:
    return [x for x in (p.strip() for p in s.split(",")) if x]


def _list_arg(values: list[str] | None) -> list[str] | None:
    if values is None:
        return None
    out: list[str] = []
    for v in values:
        out += _csv(v)
    return out


def cmd_build_corpus(args) -> int:
    t0 = time.time()
    sources = _list_arg(args.sources)
    if args.no_sources:
        sources = []
    man = build_corpus(
        args.out, sources=sources, domains=_list_arg(args.domains), exclude_domains=_list_arg(args.exclude_domains),
        cache=args.cache, files=args.files, files_domain=args.files_domain, text_field=args.text_field,
        hf_dataset=args.hf_dataset, hf_split=args.hf_split, hf_max_docs=args.hf_max_docs,
        val_fraction=args.val_fraction, max_docs_per_source=args.max_docs_per_source,
        dedup_min_chars=args.dedup_min_chars, offline=args.offline,
    )
    t = man["totals"]
    print(f"[corpus] total: {t['documents']:,} documents, {t['bytes']:,} bytes, {t['words']:,} words "
          f"in {time.time() - t0:.0f}s -> {Path(args.out) / 'manifest.json'}")
    for name, err in man["failed"].items():
        print(f"[corpus] FAILED {name}: {err}")
    return 0


def cmd_train_tokenizer(args) -> int:
    t0 = time.time()
    tok = train_tokenizer(args.corpus, args.vocab_size, args.out, max_bytes=args.max_bytes or None,
                          min_frequency=args.min_frequency, seed=args.seed)
    n = tok.get_vocab_size()
    short = f" (of {args.vocab_size:,} asked: the corpus has too little text for more merges)" if n < args.vocab_size else ""
    print(f"[tokenizer] vocab {n:,}{short} -> {args.out} ({time.time() - t0:.0f}s)")
    return 0


def cmd_tokenize(args) -> int:
    t0 = time.time()
    meta = tokenize_corpus(args.corpus, args.tokenizer, args.out, domains=_list_arg(args.domains))
    total = sum(s["tokens"] for s in meta["splits"].values())
    dt = time.time() - t0
    print(f"[tokenize] {total:,} tokens ({meta['dtype']}) in {dt:.0f}s = {total / dt / 1e6:.2f}M tokens/s -> {args.out}")
    return 0


def cmd_pack(args) -> int:
    t0 = time.time()
    src = Path(args.shards)
    tmp = None
    try:
        if args.max_train_tokens or args.max_val_tokens:
            tmp = Path(tempfile.mkdtemp(prefix="kvshift-subset-"))
            subset_shards(src, tmp, max_train_tokens=args.max_train_tokens or None, seed=args.seed,
                          max_val_tokens=args.max_val_tokens or None)
            src = tmp
        size = pack_shards(src, args.out, preset=args.preset)
        meta = json.loads((src / "meta.json").read_text())
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    toks = {k: v["tokens"] for k, v in meta["splits"].items()}
    print(f"[pack] {toks} tokens -> {args.out}: {size:,} bytes ({size / 2**20:.1f} MiB) in {time.time() - t0:.0f}s")
    return 0


def cmd_unpack(args) -> int:
    meta = unpack_shards(args.packed, args.out)
    print(f"[unpack] {args.packed} -> {args.out}: " + ", ".join(f"{k}={v['tokens']:,} tokens" for k, v in meta["splits"].items()))
    return 0


def cmd_split(args) -> int:
    man = split_file(args.file, args.out, part_bytes=int(args.part_mib * 2**20))
    print(f"[split] {args.file} ({man['bytes']:,} bytes, sha256 {man['sha256'][:12]}…) -> {len(man['parts'])} parts "
          f"in {args.out}: " + ", ".join(p["name"] for p in man["parts"]) + f"; manifest {man['file']}{MANIFEST_SUFFIX}")
    return 0


def cmd_join(args) -> int:
    man = join_file(args.manifest, args.out)
    print(f"[join] {args.out}: {man['bytes']:,} bytes, sha256 {man['sha256']} (checked, {len(man['parts'])} parts)")
    return 0


def cmd_sources(args) -> int:
    for s in SOURCES.values():
        print(f"{s.name:22s} {s.domain:10s} {s.kind:10s} {s.spec:32s} {'default' if s.default else 'opt-in'}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="real-text corpus, tokenizer, token shards")
    sub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    p.set_defaults(func=lambda a: (p.print_help(), 0)[1])

    b = sub.add_parser("build-corpus", help="build the offline corpus (package sources and/or your files)")
    b.add_argument("--sources", nargs="*", help="source names, comma or space separated (default: all default sources; see `kvshift data sources`)")
    b.add_argument("--no-sources", action="store_true", help="use only --files / --hf-dataset")
    b.add_argument("--domains", nargs="*", help="keep only these domains")
    b.add_argument("--exclude-domains", nargs="*", help="drop these domains")
    b.add_argument("--out", default="cache/corpus", help="output directory")
    b.add_argument("--cache", default="cache/data", help="where packages are downloaded/unpacked")
    b.add_argument("--files", nargs="*", help="your own .txt / .jsonl / .parquet files or globs")
    b.add_argument("--files-domain", default="user", help="domain name for --files / --hf-dataset documents")
    b.add_argument("--text-field", default="text", help="jsonl key / parquet column / dataset field with the text")
    b.add_argument("--hf-dataset", help="Hugging Face dataset NAME[:CONFIG] (needs network and `datasets`)")
    b.add_argument("--hf-split", default="train")
    b.add_argument("--hf-max-docs", type=int)
    b.add_argument("--val-fraction", type=float, default=0.03)
    b.add_argument("--max-docs-per-source", type=int, help="cap per source (quick builds)")
    b.add_argument("--dedup-min-chars", type=int, default=100, help="de-duplicate prose paragraphs at least this long")
    b.add_argument("--offline", action="store_true", help="fail instead of fetching missing packages")
    b.set_defaults(func=cmd_build_corpus)

    t = sub.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer on a corpus' train split")
    t.add_argument("--corpus", required=True)
    t.add_argument("--vocab-size", type=int, default=16384)
    t.add_argument("--out", required=True, help="tokenizer.json path")
    t.add_argument("--max-bytes", type=int, default=300_000_000, help="train on a document sample of about this many bytes (0 = all)")
    t.add_argument("--min-frequency", type=int, default=2)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_train_tokenizer)

    k = sub.add_parser("tokenize", help="tokenize a corpus into memmap shards")
    k.add_argument("--corpus", required=True)
    k.add_argument("--tokenizer", required=True, help="a tokenizers tokenizer.json, a model directory holding one "
                   "(e.g. `kvshift convert-llama` output), or a GGUF file (its tokenizer is written into --out)")
    k.add_argument("--out", required=True, help="shard directory")
    k.add_argument("--domains", nargs="*", help="tokenize only these domains")
    k.set_defaults(func=cmd_tokenize)

    pk = sub.add_parser("pack", help="compress shards into one .tar.xz (optionally a training subset)")
    pk.add_argument("--shards", required=True)
    pk.add_argument("--out", required=True, help="output .tar.xz")
    pk.add_argument("--max-train-tokens", type=int, help="keep a seeded document subset of the train split")
    pk.add_argument("--max-val-tokens", type=int, help="keep a seeded document subset of the validation split "
                    "(a smaller pack for a device call that carries more)")
    pk.add_argument("--seed", type=int, default=0)
    pk.add_argument("--preset", type=int, default=9, help="xz preset 0-9")
    pk.set_defaults(func=cmd_pack)

    u = sub.add_parser("unpack", help="restore shards from a `data pack` archive (needs only numpy)")
    u.add_argument("packed")
    u.add_argument("--out", required=True)
    u.set_defaults(func=cmd_unpack)

    sp = sub.add_parser("split", help="cut a file into parts with a sha256 manifest (carry a large file bit for bit)")
    sp.add_argument("file")
    sp.add_argument("--out", required=True, help="directory for the parts and FILE.parts.json")
    sp.add_argument("--part-mib", type=float, default=46.0, help="largest part in MiB (default 46)")
    sp.set_defaults(func=cmd_split)

    j = sub.add_parser("join", help="reassemble a `data split` file, checking every part's and the whole's sha256")
    j.add_argument("manifest", help="FILE.parts.json (the parts lie beside it)")
    j.add_argument("--out", required=True, help="the reassembled file")
    j.set_defaults(func=cmd_join)

    s = sub.add_parser("sources", help="list the known corpus sources")
    s.set_defaults(func=cmd_sources)


def main(argv: list[str] | None = None) -> int:  # `python -m kvshift.data.cli` before kvshift.cli registers us
    parser = argparse.ArgumentParser(prog="kvshift")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)

    return run_command(command_name(args), args.func, args)


if __name__ == "__main__":
    raise SystemExit(main())
