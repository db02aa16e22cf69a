"""Batched greedy generation with transformers: prompts sorted by length, left-padded, decoded up to a stop token."""
from __future__ import annotations

from typing import Optional, Sequence


def stop_token_ids(tokenizer) -> list[int]:
    """The end of an answer: the tokenizer's eos and the chat turn's end marker when the vocabulary has one."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for marker in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(marker) if marker in tokenizer.get_vocab() else None
        if tid is not None and tid not in ids:
            ids.append(tid)
    return ids


def prompt_texts(prompts: Sequence[list[dict]], tokenizer, chat_template: Optional[str] = None,
                 tools: Optional[Sequence[Optional[list[dict]]]] = None) -> list[str]:
    """Each prompt's messages as the text the model continues (the chat template with the generation prompt);
    `tools[i]` are the tools of prompt i (rendered into it, as in training)."""
    from rayft.data.chat import render_prompt

    tools = tools or [None] * len(prompts)
    return [render_prompt(messages, tokenizer, chat_template, t or None) for messages, t in zip(prompts, tools)]


def generate_answers(model, tokenizer, texts: Sequence[str], max_new_tokens: int, batch_size: int,
                     max_prompt_tokens: Optional[int] = None, synced_gpus: bool = False,
                     min_batches: int = 0) -> list[str]:
    """Greedy answers to `texts`, in their order. A prompt longer than `max_prompt_tokens` keeps its end.

    `synced_gpus` (ZeRO-3: every forward is collective) keeps this rank stepping until every rank is done, and
    `min_batches` makes it run at least that many batches (repeating its last prompt) so that every rank calls
    generate equally often."""
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_token_ids(tokenizer)
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    if max_prompt_tokens:
        encoded = [ids[-max_prompt_tokens:] for ids in encoded]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # little padding within a batch
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    while len(batches) < min_batches:  # a rank with fewer prompts still takes part in every collective call
        batches.append(batches[-1][-1:] if batches else [])
    answers: dict[int, str] = {}
    for batch in batches:
        rows = [encoded[i] for i in batch] or [[pad]]
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
        attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                                 do_sample=False, num_beams=1, pad_token_id=pad, eos_token_id=stops or None,
                                 use_cache=True, synced_gpus=synced_gpus, temperature=None, top_p=None, top_k=None)
        for i, new in zip(batch, out[:, width:].tolist()):
            cut = next((k for k, t in enumerate(new) if t in stops), len(new))
            answers[i] = tokenizer.decode(new[:cut], skip_special_tokens=True).strip()
    return [answers[i] for i in range(len(texts))]
