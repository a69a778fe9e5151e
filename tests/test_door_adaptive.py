"""The door with ROLES=adaptive engines (real HTTP servers standing in for them): each
routes as the role it acts in now, a change is one table update, an idle decode engine
serves a request whole while every prefill engine is busy, and the role planner's scale
steps run once each."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx

from common.config import SloConfig
from door.door_metrics import DoorMetrics
from door.engine_client import EngineClient
from door.engine_watch import EngineWatch
from door.routing import PREFILL_SLOTS, RoutingTable
from door.slo import SloCounts
from testkit.metrics import metric
from tests.fake_engines import FakeEngine
from tests.test_frontdoor_routing import door


def _adaptive(name: str, acting: str, delay_s: float = 0.0) -> FakeEngine:
    engine = FakeEngine(name, "adaptive", delay_s=delay_s)
    engine.acting = acting  # type: ignore[attr-defined]
    return engine


def _infos(engines: list[FakeEngine]) -> list[dict[str, object]]:
    return [{**engine.info, "acting": engine.acting} for engine in engines]  # type: ignore[attr-defined]


def _legs(engine: FakeEngine) -> list[str]:
    """What each request ``engine`` got was: a prefill leg, a decode leg, or a whole request."""
    kinds = []
    for received in engine.received:
        params = received["body"].get("kv_transfer_params") or {}
        kinds.append("prefill" if params.get("do_remote_decode") else "decode" if params.get("do_remote_prefill") else "whole")
    return kinds


def _update(table: RoutingTable, engines: list[FakeEngine], version: int) -> None:
    table.update(_infos(engines), version)


def _first_request_prefilling(url: str, prefill: FakeEngine, answers: list[httpx.Response] | None = None) -> threading.Thread:
    """A request sent in the background, returned once its prefill leg is in flight on
    ``prefill`` (its answer appended to ``answers``); join it for the answer."""
    keep = answers if answers is not None else []
    thread = threading.Thread(target=lambda: keep.append(httpx.post(f"{url}/v1/completions", json={"prompt": "first"},
                                                                    timeout=10)))  # fmt: skip
    thread.start()
    while not prefill.received:
        threading.Event().wait(0.01)
    return thread


def test_acting_roles_route_and_change_with_one_table_update() -> None:
    first, second = _adaptive("adaptive-0", "colocated"), _adaptive("adaptive-1", "colocated")
    engines = [first, second]
    with door(engines, policy="round_robin") as (url, table):
        _update(table, engines, 1)
        assert table.adaptive and not table.disaggregated
        for index in range(2):
            assert httpx.post(f"{url}/v1/completions", json={"prompt": f"p{index}"}, timeout=10).status_code == 200
        assert (_legs(first), _legs(second)) == (["whole"], ["whole"])
        first.acting, second.acting = "prefill", "decode"  # type: ignore[attr-defined]
        _update(table, engines, 2)
        assert table.disaggregated and [e.name for e in table.healthy("prefill")] == ["adaptive-0"]
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "split"}, timeout=10).status_code == 200
        assert (_legs(first), _legs(second)) == (["whole", "prefill"], ["whole", "decode"])
        gauges = {(name, role): metric(url, "frontdoor_engine_acting_role", engine=name, role=role)
                  for name in ("adaptive-0", "adaptive-1") for role in ("prefill", "decode", "colocated")}  # fmt: skip
        assert gauges == {("adaptive-0", "prefill"): 1, ("adaptive-0", "decode"): 0, ("adaptive-0", "colocated"): 0,
                          ("adaptive-1", "prefill"): 0, ("adaptive-1", "decode"): 1, ("adaptive-1", "colocated"): 0}  # fmt: skip
        rows = httpx.get(f"{url}/admin/engines", timeout=10).json()["engines"]
        assert [(row["name"], row["role"], row["acting"]) for row in rows] == [
            ("adaptive-0", "adaptive", "prefill"), ("adaptive-1", "adaptive", "decode")]  # fmt: skip
        assert httpx.get(f"{url}/admin/roles", timeout=10).status_code == 501  # no planner behind this door


def test_an_idle_decode_engine_serves_a_request_whole_while_the_prefill_engine_is_busy() -> None:
    prefill, decode = _adaptive("adaptive-0", "prefill", delay_s=1.5), _adaptive("adaptive-1", "decode")
    engines = [prefill, decode]
    with door(engines) as (url, table):
        _update(table, engines, 1)
        slow = _first_request_prefilling(url, prefill)
        response = httpx.post(f"{url}/v1/completions", json={"prompt": "second"}, timeout=10)
        slow.join()
        assert response.status_code == 200 and response.json()["choices"][0]["text"] == "adaptive-1"
        assert (_legs(prefill), _legs(decode)) == (["prefill"], ["whole", "decode"])
        assert metric(url, "frontdoor_whole_on_idle_decode_total") == 1
        # nothing in flight: the next request takes both legs again
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "third"}, timeout=10).status_code == 200
        assert (_legs(prefill), _legs(decode)) == (["prefill", "prefill"], ["whole", "decode", "decode"])


def test_with_several_decode_engines_none_is_lent_a_whole_request() -> None:
    """On 32 simulated engines lent requests stalled the decode engines' streams and the
    prefill side read idle; a pool of several decode engines is the planner's to balance."""
    prefill = _adaptive("adaptive-0", "prefill", delay_s=1.5)
    decodes = [_adaptive("adaptive-1", "decode"), _adaptive("adaptive-2", "decode")]
    engines = [prefill, *decodes]
    with door(engines) as (url, table):
        _update(table, engines, 1)
        slow = _first_request_prefilling(url, prefill)
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "second"}, timeout=10).status_code == 200
        slow.join()
        assert _legs(prefill) == ["prefill", "prefill"] and sorted(_legs(decodes[0]) + _legs(decodes[1])) == ["decode", "decode"]
        assert metric(url, "frontdoor_whole_on_idle_decode_total") == 0


def test_a_request_whose_pool_turns_colocated_during_its_prefill_leg_is_decoded_all_the_same() -> None:
    """Seen in bench adaptive-roles: the roles went 1P+1D -> 2C while a 2,048-token prompt's
    prefill leg ran; its decode leg found no decode engine and the client got a 503."""
    prefill, decode = _adaptive("adaptive-0", "prefill", delay_s=1.0), _adaptive("adaptive-1", "decode")
    engines = [prefill, decode]
    with door(engines) as (url, table):
        _update(table, engines, 1)
        answers: list[httpx.Response] = []
        request = _first_request_prefilling(url, prefill, answers)
        prefill.acting = decode.acting = "colocated"  # type: ignore[attr-defined]
        _update(table, engines, 2)
        request.join()
        assert answers[0].status_code == 200, answers[0].text
        # the handed-over prompt is loaded by a colocated engine, as a decode leg
        assert sorted(_legs(prefill) + _legs(decode)) == ["decode", "prefill"]


def test_each_scale_step_the_planner_decides_runs_once_in_the_background() -> None:
    table = RoutingTable([{"name": "adaptive-0", "role": "adaptive", "host": "127.0.0.1", "port": 1, "acting": "colocated"}])
    metrics = DoorMetrics()
    started = time.time()

    class Planner:  # the Controller's side of common/role_port.py: the decisions so far
        decisions: list[dict[str, object]] = [{"at": started - 5, "scale": 1}]  # decided before this door started

        def observe(self, levels: dict[str, object]) -> list[dict[str, object]]:
            return list(self.decisions)

        def set_roles(self, roles: dict[str, str], reason: str) -> dict[str, object]:
            raise AssertionError("not asked")

    steps: list[int] = []

    async def scale(delta: int) -> None:
        steps.append(delta)

    planner = Planner()
    watch = EngineWatch(table, None, None, EngineClient(), metrics, SloCounts(SloConfig(), metrics.slo_requests).levels,
                        planner, scale=scale)  # fmt: skip

    async def windows() -> None:
        await watch.report_levels()
        planner.decisions.append({"at": started + 1, "scale": 1})
        for _ in range(3):  # the same decision, reported again: not run again
            await watch.report_levels()
            await asyncio.sleep(0)
        planner.decisions.append({"at": started + 2, "scale": -1})
        planner.decisions.append({"at": started + 3, "moved": {"adaptive-0": ["colocated", "prefill"]}, "scale": 0})
        await watch.report_levels()
        await asyncio.sleep(0)

    asyncio.run(windows())
    assert steps == [1, -1]
    assert len(watch.series) == 5 and watch.decisions == planner.decisions


def test_an_adaptive_pool_admits_streams_per_answering_engine_and_two_per_prefill_engine() -> None:
    """On the ramp a split of 22 prefill and 1 decode engine let the door admit 12 requests
    (MAX_IN_FLIGHT_PER_ENGINE x decode engines): the rest queued at the door, their TTFT
    missed and the planner read prompts queueing. Admitting 12 per engine whatever its role
    put 60 streams on each of 6 decode engines at 1.5x load. A prefill engine is kept busy
    by a prompt computing and one waiting."""
    infos = [{"name": f"adaptive-{i}", "role": "adaptive", "host": "127.0.0.1", "port": i + 1,
              "acting": "decode" if i >= 3 else "prefill", "state": "healthy"} for i in range(5)]  # fmt: skip
    assert RoutingTable(infos).admission_slots(12) == 2 * 12 + 3 * PREFILL_SLOTS == 30
    colocated = [{**info, "acting": "colocated"} for info in infos]
    assert RoutingTable(colocated).admission_slots(12) == 60
    fixed = [{**info, "role": info["acting"]} for info in infos]
    assert RoutingTable(fixed).admission_slots(12) == 24  # fixed PD: the decode engines serve the answers
