"""Benchmark prompts written as the JSONL ``vllm bench serve --dataset-name custom`` reads.

Seed 000's workload is grouped prefixes: ``groups`` groups of ``per_group`` prompts; the
prompts of a group share a ``prefix_tokens``-token head and each has its own
``suffix_tokens``-token tail. Token counts are in the served model's tokenizer: the
text is made of random whole-word tokens of that tokenizer, so it encodes back exactly.
The same seed gives the same prompts, in the same (shuffled) order.

Seed 002's workload is random prompts (``random_prompts``): independent prompts of an
exact token count each, made of the same whole-word tokens.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str: ...

    @property
    def all_special_ids(self) -> list[int]: ...

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class GroupedPrefixWorkload:
    groups: int
    per_group: int
    prefix_tokens: int
    suffix_tokens: int
    output_tokens: int
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("groups", "per_group", "prefix_tokens", "suffix_tokens", "output_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    @property
    def num_prompts(self) -> int:
        return self.groups * self.per_group


def word_tokens(tokenizer: Tokenizer) -> list[str]:
    """The tokenizer's whole-word tokens (" word"): text joined from them encodes back to
    exactly one token per word, so prompts have exact token counts and a group's prompts
    share exactly their prefix's tokens."""
    words = []
    for token in range(len(tokenizer)):
        text = tokenizer.decode([token])
        if len(text) > 1 and text[0] == " " and text[1:].isascii() and text[1:].isalpha():
            if tokenizer.encode(text, add_special_tokens=False) == [token]:
                words.append(text)
    if len(words) < 100:
        raise ValueError(f"the tokenizer has only {len(words)} whole-word tokens; random prompts need at least 100")
    return words


def random_text(words: list[str], tokens: int, rng: random.Random) -> str:
    return "".join(rng.choice(words) for _ in range(tokens))


def token_count(tokenizer: Tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def grouped_prefix_prompts(tokenizer: Tokenizer, workload: GroupedPrefixWorkload) -> list[tuple[int, str]]:
    """(group, prompt) pairs in a shuffled order fixed by the workload's seed."""
    rng = random.Random(workload.seed)
    words = word_tokens(tokenizer)
    prompts: list[tuple[int, str]] = []
    for group in range(workload.groups):
        prefix = random_text(words, workload.prefix_tokens, rng)
        for _ in range(workload.per_group):
            prompts.append((group, prefix + random_text(words, workload.suffix_tokens, rng)))
    rng.shuffle(prompts)
    return prompts


def random_prompts(tokenizer: Tokenizer, count: int, tokens: int, seed: int) -> list[str]:
    """``count`` prompts of exactly ``tokens`` random whole-word tokens each (seed 002's
    random-prompt workload); the same seed gives the same prompts, another seed others."""
    for name, value in (("count", count), ("tokens", tokens)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    rng = random.Random(seed)
    words = word_tokens(tokenizer)
    return [random_text(words, tokens, rng) for _ in range(count)]


def write_custom_jsonl(path: Path, prompts: list[str], output_tokens: int) -> Path:
    """One ``{"prompt", "output_tokens"}`` object per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        for prompt in prompts:
            out.write(json.dumps({"prompt": prompt, "output_tokens": output_tokens}) + "\n")
    return path
