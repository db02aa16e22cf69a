"""What `--model` names, as a loaded model: a local folder (a merged model, or a LoRA adapter over the config's
base), `models:/NAME@alias` or `models:/NAME/VERSION` (the registry), `runs:/RUN_ID/adapter` (an MLflow run's
artifact), or an object-store prefix (`s3://...`).

A registry or run source registered by rayft has its manifest's SHA-256 in the registry: the downloaded copy is
refused when its manifest is missing or different. The folder is then opened by the caller's `opener` (the
security package's `opened_for_load` with the run's settings: pickle refusal, manifest check, decryption), so
this package loads exactly what every other loader of rayft would.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator, Optional

from rayft.models.config import ModelConfig

from .config import EvalError

MANIFEST = "rayft-manifest.json"  # security/artifacts.py's name for it (a test holds the two equal)
Opener = Callable[[str], ContextManager[str]]


@dataclass
class LoadedModel:
    source: str  # as the user named it
    concrete: str  # models:/NAME@alias pinned to its version
    model: object
    tokenizer: object
    kind: str  # "merged" | "adapter"


def pin_version(source: str, tracking_uri: Optional[str]) -> str:
    """`models:/NAME@alias` -> `models:/NAME/VERSION` (the version the alias names now); other sources unchanged."""
    if not source.startswith("models:/") or "@" not in source:
        return source
    from mlflow.exceptions import MlflowException

    from rayft.registry.tracking import client

    name, alias = source[len("models:/"):].rstrip("/").rsplit("@", 1)
    try:
        return f"models:/{name}/{client(tracking_uri).get_model_version_by_alias(name, alias).version}"
    except MlflowException as e:
        raise EvalError(f"--model {source}: the registry ({tracking_uri}) has no alias {alias!r} for {name!r} "
                        f"({str(e).splitlines()[0]}); see `rayft models list {name}`") from None


@contextlib.contextmanager
def local_copy(source: str, tracking_uri: Optional[str]) -> Iterator[tuple[str, str]]:
    """(a local folder holding `source`'s files, the concrete source); downloads live until the block ends."""
    from rayft.data import storage

    if source.startswith("file://"):
        source = source[len("file://"):]
    if not (source.startswith(("models:/", "runs:/")) or storage.is_uri(source)):
        if not os.path.isdir(source):
            raise EvalError(f"--model {source}: no such folder; give a model or adapter folder, "
                            f"models:/NAME@alias, models:/NAME/VERSION or runs:/RUN_ID/adapter")
        yield source, source
        return
    with tempfile.TemporaryDirectory(prefix="rayft-eval-model-") as tmp:
        if storage.is_uri(source):
            if not storage.is_dir(source):
                raise EvalError(f"--model {source}: nothing stored there; give the folder of an export")
            yield _model_root(storage.download_dir(source, tmp)), source
            return
        concrete = pin_version(source, tracking_uri)
        import mlflow

        from rayft.registry.versions import manifest_anchor

        if tracking_uri:  # models:/ URIs are resolved by the registry URI, which download_artifacts does not take
            mlflow.set_tracking_uri(tracking_uri)
            mlflow.set_registry_uri(tracking_uri)
        try:
            anchor = manifest_anchor(tracking_uri, concrete)
            mlflow.artifacts.download_artifacts(artifact_uri=concrete, dst_path=tmp, tracking_uri=tracking_uri)
        except Exception as e:  # noqa: BLE001 - mlflow raises many kinds; the message names the source
            raise EvalError(f"--model {source}: could not fetch it from {tracking_uri} ({str(e).splitlines()[0]}); "
                            f"check the name, version or run id (rayft models list NAME)") from None
        root = _model_root(tmp)
        if anchor:
            check_anchor(root, anchor, concrete)
        yield root, concrete


def check_anchor(folder: str, expected_sha256: str, source: str) -> None:
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise EvalError(f"{source}: the registry records a manifest for it but the downloaded copy has no {MANIFEST}; "
                        f"the stored artifact was changed. Re-register the export")
    with open(path, "rb") as f:
        found = hashlib.sha256(f.read()).hexdigest()
    if found != expected_sha256:
        raise EvalError(f"{source}: its {MANIFEST} (SHA-256 {found[:12]}...) is not the one the registry recorded "
                        f"({expected_sha256[:12]}...); the stored artifact was changed. Re-register the export")


def _model_root(path: str) -> str:
    for root, _dirs, files in sorted(os.walk(path)):
        if {"config.json", "adapter_config.json", MANIFEST} & set(files):
            return root
    return path


def load_model(source: str, base: ModelConfig, opener: Opener, tracking_uri: Optional[str] = None) -> LoadedModel:
    """The model `source` names, ready to generate: a merged model alone, or an adapter over `base`."""
    import torch
    from transformers import AutoTokenizer

    from rayft.models.load import choose_dtype, load_base_model

    on_gpu = torch.cuda.is_available()
    dtype = choose_dtype(base, on_gpu)
    with local_copy(source, tracking_uri) as (folder, concrete), opener(folder) as opened:
        is_adapter = os.path.isfile(os.path.join(opened, "adapter_config.json"))
        has_tokenizer = any(os.path.isfile(os.path.join(opened, f)) for f in ("tokenizer.json", "tokenizer_config.json"))
        if is_adapter:
            from peft import PeftModel

            with opener(base.name_or_path) as base_path:
                model = load_base_model(base.model_copy(update={"name_or_path": base_path}), dtype)
            model = PeftModel.from_pretrained(model, opened, is_trainable=False)
        else:
            model = load_base_model(base.model_copy(update={"name_or_path": opened}), dtype)
        if has_tokenizer:
            tokenizer = AutoTokenizer.from_pretrained(opened)
        else:
            with opener(base.tokenizer_name_or_path) as tok_path:
                tokenizer = AutoTokenizer.from_pretrained(tok_path, revision=base.revision,
                                                          trust_remote_code=base.trust_remote_code)
    model.to("cuda" if on_gpu else "cpu")
    model.eval()
    return LoadedModel(source, concrete, model, tokenizer, "adapter" if is_adapter else "merged")
