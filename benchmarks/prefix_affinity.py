"""Routing policies on a grouped-prefix workload: TTFT and the engines' own (device)
prefix-cache hit rate, side by side in one run; our front door's policies and vLLM's
Rust router's, on the same engines.

    .venv/bin/python -m benchmarks.prefix_affinity [--groups 8] [--per-group 4] [--prefix 1024]
        [--policies round_robin,prefix_affinity,kv_aware] [--router-policies cache_aware,round_robin]
        [--layout colocated|pd] [--prompt-form text|tokens]

For each arm it deploys (with the project's CLI) 2 PD-colocated instances (or, with
``--layout pd``, 1 prefill + 1 decode) of the ~93M-parameter benchmark model with
USING_PREFIX_CONNECTOR=0, so only each engine's own prefix cache can help, and sends
``groups x per-group`` requests in a shuffled order: each shares its group's
``--prefix``-token head and has its own 32-token tail. TTFT is the first streamed chunk
of a max_tokens=1 request; the hit rate is the engines' vllm:prefix_cache_hits / queries
over the run. Requests are sequential, so the load balance part of a policy does not
come into play. Every arm gets a fresh deployment: no arm starts with another's warm
caches.

Arms: each ``--policies`` entry is our door with ROUTING_POLICY set to it, the requests
sent to the door. Each ``--router-policies`` entry (an arm named
``vllm-router:<policy>``) is the same layout (its door, ROUTING_POLICY=round_robin, left
unused) with vllm-router (the vLLM project's router, installed by
benchmarks/frontdoor_overhead.py into .cache/bench-venvs/vllm-router; its arms are
skipped, saying why, if it cannot be) started in front of the engines named in
state.json and the requests sent to it: in its regular mode over the 2 colocated
engines, or in PD mode over the prefill and the decode engine (with one of each, its
policy has nothing to choose). An empty ``--router-policies`` runs none.

Prompts are text (``--prompt-form text``, the default): random whole-word tokens of the
served tokenizer, so every prompt has exactly its token counts and a group's prompts
share exactly their head (benchmarks/datasets.py). vllm-router routes a token-id prompt
by its length alone (its routing text is ``token_ids:<count>``, the same for every prompt
here), so ``--prompt-form tokens`` (random token ids, the form of the runs before
2026-12) is refused with router arms.

With ``kv_aware`` in PD, a request whose decode engine holds its group's head (loaded for
an earlier request of the group) skips the prefill leg (SELECTIVE_PD_TOKENS, default 256).
A ``kv_aware`` arm also reports, per engine and in all, the prompt tokens the door's KV
index predicted each engine would find cached (frontdoor_kv_predicted_cached_tokens_total)
against the local cache hits the engines reported (vllm:prompt_tokens_by_source_total
{source="local_cache_hit"}); in PD the decode's own hits on requests that took both legs
are reported but not predicted (the door predicts for the engine that computes the prompt).
Results: benchmarks/results/prefix_affinity[_pd].json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from benchmarks.datasets import GroupedPrefixWorkload, grouped_prefix_prompts
from benchmarks.deployment import deployed, exit_on_sigterm
from benchmarks.frontdoor_overhead import installed_router
from benchmarks.router_arm import arm_name, load_through
from benchmarks.ttft_tiers import Prompt, ttft
from common.config import ROUTING_POLICIES
from deploy.embedded_model import BENCH_MODEL_CONFIG, BENCH_MODEL_NAME, ensure_embedded_model
from testkit.helpers import PROJECT_ROOT, isolated_env
from testkit.metrics import metric

RESULTS = Path(__file__).resolve().parent / "results" / "prefix_affinity.json"
TAIL = 32
LAYOUTS = {"colocated": {"PREFILL_INS_NUM": "2", "DECODE_INS_NUM": "0"}, "pd": {"PREFILL_INS_NUM": "1", "DECODE_INS_NUM": "1"}}
PROMPT_FORMS = ("text", "tokens")
# vllm-router 0.1.17's --policy choices but kv_aware, which needs the engines' KV event
# endpoints (--kv-event-source), not wired here
ROUTER_POLICIES = ("random", "round_robin", "cache_aware", "power_of_two", "consistent_hash", "sticky_least_loaded")
DOOR_UNDER_ROUTER = "round_robin"  # a router arm's deployment's ROUTING_POLICY: its door gets no request


@dataclass(frozen=True)
class Arm:
    name: str  # the table's row
    routing_policy: str  # the deployment's ROUTING_POLICY (our door's)
    router_policy: str | None = None  # set: the requests go through vllm-router with this --policy, not the door


def build_arms(policies: Sequence[str], router_policies: Sequence[str]) -> list[Arm]:
    """Our door's arms (one per ``policies`` entry), then vllm-router's (one per
    ``router_policies`` entry, named vllm-router:<policy>), in the given orders."""
    return [Arm(policy, policy) for policy in policies] + [
        Arm(arm_name(policy), DOOR_UNDER_ROUTER, policy) for policy in router_policies
    ]


def _names(value: str) -> list[str]:
    return [name.strip() for name in value.split(",") if name.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="routing policies (our door's, vllm-router's) on grouped prefixes")
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--per-group", type=int, default=4)
    parser.add_argument("--prefix", type=int, default=1024, help="tokens of a group's shared head")
    parser.add_argument("--policies", default="round_robin,prefix_affinity,kv_aware",
                        help=f"our door's ROUTING_POLICY values, an arm each; from: {', '.join(ROUTING_POLICIES)}; "
                             "empty: none")  # fmt: skip
    parser.add_argument("--router-policies", default="cache_aware,round_robin",
                        help="vllm-router --policy values, an arm each (vllm-router:<policy>) on a fresh deployment; "
                             f"from: {', '.join(ROUTER_POLICIES)}; empty: none")  # fmt: skip
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="colocated")
    parser.add_argument("--prompt-form", choices=PROMPT_FORMS, default="text",
                        help="text: random whole-word tokens of the served tokenizer; tokens: random token ids "
                             "(refused with router arms)")  # fmt: skip
    args = parser.parse_args(argv)
    for name in ("groups", "per_group", "prefix"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    policies, router_policies = _names(args.policies), _names(args.router_policies)
    unknown = [policy for policy in policies if policy not in ROUTING_POLICIES]
    if unknown:
        parser.error(f"--policies: unknown routing policy {', '.join(unknown)}; choose from "
                     f"{', '.join(ROUTING_POLICIES)}")  # fmt: skip
    if "kv_aware" in router_policies:
        parser.error("--router-policies: vllm-router's kv_aware needs the engines' KV event endpoints "
                     "(--kv-event-source), which this benchmark does not wire; choose from "
                     f"{', '.join(ROUTER_POLICIES)}")  # fmt: skip
    unknown = [policy for policy in router_policies if policy not in ROUTER_POLICIES]
    if unknown:
        parser.error(f"--router-policies: unknown vllm-router policy {', '.join(unknown)}; choose from "
                     f"{', '.join(ROUTER_POLICIES)}")  # fmt: skip
    args.arms = build_arms(policies, router_policies)
    names = [arm.name for arm in args.arms]
    if not names:
        parser.error("--policies and --router-policies name no arm: give at least one policy")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        parser.error(f"arm(s) named twice: {', '.join(repeated)}")
    if router_policies and args.prompt_form == "tokens":
        parser.error("--prompt-form tokens with router arms: vllm-router routes a token-id prompt by its length "
                     "alone (the same for every prompt here); use --prompt-form text or "
                     "--router-policies ''")  # fmt: skip
    return args


def grouped_prompts(form: str, groups: int, per_group: int, prefix: int, model: Path) -> list[Prompt]:
    """``groups x per_group`` prompts, shuffled: a group's share its ``prefix``-token head,
    each has its own TAIL-token tail; the same for every arm (fixed seed)."""
    if form == "tokens":
        rng = random.Random(0)
        heads = [[rng.randrange(10, 4000) for _ in range(prefix)] for _ in range(groups)]
        prompts: list[Prompt] = [head + [rng.randrange(10, 4000) for _ in range(TAIL)] for head in heads
                                 for _ in range(per_group)]  # fmt: skip
        rng.shuffle(prompts)
        return prompts
    from transformers import AutoTokenizer

    workload = GroupedPrefixWorkload(groups, per_group, prefix, TAIL, output_tokens=1, seed=0)
    return [prompt for _, prompt in grouped_prefix_prompts(AutoTokenizer.from_pretrained(model), workload)]


def prefix_cache_counters(urls: list[str]) -> tuple[float, float]:
    hits = sum(metric(url, "vllm:prefix_cache_hits_total") for url in urls)
    return hits, sum(metric(url, "vllm:prefix_cache_queries_total") for url in urls)


def cached_tokens(door: str, engines: dict[str, str]) -> dict[str, tuple[float, float]]:
    """By engine: (prompt tokens the door's KV index predicted it would find cached, prompt
    tokens it reported as local cache hits), both counters as they stand now."""
    return {
        name: (metric(door, "frontdoor_kv_predicted_cached_tokens_total", engine=name),
               metric(url, "vllm:prompt_tokens_by_source_total", source="local_cache_hit"))
        for name, url in engines.items()
    }  # fmt: skip


def prediction(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> dict[str, object]:
    """Predicted against reported cached tokens over the run, per engine and in all."""
    per_engine = {name: {"predicted": after[name][0] - before[name][0], "reported": after[name][1] - before[name][1]}
                  for name in after}  # fmt: skip
    predicted = sum(row["predicted"] for row in per_engine.values())
    reported = sum(row["reported"] for row in per_engine.values())
    return {"per_engine": per_engine, "predicted": predicted, "reported": reported,
            "predicted_over_reported": round(predicted / reported, 3) if reported else None}  # fmt: skip


def figures(samples: Sequence[float], hits: float, queries: float) -> dict[str, float]:
    """TTFT (seconds per request) in ms, and the hit rate of the run's prefix-cache counts."""
    return {
        "ttft_ms_mean": round(statistics.mean(samples) * 1000, 1),
        "ttft_ms_p50": round(statistics.median(samples) * 1000, 1),
        "ttft_ms_p90": round(sorted(samples)[int(0.9 * len(samples))] * 1000, 1),
        "prefix_cache_hit_rate": round(hits / max(queries, 1), 3),
    }


def run_arm(arm: Arm, model: Path, prompts: list[Prompt], prefix: int, layout: str,
            router: Path | None) -> dict[str, object]:  # fmt: skip
    params = f"--enforce-eager --max-model-len {prefix + TAIL + 64}"
    tmp = Path(tempfile.mkdtemp(prefix=f"aff-{arm.name.replace(':', '-')[:20]}-", dir="/tmp"))
    env = isolated_env(
        tmp,
        MODEL_PATH=str(model),
        **LAYOUTS[layout],
        DECODE_STARTUP_PARAMS=params,
        USING_PREFIX_CONNECTOR="0",
        ROUTING_POLICY=arm.routing_policy,
        PREFILL_STARTUP_PARAMS=params,
    )
    door = f"http://127.0.0.1:{env['SERVER_PORT']}"
    kv_aware = arm.routing_policy == "kv_aware" and arm.router_policy is None
    with deployed(env) as state, load_through(router, state, tmp, arm.router_policy) as url:
        engines = {str(e["name"]): f"http://{e['host']}:{e['port']}" for e in state.engines}
        hits_before, queries_before = prefix_cache_counters(list(engines.values()))
        cached_before = cached_tokens(door, engines) if kv_aware else {}
        samples = [ttft(url, state.served_model_name, prompt) for prompt in prompts]
        hits, queries = prefix_cache_counters(list(engines.values()))
        predicted = prediction(cached_before, cached_tokens(door, engines)) if kv_aware else None
    through = f"vllm-router --policy {arm.router_policy}" if arm.router_policy else "front door"
    row: dict[str, object] = {**figures(samples, hits - hits_before, queries - queries_before),
                              "routing_policy": arm.routing_policy, "load_through": through}  # fmt: skip
    if predicted is not None:
        row["kv_index_prediction"] = predicted
    return row


def main() -> None:
    args = parse_args()
    exit_on_sigterm()
    model = ensure_embedded_model(PROJECT_ROOT / ".cache" / "models", BENCH_MODEL_NAME, BENCH_MODEL_CONFIG)
    prompts = grouped_prompts(args.prompt_form, args.groups, args.per_group, args.prefix, model)
    routed = [arm for arm in args.arms if arm.router_policy is not None]
    router, router_note = installed_router() if routed else (None, "no router arm")
    rows: dict[str, dict[str, object]] = {}
    for arm in args.arms:
        if arm.router_policy is not None and router is None:
            print(f"arm {arm.name}: skipped: {router_note}", flush=True)
            rows[arm.name] = {"skipped": router_note}
            continue
        print(f"arm {arm.name}: deploying ({args.layout}, ROUTING_POLICY={arm.routing_policy})", flush=True)
        try:
            rows[arm.name] = run_arm(arm, model, prompts, args.prefix, args.layout, router)
        except (RuntimeError, httpx.HTTPError) as exc:  # the router or a request failed: the next arms still run
            print(f"arm {arm.name}: error: {exc}", flush=True)
            rows[arm.name] = {"error": str(exc)}
    print(f"{args.layout}: {len(prompts)} requests ({args.prompt_form}): {args.groups} groups x {args.per_group}, "
          f"{args.prefix}-token shared head + {TAIL}-token tail")  # fmt: skip
    print(f"{'arm':26}{'TTFT mean ms':>14}{'p50 ms':>9}{'p90 ms':>9}{'prefix-cache hit rate':>23}")
    for name, row in rows.items():
        if "prefix_cache_hit_rate" in row:
            print(f"{name:26}{row['ttft_ms_mean']:14.1f}{row['ttft_ms_p50']:9.1f}{row['ttft_ms_p90']:9.1f}"
                  f"{row['prefix_cache_hit_rate']:23.3f}")  # fmt: skip
        else:
            what = "skipped" if "skipped" in row else "error"
            print(f"{name:26}{what}: {row[what]}")
        if isinstance(predicted := row.get("kv_index_prediction"), dict):
            print(f"{'':26}cached prompt tokens: the door's index predicted {predicted['predicted']:.0f}, "
                  f"the engines reported {predicted['reported']:.0f} as local cache hits "
                  f"(ratio {predicted['predicted_over_reported']})")  # fmt: skip
    results = RESULTS if args.layout == "colocated" else RESULTS.with_name(f"{RESULTS.stem}_{args.layout}.json")
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({"layout": args.layout, "requests": len(prompts), "groups": args.groups,
                                   "prefix_tokens": args.prefix, "tail_tokens": TAIL, "prompt_form": args.prompt_form,
                                   "vllm_router": {"note": router_note, "door_policy_under_router": DOOR_UNDER_ROUTER},
                                   "policies": rows}, indent=2) + "\n")  # fmt: skip
    print(f"written {results}")
    failed = [name for name, row in rows.items() if "error" in row]
    if failed:
        raise SystemExit(f"error: arm(s) {', '.join(failed)} failed (see 'error' in {results})")


if __name__ == "__main__":
    main()
