"""Where rows come from: every kind of file or folder people keep training data in.

    .json .jsonl          rows as objects (formats.read_rows)
    .csv .tsv             one row per line, read with pandas, every cell as text
    .parquet              one row per record, read with pyarrow
    .html .htm            one row per page, or per section under each heading (data.html_split)
    .db .sqlite .sqlite3  rows of data.query, or of data.table (or of the only table)
    .sql                  a dump: statements split with sqlparse, run into an in-memory SQLite
    .txt .md              one document per file: {"title", "text"}
    a folder              a `datasets` save_to_disk folder, or every supported file inside it

Every reader returns (row dict, where) pairs; `where` names the file and the line, row,
section or statement, so an error message can point at it. `data.columns` then renames your
columns to the fields tunesmith reads.
"""

from __future__ import annotations

import hashlib
import io
import math
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from tunesmith.data import formats
from tunesmith.data.html import read_html
from tunesmith.data.sql import no_other_files, read_sql_dump, rows_of
from tunesmith.errors import DataError

Rows = list[tuple[dict, str]]

KINDS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv",
         ".parquet": "parquet", ".pq": "parquet", ".html": "html", ".htm": "html", ".xhtml": "html",
         ".db": "sqlite", ".sqlite": "sqlite", ".sqlite3": "sqlite", ".sql": "sql",
         ".txt": "text", ".md": "text", ".markdown": "text", ".rst": "text"}
SQLITE_MAGIC = b"SQLite format 3\x00"
PARQUET_MAGIC = b"PAR1"
DATASETS_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass
class Source:
    path: str
    kind: str  # jsonl, csv, parquet, html, sqlite, sql, text, datasets, folder
    rows: Rows


def read_source(path: str | Path, data) -> Source:
    """All rows of `path` (a file or a folder), columns mapped by data.columns."""
    path = Path(path)
    if path.is_dir():
        kind, rows = _read_folder(path, data)
    elif path.is_file():
        kind = kind_of(path)
        rows = _read_file(path, kind, data)
    else:
        raise DataError(f"data file {path} not found")
    if not rows:
        raise DataError(f"{path}: the {'folder' if path.is_dir() else 'file'} has no rows")
    if data.columns:
        rows = map_columns(rows, data.columns, path)
    return Source(str(path), kind, rows)


def kind_of(path: Path) -> str:
    kind = KINDS.get(path.suffix.lower())
    if kind:
        return kind
    with open(path, "rb") as handle:
        head = handle.read(16)
    if head.startswith(SQLITE_MAGIC):
        return "sqlite"
    if head.startswith(PARQUET_MAGIC):
        return "parquet"
    return "jsonl"  # any other name: JSON or JSONL rows, as before


def _read_file(path: Path, kind: str, data) -> Rows:
    if kind in ("json", "jsonl"):
        return formats.read_rows(path)
    if kind in ("csv", "tsv"):
        return read_csv(path, "\t" if kind == "tsv" else ",")
    if kind == "parquet":
        return read_parquet(path)
    if kind == "html":
        return read_html(path, read_text(path), data.html_split)
    if kind == "sqlite":
        return read_sqlite(path, data.query, data.table)
    if kind == "sql":
        return read_sql_dump(path, read_text(path), data.query, data.table)
    return read_text_document(path)


def _read_folder(path: Path, data) -> tuple[str, Rows]:
    if any((path / marker).is_file() for marker in DATASETS_MARKERS):
        return "datasets", read_datasets_folder(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in KINDS
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise DataError(f"{path}: the folder has no data files (looked for {', '.join(sorted(KINDS))})")
    rows: Rows = []
    for file in files:
        rows += _read_file(file, KINDS[file.suffix.lower()], data)
    kinds = sorted({KINDS[f.suffix.lower()] for f in files})
    return f"folder of {len(files)} {'/'.join(kinds)} files", rows


def read_text(path: Path) -> str:
    """UTF-8 text (a leading BOM dropped); a non-UTF-8 file is an error naming line and byte."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {err.start}); save it as UTF-8") from None


def read_csv(path: Path, separator: str) -> Rows:
    import pandas as pd

    text = read_text(path)
    try:
        frame = pd.read_csv(io.StringIO(text), sep=separator, dtype=str, keep_default_na=False,
                            skip_blank_lines=True)
    except pd.errors.EmptyDataError:
        return []
    except (pd.errors.ParserError, ValueError) as err:
        detail = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise DataError(f"{path}: not valid CSV ({detail})") from None
    columns = [str(c) for c in frame.columns]
    records = frame.to_dict("records")
    # Short rows are padded with NaN even with dtype=str: an absent cell is an empty one.
    return [({str(k): ("" if _is_nan(v) else v) for k, v in record.items()}, f"{path}:row {number}")
            for number, record in enumerate(records, start=1)] if columns else []


def _is_nan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)


def read_parquet(path: Path) -> Rows:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file ({str(err).splitlines()[0]})") from None
    return [(record, f"{path}:row {number}") for number, record in enumerate(table.to_pylist(), start=1)]


def read_text_document(path: Path) -> Rows:
    text = read_text(path)
    first = text.lstrip()[:1]
    if path.suffix.lower() == ".txt" and first in ("{", "[") and _parses_as_rows(path):
        return formats.read_rows(path)  # JSON rows kept in a .txt file
    return [({"title": path.stem, "text": text}, str(path))]  # prose, even if it starts with a brace


def _parses_as_rows(path: Path) -> bool:
    try:
        formats.read_rows(path)
    except DataError:
        return False
    return True


def read_sqlite(path: Path, query: str | None, table: str | None) -> Rows:
    uri = f"file:{quote(str(path.resolve()))}?mode=ro"
    try:
        connection = sqlite3.connect(uri, uri=True)
    except sqlite3.Error as err:
        raise DataError(f"{path}: cannot open the SQLite database ({err})") from None
    connection.set_authorizer(no_other_files)  # mode=ro covers this file only; ATTACH would create others
    try:
        return rows_of(connection, path, query, table)
    finally:
        connection.close()


def read_datasets_folder(path: Path) -> Rows:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path} is a Hugging Face datasets folder; reading it needs the datasets "
                        "package: pip install 'tunesmith[datasets]'") from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # noqa: BLE001 — a damaged folder raises many types (KeyError, TypeError, ...)
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{path}: not a readable datasets folder ({detail})") from None
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        if "train" not in loaded and len(names) != 1:
            raise DataError(f"{path} holds the splits {names}; point data.path at one of them "
                            f"(e.g. {path / names[0]})")
        loaded = loaded["train"] if "train" in loaded else loaded[names[0]]
    return [(record, f"{path}:row {number}") for number, record in enumerate(loaded.to_list(), start=1)]


def map_columns(rows: Rows, columns: dict[str, str], path: Path) -> Rows:
    """Rename your columns to our fields ({question: Description}); other columns are kept."""
    available = set(rows[0][0])
    for target, column in columns.items():
        if column not in available:
            raise DataError(f"{rows[0][1]}: no column {column!r} (data.columns.{target}); the columns "
                            f"are {sorted(available)}")
    mapped_from = set(columns.values())
    out = []
    for row, where in rows:
        missing = [c for c in columns.values() if c not in row]
        if missing:
            raise DataError(f"{where}: no column {missing[0]!r} (mapped by data.columns)")
        renamed = {target: row[column] for target, column in columns.items()}
        renamed.update({k: v for k, v in row.items() if k not in mapped_from and k not in renamed})
        out.append((renamed, where))
    return out


def fingerprint(path: str | Path) -> str:
    """sha256 of a file, or of every file in a folder (names and contents): what prepare's reuse
    check compares."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else "").encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
