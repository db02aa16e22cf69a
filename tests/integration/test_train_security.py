"""The `security:` section in real training runs (local Ray, DeepSpeed on gloo, the tiny model):

1. The training workers apply it: a base whose weights are a pickle file trains when `allow_pickle_weights: true`
   (the workers used to ignore the section and refuse it).
2. `encrypt_artifacts: true` leaves no plaintext weights anywhere rayft writes: after training (with a resume
   from an encrypted checkpoint), export, merge and registration, no file of the storage (run folder, checkpoints,
   exports, MLflow database and artifacts) holds a known run of weight bytes, while the decrypted export does.
"""
import base64
import os
import re

import pytest

pytestmark = pytest.mark.slow


def _config(repo_root, model_dir, storage, *extra):
    from rayft.cluster.config import load_config

    return load_config(repo_root / "examples" / "quickstart.yaml", [
        f"model.name_or_path={model_dir}", f"storage_path={storage}", "train.num_workers=1",
        "train.learning_rate=1e-2", "train.warmup_steps=0", "data.max_seq_length=256", *extra])


def test_the_workers_apply_the_security_section(ray_local, repo_root, tiny_model_dir, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file

    from rayft.train.trainer import fit, prepare_training_data

    pickled = tmp_path / "pickled-base"  # the tiny model with its weights as a pickle file
    shutil.copytree(tiny_model_dir, pickled, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(os.path.join(tiny_model_dir, "model.safetensors")), pickled / "pytorch_model.bin")
    assert (pickled / "pytorch_model.bin").is_file() and not list(pickled.glob("*.safetensors"))
    cfg = _config(repo_root, str(pickled), str(tmp_path / "runs"), "name=pickled", "train.max_steps=1",
                  "train.save_every_n_steps=1", "train.eval_every_n_steps=1", "tracking.enabled=false",
                  "security.allow_pickle_weights=true")
    out = fit(cfg, prepare_training_data(cfg, log=lambda _: None), log=lambda _: None)
    assert out.metrics["global_step"] == 1 and out.adapter_dir


def _scan(root: str, patterns: dict[str, bytes]) -> list[str]:
    found = []
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                data = f.read()
            found += [f"{what} in {path}" for what, p in patterns.items() if p in data]
    return found


def test_encrypt_artifacts_leaves_no_plaintext_weights(ray_local, repo_root, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from rayft.registry.tracking import client
    from rayft.security.artifacts import check_for_load, opened_for_load
    from rayft.serve.sources import resolve
    from rayft.train.export import export_run
    from rayft.train.trainer import fit, prepare_training_data

    key = tmp_path / "artifact.key"
    key.write_text(base64.b64encode(os.urandom(32)).decode())
    key.chmod(0o600)
    storage = tmp_path / "runs"
    sets = ["name=secret", "train.save_every_n_steps=1", "train.eval_every_n_steps=1",
            "security.encrypt_artifacts=true", f"security.key_file={key}"]
    cfg = _config(repo_root, tiny_model_dir, str(storage), "train.max_steps=2", *sets)
    data = prepare_training_data(cfg, log=lambda _: None)
    fit(cfg, data, log=lambda _: None)
    logs: list[str] = []  # the same run, longer: it resumes from its encrypted step-2 checkpoint
    out = fit(_config(repo_root, tiny_model_dir, str(storage), "train.max_steps=3", *sets), data, log=logs.append)
    assert any("resumed from checkpoint_step00000002" in line for line in logs), logs
    assert out.metrics["global_step"] == 3 and out.registered is not None
    export = export_run(out.run_dir, str(storage / "export"), merge=True, register="secret-merged",
                        log=lambda _: None)

    # Known weight bytes: the trained adapter (decrypted from the export) and the base (in the merged model).
    with opened_for_load(export.adapter_dir, cfg.security) as plain:
        tensors = load_file(os.path.join(plain, "adapter_model.safetensors"))
        adapter_bytes = open(os.path.join(plain, "adapter_model.safetensors"), "rb").read()
    lora_b = next(t for k, t in sorted(tensors.items()) if "lora_B" in k and t.abs().sum() > 0)
    lora_a = next(t for k, t in sorted(tensors.items()) if "lora_A" in k)
    base = load_file(os.path.join(tiny_model_dir, "model.safetensors"))["model.embed_tokens.weight"]
    patterns = {"trained lora_B": lora_b.flatten()[:8].numpy().tobytes(),
                "trained lora_A": lora_a.flatten()[8:16].numpy().tobytes(),
                "base embedding": base[5].flatten()[:8].numpy().tobytes()}
    assert patterns["trained lora_B"] in adapter_bytes and patterns["trained lora_A"] in adapter_bytes
    assert len(set(patterns.values())) == 3 and all(re.sub(b"\x00", b"", p) for p in patterns.values())

    leaks = _scan(str(storage), patterns)
    assert not leaks, "\n".join(leaks)

    # What was registered is encrypted, anchored and loads with the key: the adapter `fit` registered, the merged
    # model of the export.
    c = client(out.tracking_uri)
    assert {str(v.version) for v in c.search_model_versions("name = 'secret'")} == {"1", "2"}
    for uri in ("models:/secret/2", "models:/secret-merged/1"):
        manifest = check_for_load(resolve(uri, out.tracking_uri, cache_dir=str(tmp_path / "cache")), cfg.security)
        assert manifest["encryption"]["cipher"] == "AES-256-GCM", uri
