"""The door's own HTTP layer (door/http_server.py under Uvicorn, and
door/engine_client.py) against stand-in engines on real sockets: what curl and
other HTTP/1.1 clients do that a framework used to handle for us."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import httpx
import pytest
import uvicorn

import door.http_server as http_server
from door.builder import build_door
from door.door_metrics import DoorMetrics
from door.engine_client import EngineClient, EngineUnreachable
from testkit.helpers import connections_accepted_on, free_port, listening_addresses, service_config, wait_for
from tests.fake_engines import FakeEngine, serving


@contextmanager
def door_over(engines: list[FakeEngine], engine_keep_alive_s: int = 5,
              read_timeout_s: float = http_server.READ_TIMEOUT_S) -> Iterator[tuple[int, DoorMetrics]]:  # fmt: skip
    metrics = DoorMetrics()
    config = dataclasses.replace(service_config(ROUTING_POLICY="round_robin"), door_read_timeout_s=read_timeout_s)
    door = build_door(config, [e.info for e in engines], "m", metrics)
    port = free_port()
    with ExitStack() as stack:
        for engine in engines:
            config = uvicorn.Config(engine.app(), host="127.0.0.1", port=engine.port, log_level="warning",
                                    timeout_keep_alive=engine_keep_alive_s)  # fmt: skip
            stack.enter_context(serving(engine.app(), engine.port, config))
        stack.enter_context(serving(door.app, port, door.uvicorn_config("127.0.0.1", port, drain_timeout_s=5)))
        yield port, metrics


def _request(body: bytes, extra: str = "") -> bytes:
    return (f"POST /v1/completions HTTP/1.1\r\nHost: door\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body  # fmt: skip


def _read_answers(sock: socket.socket, count: int) -> list[tuple[int, dict[str, str], bytes]]:
    """``count`` whole answers (Content-Length bodies) from ``sock``."""
    buffer, answers = b"", []
    sock.settimeout(10)
    while len(answers) < count:
        while b"\r\n\r\n" not in buffer:
            data = sock.recv(65536)
            assert data, f"the door closed the connection after {len(answers)} answer(s)"
            buffer += data
        head, buffer = buffer.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        status = int(lines[0].split()[1])
        headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(buffer) < length:
            data = sock.recv(65536)
            assert data, "the door closed the connection in an answer's body"
            buffer += data
        answers.append((status, headers, buffer[:length]))
        buffer = buffer[length:]
    return answers


def _counter(metrics: DoorMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_expect_100_continue_is_answered_before_the_body() -> None:
    engine = FakeEngine("c0", "colocated")
    with door_over([engine]) as (port, _), socket.create_connection(("127.0.0.1", port)) as sock:
        body = json.dumps({"prompt": "x" * 2000}).encode()  # curl sends Expect: 100-continue above 1 KiB
        head = _request(body, "Expect: 100-continue\r\n")[: -len(body)]
        sock.sendall(head)
        sock.settimeout(5)
        assert sock.recv(1024) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        [(status, _, answer)] = _read_answers(sock, 1)
    assert status == 200
    assert json.loads(answer)["choices"][0]["text"] == "c0"
    assert engine.received[0]["body"]["prompt"] == "x" * 2000


def test_pipelined_requests_are_answered_in_order_on_one_connection() -> None:
    engines = [FakeEngine("c0", "colocated"), FakeEngine("c1", "colocated")]
    with door_over(engines) as (port, _), socket.create_connection(("127.0.0.1", port)) as sock:
        requests = [_request(json.dumps({"prompt": f"p{i}"}).encode(), f"X-Request-Id: r{i}\r\n") for i in range(3)]
        sock.sendall(b"".join(requests))
        answers = _read_answers(sock, 3)
    assert [status for status, _, _ in answers] == [200, 200, 200]
    assert [headers["x-request-id"] for _, headers, _ in answers] == ["r0", "r1", "r2"]
    assert [json.loads(body)["id"] for _, _, body in answers] == ["r0", "r1", "r2"]  # each its own engine answer
    assert [json.loads(body)["choices"][0]["text"] for _, _, body in answers] == ["c0", "c1", "c0"]


def test_a_malformed_request_gets_400_in_openai_form_and_the_connection_closes() -> None:
    with door_over([FakeEngine("c0", "colocated")]) as (port, _), socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nContent-Length: nope\r\n\r\n")
        [(status, headers, body)] = _read_answers(sock, 1)
        assert sock.recv(1024) == b""  # closed
    assert status == 400
    assert headers["connection"] == "close"
    error = json.loads(body)["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", 400)
    assert error["message"].startswith("malformed HTTP request")


def test_another_method_on_a_completions_path_gets_405_in_openai_form() -> None:
    engine = FakeEngine("c0", "colocated")
    with door_over([engine]) as (port, _):
        answer = httpx.get(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=10)
    assert answer.status_code == 405
    assert answer.headers["allow"] == "POST"
    assert answer.json()["error"] == {"message": "GET is not allowed on /v1/chat/completions: send POST",
                                      "type": "invalid_request_error", "param": None, "code": 405}  # fmt: skip
    assert engine.received == []


def test_a_body_over_the_limit_gets_413(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_server, "MAX_BODY_BYTES", 1000)
    engine = FakeEngine("c0", "colocated")
    with door_over([engine]) as (port, _):
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "x" * 2000}, timeout=10)
        small = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "x"}, timeout=10)
    assert answer.status_code == 413
    assert answer.json()["error"]["message"] == "the request body is over 1000 bytes"
    assert small.status_code == 200
    assert len(engine.received) == 1


def test_a_body_announced_over_the_limit_gets_413_before_it_is_sent() -> None:
    engine = FakeEngine("c0", "colocated")
    with door_over([engine]) as (port, _), socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: door\r\nContent-Length: {(64 << 20) + 1}\r\n\r\n".encode())
        answer = _closed_by_door(sock, 10)  # no byte of the body sent
    assert answer.startswith(b"HTTP/1.1 413 ") and engine.received == []


def test_a_large_body_reaches_the_engine_whole() -> None:
    engine = FakeEngine("c0", "colocated")
    prompt = "".join(chr(ord("a") + i % 26) for i in range(3_000_000))  # written in more than one piece
    with door_over([engine]) as (port, _):
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": prompt}, timeout=30)
    assert answer.status_code == 200
    assert engine.received[0]["body"]["prompt"] == prompt


def test_an_engine_closing_idle_connections_costs_no_retry_and_no_suspicion() -> None:
    """vLLM's Uvicorn closes a keep-alive connection idle for its timeout; the door must
    not take that for a failed engine."""
    engine = FakeEngine("c0", "colocated")
    with door_over([engine], engine_keep_alive_s=1) as (port, metrics):
        url = f"http://127.0.0.1:{port}/v1/completions"
        statuses = [httpx.post(url, json={"prompt": "a"}, timeout=10).status_code]
        assert connections_accepted_on(engine.port) == 1  # kept alive in the door's pool
        wait_for(lambda: connections_accepted_on(engine.port) == 0, 10, "the engine closing the door's idle connection")
        statuses += [httpx.post(url, json={"prompt": "b"}, timeout=10).status_code for _ in range(3)]
        healthy = _counter(metrics, "frontdoor_engine_healthy", engine="c0", role="colocated")
        retries = _counter(metrics, "frontdoor_retries_total", leg="colocated")
    assert statuses == [200, 200, 200, 200]
    assert (healthy, retries) == (1.0, 0.0)
    assert len(engine.received) == 4


def test_shutdown_lets_a_request_in_flight_finish_and_refuses_new_connections() -> None:
    engine = FakeEngine("c0", "colocated", delay_s=1.0)
    door = build_door(service_config(ROUTING_POLICY="round_robin"), [engine.info], "m")
    port = free_port()
    with serving(engine.app(), engine.port):
        server = uvicorn.Server(door.uvicorn_config("127.0.0.1", port, drain_timeout_s=10))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, "the door did not start"
            time.sleep(0.02)
        answers: list[httpx.Response] = []
        slow = threading.Thread(target=lambda: answers.append(
            httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "slow"}, timeout=10)))  # fmt: skip
        slow.start()
        while not engine.received:
            assert time.monotonic() < deadline, "the request never reached the engine"
            time.sleep(0.02)
        server.should_exit = True
        wait_for(lambda: ("127.0.0.1", port) not in listening_addresses([os.getpid()]), 10, "the door closing its listening socket")
        with pytest.raises(httpx.ConnectError):
            httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "late"}, timeout=2)
        slow.join(10)
        thread.join(10)
    assert [answer.status_code for answer in answers] == [200]
    assert answers[0].headers["connection"] == "close"
    assert not thread.is_alive()
    assert len(engine.received) == 1


def _closed_by_door(sock: socket.socket, timeout_s: float) -> bytes:
    """Everything the door sends until it closes the connection (AssertionError if it
    keeps it open past ``timeout_s``)."""
    sock.settimeout(timeout_s)
    received = b""
    try:
        while data := sock.recv(65536):
            received += data
    except TimeoutError:
        raise AssertionError(f"the door kept the connection open {timeout_s} s; received {received[:200]!r}") from None
    return received


def test_a_request_that_stops_half_way_gets_408_and_the_connection_closes() -> None:
    """A slowloris: part of a head, or a head and part of its body, then nothing (or a byte
    now and then, which must not buy more time)."""
    engine = FakeEngine("c0", "colocated")
    with door_over([engine], read_timeout_s=1.0) as (port, _), ExitStack() as stack:
        partial_head = b"POST /v1/completions HTTP/1.1\r\nHost: door\r\n"
        partial_body = _request(b'{"prompt": "a long prompt"}')[:-10]
        socks = [stack.enter_context(socket.create_connection(("127.0.0.1", port))) for _ in range(20)]
        started = time.monotonic()
        for index, sock in enumerate(socks):
            sock.sendall(partial_head if index % 2 else partial_body)
        socks[0].sendall(b"x")  # later bytes do not restart the clock
        for sock in socks:
            answer = _closed_by_door(sock, 5)
            assert answer.startswith(b"HTTP/1.1 408 "), answer[:100]
            assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == 408
        assert time.monotonic() - started < 3
        assert engine.received == []
        with socket.create_connection(("127.0.0.1", port)) as sock:  # a whole request is served as before
            sock.sendall(_request(b'{"prompt": "p"}'))
            assert _read_answers(sock, 1)[0][0] == 200


def test_a_pipelining_flood_is_not_read_faster_than_it_is_answered() -> None:
    """60 pipelined 1 MiB requests behind slow answers: the door stops reading the
    connection (the client's send blocks) instead of holding them all, and answers every
    one, in order, as the client reads."""
    engine = FakeEngine("c0", "colocated", delay_s=0.05)
    body = json.dumps({"prompt": "y" * (1 << 20)}).encode()
    with door_over([engine]) as (port, _), socket.create_connection(("127.0.0.1", port)) as sock:
        sent = threading.Event()
        sender = threading.Thread(target=lambda: (sock.sendall(_request(body) * 60), sent.set()), daemon=True)
        sender.start()
        time.sleep(1.5)  # a window to watch the door not reading: nothing to poll for
        assert not sent.is_set(), "the door read 60 MiB of pipelined requests it had not answered"
        assert len(engine.received) < 30
        answers = _read_answers(sock, 60)
        sender.join(timeout=30)
        assert sent.is_set() and [status for status, _, _ in answers] == [200] * 60
        assert len(engine.received) == 60


def test_an_http10_client_gets_its_stream_unchunked_and_the_connection_closed() -> None:
    engine = FakeEngine("c0", "colocated", stream_chunks=2)
    with door_over([engine]) as (port, _), socket.create_connection(("127.0.0.1", port)) as sock:
        body = b'{"prompt": "p", "stream": true}'
        sock.sendall(f"POST /v1/completions HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        head, _, content = _closed_by_door(sock, 10).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and b"transfer-encoding" not in head.lower()
        assert b"connection: close" in head.lower()
        events = [event.removeprefix(b"data: ") for event in content.split(b"\n\n") if event]
        assert [json.loads(event)["choices"][0]["text"] for event in events[:-1]] == ["c0-0", "c0-1"]
        assert events[-1] == b"[DONE]"  # the raw events, no chunk sizes between them


def test_a_request_that_may_have_reached_the_engine_is_never_sent_again() -> None:
    """An engine that reads the second request on a kept-alive connection and then drops
    it (it died, or its connection broke) may be computing it: the client reports the
    engine unreachable and sends nothing again (the door then picks another engine).
    It used to send the request once more on a new connection: the work ran twice."""
    received: list[bytes] = []
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                buffer, answered = b"", 0
                while True:
                    data = conn.recv(65536)
                    if not data:
                        break
                    buffer += data
                    while b"\r\n\r\n{}" in buffer:
                        request, _, buffer = buffer.partition(b"\r\n\r\n{}")
                        received.append(request.split(b"\r\n")[0])
                        if answered:
                            conn.close()  # read, then gone without an answer
                            break
                        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        answered += 1
                    else:
                        continue
                    break

    threading.Thread(target=serve, daemon=True).start()

    async def two_requests() -> None:
        client = EngineClient()
        first = await client.request("POST", "127.0.0.1", port, "/first", b"{}")
        assert (first.status, await first.read()) == (200, b"ok")
        first.release()
        with pytest.raises(EngineUnreachable):
            await client.request("POST", "127.0.0.1", port, "/second", b"{}")
        client.close()

    try:
        asyncio.run(two_requests())
    finally:
        listener.close()
    assert received == [b"POST /first HTTP/1.1", b"POST /second HTTP/1.1"]  # each once
