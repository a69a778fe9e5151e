"""Who holds a prompt's blocks, as masks over a roster of engines: ``Roster`` (which
engine has which bit) and ``Held`` (how many leading blocks each engine holds), the
answer of ``KVIndex.match``.

``match`` walks the prompt's chained hashes once, ANDing each block's holders into the
engines still holding every block so far, and stops when none is left; it returns the
engines that drop out at each depth as bitmasks (``Held``: a mapping engine -> leading
blocks that looks names up only when asked), so a decision does no per-engine work
there (``KVAware`` ranks the few engines outside the largest group by name, the rest by
load). Measured (``benchmarks.kv_index_scale``, 256 engines, 1M entries, 2-core box):
about 0.2 us per block walked, nearly all of it the dict lookup's cache misses (13 us
for a 65-block walk, 26 us for 128); a ``dict`` of 256 names, as ``match`` returned
before, cost 10 us more.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

_BYTE_BITS = [tuple(bit for bit in range(8) if byte >> bit & 1) for byte in range(256)]
_PEELED_BITS = 16  # Roster.names_of: up to this many, peeling beats walking a 256-bit mask's bytes


class Roster:
    """Which engine has which id (bit ``1 << id`` in the masks), as of one moment: the index
    replaces it, never changes it, when an engine comes or goes, so a ``Held`` keeps
    naming the engines it was made with."""

    __slots__ = ("names", "ids")

    def __init__(self, names: Sequence[str | None] = ()) -> None:
        self.names: tuple[str | None, ...] = tuple(names)  # by engine id; None: a free id
        self.ids: dict[str, int] = {name: engine_id for engine_id, name in enumerate(self.names) if name is not None}

    def names_of(self, bits: int) -> list[str]:
        """The engines of the bitmask ``bits``, by id: a few peeled off one at a time, more a
        byte at a time (3x faster than peeling 100 bits off a 256-bit int, 4x slower for one)."""
        names = self.names
        found: list[str] = []
        if bits.bit_count() <= _PEELED_BITS:
            while bits:
                lowest = bits & -bits
                found.append(names[lowest.bit_length() - 1])  # type: ignore[arg-type]
                bits ^= lowest
            return found
        for byte_index, byte in enumerate(bits.to_bytes((bits.bit_length() + 7) // 8, "little")):
            if byte:
                base = byte_index * 8
                for offset in _BYTE_BITS[byte]:
                    found.append(names[base + offset])  # type: ignore[arg-type]
        return found

    def mask_of(self, names: Iterable[str]) -> int:
        """The bitmask of those of ``names`` the roster knows."""
        ids = self.ids
        mask = 0
        for name in names:
            engine_id = ids.get(name)
            if engine_id is not None:
                mask |= 1 << engine_id
        return mask

    def with_name(self, engine_id: int, name: str | None) -> Roster:
        """A roster with ``engine_id`` given to ``name`` (None: freed)."""
        names = list(self.names) + [None] * (engine_id + 1 - len(self.names))
        names[engine_id] = name
        return Roster(names)


class Held(Mapping[str, int]):
    """By engine, how many leading blocks of one prompt it holds in one medium (what
    ``KVIndex.match`` returns; engines holding none are absent). Kept as ``levels``:
    ``(blocks, engines)`` pairs, shallowest first, ``engines`` the bitmask of the engines
    that hold exactly ``blocks`` leading blocks (each engine in one level at most);
    names come from ``roster`` only when asked for."""

    __slots__ = ("levels", "roster")

    def __init__(self, levels: Sequence[tuple[int, int]], roster: Roster) -> None:
        self.levels = levels
        self.roster = roster

    @classmethod
    def of(cls, counts: Mapping[str, int]) -> Held:
        """The same from a mapping engine -> leading blocks (counts of 0 or less: absent)."""
        if isinstance(counts, Held):
            return counts
        if not counts:
            return cls([], NO_ENGINES)
        roster = Roster(list(counts))
        by_blocks: dict[int, int] = {}
        for name, blocks in counts.items():
            if blocks > 0:
                by_blocks[blocks] = by_blocks.get(blocks, 0) | 1 << roster.ids[name]
        return cls(sorted(by_blocks.items()), roster)

    def blocks_of(self, name: str) -> int:
        """``name``'s leading blocks, 0 if none (no exception: ``get`` for every candidate
        of a policy's key function stays cheap)."""
        engine_id = self.roster.ids.get(name)
        if engine_id is not None:
            bit = 1 << engine_id
            for blocks, engines in self.levels:
                if engines & bit:
                    return blocks
        return 0

    def __getitem__(self, name: str) -> int:
        blocks = self.blocks_of(name)
        if not blocks:
            raise KeyError(name)
        return blocks

    def get(self, name: str, default: Any = None) -> Any:
        return self.blocks_of(name) or default

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.blocks_of(name) > 0

    def __iter__(self) -> Iterator[str]:
        for _, engines in self.levels:
            yield from self.roster.names_of(engines)

    def __len__(self) -> int:
        return sum(engines.bit_count() for _, engines in self.levels)

    def __repr__(self) -> str:
        return f"Held({dict(self)!r})"


NO_ENGINES = Roster()


def drop_outs(holders: dict[int, int], hashes: Iterable[int]) -> list[tuple[int, int]]:
    """``Held.levels`` of a prompt: walks its blocks, keeping the engines that hold every
    block so far (``alive``), until none does."""
    get = holders.get
    levels: list[tuple[int, int]] = []
    alive = -1  # every engine, before the first block
    held = 0
    for block_hash in hashes:
        still = alive & get(block_hash, 0)
        if still != alive:
            if held:
                levels.append((held, alive ^ still))
            if not still:
                return levels
            alive = still
        held += 1
    if held:
        levels.append((held, alive))
    return levels


def unset_holder(holders: dict[int, int], chain: int, bit: int) -> None:
    """Take one engine's ``bit`` off ``chain``'s holders (the entry goes with the last)."""
    mask = holders[chain] & ~bit
    if mask:
        holders[chain] = mask
    else:
        del holders[chain]
