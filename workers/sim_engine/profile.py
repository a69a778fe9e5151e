"""The cost model of a simulated engine, and its profiles (JSON files).

One scheduler step of a continuous-batching engine (vLLM V1: decodes and prefill chunks
in one batch) takes

    step_s = base_s + per_token_s * T + per_attention_s * A + per_context_s * C + per_sequence_s * S

- T: tokens computed in the step (each decode's one, each prefill chunk's);
- A: prefill attention, in thousands of token pairs: a chunk of ``n`` new tokens after
  ``c`` tokens already in the cache computes ``n * (c + n / 2)`` pairs;
- C: decode attention, in thousands of context tokens read (a decode after ``c``
  tokens reads ``c + 1``): memory-bound, so priced apart from A;
- S: sequences in the step.

A request's first token also waits ``request_overhead_s`` (the API server: parsing,
tokenizing, detokenizing), and a decode leg that loads a prefill's KV waits
``load_base_s + load_per_token_s * tokens`` before it is scheduled (the connector's
load, off the step loop as in vLLM). ``calibrate`` fits the step coefficients to a real
engine (benchmarks/calibrate.py); a profile also says where its figures came from.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
DEFAULT_PROFILE = "cpu-93m-float32"


@dataclass(frozen=True)
class CostProfile:
    name: str
    source: str  # how the figures were obtained: the command and machine, or the public figures used
    base_s: float
    per_token_s: float
    per_attention_s: float  # prefill: per thousand token pairs
    per_context_s: float  # decode: per thousand context tokens read
    per_sequence_s: float
    request_overhead_s: float
    load_base_s: float
    load_per_token_s: float
    # The engine's scheduler defaults (its flags override them): vLLM 0.32's API server on
    # CPU takes 2048 tokens a step and 128 sequences, on an H100 8192 and 1024.
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 128
    block_size: int = 128
    kv_cache_tokens: int = 0  # KV cache capacity; 0: VLLM_CPU_KVCACHE_SPACE GiB over the model's bytes per token

    def step_s(self, tokens: int, attention_pairs: float, context_tokens: float, sequences: int) -> float:
        return (self.base_s + self.per_token_s * tokens + self.per_attention_s * attention_pairs / 1000.0
                + self.per_context_s * context_tokens / 1000.0 + self.per_sequence_s * sequences)  # fmt: skip

    def load_s(self, tokens: int) -> float:
        return self.load_base_s + self.load_per_token_s * tokens

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> CostProfile:
        names = {field.name for field in fields(cls)}
        required = {field.name for field in fields(cls) if field.default is MISSING}
        missing = required - data.keys()
        if missing:
            raise ValueError(f"profile lacks {', '.join(sorted(missing))}")
        values = {name: data[name] for name in names if name in data}
        for name, value in values.items():
            if name not in ("name", "source") and (not isinstance(value, int | float) or value < 0):
                raise ValueError(f"profile field {name}={value!r}: must be a number >= 0")
        return cls(**values)  # type: ignore[arg-type]


def profile_path(name_or_path: str) -> Path:
    """A shipped profile's file (``cpu-93m-float32``) or a path to one."""
    path = Path(name_or_path)
    if path.suffix == ".json" or "/" in name_or_path:
        return path
    return PROFILES_DIR / f"{name_or_path}.json"


def shipped_profiles() -> list[str]:
    return sorted(path.stem for path in PROFILES_DIR.glob("*.json"))


def load_profile(name_or_path: str) -> CostProfile:
    path = profile_path(name_or_path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"no simulated engine profile {name_or_path!r}: give a file or one of "
                         f"{', '.join(shipped_profiles())}") from None  # fmt: skip
    except json.JSONDecodeError as exc:
        raise ValueError(f"simulated engine profile {path}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"simulated engine profile {path}: must be a JSON object")
    try:
        return CostProfile.from_dict(data)
    except ValueError as exc:
        raise ValueError(f"simulated engine profile {path}: {exc}") from None
