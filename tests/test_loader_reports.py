"""The background loader reports each load to vLLM exactly once, whatever fails: a load
whose copy raises is reported failed (vLLM computes its blocks), the loads decided in
the same pass keep their own outcomes, and a handoff still waiting for its blocks goes on
waiting instead of being reported failed. Against a real data system worker; the fault
is a copy that raises, as a device error would."""

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
