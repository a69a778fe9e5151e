"""What the front door sends to each leg of a PD request."""

from __future__ import annotations

from door.legs import decode_request, prefill_request


def test_prefill_leg_computes_only_the_prompt() -> None:
    client = {"model": "m", "prompt": "hi", "max_tokens": 50, "stream": True, "stream_options": {"include_usage": True}}
    leg = prefill_request(client)
    assert leg["max_tokens"] == 1 and leg["stream"] is False
    assert leg["kv_transfer_params"] == {"do_remote_decode": True}
    assert "stream_options" not in leg
    assert client["max_tokens"] == 50 and client["stream"] is True  # the client's request is untouched


def test_decode_leg_is_the_client_request_plus_prefill_params() -> None:
    client = {"model": "m", "prompt": "hi", "max_tokens": 50}
    params = {"do_remote_prefill": True}
    leg = decode_request(client, params)
    assert leg == {**client, "kv_transfer_params": params}
    assert "kv_transfer_params" not in client
