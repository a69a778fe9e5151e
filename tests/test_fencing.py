"""Fencing: a store call that misses its bound never touches KV memory vLLM may have
handed to another request. Each test freezes a real store helper (SIGSTOP) mid-call, as
a busy host does, lets the engine side report the miss, then changes the blocks as vLLM
would reuse them and lets the helper go on: nothing may be written into the cache after
the miss, nothing read from it published, and a preempted request's queued save never
runs once its blocks are reused. Against a real data system worker, with the engine's KV
cache shared with the helpers as on a CPU engine."""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from collections.abc import Iterator

import pytest
import torch

from deploy.config import DataSystemConfig
from patch.yuanrong_connector.paged_cache import PagedKVCache
from patch.yuanrong_connector.remote_store import RemoteBlockStore
from patch.yuanrong_connector.saver import BackgroundSaver
from patch.yuanrong_connector.shared_cache import share_cache_storage
from patch.yuanrong_connector.staging import HostStaging

LAYERS, BLOCKS = 2, 6
TIMEOUT_MS = 500  # a call's bound: 0.5 s per SDK call + 0.5 s (the SDK refuses less)


def _cache(fill: bool) -> dict[str, torch.Tensor]:
    """Every layer a view of one allocation, as vLLM's allocate_kv_cache makes it."""
    per_layer = BLOCKS * 2 * 16 * 2 * 32
    backing = torch.zeros(LAYERS * per_layer, dtype=torch.float32)
    if fill:
        backing.normal_()
    return {f"model.layers.{i}.self_attn.attn": backing[i * per_layer : (i + 1) * per_layer].view(BLOCKS, 2, 16, 2, 32)
            for i in range(LAYERS)}  # fmt: skip


class _Engine:
    """One engine's KV cache, shared with a store helper of its own."""

    def __init__(self, address: str, fill: bool) -> None:
        self.cache = _cache(fill)
        self.staging = HostStaging(PagedKVCache.register(self.cache, BLOCKS))
        self.store = RemoteBlockStore(address, request_timeout_ms=TIMEOUT_MS)
        region = share_cache_storage(self.cache)
        assert region is not None
        self.store.share_cache(region)
        assert self.store.connect()

    def block(self, block_id: int) -> list[torch.Tensor]:
        return [tensor[block_id].clone() for tensor in self.cache.values()]

    def reuse(self, block_id: int) -> None:
        """What vLLM does with a block it gave to another request: new bytes in it."""
        for tensor in self.cache.values():
            tensor[block_id].fill_(7.0)


@pytest.fixture
def engines(ds_worker: DataSystemConfig) -> Iterator[tuple[_Engine, _Engine]]:
    source, target = _Engine(ds_worker.address, fill=True), _Engine(ds_worker.address, fill=False)
    try:
        yield source, target
    finally:
        source.store.close()
        target.store.close()


@contextlib.contextmanager
def _frozen(store: RemoteBlockStore) -> Iterator[int]:
    """The store's helper stopped (SIGSTOP) for the block; let go (SIGCONT) after, if alive."""
    helper = store.helper_pid
    assert helper is not None
    os.kill(helper, signal.SIGSTOP)
    try:
        yield helper
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(helper, signal.SIGCONT)


def _settled(store: RemoteBlockStore, timeout_s: float = 30) -> None:
    """Until the store takes calls again: the frozen helper's late answer has come, or
    its replacement has connected (either way, the frozen call is over)."""
    deadline = time.monotonic() + timeout_s
    while not store.available:
        assert time.monotonic() < deadline, f"the store took no calls within {timeout_s} s"
        time.sleep(0.05)


def _keys(count: int) -> list[str]:
    return [f"fence-{uuid.uuid4().hex}" for _ in range(count)]


def test_a_late_load_never_writes_into_the_cache_after_its_miss(engines: tuple[_Engine, _Engine]) -> None:
    source, target = engines
    (key,) = _keys(1)
    assert source.staging.save(source.store, [key], [1], None).stored == 1
    with _frozen(target.store) as helper:
        started = time.monotonic()
        assert target.staging.load(target.store, [key], [3]) == {3}  # a miss: vLLM computes block 3
        assert time.monotonic() - started < 2.5  # the bound (1 s), not the freeze
        assert not os.path.exists(f"/proc/{helper}"), "the miss was reported while its helper could still write"
        target.reuse(3)  # vLLM computes block 3 for the request (or gives it to another)
        expected = target.block(3)
    _settled(target.store)  # a helper still alive has finished its late call by now
    assert all(torch.equal(now, before) for now, before in zip(target.block(3), expected))
    assert target.store.fenced == 1
    assert target.staging.load(target.store, [key], [4]) == set()  # the replacement serves loads
    assert all(torch.equal(loaded, stored) for loaded, stored in zip(target.block(4), source.block(1)))


def test_a_late_save_never_publishes_blocks_handed_back(engines: tuple[_Engine, _Engine]) -> None:
    source, target = engines
    (key,) = _keys(1)
    with _frozen(source.store) as helper:
        assert source.staging.save(source.store, [key], [2], None).failed == 1  # a miss: the request ends, block 2 freed
        assert not os.path.exists(f"/proc/{helper}"), "the miss was reported while its helper could still read"
        source.reuse(2)  # vLLM gives block 2 to another request
    _settled(source.store)
    assert source.store.exists([key]) == [False]  # nothing published under the old prefix's key
    assert target.staging.load(target.store, [key], [0]) == {0}


def test_a_preempted_requests_queued_save_never_runs_after_its_blocks_are_reused(engines: tuple[_Engine, _Engine]) -> None:
    source, target = engines
    first, preempted = _keys(2)
    saver = BackgroundSaver(source.store, source.staging, max_pending_blocks=100)
    try:
        with _frozen(source.store):
            saver.submit("a", [first], [1], None)  # under way, stuck on the frozen helper
            saver.submit("b", [preempted], [2], None)  # queued behind it
            saver.release({"b"}, warn_after_s=0.2)  # b is preempted: its blocks are reused in this step
            source.reuse(2)
        assert saver.wait_idle(30)
        _settled(source.store)
        stats = saver.take_stats().data
        assert stats.get("blocks_save_dropped") == 1
        assert source.store.exists([preempted]) == [False]
        assert target.staging.load(target.store, [preempted], [0]) == {0}
    finally:
        saver.close()
