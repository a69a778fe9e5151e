"""The door's admission queue (door/admission.py): a freed slot goes to the request that
waited least; a client gone while waiting takes none."""

from __future__ import annotations

import asyncio

from common.config import AdmissionConfig
from door.admission import Admission, Refusal


def test_a_freed_slot_goes_to_the_newest_waiter_and_the_oldest_times_out() -> None:
    """Under overload first in, first out makes every admitted request wait about the
    whole timeout (bench adaptive-ramp at 1.5x: 4 s waits, 0-2% met a 2 s TTFT level)."""

    async def run() -> list[tuple[str, Refusal | None]]:
        admission = Admission(AdmissionConfig(max_in_flight_per_engine=1, queue_size=4, queue_timeout_s=0.6))
        assert await admission.enter(1) is None  # the one slot
        order: list[tuple[str, Refusal | None]] = []

        async def wait(name: str) -> None:
            order.append((name, await admission.enter(1)))

        waiters = []
        for name in ("oldest", "older", "newest"):
            waiters.append(asyncio.create_task(wait(name)))
            await asyncio.sleep(0.05)
        assert admission.waiting == 3
        await admission.leave()  # the slot goes to "newest"
        await asyncio.sleep(0.05)
        await admission.leave()  # "newest" done: to "older"
        await asyncio.gather(*waiters)
        assert (admission.in_flight, admission.waiting) == (1, 0)
        return order

    assert asyncio.run(run()) == [("newest", None), ("older", None), ("oldest", Refusal.QUEUE_TIMEOUT)]


def test_a_client_gone_while_waiting_takes_no_slot() -> None:
    async def run() -> tuple[int, int, Refusal | None]:
        admission = Admission(AdmissionConfig(max_in_flight_per_engine=1, queue_size=4, queue_timeout_s=5))
        assert await admission.enter(1) is None
        other = asyncio.create_task(admission.enter(1))
        await asyncio.sleep(0.05)
        gone = asyncio.create_task(admission.enter(1))  # the newest waiter ...
        await asyncio.sleep(0.05)
        gone.cancel()  # ... whose client leaves
        await asyncio.sleep(0.05)
        waiting = admission.waiting
        await admission.leave()
        return waiting, admission.in_flight, await other

    assert asyncio.run(run()) == (1, 1, None)  # the slot went to the other waiter


def test_slots_added_go_to_waiters_at_once() -> None:
    async def run() -> Refusal | None:
        admission = Admission(AdmissionConfig(max_in_flight_per_engine=1, queue_size=4, queue_timeout_s=5))
        assert await admission.enter(1) is None
        waiter = asyncio.create_task(admission.enter(1))
        await asyncio.sleep(0.05)
        assert await admission.enter(3) is None  # an engine added: 3 slots, one for the waiter, one for this
        return await asyncio.wait_for(waiter, 1)

    assert asyncio.run(run()) is None
