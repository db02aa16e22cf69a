"""The data pipeline on Ray Data: sources -> conversations -> (input_ids, labels) blocks.

    read files -> parse + normalise + validate + redact   (one task per file, rows keep source/row/line)
               -> dedup (keys gathered on the driver, first occurrence wins)
               -> render chat + loss mask + tokenize + truncation policy + split
               -> train: weight, pack | eval: pack       -> ray.data.Dataset each
    every rejected row -> rejects (source, file, row, line, reason, detail, raw)

Nothing is dropped without a trace: for every source, read = kept + rejected (duplicates are a
reject reason). Ray must be initialised by the caller (cluster/ owns the connection).
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import pyarrow as pa

from .chat import fit_conversation, render_segments, tokenize_segments
from .config import DataConfig, SourceConfig
from .formats import SourceError, detect_format, iter_records, list_files, read_bytes
from .pack import pack_flat, padding_waste_unpacked, single_flat
from .redact import PII_KINDS, redact, redact_messages
from .schemas import SCHEMAS, Reject, apply_column_map, content_key, detect_schema, normalise, used_columns

PEEK_ROWS = 50
BLOCK_ROWS = 2048  # rows per block after reading: enough blocks to keep every CPU busy


@dataclass(frozen=True)
class TokenizerSpec:
    """Which tokenizer to load in each worker (data/ does not know the model section)."""

    name_or_path: str
    revision: Optional[str] = None
    trust_remote_code: bool = False


@functools.lru_cache(maxsize=4)
def load_tokenizer(spec: TokenizerSpec):
    import os

    # Each Ray task tokenizes on its own core; the tokenizer's own thread pool would oversubscribe them.
    if _in_ray_worker():
        os.environ.setdefault("RAYON_NUM_THREADS", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(
            spec.name_or_path, revision=spec.revision, trust_remote_code=spec.trust_remote_code
        )
    except OSError as e:
        raise SourceError(
            f"model.tokenizer {spec.name_or_path!r} cannot be loaded: {e}. Give a hub id or a folder holding "
            f"tokenizer files (for a local test model: rayft tiny-model DIR)"
        ) from None
    return tok


def _in_ray_worker() -> bool:
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE
    except Exception:  # outside Ray, or an API change: behave as the driver
        return False


def pad_token_id(tok) -> int:
    for tid in (tok.pad_token_id, tok.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


@dataclass
class SourcePlan:
    index: int
    name: str
    config: dict  # SourceConfig as a plain dict (shipped to workers)
    files: list[str]
    formats: dict[str, str]
    schema: str
    schema_note: str


@dataclass
class Prepared:
    train: Any  # ray.data.Dataset of packed (or single) examples
    eval: Any  # ray.data.Dataset, or None when there is no eval split
    rejects: Any  # ray.data.Dataset of rejected rows
    report: dict
    packed: bool
    pad_token_id: int
    plans: list[SourcePlan] = field(default_factory=list)


# ----------------------------------------------------------------------------------------- planning


def plan_sources(cfg: DataConfig, log: Callable[[str], None] = print) -> list[SourcePlan]:
    """List each source's files and settle its format and schema (auto detection happens here)."""
    plans = []
    for i, src in enumerate(cfg.sources):
        where = f"data.sources.{i} ({src.display_name})"
        files = list_files(src.path)
        if not files:
            raise SourceError(f"{where}: path {src.path!r} matches no file; check the path, glob or folder")
        formats = {}
        for f in files:
            try:
                formats[f] = detect_format(f, src.format)
            except SourceError as e:
                raise SourceError(f"{where}: {e}") from None
        schema, note = src.data_schema, "set in the config"
        if schema == "auto":
            schema, note = _detect(src, files, formats, where, cfg.rejects_sample_chars)
        plans.append(SourcePlan(i, src.display_name, src.model_dump(by_alias=False), files, formats, schema, note))
        fmts = sorted(set(formats.values()))
        log(f"source {src.display_name}: {len(files)} file(s), format {'/'.join(fmts)}, schema {schema} ({note})")
    return plans


def _detect(src: SourceConfig, files: list[str], formats: dict, where: str, limit: int) -> tuple[str, str]:
    records, columns = [], set()
    for f in files:
        for rec in iter_records(_head(f, formats[f]), formats[f], limit):
            if rec.record is not None:
                r = apply_column_map(rec.record, src.column_map)
                records.append(r)
                columns.update(r)
            if len(records) >= PEEK_ROWS:
                break
        if len(records) >= PEEK_ROWS:
            break
    schema, votes = detect_schema(records)
    if schema is None:
        raise SourceError(
            f"{where}: cannot detect the schema from columns {sorted(columns) or '(no readable rows)'}. Set `schema:` "
            f"to one of {', '.join(SCHEMAS)}, or map columns with `column_map:` (for example "
            f"{{ticket: question, reply: answer}}). Expected columns: messages (openai), conversations (sharegpt), "
            f"instruction+output (alpaca), prompt+completion, question+answer (qa)"
        )
    n = sum(votes.values())
    return schema, f"auto: {votes[schema]}/{len(records)} sampled rows look like {schema}" + (
        f", others {dict(votes)}" if n != votes[schema] else ""
    )


def _filesystem_of(files: list[str]):
    """The filesystem Ray Data reads remote sources with (the configured endpoint; None: local files)."""
    from .storage import filesystem, is_uri

    return filesystem(files[0])[0] if files and is_uri(files[0]) else None


def _head(path: str, fmt: str, nbytes: int = 1 << 20) -> bytes:
    # Line formats are sniffed from their first MiB only (a ranged read on S3); JSON and Parquet need the whole file.
    data = read_bytes(path, nbytes + 1 if fmt in ("jsonl", "csv") else None)
    if fmt in ("jsonl", "csv") and len(data) > nbytes:
        cut = data.rfind(b"\n", 0, nbytes)
        data = data[: cut if cut > 0 else nbytes]
    return data


# ------------------------------------------------------------------------------- stage 1: normalise


def _row_id(source_idx: int, file: str, row: int) -> str:
    return f"{source_idx}\x1f{file}\x1f{row}"


_PARSED_COLUMNS = ("source_idx", "source", "file", "row", "line", "reason", "detail", "raw", "messages", "key") + tuple(
    "pii_" + k for k in PII_KINDS)


def parse_files(batch: pa.Table, plan: dict, redact_pii: bool, raw_limit: int) -> pa.Table:
    """Files -> one output row per input row, kept or rejected (columns built directly, no row dicts)."""
    src = plan["config"]
    cols: dict[str, list] = {c: [] for c in _PARSED_COLUMNS}
    for path, data in zip(batch["path"].to_pylist(), batch["bytes"].to_pylist()):
        fmt = _format_of(plan["formats"], path)
        for rec in iter_records(data, fmt, raw_limit):
            reason, detail, raw, messages_json, key = rec.reason, rec.detail, rec.raw, "", ""
            counts = None
            if rec.record is not None:
                # Columns the schema does not read are dropped here, also from the raw text a reject keeps.
                record = used_columns(rec.record, plan["schema"], src["column_map"])
                if len(record) != len(rec.record):
                    raw = json.dumps(record, ensure_ascii=False, default=str)
                try:
                    messages = normalise(apply_column_map(record, src["column_map"]), plan["schema"], src["system_prompt"])
                    if redact_pii:
                        messages, counts = redact_messages(messages)
                    messages_json = json.dumps(messages, ensure_ascii=False)
                    key = hashlib.blake2b(content_key(messages).encode(), digest_size=16).hexdigest()
                except Reject as r:
                    reason, detail = r.reason, r.detail
            if len(raw) > raw_limit:
                raw = raw[:raw_limit] + f"... [cut: {len(raw)} characters in all]"
            if redact_pii:
                raw = redact(raw)[0]  # the raw text may reach the rejects file
            for c, v in (("source_idx", plan["index"]), ("source", plan["name"]), ("file", path), ("row", rec.row),
                         ("line", rec.line if rec.line is not None else -1), ("reason", reason), ("detail", detail),
                         ("raw", raw), ("messages", messages_json), ("key", key)):
                cols[c].append(v)
            for k in PII_KINDS:
                cols["pii_" + k].append(counts[k] if counts else 0)
    types = {"source_idx": pa.int32(), "row": pa.int64(), "line": pa.int64(), **{"pii_" + k: pa.int32() for k in PII_KINDS}}
    return pa.table({c: pa.array(v, type=types.get(c, pa.string())) for c, v in cols.items()})


def _format_of(formats: dict, path: str) -> str:
    if path in formats:
        return formats[path]
    for k, v in formats.items():  # Ray may report a URI's path without its scheme
        if k.split("://", 1)[-1] == path.split("://", 1)[-1]:
            return v
    raise SourceError(f"file {path!r} was not planned for this source")


# --------------------------------------------------------------------------------- stage 2: render


def _unit_hash(seed: int, salt: str, key: str) -> float:
    h = hashlib.blake2b(f"{seed}:{salt}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64


def render_batch(batch: pa.Table, spec: TokenizerSpec, cfg: dict, split_of: dict) -> pa.Table:
    """Tokenize kept rows, apply the truncation policy, choose the split."""
    tok = load_tokenizer(spec)
    n = batch.num_rows
    reason = batch["reason"].to_pylist()
    detail = batch["detail"].to_pylist()
    source_idx = batch["source_idx"].to_pylist()
    keys = batch["key"].to_pylist()
    todo = [i for i in range(n) if not reason[i]]
    messages_col = batch["messages"]
    convs = [json.loads(messages_col[i].as_py()) for i in todo]
    rendered = tokenize_segments([render_segments(m, tok, cfg["chat_template"]) for m in convs], tok)
    input_ids: list = [[] for _ in range(n)]
    masks: list = [[] for _ in range(n)]
    truncated = [False] * n
    split = [""] * n
    for i, messages, (ids, mask) in zip(todo, convs, rendered):
        ids, mask, cut, why = fit_conversation(
            messages, tok, cfg["max_seq_length"], cfg["truncation"], cfg["chat_template"], rendered=(ids, mask)
        )
        if ids is None:
            reason[i], detail[i] = "too_long", why
            continue
        if not any(mask):
            reason[i], detail[i] = "empty_content", "no assistant token after rendering"
            continue
        input_ids[i], masks[i], truncated[i] = ids, mask, cut
        fixed = split_of.get(source_idx[i])
        if fixed:
            split[i] = fixed
        else:
            split[i] = "eval" if _unit_hash(cfg["seed"], "split", keys[i]) < cfg["eval_fraction"] else "train"
    out = batch.drop_columns(["messages", "reason", "detail"])  # from here on a kept row carries tokens, not text
    lengths = np.fromiter((len(x) for x in input_ids), dtype=np.int64, count=n)
    flat_ids = np.fromiter((t for x in input_ids for t in x), dtype=np.int32, count=int(lengths.sum()))
    flat_mask = np.fromiter((t for x in masks for t in x), dtype=np.int8, count=int(lengths.sum()))
    for name, values in (
        ("reason", pa.array(reason, type=pa.string())), ("detail", pa.array(detail, type=pa.string())),
        ("input_ids", _list_array(flat_ids, lengths, pa.int32())), ("loss_mask", _list_array(flat_mask, lengths, pa.int8())),
        ("num_tokens", pa.array(lengths.astype(np.int32))), ("truncated", pa.array(truncated, type=pa.bool_())),
        ("split", pa.array(split, type=pa.string())),
    ):
        out = out.append_column(name, values)
    return out


def mark_duplicates(batch: pa.Table, duplicates_ref) -> pa.Table:
    """Reject later copies of a conversation; drop the raw text of kept rows (only rejects need it)."""
    import pyarrow.compute as pc

    dups = _get_cached(duplicates_ref) if duplicates_ref is not None else {}
    reason = batch["reason"].to_pylist()
    detail = batch["detail"].to_pylist()
    if dups:
        src, files, rows = (batch[c].to_pylist() for c in ("source_idx", "file", "row"))
        for i in range(batch.num_rows):
            if not reason[i]:
                hit = dups.get(_row_id(src[i], files[i], rows[i]))
                if hit:
                    reason[i], detail[i] = "duplicate", f"same conversation as {hit}"
    reason_arr = pa.array(reason, type=pa.string())
    kept = pc.equal(reason_arr, "")
    raw = pc.if_else(kept, pa.scalar("", pa.string()), batch["raw"].combine_chunks().cast(pa.string()))
    batch = batch.set_column(batch.schema.get_field_index("reason"), "reason", reason_arr)
    batch = batch.set_column(batch.schema.get_field_index("detail"), "detail", pa.array(detail, type=pa.string()))
    return batch.set_column(batch.schema.get_field_index("raw"), "raw", raw)


_CACHE: dict = {}


def _get_cached(ref):
    import ray

    key = ref.hex() if hasattr(ref, "hex") else id(ref)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = ray.get(ref)
    return _CACHE[key]


# ----------------------------------------------------------------------------------- stage 3: pack


def select_split(batch: pa.Table, split: str, weights: dict, seed: int) -> pa.Table:
    """Rows of one split; in train, each row repeated by its source weight (deterministically)."""
    import pyarrow.compute as pc

    t = batch.filter(pc.and_(pc.equal(batch["reason"], ""), pc.equal(batch["split"], split)))
    t = t.select(["source_idx", "key", "input_ids", "loss_mask"])
    if split != "train" or all(w == 1.0 for w in weights.values()) or t.num_rows == 0:
        return t
    take = []
    src = t["source_idx"].to_pylist()
    keys = t["key"].to_pylist()
    for i, (s, k) in enumerate(zip(src, keys)):
        w = weights[s]
        copies = int(math.floor(w)) + (1 if _unit_hash(seed, "weight", k) < w - math.floor(w) else 0)
        take.extend([i] * copies)
    return t.take(pa.array(take, type=pa.int64()))


def _list_array(flat: np.ndarray, lengths: np.ndarray, value_type) -> pa.Array:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=value_type))


def pack_batch(batch: pa.Table, block_len: int, pad_id: int, packing: bool) -> pa.Table:
    import pyarrow.compute as pc

    ids_col = batch["input_ids"].combine_chunks()
    lengths = pc.list_value_length(ids_col).to_numpy(zero_copy_only=False).astype(np.int64)
    flat_ids = ids_col.flatten().to_numpy(zero_copy_only=False)
    flat_mask = batch["loss_mask"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
    if packing:
        out = pack_flat(lengths, flat_ids, flat_mask, block_len, pad_id)
        row_len = np.full(len(out["num_tokens"]), block_len, dtype=np.int64)
        cols = {k: _list_array(out[k].reshape(-1), row_len, pa.int32()) for k in ("input_ids", "labels", "position_ids")}
    else:
        out = single_flat(lengths, flat_ids, flat_mask)
        cols = {k: _list_array(out[k], lengths, pa.int32()) for k in ("input_ids", "labels", "position_ids")}
    for k in ("num_tokens", "num_loss_tokens", "num_examples"):
        cols[k] = pa.array(out[k], type=pa.int32())
    return pa.table(cols)


# ---------------------------------------------------------------------------------------- the run


def prepare(
    cfg: DataConfig,
    tokenizer: TokenizerSpec,
    micro_batch_size: int = 8,
    log: Callable[[str], None] = print,
    pack_batch_rows: int = 4096,
) -> Prepared:
    """Run the whole pipeline. Raises SourceError for a source that cannot be used at all."""
    import ray
    import ray.data
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = True  # same config, same data order: resumable and reproducible
    t0 = time.perf_counter()
    tok = load_tokenizer(tokenizer)
    pad_id = pad_token_id(tok)
    plans = plan_sources(cfg, log)

    parts = []
    for p in plans:
        plan = {"index": p.index, "name": p.name, "config": p.config, "formats": p.formats, "schema": p.schema}
        ds = ray.data.read_binary_files(p.files, include_paths=True, filesystem=_filesystem_of(p.files))
        parts.append(ds.map_batches(parse_files, batch_format="pyarrow", batch_size=1, fn_kwargs={
            "plan": plan, "redact_pii": cfg.redact_pii, "raw_limit": cfg.rejects_sample_chars}))
    # One task reads a whole file; smaller blocks afterwards keep every CPU busy while rendering.
    conf = {"max_seq_length": cfg.max_seq_length, "truncation": cfg.truncation,
            "chat_template": cfg.chat_template, "seed": cfg.seed, "eval_fraction": cfg.eval_fraction}
    split_of = {p.index: p.config["split"] for p in plans if p.config["split"]}
    rendered = (parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0])
    rendered = rendered.repartition(target_num_rows_per_block=BLOCK_ROWS).map_batches(
        render_batch, batch_format="pyarrow", batch_size=BLOCK_ROWS,
        fn_kwargs={"spec": tokenizer, "cfg": conf, "split_of": split_of},
    ).materialize()
    log(f"read, normalised and tokenized {rendered.count()} rows in {time.perf_counter() - t0:.1f}s")

    duplicates_ref = ray.put(_find_duplicates(rendered)) if cfg.dedup else None
    rendered = rendered.map_batches(mark_duplicates, batch_format="pyarrow", batch_size=None,
                                    fn_kwargs={"duplicates_ref": duplicates_ref}).materialize()

    weights = {p.index: float(p.config["weight"]) for p in plans}
    out = {}
    for split in ("train", "eval"):
        ds = rendered.map_batches(select_split, batch_format="pyarrow", batch_size=None,
                                  fn_kwargs={"split": split, "weights": weights, "seed": cfg.seed})
        out[split] = ds.map_batches(
            pack_batch, batch_format="pyarrow", batch_size=pack_batch_rows,
            fn_kwargs={"block_len": cfg.max_seq_length, "pad_id": pad_id, "packing": cfg.packing},
        ).materialize()
    rejects = rendered.map_batches(_rejected_rows, batch_format="pyarrow", batch_size=None).materialize()

    report = build_report(cfg, plans, rendered, out["train"], out["eval"], micro_batch_size, tokenizer)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    eval_ds = out["eval"] if report["totals"]["eval_examples"] > 0 else None
    return Prepared(out["train"], eval_ds, rejects, report, cfg.packing, pad_id, plans)


def _find_duplicates(normalised) -> dict[str, str]:
    """Row id -> 'file row N' of the first row with the same content; order is (source, file, row)."""
    first: dict[str, tuple] = {}
    dups: dict[str, str] = {}
    rows = []
    for b in normalised.select_columns(["source_idx", "file", "row", "key", "reason"]).iter_batches(batch_format="pyarrow", batch_size=65536):
        d = b.to_pydict()
        rows.extend(zip(d["source_idx"], d["file"], d["row"], d["key"], d["reason"]))
    rows.sort(key=lambda r: (r[0], r[1], r[2]))
    for s, f, r, k, reason in rows:
        if reason:
            continue
        if k in first:
            fs, ff, fr = first[k]
            dups[_row_id(s, f, r)] = f"{ff.rsplit('/', 1)[-1]} row {fr}"
        else:
            first[k] = (s, f, r)
    return dups


def _rejected_rows(batch: pa.Table) -> pa.Table:
    import pyarrow.compute as pc

    t = batch.filter(pc.not_equal(batch["reason"], ""))
    return t.select(["source", "file", "row", "line", "reason", "detail", "raw"])


# ------------------------------------------------------------------------------------------ report


def build_report(cfg: DataConfig, plans, rendered, train, eval_, micro_batch_size: int, tokenizer: TokenizerSpec) -> dict:
    per = {p.index: {
        "name": p.name, "path": p.config["path"], "files": len(p.files),
        "format": "/".join(sorted(set(p.formats.values()))), "schema": p.schema, "schema_note": p.schema_note,
        "weight": p.config["weight"], "read": 0, "kept": 0, "rejected": 0, "rejected_by_reason": {},
        "duplicates_removed": 0, "truncated": 0, "train_examples": 0, "eval_examples": 0,
        "pii_redacted": {k: 0 for k in PII_KINDS},
    } for p in plans}
    lengths = []
    cols = ["source_idx", "reason", "truncated", "num_tokens", "split"] + ["pii_" + k for k in PII_KINDS]
    for b in rendered.select_columns(cols).iter_batches(batch_format="pyarrow", batch_size=65536):
        d = b.to_pydict()
        for i in range(b.num_rows):
            s = per[d["source_idx"][i]]
            s["read"] += 1
            reason = d["reason"][i]
            if reason:
                s["rejected"] += 1
                s["rejected_by_reason"][reason] = s["rejected_by_reason"].get(reason, 0) + 1
                if reason == "duplicate":
                    s["duplicates_removed"] += 1
                continue
            s["kept"] += 1
            s["truncated"] += int(d["truncated"][i])
            s[d["split"][i] + "_examples"] += 1
            lengths.append(d["num_tokens"][i])
            for k in PII_KINDS:
                s["pii_redacted"][k] += d["pii_" + k][i]
    sources = [per[p.index] for p in plans]
    totals = {k: sum(s[k] for s in sources) for k in ("read", "kept", "rejected", "duplicates_removed", "truncated", "train_examples", "eval_examples")}
    totals["pii_redacted"] = {k: sum(s["pii_redacted"][k] for s in sources) for k in PII_KINDS}
    report = {"tokenizer": tokenizer.name_or_path, "sources": sources, "totals": totals}
    lens = np.asarray(lengths, dtype=np.int64)
    report["sequence_length"] = {
        "examples": int(lens.size),
        **({f"p{q}": int(np.percentile(lens, q)) for q in (50, 90, 99)} if lens.size else {}),
        "max": int(lens.max()) if lens.size else 0,
        "mean": round(float(lens.mean()), 1) if lens.size else 0.0,
    }
    report["splits"] = {name: _split_stats(ds, cfg, micro_batch_size) for name, ds in (("train", train), ("eval", eval_))}
    report["totals"]["train_rows_after_weights"] = report["splits"]["train"]["examples"]
    return report


def _split_stats(ds, cfg: DataConfig, micro_batch_size: int) -> dict:
    tokens, loss_tokens, examples, rows = 0, 0, 0, 0
    lens = []
    for b in ds.select_columns(["num_tokens", "num_loss_tokens", "num_examples"]).iter_batches(batch_format="numpy", batch_size=65536):
        tokens += int(b["num_tokens"].sum())
        loss_tokens += int(b["num_loss_tokens"].sum())
        examples += int(b["num_examples"].sum())
        rows += len(b["num_tokens"])
        lens.extend(b["num_tokens"].tolist())
    if cfg.packing:
        total = rows * cfg.max_seq_length
        pad = total - tokens
    else:
        pad, total = padding_waste_unpacked(lens, micro_batch_size) if lens else (0, 0)
    return {
        "examples": examples, "rows": rows, "tokens": tokens, "loss_tokens": loss_tokens,
        "padding_waste": round(pad / total, 4) if total else 0.0,
        "packed": cfg.packing, "block_length": cfg.max_seq_length if cfg.packing else None,
        "padding_basis": "blocks of max_seq_length" if cfg.packing else f"batches of {micro_batch_size} padded to the longest",
    }


REJECT_FIELDS = ("source", "file", "row", "line", "reason", "detail", "raw")


def write_rejects(rejects, path: str) -> int:
    """Every rejected row as one JSON line (source, file, row, line, reason, detail, raw) to a local path or an
    object-store URI; returns the count."""
    import json
    import os
    import tempfile

    from . import storage

    remote = storage.is_uri(path)
    if not remote:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    n = 0
    tmp = tempfile.mktemp(suffix=".jsonl") if remote else path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rejects.iter_rows():
            rec = {k: row[k] for k in REJECT_FIELDS}
            rec["line"] = None if rec["line"] < 0 else rec["line"]
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    if remote:
        with open(tmp, "rb") as f:
            storage.write_bytes(path, f.read())
        os.unlink(tmp)
    else:
        os.replace(tmp, path)
    return n


def format_report(report: dict) -> str:
    """The report as a readable table for the terminal."""
    lines = []
    head = f"{'source':<18} {'schema':<18} {'read':>6} {'kept':>6} {'rejected':>8} {'dups':>5} {'trunc':>5} {'train':>6} {'eval':>5}"
    lines.append(head)
    lines.append("-" * len(head))
    for s in report["sources"] + [dict(report["totals"], name="TOTAL", schema="")]:
        lines.append(
            f"{s['name'][:18]:<18} {s['schema'][:18]:<18} {s['read']:>6} {s['kept']:>6} {s['rejected']:>8} "
            f"{s['duplicates_removed']:>5} {s['truncated']:>5} {s['train_examples']:>6} {s['eval_examples']:>5}"
        )
    lines.append("")
    reasons: dict[str, int] = {}
    for s in report["sources"]:
        for r, c in s["rejected_by_reason"].items():
            reasons[r] = reasons.get(r, 0) + c
        if s["rejected_by_reason"]:
            detail = ", ".join(f"{r} {c}" for r, c in sorted(s["rejected_by_reason"].items()))
            lines.append(f"rejected in {s['name']}: {detail}")
    pii = report["totals"]["pii_redacted"]
    if any(pii.values()):
        lines.append("PII redacted: " + ", ".join(f"{k} {v}" for k, v in pii.items()))
    sl = report["sequence_length"]
    if sl["examples"]:
        lines.append(f"sequence length (tokens): p50 {sl['p50']}, p90 {sl['p90']}, p99 {sl['p99']}, max {sl['max']}, mean {sl['mean']}")
    for name, s in report["splits"].items():
        lines.append(
            f"{name}: {s['examples']} examples in {s['rows']} rows, {s['tokens']} tokens "
            f"({s['loss_tokens']} trained on), padding waste {100 * s['padding_waste']:.1f}% ({s['padding_basis']})"
        )
    return "\n".join(lines)
