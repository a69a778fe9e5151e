"""The data system as a block store whose calls run in a helper process, so that no
store call can stop an engine.

openyuanrong-datasystem 0.8.1's SDK holds Python's GIL for the whole of a call, its wait
for the worker included (``benchmarks.sdk_gil``). Called from an engine's saver or
loader thread, a call that waits 2 s stops the model runner for 2 s; in torture runs on
a busy host, calls stuck for 60-80 s froze both engines. Here each engine thread that
uses the store (the saver, the loader, the scheduler's lookups) talks to its own helper
process (``store_process``), which makes the SDK calls. The engine thread waits for the
answer on a socket, with the GIL released, and for a bounded time: an answer later than
the request timeout (per SDK call) plus ``_SLACK_S`` makes that call a miss, and its
helper is replaced (see Fencing below). Block bytes cross through a shared memory arena
(a memfd both processes map): one more host copy per block each way than a zero-copy
SDK call, in exchange for an engine that never waits on the store longer than that
bound. A CPU engine's KV cache
can be shared with its helpers instead (``shared_cache``): then ``get_into`` and
``put_from`` copy blocks between the cache and the store in the helper, one copy each way.

A helper that dies is replaced on the first call ``retry_s`` later; meanwhile every call
is a miss (vLLM computes). A new helper connects on its own (it imports the SDK and
reaches the worker, seconds on a loaded host); a call waits for that at most its own
bound, and is a miss if it does not come, so a slow start is never fenced as a stuck
call. A helper exits when the engine's end of its socket closes.

Fencing: a call that misses its bound may still be at work in the helper, on memory the
engine is about to hand back (a late ``get_into`` writing blocks vLLM gave to another
request, a late ``put_from`` publishing blocks vLLM freed). So before such a miss is
reported, the helper is killed (SIGKILL, then reaped: from then on it touches no memory)
and a replacement is started at once; calls are misses until it has connected. Killing
costs a helper start on a path only a stuck call takes; copying through helper-owned
memory instead would cost every on-time load a second copy.
"""

from __future__ import annotations

import logging
import mmap
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from patch.yuanrong_connector.shared_cache import SharedRegion
from patch.yuanrong_connector.store import (
    _MAX_KEYS_PER_READ,
    _MAX_KEYS_PER_WRITE,
    BlockStore,
    PutResult,
    leading_blocks,
)

logger = logging.getLogger(f"vllm.{__name__}")

# The arena one helper moves block bytes through: at least this much, at least one block.
# CUDA engines take a larger one, page-locked: each arena's worth is one round trip, and
# on an H200 host (Llama-3-8B blocks, 512 MiB per save) 64 / 256 / 512 MiB arenas gave
# 7.0 / 9.9 / 11.7 GB/s saves against 12.1-12.9 GB/s for in-process SDK calls.
ARENA_BYTES = 64 * 1024 * 1024
CUDA_ARENA_BYTES = 256 * 1024 * 1024
# Beyond the SDK's own request timeouts, how long an answer may take to come back (the
# helper is scheduled like any process of a busy host; this host has 2 cores).
_SLACK_S = 0.5
# How long a new helper may take to import the SDK and connect (a loaded host).
_START_TIMEOUT_S = 60.0
_PROJECT_ROOT = str(Path(__file__).resolve().parents[2])
_MISS = object()


class _ArenaValue:
    """One value ``get`` copied into the arena; valid until the next call on that store."""

    __slots__ = ("_view",)

    def __init__(self, view: memoryview) -> None:
        self._view = view

    def immutable_data(self) -> memoryview:
        return self._view


class RemoteBlockStore:
    """``BlockStore``'s interface, for one engine thread; ``sibling()`` gives another
    thread its own helper."""

    def __init__(
        self,
        address: str,
        request_timeout_ms: int = 2000,
        ttl_s: int = 0,
        retry_s: float = 5.0,
        arena_bytes: int = ARENA_BYTES,
        exclusive_connection: bool = True,
        check_bytes: bool = True,
    ) -> None:
        self._address = address
        self._exclusive = exclusive_connection
        self._check_bytes = check_bytes
        self._corrupt = 0  # values the helper found corrupt, not yet taken
        self._timeout_ms = request_timeout_ms
        self._ttl_s = ttl_s
        self._retry_s = retry_s
        self.arena_bytes = arena_bytes  # may be changed before the first call
        self._lock = threading.Lock()
        self._helper: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._arena: memoryview | None = None
        self._owed = 0  # answers the helper still owes (a new helper's connect)
        self._connected = False  # the helper's connect answer said it reached the worker
        self._fenced = 0  # helpers killed because a call ran past its bound
        self._down_until = 0.0
        self._full_until = 0.0
        self._late_logged_until = 0.0
        self._closed = False
        # CUDA engines page-lock each arena (``HostStaging.pin``), so the device copies
        # straight into it; the callable it returns undoes that before the arena goes.
        self.arena_pinner: Callable[[memoryview], Callable[[], None]] | None = None
        self._unpin: Callable[[], None] | None = None
        self._shared_cache: SharedRegion | None = None

    @property
    def address(self) -> str:
        return self._address

    @property
    def available(self) -> bool:
        """False while the store is marked down, or an answer is still owed."""
        return time.monotonic() >= self._down_until and not self._still_owed()

    @property
    def takes_saves(self) -> bool:
        return self.available and time.monotonic() >= self._full_until

    @property
    def fenced(self) -> int:
        """Helpers killed so far because a call ran past its bound."""
        return self._fenced

    @property
    def helper_pid(self) -> int | None:
        """The helper process's pid, while one runs."""
        return None if self._helper is None else self._helper.pid

    def sibling(self) -> RemoteBlockStore:
        """The same store for another thread: its own helper, arena and back-off state."""
        twin = RemoteBlockStore(self._address, self._timeout_ms, self._ttl_s, self._retry_s, self.arena_bytes, self._exclusive,
                                self._check_bytes)  # fmt: skip
        twin.arena_pinner = self.arena_pinner
        twin._shared_cache = self._shared_cache
        return twin

    @property
    def shared_cache(self) -> SharedRegion | None:
        return self._shared_cache

    def share_cache(self, region: SharedRegion) -> None:
        """Give the helper the engine's shared KV cache (a running helper is replaced on
        the next call, started with it)."""
        with self._lock:
            self._shared_cache = region
            self._stop_helper()

    def take_corrupt(self) -> int:
        """Values read since the last call whose seal did not match (not loaded)."""
        corrupt, self._corrupt = self._corrupt, 0
        return corrupt

    def max_blocks_per_move(self, value_size: int) -> int:
        """How many values of ``value_size`` bytes one ``get`` may return (the arena's room)."""
        return max(1, self.arena_bytes // max(1, value_size))

    # ---- calls ----
    def connect(self) -> bool:
        """Start the helper and connect it now (engine start); False if the store is unreachable."""
        with self._lock:
            return self._usable(_START_TIMEOUT_S) and self._connected

    def exists(self, keys: Sequence[str]) -> list[bool]:
        """Which keys are stored; all False if the store cannot say in time."""
        if not keys:
            return []
        with self._lock:
            result = self._call(("exists", list(keys)), -(-len(keys) // _MAX_KEYS_PER_READ))
        return [False] * len(keys) if result is _MISS else list(result)

    def count_present_prefix(self, keys: Sequence[str], keys_per_block: int = 1) -> int:
        """How many leading blocks are stored; a block is ``keys_per_block`` consecutive keys."""
        return leading_blocks(self.exists(keys), keys_per_block)

    def put(self, keys: Sequence[str], value_size: int, fill: Callable[[int, list[memoryview]], None]) -> PutResult:
        """Like ``BlockStore.put``: ``fill(first, buffers)`` writes the values of
        ``keys[first : first + len(buffers)]`` (here into the arena, an arena's worth at a
        time); the helper stores and publishes them."""
        stored = skipped = failed = 0
        per_move = self.max_blocks_per_move(value_size)
        with self._lock:
            for first in range(0, len(keys), per_move):
                chunk = list(keys[first : first + per_move])
                if time.monotonic() < self._full_until:
                    skipped += len(chunk)
                    continue
                arena = self._arena_for(value_size, self._bound_s(2 * -(-len(chunk) // _MAX_KEYS_PER_WRITE)))
                if arena is None:
                    failed += len(chunk)
                    continue
                fill(first, [arena[i * value_size : (i + 1) * value_size] for i in range(len(chunk))])
                result = self._call(("put", chunk, value_size), 2 * -(-len(chunk) // _MAX_KEYS_PER_WRITE))
                if result is _MISS:
                    failed += len(chunk)
                    continue
                stored, skipped, failed = stored + result[0], skipped + result[1], failed + result[2]
        return PutResult(stored, skipped, failed)

    def get(self, keys: Sequence[str], value_size: int = 0) -> list[Any | None]:
        """Values copied into the arena (``.immutable_data()`` gives a memoryview), ``None``
        where a key is missing, not ``value_size`` bytes, or the store failed. At most
        ``max_blocks_per_move(value_size)`` keys; the views last until the next call."""
        if len(keys) > self.max_blocks_per_move(value_size):
            raise ValueError(f"{len(keys)} values of {value_size} bytes do not fit the {self.arena_bytes}-byte arena")
        if not keys:
            return []
        with self._lock:
            arena = self._arena_for(value_size, self._bound_s(-(-len(keys) // _MAX_KEYS_PER_READ)))
            result = _MISS if arena is None else self._call(("get", list(keys), value_size), -(-len(keys) // _MAX_KEYS_PER_READ))
            if result is _MISS or arena is None:
                return [None] * len(keys)
            return [
                _ArenaValue(arena[i * value_size : (i + 1) * value_size]) if copied else None
                for i, copied in enumerate(result)
            ]

    def get_into(self, keys: Sequence[str], value_size: int, spans: Sequence[Sequence[tuple[int, int]]]) -> list[bool]:
        """Copy each key's value into the shared KV cache at ``spans[i]`` ((offset, size)
        pieces, in the value's order): one flag per key, True where it was copied."""
        if not keys:
            return []
        with self._lock:
            request = ("get_into", list(keys), value_size, [list(pieces) for pieces in spans])
            result = self._call(request, -(-len(keys) // _MAX_KEYS_PER_READ)) if self._shared_cache else _MISS
        return [False] * len(keys) if result is _MISS else list(result)

    def put_from(self, keys: Sequence[str], value_size: int, spans: Sequence[Sequence[tuple[int, int]]]) -> PutResult:
        """Like ``put``, the values gathered by the helper from the shared KV cache."""
        if not keys:
            return PutResult(0, 0, 0)
        with self._lock:
            if time.monotonic() < self._full_until:
                return PutResult(0, len(keys), 0)
            request = ("put_from", list(keys), value_size, [list(pieces) for pieces in spans])
            result = self._call(request, 2 * -(-len(keys) // _MAX_KEYS_PER_WRITE)) if self._shared_cache else _MISS
        return PutResult(0, 0, len(keys)) if result is _MISS else PutResult(*result)

    def close(self) -> None:
        """Stop the helper (a call under way in another thread ends as a miss)."""
        acquired = self._lock.acquire(timeout=self._timeout_ms / 1000 + _SLACK_S)
        try:
            self._closed = True
            self._stop_helper()
        finally:
            if acquired:
                self._lock.release()

    # ---- the helper (all below with self._lock held) ----
    def _call(self, request: tuple[Any, ...], sdk_calls: int) -> Any:
        """The helper's result, or _MISS (down, no helper, a late or lost answer)."""
        bound_s = self._bound_s(sdk_calls)
        if not self._usable(bound_s):
            return _MISS
        assert self._conn is not None
        try:
            self._conn.send(request)
            if not self._conn.poll(bound_s):
                self._fence(request[0], bound_s)
                return _MISS
            answer = self._conn.recv()
        except (EOFError, OSError) as exc:
            self._lost(f"{request[0]}: {exc!r}")
            return _MISS
        result = self._absorb(answer)
        return _MISS if isinstance(result, Exception) else result

    def _bound_s(self, sdk_calls: int) -> float:
        return sdk_calls * self._timeout_ms / 1000 + _SLACK_S

    def _fence(self, op: str, bound_s: float) -> None:
        """A call ran past its bound: kill its helper before the miss is reported (so the
        call can no longer touch the KV cache or publish), and start a replacement (calls
        are misses until it has connected)."""
        helper = self._helper
        if helper is not None:
            helper.kill()
            helper.wait()
        self._fenced += 1
        self._log_late(op, bound_s)
        self._stop_helper()
        if not self._closed:
            self._start()

    def _usable(self, wait_s: float = 0.0) -> bool:
        """A helper is running (started if need be) and has connected, waiting for that up
        to ``wait_s``: a call waits for a new helper's start at most its own bound."""
        if self._closed or time.monotonic() < self._down_until:
            return False
        if self._conn is None and not self._start():
            return False
        return self._collect_owed(wait_s)

    def _arena_for(self, value_size: int, wait_s: float) -> memoryview | None:
        """The arena, once the helper is usable and the arena holds a value of this size."""
        if value_size > self.arena_bytes:
            logger.info("[store=%s] values of %d bytes: moving to a larger arena", self._address, value_size)
            self._stop_helper()
            self.arena_bytes = value_size
        return self._arena if self._usable(wait_s) else None

    def _start(self) -> bool:
        parent_end, child_end = socket.socketpair()
        arena_fd = os.memfd_create("yuanrong-kv-arena")
        try:
            os.ftruncate(arena_fd, self.arena_bytes)
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (_PROJECT_ROOT, env.get("PYTHONPATH", "")) if p)
            command = [
                sys.executable, "-m", "patch.yuanrong_connector.store_process",
                "--conn-fd", str(child_end.fileno()), "--arena-fd", str(arena_fd),
                "--arena-bytes", str(self.arena_bytes), "--address", self._address,
                "--request-timeout-ms", str(self._timeout_ms), "--ttl-s", str(self._ttl_s),
                "--retry-s", str(self._retry_s), *(["--exclusive-connection"] if self._exclusive else []),
                *([] if self._check_bytes else ["--no-check-bytes"]),
            ]  # fmt: skip
            fds = [child_end.fileno(), arena_fd]
            if self._shared_cache is not None:
                command += ["--cache-fd", str(self._shared_cache.fd), "--cache-bytes", str(self._shared_cache.size)]
                fds.append(self._shared_cache.fd)
            self._helper = subprocess.Popen(command, pass_fds=fds, env=env, stdin=subprocess.DEVNULL)
            self._arena = memoryview(mmap.mmap(arena_fd, self.arena_bytes))
            if self.arena_pinner is not None:
                self._unpin = self.arena_pinner(self._arena)
        except (OSError, RuntimeError) as exc:
            parent_end.close()
            self._lost(f"could not start the store helper: {exc}")
            return False
        finally:
            child_end.close()
            os.close(arena_fd)
        self._conn = Connection(parent_end.detach())
        try:
            self._conn.send(("connect",))  # the helper imports the SDK and connects; answered when done
        except OSError as exc:
            self._lost(f"new helper: {exc!r}")
            return False
        self._owed = 1
        self._connected = False
        logger.info("[store=%s] store helper pid %d started (arena %d MiB)", self._address, self._helper.pid,
                    self.arena_bytes >> 20)  # fmt: skip
        return True

    def _collect_owed(self, wait_s: float = 0.0) -> bool:
        """Take a new helper's connect answer if it has come (waiting up to ``wait_s``);
        True when none is owed any more."""
        deadline = time.monotonic() + wait_s
        while self._owed:
            assert self._conn is not None
            try:
                if not self._conn.poll(max(0.0, deadline - time.monotonic())):
                    return False
                self._connected = self._absorb(self._conn.recv()) is True
            except (EOFError, OSError) as exc:
                self._lost(f"connect answer: {exc!r}")
                return False
            self._owed -= 1
        return True

    def _still_owed(self) -> bool:
        """True while a late answer is owed (checked without waiting for a call under way)."""
        if not self._owed:
            return False
        if not self._lock.acquire(blocking=False):
            return True
        try:
            return self._conn is not None and not self._collect_owed()
        finally:
            self._lock.release()

    def _absorb(self, answer: tuple[float, float, Any, int]) -> Any:
        down_s, full_s, result, corrupt = answer
        self._corrupt += corrupt
        now = time.monotonic()
        self._down_until = max(self._down_until, now + down_s) if down_s else self._down_until
        self._full_until = now + full_s
        return result

    def _log_late(self, op: str, bound_s: float) -> None:
        now = time.monotonic()
        if now < self._late_logged_until:
            return
        self._late_logged_until = now + self._retry_s
        logger.warning(
            "[store=%s] %s: no answer within %.1f s; that call is a miss, its helper was killed so that it cannot "
            "touch KV blocks handed back to vLLM, and calls are misses until a new helper has connected (this "
            "message at most every %.0f s)",
            self._address,
            op,
            bound_s,
            self._retry_s,
        )

    def _lost(self, reason: str) -> None:
        self._stop_helper()
        self._down_until = time.monotonic() + self._retry_s
        logger.warning("[store=%s] store helper lost (%s); treating the store as empty for %.0f s (requests recompute)",
                       self._address, reason, self._retry_s)  # fmt: skip

    def _stop_helper(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._unpin is not None:
            self._unpin()
            self._unpin = None
        self._arena = None  # views handed out keep the mapping alive until dropped
        self._owed = 0
        helper, self._helper = self._helper, None
        if helper is None:
            return
        try:
            helper.wait(timeout=2)  # it exits when its socket closes (after a call under way)
        except subprocess.TimeoutExpired:
            helper.kill()
            helper.wait()


# What the saver, the loader and the scheduler's lookups call: the engine's stores are
# remote; tests and benchmarks also call a ``BlockStore`` in their own process.
Store = BlockStore | RemoteBlockStore
