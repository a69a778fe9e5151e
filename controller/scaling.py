"""Scale-out and scale-in at runtime: the Scaler, run by the door's admin endpoint
(door/admin.py) in a thread, one operation at a time.

Scale-out (``delta > 0``): place the new instances (controller/scale_plan.py), have the
Controller start their engines beside the running ones (``add_engines``: they join its
engine list only once healthy), make the door refresh its routing table at once and wait
until the table shows them healthy: from then on they serve. A failed start stops the new
engines and changes nothing else.

Scale-in (``delta < 0``): the instances of the role with the highest indices are marked
draining in the Controller (``set_draining``); the door refreshes at once and routes
nothing new to them (``RoutingTable.order`` skips a draining engine); the Scaler waits
until the door's table shows none of their requests in flight, at most DRAIN_TIMEOUT_S;
then the Controller stops and drops them (``remove_engine``) and the door refreshes
again. Requests in flight finish; only a request still running when DRAIN_TIMEOUT_S runs
out is cut (the result says how many).

Errors (common/errors.py's tree): ``ConfigError`` refuses an operation before anything
changed (a wrong role, the last instance, no free devices); ``StartupError``: new engines
failed to start (they were stopped again); ``ScaleBusy``: another operation is under way.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yr

from common.config import Role, ServiceConfig
from common.engine_state import EngineState
from common.errors import ConfigError
from common.scale_port import MAX_SCALE_STEP, DoorView, EngineView, Progress, ScaleBusy, check_delta
from controller.placement import engine_specs
from controller.scale_plan import instances_to_remove, next_indices, place_more, resolve_role
from workers.engine_process import EngineSpec

logger = logging.getLogger(__name__)

ROUTED_TIMEOUT_S = 10.0  # for the door's table to show engines added or removed
POLL_S = 0.1
CALL_MARGIN_S = 120  # on top of an engine's start timeout, for an actor call to return

class EngineControl(Protocol):
    """What the Scaler asks of the Controller (``ActorControl`` over the actor; tests fake it)."""

    def add_engines(self, specs: Sequence[EngineSpec]) -> list[dict[str, object]]: ...

    def set_draining(self, name: str, draining: bool = True) -> None: ...

    def remove_engine(self, name: str) -> dict[str, object]: ...


class ActorControl:
    """``EngineControl`` through the Controller actor's handle (blocking calls)."""

    def __init__(self, handle: Any, engine_start_timeout_s: float) -> None:
        self._handle = handle
        self._start_timeout_s = int(engine_start_timeout_s) + CALL_MARGIN_S

    def add_engines(self, specs: Sequence[EngineSpec]) -> list[dict[str, object]]:
        return list(yr.get(self._handle.add_engines.invoke(list(specs)), timeout=self._start_timeout_s))

    def set_draining(self, name: str, draining: bool = True) -> None:
        yr.get(self._handle.set_draining.invoke(name, draining), timeout=60)

    def remove_engine(self, name: str) -> dict[str, object]:
        return dict(yr.get(self._handle.remove_engine.invoke(name), timeout=CALL_MARGIN_S))


@dataclass(frozen=True)
class ScaleResult:
    role: str
    delta: int
    added: list[dict[str, object]] = field(default_factory=list)  # name, url, pid, devices
    removed: list[dict[str, object]] = field(default_factory=list)  # name, pid, in_flight_at_stop
    seconds: float = 0.0  # from the request to the table routing as it should
    phases: dict[str, float] = field(default_factory=dict)  # out: place_s, start_s, route_s; in: drain_s, stop_s, route_s
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class Scaler:
    def __init__(
        self,
        controller: EngineControl,
        config: ServiceConfig,
        model_path: Path,
        served_model_name: str,
        ds_worker_addresses: Sequence[str],
        specs: Sequence[EngineSpec],
        cores: Sequence[int] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """``specs``: the engines running now (the Scaler keeps this list as it adds and
        removes); ``cores``: this process's CPU affinity (default: read it)."""
        self._controller = controller
        self._config = config
        self._model_path = model_path
        self._served_model_name = served_model_name
        self._ds_worker_addresses = tuple(ds_worker_addresses)
        self._specs = list(specs)
        self._cores = tuple(cores) if cores is not None else tuple(sorted(os.sched_getaffinity(0)))
        self._clock = clock
        self._sleep = sleep
        self._busy = threading.Lock()
        self._progress: Progress | None = None

    @property
    def progress(self) -> Progress | None:
        """The operation under way, or None."""
        return self._progress

    @property
    def specs(self) -> list[EngineSpec]:
        return list(self._specs)

    def scale(self, role_word: str, delta: int, door: DoorView) -> ScaleResult:
        """Add ``delta`` instances of the role (remove ``-delta``); blocks until done."""
        if not self._busy.acquire(blocking=False):
            under_way = self._progress
            what = f" ({under_way.operation}: {under_way.phase})" if under_way is not None else ""
            raise ScaleBusy(f"another scale operation is under way{what}; retry when it has ended")
        try:
            if not check_delta(delta):
                raise ConfigError(f"delta {delta!r} is invalid: must be a non-zero integer from -{MAX_SCALE_STEP} to {MAX_SCALE_STEP}")
            role = resolve_role(role_word, self._config.disaggregated, self._config.adaptive_roles)
            started = self._clock()
            self._progress = Progress(f"{role.value} {delta:+d}", "placing", started)
            if delta > 0:
                return self._scale_out(role, delta, door, started)
            return self._scale_in(role, -delta, door, started)
        finally:
            self._progress = None
            self._busy.release()

    def _scale_out(self, role: Role, count: int, door: DoorView, started: float) -> ScaleResult:
        indices = next_indices(role, self._specs, count)
        more = place_more(self._config, role, indices, self._specs, self._ds_worker_addresses, self._cores)
        warnings = []
        if more.shared_cores:
            warnings.append(f"no free cpu core for {count} more {role.value} instance(s): they share core(s) "
                            f"{','.join(map(str, more.shared_cores))} with running engines (CPU engines can share "
                            "cores; each runs slower)")  # fmt: skip
            logger.warning("[scale %s +%d] %s", role.value, count, warnings[-1])
        specs = engine_specs(self._config, more.placements, self._model_path, self._served_model_name)
        names = [spec.name for spec in specs]
        routed_names = [spec.name for spec in specs if not spec.headless]  # the door's table lists no headless engine
        self._phase(f"starting {', '.join(names)}")
        logger.info("[scale %s +%d] starting %s", role.value, count, ", ".join(
            f"{s.name} (devices {','.join(map(str, s.devices)) or 'chosen by the runtime'})" for s in specs))  # fmt: skip
        placed = self._clock()
        infos = self._controller.add_engines(specs)
        healthy = self._clock()
        self._specs.extend(specs)
        self._phase(f"routing to {', '.join(names)}")
        if not self._wait_for_door(door, lambda view: all(view.get(n, ("", 0))[0] == EngineState.HEALTHY for n in routed_names),
                                   ROUTED_TIMEOUT_S):  # fmt: skip
            warnings.append(f"the door's routing table did not show {', '.join(names)} healthy within "
                            f"{ROUTED_TIMEOUT_S:.0f} s; its next refresh will")  # fmt: skip
        routed = self._clock()
        added = [{"name": info["name"], "url": f"http://{info['host']}:{info['port']}", "pid": info["pid"],
                  "devices": list(info.get("devices") or ())} for info in infos]  # type: ignore[call-overload]  # fmt: skip
        logger.info("[scale %s +%d] %s serving %.1f s after the request (engine start %.1f s)",
                    role.value, count, ", ".join(names), routed - started, healthy - placed)  # fmt: skip
        return ScaleResult(role.value, count, added=added, seconds=round(routed - started, 3), warnings=warnings,
                           phases={"place_s": round(placed - started, 3), "start_s": round(healthy - placed, 3),
                                   "route_s": round(routed - healthy, 3)})  # fmt: skip

    def _scale_in(self, role: Role, count: int, door: DoorView, started: float) -> ScaleResult:
        instances = instances_to_remove(role, self._specs, count)
        names = [spec.name for spec in self._specs if spec.instance in instances]
        removed: list[dict[str, object]] = []
        try:
            return self._drain_and_remove(role, count, names, removed, door, started)
        except BaseException:
            # Aborted (a Controller call failed, the door went away): the engines it did not
            # remove serve again instead of staying drained, unused, for ever.
            for name in names[len(removed):]:
                try:
                    self._controller.set_draining(name, False)
                    logger.warning("[scale %s -%d] aborted: %s serves again", role.value, count, name)
                except Exception as exc:
                    logger.error("[scale %s -%d] aborted, and %s could not be taken out of draining: %s",
                                 role.value, count, name, exc)  # fmt: skip
            raise

    def _drain_and_remove(self, role: Role, count: int, names: list[str], removed: list[dict[str, object]],
                          door: DoorView, started: float) -> ScaleResult:  # fmt: skip
        """``removed`` gets each engine as it is removed (the caller un-drains the rest if this raises)."""
        for name in names:
            self._controller.set_draining(name)
        logger.info("[scale %s -%d] draining %s (at most DRAIN_TIMEOUT_S=%.0f s)", role.value, count, ", ".join(names),
                    self._config.drain_timeout_s)  # fmt: skip
        self._phase(f"draining {', '.join(names)}")
        drained = self._wait_for_door(door, lambda view: self._drained(view, names), self._config.drain_timeout_s)
        view = door.engines()
        left = {name: view.get(name, ("", 0))[1] for name in names}
        warnings = []
        if not drained:
            warnings.append(f"{', '.join(names)} did not drain within DRAIN_TIMEOUT_S={self._config.drain_timeout_s:.0f} s: "
                            f"{sum(left.values())} request(s) still in flight are cut")  # fmt: skip
            logger.warning("[scale %s -%d] %s", role.value, count, warnings[-1])
        drained_at = self._clock()
        self._phase(f"stopping {', '.join(names)}")
        for name in names:
            info = self._controller.remove_engine(name)
            self._specs = [spec for spec in self._specs if spec.name != name]
            removed.append({"name": name, "pid": info.get("pid"), "in_flight_at_stop": left[name]})
        stopped = self._clock()
        self._wait_for_door(door, lambda view: not any(name in view for name in names), ROUTED_TIMEOUT_S)
        routed = self._clock()
        logger.info("[scale %s -%d] removed %s %.1f s after the request (drain %.1f s)",
                    role.value, count, ", ".join(names), routed - started, drained_at - started)  # fmt: skip
        return ScaleResult(role.value, -count, removed=removed, seconds=round(routed - started, 3), warnings=warnings,
                           phases={"drain_s": round(drained_at - started, 3), "stop_s": round(stopped - drained_at, 3),
                                   "route_s": round(routed - stopped, 3)})  # fmt: skip

    def _drained(self, view: EngineView, names: Sequence[str]) -> bool:
        """The door routes nothing new to them (it shows them draining, or gone) and none
        of their requests is in flight."""
        rows = [view[name] for name in names if name in view]
        if any(state != EngineState.DRAINING for state, _ in rows):
            return False
        in_flight = sum(count for _, count in rows)
        if in_flight:
            self._phase(f"draining {', '.join(names)}: {in_flight} request(s) in flight")
        return in_flight == 0

    def _wait_for_door(self, door: DoorView, done: Callable[[EngineView], bool], timeout_s: float) -> bool:
        """Refresh the door's table now, then poll it until ``done`` (True) or the time is up."""
        deadline = self._clock() + timeout_s
        next_refresh = self._clock()
        while True:
            if self._clock() >= next_refresh:  # the door's own loop refreshes too; this is sooner
                try:
                    door.refresh_now()
                except Exception as exc:  # its periodic refresh will catch up
                    logger.warning("refreshing the door's routing table failed: %s", exc)
                next_refresh = self._clock() + 1.0
            if done(door.engines()):
                return True
            if self._clock() >= deadline:
                return False
            self._sleep(POLL_S)

    def _phase(self, phase: str) -> None:
        if self._progress is not None:
            self._progress = Progress(self._progress.operation, phase, self._progress.started)
