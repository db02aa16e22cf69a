"""cluster.yaml's autoscaling rehearsed on one machine: Ray's own autoscaler over its fake multi-node provider.

`ray start --head --autoscaling-config=FILE` with `RAY_FAKE_CLUSTER=1` runs the real autoscaler (v1, Ray 2.60's
default, the one `ray up` runs on AWS) in the head's monitor process. Ray's test provider `fake_multinode`
"launches" a worker node by starting a raylet with that node type's resources as local processes (children of the
monitor) and terminates it by killing them. `local_autoscaler_config` builds that config from a cluster.yaml:

- every worker type keeps its name, min_workers, max_workers and resources (CPU, GPU, custom ones such as
  `spot`), so the autoscaler makes the choices it would make on the cloud for the same requests. GPUs stay as a
  logical resource with no device behind it: a CPU-only request never starts a GPU type (Ray's autoscaler keeps GPU
  nodes for GPU work), and a task asking for `num_gpus=1` gets a GPU type, but nothing here can run CUDA. CPUs are
  logical too: a `cpu-16` node holds 16 CPU slots on a 2-core machine; the work runs as slowly as the cores allow.
  Nothing is added to the resources: the autoscaler scores a type by the utilization of every resource it
  declares, so an extra one (even `object_store_memory`) would change its choice.
- the head is renamed `ray.head.default` (the provider's fixed name) and keeps its resources (`CPU: 0` in the
  shipped file: no training work lands on it, so a job needs a worker node).
- `idle_timeout_minutes`, `upscaling_speed` and the cluster's `max_workers` come from the file; a rehearsal can
  shorten the idle timeout (the schema takes fractions of a minute).
- each worker node carries the label `rayft.io/node-type` with its type's name, so `ray.nodes()` shows which type
  the autoscaler started.
- nothing of the cloud is kept: no region, node_config, docker, setup or start commands (the schema wants the
  command fields, empty). The head's autoscaler runs the scorer cluster.yaml sets on its head, if any
  (`local_head_env`: spot first, on-demand when spot is short, cluster/autoscaler_policy.py).
- `unavailable_node_types` rehearses a capacity shortage: launching one of them fails as AWS fails a spot request
  it cannot fill (a NodeLaunchException, InsufficientInstanceCapacity), and the autoscaler records it.

The provider is `LocalNodeProvider`, Ray's `FakeMultiNodeProvider` with one change: each node it starts gets its
own temp dir and the head's address. Ray's provider gives its nodes neither, so they share the head's temp dir
(session, logs, `runtime_resources`) and take the machine's routed address. The shared `runtime_resources` breaks
jobs: a node's runtime env agent unpacks a job's `working_dir` with `overwrite=True` on its first use there, which
deletes and re-creates the folder the job's driver, on the head, runs in (the driver then fails on `os.getcwd()`).

Ray's `ray.cluster_utils.AutoscalingCluster` builds a similar config for Ray's own tests but starts and stops with
`ray stop --force`, which would stop every Ray on the machine; the tests start the head themselves
(tests/autoscaling_helpers.py) and stop it by process id.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Optional

from ray._private import ray_constants
from ray._private.node import Node
from ray._private.parameter import RayParams
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider
from ray.autoscaler.node_launch_exception import NodeLaunchException
from ray.autoscaler.tags import (
    NODE_KIND_WORKER,
    STATUS_UP_TO_DATE,
    TAG_RAY_NODE_KIND,
    TAG_RAY_NODE_NAME,
    TAG_RAY_NODE_STATUS,
    TAG_RAY_USER_NODE_TYPE,
)

from .autoscaler_policy import SCORER_ENV, scorer_in
from .cluster_yaml import DEFAULT_CLUSTER_YAML, ClusterYamlError, load_cluster_yaml

# The provider tags its head node with this type name, whatever the config calls it.
HEAD_TYPE = "ray.head.default"
# The label each rehearsal worker node carries, naming its cluster.yaml type.
NODE_TYPE_LABEL = "rayft.io/node-type"
PROVIDER_MODULE = "rayft.cluster.local_autoscaler.LocalNodeProvider"

# The provider runs no commands on its nodes; Ray's schema still wants these fields.
_EMPTY_FIELDS = {
    "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
    "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
    "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
    "worker_start_ray_commands": [],
}


def local_autoscaler_config(gcs_address: str, nodes_temp_dir: str | Path,
                            cluster_yaml: str | Path = DEFAULT_CLUSTER_YAML,
                            idle_timeout_minutes: Optional[float] = None,
                            unavailable_node_types: tuple[str, ...] = ()) -> dict:
    """The `--autoscaling-config` of a local head at `gcs_address` (host:port) for the node types of
    `cluster_yaml` (validated first, as `ray up` does); worker node N keeps its files in `nodes_temp_dir`/N.
    Raises ClusterYamlError for a file `ray up` would refuse."""
    prepared = load_cluster_yaml(cluster_yaml)
    head_name = prepared["head_node_type"]
    workers = set(prepared["available_node_types"]) - {head_name}
    unknown = sorted(set(unavailable_node_types) - workers)
    if unknown:
        raise ClusterYamlError(f"{cluster_yaml}: unavailable_node_types {unknown}: not worker types of this file; "
                               f"use some of {sorted(workers)}")
    types: dict = {HEAD_TYPE: {"resources": dict(head_resources(prepared)), "node_config": {}, "max_workers": 0}}
    for name, nt in prepared["available_node_types"].items():
        if name == head_name:
            continue
        types[name] = {
            "resources": dict(nt.get("resources", {})),
            "node_config": {},
            "min_workers": int(nt.get("min_workers", 0)),
            "max_workers": int(nt.get("max_workers", 0)),
            "labels": {NODE_TYPE_LABEL: name},
        }
    idle = prepared.get("idle_timeout_minutes", 5) if idle_timeout_minutes is None else idle_timeout_minutes
    return {
        "cluster_name": f"{prepared['cluster_name']}-local",
        "max_workers": int(prepared["max_workers"]),
        "upscaling_speed": float(prepared.get("upscaling_speed", 1.0)),
        "idle_timeout_minutes": float(idle),
        "provider": {
            "type": "external",
            "module": PROVIDER_MODULE,
            "gcs_address": gcs_address,
            "nodes_temp_dir": str(nodes_temp_dir),
            "unavailable_node_types": list(unavailable_node_types),
            # The provider names nodes by their (deterministic) node id; the autoscaler must key them the same way.
            "use_node_id_as_ip": True,
            # No SSH: the provider starts the raylet itself.
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": types,
        "head_node_type": HEAD_TYPE,
        **_EMPTY_FIELDS,
    }


def local_head_env(cluster_yaml: str | Path = DEFAULT_CLUSTER_YAML) -> dict:
    """The environment of the local head's `ray start --head`: the fake provider's switch, loopback addresses
    (otherwise `ray start` turns a loopback --node-ip-address into the machine's routed address), and the
    autoscaler's scorer if cluster.yaml sets one on its head."""
    env = {"RAY_FAKE_CLUSTER": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    scorer = scorer_in(load_cluster_yaml(cluster_yaml))
    if scorer:
        env[SCORER_ENV] = scorer
    return env


def head_resources(prepared: dict) -> dict:
    """The head type's resources (`ray start --head` takes them as --num-cpus, --num-gpus, --resources)."""
    return dict(prepared["available_node_types"][prepared["head_node_type"]].get("resources", {}))


class LocalNodeProvider(FakeMultiNodeProvider):
    """Ray's fake multi-node provider; each node it starts has its own temp dir and the head's IP address, and
    launching a type listed in the provider's `unavailable_node_types` fails as a cloud without capacity fails.

    Runs in the head's monitor process (`ray start --head` with RAY_FAKE_CLUSTER=1). A node is started as
    `FakeMultiNodeProvider._create_node_with_resources_and_labels` starts it in Ray 2.60, plus `temp_dir` and
    `node_ip_address`."""

    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        node_type = tags[TAG_RAY_USER_NODE_TYPE]
        if node_type in self.provider_config.get("unavailable_node_types", []):
            raise NodeLaunchException("InsufficientInstanceCapacity",
                                      f"no capacity for {node_type} (a rehearsed shortage)", None)
        resources = copy.deepcopy(resources)
        with self.lock:
            next_id = self._next_hex_node_id()
            ray_params = RayParams(
                min_worker_port=0, max_worker_port=0, dashboard_port=None, dashboard_agent_listen_port=0,
                num_cpus=resources.pop("CPU", 0), num_gpus=resources.pop("GPU", 0),
                object_store_memory=resources.pop("object_store_memory", None),
                resources=resources, labels=labels,
                redis_address=self._gcs_address, gcs_address=self._gcs_address,
                node_ip_address=self._gcs_address.rsplit(":", 1)[0],
                temp_dir=os.path.join(self.provider_config["nodes_temp_dir"], str(self._next_node_id)),
                env_vars={
                    "RAY_OVERRIDE_NODE_ID_FOR_TESTING": next_id,
                    "RAY_CLOUD_INSTANCE_ID": next_id,
                    "RAY_NODE_TYPE_NAME": node_type,
                    ray_constants.RESOURCES_ENVIRONMENT_VARIABLE: json.dumps(resources),
                    ray_constants.LABELS_ENVIRONMENT_VARIABLE: json.dumps(labels),
                },
            )
            node = Node(ray_params, head=False, shutdown_at_exit=False, spawn_reaper=False)
            all_tags = {TAG_RAY_NODE_KIND: NODE_KIND_WORKER, TAG_RAY_USER_NODE_TYPE: node_type,
                        TAG_RAY_NODE_NAME: next_id, TAG_RAY_NODE_STATUS: STATUS_UP_TO_DATE}
            all_tags.update(tags)
            self._nodes[next_id] = {"tags": all_tags, "node": node}
