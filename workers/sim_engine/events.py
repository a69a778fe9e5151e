"""KV cache events on the wire as vLLM's ``ZmqEventPublisher`` sends them (common/kv_wire.py
says the framing): a PUB socket sends ``[topic, seq, payload]`` once per scheduler step
that changed the cache, and a ROUTER socket replays the last ``buffer_steps`` batches to
a subscriber that asks from a sequence number on."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

import zmq
import zmq.asyncio

from common.kv_wire import END_SEQ, KVEvent, KVEventBatch, encode_batch

logger = logging.getLogger(__name__)


class EventPublisher:
    def __init__(self, pub_endpoint: str, replay_endpoint: str, topic: str, buffer_steps: int = 10_000) -> None:
        self._ctx = zmq.asyncio.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.bind(pub_endpoint)
        self._replay = self._ctx.socket(zmq.ROUTER)
        self._replay.setsockopt(zmq.LINGER, 0)
        self._replay.bind(replay_endpoint)
        self._topic = topic.encode()
        self._seq = 0
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._replayer: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._replayer = asyncio.get_running_loop().create_task(self._serve_replays(), name="kv-events-replay")

    def publish(self, events: list[KVEvent]) -> None:
        payload = encode_batch(KVEventBatch(ts=time.time(), events=events))
        seq = self._seq
        self._seq += 1
        self._buffer.append((seq, payload))
        try:
            self._pub.send_multipart([self._topic, seq.to_bytes(8, "big"), payload], flags=zmq.NOBLOCK)
        except zmq.Again:  # no subscriber keeps up: it asks the replay socket for the gap
            pass

    async def _serve_replays(self) -> None:
        while True:
            frames = await self._replay.recv_multipart()
            if len(frames) != 3:
                continue
            client, _, start_frame = frames
            start = int.from_bytes(start_frame, "big")
            for seq, payload in list(self._buffer):
                if seq >= start:
                    await self._replay.send_multipart([client, b"", self._topic, seq.to_bytes(8, "big"), payload])
            await self._replay.send_multipart([client, b"", b"", END_SEQ, b""])

    async def close(self) -> None:
        if self._replayer is not None:
            self._replayer.cancel()
            await asyncio.gather(self._replayer, return_exceptions=True)
        self._pub.close()
        self._replay.close()
        self._ctx.term()
