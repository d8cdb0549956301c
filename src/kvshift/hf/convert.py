"""Into the transformers format: training checkpoints (`kvshift export`) and Llama models
(`kvshift convert-llama`: a saved LlamaForCausalLM directory or a Llama GGUF file, see kvshift.hf.gguf).

Training checkpoints (kvshift.train.checkpoint):
    <run>/config.json                      resolved run config, with "model_config" (ModelConfig.to_dict())
    <run>/checkpoints/step_XXXXXXXX/       model.safetensors, state.pt, MANIFEST.json
A run directory exports its newest verifying checkpoint; a checkpoint directory exports itself
(verified when it has a manifest). kvshift.hf.model_dir reads them (`load_training_checkpoint`).

A Llama model becomes a KV-shift model with the identity shift (alpha1 = beta1 = 1, the other
taps 0), so its logits are unchanged and fine-tuning can move the shift from there. Llama's
q/k weights already follow the rotate_half RoPE convention that kvshift.ops.rope uses.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from kvshift.data.checks import check_tokenizer_made_shards
from kvshift.data.tokenizer import EOS
from kvshift.layers.attention import IDENTITY_KINDS, identity_coefficients
from kvshift.models.config import ModelConfig
from kvshift.train.checkpoint import MANIFEST
from kvshift.utils.paths import inside
from kvshift.utils.staging import check_output_dir, staged

from .configuration import KVShiftConfig
from .gguf import is_gguf_file, load_gguf_llama
from .model_dir import load_training_checkpoint
from .modeling import KVShiftForCausalLM, load_lm_state

__all__ = ["export_checkpoint", "convert_llama", "load_tokenizer_for_export", "llama_model_config"]

# ---- training checkpoints -----------------------------------------------------------------------
def load_tokenizer_for_export(path: str | Path):
    """A transformers tokenizer from a tokenizers `tokenizer.json` (kvshift.data.tokenizer's format:
    <|endoftext|> is EOS, BOS and pad, and encoding prepends it) or from a directory holding a saved
    transformers tokenizer (used as saved)."""
    p = Path(path)
    if p.is_dir() and (p / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(p))
    if p.is_dir() and (p / "tokenizer.json").is_file():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise ValueError(f"tokenizer {path}: no tokenizer.json or saved transformers tokenizer there")
    try:
        tok = PreTrainedTokenizerFast(tokenizer_file=str(p), model_input_names=["input_ids", "attention_mask"])
    except Exception as e:  # tokenizers raises its own Exception type on a malformed file
        raise ValueError(f"{p}: not a tokenizers tokenizer.json ({e})") from None
    if EOS in tok.get_vocab():
        # <|endoftext|> is EOS, pad and BOS, and encoding prepends it as the shards put it before every
        # training document: pipelines and lm-eval then feed the model what it was trained on
        # (add_special_tokens=False still gives the bare text)
        tok = PreTrainedTokenizerFast(tokenizer_file=str(p), model_input_names=["input_ids", "attention_mask"],
                                      bos_token=EOS, eos_token=EOS, pad_token=EOS, add_bos_token=True)
        if tok("a").input_ids[:1] != [tok.bos_token_id]:
            raise ValueError(f"{p}: this transformers version does not honour add_bos_token for "
                             f"PreTrainedTokenizerFast; use transformers >= 5")
    return tok


def _special_ids(tok) -> dict:
    return {k: getattr(tok, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
            if getattr(tok, k, None) is not None}


def export_checkpoint(src: str | Path, dst: str | Path, *, tokenizer: str | Path | None = None,
                      dtype: torch.dtype | None = None) -> Path:
    """Write a training run/checkpoint as a KVShiftForCausalLM directory (safetensors), with the
    tokenizer when one is given or found next to the checkpoint."""
    mc, state, info = load_training_checkpoint(src)
    check_output_dir(dst, src, info["checkpoint"], protect=MANIFEST)
    tok_path = tokenizer or info["tokenizer"]
    check_tokenizer_made_shards(tok_path, info["shard_meta"])
    tok = load_tokenizer_for_export(tok_path) if tok_path else None
    ids = _special_ids(tok) if tok is not None else {}
    if tok is not None and len(tok) > mc.vocab_size:
        raise ValueError(f"tokenizer {tok_path} has {len(tok)} tokens but the model's vocab_size is {mc.vocab_size}")
    model = KVShiftForCausalLM(KVShiftConfig.from_model_config(mc, **ids))
    load_lm_state(model.model, state)
    if dtype is not None:
        model = model.to(dtype)
    _set_generation_ids(model, ids)
    dst = Path(dst)
    with staged(dst, marker="config.json", clear=_HF_FILES) as stage:  # a previous export stays until this one is whole
        model.save_pretrained(str(stage))
        if tok is not None:
            tok.save_pretrained(str(stage))
        (stage / "kvshift_export.json").write_text(json.dumps({
            "source": info["checkpoint"], "step": info["step"], "tokenizer": str(tok_path) if tok_path else None,
            "model_config": mc.to_dict()}, indent=1) + "\n")
    return dst


# what an export or conversion writes; replaced as a whole, so no file of an older export is left over
_HF_FILES = ("config.json", "generation_config.json", "model.safetensors", "model-*.safetensors",
             "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
             "kvshift_export.json")


def _set_generation_ids(model, ids: dict) -> None:
    gc = getattr(model, "generation_config", None)
    if gc is None:
        return
    for k, v in ids.items():
        setattr(gc, k, v)


# ---- Llama --------------------------------------------------------------------------------------
def llama_model_config(cfg: dict, *, attention: str = "kvshift") -> ModelConfig:
    """ModelConfig of a LlamaForCausalLM config.json dict; ValueError for what kvshift.LM cannot
    reproduce exactly."""
    if cfg.get("model_type") != "llama":
        raise ValueError(f"convert-llama takes a Llama checkpoint (model_type 'llama'), got {cfg.get('model_type')!r}")
    if attention not in IDENTITY_KINDS:
        raise ValueError(f"attention must be one of {IDENTITY_KINDS} (kinds with an exact identity shift), "
                         f"got {attention!r}")
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    problems = []
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={cfg['hidden_act']!r} (only 'silu')")
    if cfg.get("attention_bias"):
        problems.append("attention_bias=true")
    if cfg.get("mlp_bias"):
        problems.append("mlp_bias=true")
    if cfg.get("head_dim") not in (None, hidden // heads) or hidden % heads:
        problems.append(f"head_dim={cfg.get('head_dim')} != hidden_size/num_attention_heads = {hidden}/{heads}")
    if cfg.get("rope_scaling"):
        problems.append(f"rope_scaling={cfg['rope_scaling']!r}")
    rope = cfg.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in (None, "default"):
        problems.append(f"rope_parameters with rope_type={rope_type!r}")
    extra = sorted(set(rope) - {"rope_type", "type", "rope_theta", "partial_rotary_factor"})
    if extra:
        problems.append(f"rope_parameters keys {extra}")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        problems.append(f"partial_rotary_factor={rope['partial_rotary_factor']}")
    if problems:
        raise ValueError("unsupported Llama features: " + "; ".join(problems))
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    return ModelConfig(vocab_size=cfg["vocab_size"], dim=hidden, n_layers=cfg["num_hidden_layers"], n_heads=heads,
                       n_kv_heads=cfg.get("num_key_value_heads") or heads, ffn_dim=cfg["intermediate_size"],
                       max_seq_len=cfg.get("max_position_embeddings", 2048), position="rope", rope_base=float(theta),
                       norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                       tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), attention=attention,
                       shift_window=1, name="llama-converted")


def _load_hf_weights(src: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file  # optional dependency (the hf extra)

    if (src / "model.safetensors").is_file():
        return load_file(src / "model.safetensors")
    index = src / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{index}: not a safetensors index (a weight_map table of file names)") from None
        out = {}
        for f in files:  # names from the file: they must stay inside src
            out.update(load_file(inside(src, f, f"{index}: weight_map")))
        return out
    if (src / "pytorch_model.bin").is_file():
        return torch.load(src / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise ValueError(f"{src}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


_LLAMA_LAYER = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def _map_llama_weights(w: dict[str, torch.Tensor], mc: ModelConfig) -> dict[str, torch.Tensor]:
    out, used = {}, set()

    def take(src, dst):
        if src not in w:
            raise ValueError(f"Llama checkpoint lacks {src}")
        out[dst] = w[src]
        used.add(src)

    take("model.embed_tokens.weight", "tok_embeddings.weight")
    take("model.norm.weight", "norm.weight")
    if "lm_head.weight" in w:
        take("lm_head.weight", "output.weight")
    elif mc.tie_embeddings:
        out["output.weight"] = out["tok_embeddings.weight"]
    else:
        raise ValueError("Llama checkpoint lacks lm_head.weight and does not tie word embeddings")
    for i in range(mc.n_layers):
        for s, d in _LLAMA_LAYER.items():
            take(f"model.layers.{i}.{s}", f"layers.{i}.{d}")
    unexpected = sorted(k for k in set(w) - used if not k.endswith("rotary_emb.inv_freq"))
    if unexpected:
        raise ValueError(f"Llama checkpoint has weights this converter does not map: {unexpected[:8]}")
    return out


def convert_llama(src: str | Path, dst: str | Path, *, attention: str = "kvshift",
                  dtype: torch.dtype | None = None) -> Path:
    """LlamaForCausalLM directory, or a Llama GGUF file (weights dequantized to float32, tokenizer
    from the file: kvshift.hf.gguf), -> KVShiftForCausalLM directory with the identity shift."""
    src, dst = Path(src), Path(dst)
    if src.is_file():
        if not is_gguf_file(src):
            raise ValueError(f"{src}: not a GGUF file (it does not start with the bytes 'GGUF'); convert-llama "
                             f"takes a saved LlamaForCausalLM directory or a Llama .gguf file")
        check_output_dir(dst, src)
        llama, tok = load_gguf_llama(src)
        cfg = llama.config.to_dict()
        try:
            mc = llama_model_config(cfg, attention=attention)
        except (KeyError, AttributeError, TypeError) as e:
            raise ValueError(f"{src}: not a Llama config ({type(e).__name__}: {e})") from None
        weights = {k: v.detach() for k, v in llama.state_dict().items()}
        del llama
        return _write_converted(mc, cfg, weights, dst, dtype, tok.save_pretrained)
    if not (src / "config.json").is_file():
        raise ValueError(f"{src}: no config.json (expected a saved LlamaForCausalLM directory or a Llama .gguf file)")
    check_output_dir(dst, src)
    cfg = json.loads((src / "config.json").read_text())
    try:
        mc = llama_model_config(cfg, attention=attention)
    except (KeyError, AttributeError, TypeError) as e:
        raise ValueError(f"{src / 'config.json'}: not a Llama config ({type(e).__name__}: {e})") from None

    def copy_tokenizer(stage: str) -> None:
        for name in _TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, Path(stage) / name)

    return _write_converted(mc, cfg, _load_hf_weights(src), dst, dtype, copy_tokenizer)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def _write_converted(mc: ModelConfig, cfg: dict, llama_weights: dict[str, torch.Tensor], dst: Path,
                     dtype: torch.dtype | None, write_tokenizer) -> Path:
    """Map Llama weights onto a KVShiftForCausalLM with the identity shift and save it (with the
    tokenizer, which write_tokenizer(directory) writes) into `dst` as a whole."""
    weights = _map_llama_weights(llama_weights, mc)
    ids = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.get(k) is not None}
    model = KVShiftForCausalLM(KVShiftConfig.from_model_config(mc, **ids))
    sd = model.model.state_dict()
    with torch.no_grad():
        for layer in model.model.layers:
            for name in ("shift_k", "shift_v"):
                p = getattr(layer.attention, name, None)
                if p is not None:
                    p.copy_(identity_coefficients(mc.n_kv_heads, mc.shift_window))
    for k, v in model.model.state_dict().items():
        if "shift_" in k:
            weights[k] = v
    load_lm_state(model.model, {k: v.to(sd[k].dtype) for k, v in weights.items()})
    src_dtype = weights["tok_embeddings.weight"].dtype
    model = model.to(dtype or src_dtype)
    _set_generation_ids(model, ids)
    with staged(dst, marker="config.json", clear=_HF_FILES) as stage:
        model.save_pretrained(str(stage))
        write_tokenizer(str(stage))
    return dst
