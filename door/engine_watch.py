"""The door following the Controller: its engine list copied into the routing table once
a second (``REFRESH_S``), the KV router told which engines to follow and publishing its
gauges, and every ``KV_SCRAPE_EVERY`` rounds each engine's KV-hit counters copied into
the door's metrics."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence

from door.door_metrics import DoorMetrics
from door.engine_client import EngineClient, EngineUnreachable, StreamCut
from door.kv_router import KVRouter
from door.routing import RoutingTable

logger = logging.getLogger(__name__)

REFRESH_S = 1.0  # how often the routing table is refreshed from the Controller
KV_SCRAPE_EVERY = 5  # refreshes between scrapes of the engines' KV token counters

# A callable returning the Controller's engine list (and its version), run off the
# event loop; None for a fixed table.
Refresh = Callable[[], tuple[int, Sequence[Mapping[str, object]]]]


class EngineWatch:
    def __init__(self, table: RoutingTable, refresh: Refresh | None, kv_router: KVRouter | None,
                 client: EngineClient, metrics: DoorMetrics) -> None:  # fmt: skip
        self.table = table
        self.refresh = refresh
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
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the table stays as it was; try again
                logger.warning("refreshing the routing table failed: %s", exc)
            rounds += 1
            await asyncio.sleep(REFRESH_S)

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
