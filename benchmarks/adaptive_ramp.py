"""The role planner under a load ramp, on simulated engines (``ENGINE_KIND=simulated``,
profile ``cpu-93m-float32``: engines that take the time the real CPU ones took):

    bash run_vllm_on_yr.sh bench adaptive-ramp [--start 16] [--max 32] [--min 8]
        [--capacity REQ_S] [--low 0.2] [--high 1.5] [--end 0.5] [--minutes 7]

``--start`` adaptive engines (all colocated at first) on 4 simulated nodes; the planner may
move their roles and scale between ``--min`` and ``--max`` engines (PLANNER_MAX_ENGINES,
PLANNER_MIN_ENGINES; 10 s windows, 10 s to settle). This process sends streamed requests
(256 prompt tokens, 32 out) open loop at a rate that follows the ramp: ``--low`` x capacity
for a seventh of the time, up to ``--high`` x over two sevenths, held a seventh, down to
``--end`` x over a seventh, held two sevenths. ``capacity`` is what ``--max`` engines can
serve within the service levels, estimated from the profile (``pool_capacity``) unless
given. Each request's TTFT and inter-token latency are measured here (its own process);
the engines' acting roles and counts are read from ``/admin/engines`` every 2 s, the
planner's decisions from ``/admin/roles``.

Reports, per 10 s of sending: the rate, the share of answers meeting both levels
(attainment) and the engines by role; the attainment over the time the rate was within
capacity (the bar: at least 90%), the failed requests (the bar: none; counted apart: those
the door shed with 429 while the rate was over capacity, and errors or cut streams), the
role changes and scale steps. Results: benchmarks/results/adaptive_ramp.json and adaptive_ramp.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx

from benchmarks.deployment import exit_on_sigterm
from benchmarks.sim_scale import _clean, _deploy, busy_cores_s
from common.config import SloConfig
from testkit.helpers import isolated_env
from testkit.metrics import samples_in
from workers.sim_engine.profile import load_profile

RESULTS = Path(__file__).resolve().parent / "results" / "adaptive_ramp.json"
PROFILE = "cpu-93m-float32"
PROMPT_TOKENS, OUTPUT_TOKENS = 256, 32
BUCKET_S = 10.0


def pool_capacity(engines: int, slo: SloConfig) -> float:
    """Requests a second ``engines`` simulated engines serve within the levels, split at
    their best: a prefill engine computes one prompt at a time (its overhead plus a step
    of its tokens), a decode engine holds as many streams as keep a step (each stream's
    token over its mean context) under the inter-token level; the split that balances the two."""
    profile = load_profile(PROFILE)
    prefill_s = profile.request_overhead_s + profile.step_s(PROMPT_TOKENS, PROMPT_TOKENS * PROMPT_TOKENS / 2, 0, 1)
    per_stream_s = profile.step_s(1, 0, PROMPT_TOKENS + OUTPUT_TOKENS / 2, 1) - profile.base_s
    streams = max(1, int((slo.itl_ms / 1000 - profile.base_s) / per_stream_s))
    prefill_rate, decode_rate = 1.0 / prefill_s, streams / (OUTPUT_TOKENS * slo.itl_ms / 1000)
    prefill = engines * decode_rate / (prefill_rate + decode_rate)
    return prefill * prefill_rate


def rate_at(t: float, total_s: float, capacity: float, low: float, high: float, end: float) -> float:
    """The ramp's rate at ``t`` seconds: low, up, high, down, end over 1, 2, 1, 1, 2 sevenths."""
    seventh = total_s / 7
    points = [(0, low), (seventh, low), (3 * seventh, high), (4 * seventh, high), (5 * seventh, end), (total_s, end)]
    for (t0, r0), (t1, r1) in zip(points, points[1:]):
        if t <= t1:
            return capacity * (r0 + (r1 - r0) * (t - t0) / (t1 - t0) if t1 > t0 else r1)
    return capacity * end


@dataclass
class Answer:
    sent_at: float  # seconds since the ramp began
    status: int
    ttft_s: float = 0.0
    itl_s: float = 0.0
    tokens: int = 0
    error: str = ""


@dataclass
class Ramp:
    answers: list[Answer] = field(default_factory=list)
    layouts: list[tuple[float, dict[str, int]]] = field(default_factory=list)  # (t, engines by acting role)
    host: list[dict[str, float]] = field(default_factory=list)  # per watch: t, machine busy cores, engines' late s, streams


async def _one(client: aiohttp.ClientSession, url: str, model: str, index: int, sent_at: float, ramp: Ramp) -> None:
    prompt = [(index * 7919 + i * 31) % 4000 + 10 for i in range(PROMPT_TOKENS)]
    body = {"model": model, "prompt": prompt, "max_tokens": OUTPUT_TOKENS, "stream": True, "ignore_eos": True}
    started, first, last, tokens = time.perf_counter(), 0.0, 0.0, 0
    try:
        async with client.post(f"{url}/v1/completions", json=body) as response:
            if response.status != 200:
                ramp.answers.append(Answer(sent_at, response.status, error=(await response.text())[:200]))
                return
            async for line in response.content:
                if line.startswith(b"data: {") and b'"choices":[]' not in line:
                    now = time.perf_counter()
                    first, last, tokens = first or now, now, tokens + 1
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        ramp.answers.append(Answer(sent_at, 0, error=type(exc).__name__))
        return
    itl = (last - first) / (tokens - 1) if tokens > 1 else 0.0
    ramp.answers.append(Answer(sent_at, 200, first - started, itl, tokens))


async def _engine_figures(client: aiohttp.ClientSession, engines: list[dict[str, object]]) -> tuple[float, int]:
    """The engines' late seconds summed (steps past their cost: the host's cores were
    busy) and the most requests one decode engine runs."""
    late, streams = 0.0, 0
    for engine in engines:
        try:
            async with client.get(f"{engine['url']}/metrics") as response:
                text = await response.text()
        except (aiohttp.ClientError, asyncio.TimeoutError):
            continue
        late += sum(samples_in(text, "vllm:sim_late_seconds_total"))
        if engine["acting"] == "decode":
            streams = max(streams, int(sum(samples_in(text, "vllm:num_requests_running"))))
    return late, streams


async def _watch(client: aiohttp.ClientSession, url: str, began: float, stop: asyncio.Event, ramp: Ramp) -> None:
    last_cpu, last_at = busy_cores_s(), time.perf_counter()
    while not stop.is_set():
        try:
            async with client.get(f"{url}/admin/engines") as response:
                engines = (await response.json())["engines"]
            counts: dict[str, int] = {}
            for engine in engines:
                counts[engine["acting"]] = counts.get(engine["acting"], 0) + 1
            now = time.perf_counter()
            ramp.layouts.append((now - began, counts))
            late, streams = await _engine_figures(client, engines)
            cpu = busy_cores_s()
            ramp.host.append({"t": now - began, "busy_cores": (cpu - last_cpu) / (now - last_at), "late_s": late,
                              "decode_streams_max": streams})  # fmt: skip
            last_cpu, last_at = cpu, now
        except (aiohttp.ClientError, asyncio.TimeoutError, KeyError):
            pass
        await asyncio.sleep(2.0)


async def run_ramp(url: str, model: str, total_s: float, rate: object) -> Ramp:
    """Open loop: request ``i + 1`` leaves ``1 / rate(t_i)`` after request ``i``."""
    ramp, stop = Ramp(), asyncio.Event()
    connector = aiohttp.TCPConnector(limit=0, force_close=True)  # a connection each: no keep-alive close races
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as client:
        began = time.perf_counter()
        watcher = asyncio.create_task(_watch(client, url, began, stop, ramp))
        tasks, t, index = [], 0.0, 0
        while t < total_s:
            delay = began + t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_one(client, url, model, index, t, ramp)))
            index += 1
            t += 1.0 / rate(t)  # type: ignore[operator]
        await asyncio.gather(*tasks)
        stop.set()
        await watcher
    return ramp


def buckets(ramp: Ramp, slo: SloConfig, total_s: float, capacity: float,
            rate: object) -> list[dict[str, float]]:  # fmt: skip
    """Per BUCKET_S of sending: scheduled rate (x capacity), answers, attainment, failures."""
    rows = []
    for start in range(0, math.ceil(total_s / BUCKET_S)):
        t0, t1 = start * BUCKET_S, (start + 1) * BUCKET_S
        sent = [a for a in ramp.answers if t0 <= a.sent_at < t1]
        met = [a for a in sent if a.status == 200 and a.ttft_s * 1000 <= slo.ttft_ms and a.itl_s * 1000 <= slo.itl_ms]
        answered = sorted(a.itl_s for a in sent if a.status == 200)
        host = [h for h in ramp.host if t0 <= h["t"] < t1]
        before = [h for h in ramp.host if h["t"] < t0] or host[:1]  # the engines' late seconds so far (a counter)
        rows.append({"t": t0, "load": rate((t0 + t1) / 2) / capacity, "sent": len(sent),  # type: ignore[operator]
                     "attainment": len(met) / len(sent) if sent else 1.0,
                     "failed": sum(1 for a in sent if a.status != 200),
                     "itl_p50_ms": 1000 * answered[len(answered) // 2] if answered else 0.0,
                     "busy_cores": sum(h["busy_cores"] for h in host) / len(host) if host else 0.0,
                     "engines_late_s": host[-1]["late_s"] - before[-1]["late_s"] if host else 0.0,
                     "decode_streams_max": max((h["decode_streams_max"] for h in host), default=0)})  # fmt: skip
    return rows


def plot(path: Path, rows: list[dict[str, float]], ramp: Ramp, decisions: list[dict[str, object]], began_wall: float) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, (load, attained, engines) = pyplot.subplots(3, 1, figsize=(9, 8), sharex=True, dpi=100)
    load.plot([r["t"] for r in rows], [r["load"] for r in rows], drawstyle="steps-post")
    load.axhline(1.0, color="#c00", linestyle=":")
    load.set_ylabel("load (x capacity)")
    attained.plot([r["t"] for r in rows], [100 * r["attainment"] for r in rows], drawstyle="steps-post", color="#1a9a3a")
    attained.axhline(90, color="#c00", linestyle=":")
    attained.set_ylabel("answers meeting both levels %")
    times = [t for t, _ in ramp.layouts]
    for role, color in (("prefill", "#e8893a"), ("decode", "#3a78c9"), ("colocated", "#4caf50")):
        engines.plot(times, [counts.get(role, 0) for _, counts in ramp.layouts], label=role, color=color)
    for decision in decisions:
        when = float(decision["at"]) - began_wall  # type: ignore[arg-type]
        for axes in (load, attained, engines):
            axes.axvline(when, color="#888", linestyle="--" if decision.get("scale") else ":", linewidth=0.8)
    engines.set_ylabel("engines acting as")
    engines.set_xlabel("seconds (dashed: scale steps, dotted: role changes)")
    engines.legend(loc="upper left")
    figure.suptitle("Adaptive roles under a load ramp, simulated engines")
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench adaptive-ramp", description=__doc__.split("\n\n")[0])
    parser.add_argument("--start", type=int, default=16)
    parser.add_argument("--max", type=int, default=32)
    parser.add_argument("--min", type=int, default=8)
    parser.add_argument("--capacity", type=float, default=None, help="req/s of --max engines; default: estimated")
    parser.add_argument("--low", type=float, default=0.2)
    parser.add_argument("--high", type=float, default=1.5)
    parser.add_argument("--end", type=float, default=0.5)
    parser.add_argument("--minutes", type=float, default=7.0)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    exit_on_sigterm()
    slo, total_s = SloConfig(), args.minutes * 60
    capacity = args.capacity or pool_capacity(args.max, slo)
    tmp = Path(tempfile.mkdtemp(prefix="adaptive-ramp-", dir="/tmp"))
    env = isolated_env(tmp, ENGINE_KIND="simulated", SIM_PROFILE=PROFILE, ROLES="adaptive", PREFILL_INS_NUM=str(args.start),
                       DECODE_INS_NUM="0", SIMULATED_NODES="4", VISIBLE_DEVICES=f"0-{args.max - 1}",
                       PLANNER_MAX_ENGINES=str(args.max), PLANNER_MIN_ENGINES=str(args.min), PLANNER_WINDOW_S="10",
                       PLANNER_SETTLE_S="10", DS_SHARED_MEMORY_MB="64", DS_SHARED_MEMORY_POPULATE="0",
                       WARM_UP_TOKENS="64", PREFILL_STARTUP_PARAMS="--max-model-len 4096",
                       MAX_IN_FLIGHT_PER_ENGINE="12", DOOR_QUEUE_SIZE="4096", DOOR_QUEUE_TIMEOUT_S="4")  # fmt: skip
    print(f"capacity of {args.max} engines: {capacity:.1f} req/s; ramp {args.low}x -> {args.high}x -> {args.end}x "
          f"over {total_s:.0f} s", flush=True)  # fmt: skip
    try:
        state, ready_s = _deploy(env)
        url = f"http://127.0.0.1:{env['SERVER_PORT']}"
        print(f"{args.start} engines ready in {ready_s:.1f} s", flush=True)
        began_wall = time.time()
        schedule = lambda t: rate_at(t, total_s, capacity, args.low, args.high, args.end)  # noqa: E731
        ramp = asyncio.run(run_ramp(url, state.served_model_name, total_s, schedule))
        decisions = httpx.get(f"{url}/admin/roles", timeout=30).json()["decisions"]
    finally:
        left = _clean(env)
    rows = buckets(ramp, slo, total_s, capacity, schedule)
    within = [r for r in rows if r["load"] <= 1.0 and r["sent"]]
    attainment = sum(r["attainment"] * r["sent"] for r in within) / max(1, sum(r["sent"] for r in within))
    failed = sum(1 for a in ramp.answers if a.status != 200)
    over = {id(a) for a in ramp.answers if schedule(a.sent_at) > capacity}
    shed = sum(1 for a in ramp.answers if a.status == 429 and id(a) in over)  # the door's admission at overload
    broken = sum(1 for a in ramp.answers if a.status not in (200, 429))  # errors, cut streams: never expected
    moves = sum(1 for d in decisions if d.get("moved") and not d.get("scale"))
    steps = [int(d["scale"]) for d in decisions if d.get("scale")]
    print(f"{len(ramp.answers)} requests, {failed} failed ({shed} shed with 429 while the load was over capacity, "
          f"{failed - shed} otherwise, {broken} of them errors or cut streams); "
          f"attainment while load <= capacity {attainment:.1%}; "
          f"{moves} role changes, scale steps {steps}; left running after clean: {left}", flush=True)  # fmt: skip
    for row in rows:
        print(f"  t={row['t']:4.0f} s load {row['load']:.2f}x sent {row['sent']:4.0f} attainment {row['attainment']:.0%} "
              f"failed {row['failed']:.0f} ITL p50 {row['itl_p50_ms']:.0f} ms; host: busy cores {row['busy_cores']:.2f}, "
              f"engines late {row['engines_late_s']:.1f} s, most streams on a decode engine {row['decode_streams_max']}",
              flush=True)  # fmt: skip
    results = {"capacity_req_s": capacity, "engines": {"start": args.start, "min": args.min, "max": args.max},
               "ramp": {"low": args.low, "high": args.high, "end": args.end, "seconds": total_s},
               "slo": {"ttft_ms": slo.ttft_ms, "itl_ms": slo.itl_ms}, "requests": len(ramp.answers), "failed": failed,
               "shed_over_capacity": shed, "failed_otherwise": failed - shed, "errors_or_cut": broken,
               "attainment_within_capacity": attainment, "role_changes": moves, "scale_steps": steps,
               "left_running": left, "buckets": rows, "layouts": ramp.layouts, "decisions": decisions,
               "errors": sorted({a.error for a in ramp.answers if a.error})[:10]}  # fmt: skip
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {args.results}\nwritten {plot(args.results.with_suffix('.png'), rows, ramp, decisions, began_wall)}")


if __name__ == "__main__":
    main()
