"""Trust anchored where the artifact store cannot change it: a registered export records its manifest's SHA-256
in the registry, and loading it by `models:/` or `runs:/` refuses a stored copy whose manifest was deleted or
replaced. A local folder without a manifest loads as an unverified base model (a warning), or is refused with
`security.require_manifest: true`. Real MLflow (SQLite registry, file artifact store), real files, no Ray."""
import json
import logging
import os

import pytest

from rayft.registry.versions import register_version
from rayft.security.artifacts import (
    MANIFEST,
    ArtifactError,
    file_sha256,
    finish_export,
    opened_for_load,
    write_manifest,
)
from rayft.security.config import SecurityConfig
from rayft.serve.sources import resolve

MANIFEST_TAG = "rayft.manifest_sha256"  # the version's tag; the run's is MANIFEST_TAG:<artifact path>


def _export(folder, weights: bytes = b"\x01\x02\x03\x04" * 64):
    os.makedirs(folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model_type": "llama"}, f)
    with open(os.path.join(folder, "model.safetensors"), "wb") as f:
        f.write(weights)
    finish_export(str(folder), SecurityConfig())
    return str(folder)


@pytest.fixture
def registry(tmp_path):
    """An export logged by a run under export/merged and registered as `bot` v1."""
    from rayft.registry.tracking import client

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = client(uri)
    exp = c.create_experiment("anchor", artifact_location=f"file://{tmp_path}/mlartifacts")
    run = c.create_run(exp)
    folder = _export(tmp_path / "export")
    c.log_artifacts(run.info.run_id, folder, artifact_path="export/merged")
    v = register_version(uri, "bot", run.info.run_id, "export/merged", {"kind": "merged"})
    stored = os.path.join(str(tmp_path), "mlartifacts", run.info.run_id, "artifacts", "export", "merged")
    return {"uri": uri, "run_id": run.info.run_id, "version": v, "stored": stored, "folder": folder, "tmp": tmp_path}


def _resolve(registry, uri, cache):
    return resolve(uri, registry["uri"], cache_dir=str(registry["tmp"] / cache))


def test_registration_records_the_manifest_hash(registry):
    from rayft.registry.tracking import client

    c = client(registry["uri"])
    want = file_sha256(os.path.join(registry["folder"], MANIFEST))
    assert c.get_model_version("bot", "1").tags[MANIFEST_TAG] == want
    assert c.get_run(registry["run_id"]).data.tags[f"{MANIFEST_TAG}:export/merged"] == want
    for uri in ("models:/bot/1", f"runs:/{registry['run_id']}/export/merged"):
        local = _resolve(registry, uri, "cache-ok")
        with opened_for_load(local) as path:
            assert os.path.isfile(os.path.join(path, "model.safetensors"))


@pytest.mark.parametrize("uri", ["models:/bot/1", "runs"])
def test_a_deleted_manifest_is_refused_naming_the_file(registry, uri):
    uri = f"runs:/{registry['run_id']}/export/merged" if uri == "runs" else uri
    os.remove(os.path.join(registry["stored"], MANIFEST))
    with pytest.raises(ArtifactError, match=rf"{MANIFEST}: missing; .* was registered with a manifest"):
        _resolve(registry, uri, "cache-deleted")


def test_a_replaced_manifest_is_refused_even_when_consistent_with_the_files(registry):
    """An attacker with write access to the artifact store changes the weights and writes a matching manifest:
    the files agree with it, but it is not the manifest the registry recorded."""
    with open(os.path.join(registry["stored"], "model.safetensors"), "wb") as f:
        f.write(b"\xff" * 256)
    write_manifest(registry["stored"])
    with pytest.raises(ArtifactError, match=rf"{MANIFEST}: not the manifest models:/bot@champion \(models:/bot/1\) "
                                            r"was registered with"):
        from rayft.registry.tracking import client

        client(registry["uri"]).set_registered_model_alias("bot", "champion", "1")
        _resolve(registry, "models:/bot@champion", "cache-replaced")


def test_a_cached_copy_is_checked_again(registry):
    local = _resolve(registry, "models:/bot/1", "cache-again")
    os.remove(os.path.join(local, MANIFEST))  # the copy on this machine loses its manifest
    with pytest.raises(ArtifactError, match="missing"):
        _resolve(registry, "models:/bot/1", "cache-again")


def test_a_local_folder_without_manifest_is_an_unverified_base_or_refused(tmp_path, caplog):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    with caplog.at_level(logging.WARNING, logger="rayft.security"):
        with opened_for_load(str(base)) as path:
            assert path == str(base)
    assert f"{base}: no {MANIFEST}; loaded as an unverified base model" in caplog.text
    with pytest.raises(ArtifactError, match=rf"{base}: no {MANIFEST}, and security.require_manifest is true.*"
                                            r"set security.require_manifest: false"):
        with opened_for_load(str(base), SecurityConfig(require_manifest=True)):
            pass
    with opened_for_load(_export(tmp_path / "export"), SecurityConfig(require_manifest=True)):
        pass  # an export carries its manifest
