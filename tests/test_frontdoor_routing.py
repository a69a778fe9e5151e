"""The front door against real HTTP servers standing in for engines: routing policies,
retries, prefill fallback, cancellation on disconnect, /health, metrics, request ids."""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import httpx
import pytest

from common.config import AdmissionConfig
from door.admission import Admission
from door.builder import build_door
from door.policies import EngineLoad, LeastOutstanding, PrefixAffinity, RoundRobin, affinity_key
from door.routing import RoutingTable
from testkit.helpers import free_port, service_config, wait_for
from testkit.metrics import metric, samples
from tests.fake_engines import FakeEngine, serving


@contextmanager
def door(
    engines: list[FakeEngine], policy: str = "round_robin", admission: AdmissionConfig | Admission | None = None,
    api_key: str | None = None, **config_fields: Any,
) -> Iterator[tuple[str, RoutingTable]]:  # fmt: skip
    """A door built as a deployment builds it (``ROUTING_POLICY=policy``, ``API_KEY``, other
    ServiceConfig fields as given) in front of ``engines``."""
    config = service_config(ROUTING_POLICY=policy, **({"API_KEY": api_key} if api_key is not None else {}))
    if isinstance(admission, AdmissionConfig):
        config, admission = dataclasses.replace(config, admission=admission), None
    config = dataclasses.replace(config, **config_fields)
    port = free_port()
    with ExitStack() as stack:
        for engine in engines:
            stack.enter_context(serving(engine.app(), engine.port))
        door = build_door(config, [e.info for e in engines], "m", admission=admission)
        stack.enter_context(serving(door.app, port, door.uvicorn_config("127.0.0.1", port, drain_timeout_s=5)))
        yield f"http://127.0.0.1:{port}", door.table


def _served_by(engines: list[FakeEngine]) -> dict[str, int]:
    return {e.name: len(e.received) for e in engines}


def test_round_robin_takes_turns() -> None:
    engines = [FakeEngine(f"c{i}", "colocated") for i in range(3)]
    with door(engines) as (url, _):
        for i in range(6):
            assert httpx.post(f"{url}/v1/completions", json={"prompt": f"p{i}"}, timeout=10).status_code == 200
    assert _served_by(engines) == {"c0": 2, "c1": 2, "c2": 2}


def test_least_outstanding_avoids_the_busy_engine() -> None:
    slow, fast = FakeEngine("slow", "colocated", delay_s=2.0), FakeEngine("fast", "colocated")
    with door([slow, fast], "least_outstanding") as (url, _):
        blocker = threading.Thread(target=httpx.post, args=(f"{url}/v1/completions",), kwargs={"json": {"prompt": "x"}, "timeout": 10})
        blocker.start()
        deadline = time.monotonic() + 5
        while not slow.received:  # the first request (ties go in turn: slow first) holds the slow engine
            assert time.monotonic() < deadline, "the first request never reached the slow engine"
            time.sleep(0.01)
        for i in range(4):
            httpx.post(f"{url}/v1/completions", json={"prompt": f"q{i}"}, timeout=10)
        blocker.join()
    assert (len(slow.received), len(fast.received)) == (1, 4)  # nothing more went to the engine with a request in flight


def test_prefix_affinity_keeps_a_prefix_on_one_engine_and_spreads_others() -> None:
    engines = [FakeEngine(f"c{i}", "colocated") for i in range(3)]
    with door(engines, "prefix_affinity") as (url, _):
        shared = "You are a helpful assistant. " * 20
        for i in range(5):
            httpx.post(f"{url}/v1/completions", json={"prompt": shared + f"question {i}"}, timeout=10)
        assert sorted(_served_by(engines).values()) == [0, 0, 5]
        hot = next(name for name, count in _served_by(engines).items() if count == 5)
        for i in range(30):
            httpx.post(f"{url}/v1/completions", json={"prompt": f"{i} different system prompt " * 20}, timeout=10)
    spread = {name: count - (5 if name == hot else 0) for name, count in _served_by(engines).items()}
    assert sum(spread.values()) == 30 and min(spread.values()) >= 5  # 30 distinct prefixes: every engine gets some


def test_prefix_affinity_spills_a_hot_prefix_when_its_engine_is_busy() -> None:
    policy = PrefixAffinity(slack=2)
    engines = [EngineLoad("a", "u", "colocated"), EngineLoad("b", "u", "colocated")]
    key = b"hot prefix"
    preferred = policy.order(engines, key)[0]
    preferred.outstanding = 3  # more than the least busy (0) plus the slack
    assert policy.order(engines, key)[0] is not preferred
    preferred.outstanding = 2
    assert policy.order(engines, key)[0] is preferred


def test_policies_order_every_candidate() -> None:
    engines = [EngineLoad(n, "u", "prefill", outstanding=o) for n, o in (("a", 2), ("b", 0), ("c", 1))]
    assert [e.name for e in LeastOutstanding().order(engines, b"")] == ["b", "c", "a"]
    robin = RoundRobin()
    assert [robin.order(engines, b"")[0].name for _ in range(4)] == ["a", "b", "c", "a"]
    assert affinity_key({"prompt": [1, 2, 3]}) == affinity_key({"prompt": [[1, 2, 3]]})
    assert affinity_key({"messages": [{"role": "user", "content": "hi"}]}) != b""


def test_pd_request_goes_prefill_then_decode_with_params_and_request_id() -> None:
    prefill, decode = FakeEngine("p0", "prefill"), FakeEngine("d0", "decode")
    with door([prefill, decode]) as (url, _):
        response = httpx.post(f"{url}/v1/chat/completions", headers={"X-Request-Id": "req-42"},
                              json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 9}, timeout=10)  # fmt: skip
    assert response.status_code == 200 and response.headers["X-Request-Id"] == "req-42"
    assert response.json()["choices"][0]["message"]["content"] == "d0"
    (first,), (second,) = prefill.received, decode.received
    assert first["path"] == second["path"] == "/v1/chat/completions"
    assert first["body"]["max_tokens"] == 1 and first["body"]["kv_transfer_params"] == {"do_remote_decode": True}
    assert second["body"]["max_tokens"] == 9 and second["body"]["kv_transfer_params"]["from"] == "p0"
    assert first["request_id"] == second["request_id"] == "req-42"


def test_failed_engines_are_retried_before_the_first_byte() -> None:
    dead = FakeEngine("dead", "colocated")  # never started: connection refused
    broken = FakeEngine("broken", "colocated", fail_status=503)
    good = FakeEngine("good", "colocated")
    metrics_url = ""
    with door([broken, good]) as (url, table):
        table.update([dead.info, broken.info, good.info])
        for i in range(6):
            body = {"prompt": f"p{i}", "stream": i % 2 == 0}
            response = httpx.post(f"{url}/v1/completions", json=body, timeout=10)
            assert response.status_code == 200 and "good" in response.text
        metrics_url = url
        assert metric(metrics_url, "frontdoor_retries_total") == 2  # each failing engine tried once, then suspected


def test_no_prefill_left_means_the_decode_computes_the_prompt() -> None:
    prefill, decode = FakeEngine("p0", "prefill", fail_status=500), FakeEngine("d0", "decode")
    with door([prefill, decode]) as (url, _):
        response = httpx.post(f"{url}/v1/completions", json={"prompt": "hello", "max_tokens": 5}, timeout=10)
        assert response.status_code == 200 and response.json()["choices"][0]["text"] == "d0"
        assert "kv_transfer_params" not in decode.received[0]["body"]
        assert metric(url, "frontdoor_prefill_fallbacks_total") == 1


def test_client_disconnect_cancels_the_engine_request() -> None:
    slow_stream = FakeEngine("s", "colocated", stream_chunks=50, chunk_delay_s=0.1)
    slow_answer = FakeEngine("t", "colocated", delay_s=5.0)
    with door([slow_stream]) as (url, table):
        with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": "x", "stream": True},
                          headers={"X-Request-Id": "streamed"}, timeout=10) as response:  # fmt: skip
            next(response.iter_lines())
        deadline = time.monotonic() + 5
        while "streamed" not in slow_stream.cancelled and time.monotonic() < deadline:
            time.sleep(0.05)
        assert slow_stream.cancelled == ["streamed"] and slow_stream.finished == []
    with door([slow_answer]) as (url, _):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json={"prompt": "x"}, headers={"X-Request-Id": "plain"}, timeout=0.5)
        deadline = time.monotonic() + 5
        while "plain" not in slow_answer.cancelled and time.monotonic() < deadline:
            time.sleep(0.05)
        assert slow_answer.cancelled == ["plain"]
        assert metric(url, "frontdoor_client_disconnects_total") == 1


def test_health_needs_one_engine_that_can_answer() -> None:
    prefill, decode = FakeEngine("p0", "prefill"), FakeEngine("d0", "decode")
    with door([prefill, decode]) as (url, table):
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
        table.update([prefill.info, {**decode.info, "state": "restarting"}], version=1)
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200  # the prefill serves whole requests
        table.update([{**prefill.info, "state": "restarting"}, {**decode.info, "state": "restarting"}], version=2)
        unhealthy = httpx.get(f"{url}/health", timeout=5)
        assert unhealthy.status_code == 503 and unhealthy.json()["error"]["type"] == "service_unavailable"


def test_no_decode_left_means_a_prefill_serves_the_whole_request() -> None:
    prefill, decode = FakeEngine("p0", "prefill"), FakeEngine("d0", "decode")
    with door([prefill, decode]) as (url, table):
        table.update([prefill.info, {**decode.info, "state": "restarting"}], version=1)
        for stream in (False, True):
            body = {"prompt": "hello", "max_tokens": 9, "stream": stream}
            response = httpx.post(f"{url}/v1/completions", json=body, timeout=10)
            assert response.status_code == 200 and "p0" in response.text
        assert [r["body"] for r in prefill.received] == [
            {"prompt": "hello", "max_tokens": 9, "stream": False, "model": "m"},
            {"prompt": "hello", "max_tokens": 9, "stream": True, "model": "m", "return_token_ids": True},
        ]  # the client's own request: no prefill-only max_tokens, no kv_transfer_params (a stream
        # is asked for its token ids, so that it can go on elsewhere if its engine dies)
        assert decode.received == []
        assert metric(url, "frontdoor_decode_fallbacks_total") == 2


def test_pd_requests_take_turns_on_the_prefill_engines() -> None:
    prefills, decode = [FakeEngine("p0", "prefill"), FakeEngine("p1", "prefill")], FakeEngine("d0", "decode")
    with door([*prefills, decode]) as (url, _):
        for index in range(4):
            assert httpx.post(f"{url}/v1/completions", json={"prompt": f"p{index}"}, timeout=10).status_code == 200
    assert [len(engine.received) for engine in prefills] == [2, 2]  # round robin: one prefill leg each in turn


def test_a_decode_found_dead_costs_no_request_while_a_prefill_can_serve_it() -> None:
    """The only decode engine was killed and the table still calls it healthy: the first
    request finds it dead after its prefill leg, and the prefill serves it whole (no 503)."""
    prefill, decode = FakeEngine("p0", "prefill"), FakeEngine("d0", "decode")
    with door([prefill, decode]) as (url, table):
        table.update([prefill.info, {**decode.info, "port": free_port()}], version=1)  # nothing listens there
        for index in range(3):
            response = httpx.post(f"{url}/v1/completions", json={"prompt": f"p{index}", "max_tokens": 4}, timeout=10)
            assert (response.status_code, response.json()["choices"][0]["text"]) == (200, "p0"), response.text
        first = [r["body"] for r in prefill.received[:2]]
        assert first[0]["max_tokens"] == 1 and "kv_transfer_params" in first[0]  # the prefill leg, then
        assert first[1] == {"prompt": "p0", "max_tokens": 4, "model": "m"}  # the client's own request, whole
        assert decode.received == []
        assert metric(url, "frontdoor_decode_fallbacks_total") == 3  # the first after its prefill leg, the rest at once


def test_a_decode_answering_a_server_error_hands_the_request_to_a_prefill_whole() -> None:
    """What a decode whose EngineCore died answers (500): not relayed while a prefill engine
    can serve the request whole, streamed or not."""
    prefill, decode = FakeEngine("p0", "prefill"), FakeEngine("d0", "decode", fail_status=500)
    with door([prefill, decode]) as (url, _):
        for stream in (False, True):
            response = httpx.post(f"{url}/v1/completions", json={"prompt": "p", "max_tokens": 4, "stream": stream}, timeout=10)
            assert response.status_code == 200 and "p0" in response.text, response.text
        assert len(decode.received) == 2  # a 500 keeps an engine in rotation: each request asked it once
        assert metric(url, "frontdoor_decode_fallbacks_total") == 2


def test_a_stuck_prefill_is_abandoned_and_the_decode_computes_the_prompt() -> None:
    prefill, decode = FakeEngine("p0", "prefill", delay_s=5), FakeEngine("d0", "decode")
    with door([prefill, decode], prefill_timeout_s=0.5) as (url, table):
        started = time.monotonic()
        response = httpx.post(f"{url}/v1/completions", json={"prompt": "p", "max_tokens": 4}, timeout=10)
        assert (response.status_code, response.json()["choices"][0]["text"]) == (200, "d0")
        assert time.monotonic() - started < 2
        assert [r["body"] for r in decode.received] == [{"prompt": "p", "max_tokens": 4, "model": "m"}]  # computes it all
        deadline = time.monotonic() + 5
        while not prefill.cancelled and time.monotonic() < deadline:
            time.sleep(0.05)
        assert prefill.cancelled == [prefill.received[0]["request_id"]]  # the abandoned leg was aborted
        assert not table.healthy("prefill")  # suspected
        assert metric(url, "frontdoor_prefill_fallbacks_total") == 1


def test_malformed_bodies_get_openai_4xx() -> None:
    with door([FakeEngine("c0", "colocated")]) as (url, _):
        cases = [(b"{oops", 400), (b"[1, 2]", 400), (b'{"model": "m"}', 400)]
        for content, status in cases:
            response = httpx.post(f"{url}/v1/chat/completions", content=content, timeout=5)
            assert response.status_code == status and response.json()["error"]["type"] == "invalid_request_error"
        wrong = httpx.post(f"{url}/v1/completions", json={"model": "other", "prompt": "x"}, timeout=5)
        assert wrong.status_code == 404
        counts = collections.Counter(
            line.split('status="')[1][:3] for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines()
            if line.startswith("frontdoor_requests_total{")
        )
        assert set(counts) == {"400", "404"}


def test_an_engine_error_on_one_request_keeps_the_engine_in_rotation() -> None:
    erring = FakeEngine("erring", "colocated", fail_status=500)  # this request's own failure
    unavailable = FakeEngine("unavailable", "colocated", fail_status=503)
    good = FakeEngine("good", "colocated")
    with door([erring, unavailable, good]) as (url, table):
        for i in range(3):  # round robin: each engine comes first once
            response = httpx.post(f"{url}/v1/completions", json={"prompt": f"p{i}"}, timeout=10)
            assert response.status_code == 200 and "good" in response.text
        assert sorted(engine.name for engine in table.healthy("colocated")) == ["erring", "good"]


def test_in_flight_counts_survive_routing_table_updates() -> None:
    engines = [FakeEngine("p0", "prefill").info, FakeEngine("d0", "decode").info]
    table = RoutingTable(engines)
    prefill = table.healthy("prefill")[0]
    table.acquire(prefill)
    table.update(engines, version=1)  # the Controller's periodic copy, a request in flight
    assert table.healthy("prefill")[0].outstanding == 1
    table.release(prefill)
    restarted = [{**engines[0], "port": engines[0]["port"] + 1}, engines[1]]  # p0 restarted on a new port
    table.update(restarted, version=2)
    assert [(e.name, e.outstanding, e.url.rsplit(":", 1)[1]) for e in table.all_engines()] == [
        ("p0", 0, str(restarted[0]["port"])),
        ("d0", 0, str(engines[1]["port"])),
    ]


def test_health_gauge_returns_to_1_when_an_engine_is_no_longer_suspect(monkeypatch: pytest.MonkeyPatch) -> None:
    from door import routing

    monkeypatch.setattr(routing, "SUSPECT_S", 0.5)
    unavailable, good = FakeEngine("unavailable", "colocated", fail_status=503), FakeEngine("good", "colocated")
    with door([unavailable, good]) as (url, _):
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "p"}, timeout=10).status_code == 200
        gauge = {"engine": "unavailable", "role": "colocated"}
        assert samples(url, "frontdoor_engine_healthy", **gauge) == [0]
        wait_for(lambda: samples(url, "frontdoor_engine_healthy", **gauge) == [1], 5, "the gauge back at 1 once the engine is no longer suspect")


def _concurrent_posts(url: str, bodies: list[dict[str, object]], admission: Admission) -> list[tuple[httpx.Response, float]]:
    """Send ``bodies`` at once, in this order: each is sent once the door has taken the one
    before it (given a slot, queued or answered); each answer with the seconds it took."""
    results: list[tuple[httpx.Response, float]] = [None] * len(bodies)  # type: ignore[list-item]

    def taken() -> int:
        return admission.in_flight + admission.waiting + sum(result is not None for result in results)

    def post(index: int) -> None:
        started = time.monotonic()
        response = httpx.post(f"{url}/v1/completions", json=bodies[index], timeout=30)
        results[index] = (response, time.monotonic() - started)

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(bodies))]
    for sent, thread in enumerate(threads, start=1):
        thread.start()
        deadline = time.monotonic() + 10
        while taken() < sent:
            assert time.monotonic() < deadline, f"the door did not take request {sent - 1} within 10 s"
            time.sleep(0.002)
    for thread in threads:
        thread.join()
    return results


def test_overload_gets_429_with_retry_after_and_no_request_waits_past_the_queue_timeout() -> None:
    slow = FakeEngine("c0", "colocated", delay_s=3.0)
    limits = AdmissionConfig(max_in_flight_per_engine=2, queue_size=2, queue_timeout_s=0.5)
    admission = Admission(limits)
    with door([slow], admission=admission) as (url, _):
        results = _concurrent_posts(url, [{"prompt": f"p{i}"} for i in range(8)], admission)
        refused = [(response, seconds) for response, seconds in results if response.status_code == 429]
        assert [response.status_code for response, _ in results] == [200, 200] + [429] * 6
        assert all(r.headers["Retry-After"] == "1" and r.json()["error"]["type"] == "rate_limit_exceeded" for r, _ in refused)
        assert all(seconds < 2.0 for _, seconds in refused)  # the queue timeout (0.5 s), not the engine's 3 s
        assert len(slow.received) == 2  # refused requests never reached the engine
        assert metric(url, "frontdoor_refused_total", reason="queue_timeout") == 2
        assert metric(url, "frontdoor_refused_total", reason="queue_full") == 4


def test_queued_requests_are_served_as_slots_free() -> None:
    engine = FakeEngine("c0", "colocated", delay_s=0.5, stream_chunks=2, chunk_delay_s=0.25)
    limits = AdmissionConfig(max_in_flight_per_engine=1, queue_size=4, queue_timeout_s=10)
    admission = Admission(limits)
    with door([engine], admission=admission) as (url, _):
        started = time.monotonic()
        results = _concurrent_posts(url, [{"prompt": f"p{i}", "stream": i == 0} for i in range(3)], admission)
        assert [response.status_code for response, _ in results] == [200, 200, 200]
        # One at a time: the stream (0.5 s + 2 x 0.25 s) holds its slot to its end, then 2 x 0.5 s.
        assert time.monotonic() - started >= 1.95
        assert len(engine.finished) == 3


def test_engines_in_doubt_are_tried_last_rather_than_answering_503() -> None:
    slow_to_probe, good = FakeEngine("slow-to-probe", "colocated"), FakeEngine("good", "colocated")
    with door([slow_to_probe, good]) as (url, table):
        table.update([{**slow_to_probe.info, "state": "unhealthy"}, good.info], version=1)  # missed health probes
        for i in range(3):
            assert httpx.post(f"{url}/v1/completions", json={"prompt": f"p{i}"}, timeout=10).status_code == 200
        assert (len(slow_to_probe.received), len(good.received)) == (0, 3)  # healthy ones first
        table.update([{**slow_to_probe.info, "state": "unhealthy"}, {**good.info, "state": "restarting"}], version=2)
        response = httpx.post(f"{url}/v1/completions", json={"prompt": "last resort"}, timeout=10)
        assert response.status_code == 200 and "slow-to-probe" in response.text  # alive, so asked, not a 503
        assert len(good.received) == 3  # a restarting engine is not asked


def test_api_key_guards_every_path_but_health_and_goes_to_the_engines() -> None:
    engine = FakeEngine("c0", "colocated")
    with door([engine], api_key="s3cret") as (url, _):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}, {"Authorization": "Bearer s3cret2"}):
            refused = httpx.post(f"{url}/v1/completions", json={"prompt": "p"}, headers=headers, timeout=10)
            assert refused.status_code == 401 and refused.json()["error"]["type"] == "invalid_request_error"
            for path in ("/v1/models", "/metrics", "/admin/engines", "/no-such-path"):
                refused = httpx.get(f"{url}{path}", headers=headers, timeout=10)
                assert (refused.status_code, refused.json()["error"]["code"]) == (401, 401), path
        assert engine.received == []  # refused requests never reach an engine
        key = {"Authorization": "Bearer s3cret"}
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "p"}, headers=key, timeout=10).status_code == 200
        assert httpx.post(f"{url}/v1/chat/completions", json={"messages": []}, headers=key, timeout=10).status_code == 200
        assert [r["authorization"] for r in engine.received] == ["Bearer s3cret"] * 2  # the engines need it too
        assert httpx.get(f"{url}/v1/models", headers=key, timeout=10).status_code == 200
        assert httpx.get(f"{url}/metrics", headers=key, timeout=10).status_code == 200
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200


def test_metrics_public_opens_metrics_alone() -> None:
    engine = FakeEngine("c0", "colocated")
    door_ = build_door(service_config(ROUTING_POLICY="round_robin", API_KEY="s3cret", METRICS_PUBLIC="1"), [engine.info], "m")
    port = free_port()
    with serving(engine.app(), engine.port), serving(door_.app, port, door_.uvicorn_config("127.0.0.1", port, 5)):
        assert httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).status_code == 401
    without_key = FakeEngine("c1", "colocated")
    with door([without_key]) as (url, _):  # no API_KEY: nothing sent
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "p"}, timeout=10).status_code == 200
        assert without_key.received[0]["authorization"] == ""
