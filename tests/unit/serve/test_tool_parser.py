"""serve/tools.py: Hermes-style <tool_call> blocks in a model's output -> OpenAI tool_calls, whole and streamed."""
import json

import pytest

from rayft.serve.tools import ToolCallStream, answer_message, parse_tool_calls

CALL = '<tool_call>\n{"name": "get_order_status", "arguments": {"order_id": "NW-1"}}\n</tool_call>'
CALL2 = '<tool_call>\n{"name": "get_leave_balance", "arguments": {"employee": "Elin", "kind": "sick"}}\n</tool_call>'


def _calls(parsed):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed.tool_calls]


def test_one_call_without_text_has_null_content():
    p = parse_tool_calls(CALL)
    assert p.content is None
    assert _calls(p) == [("get_order_status", {"order_id": "NW-1"})]
    c = p.tool_calls[0]
    assert c["type"] == "function" and c["id"].startswith("call_") and len(c["id"]) > 10
    assert isinstance(c["function"]["arguments"], str)


def test_text_before_the_calls_is_the_content_and_parallel_calls_keep_their_order():
    p = parse_tool_calls("Let me check.\n" + CALL + "\n" + CALL2)
    assert p.content == "Let me check."
    assert _calls(p) == [("get_order_status", {"order_id": "NW-1"}),
                         ("get_leave_balance", {"employee": "Elin", "kind": "sick"})]
    assert len({c["id"] for c in p.tool_calls}) == 2


def test_plain_text_is_content():
    assert parse_tool_calls("Order NW-1 shipped.").content == "Order NW-1 shipped."
    assert parse_tool_calls("").tool_calls == []


def test_missing_arguments_are_an_empty_object_and_an_unterminated_last_block_is_read():
    p = parse_tool_calls('<tool_call>\n{"name": "ping"}')
    assert _calls(p) == [("ping", {})]


@pytest.mark.parametrize("bad", [
    '<tool_call>\n{"name": "get_order_status", "arguments": {"order_id": </tool_call>',  # broken JSON
    '<tool_call>\n["get_order_status"]\n</tool_call>',                                 # not an object
    '<tool_call>\n{"arguments": {}}\n</tool_call>',                                      # no name
    '<tool_call>\n{"name": "f", "arguments": "order_id=1"}\n</tool_call>',             # arguments not an object
    CALL + "\n<tool_call>\n{oops}\n</tool_call>",                                        # one good, one bad
])
def test_a_block_that_does_not_parse_leaves_the_whole_output_as_content(bad):
    p = parse_tool_calls("Checking.\n" + bad)
    assert p.tool_calls == [] and p.content == "Checking.\n" + bad


def test_answer_message_and_finish_reason():
    msg, finish = answer_message(CALL + CALL2, "stop")
    assert finish == "tool_calls" and msg["content"] is None and len(msg["tool_calls"]) == 2
    msg, finish = answer_message(CALL + CALL2, "stop", parallel=False)
    assert [c["function"]["name"] for c in msg["tool_calls"]] == ["get_order_status"]
    msg, finish = answer_message("no call", "length")
    assert finish == "length" and msg == {"role": "assistant", "content": "no call"}


def _stream(pieces):
    s = ToolCallStream()
    sent = [s.feed(p) for p in pieces]
    rest, calls = s.finish()
    return sent, rest, calls


@pytest.mark.parametrize("text", [
    "Let me check.\n" + CALL, CALL + CALL2, "Plain answer, no call.", "Ends with a partial <tool_c",
    "Checking.\n<tool_call>\n{broken}\n</tool_call>", "a < b and <tool but not a call", "  \n" + CALL,
    "Trailing space kept when no call follows.  \n",
])
@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_streamed_content_equals_the_whole_answer_s_content_for_any_chunking(text, size):
    sent, rest, calls = _stream([text[i:i + size] for i in range(0, len(text), size)])
    whole = parse_tool_calls(text)
    assert "".join(sent) + rest == (whole.content or "")
    assert _calls(type(whole)(None, calls)) == _calls(whole)


def test_a_partial_marker_is_held_back_until_decided():
    s = ToolCallStream()
    assert s.feed("Let me check.") == "Let me check."
    assert s.feed("\n<tool") == ""  # may be a call: held
    assert s.feed("_call>\n{\"name\": \"f\", ") == ""
    assert s.feed('"arguments": {}}\n</tool_call>') == ""
    rest, calls = s.finish()
    assert rest == "" and [c["function"]["name"] for c in calls] == ["f"]
    s = ToolCallStream()
    assert s.feed("x <tool") == "x"
    assert s.feed("box") == " <toolbox"  # not a marker after all: sent on
    assert s.finish() == ("", [])
