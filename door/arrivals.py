"""What the requests arriving now ask for: the output tokens (``max_tokens``, or
``max_completion_tokens``) of the latest few, as the role planner's workload signature
(``ServiceLevels.arriving_tokens``). Answers say what a workload was only once they
end, a long output's tens of seconds later; a request says it as it arrives. Pure
bookkeeping on the request path: one lookup and two appends; no I/O.

It also keeps when they arrived (``rates``): the arrival rate over a window and over
the window before, from which the planner sizes the roles for the load coming
(controller/role_sizing.py); answers lag arrivals by their latency, and a queue's.

And when the door held no request at all (``idle_s``): a client that paused (a
benchmark between its runs, a closed-loop client between phases) makes a window's
answers a second say how much came, not what the engines can serve; the planner does
not compare layouts on such a window."""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable
from itertools import takewhile
from typing import Any

from common.service_levels import same_workload

ARRIVALS_KEPT = 5  # the latest requests whose median is the signature: a new workload shows after 3 of its requests
TIMES_KEPT = 100_000  # arrival times kept for the rates (at 1,000 requests a second: two 50 s windows)
IDLE_KEPT = 10_000  # the latest spells with no request at the door


class Arrivals:
    def __init__(self, kept: int = ARRIVALS_KEPT, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._asked: deque[int] = deque(maxlen=kept)
        self._times: deque[float] = deque(maxlen=TIMES_KEPT)  # monotonic arrival times, oldest first
        self.reported = 0.0  # the signature last reported to the planner (EngineWatch sets it)
        self._in_door = 0  # requests arrived and not yet answered or refused
        self._idle_since: float | None = clock()  # the door holds no request since then; None: it holds some
        self._idle: deque[tuple[float, float]] = deque(maxlen=IDLE_KEPT)  # ended spells (from, to), oldest first

    def saw(self, body: dict[str, Any]) -> None:
        """A request arrived (``left`` once it is answered or refused); one asking no number
        of tokens counts as 0 (unknown)."""
        asked = body.get("max_completion_tokens", body.get("max_tokens"))
        self._asked.append(asked if isinstance(asked, int) and asked > 0 else 0)
        now = self._clock()
        self._times.append(now)
        if self._idle_since is not None:
            self._idle.append((self._idle_since, now))
            self._idle_since = None
        self._in_door += 1

    def left(self) -> None:
        """A request ``saw`` arrive was answered, refused or dropped."""
        self._in_door -= 1
        if self._in_door == 0:
            self._idle_since = self._clock()

    def idle_s(self, window_s: float) -> float:
        """How long in the last ``window_s`` the door held no request."""
        now = self._clock()
        start = now - window_s
        idle = now - max(start, self._idle_since) if self._idle_since is not None else 0.0
        for began, ended in reversed(self._idle):
            if ended <= start:
                break
            idle += ended - max(began, start)
        return idle

    def rates(self, window_s: float) -> tuple[float, float]:
        """Requests arrived a second over the last ``window_s`` and over the ``window_s`` before."""
        now, times = self._clock(), self._times
        while times and times[0] < now - 2 * window_s:
            times.popleft()
        latest = sum(1 for _ in takewhile(lambda arrived: arrived >= now - window_s, reversed(times)))
        return latest / window_s, (len(times) - latest) / window_s

    def tokens(self) -> float:
        """The median output tokens the latest requests asked for; 0 before any, or when most asked none."""
        return float(statistics.median(self._asked)) if self._asked else 0.0

    def moved(self) -> bool:
        """Whether the arriving workload is another than the one last reported."""
        now = self.tokens()
        return now > 0 and self.reported > 0 and not same_workload(now, self.reported)
