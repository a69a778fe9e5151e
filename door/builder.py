"""The one way a front door is built from a deployment's configuration: the routing table
and its policy, admission, KV-aware routing and every option of ``FrontDoor``.

deploy/serve.py builds the deployment's door with it, benchmarks/door_process.py a door in
front of stand-in engines, and the tests theirs; what differs is what they pass: the
engines, the Controller's refresh, the scaler, the KV router."""

from __future__ import annotations

from collections.abc import Sequence

from common.config import ServiceConfig
from common.role_port import RoleControl
from common.scale_port import ScaleControl
from door.admission import Admission
from door.door_metrics import DoorMetrics
from door.engine_watch import Refresh
from door.frontdoor import FrontDoor
from door.kv_events import KVEventSubscriber
from door.kv_index import KVIndex
from door.kv_policy import KVAware
from door.kv_router import KVRouter, PromptTokenizer
from door.policy_factory import make_policy
from door.routing import RoutingTable


def build_door(
    config: ServiceConfig,
    engines: Sequence[dict[str, object]],
    served_model_name: str,
    metrics: DoorMetrics | None = None,
    refresh: Refresh | None = None,
    kv_router: KVRouter | None = None,
    scaler: ScaleControl | None = None,
    admission: Admission | None = None,
    roles: RoleControl | None = None,
) -> FrontDoor:
    """A door routing to ``engines`` (the Controller's engine entries) as ``config`` says;
    ``admission``: slots the caller holds (a test that watches them), else ``config``'s."""
    metrics = metrics or DoorMetrics()
    table = RoutingTable(list(engines), make_policy(config.routing_policy), metrics)
    admission = admission or Admission(config.admission)
    return FrontDoor(table, served_model_name, metrics, refresh, admission, config.api_key,
                     config.stream_migrations, kv_router, scaler, config.metrics_public,
                     config.prefill_timeout_s, config.door_read_timeout_s, config.slo, roles, config.planner.window_s)  # fmt: skip


def build_kv_router(config: ServiceConfig, model_path: str, metrics: DoorMetrics | None = None,
                    follow_events: bool = True) -> KVRouter:  # fmt: skip
    """The door's KV-aware routing: an index of the engines' device caches (and, with
    prefix reuse, of what the data system holds), kept by their KV events, and the served
    model's tokenizer for text and chat prompts. ``follow_events=False``: an index that no
    events fill (stand-in engines publish none)."""
    reuse = config.using_prefix_connector  # engines load prompt heads from the data system
    index = KVIndex(config.kv_block_size, track_store=reuse)
    events = KVEventSubscriber(index) if follow_events else None
    return KVRouter(index, PromptTokenizer(model_path), KVAware(store_reuse=reuse), config.selective_pd_tokens,
                    events, metrics)  # fmt: skip
