"""Every accepted row layout normalises to the canonical conversation; every bad one is rejected with a reason."""
import json
import re

import pytest

from rayft.data.schemas import (
    REJECT_REASONS,
    SCHEMAS,
    Reject,
    apply_column_map,
    content_key,
    detect_schema,
    normalise,
)


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


def S(text):
    return {"role": "system", "content": text}


def H(text):
    return {"from": "human", "value": text}


def G(text):
    return {"from": "gpt", "value": text}


TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                        "required": ["city"]}}}


def CALL(name, arguments, call_id=None):
    call = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if call_id:
        call["id"] = call_id
    return {"role": "assistant", "content": None, "tool_calls": [call]}


def R(text, call_id=None):
    return {"role": "tool", "content": text, **({"tool_call_id": call_id} if call_id else {})}


# ------------------------------------------------------------------------------------------ alpaca


def test_alpaca_instruction_and_output():
    rec = {"instruction": "Summarise the leave policy.", "output": "25 days a year."}
    assert normalise(rec, "alpaca") == [U("Summarise the leave policy."), A("25 days a year.")]


def test_alpaca_input_is_appended_to_the_instruction():
    rec = {"instruction": "Rewrite as a reply to Rosa.", "input": "Note: training is mandatory.", "output": "Hi Rosa, ..."}
    assert normalise(rec, "alpaca") == [
        U("Rewrite as a reply to Rosa.\n\nNote: training is mandatory."),
        A("Hi Rosa, ..."),
    ]


@pytest.mark.parametrize("blank", ["", "   ", None])
def test_alpaca_blank_input_is_ignored(blank):
    rec = {"instruction": "Describe day one.", "input": blank, "output": "Badge and laptop."}
    assert normalise(rec, "alpaca") == [U("Describe day one."), A("Badge and laptop.")]


def test_alpaca_system_becomes_the_first_message():
    rec = {"instruction": "Q?", "input": "", "output": "A.", "system": "You are the KB."}
    assert normalise(rec, "alpaca") == [S("You are the KB."), U("Q?"), A("A.")]


def test_alpaca_history_pairs_come_before_the_instruction():
    rec = {
        "instruction": "And for contractors?",
        "output": "Contractors get 10 days.",
        "history": [["How much leave do staff get?", "25 days."], ["Does it roll over?", "Up to 5 days."]],
        "system": "Be brief.",
    }
    assert normalise(rec, "alpaca") == [
        S("Be brief."),
        U("How much leave do staff get?"),
        A("25 days."),
        U("Does it roll over?"),
        A("Up to 5 days."),
        U("And for contractors?"),
        A("Contractors get 10 days."),
    ]


def test_alpaca_history_as_json_text_is_parsed():
    rec = {"instruction": "i2", "output": "o2", "history": json.dumps([["i1", "o1"]])}
    assert normalise(rec, "alpaca") == [U("i1"), A("o1"), U("i2"), A("o2")]


@pytest.mark.parametrize("empty", [None, "", []])
def test_alpaca_empty_history_is_ignored(empty):
    rec = {"instruction": "i", "output": "o", "history": empty}
    assert normalise(rec, "alpaca") == [U("i"), A("o")]


def test_alpaca_numbers_are_text():
    assert normalise({"instruction": "2+2?", "output": 4}, "alpaca") == [U("2+2?"), A("4")]


# ---------------------------------------------------------------------------------------- sharegpt


def test_sharegpt_from_value():
    rec = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}
    assert normalise(rec, "sharegpt") == [U("Hi"), A("Hello!")]


@pytest.mark.parametrize(
    "speaker, role",
    [
        ("human", "user"), ("user", "user"), ("Human", "user"), (" USER ", "user"),
        ("gpt", "assistant"), ("assistant", "assistant"), ("chatgpt", "assistant"),
        ("model", "assistant"), ("bot", "assistant"), ("GPT", "assistant"),
        ("system", "system"), ("developer", "system"),
    ],
)
def test_sharegpt_speaker_aliases(speaker, role):
    turns = {"user": [{"from": speaker, "value": "x"}, {"from": "gpt", "value": "y"}],
             "assistant": [{"from": "human", "value": "x"}, {"from": speaker, "value": "y"}],
             "system": [{"from": speaker, "value": "s"}, {"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]}[role]
    out = normalise({"conversations": turns}, "sharegpt")
    assert [m["role"] for m in out] == (["system", "user", "assistant"] if role == "system" else ["user", "assistant"])
    position = {"user": 0, "assistant": 1, "system": 0}[role]
    assert out[position]["role"] == role


def test_sharegpt_role_and_content_keys_are_accepted():
    rec = {"conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    assert normalise(rec, "sharegpt") == [U("Hi"), A("Hello")]


def test_sharegpt_system_field_is_prepended():
    rec = {"system": "You are helpful.", "conversations": [
        {"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
        {"from": "human", "value": "c"}, {"from": "gpt", "value": "d"}]}
    assert normalise(rec, "sharegpt") == [S("You are helpful."), U("a"), A("b"), U("c"), A("d")]


def test_sharegpt_blank_system_field_is_ignored():
    rec = {"system": "  ", "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}
    assert normalise(rec, "sharegpt") == [U("a"), A("b")]


def test_sharegpt_conversations_as_json_text():
    conv = [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]
    assert normalise({"conversations": json.dumps(conv)}, "sharegpt") == [U("a"), A("b")]


# ------------------------------------------------------------------------------------------ openai


def test_openai_messages():
    msgs = [S("sys"), U("q1"), A("a1"), U("q2"), A("a2")]
    assert normalise({"messages": msgs}, "openai") == msgs


def test_openai_messages_as_json_string_like_a_csv_cell():
    msgs = [U("Wie geht's? ünïcödé ✓"), A("Gut, danke! 你好")]
    cell = json.dumps(msgs, ensure_ascii=False)
    assert normalise({"conversation_id": "nw-1", "messages": cell}, "openai") == msgs


def test_openai_content_parts_are_joined():
    rec = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Part one. "}, {"type": "text", "text": "Part two."}]},
        {"role": "assistant", "content": ["plain ", "strings"]},
    ]}
    assert normalise(rec, "openai") == [U("Part one. Part two."), A("plain strings")]


def test_openai_developer_role_is_system():
    rec = {"messages": [{"role": "developer", "content": "rules"}, U("q"), A("a")]}
    assert normalise(rec, "openai") == [S("rules"), U("q"), A("a")]


def test_openai_extra_message_fields_are_ignored():
    rec = {"messages": [{"role": "user", "content": "q", "name": "bob"}, {"role": "assistant", "content": "a", "tool_calls": None}]}
    assert normalise(rec, "openai") == [U("q"), A("a")]


# ------------------------------------------------------------------------ prompt/completion and qa


def test_prompt_completion():
    assert normalise({"prompt": "Say hi", "completion": " hi"}, "prompt_completion") == [U("Say hi"), A(" hi")]


def test_prompt_completion_with_system():
    rec = {"prompt": "p", "completion": "c", "system": "s"}
    assert normalise(rec, "prompt_completion") == [S("s"), U("p"), A("c")]


def test_qa():
    rec = {"question": "How do I reset my password?", "answer": "Use the ID portal.", "category": "it"}
    assert normalise(rec, "qa") == [U("How do I reset my password?"), A("Use the ID portal.")]


def test_qa_context_goes_into_the_user_turn():
    rec = {"question": "How long?", "answer": "5 days.", "context": "Bereavement leave is 5 days."}
    assert normalise(rec, "qa") == [
        U("Context:\nBereavement leave is 5 days.\n\nQuestion:\nHow long?"),
        A("5 days."),
    ]


def test_qa_context_as_text_parts_is_text_not_a_python_repr():
    rec = {"question": "How long?", "answer": "5 days.", "context": [{"type": "text", "text": "Leave is "}, "5 days."]}
    assert normalise(rec, "qa")[0]["content"] == "Context:\nLeave is 5 days.\n\nQuestion:\nHow long?"


@pytest.mark.parametrize("schema, rec", [
    ("alpaca", {"instruction": "i", "output": "o", "system": [{"type": "text", "text": "be brief"}]}),
    ("prompt_completion", {"prompt": "i", "completion": "o", "system": ["be ", "brief"]}),
])
def test_system_given_as_text_parts_is_text(schema, rec):
    assert normalise(rec, schema)[0] == S("be brief")


def test_qa_blank_context_is_ignored():
    assert normalise({"question": "q", "answer": "a", "context": " \n"}, "qa") == [U("q"), A("a")]


def test_system_prompt_is_added_only_when_missing():
    assert normalise({"question": "q", "answer": "a"}, "qa", system_prompt="Be nice.") == [S("Be nice."), U("q"), A("a")]
    rec = {"messages": [S("own"), U("q"), A("a")]}
    assert normalise(rec, "openai", system_prompt="Be nice.") == [S("own"), U("q"), A("a")]


def test_unknown_schema_is_a_programming_error():
    with pytest.raises(ValueError, match="unknown schema 'xml'"):
        normalise({"a": 1}, "xml")


# --------------------------------------------------------------------------- detection, column map


@pytest.mark.parametrize("schema, rec", [
    ("openai", {"messages": "[]", "id": 1}),
    ("sharegpt", {"conversations": [], "system": "s"}),
    ("alpaca", {"instruction": "i", "input": "", "output": "o"}),
    ("prompt_completion", {"prompt": "p", "completion": "c"}),
    ("qa", {"question": "q", "answer": "a", "category": "c"}),
])
def test_detect_schema_each(schema, rec):
    chosen, votes = detect_schema([rec, dict(rec)])
    assert chosen == schema
    assert votes[schema] == 2


def test_detect_schema_majority_wins_and_votes_are_reported():
    recs = [{"question": "q", "answer": "a"}] * 3 + [{"prompt": "p", "completion": "c"}] + [{"unrelated": 1}]
    chosen, votes = detect_schema(recs)
    assert chosen == "qa"
    assert dict(votes) == {"qa": 3, "prompt_completion": 1}


def test_detect_schema_none_fits():
    chosen, votes = detect_schema([{"ticket": "t", "reply": "r"}])
    assert chosen is None and not votes


def test_detect_schema_needs_both_columns():
    assert detect_schema([{"instruction": "only"}])[0] is None
    assert detect_schema([{"question": "only"}])[0] is None


def test_column_map_renames_before_detection():
    rec = apply_column_map({"ticket": "VPN broken", "reply": "Reinstall it."}, {"ticket": "question", "reply": "answer"})
    assert detect_schema([rec])[0] == "qa"
    assert normalise(rec, "qa") == [U("VPN broken"), A("Reinstall it.")]
    assert apply_column_map({"a": 1}, {}) == {"a": 1}


def test_every_schema_is_covered_here():
    assert set(SCHEMAS) == {"alpaca", "sharegpt", "openai", "prompt_completion", "qa"}


def test_content_key_ignores_whitespace_but_not_words_or_roles():
    a = [U("How  do I\nreset?"), A("Use the portal. ")]
    b = [U("How do I reset?"), A("Use the\tportal.")]
    assert content_key(a) == content_key(b)
    assert content_key(a) != content_key([U("How do I reset?"), A("Use a portal.")])
    assert content_key([S("x"), U("q"), A("a")]) != content_key([U("x"), U("q"), A("a")])


# ------------------------------------------------------------------------------------------ rejects

OK2 = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]

# (schema, record, reason, regex on the detail)
REJECT_CASES = [
    # unparsable_json: a JSON string that is not JSON
    ("openai", {"messages": '[{"role": "user", "content": "unterminated'}, "unparsable_json",
     r"^messages is text but not valid JSON: Unterminated string"),
    ("sharegpt", {"conversations": "[{from: human}]"}, "unparsable_json", r"^conversations is text but not valid JSON"),
    ("alpaca", {"instruction": "i", "output": "o", "history": "[[1, 2"}, "unparsable_json", r"^history is text but not valid JSON"),
    # missing_field
    ("qa", {"question": "Can I expense parking?", "category": "hr"}, "missing_field", r"^answer is missing$"),
    ("qa", {"question": None, "answer": "a"}, "missing_field", r"^question is missing$"),
    ("alpaca", {"output": "o"}, "missing_field", r"^instruction is missing$"),
    ("prompt_completion", {"prompt": "p"}, "missing_field", r"^completion is missing$"),
    ("openai", {"id": 3}, "missing_field", r"^messages is missing$"),
    ("openai", {"messages": "  "}, "missing_field", r"^messages is empty$"),
    ("sharegpt", {"conversations": None}, "missing_field", r"^conversations is missing$"),
    ("openai", {"messages": [{"content": "q"}, {"role": "assistant", "content": "a"}]}, "missing_field",
     r"^messages\[0\]\.role is None, not a role name$"),
    ("openai", {"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}, "missing_field",
     r"^messages\[0\]\.content is missing$"),
    ("sharegpt", {"conversations": [{"from": "human"}, {"from": "gpt", "value": "b"}]}, "missing_field",
     r"^conversations\[0\]\.value is missing$"),
    # wrong_type
    ("openai", {"messages": {"role": "user"}}, "wrong_type", r"^messages is a dict, not a list$"),
    ("openai", {"messages": ["hello", "hi"]}, "wrong_type", r"^messages\[0\] is a str, not an object$"),
    ("openai", {"messages": [{"role": 1, "content": "q"}]}, "wrong_type", r"^messages\[0\]\.role is 1, not a role name$"),
    ("openai", {"messages": [{"role": "user", "content": {"text": "q"}}]}, "wrong_type",
     r"^messages\[0\]\.content is a dict, not text$"),
    ("openai", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "wrong_type",
     r"^messages\[0\]\.content has a 'image_url' part; only text parts are supported$"),
    ("openai", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": True}]}, "wrong_type",
     r"^messages\[1\]\.content is a bool, not text$"),
    ("sharegpt", {"conversations": "42"}, "wrong_type", r"^conversations is a int, not a list$"),
    ("sharegpt", {"conversations": [["human", "hi"]]}, "wrong_type", r"^conversations\[0\] is a list, not an object$"),
    ("alpaca", {"instruction": "i", "output": "o", "history": {"q": "a"}}, "wrong_type",
     r"^history is a dict, not a list of \[user, assistant\] pairs$"),
    ("alpaca", {"instruction": "i", "output": "o", "history": [["only one"]]}, "wrong_type",
     r"^history\[0\] is not a \[user, assistant\] pair$"),
    ("qa", {"question": ["q", 1], "answer": "a"}, "wrong_type", r"^question has a 'int' part"),
    ("prompt_completion", {"prompt": "p", "completion": {"text": "c"}}, "wrong_type", r"^completion is a dict, not text$"),
    # empty_content
    ("qa", {"question": "How do I request volunteer leave?", "answer": ""}, "empty_content",
     r"^message 1 \(assistant\) is empty$"),
    ("qa", {"question": "Why am I logged out?", "answer": " \n\t "}, "empty_content", r"^message 1 \(assistant\) is empty$"),
    ("openai", {"messages": [S("sys"), U("  "), A("a")]}, "empty_content", r"^message 1 \(user\) is empty$"),
    # unknown_role
    ("openai", {"messages": [U("q"), A("a"), {"role": "moderator", "content": "ok"}]}, "unknown_role",
     r"^messages\[2\]\.role is 'moderator'; expected system, user, assistant or tool \(ShareGPT: human, gpt, function_call, observation\)$"),
    ("sharegpt", {"conversations": [{"from": "narrator", "value": "x"}]}, "unknown_role",
     r"^conversations\[0\]\.from is 'narrator'"),
    # bad_tool_schema
    ("openai", {"tools": "[1]", "messages": [U("q"), A("a")]}, "bad_tool_schema",
     r"^tools\[0\] is a int, not a JSON object describing a function$"),
    ("openai", {"tools": [{"type": "function", "function": {"description": "no name"}}], "messages": [U("q"), A("a")]},
     "bad_tool_schema", r"^tools\[0\] has no function name \(got None\); each tool needs a `name`$"),
    ("sharegpt", {"tools": '[{"name": "f", "parameters": [1, 2]}]', "conversations": [H("q"), G("a")]}, "bad_tool_schema",
     r"^tools\[0\]\.parameters is a list; expected a JSON schema object$"),
    ("sharegpt", {"tools": '{"name": "f"', "conversations": [H("q"), G("a")]}, "unparsable_json",
     r"^tools is text but not valid JSON"),
    ("openai", {"tools": [{"type": "retrieval"}], "messages": [U("q"), A("a")]}, "bad_tool_schema",
     r"^tools\[0\]\.type is 'retrieval'; only function tools are supported$"),
    # bad_tool_arguments
    ("openai", {"tools": [TOOL], "messages": [U("q"), CALL("get_weather", '{"city": "Paris"'), R("20C"), A("warm")]},
     "bad_tool_arguments", r"^messages\[1\]\.tool_calls\[0\]\.arguments is not valid JSON \(Expecting ',' delimiter at column 17\)"),
    ("openai", {"tools": [TOOL], "messages": [U("q"), CALL("get_weather", "[1]"), R("20C"), A("warm")]},
     "bad_tool_arguments", r"^messages\[1\]\.tool_calls\[0\]\.arguments is a JSON list; tool arguments must be a JSON object$"),
    ("sharegpt", {"tools": [TOOL["function"]], "conversations": [H("q"), {"from": "function_call", "value": "{name: x}"}]},
     "bad_tool_arguments", r"^conversations\[1\]\.value is not valid JSON"),
    # unknown_tool
    ("openai", {"tools": [TOOL], "messages": [U("q"), CALL("get_wether", {"city": "Paris"}), R("20C"), A("warm")]},
     "unknown_tool", r"^message 1 tool_calls\[0\] calls 'get_wether', which the row's tools do not declare \(declared: get_weather\)"),
    ("openai", {"messages": [U("q"), CALL("get_weather", {"city": "Paris"}), R("20C"), A("warm")]},
     "unknown_tool", r"^message 1 tool_calls\[0\] calls 'get_weather', .*\(declared: none: the row has no `tools`\)"),
    # orphan_tool_result
    ("openai", {"messages": [U("q"), {"role": "tool", "content": "42"}, A("a")]}, "orphan_tool_result",
     r"^message 1 is a tool result, but no assistant tool call is waiting for one"),
    ("openai", {"tools": [TOOL], "messages": [U("q"), CALL("get_weather", {"city": "P"}, "call_1"), R("20C", "call_9"), A("a")]},
     "orphan_tool_result", r"^message 2 answers tool_call_id 'call_9', but the pending calls are 'call_1'$"),
    ("sharegpt", {"tools": [TOOL["function"]], "conversations": [H("q"), {"from": "observation", "value": "{}"}, G("a")]},
     "orphan_tool_result", r"^message 1 is a tool result"),
    # bad_weight
    ("openai", {"messages": [U("q"), {"role": "assistant", "content": "a", "weight": 0.5}]}, "bad_weight",
     r"^messages\[1\]\.weight is 0\.5; OpenAI's format allows 0 \(context, not trained on\) or 1$"),
    ("openai", {"messages": [{"role": "user", "content": "q", "weight": 1}, A("a")]}, "bad_weight",
     r"^messages\[0\]\.weight is set on a user message; only assistant messages carry a weight$"),
    # no_assistant_turn
    ("openai", {"messages": [S("sys"), U("q")]}, "no_assistant_turn", r"^no message has the assistant role$"),
    ("openai", {"messages": []}, "no_assistant_turn", r"^the conversation has no messages$"),
    ("sharegpt", {"conversations": "[]"}, "no_assistant_turn", r"^the conversation has no messages$"),
    # wrong_turn_order
    ("openai", {"messages": [U("q1"), U("q2"), A("a")]}, "wrong_turn_order",
     r"^message 1 is user but assistant was expected \(turns: user/user/assistant\)$"),
    ("openai", {"messages": [A("a"), U("q"), A("a2")]}, "wrong_turn_order", r"^message 0 is assistant but user was expected"),
    ("openai", {"messages": [U("q"), A("a"), U("q2")]}, "wrong_turn_order", r"^the conversation ends with user, not assistant$"),
    ("openai", {"messages": [U("q"), S("late"), A("a")]}, "wrong_turn_order", r"^a system message at position 1; only the first"),
    ("openai", {"messages": [S("s1"), S("s2"), U("q"), A("a")]}, "wrong_turn_order", r"^a system message at position 1"),
    ("openai", {"tools": [TOOL], "messages": [U("q"), CALL("get_weather", {"city": "P"}), U("and?"), A("a")]},
     "wrong_turn_order", r"^message 2 is user but the tool call\(s\) of an earlier assistant message \(get_weather\) have no "
     r"tool message with their result; give one tool message per call$"),
    ("openai", {"messages": [U("q"), {"role": "assistant", "content": "a", "weight": 0}]}, "no_assistant_turn",
     r"^every assistant message has weight 0, so there is nothing to learn$"),
]


@pytest.mark.parametrize("schema, rec, reason, detail", REJECT_CASES,
                         ids=[f"{c[2]}-{c[0]}-{i}" for i, c in enumerate(REJECT_CASES)])
def test_reject(schema, rec, reason, detail):
    assert detail.startswith("^")  # the pattern describes the whole detail from its start
    # str(Reject) is "<reason>: <detail>", so `match=` checks the reason and the detail together
    with pytest.raises(Reject, match=f"^{reason}: " + detail[1:]) as info:
        normalise(rec, schema)
    assert info.value.reason == reason
    assert re.search(detail, info.value.detail)
    assert info.value.reason in REJECT_REASONS
    assert str(info.value) == f"{reason}: {info.value.detail}"


# Reasons that arise outside normalisation, each tested where it arises.
ARISE_ELSEWHERE = {
    "unparsable_csv": "tests/unit/data/test_formats.py",
    "unparsable_parquet": "tests/unit/data/test_formats.py",
    "undecodable_text": "tests/unit/data/test_formats.py",
    "too_long": "tests/integration/test_data_pipeline.py",
    "duplicate": "tests/integration/test_data_pipeline.py",
}


def test_every_normalisation_reject_reason_has_a_case():
    covered = {c[2] for c in REJECT_CASES}
    assert covered | set(ARISE_ELSEWHERE) == set(REJECT_REASONS), "a new reject reason needs a test case"
    assert not covered & set(ARISE_ELSEWHERE)


def test_reject_refuses_an_unknown_reason():
    with pytest.raises(AssertionError):
        Reject("not_a_reason", "x")


def test_wrong_type_in_a_field_is_not_silently_stringified():
    # a list where text is expected is an error, not its Python repr
    with pytest.raises(Reject, match=r"^wrong_type: answer has a .* part; only text parts are supported$") as info:
        normalise({"question": "q", "answer": [{"a": 1}]}, "qa")
    assert info.value.reason == "wrong_type"
