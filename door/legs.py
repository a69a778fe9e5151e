"""A request's engine legs: the bodies sent to the prefill and the decode engine, and
what every engine call of one request shares."""

from __future__ import annotations

from typing import Any

from door.http_server import Exchange

REQUEST_ID_HEADER = "X-Request-Id"
JSON_TYPE = "application/json"


def prefill_request(body: dict[str, Any]) -> dict[str, Any]:
    """The prefill leg: the client's request computing only the prompt's KV."""
    leg = {key: value for key, value in body.items() if key not in ("stream_options",)}
    leg.update(max_tokens=1, stream=False, n=1, kv_transfer_params={"do_remote_decode": True})
    if "max_completion_tokens" in leg:
        leg["max_completion_tokens"] = 1
    if "min_tokens" in leg:
        leg["min_tokens"] = min(int(leg["min_tokens"] or 0), 1)
    return leg


def decode_request(body: dict[str, Any], kv_transfer_params: dict[str, Any] | None) -> dict[str, Any]:
    """The decode leg: the client's request plus what the prefill handed over."""
    leg = dict(body)
    if kv_transfer_params:
        leg["kv_transfer_params"] = kv_transfer_params
    return leg


def single_prompt(body: dict[str, Any]) -> bool:
    """PD handoff carries one prompt; a batch is computed by the decode engine itself."""
    if "messages" in body:
        return True
    prompt = body.get("prompt")
    return isinstance(prompt, str) or (isinstance(prompt, list) and (len(prompt) == 1 or all(isinstance(t, int) for t in prompt)))


class Leg:
    """What every engine call of one request shares."""

    __slots__ = ("exchange", "path", "endpoint", "request_id", "key", "started", "headers", "engine_headers")

    def __init__(self, exchange: Exchange, path: str, endpoint: str, request_id: str, key: bytes, started: float) -> None:
        self.exchange, self.path, self.endpoint = exchange, path, endpoint
        self.request_id, self.key, self.started = request_id, key, started
        self.headers = ((REQUEST_ID_HEADER, request_id),)  # on the client's answer
        self.engine_headers = {REQUEST_ID_HEADER: request_id, "Content-Type": JSON_TYPE}
