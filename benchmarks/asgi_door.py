"""The door's completions handlers as a bare ASGI callable, for Uvicorn's own httptools
protocol (the door-overhead benchmark's ``--http uvicorn`` door): the same handlers the
door's HTTP layer serves (``FrontDoor.handlers``), with the ASGI messages in place of
that layer's writes; every other path goes to the door's FastAPI app, as it does there.

Measurement only: a client that leaves does not cancel its request here (Uvicorn does not
cancel the ASGI task), which the door's own layer does.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from door.frontdoor import FrontDoor
from door.http_server import Exchange

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Any, Send], Awaitable[None]]


class AsgiExchange(Exchange):
    """An ``Exchange`` answered through ASGI ``send``. ``send``/``start``/``end`` are
    synchronous in the door's layer; here they note the answer, which ``finish`` sends."""

    asgi_send: Send
    _head: MutableMapping[str, Any] | None = None
    _whole: tuple[MutableMapping[str, Any], bytes] | None = None
    _head_sent = False
    _aborted = False

    @staticmethod
    def _start(status: int, content_type: str, headers: Iterable[tuple[str, str]], length: int | None) -> dict[str, Any]:
        raw = [(b"content-type", content_type.encode()), *((k.encode(), v.encode()) for k, v in headers)]
        if length is not None:
            raw.append((b"content-length", str(length).encode()))
        return {"type": "http.response.start", "status": status, "headers": raw}

    def send(self, status: int, body: bytes, content_type: str = "application/json",
             headers: Iterable[tuple[str, str]] = ()) -> None:  # fmt: skip
        self.answered = True
        self._whole = (self._start(status, content_type, headers, len(body)), body)

    def start(self, status: int, content_type: str, headers: Iterable[tuple[str, str]] = ()) -> None:
        self.answered = True
        self._head = self._start(status, content_type, headers, None)

    async def write(self, piece: bytes) -> None:
        if not self._head_sent and self._head is not None:
            self._head_sent = True
            await self.asgi_send(self._head)
        await self.asgi_send({"type": "http.response.body", "body": piece, "more_body": True})

    def end(self) -> None:
        pass  # ``finish`` sends the last, empty piece

    def abort(self) -> None:
        self._aborted = True  # the response is left unfinished: Uvicorn closes the connection

    async def finish(self) -> None:
        if self._whole is not None:
            head, body = self._whole
            await self.asgi_send(head)
            await self.asgi_send({"type": "http.response.body", "body": body, "more_body": False})
        elif self._head is not None and not self._aborted:
            if not self._head_sent:
                await self.asgi_send(self._head)
            await self.asgi_send({"type": "http.response.body", "body": b"", "more_body": False})


def completions_app(door: FrontDoor) -> ASGIApp:
    """An ASGI callable: the completions paths through ``door.handlers``, the rest (and the
    lifespan) through ``door.app``."""
    handlers, fallback = door.handlers, door.app

    async def app(scope: MutableMapping[str, Any], receive: Any, send: Send) -> None:
        handler = handlers.get(scope.get("path", "")) if scope["type"] == "http" and scope["method"] == "POST" else None
        if handler is None:
            await fallback(scope, receive, send)
            return
        pieces, more = [], True
        while more:
            message = await receive()
            pieces.append(message.get("body", b""))
            more = message.get("more_body", False)
        raw_headers = list(scope["headers"])
        exchange = AsgiExchange(
            method="POST", path=scope["path"], query=scope["query_string"], raw_headers=raw_headers,
            headers={name.decode("latin-1").lower(): value.decode("latin-1") for name, value in raw_headers},
            body=b"".join(pieces), connection=None,  # type: ignore[arg-type]
        )  # fmt: skip
        exchange.asgi_send = send
        await handler(exchange)
        await exchange.finish()

    return app
