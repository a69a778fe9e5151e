"""Request migration: a stream whose engine dies mid-way goes on elsewhere.

The door asks the engine for token ids (vLLM's ``return_token_ids``) and follows the
stream event by event: the prompt's token ids (first event) and every generated token
id. When the engine's stream breaks before its end, the door sends a continuation to
another engine: ``/v1/completions`` with the prompt's token ids plus the tokens already
generated as the prompt and ``max_tokens`` less what was generated, and relays its
events under the original completion id, so that the client reads one uninterrupted
stream. Under greedy sampling the text equals an uninterrupted run's (the continuation
computes the same tokens' KV afresh).

Followed: single-prompt, single-choice ``/v1/completions`` streams without ``echo`` or
``best_of``, and single-choice ``/v1/chat/completions`` streams with a token limit
(``max_tokens``/``max_completion_tokens``) and without tools, ``response_format`` or
logprobs. A chat stream is continued as a completion of its prompt's token ids (the
chat template's tokens, which vLLM sends in the first chunk); its events are relayed as
chat chunks. The token id fields are removed from what the client gets, unless it asked
for them. An engine that runs a reasoning or tool-call parser splits chat text into
fields a continuation does not reproduce: do not enable migration with one.

What the client gets stays one valid stream across a cut: each continuation is parsed
from a clean state (``restart``: the broken engine's partial event is dropped, never
glued to the next engine's first), its events carry the original completion id and never
the continuation's prompt ids, and its usage counts the client's prompt and every token
generated. A server error event (what vLLM's API server sends when its EngineCore dies,
then ``[DONE]``) is a cut, not an end: it is not relayed, and the stream is continued like
a broken one.

Stop strings are checked by the door (``StopText``), not by holding text back in the
engine: vLLM holds back the last characters of a stream that has stop strings (they may
begin one), and a cut would lose them with the engine. The engine is asked to include
the stop string in its text (then it holds nothing back) and still stops at it; the door
holds those characters back itself, across engines, and cuts the stop string out as vLLM
would. A stop string that spans a cut is found by the door alone: it ends the stream.
"""

from __future__ import annotations

import json
import sys
from typing import Any

_EVENT_END = b"\n\n"
_DONE = b"data: [DONE]"
_TOKEN_FIELDS = ("prompt_token_ids", "token_ids")
CONTINUATION_PATH = "/v1/completions"
# Chat requests' fields that a completion of token ids does not take.
_CHAT_ONLY = frozenset({
    "messages", "max_completion_tokens", "tools", "tool_choice", "parallel_tool_calls", "chat_template",
    "chat_template_kwargs", "add_generation_prompt", "continue_final_message", "documents",
    "add_special_tokens", "mm_processor_kwargs", "media_io_kwargs", "reasoning_effort", "include_reasoning",
})  # fmt: skip


def stop_strings(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if isinstance(stop, str):
        return [stop] if stop else []
    return [s for s in stop if isinstance(s, str) and s] if isinstance(stop, list) else []


def _max_tokens(body: dict[str, Any], chat: bool) -> Any:
    if chat and body.get("max_completion_tokens") is not None:
        return body["max_completion_tokens"]
    return body.get("max_tokens", None if chat else 16)


def migratable(endpoint: str, body: dict[str, Any]) -> bool:
    """Whether a stream of this request can be continued on another engine."""
    if body.get("stream") is not True or body.get("n", 1) != 1 or body.get("echo"):
        return False
    stops = stop_strings(body)
    if stops and body.get("min_tokens"):
        return False  # vLLM checks stop strings only past min_tokens, at token offsets the door does not see
    if endpoint == "completions":
        prompt = body.get("prompt")
        single_prompt = isinstance(prompt, str) or (isinstance(prompt, list) and bool(prompt) and all(isinstance(t, int) for t in prompt))
        return (
            single_prompt
            and body.get("best_of") in (None, 1)
            and isinstance(_max_tokens(body, chat=False), int)
            and not (stops and body.get("logprobs") is not None)  # logprobs' text offsets would not follow the door's cut
        )
    if endpoint == "chat/completions":
        return (
            isinstance(body.get("messages"), list)
            and isinstance(_max_tokens(body, chat=True), int)
            and not body.get("tools")
            and body.get("response_format") is None
            and not body.get("logprobs")
            and body.get("structured_outputs") is None
        )
    return False


def engine_request(body: dict[str, Any]) -> dict[str, Any]:
    """The request as sent to an engine when its stream is followed: token ids in the
    stream, and the stop string in the text (the door holds back and cuts, ``StopText``)."""
    extra: dict[str, Any] = {}
    if not body.get("return_token_ids"):
        extra["return_token_ids"] = True
    if stop_strings(body) and not body.get("include_stop_str_in_output"):
        extra["include_stop_str_in_output"] = True
    return {**body, **extra} if extra else body


class StopText:
    """vLLM's stop string check, made by the door on the text it relays: the characters
    that may begin a stop string are held back; a stop string found ends the text there
    (after it with ``include``). The same rule as vLLM's ``check_stop_strings``: searched
    in the new text (and what precedes it by a stop string's length), the stop string that
    completes earliest wins."""

    def __init__(self, stops: list[str], include: bool) -> None:
        self.stops, self.include = stops, include
        self.hold = 0 if include else max(len(s) for s in stops) - 1
        self.held = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        """The text that can be relayed now, and the stop string found (if one was)."""
        if not text:
            return "", None
        held = self.held + text
        best, best_index, best_end = None, 0, sys.maxsize
        for stop in self.stops:
            index = held.find(stop, max(0, len(held) + 1 - len(text) - len(stop)))
            if index != -1 and index + len(stop) < best_end:
                best, best_index, best_end = stop, index, index + len(stop)
        if best is not None:
            self.held = ""
            return held[: best_end if self.include else best_index], best
        cut = max(0, len(held) - self.hold)
        self.held = held[cut:]
        return held[:cut], None

    def flush(self) -> str:
        """The stream ended without a stop string: what was held back."""
        held, self.held = self.held, ""
        return held


class StreamFollower:
    """Follows one completion stream across engines: what was generated, and what the
    client is sent (token id fields removed unless asked for, one completion id, stop
    strings cut by the door). ``chat``: a ``/v1/chat/completions`` stream."""

    def __init__(self, body: dict[str, Any], chat: bool = False) -> None:
        self._body = body
        self._chat = chat
        self._keep_token_ids = bool(body.get("return_token_ids"))
        stops = stop_strings(body)
        self._stop_text = StopText(stops, bool(body.get("include_stop_str_in_output"))) if stops else None
        self._pending = b""
        self.prompt_token_ids: list[int] | None = None
        self.generated: list[int] = []
        self.finished = False  # a finish reason or [DONE] came
        self.done_sent = False  # [DONE] came
        self.stopped_here = False  # the door found a stop string the engine did not (one spanning a cut)
        self.engine_error: str | None = None  # a server error event came: the engine failed
        self._completion_id: str | None = None
        self._created: Any = None

    def restart(self) -> None:
        """A continuation's stream starts: nothing of the broken one's is carried over."""
        self._pending = b""
        self.engine_error = None

    def feed(self, chunk: bytes) -> bytes:
        """The complete events in ``chunk`` (with what came before), as the client gets them.
        Once the door ends the stream itself (``stopped_here``) it ends with ``[DONE]`` and
        nothing more is relayed."""
        if self.stopped_here:
            return b""
        self._pending += chunk
        events, _, self._pending = self._pending.rpartition(_EVENT_END)
        if not events:
            return b""
        relayed = []
        for event in events.split(_EVENT_END):
            out = self._event(event)
            if out:
                relayed.append(out + _EVENT_END)
            if self.stopped_here:
                relayed.append(_DONE + _EVENT_END)
                self.done_sent = True
                break
        return b"".join(relayed)

    def _event(self, event: bytes) -> bytes:
        if not event.startswith(b"data: "):
            return event
        if event.strip() == _DONE:
            if self.engine_error is not None:
                return b""  # the [DONE] after a server error: the stream goes on elsewhere
            self.finished = self.done_sent = True
            return event
        try:
            data = json.loads(event[6:])
        except ValueError:
            return event
        if self._server_error(data):
            return b""
        if not isinstance(data, dict):
            return event
        if self._completion_id is None:
            self._completion_id, self._created = data.get("id"), data.get("created")
        continued = data.get("id") != self._completion_id
        choices = data.get("choices")
        if not choices:
            return self._usage(data, continued, event)
        choice = choices[0]
        prompt_ids = data.get("prompt_token_ids") if self._chat and not continued else choice.get("prompt_token_ids")
        if self.prompt_token_ids is None and isinstance(prompt_ids, list):
            self.prompt_token_ids = list(prompt_ids)
        if isinstance(choice.get("token_ids"), list):
            self.generated.extend(choice["token_ids"])
        if choice.get("finish_reason") is not None:
            self.finished = True
        if not continued and self._keep_token_ids and self._stop_text is None:
            return event
        if continued:
            data["id"] = self._completion_id  # the client keeps one completion id
            choice.pop("prompt_token_ids", None)  # the continuation's prompt: the client's prompt and what it got
            if self._chat:
                data, choice = self._as_chat_chunk(data, choice)
        if self._stop_text is not None:
            self._cut_stop(choice)
        if not self._keep_token_ids:
            data.pop("prompt_token_ids", None)
            for field in _TOKEN_FIELDS:
                choice.pop(field, None)
        return b"data: " + json.dumps(data, separators=(",", ":")).encode()

    def _cut_stop(self, choice: dict[str, Any]) -> None:
        """The event's text as the door's stop string check relays it."""
        delta = choice.get("delta") if self._chat else None
        holder, field = (delta, "content") if isinstance(delta, dict) else (choice, "text")
        text = holder.get(field)
        released, stop = self._stop_text.feed(text if isinstance(text, str) else "")  # type: ignore[union-attr]
        if stop is None and choice.get("finish_reason") is not None:
            released += self._stop_text.flush()  # type: ignore[union-attr]
        if isinstance(text, str) or released:
            holder[field] = released
        if stop is not None and choice.get("finish_reason") is None:
            choice["finish_reason"], choice["stop_reason"] = "stop", stop
            self.finished = self.stopped_here = True

    def _as_chat_chunk(self, data: dict[str, Any], choice: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """A continuation's completion event as the chat chunk the client's stream is made of."""
        chat_choice: dict[str, Any] = {"index": 0, "delta": {"content": choice.get("text") or ""},
                                       "logprobs": None, "finish_reason": choice.get("finish_reason")}  # fmt: skip
        for field in ("stop_reason", *_TOKEN_FIELDS):
            if field in choice:
                chat_choice[field] = choice[field]
        chunk = {"id": self._completion_id, "object": "chat.completion.chunk", "created": self._created,
                 "model": data.get("model"), "choices": [chat_choice]}  # fmt: skip
        if "usage" in data:
            chunk["usage"] = data["usage"]
            self._count_usage(chunk)
        return chunk, chat_choice

    def _usage(self, data: dict[str, Any], continued: bool, event: bytes) -> bytes:
        """A usage event: a continuation's counts the client's prompt and all it generated."""
        if not continued:
            return event
        data["id"] = self._completion_id
        if self._chat:
            data["object"], data["created"] = "chat.completion.chunk", self._created
        self._count_usage(data)
        return b"data: " + json.dumps(data, separators=(",", ":")).encode()

    def _count_usage(self, data: dict[str, Any]) -> None:
        usage = data.get("usage")
        if isinstance(usage, dict) and self.prompt_token_ids is not None:
            usage["prompt_tokens"], usage["completion_tokens"] = len(self.prompt_token_ids), len(self.generated)
            usage["total_tokens"] = len(self.prompt_token_ids) + len(self.generated)

    def _server_error(self, data: Any) -> bool:
        """An error event of the engine's own failure (code 500 and up): noted, not relayed."""
        error = data.get("error") if isinstance(data, dict) else None
        if not isinstance(error, dict):
            return False
        code = error.get("code")
        if not (isinstance(code, int) and code >= 500):
            return False
        self.engine_error = str(error.get("message") or error)
        return True

    def continuation(self) -> dict[str, Any] | None:
        """The ``CONTINUATION_PATH`` request that generates the rest on another engine; None
        if it cannot be made (the prompt's token ids never came) or nothing is left."""
        if self.prompt_token_ids is None:
            return None
        remaining = int(_max_tokens(self._body, self._chat)) - len(self.generated)
        if remaining <= 0:
            return None
        dropped = _CHAT_ONLY | {"kv_transfer_params"} if self._chat else {"kv_transfer_params"}
        body = {key: value for key, value in self._body.items() if key not in dropped}
        body["prompt"] = self.prompt_token_ids + self.generated
        body["max_tokens"] = remaining
        if isinstance(body.get("min_tokens"), int):
            body["min_tokens"] = max(0, body["min_tokens"] - len(self.generated))
        return engine_request(body)
