"""Serving benchmark: the vllm and hf engines, and the hf engine's own options, under load on loopback.

Default (`--suite engines`): the vllm engine (Ray Serve LLM on vLLM) and the hf engine in the same run, same
merged model, same client: closed loop at concurrency 1, 8 and 32; open loop (Poisson arrivals) at an offered rate
the hf engine sustains (`--rate`, default 60% of hf's closed-loop requests/s at concurrency 8); and on the vllm
engine, base + 8 adapters mixed in every batch against the merged model, at concurrency 32. Reported per level:
output tokens/s, time to first token p50/p99, inter-token latency p50/p99 (per request: (latency - TTFT) /
(tokens - 1)), errors, and the load average. Goals printed with the ratios.

`--suite hf`: the hf engine's options, as below.

Each client thread sends a streaming chat request, waits for `[DONE]`, and sends the next (closed loop),
until the request budget or the time limit of the level runs out. Measured per level: requests/s, output
tokens/s (from `usage`), p50/p99 latency and time to first token. Every comparison runs in this one process
against the same model, on the same machine, back to back:

    merged model, batched          concurrency 1, 8, 32
    merged model, max_batch_size 1 concurrency 32      -> batched vs one-request-at-a-time
    base + 8 adapters, mixed       concurrency 32      -> multi-LoRA (8 adapters in every batch) vs merged
    base + 8 adapters, grouped     concurrency 32      -> mixed-adapter batches vs one adapter group at a time
    merged model, int8 dynamic     concurrency 32      -> quantized vs full precision, and answer agreement
    engine only, in this process   one batch of 32     -> multi-LoRA vs merged without HTTP and batch forming:
                                                          the two alternate --engine-reps times, medians compared

    .venv/bin/python benchmarks/serve_load.py [--hidden-size 256] [--layers 4] [--max-tokens 32]
                                              [--requests 96] [--time-limit-s 40] [--engine-reps 7]
                                              [--out results.json] [--workdir DIR]

The model is rayft's tiny Llama at a configurable width (no weights can be downloaded here); adapters and the
merged model are made in-process in seconds (tests/serve_helpers.py). Serve runs on a local Ray with 2 CPUs; the
replica gets 1 CPU and 1 torch thread so the proxy and this client have the other. Multi-LoRA rows go through
rayft's batched LoRA layers (serve/batched_lora.py: one gather + two bmm per layer for the whole batch).

The machine's load average is printed before and after each level: on a shared machine it says how far the
figures can be trusted (every ratio compares levels run back to back in this one process).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

PROMPTS = ["hello", "What are your opening hours?", "Tell me about the refund policy.", "How do I reset my password?",
           "Where is my order?", "Can I change my delivery address?", "Write a haiku about the sea.", "Why is the sky blue?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_request(port: int, prefix: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                       "temperature": 0, "stream": True, "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", f"{prefix}/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        text = resp.read().decode()
        conn.close()
        return {"ok": False, "status": resp.status, "error": text[:200]}
    ttft, tokens, text = None, 0, ""
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            break
        msg = json.loads(data)
        if msg.get("usage"):
            tokens = msg["usage"]["completion_tokens"]
        for ch in msg.get("choices", []):
            piece = ch.get("delta", {}).get("content")
            if piece:
                if ttft is None:
                    ttft = time.perf_counter() - t0
                text += piece
    conn.close()
    end = time.perf_counter() - t0
    first = ttft if ttft is not None else end
    itl = (end - first) / (tokens - 1) if tokens > 1 else None
    return {"ok": True, "latency_s": end, "ttft_s": first, "itl_s": itl, "tokens": tokens, "text": text}


def load(port: int, prefix: str, models: list[str], concurrency: int, requests: int, time_limit_s: float,
         max_tokens: int) -> dict:
    """Closed loop: `concurrency` clients, `requests` in all, stopped early at `time_limit_s`."""
    lock = threading.Lock()
    state = {"next": 0}
    results: list[dict] = []
    deadline = time.perf_counter() + time_limit_s

    def client():
        while True:
            with lock:
                i = state["next"]
                if i >= requests or time.perf_counter() > deadline:
                    return
                state["next"] += 1
            r = one_request(port, prefix, models[i % len(models)], PROMPTS[i % len(PROMPTS)], max_tokens)
            r["i"] = i
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    lat = sorted(r["latency_s"] for r in ok)
    ttft = sorted(r["ttft_s"] for r in ok)
    itl = sorted(r["itl_s"] for r in ok if r.get("itl_s") is not None)

    def pct(xs, p):
        return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")

    return {"concurrency": concurrency, "requests": len(results), "errors": len(results) - len(ok), "wall_s": wall,
            "req_per_s": len(ok) / wall, "out_tok_per_s": sum(r["tokens"] for r in ok) / wall,
            "p50_latency_s": pct(lat, 50), "p99_latency_s": pct(lat, 99), "p50_ttft_s": pct(ttft, 50),
            "p99_ttft_s": pct(ttft, 99), "p50_itl_s": pct(itl, 50), "p99_itl_s": pct(itl, 99), "mean_tokens": statistics.mean(r["tokens"] for r in ok) if ok else 0,
            "answers": {r["i"]: r["text"] for r in ok},
            "error_samples": sorted({f"{r.get('status')}: {r.get('error', '')[:160]}" for r in results if not r["ok"]})[:3]}


def open_loop(port: int, prefix: str, models: list[str], rate_per_s: float, duration_s: float, max_tokens: int,
              seed: int = 0) -> dict:
    """Open loop: requests arrive as a Poisson process at `rate_per_s` for `duration_s`, each sent at its arrival
    whatever the server is doing (a slow server meets a queue, as in production); the same arrival times for every
    engine (seeded)."""
    import random

    rng = random.Random(seed)
    arrivals, t = [], 0.0
    while True:
        t += rng.expovariate(rate_per_s)
        if t > duration_s:
            break
        arrivals.append(t)
    results: list[dict] = []
    lock = threading.Lock()

    def send(i):
        r = one_request(port, prefix, models[i % len(models)], PROMPTS[i % len(PROMPTS)], max_tokens)
        with lock:
            results.append(r)

    t0 = time.perf_counter()
    threads = []
    for i, at in enumerate(arrivals):
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        th = threading.Thread(target=send, args=(i,))
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    ttft = sorted(r["ttft_s"] for r in ok)
    itl = sorted(r["itl_s"] for r in ok if r.get("itl_s") is not None)

    def pct(xs, p):
        return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")

    return {"offered_req_per_s": rate_per_s, "requests": len(results), "errors": len(results) - len(ok),
            "wall_s": wall, "out_tok_per_s": sum(r["tokens"] for r in ok) / wall, "p50_ttft_s": pct(ttft, 50),
            "p99_ttft_s": pct(ttft, 99), "p50_itl_s": pct(itl, 50), "p99_itl_s": pct(itl, 99)}


def loadavg() -> str:
    """The 1-minute load average of this machine ('?' where /proc/loadavg does not exist)."""
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[0]
    except OSError:
        return "?"


def deploy(cfg, model_path: str, name: str):
    from ray import serve

    from rayft.serve.app import build_app

    t0 = time.perf_counter()
    serve.run(build_app(cfg, model_path), name=name, route_prefix=f"/{name}", blocking=False)
    return time.perf_counter() - t0


def engine_only(base: str, merged: str, adapters: dict[str, str], max_tokens: int, reps: int) -> dict:
    """Decode one batch of 32 chat requests in-process (1 torch thread), merged model vs base + 8 adapters mixed
    (row i uses adapter i % 8), alternating `reps` times; medians of output tokens/s."""
    import torch

    from rayft.data.chat import render_prompt
    from rayft.serve.engine import Engine, GenRequest

    torch.set_num_threads(1)
    engines = {"merged": Engine(merged, log=lambda m: None),
               "lora8_mixed": Engine(base, adapters=adapters, adapter_cache_size=8, log=lambda m: None)}

    def batch(eng, lora):
        return [GenRequest(eng.tokenizer(render_prompt([{"role": "user", "content": PROMPTS[i % 8]}], eng.tokenizer),
                                         add_special_tokens=False)["input_ids"], max_tokens, temperature=0.0,
                           adapter=f"ad{i % 8}" if lora else None) for i in range(32)]

    tok_s: dict = {k: [] for k in engines}
    for _ in range(reps + 1):  # the first round warms up (adapter loads) and is not counted
        for name, eng in engines.items():
            reqs = batch(eng, name != "merged")
            t0 = time.perf_counter()
            out = eng.generate_text(reqs)
            tok_s[name].append(sum(n for _, n, _ in out) / (time.perf_counter() - t0))
    med = {k: statistics.median(v[1:]) for k, v in tok_s.items()}
    return {"merged_tok_per_s": med["merged"], "lora8_mixed_tok_per_s": med["lora8_mixed"],
            "ratio": med["lora8_mixed"] / med["merged"], "reps": reps, "loadavg_1m": loadavg()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, default=96, help="request budget per level (concurrency 1 uses a quarter)")
    ap.add_argument("--time-limit-s", type=float, default=40.0, help="time limit per level")
    ap.add_argument("--engine-reps", type=int, default=7, help="rounds of the in-process engine comparison (0: skip)")
    ap.add_argument("--out", help="write the figures as JSON here")
    ap.add_argument("--workdir", help="where the model, adapters and merged model are built (reused when present)")
    ap.add_argument("--stream-interval-s", type=float, default=0.05, help="serve.stream_interval_s")
    ap.add_argument("--batch-wait-timeout-s", type=float, default=0.05, help="serve.batch_wait_timeout_s")
    ap.add_argument("--suite", choices=["engines", "hf"], default="engines",
                    help="engines: vllm vs hf (default); hf: the hf engine's options")
    ap.add_argument("--rate", type=float, help="open-loop offered requests/s (default: 60%% of hf's c=8 req/s)")
    ap.add_argument("--open-loop-s", type=float, default=30.0, help="open-loop duration")
    ap.add_argument("--levels", default="1,8,32", help="closed-loop concurrency levels of the engines suite")
    ap.add_argument("--no-lora", action="store_true", help="engines suite: skip the 8-adapter run")
    ap.add_argument("--dtype", default="auto", help="vllm engine dtype (serve.dtype; auto is float32 on CPU)")
    ap.add_argument("--max-lora-rank", type=int, default=8,
                    help="vllm engine: serve.max_lora_rank of the 8-adapter run (the adapters are rank 4; vLLM pads "
                         "every adapter to this rank, and 8 is the smallest size it offers above 4)")
    args = ap.parse_args()

    from ray import serve

    from rayft.cluster.ray_conn import connect
    from rayft.serve.config import ServeConfig
    from rayft.train.tiny_model import build_tiny_model
    from tests.serve_helpers import merge_toy_adapter, train_toy_adapter

    work = args.workdir or tempfile.mkdtemp(prefix="rayft-serve-bench-")
    t0 = time.perf_counter()

    def made(folder):  # reuse what an earlier run with the same --workdir built
        return os.path.isfile(os.path.join(work, folder, ".done"))

    def mark(folder):
        open(os.path.join(work, folder, ".done"), "w").close()
        return os.path.join(work, folder)

    base = os.path.join(work, "base")
    if not made("base"):
        build_tiny_model(base, hidden_size=args.hidden_size, num_layers=args.layers)
        mark("base")
    adapters = {}
    for i in range(8):
        if not made(f"ad{i}"):
            train_toy_adapter(base, os.path.join(work, f"ad{i}"), f"Answer number {i}: " + "ok " * 20, steps=20, seed=i)
            mark(f"ad{i}")
        adapters[f"ad{i}"] = os.path.join(work, f"ad{i}")
    merged = os.path.join(work, "merged")
    if not made("merged"):
        merge_toy_adapter(base, adapters["ad0"], merged)
        mark("merged")
    print(f"setup: model (hidden {args.hidden_size}, {args.layers} layers), 8 adapters, merge in "
          f"{time.perf_counter() - t0:.1f}s", flush=True)
    if args.suite == "engines":
        return compare_engines(args, base, merged, adapters)
    if args.engine_reps:
        eo = engine_only(base, merged, adapters, args.max_tokens, args.engine_reps)
        print(f"engine only, batch of 32: merged {eo['merged_tok_per_s']:.0f} tok/s, base + 8 adapters mixed "
              f"{eo['lora8_mixed_tok_per_s']:.0f} tok/s (medians of {eo['reps']}; load avg {eo['loadavg_1m']})",
              flush=True)
    print(connect(num_cpus=2), flush=True)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    common = dict(port=port, num_cpus_per_replica=1, torch_threads=1, max_ongoing_requests=64, batch_wait_timeout_s=args.batch_wait_timeout_s,
                  max_tokens_limit=256, stream_interval_s=args.stream_interval_s)
    R, T, M = args.requests, args.time_limit_s, args.max_tokens
    results: dict = {"setup": {"hidden_size": args.hidden_size, "layers": args.layers, "max_tokens": M,
                               "requests_per_level": R, "time_limit_s": T, "cpus": os.cpu_count()}}

    def run(label, cfg, model_path, models, levels):
        secs = deploy(cfg, model_path, "bench")
        load(port, "/bench", models, 2, 4, T, M)  # warm-up: first batches, adapter loads
        out = {}
        for c in levels:
            r = load(port, "/bench", models, c, max(8, R // 4) if c == 1 else R, T, M)
            out[c] = r
            r["loadavg_1m"] = loadavg()
            print(f"{label:<28} c={c:<3} {r['req_per_s']:7.2f} req/s {r['out_tok_per_s']:8.1f} tok/s  "
                  f"p50 {r['p50_latency_s']:.3f}s p99 {r['p99_latency_s']:.3f}s  ttft p50 {r['p50_ttft_s']:.3f}s "
                  f"p99 {r['p99_ttft_s']:.3f}s  ({r['requests']} req, {r['errors']} err, {r['mean_tokens']:.1f} tok/req)"
                  f"  load avg {r['loadavg_1m']}", flush=True)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/bench/v1/stats", timeout=30) as resp:
            st = json.loads(resp.read())
        print(f"{'':<28} replica totals, all levels + warm-up: batches {st['batches']}, mean batch {st['mean_batch']:.1f}, max {st['max_batch_seen']}", flush=True)
        out["replica_stats"] = {k: st[k] for k in ("batches", "mean_batch", "max_batch_seen")}
        serve.delete("bench")
        return out, secs

    merged_cfg = ServeConfig(model=merged, model_name="m", max_batch_size=32, **common)
    results["merged_batched"], _ = run("merged, batched (32)", merged_cfg, merged, ["m"], [1, 8, 32])
    results["merged_one_at_a_time"], _ = run("merged, max_batch_size 1", merged_cfg.model_copy(update={"max_batch_size": 1}),
                                             merged, ["m"], [32])
    lora_models = [f"b:ad{i}" for i in range(8)]
    lora_cfg = ServeConfig(model=base, model_name="b", adapters=adapters, adapter_cache_size=8, max_batch_size=32, **common)
    results["lora8_mixed"], _ = run("base + 8 adapters, mixed", lora_cfg, base, lora_models, [32])
    results["lora8_grouped"], _ = run("base + 8 adapters, grouped", lora_cfg.model_copy(update={"mixed_adapter_batches": False}),
                                      base, lora_models, [32])
    q_cfg = merged_cfg.model_copy(update={"quantization": "int8", "quantization_min_agreement": 0.0})
    results["merged_int8"], _ = run("merged, int8 dynamic", q_cfg, merged, ["m"], [32])

    fp, q = results["merged_batched"][32], results["merged_int8"][32]
    same = [i for i in q["answers"] if i in fp["answers"]]
    agree = sum(q["answers"][i] == fp["answers"][i] for i in same) / max(1, len(same))
    ratios = {
        "batched_vs_one_at_a_time_c32": fp["out_tok_per_s"] / results["merged_one_at_a_time"][32]["out_tok_per_s"],
        "lora8_mixed_vs_merged_c32": results["lora8_mixed"][32]["out_tok_per_s"] / fp["out_tok_per_s"],
        "mixed_vs_grouped_c32": results["lora8_mixed"][32]["out_tok_per_s"] / results["lora8_grouped"][32]["out_tok_per_s"],
        "int8_vs_fp32_c32": q["out_tok_per_s"] / fp["out_tok_per_s"],
        "int8_answer_agreement": agree,
    }
    if args.engine_reps:
        results["engine_only"] = eo
        ratios["engine_only_lora8_mixed_vs_merged"] = eo["ratio"]
    results["ratios"] = ratios
    print(f"\nratios (output tokens/s at concurrency 32; load average now {loadavg()} on {os.cpu_count()} CPUs):")
    print(f"  batched vs one-at-a-time:         {ratios['batched_vs_one_at_a_time_c32']:.2f}x   (goal >= 4x)")
    print(f"  multi-LoRA 8 mixed vs merged:     {ratios['lora8_mixed_vs_merged_c32']:.2f}x   (goal >= 0.70x)")
    print(f"  mixed vs grouped per adapter:     {ratios['mixed_vs_grouped_c32']:.2f}x   (goal >= 1.5x)")
    print(f"  int8 vs fp32 (merged):            {ratios['int8_vs_fp32_c32']:.2f}x, greedy answers agree on "
          f"{agree:.0%} of {len(same)} requests")
    if args.engine_reps:
        print(f"  engine only, multi-LoRA vs merged: {eo['ratio']:.2f}x   (one batch of 32 in-process, no HTTP)")
    serve.shutdown()
    if args.out:
        for v in results.values():
            if isinstance(v, dict):
                for r in v.values():
                    if isinstance(r, dict) and "answers" in r:
                        r.pop("answers", None)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


def compare_engines(args, base: str, merged: str, adapters: dict[str, str]) -> int:
    """vllm vs hf on the same merged model and client; then 8 mixed adapters vs merged on vllm."""
    from ray import serve

    from rayft.cluster.ray_conn import connect
    from rayft.serve.config import ServeConfig

    print(connect(num_cpus=2), flush=True)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    threads = os.cpu_count() or 2
    common = dict(port=port, max_ongoing_requests=64, max_tokens_limit=256, max_batch_size=32)
    engines = {
        # Each engine gets the machine's cores for its compute: the hf replica `threads` torch threads, the vLLM
        # worker its OpenMP threads bound to the same cores. The HTTP proxy and this client share them.
        "hf": ServeConfig(engine="hf", model=merged, model_name="m", num_cpus_per_replica=1, torch_threads=threads,
                          batch_wait_timeout_s=args.batch_wait_timeout_s, stream_interval_s=args.stream_interval_s,
                          **common),
        "vllm": ServeConfig(engine="vllm", model=merged, model_name="m", num_cpus_per_replica=1, torch_threads=threads,
                            dtype=args.dtype, max_model_len=512, **common),
    }
    T, M = args.time_limit_s, args.max_tokens
    results: dict = {"setup": {"hidden_size": args.hidden_size, "layers": args.layers, "max_tokens": M,
                               "requests_per_level": args.requests, "time_limit_s": T, "cpus": os.cpu_count(),
                               "vllm_dtype": args.dtype, "vllm_max_lora_rank": args.max_lora_rank}}

    def closed(label, models, levels):
        load(port, "/bench", models, 2, 4, T, M)  # warm-up
        out = {}
        for c in levels:
            r = load(port, "/bench", models, c, max(8, args.requests // 4) if c == 1 else args.requests, T, M)
            r.pop("answers", None)
            r["loadavg_1m"] = loadavg()
            out[c] = r
            print(f"{label:<26} c={c:<3} {r['out_tok_per_s']:8.1f} tok/s  ttft p50 {r['p50_ttft_s']:.3f}s "
                  f"p99 {r['p99_ttft_s']:.3f}s  itl p50 {r['p50_itl_s'] * 1e3:.1f}ms p99 {r['p99_itl_s'] * 1e3:.1f}ms  "
                  f"({r['requests']} req, {r['errors']} err)  load avg {r['loadavg_1m']}", flush=True)
            for e in r["error_samples"]:
                print(f"{'':<26} error: {e}", flush=True)
        return out

    rate = args.rate
    for name in ("hf", "vllm"):
        secs = deploy(engines[name], merged, "bench")
        print(f"{name}: deployed in {secs:.1f}s", flush=True)
        levels = [int(x) for x in args.levels.split(",") if x]
        results[name] = closed(f"{name}, merged", ["m"], levels)
        if rate is None:
            rate = round(0.6 * results["hf"][levels[len(levels) // 2]]["req_per_s"], 2)
        r = open_loop(port, "/bench", ["m"], rate, args.open_loop_s, M)
        r["loadavg_1m"] = loadavg()
        results[name]["open_loop"] = r
        print(f"{name + ', open loop':<26} {rate:.2f} req/s offered: {r['out_tok_per_s']:8.1f} tok/s  ttft p50 "
              f"{r['p50_ttft_s']:.3f}s p99 {r['p99_ttft_s']:.3f}s  itl p50 {r['p50_itl_s'] * 1e3:.1f}ms p99 "
              f"{r['p99_itl_s'] * 1e3:.1f}ms  ({r['requests']} req, {r['errors']} err)  load avg {r['loadavg_1m']}",
              flush=True)
        serve.delete("bench")
    if not args.no_lora:
        lora_cfg = engines["vllm"].model_copy(update={"model": base, "model_name": "b", "adapters": adapters,
                                                      "adapter_cache_size": 8, "max_lora_rank": args.max_lora_rank})
        deploy(lora_cfg, base, "bench")
        results["vllm_lora8_mixed"] = closed("vllm, base + 8 adapters", [f"b:ad{i}" for i in range(8)], [32])
        serve.delete("bench")
    serve.shutdown()

    v, h = results["vllm"], results["hf"]
    nan = float("nan")
    ratios = {
        "vllm_vs_hf_tok_per_s_c32": v[32]["out_tok_per_s"] / h[32]["out_tok_per_s"] if 32 in v else nan,
        "vllm_vs_hf_p99_ttft_open_loop": v["open_loop"]["p99_ttft_s"] / h["open_loop"]["p99_ttft_s"],
        "vllm_lora8_mixed_vs_merged_c32": (results["vllm_lora8_mixed"][32]["out_tok_per_s"] / v[32]["out_tok_per_s"]
                                           if "vllm_lora8_mixed" in results and 32 in v else nan),
    }
    results["ratios"] = ratios
    print(f"\nratios (load average now {loadavg()} on {os.cpu_count()} CPUs):")
    print(f"  vllm vs hf, output tokens/s at c=32:            {ratios['vllm_vs_hf_tok_per_s_c32']:.2f}x  (goal >= 1.5x)")
    print(f"  vllm vs hf, p99 TTFT open loop at {rate:.2f} req/s:  {ratios['vllm_vs_hf_p99_ttft_open_loop']:.2f}x  "
          f"(goal <= 0.5x; hf errors {h['open_loop']['errors']})")
    print(f"  vllm, 8 mixed adapters vs merged at c=32:       {ratios['vllm_lora8_mixed_vs_merged_c32']:.2f}x  "
          f"(goal >= 0.7x)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
