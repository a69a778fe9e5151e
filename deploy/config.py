"""Building the one typed configuration of a deployment (``ServiceConfig``, common/config.py).

This is the only module that reads ``os.environ``. Everything else receives a
:class:`ServiceConfig`. The settings, their environment names, flags and defaults are
listed once, in deploy/settings.py.

Validation happens here, before anything starts. A bad value raises
:class:`ConfigError` whose message is one line: the variable, the value, and what
is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import os
import shlex
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from common.config import (
    DP_MODES,
    ENGINE_KINDS,
    EXAMPLE_KV_DIR,
    KV_CONNECTORS,
    NO_CONNECTOR,
    ROLE_MODES,
    ROUTING_POLICIES,
    SIMULATED_NODE_LIMIT,
    YUANRONG_CONNECTOR,
    Accelerator,
    AdmissionConfig,
    ConnectorConfig,
    DataSystemConfig,
    PlannerConfig,
    ServiceConfig,
    SloConfig,
    simulated_node_address,
)
from common.errors import ConfigError
from deploy.adaptive_config import check_adaptive
from deploy.master_info import MasterInfo, read_master_info, tcp_answers
from deploy.settings import OWNED_ENGINE_FLAGS, SETTINGS
from workers.sim_engine.profile import load_profile

PROJECT_ROOT = Path(__file__).resolve().parents[1]

def build_config(
    environ: Mapping[str, str],
    overrides: argparse.Namespace | None = None,
    master_answers: Callable[[str, int], bool] = tcp_answers,
) -> ServiceConfig:
    """Merge environment and flags, parse and validate every value. ``master_answers``
    checks that the master in yr start's master info accepts a connection."""
    raw, given = _merged(environ, overrides)
    prefill_instances = _int(raw, "PREFILL_INS_NUM", minimum=1)
    decode_instances = _int(raw, "DECODE_INS_NUM", minimum=0)
    accelerator = _accelerator(raw["ACCELERATOR"])
    sessions_dir = Path(raw["YR_SESSIONS_DIR"] or "/tmp/yr_sessions")
    master = None if raw["YR_SERVER_ADDRESS"] else read_master_info(sessions_dir, master_answers)
    yr_server_address = raw["YR_SERVER_ADDRESS"] or (master.server_address if master is not None else None)
    simulated_nodes = _simulated_nodes(raw, cluster_mode=yr_server_address is not None)
    config = ServiceConfig(
        server_ip=_ip(raw, "SERVER_IP"),
        server_port=_int(raw, "SERVER_PORT", minimum=1, maximum=65535),
        model_path=_model_path(raw["MODEL_PATH"]),
        prefill_instances=prefill_instances,
        decode_instances=decode_instances,
        prefill_tp=_int(raw, "PTP", minimum=1),
        decode_tp=_int(raw, "DTP", minimum=1),
        prefill_dp=_int(raw, "PDP", minimum=1),
        decode_dp=_int(raw, "DDP", minimum=1),
        using_prefix_connector=_flag(raw, "USING_PREFIX_CONNECTOR"),
        accelerator=accelerator,
        devices=_devices(raw["VISIBLE_DEVICES"], accelerator, environ),
        prefill_startup_params=_startup_params(raw, "PREFILL_STARTUP_PARAMS"),
        decode_startup_params=_startup_params(raw, "DECODE_STARTUP_PARAMS"),
        cpu_kvcache_gb=_int(raw, "VLLM_CPU_KVCACHE_SPACE", minimum=1),
        engine_start_timeout_s=float(_int(raw, "ENGINE_START_TIMEOUT", minimum=10)),
        datasystem=_datasystem(raw, cluster_mode=yr_server_address is not None, master=master,
                               simulated_nodes=simulated_nodes),  # fmt: skip
        connector=_connector_config(raw),
        routing_policy=_choice(raw, "ROUTING_POLICY", ROUTING_POLICIES),
        selective_pd_tokens=_int(raw, "SELECTIVE_PD_TOKENS", minimum=0),
        admission=_admission(raw),
        stream_migrations=_int(raw, "STREAM_MIGRATIONS", minimum=0, maximum=10),
        prefill_timeout_s=float(_int(raw, "PREFILL_TIMEOUT_S", minimum=1, maximum=3600)),
        warm_up_tokens=_int(raw, "WARM_UP_TOKENS", minimum=0, maximum=1 << 20),
        door_read_timeout_s=float(_int(raw, "DOOR_READ_TIMEOUT_S", minimum=1, maximum=600)),
        drain_timeout_s=float(_int(raw, "DRAIN_TIMEOUT_S", minimum=0, maximum=600)),
        api_key=raw["API_KEY"] or None,
        metrics_public=_flag(raw, "METRICS_PUBLIC"),
        run_dir=Path(raw["RUN_DIR"] or PROJECT_ROOT),
        sessions_dir=sessions_dir,
        model_cache_dir=Path(raw["MODEL_CACHE_DIR"] or PROJECT_ROOT / ".cache" / "models"),
        yr_server_address=yr_server_address,
        yr_ds_address=master.ds_address if master is not None else None,
        cpu_cores_per_rank=_int(raw, "CPU_CORES_PER_RANK", minimum=1),
        simulated_nodes=simulated_nodes,
        dp_mode=_choice(raw, "DP_MODE", DP_MODES),
        sim_profile=_sim_profile(raw, cluster_mode=yr_server_address is not None),
        slo=SloConfig(ttft_ms=_milliseconds(raw, "SLO_TTFT_MS"), itl_ms=_milliseconds(raw, "SLO_ITL_MS")),
        **_roles(raw),
    )
    config = _derived_defaults(config, raw, given)
    _check_consistency(config)
    return config


def _derived_defaults(config: ServiceConfig, raw: Mapping[str, str | None], given: set[str]) -> ServiceConfig:
    """Defaults that depend on other settings."""
    if "ROUTING_POLICY" not in given and config.dp_mode == "vllm" and max(config.prefill_dp, config.decode_dp) > 1:
        # vLLM's own DP balancer picks the rank, so the door cannot see what a rank holds.
        config = dataclasses.replace(config, routing_policy="prefix_affinity")
    if config.simulated_engines and not raw["VISIBLE_DEVICES"]:
        # Virtual devices, one per engine: a simulated engine computes nothing.
        config = dataclasses.replace(config, devices=tuple(range(max(config.devices_needed, config.simulated_nodes))))
    return config


def _merged(environ: Mapping[str, str], overrides: argparse.Namespace | None) -> tuple[dict[str, str | None], set[str]]:
    """Each setting's raw value (a flag wins over the environment, which wins over the
    default), and the settings given by the environment or a flag."""
    raw: dict[str, str | None] = {}
    given: set[str] = set()
    for setting in SETTINGS:
        value = getattr(overrides, setting.dest, None) if overrides is not None else None
        if value is None:
            value = environ.get(setting.env)
        if value is None or (value == "" and setting.default is None):
            value = setting.default
        else:
            given.add(setting.env)
        raw[setting.env] = value
    return raw, given


def _connector_config(raw: Mapping[str, str | None]) -> ConnectorConfig:
    return ConnectorConfig(
        ttl_s=_int(raw, "KV_TTL_S", minimum=0),
        request_timeout_ms=_int(raw, "KV_REQUEST_TIMEOUT_MS", minimum=1),
        handoff_wait_ms=_int(raw, "KV_HANDOFF_WAIT_MS", minimum=0),
        exclusive_connection=_flag(raw, "DS_EXCLUSIVE_CONNECTIONS"),
        check_bytes=_flag(raw, "KV_CHECKSUM"),
        kind=_connector(raw),
        vllm_extra=_connector_extra(raw),
    )


def _admission(raw: Mapping[str, str | None]) -> AdmissionConfig:
    return AdmissionConfig(
        max_in_flight_per_engine=_int(raw, "MAX_IN_FLIGHT_PER_ENGINE", minimum=1),
        queue_size=_int(raw, "DOOR_QUEUE_SIZE", minimum=0),
        queue_timeout_s=float(_int(raw, "DOOR_QUEUE_TIMEOUT_S", minimum=0)),
    )


def _roles(raw: Mapping[str, str | None]) -> dict[str, Any]:
    """ROLES and, for adaptive ones, the role planner's timing."""
    window_s = _int(raw, "PLANNER_WINDOW_S", minimum=5, maximum=600)
    settle_s = _int(raw, "PLANNER_SETTLE_S", minimum=window_s, maximum=3600)
    min_engines = _int(raw, "PLANNER_MIN_ENGINES", minimum=2, maximum=1024)
    max_engines = _int(raw, "PLANNER_MAX_ENGINES", minimum=0, maximum=1024)
    planner = PlannerConfig(window_s=float(window_s), settle_s=float(settle_s), max_engines=max_engines,
                            min_engines=min_engines)  # fmt: skip
    return {"roles": _choice(raw, "ROLES", ROLE_MODES), "planner": planner}


def _fail(name: str, value: object, allowed: str) -> ConfigError:
    return ConfigError(f"{name}={value!s} is invalid: {allowed}")


def _int(raw: Mapping[str, str | None], name: str, minimum: int, maximum: int | None = None) -> int:
    value = raw[name]
    allowed = f"must be an integer >= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
    try:
        number = int(str(value).strip())
    except ValueError:
        raise _fail(name, value, allowed) from None
    if number < minimum or (maximum is not None and number > maximum):
        raise _fail(name, value, allowed)
    return number


def _milliseconds(raw: Mapping[str, str | None], name: str) -> float:
    value, allowed = raw[name], "must be a number of milliseconds > 0 and <= 3600000"
    try:
        number = float(str(value).strip())
    except ValueError:
        raise _fail(name, value, allowed) from None
    if not 0 < number <= 3_600_000:  # NaN too
        raise _fail(name, value, allowed)
    return number


def _choice(raw: Mapping[str, str | None], name: str, allowed: Sequence[str]) -> str:
    value = str(raw[name]).strip().lower()
    if value not in allowed:
        raise _fail(name, raw[name], f"must be one of {', '.join(allowed)}")
    return value


def _flag(raw: Mapping[str, str | None], name: str) -> bool:
    value = str(raw[name]).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise _fail(name, raw[name], "must be 0 or 1")


def _ip(raw: Mapping[str, str | None], name: str) -> str:
    value = str(raw[name]).strip()
    if value in ("", "localhost"):
        return "127.0.0.1"
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise _fail(name, value, "must be an IPv4 or IPv6 address of this host, e.g. 127.0.0.1 or 0.0.0.0") from None
    return value


def _model_path(value: str | None) -> Path | None:
    if value is None or value.strip() == "":
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise _fail("MODEL_PATH", value, "must be an existing model folder (with config.json), or unset for the embedded model")
    if not (path / "config.json").is_file():
        raise _fail("MODEL_PATH", value, "the folder has no config.json; point it at a Hugging Face model folder")
    return path


def _accelerator(value: str | None) -> Accelerator:
    if value is None or value.strip() == "":
        return detect_accelerator()
    try:
        return Accelerator(value.strip().lower())
    except ValueError:
        raise _fail("ACCELERATOR", value, "must be one of cpu, cuda, ascend") from None


def detect_accelerator() -> Accelerator:
    """Ascend if a davinci device exists, CUDA if an NVIDIA device exists, else CPU."""
    if Path("/dev/davinci0").exists():
        return Accelerator.ASCEND
    if Path("/dev/nvidia0").exists():
        return Accelerator.CUDA
    return Accelerator.CPU


def parse_device_list(text: str) -> tuple[int, ...]:
    """Parse ``0,1,4-6`` into ``(0, 1, 4, 5, 6)``; raise ValueError on anything else."""
    ids: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            low, high = (int(x) for x in part.split("-", 1))
            if high < low:
                raise ValueError(part)
            ids.extend(range(low, high + 1))
        else:
            ids.append(int(part))
    if not ids or len(set(ids)) != len(ids) or min(ids) < 0:
        raise ValueError(text)
    return tuple(ids)


def _devices(value: str | None, accelerator: Accelerator, environ: Mapping[str, str]) -> tuple[int, ...]:
    inherited = {
        Accelerator.CUDA: environ.get("CUDA_VISIBLE_DEVICES"),
        Accelerator.ASCEND: environ.get("ASCEND_RT_VISIBLE_DEVICES"),
        Accelerator.CPU: None,
    }[accelerator]
    text = value if value not in (None, "") else inherited
    if text:
        try:
            return parse_device_list(text)
        except ValueError:
            raise _fail("VISIBLE_DEVICES", text, "must be a list of distinct device ids such as 0,1 or 0-3") from None
    if accelerator is Accelerator.CPU:
        return tuple(sorted(os.sched_getaffinity(0)))
    return tuple(range(_count_devices(accelerator)))


def _count_devices(accelerator: Accelerator) -> int:
    pattern = "davinci[0-9]*" if accelerator is Accelerator.ASCEND else "nvidia[0-9]*"
    return len(list(Path("/dev").glob(pattern)))


def _startup_params(raw: Mapping[str, str | None], name: str) -> tuple[str, ...]:
    try:
        params = tuple(shlex.split(raw[name] or ""))
    except ValueError as exc:
        raise _fail(name, raw[name], f"must be shell-quoted vLLM arguments ({exc})") from None
    for param in params:
        flag = param.split("=", 1)[0]
        if flag in OWNED_ENGINE_FLAGS:
            raise ConfigError(
                f"{name} contains {flag}, which the deployment sets itself; remove it "
                f"(owned flags: {', '.join(OWNED_ENGINE_FLAGS)}; use SERVER_PORT, PTP/DTP, PDP/DDP instead)"
            )
    return params


def _sim_profile(raw: Mapping[str, str | None], cluster_mode: bool) -> str | None:
    """The profile's name or file with ENGINE_KIND=simulated (checked: it loads); None for real engines."""
    if _choice(raw, "ENGINE_KIND", ENGINE_KINDS) == "vllm":
        return None
    if cluster_mode:
        raise _fail("ENGINE_KIND", "simulated", "must be vllm in cluster mode (simulated engines run in local mode, "
                    "SIMULATED_NODES gives them nodes)")  # fmt: skip
    name = raw["SIM_PROFILE"] or ""
    try:
        load_profile(name)
    except ValueError as exc:
        raise _fail("SIM_PROFILE", name, str(exc)) from None
    return name


def _simulated_nodes(raw: Mapping[str, str | None], cluster_mode: bool) -> int:
    nodes = _int(raw, "SIMULATED_NODES", minimum=0, maximum=SIMULATED_NODE_LIMIT)
    if nodes and cluster_mode:
        raise _fail("SIMULATED_NODES", nodes, "must be 0 in cluster mode, where the cluster's real nodes are used; "
                    "unset it, or deploy in local mode")  # fmt: skip
    if nodes and _int(raw, "DS_WORKERS", minimum=1, maximum=16) != 1:
        raise _fail("DS_WORKERS", raw["DS_WORKERS"], f"must be 1 with SIMULATED_NODES={nodes}: each simulated node "
                    "runs one data system worker")  # fmt: skip
    return nodes


def _datasystem(
    raw: Mapping[str, str | None], cluster_mode: bool, master: MasterInfo | None, simulated_nodes: int = 0
) -> DataSystemConfig:
    if cluster_mode and raw["DS_WORKER_ADDRESS"]:
        raise _fail("DS_WORKER_ADDRESS", raw["DS_WORKER_ADDRESS"], "not used in cluster mode, where every engine "
                    "attaches to the data system worker on its own node; unset it, and set DS_WORKER_PORT to the "
                    "port those workers listen on if it is not yr start's")  # fmt: skip
    address = raw["DS_WORKER_ADDRESS"] or "127.0.0.1:31501"
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise _fail("DS_WORKER_ADDRESS", address, "must be host:port, e.g. 127.0.0.1:31501")
    if raw["DS_WORKER_PORT"]:
        node_worker_port = _int(raw, "DS_WORKER_PORT", minimum=1, maximum=65535)
    else:
        node_worker_port = (master.ds_worker_port if master is not None else None) or 31501
    spill = raw["DS_SPILL_DIR"]
    node_hosts = tuple(simulated_node_address(index) for index in range(simulated_nodes))
    return DataSystemConfig(
        worker_host=node_hosts[0] if node_hosts else host,
        worker_port=int(port_text),
        metastore_port=_int(raw, "DS_METASTORE_PORT", minimum=1, maximum=65535),
        shared_memory_mb=_int(raw, "DS_SHARED_MEMORY_MB", minimum=64),
        spill_dir=Path(spill) if spill else None,
        spill_size_mb=_int(raw, "DS_SPILL_SIZE_MB", minimum=1),
        local_workers=_int(raw, "DS_WORKERS", minimum=1, maximum=16),
        node_worker_port=node_worker_port,
        populate_shared_memory=_flag(raw, "DS_SHARED_MEMORY_POPULATE"),
        node_hosts=node_hosts,
    )


def _connector(raw: Mapping[str, str | None]) -> str:
    value = str(raw["KV_CONNECTOR"]).strip()
    if value not in KV_CONNECTORS:
        raise _fail("KV_CONNECTOR", raw["KV_CONNECTOR"], f"must be one of {', '.join(KV_CONNECTORS)}")
    return value


def _connector_extra(raw: Mapping[str, str | None]) -> dict[str, object]:
    value = raw["KV_CONNECTOR_EXTRA_CONFIG"] or "{}"
    try:
        extra = json.loads(value)
    except ValueError:
        extra = None
    if not isinstance(extra, dict):
        raise _fail("KV_CONNECTOR_EXTRA_CONFIG", value, 'must be a JSON object, e.g. {"shared_storage_path": "/data/kv"}')
    if raw["KV_CONNECTOR"] == "ExampleConnector" and "shared_storage_path" not in extra:
        extra["shared_storage_path"] = str(Path(raw["RUN_DIR"] or PROJECT_ROOT) / EXAMPLE_KV_DIR)
    return extra


def _check_consistency(config: ServiceConfig) -> None:
    if config.adaptive_roles:
        check_adaptive(config)
    kind = config.connector.kind
    try:
        block_size = config.kv_block_size
    except ValueError:
        block_size = 0
    if block_size <= 0:
        raise ConfigError("--block-size in PREFILL_STARTUP_PARAMS/DECODE_STARTUP_PARAMS is invalid: must be an integer > 0")
    if kind == NO_CONNECTOR and config.disaggregated:
        raise ConfigError(f"KV_CONNECTOR={kind} is invalid with DECODE_INS_NUM={config.decode_instances}: "
                          "prefill/decode disaggregation hands KV over through a connector; set DECODE_INS_NUM=0")  # fmt: skip
    if config.using_prefix_connector and kind != YUANRONG_CONNECTOR:
        raise ConfigError(f"USING_PREFIX_CONNECTOR=1 is invalid with KV_CONNECTOR={kind}: prefix reuse through the "
                          f"data system is {YUANRONG_CONNECTOR}'s; set USING_PREFIX_CONNECTOR=0")  # fmt: skip
    if config.simulated_engines and config.dp_mode == "vllm":
        raise _fail("DP_MODE", "vllm", "must be independent with ENGINE_KIND=simulated (a simulated engine runs one DP rank)")
    if config.dp_mode == "vllm" and config.kv_events and max(config.prefill_dp, config.decode_dp) > 1:
        raise ConfigError(f"ROUTING_POLICY={config.routing_policy} is invalid with DP_MODE=vllm and "
                          f"PDP={config.prefill_dp} DDP={config.decode_dp}: vLLM's own balancer picks the DP rank, so "
                          "the door cannot route by the KV a rank holds; set ROUTING_POLICY=prefix_affinity, or "
                          "DP_MODE=independent")  # fmt: skip
    if config.cluster_mode:
        return  # devices live on the cluster's nodes; the scheduler places the actors
    available = len(config.devices)
    if config.simulated_nodes > available:
        raise _fail("SIMULATED_NODES", config.simulated_nodes, f"must be at most the {available} visible "
                    f"{config.accelerator.value} devices ({','.join(map(str, config.devices))}): every simulated node "
                    "gets at least one; lower it or set VISIBLE_DEVICES")  # fmt: skip
    if config.devices_needed > available:
        cores = f" x CPU_CORES_PER_RANK={config.cpu_cores_per_rank}" if config.cpu_cores_per_rank != 1 else ""
        raise ConfigError(
            f"PREFILL_INS_NUM={config.prefill_instances} x PTP={config.prefill_tp} x PDP={config.prefill_dp} + "
            f"DECODE_INS_NUM={config.decode_instances} x DTP={config.decode_tp} x DDP={config.decode_dp}{cores} "
            f"needs {config.devices_needed} {config.accelerator.value} devices, but only {available} are visible "
            f"({','.join(map(str, config.devices))}); lower the counts or set VISIBLE_DEVICES"
        )
    worker_ports = [int(address.rpartition(":")[2]) for address in config.datasystem.addresses]
    if config.server_port in worker_ports:
        raise ConfigError(
            f"SERVER_PORT={config.server_port} is invalid: a data system worker uses that port "
            f"(DS_WORKER_ADDRESS and DS_WORKERS give {', '.join(config.datasystem.addresses)})"
        )
    if max(worker_ports) > 65535:
        raise _fail("DS_WORKERS", config.datasystem.local_workers, "too many workers for the port after DS_WORKER_ADDRESS")

