"""Routing policies at 16 and 64 engines, on simulated engines calibrated on this
machine's real ones (``ENGINE_KIND=simulated``, profile ``cpu-93m-float32``), colocated,
spread over simulated nodes (4 engines a node at 16, 8 at 64), everything else real.

    bash run_vllm_on_yr.sh bench sim-routing [--engines 16,64] [--workloads grouped,chat]
        [--policies kv_aware,prefix_affinity,round_robin,vllm-router:cache_aware,vllm-router:round_robin]
        [--repeats 1] [--profile cpu-93m-float32] [--results sim_routing]

Workloads (``vllm bench serve`` in its own process, 4 requests in flight per engine):
- ``grouped``: seed 000's grouped prefixes (3 groups per engine of 6 prompts, a
  1,400-token head each and 280 tokens of their own, 2 output tokens), each engine's
  KV cache holding 96 blocks (about 7 such prompts: fewer groups than are sent to it);
- ``chat``: multi-turn conversations (2 per engine, 4 turns; each turn sends the whole
  conversation so far, 200 new user tokens and a fixed 32-token answer of the turn before;
  16 output tokens), turns sent in order across conversations.

Arms: the door with each ``ROUTING_POLICY``, and vLLM's Rust router (regular mode over
the same engines) with its ``cache_aware`` and ``round_robin`` policies. Results:
benchmarks/results/<results>.json and .md (TTFT p50 and mean, req/s; medians of the
repeats with their min-max).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

from transformers import AutoTokenizer

from benchmarks.datasets import (
    GroupedPrefixWorkload,
    grouped_prefix_prompts,
    random_text,
    word_tokens,
    write_custom_jsonl,
)
from benchmarks.deployment import deployed, exit_on_sigterm
from benchmarks.frontdoor_overhead import installed_router
from benchmarks.models import add_model_options, bench_model
from benchmarks.report import Spread, markdown_table
from benchmarks.router_arm import ARM_PREFIX, load_through
from benchmarks.serve_bench import ServeResult, serve_bench
from testkit.helpers import isolated_env

RESULTS = Path(__file__).resolve().parent / "results" / "sim_routing"
POLICIES = ("kv_aware", "prefix_affinity", "round_robin", f"{ARM_PREFIX}cache_aware", f"{ARM_PREFIX}round_robin")
FIGURES = (("median_ttft_ms", "TTFT p50 ms"), ("mean_ttft_ms", "mean TTFT ms"), ("request_throughput", "req/s"))
PER_ENGINE_IN_FLIGHT = 4
CACHE_BLOCKS = 96
ENGINES_PER_NODE = {16: 4, 64: 8}
MAX_MODEL_LEN = 4096


def grouped_prompts(tokenizer: AutoTokenizer, engines: int, seed: int) -> tuple[list[str], int]:
    workload = GroupedPrefixWorkload(groups=3 * engines, per_group=6, prefix_tokens=1400, suffix_tokens=280,
                                     output_tokens=2, seed=seed)  # fmt: skip
    return [prompt for _, prompt in grouped_prefix_prompts(tokenizer, workload)], 2


def chat_prompts(tokenizer: AutoTokenizer, engines: int, seed: int, turns: int = 4) -> tuple[list[str], int]:
    """Each conversation's turns in order, conversations interleaved turn by turn."""
    rng, words = random.Random(seed), word_tokens(tokenizer)
    conversations = [random_text(words, 200, rng) for _ in range(2 * engines)]
    prompts: list[str] = []
    for _ in range(turns):
        for index, history in enumerate(conversations):
            prompts.append(history)
            conversations[index] = history + random_text(words, 32, rng) + random_text(words, 200, rng)
    return prompts, 16


WORKLOADS = {"grouped": grouped_prompts, "chat": chat_prompts}


def run_arm(engines: int, workload: str, policy: str, model: Path, profile: str, repeats: int,
            router: Path | None) -> list[ServeResult]:  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix=f"sim-routing-{engines}-{workload}-", dir="/tmp"))
    params = f"--max-model-len {MAX_MODEL_LEN} --num-gpu-blocks-override {CACHE_BLOCKS}"
    door_policy = "round_robin" if policy.startswith(ARM_PREFIX) else policy
    env = isolated_env(tmp, MODEL_PATH=str(model), ENGINE_KIND="simulated", SIM_PROFILE=profile,
                       PREFILL_INS_NUM=str(engines), DECODE_INS_NUM="0", SIMULATED_NODES=str(engines // ENGINES_PER_NODE[engines]),
                       PREFILL_STARTUP_PARAMS=params, ROUTING_POLICY=door_policy, KV_CONNECTOR="none",
                       DS_SHARED_MEMORY_MB="64", DS_SHARED_MEMORY_POPULATE="0", WARM_UP_TOKENS="128",
                       MAX_IN_FLIGHT_PER_ENGINE="64")  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(model)
    concurrency = PER_ENGINE_IN_FLIGHT * engines
    runs = []
    with deployed(env) as state, load_through(router, state, tmp, policy.removeprefix(ARM_PREFIX) if policy.startswith(ARM_PREFIX) else None) as url:  # fmt: skip
        for repeat in range(repeats):
            prompts, output = WORKLOADS[workload](tokenizer, engines, repeat)
            dataset = write_custom_jsonl(tmp / f"prompts-{repeat}.jsonl", prompts, output)
            result = serve_bench(url, state.served_model_name, model, dataset, len(prompts), concurrency, output)
            print(f"  {engines} engines {workload} {policy} run {repeat + 1}: {result.request_throughput:.2f} req/s, "
                  f"TTFT p50 {result.median_ttft_ms:.0f} ms, mean {result.mean_ttft_ms:.0f} ms, {result.failed} failed",
                  flush=True)  # fmt: skip
            runs.append(result)
    return runs


def report(results: dict[str, dict[str, dict[str, list[dict[str, float]]]]]) -> tuple[str, dict[str, object]]:
    """The table, and per engine count and workload kv_aware against the router's best policy."""
    rows, verdicts = [], {}
    for engines, workloads in results.items():
        for workload, arms in workloads.items():
            spreads = {arm: {key: Spread.of([run[key] for run in runs]) for key, _ in FIGURES} for arm, runs in arms.items()}
            for arm, figures in spreads.items():
                rows.append([engines, workload, arm, *(figures[key].cell(2) for key, _ in FIGURES)])
            routers = [arm for arm in spreads if arm.startswith(ARM_PREFIX)]
            if "kv_aware" in spreads and routers:
                best = max(routers, key=lambda arm: spreads[arm]["request_throughput"].median)
                ours, theirs = spreads["kv_aware"], spreads[best]
                verdicts[f"{engines}/{workload}"] = {
                    "router_best": best,
                    "ttft_p50_lower": round(1 - ours["median_ttft_ms"].median / theirs["median_ttft_ms"].median, 4),
                    "ttft_mean_lower": round(1 - ours["mean_ttft_ms"].median / theirs["mean_ttft_ms"].median, 4),
                    "req_s_higher": round(ours["request_throughput"].median / theirs["request_throughput"].median - 1, 4),
                }
    return markdown_table(["engines", "workload", "arm", *(title for _, title in FIGURES)], rows), verdicts


def main(argv: list[str] | None = None) -> None:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description="Routing policies at 16 and 64 simulated engines")
    add_model_options(parser)
    parser.add_argument("--engines", default="16,64")
    parser.add_argument("--workloads", default="grouped,chat")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--profile", default="cpu-93m-float32")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--results", default=RESULTS.name)
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.engines.split(",")]
    if any(n not in ENGINES_PER_NODE for n in counts):
        raise SystemExit(f"--engines {args.engines}: each must be one of {', '.join(map(str, ENGINES_PER_NODE))}")
    policies = args.policies.split(",")
    if any(p not in POLICIES for p in policies):
        raise SystemExit(f"--policies {args.policies}: each must be one of {', '.join(POLICIES)}")
    workloads = args.workloads.split(",")
    if any(w not in WORKLOADS for w in workloads):
        raise SystemExit(f"--workloads {args.workloads}: each must be one of {', '.join(WORKLOADS)}")
    bench = bench_model(args)
    router = None
    if any(p.startswith(ARM_PREFIX) for p in policies):
        router, why = installed_router()
        print(f"  {why}", flush=True)
        if router is None:
            policies = [p for p in policies if not p.startswith(ARM_PREFIX)]
    command = (f"bash run_vllm_on_yr.sh bench sim-routing --engines {args.engines} --workloads {args.workloads} "
               f"--policies {args.policies} --repeats {args.repeats} --profile {args.profile}")  # fmt: skip
    results: dict[str, dict[str, dict[str, list[dict[str, float]]]]] = {}
    table = "no arm ran"
    for engines in counts:
        for workload in workloads:
            for policy in policies:
                runs = run_arm(engines, workload, policy, bench.path, args.profile, args.repeats, router)
                results.setdefault(str(engines), {}).setdefault(workload, {})[policy] = [r.as_dict() for r in runs]
                # After every arm: a run stopped later (a timeout, SIGTERM) keeps the arms it finished.
                table = write_results(RESULTS.with_name(args.results), command, bench.name, results)
    print(table)


def write_results(stem: Path, command: str, model: str, results: dict[str, dict[str, dict[str, list[dict[str, float]]]]]) -> str:
    table, verdicts = report(results)
    stem.with_suffix(".json").write_text(json.dumps({"command": command, "model": model, "verdicts": verdicts,
                                                     "runs": results}, indent=2) + "\n")  # fmt: skip
    stem.with_suffix(".md").write_text(table + "\n")
    return table

if __name__ == "__main__":
    main()
