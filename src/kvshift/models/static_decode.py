"""The compiled, static-shape decode step of `LM.generate(compile=True)`.

The eager decode step is launch-bound (hundreds of small kernels per token) and cannot become a CUDA graph:
the cache length is a host int and every step attends over a longer slice. Here every step has the same
shapes: the next slot is a (1,) long device tensor, the new token's k̂, v̂ are written by index, attention
runs over the whole allocation with the slot-validity mask hiding unwritten and pad slots, RoPE's cos/sin
are gathered by the rows' position tensor, and nothing is read back to the host. One `torch.compile`
(fullgraph, static shapes; mode "reduce-overhead" on CUDA, i.e. CUDA graphs) then serves every step.

`static_step` is the step, `StaticDecoder` its state. The cache buffers stay on the model between calls
(`LM._static_decoder`, the latest batch size and allocation only) and are reset in place: the compiled step
and its CUDA graphs see the same tensors every call, so a second generate of the same shape neither
recompiles nor re-records. `LM.release_static_decode()` frees them. Allocations are rounded up to
STATIC_BUCKET slots so nearby lengths share one graph (the extra slots are masked: same tokens, a little more
attention work; the mask's rows also stay aligned as the memory-efficient attention kernels want them).

Prefill stays eager (the same call as the eager path). Sampling stays outside the step, in the same
`sample_next` as the eager path, so a seeded generator draws the same tokens from the same logits.
"""

from __future__ import annotations

import types

import torch

from kvshift.layers.attention import SHIFT_KINDS, AttentionContext
from kvshift.layers.gqa import cudnn_picked
from kvshift.models.cache import KVCache
from kvshift.ops.rope import rope_cos_sin

_STEP_CODES: dict = {}  # decoder key -> its step's code object (StaticDecoder.__init__ says why)
STATIC_BUCKET = 128  # allocation granularity in slots (one compiled graph per bucket and batch size)


def compile_options(compile, device: torch.device) -> dict:
    """generate's `compile` argument -> torch.compile keyword arguments. True: fullgraph, static shapes,
    mode "reduce-overhead" (CUDA graphs) on CUDA and the default mode elsewhere; a dict: those defaults
    updated with it (e.g. {"backend": "aot_eager"}, {"mode": "max-autotune"}); fullgraph stays on."""
    opts = {"fullgraph": True, "dynamic": False, "mode": "reduce-overhead" if device.type == "cuda" else None}
    if isinstance(compile, dict):
        if compile.get("fullgraph", True) is not True:
            raise ValueError("compile: the static decode step compiles with fullgraph=True (a graph break would "
                             "bring back the host syncs it exists to avoid)")
        opts.update(compile)
    elif compile is not True:
        raise ValueError(f"compile must be a bool or a dict of torch.compile options, got {compile!r}")
    return opts


def gqa_heads_ok(model, cache: KVCache) -> bool:
    """Whether the static step runs GQA attention as one query row per head against the cache's KV heads
    (`enable_gqa`): only where PyTorch's SDPA dispatcher picks cuDNN's attention for that call (with the step's
    mask, dtype and the cache's strides; it is the fast layout on cuDNN, measured, and in torch 2.11 the
    memory-efficient kernel takes no enable_gqa, so elsewhere the call would fall to the math kernel). Asked
    once per decoder, eagerly, on the cache's own buffers, of the function the compiled graph's lowering asks
    too (`torch._fused_sdp_choice`); the compiled step sees a constant."""
    cfg = model.config
    if cfg.n_kv_heads in (None, cfg.n_heads) or not cache.k or not cache.k[0].is_cuda:
        return False
    k = cache.k[0].transpose(1, 2)  # (B, Hkv, S, D), the view the step passes
    B, _, S, D = k.shape
    q = k.new_empty(B, cfg.n_heads, 1, D)
    mask = cache.valid.view(B, 1, 1, S) if cfg.position != "alibi" else q.new_empty(B, cfg.n_heads, 1, S)
    return cudnn_picked(q, k, mask)


def static_step(model, tokens: torch.Tensor, slot: torch.Tensor, cache: KVCache, rope_tables: bool,
                gqa_heads: bool = False) -> torch.Tensor:
    """One decode token per row of `model` (an LM) with static shapes, the step generate(compile=...) compiles:
    tokens (B,), slot (1,) long (the write slot, advanced here), cache a KVCache whose valid/seen are updated
    here (its host `length` is not) -> next-token logits (B, V) fp32. Attention runs over the whole allocation
    under the slot-validity mask (`Attention._decode_static`); the new token's position is its row's count of
    real tokens (`seen`), as in the eager path. rope_tables: gather RoPE from the model's fp32 tables (the
    caller checked every position fits them), else compute it. gqa_heads: GQA attention's layout
    (`gqa_heads_ok`)."""
    cfg = model.config
    B, S = cache.valid.shape
    cache.valid.index_fill_(1, slot, True)
    pos = cache.seen.view(B, 1)
    ctx = AttentionContext(cache=cache, mask=cache.valid.view(B, 1, 1, S), causal=False, slot=slot,
                           gqa_heads=gqa_heads)
    if cfg.position == "rope":
        ctx.cos, ctx.sin = ((model.rope_cos[pos], model.rope_sin[pos]) if rope_tables
                            else rope_cos_sin(pos, cfg.head_dim, cfg.rope_base))
    elif cfg.position == "alibi":
        kpos = (cache.valid.long().cumsum(1) - 1).clamp_min(0)  # each slot's position among its row's real tokens
        ctx.distance = (pos.unsqueeze(2) - kpos.unsqueeze(1)).float()  # (B, 1, S)
    h = model.tok_embeddings(tokens.view(B, 1))
    if cfg.position == "learned":
        h = h + model.pos_embeddings(pos)
    for layer in model.layers:
        h = layer(h, ctx)
    cache.seen.add_(1)
    slot.add_(1)
    return model.output(model.norm(h))[:, -1].float()


def check_static_decode(model, stateless: bool) -> None:
    """ValueError for what the static step does not support (never a silently different decode)."""
    cfg = model.config
    if stateless:
        raise ValueError("compile=True cannot be combined with stateless=True: the static decode step runs on "
                         "KVCache (shifted keys/values plus the raw window), not on the stateless RawKVCache")
    if cfg.mixer != "none":
        raise ValueError(f"compile=True: a model with mixer={cfg.mixer!r} keeps the mixers' raw history in the "
                         "cache's mixer dict, which the static decode step does not update; use compile=False")


class StaticDecoder:
    """The persistent state of the compiled decode for one (batch, allocation, dtype, device): a KVCache
    whose raw windows are pinned (updated in place, never rebound), the next-slot tensor, and the
    compiled step (`static_step`)."""

    def __init__(self, model, batch_size: int, alloc: int, dtype: torch.dtype, device: torch.device, opts: dict,
                 key: tuple):
        self.key = key
        self.cache = model.new_cache(batch_size, alloc, dtype=dtype, device=device)
        self.raw = (list(self.cache.raw_k), list(self.cache.raw_v))  # the pinned windows
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        c = self.cache
        if model.config.position == "rope" and c.window and SHIFT_KINDS[model.config.attention][0]:
            # shifted keys under RoPE: the window rolled by D/2 as well (Attention._decode_static says why)
            c.raw_k_rolled = [torch.zeros_like(t) for t in c.raw_k]
        for t in (*c.k, *c.v, *c.raw_k, *c.raw_v, *(c.raw_k_rolled or ()), c.valid, c.seen, self.slot):
            # the same addresses every step and call: CUDA graphs read and write them in place, no copy; no
            # guard on their identity (the default differs across torch versions): a new decoder of a shape
            # seen before reuses dynamo's graph, and a CUDA graph re-records if an address changed
            torch._dynamo.mark_static_address(t, guard=False)
        self.model = model
        self.gqa_heads = gqa_heads_ok(model, c)
        gqa_heads = self.gqa_heads

        def step(tokens, slot, cache, rope_tables):
            return static_step(model, tokens, slot, cache, rope_tables, gqa_heads)
        # dynamo keeps its compiled graphs per code object, and every decoder's `step` would share this one: a
        # process that decodes several batch sizes or allocations would reach dynamo's recompile limit (8),
        # which fullgraph turns into an error. One code object per decoder key (shape, dtype, device, options)
        # instead: a decoder of a key seen before reuses its graph (another model of the same config too: its
        # weights are the graph's inputs), and the code objects, which dynamo never frees, stay bounded by the
        # keys a process uses.
        code = _STEP_CODES.get(repr(key))  # repr: torch.compile options may hold unhashable values
        if code is None:
            code = _STEP_CODES[repr(key)] = step.__code__.replace(co_name=f"static_step_{len(_STEP_CODES)}")
        step = types.FunctionType(code, step.__globals__, None, None, step.__closure__)
        self.step = torch.compile(step, **opts)

    def reset(self) -> KVCache:
        """The cache, emptied in place for a new prompt (stale slots are masked, but zeroed anyway so no
        old value can reach a softmax as inf/NaN)."""
        c = self.cache
        for lst, pinned in zip((c.raw_k, c.raw_v), self.raw):
            lst[:] = pinned
        for t in (*c.k, *c.v, *c.raw_k, *c.raw_v, *(c.raw_k_rolled or ()), c.valid, c.seen):
            t.zero_()
        c.length, c._pending, c.padded = 0, 0, False
        c.mixer.clear()
        return c

    def start(self, last_slot: int):
        """After the eager prefill: copy the raw windows it rebound back into the pinned tensors, point the slot
        tensor at the first decode slot (a device fill, no host sync) and return step(tokens (B,)) -> logits
        (B, V) fp32. last_slot: the last slot a decode step writes, a host bound on every position."""
        c, cfg = self.cache, self.model.config
        for lst, pinned in zip((c.raw_k, c.raw_v), self.raw):
            for i, t in enumerate(lst):
                if t is not pinned[i]:
                    pinned[i].copy_(t)
                    lst[i] = pinned[i]
        for rolled, raw in zip(c.raw_k_rolled or (), c.raw_k):  # the prefill's last raw keys, rolled by D/2
            rolled.copy_(torch.roll(raw, raw.shape[-1] // 2, dims=-1))
        self.slot.fill_(c.length)
        if cfg.position == "learned" and last_slot >= cfg.max_seq_len and last_slot >= c.length:
            hi = int(c.seen.max()) + last_slot - c.length  # one sync, before the first step
            if hi >= cfg.max_seq_len:
                raise ValueError(f"position='learned' embeds positions below max_seq_len={cfg.max_seq_len}; "
                                 f"decoding reaches position {hi}")
        m = self.model
        tables = (cfg.position == "rope" and last_slot < cfg.max_seq_len and m.rope_cos.dtype == torch.float32
                  and m.rope_cos.device == self.slot.device)

        def step(tokens: torch.Tensor) -> torch.Tensor:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's logits (consumed) may be overwritten
            return self.step(tokens, self.slot, c, tables)
        return step


def static_decoder(model, batch_size: int, n_slots: int, device: torch.device, compile,
                   stateless: bool = False) -> StaticDecoder:
    """The model's StaticDecoder for this shape (made, and its step compiled lazily on the first call, when
    the shape or options changed), reset for a new prompt; ValueError for what it does not support."""
    check_static_decode(model, stateless)
    opts = compile_options(compile, device)
    alloc = -(-n_slots // STATIC_BUCKET) * STATIC_BUCKET
    dtype = model.output.weight.dtype
    # inference mode: buffers made under it cannot be updated outside it (and the other way round needs no guard
    # change, but the same key keeps it simple)
    key = (batch_size, alloc, dtype, device, tuple(sorted(opts.items(), key=lambda kv: kv[0])),
           torch.is_inference_mode_enabled())
    dec = model.__dict__.get("_static_decoder")
    if dec is None or dec.key != key:
        model._static_decoder = None  # free the old buffers before allocating the new ones
        dec = model._static_decoder = StaticDecoder(model, batch_size, alloc, dtype, device, opts, key)
    dec.reset()
    return dec
