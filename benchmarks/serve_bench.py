"""Load generation with ``vllm bench serve`` (its own process) against an OpenAI endpoint,
and the figures we report from its ``--save-result`` JSON. Every run counts goodput:
requests per second that met both service levels (``--goodput ttft:<ms> tpot:<ms>``,
the deployment's defaults ``SLO_TTFT_MS`` and ``SLO_ITL_MS`` unless the caller gives others)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from common.config import SloConfig

VLLM_CLI = Path(sys.executable).with_name("vllm")


@dataclass(frozen=True)
class ServeResult:
    completed: int
    failed: int
    duration_s: float
    request_throughput: float  # req/s
    output_throughput: float  # output tok/s
    total_token_throughput: float  # prompt + output tok/s
    mean_ttft_ms: float
    median_ttft_ms: float
    p99_ttft_ms: float
    mean_tpot_ms: float
    median_tpot_ms: float
    p99_tpot_ms: float
    mean_itl_ms: float
    median_itl_ms: float
    p99_itl_ms: float
    mean_e2el_ms: float
    median_e2el_ms: float
    p99_e2el_ms: float
    request_goodput: float = 0.0  # req/s that met both service levels

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def parse_result(saved: dict[str, object]) -> ServeResult:
    """The figures of one ``vllm bench serve --save-result`` JSON (metrics it could not
    compute, e.g. TPOT with one output token, are 0)."""

    def number(key: str) -> float:
        value = saved.get(key)
        return float(value) if isinstance(value, int | float) else 0.0

    completed = int(number("completed"))
    return ServeResult(
        completed=completed,
        failed=int(number("failed")) if "failed" in saved else int(number("num_prompts")) - completed,
        duration_s=number("duration"),
        **{name: number(name) for name in ServeResult.__dataclass_fields__ if name not in ("completed", "failed", "duration_s")},
    )


def serve_bench(
    base_url: str, model: str, tokenizer: Path, dataset: Path, num_prompts: int, concurrency: int, output_tokens: int,
    slo: SloConfig | None = None, request_rate: float | None = None,
) -> ServeResult:
    """Send ``dataset`` (custom JSONL) to ``base_url`` with at most ``concurrency`` requests
    in flight (``request_rate``: that many a second, Poisson; None: as fast as allowed)."""
    slo = slo or SloConfig()
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as results:
        command = [
            str(VLLM_CLI), "bench", "serve",
            "--backend", "vllm", "--base-url", base_url, "--endpoint", "/v1/completions",
            "--model", model, "--tokenizer", str(tokenizer),
            "--dataset-name", "custom", "--dataset-path", str(dataset), "--skip-chat-template",
            "--custom-output-len", str(output_tokens), "--ignore-eos",
            "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency), "--request-rate", "inf" if request_rate is None else str(request_rate),
            "--temperature", "0", "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
            "--disable-tqdm", "--save-result", "--result-dir", results, "--result-filename", "result.json",
            "--goodput", f"ttft:{slo.ttft_ms:g}", f"tpot:{slo.itl_ms:g}",
        ]  # fmt: skip
        run = subprocess.run(command, capture_output=True, text=True, timeout=3600)
        saved = Path(results) / "result.json"
        if run.returncode != 0 or not saved.is_file():
            raise RuntimeError(f"vllm bench serve failed (rc {run.returncode}): {(run.stderr or run.stdout)[-2000:]}")
        return parse_result(json.loads(saved.read_text()))
