"""Which tokens spell the beginning of which: the ULD prefix guard's table.

When the combination pushes down a remembered token (" Row" of "J.K. Rowling"), the target's next choice is often a
token that starts the same word: "R" (SmolLM2 then wrote "J.K.R.D.J.M.A." for a paraphrased question about the
author: a leak by the author's initials) or " Ro" + "wl" + "ing", spelling the fact in smaller pieces. The prefix
guard (uld_combine.py `close_over_prefixes`) gives every candidate whose text begins the text of a penalised
candidate that candidate's penalty too.

"Begins": the token's text without leading whitespace, case-folded, is a non-empty prefix of (or equal to) the other
token's, and both start with a letter or digit (so "." never inherits from "..."). Computed once per tokenizer from
its decoded vocabulary: SmolLM2's 49,152 tokens take about a second.

Word pieces (the `finish_words` option, uld_combine.py `finish_words`): per token, whether its text *starts* inside a
word (its first character is a letter or digit: no leading space or punctuation, so it continues a word when it follows
a letter) and whether it *ends* inside one (its last character is a letter or digit). Read from each token's surface
text, the leading space included (sentencepiece tokenizers drop it when a token is decoded alone, so the text is the
token decoded after a letter, minus that letter).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def normalized_text(text: str) -> str:
    """The text a prefix is matched on: leading whitespace dropped, case-folded; "" when it does not start with a
    letter or digit (punctuation, byte fragments, special tokens)."""
    norm = text.lstrip().casefold()
    return norm if norm[:1].isalnum() else ""


_ANCHOR = "a"


def surface_texts(tokenizer: Any, token_ids: range | list[int]) -> list[str]:
    """Each token's text as it reads inside a text, its leading space kept: decoded after a letter token, that
    letter's text removed (a sentencepiece tokenizer decodes "▁Hugo" alone as "Hugo"). A tokenizer without a
    single-letter token: each token decoded alone."""
    anchor = tokenizer.convert_tokens_to_ids(_ANCHOR)
    if not isinstance(anchor, int) or anchor == getattr(tokenizer, "unk_token_id", None):
        return [tokenizer.decode([i]) for i in token_ids]
    head = tokenizer.decode([anchor])
    texts = []
    for i in token_ids:
        both = tokenizer.decode([anchor, i])
        texts.append(both[len(head) :] if both.startswith(head) else tokenizer.decode([i]))
    return texts


def surface_text(tokenizer: Any, token_id: int) -> str:
    """One token's `surface_texts`."""
    return surface_texts(tokenizer, [token_id])[0]


@dataclass(frozen=True)
class TokenPrefixes:
    """`pair_keys`: sorted int64 keys `prefix_id * vocab_size + token_id`, one per pair where the first token's text
    begins the second's (different ids); `table`: [vocab_size, L] each token's prefix tokens, padded with
    `vocab_size` (a column that is dropped). `starts_in_word` / `ends_in_word`: [vocab_size] bool, the token's surface
    text begins / ends with a letter or digit (module docstring); all False where the texts were not given."""

    vocab_size: int
    pair_keys: torch.Tensor
    table: torch.Tensor
    starts_in_word: torch.Tensor | None = None
    ends_in_word: torch.Tensor | None = None

    @classmethod
    def from_texts(cls, texts: list[str], vocab_size: int | None = None) -> TokenPrefixes:
        """From each token id's decoded text (`texts[i]` for id i; ids beyond it, e.g. a padded embedding, have
        none)."""
        size = len(texts) if vocab_size is None else int(vocab_size)
        norms = [normalized_text(t) for t in texts[:size]]
        by_text: dict[str, list[int]] = {}
        for token, norm in enumerate(norms):
            if norm:
                by_text.setdefault(norm, []).append(token)
        prefixes_of: list[list[int]] = [[] for _ in range(size)]
        for token, norm in enumerate(norms):
            for end in range(1, len(norm) + 1):
                for prefix in by_text.get(norm[:end], ()):
                    if prefix != token:
                        prefixes_of[token].append(prefix)
        width = max((len(p) for p in prefixes_of), default=0)
        table = torch.full((size, max(width, 1)), size, dtype=torch.long)
        keys: list[int] = []
        for token, prefixes in enumerate(prefixes_of):
            if prefixes:
                table[token, : len(prefixes)] = torch.tensor(prefixes, dtype=torch.long)
                keys.extend(p * size + token for p in prefixes)
        pair_keys = torch.tensor(sorted(keys), dtype=torch.long) if keys else torch.full((1,), -1, dtype=torch.long)
        surface = list(texts[:size]) + [""] * (size - len(texts[:size]))
        starts = torch.tensor([t[:1].isalnum() for t in surface], dtype=torch.bool)
        ends = torch.tensor([t[-1:].isalnum() for t in surface], dtype=torch.bool)
        return cls(size, pair_keys, table, starts, ends)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, vocab_size: int) -> TokenPrefixes:
        """From a Hugging Face tokenizer; `vocab_size` is the model's (LM head rows), which may exceed the
        tokenizer's. Special tokens never take part."""
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        n = min(len(tokenizer), int(vocab_size))
        texts = ["" if i in special else t for i, t in zip(range(n), surface_texts(tokenizer, range(n)), strict=True)]
        return cls.from_texts(texts + [""] * (int(vocab_size) - n), vocab_size)

    def to(self, device: torch.device | str) -> TokenPrefixes:
        def move(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.to(device)

        return TokenPrefixes(
            self.vocab_size,
            self.pair_keys.to(device),
            self.table.to(device),
            move(self.starts_in_word),
            move(self.ends_in_word),
        )

    def pairs(self) -> int:
        return int((self.pair_keys >= 0).sum())
