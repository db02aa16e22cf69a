"""The DeepSpeed engine over a PEFT LoRA model, as every worker builds it."""
from __future__ import annotations

import os
import sys
from typing import Callable

from rayft.models.config import ModelConfig

from .config import TrainConfig


def select_ds_accelerator(use_gpu: bool) -> str:
    """Point DeepSpeed at the device `train.use_gpu` asks for, before anything imports it in this process.

    DeepSpeed picks its accelerator once per process from DS_ACCELERATOR. The Makefile and the tests export `cpu`
    and Ray workers inherit the environment, so the setting follows `use_gpu`, never the inherited value. If DeepSpeed
    already picked the other accelerator in this process, that cannot be undone: say so instead of training there."""
    name = "cuda" if use_gpu else "cpu"
    os.environ["DS_ACCELERATOR"] = name
    chosen = getattr(sys.modules.get("deepspeed.accelerator.real_accelerator"), "ds_accelerator", None)
    current = getattr(chosen, "_name", None)
    if current is not None and current != name:
        raise RuntimeError(
            f"train.use_gpu is {str(use_gpu).lower()} but DeepSpeed already chose its {current!r} accelerator in this "
            f"process; start training in a fresh process (a Ray Train worker is one), or set DS_ACCELERATOR={name} "
            "before DeepSpeed is imported")
    return name


def size_zero3_gathering(ds_config: dict, model, on_gpu: bool) -> None:
    """How many gathered weights ZeRO-3 keeps live, in decoder layers of this model (a user JSON's values win).

    DeepSpeed's defaults count parameters (up to 1e9 live, reused within 1e9 kept): for a model of a few billion
    parameters that is the whole model gathered between forward and backward, which is what ZeRO-3 is meant to
    avoid. On GPUs: one layer prefetched, one layer live, a weight reused within one layer kept (gradient
    checkpointing's recompute). On CPU the gathers and the compute share the same cores, so prefetching overlaps
    nothing: no prefetch and no keeping for reuse, only the module computing is whole (measured on a 1B model,
    2 workers: the live gathered weights went from 60M to 43M parameters with no prefetch, see
    benchmarks/memory_plan.py)."""
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", None) if config is not None else None
    if not layers:
        return
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    per_layer = max(int(total // layers), 1)
    zero = ds_config.setdefault("zero_optimization", {})
    zero.setdefault("stage3_max_live_parameters", per_layer)
    zero.setdefault("stage3_prefetch_bucket_size", per_layer if on_gpu else 0)
    zero.setdefault("stage3_max_reuse_distance", per_layer if on_gpu else 0)


def build_engine(model_cfg: ModelConfig, train: TrainConfig, warmup_steps: int, total_steps: int, device,
                 log: Callable[[str], None] = print, security=None):
    """Base model + LoRA + AdamW + warmup/decay schedule in a DeepSpeed engine (ZeRO stage from the config); the
    base is opened with the run's `security` settings."""
    import deepspeed
    import torch

    from rayft.models.load import choose_dtype

    from .ds_config import build_deepspeed_config
    from .model import build_peft_model, check_quantization
    from .schedule import lr_lambda

    # Same seed on every rank: identical LoRA init (DeepSpeed also broadcasts rank 0's weights).
    torch.manual_seed(train.seed)
    check_quantization(model_cfg, train)
    dtype = choose_dtype(model_cfg, train.use_gpu)
    ds_config = build_deepspeed_config(train, dtype)
    # Under ZeRO-3 the base is built partitioned and streamed in (models/zero3.py): the same config drives
    # deepspeed.zero.Init there and the engine here.
    model = build_peft_model(
        model_cfg, train, dtype, log=log, device_map={"": device} if model_cfg.quantization != "none" else None,
        security=security, zero3_config=ds_config if train.deepspeed.zero_stage == 3 else None)
    if train.deepspeed.zero_stage == 3:
        size_zero3_gathering(ds_config, model, train.use_gpu)
    schedule = lr_lambda(train.lr_schedule, warmup_steps, total_steps)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
    )
    return engine
