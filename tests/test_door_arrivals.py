"""What the arriving requests ask for (door/arrivals.py), and the role planner hearing of a
new workload within a routing-table refresh rather than a report period (door/engine_watch.py)."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx

from common.config import AdmissionConfig, SloConfig
from door.admission import Admission
from door.arrivals import Arrivals
from door.builder import build_door
from door.door_metrics import DoorMetrics
from door.engine_client import EngineClient
from door.engine_watch import REFRESH_S, REPORT_EVERY, EngineWatch
from door.routing import RoutingTable
from door.slo import SloCounts
from testkit.helpers import free_port, service_config
from tests.fake_engines import FakeEngine, serving

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


def test_idle_time_is_the_time_in_the_window_the_door_held_no_request() -> None:
    now = [100.0]
    arrivals = Arrivals(clock=lambda: now[0])
    now[0] = 104.0
    assert arrivals.idle_s(10.0) == 4.0  # idle since it started
    arrivals.saw({"prompt": "x"})  # 104: busy
    now[0] = 106.0
    arrivals.saw({"prompt": "y"})
    arrivals.left()
    now[0] = 107.0
    arrivals.left()  # 107: idle
    now[0] = 109.0
    arrivals.saw({"prompt": "z"})  # 109: busy
    now[0] = 112.0
    assert arrivals.idle_s(10.0) == 2.0 + 2.0  # 102-104 and 107-109
    assert arrivals.idle_s(4.0) == 1.0  # 108-109
    arrivals.left()
    now[0] = 120.0
    assert arrivals.idle_s(10.0) == 8.0  # 112-120


def test_the_door_is_busy_while_it_holds_a_request_and_idle_once_each_is_answered_or_refused() -> None:
    slow = FakeEngine("c0", "colocated", delay_s=1.0)
    admission = Admission(AdmissionConfig(max_in_flight_per_engine=1, queue_size=1, queue_timeout_s=0.2))
    built = build_door(service_config(ROUTING_POLICY="round_robin"), [slow.info], "m", admission=admission)
    port = free_port()
    with serving(slow.app(), slow.port), serving(built.app, port, built.uvicorn_config("127.0.0.1", port, drain_timeout_s=5)):
        url, statuses = f"http://127.0.0.1:{port}/v1/completions", []
        threads = [threading.Thread(target=lambda: statuses.append(httpx.post(url, json={"prompt": "p"}, timeout=10).status_code))
                   for _ in range(2)]  # fmt: skip
        for thread in threads:
            thread.start()
        time.sleep(0.6)  # one answering (1 s), the other refused after 0.2 s in the queue
        assert built.watch.arrivals.idle_s(0.3) == 0.0
        for thread in threads:
            thread.join()
        time.sleep(0.5)
        assert sorted(statuses) == [200, 429]
        assert 0.45 <= built.watch.arrivals.idle_s(0.5) <= 0.5


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
