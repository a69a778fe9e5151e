"""End to end: KV-aware routing (ROUTING_POLICY=kv_aware) on a 1P1D deployment.

The engines publish their KV cache events; the door indexes them and knows which
engine's device cache holds a prompt's blocks. A PD request whose prompt the decode
engine already holds (all but at most SELECTIVE_PD_TOKENS tokens) skips the prefill leg.

One deployment shared by the tests; each takes its own baseline (prompts of its own,
counters read before it acts), so each passes alone too. The fixture cleans.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit.deployment import (
    BLOCK_SIZE,
    Deployment,
    complete,
    deployed,
    external_kv_tokens,
    same_greedy_output,
    token_prompt,
)
from testkit.helpers import wait_for
from testkit.metrics import metric

pytestmark = pytest.mark.e2e

SELECTIVE_PD_TOKENS = 100
WARM_UP_TOKENS = 2 * BLOCK_SIZE + 64  # the deploy's warm-up leaves two full blocks on each engine
WARM_UP_BLOCKS = WARM_UP_TOKENS // BLOCK_SIZE


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    with deployed(
        tmp_path_factory.mktemp("kv-routing"),
        ROUTING_POLICY="kv_aware",
        SELECTIVE_PD_TOKENS=str(SELECTIVE_PD_TOKENS),
        WARM_UP_TOKENS=str(WARM_UP_TOKENS),
    ) as running:
        yield running


def _body(prompt: list[int]) -> dict[str, object]:
    return {"prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 1}


def _door_metric(deployment: Deployment, name: str, **labels: str) -> float:
    return metric(deployment.url, name, **labels)


def _indexed(deployment: Deployment, engine: str) -> float:
    return _door_metric(deployment, "frontdoor_kv_indexed_blocks", engine=engine)


def _settled_indexed(deployment: Deployment, engine: str, steady_s: float = 2.5) -> float:
    """A baseline of ``_indexed``: its value once it held still for ``steady_s`` (two of
    the door's 1 s refreshes and then some), so that an earlier request's events still on
    their way do not land after it."""
    value, since = _indexed(deployment, engine), time.monotonic()
    deadline = since + 30
    while time.monotonic() - since < steady_s:
        assert time.monotonic() < deadline, f"the door's index of {engine} did not settle within 30 s"
        time.sleep(0.25)
        if (now := _indexed(deployment, engine)) != value:
            value, since = now, time.monotonic()
    return value


def _wait_indexed(deployment: Deployment, engine: str, blocks: float, timeout_s: float = 30.0) -> None:
    """Until the door's index holds exactly ``blocks`` blocks of ``engine`` (its gauge is
    refreshed every 1 s)."""
    wait_for(lambda: _indexed(deployment, engine) == blocks, timeout_s,
             f"the door indexing {blocks:.0f} blocks of {engine} (now {_indexed(deployment, engine):.0f})", 0.5)  # fmt: skip


def _local_hits(url: str) -> float:
    return metric(url, "vllm:prompt_tokens_by_source_total", source="local_cache_hit")


def test_the_deploy_warmed_each_engine_and_the_door_indexed_it(deployment: Deployment) -> None:
    """Before the door served, the deploy handed one salted prompt from the prefill to the
    decode (workers/warm_up.py): its blocks are in both engines' caches, and indexed."""
    _wait_indexed(deployment, "prefill-0", WARM_UP_BLOCKS)
    _wait_indexed(deployment, "decode-0", WARM_UP_BLOCKS)
    log = (Path(deployment.env["RUN_DIR"]) / "deploy.log").read_text()
    assert "warm-up of prefill-0, decode-0 done in" in log


def test_repeated_prompt_skips_the_prefill_leg(deployment: Deployment) -> None:
    prompt = token_prompt(4 * BLOCK_SIZE + 40)  # 4 full blocks; the decode computes 40 tokens itself on a repeat
    decode_url, prefill_url = deployment.engine_url("decode"), deployment.engine_url("prefill")
    skipped = _door_metric(deployment, "frontdoor_prefill_skipped_total")
    loaded = external_kv_tokens(decode_url)
    indexed = {engine: _settled_indexed(deployment, engine) for engine in ("decode-0", "prefill-0")}

    first = complete(deployment.url, _body(prompt))
    assert external_kv_tokens(decode_url) - loaded == 4 * BLOCK_SIZE + 39  # the first went through the prefill: all but the last token
    assert _door_metric(deployment, "frontdoor_prefill_skipped_total") == skipped
    # The decode cached the blocks it loaded, and said so in its KV events.
    _wait_indexed(deployment, "decode-0", indexed["decode-0"] + 4)
    _wait_indexed(deployment, "prefill-0", indexed["prefill-0"] + 4)

    prefill_requests = metric(prefill_url, "vllm:request_success_total")
    hits = _local_hits(decode_url)
    second = complete(deployment.url, _body(prompt))
    assert _door_metric(deployment, "frontdoor_prefill_skipped_total") == skipped + 1
    assert metric(prefill_url, "vllm:request_success_total") == prefill_requests  # no prefill leg
    assert _local_hits(decode_url) - hits == 4 * BLOCK_SIZE  # the decode's own cache served the prompt
    assert same_greedy_output(first, second)


def test_short_prompt_goes_straight_to_decode(deployment: Deployment) -> None:
    prefill_url = deployment.engine_url("prefill")
    skipped = _door_metric(deployment, "frontdoor_prefill_skipped_total")
    prefill_requests = metric(prefill_url, "vllm:request_success_total")
    answer = complete(deployment.url, _body(token_prompt(SELECTIVE_PD_TOKENS)))
    assert _door_metric(deployment, "frontdoor_prefill_skipped_total") == skipped + 1
    assert metric(prefill_url, "vllm:request_success_total") == prefill_requests
    reference = deployment.engine_complete("prefill", _body(token_prompt(SELECTIVE_PD_TOKENS)))
    assert same_greedy_output(answer, reference)


def test_long_new_prompt_takes_both_legs(deployment: Deployment) -> None:
    decode_url = deployment.engine_url("decode")
    skipped = _door_metric(deployment, "frontdoor_prefill_skipped_total")
    loaded = external_kv_tokens(decode_url)
    prompt = [token + 1 for token in token_prompt(2 * BLOCK_SIZE + 5)]  # shares no block with the others
    complete(deployment.url, _body(prompt))
    assert _door_metric(deployment, "frontdoor_prefill_skipped_total") == skipped
    assert external_kv_tokens(decode_url) - loaded == 2 * BLOCK_SIZE + 4  # all but the last token


def test_predicted_hits_match_what_the_engines_report(deployment: Deployment) -> None:
    """The door's prediction for a request's first engine equals the engine's own count of
    prompt tokens found in its device cache."""
    decode_url = deployment.engine_url("decode")
    prompt = [token + 2 for token in token_prompt(3 * BLOCK_SIZE + 9)]
    indexed = _settled_indexed(deployment, "decode-0")
    complete(deployment.url, _body(prompt))  # through the prefill: the decode loads and caches 3 blocks
    _wait_indexed(deployment, "decode-0", indexed + 3)
    predicted = _door_metric(deployment, "frontdoor_kv_predicted_cached_tokens_total", engine="decode-0")
    hits = _local_hits(decode_url)
    complete(deployment.url, _body(prompt))  # skips the prefill: 3 blocks predicted on the decode
    assert _door_metric(deployment, "frontdoor_kv_predicted_cached_tokens_total", engine="decode-0") - predicted == 3 * BLOCK_SIZE
    assert _local_hits(decode_url) - hits == 3 * BLOCK_SIZE


def test_door_metrics_report_the_kv_routing_values(deployment: Deployment) -> None:
    """The three KV-routing series of the door's /metrics, read as a scraper reads them,
    move by exactly what one new prompt sent twice does: 2 blocks indexed on the decode,
    the repeat's prefill leg skipped, its 2 blocks predicted as device-cache hits."""
    series = {"indexed": ("frontdoor_kv_indexed_blocks", {"engine": "decode-0"}),
              "predicted": ("frontdoor_kv_predicted_cached_tokens_total", {"engine": "decode-0"}),
              "skipped": ("frontdoor_prefill_skipped_total", {})}  # fmt: skip

    def scrape() -> dict[str, float]:
        return {key: _door_metric(deployment, name, **labels) for key, (name, labels) in series.items()}

    _settled_indexed(deployment, "decode-0")
    before = scrape()
    prompt = [token + 3 for token in token_prompt(2 * BLOCK_SIZE + 11)]
    complete(deployment.url, _body(prompt))
    _wait_indexed(deployment, "decode-0", before["indexed"] + 2)
    complete(deployment.url, _body(prompt))
    after = scrape()
    assert {key: after[key] - before[key] for key in series} == {"indexed": 2, "predicted": 2 * BLOCK_SIZE, "skipped": 1}
