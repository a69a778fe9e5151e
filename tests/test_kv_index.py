"""The KV index on synthetic vLLM events: chains, stores and removals, media, extra
keys, dropping engines, the memory cap, and exact match counts."""

from __future__ import annotations

import hashlib

import msgspec
import pytest

from common.kv_wire import MEDIUM_CPU, AllBlocksCleared, BlockRemoved, BlockStored
from door.kv_chain import chained_hashes, request_extra_keys
from door.kv_holders import Held, Roster
from door.kv_index import KVIndex

B = 4  # block size of these tests


def engine_hash(*parts: object) -> bytes:
    """A vLLM-like block hash (sha256 bytes): engines name blocks their own way."""
    return hashlib.sha256(repr(parts).encode()).digest()


def prompt(start: int, blocks: int) -> list[int]:
    return list(range(start, start + blocks * B))


def stored(
    tokens: list[int], first_block: int = 0, parent: bytes | int | None = None, salt: str = "e", **fields: object
) -> BlockStored:
    """BlockStored for tokens' full blocks, engine hashes from (salt, position, tokens)."""
    count = len(tokens) // B
    hashes = [engine_hash(salt, first_block + i, tokens[: (i + 1) * B]) for i in range(count)]
    event = BlockStored(block_hashes=hashes, parent_block_hash=parent, token_ids=tokens, block_size=B)
    return msgspec.structs.replace(event, **fields)


def test_match_counts_leading_blocks_per_engine() -> None:
    index = KVIndex(block_size=B)
    shared = prompt(0, 3)
    index.apply("a", [stored(shared)])
    index.apply("b", [stored(shared[: 2 * B])])
    index.apply("c", [stored(prompt(1000, 2))])

    assert index.match(index.hashes(shared)) == {"a": 3, "b": 2}
    assert index.match(index.hashes(shared + [7, 7])) == {"a": 3, "b": 2}  # a trailing partial block has no hash
    assert index.match(index.hashes(shared[:B] + [9] * B)) == {"a": 1, "b": 1}  # diverges in block 1
    assert index.match(index.hashes([9] * B + shared[B:])) == {}  # same tokens after a different first block
    assert index.match(index.hashes(shared[: B - 1])) == {}
    assert index.entries() == 7 and index.entries("a") == 3


def test_match_keeps_the_engines_dropping_out_at_each_depth_as_bitmasks() -> None:
    index = KVIndex(block_size=B)
    tokens = prompt(0, 4)
    index.apply("a", [stored(tokens[: 3 * B])])  # id 0
    index.apply("b", [stored(tokens[: 2 * B])])  # id 1
    index.apply("c", [stored(tokens)])  # id 2
    index.apply("d", [stored(tokens[: 3 * B])])  # id 3
    held = index.match(index.hashes(tokens))
    assert held.levels == [(2, 0b0010), (3, 0b1001), (4, 0b0100)]
    assert held == {"a": 3, "b": 2, "c": 4, "d": 3}
    assert list(held) == ["b", "a", "d", "c"] and len(held) == 4
    assert held["d"] == 3 and held.get("d", 0) == 3 and held.get("e") is None and held.get("e", 0) == 0
    assert "c" in held and "e" not in held and held.blocks_of("b") == 2 and held.blocks_of("e") == 0
    with pytest.raises(KeyError, match="e"):
        held["e"]
    assert repr(held) == "Held({'b': 2, 'a': 3, 'd': 3, 'c': 4})"
    # every engine drops out after block 0: the walk stops there
    assert index.match(index.hashes(tokens[:B] + [9] * (3 * B))).levels == [(1, 0b1111)]
    assert index.match(index.hashes([9] * B)).levels == []
    assert index.match([]).levels == []
    assert index.match(index.hashes(tokens), MEDIUM_CPU).levels == []  # no engine has a host tier


def test_a_match_names_the_engines_of_its_moment() -> None:
    index = KVIndex(block_size=B)
    tokens = prompt(0, 2)
    index.apply("a", [stored(tokens)])
    index.apply("b", [stored(tokens[:B])])
    before = index.match(index.hashes(tokens))
    index.remove("a")
    index.apply("c", [stored(tokens)])  # takes a's id 0
    after = index.match(index.hashes(tokens))
    assert before.levels == after.levels == [(1, 0b10), (2, 0b01)]
    assert before == {"a": 2, "b": 1} and after == {"b": 1, "c": 2}
    assert before.roster.names == ("a", "b") and after.roster.names == ("c", "b")


def test_a_roster_names_the_bits_of_a_mask() -> None:
    roster = Roster(["a", None, "c"]).with_name(9, "j")
    assert roster.names == ("a", None, "c", None, None, None, None, None, None, "j")
    assert roster.ids == {"a": 0, "c": 2, "j": 9}
    assert roster.names_of(0b10_0000_0101) == ["a", "c", "j"]
    assert roster.names_of(0) == []
    assert roster.mask_of(["j", "x", "a"]) == 0b10_0000_0001
    assert roster.with_name(2, None).ids == {"a": 0, "j": 9}
    many = Roster([f"e{number}" for number in range(256)])
    assert many.names_of(1 << 255 | 1 << 8 | 1 << 7 | 1) == ["e0", "e7", "e8", "e255"]  # peeled
    assert many.names_of((1 << 256) - 1) == list(many.names)  # byte by byte
    every_ninth = sum(1 << number for number in range(0, 256, 9))  # 29 engines
    assert many.names_of(every_ninth) == [f"e{number}" for number in range(0, 256, 9)]


def test_held_from_counts() -> None:
    held = Held.of({"a": 3, "b": 0, "c": 1, "d": 3})
    assert held.levels == [(1, 0b0100), (3, 0b1001)] and held.roster.names == ("a", "b", "c", "d")
    assert held == {"a": 3, "c": 1, "d": 3}
    assert Held.of(held) is held
    assert Held.of({}).levels == [] and Held.of({}).roster is Held.of({}).roster  # one roster for no engines


def test_a_chain_continues_across_events_by_the_engines_parent_hash() -> None:
    index = KVIndex(block_size=B)
    tokens = prompt(0, 3)
    first = stored(tokens[:B])
    rest = stored(tokens[B:], first_block=1, parent=first.block_hashes[0])
    index.apply("a", [first])
    index.apply("a", [rest])
    assert index.match(index.hashes(tokens)) == {"a": 3}
    # the same tail without its parent known is not indexed (its prefix is unknown)
    index.apply("b", [stored(tokens[B:], first_block=1, parent=engine_hash("unknown"))])
    assert index.match(index.hashes(tokens)) == {"a": 3}
    assert index.stats().unresolved_blocks == 2


def test_removed_blocks_end_the_leading_run() -> None:
    index = KVIndex(block_size=B)
    tokens = prompt(0, 4)
    event = stored(tokens)
    index.apply("a", [event])
    index.apply("a", [BlockRemoved(block_hashes=[event.block_hashes[2]], medium="GPU")])
    assert index.match(index.hashes(tokens)) == {"a": 2}
    index.apply("a", [BlockRemoved(block_hashes=[engine_hash("never stored")])])  # unknown: nothing happens
    index.apply("a", [BlockRemoved(block_hashes=[event.block_hashes[0]])])  # medium None is the device
    assert index.match(index.hashes(tokens)) == {}
    assert index.entries("a") == 2  # blocks 1 and 3 stay, unreachable until block 0 is stored again
    index.apply("a", [stored(tokens[:B])])
    assert index.match(index.hashes(tokens)) == {"a": 2}


def test_a_block_stored_twice_needs_two_removals() -> None:
    index = KVIndex(block_size=B)
    tokens = prompt(0, 2)
    event = stored(tokens)
    index.apply("a", [event, event])  # two physical copies of the same content
    remove_first = BlockRemoved(block_hashes=[event.block_hashes[0]])
    index.apply("a", [remove_first])
    assert index.match(index.hashes(tokens)) == {"a": 2}
    index.apply("a", [remove_first])
    assert index.match(index.hashes(tokens)) == {}
    assert index.entries("a") == 1


def test_all_blocks_cleared_empties_one_engine() -> None:
    index = KVIndex(block_size=B)
    tokens = prompt(0, 2)
    index.apply("a", [stored(tokens)])
    index.apply("b", [stored(tokens)])
    index.apply("a", [AllBlocksCleared()])
    assert index.match(index.hashes(tokens)) == {"b": 2}
    assert index.entries() == 2


def test_media_are_separate_and_chains_cross_them() -> None:
    index = KVIndex(block_size=B)
    tokens = prompt(0, 3)
    device = stored(tokens[: 2 * B])
    index.apply("a", [device])
    # the host tier holds blocks 0-2; block 2's parent is a device block
    index.apply("a", [stored(tokens[: 2 * B], medium=MEDIUM_CPU)])
    index.apply("a", [stored(tokens[2 * B :], first_block=2, parent=device.block_hashes[1], medium=MEDIUM_CPU)])
    hashes = index.hashes(tokens)
    assert index.match(hashes) == {"a": 2}
    assert index.match(hashes, MEDIUM_CPU) == {"a": 3}
    index.apply("a", [BlockRemoved(block_hashes=[device.block_hashes[0]], medium=MEDIUM_CPU)])
    assert index.match(hashes) == {"a": 2}
    assert index.match(hashes, MEDIUM_CPU) == {}
    assert index.stats().blocks_by_medium == {"GPU": 2, "CPU": 2}


def test_lora_and_cache_salt_blocks_match_only_requests_with_them() -> None:
    index = KVIndex(block_size=B)
    tokens = prompt(0, 3)
    # as vLLM publishes them: per block, the LoRA name, then cache_salt on the first block
    extra = [["sql-lora", "tenant-1"], ["sql-lora"], ["sql-lora"]]
    index.apply("a", [stored(tokens, lora_name="sql-lora", extra_keys=extra)])
    index.apply("b", [stored(tokens, salt="b")])
    assert index.match(index.hashes(tokens, lora_name="sql-lora", cache_salt="tenant-1")) == {"a": 3}
    assert index.match(index.hashes(tokens, lora_name="sql-lora")) == {}
    assert index.match(index.hashes(tokens)) == {"b": 3}
    assert request_extra_keys(3, "sql-lora", "tenant-1") == [("sql-lora", "tenant-1"), ("sql-lora",), ("sql-lora",)]
    assert request_extra_keys(2, None, "s") == [("s",), None]
    assert request_extra_keys(2) is None


def test_multimodal_blocks_match_up_to_the_first_image() -> None:
    index = KVIndex(block_size=B)
    tokens = prompt(0, 3)
    index.apply("a", [stored(tokens, extra_keys=[None, [["img-sha", 1]], None])])
    assert index.match(index.hashes(tokens)) == {"a": 1}
    with_image = chained_hashes(tokens, B, [None, (("img-sha", 1),), None])
    assert index.match(with_image) == {"a": 3}


def test_other_groups_sizes_and_unaligned_events_are_ignored() -> None:
    index = KVIndex(block_size=B, group_idx=0)
    tokens = prompt(0, 2)
    index.apply("a", [stored(tokens, group_idx=1)])
    partial = BlockStored(block_hashes=[engine_hash("p")], token_ids=tokens[:2], block_size=2)  # a hybrid's partial
    unaligned = BlockStored(block_hashes=[engine_hash("u")], token_ids=tokens, block_size=B)  # hashes != blocks
    index.apply("a", [partial, unaligned])
    assert index.match(index.hashes(tokens)) == {}
    assert index.stats().ignored_blocks == 4
    index.apply("a", [stored(tokens, group_idx=0)])
    assert index.match(index.hashes(tokens)) == {"a": 2}


def test_int_block_hashes_name_the_same_blocks_as_bytes() -> None:
    """VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES publishes the sha256's last 64 bits."""
    index = KVIndex(block_size=B)
    tokens = prompt(0, 2)
    event = stored(tokens)
    index.apply("a", [event])
    as_int = int.from_bytes(event.block_hashes[1], "big") & ((1 << 64) - 1)  # type: ignore[arg-type]
    index.apply("a", [BlockRemoved(block_hashes=[as_int])])
    assert index.match(index.hashes(tokens)) == {"a": 1}


def test_drop_forgets_one_engine_and_remove_frees_its_id() -> None:
    index = KVIndex(block_size=B)
    tokens = prompt(0, 2)
    for name in ("a", "b"):
        index.apply(name, [stored(tokens)])
    assert index.drop("a") == 2
    assert index.match(index.hashes(tokens)) == {"b": 2}
    assert index.engines() == ["a", "b"]
    index.remove("a")
    assert index.engines() == ["b"]
    index.apply("c", [stored(tokens[:B])])  # reuses a's id; inherits nothing of a's
    assert index.match(index.hashes(tokens)) == {"b": 2, "c": 1}
    assert index.stats().dropped_entries == 2


def test_hundreds_of_engines_share_blocks() -> None:
    index = KVIndex(block_size=B)
    tokens = prompt(0, 3)
    for number in range(300):
        index.apply(f"e{number}", [stored(tokens[: (1 + number % 3) * B])])
    counts = index.match(index.hashes(tokens))
    assert len(counts) == 300
    assert all(counts[f"e{number}"] == 1 + number % 3 for number in range(300))
    assert index.stats().blocks_by_medium == {"GPU": 3}


def test_the_cap_drops_the_oldest_entries_of_the_engine_holding_most() -> None:
    index = KVIndex(block_size=B, max_blocks=64)  # over 64: down to 63 (1/64 of the cap free)
    a_tokens, b_tokens = prompt(0, 40), prompt(10_000, 30)
    index.apply("b", [stored(b_tokens, salt="b")])
    index.apply("a", [stored(a_tokens[: 20 * B], salt="a")])
    parent = engine_hash("a", 19, a_tokens[: 20 * B])
    index.apply("a", [stored(a_tokens[20 * B :], first_block=20, parent=parent, salt="a")])
    assert index.entries() == 63
    assert index.entries("a") == 33 and index.entries("b") == 30
    assert index.stats().evicted_entries == 7
    assert index.match(index.hashes(b_tokens)) == {"b": 30}
    assert index.match(index.hashes(a_tokens)) == {}  # a's first blocks were its oldest
    # a stores blocks 0-6 again: 70 entries, so a's 7 oldest go again (blocks 7-13)
    index.apply("a", [stored(a_tokens[: 7 * B], salt="a")])
    assert index.entries() == 63 and index.entries("a") == 33
    assert index.match(index.hashes(a_tokens)) == {"a": 7}
    assert index.match(index.hashes(b_tokens)) == {"b": 30}


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="block_size=0"):
        KVIndex(block_size=0)
    with pytest.raises(ValueError, match="max_blocks=0"):
        KVIndex(block_size=16, max_blocks=0)


def test_the_store_tier_remembers_blocks_engines_have_evicted_or_forgotten() -> None:
    index = KVIndex(block_size=B, track_store=True)
    tokens = prompt(0, 3)
    event = stored(tokens)
    index.apply("a", [event])
    index.apply("a", [BlockRemoved(block_hashes=event.block_hashes)])
    index.apply("b", [stored(prompt(500, 1), medium=MEDIUM_CPU)])  # offload tiers are not the data system

    assert index.match(index.hashes(tokens)) == {}  # evicted from a's device cache
    assert index.store_match(index.hashes(tokens)) == 3  # but saved to the data system
    assert index.store_match(index.hashes(tokens[:B] + [9] * B)) == 1  # diverges in block 1
    assert index.store_match(index.hashes(prompt(500, 1))) == 0
    index.remove("a")
    assert index.store_match(index.hashes(tokens)) == 3  # an engine leaving does not empty the store
    assert KVIndex(block_size=B).store_match(KVIndex(block_size=B).hashes(tokens)) == 0  # not tracked


def test_the_store_tier_forgets_its_oldest_blocks_past_the_cap() -> None:
    index = KVIndex(block_size=B, max_blocks=4, track_store=True)
    older, newer = prompt(0, 2), prompt(100, 3)
    index.apply("a", [stored(older)])
    index.apply("a", [stored(newer)])

    assert index.store_match(index.hashes(newer)) == 3
    assert index.store_match(index.hashes(older)) == 0  # its first block was the oldest: forgotten


class Clock:
    """A clock the tests move by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def provisional_index(**settings: object) -> tuple[KVIndex, Clock]:
    clock = Clock()
    return KVIndex(block_size=B, provisional_ttl_s=10.0, clock=clock, **settings), clock  # type: ignore[arg-type]


def test_a_held_prompt_counts_as_held_until_its_time_to_live_passes() -> None:
    index, clock = provisional_index()
    tokens = prompt(0, 4)
    hashes = index.hashes(tokens)
    assert index.hold("a", hashes) == 4
    assert index.match(hashes) == {"a": 4}
    assert index.match(index.hashes(tokens[: 2 * B] + [9] * B)) == {"a": 2}
    assert index.match(hashes, MEDIUM_CPU) == {}  # a device holding only
    assert (index.provisional(), index.provisional("a"), index.entries()) == (4, 4, 0)
    clock.now = 9.99
    assert index.match(hashes) == {"a": 4}
    clock.now = 10.0
    assert index.match(hashes) == {}  # expired by the lookup itself
    stats = index.stats()
    assert (stats.provisional_entries, stats.expired_provisional, stats.confirmed_provisional) == (0, 4, 0)
    assert stats.blocks_by_medium == {"GPU": 0}  # no phantom holders left
    assert index.hold("a", []) == 0 and index.expire() == 0


def test_expire_ends_due_claims_without_a_lookup() -> None:
    index, clock = provisional_index()
    first, second = index.hashes(prompt(0, 3)), index.hashes(prompt(100, 2))
    index.hold("a", first)
    clock.now = 4.0
    index.hold("b", second)
    clock.now = 10.0
    assert index.expire() == 3
    assert (index.provisional("a"), index.provisional("b")) == (0, 2)
    clock.now = 14.0
    assert index.expire() == 2 and index.provisional() == 0


def test_the_engines_own_events_confirm_held_blocks() -> None:
    index, clock = provisional_index()
    tokens = prompt(0, 4)
    hashes = index.hashes(tokens)
    index.hold("a", hashes)
    event = stored(tokens[: 3 * B])
    index.apply("a", [event])  # blocks 0-2 computed; block 3 not announced (yet)
    assert index.match(hashes) == {"a": 4}
    assert (index.provisional("a"), index.entries("a"), index.stats().confirmed_provisional) == (1, 3, 3)
    clock.now = 10.0
    assert index.match(hashes) == {"a": 3}  # the confirmed ones outlive the TTL; block 3 expired
    assert index.stats().expired_provisional == 1
    index.apply("a", [BlockRemoved(block_hashes=[event.block_hashes[1]])])  # confirmed: ordinary entries
    assert index.match(hashes) == {"a": 1}


def test_other_engines_and_other_media_do_not_confirm_a_claim() -> None:
    index, clock = provisional_index()
    tokens = prompt(0, 2)
    hashes = index.hashes(tokens)
    index.hold("a", hashes)
    index.apply("b", [stored(tokens, salt="b")])
    index.apply("a", [stored(tokens, medium=MEDIUM_CPU)])
    assert index.match(hashes) == {"a": 2, "b": 2}
    assert index.stats().confirmed_provisional == 0
    clock.now = 10.0
    assert index.match(hashes) == {"b": 2}
    assert index.match(hashes, MEDIUM_CPU) == {"a": 2}


def test_blocks_held_by_events_are_not_claimed_and_stay_past_the_ttl() -> None:
    index, clock = provisional_index()
    tokens = prompt(0, 4)
    hashes = index.hashes(tokens)
    event = stored(tokens[: 2 * B])
    index.apply("a", [event])
    assert index.hold("a", hashes) == 2  # blocks 2 and 3
    assert index.match(hashes) == {"a": 4}
    clock.now = 10.0
    assert index.match(hashes) == {"a": 2}
    assert index.stats().expired_provisional == 2
    index.apply("a", [BlockRemoved(block_hashes=event.block_hashes)])
    assert index.match(hashes) == {} and index.stats().blocks_by_medium == {"GPU": 0}


def test_routing_a_prompt_again_renews_its_claims() -> None:
    index, clock = provisional_index()
    tokens = prompt(0, 4)
    hashes = index.hashes(tokens)
    index.hold("a", hashes[:2])
    clock.now = 5.0
    assert index.hold("a", hashes) == 4  # blocks 0-1 claimed anew, 2-3 new
    assert index.provisional("a") == 4
    clock.now = 10.0
    assert index.match(hashes) == {"a": 4}  # the first claim's turn: its blocks belong to the second
    assert index.stats().expired_provisional == 0
    clock.now = 15.0
    assert index.match(hashes) == {}
    assert index.stats().expired_provisional == 4


def test_dropping_an_engine_ends_its_claims_and_old_claims_end_nothing_new() -> None:
    index, clock = provisional_index()
    tokens = prompt(0, 3)
    hashes = index.hashes(tokens)
    index.hold("a", hashes)
    index.hold("b", hashes[:1])
    assert index.drop("a") == 0  # no entries from events; its provisional ones go too
    assert index.match(hashes) == {"b": 1} and index.provisional() == 1
    clock.now = 5.0
    index.hold("a", hashes)
    clock.now = 10.0
    assert index.match(hashes) == {"a": 3}  # the dropped claim's deadline ends nothing of the new one
    index.apply("a", [AllBlocksCleared()])
    assert index.match(hashes) == {} and index.provisional() == 0
    assert index.stats().blocks_by_medium == {"GPU": 0}


def test_a_removed_engines_claims_go_and_its_id_comes_back_clean() -> None:
    index, clock = provisional_index()
    tokens = prompt(0, 2)
    hashes = index.hashes(tokens)
    index.hold("a", hashes)  # id 0
    index.remove("a")
    assert index.match(hashes) == {} and index.engines() == []
    index.hold("c", hashes[:1])  # takes id 0
    clock.now = 10.0
    assert index.expire() == 1  # c's claim; a's queued claim ended nothing
    assert index.provisional() == 0 and index.stats().blocks_by_medium == {"GPU": 0}


def test_the_cap_ends_the_oldest_claims_first() -> None:
    index, clock = provisional_index(max_provisional=6)
    older, newer = index.hashes(prompt(0, 4)), index.hashes(prompt(100, 3))
    index.hold("a", older)
    index.hold("b", newer)  # 7 claims > 6: a's claim of 4 ends
    assert index.match(older) == {} and index.match(newer) == {"b": 3}
    stats = index.stats()
    assert (stats.provisional_entries, stats.expired_provisional) == (3, 4)
    assert index.hold("c", index.hashes(prompt(200, 7))) == 7  # alone over the cap: ends itself
    assert index.provisional() == 0 and index.match(newer) == {}
    assert KVIndex(block_size=B, max_provisional=0).hold("a", older) == 0  # off


def test_a_claim_renewed_counts_again_for_the_cap() -> None:
    index, clock = provisional_index(max_provisional=5)
    hashes = index.hashes(prompt(0, 3))
    index.hold("a", hashes[:2])
    index.hold("a", hashes)  # 2 + 3 claims: within the cap
    assert index.provisional() == 3 and index.stats().expired_provisional == 0
    index.hold("a", hashes[:1])  # 6: the first claim is ended, but its blocks belong to the second
    assert index.match(hashes) == {"a": 3} and index.stats().expired_provisional == 0


def test_bad_provisional_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="provisional_ttl_s=0"):
        KVIndex(block_size=B, provisional_ttl_s=0)
    with pytest.raises(ValueError, match="max_provisional=-1"):
        KVIndex(block_size=B, max_provisional=-1)
