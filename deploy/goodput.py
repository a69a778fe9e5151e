"""The door's goodput as ``status`` shows it: its service levels and how many answers
met them, read from its ``/metrics`` (``frontdoor_slo_target_seconds``,
``frontdoor_slo_requests_total``; door/slo.py)."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections import Counter

from prometheus_client.parser import text_string_to_metric_families


def goodput_line(metrics_text: str) -> str | None:
    """One line for ``status``; None when the page has no service levels (an older door)."""
    levels: dict[str, float] = {}
    outcomes: Counter[str] = Counter()
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "frontdoor_slo_target_seconds":
                levels[sample.labels["level"]] = sample.value
            elif sample.name == "frontdoor_slo_requests_total":
                outcomes[sample.labels["outcome"]] += sample.value
    if "ttft" not in levels or "itl" not in levels:
        return None
    answers = sum(outcomes.values())
    share = f" ({outcomes['met'] / answers:.0%})" if answers else ""
    return (f"service levels TTFT <= {levels['ttft'] * 1000:g} ms, inter-token <= {levels['itl'] * 1000:g} ms: "
            f"{outcomes['met']:.0f} of {answers:.0f} answers met both{share} since the door started "
            f"(missed TTFT {outcomes['missed_ttft']:.0f}, inter-token {outcomes['missed_itl']:.0f}, "
            f"both {outcomes['missed_both']:.0f})")  # fmt: skip


def door_goodput_line(host: str, port: int, api_key: str | None, timeout_s: float = 3.0) -> str | None:
    """``goodput_line`` of the door at ``host:port``; None if its /metrics does not answer."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(f"http://{host}:{port}/metrics", headers=headers),
                                    timeout=timeout_s) as response:  # fmt: skip
            return goodput_line(response.read().decode(errors="replace"))
    except (urllib.error.URLError, OSError, ValueError):
        return None
