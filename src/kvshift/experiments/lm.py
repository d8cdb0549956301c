"""Language modelling on real text (paper Sec. 4: Figs. 4-8, Table 4) at one-GPU scale.

Experiments (each writes results/<name>-<scale>/: summary.json, README.md, plot.png and, per run,
runs/<part>/<arm>-s<seed>/{summary.json, metrics.jsonl, config.json, run.json[, coefficients.jsonl]}):

    lm-main             vanilla vs KV shift, same init and data, at ~10M and ~50M non-embedding params
    lm-seeds            3 seeds per arm at ~10M: mean ± std of the final difference
    lm-lr               lr 1e-4, 2e-4, 1e-3, 1e-2 at ~10M (3 seeds at 1e-2): who diverges where
    lm-scaling          3M, 10M, 25M, 50M (85M: --only 85m), same tokens per size, power law per arm
    lm-variants         vanilla, kvshift, kvshift_gate, kvshift_clamp, kshift, vshift, window 2, window 3
    shift-coefficients  Table 4 for lm-main's ~50M KV-shift model (early and final checkpoint); no training
    lm-gqa              the ~50M pair with n_kv_heads = n_heads / 4 (d 640, 10 layers, 8 heads, 2 KV heads)

Fairness: both arms of a pair get the same train.seed (identical shared initial weights) and the same
data.seed (identical batches); every hyperparameter but the swept one is the same. Training runs in a
scratch directory (KVSHIFT_RUNS, default runs/; checkpoints stay there); finished runs are copied
into the results directory without checkpoints, and every summary is rebuilt from the runs present
there, so jobs split over several commands merge by copying their results into one tree.
A run whose resolved config (and data identity and device type) matches a finished run anywhere
under results/lm-*/ is copied, not retrained: rerunning a job after a timeout only does what is missing.

Data: token shards in KVSHIFT_SHARDS (or --shards; default cache/lm-shards, then cache/shards-16k).
The device pack (<= 55 MiB, carried with the tree) is made once here with
    kvshift data pack --shards cache/shards-16k --out cache/lm-pack.tar.xz --max-train-tokens 108000000
and scripts/device/lm.sh unpacks it. `--scale cpu` runs debug-size models on the same kind of shards
(a minute or two on a laptop; the tests use tiny synthetic shards).

Device commands. Each line is one `run` call (kind nvidia-h200) with carry ["cache/lm-pack.tar.xz"]
and timeout_s 600; lm.sh stops starting jobs with under a minute left of its 540 s budget and
SIGTERMs a run still going then (finished runs are kept; rerunning the line later does the rest).
Prefix `KVSHIFT_GIT_COMMIT=<sha of the tree> ` to record the commit (no .git travels). Estimated
minutes (`python -m kvshift.experiments.lm plan --scale gpu`) assume 2.4M / 1.7M / 1.05M (measured,
ANCHORS.md) / 0.6M tokens/s for the 3M / 10M / 25M / 50M models, 45 s per compilation, +12% for
evaluations; the first command's log prints the real tokens/s of each run: recalibrate from it.
    bash scripts/device/lm.sh "lm-main --only 10m"                   7.8  4000 steps x 2 (262M tokens, 2.4 epochs)
    bash scripts/device/lm.sh "lm-main --only 50m --arms vanilla"    7.0  2800 steps (184M tokens, 1.7 epochs)
    bash scripts/device/lm.sh "lm-main --only 50m --arms kvshift"    8.0  + 10 checkpoints for shift-coefficients
    bash scripts/device/lm.sh "lm-seeds"                             7.8  1200 steps x 2 arms x 3 seeds
    bash scripts/device/lm.sh "lm-lr --only lr=0.0001,lr=0.0002,lr=0.001"   7.8 (5.3 when lm-seeds is merged)
    bash scripts/device/lm.sh "lm-lr --only lr=0.01"                 7.8  3 seeds; less when runs diverge
    bash scripts/device/lm.sh "lm-scaling --only 3m,10m,25m"         7.9  600 steps (39M tokens) per size
    bash scripts/device/lm.sh "lm-scaling --only 50m"                4.4
    bash scripts/device/lm.sh "lm-variants --arms vanilla,kvshift,kvshift_gate,kvshift_clamp"   7.0 (4.6 merged)
    bash scripts/device/lm.sh "lm-variants --arms kshift,vshift,window2,window3"                7.0
    bash scripts/device/lm.sh "lm-gqa --arms vanilla"                7.0  2800 steps
    bash scripts/device/lm.sh "lm-gqa --arms kvshift"                7.0
~86 min on one GPU by this estimate. Measured on 2026-11-28 (nvidia-h200-x4, one job per GPU; wall time of
each job, results/device-logs/2026-11-28/): lm-main 10m 7.3 min (1.47M / 1.38M tokens/s vanilla / KV shift),
50m vanilla 5.5 min (0.69M tokens/s), 50m kvshift 6.8 min (0.66M), lm-seeds 6.8, lm-lr (3 rates, 1e-3 reused
from lm-seeds) 4.6, lm-lr 1e-2 6.6, lm-scaling 3m/10m/25m 5.1, lm-variants 5.3 and 5.9. lm.sh takes several
jobs and runs job i on GPU i mod n (or on the GPUs of CUDA_VISIBLE_DEVICES); scripts/device/batch.sh runs
mixed jobs (lm.sh, toy.sh, bench.sh, scaling.sh, export.sh) side by side, one GPU list each, in one call.
After each call: `tar xzf <files_at>/results.tgz` (batch.sh: batch.tgz) in the repository root (merges
results/lm-*-gpu/; do it before the next call, so identical runs are reused rather than retrained; a call
re-sends this checkout, whose results/ then replace the device's: never make a call between a batch and
extracting what it returned), then here on the CPU
    python -m kvshift.experiments.lm summarize lm-main lm-seeds lm-lr lm-scaling lm-variants lm-gqa --scale gpu
    python -m kvshift.experiments.lm shift-coefficients --scale gpu     # after lm-main 50m kvshift: seconds
    kvshift report
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from kvshift.experiments import register
from kvshift.experiments.common import provenance, write_summary
from kvshift.utils.plot import save_figure

NAMES = ("lm-main", "lm-seeds", "lm-lr", "lm-scaling", "lm-variants", "shift-coefficients", "lm-gqa")
SHARDS_ENV = "KVSHIFT_SHARDS"
DEFAULT_SHARDS = ("cache/lm-shards", "cache/shards-16k")
PACK_HINT = ("make them with `kvshift data unpack cache/lm-pack.tar.xz --out cache/lm-shards` (the pack: `kvshift "
             "data pack --shards cache/shards-16k --out cache/lm-pack.tar.xz --max-train-tokens 108000000`; the "
             "shards: `kvshift data build-corpus`, `train-tokenizer --vocab-size 16384`, `tokenize`), then set "
             f"{SHARDS_ENV} or pass --shards")


def shard_dir(path: str | Path | None = None) -> Path:
    """The token shard directory: `path`, else $KVSHIFT_SHARDS, else the first of DEFAULT_SHARDS."""
    cands = [path] if path else [os.environ[SHARDS_ENV]] if os.environ.get(SHARDS_ENV) else list(DEFAULT_SHARDS)
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
    # batch 64 x 1024 tokens, AdamW (0.9, 0.95), wd 0.1, 100 warm-up steps then constant, clip 1 (ANCHORS.md)
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
PAIR = ("vanilla", "kvshift")
LRS = (1e-4, 2e-4, 1e-3, 1e-2)
# assumed H200 training throughput (tokens/s, bf16, compiled) for `plan`; 25m is measured (ANCHORS.md)
TOKENS_PER_S = {"3m": 2.4e6, "10m": 1.7e6, "25m": 1.05e6, "50m": 0.6e6, "85m": 0.4e6}


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


def parts(name: str, scale: str, lrs=LRS) -> list[Part]:
    g = scale == "gpu"
    if name == "lm-main":
        return [Part("10m", "10m", 4000 if g else 60), Part("50m", "50m", 2800 if g else 60, coefficients="kvshift")]
    if name == "lm-seeds":
        return [Part("10m", "10m", 1200 if g else 40, seeds=(0, 1, 2))]
    if name == "lm-lr":
        return [Part(f"lr={lr:g}", "10m", 1200 if g else 40, lr=lr, seeds=(0, 1, 2) if lr == max(lrs) else (0,))
                for lr in lrs]
    if name == "lm-scaling":
        return [Part(s, s, 600 if g else 40, optional=s == "85m") for s in ("3m", "10m", "25m", "50m", "85m")]
    if name == "lm-variants":
        return [Part("10m", "10m", 1200 if g else 40, arms=tuple(ARMS))]
    if name == "lm-gqa":
        return [Part("50m-gqa", "50m", 2800 if g else 60, model=GQA[scale])]
    raise ValueError(f"no runs for experiment {name!r}")


def run_config(scale: str, part: Part, arm: str, seed: int, shards: Path, steps: int | None = None,
               overrides: list[str] | None = None):
    """The RunConfig of one run; `overrides` (`section.key=value`, applied last) are for smoke tests."""
    from kvshift.train.config import load_config

    sc = SCALES[scale]
    preset, size_model = sc.sizes[part.size]
    steps = steps or part.steps
    vocab = json.loads((Path(shards) / "meta.json").read_text())["vocab_size"]
    model = {**size_model, **part.model, **ARMS[arm], "vocab_size": vocab}
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
          *(overrides or [])]
    return load_config(sc.base, ov)


def results_root() -> Path:
    return Path(os.environ.get("KVSHIFT_RESULTS", "results"))


def _command() -> str:
    if os.environ.get("LM_COMMAND"):  # set by scripts/device/lm.sh
        return os.environ["LM_COMMAND"]
    if sys.argv and sys.argv[0].endswith(os.path.join("experiments", "lm.py")):
        return "python -m kvshift.experiments.lm " + " ".join(sys.argv[1:])
    return provenance()["command"]


# ---- shift coefficients out of checkpoints ------------------------------------------------------
def read_coefficients(weights: str | Path, mcfg) -> list[dict]:
    """Per layer {'alpha': [[cur, prev, ...] per KV head], 'beta': ...} from a model.safetensors, after the
    kind's parametrisation (gate: softmax; clamp: clamp to [0, 1]); identity on an unshifted side."""
    import torch
    from safetensors import safe_open

    from kvshift.layers.attention import SHIFT_KINDS, identity_coefficients

    param = SHIFT_KINDS[mcfg.attention][2]
    out = []
    with safe_open(str(weights), "pt") as f:
        names = set(f.keys())
        for i in range(mcfg.n_layers):
            rec = {}
            for side, key in (("k", "alpha"), ("v", "beta")):
                name = f"layers.{i}.attention.shift_{side}" + ("_gate" if param == "gate" else "")
                if name not in names:
                    c = identity_coefficients(mcfg.n_kv_heads, mcfg.shift_window)
                else:
                    c = f.get_tensor(name).float()
                    if param == "gate":
                        c = torch.softmax(torch.cat([c, c.new_zeros(c.shape[0], 1)], dim=1), dim=1)
                    elif param == "clamp":
                        c = c.clamp(0.0, 1.0)
                rec[key] = c.tolist()
            out.append(rec)
    return out


class CoefficientRecorder:
    """`on_step` hook: appends the shift coefficients of every new checkpoint to coefficients.jsonl and
    keeps a copy of the first checkpoint's weights (the 'early' one) in keep/."""

    def __init__(self, run_dir: Path, cfg):
        self.root, self.path = Path(run_dir) / "checkpoints", Path(run_dir) / "coefficients.jsonl"
        self.mcfg, self.every = cfg.model_config(), cfg.train.ckpt_every
        self.tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * cfg.data.grad_accum
        self.done = {json.loads(x)["step"] for x in self.path.read_text().splitlines()} if self.path.exists() else set()

    def __call__(self, step: int, rec: dict) -> None:
        if self.every and (step - 1) % self.every == 0:
            self.collect()

    def collect(self) -> None:
        from kvshift.train.checkpoint import list_checkpoints

        for ck in list_checkpoints(self.root):
            s = int(ck.name.split("_")[1])
            if s in self.done or not (ck / "model.safetensors").is_file():
                continue
            if not self.done:
                (self.root.parent / "keep").mkdir(exist_ok=True)
                shutil.copy(ck / "model.safetensors", self.root.parent / "keep" / f"step_{s:08d}.safetensors")
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": s, "tokens": s * self.tokens_per_step,
                                    "layers": read_coefficients(ck / "model.safetensors", self.mcfg)}) + "\n")
            self.done.add(s)


# ---- running ------------------------------------------------------------------------------------
RUN_FILES = ("summary.json", "metrics.jsonl", "config.json", "coefficients.jsonl", "run.json")


def _key(cfg, ident: dict) -> dict:
    from kvshift.experiments.common import default_device

    d = cfg.to_dict()
    d["data"].pop("shard_dir")
    d["train"].pop("progress")
    return {"config": d, "data": ident, "device_type": default_device().type}


def _status(run_dir: Path, key: dict) -> str | None:
    """'finished' / 'diverged' when run_dir holds that run with this key, else None."""
    try:
        if json.loads((run_dir / "run.json").read_text())["key"] != key:
            return None
        st = json.loads((run_dir / "summary.json").read_text())["status"]
    except (OSError, ValueError, KeyError):
        return None
    return st if st in ("finished", "diverged") else None


def _publish(src: Path, dst: Path) -> None:
    """Copies a run's small files (never checkpoints) to dst, replacing it as a whole."""
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in RUN_FILES:
        if (src / f).is_file():
            shutil.copy(src / f, tmp / f)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)


def _reusable(key: dict, exclude: Path) -> Path | None:
    for rj in sorted(results_root().glob("lm-*/runs/*/*/run.json")):
        if rj.parent.resolve() != exclude.resolve() and _status(rj.parent, key):
            return rj.parent
    return None


def run_one(exp: str, scale: str, part: Part, arm: str, seed: int, out: Path, shards: Path, *,
            steps: int | None = None, overrides: list[str] | None = None, log=print) -> str:
    """Trains one run (or finds it done / reusable) and publishes it to out/runs/<part>/<arm>-s<seed>."""
    import torch

    from kvshift.train.trainer import train

    cfg = run_config(scale, part, arm, seed, shards, steps, overrides)
    key = _key(cfg, data_identity(shards))
    res = out / "runs" / part.name / f"{arm}-s{seed}"
    if st := _status(res, key):
        log(f"[lm] {exp} {part.name} {arm} s{seed}: already in {res} ({st})")
        return st
    if src := _reusable(key, res):
        log(f"[lm] {exp} {part.name} {arm} s{seed}: same run as {src}, copied")
        _publish(src, res)
        return _status(res, key)
    rd = Path(os.environ.get("KVSHIFT_RUNS", "runs")) / f"{exp}-{scale}" / part.name / f"{arm}-s{seed}"
    old = json.loads((rd / "run.json").read_text()).get("key") if (rd / "run.json").exists() else None
    if rd.exists() and old != key:
        shutil.rmtree(rd)  # an older run with another config: never resume it
    rd.mkdir(parents=True, exist_ok=True)
    if old != key:  # a resumed run keeps the provenance of its first launch
        prov = {k: v for k, v in provenance().items() if k != "command"}
        (rd / "run.json").write_text(json.dumps({"experiment": exp, "scale": scale, "part": part.name, "arm": arm,
                                                 "seed": seed, "command": _command(), "provenance": prov,
                                                 "key": key}, indent=1) + "\n")
    st = _status(rd, key)
    if st is None:
        hook = CoefficientRecorder(rd, cfg) if arm == part.coefficients else None
        threads = torch.get_num_threads()
        log(f"[lm] {exp} {part.name} {arm} s{seed}: training {cfg.train.steps} steps -> {rd}")
        try:
            s = train(cfg, rd, resume=True, command=_command(), on_step=hook)
        finally:
            torch.set_num_threads(threads)  # train.threads sets the process-wide count
        if hook:
            hook.collect()  # the final checkpoint
        st = s["status"]
        if st == "interrupted":
            return st
        log(f"[lm] {exp} {part.name} {arm} s{seed}: {st}, val loss {s['final_val_loss']}, "
            f"{s['tokens_per_s'] or 0:,.0f} tokens/s, {s['wall_time_s']:.0f} s")
    # the coefficient arm keeps its final checkpoint (and keep/ the early one); KVSHIFT_KEEP_CHECKPOINTS=1
    # keeps every run's (scripts/device/export.sh exports and analyses them)
    if arm != part.coefficients and os.environ.get("KVSHIFT_KEEP_CHECKPOINTS", "0") in ("", "0"):
        shutil.rmtree(rd / "checkpoints", ignore_errors=True)
    _publish(rd, res)
    return st


def _csv(x) -> list[str] | None:
    if x is None:
        return None
    return [s.strip() for s in (x.split(",") if isinstance(x, str) else x) if str(s).strip()]


def select(all_parts: list[Part], only=None, arms=None, seeds=None) -> list[tuple[Part, list[str], list[int]]]:
    only, arms = _csv(only), _csv(arms)
    names = {p.name for p in all_parts}
    if only and set(only) - names:
        raise ValueError(f"--only: unknown parts {sorted(set(only) - names)}; parts: {sorted(names)}")
    if arms and set(arms) - set(ARMS):
        raise ValueError(f"--arms: unknown arms {sorted(set(arms) - set(ARMS))}; arms: {list(ARMS)}")
    out = []
    for p in all_parts:
        if (only and p.name not in only) or (not only and p.optional):
            continue
        a = [x for x in p.arms if not arms or x in arms]
        if a:
            out.append((p, a, list(seeds) if seeds is not None else list(p.seeds)))
    return out


def _seed_list(seeds) -> list[int] | None:
    if seeds is None or (isinstance(seeds, int) and seeds <= 1):
        return None  # each part's default
    if isinstance(seeds, int):
        return list(range(seeds))
    return [int(s) for s in _csv(seeds)] if isinstance(seeds, str) else [int(s) for s in seeds]


def run_experiment(name: str, scale: str = "cpu", seeds=None, steps: int | None = None, out=None, *,
                   only=None, arms=None, shards=None, overrides: list[str] | None = None,
                   summarize_only: bool = False, lrs=LRS, log=print) -> dict:
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {list(SCALES)}, got {scale!r}")
    out = Path(out or results_root() / f"{name}-{scale}")
    out.mkdir(parents=True, exist_ok=True)
    if name != "shift-coefficients" and not summarize_only:
        sh = shard_dir(shards)
        for part, arm_list, seed_list in select(parts(name, scale, lrs), only, arms, _seed_list(seeds)):
            for seed in seed_list:
                for arm in arm_list:
                    st = run_one(name, scale, part, arm, seed, out, sh, steps=steps, overrides=overrides, log=log)
                    if st == "interrupted":
                        log("[lm] interrupted: summarising what finished; rerun the same command to continue")
                        try:
                            return summarize(name, scale, out, lrs=lrs)
                        except ValueError:
                            return {"verdict": "not run", "verdict_text": "interrupted before any run finished"}
    return summarize(name, scale, out, lrs=lrs)


# ---- analysis (pure functions) -------------------------------------------------------------------
def fit_power_law(n: list[float], loss: list[float], offset: bool = False) -> dict:
    """Least-squares fit of L = a * N^-b (log-linear: log L = log a - b log N) or, with `offset`,
    L = a * N^-b + c (c on a grid over [0, min L), log-linear fit of L - c for each, the c with the
    smallest squared error in L kept). Returns a, b, c, rmse (in L) and n."""
    import numpy as np

    x, y = np.log(np.asarray(n, float)), np.asarray(loss, float)
    if x.size < (4 if offset else 2):
        raise ValueError(f"need at least {4 if offset else 2} points to fit, got {x.size}")

    def fit(c):
        b1, b0 = np.polyfit(x, np.log(y - c), 1)
        pred = np.exp(b0) * np.exp(x * b1) + c
        return float(np.exp(b0)), float(-b1), float(np.sqrt(np.mean((pred - y) ** 2)))

    cs = np.linspace(0.0, y.min() * (1 - 1e-3), 2000) if offset else [0.0]
    best = min(((c, *fit(c)) for c in cs), key=lambda t: t[3])
    return {"a": best[1], "b": best[2], "c": float(best[0]), "rmse": best[3], "n": int(x.size),
            "form": "L = a*N^-b + c" if offset else "L = a*N^-b"}


def coefficient_table(layers: list[dict]) -> dict:
    """Table 4: KV heads (all layers) counted by (alpha1 > alpha2) x (beta1 > beta2), with alpha1/beta1
    the current-token and alpha2/beta2 the previous-token coefficient; plus the diagonal share."""
    t = {"a1>a2,b1>b2": 0, "a1>a2,b1<=b2": 0, "a1<=a2,b1>b2": 0, "a1<=a2,b1<=b2": 0}
    for layer in layers:
        for a, b in zip(layer["alpha"], layer["beta"]):
            t[f"a1{'>' if a[0] > a[1] else '<='}a2,b1{'>' if b[0] > b[1] else '<='}b2"] += 1
    n = sum(t.values())
    diag = t["a1>a2,b1>b2"] + t["a1<=a2,b1<=b2"]
    # one-sided binomial p-value of at least `diag` same-side heads if sides were independent fair coins
    p = sum(math.comb(n, k) for k in range(diag, n + 1)) / 2 ** n if n else None
    return {"counts": t, "heads": n, "diagonal": diag, "diagonal_fraction": diag / n if n else None, "p_value": p}


def coefficient_values(layers: list[dict]) -> dict[str, list[float]]:
    """Flat lists alpha1, alpha2, beta1, beta2 over every KV head of every layer."""
    out = {"alpha1": [], "alpha2": [], "beta1": [], "beta2": []}
    for layer in layers:
        for a, b in zip(layer["alpha"], layer["beta"]):
            out["alpha1"].append(a[0]); out["alpha2"].append(a[1])  # noqa: E702
            out["beta1"].append(b[0]); out["beta2"].append(b[1])  # noqa: E702
    return out


def below_fraction(base: list[tuple[float, float]], arm: list[tuple[float, float]], skip: float = 0.1) -> float | None:
    """Share of the evaluations both curves have, past the first `skip` of the tokens, at which the arm's
    loss is below the baseline's."""
    b, a = dict(base), dict(arm)
    xs = sorted(set(a) & set(b))
    xs = [x for x in xs if xs and x > skip * xs[-1]]
    return sum(a[x] < b[x] for x in xs) / len(xs) if xs else None


# ---- summaries ----------------------------------------------------------------------------------
def _runs(out: Path, part: Part) -> dict[str, dict[int, Path]]:
    """arm -> seed -> published run dir, in the part's arm order (the baseline first)."""
    runs: dict[str, dict[int, Path]] = {}
    for arm in part.arms:
        for d in sorted((out / "runs" / part.name).glob(f"{arm}-s*")):
            tail = d.name[len(arm) + 2:]
            if tail.isdigit() and (d / "summary.json").is_file():
                runs.setdefault(arm, {})[int(tail)] = d
    return runs


def part_stats(runs: dict[str, dict[int, Path]]) -> dict:
    """kvshift.train.compare.summarize plus epochs, params, throughput and the 'below throughout' share."""
    from kvshift.train.compare import summarize as compare_summary
    from kvshift.train.plot import curves

    res = compare_summary(runs)
    base = res["baseline"]
    for arm, by_seed in runs.items():
        for seed, rd in by_seed.items():
            s = json.loads((rd / "summary.json").read_text())
            r = res["runs"][arm][str(seed)]
            mc = s.get("model_config") or {}
            r.update(epochs=s.get("epochs"), steps=s.get("steps"), non_embedding_params=s.get("non_embedding_params"),
                     n_heads=mc.get("n_heads"), n_kv_heads=mc.get("n_kv_heads"), mfu=s.get("mfu"),
                     device=s.get("device_name"))
            r["run_dir"] = str(Path(*rd.parts[-3:]))
            if arm != base and seed in runs.get(base, {}) and arm in res["per_seed"].get(str(seed), {}):
                res["per_seed"][str(seed)][arm]["below_fraction"] = below_fraction(
                    curves(runs[base][seed])["val"], curves(rd)["val"])
    return res


def _provenance(all_runs: list[Path]) -> dict:
    p = provenance()
    infos = [json.loads((d / "run.json").read_text()) for d in all_runs if (d / "run.json").is_file()]
    uniq = lambda xs: "; ".join(dict.fromkeys(str(x) for x in xs if x)) or None  # noqa: E731
    if infos:
        p.update({k: uniq(i["provenance"][k] for i in infos) for k in ("git_commit", "device", "torch")},
                 command=uniq(i["command"] for i in infos), time_utc=max(i["provenance"]["time_utc"] for i in infos))
    p["summarized_by"] = _command()
    return p


def _fmt(x, spec=".4f", none="—") -> str:
    return none if x is None else format(x, spec)


def _si(x: float) -> str:
    """262144000 -> '262M', 10240 -> '10k'."""
    for div, suf in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suf}"
    return f"{x:.3g}"


def _mean_diff(st: dict, arm: str):
    return st["aggregate"].get(arm, {}).get("diff", {}).get("mean")


def _first_run(st: dict, arm: str) -> dict:
    return next(iter(st["runs"][arm].values()))


PAPER = {
    "lm-main": "Fig. 4, 6: KV shift's training loss is below vanilla's throughout training, at 1.5B-19B parameters.",
    "lm-seeds": "Fig. 5a: over 5 seeds (same init and data order for both arms) KV shift is always below vanilla.",
    "lm-lr": "Fig. 5b/c: KV shift better at lr 1e-4, 2e-4, 1e-3 and 1e-2; at 1e-2 vanilla diverges in 5/5 seeds, "
             "KV shift converges.",
    "lm-scaling": "Fig. 7: validation loss vs non-embedding parameters: KV shift below vanilla at every size; "
                  "the gap does not close.",
    "lm-variants": "Fig. 8: no variant beats plain KV shift; shifting K and V both matter; longer windows do not help.",
    "shift-coefficients": "Table 4 (2.9B, 128 KV heads): (a1>a2, b1>b2) 50, (a1>a2, b1<=b2) 17, (a1<=a2, b1>b2) 9, "
                          "(a1<=a2, b1<=b2) 52: the diagonal dominates (key and value from the same token).",
    "lm-gqa": "Sec. 4: the gain holds with grouped-query attention (the 2.9B and 19B models use GQA).",
}


def summarize(name: str, scale: str, out: str | Path, *, lrs=LRS) -> dict:
    """Rebuilds summary.json, README.md and plot.png of `out` from the runs present in it."""
    out = Path(out)
    if name == "shift-coefficients":
        return summarize_coefficients(scale, out)
    stats, dirs = {}, []
    for p in parts(name, scale, lrs):
        runs = _runs(out, p)
        if runs:
            stats[p.name] = part_stats(runs)
            dirs += [d for by_seed in runs.values() for d in by_seed.values()]
    if not stats:
        raise ValueError(f"{out}: no finished runs of {name} yet (run `python -m kvshift.experiments.lm {name} "
                         f"--scale {scale}` first)")
    verdict, text, extra = VERDICTS[name](stats, scale)
    s = {"experiment": name, "scale": scale, "paper": PAPER[name], "verdict": verdict, "verdict_text": text,
         **_provenance(dirs), **extra, "parts": stats}
    write_summary(out, s)
    plot_parts(out, stats, name, scale)
    write_readme(out, s)
    return s


def _pair_text(label: str, st: dict) -> str:
    v, k = _first_run(st, "vanilla"), _first_run(st, "kvshift")
    ps = next(iter(st["per_seed"].values())).get("kvshift", {})
    sp = ps.get("speedup")
    return (f"{label} ({_si(v['non_embedding_params'])} params, {_si(v['tokens'])} tokens, {v['epochs'] or 0:.1f} "
            f"epochs): vanilla {_fmt(v['final_val_loss'])}, KV shift {_fmt(k['final_val_loss'])} "
            f"(Δ {_fmt(ps.get('diff'), '+.4f')}, speed-up {_fmt(sp, '.2f', 'none')}{'×' if sp else ''}, below at "
            f"{_fmt(ps.get('below_fraction'), '.0%')} of evals)")


def _pairs(stats: dict) -> dict:
    return {n: st for n, st in stats.items() if {"vanilla", "kvshift"} <= set(st["runs"])}


def verdict_main(stats: dict, scale: str) -> tuple[str, str, dict]:
    pairs = _pairs(stats)
    if not pairs:
        return "not reproduced", "only one arm has run so far: " + ", ".join(stats), {}
    diffs = [_mean_diff(st, "kvshift") for st in pairs.values()]
    below = [ps["kvshift"].get("below_fraction") for st in pairs.values() for ps in st["per_seed"].values()
             if "kvshift" in ps]
    ok = [d is not None and d < 0 for d in diffs]
    verdict = ("reproduced" if all(ok) and all(b is not None and b >= 0.9 for b in below)
               else "partly reproduced" if any(ok) else "not reproduced")
    text = "; ".join(_pair_text(n, st) for n, st in pairs.items()) + ". One seed per size (spread: lm-seeds)."
    return verdict, text, {}


def verdict_seeds(stats: dict, scale: str) -> tuple[str, str, dict]:
    st = stats.get("10m")
    if st is None or "kvshift" not in st["aggregate"] or st["aggregate"]["kvshift"]["diff"]["n"] == 0:
        return "not reproduced", "no seed with both arms yet", {}
    agg = st["aggregate"]["kvshift"]
    d, sp, n, wins = agg["diff"], agg["speedup"], agg["diff"]["n"], agg["better_in"]
    verdict = "reproduced" if wins == n and n >= 3 else "partly reproduced" if d["mean"] < 0 else "not reproduced"
    per = ", ".join(f"{p['kvshift']['diff']:+.4f}" for p in st["per_seed"].values()
                    if p.get("kvshift", {}).get("diff") is not None)
    text = (f"KV shift − vanilla final val loss {d['mean']:+.4f} ± {d['std']:.4f} (n={n}; per seed {per}); KV shift "
            f"better in {wins}/{n} seeds; speed-up {_fmt(sp['mean'], '.2f')} ± {_fmt(sp['std'], '.2f')}× (n={sp['n']}; "
            f"a seed whose KV-shift arm never reaches vanilla's final loss has none).")
    return verdict, text, {"diff": d, "speedup": sp, "better_in": wins, "n": n}


COLLAPSE = 0.3  # nats: a run that ends this far above its own best val loss counts as failed, like a divergence


def lr_failures(st: dict) -> dict[str, dict[str, bool]]:
    """arm -> seed -> failed: the trainer's divergence (non-finite, or loss > 3x its running minimum) or a
    collapse (final val loss more than COLLAPSE above the run's best)."""
    out = {}
    for arm, by_seed in st["runs"].items():
        out[arm] = {seed: bool(r["diverged"] or r["final_val_loss"] is None
                               or r["final_val_loss"] - r["best_val_loss"] > COLLAPSE) for seed, r in by_seed.items()}
    return out


def verdict_lr(stats: dict, scale: str) -> tuple[str, str, dict]:
    rows, better, parts_txt = {}, [], []
    for name, st in stats.items():
        if not {"vanilla", "kvshift"} <= set(st["runs"]):
            continue
        fail = lr_failures(st)
        nf = {a: sum(fail[a].values()) for a in PAIR}
        ns = {a: len(fail[a]) for a in PAIR}
        dv = {a: st["aggregate"][a]["diverged"] for a in PAIR}
        both_ok = [sd for sd in fail["kvshift"] if sd in fail["vanilla"] and not fail["kvshift"][sd] and not fail["vanilla"][sd]]
        diffs = [st["per_seed"][sd]["kvshift"]["diff"] for sd in both_ok]
        d = sum(diffs) / len(diffs) if diffs else None
        # better: lower mean final loss over the seeds where neither failed, else the lower failure rate
        b = (d < 0) if d is not None else (nf["vanilla"] / ns["vanilla"] > nf["kvshift"] / ns["kvshift"])
        better.append(b)
        rows[name] = {"diff": d, "failed": nf, "diverged": dv, "seeds": ns, "kvshift_better": b,
                      "final_val_loss": {a: st["aggregate"][a]["final_val_loss"]["mean"] for a in PAIR}}
        finals = {a: [r["final_val_loss"] for r in st["runs"][a].values() if r["final_val_loss"] is not None]
                  for a in PAIR}
        rng = {a: (f"{min(v):.3f}" if len(v) == 1 else f"{min(v):.3f}–{max(v):.3f}") if v else "—"
               for a, v in finals.items()}
        parts_txt.append(f"{name}: Δ {_fmt(d, '+.3f')}, final val loss vanilla {rng['vanilla']} vs KV shift "
                         f"{rng['kvshift']}, failed vanilla {nf['vanilla']}/{ns['vanilla']} (diverged "
                         f"{dv['vanilla']}), KV shift {nf['kvshift']}/{ns['kvshift']} (diverged {dv['kvshift']})")
    if not rows:
        return "not reproduced", "no learning rate with both arms yet", {}
    top = rows[max(rows, key=lambda k: float(k.split("=")[1]))]
    div_claim = top["failed"]["vanilla"] == top["seeds"]["vanilla"] and top["failed"]["kvshift"] == 0
    verdict = ("reproduced" if all(better) and div_claim and len(rows) >= 4
               else "partly reproduced" if div_claim or sum(better) > len(better) / 2 else "not reproduced")
    text = "; ".join(parts_txt) + (f". KV shift better at {sum(better)}/{len(better)} learning rates (failed = "
                                   f"diverged, or final val loss > best + {COLLAPSE} nats).")
    return verdict, text, {"by_lr": rows, "collapse_nats": COLLAPSE}


def verdict_scaling(stats: dict, scale: str) -> tuple[str, str, dict]:
    sizes = {}
    for name, st in _pairs(stats).items():
        sizes[name] = {a: {"params": _first_run(st, a)["non_embedding_params"],
                           "val_loss": st["aggregate"][a]["final_val_loss"]["mean"]} for a in PAIR}
    if not sizes:
        return "not reproduced", "no size with both arms yet", {}
    order = sorted(sizes, key=lambda s: sizes[s]["vanilla"]["params"])
    fits = {}
    for a in PAIR:
        pts = [(sizes[s][a]["params"], sizes[s][a]["val_loss"]) for s in order if sizes[s][a]["val_loss"] is not None]
        if len(pts) >= 2:
            fits[a] = {"log_linear": fit_power_law(*zip(*pts))}
        if len(pts) >= 4:
            fits[a]["with_offset"] = fit_power_law(*zip(*pts), offset=True)
    gaps = {s: sizes[s]["kvshift"]["val_loss"] - sizes[s]["vanilla"]["val_loss"] for s in order}
    wins = sum(g < 0 for g in gaps.values())
    span = sizes[order[-1]]["vanilla"]["params"] / sizes[order[0]]["vanilla"]["params"]
    verdict = ("reproduced" if wins == len(gaps) and len(gaps) >= 4
               else "partly reproduced" if wins else "not reproduced")
    fit_txt = ", ".join(f"{a} L ≈ {f['log_linear']['a']:.3g}·N^-{f['log_linear']['b']:.3f}" for a, f in fits.items())
    text = (f"KV shift below vanilla at {wins}/{len(gaps)} sizes spanning {span:.0f}× ("
            + ", ".join(f"{s}: Δ {g:+.3f}" for s, g in gaps.items()) + f"); {fit_txt}.")
    return verdict, text, {"sizes": sizes, "fits": fits, "gaps": gaps, "span": span}


def verdict_variants(stats: dict, scale: str) -> tuple[str, str, dict]:
    st = stats.get("10m")
    loss = {a: st["aggregate"][a]["final_val_loss"]["mean"] for a in st["runs"]} if st else {}
    if "kvshift" not in loss:
        return "not reproduced", "plain KV shift has not run yet", {"final_val_loss": loss}
    # the noise scale: 2x the seed spread of the KV-shift − vanilla difference measured by lm-seeds, else 0.01
    tol, src = 0.01, "default"
    seeds = results_root() / f"lm-seeds-{scale}" / "summary.json"
    if seeds.is_file():
        sd = json.loads(seeds.read_text()).get("diff", {}).get("std")
        if sd:
            tol, src = max(0.005, 2 * sd), "2 x lm-seeds std"
    ref = loss["kvshift"]
    rel = {a: (v - ref if v is not None else None) for a, v in loss.items()}
    beaten = [a for a, d in rel.items() if d is not None and d < -tol]
    sides = [a for a in ("kshift", "vshift") if a in rel]
    sides_matter = bool(sides) and all(rel[a] is None or rel[a] > 0 for a in sides)
    windows_no_help = all(rel[a] is None or rel[a] >= -tol for a in ("window2", "window3") if a in rel)
    held = [not beaten, sides_matter, windows_no_help]
    verdict = ("reproduced" if all(held) and len(loss) == len(ARMS)
               else "partly reproduced" if any(held) else "not reproduced")
    text = (f"final val loss relative to plain KV shift ({ref:.4f}): "
            + ", ".join(f"{a} {_fmt(d, '+.4f')}" for a, d in rel.items() if a != "kvshift")
            + f"; beating it by > {tol:.3f} ({src}): {', '.join(beaten) or 'none'}. One seed.")
    return verdict, text, {"final_val_loss": loss, "relative_to_kvshift": rel, "tolerance": tol, "beaten_by": beaten}


def verdict_gqa(stats: dict, scale: str) -> tuple[str, str, dict]:
    verdict, text, extra = verdict_main(stats, scale)
    mha = results_root() / f"lm-main-{scale}" / "summary.json"
    if mha.is_file():
        p = json.loads(mha.read_text()).get("parts", {}).get("50m")
        if p and p["aggregate"].get("kvshift", {}).get("diff"):
            extra["mha_50m_diff"] = p["aggregate"]["kvshift"]["diff"]["mean"]
            text += f" MHA 50M (lm-main): Δ {extra['mha_50m_diff']:+.4f}."
    k = _first_run(stats["50m-gqa"], "kvshift") if "kvshift" in stats.get("50m-gqa", {}).get("runs", {}) else {}
    return verdict, text.replace("50m-gqa (", f"GQA {k.get('n_heads')} heads / {k.get('n_kv_heads')} KV heads ("), extra


VERDICTS = {"lm-main": verdict_main, "lm-seeds": verdict_seeds, "lm-lr": verdict_lr, "lm-scaling": verdict_scaling,
            "lm-variants": verdict_variants, "lm-gqa": verdict_gqa}


def summarize_coefficients(scale: str, out: Path, source: str | Path | None = None) -> dict:
    """Table 4 at an early (the first checkpoint, ~10% of training) and the final checkpoint of lm-main's
    larger KV-shift model, histograms of the four coefficients, and how many left [0, 1]."""
    src = Path(source or results_root() / f"lm-main-{scale}") / "runs" / "50m" / "kvshift-s0"
    path = src / "coefficients.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: run `lm-main --only 50m --arms kvshift` (scale {scale}) first")
    recs = sorted((json.loads(x) for x in path.read_text().splitlines() if x.strip()), key=lambda r: r["step"])
    picks = {"early": recs[0], "final": recs[-1]}
    res = {}
    for tag, r in picks.items():
        vals = coefficient_values(r["layers"])
        res[tag] = {"step": r["step"], "tokens": r["tokens"], **coefficient_table(r["layers"]),
                    "outside_0_1": {k: sum(not 0.0 <= x <= 1.0 for x in v) for k, v in vals.items()},
                    "values": vals}
    f = res["final"]
    frac = f["diagonal_fraction"]
    verdict = "reproduced" if frac > 0.6 else "partly reproduced" if frac > 0.5 else "not reproduced"
    c = f["counts"]
    left = sum(1 for i in range(f["heads"]) if any(not 0.0 <= f["values"][k][i] <= 1.0 for k in f["values"]))
    text = (f"final (step {f['step']}): (a1>a2,b1>b2) {c['a1>a2,b1>b2']}, (a1>a2,b1<=b2) {c['a1>a2,b1<=b2']}, "
            f"(a1<=a2,b1>b2) {c['a1<=a2,b1>b2']}, (a1<=a2,b1<=b2) {c['a1<=a2,b1<=b2']}: diagonal {frac:.0%} of "
            f"{f['heads']} KV heads (p={f['p_value']:.2g}); early (step {res['early']['step']}) diagonal "
            f"{res['early']['diagonal_fraction']:.0%}; {left} heads have a coefficient outside [0, 1].")
    s = {"experiment": "shift-coefficients", "scale": scale, "paper": PAPER["shift-coefficients"], "verdict": verdict,
         "verdict_text": text, **_provenance([src]), "source": str(src), "checkpoints": res,
         "heads_outside_0_1": left}
    write_summary(out, s)
    plot_coefficients(out, res)
    write_readme(out, s)
    return s


# ---- plots and README -----------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_parts(out: Path, stats: dict, name: str, scale: str) -> None:
    from kvshift.train.plot import curves

    plt = _pyplot()
    n = len(stats)
    fig, axes = plt.subplots(2, n, figsize=(4.6 * n + 1, 7.5), squeeze=False)
    for j, (pname, st) in enumerate(stats.items()):
        ax, ax2 = axes[0][j], axes[1][j]
        base = st["baseline"]
        for i, arm in enumerate(st["arms"]):
            for k, (seed, r) in enumerate(sorted(st["runs"][arm].items())):
                v = curves(out / r["run_dir"])["val"]
                if v:
                    ax.plot(*zip(*v), "-", lw=1.2, color=f"C{i}", alpha=1.0 if k == 0 else 0.5,
                            label=arm if k == 0 else None)
                b = st["runs"][base].get(seed)
                if arm != base and b and v:
                    bv, av = dict(curves(out / b["run_dir"])["val"]), dict(v)
                    xs = sorted(set(bv) & set(av))
                    ax2.plot(xs, [av[x] - bv[x] for x in xs], "-", color=f"C{i}", alpha=1.0 if k == 0 else 0.5,
                             label=f"{arm} − {base}" if k == 0 else None)
        ax.set(title=f"{name} {pname}", xlabel="tokens", ylabel="validation loss (nats/token)")
        ys = [y for a in st["runs"].values() for r in a.values() for _, y in curves(out / r["run_dir"])["val"]]
        if ys:
            ax.set_ylim(min(ys) - 0.05, min(max(ys), min(ys) + 2.5))
        ax2.axhline(0, color="k", lw=0.8)
        ax2.set(xlabel="tokens", ylabel="val loss − baseline")
        for a in (ax, ax2):
            a.grid(alpha=0.3)
            if a.get_legend_handles_labels()[0]:
                a.legend(fontsize=7)
    fig.suptitle(f"{name} ({scale} scale)")
    save_figure(fig, out / "plot.png", dpi=110)
    if name == "lm-scaling":
        _plot_scaling(out, stats)


def _plot_scaling(out: Path, stats: dict) -> None:
    s = json.loads((out / "summary.json").read_text())
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for i, a in enumerate(PAIR):
        pts = sorted((v[a]["params"], v[a]["val_loss"]) for v in s.get("sizes", {}).values() if v[a]["val_loss"])
        if pts:
            ax.plot(*zip(*pts), "o", color=f"C{i}", label=a)
        f = s.get("fits", {}).get(a, {}).get("log_linear")
        if f and pts:
            import numpy as np

            xs = np.geomspace(pts[0][0], pts[-1][0], 50)
            ax.plot(xs, f["a"] * xs ** -f["b"] + f["c"], "--", color=f"C{i}", lw=1,
                    label=f"{a}: {f['a']:.3g}·N^-{f['b']:.3f}")
    ax.set(xscale="log", xlabel="non-embedding parameters", ylabel="final validation loss", title="lm-scaling")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save_figure(fig, out / "scaling.png", dpi=110)


def plot_coefficients(out: Path, res: dict) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    labels = {"alpha1": "α1 (key, current)", "alpha2": "α2 (key, previous)", "beta1": "β1 (value, current)",
              "beta2": "β2 (value, previous)"}
    for ax, (k, lab) in zip(axes, labels.items()):
        for tag, color in (("early", "C7"), ("final", "C3")):
            ax.hist(res[tag]["values"][k], bins=30, alpha=0.6, color=color, label=f"{tag} (step {res[tag]['step']})")
        ax.axvline(0, color="k", lw=0.6)
        ax.axvline(1, color="k", lw=0.6)
        ax.set(title=lab, xlabel="value", ylabel="KV heads")
        ax.legend(fontsize=7)
    save_figure(fig, out / "plot.png", dpi=110)


def _a_run_dir(st: dict) -> str:
    return next(iter(next(iter(st["runs"].values())).values()))["run_dir"]


def _readme_tables(s: dict, out: Path) -> str:
    lines = []
    for pname, st in s.get("parts", {}).items():
        cfg = json.loads((out / _a_run_dir(st) / "config.json").read_text())
        m, o, t, d = cfg["model_config"], cfg["optim"], cfg["train"], cfg["data"]
        lines += [f"### {pname}", "",
                  f"Model d {m['dim']}, {m['n_layers']} layers, {m['n_heads']} heads / {m['n_kv_heads']} KV heads, "
                  f"ffn {m['ffn_dim']}, vocab {m['vocab_size']}; batch {d['batch_size']} × {d['seq_len']}, "
                  f"{t['steps']} steps, AdamW {tuple(o['betas'])}, wd {o['weight_decay']}, lr {o['lr']} "
                  f"({o['warmup']} warm-up steps, then constant), clip {o['clip']}; val loss every {t['eval_every']} "
                  f"steps on {t['eval_batches']} batches.", "",
                  "| arm | seed | non-emb. params | tokens | epochs | final val loss | Δ vs baseline | speed-up | "
                  "below baseline | tokens/s | diverged |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for arm in st["arms"]:
            for seed, r in sorted(st["runs"][arm].items()):
                ps = st["per_seed"].get(seed, {}).get(arm, {})
                lines.append(
                    f"| {arm} | {seed} | {r['non_embedding_params']:,} | {r['tokens']:,} | {_fmt(r['epochs'], '.2f')} | "
                    f"{_fmt(r['final_val_loss'])} | {_fmt(ps.get('diff'), '+.4f')} | {_fmt(ps.get('speedup'), '.2f')} | "
                    f"{_fmt(ps.get('below_fraction'), '.0%')} | {_fmt(r['tokens_per_s'], ',.0f')} | "
                    f"{'step ' + str(r['diverged_step']) if r['diverged'] else 'no'} |")
        lines.append("")
    return "\n".join(lines)


PAIR_NOTE = """Both arms of a pair share the initial weights (train.seed) and the batches (data.seed); speed-up = tokens
vanilla needs to reach its final val loss ÷ tokens the arm needs to reach that loss (linear interpolation
of the validation curve); "below baseline" = share of evaluations past the first 10% of tokens at which
the arm's val loss is below the baseline's. Epochs count passes over the unique training tokens.
"""


def write_readme(out: Path, s: dict) -> None:
    if s["experiment"] == "shift-coefficients":
        rows = ["| checkpoint | step | (a1>a2, b1>b2) | (a1>a2, b1<=b2) | (a1<=a2, b1>b2) | (a1<=a2, b1<=b2) | diagonal | "
                "outside [0,1] (α1, α2, β1, β2) |", "|---|---|---|---|---|---|---|---|"]
        for tag, r in s["checkpoints"].items():
            c, o = r["counts"], r["outside_0_1"]
            rows.append(f"| {tag} | {r['step']} | {c['a1>a2,b1>b2']} | {c['a1>a2,b1<=b2']} | {c['a1<=a2,b1>b2']} | "
                        f"{c['a1<=a2,b1<=b2']} | {r['diagonal_fraction']:.0%} | {o['alpha1']}, {o['alpha2']}, "
                        f"{o['beta1']}, {o['beta2']} |")
        body = (f"Source: `{s['source']}` (coefficients read from its checkpoints; the early one is the first, "
                "at ~10% of training). α1/β1 multiply the current token's key/value, α2/β2 the previous token's. "
                "The paper's init draws α and β independently (α1 = r, α2 = 1 − r), so about half the heads start "
                "on the diagonal.\n\n" + "\n".join(rows) + "\n")
    else:
        body = PAIR_NOTE + "\n" + _readme_tables(s, out)
        if s.get("fits"):
            body += "Power-law fits (least squares; log-linear L = a·N^-b on log L; with ≥ 4 sizes also L = a·N^-b + c, " \
                    "c on a grid, which has only n − 3 degrees of freedom):\n\n" + "\n".join(
                        f"- {a}: " + "; ".join(f"{f['form']}: a={f['a']:.4g}, b={f['b']:.4f}, c={f['c']:.4f}, "
                                               f"rmse {f['rmse']:.4f}" for f in v.values()) for a, v in s["fits"].items()) + "\n"
    text = f"""# {s['experiment']} ({s['scale']} scale)

Commands: `{s['command']}`
Commit: `{s['git_commit']}` · device: {s['device']} · torch {s['torch']} · summarised by `{s['summarized_by']}`

**Paper:** {s['paper']}

**Ours:** **{s['verdict']}** — {s['verdict_text']}

{body}
![plot](plot.png)
"""
    (out / "README.md").write_text(text)


# ---- registry and CLI -----------------------------------------------------------------------------
def _registered(name):
    def fn(scale="cpu", seeds=1, steps=None, out=None, **opts):
        return run_experiment(name, scale, seeds, steps, out, **opts)
    fn.__name__ = name.replace("-", "_")
    return fn


_DESC = {"lm-main": "Fig. 4/6: vanilla vs KV shift LM at ~10M and ~50M params (real text)",
         "lm-seeds": "Fig. 5a: 3 seeds per arm at ~10M", "lm-lr": "Fig. 5b/c: lr 1e-4 .. 1e-2 at ~10M, divergence",
         "lm-scaling": "Fig. 7: 3M-50M, same tokens, power law per arm",
         "lm-variants": "Fig. 8: gate, clamp, K-only, V-only, windows 2/3 at ~10M",
         "shift-coefficients": "Table 4: (a1>a2)x(b1>b2) head counts of lm-main's ~50M KV-shift model",
         "lm-gqa": "GQA (n_kv = n_heads/4) pair at ~50M"}
if __name__ != "__main__":  # `python -m` runs main() of the imported module (registering once)
    for _n in NAMES:
        register(_n, _DESC[_n])(_registered(_n))


def plan(scale: str = "gpu") -> list[tuple[str, int, float]]:
    """(job, runs, estimated seconds on one H200) for the device commands of the module docstring."""
    jobs = [("lm-main", dict(only="10m")), ("lm-main", dict(only="50m", arms="vanilla")),
            ("lm-main", dict(only="50m", arms="kvshift")), ("lm-seeds", {}),
            ("lm-lr", dict(only="lr=0.0001,lr=0.0002,lr=0.001")), ("lm-lr", dict(only="lr=0.01")),
            ("lm-scaling", dict(only="3m,10m,25m")), ("lm-scaling", dict(only="50m")),
            ("lm-variants", dict(arms="vanilla,kvshift,kvshift_gate,kvshift_clamp")),
            ("lm-variants", dict(arms="kshift,vshift,window2,window3")),
            ("lm-gqa", dict(arms="vanilla")), ("lm-gqa", dict(arms="kvshift"))]
    sc, rows = SCALES[scale], []
    for name, opts in jobs:
        secs, n, graphs = 30.0, 0, set()  # 30 s: unpack, imports
        for p, arms, seeds in select(parts(name, scale), **opts):
            for arm in arms:
                for _ in seeds:
                    n += 1
                    secs += p.steps * sc.batch * sc.seq_len / TOKENS_PER_S[p.size] * 1.12  # +12%: evaluations
                    secs += 45 if (p.size, arm) not in graphs else 10  # compilation (cached after the first)
                    secs += 60 if arm == p.coefficients else 0  # ten checkpoints of ~0.85 GB
                    graphs.add((p.size, arm))
        job = name + "".join(f" --{k} {v}" for k, v in opts.items())
        rows.append((job, n, secs))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvshift.experiments.lm", description=__doc__.split("\n")[0])
    ap.add_argument("name", help=f"one of {', '.join(NAMES)}; 'plan' (device jobs and estimated times); or "
                                 "'summarize' followed by names")
    ap.add_argument("more", nargs="*", help="experiment names after 'summarize'")
    ap.add_argument("--scale", default="cpu", choices=list(SCALES))
    ap.add_argument("--only", help="comma-separated parts (e.g. 10m,50m; lr=0.01; 3m,10m,25m,50m,85m)")
    ap.add_argument("--arms", help=f"comma-separated arms out of {','.join(ARMS)}")
    ap.add_argument("--seeds", help="comma-separated seeds (default: each part's)")
    ap.add_argument("--steps", type=int, help="override every part's number of steps (smoke tests)")
    ap.add_argument("--out", help="results directory (default results/<name>-<scale>)")
    ap.add_argument("--shards", help=f"token shard directory (default ${SHARDS_ENV}, then {', '.join(DEFAULT_SHARDS)})")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="extra run-config override, applied last (smoke tests: data.batch_size=1 ...)")
    a = ap.parse_args(argv)
    if a.name == "plan":
        total = 0.0
        for job, n, secs in plan(a.scale):
            total += secs
            print(f"{secs / 60:5.1f} min  {n:2d} runs  bash scripts/device/lm.sh \"{job}\"")
        print(f"{total / 60:5.1f} min in all on one GPU")
        return 0
    if a.name == "summarize":
        rc = 0
        for n in a.more:
            try:
                s = summarize(n, a.scale, a.out or results_root() / f"{n}-{a.scale}")
            except (ValueError, FileNotFoundError) as e:
                print(f"{n}: not summarised: {e}")
                rc = 1
                continue
            print(f"{n}: {s['verdict']} — {s['verdict_text']}")
        return rc
    if a.name not in NAMES:
        ap.error(f"unknown experiment {a.name!r}; choose from {', '.join(NAMES)}")
    s = run_experiment(a.name, a.scale, a.seeds, a.steps, a.out, only=a.only, arms=a.arms, shards=a.shards,
                       overrides=a.set)
    print(f"\n{a.name}: {s['verdict']} — {s['verdict_text']}")
    return 0


if __name__ == "__main__":
    from kvshift.experiments import lm as _lm

    raise SystemExit(_lm.main())
