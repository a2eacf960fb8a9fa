"""Small word-level tokenizers in the Hugging Face formats the pipelines load (CLIPTokenizer, T5TokenizerFast).

Used where no real tokenizer exists: tests build tiny models with them, the demo models are trained
with them, and random-weight benchmarks use them (every prompt is padded to the model's fixed
length, so a smaller vocabulary costs exactly the same compute).
"""
from __future__ import annotations

import string
from typing import Iterable

from transformers import CLIPTokenizer, T5TokenizerFast

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
BASIC_WORDS = ("a an the of on in at and with photo picture painting portrait landscape of cat dog person "
               "red green blue yellow black white small large big tiny top bottom left right center background "
               "circle square triangle star city night day sky sea mountain forest light dark").split()


def _normalise(words: Iterable[str]) -> list[str]:
    return sorted({w.lower() for w in words if w.strip()})


def build_clip_tokenizer(words: Iterable[str], max_length: int = 77) -> CLIPTokenizer:
    """Byte-pair tokenizer whose merges spell every given word as one token; other text falls back to letters."""
    words = _normalise(words)
    vocab: dict[str, int] = {CLIP_BOS: 0, CLIP_EOS: 1}
    alphabet = sorted(set("".join(words)) | set(string.ascii_lowercase + string.digits + string.punctuation))
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            merged = left + right
            if merged not in vocab:
                vocab[merged] = len(vocab)
                merges.append((left, right))
            left = merged
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def build_t5_tokenizer(words: Iterable[str], max_length: int = 512) -> T5TokenizerFast:
    """Unigram tokenizer with one piece per word and single letters as the fallback."""
    words = _normalise(words)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -1.0) for w in words]
    pieces += [(c, -8.0) for c in string.ascii_lowercase + string.digits + string.punctuation]
    pieces += [("\u2581" + c, -9.0) for c in string.ascii_lowercase + string.digits]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=max_length)
