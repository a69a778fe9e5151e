"""Placement: which engines to start and on which devices (pure functions)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from deploy.config import Role, ServiceConfig
from workers.engine_process import EngineSpec


@dataclass(frozen=True)
class InstancePlan:
    role: Role
    count: int
    tensor_parallel: int
    data_parallel: int
    startup_params: tuple[str, ...]


def instance_plans(config: ServiceConfig) -> list[InstancePlan]:
    if not config.disaggregated:
        return [
            InstancePlan(Role.COLOCATED, config.prefill_instances, config.prefill_tp, config.prefill_dp, config.prefill_startup_params)
        ]
    return [
        InstancePlan(Role.PREFILL, config.prefill_instances, config.prefill_tp, config.prefill_dp, config.prefill_startup_params),
        InstancePlan(Role.DECODE, config.decode_instances, config.decode_tp, config.decode_dp, config.decode_startup_params),
    ]


def plan_engines(
    config: ServiceConfig, model_path: Path, served_model_name: str, ds_worker_addresses: tuple[str, ...]
) -> list[EngineSpec]:
    """One spec per engine. Data-parallel ranks of an instance are separate engines.

    Locally, devices are handed out in order and never shared between engines. In
    cluster mode the scheduler places each engine actor with the devices it asks for,
    and the engine uses the devices the runtime made visible to it. Engines attach to
    the data system workers in turn (several local workers stand in for several nodes).
    """
    specs: list[EngineSpec] = []
    next_device = 0
    for plan in instance_plans(config):
        for index in range(plan.count):
            instance = f"{plan.role.value}-{index}"
            for rank in range(plan.data_parallel):
                devices: tuple[int, ...] = ()
                if not config.cluster_mode:
                    devices = config.devices[next_device : next_device + plan.tensor_parallel]
                    next_device += plan.tensor_parallel
                specs.append(
                    EngineSpec(
                        name=instance if plan.data_parallel == 1 else f"{instance}-dp{rank}",
                        instance=instance,
                        role=plan.role,
                        accelerator=config.accelerator,
                        tensor_parallel=plan.tensor_parallel,
                        devices=devices,
                        model_path=str(model_path),
                        served_model_name=served_model_name,
                        startup_params=plan.startup_params,
                        ds_worker_address=ds_worker_addresses[len(specs) % len(ds_worker_addresses)],
                        prefix_reuse=config.using_prefix_connector,
                        connector=config.connector.kind,
                        connector_options=config.connector.extra_config(),
                        project_root=str(Path(__file__).resolve().parents[1]),
                        cache_root=str(config.model_cache_dir.parent / "vllm"),
                        cpu_kvcache_gb=config.cpu_kvcache_gb,
                        bind_host="0.0.0.0" if config.cluster_mode else "127.0.0.1",
                    )
                )
    return specs
