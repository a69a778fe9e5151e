"""Streams from the engines to the client: relayed as their chunks arrive, or followed
(door/migration.py) so that a stream its engine breaks goes on on another engine.

Also what the door's legs share: posting a leg's body to an engine (``EngineLegs.post``)
and taking an engine that failed a leg out of rotation (``EngineLegs.failed``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any

from door.door_metrics import DoorMetrics
from door.engine_client import EngineClient, EngineUnreachable, StreamCut, Upstream
from door.legs import Leg
from door.migration import CONTINUATION_PATH, StreamFollower
from door.policies import EngineLoad
from door.routing import SUSPECT_S, RoutingTable
from door.slo import SloCounts, StreamClock

logger = logging.getLogger(__name__)

# Answers that send the request to the next engine. Only "unavailable" ones (and
# transport errors) also take the engine out of rotation for a while: a 500 may be this
# request's own failure, and one bad request must not empty the table.
RETRYABLE_STATUS = (500, 502, 503, 504)
UNAVAILABLE_STATUS = (502, 503, 504)


class EngineLegs:
    """The door's side of its legs to the engines. ``ttft``/``latency``: the door's
    histograms' children by endpoint; ``stream_migrations``: how many times one stream
    may be continued on another engine."""

    def __init__(self, table: RoutingTable, client: EngineClient, metrics: DoorMetrics, ttft: Mapping[str, Any],
                 latency: Mapping[str, Any], stream_migrations: int, slo: SloCounts) -> None:  # fmt: skip
        self.table = table
        self.client = client
        self.metrics = metrics
        self.ttft = ttft
        self.latency = latency
        self.stream_migrations = stream_migrations
        self.slo = slo

    async def post(self, engine: EngineLoad, leg: Leg, payload: bytes, path: str = "") -> Upstream:
        return await self.client.request("POST", engine.host, engine.port, path or leg.path, payload, leg.engine_headers)

    def failed(self, engine: EngineLoad, request_id: str, reason: object, unavailable: bool = True) -> None:
        if unavailable:
            self.table.mark_failed(engine)
        logger.warning("[request=%s engine=%s] failed before answering (%s); trying another engine%s",
                       request_id, engine.name, reason,
                       f" (engine skipped for {SUSPECT_S:.0f} s)" if unavailable else "")  # fmt: skip

    async def relay(self, upstream: Upstream, engine: EngineLoad, leg: Leg) -> None:
        first, complete, clock = True, False, StreamClock(leg.started)
        try:
            async for chunk in upstream.chunks():
                if first:
                    self.ttft[leg.endpoint].observe(time.perf_counter() - leg.started)
                    first = False
                clock.saw(chunk)
                await leg.exchange.write(chunk)
            complete = True
            leg.exchange.end()
            self.slo.stream(leg.endpoint, clock)
        except StreamCut as exc:
            logger.warning("[request=%s engine=%s] stream broke (%s); not continued", leg.request_id, engine.name, exc)
            leg.exchange.abort()
        finally:
            # Done: the connection goes back to the pool. Client gone: closing it makes
            # vLLM abort the request.
            upstream.release() if complete else upstream.close()
            self.table.release(engine)
            self.latency[leg.endpoint].observe(time.perf_counter() - leg.started)

    async def follow(self, upstream: Upstream, engine: EngineLoad, body: dict[str, Any], leg: Leg) -> None:
        """``relay``, for a stream that is continued on another engine if it breaks."""
        follower = StreamFollower(body, chat=leg.endpoint == "chat/completions")
        first, migrations_left, clock = True, self.stream_migrations, StreamClock(leg.started)
        try:
            while True:
                complete, broken, drained = False, None, True
                try:
                    async for chunk in upstream.chunks():
                        relayed = follower.feed(chunk)
                        if relayed and first:
                            self.ttft[leg.endpoint].observe(time.perf_counter() - leg.started)
                            first = False
                        if relayed:
                            clock.saw(relayed)
                            await leg.exchange.write(relayed)
                        if follower.stopped_here:  # a stop string across a cut: the engine is stopped by closing
                            drained = False
                            break
                    complete = follower.finished
                    broken = None if complete else StreamCut(
                        f"the engine sent an error event: {follower.engine_error}" if follower.engine_error
                        else "the stream ended before its last event"
                    )  # fmt: skip
                except StreamCut as exc:
                    broken = exc
                finally:
                    upstream.release() if complete and drained else upstream.close()
                    self.table.release(engine)
                if broken is None:
                    leg.exchange.end()
                    self.slo.stream(leg.endpoint, clock)
                    return
                if follower.finished:  # cut after its last token: end the client's stream
                    if not follower.done_sent:
                        await leg.exchange.write(b"data: [DONE]\n\n")
                    leg.exchange.end()
                    self.slo.stream(leg.endpoint, clock)
                    return
                self.table.mark_failed(engine)
                continuation = follower.continuation() if migrations_left else None
                opened = None if continuation is None else await self._open_stream(engine, continuation, leg)
                if opened is None:
                    self.metrics.migrations.labels("failed").inc()
                    logger.warning("[request=%s engine=%s] stream broke after %d tokens (%s); not continued",
                                   leg.request_id, engine.name, len(follower.generated), broken)  # fmt: skip
                    leg.exchange.abort()  # the client sees its stream end without its last chunk
                    return
                logger.warning("[request=%s engine=%s] stream broke after %d tokens (%s); continued on %s",
                               leg.request_id, engine.name, len(follower.generated), broken, opened[1].name)  # fmt: skip
                self.metrics.migrations.labels("continued").inc()
                migrations_left -= 1
                upstream, engine = opened
                follower.restart()
        finally:
            self.latency[leg.endpoint].observe(time.perf_counter() - leg.started)

    async def _open_stream(self, broken: EngineLoad, body: dict[str, Any], leg: Leg) -> tuple[Upstream, EngineLoad] | None:
        """A continuation's stream from the first other engine that takes it (any engine
        can compute a whole request: decode engines first, then prefill engines)."""
        table = self.table
        roles = ("decode", "prefill") if table.disaggregated else ("colocated",)
        payload = json.dumps(body).encode()  # a completion of token ids, whatever the client's endpoint
        for engine in (engine for role in roles for engine in table.order(role, leg.key) if engine is not broken):
            table.acquire(engine)
            try:
                upstream = await self.post(engine, leg, payload, CONTINUATION_PATH)
            except EngineUnreachable as exc:
                table.release(engine)
                self.failed(engine, leg.request_id, exc)
                continue
            except BaseException:
                table.release(engine)
                raise
            if upstream.status == 200:
                return upstream, engine
            upstream.close()
            table.release(engine)
            self.failed(engine, leg.request_id, f"HTTP {upstream.status}", unavailable=upstream.status in UNAVAILABLE_STATUS)
        return None
