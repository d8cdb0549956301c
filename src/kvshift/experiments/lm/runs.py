"""Training the runs of a language-model experiment and publishing their small files into its results.

A run trains in the scratch directory opts.runs/lm/<key hash>/ (checkpoints stay there), keyed by its
resolved config, the data identity and the device type: a run that another experiment (or an earlier,
interrupted command) already trained is reused or resumed there, never retrained. Finished runs are
copied without checkpoints into <results>/runs/<part>/<arm>-s<seed>/, and every summary is rebuilt from
the runs present there, so jobs split over several commands merge by copying their results into one tree.
A run with the same key that another experiment already published under results/ (lm-family's 10m vanilla
and KV-shift runs have lm-seeds' settings) is copied from there, on any machine, without its scratch
directory; the key names the device type, not the GPU model or the torch version.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from kvshift.experiments.base import RunOptions
from kvshift.experiments.lm.spec import Part, data_identity, run_config
from kvshift.layers.attention import SHIFT_KINDS, identity_coefficients
from kvshift.train.checkpoint import list_checkpoints
from kvshift.train.trainer import train
from kvshift.utils.provenance import command_line, provenance

RUN_FILES = ("summary.json", "metrics.jsonl", "config.json", "coefficients.jsonl", "run.json", "analysis.json")


def read_coefficients(weights: str | Path, mcfg) -> list[dict]:
    """Per layer {'alpha': [[cur, prev, ...] per KV head], 'beta': ...} from a model.safetensors, after the
    kind's parametrisation (gate: softmax; clamp: clamp to [0, 1]); identity on an unshifted side."""
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


def run_key(cfg, ident: dict) -> dict:
    """What makes two runs the same run: the resolved config (less the shard path and the progress bar), the
    data identity and the device type."""
    d = cfg.to_dict()
    d["data"].pop("shard_dir")
    d["train"].pop("progress")
    return {"config": d, "data": ident, "device_type": "cuda" if torch.cuda.is_available() else "cpu"}


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _status(run_dir: Path, key: dict) -> str | None:
    """'finished' / 'diverged' when run_dir holds that run with this key, else None."""
    try:
        if json.loads((run_dir / "run.json").read_text())["key"] != key:
            return None
        st = json.loads((run_dir / "summary.json").read_text())["status"]
    except (OSError, ValueError, KeyError):
        return None
    return st if st in ("finished", "diverged") else None


def find_published(results: Path, key: dict, skip: Path | None = None) -> Path | None:
    """A finished (or diverged) run with this key published by any experiment under `results`
    (<results>/<experiment>/runs/<part>/<run>/), other than `skip`; None when there is none."""
    for rj in sorted(Path(results).glob("*/runs/*/*/run.json")):
        d = rj.parent
        if skip is not None and d.resolve() == Path(skip).resolve():
            continue
        if _status(d, key) is not None:
            return d
    return None


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


def ensure_trained(rd: Path, key: dict, cfg, meta: dict, *, log, label: str, on_step=None) -> tuple[str, dict | None]:
    """Trains the run `cfg` in its scratch directory `rd` (resuming an interrupted launch), or finds it done
    there: (its status, the trainer's summary when it trained now). `rd`/run.json records `meta`, the command,
    the provenance of the first launch and the run's key. The life every published LM run shares (lm-*,
    upcycle); the callers publish."""
    rd.mkdir(parents=True, exist_ok=True)
    if not (rd / "run.json").exists():  # a resumed run keeps the provenance of its first launch
        prov = {k: v for k, v in provenance().items() if k != "command"}
        (rd / "run.json").write_text(json.dumps({**meta, "command": command_line(), "provenance": prov, "key": key},
                                                indent=1) + "\n")
    st = _status(rd, key)
    if st is not None:
        log(f"{label}: the same run is in {rd} ({st}), copied")
        return st, None
    threads = torch.get_num_threads()
    log(f"{label}: training {cfg.train.steps} steps -> {rd}")
    try:
        s = train(cfg, rd, resume=True, command=command_line(), on_step=on_step)
    finally:
        torch.set_num_threads(threads)  # train.threads sets the process-wide count
    return s["status"], s


def run_one(exp: str, opts: RunOptions, part: Part, arm: str, seed: int, out: Path, shards: Path) -> str:
    """Trains one run (or finds it done in the results or the scratch directory) and publishes it to
    out/runs/<part>/<arm>-s<seed>. Returns its status."""
    log = opts.log
    cfg = run_config(opts.scale, part, arm, seed, shards, opts.steps, opts.overrides)
    key = run_key(cfg, data_identity(shards))
    res = out / "runs" / part.name / f"{arm}-s{seed}"
    if st := _status(res, key):
        log(f"[lm] {exp} {part.name} {arm} s{seed}: already in {res} ({st})")
        return st
    if (src := find_published(out.parent, key, skip=res)) is not None:
        _publish(src, res)
        log(f"[lm] {exp} {part.name} {arm} s{seed}: the same run is published in {src}, copied")
        return _status(res, key)
    rd = opts.runs / "lm" / key_hash(key)
    hook = CoefficientRecorder(rd, cfg) if arm == part.coefficients else None
    label = f"[lm] {exp} {part.name} {arm} s{seed}"
    st, s = ensure_trained(rd, key, cfg, {"experiment": exp, "scale": opts.scale, "part": part.name, "arm": arm,
                                          "seed": seed}, log=log, label=label, on_step=hook)
    if st == "interrupted":
        return st
    if s is not None:
        if hook:
            hook.collect()  # the final checkpoint
        log(f"{label}: {st}, val loss {s['final_val_loss']}, {s['tokens_per_s'] or 0:,.0f} tokens/s, "
            f"{s['wall_time_s']:.0f} s")
    # the coefficient arm keeps its final checkpoint (and keep/ the early one); --keep-checkpoints keeps
    # every run's (scripts/device/export.sh exports and analyses them)
    if arm != part.coefficients and not opts.keep_checkpoints:
        shutil.rmtree(rd / "checkpoints", ignore_errors=True)
    _publish(rd, res)
    return st
