"""What a default deployment exposes, on real engines, with ``API_KEY`` set: every socket
its processes listen on is on loopback (KV events carry prompts' token ids), and every
HTTP port (the door, each engine) answers 401 without the key, ``/health`` excepted."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from common.processes import read_pid
from testkit.deployment import Deployment, deployed, token_prompt
from testkit.helpers import listening_addresses, pids_matching, process_tree

pytestmark = pytest.mark.e2e

KEY = "e2e-s3cret"
WITH_KEY = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    # The defaults (1P1D, kv_aware routing: engines publish KV events, prefix reuse on).
    with deployed(tmp_path_factory.mktemp("exposure"), API_KEY=KEY) as deployment:
        yield deployment


def _deployment_pids(deployment: Deployment) -> list[int]:
    """The keeper, the deploy process, the engines and the data system worker, with their children."""
    roots = [read_pid(Path(deployment.env["RUN_DIR"]) / "deploy.pid"), deployment.state.pid]
    roots += [int(engine["pid"]) for engine in deployment.state.engines]  # type: ignore[call-overload]
    roots += pids_matching(f"--worker_address={deployment.state.ds_worker_address}")
    return sorted({pid for root in roots if root is not None for pid in process_tree(root)})


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return (mapped or ip).is_loopback


def test_every_listening_socket_is_on_loopback(deployment: Deployment) -> None:
    complete = httpx.post(f"{deployment.url}/v1/completions", headers=WITH_KEY, timeout=120,
                          json={"model": deployment.state.served_model_name, "prompt": token_prompt(300), "max_tokens": 2})  # fmt: skip
    assert complete.status_code == 200, complete.text
    listening = listening_addresses(_deployment_pids(deployment))
    engine_ports = {int(engine["port"]) for engine in deployment.state.engines}  # type: ignore[call-overload]
    assert engine_ports | {int(deployment.env["SERVER_PORT"])} <= {port for _, port in listening}  # the list is whole
    assert {(address, port) for address, port in listening if not _is_loopback(address)} == set()


def test_the_door_follows_kv_events_published_on_loopback(deployment: Deployment) -> None:
    before = _settled_prefill_blocks(deployment)  # earlier requests' blocks, once the door has published them
    body = {"model": deployment.state.served_model_name, "prompt": token_prompt(400), "max_tokens": 2}
    assert httpx.post(f"{deployment.url}/v1/completions", headers=WITH_KEY, json=body, timeout=120).status_code == 200
    deadline = time.monotonic() + 15  # the door publishes its index's size once a second
    while (indexed := _indexed_blocks(deployment)).get("prefill-0", 0) != before + 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert indexed.get("prefill-0", 0) == before + 3, (before, indexed)  # this prompt's 3 full blocks, from its events


def _settled_prefill_blocks(deployment: Deployment) -> float:
    """prefill-0's indexed blocks once two readings 1.2 s apart agree (the door publishes once a second)."""
    last = _indexed_blocks(deployment).get("prefill-0", 0)
    while True:
        time.sleep(1.2)
        now = _indexed_blocks(deployment).get("prefill-0", 0)
        if now == last:
            return now
        last = now


def _indexed_blocks(deployment: Deployment) -> dict[str, float]:
    lines = httpx.get(f"{deployment.url}/metrics", headers=WITH_KEY, timeout=10).text.splitlines()
    return {line.split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("frontdoor_kv_indexed_blocks{")}


@pytest.mark.parametrize("method, path", [("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/tokenize"),
                                          ("GET", "/version"), ("POST", "/v1/completions"), ("GET", "/no-such-path")])  # fmt: skip
def test_every_port_needs_the_key_but_for_health(deployment: Deployment, method: str, path: str) -> None:
    urls = [deployment.url] + [f"http://{e['host']}:{e['port']}" for e in deployment.state.engines]
    body = {"model": deployment.state.served_model_name, "prompt": "x"}
    for url in urls:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            refused = httpx.request(method, f"{url}{path}", headers=headers, json=body, timeout=30)
            assert refused.status_code == 401, (url, path, headers, refused.status_code)
            assert refused.json()["error"]["type"] == "invalid_request_error"
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        if path in ("/v1/models", "/metrics") or (path == "/version" and url != deployment.url):
            assert httpx.get(f"{url}{path}", headers=WITH_KEY, timeout=30).status_code == 200, (url, path)
