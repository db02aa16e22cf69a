"""The one place where our `lora:` names become a `peft.LoraConfig`."""
from __future__ import annotations

from .config import LoraSettings


def build_lora_config(lora: LoraSettings, target_modules, model_type: str | None = None):
    """Our names -> peft.LoraConfig (the only place that knows PEFT's spelling)."""
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        bias=lora.bias,
        target_modules=target_modules,
        modules_to_save=list(lora.modules_to_save) or None,
        fan_in_fan_out=model_type == "gpt2",  # gpt2 stores its projections as Conv1D (transposed)
    )
