"""A word-level CLIP tokenizer for the miniature, written from the captions' own vocabulary.

Stable Diffusion's tokenizer is CLIP's byte-pair encoder with 49,408 entries; the miniature needs one
that a test or a rule can write with no download. transformers' `CLIPTokenizer` reads any BPE
vocabulary, so this writes one in its format: every character (alone and word-final, `</w>`) so any
text made of those characters encodes, plus the merges that join each caption word into one token.
Nothing in transformers derives a vocabulary from a word list, hence this file.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokenizer pattern (transformers models/clip/tokenization_clip.py) restricted to ASCII:
# letter runs, single digits, runs of other symbols.
_WORDS = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]+")


def words(text: str) -> list[str]:
    """The pre-tokenized words of `text` as CLIP's tokenizer sees them (lower-cased, whitespace-split)."""
    return _WORDS.findall(" ".join(text.lower().split()))


def write_word_vocabulary(prompts: Iterable[str], out_dir: str | Path) -> Path:
    """Write vocab.json and merges.txt covering every word of `prompts`; return the directory."""
    vocab_words = sorted({w for p in prompts for w in words(p)})
    if not vocab_words:
        raise ValueError("no words in the prompts: a tokenizer needs at least one")
    chars = sorted({c for w in vocab_words for c in w})
    tokens = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    for word in vocab_words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        left = symbols[0]
        for right in symbols[1:]:
            pair = (left, right)
            if pair not in merges:
                merges.append(pair)
            left = left + right
            if left not in tokens:
                tokens.append(left)
    tokens += [BOS, EOS]  # end-of-text last: CLIP's text model pools at the highest token id
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return out


def build_word_tokenizer(prompts: Iterable[str], out_dir: str | Path, max_length: int):
    """A `CLIPTokenizer` over the words of `prompts`, padded with end-of-text like Stable Diffusion's."""
    from transformers import CLIPTokenizer

    out = write_word_vocabulary(prompts, out_dir)
    return CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=int(max_length),
                         pad_token=EOS, unk_token=EOS, bos_token=BOS, eos_token=EOS)
