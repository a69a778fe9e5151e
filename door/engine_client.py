"""The front door's HTTP/1.1 client to its engines: keep-alive connections, one request
at a time each, parsed with httptools on the event loop.

It replaces aiohttp on the door's hot path (measured, PD hop with 16 clients: aiohttp was
31-36% of the door's CPU time). A request writes one buffer (head and body), the answer's
head arrives as ``Upstream.status`` and ``content_type``, and its body is read whole
(``read``) or piece by piece as the engine sends it (``chunks``). An answer read to its
end returns its connection to the pool (``release``); ``close`` drops it, which is how the
door makes vLLM abort a request whose client has gone.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator, Mapping

import httptools

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
# Uvicorn (vLLM's server) closes a keep-alive connection idle for 5 s; the door does
# not reuse one idle for this long, so it does not write into a closing socket.
IDLE_REUSE_S = 4.0
READ_PAUSE_BYTES = 4 << 20  # stop reading an engine whose answer the client is not taking


class EngineUnreachable(ConnectionError):
    """No answer's head came: the engine could not be reached or dropped the connection."""


class StreamCut(ConnectionError):
    """The engine's answer ended before its last byte."""


class Upstream:
    """One engine answer: its head at once, its body as it arrives."""

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection
        self.status = 0
        self.content_type = "application/json"
        self._head: asyncio.Future[None] = connection.loop.create_future()
        self._pieces: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._complete = False
        self._error: BaseException | None = None
        self._done = False  # released or closed

    # -- fed by the connection -------------------------------------------------------
    def _headed(self, status: int, content_type: str) -> None:
        self.status, self.content_type = status, content_type
        if not self._head.done():
            self._head.set_result(None)

    def _piece(self, data: bytes) -> None:
        self._pieces.append(data)
        self._buffered += len(data)
        if self._buffered > READ_PAUSE_BYTES:
            self._connection.pause()
        self._wake()

    def _finished(self) -> None:
        self._complete = True
        self._wake()

    def _failed(self, error: BaseException) -> None:
        if not self._head.done():
            self._head.set_exception(EngineUnreachable(str(error) or type(error).__name__))
            self._head.exception()  # retrieved: a request cancelled meanwhile leaves no warning
        self._error = error
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- used by the door ------------------------------------------------------------
    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's pieces as they arrive; StreamCut if the engine stops early."""
        while True:
            while self._pieces:
                piece = self._pieces.popleft()
                self._buffered -= len(piece)
                if self._buffered <= READ_PAUSE_BYTES:
                    self._connection.resume()
                yield piece
            if self._complete:
                return
            if self._error is not None:
                raise StreamCut(f"the engine's answer was cut short: {self._error}")
            self._waiter = self._connection.loop.create_future()
            await self._waiter

    async def read(self) -> bytes:
        """The whole body."""
        if self._complete and len(self._pieces) == 1:
            self._buffered = 0
            return self._pieces.popleft()
        return b"".join([piece async for piece in self.chunks()])

    def release(self) -> None:
        """Done with a fully read answer: its connection goes back to the pool (closed if
        the answer was not read to its end)."""
        if self._done:
            return
        self._done = True
        self._connection.finished(reusable=self._complete)

    def close(self) -> None:
        """Drop the connection (the engine sees the client leave and aborts the request)."""
        if self._done:
            return
        self._done = True
        self._connection.finished(reusable=False)


class _Connection(asyncio.Protocol):
    """One keep-alive connection to an engine; one request at a time."""

    def __init__(self, pool: _HostPool, loop: asyncio.AbstractEventLoop) -> None:
        self.pool, self.loop = pool, loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.upstream: Upstream | None = None
        self.content_type = b""
        self.idle_since = 0.0
        self.closed = False
        self.paused = False

    # asyncio
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport subclasses

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._lost(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(exc or ConnectionResetError("the engine closed the connection"))

    # httptools
    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"content-type":
            self.content_type = value

    def on_headers_complete(self) -> None:
        if self.upstream is not None:
            self.upstream._headed(self.parser.get_status_code(), self.content_type.decode("latin-1") or "application/json")

    def on_body(self, body: bytes) -> None:
        if self.upstream is not None:
            self.upstream._piece(body)

    def on_message_complete(self) -> None:
        if not self.parser.should_keep_alive():
            self.closed = True  # after this answer the engine closes; do not reuse
        if self.upstream is not None:
            self.upstream._finished()

    # the pool
    def send(self, head: bytes, payload: bytes) -> Upstream:
        assert self.transport is not None
        self.upstream = Upstream(self)
        self.content_type = b""
        self.transport.write(head + payload if len(payload) < 65536 else head)
        if len(payload) >= 65536:
            self.transport.write(payload)
        return self.upstream

    def finished(self, reusable: bool) -> None:
        self.upstream = None
        if reusable and not self.closed and not self.paused:
            self.idle_since = time.monotonic()
            self.pool.idle.append(self)
        else:
            self.drop()

    def drop(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def _lost(self, exc: BaseException) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()
        try:
            self.pool.idle.remove(self)
        except ValueError:
            pass
        if self.upstream is not None:
            self.upstream._failed(exc)


class _HostPool:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[_Connection] = []
        self.host_header = f"{host}:{port}"

    def take_idle(self) -> _Connection | None:
        now = time.monotonic()
        while self.idle:
            connection = self.idle.pop()
            if not connection.closed and now - connection.idle_since < IDLE_REUSE_S:
                return connection
            connection.drop()
        return None


class EngineClient:
    """Pooled keep-alive connections to every engine the door talks to."""

    def __init__(self, connect_timeout_s: float = CONNECT_TIMEOUT_S, api_key: str | None = None) -> None:
        """``api_key``: sent with every request (the deployment's engines require it)."""
        self._pools: dict[tuple[str, int], _HostPool] = {}
        self._connect_timeout_s = connect_timeout_s
        self._authorization = f"Authorization: Bearer {api_key}\r\n" if api_key else ""

    async def request(self, method: str, host: str, port: int, path: str, payload: bytes = b"",
                      headers: Mapping[str, str] | None = None) -> Upstream:  # fmt: skip
        """Send one request; return once the answer's head has come (its body is read
        from the Upstream). EngineUnreachable when no head came. A cancelled caller drops
        the connection."""
        pool = self._pools.get((host, port))
        if pool is None:
            pool = self._pools[(host, port)] = _HostPool(host, port)
        extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items()) if headers else ""
        head = (f"{method} {path} HTTP/1.1\r\nHost: {pool.host_header}\r\n{self._authorization}{extra}"
                f"Content-Length: {len(payload)}\r\n\r\n").encode("latin-1")  # fmt: skip
        # Sent once: a connection that fails before the answer's head may have delivered the
        # request (the engine may be computing it), so it is never sent again here; the
        # caller decides (another engine). The race that a resend would cover, the engine
        # closing an idle keep-alive connection as the request is written, cannot happen:
        # a connection idle for IDLE_REUSE_S is not reused, and one the engine closed
        # before that is known closed before it is taken from the pool.
        connection = pool.take_idle() or await self._connect(pool)
        return await self._exchange(connection, head, payload)

    async def _connect(self, pool: _HostPool) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _, connection = await loop.create_connection(lambda: _Connection(pool, loop), pool.host, pool.port)
        except (OSError, TimeoutError) as exc:
            raise EngineUnreachable(f"cannot connect to {pool.host}:{pool.port}: {exc or type(exc).__name__}") from None
        return connection

    @staticmethod
    async def _exchange(connection: _Connection, head: bytes, payload: bytes) -> Upstream:
        upstream = connection.send(head, payload)
        try:
            await upstream._head
        except BaseException:
            upstream.close()
            raise
        return upstream

    async def get(self, host: str, port: int, path: str, timeout_s: float) -> tuple[int, bytes]:
        """A whole GET answer: its status and body."""
        async with asyncio.timeout(timeout_s):
            upstream = await self.request("GET", host, port, path)
            try:
                body = await upstream.read()
            finally:
                upstream.release()
        return upstream.status, body

    def close(self) -> None:
        for pool in self._pools.values():
            for connection in pool.idle:
                connection.drop()
            pool.idle.clear()
        self._pools.clear()
