"""MLflow Model Registry: a trained adapter (or merged model) becomes a model version with its lineage.

`register_version` is the one way rayft creates a version; promotion and aliases build on it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .tracking import client

LINEAGE_KEYS = ("base_model", "peft_type", "lora_rank", "dataset_fingerprint", "eval_loss", "duration_s", "git_commit",
                "kind")


@dataclass
class RegisteredVersion:
    name: str
    version: str
    source: str
    run_id: Optional[str]


def register_version(tracking_uri: str, name: str, run_id: str, artifact_path: str, lineage: dict,
                     description: str = "") -> RegisteredVersion:
    """Register the artifact `artifact_path` of MLflow run `run_id` as a new version of model `name`.

    `lineage` becomes the version's tags (None values are left out); keys outside LINEAGE_KEYS are refused so a
    typo does not silently create a new tag.
    """
    from mlflow.exceptions import MlflowException

    unknown = sorted(set(lineage) - set(LINEAGE_KEYS))
    if unknown:
        raise ValueError(f"register_version: unknown lineage keys {unknown}; allowed: {', '.join(LINEAGE_KEYS)}")
    c = client(tracking_uri)
    try:
        c.get_registered_model(name)
    except MlflowException:
        c.create_registered_model(name, description="LoRA fine-tunes made by rayft")
    source = c.get_run(run_id).info.artifact_uri.rstrip("/") + "/" + artifact_path.strip("/")
    mv = c.create_model_version(name, source=source, run_id=run_id, description=description,
                                tags={k: str(v) for k, v in lineage.items() if v is not None})
    return RegisteredVersion(name=name, version=str(mv.version), source=source, run_id=run_id)


def list_versions(tracking_uri: str, name: str) -> list[dict]:
    c = client(tracking_uri)
    out = []
    for mv in c.search_model_versions(f"name = '{name}'"):
        out.append({"version": str(mv.version), "source": mv.source, "run_id": mv.run_id, "tags": dict(mv.tags),
                    "aliases": list(getattr(mv, "aliases", []) or [])})
    return sorted(out, key=lambda v: int(v["version"]))
