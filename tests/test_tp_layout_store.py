"""Engines of different TP sizes exchanging KV through a real data system worker: the
ranks of one TP size save their shards, the ranks of another load them through the
connector's worker half (keys, background loader, resharding) and end up with exactly
the cache they would have computed; the scheduler half claims a TP-mismatched handoff
and, with ``peer_tp_sizes``, finds another TP size's blocks for prefix reuse. (No vLLM
engine here: a TP=2 engine needs two devices; this machine has none.)"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from common.config import DataSystemConfig
from patch.yuanrong_connector.keys import KVLayout, chained_block_hashes
from patch.yuanrong_connector.metadata import BlockTransfer, YuanRongConnectorMetadata
from patch.yuanrong_connector.remote_store import RemoteBlockStore
from patch.yuanrong_connector.scheduler import YuanRongScheduler
from patch.yuanrong_connector.settings import ConnectorSettings
from patch.yuanrong_connector.store import BlockStore
from patch.yuanrong_connector.worker import YuanRongWorker

NUM_BLOCKS, HEADS, BLOCK, HEAD = 8, 4, 16, 64
LAYERS = ("model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn")


def _layout(model: str, tp_size: int, dtype: str = "torch.bfloat16") -> KVLayout:
    return KVLayout(model, dtype, BLOCK, HEADS, HEAD, len(LAYERS), tp_size)


def _settings(address: str, layout: KVLayout, *, saves: bool, peers: tuple[int, ...] = ()) -> ConnectorSettings:
    return ConnectorSettings(address, saves=saves, prefix_reuse=bool(peers), loads_remote_prefill=True, layout=layout,
                             request_timeout_ms=500, peer_tp_sizes=peers)  # fmt: skip


def _full_caches(form: str) -> dict[str, torch.Tensor]:
    shape = (NUM_BLOCKS, HEADS, BLOCK, 2 * HEAD) if form == "cpu" else (2, NUM_BLOCKS, BLOCK, HEADS, HEAD)
    return {name: torch.randn(*shape).to(torch.bfloat16) for name in LAYERS}


def _shard(caches: dict[str, torch.Tensor], form: str, tp_size: int, rank: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s heads of each layer, as a TP engine's paged cache holds them."""
    per_rank = HEADS // tp_size
    axis = 1 if form == "cpu" else 3
    return {name: cache.narrow(axis, rank * per_rank, per_rank).contiguous() for name, cache in caches.items()}


def _save_all_ranks(address: str, layout: KVLayout, caches: dict[str, torch.Tensor], form: str,
                    hashes: tuple[str, ...], block_ids: tuple[int, ...]) -> None:  # fmt: skip
    for rank in range(layout.tp_size):
        producer = YuanRongWorker(_settings(address, layout, saves=True), BlockStore(address), rank, NUM_BLOCKS)
        producer.register_kv_caches(_shard(caches, form, layout.tp_size, rank))
        producer.end_step(YuanRongConnectorMetadata(saves=[BlockTransfer("p", hashes, block_ids)]))
        producer.shutdown()  # waits for the background saver


@pytest.mark.parametrize("form", ["cpu", "kv-split"])
@pytest.mark.parametrize(("source_tp", "target_tp"), [(2, 1), (1, 2), (4, 2)], ids=["tp2-to-tp1", "tp1-to-tp2", "tp4-to-tp2"])
def test_ranks_of_another_tp_size_load_exactly_their_heads(
    ds_worker: DataSystemConfig, form: str, source_tp: int, target_tp: int
) -> None:
    model = f"reshard-{form}-{source_tp}-{target_tp}"
    full = _full_caches(form)
    hashes = tuple(chained_block_hashes(list(range(3 * BLOCK)), BLOCK))
    _save_all_ranks(ds_worker.address, _layout(model, source_tp), full, form, hashes, (5, 2, 7))
    axis = 0 if form == "cpu" else 1
    for rank in range(target_tp):
        target = {name: torch.zeros_like(cache) for name, cache in _shard(full, form, target_tp, rank).items()}
        settings = _settings(ds_worker.address, _layout(model, target_tp), saves=False)
        consumer = YuanRongWorker(settings, RemoteBlockStore(ds_worker.address), rank, NUM_BLOCKS)
        consumer.register_kv_caches(target)
        transfer = BlockTransfer("d", hashes, (0, 1, 3), wait_s=2.0, source_tp=source_tp)
        consumer.start_load(YuanRongConnectorMetadata(loads=[transfer]))
        failed = consumer.wait_loaded("d", timeout_s=10)
        consumer.shutdown()
        assert failed == set()
        expected = _shard(full, form, target_tp, rank)
        for name in LAYERS:
            for src, dst in ((5, 0), (2, 1), (7, 3)):
                assert torch.equal(target[name].select(axis, dst), expected[name].select(axis, src))
            assert not target[name].select(axis, 2).any()


def test_missing_shards_of_another_tp_size_are_reported_for_recompute(ds_worker: DataSystemConfig) -> None:
    model, form = "reshard-missing", "cpu"
    full = _full_caches(form)
    hashes = tuple(chained_block_hashes(list(range(100, 100 + 2 * BLOCK)), BLOCK))
    source = _layout(model, 2)
    # only rank 0 of the TP=2 engine saved the second block: the TP=1 rank cannot assemble it
    _save_all_ranks(ds_worker.address, source, full, form, hashes[:1], (1,))
    producer = YuanRongWorker(_settings(ds_worker.address, source, saves=True), BlockStore(ds_worker.address), 0, NUM_BLOCKS)
    producer.register_kv_caches(_shard(full, form, 2, 0))
    producer.end_step(YuanRongConnectorMetadata(saves=[BlockTransfer("p", hashes[1:], (2,))]))
    producer.shutdown()
    consumer = YuanRongWorker(_settings(ds_worker.address, _layout(model, 1), saves=False),
                              RemoteBlockStore(ds_worker.address), 0, NUM_BLOCKS)  # fmt: skip
    target = {name: torch.zeros_like(cache) for name, cache in full.items()}
    consumer.register_kv_caches(target)
    consumer.start_load(YuanRongConnectorMetadata(loads=[BlockTransfer("d", hashes, (4, 6), wait_s=0.2, source_tp=2)]))
    failed = consumer.wait_loaded("d", timeout_s=10)
    consumer.shutdown()
    assert failed == {6}
    assert all(torch.equal(target[name][4], full[name][1]) for name in LAYERS)


def test_a_rank_that_cannot_find_its_heads_axis_computes_at_once(ds_worker: DataSystemConfig) -> None:
    # a cache of 3 heads where the layout says 4: no axis to slice; refused, not guessed
    settings = _settings(ds_worker.address, _layout("reshard-refused", 1), saves=False)
    consumer = YuanRongWorker(settings, BlockStore(ds_worker.address), 0, NUM_BLOCKS)
    consumer.register_kv_caches({name: torch.zeros(NUM_BLOCKS, 3, BLOCK, 2 * HEAD, dtype=torch.bfloat16) for name in LAYERS})
    hashes = tuple(chained_block_hashes(list(range(300, 300 + 2 * BLOCK)), BLOCK))
    consumer.start_load(YuanRongConnectorMetadata(loads=[BlockTransfer("d", hashes, (1, 2), wait_s=5.0, source_tp=2)]))
    assert consumer.finished(set(), idle_step=False)[1] == {"d"}  # in the same step, not after the wait
    assert consumer.take_failed_block_ids() == {1, 2}
    consumer.shutdown()


def _request(request_id: str, prompt: list[int], params: dict[str, Any] | None) -> Any:
    return SimpleNamespace(request_id=request_id, prompt_token_ids=prompt, kv_transfer_params=params,
                           cache_salt=None, lora_request=None, mm_features=[])  # fmt: skip


def _claimed_load(scheduler: YuanRongScheduler, request: Any) -> tuple[tuple[int | None, bool], BlockTransfer | None]:
    """What the scheduler claims for ``request`` (asked until the lookup answers) and the load it then hands over."""
    deadline = time.monotonic() + 10
    while (claim := scheduler.get_num_new_matched_tokens(request, 0))[0] is None:
        assert time.monotonic() < deadline, "the scheduler's lookup never answered"
        time.sleep(0.001)
    if not claim[1]:
        return claim, None
    blocks = SimpleNamespace(get_block_ids=lambda: ([10, 11, 12, 13],))
    scheduler.update_state_after_alloc(request, blocks, claim[0])  # type: ignore[arg-type]
    cached = SimpleNamespace(req_ids=[], new_block_ids=[], num_computed_tokens=[], resumed_req_ids=set())
    step = SimpleNamespace(scheduled_new_reqs=[], scheduled_cached_reqs=cached, num_scheduled_tokens={},
                           preempted_req_ids=set(), total_num_scheduled_tokens=0)  # fmt: skip
    meta = scheduler.build_connector_meta(step)  # type: ignore[arg-type]
    return claim, meta.loads[0]


def test_a_decode_claims_a_handoff_from_a_prefill_of_another_tp_size(ds_worker: DataSystemConfig) -> None:
    address, prompt = ds_worker.address, list(range(3 * BLOCK + 5))
    prefill = YuanRongScheduler(_settings(address, _layout("handoff", 2), saves=True), BlockStore(address))
    done = prefill.request_finished(_request("p", prompt, {"do_remote_decode": True}), [])[1]
    assert done is not None and done["tp_size"] == 2 and done["layout"] == _layout("handoff", 2).fingerprint()
    params = {**done, "num_saved_blocks": 3}

    decode = YuanRongScheduler(_settings(address, _layout("handoff", 1), saves=False), BlockStore(address))
    claim, load = _claimed_load(decode, _request("d", prompt, params))
    assert claim == (3 * BLOCK, True) and load is not None
    assert load.source_tp == 2 and load.block_ids == (10, 11, 12) and load.wait_s > 0

    # another dtype is not a TP mismatch: nothing is claimed, the decode computes
    other = YuanRongScheduler(_settings(address, _layout("handoff", 1, "torch.float16"), saves=False), BlockStore(address))
    assert _claimed_load(other, _request("d2", prompt, params)) == ((0, False), None)
    # a prefill that does not say its TP size is not guessed at
    assert _claimed_load(decode, _request("d3", prompt, {**params, "tp_size": None})) == ((0, False), None)
    for scheduler in (prefill, decode, other):
        scheduler.shutdown()


def test_prefix_reuse_finds_blocks_of_a_peer_tp_size_only_when_asked(ds_worker: DataSystemConfig) -> None:
    address, form = ds_worker.address, "cpu"
    prompt = list(range(2000, 2000 + 2 * BLOCK + 3))
    hashes = tuple(chained_block_hashes(prompt, BLOCK))
    _save_all_ranks(address, _layout("peer", 2), _full_caches(form), form, hashes, (1, 2))

    own_only = YuanRongScheduler(_settings(address, _layout("peer", 1), saves=True, peers=(4,)), BlockStore(address))
    assert _claimed_load(own_only, _request("a", prompt, None)) == ((0, False), None)
    with_peer = YuanRongScheduler(_settings(address, _layout("peer", 1), saves=True, peers=(4, 2)), BlockStore(address))
    claim, load = _claimed_load(with_peer, _request("b", prompt, None))
    assert claim == (2 * BLOCK, True) and load is not None and load.source_tp == 2 and load.wait_s == 0
    for scheduler in (own_only, with_peer):
        scheduler.shutdown()
