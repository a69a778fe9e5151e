"""Soak: concurrent streaming clients against a deployment for a set time; requests
served, errors, latency percentiles, and the memory of every process at start and end.

    .venv/bin/python -m benchmarks.soak [--minutes 30] [--clients 8] [--max-tokens 32]

Deploys the default 1P1D (embedded model, eager engines) in a temporary folder and
cleans it afterwards. Each client loops: a streamed completion of a fresh prompt that
shares a 64-token head with the others, to the end. Memory is the resident set of the
front door's process, of each engine's whole process group (API server, EngineCore,
worker) and of the data system worker. Results: benchmarks/results/soak.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from testkit.deployment import Deployment, deployed
from testkit.helpers import pids_matching

RESULTS = Path(__file__).resolve().parent / "results" / "soak.json"


def _rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return round(total / 1024, 1)


def _group(pid: int) -> list[int]:
    """Every process in ``pid``'s process group."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pid:
                    members.append(int(entry.name))
            except OSError:
                continue
    return members


def memory(deployment: Deployment) -> dict[str, float]:
    sizes = {"front door + Controller": _rss_mib([deployment.state.pid])}
    for engine in deployment.state.engines:
        sizes[str(engine["name"])] = _rss_mib(_group(int(engine["pid"])))  # type: ignore[arg-type]
    sizes["data system worker"] = _rss_mib(pids_matching(f"--worker_address={deployment.env['DS_WORKER_ADDRESS']}"))
    return sizes


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)


async def client(url: str, model: str, deadline: float, max_tokens: int, seed: int, tally: Tally) -> None:
    rng = random.Random(seed)
    head = [(7 * i) % 4000 + 10 for i in range(64)]
    async with httpx.AsyncClient(timeout=300) as http:
        while time.monotonic() < deadline:
            prompt = head + [rng.randrange(10, 4000) for _ in range(rng.randint(16, 192))]
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
            started = time.monotonic()
            try:
                async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
                    if response.status_code != 200:
                        key = f"HTTP {response.status_code}"
                        tally.errors[key] = tally.errors.get(key, 0) + 1
                        continue
                    async for _ in response.aiter_lines():
                        pass
                tally.latencies.append(time.monotonic() - started)
            except httpx.HTTPError as exc:
                key = type(exc).__name__
                tally.errors[key] = tally.errors.get(key, 0) + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    with deployed(Path(tempfile.mkdtemp(prefix="soak-"))) as deployment:
        before = memory(deployment)
        tally = Tally()
        deadline = time.monotonic() + args.minutes * 60
        model = deployment.state.served_model_name

        async def run() -> None:
            await asyncio.gather(*(client(deployment.url, model, deadline, args.max_tokens, seed, tally) for seed in range(args.clients)))

        started = time.monotonic()
        asyncio.run(run())
        elapsed = time.monotonic() - started
        after = memory(deployment)
        healthy = httpx.get(f"{deployment.url}/health", timeout=10).status_code == 200
    latencies = sorted(tally.latencies)
    quantile = lambda q: round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 2) if latencies else None  # noqa: E731
    result = {
        "minutes": round(elapsed / 60, 1),
        "clients": args.clients,
        "max_tokens": args.max_tokens,
        "served": len(latencies),
        "errors": tally.errors,
        "latency_s": {"p50": quantile(0.5), "p99": quantile(0.99), "mean": round(statistics.fmean(latencies), 2) if latencies else None},
        "healthy_at_end": healthy,
        "rss_mib_start": before,
        "rss_mib_end": after,
    }
    print(f"{result['served']} requests served in {result['minutes']} min by {args.clients} streaming clients, "
          f"errors {tally.errors or 0}; latency p50 {result['latency_s']['p50']} s, p99 {result['latency_s']['p99']} s; "
          f"healthy at the end: {healthy}")  # fmt: skip
    for name in before:
        print(f"  {name:28} RSS {before[name]:8.1f} MiB -> {after.get(name, 0):8.1f} MiB")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {RESULTS}")


if __name__ == "__main__":
    main()
