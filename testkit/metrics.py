"""Reading a Prometheus ``/metrics`` page (the door's, an engine's), for tests and
benchmarks: one parser, exact sample names and labels."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def samples(url: str, name: str, **labels: str) -> list[float]:
    """The values of the samples named exactly ``name`` on ``url``'s /metrics whose labels
    include ``labels``."""
    return samples_in(httpx.get(f"{url}/metrics", timeout=10).text, name, **labels)


def samples_in(text: str, name: str, **labels: str) -> list[float]:
    """The same, from a /metrics page already read (``text``)."""
    return [sample.value for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.name == name and all(sample.labels.get(key) == value for key, value in labels.items())]  # fmt: skip


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of those samples (0 when there is none)."""
    return sum(samples(url, name, **labels))
