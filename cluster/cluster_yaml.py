"""`cluster.yaml`: read it, validate it the way `ray up` does, and describe its worker types.

`ray up` runs `prepare_config` (defaults of the provider, merged setup commands, per-type min/max
workers) and then `validate_config` (Ray's JSON schema plus head/min-worker checks) before it calls
the cloud. `load_cluster_yaml` runs exactly those two steps and nothing that talks to AWS; resources
are declared per node type in the file, so the launcher's auto-detection (an AWS call) is not needed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Optional

# The project's cluster.yaml, shipped as package data (cluster/cluster.yaml links to the file at the project root).
DEFAULT_CLUSTER_YAML = Path(str(files("rayft.cluster").joinpath("cluster.yaml")))

# GPU model and memory per EC2 instance type (AWS's published specs). `rayft plan` needs the memory
# of one GPU, which is not in the launcher config. Unknown instance types: set `gpu_memory_gib` by
# adding a `labels: {gpu_memory_gib: "24"}` entry to the node type.
GPU_INSTANCES: dict[str, tuple[str, float]] = {
    "g4dn.xlarge": ("T4", 16), "g4dn.2xlarge": ("T4", 16), "g4dn.12xlarge": ("T4", 16),
    "g5.xlarge": ("A10G", 24), "g5.2xlarge": ("A10G", 24), "g5.4xlarge": ("A10G", 24),
    "g5.8xlarge": ("A10G", 24), "g5.12xlarge": ("A10G", 24), "g5.24xlarge": ("A10G", 24),
    "g5.48xlarge": ("A10G", 24),
    "g6.xlarge": ("L4", 24), "g6.2xlarge": ("L4", 24), "g6.12xlarge": ("L4", 24), "g6.48xlarge": ("L4", 24),
    "g6e.xlarge": ("L40S", 48), "g6e.2xlarge": ("L40S", 48), "g6e.12xlarge": ("L40S", 48),
    "g6e.48xlarge": ("L40S", 48),
    "p3.2xlarge": ("V100", 16), "p3.8xlarge": ("V100", 16), "p3.16xlarge": ("V100", 16),
    "p4d.24xlarge": ("A100", 40), "p4de.24xlarge": ("A100", 80),
    "p5.48xlarge": ("H100", 80), "p5e.48xlarge": ("H200", 141), "p5en.48xlarge": ("H200", 141),
}


class ClusterYamlError(ValueError):
    """cluster.yaml cannot be used; the message names the field and the fix."""


@dataclass(frozen=True)
class WorkerType:
    """One worker node type of the cluster, as `rayft plan` and the fit checks see it."""

    name: str
    instance_type: str
    cpus: int
    gpus: int
    min_workers: int
    max_workers: int
    spot: bool
    gpu_name: Optional[str]
    gpu_memory_gib: Optional[float]

    def workers_per_node(self, cpus_per_worker: float, use_gpu: bool) -> int:
        """Ray Train workers one node holds: each takes one GPU (if use_gpu) and cpus_per_worker CPUs."""
        by_cpu = math.floor(self.cpus / cpus_per_worker + 1e-9) if cpus_per_worker > 0 else 10**6
        return min(self.gpus, by_cpu) if use_gpu else by_cpu

    def nodes_for(self, num_workers: int, cpus_per_worker: float, use_gpu: bool) -> Optional[int]:
        """Nodes of this type that `num_workers` training workers need; None if more than max_workers."""
        per_node = self.workers_per_node(cpus_per_worker, use_gpu)
        if per_node < 1:
            return None
        nodes = math.ceil(num_workers / per_node)
        return nodes if nodes <= self.max_workers else None


def read_cluster_yaml(path: str | Path = DEFAULT_CLUSTER_YAML) -> dict:
    from .config import read_yaml_mapping

    return read_yaml_mapping(path, ClusterYamlError,
                             "no such cluster config; pass the path of your cluster.yaml (--cluster FILE)",
                             "(cluster_name, provider, ...)")


def prepare_and_validate(raw: dict, source: str = "cluster.yaml") -> dict:
    """The launcher's own steps before any cloud call: `prepare_config` then `validate_config`."""
    import copy
    import logging

    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    logging.getLogger("ray.autoscaler._private.util").setLevel(logging.WARNING)  # "setting max workers ..." lines
    try:
        prepared = prepare_config(copy.deepcopy(raw))
        validate_config(prepared)
    except jsonschema.ValidationError as e:
        where = ".".join(str(x) for x in e.absolute_path) or "(top level)"
        raise ClusterYamlError(f"{source}: {where}: {e.message} (Ray's cluster config schema)") from None
    except (ValueError, RuntimeError, AssertionError, KeyError, NotImplementedError) as e:
        raise ClusterYamlError(f"{source}: {e}") from None
    return prepared


def load_cluster_yaml(path: str | Path = DEFAULT_CLUSTER_YAML) -> dict:
    """Read and validate a cluster launcher config; returns it with the launcher's defaults filled in."""
    return prepare_and_validate(read_cluster_yaml(path), str(path))


def worker_types(config: dict, source: str = "cluster.yaml") -> list[WorkerType]:
    """The non-head node types of a prepared config, with GPU model and memory where known."""
    out = []
    head = config.get("head_node_type")
    for name, nt in config.get("available_node_types", {}).items():
        if name == head:
            continue
        res = nt.get("resources", {})
        node = nt.get("node_config", {})
        itype = str(node.get("InstanceType", ""))
        gpus = int(res.get("GPU", 0))
        gpu_name, mem = GPU_INSTANCES.get(itype, (None, None))
        label_mem = (nt.get("labels") or {}).get("gpu_memory_gib")
        if label_mem is not None:
            try:
                mem = float(label_mem)
            except ValueError:
                raise ClusterYamlError(
                    f"{source}: available_node_types.{name}.labels.gpu_memory_gib: {label_mem!r} is not a number; "
                    "write the memory of one GPU in GiB, for example \"24\"") from None
        out.append(WorkerType(
            name=name, instance_type=itype, cpus=int(res.get("CPU", 0)), gpus=gpus,
            min_workers=int(nt.get("min_workers", 0)), max_workers=int(nt.get("max_workers", 0)),
            spot=(node.get("InstanceMarketOptions") or {}).get("MarketType") == "spot",
            gpu_name=gpu_name if gpus else None, gpu_memory_gib=mem if gpus else None,
        ))
    return out


def fitting_worker_types(train, types: list[WorkerType]) -> list[tuple[WorkerType, int]]:
    """(type, nodes needed) for every type that can hold `train.num_workers` workers of this config."""
    fits = []
    for wt in types:
        if train.use_gpu and wt.gpus == 0:
            continue
        nodes = wt.nodes_for(train.num_workers, train.cpus_per_worker, train.use_gpu)
        if nodes is not None:
            fits.append((wt, nodes))
    return fits
