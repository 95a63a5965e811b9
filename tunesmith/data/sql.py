"""Rows out of SQL: a query (or a table) over a SQLite database, or over a dump file.

A dump is split into statements with sqlparse and run, one by one, into an in-memory SQLite
database; nothing touches the disk. SQLite's own `.dump` output runs as it is; the MySQL habits
of `mysqldump` (backquotes, backslash escapes in strings, session SET / LOCK statements, table
options such as ENGINE=InnoDB, AUTO_INCREMENT, inline KEY lines) are translated first. A
statement that fails is reported with its number and line.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

from tunesmith.errors import DataError

SKIPPED_MYSQL = {"SET", "LOCK", "UNLOCK", "USE", "DELIMITER"}
MYSQL_HINTS = re.compile(r"ENGINE\s*=|/\*!\d+|LOCK TABLES|`|AUTO_INCREMENT", re.IGNORECASE)
MYSQL_ESCAPES = {"0": "\0", "b": "\b", "n": "\n", "r": "\r", "t": "\t", "Z": "\x1a"}


def read_sql_dump(path: Path, text: str, query: str | None, table: str | None) -> list[tuple[dict, str]]:
    import sqlparse

    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise DataError(f"{path}:{line}: a NUL character: this is not a SQL text file")
    mysql = bool(MYSQL_HINTS.search(text[:200_000]))
    connection = sqlite3.connect(":memory:")
    connection.set_authorizer(no_other_files)
    try:
        position = 0
        statements = [s for s in sqlparse.split(text) if s.strip()]
        if not statements:
            raise DataError(f"{path}: no SQL statements found")
        for number, statement in enumerate(statements, start=1):
            start = text.find(statement, position)
            position = start + len(statement) if start >= 0 else position
            line = text.count("\n", 0, max(start, 0)) + 1 + _leading_comment_lines(statement)
            _run(connection, statement, mysql, f"{path}: statement {number} (line {line})")
        return rows_of(connection, path, query, table)
    finally:
        connection.close()


def no_other_files(action: int, *_details) -> int:
    """sqlite3 authorizer: a dump (in memory) or data.query (on a read-only database) may not reach
    other files on the disk (ATTACH DATABASE 'x.db' creates the file)."""
    return sqlite3.SQLITE_DENY if action in (sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH) else sqlite3.SQLITE_OK


def _leading_comment_lines(statement: str) -> int:
    """Lines of comments and blank space before the statement's first keyword."""
    body = re.sub(r"^(\s+|--[^\n]*\n|/\*.*?\*/)*", "", statement, flags=re.DOTALL)
    return statement[: len(statement) - len(body)].count("\n")


def _run(connection: sqlite3.Connection, statement: str, mysql: bool, where: str) -> None:
    import sqlparse

    parsed = sqlparse.parse(statement)[0]
    first = parsed.token_first(skip_cm=True, skip_ws=True)
    if first is None:
        return  # only comments (e.g. mysqldump's /*!40101 ... */ version hints)
    if mysql:
        if first.normalized.upper() in SKIPPED_MYSQL:
            return
        statement = _from_mysql(parsed)
    if not sqlite3.complete_statement(statement if statement.rstrip().endswith(";") else statement + ";"):
        raise DataError(f"{where}: the statement is incomplete (an unclosed quote or parenthesis?)")
    try:
        connection.execute(statement)
    except sqlite3.Error as err:
        excerpt = " ".join(statement.split())[:60]
        raise DataError(f"{where}: {err} in {excerpt!r}") from None


def _from_mysql(parsed) -> str:
    """MySQL's dialect in SQLite's: standard string escapes, no table options or inline keys."""
    from sqlparse import tokens

    parts = []
    for token in parsed.flatten():
        if token.ttype in tokens.String.Single:
            parts.append(_standard_string(token.value))
        elif token.ttype in tokens.Comment:
            continue
        else:
            parts.append(token.value)
    statement = "".join(parts).strip()
    if re.match(r"CREATE\s+TABLE", statement, re.IGNORECASE):
        statement = _create_table(statement)
    return statement


def _standard_string(literal: str) -> str:
    """'it\\'s' (MySQL) -> 'it''s' (standard SQL)."""
    body, out, i = literal[1:-1], [], 0
    while i < len(body):
        char = body[i]
        if char in "\\'" and i + 1 < len(body):  # \x escapes, and '' (a quote, as in standard SQL)
            following = body[i + 1]
            out.append(MYSQL_ESCAPES.get(following, following) if char == "\\" else "'")
            i += 2
            continue
        out.append(char)
        i += 1
    return "'" + "".join(out).replace("'", "''") + "'"


def _create_table(statement: str) -> str:
    close = statement.rfind(")")
    head = statement[: close + 1] if close >= 0 else statement  # drop ENGINE=... CHARSET=...
    head = re.sub(r"\b(AUTO_INCREMENT|UNSIGNED|ZEROFILL)\b(\s*=\s*\d+)?", "", head, flags=re.IGNORECASE)
    head = re.sub(r"\b(CHARACTER SET|CHARSET|COLLATE)\s+\w+", "", head, flags=re.IGNORECASE)
    head = re.sub(r"\bCOMMENT\s+'(?:[^']|'')*'", "", head, flags=re.IGNORECASE)
    # mysqldump writes each index on its own line: "  KEY `name` (`column`(20)),"
    head = re.sub(r"^\s*(UNIQUE |FULLTEXT |SPATIAL )?(KEY|INDEX)\b.*$\n?", "", head,
                  flags=re.IGNORECASE | re.MULTILINE)
    return re.sub(r",\s*\)\s*$", "\n)", head)


def rows_of(connection: sqlite3.Connection, path: Path, query: str | None,
            table: str | None) -> list[tuple[dict, str]]:
    """The rows of data.query, of data.table, or of the database's only table."""
    try:
        tables = [name for (name,) in connection.execute(
            "SELECT name FROM sqlite_master WHERE type IN ('table', 'view') AND name NOT LIKE 'sqlite_%' "
            "ORDER BY name")]
    except sqlite3.DatabaseError as err:
        raise DataError(f"{path}: not a SQLite database ({err})") from None
    if not query:
        if table is None:
            if len(tables) != 1:
                found = f"the tables {tables}" if tables else "no tables"
                raise DataError(f"{path} has {found}: set data.table or data.query")
            table = tables[0]
        if table not in tables:
            raise DataError(f"{path}: no table {table!r} (data.table); the tables are {tables}")
        query = 'SELECT * FROM "' + table.replace('"', '""') + '"'
        label = f"table {table}"
    else:
        label = "data.query"
    try:
        cursor = connection.execute(query)
        columns = [d[0] for d in cursor.description or []]
        records = cursor.fetchall()
    except (sqlite3.Error, sqlite3.Warning) as err:
        raise DataError(f"{path}: data.query failed: {err}") from None
    if not columns:
        raise DataError(f"{path}: data.query returned no columns (is it a SELECT?)")
    return [(dict(zip(columns, values)), f"{path}:{label} row {number}")
            for number, values in enumerate(records, start=1)]
