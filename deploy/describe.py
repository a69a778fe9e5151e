"""What a deployment's configuration says, in lines an operator reads when it starts."""

from __future__ import annotations

from collections.abc import Sequence

from common.config import ServiceConfig


def describe(config: ServiceConfig) -> Sequence[str]:
    """Lines an operator reads at start: what will be deployed."""
    mode = "PD-disaggregated" if config.disaggregated else "PD-colocated"
    if config.adaptive_roles:
        mode = "adaptive roles"
    lines = [f"mode: {mode}, accelerator: {config.accelerator.value}, devices: {','.join(map(str, config.devices))}"]
    if config.adaptive_roles:
        start = (f"{config.prefill_instances} prefill + {config.decode_instances} decode" if config.decode_instances
                 else "all colocated")  # fmt: skip
        lines.append(f"engines: {config.prefill_instances + config.decode_instances} x TP{config.prefill_tp}, each "
                     f"serving whole requests, prefill or decode legs; starting as {start}; the planner moves "
                     "them to meet the service levels")  # fmt: skip
    else:
        lines.append(f"prefill: {config.prefill_instances} instance(s) x TP{config.prefill_tp} x DP{config.prefill_dp}")
    if config.disaggregated:
        lines.append(f"decode: {config.decode_instances} instance(s) x TP{config.decode_tp} x DP{config.decode_dp}")
    if max(config.prefill_dp, config.decode_dp) > 1:
        lines.append("data parallel: " + ("vLLM's own (one engine per node of an instance, --headless off the "
                                          "rank-0 node)" if config.dp_mode == "vllm" else "one vLLM server per rank"))
    lines.append(f"model: {config.model_path or 'embedded random-weight Qwen2 (gibberish by design)'}")
    lines.append(f"routing: {config.routing_policy} (decode by least outstanding requests)")
    if config.api_key:
        lines.append("API key: required on every port, door and engines (Authorization: Bearer); /health open"
                     + (", /metrics open (METRICS_PUBLIC=1)" if config.metrics_public else ""))  # fmt: skip
    else:
        lines.append("API key: off (door and engines open)")
    lines.append(
        f"overload: {config.admission.max_in_flight_per_engine} requests in flight per serving engine, "
        f"{config.admission.queue_size} waiting at most {config.admission.queue_timeout_s:.0f} s, then 429"
    )
    if config.simulated_nodes:
        lines.append(f"simulated nodes: {config.simulated_nodes} at "
                     f"{', '.join(config.datasystem.node_hosts)} (one data system worker each)")  # fmt: skip
    workers = (f"the data system worker on each engine's node (port {config.datasystem.node_worker_port})"
               if config.cluster_mode else
               f"{len(config.datasystem.addresses)} data system worker(s) at {', '.join(config.datasystem.addresses)}")  # fmt: skip
    lines.append(
        f"KV store: {workers}, "
        f"prefix reuse {'on' if config.using_prefix_connector else 'off'}, TTL {config.connector.ttl_s or 'none'} s"
    )
    lines.append(f"service levels: TTFT <= {config.slo.ttft_ms:g} ms, inter-token latency <= {config.slo.itl_ms:g} ms "
                 "(requests meeting both: goodput)")
    lines.append(f"endpoint: http://{config.server_ip}:{config.server_port}")
    return lines
