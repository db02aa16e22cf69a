"""Test setup for tool calling: a synthetic tool-calling dataset and the checks a well-formed call must pass.

Three fictional Northwind tools (as in examples/data/make_tool_data.py, whose words the tiny model's tokenizer was
trained on). Each conversation is a user question answered by one assistant tool call; every row declares the same
three tools, so the model learns to pick one by the question and to fill the schema's required fields. Held-out
prompts come from another seed and never repeat a training question.
"""
from __future__ import annotations

import json
import random
from typing import Optional

NAMES = ["Avery", "Bram", "Celia", "Dario", "Elin", "Farid", "Greta", "Hugo", "Ines", "Jonah", "Kaia", "Luca"]
KINDS = ["annual", "sick", "volunteer"]
OFFICES = ["Ashford", "Brightwater", "Dunmore", "Eastvale"]
DAYS = ["2026-03-02", "2026-03-09", "2026-04-14", "2026-05-20", "2026-06-11", "2026-07-01"]
TOOLS = [
    {"type": "function", "function": {
        "name": "get_leave_balance", "description": "Days of leave left.",
        "parameters": {"type": "object", "properties": {"employee": {"type": "string"},
                                                        "kind": {"type": "string", "enum": KINDS}},
                       "required": ["employee", "kind"]}}},
    {"type": "function", "function": {
        "name": "get_order_status", "description": "Where an order is.",
        "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}}},
    {"type": "function", "function": {
        "name": "book_meeting_room", "description": "Book a meeting room.",
        "parameters": {"type": "object", "properties": {"office": {"type": "string"}, "date": {"type": "string"},
                                                        "people": {"type": "integer"}},
                       "required": ["office", "date", "people"]}}},
]


def _ask(rng: random.Random, k: int) -> tuple[str, str, dict]:
    """(question, function, arguments) of intent k % 3."""
    if k % 3 == 0:
        who, kind = rng.choice(NAMES), rng.choice(KINDS)
        ask = rng.choice([f"How many {kind} leave days does {who} have left?",
                          f"Check {who}'s {kind} leave balance, please.", f"What is the {kind} leave balance for {who}?"])
        return ask, "get_leave_balance", {"employee": who, "kind": kind}
    if k % 3 == 1:
        oid = f"NW-{rng.randint(10000, 99999)}"
        ask = rng.choice([f"Where is order {oid}?", f"What is the status of my order {oid}?", f"Has {oid} shipped yet?"])
        return ask, "get_order_status", {"order_id": oid}
    office, day, people = rng.choice(OFFICES), rng.choice(DAYS), rng.randint(2, 12)
    ask = rng.choice([f"Book a room in {office} on {day} for {people} people.",
                      f"I need a meeting room at {office} for {people} on {day}."])
    return ask, "book_meeting_room", {"office": office, "date": day, "people": people}


def tool_rows(n: int, seed: int = 0) -> list[dict]:
    """n conversations in OpenAI's fine-tuning layout: tools, a user question, the assistant's call."""
    rng = random.Random(seed)
    rows, seen = [], set()
    k = 0
    while len(rows) < n:
        ask, name, args = _ask(rng, k)
        k += 1
        if ask in seen:  # a repeat would be dropped as a duplicate by the data stage
            continue
        seen.add(ask)
        rows.append({"tools": TOOLS, "messages": [
            {"role": "user", "content": ask},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": f"call_{k}", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}]},
        ]})
    return rows


def held_out_questions(n: int, train_rows: list[dict], seed: int = 12345) -> list[tuple[str, str]]:
    """n (question, expected function) pairs, none of them a training question, the three intents in turn."""
    seen = {r["messages"][0]["content"] for r in train_rows}
    rng = random.Random(seed)
    out: list[tuple[str, str]] = []
    k = 0
    while len(out) < n:
        ask, name, _ = _ask(rng, k)
        k += 1
        if ask not in seen:
            out.append((ask, name))
    return out


def call_problem(name: Optional[str], arguments: Optional[str], tools: list[dict] = TOOLS) -> Optional[str]:
    """Why a call is not well-formed (None when it is): a declared function, arguments a JSON object holding the
    schema's required fields."""
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    if name not in schemas:
        return f"function {name!r} is not declared ({', '.join(schemas)})"
    try:
        args = json.loads(arguments or "")
    except ValueError as e:
        return f"arguments {arguments!r} are not JSON ({e})"
    if not isinstance(args, dict):
        return f"arguments {arguments!r} are not a JSON object"
    missing = [k for k in schemas[name].get("required", []) if k not in args]
    return f"arguments {arguments!r} lack required {missing}" if missing else None
