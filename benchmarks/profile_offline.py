"""Where the offline engine's time goes: cProfile of `LLM.generate` on the anchor workload's first N
requests (host view), printed by cumulative time.

    python benchmarks/profile_offline.py [--model DIR] [--num-prompts 64]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from baton import LLM, SamplingParams
from baton.services.bench.datasets import random_requests
from baton.shared.models.model_config import ModelConfig


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="benchmarks/models/llama-3.2-1b-shape")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    vocab = ModelConfig.from_dir(args.model).vocab_size
    requests = random_requests(args.num_prompts, (64, 1024), (32, 512), vocab, 0)
    llm = LLM(args.model, load_format="dummy", dtype="bfloat16")
    llm.generate(
        [r.prompt_token_ids[:64] for r in requests[:8]], SamplingParams(max_tokens=8, ignore_eos=True)
    )
    params = [SamplingParams(max_tokens=r.output_len, temperature=0, ignore_eos=True) for r in requests]
    profiler = cProfile.Profile()
    torch.cuda.synchronize()
    start = time.perf_counter()
    profiler.enable()
    llm.generate([r.prompt_token_ids for r in requests], params)
    profiler.disable()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    tokens = sum(r.output_len for r in requests)
    rate = tokens / elapsed
    print(f"{args.num_prompts} requests, {tokens} output tokens in {elapsed:.2f} s: {rate:.0f} tok/s")
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(args.top)
    pstats.Stats(profiler).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
