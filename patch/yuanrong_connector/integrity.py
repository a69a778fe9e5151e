"""What every stored KV block carries to prove it is what its key claims (pure functions).

A stored value is the block's bytes followed by a 32-byte seal:
``magic (4) | data length (4) | xxh3-64 of the data (8) | xxh3-64 of the key (8) | 0 (8)``.
The key names the layout fingerprint, the TP rank and the chain hash of every token up
to the block's end (keys.py), so a seal that matches its key also pins the model, the
layout and the block's tokens; the checksum pins the bytes. A reader checks the seal
before a block becomes visible to the model: a value under another key (a store
bug, a stray writer), of another length, or with bytes changed since it was sealed is
not loaded (vLLM computes the block). xxh3 is not cryptographic: it catches accidents
(torn or flipped bytes, a value written under the wrong key), not an adversary who can
write the store.
"""

from __future__ import annotations

import struct

import xxhash

SEAL_BYTES = 32
_MAGIC = b"YRK1"
_SEAL = struct.Struct("<4sIQQQ")
assert _SEAL.size == SEAL_BYTES


def seal(value: memoryview, key: str) -> None:
    """Write the seal into the last ``SEAL_BYTES`` of ``value`` (the data before it is written)."""
    data_bytes = len(value) - SEAL_BYTES
    data = value[:data_bytes]
    _SEAL.pack_into(value, data_bytes, _MAGIC, data_bytes, xxhash.xxh3_64_intdigest(data), _key_digest(key), 0)


def unseal(value: memoryview, key: str, check_bytes: bool = True) -> memoryview | None:
    """The data of a sealed value stored under ``key``, or None where the seal does not
    match (wrong key, length or magic; with ``check_bytes``, changed bytes too)."""
    data_bytes = len(value) - SEAL_BYTES
    if data_bytes < 0:
        return None
    magic, length, checksum, key_digest, _ = _SEAL.unpack_from(value, data_bytes)
    if magic != _MAGIC or length != data_bytes or key_digest != _key_digest(key):
        return None
    data = value[:data_bytes]
    if check_bytes and xxhash.xxh3_64_intdigest(data) != checksum:
        return None
    return data


def _key_digest(key: str) -> int:
    return xxhash.xxh3_64_intdigest(key.encode())
