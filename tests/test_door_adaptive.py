"""The door with ROLES=adaptive engines (real HTTP servers standing in for them): each
routes as the role it acts in now, a change is one table update, and an idle decode
engine serves a request whole while every prefill engine is busy."""

from __future__ import annotations

import threading

import httpx

from door.routing import RoutingTable
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
        slow = threading.Thread(target=httpx.post, args=(f"{url}/v1/completions",),
                                kwargs={"json": {"prompt": "first"}, "timeout": 10})  # fmt: skip
        slow.start()
        while not prefill.received:  # the first request's prefill leg is in flight
            threading.Event().wait(0.01)
        response = httpx.post(f"{url}/v1/completions", json={"prompt": "second"}, timeout=10)
        slow.join()
        assert response.status_code == 200 and response.json()["choices"][0]["text"] == "adaptive-1"
        assert (_legs(prefill), _legs(decode)) == (["prefill"], ["whole", "decode"])
        assert metric(url, "frontdoor_whole_on_idle_decode_total") == 1
        # nothing in flight: the next request takes both legs again
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "third"}, timeout=10).status_code == 200
        assert (_legs(prefill), _legs(decode)) == (["prefill", "prefill"], ["whole", "decode", "decode"])
