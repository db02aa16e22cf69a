"""Reading files into records, one record per row, each with where it came from.

A record that cannot be read (bad JSON, bad UTF-8, a JSON value that is not an object) is not an
exception: it comes back with a reject reason, so the caller can put it in the rejects file.
"""
from __future__ import annotations

import csv
import glob as _glob
import io
import json
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional

EXTENSIONS = {
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}


@dataclass
class RawRecord:
    row: int  # 1-based record index in the file
    line: Optional[int]  # 1-based physical line for JSONL/CSV, None for JSON arrays and Parquet
    record: Optional[dict]  # the parsed row, or None when it could not be read
    raw: str  # the row as text, for the rejects file
    reason: str = ""  # reject reason when record is None
    detail: str = ""


class SourceError(ValueError):
    """A source that cannot be read at all (no files, unknown format)."""


def detect_format(path: str, declared: str) -> str:
    if declared != "auto":
        return declared
    base = path.lower()
    for ext in (".gz", ".zst", ".bz2"):
        if base.endswith(ext):
            base = base[: -len(ext)]
    ext = os.path.splitext(base)[1]
    if ext not in EXTENSIONS:
        raise SourceError(
            f"cannot tell the format of {path!r} from its extension {ext or '(none)'!r}; "
            f"set `format:` to one of json, jsonl, csv, parquet"
        )
    return EXTENSIONS[ext]


def _is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def list_files(path: str) -> list[str]:
    """Expand a file, glob or folder (local or URI) into a sorted list of files."""
    if _is_uri(path):
        return _list_remote(path)
    if path.startswith("file://"):
        path = path[len("file://"):]
    if any(ch in path for ch in "*?["):
        files = [p for p in _glob.glob(path, recursive=True) if os.path.isfile(p)]
    elif os.path.isdir(path):
        files = [
            os.path.join(root, f)
            for root, _, names in os.walk(path)
            for f in names
            if not f.startswith((".", "_"))
        ]
    elif os.path.isfile(path):
        files = [path]
    else:
        files = []
    return sorted(os.path.abspath(f) for f in files)


def _list_remote(uri: str) -> list[str]:
    import fnmatch

    import pyarrow.fs as pafs

    from .storage import filesystem

    fs, root = filesystem(uri.split("*")[0].rsplit("/", 1)[0] + "/" if "*" in uri else uri)
    scheme = uri.split("://", 1)[0]
    pattern = uri.split("://", 1)[1] if "*" in uri or "?" in uri else None
    info = fs.get_file_info(root)
    if pattern is None and info.type == pafs.FileType.File:
        return [uri]
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    out = []
    for i in infos:
        if i.type != pafs.FileType.File or i.base_name.startswith((".", "_")):
            continue
        if pattern is not None and not fnmatch.fnmatch(i.path, pattern):
            continue
        out.append(f"{scheme}://{i.path}")
    return sorted(out)


def _text(raw: str, limit: int) -> str:
    if len(raw) <= limit:
        return raw
    return raw[:limit] + f"... [cut: {len(raw)} characters in all]"


def _decode(data: bytes) -> tuple[str, str]:
    """Decode bytes as UTF-8, keeping undecodable bytes as surrogates so each row can be judged alone."""
    text = data.decode("utf-8", errors="surrogateescape")
    if text.startswith("\ufeff"):
        text = text[1:]
    return text, ""


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _printable(text: str) -> str:
    # The undecodable bytes (kept as surrogates by _decode) are shown as the bytes they were: \xff, not \udcff.
    return text.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="backslashreplace")


def _as_record(value: Any, row: int, line: Optional[int], raw: str, limit: int) -> RawRecord:
    if isinstance(value, dict):
        return RawRecord(row, line, value, raw)
    return RawRecord(
        row, line, None, _text(raw, limit), "wrong_type",
        f"a row must be a JSON object, got a {type(value).__name__}",
    )


def iter_records(data: bytes, fmt: str, raw_limit: int = 4000) -> Iterator[RawRecord]:
    """Parse one file's bytes into records. Never raises on row-level problems."""
    if fmt == "parquet":
        yield from _iter_parquet(data, raw_limit)
        return
    text, _ = _decode(data)
    if fmt == "json":
        stripped = text.lstrip()
        if stripped.startswith("["):
            yield from _iter_json_array(text, raw_limit)
            return
        fmt = "jsonl"  # a .json file holding one object per line
    if fmt == "jsonl":
        yield from _iter_jsonl(text, raw_limit)
    elif fmt == "csv":
        yield from _iter_csv(text, raw_limit)
    else:
        raise SourceError(f"unknown format {fmt!r}")


def _iter_jsonl(text: str, limit: int) -> Iterator[RawRecord]:
    row = 0
    # Rows end at \n (or \r\n) only: str.splitlines() would also split at U+2028, U+2029 and U+0085,
    # which JSON allows raw inside strings (json.dumps(..., ensure_ascii=False) writes them so).
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        row += 1
        if _has_surrogates(line):
            yield RawRecord(row, lineno, None, _text(_printable(line), limit), "undecodable_text",
                            "the line is not valid UTF-8")
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            yield RawRecord(row, lineno, None, _text(line, limit), "unparsable_json", f"invalid JSON: {e.msg} at column {e.colno}")
            continue
        yield _as_record(value, row, lineno, line, limit)


def _iter_json_array(text: str, limit: int) -> Iterator[RawRecord]:
    if _has_surrogates(text):
        # A JSON array is one document: find the elements anyway by decoding leniently, then judge each.
        lenient = text.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace")
    else:
        lenient = text
    try:
        values = json.loads(lenient)
    except json.JSONDecodeError as e:
        yield RawRecord(1, None, None, _text(text if not _has_surrogates(text) else lenient, limit), "unparsable_json",
                        f"the file is not a valid JSON array: {e.msg} at line {e.lineno} column {e.colno}")
        return
    for i, value in enumerate(values, start=1):
        raw = json.dumps(value, ensure_ascii=False)
        if _has_surrogates(raw):  # a \ud800-style escape: valid JSON, but not text; keep it escaped
            raw = json.dumps(value)
        if lenient is not text and "\ufffd" in raw:
            yield RawRecord(i, None, None, _text(raw, limit), "undecodable_text", "the row holds bytes that are not valid UTF-8")
            continue
        yield _as_record(value, i, None, raw, limit)


def _iter_csv(text: str, limit: int) -> Iterator[RawRecord]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as e:
        yield RawRecord(1, 1, None, "", "unparsable_csv", f"the header cannot be read: {e}")
        return
    header = [h.strip() for h in header]
    row = 0
    while True:
        start_line = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            row += 1
            yield RawRecord(row, start_line, None, "", "unparsable_csv", str(e))
            continue
        if not cells or all(not c.strip() for c in cells):
            continue
        row += 1
        raw = json.dumps(dict(zip(header, cells)), ensure_ascii=False) if len(cells) == len(header) else json.dumps(cells, ensure_ascii=False)
        if any(_has_surrogates(c) for c in cells):
            yield RawRecord(row, start_line, None, _text(_printable(raw), limit), "undecodable_text",
                            "the row is not valid UTF-8")
            continue
        if len(cells) != len(header):
            yield RawRecord(row, start_line, None, _text(raw, limit), "wrong_type",
                            f"the row has {len(cells)} cells but the header has {len(header)} columns")
            continue
        yield RawRecord(row, start_line, dict(zip(header, cells)), raw)


def _iter_parquet(data: bytes, limit: int) -> Iterator[RawRecord]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(pa.BufferReader(data))
    except Exception as e:  # pyarrow raises several types for a damaged file
        yield RawRecord(1, None, None, "", "unparsable_parquet", f"the file is not readable Parquet: {e}")
        return
    # Row group by row group: a damaged page fails its group only, and the footer says how many rows each group
    # holds, so the rows that cannot be read are still counted, each rejected, never silently lost.
    yield from _parquet_records(pf, range(pf.metadata.num_row_groups), 0)


def head_records(path: str, fmt: str, nbytes: int, raw_limit: int = 4000) -> Iterator[RawRecord]:
    """The first records of a file, read from its head only (ranged reads on object stores).

    JSON Lines and CSV: the first `nbytes`, cut at the last whole line. A JSON array: the elements that are complete
    in the first `nbytes`. Parquet: the footer, then the first batch of the first row group.
    """
    if fmt == "parquet":
        yield from _parquet_head(path, raw_limit)
        return
    data = read_bytes(path, nbytes + 1)
    if len(data) <= nbytes:  # the whole file
        yield from iter_records(data, fmt, raw_limit)
        return
    data = data[:nbytes]
    if fmt == "json" and data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"[":
        yield from _json_array_head(data, raw_limit)
        return
    cut = data.rfind(b"\n")
    yield from iter_records(data[: cut if cut > 0 else nbytes], fmt, raw_limit)


def _json_array_head(data: bytes, limit: int) -> Iterator[RawRecord]:
    # The elements complete within the head, decoded one by one; the element cut by the head's end is left out.
    text = data.decode("utf-8", errors="ignore").lstrip("\ufeff \t\r\n")[1:]
    decoder = json.JSONDecoder()
    pos, row = 0, 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return
        row += 1
        yield _as_record(value, row, None, text[pos:end], limit)
        pos = end


def _parquet_head(path: str, limit: int, rows: int = 64) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    from .storage import filesystem

    fs, inner = filesystem(path)
    try:
        with fs.open_input_file(inner) as f:
            pf = pq.ParquetFile(f)
            if pf.metadata.num_row_groups == 0:
                return
            batch = next(pf.iter_batches(batch_size=rows, row_groups=[0]), None)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        yield RawRecord(1, None, None, "", "unparsable_parquet", f"the file is not readable Parquet: {e}")
        return
    for i, value in enumerate(batch.to_pylist() if batch is not None else [], start=1):
        yield RawRecord(i, None, value, json.dumps(value, ensure_ascii=False, default=str))


def _fs_path(path: str, fs=None):
    """(filesystem, path inside it): `fs` as given by the driver (it carries the configured endpoint to workers
    whose environment lacks it), else the one `storage.filesystem` builds."""
    from .storage import filesystem, is_uri, local_path

    if fs is None:
        return filesystem(path)
    return fs, (path.split("://", 1)[1].rstrip("/") if is_uri(path) else local_path(path))


def read_line_range(path: str, start: int, stop: int, step: int = 1 << 20, fs=None) -> tuple[bytes, int]:
    """The lines of a text file whose first byte lies in [start, stop), and their count.

    Every line belongs to exactly one range, so ranges read by separate tasks together hold each line once: a range
    skips the line cut by its start (the range before it finishes that line) and reads on past `stop` to finish its
    own last line. Ranged reads on object stores; only this range (and one line past it) is read.
    """
    fs, inner = _fs_path(path, fs)
    with fs.open_input_file(inner) as f:
        size = f.size()
        stop = min(stop, size)
        data = f.read_at(stop - start, start) if stop > start else b""
        if start > 0 and f.read_at(1, start - 1) != b"\n":
            cut = data.find(b"\n")
            data = data[cut + 1:] if cut >= 0 else b""  # no line starts in this range
        if data and not data.endswith(b"\n"):
            tail, pos = [data], stop
            while pos < size:
                chunk = f.read_at(min(step, size - pos), pos)
                pos += len(chunk)
                nl = chunk.find(b"\n")
                if nl >= 0:
                    tail.append(chunk[: nl + 1])
                    break
                tail.append(chunk)
            data = b"".join(tail)
    lines = data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
    return data, lines


def parquet_row_groups(path: str) -> list[tuple[int, int]]:
    """(rows, compressed bytes) of each row group, from the file's footer (a ranged read on object stores)."""
    import pyarrow.parquet as pq

    from .storage import filesystem

    fs, inner = filesystem(path)
    with fs.open_input_file(inner) as f:
        meta = pq.ParquetFile(f).metadata
    out = []
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        out.append((rg.num_rows, sum(rg.column(c).total_compressed_size for c in range(rg.num_columns))))
    return out


def iter_parquet_groups(path: str, groups: list[int], first_row: int, limit: int, fs=None) -> Iterator[RawRecord]:
    """Records of some row groups of a Parquet file, read from the file itself (ranged reads), numbered from
    `first_row`; a damaged group rejects each of its rows, as `iter_records` does for a whole file."""
    import pyarrow.parquet as pq

    fs, inner = _fs_path(path, fs)
    try:
        f = fs.open_input_file(inner)
        pf = pq.ParquetFile(f)
    except Exception as e:  # noqa: BLE001
        yield RawRecord(first_row, None, None, "", "unparsable_parquet", f"the file is not readable Parquet: {e}")
        return
    with f:
        yield from _parquet_records(pf, groups, first_row - 1)


def _parquet_records(pf, groups, row: int) -> Iterator[RawRecord]:
    for group in groups:
        first, expected = row, pf.metadata.row_group(group).num_rows
        try:
            for batch in pf.iter_batches(batch_size=4096, row_groups=[group]):
                for value in batch.to_pylist():
                    row += 1
                    yield RawRecord(row, None, value, json.dumps(value, ensure_ascii=False, default=str))
        except Exception as e:  # noqa: BLE001 - pyarrow raises OSError, ArrowInvalid, ... for a damaged page
            detail = (f"row group {group} (rows {first + 1}-{first + expected}) is not readable Parquet: "
                      f"{type(e).__name__}: {e}")
            while row < first + expected:
                row += 1
                yield RawRecord(row, None, None, "", "unparsable_parquet", detail)


def read_bytes(path: str, limit: Optional[int] = None, fs=None) -> bytes:
    """A source file's bytes, or its first `limit` bytes (a ranged read on object stores)."""
    if fs is not None:
        fs, inner = _fs_path(path, fs)
        with fs.open_input_file(inner) as f:
            return f.read(limit) if limit is not None else f.read()
    if _is_uri(path):
        from .storage import read_bytes as read_remote

        return read_remote(path, limit)
    with open(path, "rb") as f:
        return f.read(limit) if limit is not None else f.read()
