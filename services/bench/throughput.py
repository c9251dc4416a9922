"""Offline throughput: every request submitted at once to the engine, timed from the first token of
work to the last token out; with `--baseline hf`, Hugging Face `generate` on the same requests in the
same process, with its best static batch size."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from baton.services.bench.datasets import BenchRequest
from baton.shared.gc_pauses import GcPauses, freeze_startup_heap


@dataclass(frozen=True)
class ThroughputResult:
    system: str
    elapsed_s: float
    num_requests: int
    prompt_tokens: int
    output_tokens: int
    settings: dict[str, Any]
    engine_steps: dict[str, Any] | None = None
    """Baton's: where the timed run's step time went (see StepStats.as_dict)."""
    gc_pauses: str | None = None
    """Baton's: the garbage collector's pauses during the timed run (GcPauses.summary)."""

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s

    @property
    def total_tokens_per_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.elapsed_s

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {
            "output_tokens_per_s": self.output_tokens_per_s,
            "total_tokens_per_s": self.total_tokens_per_s,
            "requests_per_s": self.num_requests / self.elapsed_s,
        }


def run_baton(model: str, requests: list[BenchRequest], engine_settings: dict[str, Any]) -> ThroughputResult:
    """The offline LLM on every request at once (greedy, ignore_eos: exactly output_len tokens each)."""
    from baton import LLM, SamplingParams

    llm = LLM(model, **engine_settings)
    # warm-up: the same prompt lengths and batch shapes, so every kernel variant the timed run needs is
    # compiled before it; other token ids (each + 1), so the timed run finds nothing in the prefix cache
    vocab = llm.engine.model_config.vocab_size
    warm = [[(t + 1) % vocab for t in r.prompt_token_ids] for r in requests]
    llm.generate(warm, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    params = [SamplingParams(max_tokens=r.output_len, temperature=0, ignore_eos=True) for r in requests]
    freeze_startup_heap()  # as the served workers do once ready, so both are timed alike
    gc_pauses = GcPauses()
    _sync()
    llm.engine.step_stats.reset()
    gc_pauses.install()
    start = time.perf_counter()
    outputs = llm.generate([r.prompt_token_ids for r in requests], params)
    _sync()
    elapsed = time.perf_counter() - start
    gc_pauses.remove()
    for out, req in zip(outputs, requests, strict=True):
        if len(out.token_ids) != req.output_len:
            raise RuntimeError(
                f"request {out.request_id} produced {len(out.token_ids)} tokens, not {req.output_len}"
            )
    settings = engine_settings | {"attention_backend": llm.engine.attention_backend}
    return _result("baton", elapsed, requests, settings, llm.engine.step_stats.as_dict(), gc_pauses.summary())


def run_hf(
    model: str,
    requests: list[BenchRequest],
    dtype: torch.dtype,
    batch_sizes: list[int],
    probe_tokens: int = 48,
) -> ThroughputResult:
    """Hugging Face `generate` with static batches: requests sorted by output length (so a batch's
    members want similar lengths), prompts left-padded, every batch generating exactly its longest
    output (shorter requests' extra tokens are not counted). The batch size is the one of
    `batch_sizes` whose whole plan (steps per batch x time per step, measured on a short probe) is
    predicted fastest."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model)
    with torch.device("cuda"):
        hf = AutoModelForCausalLM.from_config(config, torch_dtype=dtype).eval()
    hf.generation_config.eos_token_id = None
    ordered = sorted(requests, key=lambda r: r.output_len, reverse=True)
    step_s = {b: _probe_step_s(hf, ordered[:b], probe_tokens) for b in batch_sizes}
    predicted_s = {b: step_s[b] * _num_steps(ordered, b) for b in batch_sizes}
    batch = min(predicted_s, key=lambda b: predicted_s[b])
    _hf_batch(hf, ordered[:batch], 4)  # warm-up at the chosen size
    _sync()
    start = time.perf_counter()
    for i in range(0, len(ordered), batch):
        _hf_batch(hf, ordered[i : i + batch], max(r.output_len for r in ordered[i : i + batch]))
    _sync()
    elapsed = time.perf_counter() - start
    settings = {"batch_size": batch, "probe_step_s": step_s, "predicted_s": predicted_s, "dtype": str(dtype)}
    return _result("hf", elapsed, requests, settings)


def _probe_step_s(hf: Any, requests: list[BenchRequest], new_tokens: int) -> float:
    """Seconds per generated position for this batch (prefill included, spread over the steps)."""
    _hf_batch(hf, requests, 2)
    _sync()
    start = time.perf_counter()
    _hf_batch(hf, requests, new_tokens)
    _sync()
    return (time.perf_counter() - start) / new_tokens


def _num_steps(ordered: list[BenchRequest], batch: int) -> int:
    """Positions generated in all: each batch runs to its longest output."""
    return sum(max(r.output_len for r in ordered[i : i + batch]) for i in range(0, len(ordered), batch))


def _hf_batch(hf: Any, requests: list[BenchRequest], new_tokens: int) -> None:
    width = max(len(r.prompt_token_ids) for r in requests)
    ids = torch.zeros(len(requests), width, dtype=torch.long)
    mask = torch.zeros(len(requests), width, dtype=torch.long)
    for row, r in enumerate(requests):  # left padding
        ids[row, width - len(r.prompt_token_ids) :] = torch.tensor(r.prompt_token_ids)
        mask[row, width - len(r.prompt_token_ids) :] = 1
    with torch.inference_mode():
        out = hf.generate(
            input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
        )  # fmt: skip
    if out.shape[1] != width + new_tokens:
        raise RuntimeError(f"Hugging Face generated {out.shape[1] - width} tokens, not {new_tokens}")


def _result(
    system: str,
    elapsed: float,
    requests: list[BenchRequest],
    settings: dict[str, Any],
    engine_steps: dict[str, Any] | None = None,
    gc_pauses: str | None = None,
) -> ThroughputResult:
    return ThroughputResult(
        system=system,
        elapsed_s=elapsed,
        num_requests=len(requests),
        prompt_tokens=sum(len(r.prompt_token_ids) for r in requests),
        output_tokens=sum(r.output_len for r in requests),
        gc_pauses=gc_pauses,
        settings=settings,
        engine_steps=engine_steps,
    )


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
