"""What the requests arriving now ask for: the output tokens (``max_tokens``, or
``max_completion_tokens``) of the latest few, as the role planner's workload signature
(``ServiceLevels.arriving_tokens``). Answers say what a workload was only once they
end, a long output's tens of seconds later; a request says it as it arrives. Pure
bookkeeping on the request path: one lookup and one append; no I/O."""

from __future__ import annotations

import statistics
from collections import deque
from typing import Any

from common.service_levels import same_workload

ARRIVALS_KEPT = 5  # the latest requests whose median is the signature: a new workload shows after 3 of its requests


class Arrivals:
    def __init__(self, kept: int = ARRIVALS_KEPT) -> None:
        self._asked: deque[int] = deque(maxlen=kept)
        self.reported = 0.0  # the signature last reported to the planner (EngineWatch sets it)

    def saw(self, body: dict[str, Any]) -> None:
        """A request arrived; one asking no number of tokens counts as 0 (unknown)."""
        asked = body.get("max_completion_tokens", body.get("max_tokens"))
        self._asked.append(asked if isinstance(asked, int) and asked > 0 else 0)

    def tokens(self) -> float:
        """The median output tokens the latest requests asked for; 0 before any, or when most asked none."""
        return float(statistics.median(self._asked)) if self._asked else 0.0

    def moved(self) -> bool:
        """Whether the arriving workload is another than the one last reported."""
        now = self.tokens()
        return now > 0 and self.reported > 0 and not same_workload(now, self.reported)
