"""CUDA: the connector's save and load of paged KV blocks through pinned staging and the
data system, against a pinned host<->device copy of the same bytes.

    python -m benchmarks.cuda_staging [--model llama3-8b] [--tokens 4096] [--repeats 5]

Needs a CUDA GPU, torch and openyuanrong-datasystem (worker and SDK); not vLLM: it runs
the code the background saver and loader run (``HostStaging.save`` / ``HostStaging.load``
over ``BlockStore``) on caches laid out as vLLM's CUDA attention backends keep them
(per layer ``[2, num_blocks, block_size, kv_heads, head_size]``, FlashAttention).

Per run, fresh keys, blocks scattered over the cache as block tables are:
- baseline: one contiguous pinned host tensor <-> one contiguous device tensor of the
  same bytes (``copy_``, synchronised): what the bus gives;
- connector save: event after "the forward pass" -> blocks published in the store;
- connector load: get of the published blocks -> blocks in a zeroed cache, checked
  bit-exact against the source blocks;
  both as engines run them (``RemoteBlockStore``: store calls in a helper process, the
  device copying straight into the helper's CUDA-registered arena, the helper copying
  between the arena and the store) and with the SDK called in-process (``BlockStore``:
  through a pinned staging buffer, zero-copy store buffers; what engines did before);
- data system raw put/get: the same bytes between a pinned host tensor and the store's
  shared memory (mcreate, memcpy, mset_buffer / get, memcpy): the least the store costs.
Keys are deleted after each run, as a full store recycles memory (fresh shared memory
would add first-touch page faults to every run).
GB/s = bytes / best wall time of ``--repeats`` (1e9 bytes); the phases of the best run
of the raw store (mcreate, memcpy, publish; get, memcpy) are printed too.
Results go to benchmarks/results/cuda_staging.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from common.config import DataSystemConfig
from deploy.datasystem import start_worker, stop_worker
from patch.yuanrong_connector.paged_cache import PagedKVCache
from patch.yuanrong_connector.remote_store import CUDA_ARENA_BYTES, RemoteBlockStore, Store
from patch.yuanrong_connector.staging import HostStaging
from patch.yuanrong_connector.store import BlockStore
from testkit.helpers import free_port

RESULTS = Path(__file__).resolve().parent / "results" / "cuda_staging.json"


@dataclass(frozen=True)
class ModelShape:
    layers: int
    kv_heads: int
    head_size: int
    block_size: int  # vLLM's CUDA default


MODELS = {
    "llama3-8b": ModelShape(layers=32, kv_heads=8, head_size=128, block_size=16),
    "qwen2-100m": ModelShape(layers=8, kv_heads=4, head_size=64, block_size=16),
}


def cuda_caches(shape: ModelShape, num_blocks: int, device: torch.device, fill_random: bool) -> dict[str, torch.Tensor]:
    make = torch.randn if fill_random else torch.zeros
    return {
        f"model.layers.{i}.self_attn.attn": make(
            2, num_blocks, shape.block_size, shape.kv_heads, shape.head_size, dtype=torch.bfloat16, device=device
        )
        for i in range(shape.layers)
    }


def _timed(fn: object) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    fn()  # type: ignore[operator]
    torch.cuda.synchronize()
    return time.perf_counter() - started


def measure_baseline(total_bytes: int, repeats: int, device: torch.device) -> tuple[float, float]:
    """Best (device->host, host->device) seconds for one contiguous pinned copy."""
    on_device = torch.randint(0, 255, (total_bytes,), dtype=torch.uint8, device=device)
    pinned = torch.empty(total_bytes, dtype=torch.uint8, pin_memory=True)
    d2h = min(_timed(lambda: pinned.copy_(on_device, non_blocking=True)) for _ in range(repeats))
    h2d = min(_timed(lambda: on_device.copy_(pinned, non_blocking=True)) for _ in range(repeats))
    return d2h, h2d


def measure_raw(client: object, total_blocks: int, block_bytes: int, repeats: int) -> dict[str, float]:
    """Best seconds of the data system alone moving the same bytes between a pinned host
    tensor and its shared memory: put (mcreate, one memcpy per value, mset_buffer) and get
    (zero-copy get, one memcpy per value); keys deleted after each run."""
    pinned = torch.randint(0, 255, (total_blocks, block_bytes), dtype=torch.uint8).pin_memory()
    sink = torch.empty_like(pinned).pin_memory()
    best: dict[str, float] = {}
    for run in range(repeats + 1):
        keys = [f"raw-{uuid.uuid4().hex}" for _ in range(total_blocks)]
        started = time.perf_counter()
        buffers = client.mcreate(keys, [block_bytes] * total_blocks)  # type: ignore[attr-defined]
        created = time.perf_counter()
        torch._foreach_copy_([torch.frombuffer(b.MutableData(), dtype=torch.uint8) for b in buffers], list(pinned.unbind(0)))
        filled = time.perf_counter()
        client.mset_buffer(buffers)  # type: ignore[attr-defined]
        published = time.perf_counter()
        views = client.get_read_only_buffers(keys)  # type: ignore[attr-defined]
        got = time.perf_counter()
        torch._foreach_copy_(list(sink.unbind(0)), [torch.frombuffer(v.immutable_data(), dtype=torch.uint8) for v in views])
        copied = time.perf_counter()
        del views, buffers
        client.delete(keys)  # type: ignore[attr-defined]
        times = {"raw_put_s": published - started, "raw_put_mcreate_s": created - started, "raw_put_memcpy_s": filled - created,
                 "raw_put_publish_s": published - filled, "raw_get_s": copied - published, "raw_get_call_s": got - published,
                 "raw_get_memcpy_s": copied - got}  # fmt: skip
        if run > 0:  # the first run warms the allocators up
            best = {name: min(best.get(name, t), t) for name, t in times.items()}
    assert torch.equal(sink, pinned)
    return best


def measure_connector(store: Store, client: object, shape: ModelShape, block_ids: list[int], num_blocks: int,
                      repeats: int, device: torch.device) -> dict[str, float]:  # fmt: skip
    source = cuda_caches(shape, num_blocks, device, fill_random=True)
    target = cuda_caches(shape, num_blocks, device, fill_random=False)
    saving = HostStaging(PagedKVCache.register(source, num_blocks))
    loading = HostStaging(PagedKVCache.register(target, num_blocks))
    best: dict[str, float] = {}
    for run in range(repeats + 1):
        keys = [f"cuda-bench-{uuid.uuid4().hex}" for _ in block_ids]
        for tensor in target.values():
            tensor.zero_()
        torch.cuda.synchronize()
        started = time.perf_counter()
        marker = saving.forward_done_marker()
        result = saving.save(store, keys, block_ids, marker)
        saved = time.perf_counter()
        assert result.stored == len(keys), f"store refused blocks: {result}"
        failed = loading.load(store, keys, block_ids)
        loaded = time.perf_counter()
        assert failed == set(), f"blocks not loaded: {sorted(failed)}"
        for name in source:
            assert torch.equal(target[name][:, block_ids], source[name][:, block_ids]), f"{name}: loaded blocks differ"
        client.delete(keys)  # type: ignore[attr-defined]  # as a full store recycles memory
        times = {"save_s": saved - started, "load_s": loaded - saved}
        if run > 0:  # the first run warms the allocators up
            best = {name: min(best.get(name, t), t) for name, t in times.items()}
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="llama3-8b")
    parser.add_argument("--tokens", type=int, default=4096, help="prompt tokens whose KV is moved per run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--arena-mib", type=int, default=CUDA_ARENA_BYTES >> 20, help="the store helper's arena")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.cuda_staging needs a CUDA GPU; none is visible (torch.cuda.is_available() is False)")
    torch.manual_seed(0)
    device = torch.device("cuda", 0)
    shape = MODELS[args.model]
    blocks = -(-args.tokens // shape.block_size)
    num_blocks = 2 * blocks
    block_ids = list(range(1, num_blocks, 2))[:blocks]  # scattered, like real block tables
    block_bytes = 2 * shape.layers * shape.block_size * shape.kv_heads * shape.head_size * 2
    total = block_bytes * blocks

    home = Path(tempfile.mkdtemp(prefix="bench-ds-"))
    shared_mb = 2 * total // 2**20 + 512  # keys are deleted after each run
    ds = DataSystemConfig("127.0.0.1", free_port(), free_port(), shared_memory_mb=shared_mb, spill_dir=None, spill_size_mb=0)
    start_worker(ds, home)
    try:
        from yr.datasystem import KVClient

        client = KVClient("127.0.0.1", ds.worker_port)
        client.init()
        store = BlockStore(ds.address, request_timeout_ms=10000)
        assert store.connect(), f"no data system worker at {ds.address}"
        raw = measure_raw(client, blocks, block_bytes, args.repeats)
        in_process = measure_connector(store, client, shape, block_ids, num_blocks, args.repeats, device)
        remote = RemoteBlockStore(ds.address, request_timeout_ms=10000, arena_bytes=args.arena_mib << 20)
        remote.arena_pinner = HostStaging.pin
        try:
            assert remote.connect(), f"the store helper could not reach {ds.address}"
            ours = measure_connector(remote, client, shape, block_ids, num_blocks, args.repeats, device)
        finally:
            remote.close()
    finally:
        stop_worker(ds.address)
        shutil.rmtree(home, ignore_errors=True)
    d2h, h2d = measure_baseline(total, args.repeats, device)

    gbps = lambda seconds: round(total / seconds / 1e9, 2)  # noqa: E731
    result = {
        "gpu": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "model": args.model,
        "tokens": blocks * shape.block_size,
        "blocks": blocks,
        "block_bytes": block_bytes,
        "pieces_per_block": 2 * shape.layers,
        "total_bytes": total,
        "repeats": args.repeats,
        "arena_mib": args.arena_mib,
        "gbps": {
            "pinned copy device->host": gbps(d2h),
            "pinned copy host->device": gbps(h2d),
            "data system raw put (pinned->store)": gbps(raw["raw_put_s"]),
            "data system raw get (store->pinned)": gbps(raw["raw_get_s"]),
            "connector save (device->store)": gbps(ours["save_s"]),
            "connector load (store->device)": gbps(ours["load_s"]),
            "  same, SDK calls in-process: save": gbps(in_process["save_s"]),
            "  same, SDK calls in-process: load": gbps(in_process["load_s"]),
        },
        "connector_vs_pinned_copy": {"save": round(d2h / ours["save_s"], 2), "load": round(h2d / ours["load_s"], 2)},
        "connector_vs_raw_store": {"save": round(raw["raw_put_s"] / ours["save_s"], 2), "load": round(raw["raw_get_s"] / ours["load_s"], 2)},
        "phases_ms": {name: round(seconds * 1000, 2) for name, seconds in {**raw, **ours}.items()},
        "in_process_vs_pinned_copy": {"save": round(d2h / in_process["save_s"], 2), "load": round(h2d / in_process["load_s"], 2)},
    }
    print(f"{result['gpu']}, {args.model}: {result['tokens']} tokens = {blocks} blocks x {block_bytes / 2**20:.2f} MiB "
          f"({2 * shape.layers} pieces each) = {total / 2**20:.0f} MiB per run, best of {args.repeats}")  # fmt: skip
    for name, value in result["gbps"].items():
        print(f"  {name:38}{value:8.2f} GB/s")
    print(f"  connector / pinned copy: save {result['connector_vs_pinned_copy']['save']}x, "
          f"load {result['connector_vs_pinned_copy']['load']}x; connector / raw store: "
          f"save {result['connector_vs_raw_store']['save']}x, load {result['connector_vs_raw_store']['load']}x")  # fmt: skip
    print(f"  phases (ms): {result['phases_ms']}")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {RESULTS}")


if __name__ == "__main__":
    main()
