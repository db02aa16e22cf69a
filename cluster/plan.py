"""`rayft plan FILE`: memory per GPU and tokens per step for a config, and the worker type that fits.

The model's shape comes from its own config (`AutoConfig`, a hub id or a local folder); the model is
then built on PyTorch's `meta` device (no memory, no weights) and wrapped with the config's LoRA
adapter through PEFT, so parameter counts are exact for any architecture transformers knows.

Byte accounting (N = data-parallel GPUs = train.num_workers; P_t trainable LoRA parameters; P_f frozen
base parameters; L the largest module's own parameters, the embedding in LLMs):

- Frozen weights, held in the compute dtype (w bytes: 2 for bf16/fp16, 4 for fp32; 4-bit quantized
  linear layers 0.5 byte + 1/32 for the NF4 block constants, 8-bit 1 byte). ZeRO 0-2 keep a full
  replica on every GPU: P_f w. ZeRO-3 shards them: P_f w / N, none on the GPU with offload_params,
  plus a gather buffer for the largest layer of 4 L bytes (DeepSpeed's estimator uses the same figure).
- Trainable LoRA states in mixed precision, DeepSpeed's own accounting: 16-bit parameters 2, 16-bit
  gradients 2, fp32 gradients 4, fp32 master parameters 4, Adam moments 8 = 20 bytes per parameter
  (fp32 training: parameters 4, gradients 4, Adam 8 = 16). Stage 0 keeps all of it on every GPU; stage
  1 shards the fp32 parts (16/N); stage 2 also the gradients (2 + 18/N, as DeepSpeed's ZeRO-2
  estimator); stage 3 everything (18/N, as its ZeRO-3 estimator). offload_optimizer moves gradients
  and optimizer state to CPU memory, leaving the 16-bit parameters (2, or 2/N under ZeRO-3);
  offload_params under ZeRO-3 leaves nothing but the gather buffer.
- Activations of one micro batch (b rows of s = data.max_seq_length tokens; with packing every row is
  full, without it s is an upper bound), llama-style decoder layer with hidden h, key/value width
  h_kv, MLP width i, a heads, activation bytes e:
      per layer  A = s b (8 h + e (6 h + 2 h_kv + 4 i))
        8 h: the two RMSNorms save their fp32 upcast input; e(6 h + 2 h_kv + 4 i): the attention input,
        q, k, v, the attention output before and after the head reshape, the MLP input, and the
        gate, up, SiLU and product tensors of the MLP.
      + s b (e + 1) D   with LoRA dropout > 0 (each adapted module keeps a dropped-out copy of its input
        and a byte mask; D = sum of the input widths of the adapted modules of one layer)
      + a s^2 b (4 + e) with eager attention (fp32 softmax probabilities and their cast; sdpa keeps none)
      logits     s b V (e + 8)  (the logits, their fp32 upcast and the fp32 log-softmax at the loss)
  Without gradient checkpointing all layers are live: n_layers A + logits. With it each layer keeps
  only its input (e s b h) and one layer is recomputed at a time: n_layers e s b h + A + logits.
- Overhead: 1 GiB for the CUDA context, kernels and allocator slack.

Tokens per step = micro_batch_size x max_seq_length x accumulation steps x num_workers.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Optional

GiB = 1024 ** 3
OVERHEAD_BYTES = 1 * GiB
HEADROOM = 0.9  # plan to use at most 90% of a GPU's memory


class PlanError(ValueError):
    """The plan cannot be made; the message names the field and the fix."""


@dataclass
class ModelShape:
    """What the planner needs from a model: exact parameter counts and the layer dimensions."""

    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    kv_width: int               # num_key_value_heads x head_dim
    vocab_size: int
    total_params: int           # base model, shared weights counted once
    frozen_params: int          # base parameters that are not trained
    trainable_params: int       # LoRA A/B (+ modules_to_save copies, + biases with lora.bias)
    largest_layer_params: int   # the largest module's own parameters (DeepSpeed's definition)
    largest_trainable_layer_params: int
    quantizable_params: int     # linear-layer weights bitsandbytes would quantize (lm_head excluded)
    lora_input_width_per_layer: int  # sum of in_features of the adapted modules of one decoder layer
    target_modules: list = field(default_factory=list)


def read_model_shape(model_cfg, lora) -> ModelShape:
    """Build the model on the meta device (no weights are read or allocated) and attach the LoRA adapter."""
    import torch
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from rayft.models.architectures import LoraTargetError, resolve_target_modules
    from rayft.train.lora import build_lora_config

    try:
        config = AutoConfig.from_pretrained(
            model_cfg.name_or_path, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        import os

        where = ("a local folder without a readable config.json" if os.path.isdir(model_cfg.name_or_path)
                 else "not a local folder, so it was tried as a hub id")
        raise PlanError(
            f"model.name_or_path: cannot read the model config of {model_cfg.name_or_path!r} ({where}: "
            f"{_first_line(e)}); give a local folder that holds config.json (for the quickstart: "
            "`rayft tiny-model runs/tiny-model`), or a hub id this machine can reach") from None
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=model_cfg.trust_remote_code)
    except (ValueError, KeyError) as e:
        raise PlanError(
            f"model.name_or_path: {model_cfg.name_or_path!r} (model_type {getattr(config, 'model_type', None)!r}) is "
            f"not a causal LM transformers can build ({_first_line(e)})") from None
    try:
        targets = resolve_target_modules(lora.target_modules, model)
    except LoraTargetError as e:
        raise PlanError(str(e)) from None

    base_total = _count_unique(model.parameters())
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    quantizable = sum(m.weight.numel() for n, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, build_lora_config(lora, targets, config.model_type))
    trainable = _count_unique(p for p in peft_model.parameters() if p.requires_grad)
    largest_trainable = max((sum(p.numel() for p in m.parameters(recurse=False) if p.requires_grad)
                             for m in peft_model.modules()), default=0)
    frozen = _count_unique(p for p in peft_model.parameters() if not p.requires_grad)
    lora_in = _lora_input_width_of_one_layer(peft_model)

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    h = _field(text, ("hidden_size", "n_embd", "d_model"), model_cfg.name_or_path)
    heads = _field(text, ("num_attention_heads", "n_head"), model_cfg.name_or_path)
    head_dim = getattr(text, "head_dim", None) or h // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    inter = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * h
    return ModelShape(
        model_type=str(config.model_type),
        num_layers=_field(text, ("num_hidden_layers", "n_layer", "num_layers"), model_cfg.name_or_path),
        hidden_size=h, intermediate_size=int(inter), num_heads=heads, kv_width=int(kv_heads * head_dim),
        vocab_size=_field(text, ("vocab_size",), model_cfg.name_or_path),
        total_params=base_total, frozen_params=frozen, trainable_params=trainable,
        largest_layer_params=largest, largest_trainable_layer_params=largest_trainable,
        quantizable_params=quantizable, lora_input_width_per_layer=lora_in,
        target_modules=list(targets) if isinstance(targets, (list, tuple)) else [targets],
    )


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _count_unique(params) -> int:
    seen = {}
    for p in params:
        seen[id(p)] = p.numel()
    return sum(seen.values())


def _field(cfg, names, where):
    for n in names:
        v = getattr(cfg, n, None)
        if v:
            return int(v)
    raise PlanError(f"model.name_or_path: the model config of {where!r} has none of {list(names)}; "
                    "rayft plan needs the layer dimensions (is this a decoder LLM?)")


def _lora_input_width_of_one_layer(peft_model) -> int:
    """Sum of in_features of the adapted modules in the first decoder layer (the layers are alike)."""
    from peft.tuners.lora import LoraLayer

    per_layer: dict[str, int] = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            parts = name.split(".")
            idx = next((i for i, x in enumerate(parts) if x.isdigit()), None)
            key = ".".join(parts[: idx + 1]) if idx is not None else ""
            per_layer[key] = per_layer.get(key, 0) + int(getattr(module, "in_features", 0) or 0)
    return next(iter(per_layer.values()), 0)


# --- the estimate ---------------------------------------------------------------------------------


@dataclass
class MemoryPlan:
    """Bytes per GPU (per worker on CPU) for one config, and the tokens each step trains on."""

    dtype: str
    num_gpus: int
    zero_stage: int
    offload_optimizer: bool
    offload_params: bool
    frozen_weights: int
    gather_buffer: int
    lora_params: int
    lora_grads: int
    optimizer_states: int
    activations: int            # with the config's gradient_checkpointing setting
    activations_checkpointed: int
    activations_full: int
    logits: int
    overhead: int
    cpu_offloaded: int          # bytes per worker moved to CPU memory by offload settings
    tokens_per_micro_batch: int
    tokens_per_step: int
    device: str = "gpu"         # "cpu": host memory of a CPU worker, where offloaded bytes stay in the same memory

    @property
    def model_states(self) -> int:
        return self.frozen_weights + self.gather_buffer + self.lora_params + self.lora_grads + self.optimizer_states

    @property
    def lora_states(self) -> int:
        return self.lora_params + self.lora_grads + self.optimizer_states

    @property
    def total(self) -> int:
        on_host = self.cpu_offloaded if self.device == "cpu" else 0
        return self.model_states + self.activations + self.overhead + on_host

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(model_states=self.model_states, lora_states=self.lora_states, total=self.total)
        return d


# GPUs before Ampere have no bf16: training there falls back to fp16 with loss scaling (models/load.py choose_dtype).
NO_BF16_GPUS = ("T4", "V100", "P100", "P4", "K80", "M60")


def compute_dtype(cfg, gpu_name: Optional[str] = None) -> str:
    """The dtype training will use: the config's, or for `auto` fp32 on CPU, bf16 on GPUs that have it and fp16
    (with loss scaling) on those that do not (`gpu_name` from cluster.yaml; unknown: bf16)."""
    from rayft.models.load import choose_dtype

    return choose_dtype(cfg.model, cfg.train.use_gpu, bf16_supported=gpu_name not in NO_BF16_GPUS)


def dtype_label(dtype: str) -> str:
    return "float16 with dynamic loss scaling" if dtype == "float16" else dtype


def estimate_memory(cfg, shape: ModelShape, num_gpus: Optional[int] = None, micro_batch_size: Optional[int] = None,
                    gradient_checkpointing: Optional[bool] = None, zero_stage: Optional[int] = None,
                    offload_optimizer: Optional[bool] = None, offload_params: Optional[bool] = None,
                    device: Optional[str] = None) -> MemoryPlan:
    """Per-GPU memory of `cfg` (any setting can be overridden to compare alternatives). `device="cpu"` plans the host
    memory of a CPU worker instead (the default when train.use_gpu is false): what the model, the engine and
    training add to the worker's own resident memory."""
    if device not in (None, "gpu", "cpu"):
        raise PlanError(f"--device {device!r}: choose gpu or cpu")
    device = device or ("gpu" if cfg.train.use_gpu else "cpu")
    t, ds = cfg.train, cfg.train.deepspeed
    n = num_gpus or t.num_workers
    b = micro_batch_size or t.micro_batch_size
    ckpt = t.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
    z = ds.zero_stage if zero_stage is None else zero_stage
    off_opt = ds.offload_optimizer if offload_optimizer is None else offload_optimizer
    off_par = ds.offload_params if offload_params is None else offload_params
    dtype = compute_dtype(cfg)
    w = 4 if dtype == "float32" else 2
    s = cfg.data.max_seq_length

    # Frozen weights.
    frozen_bytes = _frozen_weight_bytes(shape, w, cfg.model.quantization)
    cpu = 0
    gather = 0
    if z == 3:
        # GPU: DeepSpeed's estimator's gather buffer. CPU: what rayft lets ZeRO-3 keep whole there (no prefetch, no
        # keeping for reuse, train/engine.py size_zero3_gathering): the module computing, and the next one as its
        # gather starts.
        gather = 4 * shape.largest_layer_params if device == "gpu" else 2 * w * shape.largest_layer_params
        if off_par:
            frozen, cpu = 0, cpu + frozen_bytes // n
        else:
            frozen = frozen_bytes // n
    else:
        frozen = frozen_bytes

    # Trainable (LoRA) states.
    pt = shape.trainable_params
    if w == 2:
        p16, g16, g32, master, adam = 2 * pt, 2 * pt, 4 * pt, 4 * pt, 8 * pt
    else:
        p16, g16, g32, master, adam = 4 * pt, 0, 4 * pt, 0, 8 * pt
    if z == 0:
        params, grads, opt = p16, g16 + g32, master + adam
    elif z == 1:
        params, grads, opt = p16, g16 + g32 // n, (master + adam) // n
    elif z == 2:
        params, grads, opt = p16, (g16 + g32) // n, (master + adam) // n
    else:
        # DeepSpeed's ZeRO-3 estimator counts 18 bytes per parameter in all, sharded: the 16-bit gradient
        # is reduce-scattered straight into the fp32 partition.
        params, grads, opt = p16 // n, g32 // n, (master + adam) // n
    if off_opt and z >= 1:
        cpu += grads + opt
        grads, opt = 0, 0
    if off_par and z == 3:
        cpu += params
        params = 0

    # Activations.
    e = w
    h, i, kv, a, v, layers = (shape.hidden_size, shape.intermediate_size, shape.kv_width, shape.num_heads,
                              shape.vocab_size, shape.num_layers)
    per_layer = s * b * (8 * h + e * (6 * h + 2 * kv + 4 * i))
    if cfg.train.lora.dropout > 0:
        per_layer += s * b * (e + 1) * shape.lora_input_width_per_layer
    if cfg.model.attn_implementation == "eager":
        per_layer += a * s * s * b * (4 + e)
    logits = s * b * v * (e + 8)
    full = layers * per_layer + logits
    checkpointed = layers * e * s * b * h + per_layer + logits
    tokens_micro = b * s
    return MemoryPlan(
        dtype=dtype, num_gpus=n, zero_stage=z, offload_optimizer=off_opt, offload_params=off_par,
        frozen_weights=frozen, gather_buffer=gather, lora_params=params, lora_grads=grads, optimizer_states=opt,
        activations=checkpointed if ckpt else full, activations_checkpointed=checkpointed, activations_full=full,
        logits=logits, overhead=OVERHEAD_BYTES if device == "gpu" else 0, cpu_offloaded=cpu,
        tokens_per_micro_batch=tokens_micro, tokens_per_step=tokens_micro * t.accumulation_steps * n, device=device,
    )


def _frozen_weight_bytes(shape: ModelShape, w: int, quantization: str) -> int:
    if quantization == "none":
        return shape.frozen_params * w
    q = min(shape.quantizable_params, shape.frozen_params)
    per_q = 0.5 + 1 / 32 if quantization == "4bit" else 1.0
    return int(q * per_q + (shape.frozen_params - q) * w)


# --- recommendation -------------------------------------------------------------------------------


@dataclass
class Option:
    worker_type: str
    instance_type: str
    gpu: str
    gpu_memory_gib: float
    gpus_per_node: int
    nodes: Optional[int]        # None: the workers do not fit in max_workers nodes of this type
    fits_memory: bool
    spot: bool
    dtype: str = "bfloat16"     # what training uses on this GPU: bf16, or fp16 with loss scaling where bf16 is missing
    cpus_per_node: int = 0

    @property
    def fits(self) -> bool:
        return self.nodes is not None and self.fits_memory


def rank_options(cfg, plan: MemoryPlan, types, spot_first: bool = False) -> list[Option]:
    """Every GPU worker type with whether the config fits it; the best first.

    Best: fits; then no idle GPUs on the nodes it takes; then fewer nodes (workers talk over NVLink
    inside a node); then on-demand before spot, or spot first where the cluster's autoscaler starts spot first
    (cluster/autoscaler_policy.py); then the smaller GPU.
    """
    from .cluster_yaml import fitting_worker_types

    fit_nodes = {wt.name: nodes for wt, nodes in fitting_worker_types(cfg.train, types)}
    options = []
    for wt in types:
        if not wt.gpus:
            continue
        mem = wt.gpu_memory_gib
        options.append(Option(
            worker_type=wt.name, instance_type=wt.instance_type, gpu=wt.gpu_name or "?",
            gpu_memory_gib=mem or 0.0, gpus_per_node=wt.gpus, nodes=fit_nodes.get(wt.name),
            fits_memory=bool(mem) and plan.total <= HEADROOM * mem * GiB, spot=wt.spot,
            dtype=compute_dtype(cfg, wt.gpu_name)))

    def key(o: Option):
        idle = (o.nodes * o.gpus_per_node - cfg.train.num_workers) if o.nodes else 10**6
        return (not o.fits, idle, o.nodes or 10**6, o.spot != spot_first, o.gpu_memory_gib)

    return sorted(options, key=key)


def rank_cpu_options(cfg, types, spot_first: bool = False) -> list[Option]:
    """For CPU training (train.use_gpu false): every worker type without GPUs, with whether the workers fit its
    CPUs; the best first. GPU types are left out as Ray's autoscaler leaves them out: it starts a GPU node only for
    work that asks for a GPU (AUTOSCALER_CONSERVE_GPU_NODES). Best: fits; then fewer nodes; then on-demand before
    spot (spot first with the spot-first autoscaler); then the fewest idle CPUs (the autoscaler also prefers the type the request fills most).
    Host memory is not checked: cluster.yaml does not say how much a node type has."""
    from .cluster_yaml import fitting_worker_types

    t = cfg.train
    fit_nodes = {wt.name: nodes for wt, nodes in fitting_worker_types(t, types)}
    options = [Option(worker_type=wt.name, instance_type=wt.instance_type, gpu="none", gpu_memory_gib=0.0,
                      gpus_per_node=0, nodes=fit_nodes.get(wt.name), fits_memory=True, spot=wt.spot,
                      dtype=compute_dtype(cfg), cpus_per_node=wt.cpus)
               for wt in types if not wt.gpus]

    def key(o: Option):
        idle = (o.nodes * o.cpus_per_node - t.num_workers * t.cpus_per_worker) if o.nodes else 10**6
        return (not o.fits, o.nodes or 10**6, o.spot != spot_first, idle)

    return sorted(options, key=key)


def suggestions(cfg, shape: ModelShape, types) -> list[str]:
    """Settings that would fit the largest GPU of the cluster when the config as written does not."""
    gpus = [wt for wt in types if wt.gpus and wt.gpu_memory_gib]
    if not gpus:
        return []
    biggest = max(wt.gpu_memory_gib for wt in gpus)
    limit = HEADROOM * biggest * GiB
    t = cfg.train
    tried = []
    if not t.gradient_checkpointing:
        tried.append(("train.gradient_checkpointing=true", dict(gradient_checkpointing=True)))
    if t.micro_batch_size > 1:
        tried.append(("train.micro_batch_size=1 (and raise gradient_accumulation_steps to keep the batch)",
                      dict(micro_batch_size=1, gradient_checkpointing=True)))
    if t.deepspeed.zero_stage < 3:
        tried.append(("train.deepspeed.zero_stage=3", dict(zero_stage=3, gradient_checkpointing=True)))
    tried.append(("train.deepspeed.zero_stage=3 with offload_optimizer and offload_params",
                  dict(zero_stage=3, offload_optimizer=True, offload_params=True, gradient_checkpointing=True,
                       micro_batch_size=1)))
    out = []
    for text, kw in tried:
        p = estimate_memory(cfg, shape, **kw)
        if p.total <= limit:
            out.append(f"{text}: {p.total / GiB:.1f} GiB per GPU")
    if not out:
        out.append(f"nothing tried fits a {biggest:g} GiB GPU; lower data.max_seq_length, use "
                   "model.quantization: 4bit, or add a node type with larger GPUs to cluster.yaml")
    return out


def format_plan(cfg, shape: ModelShape, plan: MemoryPlan, options: list[Option], hints: list[str],
                cluster_path: str) -> str:
    t = cfg.train
    unit = "GPU" if plan.device == "gpu" else "worker (host memory above the worker's idle baseline)"
    lines = [
        f"model   {cfg.model.name_or_path} ({shape.model_type}, {shape.num_layers} layers, hidden {shape.hidden_size}, "
        f"vocab {shape.vocab_size}): {_count(shape.total_params)} parameters",
        f"LoRA    rank {t.lora.rank} on {', '.join(shape.target_modules)}: {shape.trainable_params:,} trainable "
        f"({100 * shape.trainable_params / max(shape.total_params, 1):.3f}%)",
        f"setup   {plan.num_gpus} worker(s){' x 1 GPU' if t.use_gpu else ' on CPU'}, {plan.dtype}"
        f"{' (float16 with dynamic loss scaling on GPUs without bf16: T4, V100)' if t.use_gpu and cfg.model.dtype == 'auto' else ''}"
        f", ZeRO-{plan.zero_stage}"
        f"{', offload optimizer' if plan.offload_optimizer else ''}{', offload params' if plan.offload_params else ''}, "
        f"micro batch {t.micro_batch_size} x {cfg.data.max_seq_length} tokens, gradient checkpointing "
        f"{'on' if t.gradient_checkpointing else 'off'}",
        "",
        f"memory per {unit}:",
        _row("frozen weights", plan.frozen_weights),
    ]
    if plan.gather_buffer:
        lines.append(_row("ZeRO-3 gather buffer (largest layer)" if plan.device == "gpu"
                          else "ZeRO-3 gathered weights (2 modules)", plan.gather_buffer))
    lines += [
        _row("LoRA parameters", plan.lora_params),
        _row("LoRA gradients", plan.lora_grads),
        _row("optimizer (fp32 master + Adam)", plan.optimizer_states),
        _row(f"activations ({'checkpointed' if t.gradient_checkpointing else 'all layers'})", plan.activations),
        f"    {'of which logits and loss':38s} {_size(plan.logits)}",
        f"    {'(other setting: ' + ('all layers' if t.gradient_checkpointing else 'checkpointed') + ')':38s} "
        f"{_size(plan.activations_full if t.gradient_checkpointing else plan.activations_checkpointed)}",
    ]
    if plan.overhead:
        lines.append(_row("CUDA context and allocator slack", plan.overhead))
    if plan.cpu_offloaded and plan.device == "cpu":
        lines.append(_row("offloaded (the same host memory on CPU)", plan.cpu_offloaded))
    lines.append(_row("total", plan.total))
    if plan.cpu_offloaded and plan.device == "gpu":
        lines.append(f"  + {plan.cpu_offloaded / GiB:.2f} GiB of CPU memory per worker (offloaded)")
    lines += [
        "",
        f"tokens per step: {plan.tokens_per_step:,} ({t.micro_batch_size} rows x {cfg.data.max_seq_length} tokens x "
        f"{t.accumulation_steps} accumulation x {plan.num_gpus} workers"
        f"{'' if cfg.data.packing else '; an upper bound without packing'})",
    ]
    if plan.device == "cpu":
        lines += ["", ("train.use_gpu is false: this runs on CPU workers; " if not t.use_gpu else "--device cpu: ")
                  + "the figures are host memory each worker process adds to its idle baseline (checked against "
                  "measured peaks by benchmarks/memory_plan.py)."]
        if t.use_gpu:
            return "\n".join(lines)
        return "\n".join(lines + _cpu_recommendation(t, options, cluster_path))
    lines += ["", f"worker types in {cluster_path} (a GPU is full above {int(HEADROOM * 100)}% of its memory):"]
    for o in options:
        if o.nodes is None:
            verdict = f"{t.num_workers} workers do not fit its max_workers"
        elif not o.fits_memory:
            verdict = f"needs {plan.total / GiB:.1f} GiB of {o.gpu_memory_gib:g}"
        else:
            verdict = f"fits: {o.nodes} node(s), {plan.total / GiB:.1f} of {o.gpu_memory_gib:g} GiB per GPU"
        lines.append(f"  {o.worker_type:20s} {o.instance_type:14s} {o.gpus_per_node} x {o.gpu} "
                     f"{o.gpu_memory_gib:g} GiB{' spot' if o.spot else ''}  {verdict}"
                     f"{_dtype_note(cfg, o, plan)}")
    best = next((o for o in options if o.fits), None)
    lines.append("")
    if best:
        lines.append(f"recommended: {best.worker_type} ({best.instance_type}) x {best.nodes} node(s) for "
                     f"{t.num_workers} worker(s), training in {dtype_label(best.dtype)}{_fallback_note(options, best)}")
    else:
        lines.append("no worker type fits this config as written; settings that would fit the largest GPU:")
        lines += [f"  - {h}" for h in hints]
    return "\n".join(lines)


def _cpu_recommendation(t, options: list[Option], cluster_path: str) -> list[str]:
    lines = ["", f"CPU worker types in {cluster_path} ({t.num_workers} worker(s) x {t.cpus_per_worker:g} CPU; "
             "GPU types are kept for GPU work; host memory is not checked):"]
    for o in options:
        verdict = (f"fits: {o.nodes} node(s)" if o.fits
                   else f"{t.num_workers} workers of {t.cpus_per_worker:g} CPU do not fit its max_workers")
        lines.append(f"  {o.worker_type:20s} {o.instance_type:14s} {o.cpus_per_node} CPU{' spot' if o.spot else ''}"
                     f"  {verdict}")
    best = next((o for o in options if o.fits), None)
    lines.append("")
    if best:
        lines.append(f"recommended: {best.worker_type} ({best.instance_type}) x {best.nodes} node(s) for "
                     f"{t.num_workers} worker(s){_fallback_note(options, best)}")
    else:
        lines.append("no CPU worker type holds these workers; lower train.num_workers or train.cpus_per_worker, "
                     "or add a CPU node type (or raise its max_workers) in the cluster config")
    return lines


def on_demand_fallback(options: list[Option], best: Option) -> Optional[Option]:
    """The on-demand twin the autoscaler starts when `best`, a spot type, cannot be launched (same instance
    type, fits as well); None for an on-demand `best` or a spot type without a twin."""
    if not best.spot:
        return None
    return next((o for o in options if o.fits and not o.spot and o.instance_type == best.instance_type
                 and o.nodes == best.nodes), None)


def _fallback_note(options: list[Option], best: Option) -> str:
    twin = on_demand_fallback(options, best)
    if twin:
        return f"; spot, with {twin.worker_type} (on-demand) when spot capacity is short"
    return "; spot, with no on-demand twin to fall back on" if best.spot else ""


def _dtype_note(cfg, o: Option, plan: MemoryPlan) -> str:
    if o.dtype != plan.dtype:
        return f"; {dtype_label(o.dtype)} (no bf16 on this GPU)"
    if o.dtype == "bfloat16" and o.gpu in NO_BF16_GPUS:
        return "; model.dtype is bfloat16, which this GPU lacks: set model.dtype: auto (fp16 with loss scaling)"
    return ""


def _row(label: str, nbytes: int) -> str:
    return f"  {label:40s} {_size(nbytes)}"


def _size(nbytes: float) -> str:
    return f"{nbytes / GiB:8.2f} GiB" if nbytes >= GiB / 10 or nbytes == 0 else f"{nbytes / 1024 ** 2:8.2f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n:,}"


def make_plan(cfg, cluster_path, device: Optional[str] = None) -> dict:
    """Everything `rayft plan` prints, as data (for --json and the tests). `device`: gpu or cpu (host memory of a
    CPU worker); default from train.use_gpu."""
    from .autoscaler_policy import spot_first
    from .cluster_yaml import load_cluster_yaml, worker_types

    shape = read_model_shape(cfg.model, cfg.train.lora)
    plan = estimate_memory(cfg, shape, device=device)
    cluster = load_cluster_yaml(cluster_path)
    types = worker_types(cluster, str(cluster_path))
    prefer_spot = spot_first(cluster)
    if plan.device == "gpu":
        options = rank_options(cfg, plan, types, prefer_spot)
    else:  # CPU training is placed on a CPU type; a --device cpu plan of a GPU config recommends nothing
        options = [] if cfg.train.use_gpu else rank_cpu_options(cfg, types, prefer_spot)
    hints = [] if any(o.fits for o in options) or plan.device == "cpu" or not cfg.train.use_gpu \
        else suggestions(cfg, shape, types)
    return {"shape": shape, "plan": plan, "options": options, "hints": hints,
            "text": format_plan(cfg, shape, plan, options, hints, str(cluster_path))}


def plan_json(result: dict) -> dict:
    best = next((o for o in result["options"] if o.fits), None)
    return {
        "model": asdict(result["shape"]),
        "memory_per_gpu_bytes": result["plan"].as_dict(),
        "options": [dict(asdict(o), fits=o.fits) for o in result["options"]],
        "recommended": None if best is None else {
            "worker_type": best.worker_type, "nodes": best.nodes,
            "fallback": getattr(on_demand_fallback(result["options"], best), "worker_type", None)},
        "suggestions": result["hints"],
    }


def run_plan(args) -> int:
    """`rayft plan FILE [--cluster cluster.yaml] [--json]`."""
    import json

    from .cluster_yaml import DEFAULT_CLUSTER_YAML
    from .config import load_config

    cfg = load_config(args.file, args.set or [])
    result = make_plan(cfg, args.cluster or DEFAULT_CLUSTER_YAML, device=getattr(args, "device", None))
    print(json.dumps(plan_json(result), indent=2) if args.json else result["text"])
    return 0
