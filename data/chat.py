"""Chat rendering and loss masking: one conversation -> (input_ids, loss_mask).

The conversation is rendered into text segments, each marked trainable or not: the assistant's
content and its end-of-turn marker are trainable, everything else (system, user, role headers,
the generation prompt) is not. The whole text is tokenized at once (fast tokenizers) and each
token takes the mark of the segment it starts in.

With the tokenizer's own Jinja template, segments come from rendering growing prefixes of the
conversation; a template whose renderings are not prefixes of each other is reported as such.
Without a template, rayft's default layout (ChatML) is used:

    <|im_start|>system\n{content}<|im_end|>\n
    <|im_start|>user\n{content}<|im_end|>\n
    <|im_start|>assistant\n{content}<|im_end|>\n      (trainable from {content} to the end)
"""
from __future__ import annotations

from typing import Optional, Sequence

IM_START, IM_END = "<|im_start|>", "<|im_end|>"

# The same layout as a Jinja template, for tokenizers built by rayft (tiny-model) and for serving.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class TemplateError(ValueError):
    pass


Segments = list[tuple[str, bool]]  # (text, trainable)


def render_segments(messages: Sequence[dict], tokenizer=None, chat_template: Optional[str] = None) -> Segments:
    """Split a rendered conversation into (text, trainable) segments."""
    template = chat_template or (getattr(tokenizer, "chat_template", None) if tokenizer is not None else None)
    if not template or template == DEFAULT_CHAT_TEMPLATE:
        return _default_segments(messages)
    return _template_segments(messages, tokenizer, template)


def _default_segments(messages: Sequence[dict]) -> Segments:
    segs: Segments = []
    pending = ""
    for m in messages:
        if m["role"] == "assistant":
            segs.append((pending + f"{IM_START}assistant\n", False))
            segs.append((m["content"] + f"{IM_END}\n", True))
            pending = ""
        else:
            pending += f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n"
    if pending:
        segs.append((pending, False))
    return segs


def _apply(tokenizer, template: str, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        list(messages), chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _template_segments(messages: Sequence[dict], tokenizer, template: str) -> Segments:
    if tokenizer is None:
        raise TemplateError("a Jinja chat template needs a tokenizer to render it")
    full = _apply(tokenizer, template, messages, False)
    segs: Segments = []
    pos = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_apply(tokenizer, template, messages[:i], True))
        end_text = _apply(tokenizer, template, messages[: i + 1], False)
        end = len(end_text)
        if not full.startswith(end_text) or start > end or start < pos:
            raise TemplateError(
                "the chat template does not render a conversation as a sequence of prefixes (it rewrites earlier "
                "turns), so assistant spans cannot be located; set data.chat_template to a template that does"
            )
        segs.append((full[pos:start], False))
        segs.append((full[start:end], True))
        pos = end
    if pos < len(full):
        segs.append((full[pos:], False))
    return [(t, tr) for t, tr in segs if t]


def tokenize_segments(batch: Sequence[Segments], tokenizer) -> list[tuple[list[int], list[int]]]:
    """Tokenize many conversations in one tokenizer call; returns (input_ids, loss_mask) each.

    A fast tokenizer tokenizes the whole text (the exact tokens the model sees at inference) and a
    token is trained on when it starts inside a trainable segment. A slow tokenizer (no offsets)
    tokenizes segment by segment.
    """
    if not batch:
        return []
    if getattr(tokenizer, "is_fast", False):
        return _tokenize_with_offsets(batch, tokenizer)
    flat = [text for segs in batch for text, _ in segs]
    ids = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    out = []
    k = 0
    for segs in batch:
        input_ids: list[int] = []
        mask: list[int] = []
        for _, trainable in segs:
            piece = ids[k]
            k += 1
            input_ids.extend(piece)
            mask.extend([1 if trainable else 0] * len(piece))
        out.append((input_ids, mask))
    return out


def _tokenize_with_offsets(batch: Sequence[Segments], tokenizer) -> list[tuple[list[int], list[int]]]:
    import numpy as np

    texts, bounds = [], []
    for segs in batch:
        pos, b = 0, []
        for text, trainable in segs:
            if trainable:
                b.extend((pos, pos + len(text)))
            pos += len(text)
        texts.append("".join(t for t, _ in segs))
        bounds.append(b)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # The Rust tokenizer that the transformers wrapper calls, without building unused fields.
        encs = backend.encode_batch(texts, add_special_tokens=False)
        pairs = ((e.ids, e.offsets) for e in encs)
    else:
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        pairs = zip(enc["input_ids"], enc["offset_mapping"])
    out = []
    for (ids, offsets), b in zip(pairs, bounds):
        if not ids:
            out.append(([], []))
            continue
        starts = np.asarray(offsets, dtype=np.int64)[:, 0]
        # bounds are [s0, e0, s1, e1, ...]; a start inside [s, e) lands at an odd insertion index.
        idx = np.searchsorted(np.asarray(b, dtype=np.int64), starts, side="right")
        out.append((list(ids), (idx % 2).astype(np.int8).tolist()))
    return out


def render_conversation(messages: Sequence[dict], tokenizer, chat_template: Optional[str] = None) -> tuple[list[int], list[int]]:
    """The one function: a conversation -> (input_ids, loss_mask), loss on every assistant turn."""
    return tokenize_segments([render_segments(messages, tokenizer, chat_template)], tokenizer)[0]


def render_prompt(messages: Sequence[dict], tokenizer, chat_template: Optional[str] = None) -> str:
    """The text a server sends to the model for these messages (generation prompt added)."""
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template or template == DEFAULT_CHAT_TEMPLATE:
        return "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages) + f"{IM_START}assistant\n"
    return _apply(tokenizer, template, messages, True)


def fit_conversation(
    messages: list[dict],
    tokenizer,
    max_len: int,
    policy: str,
    chat_template: Optional[str] = None,
    rendered: Optional[tuple[list[int], list[int]]] = None,
) -> tuple[Optional[list[int]], Optional[list[int]], bool, str]:
    """Apply the truncation policy. Returns (input_ids, loss_mask, truncated, why_rejected)."""
    ids, mask = rendered if rendered is not None else render_conversation(messages, tokenizer, chat_template)
    if len(ids) <= max_len:
        return ids, mask, False, ""
    n = len(ids)
    if policy == "truncate_end":
        ids, mask = ids[:max_len], mask[:max_len]
        if not any(mask):
            return None, None, False, f"{n} tokens; cutting to {max_len} leaves no assistant token"
        return ids, mask, True, ""
    if policy == "drop_oldest_turns":
        msgs = list(messages)
        head = 1 if msgs and msgs[0]["role"] == "system" else 0
        while len(msgs) - head > 2:
            msgs = msgs[:head] + msgs[head + 2:]
            ids, mask = render_conversation(msgs, tokenizer, chat_template)
            if len(ids) <= max_len:
                return ids, mask, True, ""
        return None, None, False, f"{n} tokens > max_seq_length {max_len}, and {len(ids)} after dropping the oldest turns"
    return None, None, False, f"{n} tokens > max_seq_length {max_len} (truncation: reject)"
