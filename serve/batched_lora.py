"""Batched multi-LoRA (punica / S-LoRA style): many adapters in one forward pass, one gather + two bmm per layer.

Every `nn.Linear` of the base model (all but the output head) is wrapped by `SlotLoRALinear`, which holds the
adapters of the replica in slots:

    A: [n_slots, in_features, R]     lora_A.weight transposed, ranks zero-padded to the largest rank R
    B: [n_slots, R, out_features]    lora_B.weight transposed, times the adapter's scaling (alpha / r, or
                                     alpha / sqrt(r) with use_rslora), zero-padded likewise

and each row of the batch carries a slot index (`SlotState.rows`, [batch]). The layer computes

    y = base(x) + bmm(bmm(x, A[rows]), B[rows])          x: [batch, seq, in_features]

Slot 0 stays all zeros: rows without an adapter (the base model) get exactly base(x). Zero padding adds exact
zeros, so an adapter gives what it gives alone, whatever else shares the batch. Slots are filled and cleared by
serve/adapters.AdapterCache between batches, never during one.

What an adapter may use is checked against its adapter_config.json and its tensors before any slot is touched:
plain LoRA on linear layers of the decoder (any of them: q/k/v/o, gate/up/down, ...), any rank, lora_alpha,
use_rslora, layers_to_transform. Anything that changes the computation in a way these two matrices cannot hold is
refused with an error that names the adapter and the feature (DoRA, modules_to_save, LoRA on the output head or
the embeddings, bias training, rank_pattern/alpha_pattern, fan_in_fan_out, ...); such an adapter can still be
merged (`rayft export`) and served as a merged model.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

# adapter_config.json keys that do not change inference with two matrices per layer (init, training, bookkeeping)
_IGNORED_KEYS = {
    "auto_mapping", "base_model_name_or_path", "revision", "task_type", "inference_mode",
    "init_lora_weights", "lora_dropout", "peft_version", "megatron_core", "qalora_group_size", "loftq_config",
    "eva_config", "corda_config", "lora_ga_config", "exclude_modules", "layers_to_transform", "layers_pattern",
    "ensure_weight_tying", "target_modules", "r", "lora_alpha", "use_rslora", "peft_type",
}
# features we refuse, with the words used in the error; any other unknown key with a non-default value is refused too
_FEATURES = {
    "use_dora": "DoRA (use_dora: true)",
    "modules_to_save": "modules_to_save (fully trained extra modules)",
    "bias": "trained biases (bias != 'none')",
    "lora_bias": "LoRA bias (lora_bias: true)",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D layers)",
    "layer_replication": "layer_replication",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "use_qalora": "QA-LoRA (use_qalora: true)",
    "megatron_config": "Megatron parallel layers (megatron_config)",
}


class AdapterNotSupported(ValueError):
    """An adapter that uses a feature the batched LoRA path cannot compute."""


@dataclass
class SlotState:
    """Shared by every wrapped layer of one model: the slot of each row of the batch now in the forward pass."""

    rows: Optional[torch.Tensor] = None  # [batch] long, or None: no row uses an adapter


class SlotLoRALinear(nn.Module):
    """A Linear plus the LoRA deltas of every slot; each row of the batch uses the slot `state.rows` names."""

    def __init__(self, base: nn.Linear, n_slots: int, state: SlotState):
        super().__init__()
        self.base = base
        self.state = state
        self.in_features, self.out_features = base.in_features, base.out_features
        dev, dt = base.weight.device, base.weight.dtype
        self.register_buffer("A", torch.zeros(n_slots, self.in_features, 0, device=dev, dtype=dt), persistent=False)
        self.register_buffer("B", torch.zeros(n_slots, 0, self.out_features, device=dev, dtype=dt), persistent=False)
        self.filled: set[int] = set()  # slots with weights in this layer (an adapter may skip some layers)

    @property
    def weight(self):  # code that inspects the layer (dtype, device) still finds the base weight
        return self.base.weight

    def set_rank(self, rank: int) -> None:
        """Pad every slot to `rank` (larger only): the extra columns of A and rows of B are zeros."""
        have = self.A.shape[2]
        if rank <= have:
            return
        self.A = torch.cat([self.A, self.A.new_zeros(self.A.shape[0], self.in_features, rank - have)], dim=2)
        self.B = torch.cat([self.B, self.B.new_zeros(self.B.shape[0], rank - have, self.out_features)], dim=1)

    def fill(self, slot: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """a: lora_A.weight [r, in]; b: lora_B.weight * scaling [out, r]."""
        r = a.shape[0]
        self.A[slot].zero_()
        self.B[slot].zero_()
        self.A[slot, :, :r] = a.t().to(self.A.dtype)
        self.B[slot, :r, :] = b.t().to(self.B.dtype)
        self.filled.add(slot)

    def clear(self, slot: int) -> None:
        if slot in self.filled:
            self.A[slot].zero_()
            self.B[slot].zero_()
            self.filled.discard(slot)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        rows = self.state.rows
        if rows is None or not self.filled:
            return y
        shape = x.shape
        x3 = x.reshape(shape[0], -1, shape[-1])  # [batch, seq, in]
        # index_select, not A[rows]: on CPU it copies the gathered slots several times faster
        delta = torch.bmm(torch.bmm(x3, self.A.index_select(0, rows)), self.B.index_select(0, rows))
        return y + delta.reshape(*shape[:-1], self.out_features)


def wrap_linears(model: nn.Module, n_slots: int) -> tuple[SlotState, dict[str, SlotLoRALinear]]:
    """Replace every nn.Linear of `model` except the output head with a SlotLoRALinear; returns the shared state
    and the wrapped layers by module name (the names PEFT uses in adapter files)."""
    state = SlotState()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]
    layers: dict[str, SlotLoRALinear] = {}
    for name, lin in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapped = SlotLoRALinear(lin, n_slots, state)
        setattr(parent, attr, wrapped)
        layers[name] = wrapped
    return state, layers


@dataclass
class LoRAWeights:
    """One adapter read from disk and checked: per module name, (lora_A [r, in], lora_B * scaling [out, r])."""

    rank: int
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]


def _is_default(value) -> bool:
    return value in (None, False, "none", "", 0) or value == {} or value == []


def read_adapter(name: str, path: str, layers: dict[str, SlotLoRALinear]) -> LoRAWeights:
    """Read adapter_config.json + adapter_model.safetensors from `path` and check them against the wrapped layers.
    Raises AdapterNotSupported naming the adapter and the feature, or FileNotFoundError/ValueError for bad files."""
    from safetensors.torch import load_file

    cfg_path = os.path.join(path, "adapter_config.json")
    weights_path = os.path.join(path, "adapter_model.safetensors")
    with open(cfg_path) as f:
        cfg = json.load(f)
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path} is not a JSON object")

    def refuse(feature: str, fix: str = "merge it into the base (rayft export) and serve the merged model") -> None:
        raise AdapterNotSupported(f"adapter {name!r} uses {feature}, which rayft's batched multi-LoRA serving does "
                                  f"not support; {fix}")

    if cfg.get("peft_type") != "LORA":
        refuse(f"peft_type {cfg.get('peft_type')!r} (only LORA is served)")
    for key, value in cfg.items():
        if key in _IGNORED_KEYS or _is_default(value):
            continue
        refuse(_FEATURES.get(key, f"the adapter_config.json setting {key}={value!r}"))
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"{weights_path} is missing (only safetensors adapters are served)")
    tensors = load_file(weights_path, device="cpu")
    a_w: dict[str, torch.Tensor] = {}
    b_w: dict[str, torch.Tensor] = {}
    other: list[str] = []
    for key, t in tensors.items():
        for suffix, store in ((".lora_A.weight", a_w), (".lora_B.weight", b_w)):
            if key.endswith(suffix):
                module = key[: -len(suffix)]
                module = module[len("base_model.model."):] if module.startswith("base_model.model.") else module
                store[module] = t
                break
        else:
            other.append(key)
    for words, feature in (("lora_magnitude_vector", "DoRA (lora_magnitude_vector)"),
                           ("lora_embedding", "LoRA on embeddings"), ("modules_to_save", "modules_to_save")):
        if any(words in k for k in other):
            refuse(feature)
    for module in sorted(a_w):
        if module not in layers:
            refuse(f"LoRA on {module!r} (only linear layers of the decoder are wrapped, not the output head)")
    if other:
        refuse(f"tensors other than lora_A/lora_B (e.g. {other[0]!r}; PEFT saves base layers for LoRA on the "
               f"embeddings or the output head)")
    if not a_w or set(a_w) != set(b_w):
        raise ValueError(f"{weights_path}: lora_A/lora_B tensors do not pair up "
                         f"({len(a_w)} A, {len(b_w)} B)")
    r_cfg, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r_cfg, int) or r_cfg < 1 or not isinstance(alpha, (int, float)):
        raise ValueError(f"{cfg_path}: r and lora_alpha must be numbers (got r={r_cfg!r}, lora_alpha={alpha!r})")
    scaling = alpha / math.sqrt(r_cfg) if cfg.get("use_rslora") else alpha / r_cfg
    modules = {}
    rank = 0
    for module in sorted(a_w):
        a, b = a_w[module], b_w[module]
        layer = layers[module]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[1] != layer.in_features \
                or b.shape[0] != layer.out_features:
            raise ValueError(f"{weights_path}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, but "
                             f"the base layer is {layer.in_features} -> {layer.out_features}; was the adapter trained "
                             f"on this base model?")
        if a.shape[0] != r_cfg:
            refuse(f"rank {a.shape[0]} on {module!r} while r is {r_cfg} (per-module ranks)")
        modules[module] = (a.float(), b.float() * scaling)
        rank = max(rank, a.shape[0])
    return LoRAWeights(rank=rank, modules=modules)
