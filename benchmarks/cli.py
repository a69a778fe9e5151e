"""``bash run_vllm_on_yr.sh bench <experiment> [options]``: one command per experiment.

Each experiment is a module of this folder with its own options (``--help``); it deploys
what its arms need with the project's CLI, cleans up, and writes its results (JSON, and
for the serving experiments a Markdown table and PNG plots) to benchmarks/results/.
"""

from __future__ import annotations

import runpy
import sys

# name -> (module, what it measures)
EXPERIMENTS: dict[str, tuple[str, str]] = {
    "seed000": ("benchmarks.seed000", "seed 000: grouped-prefix prompts through the door, PD and colocated arms"),
    "seed002": ("benchmarks.seed002", "seed 002: 1P1D (door, vllm-router) against colocated on the same cores, random prompts"),
    "seed003": ("benchmarks.ttft_tiers", "seed 003: TTFT cold / device-cache hit / data system hit, same and other worker"),
    "pd-handoff": ("benchmarks.pd_handoff", "a cold PD request leg by leg against the prefill engine alone"),
    "connector-io": ("benchmarks.connector_io", "connector save/load GB/s against the raw data system and ExampleConnector"),
    "checksum-cost": ("benchmarks.checksum_cost", "what checking a loaded KV block's checksum costs, against its copy"),
    "load-floor": ("benchmarks.load_floor", "a checked load's copies alone, without the store: one thread and the helper's threads"),
    "cuda-staging": ("benchmarks.cuda_staging", "CUDA save/load GB/s against a pinned copy (needs a GPU)"),
    "door-overhead": ("benchmarks.frontdoor_overhead", "latency the front door adds, on stand-in engines"),
    "prefix-affinity": ("benchmarks.prefix_affinity", "routing policies (round robin, prefix affinity, KV-aware) on grouped prefixes"),
    "selective-pd": ("benchmarks.selective_pd", "repeated and short prompts through PD against one engine directly"),
    "kv-index-scale": ("benchmarks.kv_index_scale", "the door's KV index with 256 engines and 1M blocks: decision time, memory"),
    "soak": ("benchmarks.soak", "concurrent streaming clients for a set time: errors, latency, memory"),
    "sdk-gil": ("benchmarks.sdk_gil", "whether a data system SDK call holds the GIL while it waits"),
    "calibrate": ("benchmarks.calibrate", "fit a simulated engine's cost profile to a real engine on this machine"),
    "sim-fidelity": ("benchmarks.sim_fidelity", "seed 000's and 002's workloads on 2 real engines and on 2 simulated ones"),
    "sim-routing": ("benchmarks.sim_routing", "routing policies (ours, vllm-router's) at 16 and 64 simulated engines"),
    "adaptive-roles": ("benchmarks.adaptive_roles", "goodput of ROLES=adaptive against colocated and 1P1D on four workloads"),
    "adaptive-ramp": ("benchmarks.adaptive_ramp", "the role planner under a 0.2x -> 1.5x -> 0.5x load ramp, 8-32 simulated engines"),
    "sim-scale": ("benchmarks.sim_scale", "the door at 256 simulated engines; scaling 8 -> 64 -> 8 under load"),
}


def usage() -> str:
    width = max(map(len, EXPERIMENTS))
    lines = [f"  {name:<{width}}  {what}" for name, (_, what) in EXPERIMENTS.items()]
    return "usage: bash run_vllm_on_yr.sh bench <experiment> [options]\nexperiments:\n" + "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, options = argv[0], argv[1:]
    if name not in EXPERIMENTS:
        print(f"error: unknown experiment '{name}': must be one of {', '.join(EXPERIMENTS)}", file=sys.stderr)
        return 2
    module = EXPERIMENTS[name][0]
    sys.argv = [f"bench {name}", *options]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
