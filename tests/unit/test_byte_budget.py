"""The byte budget: grants in arrival order within the capacity, lets an oversized request run alone,
and gives back what a cancelled waiter held or blocked."""

from __future__ import annotations

import asyncio

import pytest

from baton.shared.byte_budget import ByteBudget


def test_requests_wait_for_room_and_are_served_in_arrival_order() -> None:
    async def main() -> None:
        budget = ByteBudget(100)
        assert await budget.acquire(60) == 60
        order: list[str] = []

        async def take(name: str, nbytes: int) -> int:
            charge = await budget.acquire(nbytes)
            order.append(name)
            return charge

        big = asyncio.create_task(take("big", 70))
        await asyncio.sleep(0)
        small = asyncio.create_task(take("small", 10))  # fits now, but must not overtake "big"
        await asyncio.sleep(0.01)
        assert order == [] and budget.num_waiting == 2
        budget.release(60)
        assert await asyncio.wait_for(big, 5) == 70 and await asyncio.wait_for(small, 5) == 10
        assert order == ["big", "small"] and budget.held == 80

    asyncio.run(main())


def test_a_request_larger_than_the_capacity_runs_alone() -> None:
    async def main() -> None:
        budget = ByteBudget(100)
        first = await budget.acquire(30)
        huge = asyncio.create_task(budget.acquire(500))
        await asyncio.sleep(0.01)
        assert not huge.done()
        budget.release(first)
        assert await asyncio.wait_for(huge, 5) == 100 and budget.held == 100
        budget.release(100)
        assert budget.held == 0

    asyncio.run(main())


def test_a_cancelled_waiter_unblocks_the_ones_behind_it_and_keeps_nothing() -> None:
    async def main() -> None:
        budget = ByteBudget(100)
        held = await budget.acquire(50)
        blocked = asyncio.create_task(budget.acquire(80))
        await asyncio.sleep(0)
        behind = asyncio.create_task(budget.acquire(40))
        await asyncio.sleep(0.01)
        assert not behind.done()
        blocked.cancel()
        assert await asyncio.wait_for(behind, 5) == 40  # no longer queued behind the cancelled one
        with pytest.raises(asyncio.CancelledError):
            await blocked
        assert budget.held == 90 and budget.num_waiting == 0
        budget.release(held)
        budget.release(40)
        assert budget.held == 0

    asyncio.run(main())


def test_a_waiter_cancelled_just_as_it_was_granted_gives_its_grant_back() -> None:
    async def main() -> None:
        budget = ByteBudget(100)
        held = await budget.acquire(100)
        waiter = asyncio.create_task(budget.acquire(60))
        await asyncio.sleep(0)
        budget.release(held)  # grants the waiter ...
        waiter.cancel()  # ... which is cancelled before it resumes
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert budget.held == 0

    asyncio.run(main())


def test_the_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive capacity"):
        ByteBudget(0)
