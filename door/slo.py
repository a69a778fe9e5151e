"""Whether a request met the service levels, as its client saw them at the door: its
time to first token within ``SLO_TTFT_MS`` and its inter-token latency within
``SLO_ITL_MS``. Requests that met both, per second, are the goodput (DistServe's).

A stream's TTFT is its first token event's arrival at the door, from the request's; its
inter-token latency is the mean gap between its token events (what ``vllm bench serve``
calls TPOT): from the first to the last, over the events less one. The events are
counted in the bytes relayed as they end (a blank line: a token's own newlines are
escaped in its JSON; one split over two pieces is counted too), less ``[DONE]`` and the
usage event (no choices). A whole (not streamed) answer reaches the client with its last byte: its
TTFT is its latency, and it has no gaps. Pure bookkeeping, a few C-level byte counts per
chunk; no I/O."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from typing import Any

from common.config import SloConfig
from common.service_levels import ServiceLevels

MET = "met"
OUTCOMES = (MET, "missed_ttft", "missed_itl", "missed_both")
RECENT_KEPT = 20_000  # answers remembered for the windows (at 1,000 answers a second: 20 s)
MIN_ANSWERS = 10  # a window with fewer answers reaches further back for them (slow answers: long outputs)
LONGEST_WINDOW = 10  # times the window asked for: how far back it may reach


class StreamClock:
    """One request's answer timed as it is relayed: ``saw`` each chunk, then ``outcome``."""

    __slots__ = ("started", "first_at", "last_at", "ended_at", "tokens", "_newline_last")

    def __init__(self, started: float) -> None:
        self.started = started  # the request's arrival (perf_counter)
        self.first_at = 0.0  # first token event
        self.last_at = 0.0  # last token event
        self.ended_at = started  # last byte
        self.tokens = 0  # token events
        self._newline_last = False  # the previous piece ended with a newline

    def saw(self, chunk: bytes) -> None:
        now = self.ended_at = time.perf_counter()
        events = chunk.count(b"\n\n") + (self._newline_last and chunk[:1] == b"\n")
        self._newline_last = chunk[-1:] == b"\n"
        if events:
            # [DONE] and the usage event (no choices: vLLM's compact JSON, the simulated engine's)
            events -= chunk.count(b"[DONE]") + chunk.count(b'"choices":[]') + chunk.count(b'"choices": []')
        if events > 0:
            if not self.tokens:
                self.first_at = now
            self.last_at = now
            self.tokens += events

    def ttft_s(self) -> float:
        return (self.first_at if self.tokens else self.ended_at) - self.started

    def itl_s(self) -> float:
        return (self.last_at - self.first_at) / (self.tokens - 1) if self.tokens > 1 else 0.0

    def outcome(self, slo: SloConfig) -> str:
        """One of OUTCOMES."""
        ttft_met = self.ttft_s() * 1000.0 <= slo.ttft_ms
        itl_met = self.itl_s() * 1000.0 <= slo.itl_ms
        if ttft_met and itl_met:
            return MET
        if itl_met:
            return "missed_ttft"
        return "missed_itl" if ttft_met else "missed_both"


class SloCounts:
    """The door's ``frontdoor_slo_requests_total`` by endpoint and outcome: each answer
    that completed with 200, judged once."""

    def __init__(self, slo: SloConfig, counter: Any, target: Any = None) -> None:
        self.slo = slo
        # (when it ended, TTFT s, inter-token s or None, outcome, token events), oldest first: ``levels``' window
        self.recent: deque[tuple[float, float, float | None, str, int]] = deque(maxlen=RECENT_KEPT)
        self._counter = counter
        self._children: dict[tuple[str, str], Any] = {}  # labelled children made once
        if target is not None:  # the levels on /metrics, beside the counts (status, dashboards)
            target.labels("ttft").set(slo.ttft_ms / 1000.0)
            target.labels("itl").set(slo.itl_ms / 1000.0)

    def _count(self, endpoint: str, outcome: str, ttft_s: float, itl_s: float | None, tokens: int = 0) -> None:
        self.recent.append((time.monotonic(), ttft_s, itl_s, outcome, tokens))
        child = self._children.get((endpoint, outcome))
        if child is None:
            child = self._children[(endpoint, outcome)] = self._counter.labels(endpoint, outcome)
        child.inc()

    def stream(self, endpoint: str, clock: StreamClock) -> None:
        itl_s = clock.itl_s() if clock.tokens > 1 else None
        self._count(endpoint, clock.outcome(self.slo), clock.ttft_s(), itl_s, clock.tokens)

    def whole(self, endpoint: str, latency_s: float) -> None:
        self._count(endpoint, MET if latency_s * 1000.0 <= self.slo.ttft_ms else "missed_ttft", latency_s, None)

    def levels(self, window_s: float, in_flight: Mapping[str, int] | None = None) -> ServiceLevels:
        """The answers of the last ``window_s`` seconds, or of the last ``MIN_ANSWERS`` if
        that is fewer (at most ``LONGEST_WINDOW`` x ``window_s`` back; ``window_s`` of the
        result says how far it reached): counts by outcome and p90s."""
        now = time.monotonic()
        recent = self.recent
        while recent and recent[0][0] < now - LONGEST_WINDOW * window_s:
            recent.popleft()
        chosen = [entry for entry in recent if entry[0] >= now - window_s]
        if len(chosen) < MIN_ANSWERS and len(recent) > len(chosen):
            chosen = list(recent)[-MIN_ANSWERS:]
            window_s = max(window_s, now - chosen[0][0])
        outcomes = [entry[3] for entry in chosen]
        ttfts = sorted(entry[1] for entry in chosen)
        itls = sorted(entry[2] for entry in chosen if entry[2] is not None)
        streams = [entry for entry in chosen if entry[4]]
        return ServiceLevels(
            window_s=window_s, requests=len(outcomes), met=outcomes.count(MET),
            missed_ttft=outcomes.count("missed_ttft"), missed_itl=outcomes.count("missed_itl"),
            missed_both=outcomes.count("missed_both"), ttft_p90_ms=_percentile(ttfts, 90) * 1000.0,
            itl_p90_ms=_percentile(itls, 90) * 1000.0,
            in_flight=dict(in_flight or {}),
            output_tokens=sum(entry[4] for entry in streams) / len(streams) if streams else 0.0,
            ttft_p50_ms=_percentile(ttfts, 50) * 1000.0,
        )  # fmt: skip


def _percentile(ordered: list[float], percent: int) -> float:
    """The ``percent``th percentile (nearest rank) of an ascending list; 0 when empty."""
    return ordered[max(0, -(-percent * len(ordered) // 100) - 1)] if ordered else 0.0
