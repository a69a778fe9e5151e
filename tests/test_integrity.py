"""Integrity: a stored KV block is loaded only when it is what its key claims. A second
client of the same real data system worker (a process of its own) flips bytes of a stored block, or stores one
block's value under another block's key; the engine's loader then computes that block
instead (vLLM recomputes), counts it, and the bad value is deleted so the next save
writes it anew. With ``KV_CHECKSUM=0`` only the key and length are checked."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator

import pytest
import torch
import xxhash

from common.config import DataSystemConfig
from patch.yuanrong_connector.integrity import SEAL_BYTES, data_digest, seal, unseal
from tests.cache_engine import CacheEngine
from tests.stray_writer import stray_write


@pytest.fixture
def engines(ds_worker: DataSystemConfig) -> Iterator[tuple[CacheEngine, CacheEngine]]:
    source, target = CacheEngine(ds_worker.address, fill=True), CacheEngine(ds_worker.address, fill=False)
    try:
        yield source, target
    finally:
        source.close()
        target.close()


def test_seal_names_the_key_the_length_and_the_bytes() -> None:
    value = memoryview(bytearray(64 + SEAL_BYTES))
    value[:64] = bytes(range(64))
    seal(value, "k")
    assert bytes(unseal(value, "k") or b"") == bytes(range(64))
    assert unseal(value, "other") is None  # another key's value
    assert unseal(value[:-1], "k") is None  # torn
    value[3] ^= 0x01
    assert unseal(value, "k") is None  # one bit flipped
    assert unseal(value, "k", check_bytes=False) is not None  # without the checksum: key and length only


def test_a_block_whose_bytes_were_flipped_is_computed_counted_and_deleted(
    engines: tuple[CacheEngine, CacheEngine]
) -> None:
    source, target = engines
    keys = [f"integrity-{uuid.uuid4().hex}" for _ in range(3)]
    assert source.staging.save(source.store, keys, [0, 1, 2], None).stored == 3
    stray_write(source.store.address, "flip", keys[1])

    failed = target.staging.load(target.store, keys, [3, 2, 1])

    assert failed == {2, 1}  # from the bad block on, vLLM computes
    assert all(torch.equal(a, b) for a, b in zip(target.block(3), source.block(0)))
    assert target.store.take_corrupt() == 1
    assert target.store.exists(keys) == [True, False, True]  # deleted: the next save writes it anew
    assert source.staging.save(source.store, [keys[1]], [1], None).stored == 1
    assert target.staging.load(target.store, keys[:2], [3, 2]) == set()
    assert all(torch.equal(a, b) for a, b in zip(target.block(2), source.block(1)))


def test_a_value_stored_under_another_blocks_key_is_never_loaded(
    engines: tuple[CacheEngine, CacheEngine]
) -> None:
    source, target = engines
    first, second = (f"integrity-{uuid.uuid4().hex}" for _ in range(2))
    assert source.staging.save(source.store, [first, second], [0, 1], None).stored == 2
    stray_write(source.store.address, "copy", second, first)  # right bytes, wrong block
    assert target.staging.load(target.store, [second], [3]) == {3}
    assert target.store.take_corrupt() == 1
    assert all(float(layer.abs().sum()) == 0 for layer in target.block(3))


def test_without_the_checksum_keys_and_lengths_are_still_checked(ds_worker: DataSystemConfig) -> None:
    source, target = CacheEngine(ds_worker.address, fill=True), CacheEngine(ds_worker.address, fill=False, check_bytes=False)
    try:
        first, second = (f"integrity-{uuid.uuid4().hex}" for _ in range(2))
        assert source.staging.save(source.store, [first, second], [0, 1], None).stored == 2
        stray_write(ds_worker.address, "flip", first)
        stray_write(ds_worker.address, "copy", second, first)
        assert target.staging.load(target.store, [first], [3]) == set()  # bytes unchecked: loaded
        assert target.staging.load(target.store, [second], [2]) == {2}  # another key's value: never
        assert target.store.take_corrupt() == 1
    finally:
        source.close()
        target.close()


@pytest.mark.parametrize("size", [0, 1, 240, 64 * 1024 - 1, 64 * 1024, 1536 * 1024 + 7])
def test_the_checksum_without_the_gil_is_xxh3(size: int) -> None:
    data = memoryview(bytes(random.Random(size).getrandbits(8) for _ in range(min(size, 4096))) * (size // 4096 + 1))[:size]
    assert data_digest(data) == xxhash.xxh3_64_intdigest(data)
    assert data_digest(data[3:]) == xxhash.xxh3_64_intdigest(data[3:])  # an unaligned view
