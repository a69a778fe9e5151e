"""The /health probe the engine actors, ``status`` and ``deploy`` use: 200 is healthy;
any other status, a closed port, a silent server or a non-HTTP answer is not."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from workers.engine_process import is_healthy


@pytest.fixture
def answering() -> Iterator[tuple[int, list[bytes], list[bytes]]]:
    """A server on a free port that answers each connection with the next answer given,
    and records each request's bytes."""
    listener = socket.create_server(("127.0.0.1", 0))
    answers: list[bytes] = []
    requests: list[bytes] = []

    def serve() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            with connection:
                requests.append(connection.recv(4096))
                answer = answers.pop(0) if answers else b""
                if answer == b"silent":
                    time.sleep(1.0)  # holds the connection open, answering nothing
                else:
                    connection.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1], answers, requests
    listener.shutdown(socket.SHUT_RDWR)  # wakes the accept (close alone does not)
    listener.close()
    thread.join(timeout=5)


def test_200_is_healthy_and_the_request_is_a_get_of_health(answering: tuple[int, list[bytes], list[bytes]]) -> None:
    port, answers, requests = answering
    answers.append(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
    assert is_healthy("127.0.0.1", port) is True
    assert requests[0].startswith(b"GET /health HTTP/1.1\r\n")


@pytest.mark.parametrize("answer", [b"HTTP/1.1 503 Service Unavailable\r\n\r\n", b"HTTP/1.1 2000 OK\r\n\r\n",
                                    b"SSH-2.0-OpenSSH\r\n", b""])  # fmt: skip
def test_anything_but_200_is_not_healthy(answering: tuple[int, list[bytes], list[bytes]], answer: bytes) -> None:
    port, answers, _ = answering
    answers.append(answer)
    assert is_healthy("127.0.0.1", port) is False


def test_a_silent_server_is_not_healthy_after_the_timeout(answering: tuple[int, list[bytes], list[bytes]]) -> None:
    port, answers, _ = answering
    answers.append(b"silent")
    assert is_healthy("127.0.0.1", port, timeout_s=0.3) is False


def test_a_closed_port_is_not_healthy() -> None:
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        port = placeholder.getsockname()[1]
    assert is_healthy("127.0.0.1", port) is False
