"""The OpenAI API's edges for the simulated engine: a request's JSON read, its prompts
and limits checked as vLLM checks them (bad input: ``ApiError``, vLLM's status and
message in OpenAI's error form), stop strings, and the ASGI responses."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from workers.sim_engine.prompts import PromptError, Prompts

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_MAX_BODY = 64 * 1024 * 1024


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "BadRequestError", param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def body(self) -> bytes:
        return json.dumps({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                     "code": self.status}}).encode()  # fmt: skip


def parse_prompts(body: dict[str, Any], chat: bool, served_model_name: str, prompts: Prompts) -> list[list[int]]:
    """The request's prompts as token ids (one per choice); ApiError as vLLM answers bad input."""
    model = body.get("model")
    if model is not None and model != served_model_name:
        raise ApiError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
    n = body.get("n", 1)
    if n not in (None, 1):
        raise ApiError(400, f"n={n}: the simulated engine computes one choice per prompt", param="n")
    try:
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
                raise ApiError(400, "messages: a non-empty list of message objects is required", param="messages")
            return [prompts.chat(messages, bool(body.get("add_generation_prompt", True)))]
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            ids_list = [prompts.encode(prompt)]
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids_list = [list(prompt)]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            ids_list = [prompts.encode(p) for p in prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, list) and p for p in prompt):
            ids_list = [list(p) for p in prompt]
        else:
            raise ApiError(400, "prompt: a string, a list of token ids, or a list of either is required", param="prompt")
        for ids in ids_list:
            prompts.check_ids(ids)
    except PromptError as exc:
        raise ApiError(400, str(exc)) from None
    if any(not ids for ids in ids_list):
        raise ApiError(400, "Prompt cannot be empty", param="prompt")
    return ids_list

def parse_max_tokens(body: dict[str, Any], chat: bool, prompt_tokens: int, limit: int) -> int:
    """The tokens to generate (``limit``: max_model_len); ApiError for bad sampling values."""
    if prompt_tokens >= limit:
        raise ApiError(400, f"This model's maximum context length is {limit} tokens. However, your request has "
                            f"{prompt_tokens} input tokens. Please reduce the length of the input messages.")  # fmt: skip
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    value = body.get(key)
    if value is None:
        return limit - prompt_tokens
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ApiError(400, f"{key} must be at least 1, got {value}.", param=key)
    if prompt_tokens + value > limit:
        raise ApiError(400, f"'{key}' is too large: {value}. This model's maximum context length is {limit} tokens "
                            f"and your request has {prompt_tokens} input tokens ({value} > {limit} - {prompt_tokens}).",
                       param=key)  # fmt: skip
    for name, low, high in (("temperature", 0.0, 2.0), ("top_p", 1e-9, 1.0)):
        number = body.get(name)
        if number is not None and (not isinstance(number, int | float) or not low <= number <= high):
            raise ApiError(400, f"{name} must be in [{low:g}, {high:g}], got {number}.", param=name)
    return value


def stop_strings(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if isinstance(stop, str):
        return [stop] if stop else []
    return [s for s in stop if isinstance(s, str) and s] if isinstance(stop, list) else []


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, str | None]:
    """The text up to the first stop string, and "stop" if one was found (else "length")."""
    cut = min((position for s in stop if (position := text.find(s)) >= 0), default=-1)
    return (text[:cut], "stop") if cut >= 0 else (text, "length")


async def read_json(receive: Receive) -> dict[str, Any]:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ApiError(400, "the client went away before its request arrived")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > _MAX_BODY:
            raise ApiError(413, "request body too large")
        chunks.append(chunk)
        if not message.get("more_body"):
            break
    try:
        body = json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"JSON decode error: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


async def until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def respond(send: Send, status: int, body: bytes, content_type: str) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", content_type.encode())]})
    await send({"type": "http.response.body", "body": body})


async def send_json(send: Send, status: int, data: object) -> None:
    await respond(send, status, json.dumps(data).encode(), "application/json")
