"""Data privacy at read time, through the pipeline's own parse stage (data.pipeline.parse_files, no Ray):
columns a source has but its schema does not read (an `ssn`, `internal_notes`) never reach the prepared rows or
the rejects file, and `redact_pii` removes PII from realistic support rows, in the messages and in the raw text
a reject keeps."""
import csv
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq

from rayft.data.config import DataConfig
from rayft.data.pipeline import parse_files, plan_sources

SSN = "078-05-1120"
NOTE = "VIP - refund approved by J. Smith, do not share"

ROWS = [
    {"customer_id": "C-1001", "ssn": SSN, "internal_notes": NOTE,
     "question": "I was charged twice on card 4111 1111 1111 1111, can you refund one? Reach me at "
                 "maria.lopez@example.com or +1 415-555-0134.",
     "answer": "Sorry about that! I have refunded the duplicate charge; it shows up in 3-5 business days."},
    {"customer_id": "C-1002", "ssn": "219-09-9999", "internal_notes": "escalated twice",
     "question": "My VPN drops every hour. My laptop is on 10.20.30.40.", "answer": ""},  # empty: a reject
    {"customer_id": "C-1003", "ssn": "457-55-5462", "internal_notes": "churn risk",
     "question": "Can I move my plan to the annual billing?",
     "answer": "Yes: Settings > Billing > Switch to annual. Call us on 020 7946 0958 if it fails."},
]


def _write(tmp_path, fmt):
    path = tmp_path / f"tickets.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(ROWS[0]))
        w.writeheader()
        w.writerows(ROWS)
        path.write_text(buf.getvalue())
    else:
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    return path


def _parse(tmp_path, fmt, redact_pii):
    path = _write(tmp_path, fmt)
    cfg = DataConfig(sources=[{"path": str(path), "name": "tickets"}], redact_pii=redact_pii)
    (p,) = plan_sources(cfg, log=lambda _: None)
    assert p.schema == "qa"  # detected from question/answer; the other columns are not read
    plan = {"index": p.index, "name": p.name, "config": p.config, "formats": p.formats, "schema": p.schema}
    batch = pa.table({"path": [p.files[0]], "bytes": [path.read_bytes()]})
    return parse_files(batch, plan, redact_pii, cfg.rejects_sample_chars).to_pylist()


def test_unused_columns_never_reach_rows_or_rejects(tmp_path):
    for fmt in ("jsonl", "csv", "parquet"):
        rows = _parse(tmp_path, fmt, redact_pii=False)
        assert [r["reason"] for r in rows] == ["", "empty_content", ""], fmt
        everything = json.dumps(rows)
        for secret in (SSN, "219-09-9999", NOTE, "churn risk", "C-1002", "customer_id", "internal_notes"):
            assert secret not in everything, (fmt, secret)
        reject = json.loads(rows[1]["raw"])  # what the rejects file would show: the fields that were used
        assert reject == {"question": ROWS[1]["question"], "answer": ""}, fmt
        msgs = json.loads(rows[0]["messages"])
        assert msgs[0]["content"] == ROWS[0]["question"] and msgs[1]["content"] == ROWS[0]["answer"]


def test_redaction_on_realistic_rows_covers_messages_and_rejects(tmp_path):
    rows = _parse(tmp_path, "jsonl", redact_pii=True)
    first = json.loads(rows[0]["messages"])
    assert first[0]["content"] == ("I was charged twice on card [CARD], can you refund one? Reach me at [EMAIL] "
                                   "or [PHONE].")
    assert first[1]["content"] == ROWS[0]["answer"]  # "3-5 business days" is not a phone number
    assert (rows[0]["pii_card"], rows[0]["pii_email"], rows[0]["pii_phone"]) == (1, 1, 1)
    assert json.loads(rows[1]["raw"])["question"] == "My VPN drops every hour. My laptop is on [IPV4]."
    assert json.loads(rows[2]["messages"])[1]["content"].endswith("Call us on [PHONE] if it fails.")
    text = json.dumps(rows)
    for pii in ("4111 1111 1111 1111", "maria.lopez@example.com", "415-555-0134", "10.20.30.40", "7946 0958"):
        assert pii not in text
