"""How the data stage cuts its input: JSON Lines byte ranges, Parquet row-group units, and sniffing that reads only
the head of a file. No Ray: these are the functions each read task and the planning driver call."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rayft.data import formats
from rayft.data.formats import head_records, iter_parquet_groups, iter_records, read_line_range
from rayft.data.pipeline import SourcePlan, plan_reads

LINE = st.one_of(
    st.just(""), st.just("\r"),  # blank lines, a bare CRLF
    st.text(alphabet="ab \u00e9\u65e5\u2028{}\":,", min_size=1, max_size=40).map(lambda t: json.dumps({"t": t})),
)


@settings(max_examples=60, deadline=None)
@given(lines=st.lists(LINE, min_size=1, max_size=30), trailing_newline=st.booleans(), block=st.integers(1, 80))
def test_line_ranges_hold_every_line_once(tmp_path_factory, lines, trailing_newline, block):
    """Ranges of any size, cut anywhere (inside a line, at a newline, inside a multi-byte character), together
    hold the file's bytes once, in order, and their line counts add up to the file's."""
    data = ("\n".join(lines) + ("\n" if trailing_newline else "")).encode()
    path = tmp_path_factory.mktemp("ranges") / "f.jsonl"
    path.write_bytes(data)
    pieces, lines_seen = [], 0
    for start in range(0, len(data), block):
        piece, n = read_line_range(str(path), start, min(start + block, len(data)), step=7)
        pieces.append(piece)
        lines_seen += n
    assert b"".join(pieces) == data
    assert lines_seen == data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)
    # And each piece parses on its own into the rows it holds: the file's rows, in order.
    whole = [r.record for r in iter_records(data, "jsonl")]
    parts = [r.record for p in pieces for r in iter_records(p, "jsonl")]
    assert parts == whole


def _plan(path: str, fmt: str) -> SourcePlan:
    return SourcePlan(0, "s", {}, [path], {path: fmt}, "qa", "set in the config")


def test_parquet_is_cut_into_whole_row_groups_that_cover_every_row_once(tmp_path):
    path = str(tmp_path / "f.parquet")
    rows = [{"question": f"q{i}", "answer": "a" * (i % 7)} for i in range(50)]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=10)  # five row groups
    units = plan_reads([_plan(path, "parquet")], block_bytes=1)  # every row group is larger than a byte
    assert [u["groups"] for u in units] == [[0], [1], [2], [3], [4]]
    assert [u["first_row"] for u in units] == [1, 11, 21, 31, 41]
    got = [(r.row, r.record) for u in units for r in iter_parquet_groups(path, u["groups"], u["first_row"], 4000)]
    assert got == [(i + 1, row) for i, row in enumerate(rows)]
    # A file smaller than the block: one unit, the whole file.
    assert [u["kind"] for u in plan_reads([_plan(path, "parquet")], block_bytes=1 << 30)] == ["file"]


def test_json_lines_are_cut_into_ranges_of_the_block_size(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}", "answer": "a"}) + "\n" for i in range(100)))
    size = path.stat().st_size
    units = plan_reads([_plan(str(path), "jsonl")], block_bytes=500)
    assert [(u["start"], u["stop"]) for u in units] == [(s, min(s + 500, size)) for s in range(0, size, 500)]
    assert {u["kind"] for u in units} == {"lines"}


@pytest.fixture
def reads(monkeypatch):
    """Every read_bytes limit asked for while sniffing."""
    asked = []
    real = formats.read_bytes

    def counting(path, limit=None, fs=None):
        asked.append(limit)
        return real(path, limit, fs)

    monkeypatch.setattr(formats, "read_bytes", counting)
    return asked


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "json"])
def test_sniffing_reads_only_the_head(tmp_path, reads, fmt):
    """A 2 MiB file whose tail is not even text: sniffing asks for its first 64 KiB and finds the rows there."""
    path = tmp_path / f"f.{fmt}"
    rows = [{"question": f"q{i}", "answer": "x" * 50} for i in range(3000)]
    if fmt == "jsonl":
        body = "".join(json.dumps(r) + "\n" for r in rows)
    elif fmt == "csv":
        body = "question,answer\n" + "".join(f"{r['question']},{r['answer']}\n" for r in rows)
    else:
        body = "[" + ",\n".join(json.dumps(r) for r in rows) + ",\n"
    path.write_bytes(body.encode() + b"\xff\xfe" * (1 << 20))
    got = list(head_records(str(path), fmt, 1 << 16))
    assert reads and all(limit is not None and limit <= (1 << 16) + 1 for limit in reads)
    assert 100 < len(got) < len(rows)
    assert [r.record for r in got] == rows[: len(got)]


def test_parquet_sniffing_reads_the_first_rows_of_the_first_row_group(tmp_path):
    path = str(tmp_path / "f.parquet")
    rows = [{"question": f"q{i}", "answer": "a"} for i in range(500)]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=200)
    got = list(head_records(path, "parquet", 1 << 16))
    assert [r.record for r in got] == rows[:64]
