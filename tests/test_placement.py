"""Placement and engine launch arguments (pure functions)."""

from __future__ import annotations

import json
from pathlib import Path

from common.config import Role
from controller.placement import plan_engines, simulated_inventory
from deploy.config import build_config
from workers.engine_process import build_engine_argv, build_engine_env, cpu_thread_binding

MODEL = Path("/models/m")


def _kv_config(argv: list[str]) -> dict[str, object]:
    return json.loads(argv[argv.index("--kv-transfer-config") + 1])


def test_pd_engines_get_disjoint_cores_and_their_kv_roles() -> None:
    config = build_config({"ACCELERATOR": "cpu", "VISIBLE_DEVICES": "0-5", "PTP": "2", "DDP": "2", "DTP": "1"})
    specs = plan_engines(config, MODEL, "m", ("127.0.0.1:31501",))
    assert [(s.name, s.role, s.devices) for s in specs] == [
        ("prefill-0", Role.PREFILL, (0, 1)),
        ("decode-0-dp0", Role.DECODE, (2,)),
        ("decode-0-dp1", Role.DECODE, (3,)),
    ]
    roles = [_kv_config(build_engine_argv(s, 8000))["kv_role"] for s in specs]
    assert roles == ["kv_producer", "kv_consumer", "kv_consumer"]
    env = build_engine_env(specs[0], {})
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"


def test_colocated_instances_are_kv_both() -> None:
    config = build_config({"ACCELERATOR": "cpu", "VISIBLE_DEVICES": "0,1", "DECODE_INS_NUM": "0", "PREFILL_INS_NUM": "2"})
    specs = plan_engines(config, MODEL, "m", ("127.0.0.1:31501",))
    assert [(s.name, s.devices) for s in specs] == [("colocated-0", (0,)), ("colocated-1", (1,))]
    assert {_kv_config(build_engine_argv(s, 8000))["kv_role"] for s in specs} == {"kv_both"}


def test_kv_connector_selects_vanilla_vllm_or_one_of_vllms_connectors(tmp_path: Path) -> None:
    vanilla = build_config({"ACCELERATOR": "cpu", "VISIBLE_DEVICES": "0", "DECODE_INS_NUM": "0", "KV_CONNECTOR": "none"})
    (spec,) = plan_engines(vanilla, MODEL, "m", ("127.0.0.1:31501",))
    assert "--kv-transfer-config" not in build_engine_argv(spec, 8000)
    example = build_config({"ACCELERATOR": "cpu", "VISIBLE_DEVICES": "0,1", "KV_CONNECTOR": "ExampleConnector",
                            "RUN_DIR": str(tmp_path)})  # fmt: skip
    kv_configs = [_kv_config(build_engine_argv(s, 8000)) for s in plan_engines(example, MODEL, "m", ("127.0.0.1:31501",))]
    assert kv_configs == [
        {"kv_connector": "ExampleConnector", "kv_role": role, "kv_connector_extra_config": {"shared_storage_path": str(tmp_path / "example_kv")}}
        for role in ("kv_producer", "kv_consumer")
    ]  # fmt: skip
    nixl = build_config({"ACCELERATOR": "cpu", "VISIBLE_DEVICES": "0,1", "KV_CONNECTOR": "NixlConnector",
                         "KV_CONNECTOR_EXTRA_CONFIG": '{"backends": ["UCX"]}'})  # fmt: skip
    kv_config = _kv_config(build_engine_argv(plan_engines(nixl, MODEL, "m", ("127.0.0.1:31501",))[0], 8000))
    assert kv_config == {"kv_connector": "NixlConnector", "kv_role": "kv_producer", "kv_connector_extra_config": {"backends": ["UCX"]}}


def test_engine_argv_owns_address_parallelism_and_connector() -> None:
    config = build_config({"ACCELERATOR": "cuda", "VISIBLE_DEVICES": "4-7", "PTP": "2", "DTP": "2",
                           "USING_PREFIX_CONNECTOR": "1", "PREFILL_STARTUP_PARAMS": "--max-model-len 4096"})  # fmt: skip
    prefill, decode = plan_engines(config, MODEL, "served", ("10.0.0.1:31501",))
    argv = build_engine_argv(prefill, 8123, python="python")
    assert argv[:3] == ["python", "-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--port") + 1] == "8123"
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
    assert argv[-2:] == ["--max-model-len", "4096"]
    kv = _kv_config(argv)
    assert kv["kv_connector"] == "YuanRongConnector"
    assert kv["kv_connector_module_path"] == "patch.yuanrong_connector.connector"
    assert kv["kv_load_failure_policy"] == "recompute"
    assert kv["kv_connector_extra_config"] == {
        "ds_worker_address": "10.0.0.1:31501",
        "prefix_reuse": True,
        "ttl_s": 1800,
        "request_timeout_ms": 2000,
        "handoff_wait_ms": 2000,
        "exclusive_connection": True,
        "check_bytes": True,
    }
    assert build_engine_env(prefill, {})["CUDA_VISIBLE_DEVICES"] == "4,5"
    assert build_engine_env(decode, {})["CUDA_VISIBLE_DEVICES"] == "6,7"


def test_engines_attach_to_local_data_system_workers_in_turn() -> None:
    config = build_config({"ACCELERATOR": "cpu", "VISIBLE_DEVICES": "0-3", "PREFILL_INS_NUM": "4",
                           "DECODE_INS_NUM": "0", "DS_WORKERS": "2"})  # fmt: skip
    assert config.datasystem.addresses == ("127.0.0.1:31501", "127.0.0.1:31502")
    specs = plan_engines(config, MODEL, "served", config.datasystem.addresses)
    assert [s.ds_worker_address for s in specs] == ["127.0.0.1:31501", "127.0.0.1:31502"] * 2


def test_simulated_nodes_split_the_cores_and_each_has_its_address_and_worker() -> None:
    config = build_config({"ACCELERATOR": "cpu", "VISIBLE_DEVICES": "0-4", "SIMULATED_NODES": "2",
                           "DS_WORKER_ADDRESS": "127.0.0.1:31601", "DS_METASTORE_PORT": "32601"})  # fmt: skip
    assert config.datasystem.addresses == ("127.0.0.2:31601", "127.0.0.3:31601")
    assert config.datasystem.worker_host == "127.0.0.2"  # the first node's worker runs the metastore
    nodes = simulated_inventory(config, config.datasystem.addresses)
    assert [(n.node_id, n.address, n.cores, n.ds_worker_addresses) for n in nodes] == [
        ("sim-node-0", "127.0.0.2", (0, 1, 2), ("127.0.0.2:31601",)),
        ("sim-node-1", "127.0.0.3", (3, 4), ("127.0.0.3:31601",)),
    ]


def test_simulated_nodes_put_prefill_and_decode_apart_bound_to_their_node() -> None:
    config = build_config({"ACCELERATOR": "cpu", "VISIBLE_DEVICES": "0,1", "SIMULATED_NODES": "2"})
    specs = plan_engines(config, MODEL, "m", config.datasystem.addresses)
    assert [(s.name, s.node_id, s.bind_host, s.devices, s.ds_worker_address) for s in specs] == [
        ("prefill-0", "sim-node-0", "127.0.0.2", (0,), "127.0.0.2:31501"),
        ("decode-0", "sim-node-1", "127.0.0.3", (1,), "127.0.0.3:31501"),
    ]
    argv = build_engine_argv(specs[1], 8000)
    assert argv[argv.index("--host") + 1] == "127.0.0.3"
    assert _kv_config(argv)["kv_connector_extra_config"]["ds_worker_address"] == "127.0.0.3:31501"  # type: ignore[index]


def test_without_simulated_nodes_local_engines_bind_to_loopback() -> None:
    config = build_config({"ACCELERATOR": "cpu", "VISIBLE_DEVICES": "0,1"})
    assert {s.bind_host for s in plan_engines(config, MODEL, "m", config.datasystem.addresses)} == {"127.0.0.1"}


def test_ascend_devices_are_made_visible() -> None:
    config = build_config({"ACCELERATOR": "ascend", "VISIBLE_DEVICES": "0-3", "PTP": "2", "DTP": "2"})
    _, decode = plan_engines(config, MODEL, "m", ("127.0.0.1:31501",))
    assert build_engine_env(decode, {"PYTHONPATH": "/x"})["ASCEND_RT_VISIBLE_DEVICES"] == "2,3"
    assert build_engine_env(decode, {"PYTHONPATH": "/x"})["PYTHONPATH"].endswith(":/x")


def test_cpu_binding_splits_cores_per_rank() -> None:
    assert cpu_thread_binding((0, 1, 2, 3), 2) == "0,1|2,3"
    assert cpu_thread_binding((5,), 1) == "5"


def test_cpu_engines_run_below_the_store_and_door_priority() -> None:
    config = build_config({"ACCELERATOR": "cpu", "VISIBLE_DEVICES": "0,1"})
    prefill, decode = plan_engines(config, MODEL, "served", ("127.0.0.1:31501",))
    argv = build_engine_argv(prefill, 8123, python="python")
    assert argv[:6] == ["nice", "-n", "5", "python", "-m", "vllm.entrypoints.openai.api_server"]


def test_kv_aware_routing_turns_engine_kv_events_on() -> None:
    config = build_config({"ACCELERATOR": "cpu", "VISIBLE_DEVICES": "0-1", "ROUTING_POLICY": "kv_aware"})
    spec = plan_engines(config, MODEL, "m", ("127.0.0.1:31501",))[0]
    argv = build_engine_argv(spec, 8000, events_port=9100)
    events = json.loads(argv[argv.index("--kv-events-config") + 1])
    assert events["endpoint"] == "tcp://[::ffff:127.0.0.1]:9100"  # bound on loopback alone, as vLLM reads it
    assert events["replay_endpoint"] == "tcp://127.0.0.1:9101"
    assert events["topic"] == spec.name
    assert config.kv_block_size == 128
    assert "--kv-events-config" not in build_engine_argv(plan_engines(build_config({"ACCELERATOR": "cpu", "VISIBLE_DEVICES": "0-1"}), MODEL, "m", ("127.0.0.1:31501",))[0], 8000)


def test_block_size_follows_the_startup_parameters() -> None:
    assert build_config({"ACCELERATOR": "cpu", "VISIBLE_DEVICES": "0-1", "PREFILL_STARTUP_PARAMS": "--block-size 64"}).kv_block_size == 64


def test_prefix_reuse_across_tp_sizes_gives_every_engine_both_sizes() -> None:
    config = build_config({"ACCELERATOR": "cpu", "VISIBLE_DEVICES": "0-2", "PTP": "2", "DTP": "1",
                           "USING_PREFIX_CONNECTOR": "1"})  # fmt: skip
    specs = plan_engines(config, MODEL, "m", ("127.0.0.1:31501",))
    extra = [_kv_config(build_engine_argv(spec, 8000))["kv_connector_extra_config"] for spec in specs]
    assert [e["peer_tp_sizes"] for e in extra] == [[1, 2], [1, 2]]  # type: ignore[index]
    same_tp = build_config({"ACCELERATOR": "cpu", "VISIBLE_DEVICES": "0,1", "USING_PREFIX_CONNECTOR": "1"})
    no_reuse = build_config({"ACCELERATOR": "cpu", "VISIBLE_DEVICES": "0-2", "PTP": "2"})
    for other in (same_tp, no_reuse):
        for spec in plan_engines(other, MODEL, "m", ("127.0.0.1:31501",)):
            assert "peer_tp_sizes" not in _kv_config(build_engine_argv(spec, 8000))["kv_connector_extra_config"]  # type: ignore[operator]


def test_engines_get_the_api_key_by_environment_and_guard_every_path() -> None:
    config = build_config({"ACCELERATOR": "cpu", "VISIBLE_DEVICES": "0,1", "API_KEY": "s3cret"})
    spec = plan_engines(config, MODEL, "m", ("127.0.0.1:31501",))[0]
    argv = build_engine_argv(spec, 8000)
    assert argv[argv.index("--middleware") + 1] == "workers.api_key_guard.EngineKeyGuard"
    assert not any("s3cret" in arg for arg in argv) and "s3cret" not in repr(spec)  # never on a command line or in a log
    env = build_engine_env(spec, {"VLLM_API_KEY": "the-callers-own"})
    assert (env["VLLM_API_KEY"], env["YR_METRICS_PUBLIC"]) == ("s3cret", "0")
    open_spec = plan_engines(build_config({"ACCELERATOR": "cpu", "VISIBLE_DEVICES": "0,1"}), MODEL, "m", ("127.0.0.1:31501",))[0]
    assert "--middleware" not in build_engine_argv(open_spec, 8000)
    assert "VLLM_API_KEY" not in build_engine_env(open_spec, {"VLLM_API_KEY": "the-callers-own"})
