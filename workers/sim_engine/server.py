"""The simulated engine's OpenAI API server: what a vLLM engine serves, answered from the
simulated scheduler (an ASGI app under Uvicorn, no web framework: ~35 MiB a process).

    python -m workers.sim_engine.server --model DIR --served-model-name NAME --host H --port P \\
        --sim-profile cpu-93m-float32 [vLLM's flags: --max-model-len, --block-size,
        --num-gpu-blocks-override, --max-num-seqs, --max-num-batched-tokens, --dtype,
        --enable-prefix-caching/--no-enable-prefix-caching, --kv-events-config,
        --kv-transfer-config, --middleware; others are accepted and ignored]

Paths: ``/health``, ``/v1/models``, ``/version``, ``/metrics`` (vLLM's metric names),
``/v1/completions`` and ``/v1/chat/completions`` (streaming, usage, ``return_token_ids``,
``cache_salt``, ``kv_transfer_params`` both ways). Bad input gets vLLM's answers: 400
(or 404 for an unknown model) in OpenAI's error form.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from workers.sim_engine.events import EventPublisher
from workers.sim_engine.kv_cache import SimKVCache
from workers.sim_engine.metrics import render_metrics
from workers.sim_engine.openai_io import (
    ApiError,
    cut_at_stop,
    parse_max_tokens,
    parse_prompts,
    read_json,
    respond,
    send_json,
    stop_strings,
    until_disconnect,
)
from workers.sim_engine.profile import CostProfile, load_profile
from workers.sim_engine.prompts import Prompts
from workers.sim_engine.scheduler import SchedulerLimits, SimRequest, SimScheduler

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

VERSION = "0.32.0+simulated"
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4}


@dataclass(frozen=True)
class EngineSettings:
    model_path: Path
    served_model_name: str
    host: str
    port: int
    profile: CostProfile
    block_size: int
    num_blocks: int
    limits: SchedulerLimits
    prefix_caching: bool
    kv_events: dict[str, Any] | None
    kv_role: str | None  # kv_producer | kv_consumer | kv_both; None: no connector
    middleware: tuple[str, ...]


@dataclass
class _Choice:
    index: int
    request: SimRequest


class SimEngine:
    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self.prompts = Prompts(settings.model_path)
        self.cache = SimKVCache(settings.num_blocks, settings.block_size, settings.prefix_caching)
        self.publisher: EventPublisher | None = None
        if settings.kv_events and settings.kv_events.get("enable_kv_cache_events"):
            self.publisher = EventPublisher(str(settings.kv_events["endpoint"]), str(settings.kv_events["replay_endpoint"]),
                                            str(settings.kv_events.get("topic", "")),
                                            int(settings.kv_events.get("buffer_steps", 10_000)))  # fmt: skip
        self.scheduler = SimScheduler(self.cache, settings.profile, settings.limits, self.prompts.sample,
                                      self.publisher.publish if self.publisher else None, _exit)  # fmt: skip
        self.created = int(time.time())

    async def start(self) -> None:
        if self.publisher is not None:
            self.publisher.start()
        self.scheduler.start()

    async def close(self) -> None:
        await self.scheduler.close()
        if self.publisher is not None:
            await self.publisher.close()

    # --- the ASGI app -------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        try:
            if method == "GET" and path == "/health":
                await respond(send, 200, b"", "text/plain")
            elif method == "GET" and path == "/v1/models":
                await send_json(send, 200, self._models())
            elif method == "GET" and path == "/version":
                await send_json(send, 200, {"version": VERSION})
            elif method == "GET" and path == "/metrics":
                metrics = render_metrics(self.scheduler, self.cache, self.settings.served_model_name)
                await respond(send, 200, metrics.encode(), "text/plain; version=0.0.4; charset=utf-8")
            elif method == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
                body = await read_json(receive)
                await self._generate(body, path.endswith("chat/completions"), send, receive)
            elif path in ("/health", "/v1/models", "/version", "/metrics", "/v1/completions", "/v1/chat/completions"):
                await send_json(send, 405, {"detail": "Method Not Allowed"})
            else:
                await send_json(send, 404, {"detail": "Not Found"})
        except ApiError as exc:
            await respond(send, exc.status, exc.body(), "application/json")

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": self.settings.served_model_name, "object": "model", "created": self.created, "owned_by": "vllm",
            "root": str(self.settings.model_path), "parent": None, "max_model_len": self.settings.limits.max_model_len,
            "permission": [],
        }]}  # fmt: skip

    # --- one request ----------------------------------------------------------------------

    async def _generate(self, body: dict[str, Any], chat: bool, send: Send, receive: Receive) -> None:
        prompts = parse_prompts(body, chat, self.settings.served_model_name, self.prompts)
        max_tokens = parse_max_tokens(body, chat, max(len(p) for p in prompts), self.settings.limits.max_model_len)
        params = body.get("kv_transfer_params") if isinstance(body.get("kv_transfer_params"), dict) else {}
        salt = body.get("cache_salt")
        if salt is not None and not isinstance(salt, str):
            raise ApiError(400, "cache_salt must be a string", param="cache_salt")
        handed = int(params.get("sim_prompt_tokens") or 0) if params.get("do_remote_prefill") else 0
        choices = [_Choice(index, SimRequest(
            request_id=f"{uuid.uuid4().hex}", prompt=prompt, max_tokens=max_tokens, cache_salt=salt,
            handed_over=min(handed, len(prompt)), sample_seed=hash((tuple(prompt), salt)),
        )) for index, prompt in enumerate(prompts)]  # fmt: skip
        stream = bool(body.get("stream"))
        watcher = asyncio.get_running_loop().create_task(until_disconnect(receive))
        runners = [asyncio.get_running_loop().create_task(self._submit(choice.request)) for choice in choices]
        try:
            if stream:
                await self._stream(body, chat, choices, send, watcher)
            else:
                await self._whole(body, chat, choices, send, watcher, params)
        finally:
            watcher.cancel()
            for runner in runners:
                runner.cancel()
            for choice in choices:
                self.scheduler.abort(choice.request)

    async def _submit(self, request: SimRequest) -> None:
        """The API server's own time, then a handoff's load, then the scheduler."""
        await asyncio.sleep(self.settings.profile.request_overhead_s)
        if request.handed_over:
            hashes = request.prompt_hashes(self.cache)
            have = self.cache.cached_blocks(hashes, len(hashes)) * self.cache.block_size
            missing = max(0, request.handed_over - have)
            if missing:
                await asyncio.sleep(self.settings.profile.load_s(missing))
            request.external_tokens = min(request.handed_over, len(request.prompt) - 1)
        if not request.finished:
            self.scheduler.add(request)

    async def _outputs(self, choices: list[_Choice], watcher: asyncio.Task[None]) -> AsyncIterator[tuple[int, int | None]]:
        """(choice index, token id; None: the choice finished), as tokens come."""
        queue: asyncio.Queue[tuple[int, int | None]] = asyncio.Queue()

        async def pump(choice: _Choice) -> None:
            while True:
                token = await choice.request.output.get()
                await queue.put((choice.index, token))
                if token is None:
                    return

        pumps = [asyncio.get_running_loop().create_task(pump(choice)) for choice in choices]
        left = len(choices)
        try:
            while left:
                getter = asyncio.get_running_loop().create_task(queue.get())
                done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    return  # the client went away
                item = getter.result()
                if item[1] is None:
                    left -= 1
                yield item
        finally:
            for task in pumps:
                task.cancel()

    async def _whole(self, body: dict[str, Any], chat: bool, choices: list[_Choice], send: Send,
                     watcher: asyncio.Task[None], params: dict[str, Any]) -> None:  # fmt: skip
        texts: dict[int, list[int]] = {choice.index: [] for choice in choices}
        async for index, token in self._outputs(choices, watcher):
            if token is not None:
                texts[index].append(token)
        if watcher.done():
            return
        stop = stop_strings(body)
        answer: dict[str, Any] = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
                                  "object": "chat.completion" if chat else "text_completion",
                                  "created": int(time.time()), "model": self.settings.served_model_name}  # fmt: skip
        choice_list = []
        for choice in choices:
            text, reason = cut_at_stop("".join(self.prompts.text(t) for t in texts[choice.index]), stop)
            entry: dict[str, Any] = {"index": choice.index, "logprobs": None, "finish_reason": reason, "stop_reason": None}
            if chat:
                entry["message"] = {"role": "assistant", "content": text, "tool_calls": [], "reasoning_content": None}
            else:
                entry["text"] = text
                entry["prompt_logprobs"] = None
            if body.get("return_token_ids"):
                entry["token_ids"] = texts[choice.index]
                if not chat:
                    entry["prompt_token_ids"] = choice.request.prompt
            choice_list.append(entry)
        answer["choices"] = choice_list
        if chat and body.get("return_token_ids"):
            answer["prompt_token_ids"] = choices[0].request.prompt
        answer["usage"] = _usage(choices)
        if params.get("do_remote_decode") and self.settings.kv_role in ("kv_producer", "kv_both"):
            prompt = choices[0].request.prompt
            answer["kv_transfer_params"] = {"do_remote_prefill": True, "do_remote_decode": False,
                                            "sim_prompt_tokens": len(prompt), "remote_engine": self.settings.served_model_name,
                                            "num_saved_blocks": -(-len(prompt) // self.settings.block_size)}  # fmt: skip
        else:
            answer["kv_transfer_params"] = None
        await send_json(send, 200, answer)

    async def _stream(self, body: dict[str, Any], chat: bool, choices: list[_Choice], send: Send,
                      watcher: asyncio.Task[None]) -> None:  # fmt: skip
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]})  # fmt: skip
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"
        token_ids = bool(body.get("return_token_ids"))
        options = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
        stop = stop_strings(body)
        model = self.settings.served_model_name
        received = {choice.index: 0 for choice in choices}
        texts = {choice.index: "" for choice in choices}
        done: set[int] = set()
        requests = {choice.index: choice.request for choice in choices}

        async def event(data: dict[str, Any]) -> None:
            await send({"type": "http.response.body", "body": b"data: " + json.dumps(data).encode() + b"\n\n",
                        "more_body": True})  # fmt: skip

        async for index, token in self._outputs(choices, watcher):
            request = requests[index]
            if index in done:
                continue
            if token is None:  # ended before max_tokens (max_model_len reached)
                done.add(index)
                await event(self._chunk(ident, kind, created, index, "", [], chat, "length", token_ids, request, False))
                continue
            received[index] += 1
            if chat and received[index] == 1:
                first: dict[str, Any] = {"id": ident, "object": kind, "created": created, "model": model, "choices": [
                    {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]}  # fmt: skip
                if token_ids:
                    first["prompt_token_ids"] = request.prompt
                await event(first)
            text, reason = cut_at_stop(texts[index] + self.prompts.text(token), stop)
            delta, texts[index] = text[len(texts[index]):], text
            if reason != "stop":
                reason = "length" if received[index] >= request.max_tokens else None
            if reason is not None:
                done.add(index)
                self.scheduler.abort(request)  # a stop string: nothing more to compute
            await event(self._chunk(ident, kind, created, index, delta, [token], chat, reason, token_ids, request,
                                    received[index] == 1))  # fmt: skip
            if len(done) == len(choices):
                break
        if watcher.done():
            return
        if options.get("include_usage"):
            await event({"id": ident, "object": kind, "created": created, "model": model, "choices": [], "usage": _usage(choices)})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    def _chunk(self, ident: str, kind: str, created: int, index: int, text: str, tokens: list[int], chat: bool,
               reason: str | None, token_ids: bool, request: SimRequest, first: bool) -> dict[str, Any]:  # fmt: skip
        """One stream event of one token (its text, its id with ``return_token_ids``)."""
        choice: dict[str, Any] = {"index": index, "logprobs": None, "finish_reason": reason, "stop_reason": None}
        if chat:
            choice["delta"] = {"content": text}
        else:
            choice["text"] = text
        if token_ids:
            choice["token_ids"] = tokens
            if first and not chat:
                choice["prompt_token_ids"] = request.prompt
        return {"id": ident, "object": kind, "created": created, "model": self.settings.served_model_name,
                "choices": [choice]}  # fmt: skip

def _exit(error: BaseException) -> None:
    """A scheduler that failed serves nothing again: end the engine (its actor restarts it)
    rather than answer /health with every request hanging."""
    os._exit(70)


def _usage(choices: list[_Choice]) -> dict[str, int]:
    prompt = sum(len(choice.request.prompt) for choice in choices)
    completion = sum(choice.request.generated for choice in choices)
    return {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion}


# --- the command line -------------------------------------------------------------------------


def parse_settings(argv: list[str] | None = None, environ: MutableMapping[str, str] | None = None) -> EngineSettings:
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(description="A simulated vLLM engine (workers/sim_engine)")
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--sim-profile", required=True)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--block-size", type=int, default=None)
    parser.add_argument("--num-gpu-blocks-override", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--enable-prefix-caching", dest="prefix_caching", action="store_true", default=True)
    parser.add_argument("--no-enable-prefix-caching", dest="prefix_caching", action="store_false")
    parser.add_argument("--kv-events-config", type=json.loads, default=None)
    parser.add_argument("--kv-transfer-config", type=json.loads, default=None)
    parser.add_argument("--middleware", action="append", default=[])
    args, ignored = parser.parse_known_args(argv)
    if ignored:
        logger.info("vLLM flags a simulated engine does not model, ignored: %s", " ".join(ignored))
    profile = load_profile(args.sim_profile)
    config = json.loads((args.model / "config.json").read_text())
    max_model_len = args.max_model_len or int(config.get("max_position_embeddings", 2048))
    block_size = args.block_size or profile.block_size
    if args.num_gpu_blocks_override:
        num_blocks = args.num_gpu_blocks_override
    elif profile.kv_cache_tokens:
        num_blocks = profile.kv_cache_tokens // block_size
    else:
        dtype = config.get("torch_dtype", "bfloat16") if args.dtype == "auto" else args.dtype
        space_gb = float(environ.get("VLLM_CPU_KVCACHE_SPACE", "4"))
        num_blocks = int(space_gb * 2**30) // (kv_bytes_per_token(config, str(dtype)) * block_size)
    batched = args.max_num_batched_tokens or profile.max_num_batched_tokens
    seqs = args.max_num_seqs or profile.max_num_seqs
    return EngineSettings(
        model_path=args.model, served_model_name=args.served_model_name or str(args.model), host=args.host, port=args.port,
        profile=profile, block_size=block_size, num_blocks=max(1, num_blocks),
        limits=SchedulerLimits(batched, seqs, max_model_len), prefix_caching=args.prefix_caching,
        kv_events=args.kv_events_config, kv_role=(args.kv_transfer_config or {}).get("kv_role"),
        middleware=tuple(args.middleware),
    )  # fmt: skip


def kv_bytes_per_token(config: dict[str, Any], dtype: str) -> int:
    """KV cache bytes one token takes across all layers (full attention)."""
    layers = int(config["num_hidden_layers"])
    heads = int(config.get("num_key_value_heads") or config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // int(config["num_attention_heads"]))
    return 2 * layers * heads * head_dim * _DTYPE_BYTES.get(dtype, 2)


def build_app(engine: SimEngine) -> Any:
    app: Any = engine
    for path in engine.settings.middleware:  # "module.Class", as vLLM's --middleware takes it
        module, _, name = path.rpartition(".")
        app = getattr(importlib.import_module(module), name)(app)
    return app


class _QuietServer(uvicorn.Server):
    """Uvicorn waking once a second instead of ten times (its default tick): 256 idle
    engines on one machine took 342 ms of CPU a second, 144 with this (bench sim-scale
    door). The tick only refreshes the Date header (once a second anyway) and notices
    ``should_exit``."""

    async def main_loop(self) -> None:
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 10) % 864000  # on_tick refreshes its headers when counter % 10 == 0
            await asyncio.sleep(1.0)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = parse_settings(argv)
    engine = SimEngine(settings)
    logger.info("simulated engine %s on %s:%d: profile %s, %d KV blocks of %d tokens, max_model_len %d, "
                "max_num_batched_tokens %d, max_num_seqs %d, KV events %s, kv_role %s",
                settings.served_model_name, settings.host, settings.port, settings.profile.name, settings.num_blocks,
                settings.block_size, settings.limits.max_model_len, settings.limits.max_num_batched_tokens,
                settings.limits.max_num_seqs, "on" if settings.kv_events else "off", settings.kv_role)  # fmt: skip
    config = uvicorn.Config(build_app(engine), host=settings.host, port=settings.port, log_level="warning",
                            access_log=False, lifespan="on", timeout_graceful_shutdown=5)  # fmt: skip
    server = _QuietServer(config)
    signal.signal(signal.SIGTERM, lambda *_: setattr(server, "should_exit", True))
    server.run()


if __name__ == "__main__":
    main()
