"""Overload control at the front door: a bounded number of requests in flight per
serving engine, a bounded queue before them, and a bounded wait in that queue.

A request beyond the queue, or one that waited ``queue_timeout_s`` for a slot, is
refused (the door answers 429 with Retry-After) instead of adding unbounded latency to
every request behind it. The capacity follows the routing table: requests in flight
may be at most ``max_in_flight_per_engine`` times the healthy engines that serve the
answer (decode engines, or colocated ones; ``RoutingTable.admission_slots``).

A freed slot goes to the request that has waited least (last in, first out): a queue
only stands while the load is over capacity, and there first in, first out makes every
request wait about the whole timeout, so that none meets a TTFT level shorter than it
(on the ramp at 1.5x capacity, 4 s waits: 0-2% of answers met a 2 s TTFT level); the
requests that waited longest are the ones refused.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque

from common.config import AdmissionConfig


class Refusal(str, enum.Enum):
    QUEUE_FULL = "queue_full"
    QUEUE_TIMEOUT = "queue_timeout"


class Admission:
    """Slots for requests in flight; ``enter`` (waiting in the bounded queue) and ``leave``."""

    def __init__(self, config: AdmissionConfig) -> None:
        self.config = config
        self.in_flight = 0
        self._capacity = 1  # the slots as the latest request found them
        self._waiters: deque[asyncio.Future[None]] = deque()  # oldest first; each resolved when handed a slot

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def enter(self, slots: int) -> Refusal | None:
        """Take a slot (None), or say why not. ``slots``: requests the engines now take at once."""
        self._capacity = max(1, slots)
        self._hand_over()  # the slots may have grown (engines added)
        if self.in_flight < self._capacity and not self._waiters:
            self.in_flight += 1
            return None
        if len(self._waiters) >= self.config.queue_size:
            return Refusal.QUEUE_FULL
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, self.config.queue_timeout_s)
            return None  # handed a slot (``in_flight`` counted it)
        except TimeoutError:
            return Refusal.QUEUE_TIMEOUT
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    async def leave(self) -> None:
        self.in_flight -= 1
        self._hand_over()

    def _hand_over(self) -> None:
        """Free slots to the newest waiters."""
        while self._waiters and self.in_flight < self._capacity:
            waiter = self._waiters.pop()
            if not waiter.done():
                self.in_flight += 1
                waiter.set_result(None)

    def refused(self, refusal: Refusal) -> str:
        """What a refused client is told."""
        return (f"the service is at capacity ({self.in_flight} requests in flight, {self.waiting} waiting; "
                f"{refusal.value.replace('_', ' ')}); retry later")  # fmt: skip

    @property
    def retry_after_s(self) -> int:
        """What a refused client is told to wait (whole seconds, at least 1)."""
        return max(1, round(self.config.queue_timeout_s))
