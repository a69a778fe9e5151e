"""What the front door adds, against direct calls and against vLLM's Rust router, each
party in its own process.

    .venv/bin/python -m benchmarks.frontdoor_overhead [--requests 400] [--concurrency 16]
        [--concurrent-seconds 2] [--rounds 3] [--router-policies round_robin,cache_aware]
        [--no-router] [--uvicorn-door] [--out FILE] [--profile-door SECONDS --profile-out /tmp/door.svg]

Processes, each in its own process group, stopped (SIGTERM, a wait, then SIGKILL) when
the run ends, fails or is interrupted:
- stand-in engines, one process each (``python -m tests.fake_engines``: FastAPI under
  Uvicorn answering at once like a vLLM server's HTTP layer, no model): c0 (colocated),
  p0 (prefill: it answers with ``kv_transfer_params``) and d0 (decode);
- our door, twice (``python -m benchmarks.door_process``, served as a deployment serves it, a default
  deployment's settings): one in front of c0, one in front of p0 + d0;
- vllm-router (``vllm-router`` on PyPI, the vLLM project's Rust router) in PD mode in
  front of p0 + d0, once per ``--router-policies`` entry; installed by this benchmark
  into .cache/bench-venvs/vllm-router (its arms are skipped, saying why, if it cannot be);
- the load client: this process, aiohttp on uvloop.

Paths: client -> c0; client -> door -> c0; the client making both PD calls itself (the
least any PD proxy does); client -> door -> p0, d0; client -> vllm-router -> p0, d0.
Per path and round: ``--requests`` sequential requests (p50/p99/mean latency), then
``--concurrency`` clients, each sending its next request when its last is answered, for
``--concurrent-seconds`` (requests/s). The paths are measured one after another, in a
rotated order each round; each figure is reported as the median and min-max of
``--rounds``. Added latency: a path's p50 (p99) minus its direct path's in the same round.
For every PD path the engines' counts (``GET /stats``) must show that each request reached
p0 as a prefill leg and then d0 with the kv_transfer_params p0 answered with.

Every party shares this machine's cores (2 here): requests/s is bounded by the CPU the
client, the proxy and the engines take together, so figures from different machines or
a busy machine do not compare. What does compare is the proxy's own CPU time per request
under the concurrent load (user + system, all its threads, from /proc; ``proxy_sys_share``:
the kernel's part, mostly socket writes and reads). Results:
benchmarks/results/frontdoor_overhead.json (``--out``). ``--uvicorn-door`` adds a PD arm:
the door's handlers as a bare ASGI callable on Uvicorn's httptools protocol
(benchmarks/asgi_door.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import uvloop

from benchmarks.deployment import exit_on_sigterm
from benchmarks.door_process import DEFAULT_POLICY as DOOR_DEFAULT_POLICY
from benchmarks.door_process import POLICIES as DOOR_POLICIES
from benchmarks.report import Spread
from door.legs import prefill_request
from testkit.helpers import PROJECT_ROOT, free_port
from workers.engine_process import start_process, stop_process_group

logger = logging.getLogger(__name__)

RESULTS = Path(__file__).resolve().parent / "results" / "frontdoor_overhead.json"
ROUTER_PACKAGE = "vllm-router"
ROUTER_VERSION = "0.1.17"
ROUTER_VENV = PROJECT_ROOT / ".cache" / "bench-venvs" / "vllm-router"
ROUTER_DEFAULT_POLICY = "cache_aware"  # vllm-router --help: "--policy ... (default: cache_aware)"
BODY = {"model": "m", "prompt": "Introduce Beijing Forbidden City", "max_tokens": 16}
WARMUP = 50  # requests per path and round before measuring (connections, pools, caches)
READY_TIMEOUT_S = 60.0
STOP_GRACE_S = 5.0
FIGURES = ("p50_ms", "p99_ms", "mean_ms", "req_s")
PROXY_FIGURES = ("proxy_cpu_us_per_req", "proxy_sys_share")  # arms with a proxy only

Call = Callable[[], Awaitable[None]]
T = TypeVar("T")


@dataclass(frozen=True)
class Load:
    requests: int  # sequential, per arm and round: latency
    concurrency: int  # clients at once: requests/s
    concurrent_seconds: float  # for how long


@dataclass(frozen=True)
class Arm:
    """One way for a request to reach the engines: a row of the table."""

    name: str
    urls: tuple[str, ...]  # one: a POST there; two: the client makes the prefill, then the decode call
    baseline: str | None  # the direct path its added latency is measured from
    pd: bool  # its engines' counts must show a prefill leg, then a decode leg, per request
    proxy_pid: int | None = None  # the door or router in between: its CPU time per request is measured


# --- processes ----------------------------------------------------------------------------


@dataclass
class Party:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid


@dataclass
class Parties:
    """The processes this run started; ``stop`` ends every one of them by its group."""

    log_dir: Path
    started: list[Party] = field(default_factory=list)

    def start(self, name: str, argv: Sequence[str], port: int, env: Mapping[str, str] | None = None) -> Party:
        log = self.log_dir / f"{name}.log"
        party = Party(name, port, start_process(list(argv), env or os.environ, log), log)
        self.started.append(party)
        logger.info("[party=%s pid=%d port=%d] started: %s", name, party.process.pid, port, " ".join(argv))
        return party

    def wait_ready(self, party: Party, path: str = "/health") -> None:
        """Poll ``path`` until it answers 200; raise with the log's tail if the process exits or the deadline passes."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if party.process.poll() is not None:
                rc = party.process.returncode
                raise RuntimeError(f"{party.name} exited rc={rc} before it was ready:\n{_tail(party.log)}")
            try:
                with urllib.request.urlopen(f"{party.url}{path}", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{party.name} did not answer {path} within {READY_TIMEOUT_S:.0f} s:\n{_tail(party.log)}")

    def stop(self) -> None:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave processes behind
        try:
            for party in reversed(self.started):
                rc = stop_process_group(party.process, grace_s=STOP_GRACE_S)
                logger.info("[party=%s pid=%d] stopped rc=%s", party.name, party.process.pid, rc)
            self.started.clear()
        finally:
            signal.signal(signal.SIGINT, previous)


@contextmanager
def parties(log_dir: Path) -> Iterator[Parties]:
    started = Parties(log_dir)
    try:
        yield started
    finally:
        started.stop()


def _tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- vllm-router ---------------------------------------------------------------------------


def installed_router(venv: Path = ROUTER_VENV, version: str = ROUTER_VERSION) -> tuple[Path | None, str]:
    """vllm-router's executable in its own virtual environment, installing it there first
    if needed; (None, why) if it cannot be installed."""
    binary, python = venv / "bin" / "vllm-router", venv / "bin" / "python"
    if binary.exists() and _installed_version(python) == version:
        return binary, f"{ROUTER_PACKAGE} {version} in {venv}"
    print(f"installing {ROUTER_PACKAGE}=={version} into {venv} ...", flush=True)
    try:
        for argv, timeout in (
            ([sys.executable, "-m", "venv", str(venv)], 300),
            ([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", f"{ROUTER_PACKAGE}=={version}"],
             900),
        ):
            subprocess.run(argv, check=True, capture_output=True, text=True, timeout=timeout)
    except subprocess.CalledProcessError as exc:
        why = (exc.stderr or exc.stdout or "").strip().splitlines()[-3:]
        return None, f"installing {ROUTER_PACKAGE}=={version} failed (rc={exc.returncode}): {' / '.join(why)}"
    except (subprocess.TimeoutExpired, OSError) as exc:
        return None, f"installing {ROUTER_PACKAGE}=={version} failed: {exc}"
    if not binary.exists():
        return None, f"{ROUTER_PACKAGE}=={version} installed but {binary} is missing"
    return binary, f"{ROUTER_PACKAGE} {version} installed in {venv}"


def _installed_version(python: Path) -> str | None:
    code = f"import importlib.metadata as m; print(m.version({ROUTER_PACKAGE!r}))"
    try:
        done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60)
    except (subprocess.TimeoutExpired, OSError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def router_argv(binary: Path, port: int, prefill: str, decode: str, policy: str, prometheus_port: int) -> list[str]:
    """vllm-router in PD mode in front of one prefill and one decode engine."""
    return [
        str(binary), "--host", "127.0.0.1", "--port", str(port),
        "--vllm-pd-disaggregation", "--prefill", prefill, "--decode", decode,
        *_router_options(policy, prometheus_port),
    ]  # fmt: skip


def router_argv_regular(binary: Path, port: int, worker_urls: Sequence[str], policy: str,
                        prometheus_port: int) -> list[str]:  # fmt: skip
    """vllm-router in its regular mode: each request to one of ``worker_urls`` (colocated
    engines), chosen by ``policy``; cache_aware's tuning flags (--cache-threshold, ...) at
    their defaults."""
    if not worker_urls:
        raise ValueError("vllm-router's regular mode needs at least one worker URL, got none")
    return [
        str(binary), "--host", "127.0.0.1", "--port", str(port),
        "--worker-urls", *worker_urls,
        *_router_options(policy, prometheus_port),
    ]  # fmt: skip


def _router_options(policy: str, prometheus_port: int) -> list[str]:
    return [
        "--policy", policy,
        "--prometheus-port", str(prometheus_port),  # default 29000: two routers would collide
        "--worker-startup-check-interval", "1",  # default 30 s between its start-up health checks
        "--log-level", "warning",  # like our door's: no line per request
    ]  # fmt: skip


# --- the load client -------------------------------------------------------------------------


async def post(client: aiohttp.ClientSession, url: str, body: Mapping[str, Any]) -> bytes:
    async with client.post(f"{url}/v1/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"{url} answered HTTP {response.status}: {(await response.read())[:300]!r}")
        return await response.read()


def path_call(client: aiohttp.ClientSession, path: Arm) -> Call:
    if len(path.urls) == 1:
        url = path.urls[0]

        async def through() -> None:
            await post(client, url, BODY)

        return through
    prefill, decode = path.urls
    prefill_body = prefill_request(BODY)

    async def both_legs() -> None:
        params = json.loads(await post(client, prefill, prefill_body)).get("kv_transfer_params")
        await post(client, decode, {**BODY, "kv_transfer_params": params})

    return both_legs


async def latencies(call: Call, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
    return samples


async def load_for(call: Call, seconds: float, concurrency: int) -> tuple[int, float]:
    """``concurrency`` clients, each sending its next request as soon as its last one is
    answered, for ``seconds``: the requests answered, and the seconds until the last was."""
    started = time.perf_counter()
    deadline, answered = started + seconds, 0

    async def client() -> None:
        nonlocal answered
        while time.perf_counter() < deadline:
            await call()
            answered += 1

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return answered, time.perf_counter() - started


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process, all its threads (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick  # utime, stime: the stat file's 14th and 15th fields


def percentile_ms(samples: Sequence[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def engine_counts(client: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with client.get(f"{url}/stats") as response:
        response.raise_for_status()
        counts: dict[str, Any] = await response.json()
        return counts


Counts = Mapping[str, Any]  # a fake engine's GET /stats
BeforeAfter = tuple[Counts, Counts]


def legs_check(sent: int, prefill: BeforeAfter, decode: BeforeAfter, prefill_name: str) -> dict[str, Any]:
    """Did each of ``sent`` requests reach the prefill engine as a prefill leg, and then the
    decode engine with what that prefill answered? From the engines' counts (before, after)."""

    def delta(counts: BeforeAfter, key: str) -> int:
        return int(counts[1][key]) - int(counts[0][key])

    handed = [int(counts["handed_over_by"].get(prefill_name, 0)) for counts in decode]
    check = {
        "sent": sent,
        "prefill_legs": delta(prefill, "prefill_legs"),
        "prefill_requests": delta(prefill, "requests"),
        "decode_legs": delta(decode, "decode_legs"),
        "decode_requests": delta(decode, "requests"),
        "decode_legs_with_prefill_params": handed[1] - handed[0],
        "distinct_handovers": delta(decode, "handovers_seen"),
    }
    check["ok"] = all(value == sent for key, value in check.items() if key != "sent")
    return check


Figures = dict[str, dict[str, float]]  # path -> FIGURES, one round


async def measure_round(
    arms: Sequence[Arm], load: Load, prefill: Party, decode: Party
) -> tuple[Figures, dict[str, dict[str, Any]]]:
    """One round: every arm in turn; its figures, and the legs check of each PD arm."""
    figures: Figures = {}
    legs: dict[str, Any] = {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:

        async def counts() -> BeforeAfter:
            return await engine_counts(client, prefill.url), await engine_counts(client, decode.url)

        for arm in arms:
            call = path_call(client, arm)
            before = await counts() if arm.pd else None
            await latencies(call, WARMUP)
            samples = await latencies(call, load.requests)
            cpu_before = cpu_seconds(arm.proxy_pid) if arm.proxy_pid is not None else None
            answered, elapsed = await load_for(call, load.concurrent_seconds, load.concurrency)
            row = figures[arm.name] = {
                "p50_ms": round(percentile_ms(samples, 0.5), 3),
                "p99_ms": round(percentile_ms(samples, 0.99), 3),
                "mean_ms": round(statistics.mean(samples) * 1000, 3),
                "req_s": round(answered / elapsed, 1),
            }
            if arm.proxy_pid is not None and cpu_before is not None:
                user, system = (after - before for after, before in zip(cpu_seconds(arm.proxy_pid), cpu_before))
                row["proxy_cpu_us_per_req"] = round((user + system) / answered * 1e6, 1)
                row["proxy_sys_share"] = round(system / (user + system), 3) if user + system else 0.0
            if before is not None:
                after = await counts()
                sent = WARMUP + load.requests + answered
                legs[arm.name] = legs_check(sent, (before[0], after[0]), (before[1], after[1]), prefill.name)
            print(f"  {arm.name:42} p50 {row['p50_ms']:6.3f} ms  p99 {row['p99_ms']:6.3f} ms  "
                  f"{row['req_s']:7.0f} req/s", flush=True)  # fmt: skip
    return figures, legs


# --- aggregation -----------------------------------------------------------------------------


def aggregate(rounds: Sequence[Figures], baselines: Mapping[str, str | None]) -> dict[str, dict[str, Spread]]:
    """Each path's figures over the rounds, and its added latency: per round, its p50 (p99)
    minus its baseline's p50 (p99) in that round."""
    out: dict[str, dict[str, Spread]] = {}
    for name, baseline in baselines.items():
        row = {figure: Spread.of([r[name][figure] for r in rounds]) for figure in FIGURES}
        measured = [figure for figure in PROXY_FIGURES if figure in rounds[0][name]]
        row.update({figure: Spread.of([r[name][figure] for r in rounds]) for figure in measured})
        if baseline is not None:
            for q in ("p50_ms", "p99_ms"):
                row[f"added_{q}"] = Spread.of([r[name][q] - r[baseline][q] for r in rounds])
        out[name] = row
    return out


def compare(rounds: Sequence[Figures], door: str, router: str, latency_margin_ms: float = 0.1) -> dict[str, Any]:
    """Door against a router, round by round: the difference of their added p50 (their p50s
    share the baseline: the difference of their p50s) and the ratio of their requests/s;
    met: door added p50 <= router's + ``latency_margin_ms`` and door req/s >= router's
    (medians over the rounds)."""
    added = Spread.of([r[door]["p50_ms"] - r[router]["p50_ms"] for r in rounds])
    ratio = Spread.of([r[door]["req_s"] / r[router]["req_s"] for r in rounds])
    return {
        "door_minus_router_added_p50_ms": added,
        "door_over_router_req_s": ratio,
        "met": added.median <= latency_margin_ms and ratio.median >= 1.0,
    }


def rotated(items: Sequence[T], by: int) -> list[T]:
    shift = by % len(items) if items else 0
    return [*items[shift:], *items[:shift]]


def _spread_json(spread: Spread, digits: int) -> dict[str, float]:
    return {"median": round(spread.median, digits), "min": round(spread.low, digits), "max": round(spread.high, digits)}


# --- the run ---------------------------------------------------------------------------------

DIRECT = "colocated: client -> engine"
DIRECT_PD = "PD: client makes both calls"
DOOR_PD = "PD: client -> door"
UVICORN_PD = "PD: client -> door on Uvicorn httptools"
ROLES = {"c0": "colocated", "p0": "prefill", "d0": "decode"}


@dataclass
class Setup:
    """What runs: the engines by name, our two doors, a vllm-router per policy."""

    engines: dict[str, Party]
    doors: dict[str, Party]
    routers: dict[str, Party]
    router_argv: dict[str, list[str]]

    def arms(self) -> list[Arm]:
        engine, door = self.engines, self.doors
        return [
            Arm(DIRECT, (engine["c0"].url,), None, False),
            Arm("colocated: client -> door -> engine", (door["colocated"].url,), DIRECT, False, door["colocated"].pid),
            Arm(DIRECT_PD, (engine["p0"].url, engine["d0"].url), None, True),
            Arm(DOOR_PD, (door["pd"].url,), DIRECT_PD, True, door["pd"].pid),
            *((Arm(UVICORN_PD, (door["pd-uvicorn"].url,), DIRECT_PD, True, door["pd-uvicorn"].pid),)
              if "pd-uvicorn" in door else ()),
            *(Arm(router_arm(p), (party.url,), DIRECT_PD, True, party.pid) for p, party in self.routers.items()),
        ]


def router_arm(policy: str) -> str:
    return f"PD: client -> vllm-router ({policy})"


def start_all(started: Parties, door_policy: str, router: Path | None, router_policies: Sequence[str],
              uvicorn_arm: bool = False) -> Setup:  # fmt: skip
    python = sys.executable
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}
    engines: dict[str, Party] = {}
    for name, role in ROLES.items():
        port = free_port()
        engines[name] = started.start(name, [python, "-m", "tests.fake_engines", "--name", name, "--role", role,
                                             "--port", str(port)], port, env)  # fmt: skip
    for party in engines.values():
        started.wait_ready(party)
    doors: dict[str, Party] = {}
    modes = [("colocated", ("c0",), "door"), ("pd", ("p0", "d0"), "door")]
    if uvicorn_arm:
        modes.append(("pd-uvicorn", ("p0", "d0"), "uvicorn"))
    for mode, members, http in modes:
        port = free_port()
        specs = [f"--engine={member}={ROLES[member]}@{engines[member].port}" for member in members]
        argv = [python, "-m", "benchmarks.door_process", "--port", str(port), "--policy", door_policy,
                "--http", http, *specs]  # fmt: skip
        doors[mode] = started.start(f"door-{mode}", argv, port, env)
    routers: dict[str, Party] = {}
    argvs: dict[str, list[str]] = {}
    for policy in router_policies:
        if router is None:
            break
        port = free_port()
        argvs[policy] = router_argv(router, port, engines["p0"].url, engines["d0"].url, policy, free_port())
        routers[policy] = started.start(f"vllm-router-{policy}", argvs[policy], port)
    for party in [*doors.values(), *routers.values()]:
        started.wait_ready(party)
    return Setup(engines, doors, routers, argvs)


def run_rounds(setup: Setup, load: Load, rounds: int) -> tuple[list[Figures], dict[str, list[dict[str, Any]]]]:
    """Every arm, ``rounds`` times, in a rotated order each round (no arm always first)."""
    arms = setup.arms()
    figures: list[Figures] = []
    legs: dict[str, list[dict[str, Any]]] = {arm.name: [] for arm in arms if arm.pd}
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        for index in range(rounds):
            print(f"round {index + 1}/{rounds}", flush=True)
            prefill, decode = setup.engines["p0"], setup.engines["d0"]
            measured, checked = runner.run(measure_round(rotated(arms, index), load, prefill, decode))
            figures.append({arm.name: measured[arm.name] for arm in arms})  # the table's order
            for name, check in checked.items():
                legs[name].append(check)
    return figures, legs


async def profile_door(door: Party, arm: Arm, seconds: float, concurrency: int, out: Path) -> dict[str, Any]:
    """py-spy records the door while ``concurrency`` clients load it for ``seconds``."""
    py_spy = Path(sys.executable).parent / "py-spy"
    if not py_spy.exists():
        return {"skipped": f"{py_spy} not found"}
    form = "raw" if out.suffix == ".txt" else "flamegraph"
    argv = [str(py_spy), "record", "--pid", str(door.process.pid), "--duration", str(round(seconds)), "--rate", "200",
            "--nonblocking", "--format", form, "--output", str(out)]  # fmt: skip
    recorder = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:
            answered, elapsed = await load_for(path_call(client, arm), seconds + 1.0, concurrency)
        said, _ = await asyncio.wait_for(recorder.communicate(), timeout=30)
    finally:
        if recorder.returncode is None:
            recorder.kill()
            await recorder.wait()
    req_s = answered / elapsed
    print(f"door profile: {out} ({req_s:.0f} req/s while recorded)", flush=True)
    return {
        "output": str(out), "seconds": seconds, "concurrency": concurrency, "req_s_while_recorded": round(req_s, 1),
        "py_spy_rc": recorder.returncode, "py_spy_said": said.decode(errors="replace").splitlines()[-3:],
    }  # fmt: skip


def print_table(table: Mapping[str, Mapping[str, Spread]], comparisons: Mapping[str, Mapping[str, Any]],
                legs: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:  # fmt: skip
    columns = [
        ("p50_ms", "p50 ms", 3), ("p99_ms", "p99 ms", 3), ("added_p50_ms", "added p50 ms", 3),
        ("added_p99_ms", "added p99 ms", 3), ("req_s", "req/s", 0), ("proxy_cpu_us_per_req", "proxy CPU us/req", 0),
    ]  # fmt: skip
    header = f"{'path':40}" + "".join(f"{title:>23}" for _, title, _ in columns)
    print(f"{header}\n{'-' * len(header)}")
    for name, row in table.items():
        cells = [row[key].cell(digits) if key in row else "-" for key, _, digits in columns]
        print(f"{name:40}" + "".join(f"{cell:>23}" for cell in cells))
    for name, comparison in comparisons.items():
        verdict = "met" if comparison["met"] else "not met"
        print(f"{name}: p50 door - router "
              f"{comparison['door_minus_router_added_p50_ms'].cell(3)} ms, req/s door / router "
              f"{comparison['door_over_router_req_s'].cell(2)}; issue 12's target (<= +0.1 ms, >= 1.0x): "
              f"{verdict}")  # fmt: skip
    for name, checks in legs.items():
        state = "ok" if all(check["ok"] for check in checks) else "WRONG"
        print(f"legs {state}: {name}: each request a prefill leg on p0, then a decode leg with p0's kv_transfer_params")


def main() -> None:
    parser = argparse.ArgumentParser(description="front door overhead, each party in its own process")
    parser.add_argument("--requests", type=int, default=400, help="sequential requests per path and round (latency)")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent clients (requests/s)")
    parser.add_argument("--concurrent-seconds", type=float, default=2.0, help="how long the concurrent clients send")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--door-policy", choices=DOOR_POLICIES, default=DOOR_DEFAULT_POLICY,
                        help="the door's prefill/colocated routing policy; default: a deployment's")  # fmt: skip
    parser.add_argument("--router-policies", default=f"round_robin,{ROUTER_DEFAULT_POLICY}",
                        help=f"vllm-router --policy values, an arm each ({ROUTER_DEFAULT_POLICY}: its own "
                             "default)")  # fmt: skip
    parser.add_argument("--no-router", action="store_true", help="skip the vllm-router arms")
    parser.add_argument("--uvicorn-door", action="store_true",
                        help="one more PD arm: the door's handlers as a bare ASGI callable on Uvicorn's httptools "
                             "protocol (benchmarks/asgi_door.py)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"the result's JSON (default {RESULTS})")
    parser.add_argument("--profile-door", type=float, default=0.0, metavar="SECONDS",
                        help="after the rounds: py-spy records the PD door under the concurrent load")  # fmt: skip
    parser.add_argument("--profile-out", type=Path, default=Path("/tmp/door.svg"),
                        help="py-spy's output: .svg a flame graph, .txt collapsed stacks")  # fmt: skip
    args = parser.parse_args()
    for name, least in (("requests", 1), ("concurrency", 1), ("concurrent_seconds", 0.1), ("rounds", 1)):
        if getattr(args, name) < least:
            parser.error(f"--{name.replace('_', '-')} must be at least {least}, got {getattr(args, name)}")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    exit_on_sigterm()

    router_policies = [] if args.no_router else [p.strip() for p in args.router_policies.split(",") if p.strip()]
    router, router_note = installed_router() if router_policies else (None, "skipped (--no-router)")
    if router is None and router_policies:
        print(f"vllm-router arms skipped: {router_note}", flush=True)
    load = Load(args.requests, args.concurrency, args.concurrent_seconds)
    log_dir = Path(tempfile.mkdtemp(prefix="frontdoor-overhead-", dir="/tmp"))
    print(f"logs of the started processes: {log_dir}", flush=True)
    load_before = os.getloadavg()
    profile = None
    with parties(log_dir) as started:
        setup = start_all(started, args.door_policy, router, router_policies, args.uvicorn_door)
        rounds, legs = run_rounds(setup, load, args.rounds)
        if args.profile_door > 0:
            door_arm = next(arm for arm in setup.arms() if arm.name == DOOR_PD)
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                profile = runner.run(profile_door(setup.doors["pd"], door_arm, args.profile_door, args.concurrency,
                                                  args.profile_out))  # fmt: skip
    load_after = os.getloadavg()

    arms = setup.arms()
    table = aggregate(rounds, {arm.name: arm.baseline for arm in arms})
    doors = {"door": DOOR_PD, **({"door on Uvicorn httptools": UVICORN_PD} if args.uvicorn_door else {})}
    comparisons = {f"{label} vs vllm-router ({policy})": compare(rounds, arm, router_arm(policy))
                   for label, arm in doors.items() for policy in setup.routers}  # fmt: skip
    print(f"\n{load.requests} sequential requests, then {load.concurrency} concurrent clients for "
          f"{load.concurrent_seconds:g} s, per path; {args.rounds} round(s): median (min-max); "
          f"load average {load_before[0]:.1f} -> {load_after[0]:.1f}")  # fmt: skip
    print_table(table, comparisons, legs)
    result = {
        "settings": {**load.__dict__, "rounds": args.rounds, "warmup": WARMUP, "body": BODY},
        "machine": {"cpus": os.cpu_count(), "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in load_after]},  # fmt: skip
        "door": {"policy": args.door_policy,
                 "server": "uvicorn running the door's own protocol (door/http_server.py), uvloop; one process",
                 **({"uvicorn_arm": "uvicorn's httptools protocol, the door's handlers as a bare ASGI callable "
                                    "(benchmarks/asgi_door.py), uvloop; one process"} if args.uvicorn_door else {})},
        "vllm_router": {"note": router_note, "argv": {policy: ["vllm-router", *argv[1:]]
                                                      for policy, argv in setup.router_argv.items()}},  # fmt: skip
        "paths": {name: {figure: _spread_json(spread, 1 if figure == "req_s" else 3) for figure, spread in row.items()}
                  for name, row in table.items()},  # fmt: skip
        "door_vs_router": {name: {key: _spread_json(value, 3) if isinstance(value, Spread) else value
                                  for key, value in comparison.items()}
                           for name, comparison in comparisons.items()},  # fmt: skip
        "legs": legs,
        "rounds": rounds,
        "door_profile": profile,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {args.out}")
    if not all(check["ok"] for checks in legs.values() for check in checks):
        print("error: a PD path did not send each request's prefill leg, then its decode leg (see 'legs')",
              file=sys.stderr)  # fmt: skip
        sys.exit(1)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # ``parties`` has stopped every process by then
        print("interrupted; the processes this run started are stopped", file=sys.stderr)
        sys.exit(130)
