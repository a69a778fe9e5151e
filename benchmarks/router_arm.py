"""vLLM's Rust router (``vllm-router``) in front of a deployment's engines, in place of our
front door: the arm that the serving benchmarks (seed002, prefix_affinity) compare the
door's routing with, on the same engines.

The deployment is made as for any other arm (state.json names its engines); the router
is started in its own process group, pointed at those engines, and stopped (SIGTERM, a
wait, SIGKILL) when the block ends. Its mode follows the deployment: PD mode
(``--vllm-pd-disaggregation``) over the one prefill and the one decode engine, or its
regular mode (``--worker-urls``) over the colocated engines. Installing the router is
``benchmarks.frontdoor_overhead.installed_router``'s job.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

from benchmarks.frontdoor_overhead import parties, router_argv, router_argv_regular
from deploy.state import DeploymentState
from testkit.helpers import free_port

ARM_PREFIX = "vllm-router:"  # an arm through the router is named vllm-router:<its policy>

Engines = Sequence[Mapping[str, object]]  # state.json's engine list: the Controller's EngineInfo dicts


def arm_name(policy: str) -> str:
    return f"{ARM_PREFIX}{policy}"


def engine_urls(engines: Engines, role: str) -> list[str]:
    """The base URLs of the engines of ``role`` in state.json's engine list, in its order."""
    return [f"http://{engine['host']}:{engine['port']}" for engine in engines if engine.get("role") == role]


def engine_url(engines: Engines, role: str) -> str:
    """The one engine of ``role`` in state.json's engine list (name, role, host, port, ...),
    as a base URL."""
    found = engine_urls(engines, role)
    if len(found) != 1:
        raise RuntimeError(f"expected exactly one {role} engine in the deployment's state.json, found {len(found)}: "
                           f"{[engine.get('name') for engine in engines]}")  # fmt: skip
    return found[0]


def router_argv_for(binary: Path, engines: Engines, policy: str, port: int, prometheus_port: int) -> list[str]:
    """The router's command line for this deployment: PD mode over its prefill and decode
    engine (exactly one of each) if it has any, else regular mode over its colocated ones."""
    if any(engine.get("role") in ("prefill", "decode") for engine in engines):
        prefill, decode = engine_url(engines, "prefill"), engine_url(engines, "decode")
        return router_argv(binary, port, prefill, decode, policy, prometheus_port)
    colocated = engine_urls(engines, "colocated")
    if not colocated:
        raise RuntimeError(f"no prefill, decode or colocated engine in the deployment's state.json: "
                           f"{[(engine.get('name'), engine.get('role')) for engine in engines]}")  # fmt: skip
    return router_argv_regular(binary, port, colocated, policy, prometheus_port)


@contextmanager
def router_in_front(router: Path, state: DeploymentState, log_dir: Path, policy: str) -> Iterator[str]:
    """vllm-router (``policy``) in front of the deployment's engines, in its own process
    group, its log in ``log_dir``; yields its base URL; stopped when the block ends."""
    port = free_port()
    argv = router_argv_for(router, state.engines, policy, port, free_port())
    mode = "PD" if "--vllm-pd-disaggregation" in argv else "regular"
    engines = ", ".join(f"{engine.get('role')} {engine.get('host')}:{engine.get('port')}" for engine in state.engines)
    with parties(log_dir) as started:
        party = started.start(f"vllm-router-{policy}", argv, port)
        started.wait_ready(party)
        print(f"  vllm-router ({policy}, {mode} mode) pid {party.pid} at {party.url} -> {engines}; log {party.log}",
              flush=True)  # fmt: skip
        yield party.url


def load_through(router: Path | None, state: DeploymentState, log_dir: Path, policy: str | None) -> AbstractContextManager[str]:
    """Where an arm's load goes: our door (``policy`` None: the deployment's endpoint), or
    vllm-router with ``policy`` in front of the deployment's engines."""
    if policy is None:
        return nullcontext(state.endpoint)
    if router is None:
        raise ValueError(f"an arm through vllm-router ({policy}) needs the router's executable")
    return router_in_front(router, state, log_dir, policy)
