"""CUDA KV caches through pinned staging and a real data system worker: blocks saved
from one cache (vLLM's FlashAttention layout, K and V apart) arrive bit-exact in another,
in one device chunk or in several, through the store helper's CUDA-registered arena
or with the SDK called in-process. Skipped without a GPU; run
on one with ``python -m pytest tests/test_cuda_staging.py`` (no vLLM needed)."""

from __future__ import annotations

import uuid

import pytest
import torch

from common.config import DataSystemConfig
from patch.yuanrong_connector import staging
from patch.yuanrong_connector.paged_cache import PagedKVCache
from patch.yuanrong_connector.remote_store import RemoteBlockStore, Store
from patch.yuanrong_connector.staging import HostStaging
from patch.yuanrong_connector.store import BlockStore

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

NUM_BLOCKS, LAYERS, BLOCK, KV_HEADS, HEAD = 12, 8, 16, 8, 128  # 512 KiB blocks, 16 pieces each


def _caches(fill_random: bool) -> dict[str, torch.Tensor]:
    make = torch.randn if fill_random else torch.zeros
    shape = (2, NUM_BLOCKS, BLOCK, KV_HEADS, HEAD)
    return {f"model.layers.{i}.self_attn.attn": make(*shape, dtype=torch.bfloat16, device="cuda") for i in range(LAYERS)}


def _store(kind: str, address: str, block_bytes: int) -> Store:
    if kind == "in-process":
        return BlockStore(address)
    store = RemoteBlockStore(address, arena_bytes=3 * block_bytes)  # 8 blocks: 3 moves each way
    store.arena_pinner = HostStaging.pin
    return store


@pytest.mark.parametrize("store_kind", ["helper", "in-process"])
@pytest.mark.parametrize("chunk_blocks", [None, 3], ids=["one-chunk", "chunks-of-3"])
def test_cuda_blocks_round_trip_bit_exact(ds_worker: DataSystemConfig, monkeypatch: pytest.MonkeyPatch,
                                          chunk_blocks: int | None, store_kind: str) -> None:  # fmt: skip
    source, target = _caches(fill_random=True), _caches(fill_random=False)
    saving = HostStaging(PagedKVCache.register(source, NUM_BLOCKS))
    loading = HostStaging(PagedKVCache.register(target, NUM_BLOCKS))
    assert saving.on_cuda and saving.cache.block_bytes == LAYERS * 2 * BLOCK * KV_HEADS * HEAD * 2
    if chunk_blocks is not None:
        monkeypatch.setattr(staging, "DEVICE_CHUNK_BYTES", chunk_blocks * saving.cache.block_bytes)
    store = _store(store_kind, ds_worker.address, saving.cache.block_bytes)
    keys = [f"cuda-{uuid.uuid4().hex}" for _ in range(8)]
    saved_from, loaded_into = [1, 3, 4, 6, 7, 9, 10, 11], [0, 2, 5, 8, 11, 1, 3, 4]

    result = saving.save(store, keys, saved_from, saving.forward_done_marker())
    assert result.stored == 8
    failed = loading.load(store, keys, loaded_into)
    store.close()

    assert failed == set()
    for name in source:
        assert torch.equal(target[name][:, loaded_into], source[name][:, saved_from])
    untouched = [b for b in range(NUM_BLOCKS) if b not in loaded_into]
    assert all(int(target[name][:, untouched].abs().sum()) == 0 for name in target)


def test_cuda_load_of_blocks_never_stored_fails_them_and_writes_nothing(ds_worker: DataSystemConfig) -> None:
    target = _caches(fill_random=False)
    loading = HostStaging(PagedKVCache.register(target, NUM_BLOCKS))
    keys = [f"cuda-absent-{uuid.uuid4().hex}" for _ in range(3)]

    failed = loading.load(BlockStore(ds_worker.address), keys, [0, 1, 2])

    assert failed == {0, 1, 2}  # vLLM computes them
    assert all(int(tensor.abs().sum()) == 0 for tensor in target.values())
