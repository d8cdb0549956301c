"""FLOP and MFU accounting for the Llama-style LM (usable by benchmarks).

Training FLOPs per token (forward + backward = 3 x forward, 2 FLOPs per multiply-add):

    6 * N_nonembed          every matrix of the blocks (attention projections, SwiGLU)
  + 6 * V * d               the output head (the embedding lookup is a gather: no FLOPs)
  + 12 * L * T * d          attention scores QK^T and the weighted sum AV over a context of T,
                            counted without the causal half (PaLM's convention, Chowdhery et al. 2022
                            App. B), so MFU numbers compare with published ones

T is the training sequence length; with document masking the real work is smaller, so this is an
upper bound on the useful FLOPs (again the usual convention). The KV shift adds O(L * d) per token
(a handful of multiply-adds per key/value element), which is negligible and not counted.
"""

from __future__ import annotations

__all__ = ["flops_per_token", "mfu", "peak_flops_for", "PEAK_FLOPS"]

# dense bf16 peak per device, FLOP/s; the trainer's train.peak_flops overrides
PEAK_FLOPS = {"h100": 989e12, "h200": 989e12, "a100": 312e12}


def flops_per_token(cfg, seq_len: int) -> float:
    """cfg: a ModelConfig. Training (fwd+bwd) FLOPs per token at context `seq_len`."""
    n = cfg.non_embedding_params()
    head = cfg.vocab_size * cfg.dim
    attn = cfg.n_layers * seq_len * cfg.dim
    return 6.0 * n + 6.0 * head + 12.0 * attn


def mfu(tokens_per_s: float, cfg, seq_len: int, peak_flops: float, n_devices: int = 1) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over the peak of `n_devices` devices."""
    return tokens_per_s * flops_per_token(cfg, seq_len) / (peak_flops * n_devices)


def peak_flops_for(device_name: str, default: float = 989e12) -> float:
    name = device_name.lower()
    for k, v in PEAK_FLOPS.items():
        if k in name:
            return v
    return default
