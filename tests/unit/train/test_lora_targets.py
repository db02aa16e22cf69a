"""LoRA target modules: the per-family table, explicit names, and the error for an unknown family."""
import pytest
import torch

from rayft.models.architectures import TARGET_MODULES, LoraTargetError, linear_layer_names, resolve_target_modules
from rayft.train.config import LoraSettings
from rayft.train.lora import build_lora_config


def meta_model(config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def test_table_covers_the_required_families():
    for family in ("llama", "mistral", "qwen2", "gemma", "phi", "gpt2", "gpt_neox"):
        assert TARGET_MODULES[family]


@pytest.mark.parametrize("family,kwargs", [
    ("llama", {}), ("mistral", {}), ("qwen2", {}), ("gemma", {"head_dim": 16}), ("phi", {}), ("gpt2", {}),
    ("gpt_neox", {}),
])
def test_auto_targets_exist_in_each_family(family, kwargs):
    from transformers import AutoConfig

    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, vocab_size=128)
    if family == "gpt2":
        small = dict(n_embd=64, n_layer=1, n_head=4, vocab_size=128)
    config = AutoConfig.for_model(family, **small, **kwargs)
    targets = resolve_target_modules("auto", meta_model(config))
    assert targets and set(targets) <= set(linear_layer_names(meta_model(config)))
    assert set(targets) == set(TARGET_MODULES[family])


def test_unknown_family_lists_the_linear_layers():
    from transformers import AutoConfig

    config = AutoConfig.for_model("bloom", hidden_size=64, n_layer=1, n_head=4, vocab_size=128)
    with pytest.raises(LoraTargetError) as e:
        resolve_target_modules("auto", meta_model(config))
    msg = str(e.value)
    assert "'bloom'" in msg and "query_key_value" in msg and "dense_4h_to_h" in msg
    assert "train.lora.target_modules" in msg


def test_unknown_explicit_module_is_named(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(LoraTargetError) as e:
        resolve_target_modules(["q_proj", "qkv"], model)
    assert "['qkv']" in str(e.value) and "q_proj" in str(e.value) and "down_proj" in str(e.value)
    assert resolve_target_modules(["q_proj", "v_proj"], model) == ["q_proj", "v_proj"]


def test_our_names_map_to_peft_names():
    lc = build_lora_config(LoraSettings(rank=4, alpha=8, dropout=0.1, bias="lora_only", modules_to_save=["lm_head"]),
                           ["q_proj"], "llama")
    assert (lc.r, lc.lora_alpha, lc.lora_dropout, lc.bias) == (4, 8, 0.1, "lora_only")
    assert set(lc.target_modules) == {"q_proj"} and list(lc.modules_to_save) == ["lm_head"]
    assert lc.task_type == "CAUSAL_LM" and lc.fan_in_fan_out is False
    assert build_lora_config(LoraSettings(), ["c_attn"], "gpt2").fan_in_fan_out is True
