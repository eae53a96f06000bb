"""Build a CLIP byte-level BPE tokenizer from a word list, with no download.

The files written are the ones a Stable Diffusion ``tokenizer/`` folder holds (``vocab.json``,
``merges.txt``, ``tokenizer_config.json``, ``special_tokens_map.json``) in CLIP's format:

  * the base vocabulary is the 256 byte symbols of GPT-2/CLIP's byte-to-unicode table, then the
    same 256 symbols with the end-of-word marker ``</w>`` appended;
  * merges, learnt here by plain BPE on the given words until every word is a single symbol, so each
    word of the list is ONE token and any other word falls back to smaller pieces (down to bytes);
  * ``<|startoftext|>`` and ``<|endoftext|>`` last (the latter is also the unknown and padding token).

Words are split exactly as CLIP's pre-tokenizer splits text (lower case; runs of letters, single
digits, runs of other symbols), so ``"t-shirt"`` contributes the pieces ``t``, ``-`` and ``shirt``.
"""

from __future__ import annotations

import heapq
import json
import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
MODEL_MAX_LENGTH = 77

# CLIP's pre-tokenizer pattern: special tokens, English contractions, letter runs, single digits,
# runs of anything that is neither a letter, a digit nor a space.
_PIECE_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

DEFAULT_WORDS: tuple[str, ...] = (
    # articles, glue words, punctuation
    "a", "an", "the", "of", "on", "in", "with", "and", "made", "sitting", "top", ",", ".",
    # views (DreamFusion's view-dependent suffixes)
    "front", "side", "back", "overhead", "view",
    # colours
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray",
    "grey", "gold", "golden", "silver",
    # materials and looks
    "wooden", "wood", "metal", "metallic", "glass", "plastic", "stone", "shiny", "matte", "small",
    "large", "big", "tiny", "round", "tall",
    # shapes
    "cube", "sphere", "ball", "box", "cone", "cylinder", "pyramid", "torus", "ring", "block",
    # objects and animals
    "chair", "table", "lamp", "vase", "cup", "mug", "teapot", "bottle", "car", "house", "tree",
    "flower", "apple", "banana", "hamburger", "donut", "cake", "dog", "cat", "bird", "fish",
    "rabbit", "robot", "hat", "shoe", "book", "clock", "plant", "rock", "bowl",
)


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes stand for themselves; the rest (control characters, space, ...) are
    shifted to the code points 256, 257, ... in byte order, so no symbol is whitespace or control.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table: dict[int, str] = {}
    shifted = 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


def split_pieces(text: str) -> list[str]:
    """Split ``text`` the way CLIP's pre-tokenizer does (after lower-casing and collapsing spaces)."""
    import regex  # a transformers dependency; the stdlib `re` has no \\p{L}

    text = " ".join(text.lower().split())
    return regex.findall(_PIECE_PATTERN, text)


def _symbols(piece: str, byte_map: dict[int, str]) -> tuple[str, ...]:
    chars = [byte_map[b] for b in piece.encode("utf-8")]
    chars[-1] += END_OF_WORD
    return tuple(chars)


def _merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """Replace every non-overlapping occurrence of ``pair`` (scanning left to right) by its join."""
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def learn_merges(pieces: Iterable[str]) -> list[tuple[str, str]]:
    """Byte-level BPE merges, in rank order, that turn every piece into a single symbol.

    Each round merges the adjacent pair that occurs most often over the distinct pieces (ties go to
    the smallest pair in string order, so the result is deterministic). Pair counts are updated
    incrementally, so a vocabulary of thousands of words takes seconds.
    """
    byte_map = bytes_to_unicode()
    words = [_symbols(p, byte_map) for p in sorted(set(pieces)) if p]
    counts: Counter[tuple[str, str]] = Counter()
    where: dict[tuple[str, str], set[int]] = {}
    for i, w in enumerate(words):
        for pair in zip(w, w[1:]):
            counts[pair] += 1
            where.setdefault(pair, set()).add(i)
    heap = [(-n, pair) for pair, n in counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while heap:
        neg, best = heapq.heappop(heap)
        if counts.get(best, 0) != -neg or neg == 0:
            continue  # stale entry: the count changed since it was pushed
        merges.append(best)
        changed: set[tuple[str, str]] = set()
        for i in sorted(where.pop(best, ())):
            old = words[i]
            for pair in zip(old, old[1:]):
                counts[pair] -= 1
                changed.add(pair)
            new = _merge(old, best)
            words[i] = new
            for pair in zip(new, new[1:]):
                counts[pair] += 1
                where.setdefault(pair, set()).add(i)
                changed.add(pair)
        for pair in changed:
            if counts[pair] > 0:
                heapq.heappush(heap, (-counts[pair], pair))
            else:
                counts.pop(pair, None)
                where.pop(pair, None)
    return merges


def clip_vocab(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary layout: bytes, bytes + ``</w>``, merged symbols in rank order, then BOS, EOS."""
    base = list(bytes_to_unicode().values())
    tokens = base + [b + END_OF_WORD for b in base]
    seen = set(tokens)
    for left, right in merges:
        joined = left + right
        if joined not in seen:
            seen.add(joined)
            tokens.append(joined)
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {tok: i for i, tok in enumerate(tokens)}


def write_clip_tokenizer_files(out_dir: str | os.PathLike, words: Iterable[str] | None = None,
                               model_max_length: int = MODEL_MAX_LENGTH) -> Path:
    """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json into ``out_dir``."""
    pieces = sorted({p for w in (DEFAULT_WORDS if words is None else words) for p in split_pieces(w)})
    merges = learn_merges(pieces)
    return write_clip_tokenizer(out_dir, clip_vocab(merges), merges, model_max_length)


def write_clip_tokenizer(out_dir: str | os.PathLike, vocab: dict, merges: Sequence[tuple[str, str]],
                         model_max_length: int, pad_token: str = EOS_TOKEN) -> Path:
    """Write a CLIPTokenizer folder (vocab.json, merges.txt, tokenizer and special-token configs) into ``out_dir``."""
    from text3d.runtime.atomic import atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    atomic_write_text(out / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    specials = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": pad_token}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length, "do_lower_case": True,
              "add_prefix_space": False, "errors": "replace", **specials}
    atomic_write_text(out / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    atomic_write_text(out / "special_tokens_map.json", json.dumps(specials, indent=2) + "\n")
    return out


def build_clip_tokenizer(out_dir: str | os.PathLike, words: Iterable[str] | None = None,
                         model_max_length: int = MODEL_MAX_LENGTH):
    """Write a CLIP tokenizer for ``words`` (default :data:`DEFAULT_WORDS`) into ``out_dir`` and load it back.

    Raises ``ValueError`` if a word of the list does not come back as one token per piece (a bug in
    the merges, never expected).
    """
    from transformers import CLIPTokenizer

    words = list(DEFAULT_WORDS if words is None else words)
    write_clip_tokenizer_files(out_dir, words, model_max_length)
    tokenizer = CLIPTokenizer.from_pretrained(str(out_dir))
    for word in words:
        pieces = split_pieces(word)
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) != len(pieces):
            raise ValueError(f"tokenizer check failed: {word!r} -> {tokenizer.convert_ids_to_tokens(ids)}")
    return tokenizer
