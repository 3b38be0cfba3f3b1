"""Offline word-level tokenizers for the bundled and test models (no hub access needed)."""
from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
IMAGE_TOKEN = "<image>"


def word_tokenizer(words: list[str], extra_special: tuple[str, ...] = (IMAGE_TOKEN,)) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer; `extra_special` tokens split out even without spaces
    (the processors expand one `<image>` into many adjacent copies)."""
    vocab: dict[str, int] = {}
    for w in [*SPECIALS, *extra_special, *words]:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>",
                                  bos_token="<s>", eos_token="</s>", padding_side="left")
    tok.add_special_tokens({"additional_special_tokens": list(extra_special)})
    return tok
