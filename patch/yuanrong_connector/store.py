"""The openYuanrong data system as a block store: batched calls, zero-copy buffers,
bounded waits.

Every method takes all of a request's (or a step's) keys at once: one round trip per
call, never one per block. Every call is bounded by the request timeout, and store
failures reach the caller as misses, so vLLM recomputes instead of failing or hanging.
After a failure the store is left alone for ``retry_s`` (each call is then an instant
miss) instead of making every request wait out the timeout again; after an out-of-memory
refusal, saves are skipped for the same time while reads go on. A call the worker
answered too late is only that call's miss: one late answer (a busy machine) must not
turn into seconds of recomputed prompts for every request.

Every value is sealed when written and checked when read (integrity.py): ``get`` gives
only values whose seal matches their key and bytes, counts the others (``take_corrupt``)
and deletes them, so the next save of that block writes it anew.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from patch.yuanrong_connector.integrity import SEAL_BYTES, seal, unseal
from patch.yuanrong_connector.sdk_threads import calm_sdk_threads

# A child of vLLM's logger (its handlers and level apply); plain logging, so the module
# also runs where vLLM is not installed (the CUDA staging benchmark on a bare GPU host).
logger = logging.getLogger(f"vllm.{__name__}")

# The data system refuses more keys than these in one call (openyuanrong-datasystem 0.8.1:
# mcreate/mset_buffer 1000; exist/get "objectKeys size exceed 10000").
_MAX_KEYS_PER_WRITE = 1000
_MAX_KEYS_PER_READ = 10000
# How the SDK says a worker did not answer within the request timeout (it is alive: a
# stopped worker gives "SOCK_CONN_WAIT_TIMEOUT" or a refused connection instead): on the
# shared connection, and on an exclusive one.
_SLOW_ANSWERS = ("RPC_RECV_TIMEOUT", "RPC deadline exceeded")


@dataclass(frozen=True)
class PutResult:
    stored: int = 0
    skipped_full: int = 0  # not written: the store was out of memory
    failed: int = 0  # not written: the store failed or was unreachable


class BlockStore:
    def __init__(
        self,
        address: str,
        request_timeout_ms: int = 2000,
        ttl_s: int = 0,
        retry_s: float = 5.0,
        exclusive_connection: bool = True,
        check_bytes: bool = True,
    ) -> None:
        """``exclusive_connection``: the SDK's own connection to the worker for this client
        (``enable_exclusive_connection``) instead of the shared one. With the shared one,
        measured on 2 busy cores, the worker's ZmqEpoll threads fell into a busy loop
        (recv, EAGAIN, again; 1.8 cores for minutes) once engines saturated the CPU, and
        store calls went unanswered; with it, none did. A worker takes at most 128.
        ``check_bytes``: reads check each value's checksum, not only its key and length
        (``KV_CHECKSUM``)."""
        host, _, port = address.rpartition(":")
        self._host = host
        self._port = int(port)
        self._timeout_ms = request_timeout_ms
        self._exclusive = exclusive_connection
        self._ttl_s = ttl_s
        self._retry_s = retry_s
        self._client: Any = None
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._full_until = 0.0
        self._slow_logged_until = 0.0
        self._check_bytes = check_bytes
        self._corrupt = 0  # values read whose seal did not match, not yet taken

    @property
    def address(self) -> str:
        return f"{self._host}:{self._port}"

    def _connected(self) -> Any:
        """The client, or None while the store is marked down."""
        if time.monotonic() < self._down_until:
            return None
        with self._lock:
            if self._client is None:
                from yr.datasystem import KVClient

                try:
                    client = KVClient(
                        self._host, self._port, connect_timeout_ms=self._timeout_ms, req_timeout_ms=self._timeout_ms,
                        enable_exclusive_connection=self._exclusive,
                    )
                    client.init()
                except Exception as exc:
                    self._mark_down(f"connect failed: {exc}")
                    return None
                calm_sdk_threads()
                self._client = client
                logger.info("[store=%s] connected to the data system worker", self.address)
            return self._client

    @property
    def available(self) -> bool:
        """False while the store is marked down after a failure."""
        return time.monotonic() >= self._down_until

    @property
    def takes_saves(self) -> bool:
        """False while saves are skipped: the store is marked down, or was full lately."""
        now = time.monotonic()
        return now >= self._down_until and now >= self._full_until

    def connect(self) -> bool:
        """Connect now (engine start) rather than on a request's path; False if unreachable."""
        return self._connected() is not None

    def backoff_s(self) -> tuple[float, float]:
        """(seconds the store stays marked down, seconds saves stay skipped); 0 when not."""
        now = time.monotonic()
        return max(0.0, self._down_until - now), max(0.0, self._full_until - now)

    def sibling(self) -> BlockStore:
        """A store for another thread of this process: this one (calls are made here)."""
        return self

    def max_blocks_per_move(self, value_size: int) -> int:
        """How many values one ``get`` may return at once: any number (zero-copy views)."""
        return 1 << 30

    def close(self) -> None:
        """Nothing to stop: the SDK client goes with the process."""

    def take_corrupt(self) -> int:
        """Values read since the last call whose seal did not match (not loaded)."""
        corrupt, self._corrupt = self._corrupt, 0
        return corrupt

    def _failed(self, what: str, exc: Exception) -> None:
        """A call failed. A worker that answered too late is slow, not down: that call is a
        miss (bounded by the request timeout) and the next one is tried; anything else
        (unreachable, refused) marks the store down for a while."""
        if any(marker in str(exc) for marker in _SLOW_ANSWERS):
            now = time.monotonic()
            if now >= self._slow_logged_until:
                self._slow_logged_until = now + self._retry_s
                logger.warning(
                    "[store=%s] %s: no answer within %d ms (KV_REQUEST_TIMEOUT_MS); that call is a miss, the next is tried "
                    "(this message at most every %.0f s)",
                    self.address,
                    what,
                    self._timeout_ms,
                    self._retry_s,
                )
            return
        self._mark_down(f"{what} failed: {exc}")

    def _mark_down(self, reason: str) -> None:
        self._down_until = time.monotonic() + self._retry_s
        logger.warning(
            "[store=%s] %s; treating the store as empty for %.0f s (requests recompute)",
            self.address,
            _first_line(reason),
            self._retry_s,
        )

    def exists(self, keys: Sequence[str]) -> list[bool]:
        """Which keys are stored; all False if the store cannot say."""
        client = self._connected() if keys else None
        if client is None:
            return [False] * len(keys)
        try:
            return [
                bool(flag)
                for start in range(0, len(keys), _MAX_KEYS_PER_READ)
                for flag in client.exist(list(keys[start : start + _MAX_KEYS_PER_READ]))
            ]
        except Exception as exc:
            self._failed("exist", exc)
            return [False] * len(keys)

    def count_present_prefix(self, keys: Sequence[str], keys_per_block: int = 1) -> int:
        """How many leading blocks are stored; a block is ``keys_per_block`` consecutive keys."""
        return leading_blocks(self.exists(keys), keys_per_block)

    def put(self, keys: Sequence[str], value_size: int, fill: Callable[[int, list[memoryview]], None]) -> PutResult:
        """Create ``keys`` in shared memory, let ``fill(first, buffers)`` write the values of
        ``keys[first : first + len(buffers)]`` (one call per batch), seal and publish them.

        A value becomes visible only when published, so readers never see half a block.
        """
        stored = skipped = failed = 0
        for start in range(0, len(keys), _MAX_KEYS_PER_WRITE):
            chunk = list(keys[start : start + _MAX_KEYS_PER_WRITE])
            if time.monotonic() < self._full_until:
                skipped += len(chunk)
                continue
            client = self._connected()
            if client is None:
                failed += len(chunk)
                continue
            try:
                buffers = client.mcreate(chunk, [value_size + SEAL_BYTES] * len(chunk), ttl_second=self._ttl_s)
                values = [memoryview(buffer.MutableData()) for buffer in buffers]
                fill(start, [value[:value_size] for value in values])
                for value, key in zip(values, chunk):
                    seal(value, key)
                del values
                client.mset_buffer(buffers)
                stored += len(chunk)
            except Exception as exc:
                if "Out of memory" in str(exc):
                    skipped += len(chunk)
                    self._full_until = time.monotonic() + self._retry_s
                    logger.warning(
                        "[store=%s] full: skipping saves for %.0f s (raise DS_SHARED_MEMORY_MB, set DS_SPILL_DIR or KV_TTL_S)",
                        self.address,
                        self._retry_s,
                    )
                else:
                    failed += len(chunk)
                    self._failed(f"saving {len(chunk)} blocks", exc)
        return PutResult(stored, skipped, failed)

    @property
    def check_bytes(self) -> bool:
        """Whether a value's checksum is checked (else its seal's key and length only)."""
        return self._check_bytes

    def get(self, keys: Sequence[str], value_size: int = 0) -> list[Any | None]:
        """Zero-copy read buffers (``.immutable_data()`` gives a memoryview of the value's
        data, its seal checked); ``None`` where a key is missing, its seal does not match or
        the store failed. Keep the list referenced while reading the views.
        (``value_size`` is what the caller expects; the caller checks it.)
        """
        buffers = self.get_sealed(keys)
        checked: list[Any | None] = []
        corrupt: list[str] = []
        for key, buffer in zip(keys, buffers):
            data = None if buffer is None else unseal(memoryview(buffer.immutable_data()), key, self._check_bytes)
            if buffer is not None and data is None:
                corrupt.append(key)
            checked.append(None if data is None else _Checked(buffer, data))
        self.discard_corrupt(corrupt)
        return checked

    def get_sealed(self, keys: Sequence[str]) -> list[Any | None]:
        """``get`` with each value's seal left on and unchecked: the SDK's buffers, ``None``
        where a key is missing or the store failed. The caller checks each seal
        (integrity.unseal) before using the data, and passes the keys that failed to
        ``discard_corrupt``."""
        client = self._connected() if keys else None
        if client is None:
            return [None] * len(keys)
        buffers: list[Any | None] = []
        for start in range(0, len(keys), _MAX_KEYS_PER_READ):
            chunk = list(keys[start : start + _MAX_KEYS_PER_READ])
            try:
                buffers.extend(client.get_read_only_buffers(chunk))
            except Exception as exc:
                if "Key not found" not in str(exc):  # every key missing is a plain miss
                    self._failed(f"loading {len(chunk)} blocks", exc)
                    return buffers + [None] * (len(keys) - len(buffers))
                buffers.extend([None] * len(chunk))
        return buffers

    def discard_corrupt(self, keys: Sequence[str]) -> None:
        """Values of ``keys`` failed their seal: count them and delete them (best effort: a
        later save of their block then writes it anew)."""
        if not keys:
            return
        self._corrupt += len(keys)
        logger.warning("[store=%s] %d stored blocks failed their integrity check (e.g. %s): computed, and deleted",
                       self.address, len(keys), keys[0])  # fmt: skip
        client = self._connected()
        try:
            if client is not None:
                client.delete(list(keys))
        except Exception as exc:  # the TTL ends them in any case
            logger.info("[store=%s] deleting %d corrupt blocks failed: %s", self.address, len(keys), _first_line(str(exc)))


class _Checked:
    """A read buffer whose seal matched: ``immutable_data()`` is its data, the seal left
    out (the SDK buffer is held while the view is in use)."""

    __slots__ = ("_buffer", "_data")

    def __init__(self, buffer: Any, data: memoryview) -> None:
        self._buffer = buffer
        self._data = data

    def immutable_data(self) -> memoryview:
        return self._data


def leading_blocks(present: Sequence[bool], keys_per_block: int) -> int:
    """How many leading blocks have all their ``keys_per_block`` consecutive keys present."""
    blocks = 0
    for start in range(0, len(present), keys_per_block):
        if not all(present[start : start + keys_per_block]):
            break
        blocks += 1
    return blocks


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0][:200] if text.strip() else text
