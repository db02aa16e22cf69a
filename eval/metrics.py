"""Task metrics: each scores one answer against its reference in [0, 1]; a run's aggregate is the mean.

Text metrics compare normalised words (lower case, punctuation and the articles a/an/the removed, whitespace
collapsed), as SQuAD's evaluation does, so "The answer." and "answer" are an exact match. Tool metrics read the
<tool_call> blocks of the default chat layout (data.chat.parse_tool_calls) in the answer and in the reference
(a golden example whose reference turn calls tools has those calls as its reference text); a malformed call scores 0.
"""
from __future__ import annotations

import json
import re
import string
from collections import Counter
from typing import Any, Callable, Optional

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)
_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.S)


def normalise(text: str) -> str:
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def words(text: str) -> list[str]:
    return normalise(text).split()


def exact_match(prediction: str, reference: str) -> float:
    return float(normalise(prediction) == normalise(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = words(prediction), words(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def lcs_length(a: list[str], b: list[str]) -> int:
    """Longest common subsequence, one row of the table at a time."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (beta 1) over normalised words."""
    pred, ref = words(prediction), words(reference)
    if not pred or not ref:
        return float(pred == ref)
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def parse_json(prediction: str) -> tuple[bool, Any]:
    """(parsed?, value); a Markdown code fence around the JSON is allowed."""
    text = prediction.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1)
    try:
        return True, json.loads(text)
    except ValueError:
        return False, None


def json_valid(prediction: str, reference: str) -> float:
    return float(parse_json(prediction)[0])


def schema_matcher(schema: Optional[dict]) -> Callable[[str, str], float]:
    """The `json_schema` metric for one schema: 1 when the answer parses and validates."""
    import jsonschema

    validator = jsonschema.validators.validator_for(schema or {})(schema or {})

    def json_schema(prediction: str, reference: str) -> float:
        ok, value = parse_json(prediction)
        return float(ok and validator.is_valid(value))

    return json_schema


def _calls(text: str) -> list:
    from rayft.data.chat import parse_tool_calls

    return parse_tool_calls(text)[1]


def tool_name_match(prediction: str, reference: str) -> float:
    """1 when the answer calls the same functions as the reference (as a multiset; no call when it makes none)."""
    pred, ref = _calls(prediction), _calls(reference)
    if None in pred:
        return 0.0
    return float(Counter(c["name"] for c in pred) == Counter(c["name"] for c in ref))


def tool_args_match(prediction: str, reference: str) -> float:
    """1 when the answer's calls equal the reference's: same names with equal argument JSON, in any order."""
    pred, ref = _calls(prediction), _calls(reference)
    if None in pred:
        return 0.0
    key = lambda c: json.dumps(c, sort_keys=True, ensure_ascii=False)  # noqa: E731
    return float(Counter(map(key, pred)) == Counter(map(key, ref)))


TEXT_METRICS: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match, "token_f1": token_f1, "rouge_l": rouge_l, "json_valid": json_valid,
    "tool_name_match": tool_name_match, "tool_args_match": tool_args_match}


def scorers(names: list[str], schema: Optional[dict] = None) -> dict[str, Callable[[str, str], float]]:
    out = {}
    for name in names:
        out[name] = schema_matcher(schema) if name == "json_schema" else TEXT_METRICS[name]
    return out


def score(prediction: str, reference: str, metric_fns: dict[str, Callable[[str, str], float]]) -> dict[str, float]:
    return {name: fn(prediction, reference) for name, fn in metric_fns.items()}


def mean_scores(rows: list[dict[str, float]], names: list[str]) -> dict[str, float]:
    return {n: (sum(r[n] for r in rows) / len(rows) if rows else float("nan")) for n in names}
