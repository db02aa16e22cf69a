"""Encrypted exports load in the serving engine (no Ray); a tampered file is refused naming it; the server's
inference check writes one audit line per decision and never the API key."""
import json
import os
import shutil

import pytest

KEY_B64 = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="  # a test key; real keys: openssl rand -base64 32


@pytest.fixture
def secured(monkeypatch):
    from rayft.security.config import SecurityConfig

    monkeypatch.setenv("RAYFT_TEST_KEY", KEY_B64)
    return SecurityConfig(encrypt_artifacts=True, key_env="RAYFT_TEST_KEY")


def _greedy(engine, text="hello", adapter=None):
    from rayft.serve.engine import GenRequest

    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    return engine.generate_text([GenRequest(ids, 8, temperature=0.0, adapter=adapter)])[0][0]


def test_encrypted_export_serves_like_the_plain_one_and_tampering_is_refused(tiny_model_dir, tmp_path, secured):
    from rayft.security.artifacts import ArtifactError, finish_export
    from rayft.serve.engine import Engine
    from tests.serve_helpers import train_toy_adapter

    adapter = train_toy_adapter(tiny_model_dir, str(tmp_path / "adapter"), "We open at nine.", steps=15)
    merged = str(tmp_path / "merged")
    shutil.copytree(tiny_model_dir, merged)
    plain = Engine(tiny_model_dir, adapters={"a": adapter}, adapter_cache_size=1)
    want_base, want_adapter = _greedy(plain), _greedy(plain, adapter="a")

    enc_adapter = str(tmp_path / "adapter-enc")
    shutil.copytree(adapter, enc_adapter)
    assert finish_export(merged, secured) and finish_export(enc_adapter, secured)
    assert not os.path.exists(os.path.join(merged, "model.safetensors"))  # only ciphertext at rest

    eng = Engine(merged, adapters={"a": enc_adapter}, adapter_cache_size=1, security=secured)
    assert _greedy(eng) == want_base
    assert _greedy(eng, adapter="a") == want_adapter

    # Without the key the encrypted export does not load at all.
    from rayft.security.config import ArtifactKeyError, SecurityConfig

    with pytest.raises(ArtifactKeyError, match="RAYFT_MISSING_KEY"):
        Engine(merged, security=SecurityConfig(key_env="RAYFT_MISSING_KEY"))

    # One flipped byte in the weights: refused before anything is decrypted, naming the file.
    target = os.path.join(merged, "model.safetensors.enc")
    with open(target, "rb") as f:
        data = bytearray(f.read())
    data[len(data) // 2] ^= 0x40
    with open(target, "wb") as f:
        f.write(bytes(data))
    with pytest.raises(ArtifactError, match=r"model\.safetensors\.enc: tampered or corrupted"):
        Engine(merged, security=secured)


def test_pickle_weights_refused_by_the_engine(tiny_model_dir, tmp_path):
    from rayft.security.artifacts import ArtifactError
    from rayft.serve.engine import Engine

    folder = str(tmp_path / "model")
    shutil.copytree(tiny_model_dir, folder)
    with open(os.path.join(folder, "pytorch_model.bin"), "wb") as f:
        f.write(b"\x80\x04\x95")  # the start of a pickle
    with pytest.raises(ArtifactError, match=r"pytorch_model\.bin: a pickle-based weight file"):
        Engine(folder)


def test_server_inference_decisions_are_audited(tmp_path, repo_root):
    """The real decision methods both ingresses use (serve/gate.py, policy + audit log), without Ray Serve."""
    from rayft.serve.auth import KeyStore, Principal, hash_key
    from rayft.serve.config import ServeConfig
    from rayft.serve.gate import Gate
    from rayft.serve.schemas import APIError

    audit_path = tmp_path / "audit.jsonl"
    replica = Gate(ServeConfig(), "bot", {}, {"policy_file": str(repo_root / "examples" / "security" / "policy.yaml"),
                                              "audit_log": str(audit_path)})
    check = replica.check_infer

    check(Principal("acme", frozenset({"support"})), "bot:support", "support")  # tenant role: infer
    with pytest.raises(APIError) as e:
        check(Principal("initech", "*"), "bot", None)  # tenant not in the policy
    assert e.value.status == 403 and e.value.code == "action_not_allowed"
    with pytest.raises(APIError) as e:
        check(Principal("acme", frozenset({"support"})), "bot:sales", "sales")  # key not bound to the adapter
    assert e.value.status == 403 and e.value.code == "adapter_not_allowed"
    secret = "sk-test-0123456789abcdef"
    store = KeyStore({hash_key(secret): Principal("acme", "*")})
    with pytest.raises(APIError) as e:
        store.authenticate("Bearer " + secret[:-1] + "X")
    replica.record_infer(False, None, "/v1/completions", f"HTTP {e.value.status}: {e.value.code}")
    replica.audit.close()

    got = [json.loads(x) for x in audit_path.read_text().splitlines()]
    assert [(x["who"], x["role"], x["outcome"], x["source"]) for x in got] == [
        ("acme", "tenant", "allowed", "server"),
        ("initech", None, "denied", "server"),
        ("acme", "tenant", "denied", "server"),
        ("-", None, "denied", "server"),
    ]
    assert all(x["action"] == "infer" for x in got) and got[0]["target"] == "bot:support"
    assert secret[:-1] not in audit_path.read_text() and hash_key(secret) not in audit_path.read_text()
