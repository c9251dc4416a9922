"""How fast the anchor workload could run at best on one GPU, and what fraction of that a run reached.

An analytic floor from the request set and the model's shapes (no GPU needed):
- compute: every token through the layers (2 FLOP per weight), the LM head for every output token,
  causal attention (QK^T and AV over the positions before each token); at `--tflops`;
- memory: every decode step reads all weights once, plus each running request's cached KV; at `--tbps`.
The floor is the prefill's compute followed by the decode's memory traffic; the lower bound with the
two perfectly overlapped is also printed. Defaults are the H100 figures we measured (copy 2.96 TB/s,
bf16 GEMM 765 TFLOP/s).

    python3 benchmarks/anchor_floor.py [--offline benchmarks/results/throughput_h100.json]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from baton.services.bench.datasets import random_requests

HERE = Path(__file__).resolve().parent
ANCHOR_MODEL = HERE / "models" / "llama-3.2-1b-shape"


@dataclass(frozen=True)
class Shapes:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    dtype_bytes: int = 2

    @classmethod
    def from_config(cls, model_dir: Path) -> Shapes:
        cfg = json.loads((model_dir / "config.json").read_text())
        heads = cfg["num_attention_heads"]
        return cls(
            hidden=cfg["hidden_size"],
            layers=cfg["num_hidden_layers"],
            heads=heads,
            kv_heads=cfg.get("num_key_value_heads", heads),
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            intermediate=cfg["intermediate_size"],
            vocab=cfg["vocab_size"],
            tied=bool(cfg.get("tie_word_embeddings", False)),
        )

    @property
    def layer_weights(self) -> int:
        q_out, kv_out = self.heads * self.head_dim, self.kv_heads * self.head_dim
        attention = self.hidden * (q_out + 2 * kv_out) + q_out * self.hidden
        return attention + 3 * self.hidden * self.intermediate

    @property
    def embedding_weights(self) -> int:
        return self.vocab * self.hidden

    @property
    def weight_bytes(self) -> int:
        """All weights, read once per decode step (the LM head is the embedding when tied)."""
        lm_head = 0 if self.tied else self.embedding_weights
        return (self.layers * self.layer_weights + self.embedding_weights + lm_head) * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    def attention_flops(self, first: int, last: int) -> float:
        """QK^T and AV for the tokens at positions first..last-1, each over the positions up to it."""
        positions = (last * (last + 1) - first * (first + 1)) / 2
        return 4.0 * self.heads * self.head_dim * self.layers * positions


@dataclass(frozen=True)
class Floor:
    prefill_flops: float
    total_flops: float
    decode_bytes: float
    compute_s: float
    prefill_compute_s: float
    memory_s: float

    @property
    def sequential_s(self) -> float:
        """Prefill compute, then decode memory traffic."""
        return self.prefill_compute_s + self.memory_s

    @property
    def overlapped_s(self) -> float:
        return max(self.compute_s, self.memory_s)


def workload_floor(shapes: Shapes, requests: list[tuple[int, int]], tflops: float, tbps: float) -> Floor:
    """`requests`: (prompt tokens, output tokens) each; the first output token comes from the prefill."""
    per_token = 2.0 * shapes.layers * shapes.layer_weights
    lm_head = 2.0 * shapes.embedding_weights
    prefill = sum(p * per_token + shapes.attention_flops(0, p) + lm_head for p, _ in requests)
    decode = sum((o - 1) * (per_token + lm_head) + shapes.attention_flops(p, p + o - 1) for p, o in requests)
    steps = max(o for _, o in requests) - 1  # the longest request sets the number of decode steps
    kv_reads = sum(sum(p + i for i in range(1, o)) for p, o in requests) * shapes.kv_bytes_per_token
    decode_bytes = steps * shapes.weight_bytes + kv_reads
    return Floor(
        prefill_flops=prefill,
        total_flops=prefill + decode,
        decode_bytes=decode_bytes,
        compute_s=(prefill + decode) / (tflops * 1e12),
        prefill_compute_s=prefill / (tflops * 1e12),
        memory_s=decode_bytes / (tbps * 1e12),
    )


def anchor_requests(shapes: Shapes) -> list[tuple[int, int]]:
    """The anchor set: 256 requests, prompts U[64, 1024], outputs U[32, 512], seed 0."""
    return [
        (len(r.prompt_token_ids), r.output_len)
        for r in random_requests(256, (64, 1024), (32, 512), shapes.vocab, 0)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=ANCHOR_MODEL, help="model directory (config.json)")
    parser.add_argument("--tflops", type=float, default=765.0, help="dense bf16 throughput, TFLOP/s")
    parser.add_argument("--tbps", type=float, default=2.96, help="device memory bandwidth, TB/s")
    parser.add_argument("--offline", type=Path, help="a `baton bench throughput` JSON: report its fraction")
    args = parser.parse_args()
    shapes = Shapes.from_config(args.model)
    requests = anchor_requests(shapes)
    floor = workload_floor(shapes, requests, args.tflops, args.tbps)
    prompt, output = sum(p for p, _ in requests), sum(o for _, o in requests)
    print(f"anchor set: {len(requests)} requests, {prompt:,} prompt and {output:,} output tokens")
    print(
        f"compute {floor.total_flops:.3g} FLOP: {floor.compute_s:.2f} s "
        f"(prefill {floor.prefill_compute_s:.2f} s); "
        f"decode memory {floor.decode_bytes / 1e12:.2f} TB: {floor.memory_s:.2f} s"
    )
    print(f"floor {floor.sequential_s:.2f} s (prefill, then decode); {floor.overlapped_s:.2f} s overlapped")
    if args.offline is not None:
        result = json.loads(args.offline.read_text())
        elapsed = next(r["elapsed_s"] for r in result["results"] if r["system"] == "baton")
        print(
            f"{args.offline.name} ({result.get('device', '?')}): {elapsed:.2f} s = "
            f"{floor.sequential_s / elapsed:.0%} of the floor, "
            f"{floor.overlapped_s / elapsed:.0%} of the overlapped one"
        )


if __name__ == "__main__":
    main()
