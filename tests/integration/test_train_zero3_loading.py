"""Under ZeRO-3 the base loads partitioned: every rank holds only its slice of each weight from the start.

A 2-worker Ray Train group builds rayft's engine (ZeRO-3) on the tiny model; each rank checks that no base weight
is whole in its memory, then gathers each weight and compares it with the checkpoint's tensor, and the engine
takes a training step.
"""
import pytest

pytestmark = pytest.mark.slow


def _load_check(config):
    import tempfile

    import deepspeed
    import ray.train
    import torch
    from safetensors.torch import load_file

    from rayft.models.config import ModelConfig
    from rayft.train.config import TrainConfig
    from rayft.train.ds_config import build_deepspeed_config
    from rayft.train.model import build_peft_model

    ctx = ray.train.get_context()
    world = ctx.get_world_size()
    train = TrainConfig(num_workers=world, micro_batch_size=2, deepspeed={"zero_stage": 3, "config_file": config["ds_json"]})
    ds_config = build_deepspeed_config(train, "float32")
    # What build_engine does, with a look at the model between loading it and handing it to DeepSpeed.
    model = build_peft_model(ModelConfig(name_or_path=config["model_dir"]), train, "float32", log=lambda _: None,
                             zero3_config=ds_config)
    base = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
            for n, p in model.named_parameters() if "lora_" not in n}
    # Partitioned before DeepSpeed's engine ever saw the model: the parameter itself is an empty placeholder and
    # this rank's slice lives in ds_tensor.
    whole_here = [n for n, p in base.items()
                  if not hasattr(p, "ds_tensor") or p.numel() > 0 or p.ds_tensor.numel() >= p.ds_numel]
    checkpoint = load_file(f"{config['model_dir']}/model.safetensors")
    differ = []
    for name, p in base.items():
        with deepspeed.zero.GatheredParameters([p]):
            if not torch.equal(p.data.cpu(), checkpoint[name].to(p.dtype)):
                differ.append(name)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config,
                                      model_parameters=[p for p in model.parameters() if p.requires_grad])
    x = torch.randint(0, 500, (2, 16))
    engine.backward(engine(input_ids=x, labels=x).loss)
    engine.step()
    metrics = {"whole": len(whole_here), "differ": len(differ), "n_weights": len(base),
               "missing": sorted(set(checkpoint) - set(base))[:3],
               "keeps_config": engine.module.rayft_hf_deepspeed_config is not None}
    # With a checkpoint, so that rank 0's metrics reach the Result.
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tempfile.mkdtemp()))


def test_zero3_base_loads_partitioned_and_equals_the_checkpoint(ray_local, tiny_model_dir, tmp_path):
    import json

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ds_json = tmp_path / "ds.json"  # no weight kept whole for being small
    ds_json.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    result = TorchTrainer(
        _load_check, train_loop_config={"model_dir": tiny_model_dir, "ds_json": str(ds_json)},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
        run_config=RunConfig(name="zero3-load", storage_path=str(tmp_path)),
    ).fit()
    m = result.metrics
    assert m["n_weights"] > 10 and m["missing"] == []
    assert m["whole"] == 0, "rank 0 holds whole base weights: the model was not built partitioned"
    assert m["differ"] == 0, "the partitioned weights differ from the checkpoint"
    assert m["keeps_config"]


def test_gradient_checkpointing_with_lora_trains_under_zero3_on_two_workers(ray_local, repo_root, tiny_model_dir,
                                                                              tmp_path):
    """rayft's own training path, 2 workers, ZeRO-3 (partitioned load), non-reentrant gradient checkpointing: the
    recomputed forward re-gathers partitioned weights, which reentrant-free checkpointing must accept."""
    import math

    from rayft.train.trainer import run_training
    from tests.integration.test_train_distributed import _config

    logs = []
    cfg = _config(repo_root, tiny_model_dir, str(tmp_path), "zero3-gc", "train.deepspeed.zero_stage=3",
                  "train.gradient_checkpointing=true", "train.max_steps=3", "train.save_every_n_steps=3",
                  "train.eval_every_n_steps=3", "train.learning_rate=1e-2")
    out = run_training(cfg, log=logs.append)
    m = out.metrics
    assert any("gradient checkpointing: on (non-reentrant)" in str(line) for line in logs), logs
    assert m["global_step"] == 3 and math.isfinite(m["loss"]) and m["grad_norm"] > 0, m
    assert m["eval_loss"] < m["initial_eval_loss"], m
