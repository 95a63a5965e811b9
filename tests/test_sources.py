"""Data sources end to end through prepare: CSV, TSV, Parquet, HTML pages and folders, SQLite
databases, SQL dumps (SQLite and MySQL dialects), folders of text files, `datasets` folders,
multi-turn chats (messages and ShareGPT) with the right tokens trained on; and bad input of
every kind as one line, exit code 2, nothing written."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from helpers import write_jsonl

from tunesmith import config as config_module
from tunesmith.data import prepare as prepare_module
from tunesmith.data.gather import load
from tunesmith.data.sources import read_source
from tunesmith.errors import DataError

FAQ = [("What is a fever?", "A body temperature above 38 degrees."),
       ("How long does a cold last?", "Usually seven to ten days."),
       ("Should I drink water when ill?", "Yes, plenty of it."),
       ("Can I exercise with a cold?", "Light exercise only, if you feel well."),
       ("When should I call a doctor?", "If a fever lasts more than three days.")]


def make_config(tmp_path: Path, path, **data) -> config_module.RunConfig:
    data = {"path": str(path), "val_split": 0.0, "test_split": 0.0, **data}
    return config_module.build({"out_dir": str(tmp_path / "run"), "data": data})


def prepared_rows(tmp_path, tokenizer, path, **data):
    prepared = prepare_module.prepare(make_config(tmp_path, path, **data), tokenizer)
    return prepared, prepared.rows("train")


def supervised_text(prepared, tokenizer, index: int) -> str:
    ids, supervised = prepared.splits["train"].example(index)
    return tokenizer.decode(ids[supervised].tolist())


# ---------------------------------------------------------------- tables: CSV, TSV, Parquet


def test_csv_with_a_column_mapping(tmp_path, tokenizer):
    lines = ["Description,Doctor,Specialty"] + [f'"{q}","{a}",general' for q, a in FAQ]
    path = tmp_path / "faq.csv"
    path.write_text("\n".join(lines) + "\n")
    prepared, rows = prepared_rows(tmp_path, tokenizer, path,
                                   columns={"question": "Description", "answer": "Doctor"})
    assert prepared.manifest["format"]["train"] == "qa"
    assert prepared.manifest["sources"]["path"] == {"path": str(path), "kind": "csv", "rows": 5}
    assert [(r["messages"][-1]["content"], r["reference"]) for r in rows] == FAQ
    assert [r["where"] for r in rows] == [f"{path}:row {i}" for i in range(1, 6)]
    assert rows[0]["extra"] == {"Specialty": "general"}  # unmapped columns are kept for analysis
    assert supervised_text(prepared, tokenizer, 0) == FAQ[0][1] + "<|im_end|>"


def test_tsv_cells_stay_text(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("question\tanswer\n007\t1e3\nNA\tnull\n")
    config = make_config(tmp_path, path)
    loaded = load(str(path), config.data)
    # every cell as written: no numbers, no missing values guessed from "NA" or "null"
    assert [(e.messages[0]["content"], e.reference) for e in loaded.examples] == [("007", "1e3"), ("NA", "null")]


def test_parquet_rows_and_chat_messages(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "faq.parquet"
    pq.write_table(pa.table({"q": [q for q, _ in FAQ], "a": [a for _, a in FAQ], "n": list(range(5))}), path)
    _, rows = prepared_rows(tmp_path, tokenizer, path, columns={"question": "q", "answer": "a"})
    assert [r["reference"] for r in rows] == [a for _, a in FAQ]
    assert rows[2]["where"] == f"{path}:row 3" and rows[2]["extra"] == {"n": 2}

    chats = tmp_path / "chats.parquet"
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye!"}]
    pq.write_table(pa.table({"messages": [conversation, conversation[:2]]}), chats)
    loaded = load(str(chats), make_config(tmp_path, chats).data)
    assert loaded.format == "messages"
    assert loaded.examples[0].messages == conversation and loaded.examples[1].reference == "Hello!"


# ---------------------------------------------------------------- HTML

PAGE = """<!DOCTYPE html><html><head><title>Clinic FAQ</title>
<style>body {{ color: red }}</style><script>var tracking = "secret";</script></head>
<body><nav><a href="/">Home</a> | <a href="/faq">FAQ</a></nav>
<header><h1>Clinic name</h1></header>
<main>
{sections}
</main>
<aside>Subscribe to our newsletter</aside><footer>Copyright 2024</footer></body></html>
"""


def faq_page(pairs) -> str:
    sections = "\n".join(f"<h2>{q}</h2>\n<p>{a.split(' ', 1)[0]} <b>{a.split(' ', 1)[1]}</b></p>"
                         for q, a in pairs)
    return PAGE.format(sections=sections)


def test_html_page_becomes_one_text_document_without_boilerplate(tmp_path, tokenizer):
    path = tmp_path / "faq.html"
    path.write_text(faq_page(FAQ[:2]))
    [(row, where)] = read_source(path, make_config(tmp_path, path).data).rows
    assert where == str(path)
    assert row["title"] == "Clinic FAQ"
    assert row["text"] == ("What is a fever?\n\nA body temperature above 38 degrees.\n\n"
                           "How long does a cold last?\n\nUsually seven to ten days.")
    prepared, _ = prepared_rows(tmp_path, tokenizer, path, max_seq_length=32)
    assert prepared.manifest["format"]["train"] == "text"
    text = tokenizer.decode(prepared.splits["train"].input_ids.tolist())
    for boilerplate in ("Home", "tracking", "color", "Clinic name", "newsletter", "Copyright"):
        assert boilerplate not in text


def test_html_folder_split_by_headings_into_question_answer_rows(tmp_path, tokenizer):
    folder = tmp_path / "site"
    (folder / "more").mkdir(parents=True)
    (folder / "a.html").write_text(faq_page(FAQ[:3]))
    (folder / "more" / "b.htm").write_text(faq_page(FAQ[3:]))
    (folder / "notes.bin").write_bytes(b"\x00\x01")  # not a data file: ignored
    prepared, rows = prepared_rows(tmp_path, tokenizer, folder, html_split="headings",
                                   columns={"question": "heading", "answer": "body"})
    assert prepared.manifest["format"]["train"] == "qa"
    assert prepared.manifest["sources"]["path"]["kind"] == "folder of 2 html files"
    assert [(r["messages"][-1]["content"], r["reference"]) for r in rows] == FAQ
    assert rows[0]["where"] == f"{folder / 'a.html'}#section 1 (What is a fever?)"
    assert rows[0]["extra"]["title"] == "Clinic FAQ"


def test_sphinx_permalink_anchors_do_not_end_up_in_headings(tmp_path, tokenizer):
    page = tmp_path / "docs.html"
    page.write_text("<html><body><div role='main'>" + "".join(
        f'<section><h2>{q}<a class="headerlink" href="#s{i}" title="Link to this heading">\u00b6</a></h2>'
        f"<p>{a}</p></section>" for i, (q, a) in enumerate(FAQ)) + "</div></body></html>")
    _, rows = prepared_rows(tmp_path, tokenizer, page, html_split="headings",
                            columns={"question": "heading", "answer": "body"})
    assert sorted((r["messages"][-1]["content"], r["reference"]) for r in rows) == sorted(FAQ)


# ---------------------------------------------------------------- SQL


def faq_database(path: Path) -> Path:
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE faq (id INTEGER PRIMARY KEY, Description TEXT, Doctor TEXT, topic TEXT)")
    connection.executemany("INSERT INTO faq (Description, Doctor, topic) VALUES (?, ?, ?)",
                           [(q, a, "cold" if "cold" in q else "other") for q, a in FAQ])
    connection.commit()
    connection.close()
    return path


def test_sqlite_table_query_and_only_table(tmp_path, tokenizer):
    db = faq_database(tmp_path / "clinic.db")
    columns = {"question": "Description", "answer": "Doctor"}
    _, rows = prepared_rows(tmp_path, tokenizer, db, table="faq", columns=columns)
    assert [r["reference"] for r in rows] == [a for _, a in FAQ]
    assert rows[0]["where"] == f"{db}:table faq row 1" and rows[0]["extra"] == {"id": 1, "topic": "other"}
    data = make_config(tmp_path, db, columns=columns).data  # no table named: the only one
    assert len(load(str(db), data).examples) == 5
    data = make_config(tmp_path, db, query="SELECT Description AS question, Doctor AS answer FROM faq "
                       "WHERE topic = 'cold' ORDER BY id").data
    loaded = load(str(db), data)
    assert [e.reference for e in loaded.examples] == [FAQ[1][1], FAQ[3][1]]
    assert loaded.examples[1].where == f"{db}:data.query row 2"


def test_sqlite_dump_file(tmp_path, tokenizer):
    connection = sqlite3.connect(faq_database(tmp_path / "clinic.db"))
    dump = tmp_path / "clinic.sql"
    dump.write_text("\n".join(connection.iterdump()) + "\n")
    connection.close()
    prepared, rows = prepared_rows(tmp_path, tokenizer, dump, table="faq",
                                   columns={"question": "Description", "answer": "Doctor"})
    assert [r["reference"] for r in rows] == [a for _, a in FAQ]
    assert prepared.manifest["sources"]["path"]["kind"] == "sql"


MYSQL_DUMP = r"""-- MySQL dump 10.13  Distrib 8.0
/*!40101 SET @OLD_CHARACTER_SET_CLIENT=@@CHARACTER_SET_CLIENT */;
SET NAMES utf8mb4;
DROP TABLE IF EXISTS `faq`;
CREATE TABLE `faq` (
  `id` int(11) unsigned NOT NULL AUTO_INCREMENT,
  `Description` text COLLATE utf8mb4_unicode_ci,
  `Doctor` text,
  PRIMARY KEY (`id`),
  KEY `idx_description` (`Description`(20))
) ENGINE=InnoDB AUTO_INCREMENT=3 DEFAULT CHARSET=utf8mb4;
LOCK TABLES `faq` WRITE;
INSERT INTO `faq` VALUES (1,'What\'s a fever?','A temperature above 38; it\'s common.\nRest.'),(2,'Semi;colon?','It''s \"fine\"');
UNLOCK TABLES;
"""


def test_mysql_dump_dialect_is_translated(tmp_path):
    dump = tmp_path / "mysql.sql"
    dump.write_text(MYSQL_DUMP)
    data = make_config(tmp_path, dump, columns={"question": "Description", "answer": "Doctor"}).data
    examples = load(str(dump), data).examples
    assert [(e.messages[0]["content"], e.reference) for e in examples] == [
        ("What's a fever?", "A temperature above 38; it's common.\nRest."), ("Semi;colon?", 'It\'s "fine"')]


# ---------------------------------------------------------------- text corpora, datasets folders


def test_text_folder_for_continued_pretraining(tmp_path, tokenizer):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("the quick brown fox jumps over the lazy dog\n")
    (folder / "b.md").write_text("# Notes\n\nhello world, red green blue\n")
    prepared, rows = prepared_rows(tmp_path, tokenizer, folder, max_seq_length=8)
    assert prepared.manifest["format"]["train"] == "text"
    assert prepared.manifest["template"] == "none (text blocks)"
    split = prepared.splits["train"]
    eos = tokenizer.eos_token_id
    expected = (tokenizer("the quick brown fox jumps over the lazy dog", add_special_tokens=False)["input_ids"]
                + [eos] + tokenizer("# Notes\n\nhello world, red green blue",
                                    add_special_tokens=False)["input_ids"] + [eos])
    assert split.input_ids.tolist() == expected  # documents in order, each ending with EOS
    assert bool(split.supervised.all())
    assert split.lengths.tolist()[:-1] == [8] * (len(split) - 1)  # full blocks, then the rest
    assert rows[0]["where"] == str(folder / "a.txt")
    counts = prepared.manifest["counts"]["train"]
    assert counts["documents"] == 2 and counts["tokens"] == counts["supervised_tokens"] == len(expected)


def test_datasets_folder_written_by_save_to_disk(tmp_path, tokenizer):
    datasets = pytest.importorskip("datasets")
    rows = [{"question": q, "answer": a} for q, a in FAQ]
    single = tmp_path / "ds"
    datasets.Dataset.from_list(rows).save_to_disk(str(single))
    prepared, prepared_rows_ = prepared_rows(tmp_path, tokenizer, single)
    assert prepared.manifest["sources"]["path"]["kind"] == "datasets"
    assert [r["reference"] for r in prepared_rows_] == [a for _, a in FAQ]
    several = tmp_path / "dsdict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:3]),
                          "test": datasets.Dataset.from_list(rows[3:])}).save_to_disk(str(several))
    config = make_config(tmp_path, several, test_path=str(several / "test"))
    examples, _ = prepare_module.split_examples(config)
    assert [e.reference for e in examples["train"]] == [a for _, a in FAQ[:3]]
    assert [e.reference for e in examples["test"]] == [a for _, a in FAQ[3:]]


# ---------------------------------------------------------------- multi-turn chats

CONVERSATION = [("system", "Be brief."), ("user", "Hi there"), ("assistant", "Hello!"),
                ("user", "What is the capital of France?"), ("assistant", "Paris.")]


@pytest.mark.parametrize("shape", ["messages", "sharegpt"])
@pytest.mark.parametrize("turns", ["all", "last"])
def test_multi_turn_chats_train_on_assistant_turns_only(tmp_path, tokenizer, shape, turns):
    if shape == "messages":
        row = {"messages": [{"role": r, "content": c} for r, c in CONVERSATION]}
    else:
        speakers = {"system": "system", "user": "human", "assistant": "gpt"}
        row = {"conversations": [{"from": speakers[r], "value": c} for r, c in CONVERSATION]}
    path = write_jsonl(tmp_path / "chats.jsonl", [row])
    prepared, rows = prepared_rows(tmp_path, tokenizer, path, assistant_turns=turns)
    assert prepared.manifest["format"]["train"] == shape
    ids, supervised = prepared.splits["train"].example(0)
    # the trained-on tokens, run by run, are exactly the answers with their end-of-turn token
    runs, current = [], []
    for token, trained in zip(ids.tolist(), supervised.tolist()):
        if trained:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    runs += [tokenizer.decode(current)] if current else []
    expected = ["Hello!<|im_end|>", "Paris.<|im_end|>"] if turns == "all" else ["Paris.<|im_end|>"]
    assert runs == expected
    assert tokenizer.decode(ids.tolist()).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert rows[0]["reference"] == "Paris."


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing written


def bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, list[str], str]]:
    """name → (data path, extra flags, expected message)."""
    folder = tmp_path / "bad"
    folder.mkdir()
    csv_path = folder / "faq.csv"
    csv_path.write_text("Description,Answer\nWhat?,That.\n")
    html_path = folder / "page.html"
    html_path.write_text('{"question": "this is JSON, not HTML"}\n')
    dump = folder / "broken.sql"
    dump.write_text("CREATE TABLE faq (q TEXT, a TEXT);\n\nINSERT INTO faq VALUES ('What?', 'That.');\n"
                    "INSERT INTO faq VALUES ('Unclosed, 'x');\n")
    db = faq_database(folder / "clinic.db")
    latin = folder / "latin1.csv"
    latin.write_bytes("question,answer\nWhat?,Yes\nCaf\u00e9?,Oui\n".encode("latin-1"))
    sharegpt = write_jsonl(folder / "chat.jsonl", [
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "narrator", "value": "..."}]}])
    parquet = folder / "fake.parquet"
    parquet.write_text("question,answer\n")
    return {
        "csv-missing-column": (csv_path, ["--data.columns.question", "Description", "--data.columns.answer",
                                          "Doctor"],
                               (f"{csv_path}:row 1: no column 'Doctor' (data.columns.answer); the columns are "
                                "['Answer', 'Description']")),
        "html-not-html": (html_path, [], f"{html_path}: not HTML (no tags found)"),
        "sql-does-not-parse": (dump, [], f"{dump}: statement 3 (line 4): "),
        "query-fails": (db, ["--data.query", "SELECT * FROM nowhere"],
                        f"{db}: data.query failed: no such table: nowhere"),
        "table-missing": (db, ["--data.table", "faqs"], f"{db}: no table 'faqs' (data.table); the tables are ['faq']"),
        "not-utf8": (latin, [], f"{latin}:3: not UTF-8 text (byte 29)"),
        "sharegpt-unknown-role": (sharegpt, [], f"{sharegpt}:2: turn 2 has unknown role 'narrator' in 'from'"),
        "not-parquet": (parquet, [], f"{parquet}: not a readable Parquet file"),
        "empty-folder": (folder / "nothing", [], "the folder has no data files"),
    }


BAD = ["csv-missing-column", "html-not-html", "sql-does-not-parse", "query-fails", "table-missing", "not-utf8",
       "sharegpt-unknown-role", "not-parquet", "empty-folder"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_exit_2_and_nothing_written(cli, llama, tmp_path, case):
    path, flags, message = bad_inputs(tmp_path)[case]
    if case == "empty-folder":
        path.mkdir()
    run_dir = tmp_path / "run"
    result = cli("prepare", "--model", llama, "--data.path", path, "--out_dir", run_dir, *flags)
    assert result.code == 2
    errors = [line for line in result.err.splitlines() if line.startswith("tunesmith:")]
    assert len(errors) == 1 and errors[0] == result.err.strip().splitlines()[-1], result.err
    assert message in errors[0]
    assert "Traceback" not in result.err
    assert not run_dir.exists()


def test_sql_dump_error_names_statement_and_line(tmp_path):
    dump = tmp_path / "d.sql"
    dump.write_text("CREATE TABLE t (q TEXT, a TEXT);\n-- a comment\n\nINSERT INTO nowhere VALUES (1, 2);\n")
    with pytest.raises(DataError, match=r"d\.sql: statement 2 \(line 4\): no such table: nowhere"):
        load(str(dump), make_config(tmp_path, dump).data)
    dump.write_text("hello world")
    with pytest.raises(DataError, match=r"statement 1 \(line 1\): near \"hello\": syntax error"):
        load(str(dump), make_config(tmp_path, dump).data)


def test_a_database_with_several_tables_needs_a_choice(tmp_path):
    db = faq_database(tmp_path / "clinic.db")
    connection = sqlite3.connect(db)
    connection.execute("CREATE TABLE other (x TEXT)")
    connection.commit()
    connection.close()
    with pytest.raises(DataError, match=r"has the tables \['faq', 'other'\]: set data.table or data.query"):
        load(str(db), make_config(tmp_path, db).data)


def test_unknown_column_target_is_a_config_error(cli, llama, tmp_path):
    result = cli("prepare", "--model", llama, "--data.path", tmp_path / "x.csv", "--data.columns.questoin", "Q")
    assert result.code == 2
    assert "data.columns.questoin: not a field tunesmith reads (did you mean question?)" in result.err


def test_json_rows_in_a_txt_file_are_still_rows(tmp_path):
    path = tmp_path / "rows.txt"
    path.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    loaded = load(str(path), make_config(tmp_path, path).data)
    assert loaded.format == "qa" and loaded.examples[0].reference == "a"


@pytest.mark.parametrize("statement", ["ATTACH DATABASE '{target}' AS other;", "COMMIT; VACUUM INTO '{target}';"])
def test_a_sql_dump_cannot_write_to_the_disk(tmp_path, statement):
    target = tmp_path / "created.db"
    dump = tmp_path / "d.sql"
    dump.write_text("CREATE TABLE t (question TEXT, answer TEXT);\nINSERT INTO t VALUES ('q', 'a');\n"
                    + statement.format(target=target) + "\n")
    with pytest.raises(DataError, match=r"d\.sql: statement [34] \(line 3\): (not authorized|authorization denied)"):
        load(str(dump), make_config(tmp_path, dump).data)
    assert not target.exists()
