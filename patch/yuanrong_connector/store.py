"""The openYuanrong data system as a block store: batched calls, zero-copy buffers.

Every method takes all of a request's (or a step's) keys at once: one round trip per
call, never one per block. Store failures are reported to the caller as misses, so
vLLM recomputes instead of failing the request.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from vllm.logger import init_logger

logger = init_logger(f"vllm.{__name__}")

# The data system refuses more keys than this in one mcreate/mset_buffer call.
_MAX_KEYS_PER_CALL = 1000


class BlockStore:
    def __init__(self, address: str, connect_timeout_ms: int = 10000) -> None:
        host, _, port = address.rpartition(":")
        self._host = host
        self._port = int(port)
        self._connect_timeout_ms = connect_timeout_ms
        self._client: Any = None
        self._lock = threading.Lock()

    @property
    def address(self) -> str:
        return f"{self._host}:{self._port}"

    def _connected(self) -> Any:
        with self._lock:
            if self._client is None:
                from yr.datasystem import KVClient

                client = KVClient(self._host, self._port, connect_timeout_ms=self._connect_timeout_ms)
                client.init()
                self._client = client
                logger.info("[store=%s] connected to the data system worker", self.address)
            return self._client

    def count_present_prefix(self, keys: Sequence[str], keys_per_block: int = 1) -> int:
        """How many leading blocks are stored; a block is ``keys_per_block`` consecutive keys."""
        if not keys:
            return 0
        try:
            present = self._connected().exist(list(keys))
        except Exception as exc:  # the store is down or refuses: nothing is loadable
            logger.warning("[store=%s] exist failed, treating as miss: %s", self.address, exc)
            return 0
        blocks = 0
        for start in range(0, len(present), keys_per_block):
            if not all(present[start : start + keys_per_block]):
                break
            blocks += 1
        return blocks

    def put(self, keys: Sequence[str], value_size: int, fill: Callable[[int, memoryview], None]) -> int:
        """Create ``keys`` in shared memory, let ``fill(i, buffer)`` write each value, publish them.

        Returns how many keys were stored; failures are logged, not raised.
        """
        stored = 0
        for start in range(0, len(keys), _MAX_KEYS_PER_CALL):
            chunk = list(keys[start : start + _MAX_KEYS_PER_CALL])
            try:
                client = self._connected()
                buffers = client.mcreate(chunk, [value_size] * len(chunk))
                for offset, buffer in enumerate(buffers):
                    fill(start + offset, buffer.MutableData())
                client.mset_buffer(buffers)
                stored += len(chunk)
            except Exception as exc:
                logger.warning("[store=%s] saving %d blocks failed: %s", self.address, len(chunk), exc)
        return stored

    def get(self, keys: Sequence[str]) -> list[Any | None]:
        """Zero-copy read buffers (``.immutable_data()`` gives a memoryview); ``None`` where a
        key is missing or the store failed. Keep the list referenced while reading the views.
        """
        if not keys:
            return []
        try:
            return list(self._connected().get_read_only_buffers(list(keys)))
        except Exception as exc:
            logger.warning("[store=%s] loading %d blocks failed: %s", self.address, len(keys), exc)
            return [None] * len(keys)
