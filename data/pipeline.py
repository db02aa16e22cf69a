"""The data pipeline on Ray Data: sources -> conversations -> (input_ids, labels) blocks.

    plan       list files; sniff each source's format and schema from the head of a file only (ranged reads)
    read       one task per read unit: a range of a JSON Lines file cut at line boundaries, a group of row
               groups of a Parquet file, or a whole JSON array / CSV file (size: data.read_block_mb)
               -> parse + normalise + validate + redact, streamed out in blocks (rows keep source/file/row/line)
    render     chat template + loss mask + tokenize + truncation policy + split
    dedup      keys of kept rows gathered by large map tasks, bucketed by hash, one reduce task per bucket range (first
               occurrence wins); only object references reach the driver
    finish     row and line numbers made file-global, duplicates marked
    pack       train: weight, pack | eval: pack       -> ray.data.Dataset each
    every rejected row -> rejects (source, file, row, line, reason, detail, raw)

Nothing is dropped without a trace: for every source, read = kept + rejected (duplicates are a reject reason).
The data streams through Ray's workers and object store; the driver holds plans, counts and object references,
and reads blocks no larger than `data.driver_memory_mb` allows. Outputs that could be small are made by tasks that
take many rows (keys, rejects, eval rows): Ray keeps a task's output under 100 KiB in its owner's memory, the driver's,
so one small piece per block would grow the driver with the data. What still grows with it is Ray's bookkeeping of
tasks and blocks, about 10 KiB a block. Ray must be initialised by the caller (cluster/
owns the connection).
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

from .chat import fit_conversation, render_segments, tokenize_segments_arrays
from .config import DataConfig, SourceConfig
from .formats import (
    SourceError,
    detect_format,
    head_records,
    iter_parquet_groups,
    iter_records,
    list_files,
    parquet_row_groups,
    read_bytes,
    read_line_range,
)
from .pack import pack_flat, padding_waste_unpacked, single_flat
from .redact import PII_KINDS, redact, redact_messages
from .schemas import SCHEMAS, Reject, apply_column_map, content_key, detect_schema, read_conversation, used_columns

PEEK_ROWS = 50
BLOCK_ROWS = 2048  # rows per block after reading: enough blocks to keep every CPU busy
HEAD_BYTES = 1 << 20  # sniffing reads at most this much of a file (less under a small driver budget)


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
    try:
        if _generic_fast_tokenizer(spec):
            # The class the folder names itself: AutoTokenizer would build the same one, after importing torch (through
            # the model configs), seconds of every Ray worker's first task.
            from transformers import PreTrainedTokenizerFast

            tok = PreTrainedTokenizerFast.from_pretrained(spec.name_or_path)
        else:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(
                spec.name_or_path, revision=spec.revision, trust_remote_code=spec.trust_remote_code
            )
    except OSError as e:
        raise SourceError(
            f"model.tokenizer {spec.name_or_path!r} cannot be loaded: {e}. Give a hub id or a folder holding "
            f"tokenizer files (for a local test model: rayft tiny-model DIR)"
        ) from None
    return tok


GENERIC_FAST_TOKENIZERS = ("PreTrainedTokenizerFast", "TokenizersBackend")


def _generic_fast_tokenizer(spec: TokenizerSpec) -> bool:
    """A local tokenizer folder whose config names the generic fast tokenizer class (Llama 3's, rayft's tiny models')."""
    import os

    path = os.path.join(spec.name_or_path, "tokenizer_config.json")
    if spec.trust_remote_code or not os.path.isfile(path) or not os.path.isfile(
            os.path.join(spec.name_or_path, "tokenizer.json")):
        return False
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("tokenizer_class") in GENERIC_FAST_TOKENIZERS
    except (OSError, ValueError):
        return False


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
    # Wall seconds of each phase of `prepare` (each ends at a barrier: the next phase needs all of its output).
    phase_seconds: dict = field(default_factory=dict)


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
            schema, note = _detect(src, files, formats, where, cfg.rejects_sample_chars, _head_bytes(cfg))
        plans.append(SourcePlan(i, src.display_name, src.model_dump(by_alias=False), files, formats, schema, note))
        fmts = sorted(set(formats.values()))
        log(f"source {src.display_name}: {len(files)} file(s), format {'/'.join(fmts)}, schema {schema} ({note})")
    return plans


def _head_bytes(cfg: DataConfig) -> int:
    return min(HEAD_BYTES, (cfg.driver_memory_mb << 20) // 16)


def _detect(src: SourceConfig, files: list[str], formats: dict, where: str, limit: int,
            head_bytes: int = HEAD_BYTES) -> tuple[str, str]:
    records, columns = [], set()
    for f in files:
        for rec in head_records(f, formats[f], head_bytes, limit):
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
    # For `rayft data inspect`: line formats from their first MiB only (a ranged read on S3); JSON and Parquet whole.
    data = read_bytes(path, nbytes + 1 if fmt in ("jsonl", "csv") else None)
    if fmt in ("jsonl", "csv") and len(data) > nbytes:
        cut = data.rfind(b"\n", 0, nbytes)
        data = data[: cut if cut > 0 else nbytes]
    return data


# ------------------------------------------------------------------------------------ stage 1: read


def plan_reads(plans: list[SourcePlan], block_bytes: int) -> list[dict]:
    """The read units of every source, in (source, file, position) order: what one read task reads.

    A JSON Lines file larger than `block_bytes` is cut into byte ranges (each line belongs to the range holding its
    first byte); a Parquet file larger than that into groups of whole row groups (from its footer, a ranged read);
    JSON arrays and CSV files are one unit each (a JSON array is one document; a CSV cell may hold a newline).
    """
    from .storage import file_sizes

    units: list[dict] = []
    for p in plans:
        for f, size in zip(p.files, file_sizes(p.files)):
            fmt = p.formats[f]
            base = {"source_idx": p.index, "file": f, "fmt": fmt}
            if fmt == "jsonl" and size > block_bytes:
                for start in range(0, size, block_bytes):
                    units.append(dict(base, kind="lines", start=start, stop=min(start + block_bytes, size)))
            elif fmt == "parquet" and size > block_bytes:
                groups, rows, first, acc = [], 0, 1, 0
                for g, (n, nbytes) in enumerate(parquet_row_groups(f)):
                    if groups and acc + nbytes > block_bytes:
                        units.append(dict(base, kind="row_groups", groups=groups, first_row=first))
                        groups, first, acc = [], rows + 1, 0
                    groups.append(g)
                    rows += n
                    acc += nbytes
                if groups:
                    units.append(dict(base, kind="row_groups", groups=groups, first_row=first))
            else:
                units.append(dict(base, kind="lines" if fmt == "jsonl" else "file", start=0, stop=size))
    for i, u in enumerate(units):
        u["unit"] = i
    return units


class UnitCounts:
    """Lines and rows of each JSON Lines range, told by its read task: a range's row and line numbers are local
    until the ranges before it in the file are counted (in `finish_rows`). Holds two numbers per unit."""

    def __init__(self):
        self.counts: dict[int, tuple[int, int]] = {}

    def put(self, unit: int, lines: int, rows: int) -> None:
        self.counts[unit] = (lines, rows)  # a retried task tells the same numbers again

    def get(self) -> dict[int, tuple[int, int]]:
        return self.counts


_PARSED_COLUMNS = ("source_idx", "source", "file", "unit", "row", "line", "reason", "detail", "raw", "messages",
                   "tools", "key") + tuple("pii_" + k for k in PII_KINDS)
_PARSED_TYPES = {"source_idx": pa.int32(), "unit": pa.int32(), "row": pa.int64(), "line": pa.int64(),
                 **{"pii_" + k: pa.int32() for k in PII_KINDS}}


def parse_records(records, path: str, unit: int, plan: dict, redact_pii: bool, raw_limit: int,
                  chunk_rows: int = BLOCK_ROWS):
    """Records of one read unit -> tables of at most `chunk_rows` rows, one output row per input row, kept or
    rejected (columns built directly, no row dicts)."""
    src = plan["config"]
    cols: dict[str, list] = {c: [] for c in _PARSED_COLUMNS}
    for rec in records:
        reason, detail, raw, messages_json, tools_json, key = rec.reason, rec.detail, rec.raw, "", "", ""
        counts = None
        if rec.record is not None:
            # Columns the schema does not read are dropped here, also from the raw text a reject keeps.
            record = used_columns(rec.record, plan["schema"], src["column_map"])
            if len(record) != len(rec.record):
                raw = json.dumps(record, ensure_ascii=False, default=str)
            try:
                messages, tools = read_conversation(apply_column_map(record, src["column_map"]), plan["schema"],
                                                    src["system_prompt"])
                if redact_pii:
                    messages, counts = redact_messages(messages)
                messages_json = json.dumps(messages, ensure_ascii=False)
                tools_json = json.dumps(tools, ensure_ascii=False) if tools else ""
                key = hashlib.blake2b(content_key(messages, tools).encode(), digest_size=16).hexdigest()
            except Reject as r:
                reason, detail = r.reason, r.detail
        if len(raw) > raw_limit:
            raw = raw[:raw_limit] + f"... [cut: {len(raw)} characters in all]"
        if redact_pii:
            raw = redact(raw)[0]  # the raw text may reach the rejects file
        for c, v in (("source_idx", plan["index"]), ("source", plan["name"]), ("file", path), ("unit", unit),
                     ("row", rec.row), ("line", rec.line if rec.line is not None else -1), ("reason", reason),
                     ("detail", detail), ("raw", raw), ("messages", messages_json), ("tools", tools_json),
                     ("key", key)):
            cols[c].append(v)
        for k in PII_KINDS:
            cols["pii_" + k].append(counts[k] if counts else 0)
        if len(cols["row"]) >= chunk_rows:
            yield _parsed_table(cols)
            cols = {c: [] for c in _PARSED_COLUMNS}
    if cols["row"]:
        yield _parsed_table(cols)


def _parsed_table(cols: dict) -> pa.Table:
    return pa.table({c: pa.array(v, type=_PARSED_TYPES.get(c, pa.string())) for c, v in cols.items()})


def _empty_parsed() -> pa.Table:
    return _parsed_table({c: [] for c in _PARSED_COLUMNS})


def parse_files(batch: pa.Table, plan: dict, redact_pii: bool, raw_limit: int) -> pa.Table:
    """Whole files (`path`, `bytes` columns) -> one output row per input row, kept or rejected."""
    tables = [t for path, data in zip(batch["path"].to_pylist(), batch["bytes"].to_pylist())
              for t in parse_records(iter_records(data, _format_of(plan["formats"], path), raw_limit), path, 0,
                                     plan, redact_pii, raw_limit)]
    return pa.concat_tables(tables) if tables else _empty_parsed()


def read_units(batch: pa.Table, plans: dict, redact_pii: bool, raw_limit: int, counts, filesystems: dict):
    """Read tasks: each unit of the batch read from storage (ranged reads) and parsed, streamed out in blocks."""
    import ray

    for unit in (json.loads(u) for u in batch["unit"].to_pylist()):
        plan, path, i = plans[unit["source_idx"]], unit["file"], unit["unit"]
        fs = filesystems.get(unit["source_idx"])
        if unit["kind"] == "lines":
            data, lines = read_line_range(path, unit["start"], unit["stop"], fs=fs)
            rows = 0
            for t in parse_records(iter_records(data, "jsonl", raw_limit), path, i, plan, redact_pii, raw_limit):
                rows += t.num_rows
                yield t
            del data
            ray.get(counts.put.remote(i, lines, rows))
        elif unit["kind"] == "row_groups":
            yield from parse_records(iter_parquet_groups(path, unit["groups"], unit["first_row"], raw_limit, fs=fs),
                                     path, i, plan, redact_pii, raw_limit)
        else:
            yield from parse_records(iter_records(read_bytes(path, fs=fs), unit["fmt"], raw_limit), path, i, plan,
                                     redact_pii, raw_limit)


def _format_of(formats: dict, path: str) -> str:
    if path in formats:
        return formats[path]
    for k, v in formats.items():  # Ray may report a URI's path without its scheme
        if k.split("://", 1)[-1] == path.split("://", 1)[-1]:
            return v
    raise SourceError(f"file {path!r} was not planned for this source")


def unit_offsets(units: list[dict], counts: dict) -> dict[int, tuple[int, int]]:
    """unit -> (rows, lines) of the same file before it: what makes a range's local numbers file-global."""
    out, before = {}, {}
    for u in units:
        if u["kind"] != "lines":
            continue
        if u["unit"] not in counts:
            raise SourceError(f"the read task of {u['file']} bytes {u['start']}-{u['stop']} did not report its rows")
        rows, lines = before.get(u["file"], (0, 0))
        if rows or lines:
            out[u["unit"]] = (rows, lines)
        n_lines, n_rows = counts[u["unit"]]
        before[u["file"]] = (rows + n_rows, lines + n_lines)
    return out


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
    messages_col = batch["messages"].to_pylist()
    tools_col = batch["tools"].to_pylist()
    convs = [json.loads(messages_col[i]) for i in todo]
    tools = [json.loads(t) if (t := tools_col[i]) else None for i in todo]
    del messages_col, tools_col
    rendered = tokenize_segments_arrays(
        [render_segments(m, tok, cfg["chat_template"], tools=t) for m, t in zip(convs, tools)], tok)
    none = np.zeros(0, dtype=np.int32)
    input_ids: list = [none] * n
    masks: list = [none] * n
    truncated = [False] * n
    split = [""] * n
    for i, messages, row_tools, (ids, mask) in zip(todo, convs, tools, rendered):
        ids, mask, cut, why = fit_conversation(
            messages, tok, cfg["max_seq_length"], cfg["truncation"], cfg["chat_template"], rendered=(ids, mask),
            tools=row_tools,
        )
        if ids is None:
            reason[i], detail[i] = "too_long", why
            continue
        if not np.any(mask):
            reason[i], detail[i] = "empty_content", "no assistant token after rendering"
            continue
        input_ids[i], masks[i], truncated[i] = ids, mask, cut
        fixed = split_of.get(source_idx[i])
        if fixed:
            split[i] = fixed
        else:
            split[i] = "eval" if _unit_hash(cfg["seed"], "split", keys[i]) < cfg["eval_fraction"] else "train"
    out = batch.drop_columns(["messages", "tools", "reason", "detail"])  # from here on a kept row carries tokens, not text
    lengths = np.fromiter((len(x) for x in input_ids), dtype=np.int64, count=n)
    flat_ids = np.concatenate(input_ids).astype(np.int32, copy=False) if n else none
    flat_mask = np.concatenate(masks).astype(np.int8, copy=False) if n else none.astype(np.int8)
    for name, values in (
        ("reason", pa.array(reason, type=pa.string())), ("detail", pa.array(detail, type=pa.string())),
        ("input_ids", _list_array(flat_ids, lengths, pa.int32())), ("loss_mask", _list_array(flat_mask, lengths, pa.int8())),
        ("num_tokens", pa.array(lengths.astype(np.int32))), ("truncated", pa.array(truncated, type=pa.bool_())),
        ("split", pa.array(split, type=pa.string())),
    ):
        out = out.append_column(name, values)
    return out


# ------------------------------------------------------------------------------ stage 3: dedup, finish


def _code(unit, row) -> np.ndarray:
    return (np.asarray(unit, dtype=np.int64) << 32) | np.asarray(row, dtype=np.int64)


KEY_BATCH_ROWS = 1 << 18  # rows whose keys one task gathers: its table is large enough to live in the object store


def find_duplicates(rendered, partitions: int) -> list:
    """Duplicate rows as object references to tables (unit, row, first_unit, first_row); no key reaches the driver.

    Map: tasks of KEY_BATCH_ROWS rows each keep the (bucket, key, unit, row) of kept rows, sorted by bucket (the
    key's first byte). Reduce: one task per range of buckets takes its slice of every map table, sorts it by key and
    marks later copies. Order is (source, file, row): units are numbered in that order, so the first occurrence wins.

    Why few large map tables and not one small piece per block and partition: a task's return smaller than Ray's
    inline limit (100 KiB) is kept in its owner's memory, the driver's here, and copied into every task that takes
    it; pieces of a few KiB per block would put every key in the driver after all.
    """
    import ray

    parts = max(2, min(256, partitions))
    tables = rendered.select_columns(["unit", "row", "key", "reason"]).map_batches(
        _kept_keys, batch_format="pyarrow", batch_size=KEY_BATCH_ROWS).to_arrow_refs()
    reduce = ray.remote(_duplicates_in)
    return [reduce.remote(p, parts, *tables) for p in range(parts)]


_HEX2 = pa.array([f"{i:02x}" for i in range(256)])


def _kept_keys(batch: pa.Table) -> pa.Table:
    import pyarrow.compute as pc

    t = batch.filter(pc.equal(batch["reason"], "")).select(["unit", "row", "key"])
    # The key is a hash already: its first byte is uniform, and picks the bucket.
    bucket = pc.index_in(pc.utf8_slice_codeunits(t["key"], 0, 2), value_set=_HEX2).cast(pa.int16())
    return t.append_column("bucket", bucket).sort_by("bucket")


def _duplicates_in(part: int, parts: int, *tables: pa.Table) -> pa.Table:
    import pyarrow.compute as pc

    lo, hi = -(-part * 256 // parts), -(-(part + 1) * 256 // parts)  # buckets lo..hi-1 belong to this part
    pieces = []
    for t in tables:
        if t.num_rows:
            b = t["bucket"].to_numpy()
            start, stop = np.searchsorted(b, lo), np.searchsorted(b, hi)
            pieces.append(t.slice(start, stop - start).select(["unit", "row", "key"]))
    empty = pa.table({c: pa.array([], type=pa.int64()) for c in ("unit", "row", "first_unit", "first_row")})
    if not pieces:
        return empty
    t = pa.concat_tables(pieces).sort_by([("key", "ascending"), ("unit", "ascending"), ("row", "ascending")])
    n = t.num_rows
    if n < 2:
        return empty
    keys = t["key"].combine_chunks()
    same = np.zeros(n, dtype=bool)
    same[1:] = pc.equal(keys.slice(1), keys.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    if not same.any():
        return empty
    first = np.maximum.accumulate(np.where(same, 0, np.arange(n)))  # index of each row's group start
    unit, row = t["unit"].to_numpy().astype(np.int64), t["row"].to_numpy().astype(np.int64)
    return pa.table({"unit": unit[same], "row": row[same], "first_unit": unit[first][same],
                     "first_row": row[first][same]})


def finish_rows(batch: pa.Table, duplicates: list, offsets: dict, files: dict) -> pa.Table:
    """Make row and line numbers file-global, reject later copies of a conversation, and drop the raw text of
    kept rows (only rejects need it)."""
    import pyarrow.compute as pc

    unit = batch["unit"].to_numpy().astype(np.int64)
    row = batch["row"].to_numpy().astype(np.int64)
    line = batch["line"].to_numpy().astype(np.int64)
    row_off = np.zeros(len(unit), dtype=np.int64)
    line_off = np.zeros(len(unit), dtype=np.int64)
    for u in np.unique(unit):
        if int(u) in offsets:
            m = unit == u
            row_off[m], line_off[m] = offsets[int(u)]
    reason = batch["reason"].to_pylist()
    detail = batch["detail"].to_pylist()
    dups = _get_cached(duplicates) if duplicates else None
    if dups is not None and len(dups["code"]):
        codes = _code(unit, row)
        pos = np.clip(np.searchsorted(dups["code"], codes), 0, len(dups["code"]) - 1)
        for i in np.nonzero(dups["code"][pos] == codes)[0]:
            if not reason[i]:
                fu, fr = int(dups["first_unit"][pos[i]]), int(dups["first_row"][pos[i]])
                reason[i] = "duplicate"
                detail[i] = f"same conversation as {files[fu].rsplit('/', 1)[-1]} row {fr + offsets.get(fu, (0, 0))[0]}"
    reason_arr = pa.array(reason, type=pa.string())
    kept = pc.equal(reason_arr, "")
    raw = pc.if_else(kept, pa.scalar("", pa.string()), batch["raw"].combine_chunks().cast(pa.string()))
    for name, values in (("reason", reason_arr), ("detail", pa.array(detail, type=pa.string())), ("raw", raw),
                         ("row", pa.array(row + row_off)), ("line", pa.array(np.where(line >= 0, line + line_off, -1)))):
        batch = batch.set_column(batch.schema.get_field_index(name), name, values)
    return batch


_CACHE: dict = {}


def _get_cached(refs: list) -> dict:
    """The duplicates of every partition, fetched once per worker process, sorted by (unit, row) code."""
    import ray

    key = tuple(r.hex() for r in refs)
    if key not in _CACHE:
        _CACHE.clear()
        t = pa.concat_tables(ray.get(list(refs)))
        code = _code(t["unit"].to_numpy(), t["row"].to_numpy())
        order = np.argsort(code)
        _CACHE[key] = {"code": code[order], "first_unit": t["first_unit"].to_numpy()[order],
                       "first_row": t["first_row"].to_numpy()[order]}
    return _CACHE[key]


# ----------------------------------------------------------------------------------- stage 4: pack


def select_split(batch: pa.Table, split: str, weights: dict, seed: int) -> pa.Table:
    """Rows of one split; in train, each row repeated by its source weight (deterministically)."""
    import pyarrow.compute as pc

    t = batch.select(["source_idx", "key", "input_ids", "loss_mask"])
    keep = pc.and_(pc.equal(batch["reason"], ""), pc.equal(batch["split"], split))
    if not pc.all(keep).as_py():  # filtering copies the token lists; most batches of train keep every row
        t = t.filter(keep)
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
    # Blocks the driver reads (report, rejects) stay within its budget.
    ctx.target_max_block_size = min(ctx.target_max_block_size or 128 << 20, _driver_block_bytes(cfg))
    t0 = time.perf_counter()
    tok = load_tokenizer(tokenizer)
    pad_id = pad_token_id(tok)
    plans = plan_sources(cfg, log)
    units = plan_reads(plans, cfg.read_block_mb << 20)
    log(f"reading {len(units)} unit(s) of at most {cfg.read_block_mb} MiB")

    counts = ray.remote(UnitCounts).options(num_cpus=0).remote()
    try:
        plan_of = {p.index: {"index": p.index, "name": p.name, "config": p.config, "formats": p.formats,
                             "schema": p.schema} for p in plans}
        conf = {"max_seq_length": cfg.max_seq_length, "truncation": cfg.truncation,
                "chat_template": cfg.chat_template, "seed": cfg.seed, "eval_fraction": cfg.eval_fraction}
        split_of = {p.index: p.config["split"] for p in plans if p.config["split"]}
        rendered = ray.data.from_items([{"unit": json.dumps(u)} for u in units], override_num_blocks=len(units))
        rendered = rendered.map_batches(
            read_units, batch_format="pyarrow", batch_size=1,
            fn_kwargs={"plans": plan_of, "redact_pii": cfg.redact_pii, "raw_limit": cfg.rejects_sample_chars,
                       "counts": counts, "filesystems": {p.index: _filesystem_of(p.files) for p in plans}},
        # Blocks of BLOCK_ROWS rows (a read task's output would otherwise be one block of up to the block size):
        # rendering, most of the work, then runs as a task per block, spread over every CPU, even when there are
        # fewer read units than CPUs (a CSV file or a JSON array is one unit).
        ).repartition(target_num_rows_per_block=BLOCK_ROWS).map_batches(render_batch, batch_format="pyarrow", batch_size=BLOCK_ROWS,
                      fn_kwargs={"spec": tokenizer, "cfg": conf, "split_of": split_of}).materialize()
        offsets = unit_offsets(units, ray.get(counts.get.remote()))
    finally:
        ray.kill(counts)
    log(f"read, normalised and tokenized {rendered.count()} rows in {time.perf_counter() - t0:.1f}s")
    phases, mark = {}, _phase_clock(t0)
    phases["read_and_tokenize"] = mark()

    duplicates = find_duplicates(rendered, partitions=max(2, rendered.count() // 250_000 + 1)) if cfg.dedup else []
    phases["dedup"] = mark()
    files = {u["unit"]: u["file"] for u in units}
    rendered = rendered.map_batches(finish_rows, batch_format="pyarrow", batch_size=None, fn_kwargs={
        "duplicates": duplicates, "offsets": offsets, "files": files}).materialize()
    del duplicates
    phases["mark_rows"] = mark()

    report = count_rows(cfg, plans, rendered, tokenizer)
    phases["report"] = mark()
    totals = report["totals"]
    weights = {p.index: float(p.config["weight"]) for p in plans}
    out = {}
    for split in ("train", "eval"):
        # Packing is per batch: train keeps `pack_batch_rows`; the eval split, a small share of each batch, takes
        # larger batches so that its packed blocks are not tiny (see _rows_per_task).
        rows = None if split == "train" else max(
            pack_batch_rows, _rows_per_task(totals["read"], totals["eval_examples"], pack_batch_rows))
        ds = rendered.map_batches(select_split, batch_format="pyarrow", batch_size=rows,
                                  fn_kwargs={"split": split, "weights": weights, "seed": cfg.seed})
        out[split] = ds.map_batches(
            pack_batch, batch_format="pyarrow", batch_size=pack_batch_rows,
            fn_kwargs={"block_len": cfg.max_seq_length, "pad_id": pad_id, "packing": cfg.packing},
        ).materialize()
    phases["split_and_pack"] = mark()
    rejects = rendered.select_columns(list(REJECT_FIELDS)).map_batches(
        _rejected_rows, batch_format="pyarrow", batch_size=_rows_per_task(totals["read"], totals["rejected"]),
    ).materialize()

    add_split_stats(report, cfg, out["train"], out["eval"], micro_batch_size)
    phases["rejects_and_stats"] = mark()
    report["seconds"] = round(time.perf_counter() - t0, 2)
    log(f"data stage {report['seconds']:.1f}s: " + ", ".join(f"{k.replace('_', ' ')} {v:.1f}s" for k, v in phases.items()))
    eval_ds = out["eval"] if report["totals"]["eval_examples"] > 0 else None
    return Prepared(out["train"], eval_ds, rejects, report, cfg.packing, pad_id, plans, phases)


def _phase_clock(start: float) -> Callable[[], float]:
    """Seconds since the previous call (the first: since `start`)."""
    last = [start]

    def mark() -> float:
        now = time.perf_counter()
        took, last[0] = now - last[0], now
        return round(took, 2)

    return mark


def _rows_per_task(rows: int, selected: int, want: int = 4096, most: int = 1 << 16) -> int:
    """Rows one task takes from `rows` so that it outputs about `want` of the `selected` ones.

    A task's output smaller than Ray's inline limit (100 KiB) is kept in the memory of its owner, the driver; one
    small output per block (a few rejects, a few eval rows) would grow the driver with the data."""
    if selected <= 0:
        return BLOCK_ROWS
    return int(min(most, max(BLOCK_ROWS, rows * want // selected)))


def _driver_block_bytes(cfg: DataConfig) -> int:
    """The largest block: an eighth of the driver's budget (the driver reads one block while Arrow converts part of
    another; measured at a 32 MiB budget, a quarter let the driver grow by more)."""
    return max(1 << 20, (cfg.driver_memory_mb << 20) // 8)


def _rejected_rows(batch: pa.Table) -> pa.Table:
    import pyarrow.compute as pc

    return batch.filter(pc.not_equal(batch["reason"], "")).select(list(REJECT_FIELDS))


# ------------------------------------------------------------------------------------------ report


def summarise_block(batch: pa.Table, max_len: int) -> pa.Table:
    """One row per block: per-source counts (JSON) and a histogram of kept rows' token counts. The report sums
    these on the driver, so its memory holds counts, never rows."""
    reason = np.asarray(batch["reason"].to_numpy(zero_copy_only=False), dtype=object)
    src = batch["source_idx"].to_numpy()
    split = np.asarray(batch["split"].to_numpy(zero_copy_only=False), dtype=object)
    truncated = batch["truncated"].to_numpy(zero_copy_only=False).astype(bool)
    tokens = batch["num_tokens"].to_numpy().astype(np.int64)
    kept = reason == ""
    per = {}
    for s in np.unique(src):
        m = src == s
        k = m & kept
        reasons, n = np.unique(reason[m & ~kept], return_counts=True)
        per[int(s)] = {"read": int(m.sum()), "kept": int(k.sum()), "truncated": int(truncated[k].sum()),
                       "train_examples": int((split[k] == "train").sum()),
                       "eval_examples": int((split[k] == "eval").sum()),
                       "rejected_by_reason": {str(r): int(c) for r, c in zip(reasons, n)},
                       "pii_redacted": {p: int(batch["pii_" + p].to_numpy()[k].sum()) for p in PII_KINDS}}
    hist = np.bincount(tokens[kept], minlength=max_len + 1)
    return pa.table({"counts": [json.dumps(per)], "hist": pa.array([hist.tolist()], type=pa.list_(pa.int64()))})


def _percentile(hist: np.ndarray, q: float) -> float:
    """np.percentile (linear) of the values a histogram counts, without the values themselves."""
    cum = np.cumsum(hist)
    pos = (cum[-1] - 1) * q / 100
    lo, hi = int(math.floor(pos)), int(math.ceil(pos))
    v_lo, v_hi = (int(np.searchsorted(cum, i + 1)) for i in (lo, hi))
    return v_lo + (v_hi - v_lo) * (pos - lo)


def count_rows(cfg: DataConfig, plans, rendered, tokenizer: TokenizerSpec) -> dict:
    """The report's counts per source, and the sequence lengths of kept rows, summed from per-block summaries."""
    per = {p.index: {
        "name": p.name, "path": p.config["path"], "files": len(p.files),
        "format": "/".join(sorted(set(p.formats.values()))), "schema": p.schema, "schema_note": p.schema_note,
        "weight": p.config["weight"], "read": 0, "kept": 0, "rejected": 0, "rejected_by_reason": {},
        "duplicates_removed": 0, "truncated": 0, "train_examples": 0, "eval_examples": 0,
        "pii_redacted": {k: 0 for k in PII_KINDS},
    } for p in plans}
    hist = np.zeros(cfg.max_seq_length + 1, dtype=np.int64)
    cols = ["source_idx", "reason", "truncated", "num_tokens", "split"] + ["pii_" + k for k in PII_KINDS]
    summaries = rendered.select_columns(cols).map_batches(
        summarise_block, batch_format="pyarrow", batch_size=None, fn_kwargs={"max_len": cfg.max_seq_length})
    for b in summaries.iter_batches(batch_format="pyarrow", batch_size=256):
        for counts, h in zip(b["counts"].to_pylist(), b["hist"].to_pylist()):
            h = np.asarray(h, dtype=np.int64)
            if len(h) > len(hist):
                hist = np.concatenate([hist, np.zeros(len(h) - len(hist), dtype=np.int64)])
            hist[: len(h)] += h
            for s, c in json.loads(counts).items():
                d = per[int(s)]
                for k in ("read", "kept", "truncated", "train_examples", "eval_examples"):
                    d[k] += c[k]
                for r, n in c["rejected_by_reason"].items():
                    d["rejected"] += n
                    d["rejected_by_reason"][r] = d["rejected_by_reason"].get(r, 0) + n
                    if r == "duplicate":
                        d["duplicates_removed"] += n
                for k, n in c["pii_redacted"].items():
                    d["pii_redacted"][k] += n
    sources = [per[p.index] for p in plans]
    for s in sources:
        s["rejected_by_reason"] = dict(sorted(s["rejected_by_reason"].items()))
    totals = {k: sum(s[k] for s in sources) for k in ("read", "kept", "rejected", "duplicates_removed", "truncated", "train_examples", "eval_examples")}
    totals["pii_redacted"] = {k: sum(s["pii_redacted"][k] for s in sources) for k in PII_KINDS}
    report = {"tokenizer": tokenizer.name_or_path, "sources": sources, "totals": totals}
    n = int(hist.sum())
    report["sequence_length"] = {
        "examples": n,
        **({f"p{q}": int(_percentile(hist, q)) for q in (50, 90, 99)} if n else {}),
        "max": int(np.nonzero(hist)[0][-1]) if n else 0,
        "mean": round(float((np.arange(len(hist)) * hist).sum() / n), 1) if n else 0.0,
    }
    return report


def add_split_stats(report: dict, cfg: DataConfig, train, eval_, micro_batch_size: int) -> None:
    report["splits"] = {name: _split_stats(ds, cfg, micro_batch_size) for name, ds in (("train", train), ("eval", eval_))}
    report["totals"]["train_rows_after_weights"] = report["splits"]["train"]["examples"]


def _split_stats(ds, cfg: DataConfig, micro_batch_size: int) -> dict:
    tokens, loss_tokens, examples, rows = 0, 0, 0, 0
    pad = total = 0
    # Batches of whole micro batches, so the padding of unpacked rows is counted as training batches them.
    for b in ds.select_columns(["num_tokens", "num_loss_tokens", "num_examples"]).iter_batches(
            batch_format="numpy", batch_size=micro_batch_size * 8192):
        tokens += int(b["num_tokens"].sum())
        loss_tokens += int(b["num_loss_tokens"].sum())
        examples += int(b["num_examples"].sum())
        rows += len(b["num_tokens"])
        if not cfg.packing and len(b["num_tokens"]):
            p, t = padding_waste_unpacked(b["num_tokens"].tolist(), micro_batch_size)
            pad, total = pad + p, total + t
    if cfg.packing:
        total = rows * cfg.max_seq_length
        pad = total - tokens
    return {
        "examples": examples, "rows": rows, "tokens": tokens, "loss_tokens": loss_tokens,
        "padding_waste": round(pad / total, 4) if total else 0.0,
        "packed": cfg.packing, "block_length": cfg.max_seq_length if cfg.packing else None,
        "padding_basis": "blocks of max_seq_length" if cfg.packing else f"batches of {micro_batch_size} padded to the longest",
    }


REJECT_FIELDS = ("source", "file", "row", "line", "reason", "detail", "raw")


def write_rejects(rejects, path: str) -> int:
    """Every rejected row as one JSON line (source, file, row, line, reason, detail, raw) to a local path or an
    object-store URI; returns the count. Ray tasks turn each block into JSON Lines bytes; the driver only copies those
    bytes to the file, a block at a time, from the object store (no row becomes a Python object in the driver)."""
    import os
    import tempfile

    import pyarrow.compute as pc

    from . import storage

    remote = storage.is_uri(path)
    if not remote:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    n = 0
    tmp = tempfile.mktemp(suffix=".jsonl") if remote else path + ".tmp"
    lines = rejects.map_batches(_reject_lines, batch_format="pyarrow", batch_size=None)
    with open(tmp, "wb", buffering=0) as f:
        for batch in lines.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=0):
            for blob in batch["lines"].chunks:
                _write_all(f, _values_buffer(blob))
            n += int(pc.sum(batch["rows"]).as_py() or 0)
            del batch
    if remote:
        fs, inner = storage.filesystem(path)
        with open(tmp, "rb") as src, fs.open_output_stream(inner) as dst:
            while chunk := src.read(8 << 20):
                dst.write(chunk)
        os.unlink(tmp)
    else:
        os.replace(tmp, path)
    return n


def _values_buffer(blob: pa.Array) -> memoryview:
    """The bytes of every value of a large_binary array, back to back: a view of its data buffer, not a copy."""
    if len(blob) == 0:
        return memoryview(b"")
    offsets = np.frombuffer(blob.buffers()[1], dtype=np.int64)[blob.offset: blob.offset + len(blob) + 1]
    return memoryview(blob.buffers()[2])[int(offsets[0]): int(offsets[-1])]


def _write_all(f, data: memoryview) -> None:
    while len(data):
        data = data[f.write(data):]


def _reject_lines(batch: pa.Table) -> pa.Table:
    """A block of rejects -> one row: its JSON Lines bytes and how many rows they hold."""
    out = []
    for row in batch.select(list(REJECT_FIELDS)).to_pylist():
        row["line"] = None if row["line"] < 0 else row["line"]
        out.append(json.dumps(row, ensure_ascii=False))
    data = ("\n".join(out) + "\n").encode("utf-8", errors="backslashreplace") if out else b""
    return pa.table({"lines": pa.array([data], type=pa.large_binary()), "rows": pa.array([len(out)], type=pa.int64())})


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
