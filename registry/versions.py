"""MLflow Model Registry: a trained adapter (or merged model) becomes a model version with its lineage.

`register_version` is the one way rayft creates a version; promotion and aliases build on it.

Manifest anchoring: the SHA-256 of the logged folder's `rayft-manifest.json` is recorded in the registry (the
version's tag `rayft.manifest_sha256`, and the run's tag `rayft.manifest_sha256:<artifact path>` for `runs:/`
URIs), where writing to the artifact store cannot change it. `manifest_anchor(uri)` gives it back to loaders,
which refuse a copy whose manifest is missing or different (security/artifacts.py verify_anchor).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .tracking import client

LINEAGE_KEYS = ("base_model", "peft_type", "lora_rank", "dataset_fingerprint", "eval_loss", "duration_s", "git_commit",
                "kind")


MANIFEST_TAG = "rayft.manifest_sha256"


def run_anchor_tag(artifact_path: str) -> str:
    return f"{MANIFEST_TAG}:{artifact_path.strip('/')}"


def anchor_artifact(tracking_uri: str, run_id: str, artifact_path: str) -> Optional[str]:
    """Record the SHA-256 of the manifest of the run's logged folder `artifact_path` as a run tag (read back from
    the artifact store: what was stored is what is anchored). Returns it; None when the folder has no manifest."""
    import shutil
    import tempfile

    from rayft.security.artifacts import MANIFEST, file_sha256

    c = client(tracking_uri)
    rel = f"{artifact_path.strip('/')}/{MANIFEST}"
    if not any(f.path == rel for f in c.list_artifacts(run_id, artifact_path.strip("/"))):
        return None
    tmp = tempfile.mkdtemp(prefix="rayft-anchor-")
    try:
        sha = file_sha256(c.download_artifacts(run_id, rel, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    c.set_tag(run_id, run_anchor_tag(artifact_path), sha)
    return sha


def manifest_anchor(tracking_uri: Optional[str], uri: str) -> Optional[str]:
    """The manifest SHA-256 recorded for `models:/NAME/VERSION` (the version's tag) or `runs:/RUN_ID/PATH` (the
    run's tag for PATH); None for other URIs and for versions registered without a manifest."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    if uri.startswith("models:/"):
        name, _, version = uri[len("models:/"):].strip("/").rpartition("/")
        return dict(c.get_model_version(name, version).tags or {}).get(MANIFEST_TAG)
    if uri.startswith("runs:/"):
        run_id, _, path = uri[len("runs:/"):].strip("/").partition("/")
        return c.get_run(run_id).data.tags.get(run_anchor_tag(path))
    return None


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
    tags = {k: str(v) for k, v in lineage.items() if v is not None}
    anchor = anchor_artifact(tracking_uri, run_id, artifact_path)  # every rayft export carries a manifest
    if anchor:
        tags[MANIFEST_TAG] = anchor
    mv = c.create_model_version(name, source=source, run_id=run_id, description=description, tags=tags)
    return RegisteredVersion(name=name, version=str(mv.version), source=source, run_id=run_id)


def list_versions(tracking_uri: str, name: str) -> list[dict]:
    c = client(tracking_uri)
    out = []
    found = c.search_model_versions(f"name = '{name}'")
    # Search results do not carry aliases; the registered model does (alias -> version).
    by_version: dict[str, list[str]] = {}
    if found:
        for alias, version in (getattr(c.get_registered_model(name), "aliases", None) or {}).items():
            by_version.setdefault(str(version), []).append(alias)
    for mv in found:
        out.append({"version": str(mv.version), "source": mv.source, "run_id": mv.run_id, "tags": dict(mv.tags),
                    "aliases": sorted(by_version.get(str(mv.version), []))})
    return sorted(out, key=lambda v: int(v["version"]))


class RegistryError(ValueError):
    """A registry change that cannot be made; the message says what to do."""


HISTORY_TAG = "rayft.alias_history"  # on the registered model: "champion=1,2,3" (oldest first)


def _history(c, name: str) -> dict[str, list[str]]:
    tags = dict(c.get_registered_model(name).tags or {})
    out: dict[str, list[str]] = {}
    for part in filter(None, tags.get(HISTORY_TAG, "").split(";")):
        alias, _, versions = part.partition("=")
        out[alias] = [v for v in versions.split(",") if v]
    return out


def _save_history(c, name: str, history: dict[str, list[str]]) -> None:
    c.set_registered_model_tag(name, HISTORY_TAG, ";".join(f"{a}={','.join(v)}" for a, v in sorted(history.items())))


def _check_version(c, name: str, version: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        c.get_model_version(name, str(version))
    except MlflowException:
        raise RegistryError(f"model {name!r} has no version {version!r}; see `rayft models list {name}`") from None


def promote(tracking_uri: str, name: str, version: str, alias: str = "champion") -> Optional[str]:
    """Point `alias` at `version`, remembering the version it pointed at (for rollback). Returns that one."""
    from mlflow.exceptions import MlflowException

    c = client(tracking_uri)
    _check_version(c, name, version)
    try:
        previous = str(c.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        previous = None
    if previous == str(version):
        return previous
    history = _history(c, name)
    history.setdefault(alias, [])
    if previous is not None and (not history[alias] or history[alias][-1] != previous):
        history[alias].append(previous)
    history[alias].append(str(version))
    c.set_registered_model_alias(name, alias, str(version))
    _save_history(c, name, history)
    return previous


def rollback(tracking_uri: str, name: str, alias: str = "champion") -> tuple[str, str]:
    """Move `alias` back to the version it pointed at before the last promotion. Returns (from, to)."""
    from mlflow.exceptions import MlflowException

    c = client(tracking_uri)
    try:
        current = str(c.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        raise RegistryError(f"model {name!r} has no {alias!r} alias to roll back") from None
    history = _history(c, name).get(alias, [])
    while history and history[-1] == current:
        history.pop()
    if not history:
        raise RegistryError(f"{name}@{alias} (version {current}) has no earlier version to roll back to")
    target = history[-1]
    c.set_registered_model_alias(name, alias, target)
    full = _history(c, name)
    full[alias] = history  # the rolled-back version leaves the history; promoting it again re-adds it
    _save_history(c, name, full)
    return current, target


def delete_version(tracking_uri: str, name: str, version: str) -> None:
    """Delete a version of `name`; refused while an alias points at it (move or roll back the alias first)."""
    c = client(tracking_uri)
    _check_version(c, name, version)
    aliases = sorted(a for a, v in (getattr(c.get_registered_model(name), "aliases", None) or {}).items()
                     if str(v) == str(version))
    if aliases:
        raise RegistryError(f"{name} v{version} is @{', @'.join(aliases)}; promote another version to "
                            f"{'them' if len(aliases) > 1 else 'it'} (rayft models promote) or roll back first")
    c.delete_model_version(name, str(version))
    history = _history(c, name)  # a rollback must never land on the deleted version
    if any(str(version) in v for v in history.values()):
        _save_history(c, name, {a: [x for x in v if x != str(version)] for a, v in history.items()})
