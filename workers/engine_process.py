"""One vLLM engine as a child process: argv and env built by pure functions, started in
its own process group, health-checked, and stopped with SIGTERM, a wait, then SIGKILL.

An engine is one vLLM server of one DP rank (``DP_MODE=independent``), or, under vLLM's
own data parallelism (``DP_MODE=vllm``, ``EngineSpec.data_parallel``), the ranks of one
instance on one node: the head (the rank-0 node's; it serves HTTP and balances over all
ranks) or a headless engine (``vllm serve --headless``: no HTTP port, its ranks connect to
the head's DP address and RPC port).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from common.config import Accelerator, Role
from common.errors import StartupError
from common.processes import pid_alive, process_start_ticks
from workers.api_key_guard import ENGINE_MIDDLEWARE, KEY_VARIABLE, METRICS_PUBLIC_VARIABLE
from workers.kv_events_config import kv_events_args

logger = logging.getLogger(__name__)

CONNECTOR_CLASS = "YuanRongConnector"
CONNECTOR_MODULE = "patch.yuanrong_connector.connector"
SIM_ENGINE_MODULE = "workers.sim_engine.server"


@dataclass(frozen=True)
class VllmDataParallel:
    """vLLM's own data parallelism for one engine: ``size_local`` of its instance's
    ``size`` DP ranks, from ``start_rank`` on, run by this engine on its node (vllm 0.32
    ``--data-parallel-*``). Start rank 0 is the head; any other engine runs headless."""

    size: int  # the instance's DP ranks, all nodes together
    size_local: int  # ranks this engine runs
    start_rank: int  # its first rank (the ranks of a node are consecutive)
    address: str  # the head's node address, where headless engines connect; "": the node the head runs on
    rpc_port: int  # the head's DP handshake port (the same on every engine of the instance)

    @property
    def headless(self) -> bool:
        return self.start_rank > 0


@dataclass(frozen=True)
class EngineSpec:
    """Everything needed to start one engine (one vLLM server)."""

    name: str  # e.g. prefill-0-dp0: also the log file's name
    instance: str  # e.g. prefill-0
    role: Role
    accelerator: Accelerator
    tensor_parallel: int
    devices: tuple[int, ...]  # CPU cores, CUDA or Ascend ids; tensor_parallel groups of them; see runtime_placed
    model_path: str
    served_model_name: str
    startup_params: tuple[str, ...]
    ds_worker_address: str  # host:port; ":port" is the worker on the node the engine runs on (resolve_on_node)
    prefix_reuse: bool
    project_root: str
    cache_root: str
    cpu_kvcache_gb: int
    # Where the engine's HTTP server and KV event sockets listen: loopback or a simulated
    # node's address in local mode; "" (cluster mode): its node's address (resolve_on_node).
    # Never every interface.
    bind_host: str = "127.0.0.1"
    connector: str = "yuanrong"  # or "none", or a vLLM connector's name (deploy.config.KV_CONNECTORS)
    connector_options: Mapping[str, object] = field(default_factory=dict)  # more kv_connector_extra_config
    extra_env: Mapping[str, str] = field(default_factory=dict)
    node_id: str = ""  # the planner's node; "" when the runtime chooses it
    # Cluster mode: the runtime placed the engine actor and made its devices visible to it
    # (CUDA_VISIBLE_DEVICES / ASCEND_RT_VISIBLE_DEVICES); with no devices in the spec, the
    # engine keeps what the runtime set instead of getting an empty list.
    runtime_placed: bool = False
    kv_events: bool = False  # publish KV cache events (the door's kv_aware routing follows them)
    data_parallel: VllmDataParallel | None = None  # DP_MODE=vllm with DP > 1; None: one rank, its own server
    api_key: str | None = field(default=None, repr=False)  # set: every path but /health needs it (api_key_guard)
    metrics_public: bool = False  # with api_key: /metrics served without it
    sim_profile: str | None = None  # set: a simulated engine (workers/sim_engine) with this cost profile

    @property
    def headless(self) -> bool:
        """No HTTP server: the process is supervised, the door never routes to it."""
        return self.data_parallel is not None and self.data_parallel.headless

    @property
    def local_ranks(self) -> int:
        """DP ranks this engine runs (its devices are that many TP groups)."""
        return self.data_parallel.size_local if self.data_parallel is not None else 1


def resolve_on_node(spec: EngineSpec, node_address: str) -> EngineSpec:
    """The spec with what is known only once the engine actor runs on its node, completed
    with the node's address: an empty bind host (cluster mode: the engine listens on its
    node's address alone), a host-less data system worker address (":31501", the worker
    on the engine's own node: openYuanrong runs one per node), and an empty DP address (a
    head whose instance has no headless engine: its ranks meet on its own node)."""
    if not spec.bind_host:
        spec = replace(spec, bind_host=node_address)
    if spec.ds_worker_address.startswith(":"):
        spec = replace(spec, ds_worker_address=f"{node_address}{spec.ds_worker_address}")
    if spec.data_parallel is not None and not spec.data_parallel.address:
        spec = replace(spec, data_parallel=replace(spec.data_parallel, address=node_address))
    return spec


def kv_transfer_config(spec: EngineSpec) -> dict[str, object] | None:
    """vLLM's --kv-transfer-config for this engine; None: no connector (vanilla vLLM)."""
    if spec.connector == "none":
        return None
    if spec.connector != "yuanrong":
        return {"kv_connector": spec.connector, "kv_role": spec.role.kv_role,
                "kv_connector_extra_config": dict(spec.connector_options)}  # fmt: skip
    return {
        "kv_connector": CONNECTOR_CLASS,
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": spec.role.kv_role,
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {
            "ds_worker_address": spec.ds_worker_address,
            "prefix_reuse": spec.prefix_reuse,
            **spec.connector_options,
        },
    }


# CPU engines share the cores with the data system worker and the front door, which
# must answer within milliseconds (a starved data system worker times out store calls:
# RPC_RECV_TIMEOUT seen with two engines saturating 2 cores). Engines run at a lower
# priority, so the store and the door get the CPU when they need it and the engines the
# rest; no privileges are needed to lower a priority.
CPU_ENGINE_NICENESS = 5


def build_engine_argv(spec: EngineSpec, port: int, python: str = sys.executable, events_port: int = 0) -> list[str]:
    """``events_port``: with ``spec.kv_events``, the engine publishes its KV events there
    (and replays them on ``events_port + 1``). A headless engine has no HTTP server
    (``port`` unused) and starts through ``vllm serve``: the api_server module ignores
    ``--headless``."""
    if spec.kv_events and spec.data_parallel is not None:
        # vLLM offsets the events ports by DP rank (port + rank would be rank 0's replay port).
        raise ValueError(f"engine {spec.name}: KV events with vLLM's data parallelism are not supported")
    lower_priority = ["nice", "-n", str(CPU_ENGINE_NICENESS)] if spec.accelerator is Accelerator.CPU else []
    entry = ["vllm.entrypoints.cli.main", "serve"] if spec.headless else ["vllm.entrypoints.openai.api_server"]
    if spec.sim_profile is not None:
        entry = [SIM_ENGINE_MODULE, "--sim-profile", spec.sim_profile]
    http = [] if spec.headless else ["--host", spec.bind_host, "--port", str(port)]
    guarded = ["--middleware", ENGINE_MIDDLEWARE] if spec.api_key and not spec.headless else []
    return [
        *lower_priority,
        python,
        "-m",
        *entry,
        "--model",
        spec.model_path,
        "--served-model-name",
        spec.served_model_name,
        *http,
        *guarded,
        "--tensor-parallel-size",
        str(spec.tensor_parallel),
        *data_parallel_args(spec.data_parallel),
        *_kv_transfer_args(spec),
        *(kv_events_args(events_port, spec.name, spec.bind_host) if spec.kv_events and events_port else []),
        *spec.startup_params,
    ]


def data_parallel_args(dp: VllmDataParallel | None) -> list[str]:
    """vLLM's DP flags: the head runs ranks 0.. and waits for the rest at ``address:rpc_port``;
    a headless engine runs its ranks from ``start_rank`` and connects there."""
    if dp is None:
        return []
    if not dp.address:
        raise ValueError("the DP address is unresolved: resolve_on_node completes it on the head's node")
    local = ["--data-parallel-size", str(dp.size), "--data-parallel-size-local", str(dp.size_local)]
    meet = ["--data-parallel-address", dp.address, "--data-parallel-rpc-port", str(dp.rpc_port)]
    if dp.headless:
        return ["--headless", *local, "--data-parallel-start-rank", str(dp.start_rank), *meet]
    return [*local, *meet]


def _kv_transfer_args(spec: EngineSpec) -> list[str]:
    config = kv_transfer_config(spec)
    return [] if config is None else ["--kv-transfer-config", json.dumps(config, separators=(",", ":"))]


def cpu_thread_binding(cores: tuple[int, ...], tensor_parallel: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND: one core list per TP rank, ranks separated by ``|``. For
    an engine running several DP ranks, ``tensor_parallel`` is TP x its local ranks: vLLM
    (utils/ompmultiprocessing.py) takes the lists of local DP rank r at
    ``[r * TP, (r + 1) * TP)`` (mapping [DP, PP, TP])."""
    if len(cores) % tensor_parallel:
        raise ValueError(f"{len(cores)} cores cannot be split evenly over TP={tensor_parallel}")
    per_rank = len(cores) // tensor_parallel
    groups = [cores[i * per_rank : (i + 1) * per_rank] for i in range(tensor_parallel)]
    return "|".join(",".join(str(core) for core in group) for group in groups)


# The variable that gives an engine its devices (CPU: the cores of each TP rank's threads).
DEVICE_VARIABLE = {
    Accelerator.CPU: "VLLM_CPU_OMP_THREADS_BIND",
    Accelerator.CUDA: "CUDA_VISIBLE_DEVICES",
    Accelerator.ASCEND: "ASCEND_RT_VISIBLE_DEVICES",
}


def build_engine_env(spec: EngineSpec, base_env: Mapping[str, str]) -> dict[str, str]:
    """The engine's environment: ``base_env`` (the actor's own) plus what the engine needs.
    Devices: the spec's, or, for an engine the runtime placed with none in its spec, the
    variable exactly as the runtime set it in ``base_env`` (set or unset, never emptied)."""
    env = dict(base_env)
    python_path = [spec.project_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(python_path)
    env["VLLM_CACHE_ROOT"] = spec.cache_root
    env["PYTHONUNBUFFERED"] = "1"
    # The key goes by the environment, never the command line (``ps`` shows that to anyone);
    # a VLLM_API_KEY of the caller's own is not the deployment's key.
    env.pop(KEY_VARIABLE, None)
    env.pop(METRICS_PUBLIC_VARIABLE, None)
    if spec.api_key:
        env[KEY_VARIABLE] = spec.api_key
        env[METRICS_PUBLIC_VARIABLE] = "1" if spec.metrics_public else "0"
    if spec.accelerator is Accelerator.CPU:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(spec.cpu_kvcache_gb)
    if spec.devices:
        ranks = spec.tensor_parallel * spec.local_ranks  # TP ranks of every DP rank it runs
        env[DEVICE_VARIABLE[spec.accelerator]] = (
            cpu_thread_binding(spec.devices, ranks) if spec.accelerator is Accelerator.CPU
            else ",".join(str(d) for d in spec.devices)
        )  # fmt: skip
    elif not spec.runtime_placed:
        # An empty list would leave the engine no device (or bind every thread to nothing).
        raise ValueError(f"engine {spec.name} has no devices and was not placed by the runtime; "
                         "local placement must give every engine its devices")  # fmt: skip
    env.update(spec.extra_env)
    return env


def start_process(argv: list[str], env: Mapping[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a new process group with stdout and stderr appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            argv, env=dict(env), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )


class AdoptedProcess:
    """An engine server started by an earlier deploy process (not this process's child):
    what the supervisor needs of a ``Popen`` (pid, poll, wait), from /proc. It is known by
    its pid and its start time: once it has exited, another process given the same pid is
    not it (a ``Popen`` child's pid cannot be reused before it is reaped; this one's can)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.started = process_start_ticks(pid)
        self.returncode: int | None = None

    @property
    def pid_reused(self) -> bool:
        """The pid now names another process."""
        return pid_alive(self.pid) and process_start_ticks(self.pid) != self.started

    def poll(self) -> int | None:
        if self.returncode is None and (not pid_alive(self.pid) or self.pid_reused):
            self.returncode = -1  # its exit status went to the process that started it
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0.0)
            time.sleep(0.1)
        assert self.returncode is not None
        return self.returncode


EngineProcess = subprocess.Popen[bytes] | AdoptedProcess


def stop_process_group(process: EngineProcess, grace_s: float = 20.0) -> int | None:
    """SIGTERM the whole group, wait up to ``grace_s``, then SIGKILL what is left."""
    pgid = process.pid  # start_new_session made the child its group's leader
    if isinstance(process, AdoptedProcess) and process.pid_reused:
        # Its group is gone with it (a pid is not reused while a group bears its number):
        # the pid's new owner is not ours to signal.
        return process.poll()
    _signal_group(pgid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        logger.warning("[pid=%d] did not stop within %.0f s of SIGTERM; sending SIGKILL", process.pid, grace_s)
    # Children (EngineCore, workers) may outlive the leader: make sure the group is gone.
    _signal_group(pgid, signal.SIGKILL)
    try:
        return process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        return None


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def is_healthy(host: str, port: int, timeout_s: float = 2.0) -> bool:
    """Whether ``GET /health`` answers 200: one request on a plain socket. Every engine
    actor probes its engine each second, all in the deploy process beside the door: 94 us
    of CPU a probe, against 250-275 us through urllib's opener (measured on the 2-core box)."""
    request = f"GET /health HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
    head = b""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as connection:
            connection.sendall(request)
            while b"\r\n" not in head and len(head) < 4096:
                chunk = connection.recv(4096)
                if not chunk:
                    break
                head += chunk
    except (OSError, ValueError):
        return False
    status_line = head.split(b"\r\n", 1)[0].split()
    return len(status_line) >= 2 and status_line[0].startswith(b"HTTP/1.") and status_line[1] == b"200"


def wait_until_healthy(
    process: EngineProcess, host: str, port: int, timeout_s: float, log_path: Path, name: str
) -> None:
    """Block until /health answers 200; raise StartupError if the process dies or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        code = process.poll()
        if code is not None:
            raise StartupError(f"engine {name} exited with code {code} while starting; {failure_summary(log_path)}")
        if is_healthy(host, port):
            return
        time.sleep(0.5)
    raise StartupError(f"engine {name} was not healthy within {timeout_s:.0f} s (ENGINE_START_TIMEOUT); see {log_path}")


def wait_until_settled(process: EngineProcess, settle_s: float, log_path: Path, name: str) -> None:
    """A headless engine has no /health: block ``settle_s`` and raise StartupError if the
    process exits meanwhile (a bad argument, an unreachable head). Its readiness is the
    head's: vLLM's API server answers only once every DP rank has joined."""
    deadline = time.monotonic() + settle_s
    while time.monotonic() < deadline:
        code = process.poll()
        if code is not None:
            raise StartupError(f"engine {name} exited with code {code} while starting; {failure_summary(log_path)}")
        time.sleep(0.2)


_RAISED = re.compile(r"^\s*(?:\([^)]*\)\s*)?[A-Za-z_][\w.]*(?:Error|Exception|Exit)\b:?")  # a traceback's last line


def failure_summary(path: Path, lines: int = 15, causes: int = 6) -> str:
    """What an engine's log says about its death: the exceptions raised (the last line of
    each traceback, the root cause first; vLLM's API server ends its log with "Engine core
    initialization failed. See root cause above", which is all a plain tail shows), then
    the last ``lines`` lines."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    raised = list(dict.fromkeys(line.strip() for line in text if _RAISED.match(line)))[-causes:]
    cause = "exceptions raised:\n  " + "\n  ".join(raised) + "\n" if raised else ""
    return cause + "last log lines:\n" + "\n".join(text[-lines:])
