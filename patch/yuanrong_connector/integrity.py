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

The data's checksum is computed by the xxhash wheel's own ``XXH3_64bits`` called through
ctypes, which releases the GIL while it runs (the wheel's Python function holds it), so
the store helper checks blocks on several threads at once, each beside its copies.
"""

from __future__ import annotations

import ctypes
import struct

import numpy as np
import xxhash
import xxhash._xxhash

SEAL_BYTES = 32
_MAGIC = b"YRK1"
_SEAL = struct.Struct("<4sIQQQ")
assert _SEAL.size == SEAL_BYTES


def _unlocked_xxh3() -> ctypes._CFuncPtr | None:
    """The wheel's exported ``XXH3_64bits(const void*, size_t)``; None where it is not exported."""
    try:
        function = ctypes.CDLL(xxhash._xxhash.__file__).XXH3_64bits
    except (OSError, AttributeError):
        return None
    function.restype = ctypes.c_uint64
    function.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    return function


_XXH3 = _unlocked_xxh3()
_UNLOCKED_FROM_BYTES = 64 * 1024  # smaller data: the Python function is quicker than a ctypes call


def data_digest(data: memoryview) -> int:
    """xxh3-64 of ``data``, without holding the GIL for large data."""
    if _XXH3 is None or len(data) < _UNLOCKED_FROM_BYTES:
        return xxhash.xxh3_64_intdigest(data)
    return int(_XXH3(np.frombuffer(data, dtype=np.uint8).ctypes.data, len(data)))


def seal(value: memoryview, key: str) -> None:
    """Write the seal into the last ``SEAL_BYTES`` of ``value`` (the data before it is written)."""
    data_bytes = len(value) - SEAL_BYTES
    data = value[:data_bytes]
    _SEAL.pack_into(value, data_bytes, _MAGIC, data_bytes, data_digest(data), _key_digest(key), 0)


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
    if check_bytes and data_digest(data) != checksum:
        return None
    return data


def _key_digest(key: str) -> int:
    return xxhash.xxh3_64_intdigest(key.encode())
