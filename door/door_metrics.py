"""The front door's Prometheus metrics (its own registry, served at /metrics)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_DECISION_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass
class DoorMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self._declare_request_metrics()
        self._declare_outcome_metrics()
        self._declare_engine_metrics()

    def _declare_request_metrics(self) -> None:
        """What every request through the door counts: answers, timings, in flight, retries."""
        self.requests = Counter(
            "frontdoor_requests", "Requests answered, by endpoint and HTTP status.", ["endpoint", "status"],
            registry=self.registry,
        )  # fmt: skip
        self.ttft = Histogram(
            "frontdoor_time_to_first_byte_seconds", "Request arrival to the first response byte (TTFT for streams).",
            ["endpoint"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "frontdoor_request_latency_seconds", "Request arrival to the last response byte.",
            ["endpoint"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.slo_requests = Counter(
            "frontdoor_slo_requests", "Answers completed (200), by whether they met SLO_TTFT_MS and SLO_ITL_MS: met "
            "(goodput: its rate), missed_ttft, missed_itl, missed_both.", ["endpoint", "outcome"], registry=self.registry,
        )  # fmt: skip
        self.slo_target = Gauge(
            "frontdoor_slo_target_seconds", "The service levels answers are judged by (SLO_TTFT_MS, SLO_ITL_MS).", ["level"],
            registry=self.registry,
        )  # fmt: skip
        self.routing_decision = Histogram(
            "frontdoor_routing_decision_seconds", "Request parsed to its engines chosen: tokenizing, the KV index's "
            "match and the policy's order (the first leg's).", buckets=_DECISION_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.in_flight = Gauge(
            "frontdoor_in_flight_requests", "Requests in flight through the door, per engine.", ["engine", "role"],
            registry=self.registry,
        )  # fmt: skip
        self.retries = Counter(
            "frontdoor_retries", "Legs sent to another engine after one failed before answering.", ["leg"],
            registry=self.registry,
        )  # fmt: skip

    def _declare_outcome_metrics(self) -> None:
        """How requests ended when something went wrong or was decided for them."""
        self.fallbacks = Counter(
            "frontdoor_prefill_fallbacks",
            "Requests whose decode engine computed the prompt itself because no prefill engine answered.",
            registry=self.registry,
        )
        self.whole_on_prefill = Counter(
            "frontdoor_decode_fallbacks",
            "Requests a prefill engine served whole because no decode engine was healthy.",
            registry=self.registry,
        )
        self.refused = Counter(
            "frontdoor_refused", "Requests refused with 429: the queue was full, or a slot did not free in time.",
            ["reason"], registry=self.registry,
        )  # fmt: skip
        self.migrations = Counter(
            "frontdoor_stream_migrations", "Streams continued on another engine after theirs broke mid-way, by outcome.",
            ["outcome"], registry=self.registry,
        )  # fmt: skip
        self.cancelled = Counter(
            "frontdoor_client_disconnects", "Requests cancelled on the engines because the client went away.",
            registry=self.registry,
        )  # fmt: skip

    def _declare_engine_metrics(self) -> None:
        """The engines as the door sees them: KV hits and predictions, the table, scaling."""
        self.kv_hit_tokens = Gauge(
            "frontdoor_engine_kv_tokens", "Prompt tokens by source as reported by each engine (refreshed every few s).",
            ["engine", "source"], registry=self.registry,
        )  # fmt: skip
        self.kv_predicted_tokens = Counter(
            "frontdoor_kv_predicted_cached_tokens",
            "Prompt tokens the KV index expected each engine to find in its device cache (kv_aware routing); "
            "compare with frontdoor_engine_kv_tokens{source=\"local_cache_hit\"}.",
            ["engine"], registry=self.registry,
        )  # fmt: skip
        self.kv_indexed_blocks = Gauge(
            "frontdoor_kv_indexed_blocks", "KV blocks the door's index holds per engine, from its KV events.",
            ["engine"], registry=self.registry,
        )  # fmt: skip
        self.prefill_skipped = Counter(
            "frontdoor_prefill_skipped",
            "PD requests sent straight to a decode engine (selective PD): the part of the prompt it lacks was short.",
            registry=self.registry,
        )
        self.scale_operations = Counter(
            "frontdoor_scale_operations", "Scale operations through /admin/scale, by role, direction (out, in) and "
            "outcome (done, refused, failed, busy).", ["role", "direction", "outcome"], registry=self.registry,
        )  # fmt: skip
        self.engines = Gauge(
            "frontdoor_engines", "Engines in the routing table, by role (any state, draining ones too).", ["role"],
            registry=self.registry,
        )  # fmt: skip
        self.whole_on_idle_decode = Counter(
            "frontdoor_whole_on_idle_decode", "ROLES=adaptive: requests a decode engine with nothing in flight "
            "served whole while every prefill engine was busy.", registry=self.registry,
        )  # fmt: skip
        self.acting = Gauge(
            "frontdoor_engine_acting_role", "ROLES=adaptive: 1 for the role each engine acts in now (prefill, decode, "
            "colocated), 0 for the others", ["engine", "role"], registry=self.registry,
        )
        self.healthy = Gauge(
            "frontdoor_engine_healthy", "1 if the routing table counts the engine healthy.", ["engine", "role"],
            registry=self.registry,
        )  # fmt: skip

    def render(self) -> bytes:
        return generate_latest(self.registry)
