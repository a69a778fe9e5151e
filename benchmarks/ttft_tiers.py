"""TTFT of a long prompt in four KV states, side by side in one run:

1. cold: nothing cached, the engine computes the whole prompt;
2. device prefix cache: the same engine again (vLLM's own cache; the floor);
3. data system, same worker: the engine's device cache is reset, the prompt's blocks
   come from the data system worker it is attached to (where they were saved);
4. data system, other worker: a second instance attached to a second worker loads
   blocks that were saved through the first worker.

    .venv/bin/python -m benchmarks.ttft_tiers [--tokens 4096] [--rounds 3]

It deploys with the project's own CLI (PD-colocated, 2 instances, DS_WORKERS=2,
USING_PREFIX_CONNECTOR=1) a ~93M-parameter random-weight Qwen2 (12 layers, hidden 768)
built locally, sends prompts of ``--tokens`` random token ids directly to each
engine's /v1/completions (streaming, max_tokens=1), and times the first streamed
chunk. Each state is measured on ``--rounds`` distinct prompts; the median is shown.
The engines run in eager mode on one core each. Results:
benchmarks/results/ttft_tiers.json. The deployment is cleaned even on failure.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.deployment import deployed
from deploy.embedded_model import BENCH_MODEL_CONFIG, BENCH_MODEL_NAME, ensure_embedded_model
from testkit.deployment import external_kv_tokens
from testkit.helpers import PROJECT_ROOT, free_port, isolated_env

RESULTS = Path(__file__).resolve().parent / "results" / "ttft_tiers.json"
STATES = ("cold", "device prefix cache", "data system, same worker", "data system, other worker")


Prompt = list[int] | str  # token ids, or text the engine tokenizes


def ttft(url: str, model: str, prompt: Prompt) -> float:
    body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0, "stream": True}
    started = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                return time.perf_counter() - started
    raise RuntimeError("no token streamed")


def main() -> None:
    parser = argparse.ArgumentParser(description="TTFT in four KV cache states")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model = ensure_embedded_model(PROJECT_ROOT / ".cache" / "models", BENCH_MODEL_NAME, BENCH_MODEL_CONFIG)
    tmp = Path(tempfile.mkdtemp(prefix="ttft-", dir="/tmp"))
    env = isolated_env(
        tmp,
        MODEL_PATH=str(model),
        PREFILL_INS_NUM="2",
        DECODE_INS_NUM="0",
        DS_WORKERS="2",
        USING_PREFIX_CONNECTOR="1",
        DS_SHARED_MEMORY_MB="2048",
        PREFILL_STARTUP_PARAMS=f"--enforce-eager --max-model-len {args.tokens + 256}",
        VLLM_SERVER_DEV_MODE="1",  # engines expose /reset_prefix_cache
        SERVER_PORT=str(free_port()),
    )
    samples: dict[str, list[float]] = {state: [] for state in STATES}
    loaded: dict[str, list[float]] = {state: [] for state in STATES}
    with deployed(env) as state:
        first, second = (f"http://{e['host']}:{e['port']}" for e in state.engines)
        name = state.served_model_name
        rng = random.Random(0)
        ttft(first, name, [rng.randrange(10, 4000) for _ in range(64)])  # warm-up
        ttft(second, name, [rng.randrange(10, 4000) for _ in range(64)])
        for _ in range(args.rounds):
            prompt = [rng.randrange(10, 4000) for _ in range(args.tokens)]
            plan = [
                ("cold", first, False),
                ("device prefix cache", first, False),
                ("data system, same worker", first, True),
                ("data system, other worker", second, False),
            ]
            for label, url, reset in plan:
                if reset:
                    time.sleep(1.0)  # let the background save of the cold run finish
                    httpx.post(f"{url}/reset_prefix_cache", timeout=30).raise_for_status()
                before = external_kv_tokens(url)
                samples[label].append(ttft(url, name, prompt))
                loaded[label].append(external_kv_tokens(url) - before)
    medians = {state: statistics.median(values) for state, values in samples.items()}
    device = medians["device prefix cache"]
    print(f"prompt {args.tokens} tokens, model {BENCH_MODEL_NAME} (~93M parameters), median of {args.rounds}")
    print(f"{'state':28}{'TTFT ms':>10}{'x cold':>9}{'x device':>10}{'tokens from store':>19}")
    for state in STATES:
        print(
            f"{state:28}{medians[state] * 1000:10.1f}{medians[state] / medians['cold']:9.3f}"
            f"{medians[state] / device:10.2f}{statistics.median(loaded[state]):19.0f}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "prompt_tokens": args.tokens,
        "rounds": args.rounds,
        "model": BENCH_MODEL_NAME,
        "ttft_ms_median": {s: round(v * 1000, 1) for s, v in medians.items()},
        "ttft_ms_samples": {s: [round(v * 1000, 1) for v in values] for s, values in samples.items()},
        "tokens_loaded_from_store_median": {s: statistics.median(v) for s, v in loaded.items()},
        "ratio_to_cold": {s: round(v / medians["cold"], 3) for s, v in medians.items()},
        "ratio_to_device_cache": {s: round(v / device, 2) for s, v in medians.items()},
    }, indent=2) + "\n")  # fmt: skip
    print(f"written {RESULTS}")


if __name__ == "__main__":
    main()
