"""The helper process that makes an engine's data system calls (see ``remote_store``).

The data system SDK holds Python's GIL for the whole of a call, waits included, so a
call made in an engine's process stops every thread of it (the model runner too) until
the worker answers. This process makes the calls instead. It owns one ``BlockStore``
and serves one engine thread over a socket: one request at a time, one answer each.
Block bytes travel through a shared memory arena the engine maps too; the helper copies
them between the arena and the store's own shared memory. A CPU engine whose KV cache
is shared (``shared_cache``) passes it too: then ``get_into`` and ``put_from`` copy
blocks between the cache and the store directly, one copy each way. It exits when the engine's
end of the socket closes (the engine stopped or died).

    python -m patch.yuanrong_connector.store_process --conn-fd N --arena-fd M ...
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import mmap
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from patch.yuanrong_connector.integrity import SEAL_BYTES, unseal
from patch.yuanrong_connector.store import BlockStore
from patch.yuanrong_connector.store_mapping import populate_store_mappings

logger = logging.getLogger(f"vllm.{__name__}")


class Copier:
    """Copies values between the arena and the store's buffers, on as many threads as
    this process may run on (up to 8): ``ctypes.memmove`` runs without the GIL, and one
    thread's memcpy is well below what a server's memory gives (measured on an H200
    host: 12-15 GB/s for the data system's own multi-threaded copies).

    Each thread is bound to a core of its own. Unbound, threads woken after the helper
    sat idle (every load, in practice) were put on one core and took turns there while
    the other idled: on 2 cores, 48 MiB checked and copied on 2 threads took 8.9 ms after
    150 ms asleep against 5.4 ms back to back, and 6.2 ms bound (``bench load-floor``,
    ``--unbound`` for the first)."""

    def __init__(self, bind: bool = True) -> None:
        cores = sorted(os.sched_getaffinity(0))[:8]
        self._threads = len(cores)
        unbound = iter(cores)
        lock = threading.Lock()

        def bind_to_core() -> None:
            with lock:
                core = next(unbound)
            os.sched_setaffinity(0, {core})  # 0: the calling thread

        self._pool = (ThreadPoolExecutor(self._threads, thread_name_prefix="copy", initializer=bind_to_core if bind else None)
                      if self._threads > 1 else None)  # fmt: skip

    @property
    def threads(self) -> int:
        return self._threads

    def run(self, moves: list[tuple[memoryview, memoryview]]) -> None:
        """Copy each (source, target) pair of equal-sized views."""
        self.run_addressed([(_address(target), _address(source), len(source)) for source, target in moves])

    def run_addressed(self, moves: list[tuple[int, int, int]]) -> None:
        """Copy each (target address, source address, size): one run of moves per thread
        (a task per move costs ~15 us of pool overhead, more than a 128 KiB copy)."""
        if self._pool is None or len(moves) < 2:
            _move_all(moves)
            return
        for _ in self._pool.map(_move_all, [moves[i :: self._threads] for i in range(self._threads)]):
            pass

    def each(self, work: Callable[[int], bool], count: int) -> list[bool]:
        """``work(i)`` for i in range(count), the range cut into one run per thread; the
        results in order. ``work`` must release the GIL for the bulk of its time (ctypes
        copies and checksums do)."""
        if self._pool is None or count < 2:
            return [work(i) for i in range(count)]
        bounds = [count * t // self._threads for t in range(self._threads + 1)]
        runs = self._pool.map(lambda t: [work(i) for i in range(bounds[t], bounds[t + 1])], range(self._threads))
        return [done for run in runs for done in run]


def _move_all(moves: list[tuple[int, int, int]]) -> None:
    for target, source, size in moves:
        ctypes.memmove(target, source, size)


def _address(view: memoryview) -> int:
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


def _shared_cache_address(cache: memoryview | None) -> int:
    if cache is None:
        raise ValueError("this helper was started without the engine's KV cache")
    return _address(cache)


def _piece_moves(value: int, cache: int, pieces: list[tuple[int, int]], to_cache: bool) -> list[tuple[int, int, int]]:
    """(target, source, size) copies between one stored value at ``value`` and its pieces
    (offset in the KV cache, size), which follow each other in the value."""
    moves = []
    inside = 0
    for offset, size in pieces:
        moves.append((cache + offset, value + inside, size) if to_cache else (value + inside, cache + offset, size))
        inside += size
    return moves


def _load_checked(store: BlockStore, keys: list[str], size: int, copier: Copier,
                  moves_of: Callable[[int, memoryview], Sequence[tuple[int, int, int]]], leading: bool,
                  held: list[Any]) -> list[bool]:  # fmt: skip
    """Read ``keys``' values (``size`` bytes of data each) and copy each whose seal matches
    by ``moves_of(i, data)``: checked and copied on the copier's threads, each value's seal
    before its copies. One flag per key: copied. With ``leading`` only the leading blocks
    present and sound count: from the first missing one on nothing is written, and a block
    after the first unsound one may have been written but is reported not copied (vLLM
    computes it over). The SDK's buffers go to ``held``: releasing 32 of them took 0.1-1.6
    ms, which ``serve`` spends after the answer is sent."""
    buffers = store.get_sealed(keys)
    held.append(buffers)
    views = [None if buffer is None else memoryview(buffer.immutable_data()) for buffer in buffers]
    present = [view is not None and len(view) == size + SEAL_BYTES for view in views]
    todo = [i for i, there in enumerate(present) if there]
    if leading:
        todo = todo[: present.index(False)] if False in present else todo
    check_bytes = store.check_bytes

    def load(index: int) -> bool:
        i = todo[index]
        data = unseal(views[i], keys[i], check_bytes)  # type: ignore[arg-type]
        if data is None:
            return False
        _move_all(moves_of(i, data))
        return True

    sound = copier.each(load, len(todo))
    store.discard_corrupt([keys[i] for i, ok in zip(todo, sound) if not ok])
    if leading and False in sound:
        todo = todo[: sound.index(False)]
    else:
        todo = [i for i, ok in zip(todo, sound) if ok]
    copied = set(todo)
    return [i in copied for i in range(len(keys))]


def answer(store: BlockStore, arena: memoryview, request: tuple[Any, ...], copier: Copier, held: list[Any],
           cache: memoryview | None = None) -> Any:  # fmt: skip
    """What one request gives (store buffers it read go to ``held``, to be released once
    the answer is sent). Requests: ("connect",), ("exists", keys),
    ("put", keys, value_size): values at arena[i * value_size] for keys[i];
    ("get", keys, value_size): copies the values there, gives one flag per key;
    ("get_into" | "put_from", keys, value_size, spans): the same between the store and the
    shared KV cache, spans[i] the (offset, size) pieces of keys[i]'s value in order."""
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
        arena_address = _address(arena)

        def into_arena(i: int, data: memoryview) -> list[tuple[int, int, int]]:
            return [(arena_address + i * size, _address(data), size)]

        return _load_checked(store, keys, size, copier, into_arena, leading=False, held=held)
    if op == "get_into":  # ("get_into", keys, value_size, spans): each value into its pieces of the KV cache
        keys, size, spans = request[1], request[2], request[3]
        cache_address = _shared_cache_address(cache)

        def into_cache(i: int, data: memoryview) -> list[tuple[int, int, int]]:
            return _piece_moves(_address(data), cache_address, spans[i], to_cache=True)

        return _load_checked(store, keys, size, copier, into_cache, leading=True, held=held)
    if op == "put_from":  # ("put_from", keys, value_size, spans): values gathered from the KV cache
        keys, size, spans = request[1], request[2], request[3]
        cache_address = _shared_cache_address(cache)

        def fill_from_cache(first: int, buffers: list[memoryview]) -> None:
            moves = []
            for buffer, pieces in zip(buffers, spans[first : first + len(buffers)]):
                moves.extend(_piece_moves(_address(buffer), cache_address, pieces, to_cache=False))
            copier.run_addressed(moves)

        result = store.put(keys, size, fill_from_cache)
        return (result.stored, result.skipped_full, result.failed)
    raise ValueError(f"unknown request {op!r}")


def serve(conn: Connection, store: BlockStore, arena: memoryview, copier: Copier, cache: memoryview | None = None) -> None:
    """Answer requests until the engine closes its end; each answer carries the store's
    back-off state and what it found corrupt: (seconds left marked down, seconds left
    skipping saves, result, values whose seal did not match).
    A helper that moves blocks fills its page tables of the store's memory once
    (``store_mapping``), after its first request that maps it."""
    unfilled_tries = 5
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        held: list[Any] = []
        try:
            result = answer(store, arena, request, copier, held, cache)
        except Exception as exc:  # a bug here must not leave the engine waiting for an answer
            logger.exception("[store helper] %s failed", request[0])
            result = exc
        down_s, full_s = store.backoff_s()
        try:
            conn.send((down_s, full_s, result, store.take_corrupt()))
        except (EOFError, OSError):
            return
        held.clear()  # the store's buffers, released once the engine has its answer
        if unfilled_tries and request[0] != "exists":  # once the SDK has mapped the store's memory
            unfilled_tries = 0 if populate_store_mappings() is not None else unfilled_tries - 1


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
    parser.add_argument("--no-check-bytes", action="store_true", help="check seals' keys and lengths, not checksums")
    parser.add_argument("--cache-fd", type=int, default=None, help="the engine's KV cache memfd (shared_cache)")
    parser.add_argument("--cache-bytes", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s [store helper %(process)d] %(message)s")
    arena = mmap.mmap(args.arena_fd, args.arena_bytes)
    os.close(args.arena_fd)
    cache = None
    if args.cache_fd is not None:
        # Page tables filled now: a page this process touches first costs a fault (without
        # this a fresh 2K-token load, 24 MiB, took 15 ms instead of 9).
        cache = memoryview(mmap.mmap(args.cache_fd, args.cache_bytes, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE))
        os.close(args.cache_fd)
    store = BlockStore(args.address, args.request_timeout_ms, args.ttl_s, args.retry_s, args.exclusive_connection,
                       check_bytes=not args.no_check_bytes)  # fmt: skip
    with memoryview(arena) as view:
        serve(Connection(args.conn_fd), store, view, Copier(), cache)


if __name__ == "__main__":
    main()
