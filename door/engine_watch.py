"""The door following the Controller: its engine list copied into the routing table once
a second (``REFRESH_S``), the KV router told which engines to follow and publishing its
gauges, every ``KV_SCRAPE_EVERY`` rounds each engine's KV-hit counters copied into the
door's metrics, and every ``REPORT_EVERY`` rounds (ROLES=adaptive) the service levels
of the last ``LEVELS_WINDOW_S`` reported to the role planner, whose decisions come back;
reported at once when the arriving requests ask for another workload (door/arrivals.py).
The windows and decisions are kept for the dashboard (door/dashboard.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence

from common.role_port import RoleControl
from common.service_levels import ServiceLevels
from door.arrivals import Arrivals
from door.door_metrics import DoorMetrics
from door.engine_client import EngineClient, EngineUnreachable, StreamCut
from door.kv_router import KVRouter
from door.routing import RoutingTable

logger = logging.getLogger(__name__)

REFRESH_S = 1.0  # how often the routing table is refreshed from the Controller
KV_SCRAPE_EVERY = 5  # refreshes between scrapes of the engines' KV token counters
REPORT_EVERY = 5  # refreshes between service-level windows (kept, and reported to the role planner)
LEVELS_WINDOW_S = 20.0  # the window's length by default (PLANNER_WINDOW_S): the planner judges the last 20 s
SERIES_KEPT = 720  # windows kept for the dashboard (an hour at REPORT_EVERY x REFRESH_S)

# A callable returning the Controller's engine list (and its version), run off the
# event loop; None for a fixed table.
Refresh = Callable[[], tuple[int, Sequence[Mapping[str, object]]]]


class EngineWatch:
    def __init__(self, table: RoutingTable, refresh: Refresh | None, kv_router: KVRouter | None,
                 client: EngineClient, metrics: DoorMetrics,
                 levels: Callable[[float, Mapping[str, int]], ServiceLevels] | None = None,
                 roles: RoleControl | None = None, window_s: float = LEVELS_WINDOW_S,
                 scale: Callable[[int], Awaitable[None]] | None = None) -> None:  # fmt: skip
        self.table = table
        self.refresh = refresh
        self.levels = levels  # SloCounts.levels: the window's ServiceLevels
        self.roles = roles
        self.window_s = window_s
        self.scale = scale  # runs a planner's scale step through the scale path (FrontDoor's)
        self.arrivals = Arrivals()  # what the arriving requests ask for (the door tells it; reported with the levels)
        self._steps_seen: set[float] | None = None  # the planner's scale steps run (or decided before this door)
        self._scaling: asyncio.Task[None] | None = None
        # For the dashboard: (wall time, ServiceLevels dict, acting role by engine) per window; the planner's decisions.
        self.series: deque[tuple[float, dict[str, object], dict[str, str]]] = deque(maxlen=SERIES_KEPT)
        self.decisions: list[dict[str, object]] = []
        self.kv_router = kv_router
        self.client = client
        self.metrics = metrics
        self._refreshing: asyncio.Lock | None = None  # made on the door's loop

    def start(self) -> asyncio.Task[None] | None:
        """On the door's loop: the periodic refresh, when there is a Controller to follow."""
        self._refreshing = asyncio.Lock()  # the periodic refresh and the Scaler's: one at a time, in order
        return asyncio.create_task(self._refresh_loop()) if self.refresh is not None else None

    async def refresh_once(self) -> None:
        """Copy the Controller's engine list into the table if it changed."""
        if self.refresh is None:
            return
        assert self._refreshing is not None
        async with self._refreshing:
            version, engines = await asyncio.to_thread(self.refresh)
            if version != self.table.version:
                self.table.update(engines, version)
                if self.kv_router is not None:
                    self.kv_router.follow(self.table.all_engines())
                logger.info("routing table v%d: %s", version, ", ".join(f"{e['name']}={e['state']}" for e in engines))

    async def _refresh_loop(self) -> None:
        rounds = 0
        while True:
            try:
                await self.refresh_once()
                if self.kv_router is not None:
                    self.kv_router.publish()
                if rounds % KV_SCRAPE_EVERY == 0:
                    await self._scrape_kv_tokens()
                if rounds % REPORT_EVERY == REPORT_EVERY - 1 or self._workload_moved():
                    await self.report_levels()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the table stays as it was; try again
                logger.warning("refreshing the routing table failed: %s", exc)
            rounds += 1
            await asyncio.sleep(REFRESH_S)

    async def report_levels(self) -> None:
        """Keep the last window's service levels and, with a role planner, report them."""
        if self.levels is None:
            return
        in_flight = {engine.name: engine.outstanding for engine in self.table.all_engines()}
        window = self.levels(self.window_s, in_flight)
        arrival_rps, arrival_rps_before = self.arrivals.rates(self.window_s)
        window = dataclasses.replace(window, arriving_tokens=self.arrivals.tokens(), arrival_rps=arrival_rps,
                                     arrival_rps_before=arrival_rps_before,
                                     idle_s=self.arrivals.idle_s(window.window_s))  # fmt: skip
        self.arrivals.reported = window.arriving_tokens
        levels = window.as_dict()
        self.series.append((time.time(), levels, {engine.name: engine.acting for engine in self.table.all_engines()}))
        if self.roles is not None and self.table.adaptive:
            self.decisions = await asyncio.to_thread(self.roles.observe, levels)
            self._start_scale_steps()

    def _workload_moved(self) -> bool:
        """An adaptive pool's arriving requests ask for another workload than last
        reported: the planner hears of it within a refresh, not a report period."""
        return self.roles is not None and self.table.adaptive and self.arrivals.moved()

    def _start_scale_steps(self) -> None:
        """The newest scale step the planner decided since the last one, run in the
        background (the table keeps following the Controller meanwhile); one at a time.
        Steps decided before this door's first report (another door process's) are not run."""
        steps = [d for d in self.decisions if d.get("scale")]
        if self._steps_seen is None:
            self._steps_seen = {float(d["at"]) for d in steps}  # type: ignore[arg-type]
            return
        new = [d for d in steps if float(d["at"]) not in self._steps_seen]  # type: ignore[arg-type]
        if not new or self.scale is None:
            return
        self._steps_seen.update(float(d["at"]) for d in new)  # type: ignore[arg-type]
        if self._scaling is not None and not self._scaling.done():
            logger.info("role planner's scale adaptive %+d skipped: a scale step is under way", int(new[-1]["scale"]))  # type: ignore[call-overload]
            return
        self._scaling = asyncio.create_task(self.scale(int(new[-1]["scale"])))  # type: ignore[call-overload]

    async def _scrape_kv_tokens(self) -> None:
        """Copy each engine's prompt-tokens-by-source counters (KV hits) into the door's metrics."""
        for engine in self.table.all_engines():
            try:
                status, body = await self.client.get(engine.host, engine.port, "/metrics", timeout_s=2.0)
            except (EngineUnreachable, StreamCut, TimeoutError):
                continue
            if status != 200:
                continue
            for line in body.decode(errors="replace").splitlines():
                if line.startswith("vllm:prompt_tokens_by_source_total{") and 'source="' in line:
                    source = line.split('source="', 1)[1].split('"', 1)[0]
                    self.metrics.kv_hit_tokens.labels(engine.name, source).set(float(line.rsplit(" ", 1)[1]))
