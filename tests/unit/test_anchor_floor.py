"""The anchor workload's analytic floor (benchmarks/anchor_floor.py): hand-checked on a toy model, and
the figures the README and notes quote for the anchor set."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "anchor_floor.py"
spec = importlib.util.spec_from_file_location("anchor_floor", SCRIPT)
assert spec is not None and spec.loader is not None
anchor_floor = importlib.util.module_from_spec(spec)
sys.modules["anchor_floor"] = anchor_floor  # dataclasses look their module up
spec.loader.exec_module(anchor_floor)


def test_a_toy_request_by_hand() -> None:
    # one layer, hidden 4, 2 heads of 2, 1 KV head, intermediate 8, vocab 10, tied embeddings
    shapes = anchor_floor.Shapes(
        hidden=4, layers=1, heads=2, kv_heads=1, head_dim=2, intermediate=8, vocab=10, tied=True
    )
    assert shapes.layer_weights == 4 * (4 + 2 * 2) + 4 * 4 + 3 * 4 * 8  # q,k,v + o + gate,up,down = 144
    assert shapes.weight_bytes == (144 + 40) * 2
    assert shapes.kv_bytes_per_token == 2 * 1 * 1 * 2 * 2
    # a 2-token prompt and 3 output tokens: the prefill makes the first token, two decode steps the rest;
    # a token's weights cost 2 * 144 FLOP, the LM head 2 * 40, attention 4 * 2 * 2 per position attended
    floor = anchor_floor.workload_floor(shapes, [(2, 3)], tflops=1e-12, tbps=1e-12)
    assert floor.prefill_flops == pytest.approx(2 * 288 + 16 * (1 + 2) + 80)
    assert floor.total_flops == pytest.approx(floor.prefill_flops + 2 * (288 + 80) + 16 * (3 + 4))
    assert floor.decode_bytes == pytest.approx(2 * 368 + (3 + 4) * 8)  # weights twice, KV of 3 then 4 tokens
    assert floor.overlapped_s == pytest.approx(max(floor.compute_s, floor.memory_s))


def test_the_anchor_set_matches_the_quoted_floor() -> None:
    shapes = anchor_floor.Shapes.from_config(anchor_floor.ANCHOR_MODEL)
    assert shapes.weight_bytes == pytest.approx(2.47e9, rel=0.01)
    floor = anchor_floor.workload_floor(shapes, anchor_floor.anchor_requests(shapes), tflops=765, tbps=2.96)
    assert floor.total_flops == pytest.approx(4.59e14, rel=0.01)
    assert (floor.compute_s, floor.prefill_compute_s, floor.memory_s) == pytest.approx(
        (0.60, 0.36, 1.00), abs=0.01
    )
    assert floor.sequential_s == pytest.approx(1.36, abs=0.01)
