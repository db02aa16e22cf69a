"""Every row layout we accept, normalised to one canonical conversation: a list of {role, content}.

Roles are system, user, assistant. A conversation is: an optional system message, then user and
assistant turns alternating, starting with user and ending with assistant. Anything else is
rejected with one of REJECT_REASONS and a detail that says what was wrong.
"""
from __future__ import annotations

import json
from collections import Counter
from typing import Any, Iterable, Optional

SCHEMAS = ("alpaca", "sharegpt", "openai", "prompt_completion", "qa")

REJECT_REASONS = {
    "unparsable_json": "a line, file or cell is not valid JSON",
    "unparsable_csv": "a CSV row cannot be read",
    "unparsable_parquet": "a Parquet file cannot be read",
    "undecodable_text": "bytes that are not valid UTF-8",
    "wrong_type": "a field or row of the wrong type (for example a list where an object is expected)",
    "missing_field": "a field the schema needs is absent or null",
    "empty_content": "a message whose content is empty or only whitespace",
    "unknown_role": "a role that is not system, user or assistant",
    "tool_turn": "a tool or function-call turn; rayft does not train on tool turns yet",
    "no_assistant_turn": "no assistant message to learn from",
    "wrong_turn_order": "system not first, or user/assistant not alternating, or not ending with assistant",
    "too_long": "longer than data.max_seq_length even after the truncation policy",
    "duplicate": "the same conversation as an earlier row (whitespace ignored); the detail names that row",
}

# ShareGPT speakers and OpenAI roles mapped to ours.
_ROLE_ALIASES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "bot": "assistant",
}
_TOOL_ROLES = {"tool", "function", "function_call", "observation", "ipython", "tool_call", "tool_response"}


class Reject(Exception):
    def __init__(self, reason: str, detail: str):
        assert reason in REJECT_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def detect_schema(records: Iterable[dict]) -> tuple[Optional[str], Counter]:
    """The schema most of these records look like (None when none fits), and the vote per schema."""
    votes: Counter = Counter()
    for rec in records:
        s = _looks_like(rec)
        if s:
            votes[s] += 1
    if not votes:
        return None, votes
    return votes.most_common(1)[0][0], votes


def _looks_like(rec: dict) -> Optional[str]:
    keys = set(rec)
    if "messages" in keys:
        return "openai"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    if "question" in keys and "answer" in keys:
        return "qa"
    return None


# The columns each schema reads (our names, after column_map). Everything else a source has (an `ssn` or
# `internal_notes` column) is dropped as the row is read, so it never reaches the prepared data, the rejects
# file, checkpoints or logs.
USED_COLUMNS = {
    "openai": ("messages",),
    "sharegpt": ("conversations", "system"),
    "alpaca": ("instruction", "input", "output", "system", "history"),
    "prompt_completion": ("prompt", "completion", "system"),
    "qa": ("question", "answer", "context", "system"),
}


def used_columns(record: dict, schema: str, column_map: dict[str, str]) -> dict:
    """The row with only the columns `schema` reads, under their names in the source."""
    keep = USED_COLUMNS[schema]
    return {k: v for k, v in record.items() if column_map.get(k, k) in keep}


def apply_column_map(record: dict, column_map: dict[str, str]) -> dict:
    if not column_map:
        return record
    return {column_map.get(k, k): v for k, v in record.items()}


def normalise(record: dict, schema: str, system_prompt: Optional[str] = None) -> list[dict]:
    """One record -> a validated conversation. Raises Reject."""
    if schema == "openai":
        messages = _from_openai(record)
    elif schema == "sharegpt":
        messages = _from_sharegpt(record)
    elif schema == "alpaca":
        messages = _from_alpaca(record)
    elif schema == "prompt_completion":
        messages = _pair(record, "prompt", "completion")
    elif schema == "qa":
        messages = _from_qa(record)
    else:
        raise ValueError(f"unknown schema {schema!r}; expected one of {', '.join(SCHEMAS)}")
    if system_prompt and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": system_prompt}] + messages
    validate(messages)
    return messages


def validate(messages: list[dict]) -> None:
    if not messages:
        raise Reject("no_assistant_turn", "the conversation has no messages")
    for i, m in enumerate(messages):
        if not isinstance(m["content"], str):
            raise Reject("wrong_type", f"message {i} content is a {type(m['content']).__name__}, not text")
        if not m["content"].strip():
            raise Reject("empty_content", f"message {i} ({m['role']}) is empty")
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError:  # JSON can escape a lone surrogate (\ud800); it is not text
            raise Reject("undecodable_text", f"message {i} ({m['role']}) holds a lone surrogate, which is not text") from None
    if not any(m["role"] == "assistant" for m in messages):
        raise Reject("no_assistant_turn", "no message has the assistant role")
    roles = [m["role"] for m in messages]
    body = roles[1:] if roles[0] == "system" else roles
    if "system" in body:
        raise Reject("wrong_turn_order", f"a system message at position {roles.index('system', 1 if roles[0] == 'system' else 0)}; only the first message may be system")
    for i, r in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if r != expected:
            pos = i + (len(roles) - len(body))
            raise Reject("wrong_turn_order", f"message {pos} is {r} but {expected} was expected (turns: {'/'.join(roles)})")
    if body[-1] != "assistant":
        raise Reject("wrong_turn_order", f"the conversation ends with {body[-1]}, not assistant")


def _text_of(value: Any, field: str) -> str:
    if value is None:
        raise Reject("missing_field", f"{field} is missing")
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # OpenAI content parts
        parts = []
        for p in value:
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str):
                parts.append(p["text"])
            elif isinstance(p, str):
                parts.append(p)
            else:
                kind = p.get("type") if isinstance(p, dict) else type(p).__name__
                raise Reject("wrong_type", f"{field} has a {kind!r} part; only text parts are supported")
        return "".join(parts)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise Reject("wrong_type", f"{field} is a {type(value).__name__}, not text")


def _role(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise Reject("wrong_type" if value is not None else "missing_field", f"{field} is {value!r}, not a role name")
    key = value.strip().lower()
    if key in _TOOL_ROLES:
        raise Reject("tool_turn", f"{field} is {value!r}")
    if key not in _ROLE_ALIASES:
        raise Reject("unknown_role", f"{field} is {value!r}; expected system, user or assistant")
    return _ROLE_ALIASES[key]


def _maybe_json(value: Any, field: str) -> Any:
    """Lists stored as a JSON string (a CSV cell, a string column in Parquet) are parsed."""
    if isinstance(value, str):
        if not value.strip():
            raise Reject("missing_field", f"{field} is empty")
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise Reject("unparsable_json", f"{field} is text but not valid JSON: {e.msg} at column {e.colno}") from None
    return value


def _turn_list(rec: dict, field: str) -> list:
    items = _maybe_json(rec.get(field), field)
    if items is None:
        raise Reject("missing_field", f"{field} is missing")
    if not isinstance(items, list):
        raise Reject("wrong_type", f"{field} is a {type(items).__name__}, not a list")
    for i, m in enumerate(items):
        if not isinstance(m, dict):
            raise Reject("wrong_type", f"{field}[{i}] is a {type(m).__name__}, not an object")
    return items


def _from_openai(rec: dict) -> list[dict]:
    out = []
    for i, m in enumerate(_turn_list(rec, "messages")):
        role = _role(m.get("role"), f"messages[{i}].role")
        if m.get("tool_calls") or m.get("function_call"):
            raise Reject("tool_turn", f"messages[{i}] calls a tool")
        out.append({"role": role, "content": _text_of(m.get("content"), f"messages[{i}].content")})
    return out


def _from_sharegpt(rec: dict) -> list[dict]:
    conv = _turn_list(rec, "conversations")
    out = []
    system = rec.get("system")
    if isinstance(system, str) and system.strip():
        out.append({"role": "system", "content": system})
    for i, m in enumerate(conv):
        role = _role(m.get("from", m.get("role")), f"conversations[{i}].from")
        out.append({"role": role, "content": _text_of(m.get("value", m.get("content")), f"conversations[{i}].value")})
    return out


def _from_alpaca(rec: dict) -> list[dict]:
    instruction = _text_of(rec.get("instruction"), "instruction")
    output = _text_of(rec.get("output"), "output")
    extra = rec.get("input")
    extra = _text_of(extra, "input") if extra is not None else ""
    user = instruction if not extra.strip() else f"{instruction}\n\n{extra}"
    out = []
    system = rec.get("system")
    system = _text_of(system, "system") if system is not None else ""
    if system.strip():
        out.append({"role": "system", "content": system})
    history = rec.get("history")
    if history not in (None, "", []):
        history = _maybe_json(history, "history")
        if not isinstance(history, list):
            raise Reject("wrong_type", f"history is a {type(history).__name__}, not a list of [user, assistant] pairs")
        for i, pair in enumerate(history):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                raise Reject("wrong_type", f"history[{i}] is not a [user, assistant] pair")
            out.append({"role": "user", "content": _text_of(pair[0], f"history[{i}][0]")})
            out.append({"role": "assistant", "content": _text_of(pair[1], f"history[{i}][1]")})
    out.append({"role": "user", "content": user})
    out.append({"role": "assistant", "content": output})
    return out


def _pair(rec: dict, user_key: str, assistant_key: str) -> list[dict]:
    out = []
    system = rec.get("system")
    system = _text_of(system, "system") if system is not None else ""
    if system.strip():
        out.append({"role": "system", "content": system})
    out.append({"role": "user", "content": _text_of(rec.get(user_key), user_key)})
    out.append({"role": "assistant", "content": _text_of(rec.get(assistant_key), assistant_key)})
    return out


def _from_qa(rec: dict) -> list[dict]:
    msgs = _pair(rec, "question", "answer")
    context = rec.get("context")
    context = _text_of(context, "context") if context is not None else ""
    if context.strip():
        user = msgs[-2]
        user["content"] = f"Context:\n{context}\n\nQuestion:\n{user['content']}"
    return msgs


def content_key(messages: list[dict]) -> str:
    """The dedup key: roles and contents with whitespace runs collapsed."""
    return "\x1e".join(m["role"] + "\x1f" + " ".join(m["content"].split()) for m in messages)
