"""MLflow tracking: one MLflow run per rayft run, found again by its tags when a run is resumed.

The driver opens the run (params, tags, data report); rank 0 logs step metrics into it by run id;
the driver closes it with the final adapter as an artifact.
"""
from __future__ import annotations

import os
import subprocess
from typing import Any, Optional

RUN_TAG = "rayft.run"
STORAGE_TAG = "rayft.storage_path"


def tracking_uri(uri: Optional[str], storage_path: str) -> str:
    """The configured URI, or the embedded default: SQLite in the storage folder."""
    if uri:
        return uri
    if "://" in storage_path and not storage_path.startswith("file://"):
        raise ValueError(
            f"tracking.tracking_uri is unset and storage_path {storage_path!r} is remote; the embedded SQLite store "
            f"needs a local folder. Set tracking.tracking_uri to your MLflow server (http://host:5000)"
        )
    folder = os.path.abspath(storage_path.removeprefix("file://"))
    os.makedirs(folder, exist_ok=True)
    return f"sqlite:///{folder}/mlflow.db"


def _is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def storage_key(storage_path: str) -> str:
    """The storage path as recorded on MLflow runs: an absolute folder, or the URI as given."""
    return storage_path.rstrip("/") if _is_uri(storage_path) else os.path.abspath(storage_path.removeprefix("file://"))


def artifact_location(storage_path: str) -> str:
    """Where an embedded store keeps artifacts: `<storage>/mlartifacts`, a folder or the bucket prefix (S3 through
    boto3, which reads the endpoint from AWS_ENDPOINT_URL)."""
    if _is_uri(storage_path):
        return storage_path.rstrip("/") + "/mlartifacts"
    return "file://" + os.path.join(storage_key(storage_path), "mlartifacts")


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def open_run(uri: str, experiment: str, run_name: str, storage_path: str, params: dict[str, Any],
             tags: dict[str, str]) -> str:
    """The MLflow run of this rayft run: the existing one when resuming, else a new one. Returns its id."""
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        exp_id = c.create_experiment(experiment, artifact_location=artifact_location(storage_path)
                                     if uri.startswith("sqlite:") else None)
    else:
        exp_id = exp.experiment_id
    found = c.search_runs([exp_id], filter_string=f"tags.`{RUN_TAG}` = '{run_name}'",
                          max_results=1, order_by=["attributes.start_time DESC"])
    found = [r for r in found if r.data.tags.get(STORAGE_TAG) == storage_key(storage_path)]
    if found:
        run_id = found[0].info.run_id
        if found[0].info.status != "RUNNING":
            c.update_run(run_id, status="RUNNING")
        return run_id
    run = c.create_run(exp_id, run_name=run_name,
                       tags={RUN_TAG: run_name, STORAGE_TAG: storage_key(storage_path), **tags})
    flat = flatten(params)
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in flat.items()]
    for i in range(0, len(items), 100):
        c.log_batch(run.info.run_id, params=items[i:i + 100])
    return run.info.run_id


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    ms = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
    client(uri).log_batch(run_id, metrics=ms)


def git_commit(path: str = ".") -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
