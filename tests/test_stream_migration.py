"""The stream follower of request migration (controller/migration.py) on constructed
vLLM completion events: what it learns, what the client is sent, the continuation."""

from __future__ import annotations

import json

from controller.migration import StreamFollower, migratable, with_token_ids


def _event(completion_id: str, text: str, token_ids: list[int], prompt_ids: list[int] | None = None,
           finish: str | None = None) -> bytes:  # fmt: skip
    choice: dict[str, object] = {"index": 0, "text": text, "finish_reason": finish, "token_ids": token_ids}
    if prompt_ids is not None:
        choice["prompt_token_ids"] = prompt_ids
    return b"data: " + json.dumps({"id": completion_id, "object": "text_completion", "choices": [choice]}).encode() + b"\n\n"


def _texts(relayed: bytes) -> list[tuple[str, str, dict[str, object]]]:
    events = [e for e in relayed.split(b"\n\n") if e.startswith(b"data: {")]
    return [(d["id"], d["choices"][0]["text"], d["choices"][0]) for d in (json.loads(e[6:]) for e in events)]


def test_which_requests_can_be_followed() -> None:
    assert migratable("completions", {"prompt": "hi", "stream": True, "max_tokens": 5})
    assert migratable("completions", {"prompt": [1, 2, 3], "stream": True})
    assert not migratable("chat/completions", {"messages": [], "stream": True})
    assert not migratable("completions", {"prompt": "hi", "stream": False})
    assert not migratable("completions", {"prompt": ["a", "b"], "stream": True})  # several prompts
    assert not migratable("completions", {"prompt": "hi", "stream": True, "n": 2})
    assert not migratable("completions", {"prompt": "hi", "stream": True, "echo": True})
    assert with_token_ids({"prompt": "hi"}) == {"prompt": "hi", "return_token_ids": True}


def test_follower_learns_the_tokens_and_strips_the_fields_the_client_did_not_ask_for() -> None:
    body = {"prompt": "hi", "stream": True, "max_tokens": 10, "kv_transfer_params": {"x": 1}}
    follower = StreamFollower(body)
    first = _event("cmpl-a", "A", [7], prompt_ids=[1, 2, 3])
    second = _event("cmpl-a", "B", [8, 9])
    relayed = follower.feed(first + second[:20])  # an event cut in two by the network
    relayed += follower.feed(second[20:])
    assert [(i, t) for i, t, _ in _texts(relayed)] == [("cmpl-a", "A"), ("cmpl-a", "B")]
    assert all("token_ids" not in c and "prompt_token_ids" not in c for _, _, c in _texts(relayed))
    assert follower.prompt_token_ids == [1, 2, 3] and follower.generated == [7, 8, 9] and not follower.finished
    assert follower.continuation() == {
        "prompt": [1, 2, 3, 7, 8, 9], "stream": True, "max_tokens": 7, "return_token_ids": True
    }  # fmt: skip
    # The continuation's events carry another id: the client keeps the first one.
    relayed = follower.feed(_event("cmpl-b", "C", [10], prompt_ids=[1, 2, 3, 7, 8, 9]) + _event("cmpl-b", "", [], finish="length"))
    assert [(i, t) for i, t, _ in _texts(relayed)] == [("cmpl-a", "C"), ("cmpl-a", "")]
    assert follower.prompt_token_ids == [1, 2, 3] and follower.generated == [7, 8, 9, 10] and follower.finished
    assert not follower.done_sent
    assert follower.feed(b"data: [DONE]\n\n") == b"data: [DONE]\n\n" and follower.done_sent


def test_a_client_that_asked_for_token_ids_gets_them_unchanged() -> None:
    follower = StreamFollower({"prompt": "hi", "stream": True, "return_token_ids": True})
    event = _event("cmpl-a", "A", [7], prompt_ids=[1])
    assert follower.feed(event) == event


def test_no_continuation_without_the_prompt_ids_or_with_nothing_left() -> None:
    follower = StreamFollower({"prompt": "hi", "stream": True, "max_tokens": 2})
    follower.feed(_event("cmpl-a", "A", [7]))
    assert follower.continuation() is None  # the prompt's ids never came
    follower.feed(_event("cmpl-a", "B", [8], prompt_ids=[1]))
    assert follower.continuation() is None  # max_tokens reached


def test_a_continuation_starts_clean_after_a_partial_event() -> None:
    """The broken engine's last event arrived in part: it is dropped, not glued to the next
    engine's first event (which gave the client invalid JSON with the continuation's id
    and prompt ids, and left its first token uncounted)."""
    follower = StreamFollower({"prompt": "hi", "stream": True, "max_tokens": 10})
    relayed = follower.feed(_event("cmpl-a", "A", [7], prompt_ids=[1, 2]) + _event("cmpl-a", "lo", [8])[:30])
    follower.restart()  # the door opened the continuation's stream
    relayed += follower.feed(_event("cmpl-b", "B", [9], prompt_ids=[1, 2, 7]) + _event("cmpl-b", "", [], finish="length"))
    events = [e for e in relayed.split(b"\n\n") if e]
    assert all(e.startswith(b"data: {") for e in events)
    parsed = [json.loads(e[6:]) for e in events]  # every event valid JSON
    assert [(d["id"], d["choices"][0]["text"]) for d in parsed] == [("cmpl-a", "A"), ("cmpl-a", "B"), ("cmpl-a", "")]
    assert all("prompt_token_ids" not in d["choices"][0] and "token_ids" not in d["choices"][0] for d in parsed)
    assert follower.generated == [7, 9]  # the continuation's first token counted: a second migration goes on from it


def test_a_server_error_event_is_a_cut_not_an_end() -> None:
    """What vLLM's API server sends when its EngineCore dies: an error event, then [DONE]."""
    follower = StreamFollower({"prompt": "hi", "stream": True, "max_tokens": 10, "return_token_ids": True})
    error = b'data: {"error": {"message": "EngineCore encountered an issue", "type": "InternalServerError", "code": 500}}\n\n'
    relayed = follower.feed(_event("cmpl-a", "A", [7], prompt_ids=[1]) + error + b"data: [DONE]\n\n")
    assert relayed == _event("cmpl-a", "A", [7], prompt_ids=[1])  # neither the error nor [DONE] reaches the client
    assert not follower.finished and follower.engine_error == "EngineCore encountered an issue"
    assert follower.continuation() == {"prompt": [1, 7], "stream": True, "max_tokens": 9, "return_token_ids": True}
    follower.restart()
    relayed = follower.feed(_event("cmpl-b", "B", [8], prompt_ids=[1, 7]))
    assert json.loads(relayed[6:])["choices"][0] == {"index": 0, "text": "B", "finish_reason": None, "token_ids": [8]}
    client_error = b'data: {"error": {"message": "bad request", "type": "BadRequestError", "code": 400}}\n\n'
    assert StreamFollower({"prompt": "hi", "stream": True}).feed(client_error) == client_error  # relayed as it is
