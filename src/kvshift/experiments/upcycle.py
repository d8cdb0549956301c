"""Upcycling: does KV shifting help a PRETRAINED model under continued training? (beyond the paper)

One converted Llama (`kvshift convert-llama`, identity shift: the Llama's logits exactly) starts every arm:
    vanilla   the Llama as is (attention "vanilla": no shift coefficient at all)
    kvshift   keys and values shifted, coefficients learnable from the identity (alpha1 = beta1 = 1)
    kshift    keys only, from the identity: the key shift is what lets one layer form an induction head
              (Theorem 2), so this arm tells whether the value shift matters once the model is pretrained
    kvshift-fast  kvshift with the coefficients' rate 10x higher again (FAST_SHIFT_LR_MULT): at SHIFT_LR_MULT the
              coefficients of SmolLM2-135M barely leave the identity in 400 steps (0 of 90 key heads moved),
              so this arm asks whether the shift helps once the model is free to use it
Arms share everything else: data order (seed = data.seed), optimizer (AdamW, lr LR with warm-up, cosine
to LR/10), steps, evaluation windows. The shift coefficients get their own learning rate: SHIFT_LR_MULT x
the base rate (a pretrained model needs a small base rate, at which the coefficients would barely move).

Inputs: `--input model=DIR` (a converted model directory) or `--input gguf=FILE` (converted once into
--runs/upcycle/), token shards made with the model's tokenizer (`--shards`, default cache/shards-smollm2,
then cache/upcycle-shards). At `--scale cpu` without an input, a tiny random Llama (2 layers, 32 wide) is
made and converted, for tests. Held-out loss per domain: every corpus domain but code counts as prose.

Coefficient movement, per KV head at the end: the previous token's share of keys
s_k = |alpha2| / (|alpha1| + |alpha2|) (values: beta); a head "uses the shift" when s >= MOVED_SHARE (0.1).
Induction heads before and after (`kvshift.eval.analysis`, repeated random tokens after BOS): the source model
once (source-analysis.json) and every run's final checkpoint (its analysis.json); a head counts as an induction
(previous-token) head when its prefix-matching (previous-token) score is >= HEAD_SCORE (upcycle_heads).
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
from pathlib import Path

import torch

from kvshift.experiments import upcycle_heads as heads
from kvshift.experiments import upcycle_report as report
from kvshift.experiments.base import Experiment, RunOptions, write_summary
from kvshift.experiments.lm.runs import (RUN_FILES, _publish, _status, ensure_trained, key_hash, read_coefficients,
                                         run_key)
from kvshift.data.checks import encodes_like_shards
from kvshift.experiments.lm.spec import data_identity
from kvshift.train.checkpoint import list_checkpoints
from kvshift.train.config import load_config
from kvshift.train.metrics import read_metrics
from kvshift.utils.io import file_sha256
from kvshift.utils.provenance import provenance

ARMS = {"vanilla": "vanilla", "kvshift": "kvshift", "kshift": "kshift", "kvshift-fast": "kvshift"}
BASELINE = "vanilla"
SHIFT_LR_MULT = 10.0
FAST_SHIFT_LR_MULT = 100.0
ARM_SHIFT_LR_MULT = {"kvshift-fast": FAST_SHIFT_LR_MULT}  # every other arm: SHIFT_LR_MULT
MOVED_SHARE = heads.MOVED_SHARE
DEFAULT_SHARDS = ("cache/shards-smollm2", "cache/upcycle-shards")
# scale -> settings. gpu: SmolLM2-135M, bf16, compiled; 32,768 tokens a step, 1,800 steps = 59M tokens per arm
# (about 5 min at 200k tokens/s, under 8 at 130k: one arm per 10-minute device command with compilation)
SCALES = {
    "gpu": dict(seq_len=2048, batch=16, steps=1800, lr=1e-4, warmup=100, evals=6, val_windows=512, ckpt_every=600,
                seeds=(0, 1), extra=()),
    "cpu": dict(seq_len=32, batch=4, steps=12, lr=3e-3, warmup=2, evals=3, val_windows=16, ckpt_every=0,
                seeds=(0, 1), extra=('train.device="cpu"', "train.compile=false", 'train.dtype="fp32"',
                                     "train.threads=1", "train.deterministic=true")),
}
RULE = ("per seed d = kvshift's final held-out loss (all domains) − vanilla's; spread = the larger of the two "
        "arms' standard deviations over seeds. Reproduced: d < −spread in every seed (≥ 2 seeds); partly: "
        "mean d < 0; not reproduced: mean d ≥ 0; inconclusive: fewer than 2 seeds with both arms finished.")


def _inputs(opts: RunOptions) -> dict[str, str]:
    out = {}
    for item in opts.inputs:
        key, sep, val = item.partition("=")
        if not sep or key not in ("model", "gguf") or not val:
            raise ValueError(f"--input {item!r}: upcycle takes --input model=DIR (a converted model) or "
                             f"--input gguf=FILE (a Llama GGUF)")
        out[key] = val
    if len(out) > 1:
        raise ValueError("upcycle takes one of --input model=DIR and --input gguf=FILE, not both")
    return out


def tiny_llama(dst: Path, vocab_size: int, seed: int = 0) -> Path:
    """A tiny random Llama (2 layers, 32 wide, GQA 4/2, tied embeddings) converted to a KV-shift model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvshift.hf.convert import convert_llama

    if (dst / "config.json").is_file():
        return dst
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    llama = LlamaForCausalLM(cfg)
    src = dst.with_name(dst.name + "-llama")
    llama.save_pretrained(src)
    convert_llama(src, dst)
    shutil.rmtree(src, ignore_errors=True)
    return dst


def model_dir(opts: RunOptions, vocab_size: int) -> Path:
    """The converted model every arm starts from (see the module docstring)."""
    inp = _inputs(opts)
    if "model" in inp:
        d = Path(inp["model"])
        if not (d / "config.json").is_file() or not (d / "model.safetensors").is_file():
            raise ValueError(f"--input model={d}: not a converted model directory (config.json and "
                             f"model.safetensors; make one with `kvshift convert-llama FILE.gguf DIR`)")
        return d
    if "gguf" in inp:
        from kvshift.hf.convert import convert_llama

        src = Path(inp["gguf"])
        if not src.is_file():
            raise ValueError(f"--input gguf={src}: no such file")
        dst = opts.runs / "upcycle" / f"model-{file_sha256(src)[:12]}"
        if not (dst / "config.json").is_file():
            opts.log(f"[upcycle] converting {src} -> {dst}")
            convert_llama(src, dst)
        return dst
    if opts.scale == "gpu":
        raise ValueError("upcycle --scale gpu needs the pretrained model: --input gguf=FILE or --input model=DIR")
    return tiny_llama(opts.runs / "upcycle" / f"tiny-llama-v{vocab_size}", vocab_size)


def shard_dir(opts: RunOptions) -> Path:
    cands = [opts.shards] if opts.shards else [Path(c) for c in DEFAULT_SHARDS]
    for c in cands:
        if (Path(c) / "meta.json").is_file():
            return Path(c)
    raise ValueError(f"no token shards in {', '.join(map(str, cands))}: tokenize the corpus with the model's tokenizer "
                     f"(`kvshift data tokenize --corpus cache/corpus --tokenizer FILE.gguf --out cache/shards-smollm2`)"
                     f" or pass --shards")


def model_fields(model: Path) -> dict:
    """ModelConfig fields of a converted model directory (its config.json)."""
    from kvshift.hf.configuration import KVShiftConfig

    mc = KVShiftConfig.from_pretrained(str(model)).to_model_config()
    return {k: v for k, v in mc.to_dict().items() if k not in ("attention", "name") and v is not None}


def check_match(model: Path, shards: Path, fields: dict) -> None:
    meta = json.loads((shards / "meta.json").read_text())
    if meta["vocab_size"] != fields["vocab_size"]:
        raise ValueError(f"{shards}: shards of vocabulary {meta['vocab_size']:,}, but the model {model} has "
                         f"{fields['vocab_size']:,}; tokenize with the model's tokenizer")
    tok = model / "tokenizer.json"
    if not tok.is_file() or file_sha256(tok) == meta["tokenizer_sha256"]:
        return
    # different bytes: transformers versions serialise the same tokenizer differently (the model converted on
    # one machine, the shards tokenized on another), so compare what the two encode
    if encodes_like_shards(tok, shards, meta["tokenizer_sha256"]):
        return
    raise ValueError(f"{shards}: made with another tokenizer than {tok} (sha256 differs"
                     + ("" if (shards / "tokenizer.json").is_file()
                        else "; the shards keep no tokenizer.json to compare encodings with")
                     + f"); tokenize with `--tokenizer {model}`")


def run_config(scale: str, model: Path, fields: dict, arm: str, seed: int, shards: Path,
               steps: int | None = None, overrides: list[str] | None = None):
    sc = SCALES[scale]
    steps = steps or sc["steps"]
    m = {**fields, "attention": ARMS[arm], "max_seq_len": max(fields["max_seq_len"], sc["seq_len"]),
         "name": f"upcycle-{arm}"}
    ev = max(1, steps // sc["evals"])
    ov = [*(f"model.{k}={json.dumps(v)}" for k, v in m.items()),
          'data.kind="shards"', f"data.shard_dir={json.dumps(str(shards))}", f"data.seq_len={sc['seq_len']}",
          f"data.batch_size={sc['batch']}", "data.grad_accum=1", f"data.seed={seed}",
          f"data.val_windows={sc['val_windows']}", f"optim.lr={sc['lr']}", f"optim.min_lr={sc['lr'] / 10}",
          f"optim.warmup={sc['warmup']}", 'optim.schedule="cosine"',
          f"optim.shift_lr_mult={ARM_SHIFT_LR_MULT.get(arm, SHIFT_LR_MULT)}",
          f"train.steps={steps}", f"train.eval_every={ev}", "train.eval_at_start=true",
          f"train.ckpt_every={sc['ckpt_every']}", "train.keep_last=1", "train.seed=0",
          f"train.init_from={json.dumps(str(model))}", "train.log_every=10", "train.progress=false",
          *sc["extra"], *(overrides or [])]
    return load_config(None, ov)


def run_one(opts: RunOptions, model: Path, ident: dict, fields: dict, arm: str, seed: int, out: Path,
            shards: Path) -> str:
    """Trains one arm/seed (or finds it done) and publishes it to out/runs/<arm>-s<seed>."""
    cfg = run_config(opts.scale, model, fields, arm, seed, shards, opts.steps, opts.overrides)
    key = run_key(cfg, ident)
    res = out / "runs" / f"{arm}-s{seed}"
    if st := _status(res, key):
        opts.log(f"[upcycle] {arm} s{seed}: already in {res} ({st})")
        return st
    rd = opts.runs / "upcycle" / key_hash(key)
    label = f"[upcycle] {arm} s{seed}"
    st, s = ensure_trained(rd, key, cfg, {"experiment": "upcycle", "scale": opts.scale, "arm": arm, "seed": seed},
                           log=opts.log, label=label)
    if st == "interrupted":
        return st
    # from the final checkpoint whenever it is there (also for a run trained by an earlier, cut call)
    ck = list_checkpoints(rd / "checkpoints")
    if ck and (ck[-1] / "model.safetensors").is_file():
        layers = read_coefficients(ck[-1] / "model.safetensors", cfg.model_config())
        step = int(ck[-1].name.rpartition("_")[2])
        (rd / "coefficients.jsonl").write_text(json.dumps({"step": step, "layers": layers}) + "\n")
        if not (rd / "analysis.json").is_file():
            try:  # an analysis failure must not cost the trained run: it is published without the head counts
                heads.write_report(ck[-1], rd / "analysis.json", bos=heads.bos_id(model))
            except Exception as e:  # noqa: BLE001
                opts.log(f"{label}: head analysis failed ({type(e).__name__}: {e}); published without it")
    if s is not None:
        opts.log(f"{label}: {st}, val loss {s['final_val_loss']}, {s['tokens_per_s'] or 0:,.0f} tokens/s")
    if not opts.keep_checkpoints:
        shutil.rmtree(rd / "checkpoints", ignore_errors=True)
    _publish(rd, res)
    return st


def run(opts: RunOptions, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    if opts.summarize_only:
        return summarize(opts, out)
    arms = opts.arms or list(ARMS)
    bad = sorted(set(arms) - set(ARMS))
    if bad:
        raise ValueError(f"--arms: unknown arms {bad}; arms: {list(ARMS)}")
    shards = shard_dir(opts)
    vocab = json.loads((shards / "meta.json").read_text())["vocab_size"]
    model = model_dir(opts, vocab)
    fields = model_fields(model)
    check_match(model, shards, fields)
    ident = {**data_identity(shards), "init_sha256": file_sha256(model / "model.safetensors")}
    try:  # once per experiment directory; a failure costs the head counts, not the training
        heads.source_report(out, model, log=opts.log)
    except Exception as e:  # noqa: BLE001
        opts.log(f"[upcycle] head analysis of the source model failed ({type(e).__name__}: {e})")
    for seed in opts.seed_list(SCALES[opts.scale]["seeds"]):
        for arm in arms:
            if run_one(opts, model, ident, fields, arm, seed, out, shards) == "interrupted":
                opts.log("[upcycle] interrupted: rerun the same command to continue")
                break
    return summarize(opts, out)


def run_dirs(out: Path) -> list[Path]:
    """out/runs/ARM-sSEED directories (never a temporary one that a publish left behind)."""
    d = out / "runs"
    return sorted(p for p in d.iterdir() if p.is_dir() and re.fullmatch(r".+-s\d+", p.name)) if d.is_dir() else []


def published_runs(out: Path, runs: Path) -> dict[str, Path]:
    """{ARM-sSEED: scratch directory} of the finished runs published in out/runs (what the summary reports),
    found by the hash of each run's key: the models to score, never another run left in `runs`."""
    found = {}
    for d in run_dirs(Path(out)):
        if (d / "run.json").is_file() and (d / "summary.json").is_file() and \
                json.loads((d / "summary.json").read_text()).get("status") == "finished":
            found[d.name] = Path(runs) / "upcycle" / key_hash(json.loads((d / "run.json").read_text())["key"])
    return found


# ---- summary ------------------------------------------------------------------------------------
def domain_losses(rec: dict) -> dict:
    """{"all", "prose", "code"} held-out losses of an evaluation record: prose = every domain but code,
    weighted by its evaluated tokens."""
    out = {"all": rec.get("val_loss")}
    pairs = [(k[len("val_loss/"):], v) for k, v in rec.items() if k.startswith("val_loss/")]
    prose = [(v, rec.get(f"val_tokens/{d}", 0)) for d, v in pairs if d != "code"]
    n = sum(w for _, w in prose)
    out["prose"] = sum(v * w for v, w in prose) / n if n else None
    out["code"] = dict(pairs).get("code")
    return out


def run_stats(d: Path) -> dict:
    s = json.loads((d / "summary.json").read_text())
    recs = read_metrics(d / "metrics.jsonl")
    evals = [r for r in recs if "val_loss" in r]
    st = {"status": s["status"], "tokens": s["tokens"], "tokens_per_s": s["tokens_per_s"],
          "start": domain_losses(evals[0]) if evals else None, "final": domain_losses(evals[-1]) if evals else None,
          "curve": [{"tokens": r["tokens"], **domain_losses(r)} for r in evals]}
    if (d / "coefficients.jsonl").is_file():
        st["coefficients"] = heads.coefficient_movement(json.loads((d / "coefficients.jsonl").read_text().splitlines()[-1])["layers"])
    st["heads"] = heads.counts(heads.read(d / "analysis.json"))
    return st


def arm_diffs(runs: dict, arm: str) -> dict[int, float]:
    """{seed: arm's final held-out loss − vanilla's} over the seeds where both finished."""
    fin = lambda a, s: runs.get(a, {}).get(s, {}).get("status") == "finished"  # noqa: E731
    return {s: runs[arm][s]["final"]["all"] - runs[BASELINE][s]["final"]["all"]
            for s in sorted(runs.get(arm, {})) if fin(arm, s) and fin(BASELINE, s)}


def verdict(runs: dict) -> tuple[str, str, dict]:
    dk = arm_diffs(runs, "kvshift")  # the seeds where both finished
    both = list(dk)
    if len(both) < 2:
        seen = "".join(f"; seed {s}: kvshift − vanilla final held-out loss {dk[s]:+.4f} "
                       f"({runs[BASELINE][s]['final']['all']:.4f} → {runs['kvshift'][s]['final']['all']:.4f}, "
                       f"{runs['kvshift'][s]['tokens']:,} tokens)" for s in both)
        return "inconclusive", (f"{len(both)} seed(s) with both vanilla and kvshift finished; the rule needs ≥ 2"
                                + seen), {}
    fin = {a: [runs[a][s]["final"]["all"] for s in both] for a in (BASELINE, "kvshift")}
    d = list(dk.values())
    spread = max(statistics.stdev(x) for x in fin.values())
    mean = statistics.mean(d)
    v = "reproduced" if all(x < -spread for x in d) else "partly reproduced" if mean < 0 else "not reproduced"
    by_dom = {dom: statistics.mean(runs["kvshift"][s]["final"][dom] - runs[BASELINE][s]["final"][dom] for s in both)
              for dom in ("prose", "code") if all(runs[a][s]["final"].get(dom) is not None
                                                   for a in (BASELINE, "kvshift") for s in both)}
    rel = 100 * mean / statistics.mean(fin[BASELINE])
    text = (f"kvshift − vanilla final held-out loss {mean:+.4f} ({rel:+.2f}% of vanilla's; per seed "
            f"{', '.join(f'{x:+.4f}' for x in d)}; seed spread {spread:.4f}; n={len(both)})"
            + "".join(f"; {k} {x:+.4f}" for k, x in by_dom.items()))
    return v, text, {"diff": d, "mean_diff": mean, "spread": spread, "diff_by_domain": by_dom, "seeds": both}


def summarize(opts: RunOptions, out: Path) -> dict:
    runs: dict = {}
    for d in run_dirs(out):
        arm, _, seed = d.name.rpartition("-s")
        if arm in ARMS and (d / "summary.json").is_file():
            runs.setdefault(arm, {})[int(seed)] = run_stats(d)
    if not runs:
        raise ValueError(f"{out}: no finished upcycle runs yet (run `kvshift experiment upcycle --scale {opts.scale}`)")
    v, text, extra = verdict(runs)
    others = {a: d for a in ARMS if a not in (BASELINE, "kvshift") and (d := arm_diffs(runs, a))}
    text += "".join(f"; {a} − vanilla {statistics.mean(d.values()):+.4f} (per seed "
                    + ", ".join(f"s{k} {x:+.4f}" for k, x in d.items()) + ")" for a, d in others.items())
    moved = [(a, r["coefficients"]) for a in ARMS if a != BASELINE for r in runs.get(a, {}).values()
             if r.get("coefficients")]
    if moved:  # how much the shifted arms use the shift at all: the size of what the verdict compares
        text += (f"; heads using the shift at the end (previous-token share ≥ {MOVED_SHARE}): at most "
                 f"{max(c['k_heads_moved'] for _, c in moved)} key and {max(c['v_heads_moved'] for _, c in moved)} "
                 f"value heads of {moved[0][1]['heads']} in any shifted run")
    source_heads = heads.counts(heads.read(out / "source-analysis.json"))
    ok = lambda r: r.get("status") == "finished" and r.get("tokens_per_s")  # noqa: E731
    tps = {a: {str(k): r["tokens_per_s"] / runs[BASELINE][k]["tokens_per_s"] for k, r in sorted(runs.get(a, {}).items())
               if ok(r) and ok(runs[BASELINE].get(k) or {})}
           for a in ARMS if a != BASELINE and a in runs} if BASELINE in runs else {}
    starts = [r["start"]["all"] for a in runs.values() for r in a.values() if r["start"]]
    same_start = bool(starts) and max(starts) - min(starts) < 1e-3
    prov = provenance()
    infos = [json.loads((d / "run.json").read_text()) for d in run_dirs(out) if (d / "run.json").is_file()]
    if infos:  # where the runs trained, not where this summary is written
        for k in ("git_commit", "device", "torch"):
            prov[k] = "; ".join(dict.fromkeys(str(i["provenance"].get(k)) for i in infos))
    if not same_start:  # the arms did not start from the same function: their comparison means nothing
        v, text = "inconclusive", text + "; the arms' step-0 held-out losses differ, so they did not start alike"
    s = {"experiment": "upcycle", "scale": opts.scale, "verdict": v, "verdict_text": text, **prov,
         "shift_lr_mult": SHIFT_LR_MULT, "arm_shift_lr_mult": ARM_SHIFT_LR_MULT, "moved_share": MOVED_SHARE,
         "identical_start": same_start, **extra, "other_arms_diff": others,
         "head_score": heads.HEAD_SCORE, "source_heads": source_heads, "tokens_per_s_ratio": tps,
         "runs": {a: {str(k): {x: y for x, y in r.items() if x != "curve"} for k, r in sorted(runs[a].items())}
                  for a in ARMS if a in runs}}
    write_summary(out, s)
    report.plot(out, runs)
    report.readme(out, s, RULE)
    return s


EXPERIMENTS = [
    Experiment("upcycle", "beyond the paper", "KV shifting helps a pretrained model under continued training.", RULE,
               "continued pretraining of a converted Llama (SmolLM2-135M at gpu scale): vanilla vs KV shift vs K "
               "shift vs KV shift at a 10x higher coefficient rate, from the identity", run=run, summarize=summarize,
               options=("arms", "shards", "runs", "inputs", "overrides", "keep_checkpoints", "summarize_only")),
]
assert set(RUN_FILES) >= {"summary.json", "metrics.jsonl", "coefficients.jsonl"}
