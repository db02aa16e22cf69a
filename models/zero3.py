"""Loading a base model partitioned under DeepSpeed ZeRO-3: no rank ever holds (or maps) the whole model.

The model is built inside `deepspeed.zero.Init` (an `HfDeepSpeedConfig` with stage 3 stays alive, so transformers
knows it), so every parameter is split across the ranks as it is created, and without random initialisation
(every weight is read next). The weights are then streamed
from the safetensors files one module at a time: the module's parameters are gathered, rank 0 reads exactly their
bytes from the files (plain reads, no memory map, so the file's pages never count against the process), and
DeepSpeed re-partitions them, broadcasting rank 0's values. At any moment a rank holds its slice of the model plus
one module whole.

transformers' own ZeRO-3 `from_pretrained` partitions the parameters too, but rank 0 first maps the whole
checkpoint into a state dict and keeps it until every weight is copied: its resident memory reaches the full model.
That path stays as the fallback for checkpoints this loader cannot read (pickle weights, hub ids not yet
downloaded, key names that need transformers' conversions).
"""
from __future__ import annotations

import json
import os
import struct
from typing import Callable, Optional

from .config import ModelConfig

_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
           "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
           "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


class SafetensorsIndex:
    """Where each tensor of a local safetensors checkpoint lives (file, offset, dtype, shape); headers only."""

    def __init__(self, files: list[str]):
        self.entries: dict[str, tuple[str, int, int, str, list[int]]] = {}
        for path in files:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                begin, end = meta["data_offsets"]
                self.entries[name] = (path, 8 + n + begin, end - begin, meta["dtype"], list(meta["shape"]))

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def read(self, name: str):
        """One tensor, read into fresh memory (no mmap: the file's other pages are never touched)."""
        import torch

        path, offset, nbytes, dtype, shape = self.entries[name]
        buf = bytearray(nbytes)
        with open(path, "rb") as f:
            f.seek(offset)
            f.readinto(buf)
        if dtype not in _DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has safetensors dtype {dtype!r}, which rayft cannot read")
        if nbytes == 0:
            return torch.empty(shape, dtype=getattr(torch, _DTYPES[dtype]))
        return torch.frombuffer(buf, dtype=getattr(torch, _DTYPES[dtype])).reshape(shape)


def local_safetensors_files(path: str) -> Optional[list[str]]:
    """The checkpoint files of a local folder (sharded through its index, or one `model.safetensors`); None when the
    folder has no safetensors checkpoint (or `path` is not a folder)."""
    if not os.path.isdir(path):
        return None
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, s) for s in shards]
    single = os.path.join(path, "model.safetensors")
    return [single] if os.path.isfile(single) else None


def checkpoint_key(name: str, index: SafetensorsIndex, prefix: str) -> Optional[str]:
    """The checkpoint's name for a model tensor: the same, or with/without the base model prefix (a checkpoint
    saved from the bare `LlamaModel` has no `model.`)."""
    if name in index:
        return name
    if prefix and name.startswith(prefix + ".") and name[len(prefix) + 1:] in index:
        return name[len(prefix) + 1:]
    if prefix and f"{prefix}.{name}" in index:
        return f"{prefix}.{name}"
    return None


def load_base_model_zero3(model: ModelConfig, dtype: str, ds_config: dict, allow_pickle: bool = False,
                          log: Callable[[str], None] = print):
    """The base model with every parameter partitioned over the ranks (ZeRO-3), and the `HfDeepSpeedConfig` that
    must stay alive as long as the model: transformers finds the ZeRO-3 setting through a weak reference to it
    (generation syncs the ranks, PEFT gathers before it reads a weight). Needs torch.distributed initialised."""
    import deepspeed
    import torch.distributed as dist
    from transformers import AutoConfig
    from transformers.integrations import HfDeepSpeedConfig

    from .load import load_base_model

    # deepspeed.zero.Init reads the world size from deepspeed.comm: wrap the process group Ray Train started.
    deepspeed.init_distributed(dist_backend=dist.get_backend())
    hf_ds = HfDeepSpeedConfig(ds_config)
    files = local_safetensors_files(model.name_or_path)
    if files is None:
        log(f"ZeRO-3: {model.name_or_path!r} is not a local folder with safetensors weights; loading it with "
            "transformers' ZeRO-3 from_pretrained (partitioned, but rank 0 reads the whole checkpoint)")
        return load_base_model(model, dtype, allow_pickle=allow_pickle), hf_ds
    config = AutoConfig.from_pretrained(model.name_or_path, revision=model.revision,
                                        trust_remote_code=model.trust_remote_code)
    base = build_partitioned(config, dtype, model, ds_config)
    index = SafetensorsIndex(files)
    prefix = getattr(base, "base_model_prefix", "") or ""
    tied = _tied_names(base)
    missing = [n for n, _ in base.named_parameters(remove_duplicate=False)
               if n not in tied and checkpoint_key(n, index, prefix) is None]
    if missing:
        log(f"ZeRO-3: {len(missing)} weight(s) of {model.name_or_path!r} have no tensor of the same name in its "
            f"safetensors files (first: {missing[0]!r}); loading it with transformers' ZeRO-3 from_pretrained")
        del base
        return load_base_model(model, dtype, allow_pickle=allow_pickle), hf_ds
    stream_weights(base, index, prefix, rank=dist.get_rank())
    base.tie_weights()
    return base, hf_ds


def build_partitioned(config, dtype: str, model: ModelConfig, ds_config: dict):
    """The architecture built inside deepspeed.zero.Init (partitioned from the start), without initialising weights
    that the checkpoint overwrites next: transformers' own ZeRO-3 `from_config` gathers every module to initialise
    it on rank 0, minutes of random numbers for a billion parameters on CPU. Where transformers' helpers for that
    have moved, `from_config` under the live HfDeepSpeedConfig does the same with the initialisation."""
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = dict(dtype=getattr(torch, dtype), attn_implementation=model.attn_implementation,
                  trust_remote_code=model.trust_remote_code)
    try:
        from transformers import initialization as hf_init
        from transformers.integrations.deepspeed import prevent_arange_dtype_change
        from transformers.modeling_utils import set_zero3_state
    except ImportError:
        return AutoModelForCausalLM.from_config(config, **kwargs)
    # The same contexts transformers enters for ZeRO-3 (the arange guard keeps RoPE's buffers in fp32; the zero3
    # state tells from_config that zero.Init is already on), with weight initialisation off.
    with hf_init.no_init_weights(), prevent_arange_dtype_change(), \
            deepspeed.zero.Init(config_dict_or_path=ds_config), set_zero3_state():
        return AutoModelForCausalLM.from_config(config, **kwargs)


def stream_weights(base, index: SafetensorsIndex, prefix: str, rank: int) -> None:
    """Copy the checkpoint into the partitioned model one module at a time (rank 0 reads, DeepSpeed broadcasts)."""
    import deepspeed
    import torch

    with torch.no_grad():
        for mname, module in base.named_modules():
            full = (lambda n: f"{mname}.{n}" if mname else n)
            keys = [(p, checkpoint_key(full(n), index, prefix)) for n, p in module.named_parameters(recurse=False)]
            keys = [(p, k) for p, k in keys if k is not None]
            if keys:
                with deepspeed.zero.GatheredParameters([p for p, _ in keys], modifier_rank=0):
                    if rank == 0:
                        for p, k in keys:
                            _copy_checked(p, index.read(k), k)
            # Buffers are not partitioned: every rank reads its own copy of the persistent ones.
            for n, buf in module.named_buffers(recurse=False):
                key = checkpoint_key(full(n), index, prefix)
                if buf is not None and key is not None:
                    _copy_checked(buf, index.read(key), key)


def _copy_checked(target, value, key: str) -> None:
    if tuple(target.shape) != tuple(value.shape):
        raise ValueError(f"checkpoint tensor {key!r} has shape {tuple(value.shape)}, the model expects "
                         f"{tuple(target.shape)}; the folder's config.json does not match its weights")
    target.data.copy_(value)


def _tied_names(model) -> set[str]:
    """Names of parameters that are the same tensor as an earlier one (tied embeddings): loaded once."""
    seen, tied = set(), set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.add(id(p))
    return tied
