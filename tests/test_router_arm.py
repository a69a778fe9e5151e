"""vllm-router as an arm in front of a deployment's engines (benchmarks/router_arm.py), no
deployment: its command lines in regular and PD mode, the engines it is pointed at from
state.json, and the arms and prompts of the prefix-affinity benchmark."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from benchmarks.frontdoor_overhead import ROUTER_VENV, router_argv, router_argv_regular
from benchmarks.prefix_affinity import TAIL, grouped_prompts, parse_args
from benchmarks.router_arm import engine_url, load_through, router_argv_for
from deploy.embedded_model import ensure_embedded_model
from deploy.state import DeploymentState
from testkit.helpers import PROJECT_ROOT

ROUTER = Path("/venv/bin/vllm-router")
COLOCATED = [
    {"name": "colocated-0", "role": "colocated", "host": "10.0.0.5", "port": 8101, "state": "healthy"},
    {"name": "colocated-1", "role": "colocated", "host": "10.0.0.6", "port": 8102, "state": "healthy"},
]
PD = [
    {"name": "prefill-0", "role": "prefill", "host": "10.0.0.5", "port": 8101, "state": "healthy"},
    {"name": "decode-0", "role": "decode", "host": "10.0.0.5", "port": 8102, "state": "healthy"},
]
OPTIONS = ["--prometheus-port", "29001", "--worker-startup-check-interval", "1", "--log-level", "warning"]


def test_regular_mode_argv_names_every_worker_then_the_policy() -> None:
    argv = router_argv_regular(ROUTER, 30001, ["http://10.0.0.5:8101", "http://10.0.0.6:8102"], "cache_aware", 29001)
    assert argv == [
        "/venv/bin/vllm-router", "--host", "127.0.0.1", "--port", "30001",
        "--worker-urls", "http://10.0.0.5:8101", "http://10.0.0.6:8102",
        "--policy", "cache_aware", *OPTIONS,
    ]  # fmt: skip
    with pytest.raises(ValueError, match="needs at least one worker URL, got none"):
        router_argv_regular(ROUTER, 30001, [], "cache_aware", 29001)


def test_pd_mode_argv_names_the_prefill_and_the_decode_engine() -> None:
    argv = router_argv(ROUTER, 30001, "http://10.0.0.5:8101", "http://10.0.0.5:8102", "round_robin", 29001)
    assert argv == [
        "/venv/bin/vllm-router", "--host", "127.0.0.1", "--port", "30001",
        "--vllm-pd-disaggregation", "--prefill", "http://10.0.0.5:8101", "--decode", "http://10.0.0.5:8102",
        "--policy", "round_robin", *OPTIONS,
    ]  # fmt: skip


def test_the_mode_follows_the_deployment_in_state_json() -> None:
    regular = router_argv_for(ROUTER, COLOCATED, "cache_aware", 30001, 29001)
    assert regular == router_argv_regular(ROUTER, 30001, ["http://10.0.0.5:8101", "http://10.0.0.6:8102"],
                                          "cache_aware", 29001)  # fmt: skip
    pd = router_argv_for(ROUTER, PD, "round_robin", 30001, 29001)
    assert pd == router_argv(ROUTER, 30001, "http://10.0.0.5:8101", "http://10.0.0.5:8102", "round_robin", 29001)
    with pytest.raises(RuntimeError, match="exactly one prefill engine .* found 0"):
        router_argv_for(ROUTER, PD[1:], "round_robin", 30001, 29001)  # a decode engine alone: not regular mode
    with pytest.raises(RuntimeError, match="no prefill, decode or colocated engine"):
        router_argv_for(ROUTER, [], "round_robin", 30001, 29001)


def test_the_router_finds_the_prefill_and_decode_engine_in_state_json() -> None:
    assert engine_url(PD, "prefill") == "http://10.0.0.5:8101"
    assert engine_url(PD, "decode") == "http://10.0.0.5:8102"
    two_decodes = r"exactly one decode engine .* found 2: \['prefill-0', 'decode-0', 'decode-1'\]"
    with pytest.raises(RuntimeError, match=two_decodes):
        engine_url([*PD, {**PD[1], "name": "decode-1", "port": 8103}], "decode")
    with pytest.raises(RuntimeError, match="exactly one prefill engine .* found 0"):
        engine_url(PD[1:], "prefill")


@pytest.mark.skipif(not (ROUTER_VENV / "bin" / "python").exists(), reason=f"no vllm-router in {ROUTER_VENV}")
def test_the_installed_router_reads_both_argvs_as_meant() -> None:
    """vllm-router's own argument parser (its Python launcher; nothing is started)."""
    code = (
        "import json, sys; from vllm_router.launch_router import parse_router_args\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    a = parse_router_args(argv[1:])\n"
        "    print(json.dumps([a.worker_urls, a.vllm_pd_disaggregation, [list(p) for p in a.prefill_urls],"
        " a.decode_urls, a.policy, a.port, a.prometheus_port]))\n"
    )
    argvs = [router_argv_for(ROUTER, COLOCATED, "cache_aware", 30001, 29001),
             router_argv_for(ROUTER, PD, "round_robin", 30002, 29002)]  # fmt: skip
    done = subprocess.run([str(ROUTER_VENV / "bin" / "python"), "-c", code, json.dumps(argvs)], capture_output=True,
                          text=True, timeout=60, check=True)  # fmt: skip
    regular, pd = (json.loads(line) for line in done.stdout.splitlines())
    assert regular == [["http://10.0.0.5:8101", "http://10.0.0.6:8102"], False, [], [], "cache_aware", 30001, 29001]
    assert pd == [[], True, [["http://10.0.0.5:8101", None]], ["http://10.0.0.5:8102"], "round_robin", 30002, 29002]


def test_prefix_affinity_arms_are_the_door_policies_then_the_router_policies() -> None:
    arms = parse_args([]).arms
    assert [arm.name for arm in arms] == [
        "round_robin", "prefix_affinity", "kv_aware", "vllm-router:cache_aware", "vllm-router:round_robin",
    ]  # fmt: skip
    assert [(arm.routing_policy, arm.router_policy) for arm in arms] == [
        ("round_robin", None), ("prefix_affinity", None), ("kv_aware", None),
        ("round_robin", "cache_aware"), ("round_robin", "round_robin"),
    ]  # fmt: skip
    door_only = parse_args(["--router-policies", ""]).arms
    assert [arm.name for arm in door_only] == ["round_robin", "prefix_affinity", "kv_aware"]
    chosen = parse_args(["--policies", "kv_aware", "--router-policies", " power_of_two, cache_aware "]).arms
    assert [arm.name for arm in chosen] == ["kv_aware", "vllm-router:power_of_two", "vllm-router:cache_aware"]
    router_only = parse_args(["--policies", "", "--router-policies", "random"]).arms
    assert [arm.name for arm in router_only] == ["vllm-router:random"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--policies", "", "--router-policies", ""], "name no arm"),
        (["--policies", "affinity"], "--policies: unknown routing policy affinity; choose from round_robin,"),
        (["--router-policies", "kv_aware"], "vllm-router's kv_aware needs the engines' KV event endpoints"),
        (["--router-policies", "cache_awre"], "--router-policies: unknown vllm-router policy cache_awre"),
        (["--router-policies", "round_robin,round_robin"], "arm(s) named twice: vllm-router:round_robin"),
        (["--prompt-form", "tokens"], "--prompt-form tokens with router arms: vllm-router routes a token-id prompt"),
    ],
)
def test_prefix_affinity_refuses_arms_it_cannot_run(options: list[str], message: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    with pytest.raises(SystemExit) as exited:
        parse_args(options)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_prefix_affinity_with_token_prompts_runs_door_arms_alone() -> None:
    args = parse_args(["--prompt-form", "tokens", "--router-policies", ""])
    assert args.prompt_form == "tokens"
    assert [arm.name for arm in args.arms] == ["round_robin", "prefix_affinity", "kv_aware"]


def test_prefix_affinity_prompts_share_their_group_head_in_either_form() -> None:
    model = ensure_embedded_model(PROJECT_ROOT / ".cache" / "models")
    tokenizer = AutoTokenizer.from_pretrained(model)
    text = grouped_prompts("text", groups=3, per_group=2, prefix=40, model=model)
    ids = [tokenizer.encode(prompt, add_special_tokens=False) for prompt in text]
    tokens = grouped_prompts("tokens", groups=3, per_group=2, prefix=40, model=model)
    for prompts in (ids, tokens):
        assert [len(prompt) for prompt in prompts] == [40 + TAIL] * 6
        assert sorted(Counter(tuple(prompt[:40]) for prompt in prompts).values()) == [2, 2, 2]  # 3 heads, 2 each
    assert grouped_prompts("text", groups=3, per_group=2, prefix=40, model=model) == text  # the same for every arm


def test_an_arm_without_a_router_policy_loads_the_door_and_one_with_needs_the_router(tmp_path: Path) -> None:
    state = DeploymentState(pid=1, endpoint="http://127.0.0.1:9000", yr_mode="local", served_model_name="m",
                            ds_worker_address="127.0.0.1:31501", ds_started_here=True, log_dir=str(tmp_path),
                            engines=COLOCATED)  # type: ignore[arg-type]  # fmt: skip
    with load_through(None, state, tmp_path, None) as url:
        assert url == "http://127.0.0.1:9000"
    with pytest.raises(ValueError, match=r"an arm through vllm-router \(cache_aware\) needs the router's executable"):
        load_through(None, state, tmp_path, "cache_aware")
