"""The scheduler half's decisions: what a decode claims (at once, as an asynchronous
load), what a prefill saves and announces (only what will be stored), how a resumed
request's saves follow its new blocks, and what goes into a block's key. Lookups run
against a real data system worker; vLLM's per-step scheduler output is built by hand
with just the fields the connector reads."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from vllm.v1.outputs import KVConnectorOutput

from common.config import DataSystemConfig
from patch.yuanrong_connector import scheduler as scheduler_module
from patch.yuanrong_connector.keys import KVLayout, block_key, chained_block_hashes, tail_block_hash
from patch.yuanrong_connector.metadata import YuanRongConnectorMetadata, YuanRongWorkerMetadata
from patch.yuanrong_connector.scheduler import YuanRongScheduler, request_chain_root
from patch.yuanrong_connector.settings import ConnectorSettings
from patch.yuanrong_connector.store import BlockStore

BLOCK = 16


@dataclass
class FakeRequest:
    """The fields of vllm.v1.request.Request the scheduler half reads."""

    request_id: str
    prompt_token_ids: list[int]
    kv_transfer_params: dict[str, Any] | None = field(default=None)
    cache_salt: str | None = None
    lora_request: Any = None
    mm_features: list[Any] = field(default_factory=list)


def _scheduler(address: str, model: str, *, role: str, prefix_reuse: bool = False, max_pending: int = 4096,
               handoff_wait_ms: int = 400) -> YuanRongScheduler:  # fmt: skip
    """``role`` prefill, decode, colocated, or adaptive (kv_both saving its prefill legs only)."""
    layout = KVLayout(model, "torch.bfloat16", BLOCK, 2, 64, 2, 1)
    settings = ConnectorSettings(address, saves=role in ("prefill", "adaptive") or prefix_reuse, prefix_reuse=prefix_reuse,
                                 loads_remote_prefill=role in ("decode", "adaptive"), layout=layout, request_timeout_ms=500,
                                 handoff_wait_ms=handoff_wait_ms, max_pending_save_blocks=max_pending,
                                 saves_every_prompt=role == "prefill" or prefix_reuse)  # fmt: skip
    return YuanRongScheduler(settings, BlockStore(address, request_timeout_ms=500))


def _handoff(blocks: int, layout: str | None = None) -> dict[str, Any]:
    params: dict[str, Any] = {"do_remote_prefill": True, "num_saved_blocks": blocks}
    if layout is not None:
        params["layout"] = layout
    return params


def _step(new: list[Any] = (), cached: list[tuple[str, list[int] | None, int, bool]] = (),  # type: ignore[assignment]
          scheduled: dict[str, int] | None = None) -> Any:  # fmt: skip
    """A SchedulerOutput: new requests, cached ones as (id, new block ids, computed, resumed)."""
    return SimpleNamespace(
        scheduled_new_reqs=list(new),
        scheduled_cached_reqs=SimpleNamespace(
            req_ids=[c[0] for c in cached],
            new_block_ids=[None if c[1] is None else (c[1],) for c in cached],
            num_computed_tokens=[c[2] for c in cached],
            resumed_req_ids={c[0] for c in cached if c[3]},
        ),
        num_scheduled_tokens=scheduled or {},
        preempted_req_ids=set(),
        total_num_scheduled_tokens=sum((scheduled or {}).values()),
    )


def _new(request: FakeRequest, block_ids: list[int], computed: int = 0) -> Any:
    return SimpleNamespace(req_id=request.request_id, prompt_token_ids=request.prompt_token_ids,
                           block_ids=(block_ids,), num_computed_tokens=computed)  # fmt: skip


def _saves(meta: YuanRongConnectorMetadata) -> list[tuple[int, ...]]:
    return [transfer.block_ids for transfer in meta.saves]


# ---- decode: handoff ----
def test_decode_claims_announced_blocks_at_once_as_an_async_load() -> None:
    decode = _scheduler("127.0.0.1:1", "claims", role="decode")  # no store call is made
    tokens = list(range(100, 100 + 3 * BLOCK + 5))
    assert decode.get_num_new_matched_tokens(FakeRequest("r1", tokens, _handoff(2)), 0) == (2 * BLOCK, True)
    # with one block already computed locally, only the next one is claimed
    assert decode.get_num_new_matched_tokens(FakeRequest("r2", tokens, _handoff(2)), BLOCK) == (BLOCK, True)
    # a prompt of exactly 2 blocks: every token but the last (vLLM computes that one)
    assert decode.get_num_new_matched_tokens(FakeRequest("r3", tokens[: 2 * BLOCK], _handoff(2)), 0) == (2 * BLOCK - 1, True)


def test_decode_claims_the_partial_last_block_the_prefill_saved() -> None:
    decode = _scheduler("127.0.0.1:1", "tail", role="decode")
    tokens = list(range(100, 100 + 3 * BLOCK + 5))
    full = chained_block_hashes(tokens, BLOCK)
    request = FakeRequest("t1", tokens, {**_handoff(3), "saved_tail_tokens": 5})
    assert decode.get_num_new_matched_tokens(request, 0) == (3 * BLOCK + 4, True)  # all but the last token
    decode.update_state_after_alloc(request, SimpleNamespace(get_block_ids=lambda: ([7, 9, 11, 13],)), 3 * BLOCK + 4)  # type: ignore[arg-type]
    load = decode.build_connector_meta(_step()).loads[0]
    assert load.block_ids == (7, 9, 11, 13)
    assert list(load.block_hashes) == [*full, tail_block_hash(tokens, BLOCK, full)]
    # Not the tail the prefill saved (another length), or not every full block before it: full blocks only.
    assert decode.get_num_new_matched_tokens(FakeRequest("t2", tokens, {**_handoff(3), "saved_tail_tokens": 4}), 0) == (3 * BLOCK, True)
    assert decode.get_num_new_matched_tokens(FakeRequest("t3", tokens, {**_handoff(2), "saved_tail_tokens": 5}), 0) == (2 * BLOCK, True)
    # A prompt shorter than a block: its tail alone.
    assert decode.get_num_new_matched_tokens(FakeRequest("t4", tokens[:9], {**_handoff(0), "saved_tail_tokens": 9}), 0) == (8, True)


def test_decode_hands_its_loader_the_blocks_and_the_wait_bound(ds_worker: DataSystemConfig) -> None:
    decode = _scheduler(ds_worker.address, "bound", role="decode", handoff_wait_ms=1500)
    tokens = list(range(200, 200 + 2 * BLOCK + 3))
    request = FakeRequest("r4", tokens, _handoff(2))
    assert decode.get_num_new_matched_tokens(request, 0) == (2 * BLOCK, True)
    decode.update_state_after_alloc(request, SimpleNamespace(get_block_ids=lambda: ([7, 9, 11],)), 2 * BLOCK)  # type: ignore[arg-type]
    load = decode.build_connector_meta(_step()).loads[0]
    assert load.block_ids == (7, 9) and load.wait_s == 1.5
    assert list(load.block_hashes) == chained_block_hashes(tokens, BLOCK)[:2]


def test_decode_does_not_wait_for_a_prefill_with_another_layout() -> None:
    decode = _scheduler("127.0.0.1:1", "layout", role="decode")
    request = FakeRequest("r5", list(range(400, 400 + 2 * BLOCK + 3)), _handoff(2, layout="0123456789abcdef"))
    assert decode.get_num_new_matched_tokens(request, 0) == (0, False)


def test_decode_does_not_wait_while_the_store_is_down() -> None:
    decode = _scheduler("127.0.0.1:1", "down", role="decode", handoff_wait_ms=5000)
    decode.store.connect()  # fails: the store is marked down
    request = FakeRequest("r6", list(range(500, 500 + 2 * BLOCK + 3)), _handoff(2))
    assert decode.get_num_new_matched_tokens(request, 0) == (0, False)  # computed, no load claimed


# ---- prefix reuse ----
def test_prefix_reuse_claims_only_the_stored_leading_blocks(ds_worker: DataSystemConfig) -> None:
    colocated = _scheduler(ds_worker.address, "reuse", role="colocated", prefix_reuse=True)
    tokens = list(range(600, 600 + 4 * BLOCK + 1))
    fingerprint = colocated.settings.layout.fingerprint()
    keys = [block_key(fingerprint, 0, h) for h in chained_block_hashes(tokens, BLOCK)]
    colocated.store.put([keys[0], keys[1], keys[3]], 8, lambda first, buffers: [b.__setitem__(slice(0, 8), b"12345678") for b in buffers])
    request = FakeRequest("r7", tokens)
    outcome = colocated.get_num_new_matched_tokens(request, 0)
    while outcome[0] is None:  # the lookup runs beside the engine loop
        outcome = colocated.get_num_new_matched_tokens(request, 0)
    assert outcome == (2 * BLOCK, True)  # block 2 is missing, so block 3 cannot be used


def test_a_lookup_answered_late_never_claims_past_the_prompt(ds_worker: DataSystemConfig) -> None:
    """The lookup is asked with nothing computed; by the pass it is answered, vLLM's own
    prefix cache holds 2 blocks (another request computed them). The claim counts from
    there: with the count taken from block 0, it went 2 blocks past the prompt's end
    and vLLM's scheduler asserted (the engine died, seen under seed 000's workload)."""
    colocated = _scheduler(ds_worker.address, "late-lookup", role="colocated", prefix_reuse=True)
    gate = threading.Event()
    colocated._lookup_pool = ThreadPoolExecutor(1)
    colocated._lookup_pool.submit(gate.wait, 10)  # the lookup thread is busy: the lookup waits behind this
    tokens = list(range(900, 900 + 4 * BLOCK + 1))
    fingerprint = colocated.settings.layout.fingerprint()
    keys = [block_key(fingerprint, 0, h) for h in chained_block_hashes(tokens, BLOCK)]
    colocated.store.put(keys, 8, lambda first, buffers: [b.__setitem__(slice(0, 8), b"12345678") for b in buffers])
    request = FakeRequest("late", tokens)
    assert colocated.get_num_new_matched_tokens(request, 0) == (None, False)  # asked; not answered yet
    gate.set()
    colocated._lookup_pool.submit(lambda: None).result(timeout=10)  # the lookup ran: all 4 blocks stored
    assert colocated.get_num_new_matched_tokens(request, 2 * BLOCK) == (2 * BLOCK, True)  # blocks 2-3, not 4 more


# ---- prefill: what is saved and announced ----
def test_prefill_saves_every_full_block_and_announces_them(ds_worker: DataSystemConfig) -> None:
    prefill = _scheduler(ds_worker.address, "announce", role="prefill")
    request = FakeRequest("p1", list(range(3 * BLOCK + 1)), {"do_remote_decode": True})
    prefill.get_num_new_matched_tokens(request, 0)
    meta = prefill.build_connector_meta(_step([_new(request, [4, 5, 6, 8])], scheduled={"p1": 3 * BLOCK + 1}))
    assert _saves(meta) == [(4, 5, 6)]  # a one-token tail is not saved: the decode computes the last token
    hold, params = prefill.request_finished(request, [])  # type: ignore[arg-type]
    assert hold is True  # vLLM keeps the blocks until the saver is done
    assert params is not None and (params["num_saved_blocks"], params["saved_tail_tokens"]) == (3, 0)
    assert params["layout"] == prefill.settings.layout.fingerprint() and params["do_remote_prefill"] is True


def test_a_prefill_leg_saves_its_partial_last_block_and_announces_its_tokens(ds_worker: DataSystemConfig) -> None:
    prefill = _scheduler(ds_worker.address, "tail-save", role="prefill")
    tokens = list(range(3 * BLOCK + 5))
    request = FakeRequest("p5", tokens, {"do_remote_decode": True})
    prefill.get_num_new_matched_tokens(request, 0)
    # chunked: the full blocks first, the tail once the whole prompt is computed
    first = prefill.build_connector_meta(_step([_new(request, [4, 5, 6, 8])], scheduled={"p5": 2 * BLOCK}))
    assert _saves(first) == [(4, 5)]
    second = prefill.build_connector_meta(_step(cached=[("p5", None, 2 * BLOCK, False)], scheduled={"p5": BLOCK + 5}))
    full = chained_block_hashes(tokens, BLOCK)
    assert _saves(second) == [(6, 8)] and second.saves[0].block_hashes == (full[2], tail_block_hash(tokens, BLOCK, full))
    _, params = prefill.request_finished(request, [])  # type: ignore[arg-type]
    assert params is not None and (params["num_saved_blocks"], params["saved_tail_tokens"]) == (3, 5)
    # A prompt shorter than a block: its tail alone.
    short = FakeRequest("p6", tokens[:9], {"do_remote_decode": True})
    prefill.get_num_new_matched_tokens(short, 0)
    assert _saves(prefill.build_connector_meta(_step([_new(short, [3])], scheduled={"p6": 9}))) == [(3,)]
    _, params = prefill.request_finished(short, [])  # type: ignore[arg-type]
    assert params is not None and (params["num_saved_blocks"], params["saved_tail_tokens"]) == (0, 9)
    # Not a prefill leg (prefix reuse saves): full blocks only, a tail is no reusable prefix.
    colocated = _scheduler(ds_worker.address, "tail-reuse", role="colocated", prefix_reuse=True)
    plain = FakeRequest("p7", tokens)
    colocated.get_num_new_matched_tokens(plain, 0)
    assert _saves(colocated.build_connector_meta(_step([_new(plain, [4, 5, 6, 8])], scheduled={"p7": 3 * BLOCK + 5}))) == [(4, 5, 6)]


def test_prefill_announces_nothing_it_skipped_because_the_store_is_full(ds_worker: DataSystemConfig) -> None:
    prefill = _scheduler(ds_worker.address, "full", role="prefill")
    prefill.update_connector_output(KVConnectorOutput(kv_connector_worker_meta=YuanRongWorkerMetadata(0, saves_paused=True)))
    request = FakeRequest("p2", list(range(3 * BLOCK + 1)), {"do_remote_decode": True})
    prefill.get_num_new_matched_tokens(request, 0)
    assert _saves(prefill.build_connector_meta(_step([_new(request, [1, 2, 3, 4])], scheduled={"p2": 3 * BLOCK + 1}))) == []
    hold, params = prefill.request_finished(request, [])  # type: ignore[arg-type]
    assert hold is False and params is not None and params["num_saved_blocks"] == 0


def test_prefill_announces_only_blocks_before_a_backlog_skip(ds_worker: DataSystemConfig) -> None:
    prefill = _scheduler(ds_worker.address, "backlog", role="prefill", max_pending=2)
    request = FakeRequest("p3", list(range(4 * BLOCK + 1)), {"do_remote_decode": True})
    prefill.get_num_new_matched_tokens(request, 0)
    # chunked prefill: two blocks in the first step, the rest in the second
    first = prefill.build_connector_meta(_step([_new(request, [1, 2])], scheduled={"p3": 2 * BLOCK}))
    assert _saves(first) == [(1, 2)]
    second = prefill.build_connector_meta(_step(cached=[("p3", [3, 4, 5], 2 * BLOCK, False)], scheduled={"p3": 2 * BLOCK + 1}))
    assert _saves(second) == []  # the worker has not finished the first two: the backlog is full
    _, params = prefill.request_finished(request, [])  # type: ignore[arg-type]
    assert params is not None and params["num_saved_blocks"] == 2


def test_resumed_request_saves_from_its_new_blocks(ds_worker: DataSystemConfig) -> None:
    prefill = _scheduler(ds_worker.address, "resume", role="prefill")
    request = FakeRequest("p4", list(range(4 * BLOCK + 1)), {"do_remote_decode": True})
    prefill.get_num_new_matched_tokens(request, 0)
    first = prefill.build_connector_meta(_step([_new(request, [10, 11])], scheduled={"p4": 2 * BLOCK}))
    assert _saves(first) == [(10, 11)]
    # preempted, then resumed with a whole new block list (its first two blocks hit vLLM's
    # prefix cache); the next two blocks are computed into blocks 22 and 23
    resumed = prefill.build_connector_meta(
        _step(cached=[("p4", [20, 21, 22, 23, 24], 2 * BLOCK, True)], scheduled={"p4": 2 * BLOCK + 1})
    )
    assert _saves(resumed) == [(22, 23)]


# ---- keys ----
def test_requests_differing_in_lora_salt_or_images_never_share_blocks() -> None:
    tokens = list(range(2 * BLOCK))
    plain = chained_block_hashes(tokens, BLOCK, request_chain_root(FakeRequest("a", tokens)))
    assert plain == chained_block_hashes(tokens, BLOCK)  # plain prompts keep their keys
    salted = request_chain_root(FakeRequest("b", tokens, cache_salt="tenant-1"))
    other_salt = request_chain_root(FakeRequest("c", tokens, cache_salt="tenant-2"))
    lora = request_chain_root(FakeRequest("d", tokens, lora_request=SimpleNamespace(lora_name="sql-adapter")))
    image = request_chain_root(FakeRequest("e", tokens, mm_features=[SimpleNamespace(identifier="img-hash-1")]))
    other_image = request_chain_root(FakeRequest("f", tokens, mm_features=[SimpleNamespace(identifier="img-hash-2")]))
    chains = [chained_block_hashes(tokens, BLOCK, root) for root in (salted, other_salt, lora, image, other_image)]
    assert len({tuple(chain) for chain in [plain, *chains]}) == 6
    assert all(not set(chain) & set(plain) for chain in chains)


def test_finished_requests_leave_no_state(ds_worker: DataSystemConfig) -> None:
    colocated = _scheduler(ds_worker.address, "leak", role="colocated", prefix_reuse=True)
    request = FakeRequest("l1", list(range(3 * BLOCK + 1)))
    while colocated.get_num_new_matched_tokens(request, 0)[0] is None:
        pass
    colocated.build_connector_meta(_step([_new(request, [1, 2, 3, 4])], scheduled={"l1": BLOCK}))
    colocated.request_finished(request, [])  # type: ignore[arg-type]
    for state in ("_hashes", "_lookups", "_planned_loads", "_saving", "_announced", "_loaded_blocks", "_with_saves", "_arrived"):
        assert not getattr(colocated, state), state


def test_one_scheduling_pass_waits_for_lookups_once_not_once_per_request(
    ds_worker: DataSystemConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """100 new prompts arrive while the lookup thread is busy (a slow store): the pass
    that asks about them all waits the budget once, not 100 times (with the real 5 ms,
    0.5 s added to a step of every running decode); the next pass has a budget of its own.
    The budget is raised to 50 ms here so that a busy machine's slowness (0.3 s measured
    for the pass's own work beside a benchmark) stays far from both answers: 50 ms once,
    5 s per request."""
    monkeypatch.setattr(scheduler_module, "_LOOKUP_BUDGET_S", 0.05)
    colocated = _scheduler(ds_worker.address, "pass-budget", role="colocated", prefix_reuse=True)
    gate = threading.Event()
    colocated._lookup_pool = ThreadPoolExecutor(1)
    colocated._lookup_pool.submit(gate.wait, 30)  # the lookup thread is busy until the gate opens
    requests = [FakeRequest(f"burst-{i}", list(range(i, i + 2 * BLOCK + 1))) for i in range(100)]
    try:
        for _ in range(2):  # two passes
            started = time.monotonic()
            answers = [colocated.get_num_new_matched_tokens(request, 0) for request in requests]
            waited = time.monotonic() - started
            colocated.build_connector_meta(_step())
            assert answers == [(None, False)] * 100  # each stays queued until its lookup is answered
            assert waited < 2.5, f"one pass waited {waited * 1000:.0f} ms for lookups (a budget per request: >= 5000 ms)"
    finally:
        gate.set()


def test_an_adaptive_engine_saves_its_prefill_legs_and_nothing_else(ds_worker: DataSystemConfig) -> None:
    """ROLES=adaptive without prefix reuse: a prefill leg's prompt is saved for the decode
    leg on another engine; a request it serves whole is not saved (a store write per prompt
    the pool never reads)."""
    adaptive = _scheduler(ds_worker.address, "adaptive-legs", role="adaptive")
    tokens = list(range(2 * BLOCK + 5))
    whole = FakeRequest("w1", tokens)
    assert adaptive.get_num_new_matched_tokens(whole, 0) == (0, False)
    assert _saves(adaptive.build_connector_meta(_step([_new(whole, [1, 2, 3])], scheduled={"w1": 2 * BLOCK + 5}))) == []
    assert adaptive.request_finished(whole, []) == (False, None)  # type: ignore[arg-type]
    leg = FakeRequest("l1", tokens, {"do_remote_decode": True})
    adaptive.get_num_new_matched_tokens(leg, 0)
    assert _saves(adaptive.build_connector_meta(_step([_new(leg, [4, 5, 6])], scheduled={"l1": 2 * BLOCK + 5}))) == [(4, 5, 6)]
    hold, params = adaptive.request_finished(leg, [])  # type: ignore[arg-type]
    assert hold is True and params is not None and (params["num_saved_blocks"], params["saved_tail_tokens"]) == (2, 5)
    assert adaptive._prefill_legs == set()  # forgotten once finished
