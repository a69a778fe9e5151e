"""The typed configuration: seed 000's names, defaults, flag overrides, one-line errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from common.config import Accelerator, Role, SloConfig
from common.errors import ConfigError
from controller.placement import connector_options, instance_plans
from deploy.config import build_config, parse_device_list
from deploy.describe import describe
from deploy.settings import add_arguments

CPU_2 = {"ACCELERATOR": "cpu", "VISIBLE_DEVICES": "0,1"}


def test_defaults_are_one_prefill_one_decode_on_cpu() -> None:
    config = build_config(CPU_2)
    assert (config.prefill_instances, config.decode_instances) == (1, 1)
    assert (config.prefill_tp, config.decode_tp, config.prefill_dp, config.decode_dp) == (1, 1, 1, 1)
    assert config.disaggregated and config.model_path is None
    assert config.accelerator is Accelerator.CPU
    assert (config.server_ip, config.server_port) == ("127.0.0.1", 9000)


def test_seed_000_names_are_read(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    env = dict(
        ACCELERATOR="cuda", VISIBLE_DEVICES="0-7", SERVER_IP="0.0.0.0", SERVER_PORT="9100", MODEL_PATH=str(tmp_path),
        PREFILL_INS_NUM="1", DECODE_INS_NUM="1", PTP="4", DTP="2", PDP="1", DDP="2", USING_PREFIX_CONNECTOR="1",
    )  # fmt: skip
    config = build_config(env)
    assert config.server_port == 9100 and config.model_path == tmp_path
    assert (config.prefill_tp, config.decode_tp, config.decode_dp) == (4, 2, 2)
    assert config.using_prefix_connector and config.devices_needed == 8


def test_flag_overrides_environment() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = build_config({**CPU_2, "SERVER_PORT": "9000"}, parser.parse_args(["--server-port", "9555"]))
    assert config.server_port == 9555


def test_decode_zero_means_colocated() -> None:
    config = build_config({**CPU_2, "DECODE_INS_NUM": "0", "PREFILL_INS_NUM": "2"})
    assert not config.disaggregated and config.devices_needed == 2


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"PTP": "0"}, "PTP=0 is invalid: must be an integer >= 1"),
        ({"PREFILL_INS_NUM": "-1"}, "PREFILL_INS_NUM=-1 is invalid: must be an integer >= 1"),
        ({"DECODE_INS_NUM": "x"}, "DECODE_INS_NUM=x is invalid: must be an integer >= 0"),
        ({"SERVER_PORT": "70000"}, "SERVER_PORT=70000 is invalid: must be an integer >= 1 and <= 65535"),
        ({"MODEL_PATH": "/nowhere/model"}, "MODEL_PATH=/nowhere/model is invalid: must be an existing model folder"),
        ({"USING_PREFIX_CONNECTOR": "maybe"}, "USING_PREFIX_CONNECTOR=maybe is invalid: must be 0 or 1"),
        ({"ACCELERATOR": "tpu"}, "ACCELERATOR=tpu is invalid: must be one of cpu, cuda, ascend"),
        ({"PTP": "2"}, "needs 3 cpu devices, but only 2 are visible"),
        ({"SERVER_IP": "not-an-ip"}, "SERVER_IP=not-an-ip is invalid"),
        ({"ROUTING_POLICY": "random"}, "ROUTING_POLICY=random is invalid: must be one of round_robin, least_outstanding, prefix_affinity"),
        ({"MAX_IN_FLIGHT_PER_ENGINE": "0"}, "MAX_IN_FLIGHT_PER_ENGINE=0 is invalid: must be an integer >= 1"),
        ({"DOOR_QUEUE_TIMEOUT_S": "-5"}, "DOOR_QUEUE_TIMEOUT_S=-5 is invalid: must be an integer >= 0"),
        ({"KV_TTL_S": "-5"}, "KV_TTL_S=-5 is invalid: must be an integer >= 0"),
        ({"DS_WORKERS": "0"}, "DS_WORKERS=0 is invalid: must be an integer >= 1 and <= 16"),
        ({"KV_CONNECTOR": "P2pNcclConnector"}, "KV_CONNECTOR=P2pNcclConnector is invalid: must be one of yuanrong, none, ExampleConnector"),
        ({"KV_CONNECTOR": "ExampleConnector", "KV_CONNECTOR_EXTRA_CONFIG": "[1]"}, "KV_CONNECTOR_EXTRA_CONFIG=[1] is invalid: must be a JSON object"),
        ({"KV_CONNECTOR": "none"}, "KV_CONNECTOR=none is invalid with DECODE_INS_NUM=1"),
        ({"KV_CONNECTOR": "ExampleConnector", "USING_PREFIX_CONNECTOR": "1"}, "USING_PREFIX_CONNECTOR=1 is invalid with KV_CONNECTOR=ExampleConnector"),
        ({"STREAM_MIGRATIONS": "-1"}, "STREAM_MIGRATIONS=-1 is invalid: must be an integer >= 0 and <= 10"),
        ({"SIMULATED_NODES": "17"}, "SIMULATED_NODES=17 is invalid: must be an integer >= 0 and <= 16"),
        ({"SIMULATED_NODES": "3"}, "SIMULATED_NODES=3 is invalid: must be at most the 2 visible cpu devices (0,1): "
                                   "every simulated node gets at least one; lower it or set VISIBLE_DEVICES"),
        ({"SIMULATED_NODES": "2", "DS_WORKERS": "2"}, "DS_WORKERS=2 is invalid: must be 1 with SIMULATED_NODES=2: "
                                                      "each simulated node runs one data system worker"),
        ({"SIMULATED_NODES": "2", "YR_SERVER_ADDRESS": "10.0.0.1:31222"},
         "SIMULATED_NODES=2 is invalid: must be 0 in cluster mode, where the cluster's real nodes are used"),
        ({"ENGINE_KIND": "fake"}, "ENGINE_KIND=fake is invalid: must be one of vllm, simulated"),
        ({"ENGINE_KIND": "simulated", "SIM_PROFILE": "nope"},
         "SIM_PROFILE=nope is invalid: no simulated engine profile 'nope': give a file or one of cpu-93m-float32, h100-llama3-8b-bf16"),
        ({"ENGINE_KIND": "simulated", "YR_SERVER_ADDRESS": "10.0.0.1:31222"},
         "ENGINE_KIND=simulated is invalid: must be vllm in cluster mode"),
        ({"ENGINE_KIND": "simulated", "DP_MODE": "vllm"}, "DP_MODE=vllm is invalid: must be independent with ENGINE_KIND=simulated"),
        ({"SLO_TTFT_MS": "0"}, "SLO_TTFT_MS=0 is invalid: must be a number of milliseconds > 0 and <= 3600000"),
        ({"SLO_ITL_MS": "fast"}, "SLO_ITL_MS=fast is invalid: must be a number of milliseconds > 0 and <= 3600000"),
        ({"SLO_ITL_MS": "nan"}, "SLO_ITL_MS=nan is invalid: must be a number of milliseconds > 0 and <= 3600000"),
        ({"SLO_TTFT_MS": "-1"}, "SLO_TTFT_MS=-1 is invalid: must be a number of milliseconds > 0 and <= 3600000"),
        ({"PLANNER_WINDOW_S": "4"}, "PLANNER_WINDOW_S=4 is invalid: must be an integer >= 5 and <= 600"),
        ({"PLANNER_WINDOW_S": "30", "PLANNER_SETTLE_S": "20"}, "PLANNER_SETTLE_S=20 is invalid: must be an integer >= 30"),
        ({"ROLES": "adaptive", "PLANNER_MAX_ENGINES": "1"}, "PLANNER_MAX_ENGINES=1 is invalid: must be 0 (the planner never "
                                                            "scales) or at least PLANNER_MIN_ENGINES=2 and PREFILL_INS_NUM + DECODE_INS_NUM=2"),
        ({"ROLES": "dynamic"}, "ROLES=dynamic is invalid: must be one of fixed, adaptive"),
        ({"ROLES": "adaptive", "DECODE_INS_NUM": "0"}, "ROLES=adaptive is invalid with 1 engine: roles can only move "
                                                       "between engines; set PREFILL_INS_NUM + DECODE_INS_NUM >= 2, or ROLES=fixed"),
        ({"ROLES": "adaptive", "DTP": "2", "VISIBLE_DEVICES": "0-3"}, "ROLES=adaptive is invalid with PTP=1 DTP=2: an engine "
                                                                      "that changes roles keeps its TP size; set PTP=DTP, or ROLES=fixed"),
        ({"ROLES": "adaptive", "PDP": "2", "DDP": "2", "VISIBLE_DEVICES": "0-3"}, "ROLES=adaptive is invalid with PDP=2 DDP=2"),
        ({"ROLES": "adaptive", "KV_CONNECTOR": "ExampleConnector"}, "ROLES=adaptive is invalid with KV_CONNECTOR=ExampleConnector: "
                                                                    "a decode leg on any engine loads its prompt through the data system"),
    ],
)
def test_invalid_values_name_variable_value_and_allowed(env: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as raised:
        build_config({**CPU_2, **env})
    message = str(raised.value)
    assert expected in message
    assert "\n" not in message


@pytest.mark.parametrize("owned", ["--port 8000", "--tensor-parallel-size=2", "--kv-transfer-config {}", "--host 0.0.0.0"])
def test_owned_engine_flags_are_refused(owned: str) -> None:
    with pytest.raises(ConfigError, match="which the deployment sets itself"):
        build_config({**CPU_2, "PREFILL_STARTUP_PARAMS": f"--enforce-eager {owned}"})


def test_pass_through_params_are_split_like_a_shell() -> None:
    config = build_config({**CPU_2, "DECODE_STARTUP_PARAMS": "--max-model-len 2048 --enforce-eager"})
    assert config.decode_startup_params == ("--max-model-len", "2048", "--enforce-eager")


def test_device_lists() -> None:
    assert parse_device_list("0,2-4") == (0, 2, 3, 4)
    for bad in ("", "1,1", "3-1", "a"):
        with pytest.raises(ValueError):
            parse_device_list(bad)


def test_service_levels_are_read_in_milliseconds_and_described() -> None:
    assert build_config(CPU_2).slo == SloConfig(ttft_ms=2000.0, itl_ms=100.0)
    config = build_config({**CPU_2, "SLO_TTFT_MS": "750.5", "SLO_ITL_MS": "40"})
    assert config.slo == SloConfig(ttft_ms=750.5, itl_ms=40.0)
    assert "service levels: TTFT <= 750.5 ms, inter-token latency <= 40 ms" in "\n".join(describe(config))


def test_api_key_is_read_and_never_described() -> None:
    config = build_config({**CPU_2, "API_KEY": "s3cret-value"})
    assert config.api_key == "s3cret-value"
    assert build_config(CPU_2).api_key is None
    described = "\n".join(describe(config))
    assert "s3cret-value" not in described and "API key: required" in described


def test_simulated_engines_get_a_virtual_device_each() -> None:
    """256 simulated engines on a 2-core machine: one virtual device each, unless VISIBLE_DEVICES names more."""
    config = build_config({"ACCELERATOR": "cpu", "ENGINE_KIND": "simulated", "PREFILL_INS_NUM": "128", "DECODE_INS_NUM": "128"})
    assert (config.sim_profile, config.devices) == ("cpu-93m-float32", tuple(range(256)))
    roomy = build_config({**CPU_2, "ENGINE_KIND": "simulated", "VISIBLE_DEVICES": "0-63"})
    assert roomy.devices == tuple(range(64))
    assert build_config(CPU_2).sim_profile is None


def test_adaptive_roles_run_alike_engines_with_prefix_reuse_and_start_as_the_split_given() -> None:
    config = build_config({**CPU_2, "ROLES": "adaptive"})
    assert (config.adaptive_roles, config.disaggregated, config.using_prefix_connector) == (True, False, False)
    assert connector_options(config)["handoff_saves"] is True  # kv_both engines save their prefill legs' prompts
    assert "handoff_saves" not in connector_options(build_config(CPU_2))
    plans = instance_plans(config)
    assert [(plan.role, plan.count, plan.tensor_parallel) for plan in plans] == [(Role.ADAPTIVE, 2, 1)]
    assert Role.ADAPTIVE.kv_role == "kv_both"
    lines = "\n".join(describe(config))
    assert "mode: adaptive roles" in lines and "starting as 1 prefill + 1 decode" in lines
    assert "starting as all colocated" in "\n".join(describe(build_config({**CPU_2, "ROLES": "adaptive",
                                                                          "PREFILL_INS_NUM": "2", "DECODE_INS_NUM": "0"})))
    assert build_config(CPU_2).roles == "fixed"
