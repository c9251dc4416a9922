"""The scheduler and KV manager stepped by hand, with no model: exact block ids and orders."""

from __future__ import annotations

import pytest

from baton.shared.engine.block_pool import BlockPool
from baton.shared.engine.kv_cache_manager import KVCacheManager
from baton.shared.engine.request import FinishReason, Request, RequestStatus
from baton.shared.engine.sampling_params import SamplingParams
from baton.shared.engine.scheduler import SampledToken, Scheduler, SchedulerConfig, SchedulerOutput

BS = 4
EOS = 99


def make(
    num_blocks: int = 16, budget: int = 64, max_seqs: int = 8, max_len: int = 64, caching: bool = True
) -> Scheduler:
    kv = KVCacheManager(BlockPool(num_blocks, caching), BS)
    return Scheduler(SchedulerConfig(budget, max_seqs, max_len), kv)


def req(rid: str, prompt: list[int], max_tokens: int = 4, **kw: object) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, **kw), frozenset({EOS}), BS)


def run_step(s: Scheduler, token: int = 7) -> SchedulerOutput:
    out = s.schedule()
    sampled = {c.request.request_id: SampledToken(token) for c in out.chunks if c.samples}
    s.update(out, sampled)
    s.kv.check_integrity()
    return out


def test_prefill_then_decode_allocates_blocks_as_tokens_grow() -> None:
    s = make()
    r = req("a", [1, 2, 3, 4, 5], max_tokens=5)
    s.add(r)
    out = run_step(s)
    assert [(c.request.request_id, c.start, c.num_new_tokens) for c in out.chunks] == [("a", 0, 5)]
    assert s.kv.block_ids("a") == [0, 1]
    assert r.output_token_ids == [7]
    out = run_step(s)
    assert [(c.start, c.num_new_tokens) for c in out.chunks] == [(5, 1)]
    for _ in range(3):
        run_step(s)
    assert r.is_finished and r.finish_reason is FinishReason.LENGTH
    assert r.output_token_ids == [7] * 5
    assert s.kv.pool.usage().num_held == 0


def test_long_prompt_is_chunked_to_the_token_budget() -> None:
    s = make(budget=4)
    r = req("a", list(range(10)), max_tokens=1)
    s.add(r)
    chunks = [run_step(s).chunks[0] for _ in range(3)]
    assert [(c.start, c.num_new_tokens, c.samples) for c in chunks] == [
        (0, 4, False),
        (4, 4, False),
        (8, 2, True),
    ]
    assert r.is_finished and r.output_token_ids == [7]


def test_decodes_are_scheduled_before_prefill_chunks() -> None:
    s = make(budget=3)
    s.add(req("a", [1, 2], max_tokens=10))
    run_step(s)  # a now decodes
    s.add(req("b", list(range(10)), max_tokens=1))
    out = run_step(s)
    assert [(c.request.request_id, c.num_new_tokens) for c in out.chunks] == [("a", 1), ("b", 2)]
    out = run_step(s)
    assert [(c.request.request_id, c.num_new_tokens) for c in out.chunks] == [("a", 1), ("b", 2)]


def test_prefix_cache_hit_skips_computed_blocks_but_keeps_one_token() -> None:
    s = make()
    prompt = list(range(1, 9))  # two full blocks
    s.add(req("a", prompt, max_tokens=1))
    run_step(s)
    s.add(req("b", prompt, max_tokens=1))
    out = run_step(s)
    # the first block is reused; the last full block is recomputed so logits exist for sampling
    [chunk] = out.chunks
    assert (chunk.start, chunk.num_new_tokens) == (4, 4)
    assert chunk.request.num_cached_tokens == 4


def test_prefix_caching_off_recomputes_everything() -> None:
    s = make(caching=False)
    prompt = list(range(1, 9))
    s.add(req("a", prompt, max_tokens=1))
    run_step(s)
    s.add(req("b", prompt, max_tokens=1))
    [chunk] = run_step(s).chunks
    assert (chunk.start, chunk.num_new_tokens) == (0, 8)


def test_out_of_blocks_preempts_the_latest_arrival_and_recomputes_it() -> None:
    s = make(num_blocks=4)
    a = req("a", [1, 2, 3, 4], max_tokens=8)
    b = req("b", [5, 6, 7, 8], max_tokens=8)
    s.add(a)
    s.add(b)
    run_step(s)  # one block each; growing to 12 tokens needs 3 each, more than the 4 there are
    for _ in range(8):
        out = run_step(s)
        if out.preempted:
            break
    assert out.preempted == [b]
    assert b.status is RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert s.waiting[0] is b
    outputs_before = list(b.output_token_ids)
    while s.has_unfinished():
        run_step(s)
    assert a.finish_reason is FinishReason.LENGTH and b.finish_reason is FinishReason.LENGTH
    assert len(b.output_token_ids) == 8 and b.output_token_ids[: len(outputs_before)] == outputs_before
    assert b.num_preemptions >= 1
    assert s.kv.pool.usage().num_held == 0


def test_a_waiting_request_that_does_not_fit_is_not_overtaken() -> None:
    s = make(num_blocks=3)
    s.add(req("a", list(range(6)), max_tokens=3))
    run_step(s)  # a holds 2 blocks, 1 is free
    s.add(req("b", list(range(10, 18)), max_tokens=1))  # needs 2 blocks
    s.add(req("c", [1], max_tokens=1))  # would fit, but arrived later
    out = run_step(s)
    assert [c.request.request_id for c in out.chunks] == ["a"]
    assert [r.request_id for r in s.waiting] == ["b", "c"]


def test_abort_at_every_stage_frees_blocks() -> None:
    s = make(budget=4)
    waiting = req("w", [1, 2], max_tokens=4)
    prefilling = req("p", list(range(12)), max_tokens=4)
    decoding = req("d", [1, 2, 3], max_tokens=9)
    s.add(decoding)
    run_step(s)
    s.add(prefilling)
    run_step(s)  # d decodes, p prefills its first chunk
    s.add(waiting)
    assert prefilling.num_computed_tokens > 0 and not prefilling.is_finished
    aborted = s.abort(["w", "p", "d", "unknown"])
    assert [r.request_id for r in aborted] == ["w", "p", "d"]
    assert all(r.finish_reason is FinishReason.ABORT for r in aborted)
    assert not s.has_unfinished()
    s.kv.check_integrity()
    assert s.kv.pool.usage().num_held == 0


def test_abort_between_schedule_and_update_is_safe() -> None:
    s = make()
    r = req("a", [1, 2, 3], max_tokens=4)
    s.add(r)
    out = s.schedule()
    s.abort(["a"])
    s.update(out, {"a": SampledToken(5)})
    assert r.output_token_ids == [] and r.finish_reason is FinishReason.ABORT
    s.kv.check_integrity()


def test_stop_conditions() -> None:
    s = make()
    eos = req("eos", [1], max_tokens=5)
    stop = req("stop", [1], max_tokens=5, stop_token_ids=[42])
    ignore = req("ignore", [1], max_tokens=2, ignore_eos=True)
    for r in (eos, stop, ignore):
        s.add(r)
    out = s.schedule()
    s.update(out, {"eos": SampledToken(EOS), "stop": SampledToken(42), "ignore": SampledToken(EOS)})
    assert (eos.finish_reason, eos.stop_reason) == (FinishReason.STOP, None)
    assert (stop.finish_reason, stop.stop_reason) == (FinishReason.STOP, 42)
    assert not ignore.is_finished
    assert eos.output_token_ids == [EOS]  # the end token is kept in the output


def test_max_model_len_ends_generation() -> None:
    s = make(max_len=6)
    r = req("a", [1, 2, 3, 4], max_tokens=100)
    s.add(r)
    while s.has_unfinished():
        run_step(s)
    assert r.finish_reason is FinishReason.LENGTH and r.num_tokens == 6


def test_max_num_seqs_caps_the_running_batch() -> None:
    s = make(max_seqs=2)
    for i in range(3):
        s.add(req(str(i), [1, 2], max_tokens=3))
    out = s.schedule()
    assert len(out.chunks) == 2 and len(s.waiting) == 1


def commit(s: Scheduler, rid: str, token: int = 7) -> Request:
    request = s.commit_reserved(rid, SampledToken(token), 0)
    s.kv.check_integrity()
    return request


def test_reservations_take_no_running_slot_and_wait_ready_for_one() -> None:
    s = make(num_blocks=64, max_seqs=2)
    for i in range(5):  # more reservations than running slots: prompts queued at a prefill worker
        assert s.reserve(req(f"r{i}", [1, 2, 3, 4, 5], max_tokens=3)) is not None
    committed = [commit(s, f"r{i}") for i in range(5)]
    assert [r.request_id for r in s.running] == ["r0", "r1"]
    assert [r.request_id for r in s.ready] == ["r2", "r3", "r4"]
    assert all(r.status is RequestStatus.WAITING for r in committed[2:])
    s.add(req("local", [1, 2], max_tokens=2))  # waits behind the ready ones
    out = run_step(s)
    assert [c.request.request_id for c in out.chunks] == ["r0", "r1"]
    run_step(s)  # r0 and r1 reach max_tokens: r2 and r3 join in their places, as decodes
    out = run_step(s)
    assert [(c.request.request_id, c.start, c.num_new_tokens) for c in out.chunks] == [
        ("r2", 5, 1),
        ("r3", 5, 1),
    ]
    while s.has_unfinished():
        run_step(s)
    assert all(r.output_token_ids == [7, 7, 7] for r in committed)
    assert s.kv.pool.usage().num_held == 0


def test_a_commit_waits_behind_earlier_ready_requests() -> None:
    s = make(num_blocks=64, max_seqs=1)
    for rid in ("a", "b", "c"):
        s.reserve(req(rid, [1, 2, 3], max_tokens=2))
    commit(s, "a")
    commit(s, "b")
    s.abort(["a"])  # a slot opens, but "b" is ready first: "c" must not overtake it
    commit(s, "c")
    assert [r.request_id for r in s.ready] == ["b", "c"] and not s.running
    out = run_step(s)
    assert [c.request.request_id for c in out.chunks] == ["b"]


def test_an_aborted_ready_request_frees_its_blocks() -> None:
    s = make(num_blocks=64, max_seqs=1)
    s.reserve(req("a", [1, 2, 3], max_tokens=4))
    s.reserve(req("b", list(range(9)), max_tokens=4))
    commit(s, "a")
    commit(s, "b")
    (aborted,) = s.abort(["b"])
    assert aborted.finish_reason is FinishReason.ABORT and not s.ready
    s.kv.check_integrity()
    assert s.kv.pool.usage().num_held == 1  # "a"'s one block


def test_a_reservation_leaves_the_watermark_free() -> None:
    s = make(num_blocks=200)  # watermark: 2 blocks
    assert s.watermark_blocks == 2
    assert s.reserve(req("a", list(range(4 * 197)))) is not None  # 197 blocks, 3 left
    assert s.reserve(req("b", list(range(8)))) is None  # 2 more would leave 1
    assert s.reserve(req("c", list(range(4)))) is not None  # 1 more leaves 2


def test_duplicate_request_id_is_refused() -> None:
    s = make()
    s.add(req("a", [1]))
    with pytest.raises(ValueError, match="already in use"):
        s.add(req("a", [2]))


def test_block_table_rows_follow_every_allocation_preemption_and_finish() -> None:
    """The KV manager's block table (one row per holder, gathered by the model runner) agrees with the
    held block lists through growth, preemption, recomputation with cached prefixes and finishing;
    check_integrity compares them after every step."""
    import random

    rng = random.Random(0)
    s = make(num_blocks=24, budget=16, max_seqs=6, max_len=48)
    prompts = [[rng.randrange(8) for _ in range(rng.randint(1, 14))] for _ in range(20)]
    for i, prompt in enumerate(prompts):
        s.add(req(f"r{i}", prompt, max_tokens=rng.randint(1, 16), ignore_eos=True))
    steps = 0
    while s.has_unfinished():
        out = run_step(s)  # runs check_integrity, which checks the table
        for c in out.chunks:
            if not c.request.is_finished:
                row = s.kv.row_of(c.request.request_id)
                held = s.kv.block_ids(c.request.request_id)
                assert s.kv.block_table[row, : len(held)].tolist() == held
        steps += 1
        assert steps < 500
    assert s.num_preemptions > 0  # the small pool made requests give their blocks back
    assert not s.kv.block_table.any()
