"""Language-model experiments (paper Sec. 4): scales, model sizes, arms and the run config of each run.

Fairness: both arms of a pair get the same train.seed (identical shared initial weights) and the same
data.seed (identical batches); every hyperparameter but the swept one is the same.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from kvshift.train.config import RunConfig, load_config

DEFAULT_SHARDS = ("cache/lm-shards", "cache/shards-16k")
PACK_HINT = ("make them with `kvshift data unpack cache/lm-pack.tar.xz --out cache/lm-shards` (the pack: `kvshift "
             "data pack --shards cache/shards-16k --out cache/lm-pack.tar.xz --max-train-tokens 108000000`; the "
             "shards: `kvshift data build-corpus`, `train-tokenizer --vocab-size 16384`, `tokenize`), or pass --shards")


def shard_dir(path: str | Path | None = None) -> Path:
    """The token shard directory: `path`, else the first of DEFAULT_SHARDS that exists."""
    cands = [path] if path else list(DEFAULT_SHARDS)
    for c in cands:
        if (Path(c) / "meta.json").is_file():
            return Path(c)
    raise FileNotFoundError(f"no token shards (meta.json) in {', '.join(map(str, cands))}: {PACK_HINT}")


def data_identity(shards: Path) -> dict:
    meta = json.loads((Path(shards) / "meta.json").read_text())
    return {"tokenizer_sha256": meta["tokenizer_sha256"], "vocab_size": meta["vocab_size"],
            **{f"{k}_tokens": v["tokens"] for k, v in sorted(meta["splits"].items())}}


# ---- scales, model sizes, arms ------------------------------------------------------------------
@dataclass(frozen=True)
class Scale:
    base: str  # shipped config the runs start from (every field that matters is overridden below)
    seq_len: int
    batch: int
    warmup: int
    eval_batches: int
    evals: int  # evaluations per run
    log_every: int
    sizes: dict  # size -> (preset, model overrides)
    lr: dict  # size -> learning rate (both arms alike)
    extra: tuple = ()


_MHA = lambda d, L, h, f: dict(dim=d, n_layers=L, n_heads=h, n_kv_heads=h, ffn_dim=f)  # noqa: E731
SCALES = {
    # batch 64 x 1024 tokens, AdamW (0.9, 0.95), wd 0.1, 100 warm-up steps then constant, clip 1 (the small-scale reference setting)
    "gpu": Scale("lm-10m", 1024, 64, 100, 10, 16, 10,
                 {s: (f"lm-{s}", {}) for s in ("3m", "10m", "25m", "50m", "85m")},
                 {"3m": 1e-3, "10m": 1e-3, "25m": 1e-3, "50m": 8e-4, "85m": 8e-4}),
    # the same part names on debug-size models (13k .. 0.8M non-embedding params)
    "cpu": Scale("debug", 64, 8, 5, 2, 4, 1,
                 {"3m": ("debug", _MHA(32, 1, 2, 96)), "10m": ("debug", _MHA(48, 2, 4, 128)),
                  "25m": ("debug", _MHA(64, 2, 4, 192)), "50m": ("debug", _MHA(96, 3, 4, 256)),
                  "85m": ("debug", _MHA(128, 4, 4, 352))},
                 {s: 3e-3 for s in ("3m", "10m", "25m", "50m", "85m")},
                 ('train.device="cpu"', "train.compile=false", 'train.dtype="fp32"', "train.threads=1",
                  "train.deterministic=false")),
}
# n_kv_heads = n_heads / 4; at ~50M: 8 heads of 80 (10 does not divide by 4), ffn 2048 keeps 49.5M params
GQA = {"gpu": dict(n_heads=8, n_kv_heads=2, ffn_dim=2048), "cpu": dict(n_heads=4, n_kv_heads=1)}
ARMS = {"vanilla": {"attention": "vanilla"}, "kvshift": {"attention": "kvshift"},
        "kvshift_gate": {"attention": "kvshift_gate"}, "kvshift_clamp": {"attention": "kvshift_clamp"},
        "kshift": {"attention": "kshift"}, "vshift": {"attention": "vshift"},
        "window2": {"attention": "kvshift", "shift_window": 2}, "window3": {"attention": "kvshift", "shift_window": 3}}
# the family of short causal mixers (lm-family): vanilla attention + one mixer, and KV shift + Canon layers
FAMILY = {"dconv": {"attention": "vanilla", "mixer": "dconv"}, "canon": {"attention": "vanilla", "mixer": "canon"},
          "keyoffset": {"attention": "vanilla", "mixer": "keyoffset"},
          "smear": {"attention": "vanilla", "mixer": "smear"},
          "kvshift_canon": {"attention": "kvshift", "mixer": "canon"}}
FAMILY_ARMS = ("vanilla", "kvshift", "dconv", "canon", "keyoffset", "smear", "kvshift_canon")
ARM_MODELS = {**ARMS, **FAMILY}  # every arm a language-model run can have
PAIR = ("vanilla", "kvshift")
LRS = (1e-4, 2e-4, 1e-3, 1e-2)
# assumed H200 training throughput (tokens/s, bf16, compiled) for `plan`; 25m is measured (the small-scale reference
# setting), 50m too (vanilla 0.69M in lm-main, 0.74M in lm-family's 50m part)
TOKENS_PER_S = {"3m": 2.4e6, "10m": 1.7e6, "25m": 1.05e6, "50m": 0.7e6, "85m": 0.4e6}
# slow-down of an arm with a mixer: vanilla's tokens/s over the arm's, measured on the H200 at 10m (lm-family,
# results/lm-family-gpu: 0.893 dconv, 0.668 canon, 0.963 keyoffset, 0.957 smear, 0.598 kvshift + canon);
# 1.15 for an arm with a mixer not measured yet
MIXER_SLOWDOWN = {"dconv": 1.12, "canon": 1.50, "keyoffset": 1.04, "smear": 1.05, "kvshift_canon": 1.67}


@dataclass
class Part:
    """A group of runs compared with each other (the first arm is the baseline)."""
    name: str
    size: str
    steps: int
    arms: tuple = PAIR
    seeds: tuple = (0,)
    lr: float | None = None  # None: the size's learning rate
    model: dict = field(default_factory=dict)  # model overrides beyond the size and the arm
    coefficients: str | None = None  # arm whose checkpoints' shift coefficients are recorded
    optional: bool = False  # run only when named in --only
    overrides: tuple = ()  # run-config overrides of this part (`section.key=value`)
    trajectory: bool = False  # every shift coefficient at step 0 and at every evaluation, in metrics.jsonl


def parts(name: str, scale: str, lrs=LRS) -> list[Part]:
    """The groups of runs of a language-model experiment at a scale."""
    g = scale == "gpu"
    if name == "lm-main":
        return [Part("10m", "10m", 4000 if g else 60), Part("50m", "50m", 2800 if g else 60, coefficients="kvshift")]
    if name == "lm-seeds":
        return [Part("10m", "10m", 1200 if g else 40, seeds=(0, 1, 2))]
    if name == "lm-lr":
        top = max(lrs)
        return [Part(f"lr={lr:g}", "10m", 1200 if g else 40, lr=lr, seeds=(0, 1, 2) if lr == top else (0,))
                for lr in lrs] + [
            # the paper's setting at the largest rate: no gradient clipping, 5 seeds
            Part(f"lr={top:g}-noclip", "10m", 1200 if g else 40, lr=top, seeds=(0, 1, 2, 3, 4),
                 overrides=("optim.clip=0.0",), optional=True)]
    if name == "lm-scaling":
        return [Part(s, s, 600 if g else 40, optional=s == "85m") for s in ("3m", "10m", "25m", "50m", "85m")]
    if name == "lm-variants":
        return [Part("10m", "10m", 1200 if g else 40, arms=tuple(ARMS))]
    if name == "shift-coefficients":  # lm-main's larger KV-shift run: the same run key, so trained once
        return [Part("50m", "50m", 2800 if g else 60, arms=("kvshift",), coefficients="kvshift")]
    if name == "shift-coupling":  # Table 4 at ~10M: the paper's init, and every head on the quadrant boundary
        return [Part(init, "10m", 1200 if g else 40, arms=("kvshift",), seeds=(0, 1, 2), model={"shift_init": init},
                     trajectory=True) for init in ("uniform", "half")]
    if name == "lm-gqa":
        return [Part("50m-gqa", "50m", 2800 if g else 60, model=GQA[scale])]
    if name == "lm-family":  # 10m: lm-seeds' settings (its runs are copied where the data build is the same)
        return [Part("10m", "10m", 1200 if g else 40, arms=FAMILY_ARMS, seeds=(0, 1, 2)),
                Part("50m", "50m", 1400 if g else 40, arms=FAMILY_ARMS, seeds=(0, 1))]
    raise ValueError(f"no runs for experiment {name!r}")


def run_config(scale: str, part: Part, arm: str, seed: int, shards: Path, steps: int | None = None,
               overrides: list[str] | None = None) -> RunConfig:
    """The RunConfig of one run; `overrides` (`section.key=value`, applied last) are for smoke tests."""
    sc = SCALES[scale]
    preset, size_model = sc.sizes[part.size]
    steps = steps or part.steps
    vocab = json.loads((Path(shards) / "meta.json").read_text())["vocab_size"]
    model = {**size_model, **part.model, **ARM_MODELS[arm], "vocab_size": vocab}
    # the coefficient arm checkpoints every 10% of its steps (0: only the final checkpoint). Checkpointing
    # reads state and changes no numbers, so this is the one config field besides the arm that may differ.
    ckpt = max(1, steps // 10) if arm == part.coefficients else 0
    ov = [f"model.preset={json.dumps(preset)}", *(f"model.{k}={json.dumps(v)}" for k, v in model.items()),
          'data.kind="shards"', f"data.shard_dir={json.dumps(str(shards))}", f"data.seq_len={sc.seq_len}",
          f"data.batch_size={sc.batch}", "data.grad_accum=1", f"data.seed={seed}",
          f"optim.lr={part.lr or sc.lr[part.size]}", f"optim.warmup={sc.warmup}", 'optim.schedule="constant"',
          f"train.steps={steps}", f"train.eval_every={max(1, steps // sc.evals)}",
          f"train.eval_batches={sc.eval_batches}", f"train.ckpt_every={ckpt}", "train.keep_last=2",
          f"train.seed={seed}", f"train.log_every={sc.log_every}", "train.progress=false", *sc.extra,
          *part.overrides, *(overrides or [])]
    if part.trajectory:
        ov += ["train.eval_at_start=true", f"train.coefficients_every={max(1, steps // sc.evals)}"]
    return load_config(sc.base, ov)


def _csv(x) -> list[str] | None:
    if x is None:
        return None
    return [s.strip() for s in (x.split(",") if isinstance(x, str) else x) if str(s).strip()]


def select(all_parts: list[Part], only=None, arms=None, seeds=None) -> list[tuple[Part, list[str], list[int]]]:
    only, arms = _csv(only), _csv(arms)
    names = {p.name for p in all_parts}
    if only and set(only) - names:
        raise ValueError(f"--only: unknown parts {sorted(set(only) - names)}; parts: {sorted(names)}")
    known = {a for p in all_parts for a in p.arms}
    if arms and set(arms) - known:
        raise ValueError(f"--arms: unknown arms {sorted(set(arms) - known)}; arms: {sorted(known)}")
    out = []
    for p in all_parts:
        if (only and p.name not in only) or (not only and p.optional):
            continue
        a = [x for x in p.arms if not arms or x in arms]
        if a:
            out.append((p, a, list(seeds) if seeds is not None else list(p.seeds)))
    return out


# The device jobs of docs/gpu.md: each fits one 10-minute GPU command (`plan` estimates them).
JOBS = [("lm-main", dict(only="10m")), ("lm-main", dict(only="50m", arms="vanilla")),
        ("lm-main", dict(only="50m", arms="kvshift")), ("lm-seeds", {}),
        ("lm-lr", dict(only="lr=0.0001,lr=0.0002,lr=0.001")), ("lm-lr", dict(only="lr=0.01")),
        ("lm-scaling", dict(only="3m,10m,25m")), ("lm-scaling", dict(only="50m")),
        ("lm-variants", dict(arms="vanilla,kvshift,kvshift_gate,kvshift_clamp")),
        ("lm-variants", dict(arms="kshift,vshift,window2,window3")),
        ("lm-gqa", dict(arms="vanilla")), ("lm-gqa", dict(arms="kvshift")),
        # lm-family: 10m by arm over its 3 seeds, 50m two runs a command (the slowest mixer beside a fast one)
        *(("lm-family", dict(only="10m", arms=a)) for a in ("vanilla,kvshift", "dconv,smear", "canon,keyoffset",
                                                            "kvshift_canon")),
        *(("lm-family", dict(only="50m", arms=a, seeds=sd)) for sd in ("0", "1")
          for a in ("vanilla,kvshift", "dconv,smear", "canon,keyoffset", "kvshift_canon"))]


def plan(scale: str = "gpu") -> list[tuple[str, int, float]]:
    """(job, runs, estimated seconds on one H200) for each device job."""
    sc, rows = SCALES[scale], []
    for name, opts in JOBS:
        secs, n, graphs = 30.0, 0, set()  # 30 s: unpack, imports
        sel = {k: v for k, v in opts.items() if k != "seeds"}
        seeds_opt = [int(x) for x in opts["seeds"].split(",")] if "seeds" in opts else None
        for p, arms, seeds in select(parts(name, scale), seeds=seeds_opt, **sel):
            for arm in arms:
                has_mixer = ARM_MODELS[arm].get("mixer", "none") != "none"
                slow = MIXER_SLOWDOWN.get(arm, 1.15) if has_mixer else 1.0
                for _ in seeds:
                    n += 1
                    secs += p.steps * sc.batch * sc.seq_len / TOKENS_PER_S[p.size] * 1.12 * slow  # +12%: evaluations
                    secs += 45 if (p.size, arm) not in graphs else 10  # compilation (cached after the first)
                    secs += 60 if arm == p.coefficients else 0  # ten checkpoints of ~0.85 GB
                    graphs.add((p.size, arm))
        job = name + "".join(f" --{k} {v}" for k, v in opts.items())
        rows.append((job, n, secs))
    return rows
