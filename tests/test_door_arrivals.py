"""What the arriving requests ask for (door/arrivals.py), and the role planner hearing of a
new workload within a routing-table refresh rather than a report period (door/engine_watch.py)."""

from __future__ import annotations

import asyncio
import time

from common.config import SloConfig
from door.arrivals import Arrivals
from door.door_metrics import DoorMetrics
from door.engine_client import EngineClient
from door.engine_watch import REFRESH_S, REPORT_EVERY, EngineWatch
from door.routing import RoutingTable
from door.slo import SloCounts

ENGINES = [{"name": "adaptive-0", "role": "adaptive", "host": "127.0.0.1", "port": 1, "acting": "colocated"},
           {"name": "adaptive-1", "role": "adaptive", "host": "127.0.0.1", "port": 2, "acting": "colocated"}]  # fmt: skip


def test_the_signature_is_the_median_of_the_latest_requests_asked_tokens() -> None:
    arrivals = Arrivals()
    assert arrivals.tokens() == 0.0
    for _ in range(5):
        arrivals.saw({"prompt": "x", "max_tokens": 256})
    arrivals.reported = arrivals.tokens()
    arrivals.saw({"messages": [], "max_completion_tokens": 2})
    arrivals.saw({"prompt": "x", "max_tokens": 2})
    assert (arrivals.tokens(), arrivals.moved()) == (256.0, False)  # one odd request is not a new workload
    arrivals.saw({"prompt": "x", "max_tokens": 2})
    assert (arrivals.tokens(), arrivals.moved()) == (2.0, True)
    for asked in (None, "many", -1):  # asked no number: unknown
        arrivals.saw({"prompt": "x", "max_tokens": asked})
    assert (arrivals.tokens(), arrivals.moved()) == (0.0, False)


class _Planner:
    """The Controller's side of common/role_port.py, recording what it observed."""

    def __init__(self) -> None:
        self.observed: list[tuple[float, dict[str, object]]] = []

    def observe(self, levels: dict[str, object]) -> list[dict[str, object]]:
        self.observed.append((time.monotonic(), levels))
        return []

    def set_roles(self, roles: dict[str, str], reason: str) -> dict[str, object]:
        raise AssertionError("not asked")


def test_a_new_workload_arriving_is_reported_within_a_refresh() -> None:
    table, metrics, planner = RoutingTable(ENGINES), DoorMetrics(), _Planner()
    table.update(ENGINES, 1)
    watch = EngineWatch(table, lambda: (1, ENGINES), None, EngineClient(), metrics,
                        SloCounts(SloConfig(), metrics.slo_requests).levels, planner)  # fmt: skip

    async def run() -> float:
        for _ in range(5):
            watch.arrivals.saw({"prompt": "x", "max_tokens": 256})
        await watch.report_levels()
        assert planner.observed[-1][1]["arriving_tokens"] == 256.0
        for _ in range(3):
            watch.arrivals.saw({"prompt": "x", "max_tokens": 2})
        asked = time.monotonic()
        loop = watch.start()
        assert loop is not None
        while len(planner.observed) < 2:
            await asyncio.sleep(0.01)
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        return planner.observed[-1][0] - asked

    waited = asyncio.run(run())
    assert planner.observed[-1][1]["arriving_tokens"] == 2.0
    assert waited < REFRESH_S * (REPORT_EVERY - 1)  # the periodic report comes after REPORT_EVERY refreshes
