"""Seed 002's comparison: xP+yD against one colocated instance on the same accelerators,
on a random-prompt serving workload, one deployment per arm, side by side in one run:

    .venv/bin/python -m benchmarks.seed002 [--prompts 32] [--input 256] [--output 128]
        [--concurrency 8] [--repeats 3] [--arms a,b,...] [--baseline colocated-1x2] [--against 1p1d]
        [--model 93m|365m | --model-path DIR]

Seed 002 measured DeepSeek-R1-Distill-Qwen-32B on 8 NPUs: 4P+4D against one TP=8
instance, ~216 input and ~214 output tokens per request. Here every arm gets the same
2 CPU cores and serves the ~93M-parameter benchmark model (eager, each engine its own
cores through ``CPU_CORES_PER_RANK``):

- ``1p1d``: 1 prefill + 1 decode instance (one core each), KV handed over through the
  data system by our connector (no prefix reuse), load through our front door;
- ``1p1d-vllm-router``: the same deployment, the load through vLLM's Rust router
  (``vllm-router`` in PD mode, ``round_robin``) in front of its prefill and decode
  engines instead of our door (skipped, saying why, if the router cannot be installed);
- ``colocated-1x2``: one colocated instance with both cores (``CPU_CORES_PER_RANK=2``),
  vanilla vLLM (``KV_CONNECTOR=none``): the seed's "TP=8" counterpart;
- ``colocated-2x1``: two colocated instances of one core each, vanilla vLLM, behind the door.

The client is ``vllm bench serve`` (its own process) on a custom JSONL of ``--prompts``
random prompts of exactly ``--input`` tokens (benchmarks/datasets.py), ``--output``
tokens each (``--ignore-eos``), at most ``--concurrency`` in flight. Each repeat uses
fresh prompts (seed ``--seed`` + repeat: the same prompts for every arm), after a
warm-up of a few prompts that is not counted. For the PD arms the engines' own counters
say whether each request took both legs: requests the prefill engine finished and prompt
tokens whose KV the decode engine loaded through the connector.

Results: benchmarks/results/seed002.json (every run, medians, spreads, settings),
seed002.md (seed 002's table: median (min-max) of the repeats per arm, and the %
difference of ``--against`` from ``--baseline`` on the medians) and plots
seed002_req_s.png and seed002_latency.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer

from benchmarks.datasets import Tokenizer, random_prompts, write_custom_jsonl
from benchmarks.deployment import deployed, exit_on_sigterm
from benchmarks.frontdoor_overhead import installed_router
from benchmarks.models import BenchModel, add_model_options, bench_model, store_mib
from benchmarks.report import Spread, bar_panels, bar_plot, markdown_table
from benchmarks.router_arm import engine_url, load_through
from benchmarks.serve_bench import ServeResult, serve_bench
from deploy.state import DeploymentState
from testkit.deployment import external_kv_tokens
from testkit.helpers import isolated_env
from testkit.metrics import metric

RESULTS = Path(__file__).resolve().parent / "results" / "seed002.json"
ROUTER_POLICY = "round_robin"  # its fastest policy in the door-overhead benchmark
WARMUP_PROMPTS = 4
WARMUP_SEED = 10_000
MAX_LEN_SLACK = 64


@dataclass(frozen=True)
class ArmSpec:
    settings: Mapping[str, str]  # the deployment's, on top of an isolated environment
    through_router: bool = False  # load through vllm-router in front of the engines, not through our door


# Every request takes both PD legs (seed 002 measures disaggregation): a policy without
# selective PD, which would send its short random prompts straight to the decode.
PD_1P1D = {"PREFILL_INS_NUM": "1", "DECODE_INS_NUM": "1", "CPU_CORES_PER_RANK": "1", "USING_PREFIX_CONNECTOR": "0",
           "KV_CONNECTOR": "yuanrong", "ROUTING_POLICY": "prefix_affinity"}  # fmt: skip
ARMS: dict[str, ArmSpec] = {
    "1p1d": ArmSpec(PD_1P1D),
    "1p1d-vllm-router": ArmSpec(PD_1P1D, through_router=True),
    "colocated-1x2": ArmSpec({"PREFILL_INS_NUM": "1", "DECODE_INS_NUM": "0", "CPU_CORES_PER_RANK": "2",
                              "USING_PREFIX_CONNECTOR": "0", "KV_CONNECTOR": "none"}),  # fmt: skip
    "colocated-2x1": ArmSpec({"PREFILL_INS_NUM": "2", "DECODE_INS_NUM": "0", "CPU_CORES_PER_RANK": "1",
                              "USING_PREFIX_CONNECTOR": "0", "KV_CONNECTOR": "none"}),  # fmt: skip
}

# (figure in ServeResult, column title, digits): seed 002's columns, in its order
TABLE_COLUMNS = (
    ("duration_s", "duration s", 2),
    ("mean_ttft_ms", "mean TTFT ms", 2),
    ("median_ttft_ms", "median TTFT ms", 2),
    ("p99_ttft_ms", "P99 TTFT ms", 2),
    ("mean_tpot_ms", "mean TPOT ms", 2),
    ("median_tpot_ms", "median TPOT ms", 2),
    ("p99_tpot_ms", "P99 TPOT ms", 2),
    ("mean_itl_ms", "mean ITL ms", 2),
    ("median_itl_ms", "median ITL ms", 2),
    ("p99_itl_ms", "P99 ITL ms", 2),
    ("request_throughput", "req/s", 2),
    ("output_throughput", "output tok/s", 2),
    ("total_token_throughput", "total tok/s", 2),
    ("request_goodput", "goodput req/s", 2),  # met SLO_TTFT_MS and SLO_ITL_MS (TPOT) at their defaults
)
REPORTED = tuple(key for key, _, _ in TABLE_COLUMNS)


@dataclass(frozen=True)
class Workload:
    prompts: int
    input_tokens: int
    output_tokens: int
    seed: int = 0


# --- the report (pure) ------------------------------------------------------------------------


def percent_difference(value: float, baseline: float) -> float | None:
    """How far ``value`` is from ``baseline``, in % of the baseline (seed 002's last row);
    None when the baseline is 0."""
    return None if baseline == 0 else (value - baseline) / baseline * 100


def arm_spreads(arms: Mapping[str, Mapping[str, object]]) -> dict[str, dict[str, Spread]]:
    """Each measured arm's figures over its runs (skipped or failed arms have none)."""
    return {
        arm: {key: Spread.of([float(run[key]) for run in figures["runs"]]) for key in REPORTED  # type: ignore[attr-defined,index]
              if all(key in run for run in figures["runs"])}  # type: ignore[attr-defined]  # (runs before goodput lack it)
        for arm, figures in arms.items()
        if figures.get("runs")
    }


def difference_row(spreads: Mapping[str, Mapping[str, Spread]], against: str, baseline: str) -> list[str]:
    """``% difference`` cells: each column's median of ``against`` from ``baseline``'s, signed
    (``-17.61%``: less; for duration and latencies, better)."""
    cells = [f"% difference ({against} vs {baseline})"]
    for key, _, _ in TABLE_COLUMNS:
        if key not in spreads[against] or key not in spreads[baseline]:
            cells.append("-")
            continue
        change = percent_difference(spreads[against][key].median, spreads[baseline][key].median)
        cells.append("-" if change is None else f"{change:+.2f}%")
    return cells


def report_table(arms: Mapping[str, Mapping[str, object]], against: str, baseline: str) -> str:
    """Seed 002's table: one row per measured arm, each cell the median of its runs
    (min-max), then the % difference row when both compared arms were measured."""
    spreads = arm_spreads(arms)
    rows = [[arm] + [spreads[arm][key].cell(digits) if key in spreads[arm] else "-" for key, _, digits in TABLE_COLUMNS]
            for arm in spreads]  # fmt: skip
    if against in spreads and baseline in spreads:
        rows.append(difference_row(spreads, against, baseline))
    return markdown_table(["arm"] + [title for _, title, _ in TABLE_COLUMNS], rows)


def write_report(arms: Mapping[str, Mapping[str, object]], stem: Path, against: str, baseline: str) -> list[Path]:
    """``<stem>.md`` (``report_table``, then a line per skipped or failed arm and per arm
    with failed requests), ``<stem>_req_s.png`` (req/s per arm) and ``<stem>_latency.png``
    (mean TTFT and mean TPOT per arm): bars at the medians with min-max ranges."""
    spreads = arm_spreads(arms)
    notes = [f"- {arm}: {what}: {figures[what]}" for arm, figures in arms.items() for what in ("skipped", "error")
             if what in figures]  # fmt: skip
    notes += [f"- {arm}: {figures['failed_requests']} failed request(s)" for arm, figures in arms.items()
              if figures.get("failed_requests")]  # fmt: skip
    table = stem.with_suffix(".md")
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text(report_table(arms, against, baseline) + ("\n" + "\n".join(notes) + "\n" if notes else ""))
    if not spreads:
        return [table]
    latency = {
        "mean TTFT": ("ms", {arm: figures["mean_ttft_ms"] for arm, figures in spreads.items()}),
        "mean TPOT": ("ms", {arm: figures["mean_tpot_ms"] for arm, figures in spreads.items()}),
    }
    return [
        table,
        bar_plot(stem.with_name(f"{stem.name}_req_s.png"), "Seed 002 workload: throughput", "req/s",
                 {arm: figures["request_throughput"] for arm, figures in spreads.items()}),
        bar_panels(stem.with_name(f"{stem.name}_latency.png"), "Seed 002 workload: latency", latency),
    ]  # fmt: skip


# --- the arms ---------------------------------------------------------------------------------


def store_mb(workload: Workload, repeats: int, per_token: int) -> int:
    """Data system shared memory for every prompt's KV of a run (the TTL outlives it), with
    room to spare, in MiB (``per_token``: KV bytes per token): a full store refuses saves
    and the decode would recompute."""
    tokens = (workload.prompts * repeats + WARMUP_PROMPTS) * (workload.input_tokens + MAX_LEN_SLACK)
    return store_mib(tokens, per_token, 512)


def legs_counters(state: DeploymentState) -> dict[str, float]:
    """PD only: requests the prefill engine finished, prompt tokens whose KV the decode
    engine loaded through the connector (the engines' own Prometheus counters)."""
    prefill, decode = engine_url(state.engines, "prefill"), engine_url(state.engines, "decode")
    return {
        "prefill_requests_finished": metric(prefill, "vllm:request_success_total"),
        "decode_kv_tokens_loaded": external_kv_tokens(decode),
    }


def warm_up(url: str, state: DeploymentState, model: Path, tokenizer: Tokenizer, workload: Workload,
            concurrency: int, tmp: Path) -> None:  # fmt: skip
    """A few requests, not counted: the first requests of fresh engines (and of a fresh
    router's connections) are slower; their prompts (another seed) are not the runs'."""
    prompts = random_prompts(tokenizer, WARMUP_PROMPTS, workload.input_tokens, WARMUP_SEED)
    dataset = write_custom_jsonl(tmp / "warmup.jsonl", prompts, workload.output_tokens)
    serve_bench(url, state.served_model_name, model, dataset, len(prompts), concurrency, workload.output_tokens)


def measured_runs(url: str, state: DeploymentState, model: Path, tokenizer: Tokenizer, workload: Workload,
                  repeats: int, concurrency: int, arm: str, tmp: Path) -> list[ServeResult]:  # fmt: skip
    """``repeats`` runs, each of fresh prompts (seed + repeat: the same for every arm)."""
    runs = []
    for repeat in range(repeats):
        prompts = random_prompts(tokenizer, workload.prompts, workload.input_tokens, workload.seed + repeat)
        dataset = write_custom_jsonl(tmp / f"prompts-{repeat}.jsonl", prompts, workload.output_tokens)
        result = serve_bench(url, state.served_model_name, model, dataset, len(prompts), concurrency,
                             workload.output_tokens)  # fmt: skip
        print(f"  {arm} run {repeat + 1}/{repeats}: {result.duration_s:.1f} s, {result.request_throughput:.2f} req/s, "
              f"mean TTFT {result.mean_ttft_ms:.0f} ms, mean TPOT {result.mean_tpot_ms:.1f} ms, "
              f"mean ITL {result.mean_itl_ms:.1f} ms, {result.failed} failed", flush=True)  # fmt: skip
        runs.append(result)
    return runs


def run_arm(arm: str, bench: BenchModel, workload: Workload, repeats: int, concurrency: int,
            router: Path | None) -> dict[str, object]:  # fmt: skip
    spec = ARMS[arm]
    tmp = Path(tempfile.mkdtemp(prefix=f"seed002-{arm}-", dir="/tmp"))
    params = f"--enforce-eager --max-model-len {workload.input_tokens + workload.output_tokens + MAX_LEN_SLACK}"
    model = bench.path
    env = isolated_env(tmp, MODEL_PATH=str(model), PREFILL_STARTUP_PARAMS=params, DECODE_STARTUP_PARAMS=params,
                       DS_SHARED_MEMORY_MB=str(store_mb(workload, repeats, bench.kv_bytes_per_token)), **spec.settings)  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(model)
    pd = spec.settings["DECODE_INS_NUM"] != "0"
    with deployed(env) as state, load_through(router, state, tmp, ROUTER_POLICY if spec.through_router else None) as url:
        warm_up(url, state, model, tokenizer, workload, concurrency, tmp)
        before = legs_counters(state) if pd else {}
        runs = measured_runs(url, state, model, tokenizer, workload, repeats, concurrency, arm, tmp)
        after = legs_counters(state) if pd else {}
    legs = {key: round(after[key] - before[key]) for key in before}
    if legs:
        sent = workload.prompts * repeats
        print(f"  {arm}: {sent} requests sent; the prefill engine finished {legs['prefill_requests_finished']}, the "
              f"decode engine loaded {legs['decode_kv_tokens_loaded']} prompt tokens' KV "
              f"(of {sent * workload.input_tokens} sent)", flush=True)  # fmt: skip
    return {
        "settings": {**spec.settings, "PREFILL_STARTUP_PARAMS": params, "DECODE_STARTUP_PARAMS": params,
                     "DS_SHARED_MEMORY_MB": env["DS_SHARED_MEMORY_MB"]},
        "load_through": f"vllm-router {ROUTER_POLICY}" if spec.through_router else "front door",
        "runs": [run.as_dict() for run in runs],
        "median": {key: round(Spread.of([getattr(run, key) for run in runs]).median, 2) for key in REPORTED},
        "spread": {key: [round(min(getattr(r, key) for r in runs), 2), round(max(getattr(r, key) for r in runs), 2)]
                   for key in REPORTED},  # fmt: skip
        "failed_requests": sum(run.failed for run in runs),
        "pd_legs": legs or None,
    }


# --- the run ----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Seed 002: xP+yD against colocated on the same cores, random prompts")
    parser.add_argument("--prompts", type=int, default=32, help="prompts per run")
    parser.add_argument("--input", type=int, default=256, help="tokens per prompt (exact, in the served tokenizer)")
    parser.add_argument("--output", type=int, default=128, help="output tokens per request (EOS ignored)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at most")
    parser.add_argument("--repeats", type=int, default=3, help="runs per arm, each with fresh prompts")
    parser.add_argument("--seed", type=int, default=0, help="first run's prompts' seed (+1 per repeat)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from: {', '.join(ARMS)}")
    parser.add_argument("--baseline", default="colocated-1x2", help="the %% difference row's reference arm")
    parser.add_argument("--against", default="1p1d", help="the arm the %% difference row compares to --baseline")
    add_model_options(parser)
    args = parser.parse_args(argv)
    for name in ("prompts", "input", "output", "concurrency", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    args.arms = [arm.strip() for arm in args.arms.split(",") if arm.strip()]
    if not args.arms:
        parser.error(f"--arms must name at least one arm, from: {', '.join(ARMS)}")
    unknown = [arm for arm in [*args.arms, args.baseline, args.against] if arm not in ARMS]
    if unknown:
        parser.error(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    return args


def print_table(arms: Mapping[str, Mapping[str, object]], against: str, baseline: str) -> None:
    print()
    print(report_table(arms, against, baseline), end="")
    for arm, figures in arms.items():
        for what in ("skipped", "error"):
            if what in figures:
                print(f"{arm}: {what}: {figures[what]}")
    if against not in arm_spreads(arms) or baseline not in arm_spreads(arms):
        print(f"no % difference row: {against} and {baseline} were not both measured")


def main() -> None:
    args = parse_args()
    exit_on_sigterm()
    workload = Workload(args.prompts, args.input, args.output, args.seed)
    model = bench_model(args)
    routed = [arm for arm in args.arms if ARMS[arm].through_router]
    router, router_note = installed_router() if routed else (None, "not run")
    results: dict[str, object] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"nproc": len(os.sched_getaffinity(0)), "load_average_before": [round(x, 2) for x in os.getloadavg()]},
        "model": {"name": model.name, "path": str(model.path), "config": model.config},
        "workload": workload.__dict__, "warmup_prompts": WARMUP_PROMPTS, "concurrency": args.concurrency,
        "repeats": args.repeats, "baseline": args.baseline, "against": args.against,
        "vllm_router": {"policy": ROUTER_POLICY, "note": router_note},
        "arms": {},
    }  # fmt: skip
    arms: dict[str, dict[str, object]] = results["arms"]  # type: ignore[assignment]
    for arm in args.arms:
        if ARMS[arm].through_router and router is None:
            print(f"arm {arm}: skipped: {router_note}", flush=True)
            arms[arm] = {"settings": dict(ARMS[arm].settings), "skipped": router_note}
            continue
        print(f"arm {arm}: deploying", flush=True)
        try:
            arms[arm] = run_arm(arm, model, workload, args.repeats, args.concurrency, router)
        except RuntimeError as exc:  # the load failed (vllm bench serve, the router): the next arms still run
            print(f"arm {arm}: error: {exc}", flush=True)
            arms[arm] = {"settings": dict(ARMS[arm].settings), "error": str(exc)}
    spreads = arm_spreads(arms)
    if args.against in spreads and args.baseline in spreads:
        results["difference_pct"] = {
            key: _rounded(percent_difference(spreads[args.against][key].median, spreads[args.baseline][key].median))
            for key in REPORTED
        }
    results["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]  # type: ignore[index]
    print_table(arms, args.against, args.baseline)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    for written in write_report(arms, RESULTS.with_suffix(""), args.against, args.baseline):
        print(f"written {written}")
    print(f"written {RESULTS}")
    failed = [arm for arm, figures in arms.items() if "error" in figures]
    if failed:
        raise SystemExit(f"error: arm(s) {', '.join(failed)} failed (see 'error' in {RESULTS})")


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


if __name__ == "__main__":
    main()
