"""Where a local data system worker keeps its files: its unix sockets must fit Linux's
107-byte limit, or the worker dies at start ("len(109) is greater than linux max socket
len(108)", seen with a session folder under a long /tmp path)."""

from __future__ import annotations

from pathlib import Path

from deploy.datasystem import worker_home

# The longest socket the worker makes under its home (openyuanrong-datasystem 0.8.1).
LONGEST_SOCKET = "/datasystem/uds/b1ddc84a/exclusiveConn"


def _home_of_length(length: int) -> Path:
    base = "/tmp/h"
    return Path(base + "x" * (length - len(base)))


def test_a_home_whose_longest_socket_path_fits_is_kept() -> None:
    home = _home_of_length(107 - len(LONGEST_SOCKET))
    assert worker_home(home, "127.0.0.2:32389") == home


def test_a_home_one_byte_too_long_for_the_worker_s_sockets_moves_to_a_short_folder() -> None:
    home = _home_of_length(108 - len(LONGEST_SOCKET))  # the socket path would be 108 bytes
    short = worker_home(home, "127.0.0.2:32389")
    assert short == Path("/tmp/yr-ds-127.0.0.2-32389")
    assert len(str(short) + LONGEST_SOCKET) <= 107
