"""How close simulated engines come to the real ones they were calibrated on: seed 000's
and seed 002's workloads through the door, on 2 real vLLM engines and on 2 simulated
engines (``ENGINE_KIND=simulated``), side by side in one run.

    bash run_vllm_on_yr.sh bench sim-fidelity [--repeats 3] [--workloads seed000,seed002]
        [--profile cpu-93m-float32] [--model 93m] [--dtype float32]

- ``seed000``: grouped prefixes (4 groups of 4 prompts, a 1,400-token head each, 280
  tokens of their own, 2 output tokens), 4 in flight, on 2 colocated engines (vLLM's
  prefix cache, KV-aware routing, no connector);
- ``seed002``: 32 random prompts of 256 tokens, 128 output tokens, 8 in flight, on 1
  prefill + 1 decode engine (every request handed over through the data system).

The client is ``vllm bench serve`` (its own process); each repeat sends fresh prompts
after a warm-up that is not counted. Reports mean TTFT, mean TPOT and req/s: the
median of the repeats with their min-max, and the simulated figure's difference from
the real one (the issue's bar: within 15%). Results: benchmarks/results/sim_fidelity.json
and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

from transformers import AutoTokenizer

from benchmarks.datasets import GroupedPrefixWorkload, grouped_prefix_prompts, random_prompts, write_custom_jsonl
from benchmarks.deployment import deployed, exit_on_sigterm
from benchmarks.models import add_model_options, bench_model
from benchmarks.report import Spread, markdown_table
from benchmarks.serve_bench import ServeResult, serve_bench
from testkit.helpers import isolated_env

RESULTS = Path(__file__).resolve().parent / "results" / "sim_fidelity"
FIGURES = (("mean_ttft_ms", "mean TTFT ms"), ("mean_tpot_ms", "mean TPOT ms"), ("request_throughput", "req/s"))
TOLERANCE = 0.15
WARMUP_SEED = 10_000

# workload -> (deployment settings, concurrency, output tokens, max model len)
WORKLOADS: dict[str, tuple[dict[str, str], int, int, int]] = {
    "seed000": ({"PREFILL_INS_NUM": "2", "DECODE_INS_NUM": "0", "KV_CONNECTOR": "none", "ROUTING_POLICY": "kv_aware"},
                4, 2, 1400 + 280 + 2 + 64),
    "seed002": ({"PREFILL_INS_NUM": "1", "DECODE_INS_NUM": "1", "KV_CONNECTOR": "yuanrong", "USING_PREFIX_CONNECTOR": "0",
                 "ROUTING_POLICY": "prefix_affinity", "DS_SHARED_MEMORY_MB": "2048"}, 8, 128, 256 + 128 + 64),
}  # fmt: skip


def prompts_of(workload: str, tokenizer: AutoTokenizer, seed: int) -> list[str]:
    if workload == "seed000":
        grouped = GroupedPrefixWorkload(groups=4, per_group=4, prefix_tokens=1400, suffix_tokens=280, output_tokens=2, seed=seed)
        return [prompt for _, prompt in grouped_prefix_prompts(tokenizer, grouped)]
    return random_prompts(tokenizer, 32, 256, seed)


def run_arm(workload: str, kind: str, model: Path, dtype: str, profile: str, repeats: int) -> list[ServeResult]:
    settings, concurrency, output, max_len = WORKLOADS[workload]
    tmp = Path(tempfile.mkdtemp(prefix=f"sim-fidelity-{workload}-{kind}-", dir="/tmp"))
    params = f"--enforce-eager --dtype {dtype} --max-model-len {max_len}"
    sim = {"ENGINE_KIND": "simulated", "SIM_PROFILE": profile} if kind == "simulated" else {}
    env = isolated_env(tmp, MODEL_PATH=str(model), PREFILL_STARTUP_PARAMS=params, DECODE_STARTUP_PARAMS=params,
                       **settings, **sim)  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(model)
    runs: list[ServeResult] = []

    def send(name: str, prompts: list[str]) -> ServeResult:
        dataset = write_custom_jsonl(tmp / f"{name}.jsonl", prompts, output)
        return serve_bench(door, state.served_model_name, model, dataset, len(prompts), concurrency, output)

    with deployed(env) as state:
        door = f"http://127.0.0.1:{env['SERVER_PORT']}"
        send("warmup", prompts_of(workload, tokenizer, WARMUP_SEED)[:4])
        for repeat in range(repeats):
            result = send(f"run-{repeat}", prompts_of(workload, tokenizer, repeat))
            print(f"  {workload} {kind} run {repeat + 1}/{repeats}: {result.request_throughput:.3f} req/s, mean TTFT "
                  f"{result.mean_ttft_ms:.0f} ms, mean TPOT {result.mean_tpot_ms:.1f} ms, {result.failed} failed", flush=True)  # fmt: skip
            runs.append(result)
    return runs


def difference(simulated: float, real: float) -> float:
    return (simulated - real) / real if real else 0.0


def report(results: dict[str, dict[str, list[dict[str, float]]]]) -> tuple[str, dict[str, dict[str, float]]]:
    """The Markdown table, and per workload and figure the simulated median's difference from the real one."""
    rows, differences = [], {}
    for workload, kinds in results.items():
        differences[workload] = {}
        for key, title in FIGURES:
            spreads = {kind: Spread.of([run[key] for run in runs]) for kind, runs in kinds.items()}
            diff = difference(spreads["simulated"].median, spreads["real"].median)
            differences[workload][key] = round(diff, 4)
            rows.append([workload, title, spreads["real"].cell(2), spreads["simulated"].cell(2), f"{diff:+.1%}",
                         "yes" if abs(diff) <= TOLERANCE else "no"])  # fmt: skip
    table = markdown_table(["workload", "figure", "2 real engines", "2 simulated engines", "difference",
                            f"within {TOLERANCE:.0%}"], rows)  # fmt: skip
    return table, differences


def main(argv: list[str] | None = None, run: Callable[..., list[ServeResult]] = run_arm) -> None:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description="Simulated engines against the real ones they were calibrated on")
    add_model_options(parser)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--profile", default="cpu-93m-float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--results", default=RESULTS.name)
    args = parser.parse_args(argv)
    workloads = [w for w in args.workloads.split(",") if w]
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        raise SystemExit(f"--workloads {','.join(unknown)}: unknown; must be from {', '.join(WORKLOADS)}")
    bench = bench_model(args)
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    for workload in workloads:
        results[workload] = {kind: [r.as_dict() for r in run(workload, kind, bench.path, args.dtype, args.profile, args.repeats)]
                             for kind in ("real", "simulated")}  # fmt: skip
    table, differences = report(results)
    print(table)
    stem = RESULTS.with_name(args.results)
    stem.with_suffix(".json").write_text(json.dumps({
        "command": f"bash run_vllm_on_yr.sh bench sim-fidelity --repeats {args.repeats} --profile {args.profile} "
                   f"--dtype {args.dtype} --workloads {args.workloads}",
        "model": bench.name, "differences": differences, "runs": results,
        "medians": {w: {k: {key: statistics.median(r[key] for r in runs) for key, _ in FIGURES} for k, runs in kinds.items()}
                    for w, kinds in results.items()},
    }, indent=2) + "\n")  # fmt: skip
    stem.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
