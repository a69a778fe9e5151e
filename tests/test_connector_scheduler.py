"""The scheduler half's decisions against a real data system worker: what a decode
claims, when it waits for a prefill's blocks, and when it does not."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from deploy.config import DataSystemConfig
from patch.yuanrong_connector.keys import KVLayout, block_key, chained_block_hashes
from patch.yuanrong_connector.scheduler import YuanRongScheduler
from patch.yuanrong_connector.settings import ConnectorSettings
from patch.yuanrong_connector.store import BlockStore

BLOCK = 16


@dataclass
class FakeRequest:
    """The fields of vllm.v1.request.Request the scheduler half reads."""

    request_id: str
    prompt_token_ids: list[int]
    kv_transfer_params: dict[str, Any] | None = field(default=None)


def _decode(address: str, model: str, handoff_wait_ms: int = 400) -> YuanRongScheduler:
    layout = KVLayout(model, "torch.bfloat16", BLOCK, 2, 64, 2, 1)
    settings = ConnectorSettings(address, saves=False, prefix_reuse=False, loads_remote_prefill=True, layout=layout,
                                 request_timeout_ms=500, handoff_wait_ms=handoff_wait_ms)  # fmt: skip
    return YuanRongScheduler(settings, BlockStore(address, request_timeout_ms=500))


def _store_blocks(scheduler: YuanRongScheduler, tokens: list[int], count: int) -> None:
    fingerprint = scheduler.settings.layout.fingerprint()
    keys = [block_key(fingerprint, 0, h) for h in chained_block_hashes(tokens, BLOCK)[:count]]
    scheduler.store.put(keys, 8, lambda first, buffers: [b.__setitem__(slice(0, 8), b"12345678") for b in buffers])


def _handoff(tokens: list[int], blocks: int, layout: str | None = None) -> dict[str, Any]:
    params: dict[str, Any] = {"do_remote_prefill": True, "num_saved_blocks": blocks}
    if layout is not None:
        params["layout"] = layout
    return params


def test_decode_claims_only_stored_leading_blocks(ds_worker: DataSystemConfig) -> None:
    decode = _decode(ds_worker.address, "sched-claims")
    tokens = list(range(100, 100 + 3 * BLOCK + 5))
    _store_blocks(decode, tokens, 2)
    request = FakeRequest("r1", tokens, _handoff(tokens, 2))
    assert decode.get_num_new_matched_tokens(request, 0) == (2 * BLOCK, False)
    # with one block already computed locally, only the next one is claimed
    assert decode.get_num_new_matched_tokens(FakeRequest("r2", tokens, _handoff(tokens, 2)), BLOCK) == (BLOCK, False)


def test_decode_waits_for_announced_blocks_then_loads_them(ds_worker: DataSystemConfig) -> None:
    decode = _decode(ds_worker.address, "sched-wait", handoff_wait_ms=5000)
    tokens = list(range(200, 200 + 2 * BLOCK + 3))
    request = FakeRequest("r3", tokens, _handoff(tokens, 2))
    assert decode.get_num_new_matched_tokens(request, 0) == (None, False)  # not published yet: ask again later
    _store_blocks(decode, tokens, 2)
    time.sleep(0.01)
    assert decode.get_num_new_matched_tokens(request, 0) == (2 * BLOCK, False)


def test_decode_stops_waiting_after_the_handoff_wait(ds_worker: DataSystemConfig) -> None:
    decode = _decode(ds_worker.address, "sched-timeout", handoff_wait_ms=200)
    tokens = list(range(300, 300 + 2 * BLOCK + 3))
    _store_blocks(decode, tokens, 1)
    request = FakeRequest("r4", tokens, _handoff(tokens, 2))
    started = time.monotonic()
    outcome = decode.get_num_new_matched_tokens(request, 0)
    while outcome[0] is None:
        time.sleep(0.01)
        outcome = decode.get_num_new_matched_tokens(request, 0)
    assert outcome == (BLOCK, False)  # what is there is loaded, the rest computed
    assert 0.2 <= time.monotonic() - started < 2


def test_decode_does_not_wait_for_a_prefill_with_another_layout(ds_worker: DataSystemConfig) -> None:
    decode = _decode(ds_worker.address, "sched-layout", handoff_wait_ms=5000)
    tokens = list(range(400, 400 + 2 * BLOCK + 3))
    request = FakeRequest("r5", tokens, _handoff(tokens, 2, layout="0123456789abcdef"))
    assert decode.get_num_new_matched_tokens(request, 0) == (0, False)


def test_decode_does_not_wait_while_the_store_is_down() -> None:
    decode = _decode("127.0.0.1:1", "sched-down", handoff_wait_ms=5000)
    tokens = list(range(500, 500 + 2 * BLOCK + 3))
    request = FakeRequest("r6", tokens, _handoff(tokens, 2))
    assert decode.get_num_new_matched_tokens(request, 0) == (0, False)


def test_prefill_hands_over_its_block_count_and_layout(ds_worker: DataSystemConfig) -> None:
    prefill = _decode(ds_worker.address, "sched-prefill")
    tokens = list(range(600, 600 + 3 * BLOCK + 1))
    hold, params = prefill.request_finished(FakeRequest("r7", tokens, {"do_remote_decode": True}), [])  # type: ignore[arg-type]
    assert hold is False  # nothing was saved for it, so its blocks may be freed at once
    assert params is not None and params["num_saved_blocks"] == 3
    assert params["layout"] == prefill.settings.layout.fingerprint() and params["do_remote_prefill"] is True
