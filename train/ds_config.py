"""The DeepSpeed config, built in one place from `train:` and optionally overridden by a user JSON."""
from __future__ import annotations

import copy
import json
from typing import Any

from .config import TrainConfig


class DeepSpeedConfigError(ValueError):
    """`train.deepspeed.config_file` cannot be used."""


# Keys rayft owns: the loop, the data shards and the schedule are computed from them.
_OURS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")


def build_deepspeed_config(train: TrainConfig, dtype: str) -> dict:
    """`dtype` is the compute dtype chosen for the device: float32, bfloat16 or float16."""
    ds = train.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": train.use_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": train.use_gpu}
    if ds.zero_stage == 3:
        # Save a consolidated 16-bit model only on request; the adapter is gathered by rayft itself.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    config = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.accumulation_steps,
        "train_batch_size": train.rows_per_step,
        "gradient_clipping": train.max_grad_norm,
        "optimizer": {
            "type": "AdamW",
            # torch's AdamW, not DeepSpeed's FusedAdam / CPUAdam: those are compiled on first use (minutes, and a
            # CUDA toolkit on GPUs), and for LoRA's few parameters the optimizer step is not where time goes.
            "params": {"lr": train.learning_rate, "weight_decay": train.weight_decay, "betas": [0.9, 0.999], "eps": 1e-8,
                       "torch_adam": True},
        },
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bfloat16"},
        # fp16 (GPUs without bf16) needs loss scaling: dynamic, from 2^16, halved on overflow (the step is skipped).
        "fp16": ({"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                  "hysteresis": 2, "min_loss_scale": 1} if dtype == "float16" else {"enabled": False}),
        "steps_per_print": 1_000_000_000,  # rayft reports metrics itself
        "wall_clock_breakdown": False,
    }
    if ds.config_file:
        config = deep_merge(config, read_user_config(ds.config_file))
    return config


def read_user_config(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            user = json.load(f)
    except OSError as e:
        raise DeepSpeedConfigError(f"train.deepspeed.config_file {path!r} cannot be read: {e.strerror}; fix the path") from None
    except json.JSONDecodeError as e:
        raise DeepSpeedConfigError(f"train.deepspeed.config_file {path!r} is not valid JSON: {e}") from None
    if not isinstance(user, dict):
        raise DeepSpeedConfigError(f"train.deepspeed.config_file {path!r}: the top level must be an object")
    clash = [k for k in _OURS if k in user and user[k] != "auto"]
    if clash:
        raise DeepSpeedConfigError(
            f"train.deepspeed.config_file {path!r} sets {clash}; rayft derives batch sizes from train.micro_batch_size, "
            f"train.gradient_accumulation_steps and train.num_workers. Remove them from the JSON (or write \"auto\")"
        )
    return {k: v for k, v in user.items() if v != "auto"}


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out
