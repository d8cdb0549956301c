"""Small helpers for tests and demos of the transformers integration."""

from __future__ import annotations

DEFAULT_TEXTS = ["the quick brown fox jumps over the lazy dog. " * 3,
                 "KV shifting attention mixes each key with the one before it.",
                 "Question: which answer is right?\nAnswer: yes",
                 "A tiny byte-level BPE for tests: hello world, hello tokens, 0123456789!"] * 4


def tiny_tokenizer(vocab_size: int = 300, texts: list[str] | None = None):
    """Byte-level BPE (any text encodes) as a transformers fast tokenizer; id 0 = <|endoftext|> = BOS/EOS/pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts or DEFAULT_TEXTS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", model_input_names=["input_ids", "attention_mask"])
