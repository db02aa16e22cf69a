"""Loading the base model for the device and wrapping it with a LoRA adapter."""
from __future__ import annotations

from typing import Callable

from .config import ModelConfig, TrainConfig
from .lora import build_lora_config, resolve_target_modules


class QuantizationUnavailable(ValueError):
    """QLoRA was asked for where bitsandbytes cannot run."""


def choose_dtype(model: ModelConfig, on_gpu: bool) -> str:
    """The compute dtype: bf16 on GPUs that support it, fp32 on CPU (CPU kernels for half types are slow or missing)."""
    if model.dtype != "auto":
        return model.dtype
    if on_gpu:
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def check_quantization(model: ModelConfig, train: TrainConfig) -> None:
    """Refuse QLoRA where it cannot work, saying why and what to use instead."""
    if model.quantization == "none":
        return
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


def load_base_model(model: ModelConfig, dtype: str, device_map=None, allow_pickle: bool = False):
    """`from_pretrained` with safetensors only; `allow_pickle` (security.allow_pickle_weights) lets transformers
    fall back to pickle weights."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = dict(
        revision=model.revision,
        trust_remote_code=model.trust_remote_code,
        dtype=getattr(torch, dtype),
        attn_implementation=model.attn_implementation,
        use_safetensors=None if allow_pickle else True,
    )
    if model.quantization != "none":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=getattr(torch, dtype))
            if model.quantization == "4bit" else BitsAndBytesConfig(load_in_8bit=True)
        )
        kwargs["device_map"] = device_map
    return AutoModelForCausalLM.from_pretrained(model.name_or_path, **kwargs)


def build_peft_model(model_cfg: ModelConfig, train: TrainConfig, dtype: str, log: Callable[[str], None] = print,
                     device_map=None):
    """Base model + LoRA adapter, ready for the engine. Prints trainable / total parameters."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    base = load_base_model(model_cfg, dtype, device_map)
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
    return peft_model


def count_parameters(model) -> tuple[int, int]:
    trainable = total = 0
    for p in model.parameters():
        n = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
