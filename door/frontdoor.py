"""The OpenAI-compatible front door.

``/v1/completions`` and ``/v1/chat/completions``, streamed (SSE chunks relayed as they
arrive) or not. In a PD deployment a request first goes to a prefill engine with
``max_tokens=1`` and ``kv_transfer_params={"do_remote_decode": true}``; its KV lands in
the data system, and the client's request goes to a decode engine with the
``kv_transfer_params`` the prefill returned. With colocated instances it goes straight
to one of them.

Uvicorn serves the door. These two endpoints are answered by the door's own HTTP layer
(door/http_server.py, the protocol Uvicorn runs; door/engine_client.py,
the engines' side: asyncio protocols and httptools on both); the others (``/health``,
``/metrics``, ``/v1/models``, ``/admin/...``) by the door's FastAPI app.

Per request the door only reads its routing table (no actor call). Engines are tried
in the policy's order: an engine that fails before answering (unreachable, 5xx) is
marked and the leg goes to the next one; when no prefill engine answers, the decode
engine computes the prompt itself. A client that disconnects cancels its request on
the engines (the door closes the engine connection; vLLM aborts the request).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from common.config import SloConfig
from common.role_port import RoleControl
from common.scale_port import ScaleControl
from door.admin import add_admin_routes, add_role_routes, scale_for_planner
from door.admission import Admission
from door.dashboard import add_dashboard_routes
from door.door_metrics import DoorMetrics
from door.engine_client import EngineClient, EngineUnreachable, StreamCut
from door.engine_watch import LEVELS_WINDOW_S, EngineWatch, Refresh
from door.http_server import READ_TIMEOUT_S, Exchange, door_protocol, error_body, error_object
from door.kv_router import KVRouter, RoutedPrompt
from door.legs import REQUEST_ID_HEADER, Leg, decode_request, prefill_request, single_prompt
from door.migration import engine_request, migratable
from door.policies import EngineLoad, affinity_key
from door.routing import RoutingTable
from door.slo import SloCounts
from door.stream_relay import RETRYABLE_STATUS, UNAVAILABLE_STATUS, EngineLegs
from workers.api_key_guard import UNAUTHORIZED_MESSAGE, BearerCheck, KeyGuard

logger = logging.getLogger(__name__)

_CLIENT_CLOSED = 499  # counted when the client left before its answer (nginx's code)


def openai_error(status: int, message: str, error_type: str, param: str | None = None, request_id: str = "",
                 headers: Mapping[str, str] | None = None) -> JSONResponse:  # fmt: skip
    """An OpenAI-form error as a FastAPI response (the door's less frequent endpoints)."""
    body = error_object(status, message, error_type, param)
    all_headers = {**({REQUEST_ID_HEADER: request_id} if request_id else {}), **(headers or {})}
    return JSONResponse(status_code=status, content=body, headers=all_headers or None)


class _Refused(Exception):
    """A request answered with an error before any engine saw it."""

    def __init__(self, status: int, message: str, error_type: str, param: str | None = None,
                 headers: Iterable[tuple[str, str]] = ()) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.error_type, self.param, self.headers = status, error_type, param, tuple(headers)


class FrontDoor:
    """The door: routing table, engine client, the FastAPI app and the HTTP protocol
    Uvicorn serves them with (``uvicorn_config``).

    ``admission``: overload control (None: no limit on requests in flight).
    ``stream_migrations``: how many times one stream (completions or chat) may be continued on
    another engine when its engine's stream breaks (door/migration.py); 0: never.
    ``api_key``: when set, every request must carry ``Authorization: Bearer <key>``
    (workers/api_key_guard.py), /health excepted, and /metrics with ``metrics_public``;
    the door sends the key to its engines, which require it too.
    ``kv_router``: KV-aware routing and selective PD (door/kv_router.py); None: the
    table's policy, and every PD request takes both legs.
    ``scaler``: adds and removes engines at runtime behind ``POST /admin/scale``
    (door/admin.py); None: that endpoint answers 501.
    ``roles``: ROLES=adaptive, the role planner the door reports its service levels to
    (door/engine_watch.py) every ``levels_window_s`` of answers, and ``/admin/roles``
    sets roles through; None: fixed roles.
    ``prefill_timeout_s``: a prefill leg not answered within it is abandoned (the engine
    aborts it and is suspected) and the decode engine computes the prompt itself.
    ``read_timeout_s``: a client's request must arrive whole within it (http_server.py)."""

    def __init__(
        self,
        table: RoutingTable,
        served_model_name: str,
        metrics: DoorMetrics | None = None,
        refresh: Refresh | None = None,
        admission: Admission | None = None,
        api_key: str | None = None,
        stream_migrations: int = 1,
        kv_router: KVRouter | None = None,
        scaler: ScaleControl | None = None,
        metrics_public: bool = False,
        prefill_timeout_s: float = 120.0,
        read_timeout_s: float = READ_TIMEOUT_S,
        slo: SloConfig | None = None,
        roles: RoleControl | None = None,
        levels_window_s: float = LEVELS_WINDOW_S,
    ) -> None:
        self.table = table
        self.served_model_name = served_model_name
        self.metrics = metrics or DoorMetrics()
        self.admission = admission
        self.prefill_timeout_s = prefill_timeout_s
        self.kv_router = kv_router
        self.client = EngineClient(api_key=api_key)
        # Labelled metric children made once (a ``labels()`` call costs ~1 us, per request several).
        self._ttft = {endpoint: self.metrics.ttft.labels(endpoint) for endpoint in _ENDPOINTS}
        self._latency = {endpoint: self.metrics.latency.labels(endpoint) for endpoint in _ENDPOINTS}
        self._counted: dict[tuple[str, int], Any] = {}
        self._bearer = BearerCheck(api_key) if api_key is not None else None
        self.slo = SloCounts(slo or SloConfig(), self.metrics.slo_requests, self.metrics.slo_target)
        self.legs = EngineLegs(table, self.client, self.metrics, self._ttft, self._latency, stream_migrations, self.slo)
        self.watch = EngineWatch(table, refresh, kv_router, self.client, self.metrics, self.slo.levels, roles,
                                 levels_window_s, self._planner_scale if scaler is not None else None)  # fmt: skip
        self._scaler = scaler
        self.app = self._fallback_app(scaler, roles)
        if api_key is not None:
            self.app.add_middleware(KeyGuard, api_key=api_key, metrics_public=metrics_public)
        # The completions paths' handlers, served by the door's own HTTP layer.
        self.handlers: dict[str, Callable[[Exchange], Awaitable[None]]] = {
            "/v1/completions": functools.partial(self._handle, endpoint="completions", required="prompt"),
            "/v1/chat/completions": functools.partial(self._handle, endpoint="chat/completions", required="messages"),
        }
        self.protocol = door_protocol(self.handlers, read_timeout_s)

    def uvicorn_config(self, host: str, port: int, drain_timeout_s: float) -> uvicorn.Config:
        """Uvicorn serving this door. On SIGTERM / Ctrl-C it stops accepting, lets requests
        in flight finish (at most ``drain_timeout_s``), then stops following the engines."""
        return uvicorn.Config(self.app, host=host, port=port, http=self.protocol, log_level="warning",
                              access_log=False, timeout_graceful_shutdown=max(1, round(drain_timeout_s)))  # fmt: skip

    @asynccontextmanager
    async def _lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        """Follow the engines (KV events, the Controller's table) while the door serves."""
        if self.kv_router is not None:
            await self.kv_router.start()
            self.kv_router.follow(self.table.all_engines())
        refresher = self.watch.start()
        try:
            yield
        finally:
            if refresher is not None:
                refresher.cancel()
                await asyncio.gather(refresher, return_exceptions=True)
            if self.kv_router is not None:
                await self.kv_router.close()
            self.client.close()

    # -- the less frequent endpoints (FastAPI) -----------------------------------------
    def _authorized(self, authorization: str) -> bool:
        return self._bearer is None or self._bearer(authorization.encode("latin-1"))

    def _fallback_app(self, scaler: ScaleControl | None, roles: RoleControl | None) -> FastAPI:
        app = FastAPI(title="vLLM on openYuanrong", lifespan=self._lifespan)
        table, metrics = self.table, self.metrics

        @app.get("/health")
        async def health() -> Response:
            if not table.ready:
                return openai_error(503, "no healthy engine can serve a request", "service_unavailable")
            return JSONResponse({"status": "ok"})

        @app.get("/metrics")
        async def prometheus() -> Response:
            table.publish_health()  # an engine's suspect time may have run out since
            return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

        @app.get("/v1/models")
        async def models() -> Response:
            model = {"id": self.served_model_name, "object": "model", "created": int(time.time()), "owned_by": "vllm-on-yr"}
            return JSONResponse({"object": "list", "data": [model]})

        add_admin_routes(app, table, scaler, metrics, self.watch.refresh_once, openai_error)
        add_role_routes(app, table, roles, self.watch, openai_error)
        add_dashboard_routes(app, table, self.watch, metrics, self.slo.slo)
        return app

    async def _planner_scale(self, delta: int) -> None:
        """A scale step the role planner decided, through the scale path ``/admin/scale`` takes."""
        assert self._scaler is not None
        await scale_for_planner(self._scaler, delta, self.table, self.watch.refresh_once, self.metrics)

    # -- completions (the door's own HTTP layer) ---------------------------------------
    async def _handle(self, exchange: Exchange, endpoint: str, required: str) -> None:
        started = time.perf_counter()
        request_id = exchange.headers.get("x-request-id") or uuid.uuid4().hex
        status = _CLIENT_CLOSED
        try:
            status = await self._admitted(exchange, endpoint, required, request_id, started)
        except _Refused as refused:
            status = refused.status
            if status >= 500:  # the door's own failure to serve (4xx: the client's request or the load)
                logger.warning("[request=%s] answered %d: %s", request_id, status, refused)
            exchange.send(status, error_body(status, str(refused), refused.error_type, refused.param),
                          headers=((REQUEST_ID_HEADER, request_id), *refused.headers))  # fmt: skip
        except asyncio.CancelledError:
            if exchange.client_gone:
                self.metrics.cancelled.inc()
                logger.info("[request=%s] client disconnected; cancelled on the engines", request_id)
            raise
        finally:
            counted = self._counted.get((endpoint, status))
            if counted is None:
                counted = self._counted[(endpoint, status)] = self.metrics.requests.labels(endpoint, str(status))
            counted.inc()
        if status != 200 or not exchange.streamed:
            elapsed = time.perf_counter() - started
            self._ttft[endpoint].observe(elapsed)
            self._latency[endpoint].observe(elapsed)
            if status == 200:  # a whole answer: its first token reaches the client with its last byte
                self.slo.whole(endpoint, elapsed)

    def _parsed(self, exchange: Exchange, required: str) -> dict[str, Any]:
        if not self._authorized(exchange.headers.get("authorization", "")):
            raise _Refused(401, UNAUTHORIZED_MESSAGE, "invalid_request_error")
        try:
            body = json.loads(exchange.body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _Refused(400, f"request body is not valid JSON: {exc}", "invalid_request_error") from None
        if not isinstance(body, dict):
            raise _Refused(400, "request body must be a JSON object", "invalid_request_error")
        if required not in body:
            raise _Refused(400, f"'{required}' is required", "invalid_request_error", required)
        model = body.get("model")
        if model in (None, ""):
            body["model"] = self.served_model_name
        elif model != self.served_model_name:
            message = f"The model `{model}` does not exist; this service serves `{self.served_model_name}`"
            raise _Refused(404, message, "NotFoundError", "model")
        return body

    async def _admitted(self, exchange: Exchange, endpoint: str, required: str, request_id: str, started: float) -> int:
        body = self._parsed(exchange, required)
        arrivals, admission, entered = self.watch.arrivals, self.admission, False
        arrivals.saw(body)  # the workload and the load the planner sees arriving (shed or not), and door idle time
        try:
            if admission is not None:
                refusal = await admission.enter(self.table.admission_slots(admission.config.max_in_flight_per_engine))
                if refusal is not None:
                    self.metrics.refused.labels(refusal.value).inc()
                    raise _Refused(429, admission.refused(refusal), "rate_limit_exceeded",
                                   headers=(("Retry-After", str(admission.retry_after_s)),))  # fmt: skip
                entered = True
            return await self._route(exchange, endpoint, body, request_id, started)
        finally:
            arrivals.left()
            if entered:  # a stream holds its slot until it ends
                await admission.leave()  # type: ignore[union-attr]

    async def _route(self, exchange: Exchange, endpoint: str, body: dict[str, Any], request_id: str, started: float) -> int:
        table, kv_router = self.table, self.kv_router
        decision_started = time.perf_counter()
        leg = Leg(exchange, f"/v1/{endpoint}", endpoint, request_id, affinity_key(body), started)
        single = single_prompt(body)
        prompt = kv_router.prompt(body) if kv_router is not None and single else None
        ranker = None if prompt is None else functools.partial(kv_router.order, prompt=prompt)  # type: ignore[union-attr]
        if not table.disaggregated:
            engines = table.order("colocated", leg.key, ranker)
            self.metrics.routing_decision.observe(time.perf_counter() - decision_started)
            self._computed_by(engines, prompt)
            return await self._answer(engines, body, leg, "colocated")
        if not table.healthy("decode") and table.healthy("prefill"):
            # One dead role is not an outage: a prefill engine can compute the whole request.
            self.metrics.whole_on_prefill.inc()
            logger.warning("[request=%s] no healthy decode engine; a prefill engine serves the whole request", request_id)
            prefills = table.order("prefill", leg.key, ranker)
            self._computed_by(prefills, prompt)
            return await self._answer(prefills, body, leg, "prefill")
        decodes = table.order("decode", leg.key, ranker) if prompt is not None else []
        if decodes and kv_router.skip_prefill(decodes[0], prompt, table.adaptive):  # type: ignore[union-attr,arg-type]
            self.metrics.routing_decision.observe(time.perf_counter() - decision_started)
            self.metrics.prefill_skipped.inc()
            logger.debug("[request=%s] %d prompt tokens, %s lacks at most %d: no prefill leg",
                         request_id, prompt.tokens, decodes[0].name, kv_router.selective_pd_tokens)  # type: ignore[union-attr]  # fmt: skip
            self._computed_by(decodes, prompt)
            return await self._decode_or_whole(decodes, body, body, leg, ranker)
        if single and table.adaptive and (idle := self._idle_decodes(table)):
            # Every prefill engine is busy and a decode engine has nothing to stall: it serves the request whole.
            self.metrics.routing_decision.observe(time.perf_counter() - decision_started)
            self.metrics.whole_on_idle_decode.inc()
            self._computed_by(idle, prompt)
            return await self._decode_or_whole(idle, body, body, leg, ranker)
        decode_body = body
        if single:
            prefills = table.order("prefill", leg.key, ranker)
            self.metrics.routing_decision.observe(time.perf_counter() - decision_started)
            self._computed_by(prefills, prompt)
            outcome = await self._prefill(prefills, body, leg)
            if isinstance(outcome, int):
                return outcome  # the prefill refused the request itself (4xx): that is the answer
            if outcome is None:
                self.metrics.fallbacks.inc()
                logger.warning("[request=%s] no prefill engine answered; the decode engine computes the prompt", request_id)
            else:
                decode_body = decode_request(body, outcome)
        return await self._decode_or_whole(self._serving(table, "decode", leg, ranker), decode_body, body, leg, ranker)

    @staticmethod
    def _serving(table: RoutingTable, role: str, leg: Leg, ranker: Any) -> list[EngineLoad]:
        """The engines of ``role`` for a request's next leg; in an adaptive pool turned all colocated
        meanwhile, the colocated ones (each loads a handoff as a decode engine does, or serves whole)."""
        engines = table.order(role, leg.key, ranker)
        return engines or (table.order("colocated", leg.key, ranker) if table.adaptive else [])

    async def _decode_or_whole(self, decodes: list[EngineLoad], decode_body: dict[str, Any], body: dict[str, Any],
                               leg: Leg, ranker: Any) -> int:  # fmt: skip
        """The decode leg; when no decode engine takes it (each found dead or answering a
        server error, e.g. its EngineCore died; or none left) before anything reached the
        client, a prefill engine serves the whole request: a healthy engine never leaves a
        request with 503."""
        try:
            # healthy(), not order(): ordering advances a policy's rotation, and is wanted only on failure.
            more_after = bool(self.table.healthy("prefill") or (self.table.adaptive and self.table.healthy("colocated")))
            return await self._answer(decodes, decode_body, leg, "decode", more_after=more_after)
        except _Refused as refused:
            prefills = [] if refused.status != 503 or leg.exchange.answered else self._serving(self.table, "prefill", leg, ranker)
            if not prefills:
                raise
            self.metrics.whole_on_prefill.inc()
            logger.warning("[request=%s] no decode engine took the request (%s); a prefill engine serves it whole",
                           leg.request_id, refused)  # fmt: skip
            return await self._answer(prefills, body, leg, "prefill")

    @staticmethod
    def _idle_decodes(table: RoutingTable) -> list[EngineLoad]:
        """ROLES=adaptive with one decode engine: when every prefill engine has a request in flight and the
        decode engine none, it serves the request whole ([it]; else []). Several are the planner's to balance."""
        decodes = table.healthy("decode")
        if len(decodes) != 1 or decodes[0].outstanding > 0:
            return []
        if any(engine.outstanding == 0 for engine in table.healthy("prefill")):
            return []
        return decodes

    def _computed_by(self, engines: list[EngineLoad], prompt: RoutedPrompt | None) -> None:
        """``engines[0]`` is to compute ``prompt``: count what it should find cached, and
        hold the prompt's blocks as its own until its KV events confirm them (a prompt
        sharing the head routed meanwhile meets it there)."""
        if prompt is not None and engines:
            self.kv_router.predicted(engines[0], prompt)  # type: ignore[union-attr]
            self.kv_router.routed(engines[0], prompt)  # type: ignore[union-attr]

    async def _prefill(self, engines: list[EngineLoad], body: dict[str, Any], leg: Leg) -> dict[str, Any] | int | None:
        """The prefill's kv_transfer_params; a client error's status (relayed as the
        answer); None if no engine answered."""
        payload = json.dumps(prefill_request(body)).encode()
        for attempt, engine in enumerate(engines):
            if attempt:
                self.metrics.retries.labels("prefill").inc()
            try:
                with self.table.track(engine):
                    async with asyncio.timeout(self.prefill_timeout_s):
                        upstream = await self.legs.post(engine, leg, payload)
                        try:
                            content = await upstream.read()
                        finally:
                            upstream.release()  # unread: the connection is dropped and vLLM aborts the leg
            except (EngineUnreachable, StreamCut) as exc:
                self.legs.failed(engine, leg.request_id, exc)
                continue
            except TimeoutError:
                self.legs.failed(engine, leg.request_id, f"no answer within {self.prefill_timeout_s:g} s (PREFILL_TIMEOUT_S)")
                return None  # a stuck prefill: the decode computes the prompt rather than wait on another
            if upstream.status == 200:
                params = json.loads(content).get("kv_transfer_params")
                return params if isinstance(params, dict) else {}
            if upstream.status in RETRYABLE_STATUS:
                self.legs.failed(engine, leg.request_id, f"HTTP {upstream.status}", unavailable=upstream.status in UNAVAILABLE_STATUS)
                continue
            leg.exchange.send(upstream.status, content, upstream.content_type, leg.headers)
            return upstream.status
        return None

    async def _answer(self, engines: list[EngineLoad], body: dict[str, Any], leg: Leg, role: str,
                      more_after: bool = False) -> int:  # fmt: skip
        """Send the request to the first engine that answers; relay its answer.
        ``more_after``: the caller has other engines to try (a prefill serving the whole
        request): a server error of the last engine here is not relayed but refused (503)."""
        table = self.table
        last_failure = "no healthy engine"
        follow = self.legs.stream_migrations > 0 and migratable(leg.endpoint, body)
        payload = json.dumps(engine_request(body) if follow else body).encode()
        for attempt, engine in enumerate(engines):
            if attempt:
                self.metrics.retries.labels(role).inc()
            table.acquire(engine)  # released once the answer is relayed, or here on failure
            try:
                upstream = await self.legs.post(engine, leg, payload)
            except EngineUnreachable as exc:
                table.release(engine)
                self.legs.failed(engine, leg.request_id, exc)
                last_failure = f"{engine.name} unreachable"
                continue
            except BaseException:
                table.release(engine)
                raise
            if upstream.status in RETRYABLE_STATUS and (attempt + 1 < len(engines) or more_after):
                upstream.close()
                table.release(engine)
                self.legs.failed(engine, leg.request_id, f"HTTP {upstream.status}", unavailable=upstream.status in UNAVAILABLE_STATUS)
                last_failure = f"{engine.name} answered HTTP {upstream.status}"
                continue
            if not body.get("stream") or upstream.status != 200:
                try:
                    content = await upstream.read()
                except StreamCut as exc:
                    upstream.close()
                    table.release(engine)
                    self.legs.failed(engine, leg.request_id, exc)
                    last_failure = f"{engine.name} cut its answer short"
                    continue
                except BaseException:
                    upstream.close()  # on cancellation this drops the connection: vLLM aborts the request
                    table.release(engine)
                    raise
                upstream.release()
                table.release(engine)
                leg.exchange.send(upstream.status, content, upstream.content_type, leg.headers)
                return upstream.status
            leg.exchange.streamed = True
            leg.exchange.start(200, "text/event-stream", leg.headers)
            if follow:
                await self.legs.follow(upstream, engine, body, leg)
            else:
                await self.legs.relay(upstream, engine, leg)
            return 200
        raise _Refused(503, f"no engine could take the request ({last_failure})", "service_unavailable")


_ENDPOINTS = ("completions", "chat/completions")
