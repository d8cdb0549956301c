"""Stateless KV shifting: a standard cache of rotated raw keys and raw values, shifted on read.

RoPE is applied after the shift, and rotations compose: with c_s = R_s k_s the rotated raw key a
vanilla cache stores (R_p the rotation by p positions),

    R_s k̂_s = Σ_j α_j · R_s k_{s-j} = Σ_j α_j · R_j c_{s-j}        j = 0 .. W-1 (α_0: the current token)
    v̂_s    = Σ_j β_j · v_{s-j}

where tap j counts only when slot s-j holds a real token of the same row and document (a row's or
document's first real token sees zeros before it). So a cache that holds exactly what a vanilla
model's cache holds suffices; the shift is applied when keys/values are read for attention, and
crop (speculative rollback), beam reorder, static allocation, paging and prefix sharing work unchanged.
With no RoPE (ALiBi, learned or no positions) every R_j is the identity.

`read_shifted` is the pure-PyTorch reference of that read; `stateless_attention` is the hook
`Attention.forward` calls when its cache says `stateless = True` (see `kvshift.models.raw_cache`).
"""

from __future__ import annotations

import torch

from kvshift.layers import stateless_kernel
from kvshift.ops.rope import apply_rope

_FLOAT = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def rotation_tables(window: int, head_dim: int, base: float, *, device=None,
                    dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (window+1, head_dim/2) of R_0 .. R_window, the RoPE rotation by j positions (the
    half-split convention of `kvshift.ops.rope`), computed in fp64 and cast to `dtype`."""
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    ang = torch.arange(window + 1, dtype=torch.float64).unsqueeze(1) * inv_freq
    return ang.cos().to(device=device, dtype=dtype), ang.sin().to(device=device, dtype=dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., D) rotated by the angles of cos/sin (D/2,) (broadcast), in x's precision (fp32 at least)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def slot_positions(valid: torch.Tensor, doc_start: torch.Tensor | None = None) -> torch.Tensor:
    """valid (B, S) bool (False: a pad or empty slot), doc_start (B, S) bool or None (True at the
    first token of a packed document) -> (B, S) long: each slot's position inside its document
    (0 at a row's first real token and at every document start), -1 at invalid slots."""
    if not isinstance(valid, torch.Tensor) or valid.dim() != 2:
        raise ValueError(f"valid must be a (B, S) tensor, got {getattr(valid, 'shape', type(valid).__name__)}")
    valid = valid.bool()
    count = valid.long().cumsum(1)  # real tokens up to and including s
    pos = count - 1
    if doc_start is not None:
        if not isinstance(doc_start, torch.Tensor) or doc_start.shape != valid.shape:
            raise ValueError(f"doc_start must have the shape of valid {tuple(valid.shape)}, got "
                             f"{tuple(getattr(doc_start, 'shape', ()))}")
        before = count - valid.long()  # real tokens strictly before s
        base = torch.where(doc_start.bool() & valid, before, torch.zeros_like(before)).cummax(1).values
        pos = pos - base
    return torch.where(valid, pos, torch.full_like(pos, -1))


def _check(C, V, coef_k, coef_v, pos, cos, sin):
    for name, t in (("C", C), ("V", V)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.dtype not in _FLOAT:
            raise ValueError(f"{name} must be a floating (B, H_kv, S, D) tensor, got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
    if C.shape[:3] != V.shape[:3]:
        raise ValueError(f"C and V must agree on (B, H_kv, S), got {tuple(C.shape)} and {tuple(V.shape)}")
    B, H, S, D = C.shape
    if not isinstance(pos, torch.Tensor) or tuple(pos.shape) != (B, S):
        raise ValueError(f"pos must have shape (B, S) = {(B, S)}, got {tuple(getattr(pos, 'shape', ()))}")
    for name, c in (("coef_k", coef_k), ("coef_v", coef_v)):
        if c is None:
            continue
        if not isinstance(c, torch.Tensor) or c.dim() != 2 or c.shape[0] != H or not 1 <= c.shape[1] <= 4:
            raise ValueError(f"{name} must have shape (H_kv={H}, W) with 1 <= W <= 4, got "
                             f"{tuple(getattr(c, 'shape', ()))}")
    if (cos is None) != (sin is None):
        raise ValueError("cos and sin must be given together (or both None: no RoPE)")
    if cos is not None and coef_k is not None:
        W = coef_k.shape[1]
        for name, t in (("cos", cos), ("sin", sin)):
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] < W or t.shape[1] != D // 2:
                raise ValueError(f"{name} must have shape (W, D/2) = {(W, D // 2)}, got "
                                 f"{tuple(getattr(t, 'shape', ()))}")


def _shift_read(x: torch.Tensor, coef: torch.Tensor, pos: torch.Tensor, cos, sin) -> torch.Tensor:
    B, H, S, D = x.shape
    ct = _compute_dtype(x.dtype)
    xc, w = x.to(ct), coef.to(device=x.device, dtype=ct)
    out = None
    for j in range(coef.shape[1]):
        tap = xc if j == 0 else torch.nn.functional.pad(xc, (0, 0, j, 0))[:, :, :S]  # x[s - j]
        if j and cos is not None:
            tap = rotate(tap, cos[j].to(device=x.device, dtype=ct), sin[j].to(device=x.device, dtype=ct))
        keep = (pos >= j).to(ct).view(B, 1, S, 1)
        term = tap * keep * w[:, j].view(1, H, 1, 1)
        out = term if out is None else out + term
    return out.to(x.dtype)


def read_shifted(C: torch.Tensor, V: torch.Tensor, coef_k: torch.Tensor | None, coef_v: torch.Tensor | None,
                 pos: torch.Tensor, cos: torch.Tensor | None = None,
                 sin: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference read: rotated shifted keys and shifted values from a standard cache.

    C (B, H_kv, S, D): rotated raw keys c_s = R_s k_s (raw keys when there is no RoPE); V: raw values.
    coef_k / coef_v (H_kv, W), current-first, or None for an unshifted side (returned as is).
    pos (B, S) long: each slot's position inside its document, negative at pads/empty slots
    (`slot_positions`); tap j is used at slot s only when pos[s] >= j.
    cos / sin (W, D/2): R_0 .. R_{W-1} (`rotation_tables`), or None when keys are not rotated.
    Returns (K̂_rot, V̂) shaped like C and V."""
    _check(C, V, coef_k, coef_v, pos, cos, sin)
    k_hat = C if coef_k is None else _shift_read(C, coef_k, pos, cos, sin)
    v_hat = V if coef_v is None else _shift_read(V, coef_v, pos, None, None)
    return k_hat, v_hat


# Queries per call up to which attention reads the cache in the score domain (`decode_attend`) rather than
# through a re-shifted copy of the whole cache: decoding steps, speculative/assisted chunks. Longer chunks
# (prefills) take the reference read and SDPA, whose (T, S) work dwarfs the copy.
DECODE_MAX_T = 8
# Inside torch.compile (transformers' compiled static-cache decode step) every chunk takes the shifted copy and
# SDPA instead: inductor fuses the shift into one pass over the cache and SDPA runs vanilla's own attention
# kernel. The score domain's two batched matmuls have a few rows each (the query heads of one KV head); on an
# H200 (bench-246m, batch 1, 2,048-token prompt) cuBLAS ran them as a GEMV-like kernel without split-K:
# 1.22 of the step's 2.21 ms of GPU time, against 0.22 ms for Llama's whole attention (results/bench).
SCORE_DOMAIN_WHEN_COMPILED = False


def decode_attend(attn, q: torch.Tensor, C: torch.Tensor, V: torch.Tensor, coef_k, coef_v, pos: torch.Tensor,
                  cos, sin, ctx) -> torch.Tensor:
    """Attention of a few queries over a standard cache with the shift applied in the score domain, so the
    cache is read as it is stored (no shifted copy of S slots at every step):

        q · K̂_s = Σ_j α_j [pos_s >= j] (R_j^T q) · c_{s-j}      (scores: W matmuls against the raw cache)
        Σ_s p_s V̂_s = Σ_u (Σ_j β_j [pos_{u+j} >= j] p_{u+j}) v_u  (the probabilities shifted back, one matmul)

    q (B, H, T, D) rotated; C, V (B, H_kv, S, D); coef_k / coef_v (H_kv, W) or None; pos (B, S) as in
    `read_shifted`; cos/sin (W, D/2) or None. Masks, ALiBi and GQA as `Attention._attend`. Returns the
    attention output (B, H, T, D) in q's dtype; softmax in fp32."""
    B, H, T, D = q.shape
    Hk, S = C.shape[1], C.shape[2]
    rep = H // Hk
    ct = _compute_dtype(q.dtype)
    qg = q.reshape(B, Hk, rep * T, D)  # query heads grouped under their KV head
    keep = lambda j: (pos >= j).view(B, 1, 1, S)  # noqa: E731 - tap j exists at slot s
    if coef_k is None:
        scores = torch.matmul(qg, C.transpose(-1, -2)).to(ct)
    else:
        w = coef_k.to(device=q.device, dtype=ct)
        W, R = coef_k.shape[1], rep * T
        # every tap's query R_j^T q in one matmul, so the cache's keys are read once (not once per tap); without
        # RoPE all taps share the one query
        qs = [qg] + ([] if cos is None else [
            rotate(qg.to(ct), cos[j].to(device=q.device, dtype=ct), -sin[j].to(device=q.device, dtype=ct)).to(q.dtype)
            for j in range(1, W)])
        m_all = torch.matmul(torch.cat(qs, dim=2), C.transpose(-1, -2)).to(ct)  # (B, Hk, len(qs) * R, S)
        scores = None
        for j in range(W):
            m = m_all[:, :, (j if cos is not None else 0) * R:][:, :, :R]  # m[..., s] = q_j · c_s
            if j:
                m = torch.nn.functional.pad(m, (j, 0))[..., :S]  # -> q_j · c_{s-j}
            term = m * keep(j) * w[:, j].view(1, Hk, 1, 1)
            scores = term if scores is None else scores + term
    scores = scores.view(B, H, T, S) * D ** -0.5
    if attn.position == "alibi":
        scores = scores - attn.alibi_slopes.to(ct).view(1, -1, 1, 1) * ctx.distance.unsqueeze(1).to(ct)
    if ctx.mask is not None:
        scores = scores.masked_fill(~ctx.mask, float("-inf"))
    elif ctx.causal:  # SDPA's is_causal: query t may see slots s <= t (top-left)
        scores = scores.masked_fill(torch.ones(T, S, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    p = torch.softmax(scores, dim=-1).view(B, Hk, rep * T, S)
    if coef_v is not None:
        w = coef_v.to(device=q.device, dtype=ct)
        shifted = None
        for j in range(coef_v.shape[1]):
            pj = p * keep(j) * w[:, j].view(1, Hk, 1, 1)
            if j:
                pj = torch.nn.functional.pad(pj[..., j:], (0, j))[..., :S]  # weight of v_u: from slot u + j
            shifted = pj if shifted is None else shifted + pj
        p = shifted
    out = torch.matmul(p.to(V.dtype), V)  # (B, H_kv, rep*T, D)
    return out.view(B, H, T, D).to(q.dtype)


def stateless_attention(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx) -> torch.Tensor:
    """`Attention.forward` on a stateless cache: q (B, T, H, D), raw k, v (B, T, H_kv, D) of the new
    tokens (pads already zeroed). Rotates q and k (RoPE), appends (c, v) to the cache, reads every
    cached slot back shifted and attends (a few queries: in the score domain, `decode_attend`). The cache
    provides `update(layer, c, v) -> (C, V)` over (B, H_kv, S, D), `slot_positions() -> (B, S)` and
    `rotation(W, device)` (cos, sin of R_0..R_{W-1})."""
    B, T = q.shape[:2]
    cache = ctx.cache
    if attn.position == "rope":
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
    C, Vc = cache.update(attn.layer_idx, k.transpose(1, 2), v.transpose(1, 2))
    coef_k, coef_v = attn._coefficients("k"), attn._coefficients("v")
    if coef_k is not None or coef_v is not None:
        every = cache.slot_positions()
        pos = every[:, : C.shape[2]]
        cos = sin = None
        if attn.position == "rope" and coef_k is not None:
            cos, sin = cache.rotation(coef_k.shape[1], C.device)
        run = stateless_kernel.span(cache, every, pos) if T == 1 and stateless_kernel.wanted(q, attn) else None
        if run is not None:
            out = stateless_kernel.kernel_decode(attn, cache, q[:, 0], C, Vc, coef_k, coef_v, run, cos, sin)
            if out is not None:
                return attn.wo(out.reshape(B, 1, attn.n_heads * attn.head_dim))
        if T <= DECODE_MAX_T and (SCORE_DOMAIN_WHEN_COMPILED or not torch.compiler.is_compiling()):
            out = decode_attend(attn, q.transpose(1, 2), C, Vc, coef_k, coef_v, pos, cos, sin, ctx)
            return attn.wo(out.transpose(1, 2).reshape(B, T, attn.n_heads * attn.head_dim))
        C, Vc = read_shifted(C, Vc, coef_k, coef_v, pos, cos, sin)
    return attn._attend(q, C.transpose(1, 2), Vc.transpose(1, 2), ctx, B, T)
