"""KV torture: prefill/decode through the front door under pressure, every output checked.

Concurrent requests whose prompts share prefixes of random lengths (and end in random
suffixes) go through the door of a 1P1D deployment whose decode KV cache is small
enough to force preemption; some clients give up mid-flight (the door cancels their
requests); the data system worker is stopped and started again once during the run.
Every completed greedy output must equal the one the prefill engine computes alone,
without any handoff (sequentially, before the run). Afterwards no decode request may
have waited longer than KV_HANDOFF_WAIT_MS plus one store call (KV_REQUEST_TIMEOUT_MS).

    .venv/bin/python -m tests.kv_torture --requests 200 --concurrency 8   # the long variant

The short variant runs in the suite (tests/test_e2e_kv_torture.py). The long variant
deploys its own 1P1D (float32 embedded model; greedy outputs are then stable under
batching) and cleans it afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from deploy.config import build_config
from deploy.datasystem import start_worker, stop_worker, worker_home
from testkit.deployment import BLOCK_SIZE, ENGINE_PARAMS, Deployment, deployed
from testkit.metrics import metric

HANDOFF_WAIT_MS = 1500
# 16 blocks of 128 tokens on the decode: a few concurrent requests fill it, vLLM preempts.
TORTURE_SETTINGS = {
    "PREFILL_STARTUP_PARAMS": f"{ENGINE_PARAMS} --max-model-len 1024",
    "DECODE_STARTUP_PARAMS": f"{ENGINE_PARAMS} --max-model-len 1024 --num-gpu-blocks-override 16",
    "KV_HANDOFF_WAIT_MS": str(HANDOFF_WAIT_MS),
    "KV_REQUEST_TIMEOUT_MS": "500",
}
# A handoff waits at most KV_HANDOFF_WAIT_MS, plus the store call under way when that
# runs out (bounded by KV_REQUEST_TIMEOUT_MS): 2.0 s; the bound checked is the next bucket
# of the wait histogram, 2.5 s, which leaves 0.5 s for a thread starved on a busy 2-core host.
WAIT_BOUND_BUCKET = "2.5"


@dataclass
class TortureReport:
    completed: int = 0
    cancelled: int = 0
    mismatches: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    handoff_waits: float = 0.0  # decode requests that waited for handed-over KV
    handoff_waits_over_bound: float = 0.0
    preemptions: float = 0.0
    loaded_tokens: float = 0.0
    restarted_store: bool = False
    seconds: float = 0.0

    def summary(self) -> str:
        return (
            f"{self.completed} completed, {self.cancelled} cancelled, {len(self.mismatches)} mismatches, "
            f"{len(self.errors)} errors, {self.preemptions:.0f} preemptions on the decode, "
            f"{self.loaded_tokens:.0f} tokens handed over, {self.handoff_waits:.0f} handoff waits "
            f"({self.handoff_waits_over_bound:.0f} over {WAIT_BOUND_BUCKET} s), store restarted: {self.restarted_store}, "
            f"{self.seconds:.0f} s"
        )


def make_prompts(count: int, seed: int) -> list[list[int]]:
    """Prompts in a few prefix groups: a shared head of 0-4 blocks plus a random tail."""
    rng = random.Random(seed)
    heads = [[rng.randrange(10, 4000) for _ in range(rng.randrange(0, 4 * BLOCK_SIZE + 1))] for _ in range(4)]
    return [rng.choice(heads) + [rng.randrange(10, 4000) for _ in range(rng.randrange(1, 300))] for _ in range(count)]


def _body(model: str, prompt: list[int], max_tokens: int) -> dict[str, object]:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}


def _text(response: httpx.Response) -> str:
    response.raise_for_status()
    return str(response.json()["choices"][0]["text"])


def restart_store(deployment: Deployment, down_s: float = 2.0) -> None:
    """Stop the deployment's data system worker, wait, start an empty one at the same address."""
    settings = build_config(deployment.env).datasystem
    stop_worker(settings.address)
    time.sleep(down_s)
    home = worker_home(Path(deployment.env["RUN_DIR"]) / "datasystem-restarted", settings.address)
    start_worker(settings, home, settings.address, runs_metastore=True)


async def _run_requests(
    deployment: Deployment, prompts: list[list[int]], lengths: list[int], expected: list[str], concurrency: int, seed: int, report: TortureReport, restart_at: int
) -> None:  # fmt: skip
    rng = random.Random(seed + 1)
    gate = asyncio.Semaphore(concurrency)
    model = deployment.state.served_model_name
    restart: threading.Thread | None = None

    async def one(index: int, client: httpx.AsyncClient) -> None:
        nonlocal restart
        give_up_s = rng.uniform(0.05, 1.5) if rng.random() < 0.15 else None
        async with gate:
            if index == restart_at and restart is None:
                restart = threading.Thread(target=restart_store, args=(deployment,), name="store-restart")
                restart.start()
            request = client.post(f"{deployment.url}/v1/completions", json=_body(model, prompts[index], lengths[index]))
            try:
                response = await (asyncio.wait_for(request, give_up_s) if give_up_s else request)
            except asyncio.TimeoutError:
                report.cancelled += 1
                return
            except httpx.HTTPError as exc:
                report.errors.append(f"request {index}: {exc!r}")
                return
            if response.status_code != 200:
                report.errors.append(f"request {index}: HTTP {response.status_code} {response.text[:200]}")
                return
            report.completed += 1
            if _text(response) != expected[index]:
                report.mismatches.append(f"request {index} ({len(prompts[index])} prompt tokens)")

    async with httpx.AsyncClient(timeout=120) as client:  # a stalled engine fails the run, not hangs it
        await asyncio.gather(*(one(i, client) for i in range(len(prompts))))
    if restart is not None:
        restart.join(timeout=180)
        report.restarted_store = not restart.is_alive()


def run_torture(deployment: Deployment, requests: int, concurrency: int, seed: int = 0, restart_store: bool = True) -> TortureReport:
    prompts = make_prompts(requests, seed)
    lengths = [random.Random(seed + i).randrange(4, 48) for i in range(requests)]
    model = deployment.state.served_model_name
    prefill, decode = deployment.engine_url("prefill"), deployment.engine_url("decode")
    with httpx.Client(timeout=300) as client:  # the reference: the prefill engine alone, one at a time
        expected = [_text(client.post(f"{prefill}/v1/completions", json=_body(model, p, n))) for p, n in zip(prompts, lengths)]
    before = {
        "waits": metric(decode, "vllm:yuanrong_kv_op_seconds_count", op="handoff_wait"),
        "in_bound": metric(decode, "vllm:yuanrong_kv_op_seconds_bucket", op="handoff_wait", le=WAIT_BOUND_BUCKET),
        "preemptions": metric(decode, "vllm:num_preemptions_total"),
        "loaded": metric(decode, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer"),
    }
    report = TortureReport()
    started = time.monotonic()
    asyncio.run(_run_requests(deployment, prompts, lengths, expected, concurrency, seed, report, restart_at=requests // 3 if restart_store else -1))
    report.seconds = time.monotonic() - started
    time.sleep(11)  # engines publish connector stats every 10 s
    waits = metric(decode, "vllm:yuanrong_kv_op_seconds_count", op="handoff_wait") - before["waits"]
    in_bound = metric(decode, "vllm:yuanrong_kv_op_seconds_bucket", op="handoff_wait", le=WAIT_BOUND_BUCKET) - before["in_bound"]
    report.handoff_waits = waits
    report.handoff_waits_over_bound = waits - in_bound
    report.preemptions = metric(decode, "vllm:num_preemptions_total") - before["preemptions"]
    report.loaded_tokens = metric(decode, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer") - before["loaded"]
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description="KV torture test on a real 1P1D deployment")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with deployed(Path(tempfile.mkdtemp(prefix="kv-torture-", dir="/tmp")), **TORTURE_SETTINGS) as deployment:
        report = run_torture(deployment, args.requests, args.concurrency, args.seed)
    print(report.summary())
    for line in report.mismatches + report.errors:
        print("  ", line)
    raise SystemExit(0 if not report.mismatches and not report.errors and not report.handoff_waits_over_bound else 1)


if __name__ == "__main__":
    main()
