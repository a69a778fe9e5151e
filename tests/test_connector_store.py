"""The connector's worker half against a real data system worker: bytes saved from one
paged KV cache arrive bit-exact in another, and missing blocks are reported for recompute."""

from __future__ import annotations

import pytest
import torch

from deploy.config import DataSystemConfig
from patch.yuanrong_connector.keys import KVLayout, block_key, chained_block_hashes
from patch.yuanrong_connector.metadata import BlockTransfer, YuanRongConnectorMetadata
from patch.yuanrong_connector.settings import ConnectorSettings
from patch.yuanrong_connector.store import BlockStore
from patch.yuanrong_connector.worker import YuanRongWorker

NUM_BLOCKS, KV_HEADS, BLOCK, HEAD = 8, 2, 16, 64


def _settings(address: str, layout_model: str) -> ConnectorSettings:
    layout = KVLayout(layout_model, "torch.bfloat16", BLOCK, KV_HEADS, HEAD, 2, 1)
    return ConnectorSettings(address, saves=True, prefix_reuse=False, loads_remote_prefill=True, layout=layout)


def _caches(shape: tuple[int, ...], fill_random: bool) -> dict[str, torch.Tensor]:
    make = torch.randn if fill_random else torch.zeros
    return {f"model.layers.{i}.self_attn.attn": make(*shape, dtype=torch.bfloat16) for i in range(2)}


@pytest.mark.parametrize(
    "shape",
    [(NUM_BLOCKS, KV_HEADS, BLOCK, 2 * HEAD), (2, NUM_BLOCKS, BLOCK, KV_HEADS, HEAD)],
    ids=["cpu-layout", "kv-split-layout"],
)
def test_blocks_saved_by_one_engine_load_bit_exact_in_another(ds_worker: DataSystemConfig, shape: tuple[int, ...]) -> None:
    settings = _settings(ds_worker.address, f"model-{len(shape)}")
    hashes = tuple(chained_block_hashes(list(range(3 * BLOCK)), BLOCK))
    source_caches = _caches(shape, fill_random=True)
    producer = YuanRongWorker(settings, BlockStore(ds_worker.address), tp_rank=0, num_blocks=NUM_BLOCKS)
    producer.register_kv_caches(source_caches)
    producer.end_step(YuanRongConnectorMetadata(saves=[BlockTransfer("r1", hashes, (5, 2, 7))]))
    producer.shutdown()  # waits for the background saver

    store = BlockStore(ds_worker.address)
    keys = [block_key(settings.layout.fingerprint(), 0, h) for h in hashes]
    assert store.count_present_prefix(keys) == 3

    target_caches = _caches(shape, fill_random=False)
    consumer = YuanRongWorker(settings, BlockStore(ds_worker.address), tp_rank=0, num_blocks=NUM_BLOCKS)
    consumer.register_kv_caches(target_caches)
    consumer.start_load(YuanRongConnectorMetadata(loads=[BlockTransfer("r2", hashes, (0, 1, 3))]))
    for name in target_caches:
        consumer.wait_layer(name)
    assert consumer.take_failed_block_ids() == set()
    axis = 0 if len(shape) == 4 else 1
    for name in source_caches:
        for src, dst in ((5, 0), (2, 1), (7, 3)):
            assert torch.equal(source_caches[name].select(axis, src), target_caches[name].select(axis, dst))
        assert not target_caches[name].select(axis, 2).any()  # untouched blocks stay untouched


def test_missing_blocks_are_reported_for_recompute(ds_worker: DataSystemConfig) -> None:
    settings = _settings(ds_worker.address, "model-missing")
    consumer = YuanRongWorker(settings, BlockStore(ds_worker.address), tp_rank=0, num_blocks=NUM_BLOCKS)
    consumer.register_kv_caches(_caches((NUM_BLOCKS, KV_HEADS, BLOCK, 2 * HEAD), fill_random=False))
    never_saved = tuple(chained_block_hashes([9] * (2 * BLOCK), BLOCK))
    consumer.start_load(YuanRongConnectorMetadata(loads=[BlockTransfer("r3", never_saved, (4, 6))]))
    assert consumer.take_failed_block_ids() == {4, 6}
    assert consumer.take_failed_block_ids() == set()  # reported once


def test_present_prefix_stops_at_the_first_gap(ds_worker: DataSystemConfig) -> None:
    store = BlockStore(ds_worker.address)
    store.put(["gap-a", "gap-c"], 4, lambda first, buffers: [b.__setitem__(slice(0, 4), b"abcd") for b in buffers])
    assert store.count_present_prefix(["gap-a", "gap-b", "gap-c"]) == 1
    assert store.count_present_prefix(["gap-a", "gap-c"], keys_per_block=2) == 1


def test_unreachable_store_is_a_miss_not_an_error() -> None:
    store = BlockStore("127.0.0.1:1", request_timeout_ms=500)
    assert store.count_present_prefix(["k"]) == 0
    assert store.get(["k"]) == [None]
