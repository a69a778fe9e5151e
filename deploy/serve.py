"""The deployment's long-running process (started in the background by ``deploy``).

Order: session folders -> yr.init -> placement plan (refused here, before anything
starts, when it cannot be placed) -> data system worker (local mode) -> model ->
Controller actor -> engines healthy -> state.json -> front door until SIGTERM ->
engines, worker and runtime stopped in ``finally``, whatever happened before.

``--adopt`` (the keeper, deploy/keeper.py, restarting a deploy process that was killed):
engines and data system workers the killed process started and that still run and
answer are taken over as they are (no model reload, their KV kept) instead of started.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
import yr

from common.config import ServiceConfig
from common.errors import ConfigError, DeployError
from common.processes import read_pid
from controller.controller import CONTROLLER_CONCURRENCY, Controller
from controller.placement import engine_specs, place_engines
from controller.planner import Node, format_plan, inventory_from_resource_view
from controller.scale_plan import adopted_specs
from controller.scaling import ActorControl, Scaler
from deploy import config as config_module
from deploy.datasystem import start_workers, stop_workers, worker_answers
from deploy.describe import describe
from deploy.embedded_model import ensure_embedded_model
from deploy.runtime import CONTROLLER_NAME, CONTROLLER_NAMESPACE, finalize_yr, init_yr, resource_view
from deploy.settings import add_arguments
from deploy.state import READY_MARKER, DeploymentState
from door.builder import build_door, build_kv_router
from door.door_metrics import DoorMetrics
from door.gc_tuning import tune_gc_for_serving
from workers.engine_process import EngineSpec

logger = logging.getLogger(__name__)


def prepare_session(config: ServiceConfig, previous: DeploymentState | None) -> Path:
    """This deployment's own session folder: the one a killed deploy process recorded
    (adoption), else a new ``<sessions>/vllm-<time>-<pid>``, with ``latest`` pointed at it
    (as openYuanrong does: the newest session). Other deployments' sessions are never
    used: their logs and pid files are theirs."""
    if previous is not None and previous.log_dir and Path(previous.log_dir).is_dir():
        return Path(previous.log_dir).parent
    session = config.sessions_dir / f"{time.strftime('vllm-%Y%m%d-%H%M%S')}-{os.getpid()}"
    (session / "log").mkdir(parents=True, exist_ok=True)
    staging = config.sessions_dir / f".latest-{os.getpid()}"
    staging.unlink(missing_ok=True)
    staging.symlink_to(session.name)
    os.replace(staging, config.sessions_dir / "latest")  # atomic: readers see the old or the new one
    return session


def initial_state(config: ServiceConfig, previous: DeploymentState | None, mode: str, ds_addresses: tuple[str, ...]) -> DeploymentState:
    """What state.json says while this process starts. Adopting (``previous``: what a killed
    deploy process left), the engines and the data system workers stay recorded as this
    deployment's until this process has them: killed again meanwhile, the keeper still
    restarts it, and ``clean`` still stops them."""
    return DeploymentState(
        pid=os.getpid(),
        endpoint=f"http://{config.server_ip}:{config.server_port}",
        yr_mode=mode,
        served_model_name=previous.served_model_name if previous is not None else "",
        ds_worker_address=",".join(ds_addresses) or f"each node's, port {config.datasystem.node_worker_port}",
        ds_started_here=previous is not None and previous.ds_started_here,
        log_dir=str(config.log_dir),
        engines=list(previous.engines) if previous is not None else [],
    )


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def serve(config: ServiceConfig, adopt: bool = False) -> int:
    """Start the deployment and serve until SIGTERM; stop what was started, whatever happened."""
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    previous = DeploymentState.read(config.state_file) if adopt else None
    config = dataclasses.replace(config, session_dir=prepare_session(config, previous))
    for line in describe(config):
        logger.info("%s", line)
    mode = init_yr(config)
    # Locally deploy starts its own workers; in a cluster each engine uses its node's worker.
    ds_addresses = config.datasystem.addresses if not config.cluster_mode else ()
    state = initial_state(config, previous, mode, ds_addresses)
    state.write(config.state_file)
    started = _Started()
    try:
        placements = place_engines(config, ds_addresses, _cluster_inventory(config))
        for line in format_plan(placements) if placements is not None else ["placement: left to the scheduler"]:
            logger.info("%s", line)
        if not config.cluster_mode:
            _start_datasystem(config, previous, state, started)
        model_path = config.model_path or ensure_embedded_model(config.model_cache_dir)
        state.served_model_name = str(model_path)
        specs = engine_specs(config, placements, model_path, state.served_model_name)
        if previous is not None:  # the engines as scale operations left them
            specs = adopted_specs(config, specs, previous.engines, model_path, state.served_model_name)
        started.controller = _start_controller(config, previous, specs)
        state.engines = yr.get(started.controller.initialize.invoke(), timeout=int(config.engine_start_timeout_s) * 2 + 120)
        state.write(config.state_file)
        scaler = Scaler(ActorControl(started.controller, config.engine_start_timeout_s), config, model_path,
                        state.served_model_name, ds_addresses, specs)  # fmt: skip
        _run_door(config, state, started.controller, scaler, str(model_path))
        return 0
    except DeployError as exc:
        logger.error("deploy failed: %s", exc)
        return exc.exit_code
    except Exception as exc:  # an actor error arrives wrapped; report its text
        logger.error("deploy failed: %s", exc)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # finish cleaning even if signalled again
        _shut_down(config, started)


@dataclasses.dataclass
class _Started:
    """What this process started and must stop."""

    datasystem: bool = False  # local data system workers (started or adopted here)
    controller: Any = None  # the Controller actor's handle


def _start_datasystem(config: ServiceConfig, previous: DeploymentState | None, state: DeploymentState,
                      started: _Started) -> None:  # fmt: skip
    """Local mode: start the data system workers, adopt a killed deploy process's, or use
    workers someone else started (and leave them running). Workers are marked for stopping
    before they start, so that a start that fails half-way is cleaned up too."""
    running = [address for address in config.datasystem.addresses if worker_answers(address)]
    if running and len(running) < len(config.datasystem.addresses):
        raise ConfigError(
            f"DS_WORKER_ADDRESS={config.datasystem.address} is invalid: workers answer at {', '.join(running)} "
            f"but not at the rest of {', '.join(config.datasystem.addresses)}; start all of them or none"
        )
    if running and previous is not None and previous.ds_started_here:  # the killed deploy process's
        started.datasystem = state.ds_started_here = True
        state.write(config.state_file)
        logger.info("adopted the data system worker(s) at %s (their KV kept)", ", ".join(running))
        return
    if running:  # workers someone else started: used as they are, and left running by clean
        logger.info("using the data system worker(s) already running at %s", ", ".join(running))
        return
    started.datasystem = state.ds_started_here = True
    state.write(config.state_file)
    start_workers(config.datasystem, config.log_dir.parent / "datasystem")


def _start_controller(config: ServiceConfig, previous: DeploymentState | None, specs: list[EngineSpec]) -> Any:
    """The Controller actor, created (its engines start in ``initialize``); adopting, it is
    given the ports the killed deploy process's engines listen on."""
    logger.info("starting %d engine(s): %s; logs in %s", len(specs), ", ".join(s.name for s in specs), config.log_dir)
    options = yr.InvokeOptions()
    options.concurrency = CONTROLLER_CONCURRENCY  # snapshot answers while a scale operation waits for engines
    if config.cluster_mode:
        options.name = CONTROLLER_NAME
        options.namespace = CONTROLLER_NAMESPACE
        options.custom_extensions = {"lifecycle": "detached"}
    adopt_ports = {str(e["name"]): (int(e["port"]), int(e.get("events_port", 0) or 0))  # type: ignore[call-overload]
                   for e in previous.engines} if previous is not None else {}  # fmt: skip
    return yr.instance(Controller).options(options).invoke(config, specs, adopt_ports)


def _run_door(config: ServiceConfig, state: DeploymentState, controller: Any, scaler: Scaler, model_path: str) -> None:
    """Serve the door until SIGTERM / Ctrl-C: Uvicorn then stops accepting, lets requests in
    flight finish (at most DRAIN_TIMEOUT_S) and returns; the engines are stopped after."""
    written_version = -1

    def refresh() -> tuple[int, list[dict[str, object]]]:
        """The Controller's engine list for the door; state.json follows it (restarts,
        new pids, health), so `status` and `clean` see what runs now."""
        nonlocal written_version
        version, engines = yr.get(controller.snapshot.invoke(), timeout=60)
        if version != written_version:
            state.engines = engines
            state.write(config.state_file)
            written_version = version
        return version, engines

    metrics = DoorMetrics()
    kv_router = build_kv_router(config, model_path, metrics) if config.kv_events else None
    roles = ControllerRoles(controller) if config.adaptive_roles else None
    door = build_door(config, state.engines, state.served_model_name, metrics, refresh, kv_router, scaler, roles=roles)
    server = uvicorn.Server(door.uvicorn_config(config.server_ip, config.server_port, config.drain_timeout_s))
    tune_gc_for_serving()
    logger.info("%s %s", READY_MARKER, state.endpoint)
    server.run()


class ControllerRoles:
    """The door's role planner (common/role_port.py): the Controller actor's."""

    def __init__(self, controller: Any) -> None:
        self._controller = controller

    def observe(self, levels: dict[str, object]) -> list[dict[str, object]]:
        return yr.get(self._controller.observe.invoke(levels), timeout=60)  # type: ignore[no-any-return]

    def set_roles(self, roles: dict[str, str], reason: str) -> dict[str, object]:
        answer: dict[str, object] = yr.get(self._controller.set_roles.invoke(roles, reason), timeout=60)
        if "error" in answer:
            raise ConfigError(str(answer["error"]))
        return answer


def _shut_down(config: ServiceConfig, started: _Started) -> None:
    """Stop the engines (through the Controller), the data system workers this deployment
    started, and the runtime; remove state.json and the pid file (when it is ours)."""
    logger.info("shutting down")
    if started.controller is not None:
        try:
            yr.get(started.controller.shutdown.invoke(), timeout=120)
            started.controller.terminate()
        except Exception as exc:
            logger.error("stopping engines through the Controller failed: %s", exc)
    if started.datasystem:
        stop_workers(config.datasystem.addresses)
    finalize_yr()
    config.state_file.unlink(missing_ok=True)
    if read_pid(config.pid_file) == os.getpid():
        config.pid_file.unlink(missing_ok=True)
    logger.info("stopped")


def _cluster_inventory(config: ServiceConfig) -> list[Node] | None:
    """Cluster mode: the planner's inventory from openYuanrong's resource view, if it has one."""
    if not config.cluster_mode:
        return None
    view = resource_view()
    return inventory_from_resource_view(view, config.datasystem.node_worker_port) if view else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deploy.serve")
    add_arguments(parser)
    parser.add_argument("--adopt", action="store_true", help="take over what a killed deploy process left running")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = config_module.build_config(os.environ, args)
    except DeployError as exc:
        logger.error("%s", exc)
        return exc.exit_code
    return serve(config, adopt=args.adopt)


if __name__ == "__main__":
    sys.exit(main())
