"""The door's name for a prompt block: a chained hash of the token ids up to its end.

vLLM names a block by its own hash (sha256 over the parent's hash, the block's token
ids and extra keys, seeded by the engine), which the door cannot compute from a request
cheaply. The door therefore names blocks by a **chained token hash** it computes both
from events (``BlockStored`` carries the blocks' token ids and the engine hash of the
block before them) and from a request's token ids:

    chain(-1) = ROOT
    chain(i)  = hash((chain(i-1), tuple(token_ids[i*B:(i+1)*B]), extra(i)))

with B the engines' block size and ``extra(i)`` what vLLM publishes as the block's extra
keys (``BlockStored.extra_keys[i]``, lists made tuples): None for a plain block; for a
LoRA request the adapter's name on every block; ``cache_salt`` on the first block after
the LoRA name; multimodal ``(identifier, offset)`` pairs, which the door cannot compute,
so multimodal prompts match only their blocks before the first image. Only full blocks
are hashed, as vLLM does. Python's tuple hash (xxHash-style, 64-bit) costs ~25 us per
2K-token prompt where blake2b costs ~95 us; it is not collision resistant, which is
harmless here: a collision misroutes one request, the engine still checks its own
hashes. String extra keys make it process-local (PYTHONHASHSEED): each door process
keeps its own index.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from common.kv_wire import ExternalBlockHash

ROOT = 0x6B765F696E646578  # the chain's start ("kv_index")
_MASK64 = (1 << 64) - 1


def chained_hashes(
    token_ids: Sequence[int], block_size: int, extra_keys: Sequence[Any] | None = None, parent: int = ROOT
) -> list[int]:
    """One chained hash per full block of ``token_ids`` (see the module docstring)."""
    hashes: list[int] = []
    tokens = token_ids if isinstance(token_ids, tuple) else tuple(token_ids)
    end = len(tokens) - len(tokens) % block_size
    if extra_keys is None:
        for start in range(0, end, block_size):
            parent = hash((parent, tokens[start : start + block_size], None))
            hashes.append(parent)
        return hashes
    for index, start in enumerate(range(0, end, block_size)):
        extra = extra_keys[index] if index < len(extra_keys) else None
        parent = hash((parent, tokens[start : start + block_size], extra))
        hashes.append(parent)
    return hashes


def request_extra_keys(
    num_blocks: int, lora_name: str | None = None, cache_salt: str | None = None
) -> list[Any] | None:
    """A text request's per-block extra keys as vLLM publishes them (lora name on every
    block, then cache_salt on the first); None when there are none."""
    if not lora_name and not cache_salt:
        return None
    rest = (lora_name,) if lora_name else None
    first = tuple(key for key in (lora_name, cache_salt) if key)
    return [first] + [rest] * (num_blocks - 1) if num_blocks else []


def hashable(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(hashable(item) for item in value)
    return value


def engine_hash(block_hash: ExternalBlockHash) -> int:
    if isinstance(block_hash, bytes):
        return int.from_bytes(block_hash[-8:], "big")
    return block_hash & _MASK64
