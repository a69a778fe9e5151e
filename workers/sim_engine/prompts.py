"""Prompts as a vLLM engine sees them, without transformers: text through the model's own
``tokenizer.json`` (the Rust ``tokenizers`` library, special tokens added as the fast
tokenizer adds them), chat through the chat template of its ``tokenizer_config.json``
rendered as transformers renders it (a sandboxed Jinja environment that trims blocks),
then tokenized without special tokens; and tokens back to text."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer


class PromptError(ValueError):
    """A prompt the engine cannot take (400)."""


def _raise(message: str) -> None:
    raise TemplateError(message)


class Prompts:
    def __init__(self, model_path: Path) -> None:
        self._tokenizer = Tokenizer.from_file(str(model_path / "tokenizer.json"))
        config_file = model_path / "tokenizer_config.json"
        config: dict[str, Any] = json.loads(config_file.read_text()) if config_file.is_file() else {}
        model_config = json.loads((model_path / "config.json").read_text())
        self.vocab_size = int(model_config.get("vocab_size") or self._tokenizer.get_vocab_size())
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        chat_file = model_path / "chat_template.jinja"
        if template is None and chat_file.is_file():
            template = chat_file.read_text()
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        environment.globals["raise_exception"] = _raise
        self._template = environment.from_string(template) if isinstance(template, str) else None
        self._special_tokens = {name: value for name, value in config.items()
                                if name in ("bos_token", "eos_token", "pad_token", "unk_token") and isinstance(value, str)}  # fmt: skip
        added = config.get("added_tokens_decoder") or {}
        self._special_ids = frozenset(int(token_id) for token_id, token in added.items() if token.get("special"))
        self._texts: dict[int, str] = {}

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=True).ids)

    def chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        if self._template is None:
            raise PromptError("As of transformers v4.44, default chat template is no longer allowed, so you must provide "
                              "a chat template if the tokenizer does not define one.")  # fmt: skip
        try:
            text = self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self._special_tokens)  # fmt: skip
        except (TemplateError, TypeError, KeyError) as exc:
            raise PromptError(f"the chat template could not be applied to these messages: {exc}") from None
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def check_ids(self, token_ids: list[int]) -> None:
        for token in token_ids:
            if not 0 <= token < self.vocab_size:
                raise PromptError(f"Token id {token} is out of vocabulary")

    def text(self, token: int) -> str:
        text = self._texts.get(token)
        if text is None:
            text = self._texts[token] = self._tokenizer.decode([token], skip_special_tokens=True)
        return text

    def sample(self, rng: random.Random) -> int:
        """An output token: any id of the vocabulary but a special one (never EOS)."""
        while True:
            token = rng.randrange(self.vocab_size)
            if token not in self._special_ids:
                return token
