"""Roles that follow the load: goodput of an adaptive pool against the fixed layouts on
the same 2 cores, side by side in one run:

    .venv/bin/python -m benchmarks.adaptive_roles [--repeats 3] [--arms colocated,1p1d,adaptive]
        [--workloads seed000,seed002,long,switching] [--slo-ttft-ms 2000] [--slo-itl-ms 100]

Arms (two one-core engines each, the ~93M benchmark model, the deployment's defaults: our
connector, no prefix reuse through the store, KV-aware routing): ``colocated`` (2 colocated
engines), ``1p1d`` (1 prefill + 1 decode), ``adaptive`` (ROLES=adaptive, starting all
colocated; the role planner judges 10 s windows, a new layout serving 15 s before it is
judged). Only the roles differ.

Workloads, each through ``vllm bench serve`` (its own process) with ``--goodput``:
``seed000`` (grouped 1,400-token prefixes with 280-token tails, 2 tokens out, 4 in flight),
``seed002`` (256 random tokens in, 128 out, 8 in flight), ``long`` (2,048 in, 256 out, 4 in
flight); each steady one is first served unmeasured (``--settle-prompts`` x, so the
planner can settle), then measured; ``switching`` is seed000 -> long -> seed000 -> long,
half a steady run's prompts each, measured whole (goodput: answers meeting both levels
over the time of all phases).

One deployment per arm and repeat serves every workload in turn. Results:
benchmarks/results/adaptive_roles.json (every run, the adaptive arm's planner decisions),
adaptive_roles.md (goodput, req/s, latency per workload and arm: median (min-max) of the
repeats; adaptive's goodput against the best and the worst fixed arm) and
adaptive_roles_goodput.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from transformers import AutoTokenizer

from benchmarks.datasets import (
    GroupedPrefixWorkload,
    Tokenizer,
    grouped_prefix_prompts,
    random_prompts,
    write_custom_jsonl,
)
from benchmarks.deployment import deployed, exit_on_sigterm
from benchmarks.models import add_model_options, bench_model, store_mib
from benchmarks.report import Spread, bar_panels, markdown_table
from benchmarks.serve_bench import ServeResult, serve_bench
from common.config import SloConfig
from testkit.helpers import isolated_env

RESULTS = Path(__file__).resolve().parent / "results" / "adaptive_roles.json"
COMMON = {"USING_PREFIX_CONNECTOR": "0", "CPU_CORES_PER_RANK": "1", "ROUTING_POLICY": "kv_aware",
          "PLANNER_WINDOW_S": "10", "PLANNER_SETTLE_S": "15"}  # fmt: skip
ARMS: dict[str, dict[str, str]] = {
    "colocated": {"PREFILL_INS_NUM": "2", "DECODE_INS_NUM": "0"},
    "1p1d": {"PREFILL_INS_NUM": "1", "DECODE_INS_NUM": "1"},
    "adaptive": {"PREFILL_INS_NUM": "2", "DECODE_INS_NUM": "0", "ROLES": "adaptive"},
}
MAX_MODEL_LEN = 2048 + 256 + 64


@dataclass(frozen=True)
class Phase:
    """One ``vllm bench serve`` run: ``prompts`` of a kind, ``output`` tokens each."""

    kind: str  # grouped | random
    prompts: int
    input_tokens: int  # random: each prompt's; grouped: the prefix's (tails of 280)
    output: int
    concurrency: int


WORKLOADS: dict[str, Phase] = {
    "seed000": Phase("grouped", 72, 1400, 2, 4),
    "seed002": Phase("random", 64, 256, 128, 8),
    "long": Phase("random", 16, 2048, 256, 4),
}
SWITCHING = ("seed000", "long", "seed000", "long")
SWITCHING_SCALE = 0.5  # each switching phase serves half a steady run's prompts


def prompts_of(phase: Phase, tokenizer: Tokenizer, seed: int, scale: float = 1.0) -> list[str]:
    count = max(4, round(phase.prompts * scale))
    if phase.kind == "grouped":
        groups = max(1, count // 6)
        workload = GroupedPrefixWorkload(groups, 6, phase.input_tokens, 280, phase.output, seed)
        return [prompt for _, prompt in grouped_prefix_prompts(tokenizer, workload)]
    return random_prompts(tokenizer, count, phase.input_tokens, seed)


def run_phase(url: str, model: str, tokenizer_path: Path, tokenizer: Tokenizer, phase: Phase, seed: int, tmp: Path,
              slo: SloConfig, scale: float = 1.0) -> ServeResult:  # fmt: skip
    prompts = prompts_of(phase, tokenizer, seed, scale)
    dataset = write_custom_jsonl(tmp / f"prompts-{seed}.jsonl", prompts, phase.output)
    return serve_bench(url, model, tokenizer_path, dataset, len(prompts), phase.concurrency, phase.output, slo)


def combined(results: Sequence[ServeResult]) -> dict[str, float]:
    """Phases served one after another, as one run: totals over the summed time."""
    duration = sum(r.duration_s for r in results)
    good = sum(r.request_goodput * r.duration_s for r in results)
    done = sum(r.completed for r in results)
    return {"duration_s": round(duration, 2), "completed": done, "failed": sum(r.failed for r in results),
            "request_throughput": done / duration, "request_goodput": good / duration,
            "mean_ttft_ms": sum(r.mean_ttft_ms * r.completed for r in results) / max(done, 1),
            "mean_tpot_ms": sum(r.mean_tpot_ms * r.completed for r in results) / max(done, 1)}  # fmt: skip


def store_mb(workloads: Sequence[str], settle_prompts: float, kv_bytes_per_token: int) -> int:
    """Data system shared memory for every prompt's KV a deployment's run may hand over
    (``store_mib``): with the default 2 GiB, seed 000's 1,680-token prompts (22 MB each for
    the 93M model in float32) filled the store within the first workload, and every later
    handoff was skipped ("full: skipping saves") and computed by the decode engine after 2 s."""
    tokens = 0.0
    for name in workloads:
        phases = [(WORKLOADS[kind], SWITCHING_SCALE) for kind in SWITCHING] if name == "switching" else \
            [(WORKLOADS[name], 1.0 + settle_prompts)]  # fmt: skip
        for phase, scale in phases:
            prompt = phase.input_tokens + (280 if phase.kind == "grouped" else 0)
            tokens += max(4, round(phase.prompts * scale)) * prompt
    return store_mib(tokens, kv_bytes_per_token, 2048)


def run_arm(arm: str, repeat: int, workloads: Sequence[str], model_path: Path, slo: SloConfig,
            settle_prompts: float, kv_bytes_per_token: int) -> dict[str, object]:  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix=f"adaptive-{arm}-", dir="/tmp"))
    params = f"--enforce-eager --max-model-len {MAX_MODEL_LEN}"
    env = isolated_env(tmp, MODEL_PATH=str(model_path), PREFILL_STARTUP_PARAMS=params, DECODE_STARTUP_PARAMS=params,
                       SLO_TTFT_MS=f"{slo.ttft_ms:g}", SLO_ITL_MS=f"{slo.itl_ms:g}", DS_SHARED_MEMORY_POPULATE="0",
                       DS_SHARED_MEMORY_MB=str(store_mb(workloads, settle_prompts, kv_bytes_per_token)),
                       **COMMON, **ARMS[arm])  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    runs: dict[str, object] = {}
    with deployed(env) as state:
        url, model = f"http://127.0.0.1:{env['SERVER_PORT']}", state.served_model_name
        seed = 1000 * (repeat + 1)
        for name in workloads:
            if name == "switching":
                results = [run_phase(url, model, model_path, tokenizer, WORKLOADS[kind], seed + index, tmp, slo,
                                     SWITCHING_SCALE) for index, kind in enumerate(SWITCHING)]  # fmt: skip
                runs[name] = {**combined(results), "phases": [r.as_dict() for r in results]}
            else:
                run_phase(url, model, model_path, tokenizer, WORKLOADS[name], seed + 500, tmp, slo, settle_prompts)
                runs[name] = run_phase(url, model, model_path, tokenizer, WORKLOADS[name], seed, tmp, slo).as_dict()
            seed += 10
            figures = runs[name]
            print(f"  {arm} repeat {repeat + 1} {name}: goodput {figures['request_goodput']:.2f} req/s of "  # type: ignore[index]
                  f"{figures['request_throughput']:.2f}, mean TTFT {figures['mean_ttft_ms']:.0f} ms, "  # type: ignore[index]
                  f"mean TPOT {figures['mean_tpot_ms']:.1f} ms, {figures['failed']} failed", flush=True)  # type: ignore[index]  # fmt: skip
        decisions = httpx.get(f"{url}/admin/roles", timeout=30).json().get("decisions", []) if "ROLES" in ARMS[arm] else []
    return {"runs": runs, "decisions": decisions}


# --- the report (pure) ------------------------------------------------------------------------

TABLE_COLUMNS = (("request_goodput", "goodput req/s", 2), ("request_throughput", "req/s", 2),
                 ("mean_ttft_ms", "mean TTFT ms", 0), ("mean_tpot_ms", "mean TPOT ms", 1))  # fmt: skip


def spreads(repeats: Sequence[Mapping[str, Mapping[str, Mapping[str, float]]]], arm: str,
            workload: str) -> dict[str, Spread] | None:  # fmt: skip
    """An arm's figures on a workload over the repeats (None: never measured)."""
    runs = [repeat[arm][workload] for repeat in repeats if workload in repeat.get(arm, {})]
    if not runs:
        return None
    return {key: Spread.of([float(run[key]) for run in runs]) for key, _, _ in TABLE_COLUMNS}


def report_table(repeats: Sequence[Mapping[str, Mapping[str, Mapping[str, float]]]], arms: Sequence[str],
                 workloads: Sequence[str]) -> str:  # fmt: skip
    """One row per workload and arm; for adaptive, its goodput against the best and the
    worst fixed arm (medians)."""
    rows = []
    for workload in workloads:
        measured = {arm: s for arm in arms if (s := spreads(repeats, arm, workload)) is not None}
        fixed = {arm: s["request_goodput"].median for arm, s in measured.items() if arm != "adaptive"}
        for arm, figures in measured.items():
            against = "-"
            if arm == "adaptive" and fixed and min(fixed.values()) > 0:
                best, worst = max(fixed, key=fixed.__getitem__), min(fixed, key=fixed.__getitem__)
                goodput = figures["request_goodput"].median
                against = f"{goodput / fixed[best]:.2f}x {best}, {goodput / fixed[worst]:.2f}x {worst}"
            rows.append([workload, arm, *(figures[key].cell(digits) for key, _, digits in TABLE_COLUMNS), against])
    header = ["workload", "arm", *(title for _, title, _ in TABLE_COLUMNS), "adaptive's goodput vs fixed"]
    return markdown_table(header, rows)


def write_report(results: Mapping[str, object], stem: Path) -> list[Path]:
    repeats = results["repeats"]  # type: ignore[index]
    arms, workloads = results["arms"], results["workloads"]  # type: ignore[index]
    table = stem.with_suffix(".md")
    slo = results["slo"]  # type: ignore[index]
    table.write_text(f"Service levels: TTFT <= {slo['ttft_ms']:g} ms, TPOT <= {slo['itl_ms']:g} ms "  # type: ignore[index]
                     f"(`vllm bench serve --goodput`).\n\n" + report_table(repeats, arms, workloads))  # type: ignore[arg-type]  # fmt: skip
    panels = {workload: ("goodput req/s", {arm: s["request_goodput"] for arm in arms  # type: ignore[union-attr]
                                           if (s := spreads(repeats, arm, workload)) is not None})  # type: ignore[arg-type]
              for workload in workloads}  # type: ignore[union-attr]  # fmt: skip
    plot = bar_panels(stem.with_name(f"{stem.name}_goodput.png"), "Goodput on 2 cores: fixed roles and adaptive", panels)
    return [table, plot]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench adaptive-roles", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--workloads", default="seed000,seed002,long,switching")
    parser.add_argument("--slo-ttft-ms", type=float, default=SloConfig().ttft_ms)
    parser.add_argument("--slo-itl-ms", type=float, default=SloConfig().itl_ms)
    parser.add_argument("--settle-prompts", type=float, default=0.5, help="unmeasured prompts before each steady workload, "
                        "as a share of its measured ones")  # fmt: skip
    parser.add_argument("--results", type=Path, default=RESULTS)
    add_model_options(parser)
    args = parser.parse_args(argv)
    arms, workloads = args.arms.split(","), args.workloads.split(",")
    for arm in arms:
        if arm not in ARMS:
            raise SystemExit(f"--arms: unknown arm {arm!r}: must be among {', '.join(ARMS)}")
    for workload in workloads:
        if workload not in (*WORKLOADS, "switching"):
            raise SystemExit(f"--workloads: unknown workload {workload!r}: must be among {', '.join(WORKLOADS)}, switching")
    exit_on_sigterm()
    slo = SloConfig(ttft_ms=args.slo_ttft_ms, itl_ms=args.slo_itl_ms)
    model = bench_model(args)
    results: dict[str, object] = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "model": model.name,
                                  "slo": {"ttft_ms": slo.ttft_ms, "itl_ms": slo.itl_ms}, "arms": arms,
                                  "workloads": workloads, "settings": {**COMMON, "arms": ARMS}, "repeats": [],
                                  "decisions": []}  # fmt: skip
    for repeat in range(args.repeats):  # arms interleaved: a slow moment of the machine hits every arm alike
        figures, decisions = {}, {}
        for arm in arms:
            print(f"repeat {repeat + 1}/{args.repeats}: {arm}", flush=True)
            outcome = run_arm(arm, repeat, workloads, model.path, slo, args.settle_prompts, model.kv_bytes_per_token)
            figures[arm], decisions[arm] = outcome["runs"], outcome["decisions"]
        results["repeats"].append(figures)  # type: ignore[attr-defined]
        results["decisions"].append(decisions)  # type: ignore[attr-defined]
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(results, indent=2) + "\n")
        for written in write_report(results, args.results.with_suffix("")):
            print(f"written {written}", flush=True)


if __name__ == "__main__":
    main()
