"""Llama-style decoder (RMSNorm, SwiGLU or GELU MLP, RoPE/ALiBi/learned/no positions, GQA) with a KV-shift
attention kind."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from kvshift.layers.attention import Attention, AttentionContext
from kvshift.layers.mixers import Smear, block_mixers
from kvshift.layers.mlp import make_mlp
from kvshift.models.cache import KVCache
from kvshift.models.config import ModelConfig
from kvshift.models.sampling import logits_positions, sample_next
from kvshift.ops.rope import rope_cos_sin
from kvshift.ops.shift import check_cu_seqlens

SHIFT_SEED_OFFSET = 1_000_003  # shift coefficients draw from their own stream


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg.dim, cfg.n_heads, cfg.n_kv_heads, attention=cfg.attention,
                                   shift_window=cfg.shift_window, position=cfg.position,
                                   shift_impl=cfg.shift_impl, layer_idx=layer_idx, shift_init=cfg.shift_init)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = make_mlp(cfg.mlp, cfg.dim, cfg.ffn_dim)
        mixers = block_mixers(cfg, layer_idx)  # cfg.mixer's modules (kvshift.layers.mixers), None if unused
        self.attention.qkv_mixer, self.feed_forward.mixer = mixers["qkv"], mixers["D"]
        self.mixer_a, self.mixer_c = mixers["A"], mixers["C"]

    def forward(self, x, ctx: AttentionContext):
        h = self.attention_norm(x)
        if self.mixer_a is not None:
            (h,) = self.mixer_a(ctx, h)
        x = x + self.attention(h, ctx)
        h = self.ffn_norm(x)
        if self.mixer_c is not None:
            (h,) = self.mixer_c(ctx, h)
        return x + self.feed_forward(h, ctx)


class LM(nn.Module):
    def __init__(self, config: ModelConfig, *, seed: int | None = 0):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise ValueError(f"config must be a ModelConfig, got {type(config).__name__}")
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        if config.position == "learned":  # GPT-2's absolute positions, added to the token embeddings
            self.pos_embeddings = nn.Embedding(config.max_seq_len, config.dim)
        self.embed_mixer = Smear(config.dim, config.shift_impl) if config.mixer == "smear" else None
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        if config.position == "rope":
            # fp32 RoPE tables for positions 0..max_seq_len-1, computed once: looked up, never recomputed
            # per forward (inside a compiled graph the cos/sin of a fresh position grid got fused into every
            # RoPE kernel and evaluated per element and head, ~25% of a 162M model's training step)
            self.register_buffer("rope_cos", torch.empty(0), persistent=False)
            self.register_buffer("rope_sin", torch.empty(0), persistent=False)
            self.reset_rope_tables()
        if seed is not None:
            self.init_weights(seed)

    # ---- initialisation -----------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Deterministic init that depends on neither the attention kind nor shift_init: every shared weight
        of a vanilla and a KV-shift model built with the same seed is identical; the shift coefficients
        come from their own generator (seed + SHIFT_SEED_OFFSET). Learned position embeddings are drawn
        last, so the other weights also equal those of a model with another position scheme. Mixer
        parameters take their fixed init (kvshift.layers.mixers) and draw nothing, so the other weights
        equal those of the model without the mixer."""
        g = torch.Generator().manual_seed(seed)
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if "shift_" in name or "mixer" in name or name == "pos_embeddings.weight":
                continue
            if name.endswith("norm.weight") or ".attention_norm." in name or ".ffn_norm." in name:
                p.fill_(1.0)
            elif name.endswith("wo.weight") or name.endswith("w2.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * out_std)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
        if self.config.position == "learned":
            p = self.pos_embeddings.weight
            p.copy_(torch.randn(p.shape, generator=g) * std)
        gs = torch.Generator().manual_seed(seed + SHIFT_SEED_OFFSET)
        for layer in self.layers:
            layer.attention.reset_shift(gs)
        for m in self.modules():
            if hasattr(m, "reset_mixer"):
                m.reset_mixer()

    # ---- helpers ------------------------------------------------------------------------------
    def new_cache(self, batch_size: int, max_seq_len: int | None = None, *, dtype=None, device=None) -> KVCache:
        cfg = self.config
        max_seq_len = max_seq_len or cfg.max_seq_len
        p = self.output.weight
        return KVCache(cfg.n_layers, batch_size, max_seq_len, cfg.n_kv_heads, cfg.head_dim,
                       cfg.shift_window if cfg.shifted else 0, dtype=dtype or p.dtype, device=device or p.device)

    def shift_coefficients(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [layer.attention.shift_coefficients() for layer in self.layers]

    def num_params(self, non_embedding: bool = True) -> int:
        """All parameters, or (non_embedding) those outside the token and position embeddings and the
        output head: `ModelConfig.non_embedding_params()`."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_embeddings.weight.numel()
            if self.config.position == "learned":
                n -= self.pos_embeddings.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.output.weight.numel()
        return n

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Decay only the matrices of linear layers and the embedding; never norms or the shift
        coefficients (a handful of scalars per head whose natural scale is 1: decay would pull them
        toward 'no attention input') or the mixers' (kvshift.layers.mixers: per-channel taps and gates)."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (decay if p.dim() >= 2 and "shift_" not in name and "mixer" not in name else no_decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    # ---- forward ------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_rope_tables(self) -> None:
        """(Re)compute the fp32 RoPE tables (non-persistent buffers: not in checkpoints; a model built on
        the meta device, as transformers does, calls this once materialised)."""
        cfg = self.config
        dev = self.rope_cos.device
        if dev.type == "meta":
            dev = torch.device("cpu")
        self.rope_cos, self.rope_sin = rope_cos_sin(torch.arange(cfg.max_seq_len, device=dev), cfg.head_dim,
                                                    cfg.rope_base)

    def _rope(self, pos: torch.Tensor, bound: int | None, arange: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B or 1, T, D/2) fp32 for positions `pos` (B or 1, T): a slice (arange: pos is
        0..T-1) or a gather of the tables when `bound` (a host-side upper bound on pos, None if unknown)
        fits them; computed otherwise (or when the tables were cast off fp32)."""
        cfg = self.config
        if (bound is not None and bound < cfg.max_seq_len and self.rope_cos.dtype == torch.float32
                and self.rope_cos.device == pos.device):
            if arange:
                T = pos.shape[-1]
                return self.rope_cos[:T].unsqueeze(0), self.rope_sin[:T].unsqueeze(0)
            return self.rope_cos[pos], self.rope_sin[pos]
        return rope_cos_sin(pos, cfg.head_dim, cfg.rope_base)

    def _context(self, input_ids, cache, attention_mask, cu_seqlens, position_ids) -> AttentionContext:
        cfg = self.config
        if getattr(cache, "static_shapes", False):  # a view that builds its own context (kvshift.hf.static_view)
            if attention_mask is not None or cu_seqlens is not None or position_ids is not None:
                raise ValueError(f"a {type(cache).__name__} takes the attention mask itself, not through LM.forward")
            return cache.static_context(self, input_ids)
        B, T = input_ids.shape
        dev = input_ids.device
        ctx = AttentionContext(cache=cache)
        if getattr(cache, "stateless", False) and cfg.mixer != "none":
            raise ValueError(f"cache: a model with mixer={cfg.mixer!r} keeps the mixer's last raw inputs, which a "
                             f"standard cache ({type(cache).__name__}) has no room for; use LM.new_cache()")
        pos_bound, plain = None, False  # a host-side bound on the positions; positions are 0..T-1
        if cu_seqlens is not None or position_ids is not None:
            if cache is not None:
                raise ValueError("cu_seqlens/position_ids (packed documents) cannot be combined with a cache")
            if attention_mask is not None:
                raise ValueError("attention_mask cannot be combined with cu_seqlens/position_ids")
            if cu_seqlens is not None:
                if B != 1:
                    raise ValueError(f"with cu_seqlens, input_ids must be one packed row (1, N) or (N,), got {(B, T)}")
                check_cu_seqlens(cu_seqlens, T)
                cu = cu_seqlens.to(device=dev)
                lengths = (cu[1:] - cu[:-1]).long()
                doc = torch.repeat_interleave(torch.arange(lengths.numel(), device=dev), lengths, output_size=T)
                pos = (torch.arange(T, device=dev) - cu.long()[doc]).view(1, T)
                doc = doc.view(1, T)
                pos_bound = T - 1
            else:
                if position_ids.shape != (B, T):
                    raise ValueError(f"position_ids must have shape {(B, T)}, got {tuple(position_ids.shape)}")
                pos = position_ids.to(device=dev, dtype=torch.long)
                starts = pos == 0
                starts[:, 0] = True
                doc = starts.long().cumsum(1)
                flat_starts = torch.nonzero(starts.reshape(-1)).flatten()
                cu = torch.cat([flat_starts, flat_starts.new_tensor([B * T])]).to(torch.int32)
            ctx.cu_seqlens = cu.to(torch.int32)
            causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
            ctx.mask = ((doc.unsqueeze(2) == doc.unsqueeze(1)) & causal).unsqueeze(1)  # (B, 1, T, T)
            qpos = kpos = pos
        else:
            past = cache.length if cache is not None else 0
            if attention_mask is not None:
                if attention_mask.shape != (B, T + past) and attention_mask.shape != (B, T):
                    raise ValueError(f"attention_mask must have shape {(B, T)} or {(B, T + past)}, "
                                     f"got {tuple(attention_mask.shape)}")
                valid = attention_mask[:, -T:].to(device=dev, dtype=torch.bool)
                if not torch.compiler.is_compiling():
                    # left padding only: once a row has a real token, no pad may follow
                    seen_real = valid.long().cummax(1).values.bool()
                    if cache is not None:
                        seen_real = seen_real | (cache.seen > 0).view(B, 1)
                    if bool((seen_real & ~valid).any()):
                        raise ValueError("attention_mask must be left-padded: a pad (0) follows a real token")
                ctx.token_valid = valid
                if cache is not None:
                    cache.padded = True
            else:
                valid = torch.ones(B, T, dtype=torch.bool, device=dev)
            if cache is not None:
                cache.begin(T, valid)
                kvalid = cache.valid[:, : past + T]
            else:
                kvalid = valid
            pos_bound = past + T - 1  # a row's position never exceeds its slot
            if cache is None and attention_mask is None:  # the training step: positions 0..T-1 for every row
                kpos = qpos = torch.arange(T, device=dev).view(1, T)
                plain = True
            else:
                kpos = (kvalid.long().cumsum(1) - 1).clamp_min(0)  # position among the row's real tokens
                qpos = kpos[:, past:]
            if cache is not None and attention_mask is None and not cache.padded and (past == 0 or T == 1):
                ctx.causal = past == 0  # plain causal prefill, or one token that sees every cached slot
            elif cache is not None or attention_mask is not None:
                S = past + T
                q_slot = torch.arange(past, S, device=dev).view(T, 1)
                k_slot = torch.arange(S, device=dev).view(1, S)
                allowed = (k_slot <= q_slot).unsqueeze(0) & kvalid.view(B, 1, S)
                allowed = allowed | (k_slot == q_slot).unsqueeze(0)  # pad queries see themselves: no NaN rows
                ctx.mask = allowed.unsqueeze(1)  # (B, 1, T, S)
        if cfg.position == "rope":
            ctx.cos, ctx.sin = self._rope(qpos, pos_bound, plain)
        elif cfg.position == "alibi":
            ctx.distance = (qpos.unsqueeze(2) - kpos.unsqueeze(1)).float()
            if ctx.mask is None:
                S = kpos.shape[1]
                ctx.mask = torch.ones(T, S, dtype=torch.bool, device=dev).tril(S - T).view(1, 1, T, S)
        elif cfg.position == "learned":
            self._check_positions(qpos, pos_bound, plain)
            ctx.positions = None if plain else qpos  # plain: 0..T-1, a slice of the table
        return ctx

    def _check_positions(self, pos: torch.Tensor, bound: int | None, plain: bool) -> None:
        """Learned position embeddings exist for positions 0..max_seq_len-1 only: ValueError otherwise.
        `bound` is a host-side upper bound on pos (None if unknown); only when it does not settle the
        question are the positions read back (skipped inside a compiled graph)."""
        n = self.config.max_seq_len
        if bound is not None and bound < n:
            return
        if plain:  # positions 0..T-1: bound = T - 1 is exact
            raise ValueError(f"position='learned' embeds positions below max_seq_len={n}; a sequence of "
                             f"{bound + 1} tokens is longer")
        if torch.compiler.is_compiling() or not pos.numel():
            return
        lo, hi = torch.stack(torch.aminmax(pos)).tolist()
        if lo < 0 or hi >= n:
            raise ValueError(f"position='learned' embeds positions in [0, max_seq_len={n}), got positions in "
                             f"[{lo}, {hi}] (a sequence or document longer than max_seq_len, or bad position_ids)")

    def forward(self, input_ids: torch.Tensor, *, cache: KVCache | None = None,
                attention_mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, logits_to_keep: int | torch.Tensor = 0) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V). Packed documents: one row (1, N) or (N,) with
        `cu_seqlens`, or rows whose `position_ids` restart at 0 at every document start.
        logits_to_keep (transformers' meaning): 0 = every position; n > 0 = the last n positions only
        (B, n, V); a 1-D integer tensor = those positions. A prefill that samples from the last position
        needs 1: at batch 128 and 8k tokens the full logits are 1M x vocab_size values."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.long, torch.int32, torch.int16):
            raise ValueError("input_ids must be an integer tensor")
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        keep = logits_positions(logits_to_keep, input_ids.shape[1])
        if not torch.compiler.is_compiling() and input_ids.numel():
            lo, hi = torch.stack(torch.aminmax(input_ids)).tolist()  # one host sync for both bounds
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"input_ids must lie in [0, vocab_size={self.config.vocab_size}), "
                                 f"got values in [{lo}, {hi}]")
        ctx = self._context(input_ids, cache, attention_mask, cu_seqlens, position_ids)
        h = self.tok_embeddings(input_ids)
        if self.config.position == "learned":
            h = h + (self.pos_embeddings.weight[: input_ids.shape[1]].unsqueeze(0) if ctx.positions is None
                     else self.pos_embeddings(ctx.positions))
        if self.embed_mixer is not None:
            h = self.embed_mixer(ctx, h)
        for layer in self.layers:
            h = layer(h, ctx)
        if cache is not None:
            cache.end(ctx.token_valid if ctx.token_valid is not None else
                      torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device))
        if keep is not None:
            h = h[:, keep]
        return self.output(self.norm(h))

    def __getstate__(self):
        """Copies and pickles leave the compiled decode's state behind: its compiled step belongs to this model
        (a deep copy would otherwise decode with the original's weights) and cannot be pickled."""
        state = self.__dict__.copy()
        state.pop("_static_decoder", None)
        return state

    def release_static_decode(self) -> None:
        """Free the cache buffers `generate(compile=True)` keeps on the model between calls (the compiled
        step's graphs stay with torch.compile; torch._dynamo.reset() drops those)."""
        self.__dict__.pop("_static_decoder", None)

    # ---- generation ---------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
                 attention_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
                 stateless: bool = False, compile: bool | dict = False) -> torch.Tensor:
        """Prefill once, then decode token by token with the cache. temperature 0 = greedy.
        Rows that emitted eos keep emitting eos. Returns (B, T + new). stateless: decode on a standard
        cache of rotated raw k / raw v, shifted on read (`RawKVCache`) instead of `KVCache`.
        compile: decode through a torch.compile'd static-shape step (kvshift.models.static_decode; CUDA
        graphs on CUDA), the same tokens as the eager decode; True, or a dict of torch.compile options.
        The prefill stays eager. Refused (ValueError) with stateless=True and for mixer models."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if not temperature >= 0 or temperature == float("inf"):  # also NaN
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
        if top_k is not None and (isinstance(top_k, bool) or not hasattr(top_k, "__index__") or top_k < 1):
            raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"generate needs a non-empty prompt of shape (B, T) with T >= 1, got shape "
                             f"{tuple(input_ids.shape)}")
        B, T = input_ids.shape
        decoder = None
        if compile is not False:
            from kvshift.models.static_decode import static_decoder
            decoder = static_decoder(self, B, T + max_new_tokens, input_ids.device, compile, stateless)
            cache = decoder.cache
        elif stateless:
            if self.config.mixer != "none":
                raise ValueError(f"stateless=True: a model with mixer={self.config.mixer!r} keeps the mixer's last raw "
                                 "inputs beside its keys and values, which a standard cache has no room for")
            from kvshift.models.raw_cache import RawKVCache
            cache = RawKVCache.for_model(self, B, T + max_new_tokens)
        else:
            cache = self.new_cache(B, T + max_new_tokens)
        logits = self(input_ids, cache=cache, attention_mask=attention_mask, logits_to_keep=1)[:, -1]
        step = (lambda nxt: self(nxt.view(B, 1), cache=cache)[:, -1]) if decoder is None else decoder.start(
            T + max_new_tokens - 2)  # the last decode slot: a host bound on every position
        out = [input_ids]
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for i in range(max_new_tokens):
            nxt = sample_next(logits.float(), temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done = done | (nxt == eos_token_id)
            out.append(nxt.view(B, 1))
            if i + 1 == max_new_tokens or (eos_token_id is not None and bool(done.all())):
                break
            logits = step(nxt)
        return torch.cat(out, 1)
