"""Fuzzed rows and damaged files through the pipeline's real per-file stage (`plan_sources` + `parse_files`).

tests/integration/test_data_properties.py draws the schema and the format at random; here every schema meets
every format explicitly (no pair left to chance), with auto schema detection, column maps, a system prompt
and redaction, and the files are also damaged byte by byte (cut short, bytes flipped, invalid UTF-8 inserted).
For every file: never a crash, and every row the file holds comes out once, either kept as a valid
conversation or rejected with one of REJECT_REASONS and a detail.
"""
import json
import os
import tempfile

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rayft.data.config import DataConfig
from rayft.data.formats import SourceError
from rayft.data.pipeline import parse_files, plan_sources
from rayft.data.schemas import REJECT_REASONS, SCHEMAS
from tests.integration.test_data_properties import (
    FORMATS,
    as_schema,
    check_conversation,
    good_conversation,
    no_surrogates,
    random_row,
    write_rows,
)

PAIRS = [(s, f) for s in SCHEMAS for f in FORMATS]
FUZZ = settings(max_examples=15, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


def run_stage(data: bytes, fmt: str, schema: str, redact: bool, column_map=None, system_prompt=None):
    """Write one file, plan its source as the pipeline does, parse it; the output table as rows."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, f"src.{fmt}")
        with open(path, "wb") as f:
            f.write(data)
        cfg = DataConfig.model_validate({"sources": [{"path": path, "schema": schema, "column_map": column_map or {},
                                                      "system_prompt": system_prompt}], "redact_pii": redact})
        (p,) = plan_sources(cfg, log=lambda _: None)
        plan = {"index": p.index, "name": p.name, "config": p.config, "formats": p.formats, "schema": p.schema}
        out = parse_files(pa.table({"path": [path], "bytes": [data]}), plan, redact, cfg.rejects_sample_chars)
    return p.schema, out.to_pylist()


def check_every_row_judged(rows: list) -> tuple[int, int]:
    kept = 0
    for i, r in enumerate(rows, start=1):
        assert r["row"] == i, "one output row per input row, in file order"
        if r["reason"]:
            assert r["reason"] in REJECT_REASONS and r["detail"], r
            assert r["messages"] == "", r
        else:
            check_conversation(json.loads(r["messages"]))
            kept += 1
    return kept, len(rows) - kept


@pytest.mark.parametrize("schema, fmt", PAIRS)
@FUZZ
@given(data=st.data(), redact=st.booleans(), system_prompt=st.sampled_from([None, "You are helpful."]))
def test_fuzzed_rows_of_every_schema_and_format_are_kept_or_rejected_with_a_reason(schema, fmt, data, redact,
                                                                                   system_prompt):
    rows = data.draw(st.lists(random_row(schema, no_surrogates), max_size=8))
    raw, written = write_rows(rows, fmt)
    if written == 0:
        return  # nothing to read (an empty CSV has no header); covered by the property tests
    _, out = run_stage(raw, fmt, schema, redact, system_prompt=system_prompt)
    kept, rejected = check_every_row_judged(out)
    assert kept + rejected == written


@pytest.mark.parametrize("schema, fmt", PAIRS)
@FUZZ
@given(conversations=st.lists(good_conversation(), min_size=1, max_size=4), data=st.data())
def test_auto_detection_and_column_maps_keep_good_rows(schema, fmt, conversations, data):
    """Good rows written under renamed columns: `column_map` maps them back and `schema: auto` finds the layout."""
    pairs = [as_schema(schema, c) for c in conversations]
    renamed = {k: f"their_{k}" for row, _ in pairs for k in row}
    rows = [{renamed[k]: v for k, v in row.items()} for row, _ in pairs]
    raw, written = write_rows(rows, fmt)
    detected, out = run_stage(raw, fmt, "auto", data.draw(st.booleans()),
                              column_map={v: k for k, v in renamed.items()})
    kept, rejected = check_every_row_judged(out)
    assert (kept, rejected) == (written, 0)
    # alpaca/qa/prompt_completion rows with only their two columns look alike only in name: detection is by column
    assert detected == schema


def _damage(data: bytes, draw) -> bytes:
    """Cut short, flip bytes, insert invalid UTF-8 or structure characters: what a bad export or copy does."""
    b = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["cut", "flip", "insert", "delete"]))
        pos = draw(st.integers(0, max(0, len(b) - 1)))
        if kind == "cut":
            del b[pos:]
        elif kind == "flip" and b:
            b[pos] = draw(st.integers(0, 255))
        elif kind == "insert":
            b[pos:pos] = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b'"', b",", b"\n", b"{",
                                               b"]", b"\r\n", b"\xef\xbb\xbf"]))
        elif b:
            del b[pos:pos + draw(st.integers(1, 16))]
    return bytes(b)


@pytest.mark.parametrize("schema, fmt", PAIRS)
@FUZZ
@given(conversations=st.lists(good_conversation(), min_size=1, max_size=5), data=st.data(), redact=st.booleans())
def test_damaged_files_never_crash_and_every_row_read_is_judged(schema, fmt, conversations, data, redact):
    raw, _ = write_rows([as_schema(schema, c)[0] for c in conversations], fmt)
    damaged = _damage(raw, data.draw)
    try:
        _, out = run_stage(damaged, fmt, schema, redact)
    except SourceError as e:  # a file-level problem is refused as a whole, with a message, never a crash
        pytest.fail(f"schema set explicitly: planning must not need to read the file ({e})")
    check_every_row_judged(out)
    if fmt == "parquet" and damaged != raw:
        assert len(out) >= 1  # an unreadable Parquet file is one reject (unparsable_parquet), not silence


@FUZZ
@given(blob=st.binary(max_size=300), fmt=st.sampled_from(FORMATS), schema=st.sampled_from(SCHEMAS))
def test_random_bytes_in_any_format_never_crash(blob, fmt, schema):
    _, out = run_stage(blob, fmt, schema, redact=True)
    check_every_row_judged(out)


def test_a_damaged_parquet_row_group_rejects_its_rows_and_keeps_the_others(tmp_path):
    """Found by the fuzzer above: a damaged data page used to raise out of the reader and stop the whole run."""
    import pyarrow.parquet as pq

    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(6)]
    path = tmp_path / "qa.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=3, compression="none")
    data = bytearray(path.read_bytes())
    page = pq.ParquetFile(path).metadata.row_group(0).column(0).data_page_offset
    data[page:page + 8] = b"\xff" * 8  # the page header of the first group's first column
    _, out = run_stage(bytes(data), "parquet", "qa", redact=False)
    assert [r["reason"] for r in out] == ["unparsable_parquet"] * 3 + [""] * 3
    assert "row group 0 (rows 1-3)" in out[0]["detail"]
    assert [json.loads(r["messages"])[0]["content"] for r in out[3:]] == ["q3", "q4", "q5"]
