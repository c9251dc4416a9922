"""The garbage collector's pauses are timed per generation, and freezing the startup heap takes what
exists out of later collections."""

from __future__ import annotations

import gc

from baton.shared.gc_pauses import GcPauses, freeze_startup_heap


def test_collections_are_counted_and_timed_per_generation_while_installed() -> None:
    pauses = GcPauses()
    pauses.install()
    try:
        gc.collect(0)
        gc.collect(2)
        gc.collect(2)
    finally:
        pauses.remove()
    gen0, _, gen2 = pauses.generations
    assert gen0.collections >= 1
    assert gen2.collections == 2
    assert 0 < gen2.max_s <= gen2.total_s
    assert pauses.max_pause_s >= gen2.max_s
    gc.collect(2)  # removed: no longer counted
    assert gen2.collections == 2
    assert "gen2 2x" in pauses.summary()


def test_freezing_the_startup_heap_exempts_every_live_object() -> None:
    survivor = [object() for _ in range(1000)]
    try:
        frozen = freeze_startup_heap()
        assert frozen == gc.get_freeze_count() >= len(survivor)
        assert not any(o is survivor for o in gc.get_objects(generation=2))  # out of generation 2
    finally:
        gc.unfreeze()
