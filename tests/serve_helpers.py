"""Test and benchmark setup: small LoRA adapters that answer differently, trained in seconds on the tiny model.

This is setup, not a feature: a few dozen plain-torch steps teach an adapter one fixed answer for a couple of
prompts, so that greedy outputs of different adapters differ and a mixed batch can be checked row by row.
"""
from __future__ import annotations

from typing import Optional

TRAIN_PROMPTS = ["hello", "What are your opening hours?"]
# The API keys (by name) and the artifact key of the vllm engine's shared test application (tests/integration/conftest.py)
VLLM_KEYS = {"acme": "sk-test-acme-0123456789", "globex": "sk-test-globex-987654321",
             "initech": "sk-test-initech-55555", "limited": "sk-test-acme-limited-4242"}
VLLM_ARTIFACT_KEY_B64 = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
VLLM_TARGET_ONGOING = 4  # its serve.autoscaling.target_ongoing_requests (per engine replica)


def train_toy_adapter(base_dir: str, out_dir: str, answer: str, steps: int = 40, rank: int = 4, seed: int = 0,
                      lr: float = 1e-2, prompts: Optional[list[str]] = None) -> str:
    """Train a LoRA adapter so that chat prompts are answered with `answer`; saved as safetensors in out_dir."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayft.data.chat import render_prompt

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, use_safetensors=True)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                             target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]))
    rows = []
    for p in prompts or TRAIN_PROMPTS:
        for text in (render_prompt([{"role": "user", "content": p}], tok), p):  # chat and plain completion
            ids = tok(text, add_special_tokens=False)["input_ids"]
            target = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            rows.append((ids + target, [-100] * len(ids) + target))
    L = max(len(r[0]) for r in rows)
    input_ids = torch.full((len(rows), L), tok.pad_token_id)
    labels = torch.full((len(rows), L), -100)
    attn = torch.zeros((len(rows), L), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        attn[i, : len(ids)] = 1
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=input_ids, attention_mask=attn, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir


def merge_toy_adapter(base_dir: str, adapter_dir: str, out_dir: str) -> str:
    """The merged model of base + adapter, through train/export's checked merge."""
    from transformers import AutoTokenizer

    from rayft.models.config import ModelConfig
    from rayft.train.export import merge_adapter

    merge_adapter(ModelConfig(name_or_path=base_dir, dtype="float32"), adapter_dir, out_dir,
                  AutoTokenizer.from_pretrained(base_dir))
    return out_dir


def register_champion_adapter(root, adapter_dir: str, name: str = "tiny-bot", experiment: str = "serve") -> tuple[str, str]:
    """An adapter in an MLflow registry on SQLite under `root`: logged by a run, registered as version 1, alias
    champion. Returns (tracking URI, `models:/NAME@champion`)."""
    from rayft.registry.tracking import client
    from rayft.registry.versions import register_version

    tracking = f"sqlite:///{root}/mlflow.db"
    c = client(tracking)
    run = c.create_run(c.create_experiment(experiment, artifact_location=f"file://{root}/mlartifacts"))
    c.log_artifacts(run.info.run_id, adapter_dir, artifact_path="adapter")
    c.set_terminated(run.info.run_id)
    register_version(tracking, name, run.info.run_id, "adapter", {"kind": "adapter"})
    c.set_registered_model_alias(name, "champion", "1")
    return tracking, f"models:/{name}@champion"


# ------------------------------------------------------------------------ fault injection and load (tests, benchmarks)


def replica_pids(app_name: str, deployment: str = "rayft-openai") -> list[int]:
    """Process ids of the live replicas of a Serve deployment on the Ray this process is connected to (Ray's
    state API; the address is explicit because other Ray instances may run on the same machine). `deployment` is the
    deployment's name, or its start followed by `*` (`rayft-vllm-default:*`: the vllm engine's default version)."""
    import ray
    from ray.util.state import list_actors

    actors = list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")],
                         limit=10000, raise_on_missing_output=False)
    want = f"ServeReplica:{app_name}:{deployment}"
    match = (lambda n: n.startswith(want[:-1])) if want.endswith("*") else (lambda n: n == want)
    return sorted(a.pid for a in actors if match(a.class_name or "") and a.pid)


ENGINE_DEPLOYMENT = "rayft-vllm-default:*"  # the vllm engine's deployment of the served model (serve/llm.py)


def running_replicas(app_name: str, deployment: str) -> int:
    """RUNNING replicas of a deployment of `app_name` (serve.status()); `deployment` as in replica_pids."""
    from ray import serve

    deployments = serve.status().applications[app_name].deployments
    names = [n for n in deployments if (n.startswith(deployment[:-1]) if deployment.endswith("*") else n == deployment)]
    return sum(deployments[n].replica_states.get("RUNNING", 0) for n in names)


class ClosedLoopLoad:
    """`concurrency` client threads, each sending `body` to `url` again as soon as its answer is in.

    Every request is recorded as (start, end, status, error) on the monotonic clock; `error` is the body of an error
    answer (its first 2000 characters); a connection error or a timeout is status 0. Used to measure recovery after a fault and to soak a server."""

    def __init__(self, url: str, body: dict, concurrency: int, timeout_s: float = 60.0,
                 headers: Optional[dict] = None):
        import threading

        self.url, self.body, self.concurrency, self.timeout_s = url, body, concurrency, timeout_s
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self.records: list[tuple[float, float, int, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(concurrency)]

    def start(self) -> "ClosedLoopLoad":
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> list[tuple[float, float, int, str]]:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.timeout_s + 5)
        return self.snapshot()

    def snapshot(self) -> list[tuple[float, float, int, str]]:
        with self._lock:
            return list(self.records)

    def _client(self) -> None:
        import json
        import time
        import urllib.error
        import urllib.request

        data = json.dumps(self.body).encode()
        while not self._stop.is_set():
            t0 = time.monotonic()
            req = urllib.request.Request(self.url, data=data, headers=self.headers)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                    r.read()
                    status, error = r.status, ""
            except urllib.error.HTTPError as e:
                status, error = e.code, e.read().decode(errors="replace")[:2000]
            except Exception as e:  # noqa: BLE001 - refused, reset, timed out: the request failed
                status, error = 0, f"{type(e).__name__}: {e}"[:300]
            with self._lock:
                self.records.append((t0, time.monotonic(), status, error))
            if status != 200:
                time.sleep(0.05)  # a client that backs off a little, as a real one would


def recovery(records: list[tuple[float, float, int, str]], fault_at: float) -> dict:
    """What a fault at `fault_at` cost the clients: requests that failed, and when the service answered again.

    Recovered at the end of the first successful request sent after the fault; every request sent after
    that point must succeed (`failed_after_recovery` counts the ones that did not)."""
    after = sorted(r for r in records if r[0] >= fault_at)
    first_ok = next((r for r in after if r[2] == 200), None)
    failed = [r for r in records if r[2] != 200]
    out = {"requests": len(records), "failed": len(failed),
           "failed_statuses": sorted({r[2] for r in failed}),
           "sample_errors": [r[3] for r in failed[:3]],
           "recovered": first_ok is not None, "time_to_recover_s": None, "failed_after_recovery": None}
    if first_ok is not None:
        out["time_to_recover_s"] = first_ok[1] - fault_at
        out["failed_after_recovery"] = sum(1 for r in after if r[0] >= first_ok[1] and r[2] != 200)
        out["ok_after_recovery"] = sum(1 for r in after if r[0] >= first_ok[1] and r[2] == 200)
    return out
