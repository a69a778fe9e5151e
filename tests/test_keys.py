"""Content-addressed, layout-safe block keys."""

from __future__ import annotations

import dataclasses

from patch.yuanrong_connector.keys import KVLayout, block_key, chained_block_hashes

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

