"""The background loader reports each load to vLLM exactly once, whatever fails: a load
whose copy raises is reported failed (vLLM computes its blocks), the loads decided in
the same pass keep their own outcomes, and a handoff still waiting for its blocks goes on
waiting instead of being reported failed. A new load is first read at once, unasked: a
handoff whose blocks are there costs one read and no ``exists``; one missing a block asks
until it comes and reads again; a corrupt block ends the wait at once. Against a real
data system worker; the fault is a copy that raises, as a device error would, or a value
written under another block's key."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence

import torch

from common.config import DataSystemConfig
from patch.yuanrong_connector.loader import BackgroundLoader, LoadOutcome
from patch.yuanrong_connector.paged_cache import PagedKVCache
from patch.yuanrong_connector.remote_store import Store
from patch.yuanrong_connector.staging import HostStaging
from patch.yuanrong_connector.store import BlockStore
from tests.stray_writer import stray_write

BLOCKS = 8
BROKEN_BLOCK = 5  # a copy into this block raises


class _FaultyStaging(HostStaging):
    def load(self, store: Store, keys: Sequence[str], block_ids: Sequence[int]) -> set[int]:
        if BROKEN_BLOCK in block_ids:
            raise RuntimeError("device copy failed")
        return super().load(store, keys, block_ids)


def _fill(first: int, buffers: list[memoryview]) -> None:
    for buffer in buffers:
        buffer[:] = b"\x01" * len(buffer)


def test_each_load_is_reported_once_when_another_of_its_pass_fails(ds_worker: DataSystemConfig) -> None:
    cache = {"model.layers.0.self_attn.attn": torch.zeros(BLOCKS, 2, 16, 2, 32, dtype=torch.float32)}
    staging = _FaultyStaging(PagedKVCache.register(cache, BLOCKS))
    size = staging.cache.block_bytes
    store = BlockStore(ds_worker.address)
    assert store.connect()
    stored, broken, later = (f"reports-{uuid.uuid4().hex}" for _ in range(3))
    assert store.put([stored, broken], size, _fill).stored == 2
    loader = BackgroundLoader(store, staging)
    outcomes: list[LoadOutcome] = []
    try:
        with loader._lock:  # the three in one pass of the loader thread
            loader.submit("fine", [stored], [1], wait_s=0)
            loader.submit("broken", [broken], [BROKEN_BLOCK], wait_s=0)
            loader.submit("waiting", [later], [2], wait_s=10)  # a handoff: its block is not published yet
        deadline = time.monotonic() + 10
        while {o.request_id for o in outcomes} != {"fine", "broken"}:
            assert time.monotonic() < deadline, f"reported so far: {outcomes}"
            outcomes += loader.take_outcomes()
            time.sleep(0.01)
        assert store.put([later], size, _fill).stored == 1  # the prefill publishes the handoff's block
        while "waiting" not in {o.request_id for o in outcomes}:
            assert time.monotonic() < deadline, f"reported so far: {outcomes}"
            outcomes += loader.take_outcomes()
            time.sleep(0.01)
        time.sleep(0.2)  # a second report would come within a few poll periods (2-32 ms)
        outcomes += loader.take_outcomes()
    finally:
        loader.close(5)
    reported = sorted((o.request_id, sorted(o.failed_block_ids)) for o in outcomes)
    assert reported == [("broken", [BROKEN_BLOCK]), ("fine", []), ("waiting", [])]
    assert float(cache["model.layers.0.self_attn.attn"][2].sum()) != 0  # the handoff's block was loaded


class _CountingStore(BlockStore):
    """A real store that counts the loader's calls of it."""

    def __init__(self, address: str) -> None:
        super().__init__(address)
        self.calls: list[str] = []

    def exists(self, keys: Sequence[str]) -> list[bool]:
        self.calls.append("exists")
        return super().exists(keys)

    def get(self, keys: Sequence[str], value_size: int = 0) -> list[object | None]:
        self.calls.append("get")
        return super().get(keys, value_size)


def _loaded(loader: BackgroundLoader, request_id: str, timeout_s: float = 10) -> LoadOutcome:
    deadline = time.monotonic() + timeout_s
    while True:
        outcomes = [o for o in loader.take_outcomes() if o.request_id == request_id]
        if outcomes:
            return outcomes[0]
        assert time.monotonic() < deadline, f"{request_id} was not reported within {timeout_s} s"
        time.sleep(0.005)


def _counting_loader(ds_worker: DataSystemConfig) -> tuple[BackgroundLoader, _CountingStore, torch.Tensor, int]:
    layer = torch.zeros(BLOCKS, 2, 16, 2, 32, dtype=torch.float32)
    staging = HostStaging(PagedKVCache.register({"model.layers.0.self_attn.attn": layer}, BLOCKS))
    store = _CountingStore(ds_worker.address)
    assert store.connect()
    return BackgroundLoader(store, staging), store, layer, staging.cache.block_bytes


def test_a_handoff_whose_blocks_are_published_is_one_read_and_no_question(ds_worker: DataSystemConfig) -> None:
    loader, store, layer, size = _counting_loader(ds_worker)
    keys = [f"at-once-{uuid.uuid4().hex}" for _ in range(2)]
    assert store.put(keys, size, _fill).stored == 2
    try:
        loader.submit("handoff", keys, [3, 4], wait_s=10)
        outcome = _loaded(loader, "handoff")
    finally:
        loader.close(5)
    assert outcome.failed_block_ids == set()
    assert store.calls == ["get"]
    assert layer[3].numpy().tobytes() == layer[4].numpy().tobytes() == b"\x01" * size


def test_a_handoff_missing_a_block_waits_for_it_then_reads_again(ds_worker: DataSystemConfig) -> None:
    loader, store, layer, size = _counting_loader(ds_worker)
    early, late = (f"at-once-{uuid.uuid4().hex}" for _ in range(2))
    assert store.put([early], size, _fill).stored == 1
    try:
        loader.submit("handoff", [early, late], [3, 4], wait_s=10)
        deadline = time.monotonic() + 10
        while "exists" not in store.calls:  # the first read found one block: it asks until the other comes
            assert time.monotonic() < deadline, f"calls: {store.calls}"
            time.sleep(0.005)
        assert store.put([late], size, _fill).stored == 1
        outcome = _loaded(loader, "handoff")
    finally:
        loader.close(5)
    assert outcome.failed_block_ids == set()
    assert store.calls[0] == "get" and store.calls[-1] == "get" and store.calls.count("get") == 2
    assert set(store.calls[1:-1]) == {"exists"}


def test_a_corrupt_block_ends_a_handoffs_wait_at_once(ds_worker: DataSystemConfig) -> None:
    loader, store, layer, size = _counting_loader(ds_worker)
    first, second = (f"at-once-{uuid.uuid4().hex}" for _ in range(2))
    assert store.put([first, second], size, _fill).stored == 2
    stray_write(ds_worker.address, "copy", second, first)  # right bytes, wrong block
    try:
        started = time.monotonic()
        loader.submit("handoff", [first, second], [3, 4], wait_s=30)
        outcome = _loaded(loader, "handoff", timeout_s=20)
    finally:
        loader.close(5)
    assert time.monotonic() - started < 20  # not the 30 s wait for a block that is deleted
    assert outcome.failed_block_ids == {4}
    assert store.calls == ["get"]
