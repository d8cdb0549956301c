"""The stateless decode step on the flash-decoding Triton kernel (`kvshift.ops.shift.paged_decode`).

An eager decoding step (one new token per row) over a standard cache (rotated raw keys, raw values, shifted on
read) goes to `dense_shift_decode`, which reads the cache in place, forms every tap's row in registers and
runs the online softmax over key splits, instead of `kvshift.layers.stateless.decode_attend`'s PyTorch ops
(about 60 per layer and step). The kernel takes each row's real slots as one run, start .. end - 1: left
padding before it, unwritten slots after it. That is what generate produces; a row with pads between its
tokens or with packed documents keeps the PyTorch read (`span` says which).
"""

from __future__ import annotations

import warnings

import torch

from kvshift.ops.shift.impl import triton_available

# "auto": the kernel on CUDA (Triton installed), the PyTorch read elsewhere; "always": the kernel on any
# device (the tests, on a CPU under TRITON_INTERPRET=1); "never": the PyTorch read everywhere.
DECODE_KERNEL = "auto"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCK = 64  # cache slots per tile
_broken = False  # under "auto", after the kernel failed once in this process (see `_give_up`)


def wanted(q: torch.Tensor, attn) -> bool:
    """Whether this decode step may take the kernel (the span and the layout are checked separately)."""
    if DECODE_KERNEL == "never" or attn.position == "alibi" or torch.compiler.is_compiling():
        return False
    if DECODE_KERNEL == "always":
        return True
    return not _broken and q.is_cuda and q.dtype in _DTYPES and triton_available()


def span(cache, every: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(start, end) (B,) of every row's real slots in pos (the first slots of `every`, the cache's positions
    tensor of this forward) when they are one run of positions 0, 1, ... (pads before, empty slots after), else
    None. One host read per forward: memoized on the cache for `every` (each layer gets the same object)."""
    memo = getattr(cache, "_kvshift_span", None)
    if memo is not None and memo[0] is every and memo[1] == pos.shape[1]:
        return memo[2]
    S = pos.shape[1]
    real = pos >= 0
    n = real.sum(1)
    start = torch.where(n > 0, real.to(torch.int32).argmax(1), torch.zeros_like(n))
    s = torch.arange(S, device=pos.device).view(1, S)
    inside = (s >= start[:, None]) & (s < (start + n)[:, None])
    plain = bool(torch.where(inside, pos == s - start[:, None], ~real).all())
    out = (start.to(torch.int32), (start + n).to(torch.int32)) if plain else None  # the kernel's index type
    cache._kvshift_span = (every, pos.shape[1], out)
    return out


_IDENTITY_ROTATIONS: dict = {}


def _identity_rotations(W: int, half: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos 1 / sin 0 (W, half): the taps' rotations for keys that are not rotated; built once per shape."""
    key = (W, half, str(device))
    if key not in _IDENTITY_ROTATIONS:
        _IDENTITY_ROTATIONS[key] = (torch.ones(W, half, device=device), torch.zeros(W, half, device=device))
    return _IDENTITY_ROTATIONS[key]


def kernel_decode(attn, cache, q: torch.Tensor, C: torch.Tensor, V: torch.Tensor, coef_k, coef_v, run,
                  cos, sin) -> torch.Tensor | None:
    """`attn`: the calling `Attention` (its identity coefficients for an unshifted side); `cache`: where the
    step's block table is kept for the other layers; q (B, H, D) rotated; C, V (B, H_kv, S, D) as the cache
    holds them; run = `span(...)`; cos/sin: R_0..R_{W-1} (W, D/2) for rotated keys with a shifted K side, else
    None (identity rotations). Returns (B, H, D), or None when the layout does not suit the kernel or the
    kernel failed under "auto" (see `_give_up`)."""
    from kvshift.ops.shift import paged_decode

    W = max(c.shape[1] for c in (coef_k, coef_v) if c is not None)
    if W > 4 or not paged_decode.dense_layout_ok(C, V):
        return None  # a layout the kernel cannot address in place: the PyTorch read (no copy of the cache)
    ck, cv = (attn._identity(W, q.device) if c is None else c if c.shape[1] == W  # a narrower side: zero taps
              else torch.nn.functional.pad(c, (0, W - c.shape[1])) for c in (coef_k, coef_v))
    if cos is None:
        cos, sin = _identity_rotations(W, C.shape[3] // 2, q.device)
    key = (tuple(C.shape[:3]), C.stride(0), C.stride(2), str(C.device))
    memo = getattr(cache, "_kvshift_table", None)
    if memo is None or memo[0] != key:  # one table per step, shared by the layers (same cache shapes)
        memo = cache._kvshift_table = (key, paged_decode.dense_table(C, BLOCK))
    call = lambda: paged_decode.dense_shift_decode(q, C, V, run[0], run[1], ck, cv, cos, sin,  # noqa: E731
                                                   block=BLOCK, table=memo[1])
    if DECODE_KERNEL == "always":
        return call()
    try:
        return call()
    except Exception as e:  # noqa: BLE001 - a kernel that cannot build here must not stop decoding
        _give_up(e)
        return None


def _give_up(e: Exception) -> None:
    """"auto" and the kernel failed (a Triton or driver problem on this machine): warn once; every later step
    in this process takes the PyTorch read, which gives the same result."""
    global _broken
    _broken = True
    warnings.warn(f"kvshift: the Triton decode kernel failed ({type(e).__name__}: {e}); decoding continues on the "
                  "PyTorch read", RuntimeWarning, stacklevel=3)
