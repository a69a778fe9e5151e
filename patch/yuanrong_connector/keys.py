"""Content-addressed, layout-safe keys for KV blocks (pure functions).

A block's key is ``<layout>_<rank>_<chain>``:
- ``chain``: SHA-256 over the previous block's chain and this block's token ids, so a
  key names the whole prefix up to the end of its block. The chain starts from a root
  that covers whatever else changes a block's KV for the same tokens (LoRA adapter,
  ``cache_salt``, multimodal inputs): requests that differ there never share blocks;
- ``layout``: a fingerprint of everything that changes the bytes of a block (model
  identity, KV-cache dtype, block size, the model's KV heads, head size, layer count, TP
  size, the device family whose paged-cache layout and value format the bytes follow,
  and the options that change the weights or the computation without changing the model
  folder: compute dtype, quantization, revision, hf-overrides, rope scaling), so engines
  whose layouts differ never find each other's blocks;
- ``rank``: the TP rank whose shard of the heads the value holds.

Everything in a layout but the TP size is the same for two engines of one model that
differ only in TP, so an engine computes the keys another TP size writes
(``KVLayout.with_tp``, ``block_keys``) and assembles its own shards from them
(tp_layout.py).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import struct
from collections.abc import Sequence
from pathlib import Path

_ROOT = b"yuanrong-kv-v1"
_TAIL = b"yuanrong-kv-tail-v1"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
_INDEX_SUFFIX = ".index.json"  # which tensor lies in which weight file: read whole
_SAMPLE_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class KVLayout:
    model: str  # model_identity(): content-derived, the same on every node
    dtype: str
    block_size: int
    num_kv_heads: int  # the model's KV heads, all TP ranks together (1 for MLA: one latent, on every rank)
    head_size: int
    num_layers: int
    tp_size: int
    device_family: str = "cpu"  # cpu | cuda | npu: paged-cache layout and value format
    options: str = ""  # model_options(): what changes weights or compute beside the folder

    @functools.cache  # noqa: B019  # frozen and hashable: one entry per layout, computed once
    def fingerprint(self) -> str:
        parts = (
            self.model,
            self.dtype,
            self.block_size,
            self.num_kv_heads,
            self.head_size,
            self.num_layers,
            self.tp_size,
            self.device_family,
            self.options,
        )
        return hashlib.sha256("|".join(str(part) for part in parts).encode()).hexdigest()[:16]

    def with_tp(self, tp_size: int) -> KVLayout:
        """The layout of an engine that differs from this one only in its TP size."""
        return dataclasses.replace(self, tp_size=tp_size)


def model_identity(model: str) -> str:
    """A name for the model's weights that does not depend on where they are mounted.

    For a local folder: SHA-256 over config.json, every weight index file whole and, per
    weight file, its name, size, first and last MiB (cheap, and different for two
    fine-tunes of one architecture). Anything else (a hub name) is used as given.
    """
    folder = Path(model)
    config = folder / "config.json"
    if not config.is_file():
        return model
    digest = hashlib.sha256(config.read_bytes())
    for index in sorted(p for p in folder.iterdir() if p.name.endswith(_INDEX_SUFFIX) and p.is_file()):
        digest.update(index.name.encode() + b"\0" + index.read_bytes())
    for weight in sorted(p for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file()):
        size = weight.stat().st_size
        digest.update(f"{weight.name}:{size}".encode())
        with open(weight, "rb") as handle:
            digest.update(handle.read(_SAMPLE_BYTES))
            handle.seek(max(size - _SAMPLE_BYTES, 0))
            digest.update(handle.read(_SAMPLE_BYTES))
    return digest.hexdigest()[:24]


def model_options(
    compute_dtype: str,
    quantization: str | None = None,
    revision: str | None = None,
    hf_overrides: object = None,
    rope_scaling: object = None,
) -> str:
    """What changes a model's weights or computation without changing its folder (so
    ``model_identity`` cannot see it): the dtype it computes in (a float32 and a bfloat16
    engine write different KV even with an fp8 KV cache), ``--quantization``,
    ``--revision``, ``--hf-overrides`` and the rope scaling in effect, as canonical JSON
    (a callable override by its qualified name: its repr names an address)."""
    options = {
        "compute_dtype": compute_dtype,
        "quantization": quantization,
        "revision": revision,
        "hf_overrides": hf_overrides or None,
        "rope_scaling": rope_scaling or None,
    }
    return json.dumps(options, sort_keys=True, default=_canonical)


def _canonical(value: object) -> str:
    name = getattr(value, "__qualname__", None)
    return f"{getattr(value, '__module__', '')}.{name}" if callable(value) and name else str(value)


def chain_root(lora_name: str | None = None, cache_salt: str | None = None, mm_identifiers: Sequence[str] = ()) -> bytes:
    """Where a request's chain starts: the same for plain prompts, different for every
    LoRA adapter, cache salt and set of multimodal inputs (whose identifiers are content
    hashes). Multimodal requests share blocks only with requests of the same inputs:
    conservative (a text prefix before an image is not shared), never wrong."""
    if lora_name is None and cache_salt is None and not mm_identifiers:
        return hashlib.sha256(_ROOT).digest()
    parts = [_ROOT, b"lora", (lora_name or "").encode(), b"salt", (cache_salt or "").encode(), b"mm"]
    parts += [identifier.encode() for identifier in mm_identifiers]
    return hashlib.sha256(b"\0".join(parts)).digest()


def chained_block_hashes(token_ids: Sequence[int], block_size: int, root: bytes | None = None) -> list[str]:
    """One hash per *full* block of ``token_ids``; a trailing partial block has none."""
    hashes: list[str] = []
    previous = chain_root() if root is None else root
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        block = token_ids[start : start + block_size]
        digest = hashlib.sha256(previous + struct.pack(f"<{block_size}q", *block)).digest()
        hashes.append(digest.hex()[:40])
        previous = digest
    return hashes


def tail_block_hash(token_ids: Sequence[int], block_size: int, full_hashes: Sequence[str],
                    root: bytes | None = None) -> str | None:  # fmt: skip
    """The hash of a prompt's partial last block (the prefill hands it over, so that the
    decode computes only the last token); None when the prompt ends on a block boundary.
    It chains from the last full block's hash (``full_hashes``, of the same prompt) and
    covers the tail's token ids and their count under a tag of its own, so a tail's key
    never equals a full block's, nor another prompt's tail unless its tokens are these."""
    tail = len(token_ids) % block_size
    if tail == 0:
        return None
    previous = full_hashes[-1].encode() if full_hashes else (chain_root() if root is None else root)
    tokens = token_ids[len(token_ids) - tail :]
    return hashlib.sha256(_TAIL + previous + struct.pack(f"<{tail}q", *tokens)).hexdigest()[:40]


def block_key(layout_fingerprint: str, tp_rank: int, block_hash: str) -> str:
    return f"{layout_fingerprint}_{tp_rank}_{block_hash}"


def block_keys(layout: KVLayout, ranks: Sequence[int], block_hashes: Sequence[str]) -> list[str]:
    """The keys engines of ``layout`` store ``block_hashes`` under, one per rank of ``ranks``
    for each block (block-major: a block's keys are consecutive)."""
    fingerprint = layout.fingerprint()
    return [block_key(fingerprint, rank, block_hash) for block_hash in block_hashes for rank in ranks]
