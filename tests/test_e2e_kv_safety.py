"""End to end: the KV handoff never produces wrong output. A prefill engine whose KV
layout differs from the decode engine's (float32 vs bfloat16) hands over nothing, and
a data system worker stopped mid-run makes requests recompute, not fail or hang.

One 1P1D deployment shared by the tests (each passes alone too); the fixture cleans.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from deploy.datasystem import stop_worker
from testkit.deployment import (
    BLOCK_SIZE,
    Deployment,
    complete,
    deployed,
    external_kv_tokens,
    same_greedy_output,
    token_prompt,
)

pytestmark = pytest.mark.e2e

PROMPT = token_prompt(3 * BLOCK_SIZE + 17)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    # The default store timeout: this module measures how long a request takes without a store.
    settings = {
        "PREFILL_STARTUP_PARAMS": "--enforce-eager --dtype float32",
        "DECODE_STARTUP_PARAMS": "--enforce-eager --dtype bfloat16",
        "KV_REQUEST_TIMEOUT_MS": "2000",
    }
    with deployed(tmp_path_factory.mktemp("kv-safety"), **settings) as running:
        yield running


def _body(prompt: list[int]) -> dict[str, object]:
    return {"prompt": prompt, "max_tokens": 10, "temperature": 0, "logprobs": 1}


def test_different_kv_layouts_exchange_nothing_and_output_is_correct(deployment: Deployment) -> None:
    decode_url = deployment.engine_url("decode")
    warm_up = [(5 * i + 3) % 4000 + 10 for i in range(len(PROMPT))]  # a fresh engine's first long prompt is slow
    complete(deployment.url, _body(warm_up))
    before = external_kv_tokens(decode_url)
    started = time.monotonic()
    through_pd = complete(deployment.url, _body(PROMPT))
    # the decode sees the prefill's layout in kv_transfer_params and does not wait for
    # blocks that cannot be its own (KV_HANDOFF_WAIT_MS is 10 s here)
    assert time.monotonic() - started < 5
    assert external_kv_tokens(decode_url) == before  # no float32 bytes reached the bfloat16 engine
    assert same_greedy_output(through_pd, deployment.engine_complete("decode", _body(PROMPT)))


def test_requests_recompute_when_the_data_system_worker_is_gone(deployment: Deployment) -> None:
    assert stop_worker(deployment.env["DS_WORKER_ADDRESS"])
    decode_url = deployment.engine_url("decode")
    before = external_kv_tokens(decode_url)
    for seed in range(3):
        prompt = [(11 * i + seed) % 4000 + 10 for i in range(2 * BLOCK_SIZE + 5)]
        started = time.monotonic()
        through_pd = complete(deployment.url, _body(prompt))
        assert time.monotonic() - started < 30  # bounded by the store timeouts, never a hang
        assert same_greedy_output(through_pd, deployment.engine_complete("decode", _body(prompt)))
    assert external_kv_tokens(decode_url) == before
