"""Which node type Ray's autoscaler starts: spot first, on-demand when spot capacity is short.

cluster.yaml pairs a spot worker type with its on-demand twin (same machine and resources, plus a custom `spot: 1`
resource). Ray 2.60's autoscaler (v1, the one `ray up` runs) picks a type with `_default_utilization_scorer`: it
prefers the type whose declared resources a request fills most, so for a plain `GPU: 1` request the spot twin,
whose `spot` slot is left unused, always loses to its on-demand twin; and it ignores launch failures, so a type
the cloud cannot supply (AWS's InsufficientInstanceCapacity for spot) is retried on every update.

`spot_first_scorer` is Ray's scorer with two changes, set on the head with
`RAY_AUTOSCALER_UTILIZATION_SCORER=rayft.cluster.autoscaler_policy.spot_first_scorer` (rayft must be installed on the
head, as cluster.yaml's setup commands do):

- a type whose launch failed recently ranks below every type that can be launched (Ray's availability tracker keeps
  a failure for AUTOSCALER_NODE_AVAILABILITY_MAX_STALENESS_S, 30 minutes by default; then spot is tried again);
- among types a request fills equally, spot comes first: the unrequested `spot` slot and the runtime-filled `memory`
  and `object_store_memory` are left out of the comparison, so twins tie, and the tie goes to spot.

Everything else is Ray's order: GPU types only for work that asks for GPUs, then the best-filled type. A request that
asks for `spot` itself still gets only spot types; nothing makes a request avoid spot except removing the setting
(Ray's default scorer never picks a spot twin for a plain request) or the spot types.
"""
from __future__ import annotations

import re
from typing import Optional

SPOT_RESOURCE = "spot"
SCORER_ENV = "RAY_AUTOSCALER_UTILIZATION_SCORER"
SPOT_FIRST_SCORER = "rayft.cluster.autoscaler_policy.spot_first_scorer"
# Resources the autoscaler fills in from a running node of a type (memory) or that no request names: comparing
# them would rank a type down for having run before.
_UNCOMPARED = ("memory", "object_store_memory")


def spot_first_scorer(node_resources: dict, resources: list[dict], node_type: str, *, node_availability_summary):
    """Ray's UtilizationScorer interface: a sortable score for starting one node of `node_type` (resources
    `node_resources`) for the pending `resources`, higher is better; None if none of them fits."""
    from ray.autoscaler._private.resource_demand_scheduler import _resource_based_utilization_scorer

    requested = {k for r in resources for k, v in r.items() if v > 0}
    compared = {k: v for k, v in node_resources.items()
                if k in requested or (k != SPOT_RESOURCE and k not in _UNCOMPARED)}
    base = _resource_based_utilization_scorer(compared, resources,
                                              node_availability_summary=node_availability_summary)
    if base is None:
        return None
    gpu_ok, *fill = base
    record = (getattr(node_availability_summary, "node_availabilities", None) or {}).get(node_type)
    launchable = record is None or bool(record.is_available)
    is_spot = node_resources.get(SPOT_RESOURCE, 0) > 0
    return (gpu_ok, launchable, *fill, is_spot)


def scorer_in(cluster_config: dict) -> Optional[str]:
    """The scorer a cluster config sets on its head (`RAY_AUTOSCALER_UTILIZATION_SCORER=...` in
    head_start_ray_commands), or None for Ray's default."""
    for command in cluster_config.get("head_start_ray_commands") or []:
        m = re.search(rf"\b{SCORER_ENV}=(\S+)", str(command))
        if m:
            return m.group(1).strip("'\"")
    return None


def spot_first(cluster_config: dict) -> bool:
    """Whether the cluster's autoscaler starts spot types before their on-demand twins."""
    return scorer_in(cluster_config) == SPOT_FIRST_SCORER
