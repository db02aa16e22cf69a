"""`rayft export RUN --out DIR [--merge]`: the trained adapter, and optionally the merged model.

    DIR/adapter   PEFT adapter (adapter_config.json + adapter_model.safetensors) and the tokenizer;
                  loads with `PeftModel.from_pretrained(base, DIR/adapter)`
    DIR/merged    with --merge: base + adapter folded into plain weights (safetensors) and the tokenizer;
                  loads with `AutoModelForCausalLM.from_pretrained(DIR/merged)`

Both folders end with a manifest (`rayft-manifest.json`, the SHA-256 of every file) and, with
`security.encrypt_artifacts`, are encrypted at rest (security/artifacts.py); the security settings are the run's own
(its config), unless the caller passes others.

The merge is checked: on a probe batch, the logits of the merged model (as saved and reloaded) must match
base+adapter within  max|merged - peft| <= atol + rtol * max|peft|  (fp32: atol 1e-4, rtol 1e-5;
bf16/fp16: atol 5e-2, rtol 1e-2). A mismatch raises ExportError and leaves no merged folder behind.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Callable, Optional

from rayft.data import storage
from rayft.data.chat import DEFAULT_CHAT_TEMPLATE
from rayft.models.config import ModelConfig
from rayft.security.artifacts import finish_export, opened_for_load
from rayft.security.config import SecurityConfig

from .checkpoint import ADAPTER_DIR, best_and_latest, check_checkpoint

TOLERANCE = {"float32": (1e-4, 1e-5), "bfloat16": (5e-2, 1e-2), "float16": (5e-2, 1e-2)}
PROBE_TEXTS = [
    "How do I reset my password?",
    "<|im_start|>user\nWhat are your opening hours?<|im_end|>\n<|im_start|>assistant\n",
    "The quick brown fox jumps over the lazy dog.",
]


class ExportError(RuntimeError):
    """The export could not be made or did not pass its check."""


@dataclass
class ExportResult:
    adapter_dir: str
    merged_dir: Optional[str]
    max_abs_diff: Optional[float]
    tolerance: Optional[float]
    registered: Optional[object] = None


def find_adapter(run_dir: str, which: str = "best") -> str:
    """The adapter folder of a run (a local folder or a bucket prefix): `best` (lowest eval loss), `latest`, or a
    checkpoint folder path."""
    if which not in ("best", "latest"):
        problem = check_checkpoint(which)
        if problem is not None:
            raise ExportError(f"checkpoint {which}: {problem}")
        return storage.join(which, ADAPTER_DIR)
    found = best_and_latest(run_dir)
    chosen = found[which] or found["latest"]
    if chosen is None:
        raise ExportError(f"{run_dir} holds no intact checkpoint; train first (rayft train CONFIG)")
    return storage.join(chosen, ADAPTER_DIR)


@contextlib.contextmanager
def _local_folder(out_dir: str):
    """Where the export is written: `out_dir` itself, or for a bucket prefix a local folder uploaded at the end."""
    if not storage.is_uri(out_dir):
        yield out_dir
        return
    tmp = tempfile.mkdtemp(prefix="rayft-export-")
    try:
        yield tmp
        for part in ("adapter", "merged"):
            if os.path.isdir(os.path.join(tmp, part)):
                storage.delete_dir(storage.join(out_dir, part))
                storage.upload_dir(os.path.join(tmp, part), storage.join(out_dir, part))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_run(run_dir: str, out_dir: str, merge: bool = False, which: str = "best",
               log: Callable[[str], None] = print, register: Optional[str] = None,
               security: Optional[SecurityConfig] = None) -> ExportResult:
    from .trainer import read_run_file

    run = read_run_file(run_dir)
    model_cfg = ModelConfig.model_validate(run["config"]["model"])
    if security is None:
        security = SecurityConfig.model_validate(run["config"].get("security") or {})
    source = find_adapter(run_dir, which)
    with _local_folder(out_dir) as local_out:
        result = _export_into(run, model_cfg, security, source, local_out, merge, register, log)
    if local_out != out_dir:  # uploaded: report where the export lives
        result.adapter_dir = storage.join(out_dir, "adapter")
        result.merged_dir = storage.join(out_dir, "merged") if result.merged_dir else None
        log(f"export uploaded to {out_dir}")
    return result


def _export_into(run: dict, model_cfg: ModelConfig, security: SecurityConfig, source: str, out_dir: str,
                 merge: bool, register: Optional[str], log: Callable[[str], None]) -> ExportResult:
    adapter_out = os.path.join(out_dir, "adapter")
    shutil.rmtree(adapter_out, ignore_errors=True)
    storage.download_dir(source, adapter_out)
    _decrypt_checkpoint_adapter(adapter_out, security)
    tokenizer = _load_tokenizer(model_cfg, security)
    # The export carries the chat template the model was trained with, so a server renders chats exactly as
    # training did (the data config's template, else the tokenizer's own, else rayft's default layout).
    tokenizer.chat_template = ((run["config"].get("data") or {}).get("chat_template") or tokenizer.chat_template
                               or DEFAULT_CHAT_TEMPLATE)
    tokenizer.save_pretrained(adapter_out)
    log(f"adapter from {source} -> {adapter_out}")
    # Each folder gets its manifest (and encryption) once nothing more is written into it; the merge then reads
    # the adapter back through the same checks as any loader.
    _finish(adapter_out, security, log)
    result = ExportResult(adapter_out, None, None, None)
    if merge:
        merged_out = os.path.join(out_dir, "merged")
        diff, tol = merge_adapter(model_cfg, adapter_out, merged_out, tokenizer, security)
        log(f"merged model -> {merged_out} (logits vs base+adapter: max |diff| {diff:.2e} <= {tol:.2e})")
        _finish(merged_out, security, log)
        result = ExportResult(adapter_out, merged_out, diff, tol)
    if register:
        result.registered = register_export(run, result, register)
        log(f"registered {register} version {result.registered.version} ({'merged' if merge else 'adapter'})")
    return result


def _finish(folder: str, security: SecurityConfig, log: Callable[[str], None]) -> None:
    encrypted = finish_export(folder, security)
    log(f"{folder}: manifest written" + (f", encrypted with AES-256-GCM (key from {security.key_source()})"
                                         if encrypted else ""))


def _decrypt_checkpoint_adapter(folder: str, security: SecurityConfig) -> None:
    """A checkpoint's adapter written with security.encrypt_artifacts, decrypted in the export folder; the
    export is encrypted again at its end (finish_export)."""
    from rayft.security.config import load_key

    from .checkpoint import decrypt_weights, is_encrypted

    if is_encrypted(folder):
        decrypt_weights(folder, load_key(security), prefix=f"{ADAPTER_DIR}/")


def register_export(run: dict, result: ExportResult, name: str):
    """Log the exported folder into the run's MLflow run and register it as a version of `name`."""
    from rayft.registry.tracking import client
    from rayft.registry.versions import register_version

    if not run.get("mlflow_run_id"):
        raise ExportError("--register needs the run's MLflow run; this run was trained with tracking.enabled: false")
    kind = "merged" if result.merged_dir else "adapter"
    folder = result.merged_dir or result.adapter_dir
    c = client(run["tracking_uri"])
    c.log_artifacts(run["mlflow_run_id"], folder, artifact_path=f"export/{kind}")
    cfg = run["config"]
    metrics = run.get("metrics") or {}
    return register_version(run["tracking_uri"], name, run["mlflow_run_id"], f"export/{kind}", lineage={
        "kind": kind, "base_model": cfg["model"]["name_or_path"], "peft_type": "LORA",
        "lora_rank": cfg["train"]["lora"]["rank"], "dataset_fingerprint": run.get("dataset_fingerprint"),
        "eval_loss": metrics.get("eval_loss"), "git_commit": None})


def _load_tokenizer(model_cfg: ModelConfig, security: Optional[SecurityConfig] = None):
    from transformers import AutoTokenizer

    with opened_for_load(model_cfg.tokenizer_name_or_path, security) as path:
        return AutoTokenizer.from_pretrained(path, revision=model_cfg.revision,
                                             trust_remote_code=model_cfg.trust_remote_code)


def merge_adapter(model_cfg: ModelConfig, adapter_dir: str, merged_out: str, tokenizer,
                  security: Optional[SecurityConfig] = None) -> tuple[float, float]:
    """Fold the adapter into the base, save it, reload it, and check its logits. Returns (max diff, allowed).

    The base and the adapter are opened through train/artifacts (manifest checked, decrypted, no pickle files);
    the merged folder is written in plain text: the caller finishes it (manifest, encryption)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if model_cfg.quantization != "none":
        raise ExportError("merging into a quantized base is lossy; export with model.quantization: none (full-precision base)")
    dtype = model_cfg.dtype if model_cfg.dtype != "auto" else "float32"  # merging runs on CPU
    with opened_for_load(model_cfg.name_or_path, security) as base_path:
        base = AutoModelForCausalLM.from_pretrained(base_path, revision=model_cfg.revision,
                                                    trust_remote_code=model_cfg.trust_remote_code,
                                                    dtype=getattr(torch, dtype),
                                                    use_safetensors=None if security and security.allow_pickle_weights
                                                    else True)
    with opened_for_load(adapter_dir, security) as adapter_path:
        peft_model = PeftModel.from_pretrained(base, adapter_path).eval()
    probe = probe_batch(tokenizer)
    with torch.no_grad():
        expected = peft_model(**probe).logits.float()
    merged = peft_model.merge_and_unload()
    tmp = merged_out + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=getattr(torch, dtype), use_safetensors=True).eval()
    with torch.no_grad():
        got = reloaded(**probe).logits.float()
    atol, rtol = TOLERANCE[dtype]
    allowed = atol + rtol * float(expected.abs().max())
    diff = float((got - expected).abs().max())
    if not diff <= allowed:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(
            f"the merged model's logits differ from base+adapter by up to {diff:.3e} (allowed {allowed:.3e}, "
            f"{dtype}); the merged model was not written. Check that the adapter matches the base model "
            f"{model_cfg.name_or_path!r}, or export the adapter alone (without --merge)"
        )
    shutil.rmtree(merged_out, ignore_errors=True)
    os.replace(tmp, merged_out)
    return diff, allowed


def probe_batch(tokenizer) -> dict:
    enc = tokenizer(PROBE_TEXTS, return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
