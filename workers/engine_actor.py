"""The engine actor: starts one vLLM engine, waits until it is healthy, and keeps
supervising it (an engine that exits on its own is restarted, a bounded number of times).

The class is plain Python; the Controller turns it into an openYuanrong actor with
``yr.instance``. Its methods are synchronous (local mode cannot await actor methods).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from common.engine_state import EngineState
from common.errors import StartupError
from common.processes import read_pid, write_pid
from workers.engine_process import (
    AdoptedProcess,
    EngineProcess,
    EngineSpec,
    build_engine_argv,
    build_engine_env,
    is_healthy,
    resolve_on_node,
    start_process,
    stop_process_group,
    wait_until_healthy,
    wait_until_settled,
)
from workers.node_address import routable_address

logger = logging.getLogger(__name__)

MAX_RESTARTS = 3
UNHEALTHY_AFTER = 3  # consecutive failed /health probes
PORT_ATTEMPTS = 3
ADDRESS_IN_USE = "address already in use"  # uvicorn's and zmq's words when a port is taken
HEADLESS_SETTLE_S = 5.0  # a headless engine (no /health) that runs this long has started; its head says when it serves


@dataclass(frozen=True)
class EngineInfo:
    """What the Controller, the front door and ``status`` know of one engine."""

    name: str
    instance: str
    role: str
    devices: tuple[int, ...]
    host: str
    port: int
    pid: int
    log: str
    restarts: int
    state: str  # starting | healthy | restarting | failed | stopped
    events_port: int = 0  # KV events PUB socket (replay on +1); 0: none
    node_id: str = ""  # the planner's node; "" when the runtime chose it (the engine runs at ``host``)
    ds_worker_address: str = ""  # the data system worker it attaches to (host:port, on its node)
    headless: bool = False  # DP_MODE=vllm: ranks off the head's node; no HTTP (port 0), never routed to; healthy: runs

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def free_port_pair(host: str, attempts: int = 50) -> int:
    """A port ``p`` with ``p + 1`` free too (an engine's KV events and their replay)."""
    for _ in range(attempts):
        port = free_port(host)
        if port >= 65534:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port + 1))
            except OSError:
                continue
        return port
    raise StartupError(f"no two consecutive free ports on {host} after {attempts} tries")


class EngineActor:
    def __init__(
        self, spec: EngineSpec, log_dir: str, start_timeout_s: float, advertise_host: str, adopt_port: int = 0,
        peer_host: str = "", adopt_events_port: int = 0,
    ) -> None:
        """``advertise_host``: where the door reaches the engine; "" (cluster mode): this
        node's address, the one that routes toward ``peer_host`` (the openYuanrong master).
        The spec's host-less data system worker address (":port") becomes that node's worker.
        ``adopt_port``: the port an engine started by an earlier deploy process serves on
        (its pid is in the engine's pid file): ``start`` takes that engine over if it still
        runs and answers, instead of starting another; ``adopt_events_port``: where that
        engine publishes its KV events (kept on adoption, so the door's index follows it)."""
        self._advertise_host = advertise_host or routable_address(peer_host)
        spec = resolve_on_node(spec, self._advertise_host)
        self._spec = spec
        self._log_path = Path(log_dir) / f"{spec.name}.log"
        self._start_timeout_s = start_timeout_s
        self._adopt_port = adopt_port
        self._adopt_events_port = adopt_events_port
        self._port = 0 if spec.headless else adopt_port or free_port(spec.bind_host)
        self._process: EngineProcess | None = None
        self._events_port = 0
        self._state = EngineState.STARTING
        self._restarts = 0
        self._missed_probes = 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._supervisor: threading.Thread | None = None

    def start(self) -> dict[str, object]:
        """Start the engine (or adopt the one running) and return its info once /health
        answers; raise StartupError if it cannot."""
        if not self._adopt():
            self._launch_on_free_ports()
        self._supervisor = threading.Thread(target=self._supervise, name=f"supervise-{self._spec.name}", daemon=True)
        self._supervisor.start()
        return self.info()

    def _adopt(self) -> bool:
        """Take over the engine an earlier deploy process started, if it runs and answers;
        one that runs but does not answer is stopped (a fresh one is started instead)."""
        pid = read_pid(self._log_path.with_suffix(".pid"))  # None unless that very process still runs
        if pid is None:
            if self._adopt_port and not self._spec.headless:
                self._port = free_port(self._spec.bind_host)
            return False
        process = AdoptedProcess(pid)
        answers = self._spec.headless or (  # headless: a running process is all there is to check
            self._adopt_port and is_healthy(self._advertise_host, self._adopt_port, timeout_s=5.0)
        )
        if answers:
            with self._lock:
                if self._stopping.is_set():
                    raise StartupError(f"engine {self._spec.name} is being stopped; not adopting it")
                self._process = process
            self._events_port = self._adopt_events_port if self._spec.kv_events else 0
            self._state = EngineState.HEALTHY
            logger.info("[engine=%s] adopted the running engine (pid %d, port %d): no restart, its KV cache kept",
                        self._spec.name, pid, self._port)  # fmt: skip
            return True
        logger.warning("[engine=%s] an engine left by an earlier deploy process (pid %d) does not answer; "
                       "stopping it and starting a new one", self._spec.name, pid)  # fmt: skip
        stop_process_group(process, grace_s=5)
        self._port = 0 if self._spec.headless else free_port(self._spec.bind_host)
        return False

    def _launch_on_free_ports(self) -> None:
        """``_launch``, again on other ports when the engine found one of its ports taken:
        a port is chosen free, then bound by the engine seconds later, and meanwhile another
        engine starting beside it, or an outgoing connection, may take it (seen: 256 engines
        starting on 8 addresses; a restarted engine's KV events port, in CI). A port taken
        does not count as a restart."""
        for attempt in range(1, PORT_ATTEMPTS + 1):
            try:
                self._launch()
                return
            except StartupError as exc:
                if ADDRESS_IN_USE not in str(exc).lower() or attempt == PORT_ATTEMPTS or self._stopping.is_set():
                    raise
                logger.warning("[engine=%s] a port was taken before the engine bound it; starting it on other ports "
                               "(attempt %d of %d)", self._spec.name, attempt + 1, PORT_ATTEMPTS)  # fmt: skip
                self._state = EngineState.STARTING
                if not self._spec.headless:
                    self._port = free_port(self._spec.bind_host)

    def _launch(self) -> None:
        self._events_port = free_port_pair(self._spec.bind_host) if self._spec.kv_events else 0
        argv = build_engine_argv(self._spec, self._port, events_port=self._events_port)
        env = build_engine_env(self._spec, os.environ)
        with self._lock:  # stop() sets _stopping, then takes the lock: either it sees this process or none starts
            if self._stopping.is_set():
                raise StartupError(f"engine {self._spec.name} is being stopped; not starting it")
            logger.info("[engine=%s role=%s] starting on %s:%d (node %s, data system worker %s), log %s",
                        self._spec.name, self._spec.role.value, self._advertise_host, self._port,
                        self._spec.node_id or "chosen by the runtime", self._spec.ds_worker_address,
                        self._log_path)  # fmt: skip
            process = self._process = start_process(argv, env, self._log_path)
        # clean reads this to stop the engine even if the deploy process is gone.
        write_pid(self._log_path.with_suffix(".pid"), process.pid)
        try:
            if self._spec.headless:
                settle_s = min(HEADLESS_SETTLE_S, self._start_timeout_s)
                wait_until_settled(process, settle_s, self._log_path, self._spec.name)
            else:
                wait_until_healthy(process, self._advertise_host, self._port, self._start_timeout_s, self._log_path,
                                   self._spec.name)  # fmt: skip
        except StartupError:
            if not self._stopping.is_set():
                self._state = EngineState.FAILED
            stop_process_group(process)
            raise
        self._state = EngineState.HEALTHY
        what = "running headless (serving once its head is healthy)" if self._spec.headless else "healthy"
        logger.info("[engine=%s] %s (pid %d)", self._spec.name, what, process.pid)

    def _supervise(self) -> None:
        while not self._stopping.wait(1.0):
            process = self._process
            if process is None:
                continue
            if process.poll() is None:
                self._check_health()
                continue
            if self._stopping.is_set():
                return
            logger.error("[engine=%s] exited unexpectedly with code %s", self._spec.name, process.returncode)
            # Its children (vLLM's EngineCore, workers) outlive it, holding memory and cores.
            stop_process_group(process, grace_s=0)
            if self._restarts >= MAX_RESTARTS:
                self._state = EngineState.FAILED
                logger.error("[engine=%s] gave up after %d restarts; see %s", self._spec.name, self._restarts, self._log_path)
                return
            self._restarts += 1
            self._state = EngineState.RESTARTING
            if self._stopping.wait(min(2**self._restarts, 10)):  # back-off, cut short by stop()
                return
            try:
                self._launch_on_free_ports()
            except StartupError as exc:
                logger.error("[engine=%s] restart %d failed: %s", self._spec.name, self._restarts, exc)

    def _check_health(self) -> None:
        """A running engine that misses UNHEALTHY_AFTER /health probes in a row is
        unhealthy until it answers again (one slow answer under load is not a failure)."""
        if self._state not in (EngineState.HEALTHY, EngineState.UNHEALTHY) or self._spec.headless:  # headless: its process is the probe
            return
        if is_healthy(self._advertise_host, self._port, timeout_s=5.0):
            self._missed_probes = 0
            state = EngineState.HEALTHY
        else:
            self._missed_probes += 1
            state = EngineState.UNHEALTHY if self._missed_probes >= UNHEALTHY_AFTER else self._state
        if state != self._state:
            logger.warning("[engine=%s] is %s", self._spec.name, state)
            self._state = state

    def info(self) -> dict[str, object]:
        process = self._process
        return EngineInfo(
            name=self._spec.name,
            instance=self._spec.instance,
            role=self._spec.role.value,
            devices=self._spec.devices,
            host=self._advertise_host,
            port=self._port,
            pid=process.pid if process is not None else -1,
            log=str(self._log_path),
            restarts=self._restarts,
            state=self._state,
            events_port=self._events_port,
            node_id=self._spec.node_id,
            ds_worker_address=self._spec.ds_worker_address,  # resolved on its node in __init__
            headless=self._spec.headless,
        ).to_dict()

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            process = self._process
        if process is not None and process.poll() is None:
            logger.info("[engine=%s] stopping pid %d", self._spec.name, process.pid)
            stop_process_group(process)
        elif process is not None:
            stop_process_group(process, grace_s=0)  # reap the group's stragglers
        self._log_path.with_suffix(".pid").unlink(missing_ok=True)
        self._state = EngineState.STOPPED
