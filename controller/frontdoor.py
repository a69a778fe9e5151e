"""The OpenAI-compatible front door (FastAPI under Uvicorn).

``/v1/completions`` and ``/v1/chat/completions``, streamed (SSE chunks relayed as they
arrive) or not. In a PD deployment a request first goes to a prefill engine with
``max_tokens=1`` and ``kv_transfer_params={"do_remote_decode": true}``; its KV lands in
the data system, and the client's request goes to a decode engine with the
``kv_transfer_params`` the prefill returned. With colocated instances it goes straight
to one of them.

Per request the door only reads its routing table (no actor call). Engines are tried
in the policy's order: an engine that fails before answering (unreachable, 5xx) is
marked and the leg goes to the next one; when no prefill engine answers, the decode
engine computes the prompt itself. A client that disconnects cancels its request on
the engines (the door closes the engine connection; vLLM aborts the request).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from controller.admin import add_admin_routes
from controller.admission import Admission
from controller.door_metrics import DoorMetrics
from controller.kv_router import KVRouter, RoutedPrompt
from controller.migration import StreamFollower, migratable, with_token_ids
from controller.policies import EngineLoad, affinity_key
from controller.routing import SUSPECT_S, RoutingTable
from controller.scaling import Scaler

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-Id"
REFRESH_S = 1.0  # how often the routing table is refreshed from the Controller
KV_SCRAPE_EVERY = 5  # refreshes between scrapes of the engines' KV token counters
# Answers that send the request to the next engine. Only "unavailable" ones (and
# transport errors) also take the engine out of rotation for a while: a 500 may be this
# request's own failure, and one bad request must not empty the table.
_RETRYABLE_STATUS = (500, 502, 503, 504)
_UNAVAILABLE_STATUS = (502, 503, 504)
_TRANSPORT_ERRORS = (aiohttp.ClientConnectionError, asyncio.TimeoutError)
_STREAM_BROKEN = (aiohttp.ClientPayloadError, *_TRANSPORT_ERRORS)  # an engine's stream cut short
_JSON = {"Content-Type": "application/json"}

# A callable returning the Controller's engine list (and its version), run off the
# event loop; None for a fixed table.
Refresh = Callable[[], tuple[int, Sequence[Mapping[str, object]]]]


class ClientGone(Exception):
    """The client closed its connection before the answer was ready."""


# The door makes many short-lived objects per request; Python's default thresholds
# (700, 10, 10) collect several times a request. Measured on the PD door under 16
# clients, each party in its own process: 299 -> 259 CPU us per request with these.
GC_THRESHOLDS = (50_000, 20, 20)


def tune_gc_for_serving() -> None:
    """Before serving: move what start-up made out of the collector's way (``gc.freeze``,
    as vLLM's API server does) and collect gen 0 less often. Call in the door's process."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def openai_error(status: int, message: str, error_type: str, param: str | None = None, request_id: str = "",
                 headers: Mapping[str, str] | None = None) -> JSONResponse:  # fmt: skip
    body = {"error": {"message": message, "type": error_type, "param": param, "code": status}}
    all_headers = {**({REQUEST_ID_HEADER: request_id} if request_id else {}), **(headers or {})}
    return JSONResponse(status_code=status, content=body, headers=all_headers or None)


def prefill_request(body: dict[str, Any]) -> dict[str, Any]:
    """The prefill leg: the client's request computing only the prompt's KV."""
    leg = {key: value for key, value in body.items() if key not in ("stream_options",)}
    leg.update(max_tokens=1, stream=False, n=1, kv_transfer_params={"do_remote_decode": True})
    if "max_completion_tokens" in leg:
        leg["max_completion_tokens"] = 1
    if "min_tokens" in leg:
        leg["min_tokens"] = min(int(leg["min_tokens"] or 0), 1)
    return leg


def decode_request(body: dict[str, Any], kv_transfer_params: dict[str, Any] | None) -> dict[str, Any]:
    """The decode leg: the client's request plus what the prefill handed over."""
    leg = dict(body)
    if kv_transfer_params:
        leg["kv_transfer_params"] = kv_transfer_params
    return leg


def create_app(
    table: RoutingTable,
    served_model_name: str,
    metrics: DoorMetrics | None = None,
    refresh: Refresh | None = None,
    admission: Admission | None = None,
    api_key: str | None = None,
    stream_migrations: int = 1,
    kv_router: KVRouter | None = None,
    scaler: Scaler | None = None,
) -> FastAPI:
    """``admission``: overload control (None: no limit on requests in flight).
    ``stream_migrations``: how many times one completions stream may be continued on
    another engine when its engine's stream breaks (controller/migration.py); 0: never.
    ``api_key``: when set, every /v1 request must carry ``Authorization: Bearer <key>``
    (as ``vllm serve --api-key``); /health and /metrics stay open for probes and scrapers.
    ``kv_router``: KV-aware routing and selective PD (controller/kv_router.py); None: the
    table's policy, and every PD request takes both legs.
    ``scaler``: adds and removes engines at runtime behind ``POST /admin/scale``
    (controller/admin.py); None: that endpoint answers 501."""
    metrics = metrics or DoorMetrics()
    refreshing = asyncio.Lock()  # the periodic refresh and the Scaler's: one at a time, in order

    def _unauthorized(request: Request) -> Response | None:
        if api_key is None:
            return None
        given = request.headers.get("Authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            return None
        return openai_error(401, "Incorrect or missing API key: send 'Authorization: Bearer <API_KEY>'",
                            "invalid_request_error", request_id=request.headers.get(REQUEST_ID_HEADER, ""))  # fmt: skip

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # One pooled keep-alive client for every engine (aiohttp: ~0.4 ms a round trip here,
        # httpx ~0.9 ms).
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as client:
            app.state.client = client
            if kv_router is not None:
                await kv_router.start()
                kv_router.follow(table.all_engines())
            refresher = asyncio.create_task(_refresh_loop(client)) if refresh is not None else None
            try:
                yield
            finally:
                if refresher is not None:
                    refresher.cancel()
                    await asyncio.gather(refresher, return_exceptions=True)
                if kv_router is not None:
                    await kv_router.close()

    async def _refresh_once() -> None:
        """Copy the Controller's engine list into the table if it changed."""
        if refresh is None:
            return
        async with refreshing:
            version, engines = await asyncio.to_thread(refresh)
            if version != table.version:
                table.update(engines, version)
                if kv_router is not None:
                    kv_router.follow(table.all_engines())
                logger.info("routing table v%d: %s", version, ", ".join(f"{e['name']}={e['state']}" for e in engines))

    async def _refresh_loop(client: aiohttp.ClientSession) -> None:
        assert refresh is not None
        rounds = 0
        while True:
            try:
                await _refresh_once()
                if kv_router is not None:
                    kv_router.publish()
                if rounds % KV_SCRAPE_EVERY == 0:
                    await _scrape_kv_tokens(client, table, metrics)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the table stays as it was; try again
                logger.warning("refreshing the routing table failed: %s", exc)
            rounds += 1
            await asyncio.sleep(REFRESH_S)

    app = FastAPI(title="vLLM on openYuanrong", lifespan=lifespan)

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
    async def models(request: Request) -> Response:
        if (refused := _unauthorized(request)) is not None:
            return refused
        model = {"id": served_model_name, "object": "model", "created": int(time.time()), "owned_by": "vllm-on-yr"}
        return JSONResponse({"object": "list", "data": [model]})

    add_admin_routes(app, table, scaler, metrics, _unauthorized, _refresh_once, openai_error)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _handle(request, "completions", "prompt")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _handle(request, "chat/completions", "messages")

    async def _handle(request: Request, endpoint: str, required: str) -> Response:
        started = time.perf_counter()
        request_id = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
        response = _unauthorized(request) or await _validated(request, endpoint, required, request_id)
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        if not isinstance(response, StreamingResponse):
            elapsed = time.perf_counter() - started
            metrics.ttft.labels(endpoint).observe(elapsed)
            metrics.latency.labels(endpoint).observe(elapsed)
        return response

    async def _validated(request: Request, endpoint: str, required: str, request_id: str) -> Response:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return openai_error(400, f"request body is not valid JSON: {exc}", "invalid_request_error", request_id=request_id)
        if not isinstance(body, dict):
            return openai_error(400, "request body must be a JSON object", "invalid_request_error", request_id=request_id)
        if required not in body:
            return openai_error(400, f"'{required}' is required", "invalid_request_error", required, request_id)
        model = body.get("model")
        if model in (None, ""):
            body["model"] = served_model_name
        elif model != served_model_name:
            message = f"The model `{model}` does not exist; this service serves `{served_model_name}`"
            return openai_error(404, message, "NotFoundError", "model", request_id)
        refusal = await admission.enter(table.serving_engines()) if admission is not None else None
        if refusal is not None:
            assert admission is not None
            metrics.refused.labels(refusal.value).inc()
            message = (f"the service is at capacity ({admission.in_flight} requests in flight, "
                       f"{admission.waiting} waiting; {refusal.value.replace('_', ' ')}); retry later")  # fmt: skip
            return openai_error(429, message, "rate_limit_exceeded", request_id=request_id,
                                headers={"Retry-After": str(admission.retry_after_s)})  # fmt: skip
        try:
            async with _cancel_on_disconnect(request):
                response = await _route(request, endpoint, body, request_id)
        except ClientGone:
            metrics.cancelled.inc()
            logger.info("[request=%s] client disconnected; cancelled on the engines", request_id)
            response = Response(status_code=499)
        except BaseException:
            if admission is not None:
                await admission.leave()
            raise
        if admission is not None:
            if isinstance(response, StreamingResponse):  # the slot is held until the stream ends
                response.body_iterator = _leaving_after(response.body_iterator, admission)
            else:
                await admission.leave()
        return response

    async def _route(request: Request, endpoint: str, body: dict[str, Any], request_id: str) -> Response:
        client: aiohttp.ClientSession = request.app.state.client
        headers = {REQUEST_ID_HEADER: request_id}
        key = affinity_key(body)
        path = f"/v1/{endpoint}"
        prompt = kv_router.prompt(body) if kv_router is not None and _single_prompt(body) else None
        ranker = None if prompt is None else functools.partial(kv_router.order, prompt=prompt)  # type: ignore[union-attr]
        if not table.disaggregated:
            engines = table.order("colocated", key, ranker)
            _predicted(engines, prompt)
            return await _answer(client, engines, path, body, headers, "colocated", key)
        if not table.healthy("decode") and table.healthy("prefill"):
            # One dead role is not an outage: a prefill engine can compute the whole request.
            metrics.whole_on_prefill.inc()
            logger.warning("[request=%s] no healthy decode engine; a prefill engine serves the whole request", request_id)
            return await _answer(client, table.order("prefill", key, ranker), path, body, headers, "prefill", key)
        decodes = table.order("decode", key, ranker) if prompt is not None else []
        if decodes and kv_router.skip_prefill(decodes[0], prompt):  # type: ignore[union-attr,arg-type]
            metrics.prefill_skipped.inc()
            logger.debug("[request=%s] %d prompt tokens, %s lacks at most %d: no prefill leg",
                         request_id, prompt.tokens, decodes[0].name, kv_router.selective_pd_tokens)  # type: ignore[union-attr]  # fmt: skip
            _predicted(decodes, prompt)
            return await _answer(client, decodes, path, body, headers, "decode", key)
        if _single_prompt(body):
            prefills = table.order("prefill", key, ranker)
            _predicted(prefills, prompt)
            outcome = await _prefill(client, prefills, path, body, headers)
            if isinstance(outcome, Response):
                return outcome  # the prefill refused the request itself (4xx): that is the answer
            if outcome is None:
                metrics.fallbacks.inc()
                logger.warning("[request=%s] no prefill engine answered; the decode engine computes the prompt", request_id)
            else:
                body = decode_request(body, outcome)
        return await _answer(client, table.order("decode", key, ranker), path, body, headers, "decode", key)

    def _predicted(engines: list[EngineLoad], prompt: RoutedPrompt | None) -> None:
        if prompt is not None and engines:
            kv_router.predicted(engines[0], prompt)  # type: ignore[union-attr]

    async def _prefill(
        client: aiohttp.ClientSession, engines: list[EngineLoad], path: str, body: dict[str, Any], headers: dict[str, str]
    ) -> dict[str, Any] | Response | None:
        """The prefill's kv_transfer_params; a client error as a Response; None if no engine answered."""
        payload = json.dumps(prefill_request(body)).encode()
        for attempt, engine in enumerate(engines):
            if attempt:
                metrics.retries.labels("prefill").inc()
            try:
                with table.track(engine):
                    async with client.post(f"{engine.url}{path}", data=payload, headers={**headers, **_JSON}) as response:
                        status, content = response.status, await response.read()
                        content_type = response.headers.get("Content-Type", "application/json")
            except _TRANSPORT_ERRORS as exc:
                _failed(engine, headers, exc)
                continue
            if status == 200:
                params = json.loads(content).get("kv_transfer_params")
                return params if isinstance(params, dict) else {}
            if status in _RETRYABLE_STATUS:
                _failed(engine, headers, f"HTTP {status}", unavailable=status in _UNAVAILABLE_STATUS)
                continue
            return Response(content=content, status_code=status, media_type=content_type, headers=headers)
        return None

    async def _answer(
        client: aiohttp.ClientSession,
        engines: list[EngineLoad],
        path: str,
        body: dict[str, Any],
        headers: dict[str, str],
        leg: str,
        key: bytes,
    ) -> Response:
        """Send the request to the first engine that answers; relay its answer."""
        started = time.perf_counter()
        last_failure = "no healthy engine"
        follow = stream_migrations > 0 and migratable(path.removeprefix("/v1/"), body)
        payload = json.dumps(with_token_ids(body) if follow else body).encode()
        for attempt, engine in enumerate(engines):
            if attempt:
                metrics.retries.labels(leg).inc()
            table.acquire(engine)  # released when the answer is relayed, or here on failure
            try:
                upstream = await client.post(f"{engine.url}{path}", data=payload, headers={**headers, **_JSON})
            except _TRANSPORT_ERRORS as exc:
                table.release(engine)
                _failed(engine, headers, exc)
                last_failure = f"{engine.name} unreachable"
                continue
            except BaseException:
                table.release(engine)
                raise
            if upstream.status in _RETRYABLE_STATUS and attempt + 1 < len(engines):
                upstream.close()
                table.release(engine)
                _failed(engine, headers, f"HTTP {upstream.status}", unavailable=upstream.status in _UNAVAILABLE_STATUS)
                continue
            if not body.get("stream") or upstream.status != 200:
                try:
                    content = await upstream.read()
                except BaseException:
                    upstream.close()  # on cancellation this drops the connection: vLLM aborts the request
                    raise
                finally:
                    table.release(engine)
                upstream.release()  # the connection goes back to the pool
                return Response(content=content, status_code=upstream.status,
                                media_type=upstream.headers.get("Content-Type", "application/json"), headers=headers)  # fmt: skip
            if follow:
                chunks = _follow(client, upstream, engine, path, started, body, headers, key)
            else:
                chunks = _relay(upstream, engine, path, started)
            return StreamingResponse(chunks, media_type="text/event-stream", headers=headers)
        return openai_error(503, f"no engine could take the request ({last_failure})", "service_unavailable",
                            request_id=headers[REQUEST_ID_HEADER])  # fmt: skip

    async def _relay(upstream: aiohttp.ClientResponse, engine: EngineLoad, path: str, started: float) -> AsyncIterator[bytes]:
        endpoint = path.removeprefix("/v1/")
        first, complete = True, False
        try:
            async for chunk in upstream.content.iter_any():
                if first:
                    metrics.ttft.labels(endpoint).observe(time.perf_counter() - started)
                    first = False
                yield chunk
            complete = True
        finally:
            # Done: the connection goes back to the pool. Client gone: closing it makes
            # vLLM abort the request.
            upstream.release() if complete else upstream.close()
            table.release(engine)
            metrics.latency.labels(endpoint).observe(time.perf_counter() - started)

    async def _follow(
        client: aiohttp.ClientSession,
        upstream: aiohttp.ClientResponse,
        engine: EngineLoad,
        path: str,
        started: float,
        body: dict[str, Any],
        headers: dict[str, str],
        key: bytes,
    ) -> AsyncIterator[bytes]:
        """``_relay``, for a stream that is continued on another engine if it breaks."""
        endpoint = path.removeprefix("/v1/")
        follower = StreamFollower(body)
        first, migrations_left = True, stream_migrations
        try:
            while True:
                complete, broken = False, None
                try:
                    async for chunk in upstream.content.iter_any():
                        relayed = follower.feed(chunk)
                        if relayed and first:
                            metrics.ttft.labels(endpoint).observe(time.perf_counter() - started)
                            first = False
                        if relayed:
                            yield relayed
                    complete = follower.finished
                    broken = None if complete else aiohttp.ClientPayloadError("the stream ended before its last event")
                except _STREAM_BROKEN as exc:
                    broken = exc
                finally:
                    upstream.release() if complete else upstream.close()
                    table.release(engine)
                if broken is None:
                    return
                if follower.finished:  # cut after its last token: end the client's stream
                    if not follower.done_sent:
                        yield b"data: [DONE]\n\n"
                    return
                table.mark_failed(engine)
                continuation = follower.continuation() if migrations_left else None
                opened = None if continuation is None else await _open_stream(client, engine, path, continuation, headers, key)
                if opened is None:
                    metrics.migrations.labels("failed").inc()
                    logger.warning("[request=%s engine=%s] stream broke after %d tokens (%s); not continued",
                                   headers[REQUEST_ID_HEADER], engine.name, len(follower.generated), broken)  # fmt: skip
                    raise broken
                logger.warning("[request=%s engine=%s] stream broke after %d tokens (%s); continued on %s",
                               headers[REQUEST_ID_HEADER], engine.name, len(follower.generated), broken, opened[1].name)  # fmt: skip
                metrics.migrations.labels("continued").inc()
                migrations_left -= 1
                upstream, engine = opened
        finally:
            metrics.latency.labels(endpoint).observe(time.perf_counter() - started)

    async def _open_stream(
        client: aiohttp.ClientSession,
        broken: EngineLoad,
        path: str,
        body: dict[str, Any],
        headers: dict[str, str],
        key: bytes,
    ) -> tuple[aiohttp.ClientResponse, EngineLoad] | None:
        """A continuation's stream from the first other engine that takes it (any engine
        can compute a whole request: decode engines first, then prefill engines)."""
        roles = ("decode", "prefill") if table.disaggregated else ("colocated",)
        payload = json.dumps(body).encode()
        for engine in (engine for role in roles for engine in table.order(role, key) if engine is not broken):
            table.acquire(engine)
            try:
                upstream = await client.post(f"{engine.url}{path}", data=payload, headers={**headers, **_JSON})
            except _TRANSPORT_ERRORS as exc:
                table.release(engine)
                _failed(engine, headers, exc)
                continue
            if upstream.status == 200:
                return upstream, engine
            upstream.close()
            table.release(engine)
            _failed(engine, headers, f"HTTP {upstream.status}", unavailable=upstream.status in _UNAVAILABLE_STATUS)
        return None

    def _failed(engine: EngineLoad, headers: dict[str, str], reason: object, unavailable: bool = True) -> None:
        if unavailable:
            table.mark_failed(engine)
        logger.warning("[request=%s engine=%s] failed before answering (%s); trying another engine%s",
                       headers[REQUEST_ID_HEADER], engine.name, reason,
                       f" (engine skipped for {SUSPECT_S:.0f} s)" if unavailable else "")  # fmt: skip

    return app


async def _leaving_after(chunks: AsyncIterator[Any], admission: Admission) -> AsyncIterator[Any]:
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        await admission.leave()


@asynccontextmanager
async def _cancel_on_disconnect(request: Request) -> AsyncIterator[None]:
    """Cancel the enclosed work (raising ClientGone) if the client disconnects meanwhile.

    One watcher task per request waits for the ASGI ``http.disconnect`` message; the
    request's body has been read already, so nothing else is on that channel."""
    current = asyncio.current_task()
    assert current is not None
    gone = asyncio.Event()

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone.set()
        current.cancel()

    watcher = asyncio.create_task(watch())
    try:
        yield
    except asyncio.CancelledError:
        if gone.is_set():
            raise ClientGone() from None
        raise
    finally:
        watcher.cancel()


async def _scrape_kv_tokens(client: aiohttp.ClientSession, table: RoutingTable, metrics: DoorMetrics) -> None:
    """Copy each engine's prompt-tokens-by-source counters (KV hits) into the door's metrics."""
    for engine in table.all_engines():
        try:
            async with client.get(f"{engine.url}/metrics", timeout=aiohttp.ClientTimeout(total=2.0)) as response:
                text = await response.text()
        except (aiohttp.ClientError, asyncio.TimeoutError):
            continue
        for line in text.splitlines():
            if line.startswith("vllm:prompt_tokens_by_source_total{") and 'source="' in line:
                source = line.split('source="', 1)[1].split('"', 1)[0]
                metrics.kv_hit_tokens.labels(engine.name, source).set(float(line.rsplit(" ", 1)[1]))


def _single_prompt(body: dict[str, Any]) -> bool:
    """PD handoff carries one prompt; a batch is computed by the decode engine itself."""
    if "messages" in body:
        return True
    prompt = body.get("prompt")
    return isinstance(prompt, str) or (isinstance(prompt, list) and (len(prompt) == 1 or all(isinstance(t, int) for t in prompt)))
