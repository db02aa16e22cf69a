"""Chat rendering and loss masking: one conversation -> (input_ids, loss_mask).

The conversation is rendered into text segments, each marked trainable or not: the assistant's
content, its tool calls and its end-of-turn marker are trainable; everything else (system text,
the tool list, user text, tool results, role headers, the generation prompt, and assistant messages
with `weight: 0`) is not. The whole text is tokenized at once (fast tokenizers) and each token takes
the mark of the segment it starts in.

With the tokenizer's own Jinja template, segments come from rendering growing prefixes of the
conversation (tools passed as `tools=`, as transformers' `apply_chat_template` takes them); a
template whose renderings are not prefixes of each other is reported as such. Without a template,
rayft's default layout (ChatML, with Hermes-style tool calls as Qwen2.5 renders them) is used:

    <|im_start|>system\n{system}\n\n{TOOLS_PREAMBLE}<tools>\n{tool JSON per line}\n</tools>{TOOLS_FORMAT}<|im_end|>\n
    <|im_start|>user\n{content}<|im_end|>\n
    <|im_start|>assistant\n{content}\n<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call><|im_end|>\n
    <|im_start|>tool\n<tool_response>\n{content}\n</tool_response><|im_end|>\n
    <|im_start|>assistant\n{content}<|im_end|>\n      (trainable from {content} to the end)

The system turn carries the tools only when the row has tools (without a system message it holds
just the tool block); an assistant message's content and its calls are joined by newlines. Each
tool is written as {"type": "function", "function": {"name", "description", "parameters"}} and each
call as {"name", "arguments"}, both as JSON with `json.dumps` defaults (what Jinja's `tojson` writes).
"""
from __future__ import annotations

import json
from typing import Optional, Sequence

import numpy as np

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
TOOL_RESPONSE_START, TOOL_RESPONSE_END = "<tool_response>", "</tool_response>"
TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n"
)
TOOLS_FORMAT = (
    "\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>"
)

# The same layout as a Jinja template, for tokenizers built by rayft (tiny-model) and for serving (vLLM and the hf
# engine render requests with it, tools included). A test renders both ways and compares.
DEFAULT_CHAT_TEMPLATE = (
    "{%- macro tool_json(t) -%}{%- set f = t.function if t.function is defined else t -%}"
    '{"type": "function", "function": {"name": {{ f.name | tojson }}, "description": {{ (f.description or "") | tojson }}, '
    '"parameters": {{ (f.parameters or {}) | tojson }}}}'
    "{%- endmacro -%}"
    "{%- macro call_json(c) -%}{%- set f = c.function if c.function is defined else c -%}"
    '{"name": {{ f.name | tojson }}, "arguments": '
    "{%- if f.arguments is string %} {{ f.arguments }}{% else %} {{ (f.arguments or {}) | tojson }}{% endif -%}"
    "}"
    "{%- endmacro -%}"
    "{%- set tool_block = '' -%}"
    "{%- if tools -%}"
    "{%- set ns = namespace(lines=[]) -%}"
    "{%- for t in tools -%}{%- set ns.lines = ns.lines + [tool_json(t)] -%}{%- endfor -%}"
    "{%- set tool_block = " + json.dumps(TOOLS_PREAMBLE) + " + '<tools>\n' + (ns.lines | join('\n')) + '\n</tools>' + "
    + json.dumps(TOOLS_FORMAT) + " -%}"
    "{%- endif -%}"
    "{%- if tool_block and (not messages or messages[0]['role'] != 'system') -%}"
    "{{- '<|im_start|>system\n' + tool_block + '<|im_end|>\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' and loop.first and tool_block -%}"
    "{{- '<|im_start|>system\n' + message['content'] + '\n\n' + tool_block + '<|im_end|>\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- set ns2 = namespace(parts=[]) -%}"
    "{%- if message['content'] -%}{%- set ns2.parts = ns2.parts + [message['content']] -%}{%- endif -%}"
    "{%- for c in message.get('tool_calls') or [] -%}"
    "{%- set ns2.parts = ns2.parts + ['<tool_call>\n' + call_json(c) + '\n</tool_call>'] -%}"
    "{%- endfor -%}"
    "{{- '<|im_start|>assistant\n' + (ns2.parts | join('\n')) + '<|im_end|>\n' -}}"
    "{%- elif message['role'] == 'tool' -%}"
    "{{- '<|im_start|>tool\n<tool_response>\n' + message['content'] + '\n</tool_response><|im_end|>\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)


class TemplateError(ValueError):
    pass


Segments = list[tuple[str, bool]]  # (text, trainable)


def render_segments(messages: Sequence[dict], tokenizer=None, chat_template: Optional[str] = None,
                    tools: Optional[Sequence[dict]] = None) -> Segments:
    """Split a rendered conversation into (text, trainable) segments."""
    template = chat_template or (getattr(tokenizer, "chat_template", None) if tokenizer is not None else None)
    if not template or template == DEFAULT_CHAT_TEMPLATE:
        return _default_segments(messages, tools)
    return _template_segments(messages, tokenizer, template, tools)


def tool_json(tool: dict) -> str:
    f = tool.get("function", tool)
    return json.dumps({"type": "function", "function": {"name": f["name"], "description": f.get("description") or "",
                                                       "parameters": f.get("parameters") or {}}}, ensure_ascii=False)


def call_json(call: dict) -> str:
    f = call.get("function", call)
    args = f.get("arguments") or {}
    if isinstance(args, str):
        return '{"name": ' + json.dumps(f["name"], ensure_ascii=False) + ', "arguments": ' + args + "}"
    return json.dumps({"name": f["name"], "arguments": args}, ensure_ascii=False)


def _tool_block(tools: Sequence[dict]) -> str:
    return TOOLS_PREAMBLE + "<tools>\n" + "\n".join(tool_json(t) for t in tools) + "\n</tools>" + TOOLS_FORMAT


def assistant_text(m: dict) -> str:
    """An assistant message as the default layout writes it (what the model learns to produce): its content, then
    one <tool_call> block per call, joined by newlines."""
    parts = [m["content"]] if m.get("content") else []
    parts += [f"{TOOL_CALL_START}\n{call_json(c)}\n{TOOL_CALL_END}" for c in m.get("tool_calls") or ()]
    return "\n".join(parts)


def parse_tool_calls(text: str) -> tuple[str, list[Optional[dict]]]:
    """A model's answer in the default layout -> (the text before the first call, the calls as {name, arguments}).

    A block that is not a JSON object with a string `name` and object `arguments` comes back as None (a malformed
    call), so a caller can count it; a block left open at the end of the text is read to the end."""
    head, sep, rest = text.partition(TOOL_CALL_START)
    if not sep:
        return text, []
    calls: list[Optional[dict]] = []
    for block in (TOOL_CALL_START + rest).split(TOOL_CALL_START)[1:]:
        body = block.split(TOOL_CALL_END, 1)[0].strip()
        try:
            value = json.loads(body)
        except ValueError:
            calls.append(None)
            continue
        ok = isinstance(value, dict) and isinstance(value.get("name"), str) and isinstance(value.get("arguments", {}), dict)
        calls.append({"name": value["name"], "arguments": value.get("arguments", {})} if ok else None)
    return head.rstrip("\n"), calls


def _default_text(m: dict) -> str:
    if m["role"] == "tool":
        return f"{IM_START}tool\n{TOOL_RESPONSE_START}\n{m['content']}\n{TOOL_RESPONSE_END}{IM_END}\n"
    return f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n"


def _default_segments(messages: Sequence[dict], tools: Optional[Sequence[dict]] = None) -> Segments:
    segs: Segments = []
    pending = ""
    messages = list(messages)
    if tools:
        if messages and messages[0]["role"] == "system":
            pending = f"{IM_START}system\n{messages[0]['content']}\n\n{_tool_block(tools)}{IM_END}\n"
            messages = messages[1:]
        else:
            pending = f"{IM_START}system\n{_tool_block(tools)}{IM_END}\n"
    for m in messages:
        if m["role"] == "assistant":
            text = assistant_text(m) + f"{IM_END}\n"
            if m.get("weight", 1):
                segs.append((pending + f"{IM_START}assistant\n", False))
                segs.append((text, True))
                pending = ""
            else:
                pending += f"{IM_START}assistant\n" + text
        else:
            pending += _default_text(m)
    if pending:
        segs.append((pending, False))
    return segs


def _apply(tokenizer, template: str, messages, add_generation_prompt: bool, tools=None) -> str:
    return tokenizer.apply_chat_template(
        [_for_template(m) for m in messages], chat_template=template, tokenize=False,
        add_generation_prompt=add_generation_prompt, tools=list(tools) if tools else None,
    )


def _for_template(m: dict) -> dict:
    """A canonical message as chat templates take it (no rayft-only keys)."""
    return {k: v for k, v in m.items() if k != "weight"}


def _template_segments(messages: Sequence[dict], tokenizer, template: str, tools=None) -> Segments:
    if tokenizer is None:
        raise TemplateError("a Jinja chat template needs a tokenizer to render it")
    full = _apply(tokenizer, template, messages, False, tools)
    segs: Segments = []
    pos = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or not m.get("weight", 1):
            continue
        start = len(_apply(tokenizer, template, messages[:i], True, tools))
        end_text = _apply(tokenizer, template, messages[: i + 1], False, tools)
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
    return [(ids.tolist(), mask.tolist()) for ids, mask in tokenize_segments_arrays(batch, tokenizer)]


def tokenize_segments_arrays(batch: Sequence[Segments], tokenizer) -> list[tuple[np.ndarray, np.ndarray]]:
    """`tokenize_segments` as numpy arrays (int32 ids, int8 mask): what the data pipeline stores."""
    if not batch:
        return []
    if getattr(tokenizer, "is_fast", False):
        return _tokenize_with_offsets(batch, tokenizer)
    flat = [text for segs in batch for text, _ in segs]
    ids = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    out = []
    k = 0
    for segs in batch:
        pieces, marks = [], []
        for _, trainable in segs:
            pieces.append(np.asarray(ids[k], dtype=np.int32))
            marks.append(np.full(len(ids[k]), 1 if trainable else 0, dtype=np.int8))
            k += 1
        out.append((np.concatenate(pieces) if pieces else np.zeros(0, np.int32),
                    np.concatenate(marks) if marks else np.zeros(0, np.int8)))
    return out


def _tokenize_with_offsets(batch: Sequence[Segments], tokenizer) -> list[tuple[np.ndarray, np.ndarray]]:
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
    out = []
    if backend is not None:
        # The Rust tokenizer that the transformers wrapper calls, without building unused fields. The mask needs the
        # first token starting at or after each segment bound, a few lookups per row; every token's offsets as Python
        # tuples would cost as much as the tokenization itself.
        for e, b, text in zip(backend.encode_batch(texts, add_special_tokens=False), bounds, texts):
            ids = np.asarray(e.ids, dtype=np.int32)
            mask = _mask_at_bounds(e, b, len(ids), len(text))
            if mask is None:
                mask = _mask_from_starts(np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2)[:, 0], b)
            out.append((ids, mask))
        return out
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    for ids, offsets, b in zip(enc["input_ids"], enc["offset_mapping"], bounds):
        out.append((np.asarray(ids, dtype=np.int32),
                    _mask_from_starts(np.asarray(offsets, dtype=np.int64).reshape(-1, 2)[:, 0], b)))
    return out


def _mask_from_starts(starts, bounds: list[int]):
    # bounds are [s0, e0, s1, e1, ...]; a start inside [s, e) lands at an odd insertion index.
    idx = np.searchsorted(np.asarray(bounds, dtype=np.int64), starts, side="right")
    return (idx % 2).astype(np.int8)


def _mask_at_bounds(enc, bounds: list[int], n: int, text_len: int):
    """The loss mask from the first token starting at or after each bound (tokens that start inside a trainable
    segment are trained on); None where the encoding cannot say (a character no token covers, a token without
    offsets), and the caller reads every token's offsets instead."""
    mask = np.zeros(n, dtype=np.int8)
    cuts = []
    for pos in bounds:
        if pos >= text_len:
            cuts.append(n)
            continue
        t = enc.char_to_token(pos)
        if t is None:
            return None
        # Several tokens may share a start (the bytes of one character): step to the first one starting at pos or
        # after it.
        while t > 0:
            prev = enc.token_to_chars(t - 1)
            if prev is None:
                return None
            if prev[0] < pos:
                break
            t -= 1
        while t < n:
            cur = enc.token_to_chars(t)
            if cur is None:
                return None
            if cur[0] >= pos:
                break
            t += 1
        cuts.append(t)
    for s, e in zip(cuts[::2], cuts[1::2]):
        mask[s:e] = 1
    return mask


def render_conversation(messages: Sequence[dict], tokenizer, chat_template: Optional[str] = None,
                        tools: Optional[Sequence[dict]] = None) -> tuple[list[int], list[int]]:
    """The one function: a conversation -> (input_ids, loss_mask), loss on every trained assistant turn."""
    return tokenize_segments([render_segments(messages, tokenizer, chat_template, tools)], tokenizer)[0]


def render_prompt(messages: Sequence[dict], tokenizer, chat_template: Optional[str] = None,
                  tools: Optional[Sequence[dict]] = None) -> str:
    """The text a server sends to the model for these messages (generation prompt added)."""
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template or template == DEFAULT_CHAT_TEMPLATE:
        return "".join(t for t, _ in _default_segments(messages, tools)) + f"{IM_START}assistant\n"
    return _apply(tokenizer, template, messages, True, tools)


def fit_conversation(
    messages: list[dict],
    tokenizer,
    max_len: int,
    policy: str,
    chat_template: Optional[str] = None,
    rendered: Optional[tuple[list[int], list[int]]] = None,
    tools: Optional[Sequence[dict]] = None,
) -> tuple[Optional[list[int]], Optional[list[int]], bool, str]:
    """Apply the truncation policy. Returns (input_ids, loss_mask, truncated, why_rejected)."""
    ids, mask = rendered if rendered is not None else render_conversation(messages, tokenizer, chat_template, tools)
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
        while True:
            # The oldest exchange: its user message up to (not including) the next user message, so an assistant's
            # tool calls leave together with their results.
            nxt = next((k for k in range(head + 1, len(msgs)) if msgs[k]["role"] == "user"), None)
            if nxt is None:
                break
            msgs = msgs[:head] + msgs[nxt:]
            if not any(m["role"] == "assistant" and m.get("weight", 1) for m in msgs):
                break
            ids, mask = render_conversation(msgs, tokenizer, chat_template, tools)
            if len(ids) <= max_len:
                return ids, mask, True, ""
        return None, None, False, f"{n} tokens > max_seq_length {max_len}, and {len(ids)} after dropping the oldest turns"
    return None, None, False, f"{n} tokens > max_seq_length {max_len} (truncation: reject)"
