"""The OpenAI-compatible front door (FastAPI under Uvicorn).

A completion goes to a prefill engine with ``max_tokens=1`` and
``kv_transfer_params={"do_remote_decode": true}``; its KV lands in the data system, and
the original request goes to a decode engine with the ``kv_transfer_params`` the
prefill returned, whose answer (streamed or not) is the client's. With colocated
instances the request goes straight to one of them.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from controller.routing import Endpoint, RoutingTable

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-Id"


def openai_error(status: int, message: str, error_type: str, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": error_type, "param": param, "code": status}}
    return JSONResponse(status_code=status, content=body)


def prefill_request(body: dict[str, Any]) -> dict[str, Any]:
    """The prefill leg: the client's request computing only the prompt's KV."""
    leg = {key: value for key, value in body.items() if key not in ("stream_options",)}
    leg.update(max_tokens=1, stream=False, kv_transfer_params={"do_remote_decode": True})
    if "min_tokens" in leg:
        leg["min_tokens"] = min(int(leg["min_tokens"] or 0), 1)
    return leg


def decode_request(body: dict[str, Any], kv_transfer_params: dict[str, Any] | None) -> dict[str, Any]:
    """The decode leg: the client's request plus what the prefill handed over."""
    leg = dict(body)
    if kv_transfer_params:
        leg["kv_transfer_params"] = kv_transfer_params
    return leg


def create_app(table: RoutingTable, served_model_name: str) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        timeout = httpx.Timeout(connect=10.0, read=None, write=60.0, pool=None)
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
            app.state.client = client
            yield

    app = FastAPI(title="vLLM on openYuanrong", lifespan=lifespan)

    @app.get("/health")
    async def health() -> Response:
        if not table.ready:
            return openai_error(503, "no healthy prefill/decode path", "service_unavailable")
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> Response:
        model = {"id": served_model_name, "object": "model", "created": int(time.time()), "owned_by": "vllm-on-yr"}
        return JSONResponse({"object": "list", "data": [model]})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return openai_error(400, f"request body is not valid JSON: {exc}", "invalid_request_error")
        if not isinstance(body, dict):
            return openai_error(400, "request body must be a JSON object", "invalid_request_error")
        if "prompt" not in body:
            return openai_error(400, "'prompt' is required", "invalid_request_error", "prompt")
        model = body.get("model")
        if model in (None, ""):
            body["model"] = served_model_name
        elif model != served_model_name:
            return openai_error(404, f"The model `{model}` does not exist; this service serves `{served_model_name}`", "NotFoundError", "model")
        request_id = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
        return await _complete(request.app.state.client, body, request_id)

    async def _complete(client: httpx.AsyncClient, body: dict[str, Any], request_id: str) -> Response:
        headers = {REQUEST_ID_HEADER: request_id}
        try:
            if table.disaggregated and _single_prompt(body):
                prefill = table.prefill.pick()
                response = await client.post(f"{prefill.url}/v1/completions", json=prefill_request(body), headers=headers)
                if response.status_code != 200:
                    logger.warning("[request=%s engine=%s] prefill answered %d", request_id, prefill.name, response.status_code)
                    return _passthrough(response, request_id)
                params = response.json().get("kv_transfer_params")
                target = table.decode.pick()
                body = decode_request(body, params)
            else:
                target = table.decode.pick() if table.disaggregated else table.colocated.pick()
            return await _forward(client, target, body, headers)
        except httpx.HTTPError as exc:
            logger.error("[request=%s] engine unreachable: %s", request_id, exc)
            return openai_error(502, f"engine unreachable: {exc.__class__.__name__}", "upstream_error")

    return app


def _single_prompt(body: dict[str, Any]) -> bool:
    """PD handoff carries one prompt; a batch is computed by the decode engine itself."""
    prompt = body.get("prompt")
    return isinstance(prompt, str) or (isinstance(prompt, list) and (len(prompt) == 1 or all(isinstance(t, int) for t in prompt)))


def _passthrough(response: httpx.Response, request_id: str) -> Response:
    return Response(
        content=response.content,
        status_code=response.status_code,
        media_type=response.headers.get("content-type", "application/json"),
        headers={REQUEST_ID_HEADER: request_id},
    )


async def _forward(client: httpx.AsyncClient, target: Endpoint, body: dict[str, Any], headers: dict[str, str]) -> Response:
    if not body.get("stream"):
        response = await client.post(f"{target.url}/v1/completions", json=body, headers=headers)
        return _passthrough(response, headers[REQUEST_ID_HEADER])
    upstream = await client.send(client.build_request("POST", f"{target.url}/v1/completions", json=body, headers=headers), stream=True)
    if upstream.status_code != 200:
        await upstream.aread()
        await upstream.aclose()
        return _passthrough(upstream, headers[REQUEST_ID_HEADER])

    async def relay() -> AsyncIterator[bytes]:
        try:
            async for chunk in upstream.aiter_raw():
                yield chunk
        finally:
            await upstream.aclose()

    return StreamingResponse(relay(), media_type="text/event-stream", headers={REQUEST_ID_HEADER: headers[REQUEST_ID_HEADER]})
