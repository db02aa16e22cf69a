"""Autoscaling under load on the local Ray (2 CPUs): min 1, max 2 replicas of half a CPU each.

Closed-loop clients keep more requests in flight than one replica's target, so Serve adds the second replica
(serve.status()); once they stop, it goes back to one. The autoscaler's delays and windows are shortened in the
config (serve.autoscaling.*) so that both happen within about a minute.
"""
import json
import socket
import threading
import time
import urllib.error
import urllib.request


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _running(app: str) -> int:
    from ray import serve

    dep = serve.status().applications[app].deployments["rayft-openai"]
    return dep.replica_states.get("RUNNING", 0)


def _wait_for(predicate, timeout_s: float, poll_s: float = 0.5) -> float:
    """Seconds until predicate() held; raises after timeout_s."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"not within {timeout_s}s")
        time.sleep(poll_s)
    return time.monotonic() - t0


def test_replicas_follow_load_up_and_back_down(ray_local, tiny_model_dir):
    from ray import serve

    from rayft.serve.app import build_app
    from rayft.serve.config import AutoscalingSettings, ServeConfig

    port = _free_port()
    cfg = ServeConfig(engine="hf", model=tiny_model_dir, model_name="tiny", port=port, num_cpus_per_replica=0.5, torch_threads=1,
                      max_batch_size=4, batch_wait_timeout_s=0.02, max_tokens_limit=256,
                      autoscaling=AutoscalingSettings(min_replicas=1, max_replicas=2, target_ongoing_requests=2,
                                                      upscale_delay_s=1, downscale_delay_s=4, look_back_period_s=2,
                                                      metrics_interval_s=0.5))
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg, tiny_model_dir), name="autoscale", route_prefix="/autoscale", blocking=False)
    stop = threading.Event()
    codes: list[int] = []
    try:
        assert _running("autoscale") == 1
        url = f"http://127.0.0.1:{port}/autoscale/v1/completions"
        body = json.dumps({"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 48, "temperature": 1.0,
                           "stop": ["zzzzzz"]}).encode()

        def client():
            while not stop.is_set():
                req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(req, timeout=60) as r:
                        r.read()
                        codes.append(r.status)
                except urllib.error.HTTPError as e:
                    codes.append(e.code)

        threads = [threading.Thread(target=client, daemon=True) for _ in range(8)]  # 8 in flight vs target 2
        for t in threads:
            t.start()
        up_s = _wait_for(lambda: _running("autoscale") == 2, timeout_s=45)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        served_under_load = len(codes)
        down_s = _wait_for(lambda: _running("autoscale") == 1, timeout_s=45)
        print(f"scaled up to 2 replicas {up_s:.1f}s after load began, back to 1 {down_s:.1f}s after it stopped "
              f"({served_under_load} requests)")
        assert served_under_load > 0 and set(codes) == {200}, sorted(set(codes))
    finally:
        stop.set()
        serve.delete("autoscale")
        serve.shutdown()
