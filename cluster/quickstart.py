"""`rayft quickstart`: the whole product on this machine, on CPU, in a few minutes.

1. builds a tiny Llama and a tokenizer trained on the sample data (no weights can be downloaded here);
2. runs `rayft run examples/quickstart.yaml`: data -> Ray Tune search with ASHA over DeepSpeed LoRA training
   -> the best adapter merged -> registered in MLflow and promoted to `champion`;
3. serves the champion behind the OpenAI-compatible API on a free loopback port, sends one chat request and
   prints the answer;
4. stops what it started (Serve, Ray) and prints the commands to go further.

The tiny model is random and trained for a few steps: its answers are not meant to be good, only real.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
import urllib.request
from pathlib import Path
from typing import Callable, Optional

QUESTION = "How do I reset my password?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chat(base_url: str, model: str, question: str, max_tokens: int = 32, timeout_s: float = 120) -> dict:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": question}],
                       "max_tokens": max_tokens, "temperature": 0}).encode()
    req = urllib.request.Request(f"{base_url}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        return json.loads(r.read())


def examples_root() -> Path:
    """The folder that holds `examples/` (the project in a checkout, the installed package from a wheel): the
    example configs name their data relative to it."""
    from importlib.resources import files

    return Path(str(files("rayft.examples"))).parent


def run_quickstart(workdir: str, port: Optional[int] = None, fresh: bool = True,
                   log: Callable[[str], None] = print) -> int:
    import ray
    from ray import serve

    from rayft.serve.app import StopRequested, stop_server, stop_signals
    from rayft.train.tiny_model import build_tiny_model

    from .config import load_config
    from .ray_conn import connect

    t0 = time.time()
    root = examples_root()
    config_path = root / "examples" / "quickstart.yaml"
    work = Path(workdir).resolve()
    model_dir = work / "tiny-model"
    if not (model_dir / "config.json").exists():
        log(f"[0/5 model] building the tiny model in {model_dir} (no weights can be downloaded here)")
        build_tiny_model(str(model_dir))
    else:
        log(f"[0/5 model] tiny model already in {model_dir}")
    os.chdir(root)  # the example's data paths are relative to the project folder
    cfg = load_config(config_path, [f"model.name_or_path={model_dir}", f"storage_path={work}"])
    if fresh:  # a new search each time; the registry (mlflow.db) keeps every earlier version
        for stale in (work / cfg.name, work / f"{cfg.name}-search"):
            if stale.exists():
                log(f"removing the previous quickstart run {stale}")
                shutil.rmtree(stale)
    log(connect(cfg.ray.address, cfg.ray.num_cpus))
    with stop_signals():  # SIGTERM or Ctrl-C: the same graceful stop as `rayft serve`, exit code 0
        try:
            return _pipeline_serve_chat(cfg, model_dir, port, t0, log)
        except StopRequested as e:
            log(f"{e.signal_name} received: stopping")
            stop_server("rayft", cfg.serve.graceful_shutdown_s, log)
            return 0
        finally:
            if ray.is_initialized():  # after a graceful stop Ray is already down (serve.shutdown would start one)
                try:
                    serve.shutdown()
                finally:
                    ray.shutdown()


def _pipeline_serve_chat(cfg, model_dir: Path, port: Optional[int], t0: float, log: Callable[[str], None]) -> int:
    from rayft.serve.app import served_name, start

    from .pipeline import run_pipeline, serve_stage, summary

    out = run_pipeline(cfg, log=log)
    scfg = serve_stage(cfg, out, True, log=log, port=port or free_port())
    start(scfg, scfg.model, out.tracking_uri, security=cfg.security)
    base = f"http://127.0.0.1:{scfg.port}{scfg.route_prefix.rstrip('/')}"
    name = served_name(scfg, scfg.model)
    log(f"POST {base}/v1/chat/completions  model={name!r}  question={QUESTION!r}")
    answer = chat(base, name, QUESTION)
    text = answer["choices"][0]["message"]["content"]
    log(f"answer: {text!r}  ({answer['usage']['completion_tokens']} tokens; a tiny random model after a few "
        f"steps of training: the text is not meant to be good)")
    log(summary(out))
    uri = out.tracking_uri
    log(f"\nquickstart done in {time.time() - t0:.0f}s. Next:")
    log(f"  rayft models list {out.model_name} --tracking-uri {uri}" if out.model_name else "")
    log(f"  rayft serve --model {out.serve_target}" + (f" --tracking-uri {uri}" if uri else "")
        + "      # then: curl http://127.0.0.1:8000/v1/models")
    log("  rayft data inspect examples/quickstart.yaml -n 3 "
        f"--set model.name_or_path={model_dir}   # what the model is trained on")
    log("  rayft run examples/qwen2.5-1.5b-gpu.yaml      # a real model, on a GPU machine or cluster (see README)")
    return 0
