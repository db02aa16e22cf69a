"""The `security:` section in real training runs (local Ray, DeepSpeed on gloo, the tiny model):

1. The training workers apply it: a base whose weights are a pickle file trains when `allow_pickle_weights: true`
   (the workers used to ignore the section and refuse it).
"""
import os

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

