"""Selective PD: what a PD request costs when the decode engine already holds its prompt,
or when the prompt is short, against sending it to one engine directly.

    .venv/bin/python -m benchmarks.selective_pd [--tokens 2048] [--short 64] [--rounds 5]
        [--policies kv_aware,prefix_affinity]

For each policy it deploys 1 prefill + 1 decode instance of the ~93M benchmark model and
measures streamed TTFT (max_tokens=1), each figure the median of ``--rounds``:
- ``repeat_via_door``: a ``--tokens`` prompt sent through the door again after a first
  time (with kv_aware the decode engine holds it, so the prefill leg is skipped; with
  prefix_affinity every request takes both legs);
- ``repeat_on_decode``: the same prompt sent straight to the decode engine, whose device
  cache holds it (the floor: a device-cache hit on one engine);
- ``short_via_door`` / ``short_on_decode``: a fresh ``--short``-token prompt through the
  door, and another one straight to the decode engine.
Results: benchmarks/results/selective_pd.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
from pathlib import Path

from benchmarks.deployment import deployed
from benchmarks.ttft_tiers import ttft
from deploy.embedded_model import BENCH_MODEL_CONFIG, BENCH_MODEL_NAME, ensure_embedded_model
from testkit.helpers import PROJECT_ROOT, isolated_env

RESULTS = Path(__file__).resolve().parent / "results" / "selective_pd.json"


def run_policy(policy: str, model: Path, tokens: int, short: int, rounds: int) -> dict[str, float]:
    params = f"--enforce-eager --max-model-len {tokens + 64}"
    env = isolated_env(
        Path(tempfile.mkdtemp(prefix=f"spd-{policy[:5]}-", dir="/tmp")),
        MODEL_PATH=str(model),
        PREFILL_STARTUP_PARAMS=params,
        DECODE_STARTUP_PARAMS=params,
        ROUTING_POLICY=policy,
    )
    rng = random.Random(1)

    def fresh(length: int) -> list[int]:
        return [rng.randrange(10, 4000) for _ in range(length)]

    samples: dict[str, list[float]] = {"repeat_via_door": [], "repeat_on_decode": [], "short_via_door": [], "short_on_decode": []}
    with deployed(env) as state:
        door = f"http://127.0.0.1:{env['SERVER_PORT']}"
        decode = next(f"http://{e['host']}:{e['port']}" for e in state.engines if e["role"] == "decode")
        model_name = state.served_model_name
        ttft(door, model_name, fresh(256))  # warm-up: a fresh engine's first long prompt is slow
        for _ in range(rounds):
            prompt = fresh(tokens)
            ttft(door, model_name, prompt)  # the first time: both legs; the decode caches what it loaded
            samples["repeat_via_door"].append(ttft(door, model_name, prompt))
            samples["repeat_on_decode"].append(ttft(decode, model_name, prompt))
            samples["short_via_door"].append(ttft(door, model_name, fresh(short)))
            samples["short_on_decode"].append(ttft(decode, model_name, fresh(short)))
    medians = {name: statistics.median(values) * 1000 for name, values in samples.items()}
    return {
        **{f"{name}_ms": round(value, 1) for name, value in medians.items()},
        **{f"{name}_spread_ms": [round(min(v) * 1000, 1), round(max(v) * 1000, 1)] for name, v in samples.items()},
        "repeat_over_device_hit": round(medians["repeat_via_door"] / medians["repeat_on_decode"], 2),
        "short_over_decode_direct": round(medians["short_via_door"] / medians["short_on_decode"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="selective PD: repeated and short prompts through PD")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--short", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--policies", default="kv_aware,prefix_affinity")
    args = parser.parse_args()
    model = ensure_embedded_model(PROJECT_ROOT / ".cache" / "models", BENCH_MODEL_NAME, BENCH_MODEL_CONFIG)
    policies = [policy.strip() for policy in args.policies.split(",") if policy.strip()]
    rows = {policy: run_policy(policy, model, args.tokens, args.short, args.rounds) for policy in policies}
    print(f"1P1D, {args.tokens}-token repeated prompt, {args.short}-token short prompt, medians of {args.rounds} (min-max)")
    for policy, row in rows.items():
        print(f"{policy}: repeat via door {row['repeat_via_door_ms']} ms {row['repeat_via_door_spread_ms']}, "
              f"on decode {row['repeat_on_decode_ms']} ms {row['repeat_on_decode_spread_ms']} "
              f"-> {row['repeat_over_device_hit']}x; short via door {row['short_via_door_ms']} ms "
              f"{row['short_via_door_spread_ms']}, on decode {row['short_on_decode_ms']} ms "
              f"{row['short_on_decode_spread_ms']} -> {row['short_over_decode_direct']}x")  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"tokens": args.tokens, "short": args.short, "rounds": args.rounds, "policies": rows}, indent=2) + "\n")
    print(f"written {RESULTS}")


if __name__ == "__main__":
    main()
