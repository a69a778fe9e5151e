"""A CPU engine's KV cache moved into shared memory: its bytes (and those of neighbours
on its first and last pages) survive the move, the memfd and the tensors see each
other's writes, and blocks go to and from a real data system worker through the store
helper's one copy (the arena path is never taken), bit-exact."""

from __future__ import annotations

import mmap
import uuid

import pytest
import torch

from common.config import DataSystemConfig
from patch.yuanrong_connector.paged_cache import PagedKVCache
from patch.yuanrong_connector.remote_store import RemoteBlockStore
from patch.yuanrong_connector.shared_cache import share_cache_storage, share_memory
from patch.yuanrong_connector.staging import HostStaging
from tests.cache_engine import vllm_like_cache

LAYERS, BLOCKS = 4, 10


def test_moved_memory_keeps_its_bytes_and_is_shared_both_ways() -> None:
    backing = torch.randint(0, 255, (3 * mmap.PAGESIZE + 1000,), dtype=torch.uint8)
    before = backing.clone()
    inner = backing[700 : 700 + 2 * mmap.PAGESIZE]  # not page-aligned: neighbours share its first and last pages

    region = share_memory(inner.data_ptr(), inner.numel())

    assert torch.equal(backing, before)  # every byte kept, the neighbours' too
    shared = mmap.mmap(region.fd, region.size)
    offset = region.offset(inner.data_ptr())
    assert shared[offset : offset + 16] == bytes(inner[:16].tolist())
    inner[5] = 7
    assert shared[offset + 5] == 7  # the tensor writes the memfd
    shared[offset + 6] = 9
    assert int(inner[6]) == 9  # and sees its writes
    with pytest.raises(ValueError):
        region.offset(region.start + region.size)


def _vllm_like_cache(fill: bool) -> dict[str, torch.Tensor]:
    return vllm_like_cache(LAYERS, BLOCKS, fill, torch.bfloat16)


def _shared_store(address: str, cache: dict[str, torch.Tensor]) -> RemoteBlockStore:
    store = RemoteBlockStore(address)
    region = share_cache_storage(cache)
    assert region is not None
    store.share_cache(region)
    return store


def test_blocks_go_through_the_shared_cache_bit_exact(ds_worker: DataSystemConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    def arena_path(*args: object) -> None:
        raise AssertionError("a shared cache's blocks went through the arena")

    monkeypatch.setattr(RemoteBlockStore, "put", arena_path)
    monkeypatch.setattr(RemoteBlockStore, "get", arena_path)
    source, target = _vllm_like_cache(fill=True), _vllm_like_cache(fill=False)
    expected = {name: tensor.clone() for name, tensor in source.items()}
    saving, loading = HostStaging(PagedKVCache.register(source, BLOCKS)), HostStaging(PagedKVCache.register(target, BLOCKS))
    saver, loader = _shared_store(ds_worker.address, source), _shared_store(ds_worker.address, target)
    loader = loader.sibling()  # the loader thread's store: the same shared cache
    keys = [f"shared-{uuid.uuid4().hex}" for _ in range(5)]
    try:
        assert saving.save(saver, keys[:2] + keys[3:], [1, 2, 5, 6], None).stored == 4  # keys[2] never stored

        failed = loading.load(loader, keys, [9, 8, 7, 0, 4])

        assert failed == {7, 0, 4}  # from the gap on, vLLM computes
        for name in source:
            assert torch.equal(source[name], expected[name])  # saving left the source as it was
            assert torch.equal(target[name][[9, 8]], expected[name][[1, 2]])
            assert int(target[name][[7, 0, 4, 1, 2, 3, 5, 6]].abs().sum()) == 0
    finally:
        saver.close()
        loader.close()


def test_layers_in_separate_allocations_are_not_shared() -> None:
    caches = {f"layer.{i}": torch.zeros(BLOCKS, 16, dtype=torch.bfloat16) for i in range(2)}
    assert share_cache_storage(caches) is None
