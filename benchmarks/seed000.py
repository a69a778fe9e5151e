"""Seed 000's workload (grouped prefixes, short outputs) through the front door, one
deployment per arm, side by side in one run:

    .venv/bin/python -m benchmarks.seed000 [--repeats 3] [--groups 6] [--per-group 6]
        [--prefix 1400] [--suffix 280] [--output 2] [--concurrency 4] [--arms a,b,...]
        [--results seed000] [--model 93m|365m | --model-path DIR]

Arms (each deployed by the project's CLI on this machine's cores, then cleaned):
- ``vanilla``: 2 vLLM instances with no KV connector at all (``KV_CONNECTOR=none``);
- ``colocated``: 2 PD-colocated instances, our connector loaded but no prefix reuse
  (vLLM's own prefix cache only);
- ``colocated+reuse``: the same with ``USING_PREFIX_CONNECTOR=1`` (prefixes through the
  data system, across instances);
- ``1p1d+reuse``: 1 prefill + 1 decode instance, KV handed over and prefixes reused
  through the data system;
- ``1p1d``: the same without prefix reuse (handoff only);
- ``1p1d-example``: 1P1D with vLLM's own ExampleConnector (KV through files) instead of
  ours, behind the same front door;
- ``colocated-rr`` and ``colocated+reuse-rr``: ``colocated`` and ``colocated+reuse``
  with ``ROUTING_POLICY=round_robin``, so that a group's prompts land on both instances
  and a prefix computed on one is reused (or not) on the other;
- ``colocated-kv`` and ``colocated+reuse-kv``: the same with ``ROUTING_POLICY=kv_aware``
  (with reuse, an engine that would load the prefix from the data system is credited);
- ``colocated-vllm-router-ca`` and ``colocated-vllm-router-rr``: the ``colocated``
  deployment with the load sent through vLLM's Rust router (benchmarks/router_arm.py,
  regular mode over the two engines) instead of our door, with its ``cache_aware`` (its
  default) or ``round_robin`` policy; ``colocated+reuse-vllm-router-ca``: the same over
  ``colocated+reuse``; skipped, saying why, if the router cannot be installed.

The client is ``vllm bench serve`` (its own process) on a custom JSONL of
``groups x per-group`` prompts (benchmarks/datasets.py); each repeat uses fresh
prompts (another seed), so no run starts with a warm cache, after a warm-up of 4
prompts that is not counted. Store calls that failed
or timed out are counted from the engines' logs. Results:
benchmarks/results/seed000.json, a Markdown table (seed000.md) and plots
(seed000_req_s.png, seed000_ttft.png): medians of the repeats with their min-max;
``--results NAME`` writes NAME.json, NAME.md and NAME_*.png instead.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
from pathlib import Path

from transformers import AutoTokenizer

from benchmarks.datasets import GroupedPrefixWorkload, grouped_prefix_prompts, write_custom_jsonl
from benchmarks.deployment import deployed, exit_on_sigterm
from benchmarks.frontdoor_overhead import installed_router
from benchmarks.models import BenchModel, add_model_options, bench_model
from benchmarks.report import Spread, bar_plot, markdown_table
from benchmarks.router_arm import load_through
from benchmarks.serve_bench import ServeResult, serve_bench
from testkit.helpers import isolated_env

RESULTS = Path(__file__).resolve().parent / "results" / "seed000.json"


def _arm(prefill: int, decode: int, reuse: bool, policy: str, **extra: str) -> dict[str, str]:
    return {"PREFILL_INS_NUM": str(prefill), "DECODE_INS_NUM": str(decode), "USING_PREFIX_CONNECTOR": str(int(reuse)),
            "ROUTING_POLICY": policy, **extra}  # fmt: skip


# Arms without a -kv or -rr suffix route by prefix affinity (the default before kv_aware),
# so that their figures compare with the runs before it became the default.
PA = "prefix_affinity"
ARMS: dict[str, dict[str, str]] = {
    "vanilla": _arm(2, 0, False, PA, KV_CONNECTOR="none"),
    "colocated": _arm(2, 0, False, PA),
    "colocated+reuse": _arm(2, 0, True, PA),
    "1p1d+reuse": _arm(1, 1, True, PA),
    "1p1d": _arm(1, 1, False, PA),
    "1p1d-example": _arm(1, 1, False, PA, KV_CONNECTOR="ExampleConnector"),
    # A group's prompts spread over both instances: a prefix one instance computed is
    # computed again by the other, unless the data system hands it over.
    "colocated-rr": _arm(2, 0, False, "round_robin"),
    "colocated+reuse-rr": _arm(2, 0, True, "round_robin"),
    # KV-aware routing: device hits, prefixes the data system holds, and load, weighed.
    "colocated-kv": _arm(2, 0, False, "kv_aware"),
    "colocated+reuse-kv": _arm(2, 0, True, "kv_aware"),
}
# Arms whose load goes through vllm-router, by (the arm whose deployment they use, the router's policy).
ROUTER_ARMS: dict[str, tuple[str, str]] = {
    "colocated-vllm-router-ca": ("colocated", "cache_aware"),
    "colocated-vllm-router-rr": ("colocated", "round_robin"),
    "colocated+reuse-vllm-router-ca": ("colocated+reuse", "cache_aware"),
}
DEFAULT_ARMS = ("vanilla", "colocated", "colocated+reuse", "1p1d+reuse", "1p1d")
# A store call that failed or was not answered in time (the connector logs these at
# WARNING with the store's address; a late answer is logged at most every few seconds).
STORE_FAILURE = re.compile(r"\[store=[^\]]+\] [^:]*(?: failed|: no answer within|helper lost)")
WARMUP_SEED = 10_000
STORE_MB = 4096  # the ~93M model's KV for every prompt of 3 runs, with room; scaled by KV bytes per token
BASE_KV_BYTES_PER_TOKEN = 12 * 1024
REPORTED = ("request_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "total_token_throughput",
            "request_goodput")


def store_failures(sessions_dir: Path) -> int:
    logs = {log.resolve() for log in sessions_dir.glob("*/log/*.log")}  # "latest" links to a session
    return sum(len(STORE_FAILURE.findall(log.read_text(errors="replace"))) for log in logs)


def run_arm(arm: str, bench: BenchModel, workload: GroupedPrefixWorkload, repeats: int, concurrency: int,
            router: Path | None = None) -> dict[str, object]:  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix=f"seed000-{arm.replace('+', '-')}-", dir="/tmp"))
    max_len = workload.prefix_tokens + workload.suffix_tokens + workload.output_tokens + 64
    params = f"--enforce-eager --max-model-len {max_len}"
    # Shared memory for every block of every run (~20 MiB per 1.7K-token prompt of this
    # model): a full store refuses saves, and prefix reuse would then measure nothing.
    model = bench.path
    store_mb = max(STORE_MB, STORE_MB * bench.kv_bytes_per_token // BASE_KV_BYTES_PER_TOKEN)
    env = isolated_env(tmp, MODEL_PATH=str(model), PREFILL_STARTUP_PARAMS=params, DECODE_STARTUP_PARAMS=params,
                       DS_SHARED_MEMORY_MB=str(store_mb), **ARMS[ROUTER_ARMS[arm][0] if arm in ROUTER_ARMS else arm])  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(model)
    runs: list[ServeResult] = []
    policy = ROUTER_ARMS[arm][1] if arm in ROUTER_ARMS else None
    with deployed(env) as state, load_through(router, state, tmp, policy) as door:
        # Warm-up, not counted: the first requests of a fresh engine are slower; its
        # prompts (another seed) share nothing with the measured ones.
        warmup = GroupedPrefixWorkload(**{**workload.__dict__, "groups": 2, "per_group": 2, "seed": WARMUP_SEED})
        prompts = [prompt for _, prompt in grouped_prefix_prompts(tokenizer, warmup)]
        serve_bench(door, state.served_model_name, model, write_custom_jsonl(tmp / "warmup.jsonl", prompts, workload.output_tokens),
                    len(prompts), concurrency, workload.output_tokens)  # fmt: skip
        for repeat in range(repeats):
            fresh = GroupedPrefixWorkload(**{**workload.__dict__, "seed": workload.seed + repeat})
            prompts = [prompt for _, prompt in grouped_prefix_prompts(tokenizer, fresh)]
            dataset = write_custom_jsonl(tmp / f"prompts-{repeat}.jsonl", prompts, workload.output_tokens)
            result = serve_bench(door, state.served_model_name, model, dataset, len(prompts), concurrency, workload.output_tokens)
            print(f"  {arm} run {repeat + 1}: {result.request_throughput:.2f} req/s, mean TTFT {result.mean_ttft_ms:.0f} ms, "
                  f"P99 TTFT {result.p99_ttft_ms:.0f} ms, {result.failed} failed", flush=True)  # fmt: skip
            runs.append(result)
        failures = store_failures(Path(env["YR_SESSIONS_DIR"]))
    return {
        "runs": [run.as_dict() for run in runs],
        "median": {key: round(statistics.median(getattr(run, key) for run in runs), 2) for key in REPORTED},
        "spread": {key: [round(min(getattr(r, key) for r in runs), 2), round(max(getattr(r, key) for r in runs), 2)] for key in REPORTED},
        "failed_requests": sum(run.failed for run in runs),
        "store_call_failures": failures,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="Seed 000's grouped-prefix workload, one deployment per arm")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--groups", type=int, default=6)
    parser.add_argument("--per-group", type=int, default=6)
    parser.add_argument("--prefix", type=int, default=1400)
    parser.add_argument("--suffix", type=int, default=280)
    parser.add_argument("--output", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--arms", default=",".join(DEFAULT_ARMS), help=f"comma-separated, from: {', '.join(ARMS)}")
    add_model_options(parser)
    parser.add_argument("--results", default=RESULTS.stem, help="name of the result files in benchmarks/results")
    args = parser.parse_args()
    exit_on_sigterm()  # a SIGTERM cleans the arm's deployment like Ctrl-C
    if not re.fullmatch(r"[A-Za-z0-9_-]+", args.results):
        raise SystemExit(f"--results {args.results!r}: must be a plain name (letters, digits, _ and -)")
    results_path = RESULTS.with_name(f"{args.results}.json")
    arms = [arm.strip() for arm in args.arms.split(",") if arm.strip()]
    unknown = [arm for arm in arms if arm not in ARMS and arm not in ROUTER_ARMS]
    if unknown:
        raise SystemExit(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join([*ARMS, *ROUTER_ARMS])}")
    router, router_note = installed_router() if any(arm in ROUTER_ARMS for arm in arms) else (None, "no router arm")
    workload = GroupedPrefixWorkload(args.groups, args.per_group, args.prefix, args.suffix, args.output)
    model = bench_model(args)
    results: dict[str, object] = {"workload": workload.__dict__, "concurrency": args.concurrency, "repeats": args.repeats,
                                  "model": {"name": model.name, "path": str(model.path)}, "arms": {}}  # fmt: skip
    results["vllm_router"] = router_note
    for arm in arms:
        if arm in ROUTER_ARMS and router is None:
            print(f"arm {arm}: skipped: {router_note}", flush=True)
            continue
        print(f"arm {arm}: deploying", flush=True)
        results["arms"][arm] = run_arm(arm, model, workload, args.repeats, args.concurrency, router)  # type: ignore[index]
    print(f"\n{'arm':<18}{'req/s':>8}{'mean TTFT ms':>14}{'P99 TTFT ms':>13}{'store failures':>16}")
    for arm, figures in results["arms"].items():  # type: ignore[union-attr]
        median = figures["median"]
        print(f"{arm:<18}{median['request_throughput']:>8.2f}{median['mean_ttft_ms']:>14.0f}{median['p99_ttft_ms']:>13.0f}"
              f"{figures['store_call_failures']:>16}")  # fmt: skip
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(results, indent=2) + "\n")
    for written in write_report(results["arms"], results_path.with_suffix("")):  # type: ignore[arg-type]
        print(f"written {written}")
    print(f"written {results_path}")


# (figure in ServeResult, column title, digits)
TABLE_COLUMNS = (
    ("request_throughput", "req/s", 2),
    ("mean_ttft_ms", "mean TTFT ms", 0),
    ("median_ttft_ms", "median TTFT ms", 0),
    ("p99_ttft_ms", "P99 TTFT ms", 0),
    ("mean_tpot_ms", "mean TPOT ms", 1),
    ("output_throughput", "output tok/s", 1),
    ("total_token_throughput", "total tok/s", 0),
    ("request_goodput", "goodput req/s", 2),  # met SLO_TTFT_MS and SLO_ITL_MS (TPOT) at their defaults
)


def write_report(arms: dict[str, dict[str, object]], stem: Path) -> list[Path]:
    """``<stem>.md``: one row per arm, each figure the median of its runs (min-max);
    ``<stem>_req_s.png`` and ``<stem>_ttft.png``: the same as bars with ranges."""
    spreads = {
        arm: {key: Spread.of([run[key] for run in figures["runs"]]) for key, _, _ in TABLE_COLUMNS  # type: ignore[index,union-attr]
              if all(key in run for run in figures["runs"])}  # type: ignore[union-attr]  # (runs before goodput lack it)
        for arm, figures in arms.items()
    }
    rows = [[arm] + [spreads[arm][key].cell(digits) if key in spreads[arm] else "-" for key, _, digits in TABLE_COLUMNS]
            + [str(arms[arm]["failed_requests"]), str(arms[arm]["store_call_failures"])] for arm in arms]  # fmt: skip
    header = ["arm"] + [title for _, title, _ in TABLE_COLUMNS] + ["failed requests", "store calls failed or late"]
    table = stem.with_suffix(".md")
    table.write_text(markdown_table(header, rows))
    return [
        table,
        bar_plot(stem.with_name(f"{stem.name}_req_s.png"), "Seed 000 workload: throughput", "req/s",
                 {arm: spreads[arm]["request_throughput"] for arm in arms}),
        bar_plot(stem.with_name(f"{stem.name}_ttft.png"), "Seed 000 workload: mean TTFT", "ms",
                 {arm: spreads[arm]["mean_ttft_ms"] for arm in arms}),
    ]  # fmt: skip


if __name__ == "__main__":
    main()
