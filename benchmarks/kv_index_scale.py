"""The KV index at scale: 256 engines, ~1M indexed blocks from synthetic vLLM events;
a routing decision's latency and the index's memory.

    .venv/bin/python -m benchmarks.kv_index_scale [--engines 256] [--decisions 3000] [--store] [--in-flight N]

Workload (block size 16, 2048-token prompts = 128 blocks): every engine holds a common
256-token system prompt; 128 groups each add a 768-token prefix, 8 groups per engine;
per held group an engine holds 7 conversations of 1024 more tokens, its own. That is
3,984 (engine, block) entries per engine, 1,019,904 for 256 engines, stored through
``BlockStored`` events (one per prefix or conversation, chained by the engine's parent
hash, as vLLM sends them). Each decision is a 2048-token prompt: half continue a held
conversation (one engine holds all 128 blocks), half are new conversations on a held
group (the group's engines hold 64 blocks); every engine holds the first 16.

Decision = ``KVIndex.match`` + ``KVAware.order_cached`` over all 256 engines (random
loads, a data-system count of 64 blocks), each part also timed apart; hashing the prompt
(``KVIndex.hashes``) is reported apart. ``--store``: the index also tracks the data
system (``track_store=True``, as with prefix reuse), and the decision includes the door's
``KVIndex.store_match`` (its count replaces the 64). ``--in-flight N``: provisional
holdings too, as the door makes them (``KVIndex.hold``): before the decisions, the first N
decision prompts are held by random engines (requests in flight whose events have not
come: a decision on such a prompt finds its engine holding all 128 blocks), and after
each decision its prompt is held by the first engine of the order (timed apart,
``hold_us``); tracemalloc's count over the N gives the memory per provisional claim.
Wall-clock percentiles are also given as this thread's CPU time (``thread_time``), which
leaves out the time a busy machine's other processes take the core. Memory: tracemalloc's
count of what the index holds after the events are freed, and the process's RSS growth.
Results: benchmarks/results/kv_index_scale.json (``kv_index_scale_store.json`` with
``--store``, ``_in_flight`` added with ``--in-flight``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import time
import tracemalloc
from pathlib import Path

from common.kv_wire import BlockStored
from door.kv_index import KVIndex
from door.kv_policy import KVAware, PromptCache
from door.policies import EngineLoad

RESULTS = Path(__file__).resolve().parent / "results"
BLOCK = 16
STORE_BLOCKS = 64  # the data system's count without --store
COMMON, GROUP, CONVERSATION = 16, 48, 64  # blocks
GROUPS, GROUPS_PER_ENGINE, CONVERSATIONS_PER_GROUP = 128, 8, 7
VOCAB = 150_000


def tokens(seed: object, blocks: int) -> list[int]:
    rng = random.Random(str(seed))
    return [rng.randrange(VOCAB) for _ in range(blocks * BLOCK)]


def groups_of(engine: int) -> list[int]:
    return [(engine * GROUPS_PER_ENGINE + k) % GROUPS for k in range(GROUPS_PER_ENGINE)]


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096


def stored(content: list[int], parent: int | None, rng: random.Random) -> BlockStored:
    hashes: list[bytes | int] = [rng.getrandbits(64) for _ in range(len(content) // BLOCK)]
    return BlockStored(block_hashes=hashes, parent_block_hash=parent, token_ids=content, block_size=BLOCK, medium="GPU")


def fill(index: KVIndex, engines: int, common: list[int], group_tokens: list[list[int]]) -> tuple[int, float]:
    """Every engine's events, applied; returns (blocks stored, seconds spent applying)."""
    rng = random.Random(1)
    blocks = 0
    applying = 0.0
    for engine in range(engines):
        name = f"engine-{engine}"
        head = stored(common, None, rng)
        events = [head]
        for group in groups_of(engine):
            prefix = stored(group_tokens[group], head.block_hashes[-1], rng)  # type: ignore[arg-type]
            events.append(prefix)
            for conversation in range(CONVERSATIONS_PER_GROUP):
                content = tokens((engine, group, conversation), CONVERSATION)
                events.append(stored(content, prefix.block_hashes[-1], rng))  # type: ignore[arg-type]
        blocks += sum(len(event.block_hashes) for event in events)
        started = time.perf_counter()
        for event in events:
            index.apply(name, [event])
        applying += time.perf_counter() - started
    return blocks, applying


def hold_in_flight(index: KVIndex, prompts: list[list[int]], engines: int, rng: random.Random) -> dict[str, float]:
    """Each prompt held by a random engine; what that costs in memory, per claim."""
    gc.collect()
    tracemalloc.start()
    for prompt in prompts:
        index.hold(f"engine-{rng.randrange(engines)}", index.hashes(prompt))
    gc.collect()
    traced, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    claims = index.provisional()
    return {"in_flight": len(prompts), "provisional_claims": claims,
            "bytes_per_provisional_claim": round(traced / claims, 1) if claims else 0.0}  # fmt: skip


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(int(fraction * len(ordered)), len(ordered) - 1)]


def spread(name: str, samples: list[float]) -> dict[str, float]:
    """``name``_p50 and ``name``_p99, rounded to 0.1."""
    return {f"{name}_p50": round(statistics.median(samples), 1), f"{name}_p99": round(percentile(samples, 0.99), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", type=int, default=256)
    parser.add_argument("--decisions", type=int, default=3000)
    parser.add_argument("--store", action="store_true", help="track the data system; store_match in the decision")
    parser.add_argument("--in-flight", type=int, default=0,
                        help="N prompts held provisionally before the decisions; each decision's held after it")  # fmt: skip
    args = parser.parse_args()

    common = tokens("common", COMMON)
    group_tokens = [tokens(("group", group), GROUP) for group in range(GROUPS)]
    index = KVIndex(block_size=BLOCK, max_blocks=2_000_000, track_store=args.store)

    gc.collect()
    rss_before = rss_bytes()
    tracemalloc.start()
    blocks, applying_s = fill(index, args.engines, common, group_tokens)
    gc.collect()
    traced, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_after = rss_bytes()
    # ingest speed without tracemalloc's cost: one more engine's events
    extra_blocks, extra_s = fill(KVIndex(block_size=BLOCK, track_store=args.store), 4, common, group_tokens)

    rng = random.Random(2)
    loads = [rng.randrange(8) for _ in range(args.engines)]
    candidates = [EngineLoad(f"engine-{e}", url="", role="prefill", outstanding=load) for e, load in enumerate(loads)]
    policy = KVAware()
    prompts: list[list[int]] = []
    for number in range(args.decisions):
        engine = rng.randrange(args.engines)
        group = rng.choice(groups_of(engine))
        if number % 2:
            tail = tokens((engine, group, rng.randrange(CONVERSATIONS_PER_GROUP)), CONVERSATION)
        else:
            tail = tokens(("new", number), CONVERSATION)
        prompts.append(common + group_tokens[group] + tail)
    in_flight = hold_in_flight(index, prompts[: args.in_flight], args.engines, rng) if args.in_flight else {}

    hashing_us: list[float] = []
    decision_us: list[float] = []
    decision_cpu_us: list[float] = []  # this thread's CPU time: what the wall time is without the neighbours
    match_us: list[float] = []
    store_us: list[float] = []
    order_us: list[float] = []
    hold_us: list[float] = []
    held: list[int] = []
    for prompt in prompts:
        t0 = time.perf_counter_ns()
        hashes = index.hashes(prompt)
        t1 = time.perf_counter_ns()
        c1 = time.thread_time_ns()
        device = index.match(hashes)
        t_match = time.perf_counter_ns()
        store = index.store_match(hashes) if args.store else STORE_BLOCKS
        t_store = time.perf_counter_ns()
        cache = PromptCache(len(prompt), BLOCK, device_blocks=device, store_blocks=store, key=hashes[0])
        order = policy.order_cached(candidates, cache)
        c2 = time.thread_time_ns()
        t2 = time.perf_counter_ns()
        hashing_us.append((t1 - t0) / 1000)
        decision_us.append((t2 - t1) / 1000)
        decision_cpu_us.append((c2 - c1) / 1000)
        match_us.append((t_match - t1) / 1000)
        store_us.append((t_store - t_match) / 1000)
        order_us.append((t2 - t_store) / 1000)
        held.append(max(device.values()))
        assert len(order) == args.engines
        if args.in_flight:
            t3 = time.perf_counter_ns()
            index.hold(order[0].name, hashes)
            hold_us.append((time.perf_counter_ns() - t3) / 1000)

    stats = index.stats()
    result = {
        "engines": args.engines,
        "track_store": args.store,
        "entries": stats.entries,
        "distinct_blocks": stats.blocks_by_medium.get("GPU", 0),
        "index_mib_tracemalloc": round(traced / 2**20, 1),
        "bytes_per_entry": round(traced / stats.entries, 1),
        "rss_growth_mib": round((rss_after - rss_before) / 2**20, 1),
        "ingest_blocks_per_s": round(extra_blocks / extra_s),
        "fill_s_under_tracemalloc": round(applying_s, 1),
        "decisions": len(prompts),
        **spread("decision_us", decision_us),
        **spread("decision_cpu_us", decision_cpu_us),
        **spread("match_us", match_us),
        **(spread("store_match_us", store_us) if args.store else {}),
        **spread("order_us", order_us),
        **({**in_flight, **spread("hold_us", hold_us), "provisional_after": index.provisional()} if args.in_flight else {}),
        "load_average_1m": round(os.getloadavg()[0], 1),
        "cpus": os.cpu_count(),
        **spread("hashing_us", hashing_us),
        **spread("total_us", [h + d for h, d in zip(hashing_us, decision_us)]),
        "held_blocks_of_128": {"full": held.count(128), "group": held.count(64)},
    }
    print(json.dumps(result, indent=2))
    path = RESULTS / f"kv_index_scale{'_store' if args.store else ''}{'_in_flight' if args.in_flight else ''}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
