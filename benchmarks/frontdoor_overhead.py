"""What the front door adds: latency per request and requests/s, door vs. direct.

    .venv/bin/python -m benchmarks.frontdoor_overhead [--requests 400] [--concurrency 16]

The engines are tests/fake_engines.py servers (FastAPI under Uvicorn, answering at once
like a vLLM server's HTTP layer, no model), so the figures are the door's own cost:
- colocated: client -> door -> engine, against client -> engine;
- PD: client -> door -> prefill engine, then -> decode engine, against a client that
  makes the same two calls itself (the least any PD proxy does).
The load client is aiohttp for every path. Sequential requests give p50/p99 added
latency; ``--concurrency`` parallel clients give requests/s. Client, door and engines share this machine's 2 cores, so the figures are
an upper bound on the overhead. Results: benchmarks/results/frontdoor_overhead.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from contextlib import ExitStack
from pathlib import Path

import aiohttp

from controller.door_metrics import DoorMetrics
from controller.frontdoor import create_app, prefill_request
from controller.policies import make_policy
from controller.routing import RoutingTable
from tests.fake_engines import FakeEngine, serving
from tests.helpers import free_port

RESULTS = Path(__file__).resolve().parent / "results" / "frontdoor_overhead.json"
BODY = {"model": "m", "prompt": "Introduce Beijing Forbidden City", "max_tokens": 16}


async def direct_pd(client: aiohttp.ClientSession, prefill: str, decode: str) -> None:
    async with client.post(f"{prefill}/v1/completions", json=prefill_request(BODY)) as first:
        params = (await first.json()).get("kv_transfer_params")
    async with client.post(f"{decode}/v1/completions", json={**BODY, "kv_transfer_params": params}) as second:
        second.raise_for_status()
        await second.read()


async def one(client: aiohttp.ClientSession, url: str) -> None:
    async with client.post(f"{url}/v1/completions", json=BODY) as response:
        response.raise_for_status()
        await response.read()


async def latencies(call, count: int) -> list[float]:  # type: ignore[no-untyped-def]
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
    return samples


async def throughput(call, count: int, concurrency: int) -> float:  # type: ignore[no-untyped-def]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)

    async def worker() -> None:
        while not queue.empty():
            queue.get_nowait()
            await call()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return count / (time.perf_counter() - started)


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def measure(urls: dict[str, str], requests: int, concurrency: int) -> dict[str, dict[str, float]]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:
        calls = {
            "colocated direct": lambda: one(client, urls["c0"]),
            "colocated via door": lambda: one(client, urls["door_c"]),
            "PD direct (client makes both calls)": lambda: direct_pd(client, urls["p0"], urls["d0"]),
            "PD via door": lambda: one(client, urls["door_pd"]),
        }
        for call in calls.values():  # warm connections
            await latencies(call, 20)
        out: dict[str, dict[str, float]] = {}
        for name, call in calls.items():
            samples = await latencies(call, requests)
            out[name] = {
                "p50_ms": round(_pct(samples, 0.5), 3),
                "p99_ms": round(_pct(samples, 0.99), 3),
                "mean_ms": round(statistics.mean(samples) * 1000, 3),
                "requests_per_s": round(await throughput(call, requests, concurrency), 1),
            }
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description="front door overhead")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    engines = {name: FakeEngine(name, role) for name, role in (("c0", "colocated"), ("p0", "prefill"), ("d0", "decode"))}
    door_c, door_pd = free_port(), free_port()
    with ExitStack() as stack:
        for engine in engines.values():
            stack.enter_context(serving(engine.app(), engine.port))
        for port, members in ((door_c, ["c0"]), (door_pd, ["p0", "d0"])):
            table = RoutingTable([engines[m].info for m in members], make_policy("prefix_affinity"), DoorMetrics())
            stack.enter_context(serving(create_app(table, "m"), port))
        urls = {name: f"http://127.0.0.1:{e.port}" for name, e in engines.items()}
        urls.update(door_c=f"http://127.0.0.1:{door_c}", door_pd=f"http://127.0.0.1:{door_pd}")
        rows = asyncio.run(measure(urls, args.requests, args.concurrency))
    added = {
        "colocated": {q: round(rows["colocated via door"][q] - rows["colocated direct"][q], 3) for q in ("p50_ms", "p99_ms")},
        "PD": {q: round(rows["PD via door"][q] - rows["PD direct (client makes both calls)"][q], 3) for q in ("p50_ms", "p99_ms")},
    }
    print(f"{args.requests} sequential requests; {args.concurrency} concurrent clients for requests/s")
    print(f"{'path':40}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>9}")
    for name, row in rows.items():
        print(f"{name:40}{row['p50_ms']:9.2f}{row['p99_ms']:9.2f}{row['requests_per_s']:9.0f}")
    for mode, values in added.items():
        print(f"added by the door ({mode}): p50 {values['p50_ms']:.2f} ms, p99 {values['p99_ms']:.2f} ms")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"requests": args.requests, "concurrency": args.concurrency, "paths": rows, "added": added}, indent=2) + "\n")
    print(f"written {RESULTS}")


if __name__ == "__main__":
    main()
