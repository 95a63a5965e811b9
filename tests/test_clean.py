"""Cleaning, deduplication, the leakage check, text packing and k-fold splits, each counted on
crafted data whose right answer is known."""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import pytest
from helpers import fast_train_flags, qa_rows, write_jsonl

from tunesmith import config as config_module
from tunesmith.data import clean, dedup
from tunesmith.data import prepare as prepare_module
from tunesmith.data.formats import Example
from tunesmith.data.templates import Encoder
from tunesmith.data.text import pack_documents
from tunesmith.errors import ConfigError

SKY_Q = "Explain in simple words why the sky looks blue during a clear day"
SKY_A = ("Sunlight is scattered by the molecules of the air and blue light is scattered the most "
         "so the sky looks blue to")

CRAFTED = [
    {"question": "Q. What is 2+2?", "answer": "A. Four.  \r\n"},  # 1 prefixes + whitespace, kept
    {"question": "What is 2+2?", "answer": "Four."},  # 2 exact duplicate of 1 once cleaned
    {"question": "what is 2 + 2", "answer": "four"},  # 3 exact duplicate (case, spacing, punctuation)
    {"question": "Tell me about yourself", "answer": "As an AI language model, I have no self."},  # 4
    {"question": "Who made you?", "answer": "I was trained by OpenAI\u2019s team."},  # 5 boilerplate
    {"question": "Empty", "answer": "   "},  # 6 empty answer
    {"question": SKY_Q, "answer": SKY_A + " us"},  # 7 kept
    {"question": SKY_Q + " please", "answer": SKY_A + " everyone"},  # 8 near duplicate of 7
    {"question": "Convert 5 March 2021 to ISO", "answer": "2021-03-05"},  # 9 templated, kept
    {"question": "Convert 6 March 2021 to ISO", "answer": "2021-03-06"},  # 10 templated, kept
    {"question": "Name a colour", "answer": "red\u00a0or\u200b blue"},  # 11 odd spaces, kept
]


def make_config(tmp_path: Path, path, **data) -> config_module.RunConfig:
    data = {"path": str(path), "val_split": 0.0, "test_split": 0.0, **data}
    return config_module.build({"out_dir": str(tmp_path / "run"), "data": data})


def test_each_cleaning_step_is_counted_with_samples(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", CRAFTED)
    config = make_config(tmp_path, path, clean={"strip_prefixes": ["Q. ", "A. "]})
    prepared = prepare_module.prepare(config, tokenizer)
    report = prepared.manifest["cleaning"]["path"]
    assert report["counts"] == {"empty_fields": 1, "whitespace": 2, "prefixes": 1, "identical_pairs": 0, "boilerplate": 2,
                                "exact_duplicates": 2, "near_duplicates": 1}
    assert (report["rows_in"], report["rows_out"]) == (11, 5)
    kept = [(r["messages"][-1]["content"], r["reference"]) for r in prepared.rows("train")]
    assert kept == [("What is 2+2?", "Four."), (SKY_Q, SKY_A + " us"), ("Convert 5 March 2021 to ISO", "2021-03-05"),
                    ("Convert 6 March 2021 to ISO", "2021-03-06"), ("Name a colour", "red or blue")]
    samples = report["samples"]
    assert samples["exact_duplicates"][0] == {"where": f"{path}:2", "text": "What is 2+2? | Four.",
                                              "detail": f"repeats {path}:1"}
    assert samples["near_duplicates"][0]["where"] == f"{path}:8"
    assert samples["near_duplicates"][0]["detail"].startswith(f"repeats {path}:7 (0.9")
    assert samples["boilerplate"][1]["detail"] == "contains 'trained by openai'"  # curly apostrophe, any case
    assert samples["empty_fields"][0]["detail"] == "empty: answer"


def test_steps_can_be_switched_off(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", CRAFTED[:5] + CRAFTED[6:])
    config = make_config(tmp_path, path, clean={"whitespace": False, "drop_phrases": [], "dedup": False,
                                                "near_dup_threshold": None})
    prepared = prepare_module.prepare(config, tokenizer)
    assert prepared.manifest["cleaning"]["path"]["counts"] == dict.fromkeys(clean.STEPS, 0)
    assert prepared.manifest["counts"]["train"]["examples"] == 10
    assert prepared.rows("train")[0]["reference"] == "A. Four.  \r\n"  # untouched


def test_empty_fields_stop_with_an_error_when_drop_empty_is_off(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", CRAFTED)
    with pytest.raises(Exception, match=r"d\.jsonl:6: field 'answer' is empty"):
        prepare_module.prepare(make_config(tmp_path, path, clean={"drop_empty": False}), tokenizer)


def test_documents_may_quote_canned_phrases(tmp_path):
    from tunesmith.data.gather import load

    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": "Old chatbots began with 'As an AI language model'."}])
    loaded = load(str(path), make_config(tmp_path, path).data)
    assert loaded.format == "text" and len(loaded.examples) == 1
    assert loaded.cleaning.counts["boilerplate"] == 0


def test_whitespace_normalisation_keeps_indentation():
    text = "  Here:  \r\n\r\n\r\n\r\n    def f():\u00a0\n        return 1\u200b  \n\n"
    assert clean.normalize_whitespace(text) == "Here:\n\n    def f():\n        return 1"


def test_length_filters_are_counted(tmp_path, tokenizer):
    rows = qa_rows(6) + [{"question": "Say many words", "answer": "word " * 30}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    lengths = [len(Encoder(tokenizer).encode(
        prepare_module.pieces(prepare_module.choose("chat", tokenizer), e, tokenizer))[0])
        for e in prepare_module.split_examples(make_config(tmp_path, path))[0]["train"]]
    short_cut = sorted(lengths)[2]  # two examples are shorter than this
    config = make_config(tmp_path, path, clean={"min_tokens": short_cut, "max_tokens": max(lengths) - 1})
    counts = prepare_module.prepare(config, tokenizer).manifest["counts"]["train"]
    assert (counts["too_short"], counts["too_long"], counts["examples"]) == (
        sum(n < short_cut for n in lengths), 1, 7 - 1 - sum(n < short_cut for n in lengths))


# ---------------------------------------------------------------- near-duplicates against a brute-force reference


def brute_force(examples: list[Example], threshold: float) -> list[tuple[int, int]]:
    kept, removed = [], []
    for i, example in enumerate(examples):
        prompt, response = dedup.fields(example)
        key = dedup.exact_key(example)
        for j in kept:
            other_prompt, other_response = dedup.fields(examples[j])
            if dedup.exact_key(examples[j]) == key or min(dedup.jaccard(prompt, other_prompt),
                                                          dedup.jaccard(response, other_response)) >= threshold:
                removed.append((i, j))
                break
        else:
            kept.append(i)
    return removed


def test_minhash_dedup_matches_exact_jaccard():
    rng = random.Random(0)
    vocabulary = [f"w{i}" for i in range(60)]
    bases = [(rng.choices(vocabulary, k=14), rng.choices(vocabulary, k=20)) for _ in range(25)]
    examples = []
    for number in range(120):
        prompt, answer = (list(part) for part in rng.choice(bases))
        for _ in range(rng.choice([0, 0, 1, 2, 4])):  # a few words changed: some near, some not
            target = rng.choice([prompt, answer])
            target[rng.randrange(len(target))] = rng.choice(vocabulary)
        examples.append(Example([{"role": "user", "content": " ".join(prompt)},
                                 {"role": "assistant", "content": " ".join(answer)}], where=str(number)))
    for threshold in (0.6, 0.85):
        kept, matches = dedup.deduplicate(examples, exact=True, threshold=threshold)
        expected = brute_force(examples, threshold)
        assert [(m.index, m.of) for m in matches] == expected
        assert len(kept) == len(examples) - len(expected)
        assert len(expected) >= 20  # the data does have near-duplicates to find
        for m in matches:
            if m.kind == "near":
                prompt, response = dedup.fields(examples[m.index])
                other = dedup.fields(examples[m.of])
                assert m.similarity == pytest.approx(min(dedup.jaccard(prompt, other[0]),
                                                         dedup.jaccard(response, other[1])))


# ---------------------------------------------------------------- leakage


def test_leakage_into_explicit_val_and_test_files_is_removed(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", qa_rows(10) + [{"question": SKY_Q, "answer": SKY_A + " us"}])
    test = write_jsonl(tmp_path / "test.jsonl", [
        {"question": "WHAT is 3 plus one", "answer": "4"},  # exact (normalised) repeat of train row 4
        {"question": SKY_Q + " please", "answer": SKY_A + " everyone"},  # near repeat of train row 11
        {"question": "What is 99 plus one?", "answer": "100"}])
    val = write_jsonl(tmp_path / "val.jsonl", [{"question": "What is 50 plus one?", "answer": "51"}])
    config = make_config(tmp_path, train, val_path=str(val), test_path=str(test))
    prepared = prepare_module.prepare(config, tokenizer)
    leak = prepared.manifest["leakage"]
    assert leak["val"] == {"rows": 1, "leaked": 0, "exact": 0, "near": 0, "removed": 0, "samples": []}
    assert {k: leak["test"][k] for k in ("rows", "leaked", "exact", "near", "removed")} == {
        "rows": 3, "leaked": 2, "exact": 1, "near": 1, "removed": 2}
    assert leak["test"]["samples"][0]["where"] == f"{test}:1"
    assert leak["test"]["samples"][0]["repeats"] == f"{train}:4"
    assert leak["test"]["samples"][1]["repeats"] == f"{train}:11"
    assert [r["reference"] for r in prepared.rows("test")] == ["100"]

    reported = make_config(tmp_path, train, val_path=str(val), test_path=str(test), clean={"leakage": "report"})
    prepared = prepare_module.prepare(reported, tokenizer)
    assert prepared.manifest["leakage"]["test"]["leaked"] == 2
    assert prepared.manifest["leakage"]["test"]["removed"] == 0
    assert len(prepared.rows("test")) == 3


def test_the_leakage_check_reuses_what_deduplication_computed(tmp_path, tokenizer, monkeypatch):
    """Every row's MinHash signatures are computed once: by deduplication, before the split; the
    leakage check then finds them by the row's exact key, and they are forgotten after it."""
    monkeypatch.setattr(dedup, "_NEAR_STATES", {})
    computed = []
    signature = dedup.MinHasher.signature
    monkeypatch.setattr(dedup.MinHasher, "signature", lambda self, items: computed.append(1) or signature(self, items))
    rows = qa_rows(30) + [{"question": "WHAT is 3 plus one", "answer": "4"}]  # repeats row 4 once normalised
    config = make_config(tmp_path, write_jsonl(tmp_path / "d.jsonl", rows), val_split=0.2, test_split=0.2)
    prepared = prepare_module.prepare(config, tokenizer)
    assert len(computed) == 2 * 30  # prompt and answer of each distinct row; the repeat is exact, no signature
    assert dedup._NEAR_STATES == {}  # kept for the check only, not for the life of the process
    assert prepared.manifest["counts"]["train"]["examples"] + prepared.manifest["counts"]["val"]["examples"] \
        + prepared.manifest["counts"]["test"]["examples"] == 30


def test_leakage_from_duplicates_in_one_file(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", qa_rows(10) * 3)
    no_dedup = {"dedup": False, "near_dup_threshold": None}
    config = make_config(tmp_path, path, val_split=0.2, test_split=0.2, clean=no_dedup)
    examples, _ = prepare_module.split_examples(config)
    train = {e.reference for e in examples["train"]}
    assert examples["val"] and all(e.reference not in train for e in examples["val"])
    assert all(e.reference not in train for e in examples["test"])
    # with dedup on (the default) the three copies are one row: nothing can leak
    examples, _ = prepare_module.split_examples(make_config(tmp_path, path, val_split=0.2, test_split=0.2))
    assert sum(len(v) for v in examples.values()) == 10


# ---------------------------------------------------------------- text packing


def test_text_packing_boundaries(tokenizer):
    encoder = Encoder(tokenizer)
    documents = [Example([{"role": "assistant", "content": text}], where=f"doc{i}")
                 for i, text in enumerate(["red green blue", "hello world " * 5, "yes", "the quick brown fox"])]
    ids_of = [tokenizer(d.reference, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
              for d in documents]
    split, rows, stats = pack_documents(documents, encoder, tokenizer, block_size=6, min_tokens=3)
    kept = [ids for ids in ids_of if len(ids) >= 3]
    stream = [t for ids in kept for t in ids]
    blocks = [stream[i: i + 6] for i in range(0, len(stream), 6)]
    blocks = [b for b in blocks if len(b) >= 2]
    assert [split.example(i)[0].tolist() for i in range(len(split))] == blocks
    assert bool(split.supervised.all()) and split.target_counts().tolist() == [len(b) - 1 for b in blocks]
    assert stats["too_short"] == sum(len(ids) < 3 for ids in ids_of) == 1  # "yes" + EOS is 2 tokens
    assert stats["documents"] == 3 and stats["tokens"] == sum(len(b) for b in blocks)
    first_len = len(kept[0])  # the first block holds the first document and the start of the second
    assert rows[0]["where"] == ("doc0, doc1" if first_len < 6 else "doc0")
    assert rows[-1]["where"].endswith("doc3")


def test_continued_pretraining_trains_on_text(cli, llama, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"d{i}.txt").write_text(f"the quick brown fox {i} jumps over the lazy dog. " * 3)
    run_dir = tmp_path / "run"
    result = cli("finetune", "--model", llama, "--data.path", corpus, "--out_dir", run_dir,
                 "--data.max_seq_length", 16, "--data.val_split", 0.25, "--data.test_split", 0,
                 *fast_train_flags(max_steps=2))
    assert result.code == 0, result.err
    manifest = json.loads((run_dir / "data" / "manifest.json").read_text())
    assert manifest["format"]["train"] == "text"
    assert manifest["counts"]["train"]["documents"] == 3 and manifest["counts"]["val"]["documents"] == 1
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in records if "loss" in r]) == 2 and any("val_loss" in r for r in records)
    evaluated = cli("evaluate", run_dir)  # no questions to answer: one line, not a traceback
    assert evaluated.code == 2 and "a data.format: text run (continued pre-training) has none" in evaluated.err


# ---------------------------------------------------------------- k-fold


def test_folds_partition_the_rows_after_the_test_split(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", qa_rows(23))
    vals, tests = [], []
    for fold in (1, 2, 3):
        config = make_config(tmp_path, path, folds=3, fold=fold, test_split=0.1)
        examples, _ = prepare_module.split_examples(config)
        vals.append({e.where for e in examples["val"]})
        tests.append({e.where for e in examples["test"]})
        assert not ({e.where for e in examples["train"]} & (vals[-1] | tests[-1]))
        assert len(examples["train"]) + len(vals[-1]) + len(tests[-1]) == 23
    assert tests[0] == tests[1] == tests[2] and len(tests[0]) == 2
    assert sorted(len(v) for v in vals) == [7, 7, 7]
    assert not (vals[0] & vals[1]) and not (vals[1] & vals[2]) and not (vals[0] & vals[2])


@pytest.mark.parametrize("data, message", [
    ({"folds": 3, "fold": 4}, "data.fold=4 is more than data.folds=3"),
    ({"fold": 2}, "data.fold=2 needs data.folds > 1"),
    ({"folds": 3, "val_path": "v.jsonl"}, "data.folds > 1 makes the validation parts itself"),
    ({"query": "SELECT 1", "table": "t"}, "data.query and data.table both set"),
])
def test_fold_and_source_config_errors(data, message):
    with pytest.raises(ConfigError, match=message):
        config_module.build({"data": data})


def test_finetune_runs_every_fold_and_reports_mean_and_spread(cli, llama, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", qa_rows(12))
    run_dir = tmp_path / "cv"
    result = cli("finetune", "--model", llama, "--data.path", path, "--out_dir", run_dir, "--data.folds", 2,
                 "--data.test_split", 0, *fast_train_flags(max_steps=2))
    assert result.code == 0, result.err
    summary = json.loads((run_dir / "cv.json").read_text())
    losses = []
    for fold in (1, 2):
        fold_dir = run_dir / f"fold-{fold}"
        assert (fold_dir / "final" / "trainer_state.json").is_file()
        saved = config_module.load(fold_dir / "config.yaml")
        assert (saved.data.folds, saved.data.fold) == (2, fold)
        records = [json.loads(line) for line in (fold_dir / "metrics.jsonl").read_text().splitlines()]
        losses.append([r["val_loss"] for r in records if "val_loss" in r][-1])
        assert json.loads((fold_dir / "data" / "manifest.json").read_text())["counts"]["val"]["examples"] == 6
    assert [f["final_val_loss"] for f in summary["per_fold"]] == losses
    assert summary["final_val_loss"]["mean"] == pytest.approx(statistics.fmean(losses))
    assert summary["final_val_loss"]["std"] == pytest.approx(statistics.stdev(losses))
    mean, spread = statistics.fmean(losses), statistics.stdev(losses)
    assert f"Cross-validation over 2 folds: validation loss {mean:.4f} ± {spread:.4f}" in result.out
