"""The `serve:` section, the Serve deployment options built from it, and the API-key store (no Ray needed)."""
import pytest


def test_every_config_parses_with_a_default_serve_section(repo_root):
    from rayft.cluster.config import load_config

    for path in sorted((repo_root / "examples").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.serve.host == "127.0.0.1" and cfg.serve.model is None


def test_serve_typos_and_bad_values_name_the_field(repo_root):
    from rayft.cluster.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"serve\.max_batch: unknown field; allowed here: .*max_batch_size"):
        load_config(repo_root / "examples" / "quickstart.yaml", ["serve.max_batch=4"])
    with pytest.raises(ConfigError, match=r"serve\.adapter_cache_size: 0 is not valid"):
        load_config(repo_root / "examples" / "quickstart.yaml", ["serve.adapter_cache_size=0"])
    with pytest.raises(ConfigError, match="API keys are required"):
        load_config(repo_root / "examples" / "quickstart.yaml", ["serve.host=0.0.0.0"])
    with pytest.raises(ConfigError, match=r"min_replicas 3 > max_replicas 2"):
        load_config(repo_root / "examples" / "quickstart.yaml",
                    ["serve.autoscaling={min_replicas: 3, max_replicas: 2}"])
    with pytest.raises(ConfigError, match="quantization: int8 serves a merged model"):
        load_config(repo_root / "examples" / "quickstart.yaml", ["serve.quantization=int8", "serve.adapters={a: /x}"])
    with pytest.raises(ConfigError, match=r"quantization: 'bnb-nf4' loads the model with bitsandbytes on a CUDA GPU, "
                                          r"but num_gpus_per_replica is 0; set num_gpus_per_replica: 1 .* int8"):
        load_config(repo_root / "examples" / "quickstart.yaml", ["serve.quantization=bnb-nf4"])
    with pytest.raises(ConfigError, match=r"serve\.quantization: 'int4' is not valid"):
        load_config(repo_root / "examples" / "quickstart.yaml", ["serve.quantization=int4"])
    assert load_config(repo_root / "examples" / "quickstart.yaml",
                       ["serve.quantization=bnb-int8", "serve.num_gpus_per_replica=1"]).serve.quantization == "bnb-int8"


def test_deployment_options_follow_the_config():
    from rayft.serve.app import build_app
    from rayft.serve.config import AutoscalingSettings, ServeConfig

    d = build_app(ServeConfig(engine="hf", model="/m", num_cpus_per_replica=2, num_gpus_per_replica=0.5, max_ongoing_requests=16,
                              autoscaling=AutoscalingSettings(min_replicas=1, max_replicas=3, target_ongoing_requests=4)),
                  "/m")._bound_deployment
    auto = d._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 3, 4)
    assert d.ray_actor_options["num_cpus"] == 2 and d.ray_actor_options["num_gpus"] == 0.5
    assert d.max_ongoing_requests > 16  # the replica answers 503 itself at 16, Serve lets that through
    fixed = build_app(ServeConfig(engine="hf", model="/m", num_replicas=2), "/m")._bound_deployment
    assert fixed.num_replicas == 2


def test_key_store(tmp_path):
    import yaml

    from rayft.serve.auth import KeyStore, hash_key
    from rayft.serve.schemas import APIError

    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump([{"sha256": hash_key("k1"), "tenant": "acme", "adapters": ["x"]},
                                    {"sha256": hash_key("k2"), "tenant": "all", "adapters": "*", "base": False}]))
    keys = KeyStore.from_file(str(path))
    acme = keys.authenticate("Bearer k1")
    assert acme.tenant == "acme" and acme.may_use("x") and not acme.may_use("y") and acme.may_use(None)
    everyone = keys.authenticate("bearer k2")
    assert everyone.may_use("anything") and not everyone.may_use(None)
    for header in (None, "", "Bearer ", "Basic k1", "Bearer nope"):
        with pytest.raises(APIError) as e:
            keys.authenticate(header)
        assert e.value.status == 401 and "nope" not in e.value.message
    path.write_text(yaml.safe_dump([{"sha256": "short", "tenant": "x"}]))
    with pytest.raises(ValueError, match="entry 0 needs `sha256`"):
        KeyStore.from_file(str(path))
