"""Every row layout we accept, normalised to one canonical conversation: a list of messages.

Roles are system, user, assistant and tool. A conversation is: an optional system message, then user
and assistant turns alternating, starting with user and ending with assistant; an assistant message
that calls tools is followed by one tool message per call (its result), then the assistant again.
Anything else is rejected with one of REJECT_REASONS and a detail that says what was wrong.

The canonical messages (what the pipeline stores and renders):

    {"role": "system" | "user", "content": str}
    {"role": "assistant", "content": str,                      # "" when the message only calls tools
     "tool_calls": [{"type": "function", "function": {"name": str, "arguments": dict}}, ...],   # optional
     "weight": 0}                                              # optional: context, not trained on
    {"role": "tool", "content": str, "tool_call_id": str, "name": str}   # id and name when known

and, beside them, the row's tools: [{"type": "function", "function": {"name", "description", "parameters"}}].
Tool-call arguments are parsed JSON objects (OpenAI sends them as a JSON string; chat templates want
the object), and every call names a function the row's tools declare.
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
    "unknown_role": "a role that is not system, user, assistant or tool",
    "bad_tool_schema": "a `tools` entry that is not a JSON object describing a function (name, parameters)",
    "bad_tool_arguments": "a tool call whose arguments are not a JSON object (or a JSON string of one)",
    "unknown_tool": "a tool call to a function that the row's `tools` do not declare",
    "orphan_tool_result": "a tool (or observation) message that answers no pending tool call",
    "bad_weight": "a message `weight` that is not 0 or 1, or a weight on a message that is not the assistant's",
    "no_assistant_turn": "no assistant message to learn from",
    "wrong_turn_order": "system not first, user/assistant not alternating, a tool call left unanswered, or not ending with assistant",
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
# Tool results (OpenAI `tool`, its older `function`, ShareGPT `observation`) and ShareGPT's assistant tool calls.
_RESULT_ROLES = {"tool", "function", "observation", "ipython", "tool_response"}
_CALL_ROLES = {"function_call", "tool_call"}


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
    "openai": ("messages", "tools"),
    "sharegpt": ("conversations", "system", "tools"),
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
    """One record -> a validated conversation (its messages). Raises Reject."""
    return read_conversation(record, schema, system_prompt)[0]


def read_conversation(record: dict, schema: str, system_prompt: Optional[str] = None) -> tuple[list[dict], list[dict]]:
    """One record -> (messages, tools), validated. Raises Reject. `tools` is [] for a row without tools."""
    tools: list[dict] = []
    if schema == "openai":
        tools = _tools_of(record)
        messages = _from_openai(record)
    elif schema == "sharegpt":
        tools = _tools_of(record)
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
    validate(messages, tools)
    return messages, tools


def validate(messages: list[dict], tools: Optional[list[dict]] = None) -> None:
    if not messages:
        raise Reject("no_assistant_turn", "the conversation has no messages")
    for i, m in enumerate(messages):
        if not isinstance(m["content"], str):
            raise Reject("wrong_type", f"message {i} content is a {type(m['content']).__name__}, not text")
        if not m["content"].strip() and not m.get("tool_calls"):
            raise Reject("empty_content", f"message {i} ({m['role']}) is empty")
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError:  # JSON can escape a lone surrogate (\ud800); it is not text
            raise Reject("undecodable_text", f"message {i} ({m['role']}) holds a lone surrogate, which is not text") from None
    if not any(m["role"] == "assistant" for m in messages):
        raise Reject("no_assistant_turn", "no message has the assistant role")
    if not any(m["role"] == "assistant" and m.get("weight", 1) for m in messages):
        raise Reject("no_assistant_turn", "every assistant message has weight 0, so there is nothing to learn")
    roles = [m["role"] for m in messages]
    offset = 1 if roles[0] == "system" else 0
    declared = {t["function"]["name"] for t in tools or ()}
    pending: list[dict] = []  # calls of the last assistant message not answered yet
    expected = "user"
    for pos in range(offset, len(messages)):
        m, r = messages[pos], roles[pos]
        if r == "system":
            raise Reject("wrong_turn_order", f"a system message at position {pos}; only the first message may be system")
        if r == "tool":
            _answer(m, pending, pos)
            expected = "tool or assistant" if pending else "assistant"
            continue
        if pending:
            names = ", ".join(c["function"]["name"] for c in pending)
            raise Reject("wrong_turn_order", f"message {pos} is {r} but the tool call(s) of an earlier assistant message "
                         f"({names}) have no tool message with their result; give one tool message per call")
        if r not in expected.split(" or "):
            raise Reject("wrong_turn_order", f"message {pos} is {r} but {expected} was expected (turns: {'/'.join(roles)})")
        if r == "assistant":
            for k, call in enumerate(m.get("tool_calls") or ()):
                name = call["function"]["name"]
                if name not in declared:
                    known = ", ".join(sorted(declared)) or "none: the row has no `tools`"
                    raise Reject("unknown_tool", f"message {pos} tool_calls[{k}] calls {name!r}, which the row's tools do not "
                                 f"declare (declared: {known}); add its schema to `tools` or fix the name")
            pending = [dict(c) for c in m.get("tool_calls") or ()]
            expected = "tool" if pending else "user"
        else:
            expected = "assistant"
    if roles[-1] != "assistant":
        raise Reject("wrong_turn_order", f"the conversation ends with {roles[-1]}, not assistant")


def _answer(message: dict, pending: list[dict], pos: int) -> None:
    """Match a tool message to the pending call it answers (by id when both have one, else in order)."""
    if not pending:
        raise Reject("orphan_tool_result", f"message {pos} is a tool result, but no assistant tool call is waiting for one "
                     "(a tool message must follow the assistant message that made the call)")
    want = message.get("tool_call_id")
    if want:
        for k, call in enumerate(pending):
            if call.get("id") == want:
                del pending[k]
                return
        if any(c.get("id") for c in pending):
            ids = ", ".join(repr(c["id"]) for c in pending if c.get("id"))
            raise Reject("orphan_tool_result", f"message {pos} answers tool_call_id {want!r}, but the pending calls are {ids}")
    del pending[0]


def _tools_of(rec: dict) -> list[dict]:
    """The row's `tools` (OpenAI's list of {type: function, function: {...}}, or LLaMA-Factory's list of bare
    function schemas, either as a list or as a JSON string), as OpenAI function tools."""
    raw = rec.get("tools")
    if raw is None or (isinstance(raw, str) and not raw.strip()) or raw == []:
        return []
    raw = _maybe_json(raw, "tools")
    if isinstance(raw, dict):  # a single schema
        raw = [raw]
    if not isinstance(raw, list):
        raise Reject("bad_tool_schema", f"tools is a {type(raw).__name__}; expected a list of function schemas")
    out, seen = [], set()
    for i, t in enumerate(raw):
        t = _maybe_json(t, f"tools[{i}]") if isinstance(t, str) else t
        if not isinstance(t, dict):
            raise Reject("bad_tool_schema", f"tools[{i}] is a {type(t).__name__}, not a JSON object describing a function")
        fn = t.get("function") if t.get("type", "function") == "function" and isinstance(t.get("function"), dict) else t
        if t.get("type") not in (None, "function"):
            raise Reject("bad_tool_schema", f"tools[{i}].type is {t.get('type')!r}; only function tools are supported")
        name = fn.get("name")
        if not isinstance(name, str) or not name.strip():
            raise Reject("bad_tool_schema", f"tools[{i}] has no function name (got {name!r}); each tool needs a `name`")
        params = _maybe_json(fn.get("parameters"), f"tools[{i}].parameters") if fn.get("parameters") is not None else {}
        if not isinstance(params, dict):
            raise Reject("bad_tool_schema", f"tools[{i}].parameters is a {type(params).__name__}; expected a JSON schema object")
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise Reject("bad_tool_schema", f"tools[{i}].description is a {type(desc).__name__}, not text")
        if name in seen:
            raise Reject("bad_tool_schema", f"tools[{i}] declares {name!r} a second time")
        seen.add(name)
        out.append({"type": "function", "function": {"name": name, "description": desc or "", "parameters": params}})
    return out


def _arguments(value: Any, field: str) -> dict:
    if value is None:
        return {}
    if isinstance(value, str):
        if not value.strip():
            return {}
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise Reject("bad_tool_arguments", f"{field} is not valid JSON ({e.msg} at column {e.colno}): {value[:80]!r}") from None
    if not isinstance(value, dict):
        raise Reject("bad_tool_arguments", f"{field} is a JSON {type(value).__name__}; tool arguments must be a JSON object")
    return value


def _call(value: Any, field: str, call_id: Any = None) -> dict:
    """One tool call, from OpenAI's {id, type, function: {name, arguments}} or a bare {name, arguments}."""
    if not isinstance(value, dict):
        raise Reject("wrong_type", f"{field} is a {type(value).__name__}, not an object with a function name and arguments")
    fn = value.get("function") if isinstance(value.get("function"), dict) else value
    name = fn.get("name")
    if not isinstance(name, str) or not name.strip():
        raise Reject("missing_field", f"{field} has no function name (got {name!r})")
    call = {"type": "function", "function": {"name": name, "arguments": _arguments(fn.get("arguments"), f"{field}.arguments")}}
    cid = value.get("id", call_id)
    if isinstance(cid, str) and cid:
        call["id"] = cid
    return call


def _weight(m: dict, role: str, field: str) -> Optional[int]:
    if "weight" not in m or m["weight"] is None:
        return None
    w = m["weight"]
    if isinstance(w, bool) or w not in (0, 1):
        raise Reject("bad_weight", f"{field} is {w!r}; OpenAI's format allows 0 (context, not trained on) or 1")
    if role != "assistant":
        raise Reject("bad_weight", f"{field} is set on a {role} message; only assistant messages carry a weight")
    return int(w)


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
    """Our role for an OpenAI role or ShareGPT speaker; ShareGPT's `function_call` is "call" (an assistant turn
    that calls tools) and every tool-result name is "tool"."""
    if not isinstance(value, str):
        raise Reject("wrong_type" if value is not None else "missing_field", f"{field} is {value!r}, not a role name")
    key = value.strip().lower()
    if key in _RESULT_ROLES:
        return "tool"
    if key in _CALL_ROLES:
        return "call"
    if key not in _ROLE_ALIASES:
        raise Reject("unknown_role", f"{field} is {value!r}; expected system, user, assistant or tool "
                     "(ShareGPT: human, gpt, function_call, observation)")
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
        field = f"messages[{i}]"
        role = _role(m.get("role"), f"{field}.role")
        if role == "call":
            role = "assistant"
        weight = _weight(m, role, f"{field}.weight")
        calls = m.get("tool_calls")
        if m.get("function_call") is not None and not calls:  # OpenAI's older single-call field
            calls = [m["function_call"]]
        if calls is not None and role != "assistant":
            raise Reject("wrong_type", f"{field} is a {role} message with tool_calls; only assistant messages call tools")
        if calls is not None and not isinstance(calls, list):
            raise Reject("wrong_type", f"{field}.tool_calls is a {type(calls).__name__}, not a list")
        content = m.get("content")
        if calls:
            msg = {"role": role, "content": "" if content is None else _text_of(content, f"{field}.content"),
                   "tool_calls": [_call(c, f"{field}.tool_calls[{k}]") for k, c in enumerate(calls)]}
        else:
            msg = {"role": role, "content": _text_of(content, f"{field}.content")}
        if role == "tool":
            for key in ("tool_call_id", "name"):
                if isinstance(m.get(key), str) and m[key]:
                    msg[key] = m[key]
        if weight == 0:
            msg["weight"] = 0
        out.append(msg)
    return out


def _from_sharegpt(rec: dict) -> list[dict]:
    conv = _turn_list(rec, "conversations")
    out: list[dict] = []
    system = rec.get("system")
    if isinstance(system, str) and system.strip():
        out.append({"role": "system", "content": system})
    for i, m in enumerate(conv):
        field = f"conversations[{i}]"
        role = _role(m.get("from", m.get("role")), f"{field}.from")
        value = m.get("value", m.get("content"))
        if role == "tool":
            out.extend(_observations(_text_of(value, f"{field}.value"), out, conv, i))
            continue
        if role != "call":
            out.append({"role": role, "content": _text_of(value, f"{field}.value")})
            continue
        # LLaMA-Factory: the value is one call {"name", "arguments"} or a list of them, as JSON text.
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise Reject("bad_tool_arguments", f"{field}.value is not valid JSON ({e.msg} at column {e.colno}); a "
                             'function_call turn holds {"name": ..., "arguments": {...}}') from None
        items = value if isinstance(value, list) else [value]
        if not items:
            raise Reject("missing_field", f"{field}.value is an empty list of calls")
        calls = [_call(c, f"{field}.value" + (f"[{k}]" if isinstance(value, list) else "")) for k, c in enumerate(items)]
        if out and out[-1]["role"] == "assistant" and not out[-1].get("tool_calls"):
            out[-1] = {**out[-1], "tool_calls": calls}  # a gpt turn's text, then its calls, is one assistant message
        else:
            out.append({"role": "assistant", "content": "", "tool_calls": calls})
    return out


def _observations(text: str, out: list[dict], conv: list, i: int) -> list[dict]:
    """ShareGPT tool results. After a function_call turn of N parallel calls, one observation holding a JSON list
    of N results answers each call in order (LLaMA-Factory's layout); otherwise an observation is one result."""
    calls = out[-1].get("tool_calls") if out and out[-1]["role"] == "assistant" else None
    following = conv[i + 1] if i + 1 < len(conv) else None
    alone = not (isinstance(following, dict) and
                 str(following.get("from", following.get("role", ""))).strip().lower() in _RESULT_ROLES)
    if calls and len(calls) > 1 and alone:
        try:
            parts = json.loads(text)
        except json.JSONDecodeError:
            parts = None
        if isinstance(parts, list) and len(parts) == len(calls):
            return [{"role": "tool", "content": json.dumps(p, ensure_ascii=False), "name": c["function"]["name"]}
                    for p, c in zip(parts, calls)]
    return [{"role": "tool", "content": text}]


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


def content_key(messages: list[dict], tools: Optional[list[dict]] = None) -> str:
    """The dedup key: roles and contents with whitespace runs collapsed, tool calls, weights and tools."""
    parts = []
    for m in messages:
        part = m["role"] + "\x1f" + " ".join(m["content"].split())
        if m.get("tool_calls"):
            part += "\x1f" + json.dumps([c["function"] for c in m["tool_calls"]], sort_keys=True, ensure_ascii=False)
        if m.get("weight") == 0:
            part += "\x1fw0"
        parts.append(part)
    if tools:
        parts.append("tools\x1f" + json.dumps(tools, sort_keys=True, ensure_ascii=False))
    return "\x1e".join(parts)
