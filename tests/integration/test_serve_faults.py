"""Serving under faults, over real HTTP on 127.0.0.1 (a free port), one Serve app shared by the module:

- fuzzing: schemathesis generates requests (valid and invalid) from the server's own /openapi.json; no answer
  may be a 5xx, and the server still answers /health and a normal request afterwards;
- a replica process killed with SIGKILL under load: Serve restarts it by itself; requests in flight may fail,
  every request sent after the first success must succeed;
- a soak at steady concurrency: no errors, and the replica's resident memory stays bounded.
"""
import json
import os
import signal
import socket
import statistics
import time
import urllib.error
import urllib.request

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

pytestmark = pytest.mark.slow

APP = "rayft-faults"
SOAK_S = float(os.environ.get("RAYFT_SOAK_S", "15"))
LOAD_BODY = {"model": "tiny", "prompt": "hello", "max_tokens": 8, "temperature": 0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url, body=None):
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture(scope="module")
def server(ray_local, tiny_model_dir, tmp_path_factory):
    from ray import serve

    from rayft.serve.app import build_app
    from rayft.serve.config import ServeConfig
    from tests.serve_helpers import replica_pids, train_toy_adapter

    root = tmp_path_factory.mktemp("serve-faults")
    adapter = train_toy_adapter(tiny_model_dir, str(root / "a"), "Yes.", steps=5)
    port = _free_port()
    # Small answers keep fuzzing fast: at most 16 new tokens per request.
    cfg = ServeConfig(engine="hf", model=tiny_model_dir, model_name="tiny", adapters={"a": adapter}, port=port,
                      num_cpus_per_replica=0.5, torch_threads=1, batch_wait_timeout_s=0.02, max_batch_size=8,
                      max_tokens_limit=16, default_max_tokens=8)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg, tiny_model_dir), name=APP, route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    assert _http(f"{url}/health")[0] == 200
    yield {"url": url, "pids": lambda: replica_pids(APP)}
    serve.delete(APP)
    serve.shutdown()


def _assert_serving(url):
    status, body = _http(f"{url}/health")
    assert status == 200, body
    status, body = _http(f"{url}/v1/completions", LOAD_BODY)
    assert status == 200 and json.loads(body)["choices"][0]["finish_reason"] in ("stop", "length"), body


# -- fuzzing from the server's own OpenAPI schema --------------------------------------------------------------


def test_openapi_schema_describes_the_request_bodies(server):
    status, body = _http(f"{server['url']}/openapi.json")
    assert status == 200
    paths = json.loads(body)["paths"]
    for path, required in (("/v1/completions", "prompt"), ("/v1/chat/completions", "messages")):
        schema = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert {"model", required} <= set(schema["required"]), schema
        assert schema["additionalProperties"] is False
        assert schema["properties"]["temperature"]["maximum"] == 2.0
    assert {"/health", "/v1/models"} <= set(paths)


def _served_model(case, model):
    # Random model names are 404s before anything else is looked at; most bodies get a served one so the rest
    # of the request reaches validation, tokenization and generation.
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str) and case.body["model"] and model:
        case.body = {**case.body, "model": model}
    return case


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_fuzzed_requests_never_get_a_server_error(server, mode):
    """Every operation of /openapi.json, cases drawn by schemathesis (valid ones, and with `negative` ones that
    break the schema: wrong types, missing or extra fields, out-of-range values)."""
    from hypothesis import given
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{server['url']}/openapi.json")
    seen: dict = {}
    operations = [r.ok() for r in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {"POST /v1/completions", "POST /v1/chat/completions"}
    for op in operations:
        if mode == "negative" and op.method.upper() != "POST":
            continue  # nothing to break in a GET without parameters
        cases = op.as_strategy(GenerationMode(mode)).flatmap(
            lambda case: st.sampled_from(["tiny", "tiny:a", None]).map(lambda m: _served_model(case, m)))

        @given(case=cases)
        @settings(max_examples=40 if op.method.upper() == "POST" else 5, deadline=None,
                  suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            response = case.call(base_url=server["url"], timeout=60)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            assert response.status_code < 500, (case.method, case.path, case.body, response.status_code,
                                                response.text[:500])

        check()
    print(f"\nfuzzing ({mode}): answers by status {dict(sorted(seen.items()))}")
    assert sum(seen.values()) >= 40
    if mode == "positive":
        assert seen.get(200, 0) > 0  # valid cases really got through to generation


@pytest.mark.parametrize("field, value", [
    ("seed", 2**64), ("seed", -(2**64) - 1), ("seed", 10**30), ("max_tokens", 2**70), ("max_tokens", -(2**70)),
    ("temperature", 1e308), ("top_p", 5e-324), ("n", 2**80), ("stop", ["x" * 10_000]), ("prompt", "\x00\ud7ff\ufffe"),
])
def test_extreme_values_are_answered_without_a_server_error(server, field, value):
    """Values at and past the edges of what the code below the schema can take (torch seeds are 64-bit)."""
    status, body = _http(f"{server['url']}/v1/completions", {**LOAD_BODY, field: value})
    assert status < 500, body
    if status == 400:
        assert json.loads(body)["error"]["param"] == field, body


def test_still_serving_after_fuzzing(server):
    _assert_serving(server["url"])


# -- a replica killed under load ---------------------------------------------------------------------------------


def test_a_replica_killed_under_load_is_restarted_and_later_requests_succeed(server):
    from tests.serve_helpers import ClosedLoopLoad, recovery

    (victim,) = server["pids"]()
    load = ClosedLoopLoad(f"{server['url']}/v1/completions", LOAD_BODY, concurrency=4).start()
    time.sleep(3)
    before = load.snapshot()
    assert before and all(r[2] == 200 for r in before), before[:5]
    fault_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    deadline = fault_at + 90
    while time.monotonic() < deadline:
        rec = recovery(load.snapshot(), fault_at)
        if rec["recovered"] and time.monotonic() - (fault_at + rec["time_to_recover_s"]) > 5:
            break  # 5 s of traffic after recovery
        time.sleep(0.5)
    rec = recovery(load.stop(), fault_at)
    assert rec["recovered"], rec
    assert rec["failed_after_recovery"] == 0 and rec["ok_after_recovery"] >= 4, rec
    assert set(rec["failed_statuses"]) <= {0, 500, 502, 503, 504}, rec
    new = server["pids"]()
    assert len(new) == 1 and new[0] != victim, (victim, new)
    print(f"\nreplica kill: recovered in {rec['time_to_recover_s']:.1f}s, {rec['failed']} of {rec['requests']} "
          f"requests failed ({rec['failed_statuses']})")
    _assert_serving(server["url"])


# -- soak ----------------------------------------------------------------------------------------------------------


def test_soak_steady_concurrency_no_errors_bounded_memory(server):
    import psutil

    from tests.serve_helpers import ClosedLoopLoad

    (pid,) = server["pids"]()
    replica = psutil.Process(pid)
    load = ClosedLoopLoad(f"{server['url']}/v1/completions", LOAD_BODY, concurrency=4).start()
    samples = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < SOAK_S:
        time.sleep(1.0)
        samples.append((time.monotonic() - t0, replica.memory_info().rss / 2**20))
    records = load.stop()
    failed = [r for r in records if r[2] != 200]
    assert not failed, failed[:5]
    assert len(records) >= SOAK_S  # at least a request a second went through
    # Memory: the first quarter is warm-up (allocator and caches fill); compare the last quarter with the second.
    q = max(1, len(samples) // 4)
    settled = statistics.median(m for _, m in samples[q:2 * q])
    end = max(m for _, m in samples[-q:])
    growth = end - settled
    print(f"\nsoak {SOAK_S:.0f}s: {len(records)} requests, 0 errors, replica RSS {settled:.0f} -> {end:.0f} MiB")
    assert growth < max(64.0, 0.1 * settled), samples
    assert replica.is_running() and server["pids"]() == [pid]
