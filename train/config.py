"""The `train:` section of a rayft config.

Every field is documented; names are ours (`lora.rank`, `deepspeed.zero_stage`) and are mapped to the
libraries' names in one place each (`train/lora.py` for PEFT, `train/ds_config.py` for DeepSpeed).
"""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)



class LoraSettings(_Section):
    """The LoRA adapter (mapped to `peft.LoraConfig` in `train/lora.py`)."""

    rank: int = Field(default=8, ge=1, le=1024, description="Rank of the update matrices (`r` in PEFT).")
    alpha: float = Field(default=16.0, gt=0, description="Scaling numerator: the update is scaled by alpha / rank.")
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    bias: Literal["none", "all", "lora_only"] = Field(default="none", description="Which biases are trained.")
    target_modules: Union[Literal["auto", "all-linear"], list[str]] = Field(
        default="auto",
        description="Linear layers that get an adapter: `auto` (rayft's table per architecture family: llama, "
        "mistral, qwen2, gemma, phi, gpt2, gpt-neox), `all-linear`, or explicit module names such as "
        "[q_proj, v_proj].",
    )
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained in full and saved with the adapter (for example [lm_head] after adding tokens).",
    )

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and (not v or any(not str(x).strip() for x in v)):
            raise ValueError("give at least one module name (for example [q_proj, v_proj]) or `auto`")
        return v


class DeepSpeedSettings(_Section):
    """The DeepSpeed engine (the config is built in `train/ds_config.py`)."""

    zero_stage: Literal[0, 1, 2, 3] = Field(
        default=2, description="ZeRO stage: 0 plain data parallel, 1 shard optimizer state, 2 also gradients, "
        "3 also parameters (the adapter is gathered to save it)."
    )
    offload_optimizer: bool = Field(default=False, description="Keep optimizer state in CPU memory (ZeRO 1-3).")
    offload_params: bool = Field(default=False, description="Keep parameters in CPU memory (ZeRO 3 only).")
    config_file: Optional[str] = Field(
        default=None,
        description="A DeepSpeed JSON whose keys override the generated config (deep-merged; batch sizes stay ours).",
    )

    @model_validator(mode="after")
    def _offload_needs_zero(self):
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(
                f"offload_params needs zero_stage 3 (got {self.zero_stage}); set zero_stage: 3 or offload_params: false"
            )
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3 (got 0); raise zero_stage or turn it off")
        return self


class EarlyStopping(_Section):
    """Stop when eval loss has not improved for `patience` evaluations."""

    patience: Optional[int] = Field(
        default=None, ge=1, description="Evaluations without improvement before stopping; unset: never stop early."
    )
    threshold: float = Field(
        default=0.0, ge=0.0, description="An eval loss counts as better only if lower than the best by more than this."
    )


class TrainConfig(_Section):
    """Distributed LoRA training: scaling, batch, schedule, checkpoints."""

    num_workers: int = Field(default=1, ge=1, description="Ray Train workers (one DeepSpeed rank each).")
    use_gpu: bool = Field(default=False, description="One GPU per worker; off: CPU workers with the gloo backend.")
    cpus_per_worker: float = Field(default=1.0, gt=0, description="CPUs reserved for each worker.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        default="PACK",
        description="How Ray places the workers (Ray Train's `ScalingConfig.placement_strategy`): `PACK` fills few "
        "nodes, `SPREAD` puts workers on different nodes when it can (a lost node then takes fewer workers; after a "
        "node loss the restarted group may pack onto the nodes left), `STRICT_*` refuse to start otherwise.")
    micro_batch_size: int = Field(default=4, ge=1, description="Rows per worker per forward pass.")
    gradient_accumulation_steps: int = Field(default=1, ge=1, description="Micro batches per optimizer step.")
    global_batch_size: Optional[int] = Field(
        default=None, ge=1,
        description="Rows per optimizer step over all workers. Unset: micro_batch_size x accumulation x workers. "
        "Set: must be a multiple of micro_batch_size x num_workers; the accumulation steps are derived from it.",
    )
    learning_rate: float = Field(default=2e-4, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(default=1.0, ge=0, description="Gradient clipping norm; 0 disables clipping.")
    epochs: float = Field(default=1.0, gt=0, description="Passes over the training data (used when max_steps is unset).")
    max_steps: Optional[int] = Field(default=None, ge=1, description="Optimizer steps in all; overrides `epochs`.")
    lr_schedule: Literal["linear", "cosine", "constant"] = Field(default="cosine", description="Decay after warmup.")
    warmup_steps: Optional[int] = Field(default=None, ge=0, description="Linear warmup steps; overrides warmup_ratio.")
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1, description="Warmup as a share of all optimizer steps.")
    eval_every_n_steps: Optional[int] = Field(
        default=None, ge=1, description="Evaluate (eval loss, perplexity) every N steps and at the end; unset: at the end only."
    )
    save_every_n_steps: int = Field(default=50, ge=1, description="Checkpoint every N steps (and at each evaluation).")
    keep_best_checkpoints: int = Field(
        default=2, ge=1, description="Checkpoints kept: the best K by eval loss plus the latest."
    )
    logging_every_n_steps: int = Field(default=1, ge=1, description="Log metrics to MLflow and the terminal every N steps. Ray Train (and Tune) gets every checkpoint, eval and the last step, and other steps' metrics at most once per its controller's poll (`RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`, 2 s): a report before the last was taken would wait for it.")
    early_stopping: EarlyStopping = Field(default_factory=EarlyStopping, description="Stop on a plateau of eval loss.")
    gradient_checkpointing: bool = Field(default=False, description="Recompute activations in backward to save memory.")
    seed: int = Field(default=0, description="Seed for LoRA init, dropout and the training data order.")
    shuffle: bool = Field(default=True, description="Shuffle training rows once (seeded) before the first epoch.")
    max_failures: int = Field(default=3, ge=0, description="Worker-group restarts from the last checkpoint before giving up.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="The LoRA adapter.")
    deepspeed: DeepSpeedSettings = Field(default_factory=DeepSpeedSettings, description="The DeepSpeed engine.")

    @model_validator(mode="after")
    def _batch_divides(self):
        if self.global_batch_size is not None:
            per_step = self.micro_batch_size * self.num_workers
            if self.global_batch_size % per_step:
                raise ValueError(
                    f"global_batch_size {self.global_batch_size} is not a multiple of micro_batch_size x num_workers "
                    f"= {self.micro_batch_size} x {self.num_workers} = {per_step}; use a multiple of {per_step} "
                    f"(for example {per_step * max(1, round(self.global_batch_size / per_step))}) or unset it"
                )
        return self

    @property
    def accumulation_steps(self) -> int:
        if self.global_batch_size is not None:
            return self.global_batch_size // (self.micro_batch_size * self.num_workers)
        return self.gradient_accumulation_steps

    @property
    def rows_per_step(self) -> int:
        return self.micro_batch_size * self.accumulation_steps * self.num_workers
