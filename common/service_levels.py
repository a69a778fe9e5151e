"""What the door observed of the service levels over a recent window, as the control
plane's role planner reads it (door/slo.py measures; controller/role_planner.py decides).
Plain data: it travels to the Controller actor as a dict."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

# The roles an adaptive engine acts in (its deploy role stays "adaptive").
ACTING_ROLES = ("prefill", "decode", "colocated")
SAME_WORKLOAD = 1.5  # output tokens (answered or asked for) within this factor: the same workload


def same_workload(tokens: float, other: float) -> bool:
    """Whether two workload signatures (mean or median output tokens) are within ``SAME_WORKLOAD`` x."""
    low, high = sorted((max(tokens, 1.0), max(other, 1.0)))
    return high <= SAME_WORKLOAD * low


@dataclass(frozen=True)
class ServiceLevels:
    """Answers completed in the last ``window_s`` seconds and how they fared."""

    window_s: float
    requests: int  # answers (HTTP 200) completed in the window
    met: int  # of which met both service levels
    missed_ttft: int  # missed the TTFT level only
    missed_itl: int  # missed the inter-token level only
    missed_both: int
    ttft_p90_ms: float  # 0 with no answers
    itl_p90_ms: float  # over streams of 2+ tokens; 0 with none
    in_flight: dict[str, int] = field(default_factory=dict)  # engine -> requests in flight through the door now
    # What the answers were like (the planner's workload signature and work estimate):
    output_tokens: float = 0.0  # mean token events per streamed answer; 0 with none
    ttft_p50_ms: float = 0.0
    arriving_tokens: float = 0.0  # the output tokens the latest requests asked for (median, door/arrivals.py); 0: unknown
    arrival_rps: float = 0.0  # requests arrived a second over the window (admitted or not); 0: unknown
    arrival_rps_before: float = 0.0  # over the window before it
    idle_s: float = 0.0  # how long in the window the door held no request (a client that paused)

    @property
    def attainment(self) -> float:
        """The share of answers that met both levels (1.0 with none)."""
        return self.met / self.requests if self.requests else 1.0

    @property
    def goodput_rps(self) -> float:
        return self.met / self.window_s if self.window_s > 0 else 0.0

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    @staticmethod
    def from_dict(data: dict[str, object]) -> ServiceLevels:
        return ServiceLevels(**data)  # type: ignore[arg-type]
