"""Overload control at the front door: a bounded number of requests in flight per
serving engine, a bounded queue before them, and a bounded wait in that queue.

A request beyond the queue, or one that waited ``queue_timeout_s`` for a slot, is
refused (the door answers 429 with Retry-After) instead of adding unbounded latency to
every request behind it. The capacity follows the routing table: requests in flight
may be at most ``max_in_flight_per_engine`` times the healthy engines that serve the
answer (decode engines, or colocated ones; ``RoutingTable.admission_slots``).
"""

from __future__ import annotations

import asyncio
import enum
import time

from common.config import AdmissionConfig


class Refusal(str, enum.Enum):
    QUEUE_FULL = "queue_full"
    QUEUE_TIMEOUT = "queue_timeout"


class Admission:
    """Slots for requests in flight; ``enter`` (waiting in the bounded queue) and ``leave``."""

    def __init__(self, config: AdmissionConfig) -> None:
        self.config = config
        self.in_flight = 0
        self.waiting = 0
        self._freed = asyncio.Condition()

    async def enter(self, slots: int) -> Refusal | None:
        """Take a slot (None), or say why not. ``slots``: requests the engines now take at once."""
        capacity = max(1, slots)
        if self.in_flight < capacity and not self.waiting:
            self.in_flight += 1
            return None
        if self.waiting >= self.config.queue_size:
            return Refusal.QUEUE_FULL
        deadline = time.monotonic() + self.config.queue_timeout_s
        self.waiting += 1
        try:
            async with self._freed:
                while self.in_flight >= capacity:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return Refusal.QUEUE_TIMEOUT
                    try:
                        await asyncio.wait_for(self._freed.wait(), remaining)
                    except TimeoutError:
                        return Refusal.QUEUE_TIMEOUT
                self.in_flight += 1
                return None
        finally:
            self.waiting -= 1

    async def leave(self) -> None:
        self.in_flight -= 1
        async with self._freed:
            self._freed.notify_all()  # each waiter re-checks; none can miss a freed slot

    @property
    def retry_after_s(self) -> int:
        """What a refused client is told to wait (whole seconds, at least 1)."""
        return max(1, round(self.config.queue_timeout_s))
