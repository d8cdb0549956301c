"""Small helpers for tests and demos of the transformers integration."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

from kvshift.models import LM, ModelConfig

from .convert import load_tokenizer_for_export
from .modeling import KVShiftForCausalLM

DEFAULT_TEXTS = ["the quick brown fox jumps over the lazy dog. " * 3,
                 "KV shifting attention mixes each key with the one before it.",
                 "Question: which answer is right?\nAnswer: yes",
                 "A tiny byte-level BPE for tests: hello world, hello tokens, 0123456789!"] * 4


def tiny_tokenizer(vocab_size: int = 300, texts: list[str] | None = None):
    """Byte-level BPE (any text encodes) as a transformers fast tokenizer; id 0 = <|endoftext|> = BOS/EOS/pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # optional (the hf extra)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts or DEFAULT_TEXTS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", model_input_names=["input_ids", "attention_mask"])


def tiny_lm(vocab_size: int, seed: int = 0, **kw):
    """A 2-layer, 32-wide kvshift.LM (GQA 4/2 heads) with its matrices scaled up 5x from the init, so its
    predictions are sharp rather than near-uniform (evaluation and analysis tests)."""
    cfg = ModelConfig(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                      max_seq_len=1024, **kw)
    lm = LM(cfg, seed=seed).eval()
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if p.dim() == 2 and "shift_" not in name:
                p.mul_(5.0)
    return lm


def export_tiny(directory, seed: int = 0, **kw):
    """Saves tiny_lm (with tiny_tokenizer, BOS prepended as `kvshift export` does) as KVShiftForCausalLM in
    `directory`; returns (kvshift.LM, tokenizer)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tiny_tokenizer().backend_tokenizer.save(str(d / "tokenizer.json"))
    tok = load_tokenizer_for_export(d / "tokenizer.json")
    lm = tiny_lm(len(tok), seed, **kw)
    KVShiftForCausalLM.from_lm(lm).save_pretrained(d)
    tok.save_pretrained(d)
    return lm, tok
