"""The connector's numbers: collected in the worker, shipped to the engine's stats
loop by vLLM, logged with its periodic stats and exported on the engine's /metrics.

Prometheus names (per engine, label ``engine``):
- ``vllm:yuanrong_kv_blocks_total{op="save"|"load"|"save_skipped"|"save_present"|"load_failed"|"save_failed"|
  "save_dropped"|"load_corrupt"}`` (``save_dropped``: queued saves of a preempted request,
  dropped before its blocks were reused; ``load_corrupt``: stored blocks that failed their
  integrity check, computed instead)
- ``vllm:yuanrong_kv_bytes_total{op="save"|"load"}``
- ``vllm:yuanrong_kv_op_seconds{op=...}`` (histograms): ``save`` and ``load`` (one
  batched store call and its copies), ``handoff_wait`` (a decode's wait for a
  prefill's blocks to be published, per request), ``publish`` (on a prefill, from the
  request's end to its last block stored, per request)
The hit rate is vLLM's own ``vllm:external_prefix_cache_hits`` / ``..._queries``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
    PromMetric,
    PromMetricT,
)

BLOCK_OPS = ("save", "load", "save_skipped", "save_present", "save_failed", "save_dropped", "load_failed", "load_corrupt")
BYTE_OPS = ("save", "load")
TIMED_OPS = ("save", "load", "handoff_wait", "publish")


@dataclass
class YuanRongConnectorStats(KVConnectorStats):
    """``data``: ``blocks_<op>``, ``bytes_<op>`` sums and ``seconds_<op>`` lists."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()

    def reset(self) -> None:
        self.data = {}

    def is_empty(self) -> bool:
        return not self.data

    def add(self, name: str, amount: int) -> None:
        if amount:
            self.data[name] = self.data.get(name, 0) + amount

    def time(self, op: str, seconds: float) -> None:
        self.data.setdefault(f"seconds_{op}", []).append(seconds)

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for name, value in other.data.items():
            if isinstance(value, list):
                self.data.setdefault(name, []).extend(value)
            else:
                self.data[name] = self.data.get(name, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        reduced: dict[str, int | float] = {}
        for name, value in sorted(self.data.items()):
            if isinstance(value, list):
                reduced[f"{name}_total"] = round(sum(value), 4)
            else:
                reduced[name] = value
        for op in BYTE_OPS:
            seconds = sum(self.data.get(f"seconds_{op}", []))
            if seconds > 0:
                reduced[f"{op}_gbps"] = round(self.data.get(f"bytes_{op}", 0) / seconds / 1e9, 3)
        return reduced


class YuanRongPromMetrics(KVConnectorPromMetrics):
    def __init__(
        self,
        vllm_config: Any,
        metric_types: dict[type[PromMetric], type[PromMetricT]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        names = labelnames + ["op"]
        blocks = self._counter_cls(
            name="vllm:yuanrong_kv_blocks_total",
            documentation="KV blocks moved through the openYuanrong data system, by operation.",
            labelnames=names,
        )
        data = self._counter_cls(
            name="vllm:yuanrong_kv_bytes_total",
            documentation="Bytes of KV cache saved to / loaded from the openYuanrong data system.",
            labelnames=names,
        )
        seconds = self._histogram_cls(
            name="vllm:yuanrong_kv_op_seconds",
            documentation="Time of a save or load batch, a decode's wait for handed-over blocks, a prefill's publication.",
            buckets=[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0],
            labelnames=names,
        )
        self._metrics: dict[int, dict[str, PromMetric]] = {}
        for engine, values in per_engine_labelvalues.items():
            per_engine: dict[str, PromMetric] = {}
            for op in BLOCK_OPS:
                per_engine[f"blocks_{op}"] = blocks.labels(*values, op)
            for op in BYTE_OPS:
                per_engine[f"bytes_{op}"] = data.labels(*values, op)
            for op in TIMED_OPS:
                per_engine[f"seconds_{op}"] = seconds.labels(*values, op)
            self._metrics[engine] = per_engine

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        metrics = self._metrics.get(engine_idx, {})
        for name, value in transfer_stats_data.items():
            metric = metrics.get(name)
            if metric is None:
                continue
            if isinstance(value, list):
                for observation in value:
                    metric.observe(observation)  # type: ignore[union-attr]
            elif value:
                metric.inc(value)  # type: ignore[union-attr]


__all__ = ["Counter", "Gauge", "Histogram", "YuanRongConnectorStats", "YuanRongPromMetrics"]
