"""Attacks on a live front door's HTTP input, while a normal client measures its latency.

    .venv/bin/python -m tests.door_attack --url http://127.0.0.1:9000 --door-pid PID \\
        [--slowloris 200] [--floods 4] [--pipelined 50] [--malformed 10000] [--read-timeout-s 60]

``--door-pid``: the deploy process (``state.json``'s pid), whose descriptors and memory
are read from /proc; ``--read-timeout-s``: the deployment's ``DOOR_READ_TIMEOUT_S``.

1. Idle: the normal client (a process of its own) sends ``--probes`` completions one
   after another (``max_tokens`` 1); the door's open descriptors and resident memory.
2. Attack, all at once, while the normal client goes on:
   - slowloris: connections that send part of a request head (half: a whole head and
     part of its body), then one more byte every second;
   - pipelining flood: connections that each send a real completion followed by
     ``--pipelined`` pipelined requests with 1 MiB bodies, and never read an answer;
   - malformed: requests a client gets wrong, each on a connection of its own (garbage,
     a header without a colon, a head over 64 KiB, a body announced over 64 MiB, a bad
     Content-Length, bad chunked framing, invalid JSON, invalid UTF-8, a JSON array, no
     prompt, an unknown model, a GET on a completions path, an HTTP/2 preface).
3. After: every slowloris connection was closed by the door within the read timeout (+5
   s); the door's descriptors back to their idle level (+2), its memory within
   ``--memory-margin-mb`` of idle.

Passes when: 0 answers 5xx (malformed requests, the normal client), every attack
connection closed, descriptors and memory back, and the normal client's p99 latency
under attack within 2x its idle p99. Prints a table; exits 1 if a check fails. The
short variant runs in the suite (tests/test_e2e_colocated.py).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import multiprocessing
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

MiB = 1 << 20


@dataclass
class Report:
    idle_p50_ms: float = 0.0
    idle_p99_ms: float = 0.0
    attack_p50_ms: float = 0.0
    attack_p99_ms: float = 0.0
    normal_requests: int = 0
    normal_5xx: int = 0
    normal_errors: int = 0
    malformed: collections.Counter[str] = field(default_factory=collections.Counter)
    slowloris: int = 0
    slowloris_closed: int = 0
    slowloris_close_s: float = 0.0  # the longest a slowloris connection stayed open
    flood_requests_sent: int = 0
    flood_bytes_taken_mb: float = 0.0  # the most that left one flood client's buffer (the door's, and both kernels')
    idle_fds: int = 0
    peak_fds: int = 0
    after_fds: int = 0
    idle_rss_mb: float = 0.0
    peak_rss_mb: float = 0.0
    after_rss_mb: float = 0.0

    def failures(self, memory_margin_mb: float, p99_limit: float) -> list[str]:
        found = []
        fivexx = sum(count for status, count in self.malformed.items() if status.startswith("5"))
        if fivexx or self.normal_5xx:
            found.append(f"5xx answers: {fivexx} malformed, {self.normal_5xx} normal")
        if self.normal_errors:
            found.append(f"{self.normal_errors} normal requests failed without an answer")
        if self.malformed["left open"]:
            found.append(f"{self.malformed['left open']} malformed requests' connections left open")
        if self.slowloris_closed != self.slowloris:
            found.append(f"{self.slowloris - self.slowloris_closed} of {self.slowloris} slowloris connections left open")
        if self.after_fds > self.idle_fds + 2:
            found.append(f"descriptors {self.after_fds} after, {self.idle_fds} idle")
        if self.after_rss_mb > self.idle_rss_mb + memory_margin_mb:
            found.append(f"memory {self.after_rss_mb:.0f} MiB after, {self.idle_rss_mb:.0f} MiB idle")
        if p99_limit and self.attack_p99_ms > p99_limit * self.idle_p99_ms:
            found.append(f"normal p99 {self.attack_p99_ms:.0f} ms under attack, {self.idle_p99_ms:.0f} ms idle (limit {p99_limit:g}x)")
        return found

    def lines(self) -> Iterator[str]:
        yield "| measure | idle | under attack / after |"
        yield "|---|---|---|"
        yield f"| normal client p50 / p99 (ms) | {self.idle_p50_ms:.0f} / {self.idle_p99_ms:.0f} | {self.attack_p50_ms:.0f} / {self.attack_p99_ms:.0f} |"
        yield f"| normal requests (5xx, no answer) | | {self.normal_requests} ({self.normal_5xx}, {self.normal_errors}) |"
        yield f"| door descriptors | {self.idle_fds} | peak {self.peak_fds}, after {self.after_fds} |"
        yield f"| door resident memory (MiB) | {self.idle_rss_mb:.0f} | peak {self.peak_rss_mb:.0f}, after {self.after_rss_mb:.0f} |"
        yield f"| slowloris connections closed by the door | | {self.slowloris_closed} of {self.slowloris}, the last after {self.slowloris_close_s:.1f} s |"
        yield f"| pipelining flood | | {self.flood_requests_sent} requests sent; at most {self.flood_bytes_taken_mb:.0f} MiB of one connection's left its client |"
        yield f"| malformed requests by answer | | {', '.join(f'{k}: {v}' for k, v in sorted(self.malformed.items()))} |"


# ---- the door process, from /proc ----
def door_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def door_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# ---- the normal client: a process of its own ----
def _normal_client(url: str, model: str, until: float, count: int, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    samples: list[tuple[float, int]] = []  # (ms, status; 0: no answer)
    with httpx.Client(timeout=60) as client:
        while (count and len(samples) < count) or (not count and time.time() < until):
            started = time.perf_counter()
            try:
                status = client.post(f"{url}/v1/completions", json={"model": model, "prompt": "hello there", "max_tokens": 1}).status_code
            except httpx.HTTPError:
                status = 0
            samples.append(((time.perf_counter() - started) * 1000, status))
    out.put(samples)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


# ---- the attacks ----
MALFORMED: dict[str, bytes] = {
    "garbage": b"GARBAGE\r\n\r\n",
    "header without colon": b"POST /v1/completions HTTP/1.1\r\nHost: a\r\nNoColonHere\r\n\r\n",
    "head over 64 KiB": b"POST /v1/completions HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * (70 << 10) + b"\r\n\r\n",
    "body announced over 64 MiB": b"POST /v1/completions HTTP/1.1\r\nHost: a\r\nContent-Length: 100000000\r\n\r\n{",
    "bad content-length": b"POST /v1/completions HTTP/1.1\r\nHost: a\r\nContent-Length: abc\r\n\r\n",
    "bad chunked framing": b"POST /v1/completions HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n",
    "http/2 preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
}


def _post(body: bytes, path: str = "/v1/completions", method: str = "POST") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nConnection: close\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body  # fmt: skip


def malformed_requests(model: str) -> dict[str, bytes]:
    return {
        **MALFORMED,
        "invalid json": _post(b"{oops"),
        "invalid utf-8": _post(b'{"prompt": "\xff\xfe"}'),
        "json array": _post(b"[1, 2]"),
        "no prompt": _post(json.dumps({"model": model}).encode()),
        "unknown model": _post(json.dumps({"model": "no-such-model", "prompt": "x"}).encode()),
        "get on a completions path": _post(b"", method="GET"),
    }


async def _answer_status(reader: asyncio.StreamReader, timeout_s: float) -> str:
    """The status of the door's answer, or how the connection ended without one."""
    try:
        async with asyncio.timeout(timeout_s):
            line = await reader.readline()
            await reader.read()  # to the door's close
    except TimeoutError:
        return "left open"
    except ConnectionError:
        return "reset"
    parts = line.split()
    return parts[1].decode() if len(parts) > 1 and line.startswith(b"HTTP/") else "closed without answer"


async def malformed(host: str, port: int, requests: dict[str, bytes], count: int, report: Report) -> None:
    kinds = list(requests)
    gate = asyncio.Semaphore(32)

    async def one(index: int) -> None:
        async with gate:
            kind = kinds[index % len(kinds)]
            try:
                reader, writer = await asyncio.open_connection(host, port)
            except OSError as exc:
                report.malformed[f"connect failed ({exc.__class__.__name__})"] += 1
                return
            try:
                writer.write(requests[kind])
                await writer.drain()
                report.malformed[await _answer_status(reader, 15)] += 1
            except ConnectionError:
                report.malformed["reset"] += 1
            finally:
                writer.close()

    await asyncio.gather(*(one(i) for i in range(count)))


async def slowloris(host: str, port: int, count: int, give_up_s: float, report: Report) -> None:
    async def one(index: int) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        started = time.monotonic()
        if index % 2:
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: a\r\nX-Slow: ")
        else:
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\n{\"prompt\": \"")
        report.slowloris += 1
        try:
            while time.monotonic() - started < give_up_s:
                try:
                    async with asyncio.timeout(1.0):
                        if await reader.read(65536) == b"":
                            raise ConnectionResetError
                        continue  # the door's 408: read on to its close
                except TimeoutError:
                    writer.write(b"a")  # one more byte a second: it must not buy time
                    await writer.drain()
        except ConnectionError:
            report.slowloris_closed += 1
            report.slowloris_close_s = max(report.slowloris_close_s, time.monotonic() - started)
        finally:
            writer.close()

    await asyncio.gather(*(one(i) for i in range(count)))


async def flood(host: str, port: int, model: str, connections: int, pipelined: int, hold_s: float, report: Report) -> None:
    """Each connection: one real completion, then ``pipelined`` 1 MiB requests, no answer read."""
    first = _post(json.dumps({"model": model, "prompt": "a slow call", "max_tokens": 32}).encode()).replace(b"Connection: close\r\n", b"")
    # Refused by the door itself (unknown model): the flood costs the door, not the engines.
    heavy = _post(json.dumps({"model": "no-such-model", "prompt": "y" * MiB}).encode()).replace(b"Connection: close\r\n", b"")

    async def one() -> None:
        reader, writer = await asyncio.open_connection(host, port, limit=MiB)
        sent = 0
        try:
            writer.write(first)
            deadline = time.monotonic() + hold_s
            for _ in range(pipelined):
                writer.write(heavy)
                sent += 1
                try:
                    async with asyncio.timeout(max(0.01, deadline - time.monotonic())):
                        await writer.drain()  # blocks once the door stops reading
                except TimeoutError:
                    break
            transport = writer.transport
            taken = sent * len(heavy) - transport.get_write_buffer_size()
            report.flood_bytes_taken_mb = max(report.flood_bytes_taken_mb, taken / MiB)
            await asyncio.sleep(max(0.0, deadline - time.monotonic()))
        finally:
            report.flood_requests_sent += sent + 1
            writer.transport.abort()

    await asyncio.gather(*(one() for _ in range(connections)))


async def _watch(pid: int, stop: asyncio.Event, report: Report) -> None:
    while not stop.is_set():
        report.peak_fds = max(report.peak_fds, door_fds(pid))
        report.peak_rss_mb = max(report.peak_rss_mb, door_rss_mb(pid))
        await asyncio.sleep(0.2)


async def attack(url: str, model: str, door_pid: int, args: argparse.Namespace, report: Report) -> None:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    stop = asyncio.Event()
    watcher = asyncio.create_task(_watch(door_pid, stop, report))
    try:
        await asyncio.gather(
            slowloris(host, port, args.slowloris, args.read_timeout_s + 5, report),
            flood(host, port, model, args.floods, args.pipelined, min(10.0, args.read_timeout_s), report),
            malformed(host, port, malformed_requests(model), args.malformed, report),
        )
    finally:
        stop.set()
        await watcher


def run(args: argparse.Namespace) -> Report:
    report = Report()
    model = httpx.get(f"{args.url}/v1/models", timeout=30).json()["data"][0]["id"]
    context = multiprocessing.get_context("spawn")
    queue: multiprocessing.Queue = context.Queue()  # type: ignore[type-arg]
    idle = context.Process(target=_normal_client, args=(args.url, model, 0.0, args.probes, queue))
    idle.start()
    idle_samples = queue.get()
    idle.join()
    report.idle_fds, report.idle_rss_mb = door_fds(args.door_pid), door_rss_mb(args.door_pid)
    report.idle_p50_ms = statistics.median(ms for ms, _ in idle_samples)
    report.idle_p99_ms = _percentile([ms for ms, _ in idle_samples], 0.99)
    attack_until = time.time() + args.read_timeout_s + 5
    normal = context.Process(target=_normal_client, args=(args.url, model, attack_until, 0, queue))
    normal.start()
    asyncio.run(attack(args.url, model, args.door_pid, args, report))
    samples = queue.get()
    normal.join()
    report.normal_requests = len(samples)
    report.normal_5xx = sum(1 for _, status in samples if status >= 500)
    report.normal_errors = sum(1 for _, status in samples if status == 0)
    report.attack_p50_ms = statistics.median(ms for ms, _ in samples)
    report.attack_p99_ms = _percentile([ms for ms, _ in samples], 0.99)
    deadline = time.monotonic() + 10  # closed connections leave the door's tables shortly after
    while door_fds(args.door_pid) > report.idle_fds + 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    report.after_fds, report.after_rss_mb = door_fds(args.door_pid), door_rss_mb(args.door_pid)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.door_attack", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="the door, e.g. http://127.0.0.1:9000")
    parser.add_argument("--door-pid", type=int, required=True, help="the deploy process (state.json's pid)")
    parser.add_argument("--read-timeout-s", type=float, default=60.0, help="the deployment's DOOR_READ_TIMEOUT_S")
    parser.add_argument("--slowloris", type=int, default=200)
    parser.add_argument("--floods", type=int, default=4, help="pipelining flood connections")
    parser.add_argument("--pipelined", type=int, default=50, help="1 MiB requests pipelined on each")
    parser.add_argument("--malformed", type=int, default=10_000)
    parser.add_argument("--probes", type=int, default=30, help="idle requests of the normal client")
    parser.add_argument("--memory-margin-mb", type=float, default=64.0)
    parser.add_argument("--p99-limit", type=float, default=2.0, help="normal p99 under attack / idle p99 at most; 0: not checked")
    args = parser.parse_args(argv)
    report = run(args)
    for line in report.lines():
        print(line)
    failures = report.failures(args.memory_margin_mb, args.p99_limit)
    for failure in failures:
        print(f"FAILED: {failure}")
    print("passed" if not failures else f"{len(failures)} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
