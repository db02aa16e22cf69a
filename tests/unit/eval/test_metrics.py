"""Task metrics, the paired bootstrap and the eval section's checks (no model, no Ray)."""
import pytest

from rayft.eval.compare import paired_bootstrap
from rayft.eval.config import EvalConfig, EvalError
from rayft.eval.metrics import exact_match, json_valid, rouge_l, schema_matcher, token_f1


def test_exact_match_normalises_case_punctuation_and_articles():
    assert exact_match("The answer.", "answer") == 1.0
    assert exact_match("  Nine  to five!", "nine to five") == 1.0
    assert exact_match("nine to six", "nine to five") == 0.0


def test_token_f1_counts_shared_words():
    # prediction 4 words, reference 3, 2 shared: precision 1/2, recall 2/3 -> F1 4/7
    assert token_f1("we open at nine", "open at ten") == pytest.approx(4 / 7)
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0 and token_f1("a b", "c d") == 0.0


def test_rouge_l_uses_the_longest_common_subsequence():
    # LCS of "a b c d e" (after dropping the article `a`: b c d e) and "b x d e" is b d e: P 3/4, R 3/4
    assert rouge_l("a b c d e", "b x d e") == pytest.approx(0.75)
    assert rouge_l("one two three", "three two one") == pytest.approx(1 / 3)
    assert rouge_l("same words here", "same words here") == 1.0


def test_json_validity_and_schema_match():
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    match = schema_matcher(schema)
    assert json_valid('{"ok": true}', "") == 1.0 and json_valid("```json\n[1, 2]\n```", "") == 1.0
    assert json_valid("{ok: true}", "") == 0.0
    assert match('{"ok": true}', "") == 1.0
    assert match('{"ok": "yes"}', "") == 0.0 and match("not json", "") == 0.0


def test_paired_bootstrap_interval():
    a = [0.0] * 50 + [1.0] * 50
    same = paired_bootstrap(a, a, samples=500, seed=1)
    assert same == (0.0, 0.0, 0.0)
    better = [1.0] * 100
    diff, low, high = paired_bootstrap(a, better, samples=500, seed=1)
    assert diff == pytest.approx(0.5) and 0.35 < low < 0.5 < high < 0.65
    assert paired_bootstrap(a, better, samples=500, seed=1) == (diff, low, high)  # seeded: the same interval
    with pytest.raises(EvalError, match="same non-zero length"):
        paired_bootstrap([1.0], [1.0, 0.0])


def test_eval_section_errors_name_the_field_and_the_fix():
    with pytest.raises(ValueError, match="eval.json_schema is unset"):
        EvalConfig(metrics=["json_schema"])
    with pytest.raises(ValueError, match="named more than once"):
        EvalConfig(metrics=["token_f1", "token_f1"])
    with pytest.raises(ValueError, match="not a valid JSON Schema"):
        EvalConfig(metrics=["json_schema"], json_schema={"type": "no-such-type"})
    with pytest.raises(EvalError, match="eval.json_schema: 'missing.json' is not a file"):
        EvalConfig(metrics=["json_schema"], json_schema="missing.json").resolved_schema()


def test_manifest_name_is_the_security_packages():
    from rayft.eval.sources import MANIFEST
    from rayft.security.artifacts import MANIFEST as SECURITY_MANIFEST

    assert MANIFEST == SECURITY_MANIFEST


CALL_OSLO = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}\n</tool_call>'
CALL_ROME = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'


def test_tool_call_metrics_compare_names_and_argument_json():
    from rayft.eval.metrics import tool_args_match, tool_name_match

    same_order_swapped = '<tool_call>\n{"arguments": {"unit": "c", "city": "Oslo"}, "name": "get_weather"}\n</tool_call>'
    assert tool_name_match(same_order_swapped, CALL_OSLO) == tool_args_match(same_order_swapped, CALL_OSLO) == 1.0
    assert tool_name_match(CALL_ROME, CALL_OSLO) == 1.0 and tool_args_match(CALL_ROME, CALL_OSLO) == 0.0
    both, swapped = CALL_OSLO + "\n" + CALL_ROME, CALL_ROME + "\n" + CALL_OSLO
    assert tool_args_match(swapped, both) == 1.0  # parallel calls in any order
    assert tool_name_match(CALL_OSLO, both) == 0.0  # one call of two is not a match
    assert tool_name_match("It is sunny.", CALL_OSLO) == 0.0  # no call where one was due
    assert tool_name_match(CALL_OSLO, "It is sunny.") == 0.0  # a call where none was due
    assert tool_name_match("It is sunny.", "Sunny in Oslo.") == tool_args_match("It is sunny.", "Sunny.") == 1.0
    broken = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Os\n</tool_call>'
    assert tool_name_match(broken, CALL_OSLO) == tool_args_match(broken, CALL_OSLO) == 0.0
    unclosed = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}'
    assert tool_args_match(unclosed, CALL_OSLO) == 1.0  # generation stopped at the end-of-turn token


def test_the_golden_set_of_tool_rows_has_the_calls_as_reference_and_the_tools_in_the_prompt(tmp_path, tiny_tokenizer,
                                                                                           repo_root):
    from rayft.data.config import DataConfig, SourceConfig
    from rayft.eval.generate import prompt_texts
    from rayft.eval.golden import load_golden
    from rayft.eval.metrics import tool_args_match

    data = DataConfig(sources=[{"name": "s", "path": str(tmp_path / "none.jsonl")}])
    gold = load_golden(data, sources=[SourceConfig(name="tools", path=str(repo_root / "examples/data/tools_openai.jsonl"))],
                       log=lambda *_: None)
    assert len(gold.examples) == 80 and len(gold.rejected) == 4
    calling = [e for e in gold.examples if e.reference_calls]
    assert len(calling) >= 70  # every row but those answered without a tool
    e = calling[0]
    assert e.reference.startswith("<tool_call>\n") and e.prompt[-1]["role"] == "user" and e.tools
    assert tool_args_match(e.reference, e.reference) == 1.0
    text = prompt_texts([e.prompt], tiny_tokenizer, None, [e.tools])[0]
    assert "<tools>" in text and text.endswith("<|im_start|>assistant\n")
