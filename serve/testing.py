"""Test and benchmark setup: small LoRA adapters that answer differently, trained in seconds on the tiny model.

This is setup, not a feature: a few dozen plain-torch steps teach an adapter one fixed answer for a couple of
prompts, so that greedy outputs of different adapters differ and a mixed batch can be checked row by row.
"""
from __future__ import annotations

from typing import Optional

TRAIN_PROMPTS = ["hello", "What are your opening hours?"]


def train_toy_adapter(base_dir: str, out_dir: str, answer: str, steps: int = 40, rank: int = 4, seed: int = 0,
                      lr: float = 1e-2, prompts: Optional[list[str]] = None) -> str:
    """Train a LoRA adapter so that chat prompts are answered with `answer`; saved as safetensors in out_dir."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data.chat import render_prompt

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, use_safetensors=True)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                             target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]))
    rows = []
    for p in prompts or TRAIN_PROMPTS:
        for text in (render_prompt([{"role": "user", "content": p}], tok), p):  # chat and plain completion
            ids = tok(text, add_special_tokens=False)["input_ids"]
            target = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            rows.append((ids + target, [-100] * len(ids) + target))
    L = max(len(r[0]) for r in rows)
    input_ids = torch.full((len(rows), L), tok.pad_token_id)
    labels = torch.full((len(rows), L), -100)
    attn = torch.zeros((len(rows), L), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        attn[i, : len(ids)] = 1
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=input_ids, attention_mask=attn, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir


def merge_toy_adapter(base_dir: str, adapter_dir: str, out_dir: str) -> str:
    """The merged model of base + adapter, through train/export's checked merge."""
    from transformers import AutoTokenizer

    from train.config import ModelConfig
    from train.export import merge_adapter

    merge_adapter(ModelConfig(name_or_path=base_dir, dtype="float32"), adapter_dir, out_dir,
                  AutoTokenizer.from_pretrained(base_dir))
    return out_dir
