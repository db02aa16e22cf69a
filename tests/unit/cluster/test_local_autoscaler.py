"""The local autoscaling config derived from cluster.yaml (cluster/local_autoscaler.py): Ray's schema accepts it, and
it keeps every worker type's name, limits and resources (the run itself is tests/e2e/test_cluster_autoscaling.py)."""
from pathlib import Path

import pytest
import yaml

from rayft.cluster.autoscaler_policy import SCORER_ENV, SPOT_FIRST_SCORER
from rayft.cluster.cluster_yaml import ClusterYamlError, load_cluster_yaml
from rayft.cluster.local_autoscaler import (
    HEAD_TYPE,
    NODE_TYPE_LABEL,
    PROVIDER_MODULE,
    local_autoscaler_config,
    local_head_env,
)

ROOT = Path(__file__).resolve().parents[3]
CLUSTER_YAML = ROOT / "cluster.yaml"


def test_the_config_passes_rays_schema_and_keeps_every_type():
    from ray.autoscaler._private.util import validate_config

    config = local_autoscaler_config("127.0.0.1:6380", "/tmp/nodes", CLUSTER_YAML, idle_timeout_minutes=0.25)
    validate_config(config)  # the check the autoscaler runs when it loads the file
    source = load_cluster_yaml(CLUSTER_YAML)
    types = config["available_node_types"]
    assert config["head_node_type"] == HEAD_TYPE and types[HEAD_TYPE]["max_workers"] == 0
    head = source["available_node_types"][source["head_node_type"]]
    assert types[HEAD_TYPE]["resources"] == head["resources"]
    workers = {k: v for k, v in source["available_node_types"].items() if k != source["head_node_type"]}
    assert set(types) == set(workers) | {HEAD_TYPE}
    for name, nt in workers.items():
        local = types[name]
        assert local["resources"] == nt["resources"], name  # GPUs and `spot` stay: the autoscaler's choice is the same
        assert (local["min_workers"], local["max_workers"]) == (nt["min_workers"], nt["max_workers"]), name
        assert local["labels"] == {NODE_TYPE_LABEL: name}
        assert local["node_config"] == {}
    assert config["max_workers"] == source["max_workers"] and config["idle_timeout_minutes"] == 0.25
    assert config["provider"]["module"] == PROVIDER_MODULE
    assert config["provider"]["gcs_address"] == "127.0.0.1:6380"
    assert local_autoscaler_config("127.0.0.1:6380", "/tmp/nodes", CLUSTER_YAML)["idle_timeout_minutes"] == \
        source["idle_timeout_minutes"]


def test_the_provider_class_loads_the_way_the_autoscaler_loads_it():
    from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider
    from ray.autoscaler._private.providers import _get_node_provider_cls

    cls = _get_node_provider_cls({"type": "external", "module": PROVIDER_MODULE})
    assert issubclass(cls, FakeMultiNodeProvider)


def test_a_file_ray_up_refuses_is_refused(tmp_path):
    raw = yaml.safe_load(CLUSTER_YAML.read_text())
    raw["available_node_types"]["cpu-16"]["max_workers"] = "four"
    bad = tmp_path / "cluster.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ClusterYamlError, match="cpu-16.max_workers"):
        local_autoscaler_config("127.0.0.1:6380", "/tmp/nodes", bad)


def test_the_head_runs_the_scorer_cluster_yaml_sets_and_a_shortage_can_be_rehearsed(tmp_path):
    env = local_head_env(CLUSTER_YAML)
    assert env[SCORER_ENV] == SPOT_FIRST_SCORER and env["RAY_FAKE_CLUSTER"] == "1"
    plain = tmp_path / "cluster.yaml"
    plain.write_text(CLUSTER_YAML.read_text().replace(f"{SCORER_ENV}={SPOT_FIRST_SCORER}", ""))
    assert SCORER_ENV not in local_head_env(plain)
    config = local_autoscaler_config("127.0.0.1:6380", "/tmp/nodes", CLUSTER_YAML,
                                     unavailable_node_types=("gpu-1x-a10g-spot",))
    assert config["provider"]["unavailable_node_types"] == ["gpu-1x-a10g-spot"]
    with pytest.raises(ClusterYamlError, match="not worker types"):
        local_autoscaler_config("127.0.0.1:6380", "/tmp/nodes", CLUSTER_YAML, unavailable_node_types=("head",))
