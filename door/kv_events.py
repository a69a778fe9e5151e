"""Follows the engines' KV cache events and keeps the KV index current (asyncio, zmq).

One SUB socket connects to every engine's PUB endpoint (``workers/kv_events_config``:
the topic is the engine's name, which is how batches are told apart), so 256 engines
cost 256 TCP connections and one socket, not 256 sockets and their file descriptors.

Per engine, batches are applied in sequence order:
- the next expected seq: applied;
- a later one (a gap: the SUB queue overflowed, or the subscription was not yet up):
  the replay socket is asked for every batch from the expected one (a short-lived DEALER,
  ``[b"", start_seq]``), live batches arriving meanwhile are held, then both are applied
  in order. If the replay cannot fill the gap (its buffer has moved past it, or it does
  not answer within ``replay_timeout_s``), the engine's entries are dropped and indexing
  resumes from what there is: the index under-reports, it never holds stale blocks;
- an earlier one: a duplicate of a replayed batch, skipped, unless its timestamp is
  newer than the last applied batch's, which means the engine restarted (its publisher
  counts from 0 again): entries dropped, history replayed from 0;
- the publisher's TCP connection closing (the engine exited or restarted; seen through
  a socket monitor): entries dropped, the next batch starts the engine's history again.

``watch`` also asks for the engine's history at once (replay from 0), so an engine that
was serving before the door started is indexed without waiting for its next batch.
Every task (receiver, monitor, replays) is stored, and cancelled and awaited by
``close``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from common.kv_wire import END_SEQ, WireError, decode_batch, parse_seq
from door.kv_index import KVIndex

logger = logging.getLogger(__name__)

RCV_HWM = 100_000  # batches the SUB socket queues before it drops (then a gap, then a replay)
MAX_HELD = 10_000  # live batches held per engine while its replay runs; later ones are refetched


@dataclass
class StreamStatus:
    """One engine's event stream as the subscriber sees it."""

    next_seq: int | None  # None: no batch applied since the start, a restart or a disconnect
    applied: int = 0
    replays: int = 0
    losses: int = 0  # gaps the replay could not fill, and undecodable batches: entries dropped
    restarts: int = 0  # restarts and disconnects seen: entries dropped
    replaying: bool = False


@dataclass
class _Stream:
    name: str
    topic: bytes
    endpoint: str
    replay_endpoint: str | None
    next_seq: int | None = None
    last_ts: float = 0.0
    held: list[tuple[int, bytes]] | None = None  # not None while a replay runs
    replay: asyncio.Task[None] | None = None
    status: StreamStatus = field(default_factory=lambda: StreamStatus(next_seq=None))


class KVEventSubscriber:
    def __init__(
        self,
        index: KVIndex,
        replay_timeout_s: float = 2.0,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        self._index = index
        self._replay_timeout_s = replay_timeout_s
        self._own_context = context is None
        self._ctx = context or zmq.asyncio.Context()
        self._sub: zmq.asyncio.Socket | None = None
        self._monitor: zmq.asyncio.Socket | None = None
        self._streams: dict[str, _Stream] = {}
        self._by_topic: dict[bytes, _Stream] = {}
        self._by_endpoint: dict[str, _Stream] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> KVEventSubscriber:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        if self._sub is not None:
            return
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, RCV_HWM)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")  # every topic: engines are told apart by it
        self._sub = sub
        self._monitor = sub.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._spawn(self._receive(), "kv-events-receive")
        self._spawn(self._follow_connections(), "kv-events-monitor")

    async def close(self) -> None:
        """Cancel and await every task, then close the sockets."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                logger.warning("KV event task ended with %r", result)
        self._tasks.clear()
        if self._sub is not None:
            self._sub.disable_monitor()
            if self._monitor is not None:
                self._monitor.close(linger=0)
            self._sub.close(linger=0)
            self._sub = self._monitor = None
        if self._own_context:
            self._ctx.term()

    def _spawn(self, coroutine: object, name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(coroutine, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- engines ---------------------------------------------------------------------

    def watch(self, engine: str, endpoint: str, replay_endpoint: str | None, topic: str | None = None) -> None:
        """Follow ``engine``'s events (``workers.kv_events_config.event_endpoints``); the
        topic defaults to the engine's name."""
        if self._sub is None:
            raise RuntimeError("KVEventSubscriber.watch before start()")
        if engine in self._streams:
            known = self._streams[engine]
            if (known.endpoint, known.replay_endpoint) == (endpoint, replay_endpoint):
                return
            self.unwatch(engine)
        stream = _Stream(engine, (topic if topic is not None else engine).encode(), endpoint, replay_endpoint)
        if stream.topic in self._by_topic or endpoint in self._by_endpoint:
            raise ValueError(f"[engine={engine}] topic {stream.topic!r} or endpoint {endpoint} is another engine's")
        self._streams[engine] = self._by_topic[stream.topic] = self._by_endpoint[endpoint] = stream
        self._sub.connect(endpoint)
        self._start_replay(stream, 0, [])  # what it cached before the door came

    def unwatch(self, engine: str) -> None:
        """Stop following ``engine`` and forget what it holds."""
        stream = self._streams.pop(engine, None)
        if stream is None:
            return
        del self._by_topic[stream.topic], self._by_endpoint[stream.endpoint]
        if stream.replay is not None:
            stream.replay.cancel()  # awaited by close(); it touches nothing once cancelled
        if self._sub is not None:
            try:
                self._sub.disconnect(stream.endpoint)
            except zmq.ZMQError:
                pass  # already gone
        self._index.remove(engine)

    def reset(self, engine: str) -> None:
        """``engine`` restarted (the Controller says so): drop its entries and start its
        history again."""
        stream = self._streams.get(engine)
        if stream is not None:
            self._restart(stream, "reset by the caller", replay=True)

    def status(self, engine: str) -> StreamStatus | None:
        stream = self._streams.get(engine)
        if stream is None:
            return None
        stream.status.next_seq = stream.next_seq
        stream.status.replaying = stream.held is not None
        return stream.status

    # -- the sequence rules -------------------------------------------------------------

    async def _receive(self) -> None:
        assert self._sub is not None
        while True:
            frames = await self._sub.recv_multipart()
            if len(frames) != 3:
                logger.warning("KV event message of %d frames ignored (expected topic, seq, payload)", len(frames))
                continue
            topic, seq_frame, payload = frames
            stream = self._by_topic.get(topic)
            if stream is None:
                continue
            try:
                seq = parse_seq(seq_frame)
            except WireError as exc:
                logger.warning("[engine=%s] %s; message ignored", stream.name, exc)
                continue
            self._on_live(stream, seq, payload)

    def _on_live(self, stream: _Stream, seq: int, payload: bytes) -> None:
        if stream.held is not None:  # a replay runs: apply after it
            if len(stream.held) < MAX_HELD:
                stream.held.append((seq, payload))
            return
        if stream.next_seq is None:
            if seq == 0:
                self._apply(stream, seq, payload)  # the publisher's first batch: nothing came before
            else:
                self._start_replay(stream, 0, [(seq, payload)])
        elif seq == stream.next_seq:
            self._apply(stream, seq, payload)
        elif seq > stream.next_seq:
            self._start_replay(stream, stream.next_seq, [(seq, payload)])
        elif self._is_newer(stream, payload):
            self._restart(stream, f"seq went back to {seq}", replay=True, held=[(seq, payload)])

    def _is_newer(self, stream: _Stream, payload: bytes) -> bool:
        try:
            return decode_batch(payload).ts > stream.last_ts
        except WireError:
            return False

    def _apply(self, stream: _Stream, seq: int, payload: bytes) -> None:
        stream.next_seq = seq + 1
        try:
            batch = decode_batch(payload)
        except WireError as exc:
            self._lose(stream, f"batch {seq}: {exc}")
            return
        try:
            self._index.apply(stream.name, batch.events)
        except Exception as exc:  # a batch this index cannot take must not stop the receiver
            logger.exception("[engine=%s] KV event batch %d not applied", stream.name, seq)
            self._lose(stream, f"batch {seq}: {exc!r}")
            return
        stream.last_ts = batch.ts
        stream.status.applied += 1

    def _lose(self, stream: _Stream, why: str) -> None:
        stream.status.losses += 1
        logger.warning("[engine=%s] KV events lost (%s): its index entries are dropped", stream.name, why)
        self._index.drop(stream.name)

    def _restart(
        self, stream: _Stream, why: str, replay: bool, held: list[tuple[int, bytes]] | None = None
    ) -> None:
        stream.status.restarts += 1
        logger.info("[engine=%s] KV event publisher restarted (%s): its index entries are dropped", stream.name, why)
        if stream.replay is not None:
            stream.replay.cancel()
            stream.replay = None
        stream.held = None
        stream.next_seq = None
        stream.last_ts = 0.0
        self._index.drop(stream.name)
        if replay:
            self._start_replay(stream, 0, held or [])

    # -- replay ------------------------------------------------------------------------

    def _start_replay(self, stream: _Stream, start: int, held: list[tuple[int, bytes]]) -> None:
        stream.held = held
        stream.status.replays += 1
        stream.replay = self._spawn(self._replay(stream, start), f"kv-events-replay-{stream.name}")

    async def _replay(self, stream: _Stream, start: int) -> None:
        replayed = await self._fetch(stream, start)
        held, stream.held, stream.replay = stream.held or [], None, None
        if replayed is None:
            replayed = []
        for seq, payload in replayed + held:
            if stream.next_seq is not None:
                if seq < stream.next_seq:
                    continue  # applied already (replayed and held overlap)
                if seq > stream.next_seq:
                    self._lose(stream, f"batches {stream.next_seq}-{seq - 1} are no longer in the replay buffer")
            self._apply(stream, seq, payload)

    async def _fetch(self, stream: _Stream, start: int) -> list[tuple[int, bytes]] | None:
        """Every batch the publisher still buffers from ``start`` on; None if it cannot be
        asked or does not answer in time."""
        if stream.replay_endpoint is None:
            return None
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(stream.replay_endpoint)
        replayed: list[tuple[int, bytes]] = []
        try:
            async with asyncio.timeout(self._replay_timeout_s):
                await dealer.send_multipart([b"", start.to_bytes(8, "big")])
                while True:
                    frames = await dealer.recv_multipart()
                    if len(frames) != 4:
                        continue
                    _, _, seq_frame, payload = frames
                    if seq_frame == END_SEQ:
                        return replayed
                    replayed.append((parse_seq(seq_frame), payload))
        except (TimeoutError, WireError, zmq.ZMQError) as exc:
            logger.info("[engine=%s] KV event replay from %d failed: %r", stream.name, start, exc)
            return None
        finally:
            dealer.close(linger=0)

    # -- connections -------------------------------------------------------------------

    async def _follow_connections(self) -> None:
        assert self._monitor is not None
        while True:
            frames = await self._monitor.recv_multipart()
            event = parse_monitor_message(frames)
            if event["event"] != zmq.EVENT_DISCONNECTED:
                continue
            endpoint = event["endpoint"].decode() if isinstance(event["endpoint"], bytes) else str(event["endpoint"])
            stream = self._by_endpoint.get(endpoint)
            if stream is not None and (stream.next_seq is not None or stream.held is not None):
                self._restart(stream, "publisher disconnected", replay=False)
