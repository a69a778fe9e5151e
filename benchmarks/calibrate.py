"""Fit a simulated engine's cost profile to a real engine on this machine.

    bash run_vllm_on_yr.sh bench calibrate [--model 93m | --model-path DIR] [--dtype float32]
        [--engines 2] [--name cpu-93m-float32] [--output FILE]

Deploys ``--engines`` real colocated vLLM engines (the project's CLI, no KV connector, a
core each) and measures them directly (their own ports, no door), all at once, as the
deployments the profile stands in for run them: on a 2-core machine two engines' API
servers and engine cores share the cores, which one engine alone does not show (measured:
with a profile fitted on one engine, a run of seed 000's workload was 23% faster in req/s
than on the two real engines). Each prompt is unique (a salt of its own, so nothing is found in the prefix
cache unless the measurement wants it):

- prefill: one request of ``L`` tokens and ``max_tokens`` 1, for a grid of ``L``;
- prefill after a cached prefix: ``P`` tokens computed first, then ``P + N``;
- decode: ``B`` streams at once of a ``C``-token prompt, the median gap between tokens
  once every stream decodes, for a grid of ``B`` and ``C``.

Each observation is one step of the cost model (workers/sim_engine/profile.py) or a
prefill's step plus the API server's own time; the coefficients are the non-negative
least-squares fit. The handoff's load cost comes from the model's KV bytes per token and
the connector's measured save and load rates (``--save-gbps``, ``--load-gbps``: the
figures of ``benchmarks.connector_io`` on this machine). Prints each observation against
the fit and writes the profile (default: workers/sim_engine/profiles/<name>.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from benchmarks.deployment import deployed, exit_on_sigterm
from benchmarks.models import add_model_options, bench_model
from testkit.helpers import isolated_env
from workers.sim_engine.profile import PROFILES_DIR, CostProfile

PREFILL_LENGTHS = (64, 256, 512, 1024, 2048)
CACHED_PREFIX = 1024
CACHED_NEW = (128, 512)
DECODE_GRID = ((1, 256), (2, 256), (4, 256), (8, 256), (16, 256), (1, 1024), (4, 1024), (8, 1024), (2, 2048))
DECODE_TOKENS = 24
REPEATS = 2
# The connector's handoff: the prefill's save and the decode's load, measured by
# ``.venv/bin/python -m benchmarks.connector_io --blocks 32 --repeats 10`` (docs/kv-connector.md).
SAVE_GBPS, LOAD_GBPS, HANDOFF_BASE_S = 3.72, 6.23, 0.005


@dataclass(frozen=True)
class Observation:
    what: str
    seconds: float
    # base, tokens, prefill attention (k pairs), decode attention (k context tokens), sequences, request overhead
    features: tuple[float, float, float, float, float, float]


def prefill_features(new: int, cached: int) -> tuple[float, float, float, float, float, float]:
    return (1.0, float(new), new * (cached + new / 2) / 1000.0, 0.0, 1.0, 1.0)


def decode_features(batch: int, context: int) -> tuple[float, float, float, float, float, float]:
    return (1.0, float(batch), 0.0, batch * (context + 1) / 1000.0, float(batch), 0.0)


def fit(observations: list[Observation]) -> np.ndarray:
    """Non-negative least squares, relative error weighted (short steps count as much as long)."""
    a = np.array([o.features for o in observations], dtype=float)
    b = np.array([o.seconds for o in observations], dtype=float)
    weights = 1.0 / b
    active = list(range(a.shape[1]))
    while True:
        coefficients, *_ = np.linalg.lstsq(a[:, active] * weights[:, None], b * weights, rcond=None)
        if (coefficients >= 0).all():
            full = np.zeros(a.shape[1])
            full[active] = coefficients
            return full
        active.pop(int(np.argmin(coefficients)))


def _prompt(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(10, 4000) for _ in range(length)]


async def _timed(client: httpx.AsyncClient, url: str, body: dict[str, object]) -> float:
    started = time.perf_counter()
    response = await client.post(f"{url}/v1/completions", json=body)
    response.raise_for_status()
    return time.perf_counter() - started


async def _token_times(client: httpx.AsyncClient, url: str, body: dict[str, object]) -> list[float]:
    times: list[float] = []
    async with client.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                times.append(time.perf_counter())
    return times


async def measure(url: str, model: str, seed: int = 0) -> list[Observation]:
    rng = random.Random(seed)
    observations: list[Observation] = []

    def body(prompt: list[int], max_tokens: int, salt: str | None = None) -> dict[str, object]:
        return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0,
                "cache_salt": salt or uuid.uuid4().hex}  # fmt: skip

    async with httpx.AsyncClient(timeout=600) as client:
        for length in PREFILL_LENGTHS:
            for _ in range(REPEATS):
                seconds = await _timed(client, url, body(_prompt(rng, length), 1))
                observations.append(Observation(f"prefill {length}", seconds, prefill_features(length, 0)))
        for new in CACHED_NEW:
            for _ in range(REPEATS):
                salt, prefix = uuid.uuid4().hex, _prompt(rng, CACHED_PREFIX)
                await _timed(client, url, body(prefix, 1, salt))
                seconds = await _timed(client, url, body(prefix + _prompt(rng, new), 1, salt))
                observations.append(Observation(f"prefill {new} after {CACHED_PREFIX} cached", seconds,
                                                prefill_features(new, CACHED_PREFIX)))  # fmt: skip
        for batch, context in DECODE_GRID:
            streams = await asyncio.gather(*(_token_times(client, url, body(_prompt(rng, context), DECODE_TOKENS))
                                             for _ in range(batch)))  # fmt: skip
            everyone = max(times[0] for times in streams)  # from here on every stream decodes
            last = min(times[-1] for times in streams)
            gaps = [b - a for times in streams for a, b in zip(times, times[1:]) if a >= everyone and b <= last]
            if gaps:
                observations.append(Observation(f"decode {batch} x {context}", statistics.median(gaps),
                                                decode_features(batch, context + DECODE_TOKENS // 2)))  # fmt: skip
    return observations


async def measure_all(urls: list[str], model: str) -> list[Observation]:
    """The grid on every engine at once (each its own prompts)."""
    per_engine = await asyncio.gather(*(measure(url, model, seed) for seed, url in enumerate(urls)))
    return [observation for observations in per_engine for observation in observations]


def profile_from(name: str, source: str, coefficients: np.ndarray, kv_bytes_per_token: int) -> CostProfile:
    base, per_token, attention, context, sequence, overhead = (float(c) for c in coefficients)
    return CostProfile(
        name=name, source=source, base_s=base, per_token_s=per_token, per_attention_s=attention,
        per_context_s=context, per_sequence_s=sequence, request_overhead_s=overhead, load_base_s=HANDOFF_BASE_S,
        load_per_token_s=kv_bytes_per_token / (SAVE_GBPS * 1e9) + kv_bytes_per_token / (LOAD_GBPS * 1e9),
    )  # fmt: skip


def main() -> None:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description="Fit a simulated engine's cost profile to a real engine")
    add_model_options(parser)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--engines", type=int, default=2, help="engines measured at once, a core each (default 2)")
    parser.add_argument("--name", default=None, help="the profile's name (default cpu-<model>-<dtype>)")
    parser.add_argument("--output", type=Path, default=None, help="the profile's file (default: the shipped profiles)")
    args = parser.parse_args()
    bench = bench_model(args)
    name = args.name or f"cpu-{args.model if args.model_path is None else bench.name}-{args.dtype}"
    tmp = Path(tempfile.mkdtemp(prefix="calibrate-", dir="/tmp"))
    params = f"--enforce-eager --dtype {args.dtype} --max-model-len {max(PREFILL_LENGTHS) + 256}"
    env = isolated_env(tmp, MODEL_PATH=str(bench.path), PREFILL_INS_NUM=str(args.engines), DECODE_INS_NUM="0",
                       KV_CONNECTOR="none", ROUTING_POLICY="round_robin", PREFILL_STARTUP_PARAMS=params)  # fmt: skip
    with deployed(env) as state:
        urls = [f"http://{engine['host']}:{engine['port']}" for engine in state.engines]
        observations = asyncio.run(measure_all(urls, state.served_model_name))
    coefficients = fit(observations)
    print("| observation | measured ms | fitted ms |\n|---|---|---|")
    for o in observations:
        print(f"| {o.what} | {o.seconds * 1000:.1f} | {float(np.dot(coefficients, o.features)) * 1000:.1f} |")
    kv_bytes = bench.kv_bytes_per_token * (4 if args.dtype == "float32" else 2) // 2
    source = (f"bash run_vllm_on_yr.sh bench calibrate --model {args.model} --dtype {args.dtype} --engines {args.engines}: "
              f"{args.engines} vLLM 0.32 CPU engines (a core each, measured at once) of {bench.name} on this machine "
              f"({time.strftime('%Y-%m-%d')}); load from connector_io's rates")  # fmt: skip
    profile = profile_from(name, source, coefficients, kv_bytes)
    output = args.output or PROFILES_DIR / f"{name}.json"
    output.write_text(profile.to_json())
    print(json.dumps({"profile": str(output), **json.loads(profile.to_json())}, indent=2))


if __name__ == "__main__":
    main()
