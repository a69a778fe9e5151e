"""The connector's worker half against a real data system worker: bytes saved from one
paged KV cache arrive bit-exact in another through the background loader, a handoff
waits for blocks still being published (bounded), and missing blocks are reported for
recompute in the same pass that reports the request loaded."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from common.config import DataSystemConfig
from deploy.datasystem import start_worker, stop_worker
from patch.yuanrong_connector.keys import KVLayout, block_key, chained_block_hashes
from patch.yuanrong_connector.metadata import BlockTransfer, YuanRongConnectorMetadata
from patch.yuanrong_connector.remote_store import ARENA_BYTES, RemoteBlockStore
from patch.yuanrong_connector.settings import ConnectorSettings
from patch.yuanrong_connector.store import BlockStore
from patch.yuanrong_connector.worker import YuanRongWorker
from testkit.helpers import free_port, freeze, pids_matching

NUM_BLOCKS, KV_HEADS, BLOCK, HEAD = 8, 2, 16, 64
BLOCK_BYTES = 2 * KV_HEADS * BLOCK * 2 * HEAD * 2  # 2 layers, K and V, bfloat16


def _settings(address: str, layout_model: str) -> ConnectorSettings:
    layout = KVLayout(layout_model, "torch.bfloat16", BLOCK, KV_HEADS, HEAD, 2, 1)
    return ConnectorSettings(address, saves=True, prefix_reuse=False, loads_remote_prefill=True, layout=layout)


def _wait_loaded(worker: YuanRongWorker, request_id: str) -> tuple[float, set[int]]:
    """(seconds until ``request_id`` was reported loaded, failed block ids of that pass)."""
    started = time.monotonic()
    failed = worker.wait_loaded(request_id, timeout_s=10)
    assert failed is not None, f"{request_id} not reported loaded within 10 s"
    return time.monotonic() - started, failed


def _save(address: str, settings: ConnectorSettings, hashes: tuple[str, ...], caches: dict[str, torch.Tensor],
          block_ids: tuple[int, ...], arena_bytes: int = ARENA_BYTES) -> None:  # fmt: skip
    producer = YuanRongWorker(settings, RemoteBlockStore(address, arena_bytes=arena_bytes), tp_rank=0, num_blocks=NUM_BLOCKS)
    producer.register_kv_caches(caches)
    producer.end_step(YuanRongConnectorMetadata(saves=[BlockTransfer("saver", hashes, block_ids)]))
    producer.shutdown()  # waits for the background saver


def _caches(shape: tuple[int, ...], fill_random: bool) -> dict[str, torch.Tensor]:
    make = torch.randn if fill_random else torch.zeros
    return {f"model.layers.{i}.self_attn.attn": make(*shape, dtype=torch.bfloat16) for i in range(2)}


@pytest.mark.parametrize(
    ("shape", "arena_bytes"),
    [
        ((NUM_BLOCKS, KV_HEADS, BLOCK, 2 * HEAD), ARENA_BYTES),
        ((2, NUM_BLOCKS, BLOCK, KV_HEADS, HEAD), ARENA_BYTES),
        ((NUM_BLOCKS, KV_HEADS, BLOCK, 2 * HEAD), 2 * BLOCK_BYTES),  # 3 blocks: 2 moves each way
    ],
    ids=["cpu-layout", "kv-split-layout", "two-blocks-per-move"],
)
def test_blocks_saved_by_one_engine_load_bit_exact_in_another(
    ds_worker: DataSystemConfig, shape: tuple[int, ...], arena_bytes: int
) -> None:
    settings = _settings(ds_worker.address, f"model-{len(shape)}-{arena_bytes}")
    hashes = tuple(chained_block_hashes(list(range(3 * BLOCK)), BLOCK))
    source_caches = _caches(shape, fill_random=True)
    _save(ds_worker.address, settings, hashes, source_caches, (5, 2, 7), arena_bytes)

    store = BlockStore(ds_worker.address)
    keys = [block_key(settings.layout.fingerprint(), 0, h) for h in hashes]
    assert store.count_present_prefix(keys) == 3

    target_caches = _caches(shape, fill_random=False)
    consumer_store = RemoteBlockStore(ds_worker.address, arena_bytes=arena_bytes)
    consumer = YuanRongWorker(settings, consumer_store, tp_rank=0, num_blocks=NUM_BLOCKS)
    consumer.register_kv_caches(target_caches)
    consumer.start_load(YuanRongConnectorMetadata(loads=[BlockTransfer("r2", hashes, (0, 1, 3))]))
    _, failed = _wait_loaded(consumer, "r2")
    consumer.shutdown()
    assert failed == set()
    axis = 0 if len(shape) == 4 else 1
    for name in source_caches:
        for src, dst in ((5, 0), (2, 1), (7, 3)):
            assert torch.equal(source_caches[name].select(axis, src), target_caches[name].select(axis, dst))
        assert not target_caches[name].select(axis, 2).any()  # untouched blocks stay untouched


def test_missing_blocks_are_reported_for_recompute(ds_worker: DataSystemConfig) -> None:
    settings = _settings(ds_worker.address, "model-missing")
    consumer = YuanRongWorker(settings, RemoteBlockStore(ds_worker.address), tp_rank=0, num_blocks=NUM_BLOCKS)
    consumer.register_kv_caches(_caches((NUM_BLOCKS, KV_HEADS, BLOCK, 2 * HEAD), fill_random=False))
    never_saved = tuple(chained_block_hashes([9] * (2 * BLOCK), BLOCK))
    consumer.start_load(YuanRongConnectorMetadata(loads=[BlockTransfer("r3", never_saved, (4, 6))]))
    _, failed = _wait_loaded(consumer, "r3")
    assert failed == {4, 6}
    assert consumer.take_failed_block_ids() == set()  # reported once
    consumer.shutdown()


def test_handoff_waits_for_blocks_published_after_it_started(ds_worker: DataSystemConfig) -> None:
    settings = _settings(ds_worker.address, "model-late")
    shape = (NUM_BLOCKS, KV_HEADS, BLOCK, 2 * HEAD)
    hashes = tuple(chained_block_hashes(list(range(500, 500 + 2 * BLOCK)), BLOCK))
    consumer = YuanRongWorker(settings, RemoteBlockStore(ds_worker.address), tp_rank=0, num_blocks=NUM_BLOCKS)
    target = _caches(shape, fill_random=False)
    consumer.register_kv_caches(target)
    consumer.start_load(YuanRongConnectorMetadata(loads=[BlockTransfer("late", hashes, (1, 2), wait_s=5.0)]))
    time.sleep(0.3)  # a window to watch the load wait: nothing to poll for
    assert consumer.finished(set(), idle_step=False) == (set(), set())  # still waiting, nothing blocked
    source = _caches(shape, fill_random=True)
    _save(ds_worker.address, settings, hashes, source, (3, 4))
    seconds, failed = _wait_loaded(consumer, "late")
    consumer.shutdown()
    assert failed == set() and seconds < 2
    for name in source:
        assert torch.equal(target[name][1], source[name][3]) and torch.equal(target[name][2], source[name][4])


def test_handoff_stops_waiting_at_its_bound_and_reports_the_rest(ds_worker: DataSystemConfig) -> None:
    settings = _settings(ds_worker.address, "model-partial")
    shape = (NUM_BLOCKS, KV_HEADS, BLOCK, 2 * HEAD)
    hashes = tuple(chained_block_hashes(list(range(700, 700 + 3 * BLOCK)), BLOCK))
    _save(ds_worker.address, settings, hashes[:1], _caches(shape, fill_random=True), (0,))
    consumer = YuanRongWorker(settings, RemoteBlockStore(ds_worker.address), tp_rank=0, num_blocks=NUM_BLOCKS)
    consumer.register_kv_caches(_caches(shape, fill_random=False))
    started = time.monotonic()
    consumer.start_load(YuanRongConnectorMetadata(loads=[BlockTransfer("partial", hashes, (5, 6, 7), wait_s=0.3)]))
    _, failed = _wait_loaded(consumer, "partial")
    waited = time.monotonic() - started
    consumer.shutdown()
    assert failed == {6, 7}  # the first block is loaded, the two never published are computed
    assert 0.3 <= waited < 1.5


def test_a_request_aborted_while_waiting_is_reported_at_once(ds_worker: DataSystemConfig) -> None:
    settings = _settings(ds_worker.address, "model-abort")
    hashes = tuple(chained_block_hashes(list(range(900, 900 + 2 * BLOCK)), BLOCK))
    consumer = YuanRongWorker(settings, RemoteBlockStore(ds_worker.address), tp_rank=0, num_blocks=NUM_BLOCKS)
    consumer.register_kv_caches(_caches((NUM_BLOCKS, KV_HEADS, BLOCK, 2 * HEAD), fill_random=False))
    consumer.start_load(YuanRongConnectorMetadata(loads=[BlockTransfer("gone", hashes, (1, 2), wait_s=30.0)]))
    started = time.monotonic()
    consumer.finished({"gone"}, idle_step=False)  # vLLM finished (aborted) it
    seconds, failed = _wait_loaded(consumer, "gone")
    consumer.shutdown()
    assert failed == {1, 2} and time.monotonic() - started < 2


def test_lookups_and_reads_longer_than_one_store_call(ds_worker: DataSystemConfig) -> None:
    """The data system takes at most 10000 keys per exist/get: a longer prompt (or TP x
    blocks) is asked in several calls, not refused."""
    store = BlockStore(ds_worker.address)
    keys = [f"long-{i}" for i in range(10_050)]
    result = store.put(keys, 8, lambda first, buffers: [b.__setitem__(slice(0, 8), b"12345678") for b in buffers])
    assert result.stored == len(keys)
    assert store.count_present_prefix(keys) == len(keys)
    buffers = store.get(keys)
    assert len(buffers) == len(keys) and all(b is not None for b in buffers)
    assert bytes(buffers[-1].immutable_data()) == b"12345678"


def test_present_prefix_stops_at_the_first_gap(ds_worker: DataSystemConfig) -> None:
    store = BlockStore(ds_worker.address)
    store.put(["gap-a", "gap-c"], 4, lambda first, buffers: [b.__setitem__(slice(0, 4), b"abcd") for b in buffers])
    assert store.count_present_prefix(["gap-a", "gap-b", "gap-c"]) == 1
    assert store.count_present_prefix(["gap-a", "gap-c"], keys_per_block=2) == 1


def test_unreachable_store_is_a_miss_not_an_error() -> None:
    store = BlockStore("127.0.0.1:1", request_timeout_ms=500)
    assert store.count_present_prefix(["k"]) == 0
    assert store.get(["k"]) == [None]


def test_a_worker_that_answers_late_is_slow_not_down(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A frozen worker (SIGSTOP: alive, connected, not answering) costs each call its
    timeout and that call is a miss, but the store is not marked down: once the worker
    answers again, so does the store, at once. A stopped worker is marked down."""
    settings = DataSystemConfig(worker_host="127.0.0.1", worker_port=free_port(), metastore_port=free_port(),
                                shared_memory_mb=64, spill_dir=None, spill_size_mb=0)  # fmt: skip
    start_worker(settings, tmp_path_factory.mktemp("slow-datasystem"))
    try:
        store = BlockStore(settings.address, request_timeout_ms=600)
        store.put(["late"], 8, lambda first, buffers: buffers[0].__setitem__(slice(0, 8), b"12345678"))
        assert store.exists(["late"]) == [True]
        (pid,) = pids_matching(f"--worker_address={settings.address}")
        freeze(pid)
        try:
            started = time.monotonic()
            assert store.exists(["late"]) == [False]  # a miss...
            assert 0.5 < time.monotonic() - started < 3.0  # ...after the request timeout
            assert store.available  # not marked down
        finally:
            os.kill(pid, signal.SIGCONT)
        deadline = time.monotonic() + 10
        while store.exists(["late"]) != [True] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert store.exists(["late"]) == [True]
    finally:
        stop_worker(settings.address)
    assert store.exists(["late"]) == [False]
    assert not store.available  # stopped: marked down
