"""hop-k (paper App. H): error rate against the number of hops k for several depths, vanilla vs KV shift.

Every arm trains through the one trainer (`kvshift.experiments.arms.train_arm`): the task's rows are the
trainer's batches, with the target of position p read AT p (hop-k's labels), and the error by k on
held-out rows is the trainer's evaluator. Fairness: every arm of a seed trains on one shared DataStream
(data seed 1000 + s) from the same shared initial weights (init seed s), with the same steps, batch,
AdamW (0.9, 0.95), weight decay 0.1 and warm-up-then-constant schedule.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from kvshift.experiments import toy_runs
from kvshift.experiments.arms import (
    EVAL_SEED,
    DataStream,
    StreamSource,
    TrainSpec,
    default_device,
    train_arm,
)
from kvshift.experiments.base import Experiment, ResultsLog, RunOptions, write_summary
from kvshift.models import ModelConfig
from kvshift.tasks import hopk
from kvshift.utils.io import read_json, read_jsonl, write_json_atomic, write_text_atomic
from kvshift.utils.plot import pyplot, save_figure
from kvshift.utils.provenance import command_line, provenance

ARMS = ("vanilla", "kvshift")

# Two variants of the task. "iid": characters drawn i.i.d. (a quarter of the positions are fixed points of
# find, so hop_k often equals hop_(k-1): an easier task), Llama blocks. "norepeat": the paper's setting after
# Sanford, Hsu & Telgarsky: no character equals the one before it, length 100, GPT-2-style blocks (learned
# absolute positions, GELU MLP 4x; RMSNorm and no dropout, unlike GPT-2), width 128, 4 heads.
# gpu: 3 depths, both arms; the paper trains 100k steps at batch 32 and lr 1e-4, we train 2,500 steps at batch
# 128 and lr 1e-3 (measured 12-30 ms/step on an H200: 30-75 s per arm). cpu: 2 depths of a small model, ~1 min
# per arm on one core (`threads` is set because two spinning OpenMP threads on a shared 2-core machine run
# 3-20x slower than one).
HOPK = {
    "iid": {
        "gpu": dict(depths=(2, 4, 5), alphabet=4, max_hops=16, seq=128, dim=128, heads=4, ffn=352, batch=128,
                    steps=2500, lr=1e-3, warmup=200, eval_every=500, n_eval=256, bf16=True, threads=None,
                    model={}, no_adjacent_repeats=False),
        "cpu": dict(depths=(2, 3), alphabet=4, max_hops=16, seq=96, dim=64, heads=4, ffn=176, batch=32,
                    steps=800, lr=3e-3, warmup=50, eval_every=200, n_eval=48, bf16=False, threads=1,
                    model={}, no_adjacent_repeats=False),
    },
    "norepeat": {
        "gpu": dict(depths=(3, 4, 5), alphabet=4, max_hops=16, seq=100, dim=128, heads=4, ffn=512, batch=128,
                    steps=2500, lr=1e-3, warmup=200, eval_every=500, n_eval=256, bf16=True, threads=None,
                    model=dict(position="learned", mlp="gelu"), no_adjacent_repeats=True),
        "cpu": dict(depths=(2, 3), alphabet=4, max_hops=16, seq=64, dim=64, heads=4, ffn=256, batch=32,
                    steps=800, lr=3e-3, warmup=50, eval_every=200, n_eval=48, bf16=False, threads=1,
                    model=dict(position="learned", mlp="gelu"), no_adjacent_repeats=True),
    },
}
NAMES = {"iid": "hopk", "norepeat": "hopk-norepeat"}


def _spec(s: dict, steps: int | None) -> TrainSpec:
    return TrainSpec(steps=steps or s["steps"], batch_size=s["batch"], lr=s["lr"], warmup=s["warmup"],
                     eval_every=s["eval_every"], bf16=s["bf16"] and torch.cuda.is_available(), threads=s["threads"])


def _sample_hopk(seq, alphabet, max_hops, batch, g, no_adjacent_repeats=False):
    tokens, targets, _ = hopk.sample(batch, seq, alphabet_size=alphabet, max_hops=max_hops, generator=g,
                                     no_adjacent_repeats=no_adjacent_repeats)
    return tokens, targets  # targets ride in DataStream's second slot


def hopk_batch(tokens: torch.Tensor, targets: torch.Tensor) -> dict:
    """The trainer's batch: the target of position p is read AT p (IGNORE_INDEX = -100: no loss)."""
    tokens = tokens.long()
    return {"input_ids": tokens, "labels": targets.long(), "position_ids": torch.arange(tokens.shape[1]).expand_as(tokens)}


def hopk_eval_sets(s: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For k = 0..max_hops: n_eval held-out sequences with every row's hop count fixed to k."""
    out = []
    for k in range(s["max_hops"] + 1):
        g = torch.Generator().manual_seed(EVAL_SEED + k)
        t, y, _ = hopk.sample(s["n_eval"], s["seq"], alphabet_size=s["alphabet"], max_hops=s["max_hops"],
                              generator=g, hops=k, no_adjacent_repeats=s["no_adjacent_repeats"])
        out.append((t, y))
    return out


def _hopk_eval(sets, undefined, device, model) -> dict:
    err, err_def = [], []
    for t, y in sets:
        logits = model(t.to(device)).float().cpu()
        wrong, total = hopk.error_rate(logits, y)
        d = (y != hopk.IGNORE_INDEX) & (y != undefined)
        wrong_d = int(((logits.argmax(-1) != y) & d).sum())
        err.append(wrong / total)
        err_def.append(wrong_d / max(int(d.sum()), 1))
    return {"error_by_k": err, "error_by_k_defined": err_def, "mean_error": sum(err) / len(err)}


PAPER = ("With L = 5 layers, vanilla attention's hop-k error rate rises past k = 8 while KV shift keeps a small "
         "error up to k = 16.")


def run(variant: str, opts: RunOptions, out: Path) -> dict:
    """Trains the selected (seed, depth, arm) runs, publishes each into out/runs/, then summarises all published
    runs (so jobs split by --only DEPTHS or --seeds merge by copying their results into one tree)."""
    s = HOPK[variant][opts.scale]
    depths = [L for L in s["depths"] if not opts.only or str(L) in opts.only]
    if opts.only and not depths:
        raise ValueError(f"--only: depths of {NAMES[variant]} are {list(s['depths'])}, got {opts.only}")
    arms = {a: {"attention": a} for a in ARMS if not opts.arms or a in opts.arms}
    train_runs(NAMES[variant], s, opts, out, arms, depths)
    return summarize(variant, opts, out)


def _published(path: Path, cfg: ModelConfig, spec) -> bool:
    """A run published at `path` with this model and training spec (a run of other settings is trained again)."""
    if not path.is_file():
        return False
    rec = json.loads(path.read_text())
    same = lambda d: json.loads(json.dumps(d))  # noqa: E731  (tuples as the JSON holds them: lists)
    return rec.get("model") == same(cfg.to_dict()) and rec.get("train") == same(spec.to_dict())


def train_runs(exp: str, s: dict, opts: RunOptions, out: Path, arms: dict[str, dict], depths: list[int],
               sources: tuple[str, ...] = ()) -> None:
    """Trains every (seed, depth, arm) of a hop-k setting `s` (arms: name -> model options beyond s["model"]),
    every arm of a seed on one shared data stream, and publishes each run into out/runs/L<depth>/.
    sources: experiments with the same setting `s` (so the same data stream and evaluation sets); a run one of
    them published beside `out` with the same model, training setting, depth and kind of device is copied."""
    spec = _spec(s, opts.steps)
    device = default_device()
    dev_name = provenance(device)["device"]
    vocab = hopk.HopKVocab(s["alphabet"], s["max_hops"])
    sampler = functools.partial(_sample_hopk, s["seq"], s["alphabet"], s["max_hops"],
                                no_adjacent_repeats=s["no_adjacent_repeats"])
    sets = hopk_eval_sets(s)
    fingerprint = toy_runs.eval_fingerprint(*(t for pair in sets for t in pair))
    eval_fn = functools.partial(_hopk_eval, sets, vocab.undefined_id, device)
    for seed in opts.seed_list():
        stream = None  # drawn when the seed's first run trains (none may: published or copied)
        for L in depths:
            for att, model in arms.items():
                name = f"{att}-{L}L"
                cfg = ModelConfig(vocab_size=vocab.vocab_size, dim=s["dim"], n_layers=L, n_heads=s["heads"],
                                  ffn_dim=s["ffn"], max_seq_len=s["seq"], name=name, **{**s["model"], **model})
                rd = out / "runs" / f"L{L}"
                if _published(rd / f"{att}-s{seed}.json", cfg, spec):  # the same command again continues
                    opts.log(f"[{name}] seed {seed}: published in {rd} with these settings; not trained again")
                    continue
                setting = {"train": spec.to_dict(), "model": cfg.to_dict(), "depth": L,
                           "eval_fingerprint": fingerprint, "device": dev_name}
                src_dirs = [out.parent / f"{e}-{opts.scale}" / "runs" / f"L{L}" for e in sources if e != exp]
                if toy_runs.copy_from(src_dirs, rd, f"{att}-s{seed}", setting, opts.log):
                    continue
                if stream is None:
                    stream = DataStream(sampler, spec.batch_size, spec.steps, seed=1000 + seed)
                r = train_arm(name, cfg, StreamSource(stream, hopk_batch), spec, seq_len=s["seq"], seed=seed,
                              evaluator=eval_fn, run_dir=opts.runs / f"{exp}-{opts.scale}" / f"{name}-s{seed}",
                              device=device, log=opts.log)
                sm = r["summary"]
                final = dict(sm["final_eval"] or {})
                rec = {"seed": seed, "depth": L, "arm": att, "model": cfg.to_dict(), "final": final, "train": spec.to_dict(),
                       "train_seconds": sm["train_time_s"], "wall_seconds": sm["wall_time_s"],
                       "diverged_at": sm["diverged_step"], "non_embedding_params": sm["non_embedding_params"],
                       "eval_fingerprint": fingerprint, "provenance": provenance(device)}
                rd.mkdir(parents=True, exist_ok=True)
                write_json_atomic(rd / f"{att}-s{seed}.json", rec)
                write_text_atomic(rd / f"{att}-s{seed}.metrics.jsonl",
                                  "".join(json.dumps({**x, "eval": "mean_error" in x}) + "\n" for x in r["records"]))
                opts.log(f"{exp} seed {seed} {name}: mean error {final['mean_error']:.3f} "
                         f"({sm['train_time_s']:.0f} s)")


def summarize(variant: str, opts: RunOptions, out: Path) -> dict:
    s = HOPK[variant][opts.scale]
    runs = [json.loads(f.read_text()) for f in sorted((out / "runs").glob("L*/*-s*.json"))]
    if not runs and (out / "summary.json").is_file():  # a summary from before runs were published: its verdict
        summ = read_json(out / "summary.json")
        summ["verdict"], summ["verdict_text"] = hopk_verdict(summ["error_by_depth"], max(map(int, summ["error_by_depth"])),
                                                             variant)
        write_summary(out, summ)
        write_hopk_readme(out, summ)
        return summ
    if not runs:
        raise ValueError(f"{out}: no published runs of {NAMES[variant]} yet")
    vocab = hopk.HopKVocab(s["alphabet"], s["max_hops"])
    defined = [float(((y != vocab.undefined_id) & (y != hopk.IGNORE_INDEX)).sum() / (y != hopk.IGNORE_INDEX).sum())
               for _, y in hopk_eval_sets(s)]
    log = ResultsLog(out)  # every run's records, for the plot
    for f in sorted((out / "runs").glob("L*/*-s*.metrics.jsonl")):
        arm, seed = f.name.split(".")[0].rsplit("-s", 1)
        for x in read_jsonl(f):
            log.log({**x, "arm": f"{arm}-{f.parent.name[1:]}L", "seed": int(seed), "depth": int(f.parent.name[1:])})
    log.close()
    by_depth = {}
    for L in sorted({r["depth"] for r in runs}):
        by_depth[str(L)] = {}
        for att in ARMS:
            rows = [r for r in runs if r["depth"] == L and r["arm"] == att]
            if not rows:
                continue
            mean = lambda key: [sum(r["final"][key][k] for r in rows) / len(rows) for k in range(s["max_hops"] + 1)]  # noqa: E731
            e = mean("error_by_k")
            solved = {str(r["seed"]): hops_solved(r["final"]["error_by_k"]) for r in rows}
            by_depth[str(L)][att] = {"error_by_k": e, "error_by_k_defined": mean("error_by_k_defined"),
                                     "mean_error_k_ge_8": sum(e[8:]) / len(e[8:]),
                                     "mean_error_k_le_4": sum(e[:5]) / 5, "hops_solved": hops_solved(e),
                                     "hops_solved_per_seed": solved,
                                     "mean_error_k_ge_8_per_seed": {str(r["seed"]): sum(r["final"]["error_by_k"][8:]) / 9
                                                                    for r in rows}}
    first = runs[0]
    prov = toy_runs.merged_provenance(runs)
    summ = {"experiment": NAMES[variant], "scale": opts.scale, "paper": PAPER, **prov,
            "summarized_by": command_line(), "variant": variant, "train": first["train"],
            "task": {k: s[k] for k in ("alphabet", "max_hops", "seq", "no_adjacent_repeats")},
            "model": s["model"], "depths": [int(L) for L in by_depth],
            "n_eval_per_k": s["n_eval"], "defined_fraction_by_k": defined,
            "seeds": len({r["seed"] for r in runs}), "error_by_depth": by_depth,
            "runs": [{k: v for k, v in r.items() if k != "provenance"} for r in runs],
            "wall_seconds": sum(r["wall_seconds"] for r in runs)}
    summ["verdict"], summ["verdict_text"] = hopk_verdict(by_depth, max(int(L) for L in by_depth), variant)
    write_summary(out, summ)
    plot_hopk(out, summ)
    write_hopk_readme(out, summ)
    return summ


def hops_solved(error_by_k: list[float], tol: float = 0.05) -> int:
    """Largest k such that every k' <= k has error <= tol (-1: not even k = 0)."""
    k = -1
    while k + 1 < len(error_by_k) and error_by_k[k + 1] <= tol:
        k += 1
    return k


def hopk_verdict(by_depth: dict, deepest: int, variant: str = "norepeat") -> tuple[str, str]:
    """Compare mean error over k >= 8 at the deepest depth. 'reproduced' needs the paper's picture at
    L >= 5: KV shift low (<= 0.1) where vanilla is clearly worse (by 0.1), KV shift lower in every seed; a
    clear KV shift advantage at a shallower depth or without the low absolute error is 'partly'. Without an
    advantage, 'not reproduced' only where the run could show the claim: the paper's task (no adjacent
    repeats) at L >= 5. The claim is about L = 5, and the i.i.d. variant is an easier task on which vanilla
    need not degrade: there, no advantage is 'inconclusive'."""
    d = by_depth[str(deepest)]
    if not {"kvshift", "vanilla"} <= set(d):
        return "inconclusive", f"only {', '.join(d)} ran at L = {deepest}."
    kv, va = d["kvshift"]["mean_error_k_ge_8"], d["vanilla"]["mean_error_k_ge_8"]
    seeds = sorted(set(d["kvshift"]["mean_error_k_ge_8_per_seed"]) & set(d["vanilla"]["mean_error_k_ge_8_per_seed"])) \
        if "mean_error_k_ge_8_per_seed" in d["kvshift"] else []
    every_seed = all(d["kvshift"]["mean_error_k_ge_8_per_seed"][x] < d["vanilla"]["mean_error_k_ge_8_per_seed"][x]
                     for x in seeds)
    solved = lambda v, a: (" (per seed " + "/".join(str(x) for x in v[a]["hops_solved_per_seed"].values()) + ")"  # noqa: E731
                           if "hops_solved_per_seed" in v[a] else "")
    text = (f"At L = {deepest}, mean error over k = 8..16: KV shift {kv:.3f} vs vanilla {va:.3f}"
            + (f" (KV shift lower in {sum(d['kvshift']['mean_error_k_ge_8_per_seed'][x] < d['vanilla']['mean_error_k_ge_8_per_seed'][x] for x in seeds)}/{len(seeds)} seeds)" if seeds else "")
            + f"; k = 0..4: {d['kvshift']['mean_error_k_le_4']:.3f} vs {d['vanilla']['mean_error_k_le_4']:.3f}; "
            "hops solved (error <= 0.05 for every k' <= k, seed-mean curve), KV shift vs vanilla: "
            + ", ".join(f"L = {L}: {v['kvshift']['hops_solved']}{solved(v, 'kvshift')} vs {v['vanilla']['hops_solved']}"
                        f"{solved(v, 'vanilla')}" for L, v in by_depth.items() if {"kvshift", "vanilla"} <= set(v)) + ".")
    better = kv < va - 0.02 and every_seed
    if better and deepest >= 5 and kv <= 0.1 and va >= kv + 0.1:
        return "reproduced", text
    if better:
        return "partly reproduced", text
    if deepest < 5 or variant != "norepeat":
        return "inconclusive", text + (f" No KV-shift advantage, but the run cannot test the claim: "
                                       + ("the deepest depth is L = {}, the claim is about L = 5.".format(deepest)
                                          if deepest < 5 else "on i.i.d. characters (an easier task) vanilla need not "
                                          "degrade at L = 5, which is what the claim is about."))
    return "not reproduced", text


def plot_hopk(out: str, summ: dict) -> None:
    plt = pyplot()
    depths = summ["depths"]
    recs = [r for r in read_jsonl(Path(out) / "metrics.jsonl") if "loss" in r and r["seed"] == 0]
    fig, axes = plt.subplots(2, len(depths), figsize=(4.2 * len(depths), 7.5), squeeze=False)
    ks = list(range(len(summ["defined_fraction_by_k"])))
    for j, L in enumerate(depths):
        ax = axes[0][j]
        for i, att in enumerate(ARMS):
            if att not in summ["error_by_depth"][str(L)]:
                continue
            e = summ["error_by_depth"][str(L)][att]
            ax.plot(ks, e["error_by_k"], "o-", color=f"C{i}", label=att)
            ax.plot(ks, e["error_by_k_defined"], ":", color=f"C{i}", alpha=0.7, label=f"{att} (defined only)")
            rs = [r for r in recs if r["depth"] == L and r["arm"] == f"{att}-{L}L"]
            axes[1][j].plot([r["step"] for r in rs], [r["loss"] for r in rs], color=f"C{i}", label=att)
        ax.plot(ks, [1 - f for f in summ["defined_fraction_by_k"]], color="0.6", lw=0.8, label="undefined share")
        ax.set(title=f"L = {L}", xlabel="hops k", ylabel="error rate", ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
        axes[1][j].set(xlabel="step", ylabel="train loss (nats)", yscale="log")
        axes[1][j].grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    axes[1][0].legend(fontsize=7)
    fig.suptitle(f"hop-k ({summ['scale']} scale): error rate vs k, seed-mean over {summ['seeds']} seed(s)")
    save_figure(fig, f"{out}/plot.png", dpi=100)


def write_hopk_readme(out: str, s: dict) -> None:
    t = s["train"]
    head = ("| L | arm | " + " | ".join(f"k={k}" for k in range(len(s["defined_fraction_by_k"])))
            + " | mean k≥8 | hops solved |")
    rows = [head, "|" + "---|" * (len(s["defined_fraction_by_k"]) + 4)]
    for L in s["depths"]:
        for att in ARMS:
            e = s["error_by_depth"][str(L)].get(att)
            if e is None:
                continue
            rows.append(f"| {L} | {att} | " + " | ".join(f"{v:.2f}" for v in e["error_by_k"])
                        + f" | {e['mean_error_k_ge_8']:.3f} | {e['hops_solved']} |")
    times = ", ".join(f"{r['arm']}-{r['depth']}L {r['train_seconds']:.0f} s" for r in s["runs"] if r["seed"] == 0)
    text = f"""# hop-k (paper App. H)

Command: `{s['command']}`
Commit: `{s['git_commit']}` · device: {s['device']} · torch {s['torch']} · wall {s['wall_seconds']:.0f} s

**Paper:** {s['paper']}

**Task:** Sanford, Hsu & Telgarsky's hop-k over an alphabet of {s['task']['alphabet']}: position 0 holds the
hop-count token k (uniform in 0..{s['task']['max_hops']} per training row), positions 1..{s['task']['seq'] - 1} the
input ({'no character equal to the one before it, as in the paper' if s['task'].get('no_adjacent_repeats') else 'characters drawn i.i.d.'});
model options {s.get('model') or 'Llama blocks (RoPE, SwiGLU)'}; the target at position 1 + i is hop_k(i) or the UNDEFINED class, read from the model's output AT that
position (cross-entropy over all positions but the hop-count token). Evaluation: {s['n_eval_per_k']} held-out
sequences per fixed k; the error rate counts every scored position (UNDEFINED included); the dotted lines count
defined positions only. Share of defined targets by k: {', '.join(f'{v:.2f}' for v in s['defined_fraction_by_k'])}.

**Setting:** depths {s['depths']}, both arms per depth; {t['steps']} steps, batch {t['batch_size']}, AdamW
β=(0.9, 0.95), wd 0.1, lr {t['lr']} with {t['warmup']} warm-up steps then constant, clip 1; every arm sees the same
data stream and starts from the same shared weights; seeds: {s['seeds']}. Training time (seed 0): {times}.

Error rate by k (seed mean):

{chr(10).join(rows)}

**Verdict:** **{s['verdict']}** — {s['verdict_text']}

![plot](plot.png)
"""
    (Path(out) / "README.md").write_text(text)


_RULE = ("reproduced: at the deepest depth (≥ 5) KV shift's mean error over k = 8..16 is ≤ 0.1, at least 0.1 below "
         "vanilla's and lower in every seed; partly: KV shift more than 0.02 below vanilla there in every seed without "
         "both conditions; otherwise not reproduced on the paper's task (no adjacent repeats) at L ≥ 5 (both arms "
         "solving every hop there means vanilla did not degrade), and inconclusive at a shallower deepest depth or on "
         "the i.i.d. variant, an easier task on which vanilla need not degrade.")


def _experiment(variant: str, claim_note: str, description: str) -> Experiment:
    claim = "With 5 layers, vanilla's hop-k error rises past k = 8; KV shift stays low to k = 16." + claim_note
    return Experiment(NAMES[variant], "App. H", claim, _RULE, description,
                      run=lambda opts, out: run(variant, opts, out), summarize=lambda opts, out: summarize(variant, opts, out),
                      options=("only", "arms", "runs"))


EXPERIMENTS = [
    _experiment("iid", " (Our variant with i.i.d. characters: an easier task.)", "App. H: hop-k error vs k, i.i.d. characters, Llama blocks"),
    _experiment("norepeat", "", "App. H as the paper ran it: no adjacent repeats, GPT-2-style blocks, seeds"),
]
