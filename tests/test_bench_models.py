"""The serving benchmarks' model options: a benchmark model by name, or a real model
folder; the KV bytes per token that size their data system memory."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from benchmarks.models import BenchModel, add_model_options, bench_model
from deploy.embedded_model import BENCH_MODELS


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_model_options(parser)
    return parser.parse_args(list(argv))


def test_kv_bytes_per_token_of_each_benchmark_model() -> None:
    sizes = {name: BenchModel(Path("/nowhere"), folder, config).kv_bytes_per_token for name, (folder, config) in BENCH_MODELS.items()}
    assert sizes == {"93m": 12 * 1024, "365m": 32 * 1024}  # layers x K,V x 4 heads x 64 x bf16


def test_kv_bytes_per_token_without_head_dim_or_kv_heads() -> None:
    config = {"num_hidden_layers": 2, "num_attention_heads": 8, "hidden_size": 512, "torch_dtype": "float32"}
    assert BenchModel(Path("/nowhere"), "x", config).kv_bytes_per_token == 2 * 2 * 8 * 64 * 4


def test_a_model_folder_is_used_as_given(tmp_path: Path) -> None:
    config = {"num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "hidden_size": 64}
    (tmp_path / "config.json").write_text(json.dumps(config))

    model = bench_model(_parse("--model-path", str(tmp_path)))

    assert (model.path, model.name, model.config) == (tmp_path.resolve(), tmp_path.name, config)


def test_a_folder_without_config_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as refused:
        bench_model(_parse("--model-path", str(tmp_path)))
    assert str(refused.value) == f"--model-path {tmp_path}: no config.json there; point it at a Hugging Face model folder"


def test_an_unknown_benchmark_model_is_refused() -> None:
    with pytest.raises(SystemExit):
        _parse("--model", "7b")
    assert _parse().model == "93m" and _parse().model_path is None
