"""One front door in its own process, in front of engines given on the command line (the
door-overhead benchmark's door)::

    python -m benchmarks.door_process --port 20010 --engine p0=prefill@20001 --engine d0=decode@20002

The door is built as deploy/serve.py builds it, with a default deployment's settings
(routing policy, metrics, admission, stream migrations), but without a Controller: the
routing table is fixed. Uvicorn serves it (uvloop) until SIGTERM: on the door's own HTTP
protocol (``--http door``, as a deployment), or on Uvicorn's httptools protocol with the
completions handlers as a bare ASGI callable (``--http uvicorn``, benchmarks/asgi_door.py).
"""

from __future__ import annotations

import argparse
import logging

import uvicorn

from benchmarks.asgi_door import completions_app
from common.config import ROUTING_POLICIES, ServiceConfig
from deploy.embedded_model import ensure_embedded_model
from deploy.settings import SETTINGS
from door.builder import build_door, build_kv_router
from door.gc_tuning import tune_gc_for_serving
from testkit.helpers import PROJECT_ROOT, service_config

logger = logging.getLogger(__name__)

ROLES = ("prefill", "decode", "colocated")
HTTP_MODES = ("door", "uvicorn")
POLICIES = ROUTING_POLICIES
DEFAULT_POLICY = str(next(setting.default for setting in SETTINGS if setting.env == "ROUTING_POLICY"))


def default_config(policy: str) -> ServiceConfig:
    """A default deployment's configuration with ``policy``, built as deploy builds it. No
    selective PD: every PD request takes both legs, as the benchmark checks."""
    return service_config(ROUTING_POLICY=policy, SELECTIVE_PD_TOKENS="0")


def engine_info(spec: str, host: str = "127.0.0.1") -> dict[str, object]:
    """``NAME=ROLE@PORT`` as the routing table's engine entry."""
    name, _, rest = spec.partition("=")
    role, _, port = rest.partition("@")
    if not name or role not in ROLES or not port.isdigit():
        raise ValueError(f"--engine {spec!r} is invalid: write NAME=ROLE@PORT, ROLE one of {', '.join(ROLES)}")
    return {"name": name, "role": role, "host": host, "port": int(port), "state": "healthy"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="benchmarks.door_process", description="serve one front door until SIGTERM")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--engine", action="append", required=True, metavar="NAME=ROLE@PORT")
    parser.add_argument("--policy", choices=POLICIES, default=DEFAULT_POLICY,
                        help="prefill/colocated routing; default: a deployment's")  # fmt: skip
    parser.add_argument("--served-model-name", default="m")
    parser.add_argument("--http", choices=HTTP_MODES, default="door",
                        help="door: the door's own HTTP protocol (a deployment's); uvicorn: Uvicorn's httptools "
                             "protocol and a bare ASGI callable")  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engines = [engine_info(spec) for spec in args.engine]
    except ValueError as exc:
        parser.error(str(exc))
    config = default_config(args.policy)
    # kv_aware as a deployment builds it, following no events: stand-in engines publish
    # none, so the index stays empty and what shows is the door's per-request cost of
    # KV-aware routing (tokenizing, hashing, matching, ordering), not its choices.
    kv_router = None
    if config.kv_events:
        model = ensure_embedded_model(PROJECT_ROOT / ".cache" / "models")
        kv_router = build_kv_router(config, str(model), follow_events=False)
    door = build_door(config, engines, args.served_model_name, kv_router=kv_router)
    tune_gc_for_serving()  # as deploy/serve.py does
    logger.info("door on port %d: %s", args.port, ", ".join(f"{e['name']}={e['role']}" for e in engines))
    if args.http == "door":
        config = door.uvicorn_config("127.0.0.1", args.port, drain_timeout_s=5.0)
    else:
        config = uvicorn.Config(completions_app(door), host="127.0.0.1", port=args.port, http="httptools",
                                log_level="warning", access_log=False, timeout_graceful_shutdown=5)  # fmt: skip
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
