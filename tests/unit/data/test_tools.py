"""Tool-calling rows: both layouts normalise to the same canonical conversation, and the rendered ids and masks train
the assistant's text and calls, never the tool list, the system text, the user or the tool results."""
import json

import pytest

from rayft.data.chat import (
    DEFAULT_CHAT_TEMPLATE,
    IM_END,
    fit_conversation,
    render_conversation,
    render_prompt,
    render_segments,
)
from rayft.data.redact import redact_messages
from rayft.data.schemas import content_key, read_conversation

WEATHER = {"name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TICKET = {"name": "create_ticket", "description": "Open an IT ticket",
          "parameters": {"type": "object", "properties": {"summary": {"type": "string"}}, "required": ["summary"]}}

OPENAI_ROW = {
    "tools": [{"type": "function", "function": WEATHER}, {"type": "function", "function": TICKET}],
    "messages": [
        {"role": "system", "content": "You are the Northwind assistant."},
        {"role": "user", "content": "Weather in Oslo and Rome? And my VPN is down."},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
            {"id": "call_b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
            {"id": "call_c", "type": "function", "function": {"name": "create_ticket", "arguments": {"summary": "VPN down"}}},
        ]},
        {"role": "tool", "tool_call_id": "call_b", "content": '{"temp_c": 21}'},  # answers out of order, by id
        {"role": "tool", "tool_call_id": "call_a", "content": '{"temp_c": 3}'},
        {"role": "tool", "tool_call_id": "call_c", "content": '{"ticket": "IT-7"}'},
        {"role": "assistant", "content": "Oslo 3C, Rome 21C.", "weight": 0},
        {"role": "user", "content": "And the ticket?"},
        {"role": "assistant", "content": "Ticket IT-7 is open for the VPN."},
    ],
}

SHAREGPT_ROW = {  # LLaMA-Factory's glaive tool-call demo layout
    "conversations": [
        {"from": "human", "value": "Weather in Oslo?"},
        {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Oslo"}}'},
        {"from": "observation", "value": '{"temp_c": 3}'},
        {"from": "gpt", "value": "It is 3C in Oslo."},
    ],
    "tools": json.dumps([WEATHER]),
}


def trained_text(tok, ids, mask) -> list[str]:
    """The decoded runs of trained tokens, in order."""
    runs, cur = [], []
    for t, m in zip(ids, mask):
        if m:
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur)), cur.clear()
    if cur:
        runs.append(tok.decode(cur))
    return runs


def test_openai_row_normalises_to_canonical_messages():
    messages, tools = read_conversation(OPENAI_ROW, "openai")
    assert [t["function"]["name"] for t in tools] == ["get_weather", "create_ticket"]
    call = messages[2]
    assert call["role"] == "assistant" and call["content"] == ""
    assert [c["function"] for c in call["tool_calls"]] == [
        {"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "get_weather", "arguments": {"city": "Rome"}},
        {"name": "create_ticket", "arguments": {"summary": "VPN down"}}]
    assert [m.get("tool_call_id") for m in messages[3:6]] == ["call_b", "call_a", "call_c"]
    assert messages[6]["weight"] == 0 and "weight" not in messages[-1]


def test_sharegpt_row_normalises_like_the_openai_layout():
    messages, tools = read_conversation(SHAREGPT_ROW, "sharegpt")
    assert tools == [{"type": "function", "function": WEATHER}]
    assert messages == [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": '{"temp_c": 3}'},
        {"role": "assistant", "content": "It is 3C in Oslo."},
    ]


def test_sharegpt_parallel_calls_with_one_observation_list_answer_each_call():
    row = {"tools": [WEATHER], "conversations": [
        {"from": "human", "value": "Oslo and Rome?"},
        {"from": "function_call", "value": json.dumps([{"name": "get_weather", "arguments": {"city": "Oslo"}},
                                                      {"name": "get_weather", "arguments": {"city": "Rome"}}])},
        {"from": "observation", "value": json.dumps([{"temp_c": 3}, {"temp_c": 21}])},
        {"from": "gpt", "value": "3C and 21C."}]}
    messages, _ = read_conversation(row, "sharegpt")
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool", "assistant"]
    assert [m["content"] for m in messages[2:4]] == ['{"temp_c": 3}', '{"temp_c": 21}']


@pytest.mark.parametrize("layout", ["csv", "parquet"])
def test_tool_columns_as_json_strings_in_csv_and_parquet_cells(layout):
    """CSV cells and string Parquet columns carry messages and tools as JSON text; they read the same."""
    row = {"tools": json.dumps(OPENAI_ROW["tools"]), "messages": json.dumps(OPENAI_ROW["messages"])}
    assert read_conversation(row, "openai") == read_conversation(OPENAI_ROW, "openai")
    share = {"conversations": json.dumps(SHAREGPT_ROW["conversations"]), "tools": SHAREGPT_ROW["tools"]}
    assert read_conversation(share, "sharegpt") == read_conversation(SHAREGPT_ROW, "sharegpt")


def test_the_default_jinja_template_renders_exactly_the_python_layout(tiny_tokenizer):
    assert tiny_tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    for row, schema in ((OPENAI_ROW, "openai"), (SHAREGPT_ROW, "sharegpt")):
        messages, tools = read_conversation(row, schema)
        python = "".join(t for t, _ in render_segments(messages, None, None, tools))
        jinja = tiny_tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
        assert python == jinja
        for cut in range(1, len(messages)):
            assert render_prompt(messages[:cut], tiny_tokenizer, tools=tools) == tiny_tokenizer.apply_chat_template(
                messages[:cut], tools=tools, tokenize=False, add_generation_prompt=True)
    # what a server receives: arguments as a JSON string, tools with a null description
    request = [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}]
    text = tiny_tokenizer.apply_chat_template(request, tools=[{"type": "function", "function": {
        **WEATHER, "description": None}}], tokenize=False)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>' in text
    assert '"description": ""' in text


def test_openai_mask_trains_calls_and_replies_only(tiny_tokenizer):
    messages, tools = read_conversation(OPENAI_ROW, "openai")
    ids, mask = render_conversation(messages, tiny_tokenizer, tools=tools)
    assert len(ids) == len(mask) and set(mask) == {0, 1}
    runs = trained_text(tiny_tokenizer, ids, mask)
    assert runs == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "create_ticket", "arguments": {"summary": "VPN down"}}\n</tool_call>' + IM_END + "\n",
        "Ticket IT-7 is open for the VPN." + IM_END + "\n",
    ]
    untrained = tiny_tokenizer.decode([t for t, m in zip(ids, mask) if not m])
    for text in ("<tools>", '"description": "Current weather in a city"', "You are the Northwind assistant.",
                 '{"temp_c": 21}', "<tool_response>", "Oslo 3C, Rome 21C.", "And the ticket?"):
        assert text in untrained  # tool list, system, tool results, the weight-0 draft and the user: context only
    assert tiny_tokenizer.convert_tokens_to_ids("<tool_call>") in ids  # one token, not split


def test_sharegpt_mask(tiny_tokenizer):
    messages, tools = read_conversation(SHAREGPT_ROW, "sharegpt")
    ids, mask = render_conversation(messages, tiny_tokenizer, tools=tools)
    assert trained_text(tiny_tokenizer, ids, mask) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' + IM_END + "\n",
        "It is 3C in Oslo." + IM_END + "\n"]


# A template with its own tool support (in the manner of Llama 3.1 / Qwen2.5 templates), not rayft's default.
OWN_TEMPLATE = (
    "{% if tools %}{{ '[TOOLS]' + (tools | map(attribute='function') | map(attribute='name') | join(',')) + '[/TOOLS]' }}{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'assistant' %}{{ '[A]' + (m.content or '') }}"
    "{% for c in m.tool_calls or [] %}{{ '[CALL]' + c.function.name + ' ' + (c.function.arguments | tojson) }}{% endfor %}"
    "{{ '[/A]' }}"
    "{% elif m.role == 'tool' %}{{ '[RESULT]' + m.content + '[/RESULT]' }}"
    "{% else %}{{ '[' + m.role + ']' + m.content }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '[A]' }}{% endif %}"
)


def test_a_tokenizers_own_template_gets_tools_and_the_same_masking(tiny_tokenizer):
    messages, tools = read_conversation(OPENAI_ROW, "openai")
    segs = render_segments(messages, tiny_tokenizer, OWN_TEMPLATE, tools)
    trained = [t for t, tr in segs if tr]
    assert trained == ['[CALL]get_weather {"city": "Oslo"}[CALL]get_weather {"city": "Rome"}'
                       '[CALL]create_ticket {"summary": "VPN down"}[/A]', "Ticket IT-7 is open for the VPN.[/A]"]
    assert segs[0][0].startswith("[TOOLS]get_weather,create_ticket[/TOOLS]") and not segs[0][1]
    assert not any("[RESULT]" in t for t in trained)


def test_drop_oldest_turns_drops_a_call_with_its_results(tiny_tokenizer):
    messages, tools = read_conversation(OPENAI_ROW, "openai")
    ids, _ = render_conversation(messages, tiny_tokenizer, tools=tools)
    ids2, mask2, cut, why = fit_conversation(messages, tiny_tokenizer, len(ids) - 1, "drop_oldest_turns", tools=tools)
    assert cut and not why
    kept = tiny_tokenizer.decode(ids2)
    assert "<tool_response>" not in kept and '"arguments": {"city"' not in kept  # the whole exchange left together
    assert "<tools>" in kept and "Weather in Oslo" not in kept
    assert trained_text(tiny_tokenizer, ids2, mask2) == ["Ticket IT-7 is open for the VPN." + IM_END + "\n"]


def test_redaction_reaches_tool_call_arguments():
    row = {"tools": [TICKET], "conversations": [
        {"from": "human", "value": "Open a ticket"},
        {"from": "function_call", "value": json.dumps({"name": "create_ticket", "arguments": {"summary": "mail jane.doe@example.com"}})},
        {"from": "observation", "value": "ok"}, {"from": "gpt", "value": "Done."}]}
    messages, _ = read_conversation(row, "sharegpt")
    red, counts = redact_messages(messages)
    assert red[1]["tool_calls"][0]["function"]["arguments"] == {"summary": "mail [EMAIL]"}
    assert counts["email"] == 1


def test_dedup_key_tells_calls_weights_and_tools_apart():
    messages, tools = read_conversation(OPENAI_ROW, "openai")
    key = content_key(messages, tools)
    other_args = json.loads(json.dumps(messages))
    other_args[2]["tool_calls"][0]["function"]["arguments"] = {"city": "Bergen"}
    trained_draft = [dict(m) for m in messages]
    trained_draft[6].pop("weight")
    assert len({key, content_key(other_args, tools), content_key(trained_draft, tools), content_key(messages, tools[:1])}) == 4
