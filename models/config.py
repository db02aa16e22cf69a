"""The `model:` section of a rayft config: which base model, how it is loaded."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)


class ModelConfig(_Section):
    """The base model. Loaded with `from_pretrained`, the same path for a hub id and a local folder."""

    name_or_path: str = Field(description="Hub id (`Qwen/Qwen2.5-0.5B-Instruct`) or local folder (`runs/tiny-model`).")
    tokenizer: Optional[str] = Field(default=None, description="Tokenizer id or folder; defaults to `name_or_path`.")
    revision: Optional[str] = Field(default=None, description="Hub revision (branch, tag or commit) to pin.")
    trust_remote_code: bool = Field(
        default=False, description="Run code shipped with the model. Off unless you trust its author."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="`auto`: bf16 on GPUs that support it, fp32 on CPU."
    )
    quantization: Literal["none", "4bit", "8bit"] = Field(
        default="none",
        description="QLoRA: load the frozen base in 4-bit (NF4, double quantization) or 8-bit with bitsandbytes. "
        "Needs a CUDA GPU; refused on CPU (use `none`, with `train.deepspeed.offload_params` if memory is short).",
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        default="sdpa",
        description="Attention kernel. All three build the block-diagonal attention packed rows need from restarting "
        "`position_ids`. `flash_attention_2` needs a CUDA GPU and the flash-attn package, an optional GPU install "
        "that builds from source (`pip install flash-attn --no-build-isolation`); checked when the config loads.",
    )

    @field_validator("attn_implementation")
    @classmethod
    def _flash_attn_installed(cls, v: str) -> str:
        import importlib.util

        if v == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise ValueError(
                "flash_attention_2 needs the flash-attn package, which is not installed here (CUDA GPUs only; "
                "`pip install flash-attn --no-build-isolation` builds it from source); use sdpa or eager")
        return v

    @property
    def tokenizer_name_or_path(self) -> str:
        return self.tokenizer or self.name_or_path
