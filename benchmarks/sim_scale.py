"""The door and the control plane at scale, on simulated engines (``ENGINE_KIND=simulated``,
profile ``h100-llama3-8b-bf16``: engines as fast as H100s, so the door carries the load).

    bash run_vllm_on_yr.sh bench sim-scale door [--engines 256] [--nodes 8] [--rate 1000 ...]
        [--seconds 10] [--rounds 3]
    bash run_vllm_on_yr.sh bench sim-scale scaling [--rate 200] [--step 8] [--low 8] [--high 64]

``door``: ``--engines`` colocated simulated engines on ``--nodes`` simulated nodes, KV-aware
routing (every engine's KV event stream followed by the door). Reports the time from
``deploy`` to ready, memory (engines, the deploy process with the Controller, actors and
door, the data system workers) and the CPU each party takes idle, then for each
``--rate`` and round two paths one after the other (rotated): this process sending at
that rate (open loop, token-id prompts of 64 groups sharing 48-token heads, 1 output
token) straight to the engines (in turn) and through the door. The door's added latency
is the difference of the two p50s (p99s); its routing decision p99 comes from its
``frontdoor_routing_decision_seconds`` histogram (a bucket's upper bound); each party's
CPU per request from /proc over the path's run: the door (the deploy process's main
thread, where Uvicorn serves it), the Controller and engine actors (the rest of that
process), the engines, the data system workers, this client, and the whole machine.
Finally ``clean``, and what it left running (must be nothing).

``scaling``: ``--low`` engines (8 simulated nodes, 8 virtual devices each) under a steady
``--rate`` through the door while ``scale colocated +step`` runs until ``--high``, then
``-step`` back to ``--low``. Reports each operation's seconds and the requests that failed
(must be 0).

Results: benchmarks/results/sim_scale_door.json, sim_scale_scaling.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from benchmarks.deployment import exit_on_sigterm
from benchmarks.frontdoor_overhead import percentile_ms, rotated
from benchmarks.soak import _group, _rss_mib
from deploy.state import DeploymentState
from testkit.helpers import isolated_env, pids_matching, run_cli

RESULTS = Path(__file__).resolve().parent / "results"
PROFILE = "h100-llama3-8b-bf16"
GROUPS, HEAD, TAIL = 64, 48, 16


@dataclass
class PathRun:
    latencies: list[float] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)
    sent: int = 0

    def fail(self, why: str) -> None:
        self.failures[why] = self.failures.get(why, 0) + 1


def prompt(rng: random.Random) -> list[int]:
    group = rng.randrange(GROUPS)
    return [(group * 7919 + i * 31) % 4000 + 10 for i in range(HEAD)] + [rng.randrange(10, 4000) for _ in range(TAIL)]


async def paced(urls: Callable[[int], str], model: str, rate: float, seconds: float, seed: int,
                stop: threading.Event | None = None) -> PathRun:  # fmt: skip
    """Open loop: request ``i`` leaves at ``i / rate`` whatever the answers before it."""
    run, rng = PathRun(), random.Random(seed)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as client:

        async def one(index: int) -> None:
            started = time.perf_counter()
            body = {"model": model, "prompt": prompt(rng), "max_tokens": 1}
            try:
                async with client.post(f"{urls(index)}/v1/completions", json=body) as response:
                    await response.read()
                    if response.status != 200:
                        run.fail(f"HTTP {response.status}")
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                run.fail(type(exc).__name__)
                return
            run.latencies.append(time.perf_counter() - started)

        tasks, started = [], time.perf_counter()
        index = 0
        while (stop is None and index < rate * seconds) or (stop is not None and not stop.is_set()):
            delay = started + index / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(index)))
            index += 1
        run.sent = index
        await asyncio.gather(*tasks)
    return run


def decision_p99_us(metrics_text: str, before: dict[float, float]) -> tuple[float, dict[float, float]]:
    """The routing decision histogram's cumulative counts by bound, and the upper bound of
    the bucket holding the 99th percentile of the observations since ``before``."""
    counts: dict[float, float] = {}
    for line in metrics_text.splitlines():
        if line.startswith("frontdoor_routing_decision_seconds_bucket{"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            counts[float("inf") if bound == "+Inf" else float(bound)] = float(line.rsplit(" ", 1)[1])
    delta = {bound: counts[bound] - before.get(bound, 0.0) for bound in sorted(counts)}
    total = delta.get(float("inf"), 0.0)
    p99 = next((bound for bound, count in delta.items() if total and count >= 0.99 * total), float("nan"))
    return p99 * 1e6, counts


_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def cpu_s(stat_paths: list[str]) -> float:
    """CPU seconds (user + system) of the processes or threads whose /proc stat files are given."""
    total = 0
    for path in stat_paths:
        try:
            fields = Path(path).read_text().rpartition(")")[2].split()
        except OSError:  # gone meanwhile
            continue
        total += int(fields[11]) + int(fields[12])
    return total / _TICKS_PER_S


def busy_cores_s() -> float:
    """CPU seconds the whole machine spent busy (not idle, not waiting on I/O)."""
    fields = [int(value) for value in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / _TICKS_PER_S


class CpuMeter:
    """CPU seconds by party over one path's run: the door (the deploy process's main
    thread, where Uvicorn serves it), the rest of the deploy process (the Controller and
    engine actors: health probes, snapshots), the engines, the data system workers, this
    client, and the machine as a whole."""

    def __init__(self, state: DeploymentState) -> None:
        pid = state.pid
        self.paths = {
            "door": [f"/proc/{pid}/task/{pid}/stat"],
            "deploy_process": [f"/proc/{pid}/stat"],
            "engines": [f"/proc/{e['pid']}/stat" for e in state.engines],
            "data_system_workers": [f"/proc/{p}/stat" for p in pids_matching("--worker_address=")],
        }

    def read(self) -> dict[str, float]:
        figures = {party: cpu_s(paths) for party, paths in self.paths.items()}
        usage = resource.getrusage(resource.RUSAGE_SELF)
        figures["client"] = usage.ru_utime + usage.ru_stime
        figures["machine"] = busy_cores_s()
        return figures

    @staticmethod
    def per_request_ms(before: dict[str, float], after: dict[str, float], requests: int) -> dict[str, float]:
        spent = {party: after[party] - before[party] for party in after}
        spent["actors_and_controller"] = spent["deploy_process"] - spent["door"]
        del spent["deploy_process"]
        return {party: round(seconds * 1000 / max(requests, 1), 3) for party, seconds in spent.items()}


def memory_mib(state: DeploymentState, env: dict[str, str]) -> dict[str, float]:
    engines = [_rss_mib(_group(int(e["pid"]))) for e in state.engines]  # type: ignore[call-overload]
    return {
        "engines_total": round(sum(engines), 1),
        "per_engine_mean": round(statistics.mean(engines), 1),
        "per_engine_max": round(max(engines), 1),
        "deploy_process": _rss_mib([state.pid]),
        "data_system_workers": _rss_mib(pids_matching("--worker_address=")),
    }


def _env(tmp: Path, engines: int, nodes: int, **extra: str) -> dict[str, str]:
    return isolated_env(tmp, ENGINE_KIND="simulated", SIM_PROFILE=PROFILE, PREFILL_INS_NUM=str(engines),
                        DECODE_INS_NUM="0", SIMULATED_NODES=str(nodes), KV_CONNECTOR="none", ROUTING_POLICY="kv_aware",
                        DS_SHARED_MEMORY_MB="64", DS_SHARED_MEMORY_POPULATE="0", WARM_UP_TOKENS="64",
                        PREFILL_STARTUP_PARAMS="--max-model-len 4096", MAX_IN_FLIGHT_PER_ENGINE="64",
                        DOOR_QUEUE_SIZE="4096", **extra)  # fmt: skip


def _deploy(env: dict[str, str]) -> tuple[DeploymentState, float]:
    started = time.perf_counter()
    result = run_cli("deploy", env, timeout=1800)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(result.stdout[-3000:] + result.stderr[-3000:])
    state = DeploymentState.read(Path(env["RUN_DIR"]) / "state.json")
    assert state is not None
    return state, elapsed


def _clean(env: dict[str, str]) -> int:
    """``clean``; the processes of the deployment left running after it."""
    run_cli("clean", env, timeout=600)
    return len(pids_matching(env["YR_SESSIONS_DIR"])) + len(pids_matching(f"--worker_address={env['DS_WORKER_ADDRESS'].rpartition(':')[0][:-1]}"))


def door_experiment(args: argparse.Namespace) -> dict[str, object]:
    tmp = Path(tempfile.mkdtemp(prefix="sim-scale-door-", dir="/tmp"))
    env = _env(tmp, args.engines, args.nodes)
    door = f"http://127.0.0.1:{env['SERVER_PORT']}"
    by_rate: list[dict[str, object]] = []
    try:
        state, ready_s = _deploy(env)
        print(f"  {args.engines} simulated engines on {args.nodes} nodes ready in {ready_s:.1f} s", flush=True)
        memory = memory_mib(state, env)
        print(f"  memory MiB: {memory}", flush=True)
        meter = CpuMeter(state)
        idle_before = meter.read()
        time.sleep(5)
        idle = CpuMeter.per_request_ms(idle_before, meter.read(), 5)  # "per request" of 5: ms per second idle
        print(f"  idle, CPU ms per second: {idle}", flush=True)
        for rate in args.rate:
            rounds = [_door_round(args, state, meter, door, rate, number) for number in range(args.rounds)]
            by_rate.append({"rate": rate, "rounds": rounds})
    finally:
        left = _clean(env)
    print(f"  clean left {left} processes running", flush=True)
    return {"engines": args.engines, "nodes": args.nodes, "seconds": args.seconds, "ready_s": round(ready_s, 1),
            "memory_mib": memory, "idle_cpu_ms_per_s": idle, "by_rate": by_rate, "left_running_after_clean": left}  # fmt: skip


def _door_round(args: argparse.Namespace, state: DeploymentState, meter: CpuMeter, door: str, rate: float,
                number: int) -> dict[str, object]:  # fmt: skip
    """Both paths at ``rate``, in rotated order: latencies, failures, the door's routing
    decision p99 and each party's CPU per request."""
    urls = [f"http://{e['host']}:{e['port']}" for e in state.engines]
    paths: dict[str, Callable[[int], str]] = {"direct": lambda i: urls[i % len(urls)], "door": lambda i: door}
    figures: dict[str, object] = {}
    for name in rotated(list(paths), number):
        _, buckets = decision_p99_us(_get(f"{door}/metrics"), {})
        before = meter.read()
        run = asyncio.run(paced(paths[name], state.served_model_name, rate, args.seconds, seed=number))
        figures[name] = {"sent": run.sent, "ok": len(run.latencies), "failures": run.failures,
                         "p50_ms": percentile_ms(run.latencies, 0.5), "p99_ms": percentile_ms(run.latencies, 0.99),
                         "cpu_ms_per_request": CpuMeter.per_request_ms(before, meter.read(), run.sent)}  # fmt: skip
        if name == "door":
            figures["decision_p99_us"], _ = decision_p99_us(_get(f"{door}/metrics"), buckets)
    direct, through = figures["direct"], figures["door"]
    figures["added_p50_ms"] = round(through["p50_ms"] - direct["p50_ms"], 3)  # type: ignore[index]
    figures["added_p99_ms"] = round(through["p99_ms"] - direct["p99_ms"], 3)  # type: ignore[index]
    print(f"  {rate:g} req/s, round {number + 1}: {json.dumps(figures)}", flush=True)
    return figures


def _get(url: str) -> str:
    return subprocess.run(["curl", "-s", url], capture_output=True, text=True, timeout=30).stdout


def scaling_experiment(args: argparse.Namespace) -> dict[str, object]:
    tmp = Path(tempfile.mkdtemp(prefix="sim-scale-scaling-", dir="/tmp"))
    env = _env(tmp, args.low, 8, VISIBLE_DEVICES=f"0-{args.high - 1}")
    door = f"http://127.0.0.1:{env['SERVER_PORT']}"
    operations: list[dict[str, object]] = []
    stop = threading.Event()
    try:
        state, ready_s = _deploy(env)
        result: dict[str, PathRun] = {}
        loader = threading.Thread(target=lambda: result.setdefault("run", asyncio.run(
            paced(lambda i: door, state.served_model_name, args.rate, 0, seed=0, stop=stop))))  # fmt: skip
        loader.start()
        time.sleep(3)
        steps = [f"+{args.step}"] * ((args.high - args.low) // args.step) + [f"-{args.step}"] * ((args.high - args.low) // args.step)
        engines = args.low
        for delta in steps:
            started = time.perf_counter()
            answer = run_cli("scale", env, "colocated", delta, timeout=900)
            engines += int(delta)
            operations.append({"delta": delta, "engines": engines, "seconds": round(time.perf_counter() - started, 1),
                               "rc": answer.returncode})  # fmt: skip
            print(f"  scale colocated {delta} -> {engines} engines: rc {answer.returncode} in {operations[-1]['seconds']} s",
                  flush=True)  # fmt: skip
            time.sleep(2)
        stop.set()
        loader.join()
        run = result["run"]
    finally:
        stop.set()
        left = _clean(env)
    return {"low": args.low, "high": args.high, "step": args.step, "rate": args.rate, "ready_s": round(ready_s, 1),
            "operations": operations, "sent": run.sent, "ok": len(run.latencies), "failures": run.failures,
            "p50_ms": percentile_ms(run.latencies, 0.5), "p99_ms": percentile_ms(run.latencies, 0.99),
            "left_running_after_clean": left}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description="The door and scaling at scale, on simulated engines")
    parser.add_argument("experiment", choices=("door", "scaling"))
    parser.add_argument("--engines", type=int, default=256)
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--rate", type=float, nargs="+", default=None,
                        help="requests/s (door: one round set per rate, default 1000; scaling: one rate, default 200)")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--low", type=int, default=8)
    parser.add_argument("--high", type=int, default=64)
    parser.add_argument("--step", type=int, default=8)
    parser.add_argument("--results", default=None)
    args = parser.parse_args(argv)
    if args.rate is None:
        args.rate = [1000.0] if args.experiment == "door" else [200.0]
    if args.experiment == "scaling":
        if len(args.rate) > 1:
            raise SystemExit(f"--rate {' '.join(f'{r:g}' for r in args.rate)}: scaling takes one rate (the steady load)")
        args.rate = args.rate[0]
    outcome = door_experiment(args) if args.experiment == "door" else scaling_experiment(args)
    outcome["command"] = "bash run_vllm_on_yr.sh bench sim-scale " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    path = RESULTS / f"{args.results or 'sim_scale_' + args.experiment}.json"
    path.write_text(json.dumps(outcome, indent=2) + "\n")
    print(json.dumps(outcome, indent=2))


if __name__ == "__main__":
    main()
