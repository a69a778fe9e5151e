"""The embedded default model: a small random-weight Qwen2 with an offline-trained tokenizer.

Built once into the model cache and reused. Its output is gibberish by design: it
exists so the whole service can be deployed and tested on a CPU-only machine with no
model hub. Point MODEL_PATH at a real model folder for real answers.
"""

from __future__ import annotations

import json
import logging
import shutil
import sysconfig
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

MODEL_NAME = "tiny-qwen2-random"
# Bump when anything below changes, so a cached build from older code is not reused.
BUILD_VERSION = 1
VOCAB_SIZE = 4096
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MODEL_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "vocab_size": VOCAB_SIZE,
    "max_position_embeddings": 8192,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.1,  # larger than usual so greedy output varies token to token
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "bos_token_id": 0,
    "eos_token_id": 0,
}
# Standard-library modules whose source is the tokenizer's training text: present on
# every CPython 3.11, so the tokenizer is the same on every machine.
_CORPUS_MODULES = ("argparse.py", "textwrap.py", "difflib.py", "pydoc.py", "inspect.py", "typing.py")


# A ~93M-parameter variant for benchmarks where prefill must take seconds on a CPU
# (12 layers, hidden 768, 4 KV heads of 64: 12 KiB of KV cache per token in bf16).
BENCH_MODEL_NAME = "bench-qwen2-93m-random"
BENCH_MODEL_CONFIG = {
    **MODEL_CONFIG,
    "hidden_size": 768,
    "intermediate_size": 2560,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "initializer_range": 0.02,
}


# A ~365M-parameter variant for accelerators, where the ~93M one computes a few thousand
# tokens too fast for reuse to save anything (32 layers, hidden 1024, 4 KV heads of 64:
# 32 KiB of KV cache per token in bf16).
BENCH_LARGE_MODEL_NAME = "bench-qwen2-365m-random"
BENCH_LARGE_MODEL_CONFIG = {
    **BENCH_MODEL_CONFIG,
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 32,
    "num_attention_heads": 16,
}
# The benchmarks' ``--model`` choices: name -> (folder name, config).
BENCH_MODELS: dict[str, tuple[str, dict[str, object]]] = {
    "93m": (BENCH_MODEL_NAME, BENCH_MODEL_CONFIG),
    "365m": (BENCH_LARGE_MODEL_NAME, BENCH_LARGE_MODEL_CONFIG),
}


def embedded_model_dir(cache_dir: Path, name: str = MODEL_NAME) -> Path:
    return cache_dir / f"{name}-v{BUILD_VERSION}"


def ensure_embedded_model(
    cache_dir: Path, name: str = MODEL_NAME, config: dict[str, object] | None = None
) -> Path:
    """Return the model's folder, building it first if it is not cached."""
    target = embedded_model_dir(cache_dir, name)
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    logger.info("building the random-weight model %s into %s (once, ~15 s)", name, target)
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=cache_dir))
    try:
        _write_tokenizer(staging)
        _write_weights(staging, config or MODEL_CONFIG)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _corpus() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [(stdlib / name).read_text(encoding="utf-8") for name in _CORPUS_MODULES]


def _write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = MODEL_CONFIG["max_position_embeddings"]
    fast.save_pretrained(folder)


def _write_weights(folder: Path, model_config: dict[str, object]) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**{k: v for k, v in model_config.items() if k not in ("architectures", "model_type", "torch_dtype")})
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    generation = {"bos_token_id": 0, "eos_token_id": 0, "do_sample": False}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))


if __name__ == "__main__":
    import sys

    logging.basicConfig(level=logging.INFO)
    print(ensure_embedded_model(Path(sys.argv[1])))
