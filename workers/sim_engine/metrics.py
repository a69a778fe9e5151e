"""The simulated engine's ``/metrics``: vLLM's metric names and labels (Prometheus text),
from the scheduler's counters."""

from __future__ import annotations

import bisect
from typing import Protocol


class _Scheduler(Protocol):
    running: list[object]
    waiting: object
    prompt_tokens_by_source: dict[str, int]
    generation_tokens: int
    finished_requests: int
    preemptions: int
    busy_s: float
    late_s: float
    ttft: Histogram


class _Cache(Protocol):
    usage: float
    queries: int
    hits: int

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)  # vLLM's time_to_first_token_seconds buckets  # fmt: skip


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value

    def lines(self, name: str, labels: str) -> list[str]:
        out, cumulative = [], 0
        for bound, count in zip(self.buckets, self.counts):
            cumulative += count
            out.append(f'{name}_bucket{{{labels},le="{bound}"}} {cumulative}')
        out.append(f'{name}_bucket{{{labels},le="+Inf"}} {sum(self.counts)}')
        out.append(f"{name}_count{{{labels}}} {sum(self.counts)}")
        out.append(f"{name}_sum{{{labels}}} {self.total}")
        return out


def render_metrics(scheduler: _Scheduler, cache: _Cache, model_name: str) -> str:
    labels = f'engine="0",model_name="{model_name}"'
    unlabelled = (
        ("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.", len(scheduler.running)),
        ("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.", len(scheduler.waiting)),  # type: ignore[arg-type]
        ("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.", cache.usage),
        ("vllm:num_preemptions_total", "counter", "Cumulative number of preemption from the engine.", scheduler.preemptions),
        ("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.",
         sum(scheduler.prompt_tokens_by_source.values())),
        ("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.", scheduler.generation_tokens),
        ("vllm:prefix_cache_queries_total", "counter", "Prefix cache queries, in terms of number of queried tokens.",
         cache.queries),
        ("vllm:prefix_cache_hits_total", "counter", "Prefix cache hits, in terms of number of cached tokens.", cache.hits),
        ("vllm:sim_busy_seconds_total", "counter", "Simulated engine: seconds its steps took (the cost model's).",
         scheduler.busy_s),
        ("vllm:sim_late_seconds_total", "counter",
         "Simulated engine: seconds its steps ran past the cost model's (the host's cores were busy).", scheduler.late_s),
    )  # fmt: skip
    lines: list[str] = []
    for name, kind, help_text, value in unlabelled:
        lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name}{{{labels}}} {value}"])
    lines.extend(["# HELP vllm:prompt_tokens_by_source_total Number of prompt tokens by source.",
                  "# TYPE vllm:prompt_tokens_by_source_total counter"])  # fmt: skip
    lines.extend(f'vllm:prompt_tokens_by_source_total{{{labels},source="{source}"}} {count}'
                 for source, count in scheduler.prompt_tokens_by_source.items())  # fmt: skip
    lines.extend(["# HELP vllm:request_success_total Count of successfully processed requests.",
                  "# TYPE vllm:request_success_total counter",
                  f'vllm:request_success_total{{{labels},finished_reason="length"}} {scheduler.finished_requests}'])  # fmt: skip
    lines.extend(["# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.",
                  "# TYPE vllm:time_to_first_token_seconds histogram",
                  *scheduler.ttft.lines("vllm:time_to_first_token_seconds", labels)])  # fmt: skip
    return "\n".join(lines) + "\n"
