"""The KV event subscriber against vLLM's own publisher (``ZmqEventPublisher``, built
from the ``--kv-events-config`` our builder writes, no engine): history replayed on
watch, a dropped batch refetched, a gap the replay cannot fill, a restarted publisher;
and the wire format decoded without vLLM."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import msgspec
import pytest
import zmq

from common.kv_wire import BlockRemoved, BlockStored, decode_batch
from door.kv_chain import request_extra_keys
from door.kv_events import KVEventSubscriber
from door.kv_index import KVIndex
from testkit.helpers import free_port, listening_addresses
from workers.kv_events_config import event_endpoints, kv_events_args, kv_events_config

kv_events = pytest.importorskip("vllm.distributed.kv_events")  # pulls in torch: the door does not
VBatch, VStored, VRemoved, VCleared = (
    kv_events.KVEventBatch,
    kv_events.BlockStored,
    kv_events.BlockRemoved,
    kv_events.AllBlocksCleared,
)

B = 4
ENGINE = "prefill-0-dp0"


def block_hash(*parts: object) -> bytes:
    return hashlib.sha256(repr(parts).encode()).digest()


def store(tokens: list[int], first_block: int = 0, parent: bytes | None = None, **fields: Any) -> Any:
    """vLLM's BlockStored for tokens' full blocks (engine hashes from position and tokens)."""
    hashes = [block_hash(first_block + i, tokens[: (i + 1) * B]) for i in range(len(tokens) // B)]
    return VStored(block_hashes=hashes, parent_block_hash=parent, token_ids=tokens, block_size=B, lora_id=None,
                   medium=fields.pop("medium", "GPU"), lora_name=fields.pop("lora_name", None), **fields)  # fmt: skip


class LossyPub:
    """Stands in for the publisher's PUB socket and drops chosen batches, which stay in
    its replay buffer: what a subscriber sees when its queue overflows."""

    def __init__(self, socket: Any) -> None:
        self._socket = socket
        self.drop: set[int] = set()

    def send_multipart(self, frames: Any, *args: Any, **kwargs: Any) -> Any:
        if int.from_bytes(frames[1], "big") in self.drop:
            return None
        return self._socket.send_multipart(frames, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._socket, name)


@contextmanager
def publisher(port: int, replay_port: int, buffer_steps: int = 10_000) -> Iterator[Any]:
    settings = kv_events_config(port, ENGINE, replay_port=replay_port, buffer_steps=buffer_steps)
    config = kv_events.KVEventsConfig(**settings)
    deadline = time.monotonic() + 5
    while True:
        try:
            pub = kv_events.EventPublisherFactory.create(config, data_parallel_rank=0)
            break
        except zmq.ZMQError:  # a closed publisher's ports are released by zmq's I/O thread, shortly after
            assert time.monotonic() < deadline, f"ports {port}, {replay_port} stay taken"
            time.sleep(0.05)
    assert isinstance(pub, kv_events.ZmqEventPublisher)
    pub._pub = LossyPub(pub._pub)
    try:
        yield pub
    finally:
        pub.shutdown()


def publish(pub: Any, *events: Any) -> None:
    pub.publish(VBatch(ts=time.time(), events=list(events)))


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s}s: {what}")
        await asyncio.sleep(0.02)


async def handshake(pub: Any, subscriber: KVEventSubscriber) -> int:
    """Publish empty batches until the subscriber applies them (a SUB socket misses what
    is sent before its subscription reaches the publisher); the next seq is returned."""
    sent, deadline = 0, time.monotonic() + 10
    while next_seq(subscriber) is None:
        assert time.monotonic() < deadline, "the subscriber never received a batch"
        publish(pub)
        sent += 1
        await asyncio.sleep(0.05)
    await until(lambda: next_seq(subscriber) == sent, "the handshake batches applied")
    return sent


def next_seq(subscriber: KVEventSubscriber) -> int | None:
    status = subscriber.status(ENGINE)
    assert status is not None
    return status.next_seq


def ports() -> tuple[int, int]:
    return free_port(), free_port()


def run(scenario: Callable[[KVIndex, KVEventSubscriber, tuple[int, int]], Any]) -> KVIndex:
    async def main() -> KVIndex:
        index = KVIndex(block_size=B)
        async with KVEventSubscriber(index, replay_timeout_s=2.0) as subscriber:
            await scenario(index, subscriber, ports())
        assert asyncio.all_tasks() == {asyncio.current_task()}  # every task cancelled and awaited
        return index

    return asyncio.run(main())


def watch(subscriber: KVEventSubscriber, pub_port: int, replay_port: int) -> None:
    subscriber.watch(ENGINE, *event_endpoints("127.0.0.1", pub_port, replay_port))


def test_history_before_watch_comes_from_the_replay() -> None:
    tokens = list(range(3 * B))

    async def scenario(index: KVIndex, subscriber: KVEventSubscriber, p: tuple[int, int]) -> None:
        with publisher(*p) as pub:
            first = store(tokens[:B])
            publish(pub, first)
            publish(pub, store(tokens[B:], first_block=1, parent=first.block_hashes[0]))
            await asyncio.sleep(0.3)  # both sent before anyone listened
            watch(subscriber, *p)
            await until(lambda: next_seq(subscriber) == 2, "the two batches replayed")
            assert index.match(index.hashes(tokens)) == {ENGINE: 3}
            status = subscriber.status(ENGINE)
            assert status is not None and status.losses == 0 and status.applied == 2
            subscriber.unwatch(ENGINE)
            assert index.engines() == [] and index.entries() == 0

    run(scenario)


def test_a_dropped_batch_is_refetched_from_the_replay_socket() -> None:
    tokens, other = list(range(4 * B)), list(range(100, 100 + 2 * B))

    async def scenario(index: KVIndex, subscriber: KVEventSubscriber, p: tuple[int, int]) -> None:
        with publisher(*p) as pub:
            watch(subscriber, *p)
            base = await handshake(pub, subscriber)
            pub._pub.drop = {base + 2}  # never reaches the subscriber; stays in the replay buffer
            blocks = [store(tokens[:B])]
            publish(pub, blocks[0])  # base
            for number in (1, 2, 3):  # base + 1 to base + 3
                blocks.append(store(tokens[number * B : (number + 1) * B], number, parent=blocks[-1].block_hashes[0]))
                extra = [store(other)] if number == 3 else []
                publish(pub, blocks[-1], *extra)
            publish(pub, VRemoved(block_hashes=[store(other).block_hashes[1]], medium="GPU"))  # base + 4
            await until(lambda: next_seq(subscriber) == base + 5, "the five batches applied")
            # block 3's parent is only known from the dropped batch: the replay delivered it
            assert index.match(index.hashes(tokens)) == {ENGINE: 4}
            assert index.match(index.hashes(other)) == {ENGINE: 1}
            assert index.entries() == 5
            status = subscriber.status(ENGINE)
            assert status is not None and (status.applied - base, status.losses, status.restarts) == (5, 0, 0)

    run(scenario)


def test_a_gap_the_replay_cannot_fill_drops_the_engines_entries() -> None:
    kept, lost, after = list(range(2 * B)), list(range(50, 50 + B)), list(range(90, 90 + B))

    async def scenario(index: KVIndex, subscriber: KVEventSubscriber, p: tuple[int, int]) -> None:
        with publisher(*p, buffer_steps=2) as pub:
            watch(subscriber, *p)
            base = await handshake(pub, subscriber)
            pub._pub.drop = {base + 1, base + 2, base + 3}
            publish(pub, store(kept))  # base
            await until(lambda: next_seq(subscriber) == base + 1, "kept's blocks applied")
            assert index.match(index.hashes(kept)) == {ENGINE: 2}
            publish(pub, store(lost))  # dropped, then pushed out of the 2-batch buffer
            publish(pub, VRemoved(block_hashes=[store(kept).block_hashes[1]], medium="GPU"))  # dropped: lost
            publish(pub, store(after))  # dropped, still buffered
            publish(pub, VRemoved(block_hashes=[block_hash("never stored")], medium="GPU"))  # base + 4
            await until(lambda: next_seq(subscriber) == base + 5, "the buffered batches applied")
            # had the entries been kept, kept's block 1 would be wrongly held (its removal was lost)
            assert index.match(index.hashes(kept)) == {}
            assert index.match(index.hashes(lost)) == {}
            assert index.match(index.hashes(after)) == {ENGINE: 1}
            assert index.entries() == 1
            status = subscriber.status(ENGINE)
            assert status is not None and (status.losses, status.restarts) == (1, 0)

    run(scenario)


def test_a_restarted_publisher_drops_what_the_old_one_reported() -> None:
    before, after = list(range(2 * B)), list(range(70, 70 + B))

    async def scenario(index: KVIndex, subscriber: KVEventSubscriber, p: tuple[int, int]) -> None:
        with publisher(*p) as pub:
            watch(subscriber, *p)
            base = await handshake(pub, subscriber)
            publish(pub, store(before))
            await until(lambda: next_seq(subscriber) == base + 1, "before's blocks applied")
            assert index.match(index.hashes(before)) == {ENGINE: 2}
        with publisher(*p) as pub:  # same ports, counting from 0 again
            publish(pub, store(after))  # seq 0
            deadline = time.monotonic() + 10
            while index.match(index.hashes(after)) != {ENGINE: 1}:  # seq 0 may be sent before the SUB reconnects:
                assert time.monotonic() < deadline, "the new publisher's blocks never arrived"
                publish(pub)  # an empty batch shows the gap, and the replay fetches seq 0
                await asyncio.sleep(0.1)
            assert index.match(index.hashes(before)) == {}
            assert index.entries() == 1
            status = subscriber.status(ENGINE)
            assert status is not None and status.restarts >= 1 and status.losses == 0

    run(scenario)


def test_seq_going_back_is_a_duplicate_or_a_restart_by_its_timestamp() -> None:
    """A PUB socket written here the way vLLM frames messages, on one connection: no
    disconnect tells the subscriber; the batch's timestamp does."""
    stale, held, fresh = list(range(2 * B)), list(range(30, 30 + B)), list(range(60, 60 + B))

    async def scenario(index: KVIndex, subscriber: KVEventSubscriber, p: tuple[int, int]) -> None:
        context = zmq.Context()
        pub = context.socket(zmq.PUB)
        pub.bind(f"tcp://*:{p[0]}")

        def send(seq: int, ts: float, *events: Any) -> None:
            payload = msgspec.msgpack.encode(VBatch(ts=ts, events=list(events)))
            pub.send_multipart([ENGINE.encode(), seq.to_bytes(8, "big"), payload])

        try:
            subscriber.watch(ENGINE, f"tcp://127.0.0.1:{p[0]}", None)  # no replay socket
            sent, deadline = 0, time.monotonic() + 10
            while next_seq(subscriber) is None:
                assert time.monotonic() < deadline, "the subscriber never received a batch"
                send(sent, 100.0 + sent)
                sent += 1
                await asyncio.sleep(0.05)
            await until(lambda: next_seq(subscriber) == sent, "the first batches applied")
            send(sent, 1000.0, store(held))
            send(sent - 1, 99.0, store(stale))  # a batch applied already: skipped
            await asyncio.sleep(0.2)
            send(0, 2000.0, store(fresh))  # seq 0 again, newer: the engine restarted
            await until(lambda: index.match(index.hashes(fresh)) == {ENGINE: 1}, "the new incarnation's batch")
            assert index.match(index.hashes(held)) == {}
            assert index.match(index.hashes(stale)) == {}
            status = subscriber.status(ENGINE)
            assert status is not None and (status.next_seq, status.restarts, status.losses) == (1, 1, 0)
            subscriber.reset(ENGINE)  # the Controller says it restarted
            assert index.entries() == 0 and next_seq(subscriber) is None
        finally:
            pub.close(linger=0)
            context.term()

    run(scenario)


def test_vllm_batches_decode_without_vllm() -> None:
    extra = [("sql", "tenant"), ("sql",)]
    salted = store(list(range(2 * B)), lora_name="sql", extra_keys=extra, group_idx=0, session_id="s")
    removed = VRemoved(block_hashes=[7, b"\x01" * 32], medium="CPU")
    payload = msgspec.msgpack.encode(VBatch(ts=12.5, events=[salted, removed, VCleared()], data_parallel_rank=0))
    batch = decode_batch(payload)
    assert batch.ts == 12.5 and batch.data_parallel_rank == 0
    stored, gone, cleared = batch.events
    assert isinstance(stored, BlockStored) and isinstance(gone, BlockRemoved)
    assert (stored.block_hashes, stored.token_ids, stored.block_size) == (salted.block_hashes, salted.token_ids, B)
    assert (stored.lora_name, stored.medium, stored.extra_keys) == ("sql", "GPU", [["sql", "tenant"], ["sql"]])
    assert (gone.block_hashes, gone.medium) == ([7, b"\x01" * 32], "CPU")
    assert type(cleared).__name__ == "AllBlocksCleared"


def test_an_unknown_event_type_is_skipped_and_the_rest_decodes() -> None:
    class FutureEvent(msgspec.Struct, tag=True):
        detail: int = 1

    payload = msgspec.msgpack.encode([1.0, [FutureEvent(), VRemoved(block_hashes=[3], medium=None)], None])
    batch = decode_batch(payload)
    assert [type(event).__name__ for event in batch.events] == ["BlockRemoved"]


def test_request_extra_keys_are_what_vllm_publishes() -> None:
    to_event = pytest.importorskip("vllm.v1.core.kv_cache_utils").to_event_extra_keys
    tagged = [(("lora", "sql", "/adapters/sql"), ("cache_salt", "tenant")), (("lora", "sql", "/adapters/sql"),)]
    assert to_event(tagged) == request_extra_keys(2, "sql", "tenant")
    assert to_event([(("cache_salt", "tenant"),), None]) == request_extra_keys(2, None, "tenant")


def test_the_engine_arguments_parse_as_vllm_config() -> None:
    argv = kv_events_args(5557, ENGINE, bind_host="10.0.0.5")
    assert argv[0] == "--kv-events-config"
    config = kv_events.KVEventsConfig(**msgspec.json.decode(argv[1]))
    assert (config.enable_kv_cache_events, config.publisher, config.topic) == (True, "zmq", ENGINE)
    assert (config.endpoint, config.replay_endpoint) == ("tcp://[::ffff:10.0.0.5]:5557", "tcp://10.0.0.5:5558")
    assert event_endpoints("10.0.0.5", 5557) == ("tcp://10.0.0.5:5557", "tcp://10.0.0.5:5558")
    with pytest.raises(ValueError, match="topic"):
        kv_events_config(5557, "")
    for wildcard in ("0.0.0.0", "::", "fe80::1", "node-1"):
        with pytest.raises(ValueError, match=f"kv events bind host {wildcard}"):
            kv_events_config(5557, ENGINE, bind_host=wildcard)


def test_the_publisher_listens_on_its_bind_host_alone() -> None:
    """vLLM's own publisher, configured as an engine is: its PUB socket listens on the
    engine's address, not on every interface (the events carry prompts' token ids)."""
    port = free_port()
    with publisher(port, free_port()):
        listening = {address for address in listening_addresses([os.getpid()]) if address[1] == port}
    assert listening == {("127.0.0.1", port)}
