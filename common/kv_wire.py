"""vLLM's KV cache events on the wire, decoded without importing vLLM.

Importing ``vllm.distributed.kv_events`` pulls in torch (about 4,700 modules and 7 s on
the 2-core box), which the front door has no use for; these structs mirror vLLM
0.32's (``vllm/distributed/kv_events.py``) field for field, so msgspec decodes the
same bytes. Every field has a default, so a publisher that omits one (vLLM encodes
with ``omit_defaults``) or adds one (map-encoded events ignore unknown keys; the
array-encoded batch ignores trailing items) still decodes.

Framing (``ZmqEventPublisher``): the PUB socket sends ``[topic, seq, payload]``, seq an
8-byte big-endian counter from 0 per publisher, payload a msgpack ``KVEventBatch``
(an array ``[ts, events, data_parallel_rank]``; each event a map tagged
``"type": "BlockStored" | "BlockRemoved" | "AllBlocksCleared"``). The ROUTER replay
socket answers ``[b"", start_seq]`` (from a DEALER) with ``[b"", topic, seq, payload]``
for every batch still buffered with seq >= start_seq, then ``[b"", b"", END_SEQ, b""]``.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec

logger = logging.getLogger(__name__)

END_SEQ = (-1).to_bytes(8, "big", signed=True)  # the replay's last frame carries this seq

MEDIUM_GPU = "GPU"  # the engine's own KV cache, on every backend (the CPU backend says GPU too)
MEDIUM_CPU = "CPU"  # a host-memory offload tier (vLLM's host pool, OffloadingConnector)
MEDIUM_STORAGE = "STORAGE"  # a disk/object offload tier (OffloadingConnector)

ExternalBlockHash = bytes | int  # sha256 bytes by default; 64-bit ints with VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES


class BlockStored(msgspec.Struct, tag=True, omit_defaults=True, gc=False):
    block_hashes: list[ExternalBlockHash] = []
    parent_block_hash: ExternalBlockHash | None = None
    token_ids: list[int] = []
    block_size: int = 0
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[Any] | None = None  # per block: None or the untagged extra keys (lora name, (mm id, offset), salt)
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None


class BlockRemoved(msgspec.Struct, tag=True, omit_defaults=True, gc=False):
    block_hashes: list[ExternalBlockHash] = []
    medium: str | None = None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(msgspec.Struct, tag=True, omit_defaults=True, gc=False):
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared
KNOWN_EVENTS = frozenset({"BlockStored", "BlockRemoved", "AllBlocksCleared"})


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[KVEvent]
    data_parallel_rank: int | None = None


class _LooseBatch(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[msgspec.Raw]
    data_parallel_rank: int | None = None


class WireError(ValueError):
    """A payload that is not a KV event batch: the batch counts as lost."""


_decoder = msgspec.msgpack.Decoder(KVEventBatch)
_loose_decoder = msgspec.msgpack.Decoder(_LooseBatch)
_event_decoder: msgspec.msgpack.Decoder[KVEvent] = msgspec.msgpack.Decoder(KVEvent)  # type: ignore[arg-type]
_encoder = msgspec.msgpack.Encoder()


def decode_batch(payload: bytes) -> KVEventBatch:
    """The batch in ``payload``. An event of a type this module does not know (a newer
    vLLM) is skipped; anything else that does not decode raises WireError."""
    try:
        return _decoder.decode(payload)
    except msgspec.DecodeError:
        pass
    try:
        loose = _loose_decoder.decode(payload)
        events: list[KVEvent] = []
        for raw in loose.events:
            kind = msgspec.msgpack.decode(raw)
            if isinstance(kind, dict) and kind.get("type") not in KNOWN_EVENTS:
                logger.debug("skipping a KV event of unknown type %r", kind.get("type"))
                continue
            events.append(_event_decoder.decode(raw))
    except msgspec.DecodeError as exc:
        raise WireError(f"not a KV event batch: {exc}") from None
    return KVEventBatch(ts=loose.ts, events=events, data_parallel_rank=loose.data_parallel_rank)


def encode_batch(batch: KVEventBatch) -> bytes:
    """The bytes vLLM's publisher would send for ``batch`` (tests and benchmarks)."""
    return _encoder.encode(batch)


def parse_seq(frame: bytes) -> int:
    """A sequence frame as the publisher wrote it (8 bytes, big-endian)."""
    if len(frame) != 8:
        raise WireError(f"sequence frame of {len(frame)} bytes, expected 8")
    return int.from_bytes(frame, "big")
