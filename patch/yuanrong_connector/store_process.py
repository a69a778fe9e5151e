"""The helper process that makes an engine's data system calls (see ``remote_store``).

The data system SDK holds Python's GIL for the whole of a call, waits included, so a
call made in an engine's process stops every thread of it (the model runner too) until
the worker answers. This process makes the calls instead. It owns one ``BlockStore``
and serves one engine thread over a socket: one request at a time, one answer each.
Block bytes travel through a shared memory arena the engine maps too; the helper copies
them between the arena and the store's own shared memory. It exits when the engine's
end of the socket closes (the engine stopped or died).

    python -m patch.yuanrong_connector.store_process --conn-fd N --arena-fd M ...
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from patch.yuanrong_connector.store import BlockStore

logger = logging.getLogger(f"vllm.{__name__}")


class Copier:
    """Copies values between the arena and the store's buffers, on as many threads as
    this process may run on (up to 8): ``ctypes.memmove`` runs without the GIL, and one
    thread's memcpy is well below what a server's memory gives (measured on an H200
    host: 12-15 GB/s for the data system's own multi-threaded copies)."""

    def __init__(self) -> None:
        threads = min(8, len(os.sched_getaffinity(0)))
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="copy") if threads > 1 else None

    def run(self, moves: list[tuple[memoryview, memoryview]]) -> None:
        """Copy each (source, target) pair of equal-sized views."""
        addressed = [(_address(target), _address(source), len(source)) for source, target in moves]
        if self._pool is None or len(addressed) < 2:
            for target, source, size in addressed:
                ctypes.memmove(target, source, size)
            return
        for _ in self._pool.map(lambda move: ctypes.memmove(*move), addressed):
            pass


def _address(view: memoryview) -> int:
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


def answer(store: BlockStore, arena: memoryview, request: tuple[Any, ...], copier: Copier) -> Any:
    """What one request gives. Requests: ("connect",), ("exists", keys),
    ("put", keys, value_size): values at arena[i * value_size] for keys[i];
    ("get", keys, value_size): copies the values there, gives one flag per key."""
    op = request[0]
    if op == "connect":
        return store.connect()
    if op == "exists":
        return store.exists(request[1])
    if op == "put":
        keys, size = request[1], request[2]

        def fill_from_arena(first: int, buffers: list[memoryview]) -> None:
            copier.run([(arena[i * size : (i + 1) * size], buffer[:size]) for i, buffer in enumerate(buffers, start=first)])

        result = store.put(keys, size, fill_from_arena)
        return (result.stored, result.skipped_full, result.failed)
    if op == "get":
        keys, size = request[1], request[2]
        buffers = store.get(keys)
        views = [None if buffer is None else buffer.immutable_data() for buffer in buffers]
        copied = [view is not None and len(view) == size for view in views]
        copier.run([(view, arena[i * size : (i + 1) * size]) for i, view in enumerate(views) if copied[i]])
        del views, buffers
        return copied
    raise ValueError(f"unknown request {op!r}")


def serve(conn: Connection, store: BlockStore, arena: memoryview, copier: Copier) -> None:
    """Answer requests until the engine closes its end; each answer carries the store's
    back-off state: (seconds left marked down, seconds left skipping saves, result)."""
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        try:
            result = answer(store, arena, request, copier)
        except Exception as exc:  # a bug here must not leave the engine waiting for an answer
            logger.exception("[store helper] %s failed", request[0])
            result = exc
        down_s, full_s = store.backoff_s()
        try:
            conn.send((down_s, full_s, result))
        except (EOFError, OSError):
            return


def main() -> None:
    parser = argparse.ArgumentParser(description="data system calls on behalf of one engine thread")
    parser.add_argument("--conn-fd", type=int, required=True)
    parser.add_argument("--arena-fd", type=int, required=True)
    parser.add_argument("--arena-bytes", type=int, required=True)
    parser.add_argument("--address", required=True)
    parser.add_argument("--request-timeout-ms", type=int, required=True)
    parser.add_argument("--ttl-s", type=int, required=True)
    parser.add_argument("--retry-s", type=float, required=True)
    parser.add_argument("--exclusive-connection", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s [store helper %(process)d] %(message)s")
    arena = mmap.mmap(args.arena_fd, args.arena_bytes)
    os.close(args.arena_fd)
    store = BlockStore(args.address, args.request_timeout_ms, args.ttl_s, args.retry_s, args.exclusive_connection)
    with memoryview(arena) as view:
        serve(Connection(args.conn_fd), store, view, Copier())


if __name__ == "__main__":
    main()
