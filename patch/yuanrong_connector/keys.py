"""Content-addressed, layout-safe keys for KV blocks (pure functions).

A block's key is ``<layout>_<rank>_<chain>``:
- ``chain``: SHA-256 over the previous block's chain and this block's token ids, so a
  key names the whole prefix up to the end of its block;
- ``layout``: a fingerprint of everything that changes the bytes of a block (model,
  dtype, block size, KV heads, head size, layer count, TP size), so engines whose
  layouts differ never find each other's blocks;
- ``rank``: the TP rank whose shard of the heads the value holds.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

_ROOT = b"yuanrong-kv-v1"


@dataclass(frozen=True)
class KVLayout:
    model: str
    dtype: str
    block_size: int
    num_kv_heads: int
    head_size: int
    num_layers: int
    tp_size: int

    def fingerprint(self) -> str:
        text = "|".join(
            str(part)
            for part in (
                self.model,
                self.dtype,
                self.block_size,
                self.num_kv_heads,
                self.head_size,
                self.num_layers,
                self.tp_size,
            )
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def chained_block_hashes(token_ids: Sequence[int], block_size: int) -> list[str]:
    """One hash per *full* block of ``token_ids``; a trailing partial block has none."""
    hashes: list[str] = []
    previous = hashlib.sha256(_ROOT).digest()
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        block = token_ids[start : start + block_size]
        digest = hashlib.sha256(previous + struct.pack(f"<{block_size}q", *block)).digest()
        hashes.append(digest.hex()[:40])
        previous = digest
    return hashes


def block_key(layout_fingerprint: str, tp_rank: int, block_hash: str) -> str:
    return f"{layout_fingerprint}_{tp_rank}_{block_hash}"


def loadable_block_count(num_prompt_tokens: int, block_size: int) -> int:
    """Full blocks a consumer may load: vLLM must compute at least the last prompt token."""
    return max(num_prompt_tokens - 1, 0) // block_size
