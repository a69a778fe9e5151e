"""How many engines each role of a split pool needs for the requests arriving, from the
work measured on this workload (ROLES=adaptive, a planner that scales). Pure: the role
planner feeds it the door's windows (``learn``) and asks it (``need``).

- **The rate** to size for: the window's arrivals (admitted or shed), plus their growth
  over the window before carried ahead for the time a change takes to serve (the
  planner's settling and two windows: one to judge, one for new engines to start).
  Answers lag arrivals by their latency and any queue; on a rising load a planner that
  waits for missed levels is a step behind.
- **Prefill engines**: a prefill engine computes one prompt after another, each about
  the prompt time: the lowest median TTFT seen on this workload (a prompt with no queue
  before it). ``rate x prompt time / PREFILL_BUSY`` engines.
- **Decode engines**: a decode step grows with the streams it carries, inter-token
  latency about ``b + k x streams``. The lowest inter-token p90 seen (a stream nearly
  alone: ``b + k``) and a split window's p90 at its mean streams per decode engine give
  ``k``, and so the streams one engine holds at ``DECODE_TARGET`` of the level (the
  median of the latest ``ESTIMATES_KEPT`` windows': the streams are counted once, at
  the window's end, and one count can be far off). The arrivals keep
  ``rate x output tokens x that latency`` streams (Little's law) in flight.

A workload with other output tokens (``same_workload``) starts the measures afresh;
until a split window measured the decode engines, each is taken to hold
``streams_prior`` streams (the operator's MAX_IN_FLIGHT_PER_ENGINE).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from common.config import SloConfig
from common.service_levels import ServiceLevels, same_workload

PREFILL_BUSY = 0.85  # the share of their time prefill engines are sized to be busy
DECODE_TARGET = 0.9  # decode engines are sized for this share of the inter-token level
MIN_STREAMS = 2.0  # a window with fewer streams per decode engine says nothing of their growth
MAX_ITL = 2.0  # a window with the inter-token p90 beyond this many times its level measures queues, not steps
ESTIMATES_KEPT = 5  # the latest windows' streams-per-decode-engine estimates, whose median is used
MAX_GROWTH = 2.0  # the rate sized for is at most this many times the arrivals'


@dataclass(frozen=True)
class Need:
    prefill: int
    decode: int
    rate: float  # requests a second sized for
    arriving: float  # requests a second arrived over the window
    prompt_s: float
    streams_per_decode: float

    def describe(self) -> str:
        return (f"{self.arriving:.1f} requests/s arriving, {self.rate:.1f} coming need {self.prefill}P+{self.decode}D (a prompt "
                f"{self.prompt_s * 1000:.0f} ms, {self.streams_per_decode:.1f} streams per decode engine)")  # fmt: skip


class RoleSizing:
    def __init__(self, slo: SloConfig, settle_s: float, streams_prior: int = 0) -> None:
        self.slo = slo
        self.settle_s = settle_s
        self.streams_prior = streams_prior  # streams per decode engine until measured; 0: none
        self._workload = 0.0  # output tokens of the windows measured
        self.prompt_s = math.inf
        self.one_stream_itl_ms = math.inf
        self._streams: deque[float] = deque(maxlen=ESTIMATES_KEPT)  # per decode engine at DECODE_TARGET of the level

    def learn(self, levels: ServiceLevels, roles: Mapping[str, str]) -> None:
        """Take a window's measures (answers of one workload)."""
        if levels.requests <= 0 or levels.output_tokens <= 0:
            return
        if not same_workload(levels.output_tokens, self._workload):
            self._workload, self.prompt_s, self.one_stream_itl_ms = levels.output_tokens, math.inf, math.inf
            self._streams.clear()
        if levels.ttft_p50_ms > 0:
            self.prompt_s = min(self.prompt_s, levels.ttft_p50_ms / 1000.0)
        if levels.itl_p90_ms > 0:
            self.one_stream_itl_ms = min(self.one_stream_itl_ms, levels.itl_p90_ms)
        decodes = [name for name, role in roles.items() if role == "decode"]
        streams = sum(levels.in_flight.get(name, 0) for name in decodes) / len(decodes) if decodes else 0.0
        one = self.one_stream_itl_ms
        if streams >= MIN_STREAMS and 1.1 * one < levels.itl_p90_ms <= MAX_ITL * self.slo.itl_ms:
            per_stream_ms = (levels.itl_p90_ms - one) / (streams - 1.0)
            self._streams.append(max(1.0, 1.0 + (DECODE_TARGET * self.slo.itl_ms - one) / per_stream_ms))

    @property
    def streams_per_decode(self) -> float:
        """Streams a decode engine holds at ``DECODE_TARGET`` of the level; the prior until measured."""
        return statistics.median(self._streams) if self._streams else float(self.streams_prior)

    def need(self, levels: ServiceLevels) -> Need | None:
        """The engines each role needs for the rate coming; None before both are measured."""
        if not self.streams_per_decode or math.isinf(self.prompt_s) or levels.arrival_rps <= 0 \
                or not same_workload(levels.output_tokens, self._workload):  # fmt: skip
            return None
        growth = max(0.0, levels.arrival_rps - levels.arrival_rps_before) / levels.window_s
        rate = min(MAX_GROWTH * levels.arrival_rps, levels.arrival_rps + growth * (self.settle_s + 2 * levels.window_s))
        prefill = math.ceil(rate * self.prompt_s / PREFILL_BUSY)
        streams = rate * levels.output_tokens * DECODE_TARGET * self.slo.itl_ms / 1000.0
        decode = math.ceil(streams / self.streams_per_decode)
        return Need(max(1, prefill), max(1, decode), rate, levels.arrival_rps, self.prompt_s, self.streams_per_decode)


def fit(need: Need, prefill: int, decode: int, max_engines: int) -> tuple[int, int]:
    """(prefill, decode) engines for a pool of ``prefill + decode`` grown toward ``need``
    (at most ``max_engines``): each role at least its need, the engines beyond kept where
    they are; over the limit, the limit shared in proportion to the needs (at least 1 each)."""
    total = need.prefill + need.decode
    if total > max_engines:
        share = min(max_engines - 1, max(1, math.floor(max_engines * need.prefill / total)))
        return share, max_engines - share
    size = max(prefill + decode, total)
    kept = max(need.prefill, min(prefill, size - need.decode))
    return kept, size - kept
