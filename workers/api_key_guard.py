"""One API key for every HTTP port of a deployment: an ASGI middleware that answers 401
(OpenAI's error form) to any request without ``Authorization: Bearer <API_KEY>``.

Open without the key: ``/health`` (liveness probes), and ``/metrics`` when the deployment
makes it public (``METRICS_PUBLIC=1``; otherwise a Prometheus scraper sends the key as
its bearer token). Keys are compared as SHA-256 digests with ``hmac.compare_digest``:
constant time, whatever the lengths.

The door wraps its FastAPI app in ``KeyGuard`` and checks its own completions path with
``BearerCheck``. An engine loads ``EngineKeyGuard`` through ``vllm serve --middleware``:
vLLM's own ``--api-key`` guards only ``/v1``, ``/v2``, ``/inference`` and ``/cohere``,
which leaves ``/metrics``, ``/tokenize``, ``/invocations`` and the rest open. The engine
process reads the key from ``VLLM_API_KEY`` (so vLLM's own guard applies too, and the key
is never on a command line where ``ps`` shows it) and whether metrics are public from
``YR_METRICS_PUBLIC``; the engine actor sets both (``build_engine_env``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

KEY_VARIABLE = "VLLM_API_KEY"
METRICS_PUBLIC_VARIABLE = "YR_METRICS_PUBLIC"
UNAUTHORIZED_MESSAGE = "Incorrect or missing API key: send 'Authorization: Bearer <API_KEY>'"
_UNAUTHORIZED_BODY = json.dumps(
    {"error": {"message": UNAUTHORIZED_MESSAGE, "type": "invalid_request_error", "param": None, "code": 401}}
).encode()


def open_paths(metrics_public: bool) -> frozenset[str]:
    """The paths served without the key."""
    return frozenset({"/health", "/metrics"} if metrics_public else {"/health"})


class BearerCheck:
    """Whether an ``Authorization`` header value carries the key (constant time)."""

    def __init__(self, api_key: str) -> None:
        if not api_key:
            raise ValueError("API key is empty: unset API_KEY for an open deployment, or give a key")
        self._expected = hashlib.sha256(f"Bearer {api_key}".encode()).digest()

    def __call__(self, authorization: bytes) -> bool:
        return hmac.compare_digest(hashlib.sha256(authorization).digest(), self._expected)


class KeyGuard:
    """ASGI middleware: requests (HTTP and WebSocket) to any path but ``open_paths`` need the key."""

    def __init__(self, app: ASGIApp, api_key: str, metrics_public: bool = False) -> None:
        self.app = app
        self._check = BearerCheck(api_key)
        self._open = open_paths(metrics_public)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in self._open or self._carries_key(scope):
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # policy violation
        else:
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})  # fmt: skip
            await send({"type": "http.response.body", "body": _UNAUTHORIZED_BODY})

    def _carries_key(self, scope: Scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name.lower() == b"authorization":
                return self._check(value)
        return False


class EngineKeyGuard(KeyGuard):
    """``KeyGuard`` as ``vllm serve --middleware workers.api_key_guard.EngineKeyGuard`` builds
    it (the app alone): the key and the metrics setting from the engine's environment."""

    def __init__(self, app: ASGIApp) -> None:
        super().__init__(app, os.environ.get(KEY_VARIABLE, ""), os.environ.get(METRICS_PUBLIC_VARIABLE) == "1")


ENGINE_MIDDLEWARE = f"{__name__}.{EngineKeyGuard.__name__}"
