"""The generated tokenizer as transformers sees it, the chat template, streaming detokenization."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from baton.shared.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = [
    "Call me Ishmael. Some years ago—never mind how long precisely—",
    "naïve café, 日本語, emoji 🙂 and\ttabs\n\nnew lines",
    "   leading spaces and <|im_start|> a special token",
]


@pytest.fixture(scope="module")
def tokenizers(llama_dir: Path) -> tuple[Tokenizer, object]:
    ours = Tokenizer.from_dir(llama_dir)
    assert ours is not None
    return ours, AutoTokenizer.from_pretrained(llama_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tokenizers: tuple, text: str) -> None:
    ours, hf = tokenizers
    assert ours.encode(text) == hf(text)["input_ids"]
    assert ours.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False)["input_ids"]
    ids = ours.encode(text)
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids)


def test_chat_template_matches_transformers(tokenizers: tuple) -> None:
    ours, hf = tokenizers
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello?"},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Again."},
    ]
    for add in (True, False):
        assert ours.apply_chat_template(messages, add) == hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add
        )
    assert ours.encode_chat(messages) == ours.encode(
        ours.apply_chat_template(messages), add_special_tokens=False
    )


def test_chat_template_errors_are_value_errors(tokenizers: tuple) -> None:
    ours, _ = tokenizers
    with pytest.raises(ValueError, match="message 0 must be a dict"):
        ours.apply_chat_template(["hello"])  # type: ignore[list-item]


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detokenizer_reassembles_the_text(tokenizers: tuple, text: str) -> None:
    ours, _ = tokenizers
    ids = ours.encode(text, add_special_tokens=False)
    prompt = ours.encode("Prompt:")
    detok = IncrementalDetokenizer(ours, prompt)
    deltas = [detok.push([t]) for t in ids]
    assert "".join(deltas) == ours.decode(ids) == detok.text
    assert all("\ufffd" not in d for d in deltas)  # no half characters are ever emitted


def test_special_tokens_are_known(tokenizers: tuple) -> None:
    ours, _ = tokenizers
    assert ours.is_special(ours.token_to_id("<s>"))
    assert not ours.is_special(ours.encode("hello", add_special_tokens=False)[0])


def test_flush_releases_a_character_cut_off_at_the_end_of_the_stream(tokenizers: tuple) -> None:
    ours, _ = tokenizers
    ids = ours.encode("ok 🙂", add_special_tokens=False)
    # drop tokens from the end until the decoded text ends inside the emoji's bytes
    cut = next(n for n in range(len(ids) - 1, 0, -1) if ours.decode(ids[:n]).endswith("\ufffd"))
    detok = IncrementalDetokenizer(ours, ours.encode("Prompt:"))
    streamed = "".join(detok.push([t]) for t in ids[:cut])
    assert not streamed.endswith("\ufffd")
    assert streamed + detok.flush() == ours.decode(ids[:cut])
    assert detok.flush() == ""
