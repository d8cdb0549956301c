"""AdamW and the learning-rate schedule.

Weight decay (the LM anchors and the paper: AdamW β = (0.9, 0.95), wd 0.1) goes through
`LM.param_groups(wd)`: decayed are the ≥2-D weights, i.e. every linear layer's matrix AND the token
embedding / output head (they are matrices too; nanoGPT/llama-recipes decay them as well). Never
decayed: RMSNorm gains (a scale whose natural value is 1; decay would shrink every activation) and
the KV-shift coefficients (a few scalars per head whose natural scale is 1; decay would pull them
toward "no key/value input" and bias the comparison against the shifted arm). With
optim.shift_lr_mult != 1 the coefficients get a group of their own whose learning rate is the schedule's
times that factor (e.g. 10 when continuing a pretrained model, whose other weights need a small rate).

The schedule is a pure function of the step (`lr_at`), so resuming needs only the step; the
"scheduler state" in a checkpoint is that step plus the schedule's parameters for checking.
"""

from __future__ import annotations

import math

import torch

from kvshift.train.config import OptimConfig

__all__ = ["build_optimizer", "lr_at", "set_lr"]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    groups = model.param_groups(cfg.weight_decay)
    if cfg.shift_lr_mult != 1.0:  # the shift coefficients in a group of their own (lr x shift_lr_mult)
        shift = {id(p) for n, p in model.named_parameters() if "shift_" in n and p.requires_grad}
        if shift:
            rest = [{**g, "params": [p for p in g["params"] if id(p) not in shift]} for g in groups]
            groups = [g for g in rest if g["params"]] + [{
                "params": [p for g in groups for p in g["params"] if id(p) in shift], "weight_decay": 0.0,
                "lr_mult": cfg.shift_lr_mult}]
    fused = cfg.fused
    if fused is None:
        fused = device.type == "cuda"
    kw = {"fused": True} if fused else {"foreach": device.type == "cuda"}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, **kw)


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up from lr/warmup to lr over
    `warmup` steps, then constant (the paper) or cosine down to min_lr at `total_steps`."""
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, total_steps - cfg.warmup)
    t = min(1.0, (step - cfg.warmup) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
