"""The front door's HTTP/1.1 protocol for Uvicorn (``uvicorn.Config(http=...)``):
asyncio protocol, httptools parser.

The door's hot endpoints are answered by a handler working on the bytes (``Exchange``):
no ASGI scope, no framework request object, no re-serialising of what needs no change.
Every other request (health, metrics, models, admin) goes to the ASGI app Uvicorn
loaded (the door's FastAPI app) through a small bridge. Uvicorn keeps what a server
does around the requests: listening, signals, graceful shutdown (it calls ``shutdown``
on every connection and waits for them to close), the app's lifespan. Measured on the
PD hop with stand-in engines, each party in its own process: a two-leg handler on this
protocol used 68 CPU us per request, Uvicorn's own protocol + FastAPI ~250 us.

Per connection, requests are answered in order (keep-alive; pipelined ones wait their
turn). A client that closes its connection cancels its request's handler task (for the
door's own handlers), with ``Exchange.client_gone`` set, so the door can tell that from
a shutdown.

Limits, so that no client holds the door's memory or descriptors for ever:
- a request must arrive whole within ``READ_TIMEOUT_S`` of its first byte (a deadline, not
  an idle timer that each byte resets): a client that sends part of a head or body and
  stops (a slowloris) gets 408 and the connection closes;
- at most ``MAX_QUEUED`` pipelined requests, or ``MAX_QUEUED_BYTES`` of their bodies, wait
  behind the one being answered; beyond that the connection is not read (the client's
  sends block in its kernel) until they are answered;
- an answer is written only as fast as the client reads it: a stream waits for room
  (``WRITE_HIGH_WATER``), and the next pipelined request is served only once the previous
  answer has left the buffer;
- an HTTP/1.0 client gets a streamed answer as raw bytes ended by closing the
  connection (HTTP/1.0 has no chunked encoding).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

import httptools

logger = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 << 10
MAX_BODY_BYTES = 64 << 20
WRITE_HIGH_WATER = 256 << 10
READ_TIMEOUT_S = 60.0  # a whole request (64 MiB at most) from its first byte (DOOR_READ_TIMEOUT_S)
MAX_QUEUED = 8  # pipelined requests waiting behind the one being answered
MAX_QUEUED_BYTES = 8 << 20  # their bodies


@dataclass
class Exchange:
    """One request as it arrived, and the means to answer it."""

    method: str
    path: str
    query: bytes
    headers: dict[str, str]  # lower-case names
    raw_headers: list[tuple[bytes, bytes]]
    body: bytes
    connection: DoorProtocol = field(repr=False)
    keep_alive: bool = True
    http10: bool = False  # an HTTP/1.0 client: no chunked encoding
    client_gone: bool = False
    answered: bool = False  # a response has been started
    streamed: bool = False  # its answer is (being) relayed piece by piece
    # The door's own handlers stop when their client leaves (the engines then abort the
    # request); the ASGI app's run to their end, as under Uvicorn (a scale operation).
    cancel_on_disconnect: bool = False

    def send(self, status: int, body: bytes, content_type: str = "application/json",
             headers: Iterable[tuple[str, str]] = ()) -> None:  # fmt: skip
        """A whole answer."""
        self.answered = True
        self.connection.write_response(status, body, content_type, headers)

    def start(self, status: int, content_type: str, headers: Iterable[tuple[str, str]] = ()) -> None:
        """The head of an answer whose body follows piece by piece (``write``, then ``end``)."""
        self.answered = True
        self.connection.write_head(status, content_type, headers)

    async def write(self, piece: bytes) -> None:
        await self.connection.write_chunk(piece)

    def end(self) -> None:
        self.connection.end_chunks()

    def abort(self) -> None:
        """End a started answer without its last chunk: the client sees it cut short."""
        self.connection.close()


Handler = Callable[[Exchange], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Any, Any], Awaitable[None]]


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


def error_object(status: int, message: str, error_type: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error form."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": status}}


def error_body(status: int, message: str, error_type: str, param: str | None = None) -> bytes:
    return json.dumps(error_object(status, message, error_type, param)).encode()


class DoorProtocol(asyncio.Protocol):
    """One client connection. Bind the door's handlers with ``door_protocol``."""

    handlers: dict[str, Handler] = {}  # exact path -> handler, for POST
    read_timeout_s: float = READ_TIMEOUT_S

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:  # fmt: skip
        if not config.loaded:
            config.load()
        self.app: ASGIApp = config.loaded_app
        self.app_state = app_state
        self.keep_alive_s: float = config.timeout_keep_alive
        self.server_state = server_state  # Uvicorn's: the connections and tasks it waits for on shutdown
        self.loop = _loop or asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.pending: collections.deque[Exchange] = collections.deque()
        self.task: asyncio.Task[None] | None = None
        self.current: Exchange | None = None
        self.closing = False
        self.keep_alive = True
        self.shutting_down = False
        self.idle_timer: asyncio.TimerHandle | None = None
        self.read_timer: asyncio.TimerHandle | None = None  # armed while a request is partly received
        self.reading_paused = False
        self.chunked = True  # the answer being streamed uses chunked encoding
        self.writable: asyncio.Future[None] | None = None
        # the request being parsed
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._body: list[bytes] = []
        self._body_bytes = 0

    # -- asyncio -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport subclasses
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.server_state.connections.add(self)
        self._arm_idle_timer()

    def data_received(self, data: bytes) -> None:
        self._cancel_idle_timer()
        self._arm_read_timer()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(400, "connection upgrades are not supported")
        except httptools.HttpParserError as exc:  # httptools wraps what a callback raised
            cause = exc.__context__
            if isinstance(cause, _TooLarge):
                self._refuse(cause.status, str(cause))
            else:
                self._refuse(400, f"malformed HTTP request: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self._cancel_idle_timer()
        self._cancel_read_timer()
        self.server_state.connections.discard(self)
        if self.current is not None and self.task is not None and not self.task.done():
            self.current.client_gone = True
            if self.current.cancel_on_disconnect:
                self.task.cancel()
        self.pending.clear()
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)  # a writer waiting for room finds the connection gone

    def pause_writing(self) -> None:
        if self.writable is None or self.writable.done():
            self.writable = self.loop.create_future()

    def resume_writing(self) -> None:
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)

    # -- httptools -----------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url, self._headers, self._head_bytes, self._body, self._body_bytes = b"", [], 0, [], 0
        self._arm_read_timer()

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        if self._head_bytes > MAX_HEAD_BYTES:
            raise _TooLarge(431, f"the request's head is over {MAX_HEAD_BYTES} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))
        self._head_bytes += len(name) + len(value)
        if self._head_bytes > MAX_HEAD_BYTES:
            raise _TooLarge(431, f"the request's head is over {MAX_HEAD_BYTES} bytes")

    def on_headers_complete(self) -> None:
        for name, value in self._headers:
            if name == b"content-length" and value.isdigit() and int(value) > MAX_BODY_BYTES:
                raise _TooLarge(413, f"the request body is over {MAX_BODY_BYTES} bytes")  # said before it is sent
            if name == b"expect" and value.lower() == b"100-continue" and self.transport is not None:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._body_bytes += len(body)
        if self._body_bytes > MAX_BODY_BYTES:
            raise _TooLarge(413, f"the request body is over {MAX_BODY_BYTES} bytes")

    def on_message_complete(self) -> None:
        parsed = httptools.parse_url(self._url)
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in self._headers}
        exchange = Exchange(
            method=self.parser.get_method().decode(),
            path=unquote(parsed.path.decode("latin-1")),
            query=parsed.query or b"",
            headers=headers,
            raw_headers=self._headers,
            body=self._body[0] if len(self._body) == 1 else b"".join(self._body),
            connection=self,
            keep_alive=self.parser.should_keep_alive(),
            http10=self.parser.get_http_version() == "1.0",
        )
        self._cancel_read_timer()
        self.pending.append(exchange)
        if self.task is None:
            self._next()
        elif self.transport is not None and not self.reading_paused and (
            len(self.pending) >= MAX_QUEUED or sum(len(e.body) for e in self.pending) >= MAX_QUEUED_BYTES
        ):
            self.reading_paused = True
            self.transport.pause_reading()

    # -- answering -----------------------------------------------------------------------
    def _next(self) -> None:
        if not self.pending or self.closing:
            self.task = None
            self.current = None
            if not self.closing:
                self._arm_idle_timer()
            return
        exchange = self.pending.popleft()
        if self.reading_paused and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()
        self.current = exchange
        self.keep_alive = exchange.keep_alive and not self.shutting_down
        self.server_state.total_requests += 1
        self.task = self.loop.create_task(self._serve(exchange))
        self.server_state.tasks.add(self.task)
        self.task.add_done_callback(self.server_state.tasks.discard)

    async def _serve(self, exchange: Exchange) -> None:
        try:
            handler = self.handlers.get(exchange.path)
            if handler is not None and exchange.method == "POST":
                exchange.cancel_on_disconnect = True
                await handler(exchange)
            elif handler is not None:
                message = f"{exchange.method} is not allowed on {exchange.path}: send POST"
                exchange.send(405, error_body(405, message, "invalid_request_error"), headers=(("allow", "POST"),))
            else:
                await _asgi_call(self.app, exchange, self.app_state)
            if not exchange.answered:
                raise RuntimeError("the handler returned without answering")
        except asyncio.CancelledError:
            if not exchange.client_gone:
                self.close()
            return
        except Exception:
            if exchange.client_gone:
                return
            logger.exception("answering %s %s failed", exchange.method, exchange.path)
            if not exchange.answered:
                exchange.send(500, error_body(500, "internal error in the front door", "internal_error"))
            else:
                self.close()  # the answer is cut short; the client sees the connection end
        if not self.keep_alive:
            self.close()
            return
        if self.writable is not None and not self.writable.done():
            await self.writable  # the next answer waits until the client has taken this one
        if not self.closing:
            self._next()

    def write_response(self, status: int, body: bytes, content_type: str, headers: Iterable[tuple[str, str]]) -> None:
        if self.transport is None or self.closing:
            return
        extra = "".join(f"{name}: {value}\r\n" for name, value in headers)
        head = (f"HTTP/1.1 {status} ").encode() + _reason(status) + (
            f"\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n{extra}"
            f"{'' if self.keep_alive else 'connection: close' + chr(13) + chr(10)}\r\n"
        ).encode("latin-1")
        self.transport.write(head + body)

    def write_head(self, status: int, content_type: str, headers: Iterable[tuple[str, str]]) -> None:
        if self.transport is None or self.closing:
            return
        self.chunked = not (self.current is not None and self.current.http10)
        if not self.chunked:
            self.keep_alive = False  # the body ends when the connection does
        extra = "".join(f"{name}: {value}\r\n" for name, value in headers)
        framing = "transfer-encoding: chunked\r\n" if self.chunked else ""
        self.transport.write(
            (f"HTTP/1.1 {status} ").encode() + _reason(status)
            + (f"\r\ncontent-type: {content_type}\r\n{framing}{extra}"
               f"{'' if self.keep_alive else 'connection: close' + chr(13) + chr(10)}\r\n").encode("latin-1")
        )  # fmt: skip

    async def write_chunk(self, piece: bytes) -> None:
        """Raises CancelledError once the client has gone (as its handler is cancelled)."""
        if self.closing or self.transport is None:
            raise asyncio.CancelledError()
        if piece:
            self.transport.write(b"%x\r\n%b\r\n" % (len(piece), piece) if self.chunked else piece)
        if self.writable is not None and not self.writable.done():
            await self.writable
            if self.closing:
                raise asyncio.CancelledError()

    def end_chunks(self) -> None:
        if self.transport is not None and not self.closing and self.chunked:
            self.transport.write(b"0\r\n\r\n")

    # -- closing -------------------------------------------------------------------------
    def _refuse(self, status: int, message: str) -> None:
        if self.transport is not None and self.current is None:
            self.keep_alive = False
            self.write_response(status, error_body(status, message, "invalid_request_error"), "application/json", ())
        self.close()

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            if self.transport is not None:
                self.transport.close()

    def shutdown(self) -> None:
        """Uvicorn's graceful shutdown: close now if idle, else after the answer in progress."""
        self.shutting_down = True
        if self.task is None:
            self.close()
        else:
            self.keep_alive = False
            self.pending.clear()

    def _arm_idle_timer(self) -> None:
        self._cancel_idle_timer()
        self.idle_timer = self.loop.call_later(self.keep_alive_s, self.close)

    def _cancel_idle_timer(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None

    def _arm_read_timer(self) -> None:
        """From a request's first byte: it must arrive whole within ``read_timeout_s``."""
        if self.read_timer is None and not self.closing:
            self.read_timer = self.loop.call_later(self.read_timeout_s, self._read_timed_out)

    def _cancel_read_timer(self) -> None:
        if self.read_timer is not None:
            self.read_timer.cancel()
            self.read_timer = None

    def _read_timed_out(self) -> None:
        self.read_timer = None
        logger.info("a client sent part of a request and not the rest within %.0f s; connection closed", self.read_timeout_s)
        self._refuse(408, f"the request did not arrive whole within {self.read_timeout_s:.0f} s")


class _TooLarge(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def door_protocol(handlers: dict[str, Handler], read_timeout_s: float = READ_TIMEOUT_S) -> type[DoorProtocol]:
    """A protocol class for ``uvicorn.Config(http=...)`` serving ``handlers`` itself."""
    return type("BoundDoorProtocol", (DoorProtocol,), {"handlers": dict(handlers), "read_timeout_s": read_timeout_s})


async def _asgi_call(app: ASGIApp, exchange: Exchange, app_state: dict[str, Any]) -> None:
    """One request through an ASGI app (the door's less frequent endpoints)."""
    connection = exchange.connection
    transport = connection.transport
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    peername = transport.get_extra_info("peername") if transport is not None else None
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": exchange.method,
        "scheme": "http",
        "path": exchange.path,
        "raw_path": exchange.path.encode(),
        "query_string": exchange.query,
        "root_path": "",
        "headers": exchange.raw_headers,
        "server": tuple(sockname[:2]) if sockname else None,
        "client": tuple(peername[:2]) if peername else None,
        "state": app_state.copy(),
    }
    body_sent = False
    status = 500
    response_headers: list[tuple[str, str]] = []
    content_type = "application/json"
    pieces: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": exchange.body, "more_body": False}
        await asyncio.Future()  # nothing more comes; a disconnect cancels the task
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, content_type
        if message["type"] == "http.response.start":
            status = message["status"]
            for name, value in message.get("headers", []):
                name_text = name.decode("latin-1").lower()
                if name_text == "content-type":
                    content_type = value.decode("latin-1")
                elif name_text not in ("content-length", "transfer-encoding", "connection"):
                    response_headers.append((name_text, value.decode("latin-1")))
        elif message["type"] == "http.response.body":
            pieces.append(message.get("body", b""))
            if not message.get("more_body", False):
                exchange.send(status, b"".join(pieces), content_type, response_headers)

    await app(scope, receive, send)
