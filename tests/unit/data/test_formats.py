"""Reading files into records: every row comes back, readable or with a reject reason; nothing raises."""
import csv
import io
import json
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayft.data.formats import SourceError, detect_format, iter_records, list_files, read_bytes
from rayft.data.schemas import REJECT_REASONS, normalise


def records(data: bytes, fmt: str, **kw):
    return list(iter_records(data, fmt, **kw))


# ------------------------------------------------------------------------------------------- jsonl


def test_jsonl_rows_lines_and_blank_lines():
    data = b'{"prompt": "a", "completion": "b"}\n\n   \n{"prompt": "c", "completion": "d"}\r\n{"x": 1}\n'
    recs = records(data, "jsonl")
    assert [(r.row, r.line) for r in recs] == [(1, 1), (2, 4), (3, 5)]
    assert [r.record for r in recs] == [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}, {"x": 1}]
    assert all(r.reason == "" for r in recs)
    assert recs[1].raw == '{"prompt": "c", "completion": "d"}'


def test_jsonl_bad_json_line_is_a_reject_and_reading_goes_on():
    data = b'{"a": 1}\n{"a": 2, "b": "unterminated\n{"a": 3}\n'
    recs = records(data, "jsonl")
    assert [r.row for r in recs] == [1, 2, 3]
    bad = recs[1]
    assert (bad.record, bad.reason, bad.line) == (None, "unparsable_json", 2)
    assert bad.detail.startswith("invalid JSON: Unterminated string")
    assert bad.raw == '{"a": 2, "b": "unterminated'
    assert recs[2].record == {"a": 3}


def test_jsonl_bad_utf8_line_is_a_reject_and_other_lines_are_fine():
    data = b'{"a": "caf\xc3\xa9"}\n{"a": "bad \xff\xfe bytes"}\n{"a": "ok"}\n'
    recs = records(data, "jsonl")
    assert recs[0].record == {"a": "café"}
    bad = recs[1]
    assert (bad.row, bad.line, bad.reason, bad.record) == (2, 2, "undecodable_text", None)
    assert bad.detail == "the line is not valid UTF-8"
    assert "\\xff\\xfe" in bad.raw  # the raw text is printable and shows the bad bytes
    bad.raw.encode("utf-8")  # and can be written to a UTF-8 rejects file
    assert recs[2].record == {"a": "ok"}


@pytest.mark.parametrize("line, kind", [(b"[1, 2]", "list"), (b'"text"', "str"), (b"42", "int"), (b"null", "NoneType")])
def test_jsonl_non_object_line_is_wrong_type(line, kind):
    recs = records(b'{"a": 1}\n' + line + b"\n", "jsonl")
    assert recs[1].reason == "wrong_type"
    assert recs[1].detail == f"a row must be a JSON object, got a {kind}"
    assert recs[1].raw == line.decode()


def test_jsonl_utf8_bom_is_skipped():
    recs = records(b'\xef\xbb\xbf{"a": 1}\n', "jsonl")
    assert recs[0].record == {"a": 1}


@pytest.mark.parametrize("sep", ["\u2028", "\u2029", "\x85"])
def test_jsonl_unicode_line_separators_inside_strings_do_not_split_a_row(sep):
    # json.dumps(ensure_ascii=False) writes these characters raw; JSON Lines rows end only at \n
    rows = [{"prompt": f"a{sep}b", "completion": "c"}, {"prompt": "d", "completion": f"e{sep}"}]
    data = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode()
    recs = records(data, "jsonl")
    assert [(r.row, r.line, r.record) for r in recs] == [(1, 1, rows[0]), (2, 2, rows[1])]


def test_long_raw_text_is_cut_and_says_so():
    line = '{"a": "' + "x" * 100 + '"'  # unparsable, 108 characters
    recs = records(line.encode(), "jsonl", raw_limit=20)
    assert recs[0].raw == line[:20] + "... [cut: 108 characters in all]"


# -------------------------------------------------------------------------------------------- json


def test_json_array_rows_have_no_line():
    rows = [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}, ["not", "an", "object"]]
    recs = records(json.dumps(rows, indent=2).encode(), "json")
    assert [(r.row, r.line) for r in recs] == [(1, None), (2, None), (3, None)]
    assert [r.record for r in recs[:2]] == rows[:2]
    assert recs[2].reason == "wrong_type" and recs[2].detail == "a row must be a JSON object, got a list"
    assert json.loads(recs[0].raw) == rows[0]


def test_json_array_that_is_broken_is_one_reject():
    recs = records(b'[{"a": 1}, {"a": 2', "json")
    assert len(recs) == 1
    assert (recs[0].row, recs[0].reason) == (1, "unparsable_json")
    assert recs[0].detail.startswith("the file is not a valid JSON array")


def test_json_array_with_bad_utf8_rejects_only_that_element():
    data = b'[{"a": "fine"}, {"a": "bad \xff here"}, {"a": "also fine"}]'
    recs = records(data, "json")
    assert [r.reason for r in recs] == ["", "undecodable_text", ""]
    assert recs[1].detail == "the row holds bytes that are not valid UTF-8"
    assert recs[2].record == {"a": "also fine"}


def test_json_file_holding_jsonl_is_read_as_lines():
    data = b'{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\nnot json\n'
    recs = records(data, "json")
    assert [(r.row, r.line) for r in recs] == [(1, 1), (2, 2), (3, 3)]
    assert recs[1].record == {"prompt": "c", "completion": "d"}
    assert recs[2].reason == "unparsable_json"


def test_json_array_with_leading_whitespace():
    assert records(b'\n  [{"a": 1}]', "json")[0].record == {"a": 1}


def test_unknown_format_raises_source_error():
    with pytest.raises(SourceError, match="unknown format 'xml'"):
        records(b"<a/>", "xml")


# --------------------------------------------------------------------------------------------- csv


def _csv(rows: list[list[str]]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue().encode()


def test_csv_with_json_messages_cell():
    msgs = [{"role": "user", "content": 'He said "hi",\nthen left.'}, {"role": "assistant", "content": "Noted, thanks."}]
    data = _csv([["conversation_id", "note", "messages"], ["nw-1", "two\nlines", json.dumps(msgs)], ["nw-2", "", json.dumps(msgs[::-1])]])
    recs = records(data, "csv")
    assert [r.row for r in recs] == [1, 2]
    assert recs[0].line == 2
    assert recs[1].line == 4  # the first row's quoted note spans two physical lines
    assert recs[0].record == {"conversation_id": "nw-1", "note": "two\nlines", "messages": json.dumps(msgs)}
    assert normalise(recs[0].record, "openai") == msgs


def test_csv_header_is_stripped_and_blank_rows_are_skipped():
    data = b" prompt , completion\r\n\r\np1,c1\r\n,\r\np2,c2\r\n"
    recs = records(data, "csv")
    assert [(r.row, r.line, r.record) for r in recs] == [
        (1, 3, {"prompt": "p1", "completion": "c1"}),
        (2, 5, {"prompt": "p2", "completion": "c2"}),
    ]


@pytest.mark.parametrize("cells, n", [(["p2"], 1), (["p2", "c2", "extra"], 3)])
def test_csv_wrong_cell_count_is_wrong_type(cells, n):
    recs = records(_csv([["prompt", "completion"], ["p1", "c1"], cells, ["p3", "c3"]]), "csv")
    bad = recs[1]
    assert (bad.row, bad.line, bad.reason, bad.record) == (2, 3, "wrong_type", None)
    assert bad.detail == f"the row has {n} cells but the header has 2 columns"
    assert json.loads(bad.raw) == cells
    assert recs[2].record == {"prompt": "p3", "completion": "c3"}


def test_csv_bad_utf8_row_is_undecodable():
    data = b"prompt,completion\np1,c1\np2,bad \xff\np3,c3\n"
    recs = records(data, "csv")
    assert [r.reason for r in recs] == ["", "undecodable_text", ""]
    assert recs[1].line == 3
    recs[1].raw.encode("utf-8")


def test_csv_row_that_cannot_be_read_is_unparsable_csv():
    # the csv module refuses a cell above its field size limit (128 KiB)
    big = "x" * (csv.field_size_limit() + 10)
    recs = records(_csv([["prompt", "completion"], ["p1", "c1"], [big, "c2"], ["p3", "c3"]]), "csv")
    assert [r.reason for r in recs] == ["", "unparsable_csv", ""]
    assert recs[1].row == 2 and recs[1].line == 3
    assert "field larger than field limit" in recs[1].detail
    assert recs[2].record == {"prompt": "p3", "completion": "c3"}


def test_csv_empty_file_has_no_rows():
    assert records(b"", "csv") == []
    assert records(b"prompt,completion\n", "csv") == []


# ----------------------------------------------------------------------------------------- parquet


def _parquet(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def test_parquet_flat_columns():
    t = pa.table({"question": ["q1", "q2"], "answer": ["a1", None], "n": [1, 2]})
    recs = records(_parquet(t), "parquet")
    assert [(r.row, r.line) for r in recs] == [(1, None), (2, None)]
    assert recs[0].record == {"question": "q1", "answer": "a1", "n": 1}
    assert recs[1].record["answer"] is None
    assert json.loads(recs[1].raw) == {"question": "q2", "answer": None, "n": 2}


def test_parquet_nested_list_of_struct_messages():
    msgs = [[{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]]
    t = pa.table({"id": [1, 2], "messages": msgs})
    assert pa.types.is_list(t.schema.field("messages").type)
    assert pa.types.is_struct(t.schema.field("messages").type.value_type)
    recs = records(_parquet(t), "parquet")
    assert [r.record["messages"] for r in recs] == msgs
    assert normalise(recs[0].record, "openai") == msgs[0]


def test_parquet_many_batches_keep_row_numbers():
    n = 5000  # more than one reader batch
    recs = records(_parquet(pa.table({"prompt": [f"p{i}" for i in range(n)], "completion": ["c"] * n})), "parquet")
    assert [r.row for r in recs] == list(range(1, n + 1))
    assert recs[-1].record["prompt"] == f"p{n - 1}"


def test_damaged_parquet_is_one_reject():
    data = _parquet(pa.table({"a": [1, 2, 3]}))
    recs = records(data[: len(data) // 2], "parquet")
    assert len(recs) == 1
    assert (recs[0].row, recs[0].reason) == (1, "unparsable_parquet")
    assert recs[0].detail.startswith("the file is not readable Parquet")
    assert records(b"PAR1 not really", "parquet")[0].reason == "unparsable_parquet"


def test_reasons_from_formats_are_known():
    assert {"unparsable_json", "unparsable_csv", "unparsable_parquet", "undecodable_text", "wrong_type"} <= set(REJECT_REASONS)


# -------------------------------------------------------------------------------- list and detect


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("a.jsonl", "b.csv", "sub/c.jsonl", ".hidden.jsonl", "_SUCCESS", "sub/_tmp.json"):
        (tmp_path / name).write_text("{}\n")
    return tmp_path


def test_list_files_single_file(tree):
    assert list_files(str(tree / "a.jsonl")) == [str(tree / "a.jsonl")]
    assert list_files("file://" + str(tree / "a.jsonl")) == [str(tree / "a.jsonl")]


def test_list_files_relative_path_becomes_absolute(tree, monkeypatch):
    monkeypatch.chdir(tree)
    assert list_files("a.jsonl") == [str(tree / "a.jsonl")]


def test_list_files_glob(tree):
    assert list_files(str(tree / "*.jsonl")) == [str(tree / "a.jsonl")]
    assert list_files(str(tree / "**" / "*.jsonl")) == [str(tree / "a.jsonl"), str(tree / "sub" / "c.jsonl")]


def test_list_files_folder_is_recursive_sorted_and_skips_hidden(tree):
    assert list_files(str(tree)) == [str(tree / "a.jsonl"), str(tree / "b.csv"), str(tree / "sub" / "c.jsonl")]


def test_list_files_no_match(tree):
    assert list_files(str(tree / "nope.jsonl")) == []
    assert list_files(str(tree / "*.parquet")) == []


def test_read_bytes(tree):
    assert read_bytes(str(tree / "a.jsonl")) == b"{}\n"


@pytest.mark.parametrize("path, fmt", [
    ("x.json", "json"), ("x.jsonl", "jsonl"), ("x.ndjson", "jsonl"), ("X.CSV", "csv"),
    ("x.parquet", "parquet"), ("x.pq", "parquet"), ("s3://bucket/x.jsonl.gz", "jsonl"), ("x.csv.zst", "csv"),
])
def test_detect_format_from_extension(path, fmt):
    assert detect_format(path, "auto") == fmt


def test_detect_format_declared_wins():
    assert detect_format("data.txt", "jsonl") == "jsonl"


@pytest.mark.parametrize("path, ext", [("notes.txt", "'.txt'"), ("README", "'(none)'"), ("x.gz", "'(none)'")])
def test_detect_format_unknown_extension(path, ext):
    expected = f"cannot tell the format of '{path}' from its extension {ext}; set `format:` to one of json, jsonl, csv, parquet"
    with pytest.raises(SourceError, match=re.escape(expected)):
        detect_format(path, "auto")


def test_sample_kb_file_reads_line_by_line(sample_data_dir):
    recs = records(read_bytes(os.path.join(sample_data_dir, "kb.jsonl")), "jsonl")
    assert len(recs) == 125  # 126 physical lines, one blank
    by_line = {r.line: r for r in recs}
    assert 64 not in by_line
    assert by_line[51].reason == "undecodable_text"
    assert by_line[18].reason == "unparsable_json"
    assert by_line[35].reason == "wrong_type"
