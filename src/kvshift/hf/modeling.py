"""`KVShiftForCausalLM`: a thin transformers adapter around `kvshift.LM`.

generate() runs on transformers' own caches (DynamicCache by default, StaticCache with
`cache_implementation="static"`, anything with the standard `update(key_states, value_states,
layer_idx)`): per layer they hold what they hold for a Llama, rotated raw keys and raw values, and
the KV shift is applied when attention reads them (`kvshift.layers.stateless`, through
`kvshift.hf.cache_view.TransformersCacheView`). So the caches crop, reorder and preallocate as for any
model: assisted generation (a draft model), prompt-lookup decoding, beam search and static caches work.
On a StaticCache the forward has static shapes and reads nothing back to the host (`kvshift.hf.static_view`), so
generate's own compile of the decode step (`compile_config`) traces it as one graph that serves every step.

`KVShiftCache`, a wrapper of our own `kvshift.KVCache` (shifted K̂/V̂ plus the last raw k/v of every
row, with a fused Triton decode kernel), is still accepted when passed explicitly (`cache=KVShiftCache()`
or `past_key_values=`), but it cannot be rolled back; `kvshift.LM.generate` keeps using `KVCache`.

Positions come from the attention mask (left padding), never from transformers' position_ids; the
KV shift of a row's first real token sees zeros, as in `kvshift.LM`.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from kvshift.layers.attention import Attention, alibi_slopes, initial_coefficients
from kvshift.models.cache import KVCache
from kvshift.models.lm import LM

from .cache_view import TransformersCacheView
from .configuration import KVShiftConfig
from .static_view import StaticCacheView, slot_buffer, static_length

# the output field generate() reads the cache from: `past_key_values` (5.17) or `cache` (later 5.x)
_OUTPUT_CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} \
    else "past_key_values"

# keyword arguments transformers' helpers may pass that carry nothing for this model
_IGNORED_KWARGS = frozenset({"token_type_ids", "cache_position", "num_items_in_batch",
                             "next_sequence_length", "is_first_iteration"})


class KVShiftCache:
    """A handle on our own `kvshift.KVCache` (opt-in: pass it as the cache), allocated on the first
    forward and grown by doubling (generate does not tell the model its final length)."""

    is_compileable = False  # read by transformers' auto-compile check
    is_croppable = False  # no rollback: assisted decoding and prompt lookup need a transformers cache
    is_linear = (False,)  # read by generate's prefill: an attention cache, slice the inputs by its length

    def __init__(self):
        self.kv: KVCache | None = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.kv is None else self.kv.length

    def __len__(self) -> int:
        return self.get_seq_length()

    def reserve(self, lm: LM, batch_size: int, n_new: int, dtype: torch.dtype, device: torch.device) -> KVCache:
        need = self.get_seq_length() + n_new
        if self.kv is None:
            self.kv = lm.new_cache(batch_size, max(64, need), dtype=dtype, device=device)
        elif self.kv.batch_size != batch_size:
            raise ValueError(f"the cache holds {self.kv.batch_size} rows but the input has {batch_size}")
        elif need > self.kv.max_seq_len:
            self.kv = _grown(lm, self.kv, max(need, 2 * self.kv.max_seq_len))
        return self.kv

    def crop(self, tokens_to_remove: int = 0) -> None:
        raise ValueError("a KVShiftCache cannot be rolled back (it holds shifted keys and the last raw k/v); "
                         "use transformers' DynamicCache, the default, for assisted generation and prompt lookup")

    activate_past_recording = crop  # generate() asks for it before any rollback: the same refusal

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.kv is not None:
            self.kv.reorder(beam_idx.to(self.kv.valid.device))


def _grown(lm: LM, kv: KVCache, capacity: int) -> KVCache:
    p = kv.k[0]
    new = lm.new_cache(kv.batch_size, capacity, dtype=p.dtype, device=p.device)
    n = kv.length
    for dst, src in ((new.k, kv.k), (new.v, kv.v)):
        for i, t in enumerate(src):
            dst[i][:, :n] = t[:, :n]
    new.raw_k, new.raw_v = list(kv.raw_k), list(kv.raw_v)
    new.mixer = dict(kv.mixer)  # the short causal mixers' history (kvshift.layers.mixers)
    new.valid[:, :n] = kv.valid[:, :n]
    new.seen = kv.seen.clone()
    new.length = n
    return new


class KVShiftPreTrainedModel(PreTrainedModel):
    config_class = KVShiftConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _is_stateful = False  # transformers' caches, shifted on read: they can be cropped (assisted decoding)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """kvshift.LM's scheme (normal(init_std) for matrices and the token and position embeddings, residual
        outputs scaled by 1/sqrt(2·n_layers), unit norms, the shift init of config.shift_init) for fresh
        models and missing weights. transformers'
        guarded torch.nn.init calls skip loaded parameters; the shift is guarded by hand."""
        cfg = self.config
        std = cfg.init_std
        if isinstance(module, nn.Linear):
            scale = 1 / math.sqrt(2 * cfg.n_layers) if getattr(module, "_kvshift_residual_out", False) else 1.0
            nn.init.normal_(module.weight, mean=0.0, std=std * scale)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif type(module).__name__ == "RMSNorm":
            nn.init.ones_(module.weight)
        elif isinstance(module, Attention):
            for name in ("shift_k", "shift_v", "shift_k_gate", "shift_v_gate"):
                p = getattr(module, name, None)
                if p is None or getattr(p, "_is_hf_initialized", False) or p.is_meta:
                    continue
                p.copy_(initial_coefficients(module.n_kv_heads, module.window, module.shift_init, module.param))
            _restore_buffers(module)
        elif hasattr(module, "reset_mixer"):  # kvshift.layers.mixers: their fixed init, unless loaded
            if not any(getattr(p, "_is_hf_initialized", False) or p.is_meta for p in module.parameters()):
                module.reset_mixer()
        elif isinstance(module, LM):
            _restore_buffers(module)


def _restore_buffers(module: nn.Module) -> None:
    # non-persistent buffers are not in checkpoints; transformers may build the model on the meta device
    if isinstance(module, LM) and hasattr(module, "rope_cos") and not module.rope_cos.is_meta:
        module.reset_rope_tables()
    if isinstance(module, Attention) and hasattr(module, "alibi_slopes") and not module.alibi_slopes.is_meta:
        module.alibi_slopes.copy_(alibi_slopes(module.n_heads).to(module.alibi_slopes.device))


class KVShiftForCausalLM(KVShiftPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"model.output.weight": "model.tok_embeddings.weight"}
    # the forward on a static cache traces as one graph (kvshift.hf.static_view); transformers reads this flag in its
    # own compile tests, generate() compiles with `generation_config.compile_config` (fullgraph off by default)
    _can_compile_fullgraph = True

    def __init__(self, config: KVShiftConfig):
        super().__init__(config)
        self.model = LM(config.to_model_config(), seed=None)
        for name, m in self.model.named_modules():
            if name.endswith((".wo", ".w2")):
                m._kvshift_residual_out = True
        self.post_init()

    @classmethod
    def from_lm(cls, lm: LM, **config_kwargs) -> "KVShiftForCausalLM":
        """Wrap a trained `kvshift.LM`: same weights, same logits."""
        if not isinstance(lm, LM):
            raise ValueError(f"lm must be a kvshift.LM, got {type(lm).__name__}")
        model = cls(KVShiftConfig.from_model_config(lm.config, **config_kwargs))
        load_lm_state(model.model, lm.state_dict())
        p = next(lm.parameters())
        return model.to(device=p.device, dtype=p.dtype)

    # embeddings accessors used by transformers' resize/tie helpers
    def get_input_embeddings(self):
        return self.model.tok_embeddings

    def set_input_embeddings(self, value):
        self.model.tok_embeddings = value

    def get_output_embeddings(self):
        return self.model.output

    def set_output_embeddings(self, value):
        self.model.output = value

    def _reorder_cache(self, cache, beam_idx):
        if isinstance(cache, (KVShiftCache, Cache)):
            cache.reorder_cache(beam_idx)
            slots = getattr(cache, "_kvshift_slots", None)  # a static cache's real-slot buffer (static_view)
            if slots is not None:
                slots.copy_(slots.index_select(0, beam_idx.to(slots.device)))
            return cache
        raise ValueError(f"KVShiftForCausalLM cannot reorder a {type(cache).__name__}")

    def create_masks_for_generate(self, attention_mask=None, **kwargs):
        """generate() would turn the 2-D mask into a 4-D one for static caches; the model builds its own
        masks (and the KV shift's first-token information) from the 2-D mask, so it stays 2-D. On a static cache
        it is padded with zeros to the allocation, (B, max_cache_len): the same shape at every decode step, so
        a compiled step is traced once (the cache comes as `past_key_values` in 5.17, `cache` in later 5.x). The
        cache's real-slot buffer is allocated here, outside any compiled call (generate compiles the chunks of a
        chunked prefill too), so every compiled call finds it in place."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        L = static_length(cache)
        if L and attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[1] < L:
            attention_mask = F.pad(attention_mask, (0, L - attention_mask.shape[1]))
        embeds = kwargs.get("inputs_embeds")
        if L and isinstance(embeds, torch.Tensor) and not torch.compiler.is_compiling():
            slot_buffer(cache, embeds.shape[0], L, embeds.device)
        return attention_mask

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values=None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, output_attentions: bool | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                logits_to_keep: int | torch.Tensor = 0, **kwargs):
        """Logits of kvshift.LM. `cache` (or `past_key_values`): a transformers Cache (rotated raw k and
        raw v per layer, shifted on read) or a KVShiftCache to extend; a DynamicCache is made when
        use_cache=True. attention_mask: (B, past+T) or (B, T), left padding only.
        position_ids are honoured only without mask and cache, as packed-document positions
        (restarting at 0 at each document start). logits_to_keep: as `kvshift.LM.forward` (generate asks
        for 1 at the prefill, and for the draft's length + 1 in assisted generation)."""
        state = kwargs.pop("cache", None)
        state = state if state is not None else past_key_values
        unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in _IGNORED_KWARGS)
        if unknown:
            raise ValueError(f"KVShiftForCausalLM.forward got unsupported arguments {unknown}")
        if inputs_embeds is not None:
            raise ValueError("KVShiftForCausalLM takes input_ids, not inputs_embeds")
        if input_ids is None:
            raise ValueError("input_ids is required")
        if labels is not None and not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
            raise ValueError("labels need the logits of every position: logits_to_keep must be 0 with labels")
        if output_attentions or output_hidden_states:
            raise ValueError("KVShiftForCausalLM does not return attentions or hidden states; "
                             "see kvshift.eval.analysis.attention_probs for attention maps")
        if use_cache and state is None:
            state = DynamicCache()
        elif state is not None and not isinstance(state, (KVShiftCache, Cache)):
            raise ValueError(f"the cache must be a transformers Cache or a KVShiftCache, got {type(state).__name__}")
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        B, T = input_ids.shape
        if isinstance(state, Cache) and self.model.config.mixer != "none":
            state = _mixer_cache(state, self.model.config.mixer)
        if isinstance(state, Cache):  # a standard cache of rotated raw k and raw v, shifted on read
            if attention_mask is not None and attention_mask.dim() != 2:
                raise ValueError(f"attention_mask must be 2-D (batch, length), got shape {tuple(attention_mask.shape)}")
            cfg = self.config
            kw = dict(head_dim=cfg.dim // cfg.n_heads, rope_base=cfg.rope_base, device=input_ids.device)
            if static_length(state):  # static shapes, no host read: what a compiled decode step traces
                view = StaticCacheView(state, B, T, attention_mask, **kw)
                return self._output(self.model(input_ids, cache=view, logits_to_keep=logits_to_keep), labels, state,
                                    return_dict)
            view = TransformersCacheView(state, B, T, attention_mask, **kw)
            new = None if attention_mask is None else attention_mask[:, -T:]
            logits = self.model(input_ids, cache=view, attention_mask=None if new is None or bool(new.bool().all())
                                else view.valid, logits_to_keep=logits_to_keep)
            return self._output(logits, labels, state, return_dict)

        mask = attention_mask
        if mask is not None:
            if mask.dim() != 2:
                raise ValueError(f"attention_mask must be 2-D (batch, length), got shape {tuple(mask.shape)}")
            if bool(mask[:, -T:].bool().all()):
                mask = None  # only new real tokens: the cache remembers earlier pads
        if state is not None:
            p = self.model.output.weight
            kv = state.reserve(self.model, B, T, p.dtype, p.device)
            logits = self.model(input_ids, cache=kv, attention_mask=mask, logits_to_keep=logits_to_keep)
        else:
            pos = position_ids if (mask is None and position_ids is not None) else None
            if pos is not None and pos.dim() == 1:
                pos = pos.unsqueeze(0).expand(B, T)
            logits = self.model(input_ids, attention_mask=mask, position_ids=pos, logits_to_keep=logits_to_keep)

        return self._output(logits, labels, state, return_dict)

    def _output(self, logits, labels, state, return_dict):
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device),
                                   ignore_index=-100)
        return_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        if not return_dict:
            out = (logits,) + ((state,) if state is not None else ())
            return ((loss,) + out) if loss is not None else out
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_OUTPUT_CACHE_FIELD: state})


def _mixer_cache(state: Cache, mixer: str) -> KVShiftCache:
    """A model with a short-mixer option (dconv, canon, keyoffset, smear) keeps the mixer's last raw inputs
    beside the keys and values, which a standard transformers cache has no room for: an empty DynamicCache
    (what generate makes) is swapped for our own cache, which generate then carries. It cannot be rolled
    back, so assisted generation and prompt lookup are refused (KVShiftCache.crop says why)."""
    if type(state) is DynamicCache and state.get_seq_length() == 0:
        return KVShiftCache()
    raise ValueError(f"a model with mixer={mixer!r} keeps the mixer's last raw inputs beside its keys and values: it "
                     f"runs on its own KVShiftCache (the default in generate), not on a {type(state).__name__} "
                     "(static caches, assisted generation and prompt lookup need a model without a mixer)")


def load_lm_state(lm: LM, state: dict[str, torch.Tensor]) -> None:
    """Load a kvshift.LM state dict (training checkpoints may be saved from a compiled or wrapped
    module, or with a tied output head omitted); ValueError listing missing/unexpected keys."""
    sd = {}
    for k, v in state.items():
        for prefix in ("_orig_mod.", "module."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        sd[k] = v
    if lm.config.tie_embeddings:
        sd.setdefault("output.weight", sd.get("tok_embeddings.weight"))
    want = set(lm.state_dict())
    missing, unexpected = sorted(want - set(sd)), sorted(set(sd) - want)
    if missing or unexpected:
        raise ValueError(f"weights do not match the model config: missing {missing}, unexpected {unexpected}")
    lm.load_state_dict(sd)
