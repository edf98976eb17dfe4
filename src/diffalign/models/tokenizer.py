"""Word-level tokenizer over the Shapes world's vocabulary.

Every prompt starts with a <bos> token, so even the empty (unconditional) prompt has one token the
text encoder can attend to; the rest is padded with <pad> to `max_length`. A word outside the
vocabulary is an error that names it and lists the vocabulary: a tiny model cannot say anything
useful about words it has never seen, and silently dropping them would hide a typo.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from diffalign.world.palette import COLORS, NUMBER_WORDS, PLURALS, SHAPES

PAD, BOS = "<pad>", "<bos>"


def world_vocabulary() -> list[str]:
    """The words of the Shapes-world grammar, after the two special tokens."""
    words = ["a", "an", "and", *SHAPES, *PLURALS.values(), *NUMBER_WORDS.values(), *COLORS]
    words += ["left", "right", "of", "above", "below"]
    return [PAD, BOS, *dict.fromkeys(words)]


def _separates(ch: str) -> bool:
    """Whether `ch` separates words: white space, punctuation of any script, or an ASCII non-alphanumeric."""
    return ch.isspace() or unicodedata.category(ch).startswith("P") or (ch.isascii() and not ch.isalnum())


class UnknownWordError(ValueError):
    """A prompt uses a word the tokenizer does not know."""


class ShapesTokenizer:
    """Maps prompts to token ids [B, max_length] and a padding mask (True = a real token)."""

    def __init__(self, vocabulary: Sequence[str] | None = None, max_length: int = 12) -> None:
        self.vocabulary = list(vocabulary) if vocabulary is not None else world_vocabulary()
        if self.vocabulary[:2] != [PAD, BOS]:
            raise ValueError(f"the vocabulary must start with {PAD!r}, {BOS!r}")
        self.index = {word: i for i, word in enumerate(self.vocabulary)}
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.vocabulary)

    @staticmethod
    def words(prompt: str) -> list[str]:
        """The prompt's words, lower-cased, split at spaces, punctuation (of any script) and ASCII symbols.
        Anything else is part of a word, so a non-ASCII letter or symbol ("é", an emoji) makes an unknown
        word instead of being silently dropped."""
        return "".join(" " if _separates(ch) else ch for ch in prompt.lower()).split()

    def encode(self, prompt: str) -> list[int]:
        ids = [self.index[BOS]]
        for word in self.words(prompt):
            if word not in self.index:
                known = ", ".join(self.vocabulary[2:])
                raise UnknownWordError(
                    f"unknown word {word!r} in prompt {prompt!r}; the vocabulary is: {known}"
                )
            ids.append(self.index[word])
        if len(ids) > self.max_length:
            raise ValueError(f"prompt {prompt!r} has {len(ids) - 1} words; at most {self.max_length - 1} fit")
        return ids

    def __call__(
        self, prompts: Sequence[str], device: torch.device | str | None = None
    ) -> tuple[Tensor, Tensor]:
        """Token ids [B, L] (long) and mask [B, L] (bool, True for <bos> and words)."""
        ids = torch.zeros((len(prompts), self.max_length), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            row = self.encode(prompt)
            ids[i, : len(row)] = torch.tensor(row)
        mask = ids != self.index[PAD]
        return ids.to(device), mask.to(device)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(
            json.dumps({"vocabulary": self.vocabulary, "max_length": self.max_length}, indent=1)
        )

    @classmethod
    def load(cls, path: str | Path) -> ShapesTokenizer:
        data = json.loads(Path(path).read_text())
        return cls(data["vocabulary"], data["max_length"])


def first_unreadable(model, prompts: Sequence[str]) -> tuple[int, str, ValueError] | None:
    """(index, prompt, the tokenizer's error) of the first of `prompts` that `model`'s tokenizer cannot
    read, or None. Only a tiny model's `ShapesTokenizer` refuses text (an unknown word, too many words);
    a diffusers pipeline's tokenizers read any prompt (truncating long ones), so nothing is checked for
    it. Each distinct prompt is tokenised once; no network runs."""
    tokenizer = getattr(model, "tokenizer", None)
    if not isinstance(tokenizer, ShapesTokenizer):
        return None
    seen: set[str] = set()
    for index, prompt in enumerate(prompts):
        if prompt in seen:
            continue
        seen.add(prompt)
        try:
            tokenizer.encode(prompt)
        except ValueError as err:
            return index, prompt, err
    return None
