"""Per-key rate limits, per-tenant usage and the access log of the serving gate (serve/gate.py), without Ray."""
import json
import logging

import pytest

from rayft.serve.auth import Principal
from rayft.serve.config import ServeConfig
from rayft.serve.gate import Gate
from rayft.serve.schemas import APIError


def test_requests_per_minute_then_429_with_retry_after():
    gate = Gate(ServeConfig(), "m", {})
    who = Principal("acme", "*", requests_per_minute=2, key_id="abc")
    gate.check_rate(who)
    gate.check_rate(who)
    with pytest.raises(APIError) as e:
        gate.check_rate(who)
    assert e.value.status == 429 and 1 <= int(e.value.headers["Retry-After"]) <= 60
    gate.check_rate(Principal("acme", "*", requests_per_minute=2, key_id="other"))  # limits are per key
    assert gate.usage.by_tenant["acme"]["rate_limited"] == 1


def test_tokens_per_minute_count_prompt_and_completion():
    gate = Gate(ServeConfig(), "m", {})
    who = Principal("acme", "*", tokens_per_minute=100, key_id="k")
    gate.check_rate(who)
    gate.finish(who, "r1", "/v1/completions", "m", "default", None, 200, 60, 50, 0.0)  # 110 tokens spent
    with pytest.raises(APIError, match="rate limit") as e:
        gate.check_rate(who)
    assert e.value.code == "rate_limit_exceeded"


def test_usage_and_one_access_log_line_without_text_or_key(caplog):
    gate = Gate(ServeConfig(), "m", {})
    who = Principal("globex", frozenset({"b"}), key_id="0123456789ab")
    with caplog.at_level(logging.INFO, logger="rayft.access"):
        gate.finish(who, "req-1", "/v1/chat/completions", "m:b", "default", "b", 200, 12, 30, 0.0)
        gate.finish(who, "req-2", "/v1/chat/completions", "m:b", "default", "b", 400, 0, 0, 0.0)
    assert gate.usage.by_tenant["globex"] == {"requests": 2, "prompt_tokens": 12, "completion_tokens": 30,
                                              "errors": 1, "rate_limited": 0}
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "rayft.access"]
    assert [(x["request_id"], x["status"], x["tenant"], x["key_id"], x["adapter"]) for x in lines] == [
        ("req-1", 200, "globex", "0123456789ab", "b"), ("req-2", 400, "globex", "0123456789ab", "b")]
    assert set(lines[0]) == {"ts", "request_id", "path", "tenant", "key_id", "model", "version", "adapter", "status",
                             "prompt_tokens", "completion_tokens", "latency_ms"}


def test_a_bad_limit_in_the_keys_file_names_the_entry_and_field(tmp_path):
    from rayft.serve.auth import KeyStore

    path = tmp_path / "keys.yaml"
    path.write_text(f"- {{sha256: {'a' * 64}, tenant: acme, adapters: '*', requests_per_minute: -5}}\n")
    with pytest.raises(ValueError, match=r"entry 0 \(acme\): requests_per_minute is -5; give a whole number >= 1"):
        KeyStore.from_file(str(path))
