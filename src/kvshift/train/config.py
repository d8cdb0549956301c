"""Training run configuration: TOML sections [model] [data] [optim] [train], `--set` overrides.

A run is described by one TOML file plus `--set section.key=value` overrides; the resolved config is
written into the run directory (config.json), so every run documents itself. Unknown sections or
keys are a ValueError that lists the valid ones.

    [model]  preset = "lm-10m", then any ModelConfig field as an override (attention = "vanilla", ...)
    [data]   kind ("shards" | "synthetic"), shard_dir, seq_len, batch_size (rows per rank per micro-step),
             grad_accum, seed, val_split, val_windows (None: eval_batches * batch_size * world)
    [optim]  lr, betas, eps, weight_decay, warmup, schedule ("constant" | "cosine"), min_lr, clip, fused,
             shift_lr_mult
    [train]  steps, eval_every, eval_batches, ckpt_every, keep_last, seed, compile, dtype, deterministic,
             init_from, ...
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvshift.errors import UserError
from kvshift.models import ModelConfig

try:
    import tomllib
except ImportError:  # Python 3.10: the `tomli` backport (train extra)
    import tomli as tomllib

__all__ = ["RunConfig", "load_config", "parse_overrides", "apply_overrides", "shipped_configs"]

DATA_KINDS = ("shards", "synthetic", "custom")
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class DataConfig:
    # "shards": kvshift.data.PackedLoader; "synthetic": SyntheticSource; "auto": shards iff shard_dir;
    # "custom": the caller of kvshift.train.trainer.train passes its own batch sources (the experiments' tasks)
    kind: str = "auto"
    shard_dir: str = ""
    seq_len: int = 1024
    batch_size: int = 8  # rows per rank per micro-step
    grad_accum: int = 1
    seed: int = 0  # data order; the same for every arm of a comparison
    val_split: str = "val"
    val_windows: int | None = None  # None: eval_batches * batch_size * world_size windows
    per_domain: bool = True  # per-domain validation loss when the shards carry domains
    tokenizer: str | None = None  # optional: check the shards were made with this tokenizer

    def __post_init__(self):
        _check_types(self, "data")
        if self.kind == "auto":
            self.kind = "shards" if self.shard_dir else "synthetic"
        if self.kind not in DATA_KINDS:
            raise ValueError(f"data.kind must be 'auto' or one of {DATA_KINDS}, got {self.kind!r}")
        if self.kind == "shards" and not self.shard_dir:
            raise ValueError("data.shard_dir is required when data.kind = 'shards'")
        if self.kind == "synthetic" and self.shard_dir:
            raise UserError(f"data.shard_dir = {self.shard_dir!r} would be ignored: data.kind = 'synthetic' trains on "
                            f"generated data; set data.kind = 'shards' to train on the shards, or drop data.shard_dir")
        for f in ("seq_len", "batch_size", "grad_accum"):
            _positive_int(f"data.{f}", getattr(self, f))
        if self.val_windows is not None:
            _positive_int("data.val_windows", self.val_windows)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup: int = 100
    schedule: str = "constant"  # the paper: linear warm-up, then constant
    min_lr: float = 0.0  # cosine floor
    clip: float = 1.0  # max global grad norm; 0 disables
    fused: bool | None = None  # None: fused AdamW on CUDA
    shift_lr_mult: float = 1.0  # the KV-shift coefficients' learning rate = lr x this (their own param group)

    def __post_init__(self):
        _check_types(self, "optim")
        self.lr, self.eps, self.weight_decay, self.min_lr, self.clip = (
            float(self.lr), float(self.eps), float(self.weight_decay), float(self.min_lr), float(self.clip))
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        if (not isinstance(self.betas, tuple) or len(self.betas) != 2
                or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas)):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be positive, got {self.lr}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"optim.schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"optim.warmup must be a non-negative int, got {self.warmup!r}")
        self.shift_lr_mult = float(self.shift_lr_mult)
        if not self.shift_lr_mult > 0:
            raise ValueError(f"optim.shift_lr_mult must be positive, got {self.shift_lr_mult}")
        if self.clip < 0 or self.weight_decay < 0 or self.min_lr < 0:
            raise ValueError("optim.clip, optim.weight_decay and optim.min_lr must be >= 0")


@dataclass
class TrainSection:
    steps: int = 1000
    eval_every: int = 100  # 0: only at the end
    eval_batches: int = 20
    ckpt_every: int = 200  # 0: only at the end (and on SIGTERM/SIGINT)
    keep_last: int = 2
    seed: int = 0  # model init seed: LM(config, seed) -> identical shared weights across arms
    compile: bool | None = None  # None: on for CUDA
    dtype: str = "auto"  # "auto": bf16 autocast on GPU, fp32 on CPU; or "bf16" / "fp32"
    deterministic: bool = False
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    threads: int | None = None  # CPU intra-op threads (None: torch's default); 1 is fastest for tiny models
    log_every: int = 1  # metrics.jsonl cadence (steps)
    progress: bool = True  # tqdm bar (rank 0)
    diverge_factor: float = 3.0  # diverged when loss > factor x running min (after diverge_after steps); 0: only
    # a non-finite loss or gradient counts as divergence
    diverge_after: int | None = None  # None: optim.warmup
    peak_flops: float = 989e12  # per device, for MFU (H100/H200 dense bf16)
    shift_stats: bool = True  # shift-coefficient summaries in metrics.jsonl at eval steps
    coefficients_every: int = 0  # every shift coefficient in metrics.jsonl every N steps (0: never)
    eval_at_start: bool = False  # also evaluate before the first step (step 0)
    init_from: str | None = None  # start from these weights (kvshift.train.init): a converted/exported model
    # directory, a run or a checkpoint; read on a fresh start only (a resume restores its checkpoint)

    def __post_init__(self):
        _check_types(self, "train")
        _positive_int("train.steps", self.steps)
        for f in ("eval_every", "ckpt_every", "keep_last", "eval_batches", "log_every", "coefficients_every"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"train.{f} must be a non-negative int, got {v!r}")
        if self.keep_last < 1:
            raise ValueError(f"train.keep_last must be >= 1, got {self.keep_last}")
        if self.threads is not None:
            _positive_int("train.threads", self.threads)
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise ValueError(f"train.dtype must be 'auto', 'bf16' or 'fp32', got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"train.device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        self.diverge_factor, self.peak_flops = float(self.diverge_factor), float(self.peak_flops)
        if self.diverge_factor != 0 and not self.diverge_factor > 1:
            raise ValueError(f"train.diverge_factor must be > 1 (or 0: off), got {self.diverge_factor}")


def _positive_int(name: str, v: Any) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v!r}")


SECTIONS = {"data": DataConfig, "optim": OptimConfig, "train": TrainSection}


@functools.lru_cache(maxsize=None)
def _hints(klass) -> dict:
    return typing.get_type_hints(klass)


def _describe(t) -> str:
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
            tuple: "a list", list: "a list", dict: "a table"}.get(typing.get_origin(t) or t, str(t))


def check_value(name: str, value: Any, hint) -> None:
    """UserError naming `name` unless `value` fits the annotation `hint` (bool, int, float, str,
    tuple/list, dict, or a union of them with None); floats must be finite."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for a in args:
        o = typing.get_origin(a) or a
        if a is type(None) and value is None:
            return
        if o is bool and isinstance(value, bool):
            return
        if isinstance(value, bool):
            continue
        if o is int and isinstance(value, int):
            return
        if o is float and isinstance(value, (int, float)):
            if math.isfinite(value):
                return
            raise UserError(f"{name} must be a finite number, got {value!r}")
        if o is str and isinstance(value, str):
            return
        if o in (tuple, list) and isinstance(value, (tuple, list)):
            return
        if o is dict and isinstance(value, dict):
            return
    want = " or ".join(_describe(a) for a in args if a is not type(None))
    raise UserError(f"{name} must be {want}, got {value!r}")


def _check_types(obj, section: str) -> None:
    for f in dataclasses.fields(obj):
        check_value(f"{section}.{f.name}", getattr(obj, f.name), _hints(type(obj))[f.name])


def _check_model_types(m: dict) -> None:

    hints = _hints(ModelConfig)
    for k, v in m.items():
        if k == "preset" or k in hints:  # an unknown key: ModelConfig names it
            check_value(f"model.{k}", v, str if k == "preset" else hints[k])


@dataclass
class RunConfig:
    model: dict = field(default_factory=lambda: {"preset": "debug"})  # preset + ModelConfig overrides
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSection = field(default_factory=TrainSection)

    def __post_init__(self):
        if not isinstance(self.model, dict):
            raise UserError(f"[model] must be a table, got {self.model!r}")
        _check_model_types(self.model)
        try:
            mcfg = self.model_config()  # validate now, not at step 0
        except (ValueError, TypeError) as e:
            raise UserError(f"[model]: {e}") from None
        if self.data.seq_len > mcfg.max_seq_len:
            raise UserError(f"data.seq_len = {self.data.seq_len} is longer than the model's max_seq_len = "
                            f"{mcfg.max_seq_len}: lower data.seq_len or set model.max_seq_len")

    def model_config(self):

        m = dict(self.model)
        preset = m.pop("preset", None)
        if preset is None:
            return ModelConfig.from_dict(m)
        return ModelConfig.from_name(preset, **m)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["optim"]["betas"] = list(d["optim"]["betas"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        if not isinstance(d, dict):
            raise ValueError(f"config must be a table, got {type(d).__name__}")
        unknown = sorted(set(d) - {"model", *SECTIONS})
        if unknown:
            raise ValueError(f"unknown config sections {unknown}; valid sections: {['model', *SECTIONS]}")
        kw: dict[str, Any] = {}
        if "model" in d:
            if not isinstance(d["model"], dict):
                raise UserError(f"[model] must be a table, got {d['model']!r}")
            m = dict(d["model"])

            valid = {"preset"} | {f.name for f in dataclasses.fields(ModelConfig)}
            bad = sorted(set(m) - valid)
            if bad:
                raise ValueError(f"unknown keys {bad} in [model]; valid keys: {sorted(valid)}")
            kw["model"] = m
        for name, klass in SECTIONS.items():
            if name in d:
                sec = d[name]
                if not isinstance(sec, dict):
                    raise ValueError(f"[{name}] must be a table, got {sec!r}")
                valid = [f.name for f in dataclasses.fields(klass)]
                bad = sorted(set(sec) - set(valid))
                if bad:
                    raise ValueError(f"unknown keys {bad} in [{name}]; valid keys: {valid}")
                try:
                    kw[name] = klass(**sec)
                except TypeError as e:  # pragma: no cover - guarded by the key check above
                    raise ValueError(f"[{name}]: {e}") from None
        return cls(**kw)


def _parse_value(text: str) -> Any:
    """A TOML literal (1e-3, true, [0.9, 0.95], "x"), else the bare string (model.attention=vanilla)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(items: list[str] | None) -> list[tuple[str, str, Any]]:
    """['model.attention=vanilla', 'optim.lr=1e-3'] -> [(section, key, value)] with values typed."""
    out = []
    for it in items or []:
        if "=" not in it:
            raise ValueError(f"--set expects section.key=value, got {it!r}")
        path, value = it.split("=", 1)
        parts = path.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"--set expects section.key=value, got {it!r}")
        out.append((parts[0], parts[1], _parse_value(value.strip())))
    return out


def _coerce(section: str, key: str, value: Any) -> Any:
    """Match the type of the field's default where that is unambiguous (int -> float, "1" -> 1)."""
    if section == "model":

        defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    elif section in SECTIONS:
        defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else None)
                    for f in dataclasses.fields(SECTIONS[section])}
    else:
        return value
    d = defaults.get(key)
    if isinstance(d, bool) or d is None:
        return value
    if isinstance(d, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(d, str) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. a shard_dir named "2024"
    return value


def apply_overrides(d: dict, overrides: list[tuple[str, str, Any]]) -> dict:
    d = json.loads(json.dumps(d))  # deep copy of plain data
    for section, key, value in overrides:
        d.setdefault(section, {})[key] = _coerce(section, key, value)
    return d


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Reads a TOML file (a path, or the name of a shipped config such as 'debug'), applies `--set`
    overrides, validates, and returns the RunConfig."""
    d: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file() and (CONFIG_DIR / f"{path}.toml").is_file():
            p = CONFIG_DIR / f"{path}.toml"
        if not p.is_file():
            raise ValueError(f"config file {path} not found (shipped configs: {sorted(shipped_configs())})")
        try:
            d = tomllib.loads(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise UserError(f"{p}: not a UTF-8 text file, so not a TOML config (byte {e.start})") from None
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"{p}: invalid TOML ({e})") from None
    ov = parse_overrides(overrides)
    try:
        return RunConfig.from_dict(apply_overrides(d, ov))
    except ValueError as e:
        if path is None:
            raise
        raise UserError(f"config {p}{' with --set overrides' if ov else ''}: {e}") from None


def shipped_configs() -> dict[str, Path]:
    return {p.stem: p for p in sorted(CONFIG_DIR.glob("*.toml"))}
