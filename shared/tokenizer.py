"""Text <-> token ids with a model directory's `tokenizer.json`, its chat template, and streaming
detokenization. Text lives at the edge; workers speak token ids."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from baton.shared.models.model_config import ModelDirectoryError, read_json


class Tokenizer:
    """A fast (Rust) tokenizer plus the special tokens and chat template of tokenizer_config.json."""

    def __init__(
        self, backend: HFTokenizer, tokenizer_config: dict[str, Any], chat_template: str | None
    ) -> None:
        self._tok = backend
        self.bos_token = _token_text(tokenizer_config.get("bos_token"))
        self.eos_token = _token_text(tokenizer_config.get("eos_token"))
        self.chat_template = chat_template
        self._special_ids = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer | None:
        """The directory's tokenizer, or None when it has no tokenizer.json (token-id prompts only)."""
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            return None
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as exc:  # the Rust library raises plain Exception on malformed files
            raise ModelDirectoryError(f"{path} cannot be loaded: {exc}") from exc
        config_path = model_dir / "tokenizer_config.json"
        config = read_json(config_path) if config_path.is_file() else {}
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        jinja_file = model_dir / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        return cls(backend, config, template)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render a conversation to prompt text with the model's own template (as transformers does)."""
        if self.chat_template is None:
            raise ValueError("this model has no chat template (tokenizer_config.json has no 'chat_template')")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message:
                raise ValueError(f"message {i} must be a dict with a 'role' and 'content'")
        try:
            return _compile(self.chat_template).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except jinja2.TemplateError as exc:
            raise ValueError(f"chat template failed: {exc}") from exc

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Templates place their own special tokens, so the rendered text is encoded without adding any."""
        return self.encode(
            self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False
        )


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, holding back bytes of an unfinished
    UTF-8 character (a multi-byte character can span tokens) and keeping word-boundary spacing right."""

    def __init__(
        self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True
    ) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = list(prompt_token_ids[-6:])  # a little context for spacing
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self.text = ""

    def push(self, token_ids: Sequence[int]) -> str:
        """Add tokens; return the newly complete text (possibly empty)."""
        self._ids.extend(token_ids)
        return self._advance(hold_partial=True)

    def flush(self) -> str:
        """At the end of the stream: the text still held back (bytes of a character that never
        completed decode as U+FFFD, as they do when the whole output is decoded at once)."""
        return self._advance(hold_partial=False)

    def _advance(self, hold_partial: bool) -> str:
        before = self._tok.decode(self._ids[self._prefix_offset : self._read_offset], self._skip)
        after = self._tok.decode(self._ids[self._prefix_offset :], self._skip)
        if len(after) <= len(before) or (hold_partial and after.endswith("\ufffd")):
            return ""
        delta = after[len(before) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self.text += delta
        return delta


def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value
