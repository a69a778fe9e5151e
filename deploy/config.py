"""The one typed configuration of a deployment.

This is the only module that reads ``os.environ``. Everything else receives a
:class:`ServiceConfig`. Each setting has an environment name (seed 000's names where
the seed has one) and a command-line flag that overrides it; the flag is the
environment name in lower case with dashes (``PTP`` -> ``--ptp``).

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
from dataclasses import dataclass
from pathlib import Path

from common.config import (
    DP_MODES,
    EXAMPLE_KV_DIR,
    KV_CONNECTORS,
    NO_CONNECTOR,
    ROUTING_POLICIES,
    SIMULATED_NODE_LIMIT,
    VLLM_CONNECTORS,
    YUANRONG_CONNECTOR,
    Accelerator,
    AdmissionConfig,
    ConnectorConfig,
    DataSystemConfig,
    ServiceConfig,
    simulated_node_address,
)
from common.errors import ConfigError
from deploy.master_info import MASTER_INFO_NAME, MasterInfo, read_master_info, tcp_answers

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# vLLM flags the system owns: each engine's address, its parallelism and the KV
# connector are decided by the Controller, never by user pass-through params.
OWNED_ENGINE_FLAGS = (
    "--host",
    "--port",
    "--tensor-parallel-size",
    "-tp",
    "--data-parallel-size",
    "-dp",
    "--data-parallel-rank",
    "--data-parallel-start-rank",
    "--data-parallel-size-local",
    "--data-parallel-address",
    "--data-parallel-rpc-port",
    "--kv-transfer-config",
    "--served-model-name",
    "--headless",
)


@dataclass(frozen=True)
class _Setting:
    env: str
    default: str | None
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.env.lower().replace("_", "-")

    @property
    def dest(self) -> str:
        return self.env.lower()


SETTINGS: tuple[_Setting, ...] = (
    _Setting("SERVER_IP", "127.0.0.1", "address the front door listens on"),
    _Setting("SERVER_PORT", "9000", "port the front door listens on"),
    _Setting("MODEL_PATH", None, "model folder; unset: the embedded random-weight model"),
    _Setting("PREFILL_INS_NUM", "1", "number of prefill instances (colocated when DECODE_INS_NUM=0)"),
    _Setting("DECODE_INS_NUM", "1", "number of decode instances; 0 = PD-colocated (kv_both)"),
    _Setting("PTP", "1", "tensor-parallel size of each prefill instance"),
    _Setting("DTP", "1", "tensor-parallel size of each decode instance"),
    _Setting("PDP", "1", "data-parallel engines per prefill instance"),
    _Setting("DDP", "1", "data-parallel engines per decode instance"),
    _Setting("DP_MODE", "independent", "how an instance's DP ranks run: `independent` (each rank its own vLLM server; the door balances "
             "over them); `vllm` (vLLM's own data parallelism: one engine per node of an instance, the rank-0 "
             'node\'s serving HTTP, the others `--headless`; see "vLLM\'s own data parallelism"). With PDP or '
             'DDP > 1 the routing policy defaults to prefix_affinity, and an explicit '
             '`ROUTING_POLICY=kv_aware` is refused'),
    _Setting("USING_PREFIX_CONNECTOR", "0", "1: every instance reuses prefixes found in the data system"),
    _Setting("KV_CONNECTOR", YUANRONG_CONNECTOR, f"{YUANRONG_CONNECTOR} (ours, through the data system), {NO_CONNECTOR} "
             f"(vanilla vLLM; colocated only) or one of vLLM's: {', '.join(VLLM_CONNECTORS)}"),
    _Setting("KV_CONNECTOR_EXTRA_CONFIG", "{}", "JSON object given to one of vLLM's connectors as `kv_connector_extra_config` "
             '(`ExampleConnector`: `shared_storage_path` defaults to `<RUN_DIR>/example_kv`)'),
    _Setting("ACCELERATOR", None, "cpu, cuda or ascend; unset: detected"),
    _Setting("VISIBLE_DEVICES", None, 'device ids (CPU cores on cpu) engines may use, e.g. 0,1 or 0-3; on cuda/ascend defaults to '
             '`CUDA_VISIBLE_DEVICES` / `ASCEND_RT_VISIBLE_DEVICES`'),
    _Setting("PREFILL_STARTUP_PARAMS", "", "extra vLLM arguments for prefill engines"),
    _Setting("DECODE_STARTUP_PARAMS", "", "extra vLLM arguments for decode engines"),
    _Setting("VLLM_CPU_KVCACHE_SPACE", "1", "KV cache GiB per CPU engine"),
    _Setting("CPU_CORES_PER_RANK", "1", "cpu: cores each TP rank of an engine gets (its threads' `VLLM_CPU_OMP_THREADS_BIND`); an engine "
             'takes TP x this many'),
    _Setting("ENGINE_START_TIMEOUT", "600", "seconds an engine may take to become healthy"),
    _Setting("DS_WORKER_ADDRESS", None, 'local mode: data system worker host:port; unset: 127.0.0.1:31501. Refused in cluster mode (see '
             '`DS_WORKER_PORT`)'),
    _Setting("DS_WORKER_PORT", None, 'cluster mode: port of the data system worker openYuanrong runs on every node; each engine '
             "attaches to `<its node's address>:<port>`; unset: the `ds-worker` port in yr start's master "
             'info, else 31501'),
    _Setting("DS_METASTORE_PORT", "32379", "metastore port of a locally started data system worker"),
    _Setting("DS_SHARED_MEMORY_MB", "2048", 'shared memory (DRAM tier) of each locally started worker'),
    _Setting("DS_SHARED_MEMORY_POPULATE", "1", '1: a locally started worker touches all its shared memory at start (memory committed at once; '
             "no page faults while engines save: measured, reuse then costs nothing on seed 000's workload); "
             '0: on first use'),
    _Setting("DS_SPILL_DIR", None, "SSD spill folder of a locally started worker; unset: no spill"),
    _Setting("DS_SPILL_SIZE_MB", "8192", "SSD spill limit of a locally started worker"),
    _Setting("DS_WORKERS", "1", 'data system workers to start locally (consecutive ports from DS_WORKER_ADDRESS, one cluster; '
             'engines attach in turn)'),
    _Setting("SIMULATED_NODES", "0", 'local mode: split this machine into N simulated nodes (127.0.0.2, 127.0.0.3, ...), each with '
             "its own data system worker at DS_WORKER_ADDRESS's port and a contiguous share of "
             '`VISIBLE_DEVICES` (see "Simulated nodes"); 0: off. Refused in cluster mode, with `DS_WORKERS` > '
             '1, or above the number of visible devices'),
    _Setting("KV_TTL_S", "1800", "seconds a KV block stays in the data system; 0 = until the worker stops"),
    _Setting("KV_REQUEST_TIMEOUT_MS", "2000", 'bound on each data system call; a slower store is a miss and vLLM recomputes'),
    _Setting("DS_EXCLUSIVE_CONNECTIONS", "1", "1: each engine's data system client has its own connection to the worker (the SDK's "
             '`enable_exclusive_connection`; a worker takes 128, an engine uses 3); 0: the shared connection, '
             'whose worker threads busy-loop once the engines saturate the CPU (see "Seed 000\'s workload")'),
    _Setting("KV_HANDOFF_WAIT_MS", "2000", "how long a decode waits for a prefill's KV blocks to be published"),
    _Setting("KV_CHECKSUM", "1", "1: a loaded KV block's checksum is checked before the model sees it (a mismatch is "
             "computed instead, vllm:yuanrong_kv_blocks_total{op=\"load_corrupt\"}); 0: only its key and length"),
    _Setting("ROUTING_POLICY", "kv_aware", 'prefill/colocated routing: round_robin, least_outstanding, prefix_affinity, kv_aware (engines '
             'publish KV events; the door routes every leg, decode too, by the prompt tokens each engine '
             'holds, and skips the prefill leg where `SELECTIVE_PD_TOKENS` says). Unset with `DP_MODE=vllm` '
             'and PDP or DDP > 1: prefix_affinity (vLLM picks the rank; the door cannot see its KV)'),
    _Setting("SELECTIVE_PD_TOKENS", "256", "kv_aware, PD: a request whose prompt the chosen decode engine lacks at most this many "
             "tokens of skips the prefill leg; 0: every request takes both legs"),
    _Setting("MAX_IN_FLIGHT_PER_ENGINE", "128", "requests the door lets each serving (decode or colocated) engine have at once"),
    _Setting("DOOR_QUEUE_SIZE", "256", "requests that may wait at the door for a slot; beyond: 429 at once"),
    _Setting("DOOR_QUEUE_TIMEOUT_S", "30", "seconds a request may wait at the door for a slot; then 429"),
    _Setting("STREAM_MIGRATIONS", "1", 'times a stream (completions or chat) whose engine dies mid-way is continued on another engine '
             "(the prompt's and the generated tokens' ids as the new prompt; the client reads one stream); 0: "
             'never'),
    _Setting("PREFILL_TIMEOUT_S", "120", 'PD: a prefill leg not answered within this many seconds is aborted (the door drops its '
             'connection), its engine suspected, and the decode engine computes the prompt itself'),
    _Setting("WARM_UP_TOKENS", "320", 'new engines (deploy, scale-out) compute one synthetic prompt this long before the door routes '
             'to them, PD engines as a handoff through the data system; 0: no warm-up'),
    _Setting("DOOR_READ_TIMEOUT_S", "60", "seconds a client may take to send one whole request, from its first byte; "
             "then 408 and the connection is closed (a client that sends part of a request and stops holds nothing)"),
    _Setting("DRAIN_TIMEOUT_S", "30", "on clean, SIGTERM or Ctrl-C: seconds requests in flight may take to finish"),
    _Setting("API_KEY", None, 'when set, every HTTP port of the deployment (the door and each engine) needs `Authorization: '
             "Bearer <API_KEY>` (401 in OpenAI's form otherwise), `/health` excepted; the door sends it to "
             'the engines; never logged, never on a command line'),
    _Setting("METRICS_PUBLIC", "0", 'with `API_KEY`: 1 serves `/metrics` (door and engines) without the key, for scrapers without a '
             'bearer token'),
    _Setting("RUN_DIR", None, "where deploy.log, deploy.pid and state.json live; unset: project root"),
    _Setting("YR_SESSIONS_DIR", "/tmp/yr_sessions", 'openYuanrong session folder: each deployment logs to a session of its own, '
             '`vllm-<time>-<pid>/log` (`latest` points at the newest; a deploy process restarted by the '
             'keeper keeps its session)'),
    _Setting("MODEL_CACHE_DIR", None, "where the embedded model is built; unset: <project>/.cache/models"),
    _Setting("YR_SERVER_ADDRESS", None, "openYuanrong cluster address; unset: read yr start's master info "
             f"(<YR_SESSIONS_DIR>/{MASTER_INFO_NAME}, refused when its master does not answer)"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting; a flag given wins over the environment."""
    for setting in SETTINGS:
        parser.add_argument(setting.flag, dest=setting.dest, default=None, metavar=setting.env, help=setting.help)


def build_config(
    environ: Mapping[str, str],
    overrides: argparse.Namespace | None = None,
    master_answers: Callable[[str, int], bool] = tcp_answers,
) -> ServiceConfig:
    """Merge environment and flags, parse and validate every value. ``master_answers``
    checks that the master in yr start's master info accepts a connection."""
    raw: dict[str, str | None] = {}
    given: set[str] = set()  # set by the environment or a flag, not by default
    for setting in SETTINGS:
        value = getattr(overrides, setting.dest, None) if overrides is not None else None
        if value is None:
            value = environ.get(setting.env)
        if value is None or (value == "" and setting.default is None):
            value = setting.default
        else:
            given.add(setting.env)
        raw[setting.env] = value

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
        connector=ConnectorConfig(
            ttl_s=_int(raw, "KV_TTL_S", minimum=0),
            request_timeout_ms=_int(raw, "KV_REQUEST_TIMEOUT_MS", minimum=1),
            handoff_wait_ms=_int(raw, "KV_HANDOFF_WAIT_MS", minimum=0),
            exclusive_connection=_flag(raw, "DS_EXCLUSIVE_CONNECTIONS"),
            check_bytes=_flag(raw, "KV_CHECKSUM"),
            kind=_connector(raw),
            vllm_extra=_connector_extra(raw),
        ),
        routing_policy=_choice(raw, "ROUTING_POLICY", ROUTING_POLICIES),
        selective_pd_tokens=_int(raw, "SELECTIVE_PD_TOKENS", minimum=0),
        admission=AdmissionConfig(
            max_in_flight_per_engine=_int(raw, "MAX_IN_FLIGHT_PER_ENGINE", minimum=1),
            queue_size=_int(raw, "DOOR_QUEUE_SIZE", minimum=0),
            queue_timeout_s=float(_int(raw, "DOOR_QUEUE_TIMEOUT_S", minimum=0)),
        ),
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
    )
    if "ROUTING_POLICY" not in given and config.dp_mode == "vllm" and max(config.prefill_dp, config.decode_dp) > 1:
        # vLLM's own DP balancer picks the rank, so the door cannot see what a rank holds.
        config = dataclasses.replace(config, routing_policy="prefix_affinity")
    _check_consistency(config)
    return config


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


def describe(config: ServiceConfig) -> Sequence[str]:
    """Lines an operator reads at start: what will be deployed."""
    mode = "PD-disaggregated" if config.disaggregated else "PD-colocated"
    lines = [
        f"mode: {mode}, accelerator: {config.accelerator.value}, devices: {','.join(map(str, config.devices))}",
        f"prefill: {config.prefill_instances} instance(s) x TP{config.prefill_tp} x DP{config.prefill_dp}",
    ]
    if config.disaggregated:
        lines.append(f"decode: {config.decode_instances} instance(s) x TP{config.decode_tp} x DP{config.decode_dp}")
    if max(config.prefill_dp, config.decode_dp) > 1:
        lines.append("data parallel: " + ("vLLM's own (one engine per node of an instance, --headless off the "
                                          "rank-0 node)" if config.dp_mode == "vllm" else "one vLLM server per rank"))
    lines.append(f"model: {config.model_path or 'embedded random-weight Qwen2 (gibberish by design)'}")
    lines.append(f"routing: {config.routing_policy} (decode by least outstanding requests)")
    if config.api_key:
        lines.append("API key: required on every port, door and engines (Authorization: Bearer); /health open"
                     + (", /metrics open (METRICS_PUBLIC=1)" if config.metrics_public else ""))  # fmt: skip
    else:
        lines.append("API key: off (door and engines open)")
    lines.append(
        f"overload: {config.admission.max_in_flight_per_engine} requests in flight per serving engine, "
        f"{config.admission.queue_size} waiting at most {config.admission.queue_timeout_s:.0f} s, then 429"
    )
    if config.simulated_nodes:
        lines.append(f"simulated nodes: {config.simulated_nodes} at "
                     f"{', '.join(config.datasystem.node_hosts)} (one data system worker each)")  # fmt: skip
    workers = (f"the data system worker on each engine's node (port {config.datasystem.node_worker_port})"
               if config.cluster_mode else
               f"{len(config.datasystem.addresses)} data system worker(s) at {', '.join(config.datasystem.addresses)}")  # fmt: skip
    lines.append(
        f"KV store: {workers}, "
        f"prefix reuse {'on' if config.using_prefix_connector else 'off'}, TTL {config.connector.ttl_s or 'none'} s"
    )
    lines.append(f"endpoint: http://{config.server_ip}:{config.server_port}")
    return lines
