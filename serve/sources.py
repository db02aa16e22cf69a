"""Where served weights come from: a local folder, or a URI resolved to a local copy once per replica.

    /path/to/folder                 used as is
    models:/NAME@alias, models:/NAME/VERSION   the MLflow registry (tracking URI from the config)
    runs:/..., s3://..., gs://...   downloaded with mlflow's artifact clients
"""
from __future__ import annotations

import os
from typing import Optional


def is_remote(uri: str) -> bool:
    return uri.startswith(("models:/", "runs:/", "s3://", "gs://", "wasbs://", "hdfs://"))


def resolve(uri: str, tracking_uri: Optional[str] = None, cache_dir: Optional[str] = None) -> str:
    """A local folder holding the files of `uri`."""
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if not is_remote(uri):
        return uri
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    dst = cache_dir or os.path.join(os.environ.get("TMPDIR", "/tmp"), "rayft-serve-cache")
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in uri)
    target = os.path.join(dst, safe)
    # The marker sits beside the folder, not in it: a file added to an exported folder fails its manifest.
    marker = target.rstrip("/") + ".complete"
    if os.path.isfile(marker):
        return _model_root(target)
    os.makedirs(target, exist_ok=True)
    try:
        path = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=target)
    except Exception as e:  # noqa: BLE001 - mlflow raises many kinds; the message says which URI failed
        raise FileNotFoundError(f"could not fetch {uri!r} (tracking URI {tracking_uri!r}): {e}") from None
    open(marker, "w").close()
    return _model_root(path)


def _model_root(path: str) -> str:
    """The folder with config.json, adapter_config.json or a rayft manifest (an encrypted export); registry
    artifacts may add one level."""
    from train.artifacts import MANIFEST

    for root, _dirs, files in os.walk(path):
        if {"config.json", "adapter_config.json", MANIFEST} & set(files):
            return root
    return path
