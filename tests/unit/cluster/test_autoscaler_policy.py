"""The spot-first scorer (cluster/autoscaler_policy.py) inside Ray's own node-type choice (`get_nodes_for`, what the
autoscaler calls each update) with the shipped cluster.yaml's node types, and the availability tracker Ray fills when
a launch fails (AWS: InsufficientInstanceCapacity)."""
import time
from functools import partial
from pathlib import Path

import pytest
from ray.autoscaler._private.node_provider_availability_tracker import NodeProviderAvailabilityTracker
from ray.autoscaler._private.resource_demand_scheduler import _default_utilization_scorer, get_nodes_for
from ray.autoscaler.node_launch_exception import NodeLaunchException

from rayft.cluster.autoscaler_policy import SPOT_FIRST_SCORER, scorer_in, spot_first, spot_first_scorer
from rayft.cluster.cluster_yaml import load_cluster_yaml

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def cluster():
    return load_cluster_yaml(ROOT / "cluster.yaml")


def _choose(cluster, demand, scorer=spot_first_scorer, failed=(), node_types=None):
    tracker = NodeProviderAvailabilityTracker()
    for node_type in failed:
        tracker.update_node_availability(node_type, int(time.time()), NodeLaunchException(
            "InsufficientInstanceCapacity", "There is no Spot capacity available", None))
    scorer = partial(scorer, node_availability_summary=tracker.summary())
    added, left = get_nodes_for(node_types or cluster["available_node_types"], {}, cluster["head_node_type"], 10,
                                demand, scorer)
    assert not left, left
    return dict(added)


def test_the_shipped_cluster_runs_the_spot_first_scorer(cluster):
    assert scorer_in(cluster) == SPOT_FIRST_SCORER and spot_first(cluster)
    assert scorer_in({"head_start_ray_commands": ["ray start --head"]}) is None


def test_spot_first_then_on_demand_when_spot_cannot_be_launched(cluster):
    one_gpu = [{"CPU": 1, "GPU": 1}]
    assert _choose(cluster, one_gpu) == {"gpu-1x-a10g-spot": 1}
    assert _choose(cluster, one_gpu, failed=["gpu-1x-a10g-spot"]) == {"gpu-1x-a10g": 1}
    four_gpus = [{"CPU": 1, "GPU": 1}] * 4
    assert _choose(cluster, four_gpus) == {"gpu-4x-a10g-spot": 1}
    assert _choose(cluster, four_gpus, failed=["gpu-4x-a10g-spot"]) == {"gpu-4x-a10g": 1}
    # Ray's default scorer never picks the spot twin for a plain GPU request, and retries a type that failed.
    assert _choose(cluster, one_gpu, scorer=_default_utilization_scorer) == {"gpu-1x-a10g": 1}
    assert _choose(cluster, four_gpus, scorer=_default_utilization_scorer,
                   failed=["gpu-4x-a10g"]) == {"gpu-4x-a10g": 1}


def test_ray_order_is_kept_otherwise(cluster):
    assert _choose(cluster, [{"CPU": 2}]) == {"cpu-16": 1}  # no GPU node for CPU work, even if the CPU type failed
    assert _choose(cluster, [{"CPU": 2}], failed=["cpu-16"]) == {"cpu-16": 1}
    # a request for spot gets spot only: another spot type that fits when its first choice failed
    spot_only = [{"CPU": 1, "GPU": 1, "spot": 1}]
    assert _choose(cluster, spot_only) == {"gpu-1x-a10g-spot": 1}
    assert _choose(cluster, spot_only, failed=["gpu-1x-a10g-spot"]) == {"gpu-4x-a10g-spot": 1}
    # a spot type that has run before gets `memory` filled in by the autoscaler; it must not lose its place for that
    types = {k: dict(v, resources=dict(v["resources"])) for k, v in cluster["available_node_types"].items()}
    types["gpu-1x-a10g-spot"]["resources"]["memory"] = 30 * 1024 ** 3
    assert _choose(cluster, [{"CPU": 1, "GPU": 1}], node_types=types) == {"gpu-1x-a10g-spot": 1}
