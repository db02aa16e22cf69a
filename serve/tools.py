"""Tool calls in a model's output (the hf engine): Hermes-style blocks -> OpenAI `tool_calls`.

The layout is the one rayft trains with (data/chat.py's default template, as Qwen2.5 and Hermes models write it):

    {optional text}
    <tool_call>
    {"name": "get_order_status", "arguments": {"order_id": "NW-1"}}
    </tool_call>
    <tool_call>
    ...

It is read the way vLLM's `hermes` tool-call parser reads it, so one adapter answers alike on both engines:

- every `<tool_call>...</tool_call>` block (the last one may lack its end marker: a stop string or the token limit cut
  it) holds one JSON object with a string `name` and an object `arguments` (missing: `{}`);
- the calls become OpenAI `tool_calls` (`id` `call_<hex>`, `type` "function", `arguments` as a JSON string), and the
  message's `content` is the text before the first block (trailing whitespace dropped; null when nothing is left);
- when any block is not such an object, nothing is a call: the whole output is the content, as the model wrote it.
  A model that writes a broken call gets its text back, never a server error.

Streaming (`ToolCallStream`): text is sent as content until a `<tool_call>` marker begins; a tail that may be the
start of a marker (or whitespace before one) is held back until the next text decides it. From the first marker on,
everything is held to the end and parsed as above: calls, or, when the blocks do not parse, the held text as content.
The concatenated content deltas equal the non-streaming `content`.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Optional

TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"


def call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class ParsedOutput:
    content: Optional[str]
    tool_calls: list[dict] = field(default_factory=list)  # OpenAI shape: {id, type, function: {name, arguments}}


def parse_tool_calls(text: str) -> ParsedOutput:
    """A model's whole output -> content and tool calls (see the module docstring for the rules)."""
    start = text.find(TOOL_CALL_START)
    if start < 0:
        return ParsedOutput(text)
    calls = []
    pos = start
    while pos >= 0:
        body_start = pos + len(TOOL_CALL_START)
        end = text.find(TOOL_CALL_END, body_start)
        body = text[body_start:end if end >= 0 else len(text)]
        call = _read_call(body)
        if call is None:
            return ParsedOutput(text)
        calls.append(call)
        if end < 0:
            break
        pos = text.find(TOOL_CALL_START, end + len(TOOL_CALL_END))
    content = text[:start].rstrip()
    return ParsedOutput(content or None, calls)


def _read_call(body: str) -> Optional[dict]:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return None
    return {"id": call_id(), "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}}


class ToolCallStream:
    """Incremental form of parse_tool_calls for streamed answers.

    `feed(text)` returns the content that can be sent now; `finish()` returns (the content still held, the calls).
    """

    def __init__(self):
        self.sent = ""  # content already returned by feed
        self.held = ""  # text not yet returned: a possible marker start, whitespace before it, or the calls section
        self.in_calls = False

    def feed(self, text: str) -> str:
        if self.in_calls:
            self.held += text
            return ""
        buf = self.held + text
        k = buf.find(TOOL_CALL_START)
        if k >= 0:
            self.in_calls = True
            # content ends at its last non-space before the marker; the rest is held (sent if the calls do not parse)
            out = buf[:k].rstrip()
            self.held = buf[len(out):]
            self.sent += out
            return out
        keep = _held_tail(buf)
        out, self.held = buf[:len(buf) - keep], buf[len(buf) - keep:]
        self.sent += out
        return out

    def finish(self) -> tuple[str, list[dict]]:
        """(content still to send, tool calls). The calls are parsed from the whole output, so streamed and plain
        answers agree; when they do not parse, the held text goes out as content."""
        full = self.sent + self.held
        parsed = parse_tool_calls(full)
        if parsed.tool_calls:
            return "", parsed.tool_calls
        rest, self.held = self.held, ""
        self.sent += rest
        return rest, []


def _held_tail(buf: str) -> int:
    """Characters at the end of `buf` that may still turn out to lead into a marker: a proper prefix of
    `<tool_call>`, and the whitespace just before it (content drops the whitespace before a call)."""
    n = 0
    for k in range(min(len(TOOL_CALL_START) - 1, len(buf)), 0, -1):
        if buf.endswith(TOOL_CALL_START[:k]):
            n = k
            break
    stripped = buf[:len(buf) - n]
    return n + (len(stripped) - len(stripped.rstrip()))


def finish_reason(calls: list[dict], engine_reason: str) -> str:
    """OpenAI's finish_reason: "tool_calls" when the answer ended (not cut by the token limit) with calls."""
    return "tool_calls" if calls and engine_reason == "stop" else engine_reason


def answer_message(text: str, engine_reason: str, parallel: bool = True) -> tuple[dict, str]:
    """The assistant message of a non-streamed answer whose output is parsed for calls, and its finish_reason.
    `parallel` false (parallel_tool_calls: false) keeps the first call only."""
    parsed = parse_tool_calls(text)
    calls = parsed.tool_calls if parallel else parsed.tool_calls[:1]
    message: dict = {"role": "assistant", "content": parsed.content}
    if calls:
        message["tool_calls"] = calls
    return message, finish_reason(calls, engine_reason)


def call_deltas(calls: list[dict]) -> list[dict]:
    """Streamed `delta.tool_calls` entries: each call whole, with its index (the client appends the pieces)."""
    return [{"index": i, **c} for i, c in enumerate(calls)]
