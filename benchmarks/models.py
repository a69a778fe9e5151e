"""Which model a serving benchmark deploys: one of the random-weight benchmark models
(``--model 93m``, the default on CPU; ``--model 365m`` for accelerators) or a real model
folder (``--model-path``), so the same experiment runs on real hardware."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

from deploy.embedded_model import BENCH_MODELS, ensure_embedded_model
from testkit.helpers import PROJECT_ROOT

MODEL_CACHE = PROJECT_ROOT / ".cache" / "models"
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class BenchModel:
    path: Path
    name: str  # the benchmark model's name, or the folder's
    config: dict[str, object]  # its config.json

    @property
    def kv_bytes_per_token(self) -> int:
        """KV cache bytes one token takes across all layers (full attention assumed)."""
        config = self.config
        layers = int(config["num_hidden_layers"])  # type: ignore[call-overload]
        heads = int(config.get("num_key_value_heads") or config["num_attention_heads"])  # type: ignore[call-overload]
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // int(config["num_attention_heads"]))  # type: ignore[call-overload]
        return 2 * layers * heads * head_dim * _DTYPE_BYTES.get(str(config.get("torch_dtype", "bfloat16")), 2)


def store_mib(tokens: float, kv_bytes_per_token: int, least_mib: int) -> int:
    """Data system shared memory, in MiB, for the KV of ``tokens`` prompt tokens twice over
    (rounded up to 256 MiB, at least ``least_mib``): handed-over blocks stay until
    KV_TTL_S ends them, and a full store refuses saves (the decode then recomputes)."""
    return max(least_mib, 256 * math.ceil(2 * tokens * kv_bytes_per_token / 2**20 / 256))


def add_model_options(parser: argparse.ArgumentParser) -> None:
    choices = ", ".join(BENCH_MODELS)
    parser.add_argument("--model", default="93m", choices=list(BENCH_MODELS),
                        help=f"random-weight benchmark model: {choices} (default 93m)")  # fmt: skip
    parser.add_argument("--model-path", type=Path, default=None,
                        help="a model folder (with config.json) to deploy instead of a benchmark model")  # fmt: skip


def bench_model(args: argparse.Namespace) -> BenchModel:
    """The model the options name, built first if it is a benchmark model not built yet."""
    if args.model_path is not None:
        config_file = args.model_path / "config.json"
        if not config_file.is_file():
            raise SystemExit(f"--model-path {args.model_path}: no config.json there; point it at a Hugging Face model folder")
        return BenchModel(args.model_path.resolve(), args.model_path.name, json.loads(config_file.read_text()))
    name, config = BENCH_MODELS[args.model]
    path = ensure_embedded_model(MODEL_CACHE, name, config)
    return BenchModel(path, name, json.loads((path / "config.json").read_text()))
