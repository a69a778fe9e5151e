"""Small real HTTP servers that answer like vLLM engines, for testing the front door's
routing, retries and cancellation without loading a model. Each records what it got.

One engine in its own process (the door-overhead benchmark's stand-in engines)::

    python -m tests.fake_engines --name p0 --role prefill --port 20001

It answers at once; ``GET /stats`` gives the counts of what it received (``LegCounts``).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from testkit.helpers import free_port


@dataclass
class LegCounts:
    """What an engine received, by PD leg: what a router sent can be checked from outside."""

    requests: int = 0
    prefill_legs: int = 0  # kv_transfer_params.do_remote_decode, max_tokens 1, not streamed
    decode_legs: int = 0  # kv_transfer_params handed over by a prefill engine (``do_remote_prefill``)
    handed_over_by: dict[str, int] = field(default_factory=dict)  # decode legs, by the prefill engine that answered
    handovers_seen: int = 0  # distinct prefill answers (their ``seq``) among the decode legs
    _seen: set[tuple[str, int]] = field(default_factory=set, init=False, repr=False)

    def count(self, body: dict[str, Any]) -> None:
        self.requests += 1
        params = body.get("kv_transfer_params")
        if not isinstance(params, dict):
            return
        if params.get("do_remote_decode") and body.get("max_tokens") == 1 and not body.get("stream"):
            self.prefill_legs += 1
        if params.get("do_remote_prefill"):
            self.decode_legs += 1
            source = str(params.get("from", ""))
            self.handed_over_by[source] = self.handed_over_by.get(source, 0) + 1
            self._seen.add((source, int(params.get("seq", -1))))
            self.handovers_seen = len(self._seen)

    def as_dict(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if not key.startswith("_")}


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
    keep_received: bool = True  # False: only ``counts`` are kept (a long benchmark run)
    counts: LegCounts = field(default_factory=LegCounts)
    events: list[str] | None = None  # shared with other parties of a test: "<name> finished" when an answer ends
    max_model_len: int | None = None  # set: GET /v1/models lists it, as vLLM does
    _answers: Iterator[int] = field(default_factory=itertools.count, init=False, repr=False)

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

        @app.get("/v1/models")
        async def models() -> Response:
            if self.max_model_len is None:
                return Response(status_code=404)
            return JSONResponse({"data": [{"id": "m", "max_model_len": self.max_model_len}]})

        @app.get("/stats")
        async def stats() -> Response:
            return JSONResponse(self.counts.as_dict())

        async def answer(request: Request, kind: str) -> Response:
            body = json.loads(await request.body())
            request_id = request.headers.get("X-Request-Id", "")
            self.counts.count(body)
            if self.keep_received:
                self.received.append({"path": request.url.path, "body": body, "request_id": request_id,
                                      "authorization": request.headers.get("Authorization", "")})  # fmt: skip
            deadline = time.monotonic() + self.delay_s
            while time.monotonic() < deadline:  # like vLLM: a client that goes away aborts the request
                if await request.is_disconnected():
                    self.cancelled.append(request_id)
                    return Response(status_code=499)
                await asyncio.sleep(0.02)
            if self.fail_status is not None:
                return JSONResponse({"error": {"message": "injected failure"}}, status_code=self.fail_status)
            if not body.get("stream"):
                if self.keep_received:
                    self.finished.append(request_id)
                if self.events is not None:
                    self.events.append(f"{self.name} finished")
                choice = {"text": self.name} if kind == "text" else {"message": {"role": "assistant", "content": self.name}}
                # What a prefill engine hands over; ``seq`` tells one answer from another.
                params = None
                if body.get("kv_transfer_params"):
                    params = {"do_remote_prefill": True, "from": self.name, "seq": next(self._answers)}
                return JSONResponse({"id": request_id, "choices": [{"index": 0, **choice}], "kv_transfer_params": params})

            async def chunks() -> AsyncIterator[bytes]:
                try:
                    for index in range(self.stream_chunks):
                        await asyncio.sleep(self.chunk_delay_s)
                        yield f"data: {json.dumps({'choices': [{'index': 0, 'text': f'{self.name}-{index}'}]})}\n\n".encode()
                    yield b"data: [DONE]\n\n"
                    self.finished.append(request_id)
                    if self.events is not None:
                        self.events.append(f"{self.name} finished")
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
def serving(app: FastAPI, port: int, config: uvicorn.Config | None = None) -> Iterator[None]:
    """Run ``app`` (or what ``config`` says) under Uvicorn in a thread until the block ends."""
    server = uvicorn.Server(config or uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tests.fake_engines", description="serve one fake engine until SIGTERM")
    parser.add_argument("--name", required=True)
    parser.add_argument("--role", required=True, choices=("prefill", "decode", "colocated"))
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    engine = FakeEngine(args.name, args.role, port=args.port, keep_received=False)
    # Like a vLLM server's HTTP layer: Uvicorn with uvloop and httptools.
    uvicorn.run(engine.app(), host="127.0.0.1", port=args.port, log_level="warning", access_log=False,
                loop="uvloop", http="httptools")  # fmt: skip


if __name__ == "__main__":
    main()
