"""Routing policies on a grouped-prefix workload: TTFT and the engines' own (device)
prefix-cache hit rate, side by side in one run.

    .venv/bin/python -m benchmarks.prefix_affinity [--groups 8] [--per-group 4] [--prefix 1024]
        [--policies round_robin,prefix_affinity,kv_aware] [--layout colocated|pd]

For each policy it deploys (with the project's CLI) 2 PD-colocated instances (or, with
``--layout pd``, 1 prefill + 1 decode) of the ~93M-parameter benchmark model with
USING_PREFIX_CONNECTOR=0, so only each engine's own prefix cache can help, and sends
through the front door ``groups x per-group``
requests in a shuffled order: each shares its group's ``--prefix``-token head and has
its own 32-token tail. TTFT is the first streamed chunk of a max_tokens=1 request;
the hit rate is the engines' vllm:prefix_cache_hits / queries over the run. Requests
are sequential, so the load balance part of the policy does not come into play.
With ``kv_aware`` in PD, a request whose decode engine holds its group's head (loaded for
an earlier request of the group) skips the prefill leg (SELECTIVE_PD_TOKENS, default 256).
Results: benchmarks/results/prefix_affinity[_pd].json.
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
from tests.e2e import metric
from tests.helpers import PROJECT_ROOT, isolated_env

RESULTS = Path(__file__).resolve().parent / "results" / "prefix_affinity.json"
TAIL = 32


def prefix_cache_counters(urls: list[str]) -> tuple[float, float]:
    hits = sum(metric(url, "vllm:prefix_cache_hits_total") for url in urls)
    return hits, sum(metric(url, "vllm:prefix_cache_queries_total") for url in urls)


LAYOUTS = {"colocated": {"PREFILL_INS_NUM": "2", "DECODE_INS_NUM": "0"}, "pd": {"PREFILL_INS_NUM": "1", "DECODE_INS_NUM": "1"}}


def run_policy(policy: str, model: Path, prompts: list[list[int]], prefix: int, layout: str) -> dict[str, float]:
    params = f"--enforce-eager --max-model-len {prefix + TAIL + 64}"
    env = isolated_env(
        Path(tempfile.mkdtemp(prefix=f"aff-{policy[:5]}-", dir="/tmp")),
        MODEL_PATH=str(model),
        **LAYOUTS[layout],
        DECODE_STARTUP_PARAMS=params,
        USING_PREFIX_CONNECTOR="0",
        ROUTING_POLICY=policy,
        PREFILL_STARTUP_PARAMS=params,
    )
    with deployed(env) as state:
        engines = [f"http://{e['host']}:{e['port']}" for e in state.engines]
        door = f"http://127.0.0.1:{env['SERVER_PORT']}"
        hits_before, queries_before = prefix_cache_counters(engines)
        samples = [ttft(door, state.served_model_name, prompt) for prompt in prompts]
        hits, queries = prefix_cache_counters(engines)
    return {
        "ttft_ms_mean": round(statistics.mean(samples) * 1000, 1),
        "ttft_ms_p50": round(statistics.median(samples) * 1000, 1),
        "ttft_ms_p90": round(sorted(samples)[int(0.9 * len(samples))] * 1000, 1),
        "prefix_cache_hit_rate": round((hits - hits_before) / max(queries - queries_before, 1), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="prefix affinity vs round robin")
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--per-group", type=int, default=4)
    parser.add_argument("--prefix", type=int, default=1024)
    parser.add_argument("--policies", default="round_robin,prefix_affinity,kv_aware")
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="colocated")
    args = parser.parse_args()
    model = ensure_embedded_model(PROJECT_ROOT / ".cache" / "models", BENCH_MODEL_NAME, BENCH_MODEL_CONFIG)
    rng = random.Random(0)
    heads = [[rng.randrange(10, 4000) for _ in range(args.prefix)] for _ in range(args.groups)]
    prompts = [head + [rng.randrange(10, 4000) for _ in range(TAIL)] for head in heads for _ in range(args.per_group)]
    rng.shuffle(prompts)
    policies = [policy.strip() for policy in args.policies.split(",") if policy.strip()]
    rows = {policy: run_policy(policy, model, prompts, args.prefix, args.layout) for policy in policies}
    print(f"{args.layout}: {len(prompts)} requests: {args.groups} groups x {args.per_group}, {args.prefix}-token shared head + {TAIL}-token tail")
    print(f"{'policy':18}{'TTFT mean ms':>14}{'p50 ms':>9}{'p90 ms':>9}{'prefix-cache hit rate':>23}")
    for policy, row in rows.items():
        print(f"{policy:18}{row['ttft_ms_mean']:14.1f}{row['ttft_ms_p50']:9.1f}{row['ttft_ms_p90']:9.1f}{row['prefix_cache_hit_rate']:23.3f}")
    results = RESULTS if args.layout == "colocated" else RESULTS.with_name(f"{RESULTS.stem}_{args.layout}.json")
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({"layout": args.layout, "requests": len(prompts), "groups": args.groups,
                                   "prefix_tokens": args.prefix, "tail_tokens": TAIL, "policies": rows}, indent=2) + "\n")  # fmt: skip
    print(f"written {results}")


if __name__ == "__main__":
    main()
