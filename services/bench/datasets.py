"""Request sets for the benchmarks: random token prompts with uniform length ranges, or conversations
from a ShareGPT-format JSON file. The same seed gives the same requests."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from baton.shared.tokenizer import Tokenizer


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int
    """Tokens to generate (with ignore_eos: exactly this many)."""


def parse_range(text: str, flag: str) -> tuple[int, int]:
    """'64,1024' -> (64, 1024), both >= 1 and ordered; a single number is a fixed length."""
    try:
        parts = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag}: expected MIN,MAX or N, got {text!r}") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or parts[0] < 1 or parts[0] > parts[1]:
        raise ValueError(f"{flag}: expected 1 <= MIN <= MAX, got {text!r}")
    return parts[0], parts[1]


def random_requests(
    num: int, input_len: tuple[int, int], output_len: tuple[int, int], vocab_size: int, seed: int
) -> list[BenchRequest]:
    """Prompts of uniformly random length and uniformly random token ids (special ids avoided by
    keeping to the middle of the vocabulary); output lengths uniform in their range."""
    rng = random.Random(seed)
    low, high = min(1000, vocab_size // 4), max(vocab_size - 1000, vocab_size * 3 // 4)
    requests = []
    for _ in range(num):
        n = rng.randint(*input_len)
        requests.append(BenchRequest([rng.randrange(low, high) for _ in range(n)], rng.randint(*output_len)))
    return requests


def sharegpt_requests(
    path: Path, num: int, tokenizer: Tokenizer, seed: int, max_len: int, output_len: int | None = None
) -> list[BenchRequest]:
    """The first human turn of shuffled ShareGPT conversations as the prompt, the reply's token count
    as the output length (or `output_len` for all). Pairs whose prompt + output exceed max_len, or
    with fewer than 4 tokens either side, are skipped, as vLLM's benchmark does."""
    conversations = _read_sharegpt(path)
    random.Random(seed).shuffle(conversations)
    requests = []
    for human, reply in conversations:
        prompt = tokenizer.encode(human)
        wanted = output_len or len(tokenizer.encode(reply))
        if len(prompt) < 4 or wanted < 4 or len(prompt) + wanted > max_len:
            continue
        requests.append(BenchRequest(prompt, wanted))
        if len(requests) == num:
            return requests
    raise ValueError(f"{path} has only {len(requests)} usable conversations, {num} were asked for")


def _read_sharegpt(path: Path) -> list[tuple[str, str]]:
    try:
        data: Any = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read ShareGPT file {path}: {exc}") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of conversations")
    pairs = []
    for entry in data:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if isinstance(turns, list) and len(turns) >= 2 and all(isinstance(t, dict) for t in turns[:2]):
            human, reply = turns[0].get("value"), turns[1].get("value")
            if isinstance(human, str) and isinstance(reply, str):
                pairs.append((human, reply))
    return pairs
