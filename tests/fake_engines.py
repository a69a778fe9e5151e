"""Small real HTTP servers that answer like vLLM engines, for testing the front door's
routing, retries and cancellation without loading a model. Each records what it got."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tests.helpers import free_port


@dataclass
class FakeEngine:
    name: str
    role: str
    port: int = field(default_factory=free_port)
    delay_s: float = 0.0  # before answering
    fail_status: int | None = None  # answer every request with this status
    stream_chunks: int = 3
    chunk_delay_s: float = 0.0
    received: list[dict[str, Any]] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)  # request ids whose client went away
    finished: list[str] = field(default_factory=list)

    @property
    def info(self) -> dict[str, object]:
        return {"name": self.name, "role": self.role, "host": "127.0.0.1", "port": self.port, "state": "healthy"}

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/health")
        async def health() -> Response:
            return Response(status_code=200)

        @app.get("/metrics")
        async def metrics() -> Response:
            return Response('vllm:prompt_tokens_by_source_total{source="external_kv_transfer"} 128.0\n')

        async def answer(request: Request, kind: str) -> Response:
            body = json.loads(await request.body())
            request_id = request.headers.get("X-Request-Id", "")
            self.received.append({"path": request.url.path, "body": body, "request_id": request_id})
            deadline = time.monotonic() + self.delay_s
            while time.monotonic() < deadline:  # like vLLM: a client that goes away aborts the request
                if await request.is_disconnected():
                    self.cancelled.append(request_id)
                    return Response(status_code=499)
                await asyncio.sleep(0.02)
            if self.fail_status is not None:
                return JSONResponse({"error": {"message": "injected failure"}}, status_code=self.fail_status)
            if not body.get("stream"):
                self.finished.append(request_id)
                choice = {"text": self.name} if kind == "text" else {"message": {"role": "assistant", "content": self.name}}
                params = {"do_remote_prefill": True, "from": self.name} if body.get("kv_transfer_params") else None
                return JSONResponse({"id": request_id, "choices": [{"index": 0, **choice}], "kv_transfer_params": params})

            async def chunks() -> AsyncIterator[bytes]:
                try:
                    for index in range(self.stream_chunks):
                        await asyncio.sleep(self.chunk_delay_s)
                        yield f"data: {json.dumps({'choices': [{'index': 0, 'text': f'{self.name}-{index}'}]})}\n\n".encode()
                    yield b"data: [DONE]\n\n"
                    self.finished.append(request_id)
                except asyncio.CancelledError:
                    self.cancelled.append(request_id)
                    raise

            return StreamingResponse(chunks(), media_type="text/event-stream")

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            return await answer(request, "text")

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            return await answer(request, "chat")

        return app


@contextmanager
def serving(app: FastAPI, port: int) -> Iterator[None]:
    """Run ``app`` under Uvicorn in a thread until the block ends."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError(f"test server on port {port} did not start")
        time.sleep(0.02)
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(10)
