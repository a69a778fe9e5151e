"""Request migration: a completions stream whose engine dies mid-way goes on elsewhere.

The door asks the engine for token ids (vLLM's ``return_token_ids``) and follows the
stream event by event: the prompt's token ids (first event) and every generated token
id. When the engine's stream breaks before its end, the door sends a continuation to
another engine: the prompt's token ids plus the tokens already generated as the prompt,
``max_tokens`` less what was generated, and relays its events under the original
completion id, so that the client reads one uninterrupted stream. Under greedy
sampling the text equals an uninterrupted run's (the continuation computes the same
tokens' KV afresh).

Only single-prompt, single-choice ``/v1/completions`` streams without ``echo`` or
``best_of`` are followed (chat streams would need the chat template's tokens and chat
events: not done). The token id fields are removed again from what the client gets,
unless the client asked for them.

What the client gets stays one valid stream across a cut: each continuation is parsed
from a clean state (``restart``: the broken engine's partial event is dropped, never
glued to the next engine's first), its events carry the original completion id and
never the continuation's prompt ids. A server error event (what vLLM's API server sends
when its EngineCore dies, then ``[DONE]``) is a cut, not an end: it is not relayed, and
the stream is continued like a broken one.
"""

from __future__ import annotations

import json
from typing import Any

_EVENT_END = b"\n\n"
_DONE = b"data: [DONE]"
_TOKEN_FIELDS = ("prompt_token_ids", "token_ids")


def migratable(endpoint: str, body: dict[str, Any]) -> bool:
    """Whether a stream of this request can be continued on another engine."""
    prompt = body.get("prompt")
    single_prompt = isinstance(prompt, str) or (isinstance(prompt, list) and bool(prompt) and all(isinstance(t, int) for t in prompt))
    return (
        endpoint == "completions"
        and body.get("stream") is True
        and single_prompt
        and body.get("n", 1) == 1
        and not body.get("echo")
        and body.get("best_of") in (None, 1)
        and isinstance(body.get("max_tokens", 16), int)
    )


def with_token_ids(body: dict[str, Any]) -> dict[str, Any]:
    """The request as sent to an engine: token ids in the stream."""
    return body if body.get("return_token_ids") else {**body, "return_token_ids": True}


class StreamFollower:
    """Follows one completion stream across engines: what was generated, and what the
    client is sent (token id fields removed unless asked for, one completion id)."""

    def __init__(self, body: dict[str, Any]) -> None:
        self._body = body
        self._keep_token_ids = bool(body.get("return_token_ids"))
        self._pending = b""
        self.prompt_token_ids: list[int] | None = None
        self.generated: list[int] = []
        self.finished = False  # a finish reason or [DONE] came
        self.done_sent = False  # [DONE] came
        self.engine_error: str | None = None  # a server error event came: the engine failed
        self._completion_id: str | None = None

    def restart(self) -> None:
        """A continuation's stream starts: nothing of the broken one's is carried over."""
        self._pending = b""
        self.engine_error = None

    def feed(self, chunk: bytes) -> bytes:
        """The complete events in ``chunk`` (with what came before), as the client gets them."""
        self._pending += chunk
        events, _, self._pending = self._pending.rpartition(_EVENT_END)
        if not events:
            return b""
        relayed = (self._event(event) for event in (events + _EVENT_END).split(_EVENT_END)[:-1])
        return b"".join(event + _EVENT_END for event in relayed if event)

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
        choices = data.get("choices") if isinstance(data, dict) else None
        if not choices:
            return event  # a usage event
        choice = choices[0]
        if self.prompt_token_ids is None and isinstance(choice.get("prompt_token_ids"), list):
            self.prompt_token_ids = list(choice["prompt_token_ids"])
        if isinstance(choice.get("token_ids"), list):
            self.generated.extend(choice["token_ids"])
        if choice.get("finish_reason") is not None:
            self.finished = True
        if self._completion_id is None:
            self._completion_id = data.get("id")
        continued = data.get("id") != self._completion_id
        if continued:
            data["id"] = self._completion_id  # the client keeps one completion id
            choice.pop("prompt_token_ids", None)  # the continuation's prompt: the client's prompt and what it got
        elif self._keep_token_ids:
            return event
        if not self._keep_token_ids:
            for field in _TOKEN_FIELDS:
                choice.pop(field, None)
        return b"data: " + json.dumps(data, separators=(",", ":")).encode()

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
        """The request that generates the rest on another engine; None if it cannot be made
        (the prompt's token ids never came) or nothing is left to generate."""
        if self.prompt_token_ids is None:
            return None
        remaining = int(self._body.get("max_tokens", 16)) - len(self.generated)
        if remaining <= 0:
            return None
        body = {key: value for key, value in self._body.items() if key != "kv_transfer_params"}
        body["prompt"] = self.prompt_token_ids + self.generated
        body["max_tokens"] = remaining
        if isinstance(body.get("min_tokens"), int):
            body["min_tokens"] = max(0, body["min_tokens"] - len(self.generated))
        return with_token_ids(body)
