"""Pin an engine actor to the node the planner chose, with openYuanrong resource affinity.

In cluster mode the planner names each engine's node by its function agent id from
``yr.resources()`` (``function-agent-<ip>-<port>``); this module turns that node into the
SDK's affinity objects for the engine actor's ``InvokeOptions.schedule_affinities``.
A node whose IP is not knowable (an id that holds none, from an inventory not read from
``yr.resources()``) gets no affinity: the scheduler places the actor, and the controller
warns.

What the SDK (0.9.10) offers: ``yr.Affinity(kind, type, label_operators)`` with
``yr.AffinityKind.RESOURCE`` (labels of nodes) or ``INSTANCE`` (labels of other instances),
``yr.AffinityType.REQUIRED``/``PREFERRED`` (and the ``_ANTI`` forms), and
``yr.LabelOperator(yr.OperatorType.LABEL_IN, key, [values])``. Resource groups
(``yr.create_resource_group`` + ``InvokeOptions.resource_group_options``) reserve bundles
of resources but cannot name a node, so they cannot carry the plan.

The label: a node's resource labels are collected by its runtime manager
(functionsystem ``resource_labels_collector.cpp``) from the environment: ``NODE_ID``,
``HOST_IP`` and the JSON in ``INIT_LABELS``. ``NODE_ID`` is the one openYuanrong's
affinity guide documents, but ``yr start`` (SDK 0.9.10, ``yr/cli/config.py``) sets it to
``<hostname>-<pid>`` of the starting process, which the resource view does not show. The
function agent gets ``HOST_IP = function_agent.ip`` (``yr/cli/config.toml.jinja``), the
same IP it puts in its id (``function_agent_driver.cpp``: ``"function-agent-" + ip + "-" +
port``), so ``HOST_IP`` is the label whose value is known here. Not exercised on a
cluster: a deployment that does not set ``HOST_IP`` in the agent's environment has no such
label, and a required affinity on it then fails to schedule (the engine's start fails
with the scheduler's message). Two agents on one host share ``HOST_IP``: the affinity
then pins the engine to the host, not to one agent.

Required, not preferred: the plan counted this node's devices (and, for DP_MODE=vllm, its
address as the DP master) for this engine; an engine placed elsewhere takes devices the
plan gave another engine on that node and leaves a TP group's plan meaningless. A required
affinity fails loudly within the SDK's ``schedule_timeout_ms``; a preferred one would
succeed silently on the wrong node.
"""

from __future__ import annotations

import re

import yr

# The node resource label holding the function agent's IP (see the module docstring).
NODE_LABEL = "HOST_IP"

_AGENT_IPV4 = re.compile(r"(?<![\d.])((?:\d{1,3}\.){3}\d{1,3})(?![\d.])")


def node_label_value(node_id: str, node_address: str = "") -> str:
    """The ``HOST_IP`` label value of the planner's node: its address when the planner gave
    one, else the IPv4 address in the agent id (``function-agent-10.0.0.2-25742``), else ""
    (not knowable: a node id from a hand-made inventory, not from ``yr.resources()``)."""
    if node_address:
        return node_address
    match = _AGENT_IPV4.search(node_id)
    return match.group(1) if match else ""


def node_affinities(node_id: str, node_address: str = "") -> list[yr.Affinity]:
    """The affinities that keep an actor on the planner's node: one required resource
    affinity ``HOST_IP in [<ip>]``; none without a node, or when its IP is not knowable
    (the scheduler places the actor)."""
    value = node_label_value(node_id, node_address) if node_id else ""
    if not value:
        return []
    label = yr.LabelOperator(yr.OperatorType.LABEL_IN, NODE_LABEL, [value])
    return [yr.Affinity(yr.AffinityKind.RESOURCE, yr.AffinityType.REQUIRED, [label])]
