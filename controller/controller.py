"""The Controller actor: starts every engine actor, waits for them, stops them.

It is created by the deploy process as an openYuanrong actor (detached and named in
cluster mode). Engine actors are created with the resources their engine needs, so
in cluster mode openYuanrong places them on nodes that have those devices.
"""

from __future__ import annotations

import logging
from typing import Any

import yr

from controller.placement import ENGINE_MEMORY_MB
from deploy.config import Accelerator, ServiceConfig
from deploy.errors import StartupError
from workers.engine_actor import EngineActor
from workers.engine_process import EngineSpec
from workers.node_address import host_of

logger = logging.getLogger(__name__)

# openYuanrong custom resource names for accelerators, by the SDK's convention.
_DEVICE_RESOURCE = {Accelerator.CUDA: "GPU/.+/count", Accelerator.ASCEND: "NPU/.+/count"}


def engine_invoke_options(config: ServiceConfig, spec: EngineSpec) -> yr.InvokeOptions:
    # CPU engines ask for their cores (as many as the spec names, or TP x CPU_CORES_PER_RANK when
    # the runtime places them); accelerator engines for one core and their TP group's devices.
    cores = len(spec.devices) or spec.tensor_parallel * config.cpu_cores_per_rank
    cpu = 1000 * cores if config.accelerator is Accelerator.CPU else 1000
    options = yr.InvokeOptions(cpu=cpu, memory=ENGINE_MEMORY_MB)
    resource = _DEVICE_RESOURCE.get(config.accelerator)
    if resource is not None:
        options.custom_resources = {resource: float(spec.tensor_parallel)}
    return options


class Controller:
    def __init__(self, config: ServiceConfig, specs: list[EngineSpec], adopt_ports: dict[str, int] | None = None) -> None:
        """``adopt_ports``: by engine name, the ports of engines an earlier deploy process
        started; those still running and answering are taken over instead of started."""
        self._config = config
        self._specs = specs
        self._adopt_ports = adopt_ports or {}
        self._engines: list[Any] = []
        self._infos: list[dict[str, object]] = []
        self._version = 0

    def initialize(self) -> list[dict[str, object]]:
        """Start all engines in parallel; return their infos, or stop them all and raise."""
        remote_engine = yr.instance(EngineActor)
        # In cluster mode each engine actor finds its node's address by the route toward the master.
        peer = host_of(self._config.yr_server_address) if self._config.yr_server_address else ""
        for spec in self._specs:
            handle = remote_engine.options(engine_invoke_options(self._config, spec)).invoke(
                # Local mode: the engine is reached where it binds (its simulated node's
                # address, else 127.0.0.1); cluster mode (""): its node's address.
                spec, str(self._config.log_dir), self._config.engine_start_timeout_s,
                "" if self._config.cluster_mode else spec.bind_host,
                self._adopt_ports.get(spec.name, 0), peer,
            )
            self._engines.append(handle)
        pending = [(spec, handle.start.invoke()) for spec, handle in zip(self._specs, self._engines)]
        try:
            for done, (spec, ref) in enumerate(pending, start=1):
                info = yr.get(ref, timeout=int(self._config.engine_start_timeout_s) + 60)
                self._infos.append(info)
                logger.info("engine %s healthy on port %s (%d/%d)", spec.name, info["port"], done, len(pending))
        except Exception as exc:
            self.shutdown()
            raise StartupError(f"an engine failed to start: {exc}") from None
        return list(self._infos)

    def snapshot(self) -> tuple[int, list[dict[str, object]]]:
        """The engines as they are now (state healthy, unhealthy, restarting, failed), with
        a version that changes whenever any engine's address or state does. The front door
        polls this off its request path to keep its routing table current."""
        refs = [handle.info.invoke() for handle in self._engines]
        infos = [yr.get(ref, timeout=30) for ref in refs]
        if [_routing_view(i) for i in infos] != [_routing_view(i) for i in self._infos]:
            self._version += 1
            self._infos = infos
        return self._version, list(self._infos)

    def shutdown(self) -> None:
        refs = [handle.stop.invoke() for handle in self._engines]
        for ref in refs:
            try:
                yr.get(ref, timeout=60)
            except Exception as exc:  # keep stopping the others
                logger.error("stopping an engine failed: %s", exc)
        for handle in self._engines:
            try:
                handle.terminate()
            except Exception as exc:
                logger.warning("terminating an engine actor failed: %s", exc)
        self._engines = []


def _routing_view(info: dict[str, object]) -> tuple[object, ...]:
    return info["name"], info["host"], info["port"], info["state"], info.get("events_port", 0), info.get("restarts", 0)
