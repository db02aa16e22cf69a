"""Property tests over random rows of every schema, written as jsonl, json, csv and parquet files.

The pipeline never crashes on row content, never loses or invents a row (kept + rejected = read =
rows written), every reject has a known reason, and a well-formed row survives every format unchanged.
Most examples run without Ray (iter_records + normalise, the per-row work of the pipeline); one
Ray-backed property runs `prepare` end to end on a few random data sets.
"""
import csv
import io
import json
import string

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from rayft.data.formats import iter_records
from rayft.data.schemas import REJECT_REASONS, SCHEMAS, Reject, content_key, normalise

FORMATS = ("jsonl", "json", "csv", "parquet")
FIELDS = {  # the columns each schema reads
    "openai": ("messages",),
    "sharegpt": ("conversations", "system"),
    "alpaca": ("instruction", "input", "output", "system", "history"),
    "prompt_completion": ("prompt", "completion", "system"),
    "qa": ("question", "answer", "context", "system"),
}

# ------------------------------------------------------------------------------------- strategies

no_surrogates = st.characters(exclude_categories=("Cs",))
any_char = st.characters()  # includes lone surrogates, which JSON can carry as \udXXX escapes
tricky = st.sampled_from(["", " ", "\t\n", "\u2028", "\u2029", "\x85", "\r", "\x00", "null", "[]", "{}", '"', ",", "é", "你好", "👍🏽"])
sentence = st.sampled_from([
    "How do I reset my password?", "Use the ID portal.", "Grüße aus Köln", "VPN läuft nicht 🙁", "5 days.",
    "Line one\nline two", "  padded  ", "quote \" and comma , here", "مرحبا", "tab\there",
])


def texts(chars):
    return st.one_of(sentence, tricky, st.text(chars, max_size=25))


def json_values(chars):
    leaves = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False), texts(chars))
    return st.recursive(
        leaves,
        lambda kids: st.one_of(st.lists(kids, max_size=3), st.dictionaries(st.text(string.ascii_lowercase, max_size=6), kids, max_size=3)),
        max_leaves=8,
    )


def roles(chars):
    return st.one_of(
        st.sampled_from(["system", "user", "assistant", "human", "gpt", "developer", "tool", "function", "moderator", "", "USER", " bot "]),
        st.text(chars, max_size=8), st.none(), st.integers(0, 3),
    )


def contents(chars):
    parts = st.lists(st.one_of(texts(chars), st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": texts(chars)})), max_size=3)
    return st.one_of(texts(chars), texts(chars), parts, json_values(chars))


def messages_of(chars, role_key="role", content_key_="content"):
    msg = st.one_of(
        st.fixed_dictionaries({role_key: roles(chars), content_key_: contents(chars)}),
        st.fixed_dictionaries({role_key: roles(chars)}, optional={content_key_: contents(chars), "tool_calls": json_values(chars)}),
        json_values(chars),
    )
    return st.lists(msg, max_size=5)


@st.composite
def good_conversation(draw):
    """A well-formed conversation (optional system, alternating turns, ending with assistant)."""
    nonblank = st.text(no_surrogates, min_size=1, max_size=30).filter(lambda s: s.strip())
    msgs = [{"role": "system", "content": draw(nonblank)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        msgs += [{"role": "user", "content": draw(nonblank)}, {"role": "assistant", "content": draw(nonblank)}]
    return msgs


def as_schema(schema: str, msgs: list) -> tuple[dict, list]:
    """A good conversation written in a schema's layout, and what normalising it must give back."""
    sys_ = msgs[0]["content"] if msgs[0]["role"] == "system" else None
    turns = msgs[1:] if sys_ is not None else msgs
    if schema == "openai":
        return {"messages": msgs}, msgs
    if schema == "sharegpt":
        conv = [{"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]} for m in turns]
        row = {"conversations": conv}
        if sys_ is not None:
            row["system"] = sys_
        return row, msgs if sys_ is None or sys_.strip() else turns
    # single-turn layouts use the last exchange
    user, answer = turns[-2]["content"], turns[-1]["content"]
    head = [msgs[0]] if sys_ is not None else []
    keys = {"alpaca": ("instruction", "output"), "prompt_completion": ("prompt", "completion"), "qa": ("question", "answer")}[schema]
    row = {keys[0]: user, keys[1]: answer}
    if sys_ is not None:
        row["system"] = sys_
    return row, head + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


@st.composite
def random_row(draw, schema: str, chars):
    """A row in a schema's layout with random, often wrong, values; sometimes not an object at all."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(json_values(chars))  # anything at all, often not an object
    if kind == 1:
        row, _ = as_schema(schema, draw(good_conversation()))
        return row
    v = json_values(chars)
    t = texts(chars)
    if schema == "openai":
        msgs = draw(messages_of(chars))
        return {"messages": draw(st.one_of(st.just(msgs), st.just(json.dumps(msgs)), t, v))}
    if schema == "sharegpt":
        conv = draw(messages_of(chars, "from", "value"))
        row = {"conversations": draw(st.one_of(st.just(conv), st.just(json.dumps(conv)), v))}
        if draw(st.booleans()):
            row["system"] = draw(st.one_of(t, v))
        return row
    row = {}
    for f in FIELDS[schema]:
        if f in ("system", "context", "input", "history") and draw(st.booleans()):
            continue  # optional field absent
        if f == "history":
            pairs = st.lists(st.lists(st.one_of(t, v), min_size=0, max_size=3), max_size=3)
            row[f] = draw(st.one_of(pairs, pairs.map(json.dumps), v))
        else:
            row[f] = draw(st.one_of(t, t, contents(chars), st.none()))
    if draw(st.booleans()):
        row["extra"] = draw(v)
    return row


# ------------------------------------------------------------------------------------- file writers


def write_rows(rows: list, fmt: str, ensure_ascii: bool = False) -> tuple[bytes, int]:
    """Rows -> file bytes, and how many rows a reader must find in them."""
    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=ensure_ascii) + "\n" for r in rows).encode("utf-8"), len(rows)
    if fmt == "json":
        return json.dumps(rows, ensure_ascii=ensure_ascii, indent=1).encode("utf-8"), len(rows)
    rows = [r for r in rows if isinstance(r, dict)]
    columns = sorted({k for r in rows for k in r})
    if fmt == "csv":
        if not columns:
            return b"", 0
        buf = io.StringIO(newline="")
        w = csv.writer(buf)
        w.writerow(columns)
        n = 0
        for r in rows:
            cells = [cell_text(r.get(c)) for c in columns]
            w.writerow(cells)
            n += any(c.strip() for c in cells)  # an all-blank line is not a row
        return buf.getvalue().encode("utf-8"), n
    if fmt == "parquet":
        rows = [{c: r.get(c) for c in columns} for r in rows]  # from_pylist takes its columns from the first row
        # mixed or unwritable types in a column: store them as JSON text, as an export tool would
        as_text = [{c: (None if r[c] is None else cell_text(r[c])) for c in columns} for r in rows]
        for attempt in (rows, as_text):
            table = None
            try:
                table = pa.Table.from_pylist(attempt)
                if table.num_columns == 0:  # Parquet needs a column
                    table = pa.table({"empty": pa.array([None] * len(rows), type=pa.string())})
                sink = io.BytesIO()
                pq.write_table(table, sink)
                return sink.getvalue(), len(rows)
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
                if attempt is as_text:
                    raise
    raise ValueError(fmt)


def cell_text(v) -> str:
    if v is None:
        return ""
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)


# --------------------------------------------------------------------------------- the per-row check


def check_conversation(msgs: list) -> None:
    """What every kept conversation must be, whatever the input was."""
    assert msgs and isinstance(msgs, list)
    roles_ = [m["role"] for m in msgs]
    body = roles_[1:] if roles_[0] == "system" else roles_
    assert body == ["user", "assistant"] * (len(body) // 2) and len(body) % 2 == 0 and body
    for m in msgs:
        assert set(m) == {"role", "content"}
        assert isinstance(m["content"], str) and m["content"].strip()
    # what the pipeline does next with it must work: JSON, hashing, Arrow
    json.dumps(msgs, ensure_ascii=False).encode("utf-8")
    content_key(msgs).encode("utf-8")
    pa.array([json.dumps(msgs, ensure_ascii=False)])


def read_and_normalise(data: bytes, fmt: str, schema: str):
    read, kept, rejected = 0, [], []
    for rec in iter_records(data, fmt):
        read += 1
        assert rec.row == read, "rows are numbered 1, 2, 3, ... in file order"
        pa.array([rec.raw])  # the raw text can go to the rejects file
        if rec.record is None:
            assert rec.reason in REJECT_REASONS and rec.detail
            rejected.append(rec.reason)
            continue
        assert rec.reason == ""
        try:
            msgs = normalise(rec.record, schema)
        except Reject as r:
            assert r.reason in REJECT_REASONS and r.detail
            pa.array([r.detail])
            rejected.append(r.reason)
            continue
        check_conversation(msgs)
        kept.append(msgs)
    return read, kept, rejected


# -------------------------------------------------------------------------------------- properties


@st.composite
def random_file(draw):
    fmt = draw(st.sampled_from(FORMATS))
    schema = draw(st.sampled_from(SCHEMAS))
    text_based = fmt in ("jsonl", "json")
    ensure_ascii = text_based and draw(st.booleans())
    chars = any_char if ensure_ascii else no_surrogates  # lone surrogates exist only as \u escapes
    rows = draw(st.lists(random_row(schema, chars), max_size=8))
    return fmt, schema, rows, ensure_ascii


@given(random_file())
@settings(max_examples=250, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
@example(("jsonl", "prompt_completion", [{"prompt": "a\u2028b", "completion": "c\x85"}], False))
@example(("jsonl", "openai", [{"messages": [{"role": "user", "content": "\ud800"}, {"role": "assistant", "content": "x"}]}], True))
@example(("json", "qa", [{"question": "q\udfff", "answer": "a"}, {"question": "q", "answer": "a"}], True))
def test_any_rows_are_read_and_judged_never_lost(case):
    fmt, schema, rows, ensure_ascii = case
    data, expected_rows = write_rows(rows, fmt, ensure_ascii)
    read, kept, rejected = read_and_normalise(data, fmt, schema)
    assert read == expected_rows, "every row written is read once, none split or merged"
    assert len(kept) + len(rejected) == read


@given(st.sampled_from(FORMATS), st.sampled_from(SCHEMAS), st.lists(good_conversation(), min_size=1, max_size=6))
@settings(max_examples=300)
def test_good_rows_survive_every_format_unchanged(fmt, schema, conversations):
    pairs = [as_schema(schema, c) for c in conversations]
    data, n = write_rows([row for row, _ in pairs], fmt)
    assert n == len(pairs)
    read, kept, rejected = read_and_normalise(data, fmt, schema)
    assert rejected == []
    assert kept == [expected for _, expected in pairs]


# --------------------------------------------------------------------------------- end to end, Ray


@st.composite
def random_sources(draw):
    n = draw(st.integers(1, 3))
    out = []
    for i in range(n):
        fmt = draw(st.sampled_from(FORMATS))
        schema = draw(st.sampled_from(SCHEMAS))
        rows = draw(st.lists(random_row(schema, no_surrogates), min_size=0, max_size=10))
        out.append((f"src{i}", fmt, schema, rows))
    return out


@pytest.mark.slow
@pytest.mark.timeout(600)
@given(sources=random_sources(), packing=st.booleans(), redact=st.booleans())
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
def test_prepare_end_to_end_never_crashes_and_accounts_for_every_row(ray_local, tiny_model_dir, tmp_path_factory, sources, packing, redact):
    from rayft.cluster.config import config_from_dict
    from rayft.data.pipeline import TokenizerSpec, prepare

    folder = tmp_path_factory.mktemp("prop")
    written, cfg_sources = {}, []
    for name, fmt, schema, rows in sources:
        data, n = write_rows(rows, fmt)
        path = folder / f"{name}.{fmt}"
        path.write_bytes(data)
        written[name] = n
        cfg_sources.append({"name": name, "path": str(path), "schema": schema})
    assume(any(written.values()))  # a run with no rows at all is not interesting here
    cfg = config_from_dict({
        "name": "prop", "model": {"name_or_path": tiny_model_dir},
        "data": {"sources": cfg_sources, "max_seq_length": 64, "packing": packing, "redact_pii": redact,
                 "eval_fraction": 0.3, "truncation": "truncate_end"},
    })
    prepared = prepare(cfg.data, TokenizerSpec(tiny_model_dir), log=lambda _: None)
    report = prepared.report
    rejects = prepared.rejects.take_all()
    for s in report["sources"]:
        assert s["read"] == written[s["name"]], s
        assert s["kept"] + s["rejected"] == s["read"], s
        assert s["train_examples"] + s["eval_examples"] == s["kept"], s
        assert set(s["rejected_by_reason"]) <= set(REJECT_REASONS)
        assert sum(1 for r in rejects if r["source"] == s["name"]) == s["rejected"]
    assert all(r["reason"] in REJECT_REASONS for r in rejects)
    train = prepared.train.take_all()
    assert sum(int(r["num_examples"]) for r in train) == report["totals"]["train_examples"]
    assert all(len(r["input_ids"]) <= 64 for r in train)
