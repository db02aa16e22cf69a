"""The `train:` and `tracking:` sections: defaults, shipped examples, and errors that say what to fix."""
import pytest

from rayft.cluster.config import ConfigError, config_from_dict, load_config

BASE = {"name": "t", "model": {"name_or_path": "m"}, "data": {"sources": [{"path": "x.jsonl"}]}}


def cfg_with(**train):
    return config_from_dict(BASE, overrides=[f"train.{k}={v}" for k, v in train.items()])


def error_of(*overrides) -> str:
    with pytest.raises(ConfigError) as e:
        config_from_dict(BASE, overrides=list(overrides))
    return str(e.value)


def test_defaults_are_a_valid_cpu_run():
    cfg = config_from_dict(BASE)
    assert cfg.train.num_workers == 1 and cfg.train.deepspeed.zero_stage == 2
    assert cfg.train.lora.target_modules == "auto"
    assert cfg.tracking.enabled and cfg.tracking.tracking_uri is None


@pytest.mark.parametrize("path", ["examples/quickstart.yaml", "examples/qwen2.5-1.5b-gpu.yaml"])
def test_shipped_examples_parse(repo_root, path):
    cfg = load_config(repo_root / path)
    assert cfg.train.max_steps or cfg.train.epochs


def test_quickstart_trains_on_cpu_with_two_workers_zero2(repo_root):
    cfg = load_config(repo_root / "examples/quickstart.yaml")
    assert (cfg.train.num_workers, cfg.train.use_gpu, cfg.train.deepspeed.zero_stage) == (2, False, 2)


def test_gpu_example_is_zero3_bf16(repo_root):
    cfg = load_config(repo_root / "examples/qwen2.5-1.5b-gpu.yaml")
    assert cfg.train.use_gpu and cfg.train.deepspeed.zero_stage == 3 and cfg.model.dtype == "bfloat16"
    assert cfg.train.accumulation_steps == 4


def test_rank_zero_names_field_and_value():
    msg = error_of("train.lora.rank=0")
    assert "train.lora.rank" in msg and "0" in msg and "greater than or equal to 1" in msg


def test_zero_stage_5_lists_allowed_stages():
    msg = error_of("train.deepspeed.zero_stage=5")
    assert "train.deepspeed.zero_stage" in msg and "5" in msg
    for stage in "0123":
        assert stage in msg.split("zero_stage", 1)[1]


def test_batch_size_that_does_not_divide():
    msg = error_of("train.global_batch_size=10", "train.micro_batch_size=4", "train.num_workers=2")
    assert "global_batch_size 10" in msg and "micro_batch_size x num_workers" in msg and "multiple of 8" in msg


def test_global_batch_size_derives_accumulation():
    cfg = config_from_dict(BASE, overrides=["train.global_batch_size=32", "train.micro_batch_size=4", "train.num_workers=2"])
    assert cfg.train.accumulation_steps == 4 and cfg.train.rows_per_step == 32


def test_typo_in_train_section_lists_allowed_fields():
    msg = error_of("train.learning_rat=1e-4")
    assert "train.learning_rat" in msg and "learning_rate" in msg


def test_offload_params_needs_zero3():
    msg = error_of("train.deepspeed.offload_params=true")
    assert "offload_params needs zero_stage 3" in msg


def test_empty_target_module_list():
    assert "at least one module name" in error_of("train.lora.target_modules=[]")


def test_unknown_quantization_mode():
    msg = error_of("model.quantization=2bit")
    assert "model.quantization" in msg and "4bit" in msg
