#!/usr/bin/env python3
"""Deterministic generator for the tool-calling example data in examples/data/.

    python3 examples/data/make_tool_data.py

Writes tools_openai.jsonl (OpenAI chat fine-tuning layout) and tools_sharegpt.json (ShareGPT, as in
LLaMA-Factory's glaive tool-call demo) next to this script. Standard library only; all randomness
comes from one random.Random(4321), so every run writes byte-identical files. Everything is
fictional ("Northwind Labs" and its internal tools, as in make_sample_data.py).

The assistant calls one of five Northwind tools (leave balance, IT ticket, order status, meeting
room booking, currency conversion), reads the tool's answer and replies; some rows call two tools
at once, some answer without a tool, some carry an assistant draft with `weight: 0` (OpenAI layout).

Deliberately bad rows, with the reason a validator should give (positions are 1-based):

tools_openai.jsonl -- physical line (84 lines: 80 good + 4 bad)
    #11   tool_calls[0].arguments is not valid JSON           -> bad_tool_arguments
    #23   a call to "get_leave_balanse" (not in tools)        -> unknown_tool
    #37   a tool message before any assistant call            -> orphan_tool_result
    #52   a tools entry that is a number                      -> bad_tool_schema

tools_sharegpt.json -- element index in the JSON array (63 elements: 60 good + 3 bad)
    #8    function_call value is not valid JSON               -> bad_tool_arguments
    #19   a call to "book_room" (not in tools)                -> unknown_tool
    #44   an observation with no function_call before it      -> orphan_tool_result
"""
from __future__ import annotations

import json
import random
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parent
RNG = random.Random(4321)
N_OPENAI_GOOD = 80
N_SHAREGPT_GOOD = 60

NAMES = ["Avery", "Bram", "Celia", "Dario", "Elin", "Farid", "Greta", "Hugo", "Ines", "Jonah", "Kaia", "Luca"]
OFFICES = ["Ashford", "Brightwater", "Cedar Point", "Dunmore", "Eastvale"]
LEAVE_KINDS = ["annual", "sick", "volunteer"]
TICKET_CATEGORIES = ["vpn", "laptop", "password", "software"]
PROBLEMS = {
    "vpn": ["NorthGate VPN shows NG-503", "the VPN drops every few minutes", "NorthGate VPN will not connect"],
    "laptop": ["my laptop screen flickers", "my laptop battery drains in an hour", "my laptop keyboard is broken"],
    "password": ["I am locked out of People Hub", "my single sign-on password expired", "I cannot reset my mailbox password"],
    "software": ["I need a PDF editor installed", "the diagram tool will not start", "I need the Python runtime"],
}
CURRENCIES = ["USD", "EUR", "GBP", "JPY", "CHF"]
DAYS = ["2026-03-02", "2026-03-09", "2026-04-14", "2026-05-20", "2026-06-11", "2026-07-01"]

TOOLS = [
    {"type": "function", "function": {
        "name": "get_leave_balance",
        "description": "Days of leave an employee has left this year.",
        "parameters": {"type": "object", "properties": {
            "employee": {"type": "string"},
            "kind": {"type": "string", "enum": LEAVE_KINDS}},
            "required": ["employee", "kind"]}}},
    {"type": "function", "function": {
        "name": "create_it_ticket",
        "description": "Open a ticket with the IT helpdesk.",
        "parameters": {"type": "object", "properties": {
            "category": {"type": "string", "enum": TICKET_CATEGORIES},
            "summary": {"type": "string"},
            "urgent": {"type": "boolean"}},
            "required": ["category", "summary"]}}},
    {"type": "function", "function": {
        "name": "get_order_status",
        "description": "Where a Northwind Ledger hardware order is.",
        "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}}},
    {"type": "function", "function": {
        "name": "book_meeting_room",
        "description": "Book a meeting room in an office.",
        "parameters": {"type": "object", "properties": {
            "office": {"type": "string"},
            "date": {"type": "string"},
            "people": {"type": "integer"}},
            "required": ["office", "date", "people"]}}},
    {"type": "function", "function": {
        "name": "convert_currency",
        "description": "Convert an amount between currencies at today's rate.",
        "parameters": {"type": "object", "properties": {
            "amount": {"type": "number"}, "source": {"type": "string"}, "target": {"type": "string"}},
            "required": ["amount", "source", "target"]}}},
]
SYSTEM = "You are the Northwind Labs assistant."


def pick(seq):
    return RNG.choice(list(seq))


# Each intent returns (user text, [(tool name, arguments, tool result)], final reply).
def leave():
    who, kind = pick(NAMES), pick(LEAVE_KINDS)
    days = RNG.randint(0, 25)
    ask = pick([f"How many {kind} leave days does {who} have left?", f"Check {who}'s {kind} leave balance, please.",
                f"What is the {kind} leave balance for {who}?"])
    return ask, [("get_leave_balance", {"employee": who, "kind": kind}, {"employee": who, "kind": kind, "days_left": days})], \
        f"{who} has {days} {kind} leave days left this year."


def ticket():
    cat = pick(TICKET_CATEGORIES)
    problem = pick(PROBLEMS[cat])
    urgent = RNG.random() < 0.4
    args = {"category": cat, "summary": problem}
    if urgent:
        args["urgent"] = True
    ref = f"IT-{RNG.randint(1000, 9999)}"
    ask = pick([f"Please open a ticket: {problem}.", f"{problem}, can you log it with IT?" if not urgent else
                f"Urgent: {problem}. Please raise a ticket.", f"Raise an IT ticket because {problem}."])
    return ask, [("create_it_ticket", args, {"ticket": ref, "status": "open"})], \
        f"I opened ticket {ref} for you; IT will reply in {'an hour' if urgent else 'one working day'}."


def order():
    oid = f"NW-{RNG.randint(10000, 99999)}"
    state = pick(["shipped", "packed", "delivered", "waiting for stock"])
    ask = pick([f"Where is order {oid}?", f"What is the status of my order {oid}?", f"Has {oid} shipped yet?"])
    return ask, [("get_order_status", {"order_id": oid}, {"order_id": oid, "status": state})], f"Order {oid} is {state}."


def room():
    office, day, people = pick(OFFICES), pick(DAYS), RNG.randint(2, 12)
    ask = pick([f"Book a room in {office} on {day} for {people} people.",
                f"I need a meeting room at {office} for {people} on {day}."])
    name = pick(["Oak", "Birch", "Maple", "Cedar"])
    return ask, [("book_meeting_room", {"office": office, "date": day, "people": people}, {"room": name, "booked": True})], \
        f"Done: the {name} room in {office} is booked on {day} for {people} people."


def money():
    amount = RNG.choice([25, 40, 120, 300, 1250, 75.5])
    src, dst = RNG.sample(CURRENCIES, 2)
    rate = round(RNG.uniform(0.5, 1.6), 2)
    ask = pick([f"Convert {amount} {src} to {dst}.", f"How much is {amount} {src} in {dst}?"])
    value = round(amount * rate, 2)
    return ask, [("convert_currency", {"amount": amount, "source": src, "target": dst}, {"value": value, "currency": dst})], \
        f"{amount} {src} is about {value} {dst} at today's rate."


def two_calls():
    _, a_calls, _ = leave()
    _, b_calls, _ = order()
    (_, a, ra), (_, b, rb) = a_calls[0], b_calls[0]
    ask = f"{a['employee']}'s {a['kind']} leave balance, and the status of {b['order_id']}?"
    return ask, a_calls + b_calls, f"{ra['days_left']} days left; {b['order_id']} is {rb['status']}."


def no_tool():
    q, a = pick([
        ("What does the get_order_status tool need?", "It needs the order id, for example NW-12345."),
        ("Can you book rooms in other offices?", "Yes: I can book rooms in Ashford, Brightwater, Cedar Point, Dunmore and Eastvale."),
        ("Thanks, that is all.", "You are welcome. Have a good day!"),
        ("Which currencies can you convert?", "USD, EUR, GBP, JPY and CHF."),
    ])
    return q, [], a


INTENTS = [leave, ticket, order, room, money, leave, ticket, order, room, money, two_calls, no_tool]


def tools_for(calls) -> list[dict]:
    """Two tools, in a fixed order: the called ones, and others to choose from (rows stay under 512 tokens)."""
    names = {c[0] for c in calls}
    others = [t for t in TOOLS if t["function"]["name"] not in names]
    chosen = names | {t["function"]["name"] for t in RNG.sample(others, k=max(0, 2 - len(names)))}
    return [t for t in TOOLS if t["function"]["name"] in chosen]


def openai_row(k: int) -> dict:
    ask, calls, reply = INTENTS[k % len(INTENTS)]()
    # a system message on about half the rows; parallel-call rows are the longest and go without
    messages: list[dict] = [{"role": "system", "content": SYSTEM}] if RNG.random() < 0.5 and len(calls) < 2 else []
    messages.append({"role": "user", "content": ask})
    if calls:
        ids = [f"call_{k}_{i}" for i in range(len(calls))]
        lead = "Let me check." if RNG.random() < 0.25 else None
        messages.append({"role": "assistant", "content": lead, "tool_calls": [
            {"id": i, "type": "function", "function": {"name": n, "arguments": json.dumps(a)}}
            for i, (n, a, _) in zip(ids, calls)]})
        for i, (_, _, result) in zip(ids, calls):
            messages.append({"role": "tool", "tool_call_id": i, "content": json.dumps(result)})
    if k % 10 == 3 and len(calls) < 2:  # a draft the user rejected: context, not trained on
        messages.append({"role": "assistant", "content": "One moment.", "weight": 0})
        messages.append({"role": "user", "content": "Answer now."})
    messages.append({"role": "assistant", "content": reply})
    return {"tools": tools_for(calls), "messages": messages}


def sharegpt_row(k: int) -> dict:
    ask, calls, reply = INTENTS[(k + 5) % (len(INTENTS) - 1)]()  # every ShareGPT row calls a tool
    conv = [{"from": "human", "value": ask}]
    if calls:
        payload = [{"name": n, "arguments": a} for n, a, _ in calls]
        conv.append({"from": "function_call", "value": json.dumps(payload[0] if len(payload) == 1 else payload)})
        results = [r for _, _, r in calls]
        conv.append({"from": "observation", "value": json.dumps(results[0] if len(results) == 1 else results)})
    conv.append({"from": "gpt", "value": reply})
    # LLaMA-Factory keeps bare function schemas, as a JSON string
    return {"conversations": conv, "tools": json.dumps([t["function"] for t in tools_for(calls)])}


def place(good: list, specials: dict, total: int) -> list:
    out, it = [], iter(good)
    for pos in range(1, total + 1):
        out.append(specials[pos] if pos in specials else next(it))
    return out


def make_openai() -> list[dict]:
    good = [openai_row(k) for k in range(N_OPENAI_GOOD)]
    bad_args = openai_row(0)
    caller = next(m for m in bad_args["messages"] if m.get("tool_calls"))
    caller["tool_calls"][0]["function"]["arguments"] = '{"employee": "Avery", "kind": '
    unknown = openai_row(12)
    for m in unknown["messages"]:
        for c in m.get("tool_calls") or ():
            c["function"]["name"] = "get_leave_balanse"
    orphan = {"tools": TOOLS[:2], "messages": [{"role": "user", "content": "Any news?"},
                                               {"role": "tool", "content": '{"ticket": "IT-1234"}'},
                                               {"role": "assistant", "content": "Ticket IT-1234 is open."}]}
    bad_schema = openai_row(2)
    bad_schema["tools"] = [7] + bad_schema["tools"]
    return place(good, {11: bad_args, 23: unknown, 37: orphan, 52: bad_schema}, N_OPENAI_GOOD + 4)


def make_sharegpt() -> list[dict]:
    good = [sharegpt_row(k) for k in range(N_SHAREGPT_GOOD)]
    bad_json = sharegpt_row(1)
    bad_json["conversations"][1]["value"] = "{'name': 'get_order_status', 'arguments': {'order_id': 'NW-1'}}"
    unknown = sharegpt_row(3)
    call = json.loads(unknown["conversations"][1]["value"])
    call["name"] = "book_room"
    unknown["conversations"][1]["value"] = json.dumps(call)
    orphan = {"conversations": [{"from": "human", "value": "Status?"}, {"from": "observation", "value": '{"status": "shipped"}'},
                                {"from": "gpt", "value": "It shipped."}], "tools": json.dumps([TOOLS[2]["function"]])}
    return place(good, {8: bad_json, 19: unknown, 44: orphan}, N_SHAREGPT_GOOD + 3)


def main() -> None:
    rows = make_openai()
    with open(OUT_DIR / "tools_openai.jsonl", "w", encoding="ascii", newline="\n") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    share = make_sharegpt()
    with open(OUT_DIR / "tools_sharegpt.json", "w", encoding="ascii", newline="\n") as f:
        json.dump(share, f, indent=1)
        f.write("\n")
    print(f"tools_openai.jsonl: {len(rows)} lines ({N_OPENAI_GOOD} good)")
    print(f"tools_sharegpt.json: {len(share)} elements ({N_SHAREGPT_GOOD} good)")


if __name__ == "__main__":
    main()
