"""The architecture table: which linear layers get a LoRA adapter per model family, and checking names."""
from __future__ import annotations

_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Attention and MLP projections per architecture family (`config.model_type`).
TARGET_MODULES: dict[str, list[str]] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}


class LoraTargetError(ValueError):
    """`lora.target_modules` cannot be resolved for this model."""


def linear_layer_names(model) -> list[str]:
    """Distinct leaf names of the model's linear layers (what `target_modules` may name), lm_head excluded."""
    import torch

    kinds: tuple = (torch.nn.Linear,)
    try:
        from transformers.pytorch_utils import Conv1D  # gpt2's linear layers

        kinds = kinds + (Conv1D,)
    except ImportError:
        pass
    names = set()
    for full, module in model.named_modules():
        if isinstance(module, kinds):
            leaf = full.rsplit(".", 1)[-1]
            if leaf != "lm_head":
                names.add(leaf)
    return sorted(names)


def resolve_target_modules(setting, model) -> list[str] | str:
    """`auto` -> the family's table entry; explicit names are checked against the model's linear layers."""
    family = getattr(getattr(model, "config", None), "model_type", None)
    present = linear_layer_names(model)
    if setting == "all-linear":
        return "all-linear"
    if setting == "auto":
        if family not in TARGET_MODULES:
            raise LoraTargetError(
                f"train.lora.target_modules: 'auto' has no entry for model family {family!r} (known: "
                f"{', '.join(sorted(TARGET_MODULES))}). Set train.lora.target_modules to a list chosen from this "
                f"model's linear layers: {present}, or to 'all-linear'"
            )
        wanted = [m for m in TARGET_MODULES[family] if m in present]
        if not wanted:
            raise LoraTargetError(
                f"train.lora.target_modules: the 'auto' names for {family!r} ({TARGET_MODULES[family]}) match no "
                f"layer of this model; set them explicitly from: {present}"
            )
        return wanted
    missing = [m for m in setting if m not in present]
    if missing:
        raise LoraTargetError(
            f"train.lora.target_modules: {missing} not found in this model ({family}); its linear layers are "
            f"{present}. Use some of those, 'auto' or 'all-linear'"
        )
    return list(setting)
