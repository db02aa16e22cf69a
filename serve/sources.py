"""Where served weights come from: a local folder, or a URI resolved to a local copy once per replica.

    /path/to/folder                 used as is
    models:/NAME@alias, models:/NAME/VERSION   the MLflow registry (tracking URI from the config)
    runs:/..., s3://..., gs://...   downloaded with mlflow's artifact clients

A `models:/` or `runs:/` source registered by rayft has its manifest's SHA-256 in the registry: the local copy
(downloaded or cached) is refused when its manifest is missing or different (registry/versions.py).
"""
from __future__ import annotations

import os
from typing import Optional


def is_remote(uri: str) -> bool:
    return uri.startswith(("models:/", "runs:/", "s3://", "gs://", "wasbs://", "hdfs://"))


def resolve(uri: str, tracking_uri: Optional[str] = None, cache_dir: Optional[str] = None) -> str:
    """A local folder holding the files of `uri`.

    Downloads are cached per replica machine under a key of the tracking URI and the concrete source: an alias
    (`models:/NAME@champion`) is first resolved to its version, so moving the alias serves the new version,
    and two registries that both have `models:/NAME/1` never share a copy."""
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if not is_remote(uri):
        return uri
    import hashlib
    import shutil
    import tempfile

    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    from rayft.registry.versions import manifest_anchor
    from rayft.security.artifacts import verify_anchor

    try:
        concrete = _pin_version(uri, tracking_uri)
        anchor = manifest_anchor(tracking_uri, concrete)
    except Exception as e:  # noqa: BLE001 - mlflow raises many kinds; the message says which URI failed
        raise FileNotFoundError(f"could not fetch {uri!r} (tracking URI {tracking_uri!r}): {e}") from None

    def checked(root: str) -> str:
        if anchor:
            verify_anchor(root, anchor, concrete if concrete == uri else f"{uri} ({concrete})")
        return root

    dst = cache_dir or os.path.join(os.environ.get("TMPDIR", "/tmp"), "rayft-serve-cache")
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in concrete)[-80:]
    key = hashlib.sha256(f"{mlflow.get_tracking_uri()}\n{concrete}".encode()).hexdigest()[:16]
    target = os.path.join(dst, f"{safe}-{key}")
    # The marker sits beside the folder, not in it: a file added to an exported folder fails its manifest check.
    marker = target + ".complete"
    if os.path.isfile(marker) and os.path.isdir(target):
        return checked(_model_root(target))
    if os.path.isdir(target):  # without its marker: left by an interrupted download or an older layout
        shutil.rmtree(target, ignore_errors=True)
    os.makedirs(dst, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".download-", dir=dst)  # a half-finished download is never seen as complete
    try:
        mlflow.artifacts.download_artifacts(artifact_uri=concrete, dst_path=tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished the same download first
            shutil.rmtree(tmp, ignore_errors=True)
        open(marker, "w").close()
    except Exception as e:  # noqa: BLE001
        shutil.rmtree(tmp, ignore_errors=True)
        raise FileNotFoundError(f"could not fetch {uri!r} (tracking URI {tracking_uri!r}): {e}") from None
    return checked(_model_root(target))


def _pin_version(uri: str, tracking_uri: Optional[str]) -> str:
    """`models:/NAME@alias` -> `models:/NAME/VERSION` (the version the alias names now); other URIs unchanged."""
    if not uri.startswith("models:/") or "@" not in uri:
        return uri
    from mlflow.tracking import MlflowClient

    name, alias = uri[len("models:/"):].rstrip("/").rsplit("@", 1)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    return f"models:/{name}/{client.get_model_version_by_alias(name, alias).version}"


def _model_root(path: str) -> str:
    """The folder with config.json, adapter_config.json or a rayft manifest (an encrypted export); registry
    artifacts may add one level."""
    from rayft.security.artifacts import MANIFEST

    for root, _dirs, files in os.walk(path):
        if {"config.json", "adapter_config.json", MANIFEST} & set(files):
            return root
    return path
