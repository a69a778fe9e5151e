"""vLLM's paged KV cache seen as blocks: which memory holds a block and where its bytes
go in a stored value.

A stored value is one block of every layer: for each registered segment (a layer's
cache, or its K and V tensors where a platform keeps them apart), in layer-name
order, the block's bytes as the paged cache holds them (K before V where the cache
keeps them in separate halves). Every engine of one layout fingerprint writes the
same format, so any of them can read it.

Each piece also records its block's shape, so that a value can be converted between
TP sizes (``head_geometry``, tp_layout.py).

Copies are batched: all (block, piece) copies of a save, or of one layer of a load,
go to torch in one ``_foreach_copy_`` call, so a step with hundreds of blocks costs
a few Python calls, not one per block per layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from patch.yuanrong_connector.tp_layout import PieceGeometry, piece_geometry


def block_axis(kv_layer: torch.Tensor, num_blocks: int) -> int:
    """The axis of a layer's cache that indexes blocks: 0 (CPU, ``[blocks, ...]``) or
    1 (``[2, blocks, ...]`` layouts that keep K and V apart)."""
    if kv_layer.shape[0] == num_blocks:
        return 0
    if kv_layer.dim() > 1 and kv_layer.shape[0] == 2 and kv_layer.shape[1] == num_blocks:
        return 1
    raise ValueError(f"cannot find the block axis of a KV cache of shape {tuple(kv_layer.shape)}")


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` ([num_blocks, ...]) as uint8 rows [num_blocks, block bytes] over the same
    memory; each block must be contiguous (blocks themselves may be strided apart)."""
    if not tensor[0].is_contiguous():
        raise ValueError(f"blocks of a KV cache of shape {tuple(tensor.shape)} are not contiguous in memory")
    size = tensor.element_size()
    memory = torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(tensor.untyped_storage())
    return memory.as_strided((tensor.shape[0], tensor[0].numel() * size), (tensor.stride(0) * size, 1), tensor.storage_offset() * size)


@dataclass(frozen=True)
class Piece:
    rows: torch.Tensor  # uint8 [num_blocks, nbytes]: row b is this piece of block b
    nbytes: int
    offset: int  # where this piece's bytes start inside a stored value
    block_shape: tuple[int, ...] = ()  # one block of this piece, in the cache's dtype
    itemsize: int = 1
    heads_first: bool = True  # [heads, tokens, ...] (CPU, vLLM's [B, H, N, C]); False: [tokens, heads, head]


@dataclass
class PagedKVCache:
    num_blocks: int
    pieces: list[Piece] = field(default_factory=list)
    layer_pieces: dict[str, list[int]] = field(default_factory=dict)  # layer name -> piece indices
    device: torch.device = torch.device("cpu")
    _row_table: list[tuple[int, int, int]] | None = field(default=None, repr=False)  # (first row's address, row stride, size) per piece

    @staticmethod
    def register(kv_caches: Mapping[str, torch.Tensor | Sequence[torch.Tensor]], num_blocks: int) -> PagedKVCache:
        cache = PagedKVCache(num_blocks)
        by_pointer: dict[int, list[int]] = {}
        offset = 0
        for name in sorted(kv_caches):
            value = kv_caches[name]
            tensors = [value] if isinstance(value, torch.Tensor) else list(value)
            indices: list[int] = []
            for tensor in tensors:
                cache.device = tensor.device
                pointer = tensor.data_ptr()
                if pointer not in by_pointer:  # layers sharing one cache are stored once
                    axis = block_axis(tensor, num_blocks)
                    halves = [tensor] if axis == 0 else list(tensor.unbind(0))
                    # K and V kept apart (a [2, blocks, ...] tensor, or a pair) hold [tokens, heads, head] blocks
                    heads_first = axis == 0 and len(tensors) == 1
                    by_pointer[pointer] = []
                    for half in halves:
                        rows = _rows(half)
                        by_pointer[pointer].append(len(cache.pieces))
                        shape = tuple(half.shape[1:])
                        cache.pieces.append(Piece(rows, rows.shape[1], offset, shape, half.element_size(), heads_first))
                        offset += rows.shape[1]
                indices.extend(by_pointer[pointer])
            cache.layer_pieces[name] = indices
        return cache

    @property
    def block_bytes(self) -> int:
        return sum(piece.nbytes for piece in self.pieces)

    def head_geometry(self, heads: int) -> list[PieceGeometry]:
        """Each piece as ``[outer, heads, head_bytes]`` for a rank holding ``heads`` KV heads
        (raises ``tp_layout.TPLayoutError`` where the heads axis cannot be found)."""
        return [piece_geometry(piece.block_shape, piece.itemsize, heads, piece.heads_first) for piece in self.pieces]

    def read_blocks(self, block_ids: Sequence[int], targets: Sequence[torch.Tensor]) -> None:
        """Copy each block ``block_ids[i]`` (every piece) into ``targets[i]`` (uint8, block_bytes)."""
        destinations, sources = [], []
        for block_id, target in zip(block_ids, targets):
            for piece in self.pieces:
                destinations.append(target[piece.offset : piece.offset + piece.nbytes])
                sources.append(piece.rows[block_id])
        if destinations:
            torch._foreach_copy_(destinations, sources, non_blocking=True)

    def write_pieces(self, piece_indices: Sequence[int], pairs: Sequence[tuple[int, torch.Tensor]]) -> None:
        """Copy the given pieces of each (block id, stored value) into the cache."""
        destinations, sources = [], []
        for index in piece_indices:
            piece = self.pieces[index]
            for block_id, source in pairs:
                destinations.append(piece.rows[block_id])
                sources.append(source[piece.offset : piece.offset + piece.nbytes])
        if destinations:
            torch._foreach_copy_(destinations, sources, non_blocking=True)

    def gather(self, block_index: torch.Tensor, out: torch.Tensor) -> None:
        """Write blocks ``block_index`` (a tensor of block ids on the cache's device) into
        the rows of ``out`` (uint8 [len(block_index), block_bytes]): one indexed copy per
        piece, however many blocks (the per-block copies of ``read_blocks`` cost Python time
        per block and piece, too much for the dozens of pieces of a GPU model's block)."""
        for piece in self.pieces:
            out[:, piece.offset : piece.offset + piece.nbytes] = piece.rows.index_select(0, block_index)

    def scatter(self, block_index: torch.Tensor, values: torch.Tensor) -> None:
        """The reverse of ``gather``: row i of ``values`` becomes block ``block_index[i]``."""
        for piece in self.pieces:
            piece.rows.index_copy_(0, block_index, values[:, piece.offset : piece.offset + piece.nbytes])

    def block_spans(self, block_id: int) -> list[tuple[int, int]]:
        """(address, size) of each piece of block ``block_id``, in stored-value order: where
        a stored value is copied straight into or out of the cache (by the store helper in a
        shared CPU cache; by the data system's HeteroClient on Ascend), without staging."""
        return self.blocks_spans([block_id], 0)[0]

    def blocks_spans(self, block_ids: Sequence[int], origin: int) -> list[list[tuple[int, int]]]:
        """``block_spans`` of each of ``block_ids``, addresses counted from ``origin``: by
        arithmetic on each piece's first row and row stride (indexing a tensor per block and
        piece cost ~0.7 ms for a 32-block load of 12 layers, on the loader's path)."""
        if self._row_table is None:
            self._row_table = [(piece.rows.data_ptr(), piece.rows.stride(0), piece.nbytes) for piece in self.pieces]
        for block_id in block_ids:
            if not 0 <= block_id < self.num_blocks:
                raise IndexError(f"block {block_id} is outside the KV cache's {self.num_blocks} blocks")
        table = [(first - origin, stride, size) for first, stride, size in self._row_table]
        return [[(first + block_id * stride, size) for first, stride, size in table] for block_id in block_ids]
