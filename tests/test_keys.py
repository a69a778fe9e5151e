"""Content-addressed, layout-safe block keys."""

from __future__ import annotations

import dataclasses
import re

from patch.yuanrong_connector.keys import KVLayout, block_key, block_keys, chained_block_hashes

LAYOUT = KVLayout("m", "torch.bfloat16", 128, 2, 64, 2, 1)


def test_hashes_cover_full_blocks_and_name_the_whole_prefix() -> None:
    tokens = list(range(300))
    hashes = chained_block_hashes(tokens, 128)
    assert len(hashes) == 2
    assert chained_block_hashes(tokens[:256], 128) == hashes
    # same second block, different first block: a different key for the second block
    other = chained_block_hashes([7] * 128 + tokens[128:256], 128)
    assert other[1] != hashes[1]


def test_layout_changes_change_keys() -> None:
    changed = [dataclasses.replace(LAYOUT, **{name: value}) for name, value in
               [("block_size", 64), ("dtype", "torch.float16"), ("tp_size", 2), ("num_kv_heads", 4), ("model", "n")]]  # fmt: skip
    fingerprints = {LAYOUT.fingerprint(), *(layout.fingerprint() for layout in changed)}
    assert len(fingerprints) == 1 + len(changed)
    assert block_key(LAYOUT.fingerprint(), 0, "ab") != block_key(LAYOUT.fingerprint(), 1, "ab")



def test_equal_tp_keys_keep_their_shape() -> None:
    # <16 hex digits of layout>_<rank>_<40 hex digits of chain>, as before the TP-independent layout
    tp2 = dataclasses.replace(LAYOUT, tp_size=2)
    keys = block_keys(tp2, (0, 1), chained_block_hashes(list(range(256)), 128))
    assert len(keys) == 4 and all(re.fullmatch(r"[0-9a-f]{16}_[01]_[0-9a-f]{40}", key) for key in keys)
    assert keys[:2] == [block_key(tp2.fingerprint(), rank, keys[0].rsplit("_", 1)[1]) for rank in (0, 1)]  # block-major


def test_engines_of_other_tp_sizes_compute_each_others_shard_keys() -> None:
    hashes = chained_block_hashes(list(range(384)), 128)
    tp1, tp2 = LAYOUT, dataclasses.replace(LAYOUT, tp_size=2)
    written_by_tp2 = [block_key(tp2.fingerprint(), rank, h) for h in hashes for rank in (0, 1)]  # what its ranks save
    assert block_keys(tp1.with_tp(2), (0, 1), hashes) == written_by_tp2
    assert block_keys(tp2.with_tp(1), (0,), hashes) == [block_key(tp1.fingerprint(), 0, h) for h in hashes]
    assert tp1.with_tp(2) == tp2 and tp1.fingerprint() != tp2.fingerprint()  # TP still tells the values apart
