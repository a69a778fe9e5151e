"""How close simulated engines come to the real ones they were calibrated on: seed 000's
and seed 002's workloads through the door, on 2 real vLLM engines and on 2 simulated
engines (``ENGINE_KIND=simulated``), side by side in one run.

    bash run_vllm_on_yr.sh bench sim-fidelity [--repeats 3] [--workloads seed000,seed002]
        [--profile cpu-93m-float32] [--model 93m] [--dtype float32] [--report JSON]

- ``seed000``: grouped prefixes (4 groups of 4 prompts, a 1,400-token head each, 280
  tokens of their own, 2 output tokens), 4 in flight, on 2 colocated engines (vLLM's
  prefix cache, KV-aware routing, no connector);
- ``seed002``: 32 random prompts of 256 tokens, 128 output tokens, 8 in flight, on 1
  prefill + 1 decode engine (every request handed over through the data system).

The client is ``vllm bench serve`` (its own process); each repeat sends fresh prompts
after a warm-up that is not counted. Reports mean TTFT, mean TPOT and req/s pooled over
the repeats (all their requests together; the issue's bar: the simulated figure within
15% of the real one), beside each repeat's median and min-max and the difference of the
medians. ``--report JSON`` writes the table again from the runs a results file holds.
Results: benchmarks/results/sim_fidelity.json and .md.
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


def pooled(runs: list[dict[str, float]], key: str) -> float:
    """``key`` over all the repeats' requests together: a mean weighted by each repeat's
    completed requests, req/s as all completed over all durations. Seed 000's TPOT is
    one gap per request (2 output tokens) and bimodal (~60 ms, or a whole prefill step
    when another prompt's prefill shares the step), so the median of 3 repeats is one
    repeat's draw; the pooled mean is the mean over all the requests (48 for 3 repeats)."""
    if key == "request_throughput":
        return sum(run["completed"] for run in runs) / sum(run["duration_s"] for run in runs)
    return sum(run[key] * run["completed"] for run in runs) / sum(run["completed"] for run in runs)


def report(results: dict[str, dict[str, list[dict[str, float]]]]) -> tuple[str, dict[str, dict[str, float]]]:
    """The Markdown table, and per workload and figure the simulated figure's difference
    from the real one, pooled over the repeats (the bar), and of the repeats' medians."""
    rows, differences = [], {}
    for workload, kinds in results.items():
        differences[workload] = {}
        for key, title in FIGURES:
            spreads = {kind: Spread.of([run[key] for run in runs]) for kind, runs in kinds.items()}
            means = {kind: pooled(runs, key) for kind, runs in kinds.items()}
            diff = difference(means["simulated"], means["real"])
            of_medians = difference(spreads["simulated"].median, spreads["real"].median)
            differences[workload][key] = round(diff, 4)
            differences[workload][f"{key}_of_medians"] = round(of_medians, 4)
            rows.append([workload, title, f"{means['real']:.2f}", spreads["real"].cell(2), f"{means['simulated']:.2f}",
                         spreads["simulated"].cell(2), f"{diff:+.1%}", "yes" if abs(diff) <= TOLERANCE else "no",
                         f"{of_medians:+.1%}"])  # fmt: skip
    table = markdown_table(["workload", "figure", "real, pooled", "real, median (min-max) of repeats", "simulated, pooled",
                            "simulated, median (min-max)", "difference", f"within {TOLERANCE:.0%}",
                            "difference of medians"], rows)  # fmt: skip
    return table, differences


def write_results(stem: Path, command: str, model: str, results: dict[str, dict[str, list[dict[str, float]]]]) -> str:
    table, differences = report(results)
    stem.with_suffix(".json").write_text(json.dumps({
        "command": command, "model": model, "differences": differences, "runs": results,
        "pooled": {w: {k: {key: pooled(runs, key) for key, _ in FIGURES} for k, runs in kinds.items()}
                   for w, kinds in results.items()},
        "medians": {w: {k: {key: statistics.median(r[key] for r in runs) for key, _ in FIGURES} for k, runs in kinds.items()}
                    for w, kinds in results.items()},
    }, indent=2) + "\n")  # fmt: skip
    stem.with_suffix(".md").write_text(table + "\n")
    return table


def main(argv: list[str] | None = None, run: Callable[..., list[ServeResult]] = run_arm) -> None:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description="Simulated engines against the real ones they were calibrated on")
    add_model_options(parser)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--profile", default="cpu-93m-float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--results", default=RESULTS.name)
    parser.add_argument("--report", default=None, metavar="JSON",
                        help="no run: the table again from the runs a results JSON holds (written back beside it)")
    args = parser.parse_args(argv)
    if args.report is not None:
        saved = json.loads(Path(args.report).read_text())
        print(write_results(Path(args.report), saved["command"], saved["model"], saved["runs"]))
        return
    workloads = [w for w in args.workloads.split(",") if w]
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        raise SystemExit(f"--workloads {','.join(unknown)}: unknown; must be from {', '.join(WORKLOADS)}")
    bench = bench_model(args)
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    for workload in workloads:
        results[workload] = {kind: [r.as_dict() for r in run(workload, kind, bench.path, args.dtype, args.profile, args.repeats)]
                             for kind in ("real", "simulated")}  # fmt: skip
    command = (f"bash run_vllm_on_yr.sh bench sim-fidelity --repeats {args.repeats} --profile {args.profile} "
               f"--dtype {args.dtype} --workloads {args.workloads}")  # fmt: skip
    print(write_results(RESULTS.with_name(args.results), command, bench.name, results))


if __name__ == "__main__":
    main()
