"""The KV handoff of a cold PD request, measured against the parties it is made of:

1. TTFT of the prefill engine alone (a fresh prompt sent to it directly, streamed);
2. cold PD TTFT through the front door (a fresh prompt; the door runs both legs);
3. the handoff leg by leg (a fresh prompt; the client sends the prefill leg, then at
   once the decode leg with the returned kv_transfer_params): prefill leg, the
   prefill's publication after its end, the decode's wait for the blocks, the load
   (one batched get + copies into the paged cache), the decode leg;
4. the same decode leg again 5 s later (the decode's prefix cache reset first), so the
   blocks are long published: the "later" load;
5. the raw data system: a second client reading and copying the same number of bytes
   one client just published (get_read_only_buffers + one copy per block).

Before any of these, right after the deploy reported ready, the first ``--first``
requests: cold PD through the door, each with a fresh prompt of the first ``--tokens``
length, against the prefill engine alone in steady state (the median of 1.). After them,
one more prefill and one more decode are added (``scale prefill +1``, ``scale decode
+1``; on 2 cores they share cores with the idle engines) and the first ``--first`` cold PD
requests of the new pair are sent leg by leg (the door's prefix-affinity hash, not the
benchmark, would choose which pair takes a request), against the same steady figure and
against the new prefill engine's own (the median of ``--rounds`` fresh prompts after them).

    .venv/bin/python -m benchmarks.pd_handoff [--tokens 2048 4096] [--rounds 3] [--first 3]
        [--dtype float32]

Deploys 1P1D with the project's CLI: the ~93M random-weight Qwen2 (12 layers, 1.5 MiB
of KV per 128-token block in bf16; ``--dtype`` overrides), eager mode, one core per engine, the door, the
data system worker; the client is this process. Medians over ``--rounds`` fresh
prompts; every sample is kept in benchmarks/results/pd_handoff.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import torch

from benchmarks.deployment import deployed
from deploy.embedded_model import BENCH_MODEL_CONFIG, BENCH_MODEL_NAME, ensure_embedded_model
from deploy.state import DeploymentState
from testkit.helpers import PROJECT_ROOT, free_port, isolated_env, run_cli
from testkit.metrics import metric

RESULTS = Path(__file__).resolve().parent / "results" / "pd_handoff.json"
BLOCK_TOKENS = 128
STATS_FLUSH_S = 11  # engines publish connector stats every 10 s


def stream_ttft(url: str, body: dict[str, Any]) -> float:
    started = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                return time.perf_counter() - started
    raise RuntimeError("no token streamed")


def post(url: str, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=600)
    response.raise_for_status()
    return time.perf_counter() - started, response.json()


def op_seconds(url: str, op: str) -> float:
    return metric(url, "vllm:yuanrong_kv_op_seconds_sum", op=op)


def raw_read(address: str, blocks: int, block_bytes: int, rounds: int) -> list[float]:
    """Seconds for a second client to get + copy ``blocks`` values one client just published."""
    from yr.datasystem import KVClient

    host, port = address.rsplit(":", 1)
    writer, reader = KVClient(host, int(port)), KVClient(host, int(port))
    writer.init()
    reader.init()
    target = torch.empty((blocks, block_bytes), dtype=torch.uint8)
    samples = []
    for _ in range(rounds):
        keys = [f"bench-raw-{uuid.uuid4().hex}" for _ in range(blocks)]
        buffers = writer.mcreate(keys, [block_bytes] * blocks, ttl_second=60)
        for buffer in buffers:
            buffer.MutableData()[:] = b"\x01" * block_bytes
        writer.mset_buffer(buffers)
        started = time.perf_counter()
        views = reader.get_read_only_buffers(keys)
        sources = [torch.frombuffer(view.immutable_data(), dtype=torch.uint8) for view in views]
        torch._foreach_copy_(list(target.unbind(0)), sources)
        samples.append(time.perf_counter() - started)
        del views, sources
        writer.delete(keys)
    return samples


def measure(urls: dict[str, str], model: str, tokens: int, rounds: int, rng: random.Random) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in (
        "prefill_alone_ttft", "pd_door_ttft", "prefill_leg", "publish_after_prefill", "decode_wait",
        "load_fresh", "decode_leg_fresh", "load_later", "decode_leg_later")}  # fmt: skip
    prefill, decode = urls["prefill"], urls["decode"]
    for _ in range(rounds):
        body = {"model": model, "max_tokens": 1, "temperature": 0}
        samples["prefill_alone_ttft"].append(stream_ttft(prefill, {**body, "prompt": fresh(rng, tokens)}))
        samples["pd_door_ttft"].append(stream_ttft(urls["door"], {**body, "max_tokens": 2, "prompt": fresh(rng, tokens)}))
        prompt = fresh(rng, tokens)
        before = {op: op_seconds(url, op) for op, url in (("publish", prefill), ("handoff_wait", decode), ("load", decode))}
        leg, answer = post(prefill, {**body, "prompt": prompt, "kv_transfer_params": {"do_remote_decode": True}})
        params = answer["kv_transfer_params"]
        decode_body = {**body, "max_tokens": 2, "prompt": prompt, "kv_transfer_params": params}
        samples["prefill_leg"].append(leg)
        samples["decode_leg_fresh"].append(post(decode, decode_body)[0])
        time.sleep(STATS_FLUSH_S)
        samples["publish_after_prefill"].append(op_seconds(prefill, "publish") - before["publish"])
        samples["decode_wait"].append(op_seconds(decode, "handoff_wait") - before["handoff_wait"])
        samples["load_fresh"].append(op_seconds(decode, "load") - before["load"])
        httpx.post(f"{decode}/reset_prefix_cache", timeout=30).raise_for_status()
        before_later = op_seconds(decode, "load")
        samples["decode_leg_later"].append(post(decode, decode_body)[0])
        time.sleep(STATS_FLUSH_S)
        samples["load_later"].append(op_seconds(decode, "load") - before_later)
    return samples


def pd_by_legs_ttft(prefill: str, decode: str, body: dict[str, Any], prompt: list[int]) -> float:
    """Cold PD TTFT with the legs sent by hand: the prefill leg, then the decode leg's first token."""
    leg, answer = post(prefill, {**body, "max_tokens": 1, "prompt": prompt, "kv_transfer_params": {"do_remote_decode": True}})
    return leg + stream_ttft(decode, {**body, "max_tokens": 2, "prompt": prompt, "kv_transfer_params": answer["kv_transfer_params"]})


def scaled_out_pair(env: dict[str, str], state: DeploymentState) -> tuple[dict[str, str], float]:
    """``scale prefill +1`` and ``scale decode +1``: the new pair's URLs by role, and the seconds both commands took."""
    started = time.perf_counter()
    for role in ("prefill", "decode"):
        result = run_cli("scale", env, role, "+1", timeout=900)
        if result.returncode != 0:
            raise SystemExit(f"scale {role} +1 failed: {result.stdout}{result.stderr}")
    seconds = time.perf_counter() - started
    now = DeploymentState.read(Path(env["RUN_DIR"]) / "state.json")
    before = {engine["name"] for engine in state.engines}
    added = [engine for engine in (now.engines if now is not None else []) if engine["name"] not in before]
    return {engine["role"]: f"http://{engine['host']}:{engine['port']}" for engine in added}, seconds


def fresh(rng: random.Random, tokens: int) -> list[int]:
    return [rng.randrange(10, 4000) for _ in range(tokens)]


def main() -> None:
    parser = argparse.ArgumentParser(description="cold PD handoff against its parts")
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"the result's JSON (default {RESULTS})")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--first", type=int, default=3, help="cold PD requests measured right after the deploy")
    parser.add_argument("--dtype", default=None, help="the engines' --dtype (default: the model's, bfloat16)")
    parser.add_argument("--warm-up-tokens", default=None, help="WARM_UP_TOKENS of the deployment (default: its default)")
    args = parser.parse_args()
    model_path = ensure_embedded_model(PROJECT_ROOT / ".cache" / "models", BENCH_MODEL_NAME, BENCH_MODEL_CONFIG)
    params = f"--enforce-eager --max-model-len {max(args.tokens) + 256}" + (f" --dtype {args.dtype}" if args.dtype else "")
    env = isolated_env(
        Path(tempfile.mkdtemp(prefix="pd-handoff-", dir="/tmp")),
        MODEL_PATH=str(model_path),
        PREFILL_STARTUP_PARAMS=params,
        DECODE_STARTUP_PARAMS=params,
        DS_SHARED_MEMORY_MB="4096",  # every prompt is saved: ~20 of 4K tokens in float32 (96 MiB each) per run
        VLLM_SERVER_DEV_MODE="1",  # engines expose /reset_prefix_cache
        SERVER_PORT=str(free_port()),
        ROUTING_POLICY="prefix_affinity",  # every request takes both legs: the handoff is what is measured
        **({"WARM_UP_TOKENS": args.warm_up_tokens} if args.warm_up_tokens is not None else {}),
    )
    results: dict[str, Any] = {"model": BENCH_MODEL_NAME, "dtype": args.dtype or "bfloat16", "rounds": args.rounds,
                               "warm_up_tokens": args.warm_up_tokens or "default", "by_prompt_tokens": {}}  # fmt: skip
    rng = random.Random(0)
    deploy_started = time.perf_counter()
    with deployed(env) as state:
        results["deploy_s"] = round(time.perf_counter() - deploy_started, 1)
        urls = {e["role"]: f"http://{e['host']}:{e['port']}" for e in state.engines}
        urls["door"] = f"http://127.0.0.1:{env['SERVER_PORT']}"
        model = state.served_model_name
        first_tokens = args.tokens[0]
        first = [stream_ttft(urls["door"], {"model": model, "max_tokens": 2, "temperature": 0, "prompt": fresh(rng, first_tokens)})
                 for _ in range(args.first)]  # fmt: skip
        for url in (urls["prefill"], urls["door"]):  # warm-up: a fresh engine's first long prompt is slow
            stream_ttft(url, {"model": model, "max_tokens": 2, "prompt": fresh(rng, 256)})
        block_bytes = 12 * 2 * 4 * 64 * BLOCK_TOKENS * (4 if args.dtype in ("float32", "float") else 2)
        for tokens in args.tokens:
            samples = measure(urls, model, tokens, args.rounds, rng)
            blocks = tokens // BLOCK_TOKENS
            samples["raw_get_copy"] = raw_read(env["DS_WORKER_ADDRESS"], blocks, block_bytes, args.rounds)
            medians = {name: statistics.median(values) for name, values in samples.items()}
            results["by_prompt_tokens"][str(tokens)] = {
                "blocks_handed_over": blocks,
                "median_ms": {name: round(v * 1000, 1) for name, v in medians.items()},
                "samples_ms": {name: [round(v * 1000, 1) for v in values] for name, values in samples.items()},
                "pd_ttft_over_prefill_alone": round(medians["pd_door_ttft"] / medians["prefill_alone_ttft"], 3),
                "fresh_load_over_later_load": round(medians["load_fresh"] / medians["load_later"], 2),
                "fresh_load_over_raw": round(medians["load_fresh"] / medians["raw_get_copy"], 2),
            }
            report(tokens, results["by_prompt_tokens"][str(tokens)])
        scaled: list[float] = []
        if args.first:
            pair, scale_s = scaled_out_pair(env, state)
            body = {"model": model, "temperature": 0}
            scaled = [pd_by_legs_ttft(pair["prefill"], pair["decode"], body, fresh(rng, first_tokens)) for _ in range(args.first)]
            # The new pair's own steady state: on 2 cores it shares cores with the idle engines.
            pair_alone = statistics.median(stream_ttft(pair["prefill"], {**body, "max_tokens": 1, "prompt": fresh(rng, first_tokens)})
                                           for _ in range(args.rounds))  # fmt: skip
            pair_pd = statistics.median(pd_by_legs_ttft(pair["prefill"], pair["decode"], body, fresh(rng, first_tokens))
                                        for _ in range(args.rounds))  # fmt: skip
        if first:
            alone = results["by_prompt_tokens"][str(first_tokens)]["median_ms"]["prefill_alone_ttft"]
            results["first_after_deploy"] = {
                "prompt_tokens": first_tokens, "pd_door_ttft_ms": [round(v * 1000, 1) for v in first],
                "over_prefill_alone_steady": [round(v * 1000 / alone, 3) for v in first],
            }  # fmt: skip
            results["first_after_scale_out"] = {
                "prompt_tokens": first_tokens, "scale_s": round(scale_s, 1), "pd_by_legs_ttft_ms": [round(v * 1000, 1) for v in scaled],
                "over_prefill_alone_steady": [round(v * 1000 / alone, 3) for v in scaled],
                "new_prefill_alone_steady_ms": round(pair_alone * 1000, 1), "new_pair_pd_steady_ms": round(pair_pd * 1000, 1),
                "over_new_prefill_alone_steady": [round(v / pair_alone, 3) for v in scaled],
            }  # fmt: skip
            print(f"\nfirst {len(first)} cold PD requests after the deploy ({first_tokens} tokens; deploy took "
                  f"{results['deploy_s']} s): {results['first_after_deploy']['pd_door_ttft_ms']} ms, "
                  f"{results['first_after_deploy']['over_prefill_alone_steady']}x the prefill engine alone "
                  f"in steady state ({alone} ms)")  # fmt: skip
            print(f"first {len(scaled)} cold PD requests of the scaled-out pair (scale prefill +1, decode +1 took "
                  f"{results['first_after_scale_out']['scale_s']} s): {results['first_after_scale_out']['pd_by_legs_ttft_ms']} ms, "
                  f"{results['first_after_scale_out']['over_prefill_alone_steady']}x the first prefill engine alone, "
                  f"{results['first_after_scale_out']['over_new_prefill_alone_steady']}x the new one alone in steady state "
                  f"({results['first_after_scale_out']['new_prefill_alone_steady_ms']} ms; the new pair's PD "
                  f"{results['first_after_scale_out']['new_pair_pd_steady_ms']} ms)")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {args.out}")


def report(tokens: int, result: dict[str, Any]) -> None:
    print(f"\n{tokens}-token prompt, {result['blocks_handed_over']} blocks handed over (medians, ms; samples in the JSON)")
    for name, value in result["median_ms"].items():
        print(f"  {name:24}{value:10.1f}   {result['samples_ms'][name]}")
    for name in ("pd_ttft_over_prefill_alone", "fresh_load_over_later_load", "fresh_load_over_raw"):
        print(f"  {name:30}{result[name]}")


if __name__ == "__main__":
    main()
