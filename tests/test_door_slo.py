"""Goodput at the door: each completed answer judged against SLO_TTFT_MS and SLO_ITL_MS
(door/slo.py), counted in ``frontdoor_slo_requests_total`` by outcome."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import httpx
import pytest

from common.config import SloConfig
from door import slo as slo_module
from door.door_metrics import DoorMetrics
from door.slo import StreamClock
from testkit.metrics import metric
from tests.fake_engines import FakeEngine
from tests.test_frontdoor_routing import door


@pytest.fixture
def clock_at(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """The times StreamClock reads, one per chunk, in order."""
    times: list[float] = []
    monkeypatch.setattr(slo_module.time, "perf_counter", lambda: times.pop(0))
    yield times


def _event(text: str) -> bytes:
    return b'data: {"choices":[{"index":0,"text":"' + text.encode() + b'"}]}\n\n'


def test_a_stream_s_ttft_is_its_first_token_event_and_its_itl_the_mean_gap(clock_at: list[float]) -> None:
    clock = StreamClock(started=10.0)
    clock_at.extend([10.5, 10.6, 10.8])
    clock.saw(_event("a"))  # 10.5: first token
    clock.saw(_event("b") + _event("c"))  # 10.6: two tokens in one chunk
    clock.saw(b'data: {"choices":[],"usage":{"completion_tokens":3}}\n\ndata: [DONE]\n\n')  # 10.8: no token
    assert clock.tokens == 3
    assert clock.ttft_s() == pytest.approx(0.5)
    assert clock.itl_s() == pytest.approx(0.05)  # (10.6 - 10.5) / 2 gaps
    assert clock.outcome(SloConfig(ttft_ms=600, itl_ms=60)) == "met"
    assert clock.outcome(SloConfig(ttft_ms=400, itl_ms=60)) == "missed_ttft"
    assert clock.outcome(SloConfig(ttft_ms=600, itl_ms=40)) == "missed_itl"
    assert clock.outcome(SloConfig(ttft_ms=400, itl_ms=40)) == "missed_both"


def test_the_simulated_engine_s_usage_event_is_no_token_either(clock_at: list[float]) -> None:
    clock = StreamClock(started=0.0)
    clock_at.extend([1.0, 3.0])
    clock.saw(_event("a"))
    clock.saw(b'data: {"id": "x", "choices": [], "usage": {}}\n\n')
    assert (clock.tokens, clock.ttft_s(), clock.itl_s()) == (1, 1.0, 0.0)


def test_an_event_split_over_two_pieces_counts_once_when_it_ends(clock_at: list[float]) -> None:
    clock = StreamClock(started=0.0)
    clock_at.extend([1.0, 1.1, 1.5, 2.0])
    clock.saw(b'data: {"choices":[{"text":"a\\n\\nb"}]}\n')  # 1.0: a token whose text has escaped newlines; not ended
    clock.saw(b"\n" + _event("c")[:10])  # 1.1: the first ends, the next begins
    clock.saw(_event("c")[10:])  # 1.5: the second ends
    clock.saw(b"data: [DONE]\n\n")  # 2.0
    assert (clock.tokens, clock.ttft_s(), clock.itl_s()) == (2, 1.1, pytest.approx(0.4))


def test_a_whole_answer_is_judged_by_its_latency() -> None:
    from door.door_metrics import DoorMetrics
    from door.slo import SloCounts

    metrics = DoorMetrics()
    counts = SloCounts(SloConfig(ttft_ms=500, itl_ms=1), metrics.slo_requests)
    counts.whole("completions", 0.4)
    counts.whole("completions", 0.6)
    for outcome in ("met", "missed_ttft"):
        value = metrics.registry.get_sample_value("frontdoor_slo_requests_total", {"endpoint": "completions", "outcome": outcome})
        assert value == 1.0


@pytest.mark.parametrize("stream_migrations", [1, 0])  # streams followed (continued if cut), or relayed as they are
def test_the_door_counts_each_completed_answer_by_its_outcome(stream_migrations: int) -> None:
    engine = FakeEngine("c0", "colocated", stream_chunks=5, chunk_delay_s=0.05)  # tokens ~50 ms apart
    with door([engine], slo=SloConfig(ttft_ms=5000, itl_ms=20), stream_migrations=stream_migrations) as (url, _):
        for _ in range(3):
            response = httpx.post(f"{url}/v1/completions", json={"prompt": "p", "stream": True}, timeout=10)
            assert response.status_code == 200
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "p"}, timeout=10).status_code == 200
        assert httpx.post(f"{url}/v1/completions", json={"model": "other", "prompt": "p"}, timeout=10).status_code == 404
        counted = {outcome: metric(url, "frontdoor_slo_requests_total", endpoint="completions", outcome=outcome)
                   for outcome in slo_module.OUTCOMES}  # fmt: skip
    assert counted == {"met": 1.0, "missed_ttft": 0.0, "missed_itl": 3.0, "missed_both": 0.0}


def test_streams_within_both_levels_are_goodput() -> None:
    engine = FakeEngine("c0", "colocated", stream_chunks=5, chunk_delay_s=0.05)
    with door([engine], slo=SloConfig(ttft_ms=5000, itl_ms=2000)) as (url, _):
        for _ in range(2):
            httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                          "stream": True}, timeout=10)  # fmt: skip
        assert metric(url, "frontdoor_slo_requests_total", endpoint="chat/completions", outcome="met") == 2.0
        assert metric(url, "frontdoor_slo_requests_total", outcome="missed_itl") == 0.0


def test_a_stream_slower_to_start_than_the_ttft_level_misses_it() -> None:
    engine = FakeEngine("c0", "colocated", delay_s=0.3, stream_chunks=2)
    with door([engine], slo=dataclasses.replace(SloConfig(), ttft_ms=100, itl_ms=2000)) as (url, _):
        httpx.post(f"{url}/v1/completions", json={"prompt": "p", "stream": True}, timeout=10)
        assert metric(url, "frontdoor_slo_requests_total", outcome="missed_ttft") == 1.0


def test_status_s_goodput_line_reads_the_door_s_levels_and_counts() -> None:
    from deploy.goodput import door_goodput_line

    engine = FakeEngine("c0", "colocated", stream_chunks=5, chunk_delay_s=0.05)
    with door([engine], slo=SloConfig(ttft_ms=1500, itl_ms=25), api_key="k3y") as (url, _):
        port = int(url.rsplit(":", 1)[1])
        assert door_goodput_line("127.0.0.1", port, "k3y") == (
            "service levels TTFT <= 1500 ms, inter-token <= 25 ms: 0 of 0 answers met both since the door started "
            "(missed TTFT 0, inter-token 0, both 0)")  # fmt: skip
        headers = {"Authorization": "Bearer k3y"}
        httpx.post(f"{url}/v1/completions", json={"prompt": "p", "stream": True}, headers=headers, timeout=10)
        for _ in range(3):
            httpx.post(f"{url}/v1/completions", json={"prompt": "p"}, headers=headers, timeout=10)
        assert door_goodput_line("127.0.0.1", port, "k3y") == (
            "service levels TTFT <= 1500 ms, inter-token <= 25 ms: 3 of 4 answers met both (75%) since the door "
            "started (missed TTFT 0, inter-token 1, both 0)")  # fmt: skip
        assert door_goodput_line("127.0.0.1", port, None) is None  # /metrics needs the key: no line


def test_the_planner_s_window_holds_the_last_answers_with_their_p90s(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(slo_module.time, "monotonic", lambda: now[0])
    metrics = DoorMetrics()
    counts = slo_module.SloCounts(SloConfig(ttft_ms=1000, itl_ms=50), metrics.slo_requests)
    counts.whole("completions", 5.0)  # at 100 s: leaves the window below
    now[0] = 115.0
    for ttft_ms in range(100, 1100, 100):  # ten streams: TTFT 100..1000 ms, inter-token 10..100 ms
        clock = StreamClock(started=0.0)
        clock.tokens, clock.first_at, clock.last_at = 11, ttft_ms / 1000, ttft_ms / 1000 + ttft_ms / 1000
        counts.stream("completions", clock)
    counts.whole("chat/completions", 0.25)  # a whole answer: TTFT only
    levels = counts.levels(10.0, {"e0": 3})
    assert (levels.requests, levels.met, levels.missed_ttft, levels.missed_itl, levels.missed_both) == (11, 6, 0, 5, 0)
    assert levels.ttft_p90_ms == pytest.approx(900.0)  # nearest rank of 11: the 10th (250 ms sorts in)
    assert levels.itl_p90_ms == pytest.approx(90.0)  # of the ten streams alone
    assert levels.goodput_rps == pytest.approx(0.6) and levels.in_flight == {"e0": 3}
    # the workload and its work, as the planner sizes a split: 11 tokens a stream (the whole answer has none),
    # median TTFT of the 11 answers 500 ms
    assert (levels.output_tokens, levels.ttft_p50_ms) == (11.0, pytest.approx(500.0))
    now[0] = 126.0  # none in the last 10 s: the window reaches back for the last 10 answers (slow ones, long outputs)
    later = counts.levels(10.0)
    assert (later.requests, later.window_s, later.met) == (10, pytest.approx(11.0), 5)  # the first stream left
    now[0] = 216.0  # older than 10 windows: forgotten
    assert (counts.levels(10.0).requests, counts.levels(10.0).window_s) == (0, 10.0)
