"""What a GPU run takes that CPU can check: the DeepSpeed accelerator follows train.use_gpu, bf16 else fp16 with loss
scaling (and the plan says which), NCCL between GPUs, QLoRA under ZeRO-3 refused at config load."""
import os
import subprocess
import sys

import pytest

from rayft.cluster.config import ConfigError, load_config
from rayft.models.config import ModelConfig
from rayft.models.load import choose_dtype
from rayft.train.config import TrainConfig
from rayft.train.ds_config import build_deepspeed_config
from rayft.train.engine import select_ds_accelerator
from rayft.train.trainer import torch_backend

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def test_use_gpu_wins_over_an_inherited_cpu_accelerator(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # as the Makefile and tests/conftest.py export it
    # A fresh process, as a Ray Train worker is: the inherited cpu must not decide a GPU run's accelerator.
    code = ("import os; from rayft.train.engine import select_ds_accelerator; "
            "print(select_ds_accelerator(True), os.environ['DS_ACCELERATOR'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=dict(os.environ))
    assert out.stdout.split() == ["cuda", "cuda"]
    assert select_ds_accelerator(False) == "cpu" and os.environ["DS_ACCELERATOR"] == "cpu"


def test_an_accelerator_deepspeed_already_chose_is_not_silently_kept(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from deepspeed.accelerator import get_accelerator

    assert get_accelerator()._name == "cpu"  # this test process runs DeepSpeed on CPU
    with pytest.raises(RuntimeError) as e:
        select_ds_accelerator(True)
    assert "train.use_gpu is true" in str(e.value) and "'cpu' accelerator" in str(e.value)
    assert "DS_ACCELERATOR=cuda" in str(e.value)


def test_bf16_where_supported_else_fp16_with_loss_scaling():
    m = ModelConfig(name_or_path="m")
    assert choose_dtype(m, on_gpu=True, bf16_supported=True) == "bfloat16"
    assert choose_dtype(m, on_gpu=True, bf16_supported=False) == "float16"
    assert choose_dtype(m, on_gpu=False) == "float32"
    fp16 = build_deepspeed_config(TrainConfig(use_gpu=True), "float16")
    assert fp16["fp16"]["enabled"] and fp16["fp16"]["loss_scale"] == 0  # 0: dynamic loss scaling
    assert not fp16["bf16"]["enabled"]
    bf16 = build_deepspeed_config(TrainConfig(use_gpu=True), "bfloat16")
    assert bf16["bf16"]["enabled"] and bf16["fp16"] == {"enabled": False}


def test_nccl_between_gpus_gloo_between_cpu_workers():
    assert torch_backend(True) == "nccl" and torch_backend(False) == "gloo"


def test_qlora_under_zero3_refused_at_config_load_naming_fields_and_fix():
    with pytest.raises(ConfigError) as e:
        load_config(os.path.join(ROOT, "examples", "quickstart.yaml"),
                    ["model.quantization=4bit", "train.deepspeed.zero_stage=3"])
    msg = str(e.value)
    assert "model.quantization: '4bit'" in msg and "train.deepspeed.zero_stage: 3" in msg
    assert "zero_stage: 2" in msg and "model.quantization: none" in msg
    # ZeRO-2 with QLoRA parses (it is refused later only where bitsandbytes or CUDA is missing).
    load_config(os.path.join(ROOT, "examples", "quickstart.yaml"),
                ["model.quantization=4bit", "train.deepspeed.zero_stage=2"])


def test_flash_attention_2_is_accepted_only_where_flash_attn_is_installed():
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        assert ModelConfig(name_or_path="m", attn_implementation="flash_attention_2").attn_implementation
        return
    with pytest.raises(ConfigError) as e:
        load_config(os.path.join(ROOT, "examples", "quickstart.yaml"), ["model.attn_implementation=flash_attention_2"])
    assert "model.attn_implementation" in str(e.value) and "flash-attn" in str(e.value) and "sdpa" in str(e.value)
