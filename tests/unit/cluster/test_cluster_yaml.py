"""cluster.yaml is a real Ray cluster launcher config and holds every GPU example config.

Validation runs the launcher's own steps before it calls the cloud (`prepare_config`, then
`validate_config` with Ray's JSON schema, as `ray up` does in `_bootstrap_config`); no AWS call and no
network: resources are declared per node type, so the launcher's AWS auto-detection is not needed.
"""
import copy
from pathlib import Path

import pytest
import yaml

from rayft.cluster.cluster_yaml import (
    ClusterYamlError,
    fitting_worker_types,
    load_cluster_yaml,
    prepare_and_validate,
    read_cluster_yaml,
    worker_types,
)
from rayft.cluster.config import load_config

ROOT = Path(__file__).resolve().parents[3]
CLUSTER_YAML = ROOT / "cluster.yaml"


def _gpu_examples():
    out = []
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        cfg = load_config(path)
        if cfg.train.use_gpu:
            out.append(pytest.param(cfg, id=path.name))
    return out


@pytest.fixture(scope="module")
def prepared():
    return load_cluster_yaml(CLUSTER_YAML)


def test_validates_with_rays_own_schema(prepared):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(CLUSTER_YAML.read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))  # exactly the launcher's calls; raises if invalid
    assert prepared["provider"]["type"] == "aws"
    assert prepared["cluster_name"] == "rayft"


def test_head_is_cpu_only_and_workers_scale_from_zero(prepared):
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["max_workers"] == 0
    types = worker_types(prepared)
    gpu_counts = sorted({wt.gpus for wt in types if wt.gpus})
    assert {1, 4, 8} <= set(gpu_counts)
    for wt in types:
        assert wt.min_workers == 0, f"{wt.name}: min_workers must be 0 (scale from zero)"
        assert 1 <= wt.max_workers <= prepared["max_workers"]
        assert wt.cpus > 0
        if wt.gpus:
            assert wt.gpu_memory_gib, f"{wt.name}: {wt.instance_type} has no known GPU memory"
    assert prepared["idle_timeout_minutes"] > 0
    assert any(wt.spot for wt in types), "spot capacity should be offered as a node type"


def test_docker_image_has_cuda_and_the_same_ray(prepared):
    import ray

    image = prepared["docker"]["image"]
    assert image.endswith("-gpu") and f":{ray.__version__}-" in image, image
    assert prepared["docker"]["container_name"]


def test_setup_installs_rayft_from_the_synced_project(prepared):
    mounts = prepared["file_mounts"]
    remote = next(r for r, local in mounts.items() if local == ".")
    assert any("pip install" in c and remote in c for c in prepared["setup_commands"])
    # the launcher merges the common setup commands into the head's and the workers'
    assert prepared["worker_setup_commands"][: len(prepared["setup_commands"])] == prepared["setup_commands"]
    assert {"**/.venv", "**/.git", "**/runs", "**/mlruns"} <= set(prepared["rsync_exclude"])


@pytest.mark.parametrize("cfg", _gpu_examples())
def test_every_gpu_example_fits_a_worker_type(prepared, cfg):
    fits = fitting_worker_types(cfg.train, worker_types(prepared))
    assert fits, (f"{cfg.name}: {cfg.train.num_workers} workers x (1 GPU, {cfg.train.cpus_per_worker} CPUs) "
                  "fit no worker type of cluster.yaml")
    for wt, nodes in fits:
        per_node = wt.workers_per_node(cfg.train.cpus_per_worker, True)
        assert per_node * nodes >= cfg.train.num_workers
        assert per_node <= wt.gpus and per_node * cfg.train.cpus_per_worker <= wt.cpus
        assert nodes <= wt.max_workers


def test_gpu_examples_exist():
    assert _gpu_examples(), "examples/ should hold at least one GPU config (train.use_gpu: true)"


def test_a_schema_error_names_the_field():
    raw = read_cluster_yaml(CLUSTER_YAML)
    raw["available_node_types"]["gpu-4x-a10g"]["resources"]["GPU"] = "four"
    with pytest.raises(ClusterYamlError, match=r"available_node_types\.gpu-4x-a10g\.resources\.GPU"):
        prepare_and_validate(raw)
    raw = read_cluster_yaml(CLUSTER_YAML)
    raw["head_node_type"] = "nope"
    with pytest.raises(ClusterYamlError, match="head_node_type"):
        prepare_and_validate(raw)


def test_missing_file_says_what_to_pass(tmp_path):
    with pytest.raises(ClusterYamlError, match="no such cluster config"):
        load_cluster_yaml(tmp_path / "nope.yaml")


def test_an_example_too_big_for_every_type_fits_none(prepared):
    cfg = load_config(ROOT / "examples" / "qwen2.5-1.5b-gpu.yaml", ["train.num_workers=64", "train.global_batch_size=null"])
    assert fitting_worker_types(cfg.train, worker_types(prepared)) == []


def test_kuberay_rayjob_manifest_runs_rayft_with_the_same_ray():
    import ray

    doc = yaml.safe_load((ROOT / "cluster" / "kuberay" / "rayjob.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    assert doc["spec"]["entrypoint"].startswith("python -m rayft.cluster.cli train examples/")
    assert doc["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__
    workers = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert all(g["minReplicas"] == 0 for g in workers)
