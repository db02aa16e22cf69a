"""Loading a base model: dtype for the device, safetensors only unless the config allows pickle."""
from __future__ import annotations

from typing import Optional

from .config import ModelConfig


def choose_dtype(model: ModelConfig, on_gpu: bool, bf16_supported: Optional[bool] = None) -> str:
    """The compute dtype: bf16 on GPUs that support it, else fp16 (DeepSpeed then scales the loss, train/ds_config.py);
    fp32 on CPU (CPU kernels for half types are slow or missing). `bf16_supported`: None asks this process's GPU."""
    if model.dtype != "auto":
        return model.dtype
    if on_gpu:
        if bf16_supported is None:
            import torch

            bf16_supported = torch.cuda.is_bf16_supported()
        return "bfloat16" if bf16_supported else "float16"
    return "float32"



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

