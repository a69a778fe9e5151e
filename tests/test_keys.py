"""Content-addressed, layout-safe block keys."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from patch.yuanrong_connector.keys import (
    KVLayout,
    block_key,
    block_keys,
    chain_root,
    chained_block_hashes,
    model_identity,
    model_options,
    tail_block_hash,
)  # fmt: skip

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


def _engine_layout(model: str, dtype: str = "float32", cache_dtype: str = "auto", **options: object) -> KVLayout:
    """The layout a real vLLM engine of these settings computes keys with."""
    from vllm.config import CacheConfig, DeviceConfig, ModelConfig, VllmConfig

    from patch.yuanrong_connector.settings import layout_of

    model_config = ModelConfig(model=model, max_model_len=1024, dtype=dtype, **options)  # type: ignore[arg-type]
    return layout_of(VllmConfig(model_config=model_config, cache_config=CacheConfig(block_size=128, cache_dtype=cache_dtype),
                                device_config=DeviceConfig("cpu")))  # fmt: skip


def test_engine_options_that_change_weights_or_compute_change_keys() -> None:
    """Two engines of one model folder whose options change the weights or the KV they
    compute never share blocks: the compute dtype (also under one fp8 KV-cache dtype),
    --quantization, --revision, --hf-overrides."""
    from deploy.embedded_model import ensure_embedded_model
    from testkit.helpers import PROJECT_ROOT

    model = str(ensure_embedded_model(PROJECT_ROOT / ".cache" / "models"))
    plain = _engine_layout(model)
    variants = {
        "bfloat16": _engine_layout(model, dtype="bfloat16"),
        "fp8 cache, float32": _engine_layout(model, cache_dtype="fp8"),
        "fp8 cache, bfloat16": _engine_layout(model, dtype="bfloat16", cache_dtype="fp8"),
        "quantization fp8": _engine_layout(model, dtype="bfloat16", quantization="fp8"),
        "revision": _engine_layout(model, revision="v2"),
        "hf-overrides": _engine_layout(model, hf_overrides={"rope_theta": 5000.0}),
    }
    assert _engine_layout(model).fingerprint() == plain.fingerprint()  # the same settings: the same keys
    fingerprints = {name: layout.fingerprint() for name, layout in variants.items()}
    assert len({plain.fingerprint(), *fingerprints.values()}) == 1 + len(variants), fingerprints
    assert variants["quantization fp8"].fingerprint() != variants["bfloat16"].fingerprint()


def test_model_identity_covers_the_weight_index(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 64)
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"\0" * 64)
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}')
    before = model_identity(str(tmp_path))
    index.write_text('{"weight_map": {"a": "model-00002-of-00002.safetensors", "b": "model-00001-of-00002.safetensors"}}')
    assert model_identity(str(tmp_path)) != before  # the same files, tensors found elsewhere


def test_model_options_name_a_callable_override_by_its_name_not_its_address() -> None:
    def override(config: object) -> object:
        return config

    assert model_options("torch.float32", hf_overrides=override) == model_options("torch.float32", hf_overrides=override)
    assert "test_model_options_name_a_callable_override" in model_options("torch.float32", hf_overrides=override)


def test_a_partial_last_block_has_a_key_of_its_tokens_only() -> None:
    tokens = list(range(300))  # two full blocks of 128 and a 44-token tail
    full = chained_block_hashes(tokens, 128)
    tail = tail_block_hash(tokens, 128, full)
    assert tail is not None and tail not in full
    assert tail_block_hash(tokens[:256], 128, full) is None  # on a block boundary: no tail
    assert tail_block_hash(list(tokens), 128, full) == tail  # the same tokens: the same key
    assert tail_block_hash(tokens[:299], 128, full) != tail  # a shorter tail
    assert tail_block_hash([*tokens[:299], 7], 128, full) != tail  # another last token
    other_prefix = [5, *tokens[1:]]
    assert tail_block_hash(other_prefix, 128, chained_block_hashes(other_prefix, 128)) != tail  # another prefix
    # A prompt shorter than a block chains from its root (a salt or an adapter changes it).
    assert tail_block_hash(tokens[:9], 128, []) != tail_block_hash(tokens[:9], 128, [], chain_root(cache_salt="s"))
    # A tail's key is never a full block's, even of the same tokens padded to a block.
    assert tail_block_hash(tokens[:128 + 5], 128, full[:1]) not in chained_block_hashes(tokens, 128)
