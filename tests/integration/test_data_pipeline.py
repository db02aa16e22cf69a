"""The data pipeline on a local Ray, on the bundled sample data (examples/data/README.md lists its bad rows)."""
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from rayft.cluster.config import config_from_dict
from rayft.data.formats import SourceError
from rayft.data.pipeline import TokenizerSpec, plan_sources, prepare
from rayft.data.schemas import REJECT_REASONS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "examples" / "data"

EXPECTED_COUNTS = {  # source: (read, kept, rejected), from examples/data/README.md
    "support_qa": (165, 160, 5),
    "chats": (96, 90, 6),
    "kb": (125, 120, 5),  # 126 physical lines, one of them blank
    "tools_openai": (84, 80, 4),
    "tools_sharegpt": (63, 60, 3),
}

# (source, position in the README's terms, reason). support_qa, tools_sharegpt: array element; chats: data row;
# kb, tools_openai: physical line.
EXPECTED_REJECTS = {
    ("support_qa", 27, "empty_content"),
    ("support_qa", 41, "duplicate"),
    ("support_qa", 58, "missing_field"),
    ("support_qa", 88, "empty_content"),
    ("support_qa", 104, "duplicate"),
    ("chats", 14, "unparsable_json"),
    ("chats", 29, "unknown_role"),
    ("chats", 43, "no_assistant_turn"),
    ("chats", 57, "wrong_turn_order"),
    ("chats", 70, "orphan_tool_result"),
    ("chats", 84, "empty_content"),
    ("kb", 18, "unparsable_json"),
    ("kb", 35, "wrong_type"),
    ("kb", 51, "undecodable_text"),
    ("kb", 80, "too_long"),
    ("kb", 97, "duplicate"),
    ("tools_openai", 11, "bad_tool_arguments"),
    ("tools_openai", 23, "unknown_tool"),
    ("tools_openai", 37, "orphan_tool_result"),
    ("tools_openai", 52, "bad_tool_schema"),
    ("tools_sharegpt", 8, "bad_tool_arguments"),
    ("tools_sharegpt", 19, "unknown_tool"),
    ("tools_sharegpt", 44, "orphan_tool_result"),
}

PII = {"email": "jane.doe@example.com", "phone": "+1 415-555-0134", "card": "4111 1111 1111 1111", "ipv4": "10.20.30.40"}
PLACEHOLDERS = {"email": "[EMAIL]", "phone": "[PHONE]", "card": "[CARD]", "ipv4": "[IPV4]"}


TOOL_SOURCES = [{"name": "tools_openai", "path": str(DATA / "tools_openai.jsonl")},
                {"name": "tools_sharegpt", "path": str(DATA / "tools_sharegpt.json")}]


def sample_config(tiny_model_dir: str, with_tools: bool = False, **data_changes) -> dict:
    raw = {
        "name": "it-data",
        "model": {"name_or_path": tiny_model_dir},
        "data": {
            "sources": [
                {"name": "support_qa", "path": str(DATA / "support_qa.json"), "schema": "qa"},
                {"name": "chats", "path": str(DATA / "chats.csv")},
                {"name": "kb", "path": str(DATA / "kb.jsonl")},
            ],
            "max_seq_length": 512,
            "packing": True,
            "redact_pii": True,
            "eval_fraction": 0.1,
        },
    }
    if with_tools:
        raw["data"]["sources"] += TOOL_SOURCES
    raw["data"].update(data_changes)
    return raw


def run_prepare(raw: dict):
    cfg = config_from_dict(raw)
    logs = []
    prepared = prepare(cfg.data, TokenizerSpec(cfg.model.name_or_path), log=logs.append)
    prepared.logs = logs
    return prepared


def rows_of(ds) -> list[dict]:
    if ds is None:
        return []
    return [{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in r.items()} for r in ds.take_all()]


def source_report(prepared, name):
    return next(s for s in prepared.report["sources"] if s["name"] == name)


@pytest.fixture(scope="module")
def base(ray_local, tiny_model_dir):
    """The quickstart's data settings and sources: packing on, PII redaction on."""
    return run_prepare(sample_config(tiny_model_dir, with_tools=True))


@pytest.fixture(scope="module")
def base_rows(base):
    return {"train": rows_of(base.train), "eval": rows_of(base.eval), "rejects": rows_of(base.rejects)}


@pytest.fixture(scope="module")
def variant(ray_local, tiny_model_dir):
    """kb weighted 2.0, chats sent whole to eval, packing off, redaction off, truncate_end."""
    raw = sample_config(tiny_model_dir, packing=False, redact_pii=False, truncation="truncate_end")
    raw["data"]["sources"][1]["split"] = "eval"
    raw["data"]["sources"][2]["weight"] = 2.0
    return run_prepare(raw)


# ------------------------------------------------------------------------------------------ counts


def test_per_source_counts_match_the_sample_readme(base):
    for name, (read, kept, rejected) in EXPECTED_COUNTS.items():
        s = source_report(base, name)
        assert (s["read"], s["kept"], s["rejected"]) == (read, kept, rejected), name
        assert s["kept"] + s["rejected"] == s["read"]
        assert sum(s["rejected_by_reason"].values()) == s["rejected"]
        assert s["train_examples"] + s["eval_examples"] == s["kept"]
    t = base.report["totals"]
    assert (t["read"], t["kept"], t["rejected"]) == (386 + 147, 370 + 140, 16 + 7)
    assert t["duplicates_removed"] == 3
    assert t["train_examples"] + t["eval_examples"] == t["kept"]


def test_schema_detection_is_reported(base):
    assert source_report(base, "support_qa")["schema"] == "qa"
    assert source_report(base, "support_qa")["schema_note"] == "set in the config"
    assert source_report(base, "chats")["schema"] == "openai"
    assert source_report(base, "kb")["schema"] == "alpaca"
    assert source_report(base, "kb")["schema_note"].startswith("auto: ")
    assert any("source chats: 1 file(s), format csv, schema openai (auto:" in line for line in base.logs)


def test_every_bad_row_is_rejected_with_its_reason_and_position(base_rows):
    got = set()
    for r in base_rows["rejects"]:
        assert r["reason"] in REJECT_REASONS
        assert r["raw"], f"a reject keeps its raw row: {r}"
        if r["source"] == "kb":
            got.add((r["source"], r["line"], r["reason"]))  # kb positions are physical lines
        else:
            got.add((r["source"], r["row"], r["reason"]))
    assert got == EXPECTED_REJECTS
    assert len(base_rows["rejects"]) == len(EXPECTED_REJECTS)


def test_reject_positions_and_details(base_rows):
    rej = {(r["source"], r["row"]): r for r in base_rows["rejects"]}
    # JSON array elements have no line; CSV rows are one line below their data row (the header)
    assert rej[("support_qa", 27)]["line"] == -1
    assert rej[("chats", 29)]["line"] == 30
    # kb: row numbers skip the blank line 64, lines do not
    assert rej[("kb", 18)]["line"] == 18
    assert rej[("kb", 79)]["line"] == 80
    assert rej[("kb", 96)]["line"] == 97
    assert rej[("support_qa", 41)]["detail"] == "same conversation as support_qa.json row 9"
    assert rej[("support_qa", 104)]["detail"] == "same conversation as support_qa.json row 66"
    assert rej[("kb", 96)]["detail"] == "same conversation as kb.jsonl row 22"
    assert re.fullmatch(r"(\d+) tokens > max_seq_length 512, and \1 after dropping the oldest turns", rej[("kb", 79)]["detail"])
    assert rej[("support_qa", 58)]["detail"] == "answer is missing"
    assert rej[("chats", 29)]["detail"] == ("messages[2].role is 'moderator'; expected system, user, assistant or tool "
                                            "(ShareGPT: human, gpt, function_call, observation)")
    assert re.match(r"message \d tool_calls\[0\] calls 'get_leave_balanse', which the row's tools do not declare",
                    rej[("tools_openai", 23)]["detail"])
    assert rej[("tools_sharegpt", 44)]["detail"].startswith("message 1 is a tool result, but no assistant tool call")
    assert rej[("kb", 51)]["detail"] == "the line is not valid UTF-8"
    assert "\\xff\\xfe" in rej[("kb", 51)]["raw"], "the raw row shows the bad bytes"
    assert rej[("support_qa", 27)]["file"] == str(DATA / "support_qa.json")
    assert json.loads(rej[("support_qa", 58)]["raw"])["question"] == "Can I expense a parking ticket?"


def test_dataset_examples_match_the_report(base, base_rows):
    t = base.report["totals"]
    assert sum(r["num_examples"] for r in base_rows["train"]) == t["train_examples"] == t["train_rows_after_weights"]
    assert sum(r["num_examples"] for r in base_rows["eval"]) == t["eval_examples"]
    assert t["eval_examples"] > 0 and t["train_examples"] > t["eval_examples"]
    assert base.report["splits"]["train"]["rows"] == len(base_rows["train"])
    assert base.report["splits"]["train"]["tokens"] == sum(r["num_tokens"] for r in base_rows["train"])
    assert base.report["sequence_length"]["examples"] == t["kept"]


def test_packing_wastes_under_5_percent(base, base_rows):
    assert base.packed
    rows = base_rows["train"]
    assert all(len(r["input_ids"]) == 512 for r in rows)
    real = sum(r["num_tokens"] for r in rows)
    pads = sum(int((np.asarray(r["input_ids"])[r["num_tokens"]:] == base.pad_token_id).sum()) for r in rows)
    assert pads == 512 * len(rows) - real  # padding tokens are exactly the tail after num_tokens
    waste = pads / (512 * len(rows))
    assert waste < 0.05
    assert base.report["splits"]["train"]["padding_waste"] == pytest.approx(waste, abs=1e-4)


def test_packed_rows_keep_examples_apart(base, base_rows):
    for r in base_rows["train"]:
        pos, lab = np.asarray(r["position_ids"]), np.asarray(r["labels"])
        starts = np.flatnonzero(pos == 0)
        examples = [s for s in starts if s < r["num_tokens"]]
        assert len(examples) == r["num_examples"]
        assert (lab[examples] == -100).all(), "no label at the first token of an example"
        assert (lab[r["num_tokens"]:] == -100).all()
        assert r["num_loss_tokens"] == int((lab != -100).sum()) > 0


def test_same_config_twice_gives_identical_rows(base, base_rows, tiny_model_dir):
    again = run_prepare(sample_config(tiny_model_dir, with_tools=True))
    assert rows_of(again.train) == base_rows["train"]
    assert rows_of(again.eval) == base_rows["eval"]
    strip = lambda rep: {k: v for k, v in rep.items() if k != "seconds"}  # noqa: E731
    assert strip(again.report) == strip(base.report)


# ------------------------------------------------------------------------- weight, split, packing


def test_weight_2_doubles_a_sources_train_examples(base, variant):
    kb_base, kb = source_report(base, "kb"), source_report(variant, "kb")
    qa = source_report(variant, "support_qa")
    assert kb["weight"] == 2.0
    # the split is seeded by content, so the same kb rows are in train in both runs (plus line 80, now truncated)
    assert kb["train_examples"] in (kb_base["train_examples"], kb_base["train_examples"] + 1)
    rows = rows_of(variant.train)
    assert len(rows) == qa["train_examples"] + 2 * kb["train_examples"]
    assert variant.report["totals"]["train_rows_after_weights"] == len(rows)
    # every kb example is there exactly twice, every support_qa example once
    copies = Counter(Counter(tuple(r["input_ids"]) for r in rows).values())
    assert copies == {1: qa["train_examples"], 2: kb["train_examples"]}


def test_split_eval_source_lands_fully_in_eval(variant):
    chats = source_report(variant, "chats")
    assert (chats["train_examples"], chats["eval_examples"]) == (0, 90)
    eval_rows = rows_of(variant.eval)
    assert len(eval_rows) == variant.report["totals"]["eval_examples"]
    assert variant.report["totals"]["eval_examples"] == 90 + sum(
        source_report(variant, n)["eval_examples"] for n in ("support_qa", "kb"))
    # chats are multi-turn: their rows have several trained-on spans; count rows that do
    def spans(r):
        lab = np.asarray(r["labels"]) != -100
        return int(lab[0]) + int((lab[1:] & ~lab[:-1]).sum())
    assert sum(spans(r) >= 2 for r in eval_rows) >= 90
    assert sum(spans(r) >= 2 for r in rows_of(variant.train)) == 0, "no multi-turn chat in train"


def test_packing_off_gives_one_example_per_row(variant):
    assert not variant.packed
    rows = rows_of(variant.train)
    assert rows and all(r["num_examples"] == 1 for r in rows)
    assert all(len(r["input_ids"]) == r["num_tokens"] == len(r["labels"]) for r in rows)
    assert all(r["position_ids"] == list(range(r["num_tokens"])) for r in rows)
    assert len({len(r["input_ids"]) for r in rows}) > 10, "rows keep their own length, no fixed padding"
    assert max(r["num_tokens"] for r in rows) <= 512
    split = variant.report["splits"]["train"]
    assert split["packed"] is False and split["block_length"] is None
    assert split["padding_basis"].startswith("batches of 8")


def test_truncate_end_keeps_the_long_row(variant):
    kb = source_report(variant, "kb")
    assert (kb["kept"], kb["rejected"], kb["truncated"]) == (121, 4, 1)
    assert "too_long" not in kb["rejected_by_reason"]
    assert kb["kept"] + kb["rejected"] == kb["read"]


# ------------------------------------------------------------------------------------------ redact


def decoded(tokenizer, rows):
    return [tokenizer.decode(r["input_ids"][: r["num_tokens"]], skip_special_tokens=False) for r in rows]


def test_redact_pii_removes_pii_from_every_kept_conversation(base, base_rows, variant, tiny_tokenizer):
    texts = decoded(tiny_tokenizer, base_rows["train"] + base_rows["eval"])
    joined = "\n".join(texts)
    for kind, value in PII.items():
        assert value not in joined, f"{kind} {value!r} survived redaction"
        assert PLACEHOLDERS[kind] in joined
    for part in ("jane.doe", "415-555-0134", "4111", "10.20.30.40"):
        assert part not in joined
    qa = source_report(base, "support_qa")
    assert qa["pii_redacted"] == {"email": 1, "card": 1, "ipv4": 1, "phone": 1}
    assert source_report(base, "chats")["pii_redacted"] == {"email": 0, "card": 0, "ipv4": 0, "phone": 0}
    assert base.report["totals"]["pii_redacted"] == {"email": 1, "card": 1, "ipv4": 1, "phone": 1}
    # the control: without redaction the same strings are in the data
    plain = "\n".join(decoded(tiny_tokenizer, rows_of(variant.train) + rows_of(variant.eval)))
    for value in PII.values():
        assert value in plain
    assert variant.report["totals"]["pii_redacted"] == {"email": 0, "card": 0, "ipv4": 0, "phone": 0}


# ------------------------------------------------------------------------------ sources that fail


def test_source_errors_before_any_work(tmp_path, tiny_model_dir):
    def cfg(**src):
        return config_from_dict(sample_config(tiny_model_dir, sources=[src])).data

    with pytest.raises(SourceError, match=r"data\.sources\.0 \(nothing\): path '.*nothing\.jsonl' matches no file"):
        plan_sources(cfg(path=str(tmp_path / "nothing.jsonl")), log=lambda _: None)
    (tmp_path / "notes.txt").write_text("hello\n")
    with pytest.raises(SourceError, match=r"data\.sources\.0 \(notes\): cannot tell the format of .*notes\.txt"):
        plan_sources(cfg(path=str(tmp_path / "notes.txt")), log=lambda _: None)
    (tmp_path / "tickets.jsonl").write_text('{"ticket": "VPN broken", "reply": "Reinstall"}\n')
    with pytest.raises(SourceError, match=r"cannot detect the schema from columns \['reply', 'ticket'\]\. Set `schema:`"):
        plan_sources(cfg(path=str(tmp_path / "tickets.jsonl")), log=lambda _: None)
    # with a column map, the same file is fine
    plans = plan_sources(cfg(path=str(tmp_path / "tickets.jsonl"), column_map={"ticket": "question", "reply": "answer"}), log=lambda _: None)
    assert plans[0].schema == "qa"


# --------------------------------------------------------------------------------------------- CLI


def _cli(*args, timeout):
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "rayft.cluster.cli", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_data_prepare_writes_parquet_rejects_and_report(tmp_path, tiny_model_dir):
    out = tmp_path / "prepared"
    r = _cli("data", "prepare", "examples/quickstart.yaml", "--out", out, "--set", f"model.name_or_path={tiny_model_dir}", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "TOTAL" in r.stdout and "rejected in kb:" in r.stdout and "rejected in tools_sharegpt:" in r.stdout
    assert "padding waste" in r.stdout

    report = json.loads((out / "report.json").read_text())
    for name, (read, kept, rejected) in EXPECTED_COUNTS.items():
        s = next(s for s in report["sources"] if s["name"] == name)
        assert (s["read"], s["kept"], s["rejected"]) == (read, kept, rejected)

    train = pq.read_table(out / "train")
    evals = pq.read_table(out / "eval")
    for t in (train, evals):
        assert {"input_ids", "labels", "position_ids", "num_tokens", "num_loss_tokens", "num_examples"} <= set(t.column_names)
        assert {len(x) for x in t["input_ids"].to_pylist()} == {512}
    assert sum(train["num_examples"].to_pylist()) == report["totals"]["train_examples"]
    assert sum(evals["num_examples"].to_pylist()) == report["totals"]["eval_examples"]

    lines = (out / "rejects.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(EXPECTED_REJECTS) == report["outputs"]["rejects_rows"]  # the quickstart reads all five sources
    rejects = [json.loads(line) for line in lines]
    for rec in rejects:
        assert list(rec) == ["source", "file", "row", "line", "reason", "detail", "raw"]
        assert rec["reason"] in REJECT_REASONS and rec["raw"]
    got = {(x["source"], x["line"] if x["source"] == "kb" else x["row"], x["reason"]) for x in rejects}
    assert got == EXPECTED_REJECTS
    assert all(x["line"] is None for x in rejects if x["source"] == "support_qa")


def test_cli_data_inspect_marks_trained_spans(tiny_model_dir):
    r = _cli("data", "inspect", "examples/quickstart.yaml", "-n", "5", "--set", f"model.name_or_path={tiny_model_dir}", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert out.count("=== ") == 5  # one example of each of the quickstart's five sources
    assert "(5 example(s); trained-on tokens are between [[ and ]])" in out
    assert "\033[" not in out  # not a terminal: no colour codes
    body = out.rsplit("\n\n(", 1)[0]  # the examples, without the closing legend
    spans = [s.split("]]")[0] for s in body.split("[[")[1:]]
    assert len(spans) >= 3  # a single-turn Q&A and a multi-turn chat
    assert spans and all(s.endswith("<|im_end|>\n") for s in spans)
    assert all("<|im_start|>" not in s for s in spans), "role headers are never trained on"
    assert "=== support_qa support_qa.json row 1:" in out
    # tool-calling rows: the tool list and the tool results are shown, never trained on; the calls are
    tool_blocks = [b for b in body.split("=== ") if b.startswith(("tools_openai", "tools_sharegpt"))]
    assert len(tool_blocks) == 2
    for block in tool_blocks:
        spans = [s.split("]]")[0] for s in block.split("[[")[1:]]
        assert any(s.startswith("<tool_call>\n{\"name\": ") for s in spans), block
        assert "<tools>" in block and "<tool_response>" in block
        assert not any("<tools>" in s or "<tool_response>" in s for s in spans)
