"""Loading the base model for the device and wrapping it with a LoRA adapter."""
from __future__ import annotations

from typing import Callable, Optional

from rayft.models.architectures import resolve_target_modules
from rayft.models.config import ModelConfig
from rayft.models.load import load_base_model

from .config import TrainConfig
from .lora import build_lora_config


class QuantizationUnavailable(ValueError):
    """QLoRA was asked for where bitsandbytes cannot run."""


def qlora_zero3_conflict(model: ModelConfig, train: TrainConfig) -> str | None:
    """Why QLoRA cannot run under ZeRO-3 as configured (None when it can), naming the fields and the fix.

    ZeRO-3 partitions parameters as they are created (deepspeed.zero.Init), and bitsandbytes creates its 4-bit or 8-bit
    weights afterwards in a storage dtype of its own; transformers therefore loads a quantized model whole on every
    rank, and DeepSpeed would then partition uint8-packed weights it cannot gather back into a 4-bit layer. rayft
    does not configure that path (a matching bnb_4bit_quant_storage dtype), so it refuses it."""
    if model.quantization == "none" or train.deepspeed.zero_stage != 3:
        return None
    return (f"model.quantization: {model.quantization!r} (QLoRA) with train.deepspeed.zero_stage: 3 is not supported: "
            "ZeRO-3 partitions weights as they are created and a bitsandbytes-quantized base cannot be partitioned "
            "that way, so every rank would load it whole anyway. Use train.deepspeed.zero_stage: 2 with QLoRA (the "
            "quantized base is small enough to replicate), or model.quantization: none with zero_stage: 3 (and "
            "train.deepspeed.offload_params: true if memory is short)")


def check_quantization(model: ModelConfig, train: TrainConfig) -> None:
    """Refuse QLoRA where it cannot work, saying why and what to use instead."""
    if model.quantization == "none":
        return
    conflict = qlora_zero3_conflict(model, train)
    if conflict:
        raise QuantizationUnavailable(conflict)
    why = None
    if not train.use_gpu:
        why = "train.use_gpu is false"
    else:
        try:
            import torch

            if not torch.cuda.is_available():
                why = "no CUDA GPU is visible to this process"
        except ImportError:  # pragma: no cover
            why = "torch is missing"
    if why is None:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            why = "the bitsandbytes package is not installed (pip install bitsandbytes)"
    if why:
        raise QuantizationUnavailable(
            f"model.quantization: {model.quantization!r} (QLoRA) needs bitsandbytes on a CUDA GPU, and {why}. "
            f"On CPU use model.quantization: none; if the base does not fit in memory, set "
            f"train.deepspeed.zero_stage: 3 with train.deepspeed.offload_params: true and offload_optimizer: true"
        )


def build_peft_model(model_cfg: ModelConfig, train: TrainConfig, dtype: str, log: Callable[[str], None] = print,
                     device_map=None, security=None, zero3_config: Optional[dict] = None):
    """Base model + LoRA adapter, ready for the engine. Prints trainable / total parameters. The base is opened
    with the run's `security` settings (manifest check, decryption, pickle weights only when allowed). With `zero3_config` (the engine's DeepSpeed
    config, stage 3) the base loads partitioned over the ranks: no rank holds the whole model; the model then keeps
    the HfDeepSpeedConfig alive (`rayft_hf_deepspeed_config`): transformers reads the ZeRO-3 setting through a weak
    reference to it (generation syncs the ranks, PEFT gathers a weight before reading it)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    from rayft.security.artifacts import opened_for_load

    keep_alive = None
    allow_pickle = bool(security and security.allow_pickle_weights)
    with opened_for_load(model_cfg.name_or_path, security) as path:
        local = model_cfg.model_copy(update={"name_or_path": path})
        if zero3_config is not None:
            from rayft.models.zero3 import load_base_model_zero3

            base, keep_alive = load_base_model_zero3(local, dtype, zero3_config, allow_pickle=allow_pickle, log=log)
        else:
            base = load_base_model(local, dtype, device_map, allow_pickle=allow_pickle)
    if model_cfg.quantization != "none":
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=train.gradient_checkpointing)
    elif train.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    base.config.use_cache = False
    targets = resolve_target_modules(train.lora.target_modules, base)
    peft_model = get_peft_model(base, build_lora_config(train.lora, targets, base.config.model_type))
    trainable, total = count_parameters(peft_model)
    log(f"LoRA on {targets}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%)")
    if train.gradient_checkpointing:
        on = getattr(base, "is_activation_checkpointing", None)  # transformers 5's name; 4's below
        on = base.is_gradient_checkpointing if on is None else on
        log(f"gradient checkpointing: {'on' if on else 'OFF'} "
            f"({'reentrant, as prepared for k-bit' if model_cfg.quantization != 'none' else 'non-reentrant'})")
    if keep_alive is not None:
        peft_model.rayft_hf_deepspeed_config = keep_alive
    return peft_model


def count_parameters(model) -> tuple[int, int]:
    trainable = total = 0
    for p in model.parameters():
        n = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
