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

from common.config import DataSystemConfig
from patch.yuanrong_connector.remote_store import RemoteBlockStore
from patch.yuanrong_connector.saver import BackgroundSaver
from testkit.helpers import freeze
from tests.cache_engine import CacheEngine

TIMEOUT_MS = 500  # a call's bound: 0.5 s per SDK call + 0.5 s (the SDK refuses less)


@pytest.fixture
def engines(ds_worker: DataSystemConfig) -> Iterator[tuple[CacheEngine, CacheEngine]]:
    source = CacheEngine(ds_worker.address, fill=True, request_timeout_ms=TIMEOUT_MS)
    target = CacheEngine(ds_worker.address, fill=False, request_timeout_ms=TIMEOUT_MS)
    try:
        yield source, target
    finally:
        source.close()
        target.close()


@contextlib.contextmanager
def _frozen(store: RemoteBlockStore) -> Iterator[int]:
    """The store's helper stopped (SIGSTOP) for the block; let go (SIGCONT) after, if alive."""
    helper = store.helper_pid
    assert helper is not None
    freeze(helper)
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


def test_a_late_load_never_writes_into_the_cache_after_its_miss(engines: tuple[CacheEngine, CacheEngine]) -> None:
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


def test_a_late_save_never_publishes_blocks_handed_back(engines: tuple[CacheEngine, CacheEngine]) -> None:
    source, target = engines
    (key,) = _keys(1)
    with _frozen(source.store) as helper:
        assert source.staging.save(source.store, [key], [2], None).failed == 1  # a miss: the request ends, block 2 freed
        assert not os.path.exists(f"/proc/{helper}"), "the miss was reported while its helper could still read"
        source.reuse(2)  # vLLM gives block 2 to another request
    _settled(source.store)
    assert source.store.exists([key]) == [False]  # nothing published under the old prefix's key
    assert target.staging.load(target.store, [key], [0]) == {0}


def test_a_preempted_requests_queued_save_never_runs_after_its_blocks_are_reused(engines: tuple[CacheEngine, CacheEngine]) -> None:
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
