"""A tiny Llama and a BPE tokenizer trained on local text, for tests and the quickstart.

These machines cannot download weights, so rayft builds a model that goes through exactly the same
`from_pretrained` path as a hub id: a folder with config.json, model.safetensors and tokenizer files.
"""
from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Iterable, Optional

from rayft.data.chat import DEFAULT_CHAT_TEMPLATE

TINY_HEAD_DIM = 64
SPECIAL_TOKENS = ["<|pad|>", "<|begin_of_text|>", "<|im_start|>", "<|im_end|>"]
# Tool-call markers of the default chat layout: one token each (as in Qwen2.5 and Hermes tokenizers), and not
# special, so decoding keeps them and a server's tool-call parser sees them.
TOOL_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]


def _corpus(files: Iterable[str]) -> Iterable[str]:
    for f in files:
        with open(f, "rb") as fh:
            for line in fh:
                text = line.decode("utf-8", errors="ignore").strip()
                if text:
                    # JSON-escaped text trains the tokenizer on escapes; unescape what can be.
                    yield text.replace("\\n", "\n").replace('\\"', '"')


def default_corpus_files() -> list[str]:
    from importlib.resources import files

    here = Path(str(files("rayft.examples").joinpath("data")))  # package data: works from a wheel too
    return sorted(p for p in glob.glob(str(here / "*")) if p.endswith((".json", ".jsonl", ".csv")))


def build_tokenizer(corpus_files: list[str], vocab_size: int = 1024):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(_corpus(corpus_files), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|begin_of_text|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>"],
    )
    from tokenizers import AddedToken

    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_TOKENS])
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    return tok


def build_tiny_model(
    out_dir: str,
    corpus_files: Optional[list[str]] = None,
    vocab_size: int = 1024,
    hidden_size: int = 128,
    num_layers: int = 2,
    max_position_embeddings: int = 2048,
    seed: int = 0,
) -> str:
    """Write a tiny Llama (safetensors) and its tokenizer to `out_dir`. Returns the folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    files = corpus_files or default_corpus_files()
    if not files:
        raise FileNotFoundError("no text to train the tokenizer on: pass corpus files (examples/data is missing)")
    os.makedirs(out_dir, exist_ok=True)
    tok = build_tokenizer(files, vocab_size)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        # head_dim 64: the smallest head size vLLM's CPU attention takes (it refuses 16), so the same tiny model
        # serves on the vllm engine; 2 query heads share 1 key/value head (grouped-query attention, as real Llamas).
        num_attention_heads=hidden_size // TINY_HEAD_DIM,
        num_key_value_heads=max(1, hidden_size // TINY_HEAD_DIM // 2),
        head_dim=TINY_HEAD_DIM,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "rayft_tiny_model.json"), "w") as f:
        json.dump({"built_by": "rayft tiny-model", "corpus_files": [os.path.basename(x) for x in files],
                   "vocab_size": len(tok), "hidden_size": hidden_size, "head_dim": TINY_HEAD_DIM, "num_layers": num_layers, "seed": seed}, f, indent=2)
    return out_dir
