"""The stream follower of request migration (door/migration.py) on constructed
vLLM completion and chat events: what it learns, what the client is sent, the
continuation, and the stop strings the door checks itself."""

from __future__ import annotations

import json

from door.migration import StopText, StreamFollower, engine_request, migratable


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
    chat = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 5}
    assert migratable("chat/completions", chat)
    assert migratable("chat/completions", {**chat, "max_tokens": None, "max_completion_tokens": 5})
    assert not migratable("chat/completions", {**chat, "max_tokens": None})  # no limit: the door cannot say what is left
    assert not migratable("chat/completions", {**chat, "tools": [{"type": "function"}]})
    assert not migratable("chat/completions", {**chat, "logprobs": True})
    assert not migratable("chat/completions", {**chat, "response_format": {"type": "json_object"}})
    assert not migratable("completions", {"prompt": "hi", "stream": True, "stop": "x", "min_tokens": 2})
    assert not migratable("completions", {"prompt": "hi", "stream": True, "stop": ["x"], "logprobs": 1})
    assert migratable("completions", {"prompt": "hi", "stream": True, "logprobs": 1})
    assert not migratable("completions", {"prompt": "hi", "stream": False})
    assert not migratable("completions", {"prompt": ["a", "b"], "stream": True})  # several prompts
    assert not migratable("completions", {"prompt": "hi", "stream": True, "n": 2})
    assert not migratable("completions", {"prompt": "hi", "stream": True, "echo": True})
    assert engine_request({"prompt": "hi"}) == {"prompt": "hi", "return_token_ids": True}
    # With stop strings the engine holds nothing back: the door does (StopText).
    assert engine_request({"prompt": "hi", "stop": "x"}) == {
        "prompt": "hi", "stop": "x", "return_token_ids": True, "include_stop_str_in_output": True}  # fmt: skip


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


def _chat_event(completion_id: str, content: str | None, token_ids: list[int], prompt_ids: list[int] | None = None,
                finish: str | None = None) -> bytes:  # fmt: skip
    delta = {"role": "assistant", "content": ""} if content is None else {"content": content}
    data: dict[str, object] = {"id": completion_id, "object": "chat.completion.chunk", "created": 5, "model": "m",
                               "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish,
                                            "token_ids": token_ids}]}  # fmt: skip
    if prompt_ids is not None:
        data["prompt_token_ids"] = prompt_ids
    return b"data: " + json.dumps(data).encode() + b"\n\n"


def _parsed(relayed: bytes) -> list[dict]:
    events = [e for e in relayed.split(b"\n\n") if e]
    assert all(e.startswith(b"data: ") for e in events)
    return [json.loads(e[6:]) for e in events if e != b"data: [DONE]"]  # every event valid JSON


def test_a_chat_stream_is_continued_as_a_completion_and_relayed_as_chat_chunks() -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_completion_tokens": 6,
            "temperature": 0, "tool_choice": "none", "kv_transfer_params": {"x": 1}}  # fmt: skip
    follower = StreamFollower(body, chat=True)
    relayed = follower.feed(_chat_event("chatcmpl-a", None, [], prompt_ids=[1, 2, 3]) + _chat_event("chatcmpl-a", "He", [7]))
    assert follower.prompt_token_ids == [1, 2, 3] and follower.generated == [7]
    continuation = follower.continuation()
    assert continuation == {"stream": True, "temperature": 0, "prompt": [1, 2, 3, 7], "max_tokens": 5,
                            "return_token_ids": True}  # fmt: skip
    follower.restart()
    relayed += follower.feed(
        _event("cmpl-b", "llo", [8], prompt_ids=[1, 2, 3, 7]) + _event("cmpl-b", "!", [9], finish="length")
        + b'data: {"id": "cmpl-b", "object": "text_completion", "created": 9, "model": "m", "choices": [],'
          b' "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}}\n\n'
        + b"data: [DONE]\n\n"
    )  # fmt: skip
    events = _parsed(relayed)
    assert {e["id"] for e in events} == {"chatcmpl-a"} and {e["object"] for e in events} == {"chat.completion.chunk"}
    assert [e["choices"][0]["delta"].get("content") for e in events[:-1]] == ["", "He", "llo", "!"]
    assert events[3]["choices"][0]["finish_reason"] == "length"
    assert all("token_ids" not in e["choices"][0] for e in events[:-1]) and all("prompt_token_ids" not in e for e in events)
    # The usage counts the client's prompt and every generated token, not the continuation's.
    assert events[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert follower.finished and follower.done_sent


def test_stop_text_holds_back_and_cuts_as_vllm_does() -> None:
    stop = StopText(["END", "xy"], include=False)
    assert stop.feed("abcE") == ("ab", None)  # two characters could begin "END"
    assert stop.feed("N") == ("c", None)
    assert stop.feed("Dtail") == ("", "END")  # cut at the stop string, which is not sent
    assert StopText(["END"], include=True).feed("abENDc") == ("abEND", "END")
    # The stop string completing earliest wins, whatever the list's order.
    assert StopText(["cd", "ab"], include=False).feed("zabcd") == ("z", "ab")
    held = StopText(["END"], include=False)
    assert held.feed("abcdE") == ("abc", None) and held.flush() == "dE"


def test_held_back_text_survives_a_cut() -> None:
    """vLLM holds back the characters that may begin a stop string; the door asks it not to
    and holds them itself, so that a cut does not lose them with the engine."""
    follower = StreamFollower({"prompt": "hi", "stream": True, "max_tokens": 10, "stop": ["NEVER"]})
    relayed = follower.feed(_event("cmpl-a", "Hello", [7], prompt_ids=[1]) + _event("cmpl-a", " wor", [8]))
    assert [t for _, t, _ in _texts(relayed)] == ["H", "ello"]  # " wor" held back (four characters)
    follower.restart()
    relayed = follower.feed(_event("cmpl-b", "ld", [9], prompt_ids=[1, 7, 8]) + _event("cmpl-b", ".", [10], finish="length"))
    assert [t for _, t, _ in _texts(relayed)] == [" w", "orld."]  # the whole text: "Hello world."
    assert follower.continuation() == {"prompt": [1, 7, 8, 9, 10], "stream": True, "max_tokens": 6, "stop": ["NEVER"],
                                       "return_token_ids": True, "include_stop_str_in_output": True}  # fmt: skip


def test_a_stop_string_the_engine_found_is_cut_out_and_one_across_a_cut_ends_the_stream() -> None:
    follower = StreamFollower({"prompt": "hi", "stream": True, "max_tokens": 10, "stop": ["STOP"]})
    relayed = follower.feed(_event("cmpl-a", "ab", [7], prompt_ids=[1]) + _event("cmpl-a", "cSTOP", [8], finish="stop"))
    assert [t for _, t, _ in _texts(relayed)] == ["", "abc"] and follower.finished and not follower.stopped_here

    follower = StreamFollower({"prompt": "hi", "stream": True, "max_tokens": 10, "stop": ["STOP"]}, chat=False)
    assert _texts(follower.feed(_event("cmpl-a", "abST", [7], prompt_ids=[1])))[0][1] == "a"
    follower.restart()  # the engine died with "ST" sent; the continuation begins "OP": the engine cannot see it
    relayed = follower.feed(_event("cmpl-b", "OP and on", [8], prompt_ids=[1, 7]) + _event("cmpl-b", "more", [9]))
    assert follower.stopped_here and follower.finished and follower.done_sent
    assert relayed.endswith(b"data: [DONE]\n\n")
    (event,) = _parsed(relayed)
    assert event["choices"][0]["text"] == "b" and event["choices"][0]["finish_reason"] == "stop"
    assert event["choices"][0]["stop_reason"] == "STOP"
    assert follower.feed(_event("cmpl-b", "x", [10])) == b""  # nothing after the door's end
