"""results/pipeline-gpu/: what the training pipeline does on the GPU (throughput, MFU, multi-GPU scaling).

    kvshift experiment pipeline --scale gpu --input sizes=RUNS [--only 10m,25m] --input scaling=DIR

`sizes` reads finished runs of `kvshift.experiments.lm` (one directory per size with <arm>-s<seed>/ runs,
each with summary.json and metrics.jsonl as the trainer wrote them on the device) and records, per size
and arm, steady-state tokens/s, MFU, peak memory where recorded, wall time and the final losses, and
draws the train/validation loss curves against tokens (sizes.json, loss.png). `scaling` reads the runs of
scripts/device/scaling.sh (1 GPU, 2 GPUs with DDP, 2 GPUs with FSDP2, the same per-GPU batch) and records
tokens/s, scaling efficiency = tokens/s on N GPUs ÷ (N × tokens/s on 1 GPU) and MFU (scaling.json,
scaling.png). README.md is rebuilt from whichever JSON files are present. Nothing here trains.
"""

from __future__ import annotations

import json
from pathlib import Path

from kvshift.experiments.base import Experiment, RunOptions
from kvshift.train.plot import curves
from kvshift.utils.io import write_json_atomic
from kvshift.utils.plot import pyplot, save_figure
from kvshift.utils.provenance import provenance

OUT = Path("results/pipeline-gpu")
RUN_KEYS = ("status", "steps", "tokens", "epochs", "final_loss", "final_val_loss", "tokens_per_s", "mfu",
            "peak_mem_gib", "wall_time_s", "train_time_s", "params", "non_embedding_params", "world_size",
            "parallel", "device_name", "torch", "git_commit")


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read a run summary ({e})") from None


def sizes(runs: str | Path, only: list[str] | None = None, out: str | Path = OUT) -> dict:
    runs, out = Path(runs), Path(out)
    if not runs.is_dir():
        raise FileNotFoundError(f"--input sizes={runs}: no such directory (expected <size>/<arm>-s<seed>/summary.json)")
    table = {}
    for size_dir in sorted(p for p in runs.iterdir() if p.is_dir()):
        if only and size_dir.name not in only:
            continue
        for rd in sorted(p for p in size_dir.iterdir() if (p / "summary.json").is_file()):
            s = _read(rd / "summary.json")
            if s.get("status") != "finished":
                continue
            table.setdefault(size_dir.name, {})[rd.name] = {k: s.get(k) for k in RUN_KEYS} | {"run": str(rd)}
    if only and set(only) - set(table):
        raise ValueError(f"--only: no finished runs for {sorted(set(only) - set(table))} under {runs}")
    if not table:
        raise ValueError(f"--input sizes={runs}: no finished runs")
    table = dict(sorted(table.items(), key=lambda kv: min(r["non_embedding_params"] or 0 for r in kv[1].values())))
    res = {"kind": "sizes", "source": str(runs), "sizes": table, "summarised": provenance()}
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "sizes.json", res)
    plt = pyplot()
    fig, axes = plt.subplots(1, len(table), figsize=(5.5 * len(table), 4.2), squeeze=False)
    for ax, (size, arms) in zip(axes[0], table.items()):
        for i, (name, r) in enumerate(arms.items()):
            c = curves(r["run"])
            if c["train"]:
                ax.plot(*zip(*c["train"]), color=f"C{i}", alpha=0.3, lw=0.7)
            if c["val"]:
                ax.plot(*zip(*c["val"]), "o-", color=f"C{i}", ms=3, label=f"{name} (val {r['final_val_loss']:.3f})")
        ax.set_title(f"{size}: {next(iter(arms.values()))['non_embedding_params'] / 1e6:.1f}M non-emb. params")
        ax.set_xlabel("tokens")
        ax.set_ylabel("loss (nats/token)")
        ax.set_ylim(top=min(6.0, ax.get_ylim()[1]))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, out / "loss.png")
    write_readme(out)
    return res


def scaling(src: str | Path, out: str | Path = OUT) -> dict:
    src, out = Path(src), Path(out)
    modes = {}
    for md in sorted(p for p in src.iterdir() if (p / "summary.json").is_file()) if src.is_dir() else []:
        s = _read(md / "summary.json")
        modes[md.name] = {k: s.get(k) for k in RUN_KEYS}
    if "1gpu" not in modes:
        raise ValueError(f"{src}: needs at least 1gpu/summary.json (scripts/device/scaling.sh writes <mode>/)")
    base = modes["1gpu"]["tokens_per_s"]
    for m in modes.values():
        n = m["world_size"] or 1
        m["tokens_per_s_per_gpu"] = m["tokens_per_s"] / n
        m["scaling_efficiency"] = m["tokens_per_s"] / (n * base)
    res = {"kind": "scaling", "source": str(src), "modes": modes, "summarised": provenance()}
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "scaling.json", res)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    names = list(modes)
    ax.bar(names, [modes[n]["tokens_per_s"] / 1e6 for n in names], color=[f"C{i}" for i in range(len(names))])
    ax.axhline(2 * base / 1e6, color="k", ls="--", lw=0.8, label="2 × 1 GPU (linear)")
    for i, n in enumerate(names):
        ax.text(i, modes[n]["tokens_per_s"] / 1e6, f"{modes[n]['scaling_efficiency']:.0%}", ha="center", va="bottom")
    ax.set_ylabel("tokens/s (millions)")
    ax.set_title(f"weak scaling, {modes['1gpu'].get('device_name') or ''} (efficiency above bars)")
    ax.legend(fontsize=8)
    save_figure(fig, out / "scaling.png")
    write_readme(out)
    return res


def _fmt(x, spec):
    return "—" if x is None else format(x, spec)


def write_readme(out: str | Path = OUT) -> Path:
    out = Path(out)
    lines = ["# Training pipeline on the GPU", "",
             "Generated by `kvshift experiment pipeline` from the JSON files beside this one.", ""]
    if (out / "sizes.json").is_file():
        s = json.loads((out / "sizes.json").read_text())
        lines += ["## Model sizes", "", f"Runs: `{s['source']}` (bf16 autocast, torch.compile, one GPU each).", "",
                  "| size | run | non-emb. params | tokens | tokens/s | MFU | wall s | final val loss | device |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for size, arms in s["sizes"].items():
            for name, r in arms.items():
                lines.append(f"| {size} | {name} | {r['non_embedding_params']:,} | {r['tokens']:,} | "
                             f"{_fmt(r['tokens_per_s'], ',.0f')} | {_fmt(r['mfu'], '.1%')} | {_fmt(r['wall_time_s'], '.0f')} | "
                             f"{_fmt(r['final_val_loss'], '.4f')} | {r['device_name']} |")
        lines += ["", "![loss curves](loss.png)", ""]
    if (out / "scaling.json").is_file():
        s = json.loads((out / "scaling.json").read_text())
        lines += ["## Multi-GPU scaling", "", f"Runs: `{s['source']}` (scripts/device/scaling.sh: the same per-GPU "
                  "batch on 1 and 2 GPUs).", "",
                  "| mode | GPUs | parallel | tokens/s | per GPU | efficiency | MFU |", "|---|---|---|---|---|---|---|"]
        for name, m in s["modes"].items():
            lines.append(f"| {name} | {m['world_size']} | {m['parallel']} | {m['tokens_per_s']:,.0f} | "
                         f"{m['tokens_per_s_per_gpu']:,.0f} | {m['scaling_efficiency']:.1%} | {_fmt(m['mfu'], '.1%')} |")
        lines += ["", "![scaling](scaling.png)", ""]
    path = out / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def run(opts: RunOptions, out: Path) -> dict:
    """--input sizes=DIR: finished LM runs (<size>/<arm>-s<seed>/); --input scaling=DIR: scaling.sh's runs."""
    done = {}
    for item in opts.inputs:
        kind, _, path = item.partition("=")
        if kind == "sizes":
            done["sizes"] = sizes(path, opts.only, out)
        elif kind == "scaling":
            done["scaling"] = scaling(path, out)
        else:
            raise ValueError(f"--input: expected sizes=DIR or scaling=DIR, got {item!r}")
    if not done:
        raise ValueError("pipeline needs --input sizes=DIR and/or --input scaling=DIR")
    return done


def corpus(opts: RunOptions, out: Path) -> dict:
    """--input corpus=DIR (kvshift data build-corpus) and --input shards=DIR (kvshift data tokenize): their
    manifest.json and meta.json as results/corpus/{manifest.json, shards-meta.json}, the data's identity."""
    src = dict(item.partition("=")[::2] for item in opts.inputs)
    if set(src) - {"corpus", "shards"} or not src:
        raise ValueError("corpus needs --input corpus=DIR and/or --input shards=DIR")
    out.mkdir(parents=True, exist_ok=True)
    done = {}
    for kind, name, dst in (("corpus", "manifest.json", "manifest.json"), ("shards", "meta.json", "shards-meta.json")):
        if kind in src:
            f = Path(src[kind]) / name
            if not f.is_file():
                raise FileNotFoundError(f"--input {kind}={src[kind]}: no {name} there")
            done[dst] = json.loads(f.read_text())
            write_json_atomic(out / dst, done[dst])
    prov = provenance()
    lines = ["# The default offline corpus", "", f"Written by `{prov['command']}` (commit `{prov['git_commit']}`) from "
             "the manifests of `kvshift data build-corpus` (manifest.json: per source the package, version, licences, "
             "documents, bytes, words and the sha256 of each split file) and `kvshift data tokenize` "
             "(shards-meta.json: the tokenizer's sha256, token and document counts per split and domain). The corpus "
             "and the shards are not committed; these commands rebuild them:", "",
             "    kvshift data build-corpus --out cache/corpus",
             "    kvshift data train-tokenizer --corpus cache/corpus --vocab-size 16384 --out cache/tokenizer-16k.json",
             "    kvshift data tokenize --corpus cache/corpus --tokenizer cache/tokenizer-16k.json --out cache/shards-16k",
             ""]
    if "manifest.json" in done:
        t = done["manifest.json"]["totals"]
        lines += [f"Corpus: {t['documents']:,} documents, {t['bytes']:,} bytes, {t['words']:,} words.", ""]
    if "shards-meta.json" in done:
        m = done["shards-meta.json"]
        lines += [f"Shards: vocabulary {m['vocab_size']:,} (tokenizer sha256 `{m['tokenizer_sha256'][:16]}…`); "
                  + "; ".join(f"{k}: {v['tokens']:,} tokens in {v['documents']:,} documents" for k, v in m["splits"].items())
                  + ".", ""]
    if opts.note:
        lines += [f"*Note:* {opts.note}", ""]
    (out / "README.md").write_text("\n".join(lines))
    return done


EXPERIMENTS = [
    Experiment("corpus", "data", None, None,
               "The default offline corpus and its token shards: manifests (sources, licences, sha256, token counts)",
               corpus, options=("inputs", "note"), results_dir=lambda opts: Path("results/corpus")),
    Experiment("pipeline", "beyond the paper", None, None,
               "Training pipeline on the GPU: tokens/s, MFU, loss curves by size; 1 vs 2 GPU scaling (DDP, FSDP2)",
               run, scales=("gpu", "cpu"), options=("inputs", "only")),
]
