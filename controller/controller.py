"""The Controller actor: starts every engine actor, waits for them, stops them; at
runtime it adds engines and drains and removes them (controller/scaling.py decides which).

It is created by the deploy process as an openYuanrong actor (detached and named in
cluster mode) with ``CONTROLLER_CONCURRENCY``: its methods run in threads, so the door's
``snapshot`` every second is answered while ``add_engines`` waits a minute for engines to
start (with the SDK's default of 1, calls queue behind each other). A lock guards the
engine list. Engine actors are created with the resources their engine needs, so in
cluster mode openYuanrong places them on nodes that have those devices; with a plan, a
required affinity also keeps each on the planner's node (controller/node_affinity.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import yr

from common.config import Accelerator, ServiceConfig
from common.engine_state import EngineState
from common.errors import ConfigError, StartupError
from common.service_levels import ServiceLevels
from controller.adaptive_roles import AdaptiveRoles
from controller.node_affinity import NODE_LABEL, node_affinities, node_label_value
from controller.placement import ENGINE_MEMORY_MB
from workers.engine_actor import EngineActor
from workers.engine_process import EngineSpec
from workers.node_address import host_of
from workers.warm_up import warm_up

logger = logging.getLogger(__name__)

# openYuanrong custom resource names for accelerators, by the SDK's convention.
_DEVICE_RESOURCE = {Accelerator.CUDA: "GPU/.+/count", Accelerator.ASCEND: "NPU/.+/count"}
# Threads the Controller actor's methods run in (snapshot beside a scale operation beside
# a shutdown); set on its InvokeOptions by the deploy process.
CONTROLLER_CONCURRENCY = 4
STOP_TIMEOUT_S = 60


def engine_invoke_options(config: ServiceConfig, spec: EngineSpec) -> yr.InvokeOptions:
    # CPU engines ask for their cores (as many as the spec names, or TP x CPU_CORES_PER_RANK per
    # DP rank it runs when the runtime places them); accelerator engines for one core and the
    # devices of their TP groups (one per DP rank it runs: several under DP_MODE=vllm).
    cores = len(spec.devices) or spec.tensor_parallel * spec.local_ranks * config.cpu_cores_per_rank
    cpu = 1000 * cores if config.accelerator is Accelerator.CPU else 1000
    options = yr.InvokeOptions(cpu=cpu, memory=ENGINE_MEMORY_MB)
    resource = _DEVICE_RESOURCE.get(config.accelerator)
    if resource is not None:
        options.custom_resources = {resource: float(spec.tensor_parallel * spec.local_ranks)}
    if config.cluster_mode and spec.node_id:
        # The planner chose the node (controller/node_affinity.py): required, so the engine
        # lands there or fails to schedule instead of running where the plan did not count it.
        # The spec carries the node's id only; its IP is the one in the agent id.
        affinities = node_affinities(spec.node_id)
        if affinities:
            options.schedule_affinities = affinities
            logger.info("[engine=%s] pinned to node %s (%s=%s, required)", spec.name, spec.node_id, NODE_LABEL,
                        node_label_value(spec.node_id))  # fmt: skip
        else:
            logger.warning("[engine=%s] not pinned to planned node %s: its id holds no IP for the %s label; "
                           "the scheduler places it by its resources", spec.name, spec.node_id, NODE_LABEL)  # fmt: skip
    return options


class Controller:
    def __init__(
        self, config: ServiceConfig, specs: list[EngineSpec], adopt_ports: dict[str, tuple[int, int]] | None = None
    ) -> None:
        """``adopt_ports``: by engine name, the (HTTP, KV events) ports of engines an earlier
        deploy process started; those still running and answering are taken over instead
        of started."""
        self._config = config
        self._specs = list(specs)
        self._adopt_ports = adopt_ports or {}
        self._engines: list[Any] = []  # engine actor handles, in the order of _specs
        self._infos: list[dict[str, object]] = []
        self._draining: set[str] = set()
        self._adding: set[str] = set()  # names of engines add_engines is starting now
        self._version = 0
        self._closed = False  # shut down: engines that finish starting now are stopped, not listed
        self._lock = threading.Lock()
        # ROLES=adaptive: each engine's acting role, the planner, its decisions (else None).
        self._roles = AdaptiveRoles([spec.name for spec in specs], config.prefill_instances, config.decode_instances,
                                    config.slo, config.planner, config.admission.max_in_flight_per_engine,
                                    ) if config.adaptive_roles else None  # fmt: skip

    def initialize(self) -> list[dict[str, object]]:
        """Start all engines in parallel; return their infos, or stop them all and raise."""
        handles = [self._create(spec, *self._adopt_ports.get(spec.name, (0, 0))) for spec in self._specs]
        with self._lock:
            self._engines = handles
        try:
            infos = self._await_started(self._specs, handles)
        except StartupError:
            self.shutdown()
            raise
        # Adopted engines (a restarted deploy process took them over) are warm already.
        self._warm_up(self._specs, [info for info in infos if info["name"] not in self._adopt_ports], [])
        with self._lock:
            self._infos = infos = self._with_acting(infos)
        return list(infos)

    def add_engines(self, specs: Sequence[EngineSpec]) -> list[dict[str, object]]:
        """Start engines beside the running ones, in parallel; once all are healthy they
        join the engine list (and the next snapshot). If one fails, the new ones are
        stopped and StartupError says why; the running engines are not touched."""
        names = [spec.name for spec in specs]
        with self._lock:
            taken = {spec.name for spec in self._specs} | self._adding
            clash = sorted(taken.intersection(names))
            if clash or len(set(names)) != len(names):
                raise ConfigError(f"engine name(s) {', '.join(clash) or ', '.join(names)} are in use already; "
                                  "each engine needs a name of its own")  # fmt: skip
            self._adding.update(names)
        try:
            handles = [self._create(spec) for spec in specs]
            try:
                infos = self._await_started(specs, handles)
            except StartupError:
                _stop_handles(handles)
                raise
            with self._lock:
                running = list(self._infos)
            self._warm_up(specs, infos, running)
            with self._lock:
                closed = self._closed
                if not closed:
                    if self._roles is not None:
                        self._roles.added(names, time.time())
                    self._specs.extend(specs)
                    self._engines.extend(handles)
                    self._infos.extend(self._with_acting(infos))
                    self._version += 1
            if closed:
                _stop_handles(handles)
                raise StartupError(f"the deployment is shutting down; {', '.join(names)} stopped again")
            return infos
        finally:
            with self._lock:
                self._adding.difference_update(names)

    def set_draining(self, name: str, draining: bool = True) -> None:
        """From now on the snapshot reports ``name`` as draining: the door sends it nothing
        new, and the requests it has finish. ``draining=False``: it serves again (a scale-in
        that was aborted)."""
        with self._lock:
            self._index_of(name)
            if draining:
                self._draining.add(name)
            else:
                self._draining.discard(name)

    def remove_engine(self, name: str) -> dict[str, object]:
        """Drop ``name`` from the engine list (the snapshot's version changes), then stop its
        process group and its actor; return its last info."""
        with self._lock:
            index = self._index_of(name)
            self._specs.pop(index)
            handle = self._engines.pop(index)
            info = self._infos.pop(index) if index < len(self._infos) else {"name": name}
            self._draining.discard(name)
            self._version += 1
            if self._roles is not None:
                self._roles.removed(name, time.time())
        _stop_handles([handle])
        logger.info("[engine=%s] removed (pid %s)", name, info.get("pid"))
        return info

    def snapshot(self) -> tuple[int, list[dict[str, object]]]:
        """The engines as they are now (state healthy, unhealthy, restarting, failed, or
        draining), with a version that changes whenever any engine's address or state
        does, or engines come or go. The front door polls this off its request path to
        keep its routing table current."""
        with self._lock:
            handles = list(self._engines)
        # The actor calls run outside the lock: a scale operation does not wait behind them.
        infos = [yr.get(ref, timeout=30) for ref in [handle.info.invoke() for handle in handles]]
        with self._lock:
            if handles != self._engines:  # engines came or went meanwhile (the version moved): next poll
                return self._version, list(self._infos)
            infos = [{**info, "state": EngineState.DRAINING} if info["name"] in self._draining else info for info in infos]
            infos = self._with_acting(infos)
            if [_routing_view(i) for i in infos] != [_routing_view(i) for i in self._infos]:
                self._version += 1
                self._infos = infos
            return self._version, list(self._infos)

    def _with_acting(self, infos: list[dict[str, object]]) -> list[dict[str, object]]:
        """ROLES=adaptive: each engine's info with its acting role (under the lock)."""
        if self._roles is None:
            return infos
        acting = self._roles.acting
        return [{**info, "acting": acting[str(info["name"])]} if info["name"] in acting else info for info in infos]

    def observe(self, levels: dict[str, object]) -> list[dict[str, object]]:
        """The door's service levels of its last window (common/service_levels.py); with
        ROLES=adaptive the role planner may change engines' acting roles (the next
        snapshot has them). Returns the planner's decisions so far, oldest first."""
        if self._roles is None:
            return []
        with self._lock:
            self._roles.observe(ServiceLevels.from_dict(levels), time.time())
            return list(self._roles.decisions)

    def set_roles(self, roles: dict[str, str], reason: str = "set by an operator") -> dict[str, object]:
        """Set adaptive engines' acting roles (``POST /admin/roles``): the decision, or
        ``{"error": why}`` when the deployment is not ROLES=adaptive or a name or role is
        unknown (a plain answer: an exception would reach the caller wrapped by the runtime)."""
        if self._roles is None:
            return {"error": "roles are fixed in this deployment (ROLES=fixed); deploy with ROLES=adaptive to change them"}
        with self._lock:
            try:
                return self._roles.set(roles, reason, time.time()).as_dict()
            except ConfigError as exc:
                return {"error": str(exc)}

    def shutdown(self) -> None:
        with self._lock:
            handles, self._engines, self._specs, self._infos = self._engines, [], [], []
            self._closed = True
        _stop_handles(handles)

    def _create(self, spec: EngineSpec, adopt_port: int = 0, adopt_events_port: int = 0) -> Any:
        # Local mode: the engine is reached where it binds (its simulated node's address, else
        # 127.0.0.1). Cluster mode (""): the engine actor finds its node's address by the
        # route toward the master.
        advertise = "" if self._config.cluster_mode else spec.bind_host
        peer = host_of(self._config.yr_server_address) if self._config.yr_server_address else ""
        return yr.instance(EngineActor).options(engine_invoke_options(self._config, spec)).invoke(
            spec, str(self._config.log_dir), self._config.engine_start_timeout_s, advertise, adopt_port, peer,
            adopt_events_port,
        )

    def _await_started(self, specs: Sequence[EngineSpec], handles: Sequence[Any]) -> list[dict[str, object]]:
        """Start each engine (all at once) and wait for all; StartupError on the first failure."""
        pending = [(spec, handle.start.invoke()) for spec, handle in zip(specs, handles)]
        infos = []
        try:
            for done, (spec, ref) in enumerate(pending, start=1):
                info = yr.get(ref, timeout=int(self._config.engine_start_timeout_s) + 60)
                infos.append(info)
                logger.info("engine %s healthy on port %s (%d/%d)", spec.name, info["port"], done, len(pending))
        except Exception as exc:
            raise StartupError(f"an engine failed to start: {exc}") from None
        return infos

    def _warm_up(self, specs: Sequence[EngineSpec], new: list[dict[str, object]], running: list[dict[str, object]]) -> None:
        """Before new engines join the engine list (the door routes to them): their KV path
        runs once end to end (workers/warm_up.py); ``WARM_UP_TOKENS=0``: not."""
        tokens = self._config.warm_up_tokens
        if tokens <= 0 or not new or not specs:
            return
        names = ", ".join(str(info["name"]) for info in new)
        logger.info("warming up %s: one %d-token prompt each (PD: a handoff through the data system)", names, tokens)
        result = warm_up(new, running, specs[0].served_model_name, tokens, self._config.api_key)
        for failure in result.failed:
            logger.warning("warm-up failed (the engine serves; its first request may be slower): %s", failure)
        logger.info("warm-up of %s done in %.1f s", ", ".join(result.engines) or "no engine", result.seconds)

    def _index_of(self, name: str) -> int:
        for index, spec in enumerate(self._specs):
            if spec.name == name:
                return index
        raise ConfigError(f"engine {name} is not running; running: {', '.join(s.name for s in self._specs) or 'none'}")


def _stop_handles(handles: Sequence[Any]) -> None:
    refs = [handle.stop.invoke() for handle in handles]
    for ref in refs:
        try:
            yr.get(ref, timeout=STOP_TIMEOUT_S)
        except Exception as exc:  # keep stopping the others
            logger.error("stopping an engine failed: %s", exc)
    for handle in handles:
        try:
            handle.terminate()
        except Exception as exc:
            logger.warning("terminating an engine actor failed: %s", exc)


def _routing_view(info: dict[str, object]) -> tuple[object, ...]:
    return (info["name"], info["host"], info["port"], info["state"], info.get("events_port", 0), info.get("restarts", 0),
            info.get("acting"))
