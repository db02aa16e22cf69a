"""The OpenAI-compatible Serve apps over real HTTP on 127.0.0.1 (a free port), with the official `openai` client.

Two applications share one Serve instance, deployed once for the module:
  /merged  the merged model of adapter `a`, plus an A/B name (`support`: v1 = merged a, v2 = merged b);
           a small max_ongoing_requests for the 503 test; no keys
  /lora    the tiny base with adapters a, b, c (LRU of 2) chosen per request; API keys required
"""
import concurrent.futures as cf
import json
import socket
import urllib.error
import urllib.request

import pytest

ANSWER_A = "Yes, we are open from nine to five."
ANSWER_B = "No. Please call support."
KEY_1, KEY_2 = "sk-test-tenant-one-0123456789", "sk-test-tenant-two-9876543210"
HELLO = [{"role": "user", "content": "hello"}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_local, tiny_model_dir, toy_adapters, tmp_path_factory):
    import yaml
    from ray import serve

    from rayft.serve.app import build_app
    from rayft.serve.auth import hash_key
    from rayft.serve.config import ABSplit, ABVersion, ServeConfig
    from tests.serve_helpers import merge_toy_adapter, register_champion_adapter

    root = tmp_path_factory.mktemp("serve-api")
    ad = dict(toy_adapters)  # a, b, c answer ANSWER_A, ANSWER_B, "Maybe later." (tests/integration/conftest.py)
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text("{}")  # on disk, but not a loadable adapter
    ad["broken"] = str(root / "broken")
    # an adapter from the MLflow registry (SQLite): b logged by a run, registered, alias champion
    tracking, ad["reg"] = register_champion_adapter(root, ad["b"], experiment="serve-api")
    merged_a = merge_toy_adapter(tiny_model_dir, ad["a"], str(root / "merged-a"))
    merged_b = merge_toy_adapter(tiny_model_dir, ad["b"], str(root / "merged-b"))
    keys = root / "keys.yaml"
    keys.write_text(yaml.safe_dump([
        {"sha256": hash_key(KEY_1), "tenant": "one", "adapters": "*"},
        {"sha256": hash_key(KEY_2), "tenant": "two", "adapters": ["b"], "base": False},
    ]))
    port = _free_port()
    common = dict(engine="hf", port=port, num_cpus_per_replica=0.5, torch_threads=1, batch_wait_timeout_s=0.05, max_batch_size=8)
    merged_cfg = ServeConfig(model=merged_a, model_name="tiny-merged", max_ongoing_requests=4, max_tokens_limit=256,
                             ab_split=ABSplit(name="support", versions=[ABVersion(label="v1", model=merged_a, weight=1),
                                                                        ABVersion(label="v2", model=merged_b, weight=1)]),
                             **common)
    lora_cfg = ServeConfig(model=tiny_model_dir, model_name="tiny", adapters=ad, adapter_cache_size=2,
                           api_keys_file=str(keys), **common)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(merged_cfg, merged_a), name="merged", route_prefix="/merged", blocking=False)
    serve.run(build_app(lora_cfg, tiny_model_dir, tracking_uri=tracking), name="lora", route_prefix="/lora",
              blocking=False)
    yield {"url": f"http://127.0.0.1:{port}", "adapters": ad}
    serve.delete("merged")
    serve.delete("lora")
    serve.shutdown()


def _http(url, body=None, headers=None, method=None, raw=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


def _client(server, app, key="unused"):
    from openai import OpenAI

    return OpenAI(base_url=f"{server['url']}/{app}/v1", api_key=key, max_retries=0, timeout=60)


def _assert_alive(server):
    status, _, body = _http(f"{server['url']}/merged/v1/completions", {"model": "tiny-merged", "prompt": "hello",
                                                                        "max_tokens": 2})
    assert status == 200, body
    status, _, body = _http(f"{server['url']}/lora/v1/completions", {"model": "tiny:a", "prompt": "hello", "max_tokens": 2},
                            {"Authorization": f"Bearer {KEY_1}"})
    assert status == 200, body


# -- merged model: the openai client ---------------------------------------------------------------------------
def test_health_and_models(server):
    status, _, body = _http(f"{server['url']}/merged/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    ids = [m.id for m in _client(server, "merged").models.list().data]
    assert ids == ["tiny-merged", "support"]


def test_chat_completion_applies_the_chat_template(server):
    r = _client(server, "merged").chat.completions.create(model="tiny-merged", messages=HELLO, temperature=0,
                                                          max_tokens=30)
    assert r.choices[0].message.content == ANSWER_A
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 5 and r.usage.completion_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_usage_stop_and_length(server, tiny_tokenizer):
    c = _client(server, "merged")
    r = c.completions.create(model="tiny-merged", prompt="hello", temperature=0, max_tokens=30)
    assert r.choices[0].text == ANSWER_A
    assert r.usage.prompt_tokens == len(tiny_tokenizer("hello", add_special_tokens=False)["input_ids"])
    r = c.completions.create(model="tiny-merged", prompt="hello", temperature=0, max_tokens=30, stop=["open"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == ("Yes, we are ", "stop")
    r = c.completions.create(model="tiny-merged", prompt="hello", temperature=0, max_tokens=3)
    assert (r.usage.completion_tokens, r.choices[0].finish_reason) == (3, "length")


def test_seeded_sampling_is_reproducible(server):
    c = _client(server, "merged")
    kw = dict(model="tiny-merged", prompt="The quick brown fox", temperature=1.0, top_p=0.9, max_tokens=12, seed=123)
    assert c.completions.create(**kw).choices[0].text == c.completions.create(**kw).choices[0].text


def test_streaming_chat_and_completion(server):
    c = _client(server, "merged")
    chunks = list(c.chat.completions.create(model="tiny-merged", messages=HELLO, temperature=0, max_tokens=30,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == ANSWER_A
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens > 5
    pieces = list(c.completions.create(model="tiny-merged", prompt="hello", temperature=0, max_tokens=30, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == ANSWER_A
    # the raw stream: server-sent events in OpenAI's chunk format, ending with [DONE]
    status, headers, body = _http(f"{server['url']}/merged/v1/chat/completions",
                                  {"model": "tiny-merged", "messages": HELLO, "max_tokens": 4, "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [line for line in body.split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[1][len("data: "):])["object"] == "chat.completion.chunk"


def test_ab_split_names_the_answering_version(server):
    seen = {}
    for _ in range(16):
        status, headers, body = _http(f"{server['url']}/merged/v1/chat/completions",
                                      {"model": "support", "messages": HELLO, "temperature": 0, "max_tokens": 30})
        assert status == 200, body
        seen.setdefault(headers["x-rayft-model-version"], set()).add(json.loads(body)["choices"][0]["message"]["content"])
    assert seen == {"v1": {ANSWER_A}, "v2": {ANSWER_B}}


@pytest.mark.parametrize("body,param,words", [
    ({"model": "tiny-merged", "prompt": "hi", "max_tokens": 0}, "max_tokens", "1 to 256"),
    ({"model": "tiny-merged", "prompt": "hi", "max_tokens": 100000}, "max_tokens", "1 to 256"),
    ({"model": "tiny-merged", "prompt": "hi", "max_tokens": "ten"}, "max_tokens", "'ten'"),
    ({"model": "tiny-merged", "prompt": "hi", "temperature": 5}, "temperature", "less than or equal to 2"),
    ({"model": "tiny-merged", "prompt": "hi", "temperature": "0.5"}, "temperature", "valid number"),
    ({"model": "tiny-merged", "prompt": "hi", "top_p": 0}, "top_p", "greater than 0"),
    ({"model": "tiny-merged", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop", "up to 4"),
    ({"model": "tiny-merged", "prompt": "hi", "seed": 1.5}, "seed", "1.5"),
    ({"model": "tiny-merged", "prompt": 42}, "prompt", "42"),
    ({"model": "tiny-merged", "prompt": "hi", "bogus_field": 1}, "bogus_field", "unknown field"),
    ({"model": "tiny-merged", "prompt": "hi", "n": 3}, "n", "only n=1"),
    ({"model": "tiny-merged", "prompt": "hi", "stream": "yes"}, "stream", "'yes'"),
    ({"model": "tiny-merged", "prompt": "hello " * 3000}, "prompt", "context of 2048"),
    ({"model": "tiny-merged", "prompt": "the " * 1900, "max_tokens": 256}, "max_tokens", "at most"),
    ({"prompt": "hi"}, "model", "missing"),
])
def test_bad_completion_requests_are_400_naming_the_field(server, body, param, words):
    status, _, text = _http(f"{server['url']}/merged/v1/completions", body)
    assert status == 400, text
    err = json.loads(text)["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert param in err["message"] and words in err["message"], err["message"]


def test_bad_chat_requests_and_bodies(server):
    url = f"{server['url']}/merged/v1/chat/completions"
    for body, param in [({"model": "tiny-merged", "messages": []}, "messages"),
                        ({"model": "tiny-merged", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
                        ({"model": "tiny-merged", "messages": [{"role": "user"}]}, "messages[0].content"),
                        ({"model": "tiny-merged", "messages": HELLO, "max_completion_tokens": -1}, "max_completion_tokens")]:
        status, _, text = _http(url, body)
        assert status == 400 and json.loads(text)["error"]["param"] == param, text
    status, _, text = _http(url, raw=b"{not json")
    assert status == 400 and "not valid JSON" in json.loads(text)["error"]["message"]
    status, _, text = _http(url, [1, 2])
    assert status == 400 and "JSON object" in json.loads(text)["error"]["message"]
    _assert_alive(server)


def test_unknown_model_is_404_and_the_server_still_answers(server):
    import openai

    with pytest.raises(openai.NotFoundError, match="not served here"):
        _client(server, "merged").chat.completions.create(model="gpt-4", messages=HELLO)
    _assert_alive(server)


def test_overload_is_503_with_retry_after(server):
    body = {"model": "tiny-merged", "prompt": "The quick brown fox", "max_tokens": 200, "temperature": 1.0,
            "stop": ["zzzzzz"]}
    with cf.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda _: _http(f"{server['url']}/merged/v1/completions", body), range(12)))
    codes = sorted(r[0] for r in results)
    assert 200 in codes and 503 in codes, codes
    busy = next(r for r in results if r[0] == 503)
    assert busy[1]["retry-after"] == "1" and json.loads(busy[2])["error"]["code"] == "overloaded"
    _assert_alive(server)


# -- multi-LoRA with API keys -----------------------------------------------------------------------------------
def test_models_lists_adapters_with_their_parent(server):
    models = _client(server, "lora", KEY_1).models.list().data
    assert [(m.id, m.parent) for m in models] == [("tiny", None), ("tiny:a", "tiny"), ("tiny:b", "tiny"),
                                                  ("tiny:broken", "tiny"), ("tiny:c", "tiny"), ("tiny:reg", "tiny")]
    only_b = [m.id for m in _client(server, "lora", KEY_2).models.list().data]
    assert only_b == ["tiny", "tiny:b"]


def test_adapter_chosen_per_request_and_concurrent_requests_share_batches(server):
    c = _client(server, "lora", KEY_1)
    plan = ["a", "b", "a", "b", None, "a"]
    alone = [c.chat.completions.create(model=f"tiny:{x}" if x else "tiny", messages=HELLO, temperature=0,
                                       max_tokens=30).choices[0].message.content for x in plan]
    assert alone[:2] == [ANSWER_A, ANSWER_B] and alone[4] not in (ANSWER_A, ANSWER_B)
    with cf.ThreadPoolExecutor(len(plan)) as pool:
        together = list(pool.map(lambda x: c.chat.completions.create(
            model=f"tiny:{x}" if x else "tiny", messages=HELLO, temperature=0, max_tokens=30).choices[0].message.content,
            plan))
    assert together == alone
    stats = json.loads(_http(f"{server['url']}/lora/v1/stats", headers={"Authorization": f"Bearer {KEY_1}"})[2])
    assert stats["max_batch_seen"] >= 2  # concurrent requests for different adapters were decoded together


def test_registry_adapter_over_http(server):
    """`models:/tiny-bot@champion` (adapter b in the MLflow registry) is fetched by the replica on first use and
    shares a batch with a local adapter."""
    c = _client(server, "lora", KEY_1)
    with cf.ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda m: c.chat.completions.create(model=m, messages=HELLO, temperature=0,
                                                                    max_tokens=30).choices[0].message.content,
                                ["tiny:reg", "tiny:a", "tiny:reg"]))
    assert answers == [ANSWER_B, ANSWER_A, ANSWER_B]


def test_lru_evicts_and_reloads_over_http(server):
    c = _client(server, "lora", KEY_1)
    url, auth = f"{server['url']}/lora/v1/stats", {"Authorization": f"Bearer {KEY_1}"}
    for x in ("a", "b"):
        c.completions.create(model=f"tiny:{x}", prompt="hello", max_tokens=2)
    before = json.loads(_http(url, headers=auth)[2])["adapter_cache"]
    c.completions.create(model="tiny:c", prompt="hello", max_tokens=2)  # evicts a
    r = c.completions.create(model="tiny:a", prompt="hello", temperature=0, max_tokens=30)  # reloads a, evicts b
    after = json.loads(_http(url, headers=auth)[2])
    assert r.choices[0].text == ANSWER_A
    assert after["adapters_loaded"] == ["c", "a"]
    assert after["adapter_cache"]["evictions"] == before["evictions"] + 2
    assert after["adapter_cache"]["misses"] == before["misses"] + 2
    assert after["adapter_cache"]["events"][-4:] == [["load", "c"], ["evict", "a"], ["load", "a"], ["evict", "b"]]


def test_keys_401_403_404_and_the_server_still_answers(server):
    import openai

    url = f"{server['url']}/lora/v1/chat/completions"
    body = {"model": "tiny:a", "messages": HELLO, "max_tokens": 2}
    status, _, text = _http(url, body)
    assert status == 401 and "Authorization: Bearer" in json.loads(text)["error"]["message"]
    _assert_alive(server)
    with pytest.raises(openai.AuthenticationError):
        _client(server, "lora", "sk-wrong-key").chat.completions.create(**body)
    _assert_alive(server)
    status, _, text = _http(f"{server['url']}/lora/v1/models")
    assert status == 401
    with pytest.raises(openai.PermissionDeniedError, match=r"tenant 'two'\) may not use adapter 'a'"):
        _client(server, "lora", KEY_2).chat.completions.create(**body)
    with pytest.raises(openai.PermissionDeniedError, match="without an adapter"):
        _client(server, "lora", KEY_2).chat.completions.create(**{**body, "model": "tiny"})
    _assert_alive(server)
    with pytest.raises(openai.NotFoundError, match="adapter 'nope' is not served"):
        _client(server, "lora", KEY_1).chat.completions.create(**{**body, "model": "tiny:nope"})
    _assert_alive(server)
    r = _client(server, "lora", KEY_2).chat.completions.create(**{**body, "model": "tiny:b", "max_tokens": 30,
                                                                  "temperature": 0})
    assert r.choices[0].message.content == ANSWER_B


def test_keys_never_appear_in_logs(server):
    import glob
    import os

    import ray

    logs = ray._private.worker._global_node.get_logs_dir_path()
    for path in glob.glob(os.path.join(logs, "**", "*"), recursive=True):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                data = f.read()
            assert KEY_1.encode() not in data and KEY_2.encode() not in data and b"sk-wrong-key" not in data, path


def test_an_adapter_that_cannot_load_is_a_500_naming_it_and_the_replica_lives_on(server):
    """The client learns which adapter failed and a request id, never the exception's text (the folder's path, the
    error type); the replica's log has the detail under that id."""
    import glob
    import os
    import re

    import openai
    import ray

    c = _client(server, "lora", KEY_1)
    broken = server["adapters"]["broken"]
    ids = []
    for _ in range(2):
        with pytest.raises(openai.InternalServerError, match=r"adapter 'broken' could not be loaded on this server "
                                                             r"\(request id chatcmpl-\w+\)") as e:
            c.chat.completions.create(model="tiny:broken", messages=HELLO, max_tokens=2)
        assert broken not in str(e.value) and "Error:" not in str(e.value), str(e.value)
        ids.append(re.search(r"request id (\S+)\)", str(e.value)).group(1))
    status, _, text = _http(f"{server['url']}/lora/v1/completions", {"model": "tiny:broken", "prompt": "hi",
                                                                      "max_tokens": 2, "stream": True},
                            {"Authorization": f"Bearer {KEY_1}"})
    assert status == 200 and "adapter 'broken' could not be loaded on this server (request id cmpl-" in text, text
    assert broken not in text, text
    _assert_alive(server)
    logs = ray._private.worker._global_node.get_logs_dir_path()
    found = ""
    for path in glob.glob(os.path.join(logs, "**", "worker-*"), recursive=True):
        with open(path, "rb") as f:
            data = f.read().decode("utf-8", "replace")
        if ids[0] in data:
            found = data[data.index(ids[0]):]
    assert broken in found, "the replica's log has no detail under the request id"
    assert c.chat.completions.create(model="tiny:b", messages=HELLO, temperature=0,
                                     max_tokens=30).choices[0].message.content == ANSWER_B


def test_metrics_are_exported_with_ray_s_own(server):
    """Tokens generated, time to first token and adapter cache events reach Ray's Prometheus endpoint."""
    import time

    import ray

    port = ray._private.worker._global_node.metrics_export_port
    wanted = {"ray_rayft_serve_tokens_generated", "ray_rayft_serve_time_to_first_token_s_bucket",
              "ray_rayft_serve_adapter_cache_events", "ray_rayft_serve_adapter_load_s_count", "ray_serve_",
              "event=load", "event=hit", "event=miss"}
    found: set = set()
    deadline = time.time() + 45  # metrics are exported every few seconds
    while time.time() < deadline and found != wanted:
        status, _, text = _http(f"http://127.0.0.1:{port}/metrics")
        if status == 200:
            found = {w for w in wanted if any(line.startswith(w) for line in text.splitlines())}
            found |= {f"event={e}" for e in ("load", "hit", "miss") if f'event="{e}"' in text}
        if found != wanted:
            time.sleep(3)
    assert found == wanted
