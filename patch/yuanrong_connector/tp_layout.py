"""Stored KV block values converted between tensor-parallel sizes (pure functions).

Which KV heads a rank holds (vLLM's ``QKVParallelLinear``), for H KV heads in all and
TP size t:
- H >= t: H must divide by t; rank r holds heads ``[r * H/t, (r + 1) * H/t)``;
- H < t: t must divide by H; each rank holds one head, ``r // (t/H)`` (every head is
  replicated on t/H ranks).

A stored value is one block of every layer of one rank (paged_cache.py): its pieces (a
layer's cache, or its K and V) one after another, each the block's bytes as the paged
cache holds them. Inside a piece the bytes are ``[outer, heads, head_bytes]``: ``outer``
is 1 where the heads axis comes first (``[heads, tokens, content]``: vLLM's CPU and
logical ``[B, H, N, C]`` caches) and the block's token count where tokens come first
(``[tokens, heads, head]``: the K/V-split CUDA caches). Only the heads axis changes with
the TP size, so a value of one TP size is assembled from values of another by copying
runs of heads: one strided copy per piece and run, for a batch of blocks at once.

Refused (``TPLayoutError``, one line naming the values): head counts that vLLM itself
would refuse for a TP size, ranks out of range, a block whose heads axis cannot be told
apart, and values whose size is not what the geometry says.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


class TPLayoutError(ValueError):
    """Blocks of one TP size cannot be converted to another (the message says why)."""


def check_tp_size(total_kv_heads: int, tp_size: int) -> None:
    """Raise unless vLLM can shard ``total_kv_heads`` KV heads over ``tp_size`` ranks."""
    if total_kv_heads < 1 or tp_size < 1:
        raise TPLayoutError(f"KV heads {total_kv_heads} and TP size {tp_size} must both be >= 1")
    if total_kv_heads >= tp_size and total_kv_heads % tp_size:
        raise TPLayoutError(f"{total_kv_heads} KV heads do not divide over TP size {tp_size}")
    if total_kv_heads < tp_size and tp_size % total_kv_heads:
        raise TPLayoutError(f"TP size {tp_size} is not a multiple of the {total_kv_heads} KV heads to replicate")


def local_heads(total_kv_heads: int, tp_size: int) -> int:
    """KV heads one rank holds (vLLM's ``get_num_kv_heads``)."""
    check_tp_size(total_kv_heads, tp_size)
    return max(1, total_kv_heads // tp_size)


def heads_of_rank(total_kv_heads: int, tp_size: int, rank: int) -> range:
    """The model's KV heads (global indices) that rank ``rank`` of ``tp_size`` holds, in its order."""
    count = local_heads(total_kv_heads, tp_size)
    if not 0 <= rank < tp_size:
        raise TPLayoutError(f"rank {rank} is not a rank of TP size {tp_size}")
    if total_kv_heads < tp_size:
        head = rank // (tp_size // total_kv_heads)
        return range(head, head + 1)
    return range(rank * count, (rank + 1) * count)


def _holder(total_kv_heads: int, tp_size: int, head: int) -> tuple[int, int]:
    """(the first rank of ``tp_size`` that holds ``head``, the head's index in that rank's shard)."""
    if total_kv_heads < tp_size:
        return head * (tp_size // total_kv_heads), 0
    count = total_kv_heads // tp_size
    return head // count, head % count


@dataclass(frozen=True)
class HeadRun:
    """Consecutive heads copied from one source rank's value into the target's."""

    source_rank: int
    source_first: int  # index in the source rank's shard
    target_first: int  # index in the target rank's shard
    count: int


def head_runs(total_kv_heads: int, source_tp: int, target_tp: int, target_rank: int) -> tuple[HeadRun, ...]:
    """Where each head of rank ``target_rank`` of ``target_tp`` is found among the values
    of ``source_tp`` ranks, as few runs as possible (a replicated head: its first holder)."""
    check_tp_size(total_kv_heads, source_tp)
    runs: list[HeadRun] = []
    for target_first, head in enumerate(heads_of_rank(total_kv_heads, target_tp, target_rank)):
        rank, index = _holder(total_kv_heads, source_tp, head)
        last = runs[-1] if runs else None
        if last is not None and last.source_rank == rank and last.source_first + last.count == index:
            runs[-1] = HeadRun(rank, last.source_first, last.target_first, last.count + 1)
        else:
            runs.append(HeadRun(rank, index, target_first, 1))
    return tuple(runs)


def source_ranks(total_kv_heads: int, source_tp: int, target_tp: int, target_ranks: Sequence[int]) -> tuple[int, ...]:
    """The ranks of ``source_tp`` whose values ``target_ranks`` of ``target_tp`` need, ascending
    (a scheduler asks about every rank of its own engine; a worker about its own)."""
    needed = {run.source_rank for rank in target_ranks for run in head_runs(total_kv_heads, source_tp, target_tp, rank)}
    return tuple(sorted(needed))


@dataclass(frozen=True)
class PieceGeometry:
    """One piece of a stored value seen as ``[outer, heads, head_bytes]``."""

    outer: int
    head_bytes: int

    def nbytes(self, heads: int) -> int:
        return self.outer * heads * self.head_bytes


def piece_geometry(block_shape: Sequence[int], itemsize: int, heads: int, heads_first: bool) -> PieceGeometry:
    """Where the heads axis is in one block of a piece (``block_shape``: its shape without
    the block axis). The axis of size ``heads`` (the last axis, the content, is never it);
    where several match (heads == tokens), ``heads_first`` says which form the cache has."""
    candidates = [axis for axis in range(len(block_shape) - 1) if block_shape[axis] == heads]
    if len(candidates) > 1:
        candidates = [candidates[0] if heads_first else candidates[1]]
    if not candidates and heads == 1:  # no heads axis at all (MLA's [tokens, latent]): the whole piece is one head
        return PieceGeometry(1, math.prod(block_shape) * itemsize)
    if not candidates:
        raise TPLayoutError(f"a KV block of shape {tuple(block_shape)} has no axis of {heads} KV heads")
    axis = candidates[0]
    return PieceGeometry(math.prod(block_shape[:axis]), math.prod(block_shape[axis + 1 :]) * itemsize)


def value_bytes(pieces: Sequence[PieceGeometry], heads: int) -> int:
    """Bytes of one stored value whose pieces hold ``heads`` heads each."""
    return sum(piece.nbytes(heads) for piece in pieces)


@dataclass(frozen=True)
class ReshardPlan:
    """How one rank of this engine assembles its values from another TP size's values."""

    pieces: tuple[PieceGeometry, ...]
    runs: tuple[HeadRun, ...]
    source_heads: int
    target_heads: int

    @property
    def source_ranks(self) -> tuple[int, ...]:
        return tuple(sorted({run.source_rank for run in self.runs}))

    @property
    def source_bytes(self) -> int:
        return value_bytes(self.pieces, self.source_heads)

    @property
    def target_bytes(self) -> int:
        return value_bytes(self.pieces, self.target_heads)

    def convert(self, sources: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """This rank's values (uint8 ``[blocks, target_bytes]``) from each source rank's
        (uint8 ``[blocks, source_bytes]``, or one value ``[source_bytes]``)."""
        rows = {rank: value.reshape(-1, value.shape[-1]) for rank, value in sources.items()}
        missing = [rank for rank in self.source_ranks if rank not in rows]
        if missing:
            raise TPLayoutError(f"values of source ranks {missing} are missing (need ranks {list(self.source_ranks)})")
        blocks = {value.shape[0] for value in rows.values()}
        wrong = {rank: value.shape[-1] for rank, value in rows.items() if value.shape[-1] != self.source_bytes}
        if wrong or len(blocks) != 1:
            raise TPLayoutError(
                f"source values of {wrong or 'unequal block counts'} bytes do not match the {self.source_bytes}-byte "
                f"values of {self.source_heads} heads per rank"
            )
        count = blocks.pop()
        first = rows[self.source_ranks[0]]
        out = torch.empty((count, self.target_bytes), dtype=torch.uint8, device=first.device)
        source_offset = target_offset = 0
        for piece in self.pieces:
            source_len, target_len = piece.nbytes(self.source_heads), piece.nbytes(self.target_heads)
            target = out[:, target_offset : target_offset + target_len].view(count, piece.outer, self.target_heads, -1)
            for run in self.runs:
                source = rows[run.source_rank][:, source_offset : source_offset + source_len]
                source = source.view(count, piece.outer, self.source_heads, -1)
                target[:, :, run.target_first : run.target_first + run.count] = (
                    source[:, :, run.source_first : run.source_first + run.count]
                )  # fmt: skip
            source_offset, target_offset = source_offset + source_len, target_offset + target_len
        return out


def plan_reshard(
    pieces: Sequence[PieceGeometry], total_kv_heads: int, source_tp: int, target_tp: int, target_rank: int
) -> ReshardPlan:
    """The plan for rank ``target_rank`` of ``target_tp`` to read values ``source_tp`` ranks
    wrote; ``pieces``: the target's own value geometry (``PagedKVCache.head_geometry``)."""
    runs = head_runs(total_kv_heads, source_tp, target_tp, target_rank)
    return ReshardPlan(
        tuple(pieces), runs, local_heads(total_kv_heads, source_tp), local_heads(total_kv_heads, target_tp)
    )
