"""Config: YAML filled in by `--section.key value` flags; every problem reported at once, in the
user's words, as one line each with exit code 2 and no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tunesmith import config as config_module
from tunesmith.errors import ConfigError


def load(args: list[str], path: Path | None = None):
    return config_module.load(path, config_module.parse_overrides([str(a) for a in args]))


def problems_of(args: list[str], path: Path | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(args, path)
    return caught.value.problems


def test_defaults_match_the_design():
    config = load([])
    assert config.model == "smollm2-135m"
    assert config.method == "lora"
    assert (config.data.format, config.data.template, config.data.mask_prompt) == ("auto", "auto", True)
    assert (config.data.max_seq_length, config.data.val_split, config.data.test_split) == (512, 0.1, 0.1)
    assert (config.lora.r, config.lora.alpha, config.lora.target_modules) == (16, 32, "all-linear")
    assert config.accumulation_steps == 1


def test_yaml_then_flags_override_it(tmp_path):
    (tmp_path / "train.jsonl").write_text("")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "model": "some/model", "method": "full",
        "data": {"path": "train.jsonl", "max_seq_length": 128},
        "train": {"max_steps": 10, "learning_rate": 1e-4, "batch_size": 8, "micro_batch_size": 2},
        "lora": {"target_modules": ["q_proj", "v_proj"]},
    }))
    config = load(["--train.max_steps", "30", "--train.learning_rate=3e-3", "--data.mask_prompt", "false",
                   "--lora.r", "4"], path)
    assert config.model == "some/model" and config.method == "full"
    assert config.train.max_steps == 30  # the flag wins over the file
    assert config.train.learning_rate == pytest.approx(3e-3)  # --key=value form
    assert config.train.batch_size == 8 and config.accumulation_steps == 4  # kept from the file
    assert config.data.mask_prompt is False  # parsed as a YAML scalar
    assert config.data.max_seq_length == 128
    assert config.lora.r == 4 and config.lora.target_modules == ["q_proj", "v_proj"]
    # a data path in a config file is relative to that file, not to the working directory
    assert Path(config.data.path) == tmp_path / "train.jsonl"


def test_flag_values_are_yaml_scalars_but_text_stays_text():
    config = load(["--train.grad_clip", "none", "--lora.target_modules", "[q_proj, v_proj]",
                   "--train.learning_rate", "1e-3", "--data.template", "### Question: {prompt}"])
    assert config.train.grad_clip is None  # "none", as --help shows unset values
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.train.learning_rate == pytest.approx(1e-3)
    assert config.data.template == "### Question: {prompt}"  # not a YAML comment
    assert load(["--data.template", "Q: {prompt}"]).data.template == "Q: {prompt}"  # not a mapping


def test_run_dir_defaults_to_the_data_file_name():
    assert load(["--data.path", "some/dir/my data.jsonl"]).run_dir == Path("out/my-data")
    assert load(["--data.path", "x.jsonl", "--name", "exp1"]).run_dir == Path("out/exp1")
    assert load(["--out_dir", "/tmp/elsewhere"]).run_dir == Path("/tmp/elsewhere")


def test_dump_round_trips(tmp_path):
    config = load(["--train.max_steps", "7", "--data.template", "### Q: {prompt}\n### A:\n",
                   "--method", "full"])
    path = tmp_path / "config.yaml"
    path.write_text(config_module.dump(config))
    assert config_module.load(path) == config


@pytest.mark.parametrize("flag, suggestion", [
    ("--train.lr", "train.learning_rate"),  # a name from another tool
    ("--train.learning_rat", "train.learning_rate"),  # a typo
    ("--train.max_step", "train.max_steps"),
    ("--lora.lora_alpha", "lora.alpha"),
    ("--data.max_length", "data.max_seq_length"),
])
def test_unknown_key_suggests_the_right_one(flag, suggestion):
    [problem] = problems_of([flag, "1"])
    assert problem == f"unknown key {flag[2:]} (did you mean {suggestion}?)"


def test_unknown_key_without_a_close_match_has_no_suggestion():
    assert problems_of(["--zzzz", "1"]) == ["unknown key zzzz"]


def test_bad_literal_lists_the_allowed_values():
    [problem] = problems_of(["--method", "qlora2"])
    assert problem.startswith("method='qlora2' is not one of")
    assert "'lora'" in problem and "'full'" in problem
    [problem] = problems_of(["--train.lr_schedule", "cosine2"])
    assert all(f"'{name}'" in problem for name in ("cosine", "linear", "constant"))


def test_batch_size_must_be_a_multiple_of_micro_batch_size():
    assert problems_of(["--train.batch_size", "10", "--train.micro_batch_size", "4"]) == [
        "train.batch_size=10 is not a multiple of train.micro_batch_size=4"]


def test_every_problem_is_reported_at_once():
    problems = problems_of(["--train.batch_size", "10", "--train.micro_batch_size", "4", "--train.lr", "1",
                            "--method", "qlora2", "--train.max_steps", "abc", "--data.val_split", "0.5",
                            "--data.test_split", "0.5"])
    assert len(problems) == 5, problems
    joined = "\n".join(problems)
    for fragment in ("train.batch_size=10 is not a multiple", "unknown key train.lr", "method='qlora2'",
                     "train.max_steps='abc'", "leave no training rows"):
        assert fragment in joined


def test_range_checks_name_the_key():
    [problem] = problems_of(["--train.learning_rate", "-1"])
    assert problem == "train.learning_rate=-1 must be above 0 (or auto, to have it found)"
    problems = problems_of(["--data.val_split", "1.5"])
    assert problems[0].startswith("data.val_split=1.5:")
    assert problems[1] == "data.val_split=1.5 + data.test_split=0.1 leave no training rows"


def test_config_file_problems(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load([], tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: x\ntrain: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: not valid YAML"):
        load([], bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load([], listing)


def test_override_syntax():
    assert config_module.parse_overrides(["--data.mask_prompt", "--train.max_steps", "3"]) == {
        "data": {"mask_prompt": True}, "train": {"max_steps": 3}}  # a bare flag means true
    with pytest.raises(ConfigError, match="unexpected argument 'max_steps'"):
        config_module.parse_overrides(["max_steps", "3"])


def test_cli_prints_one_line_per_problem_and_exits_2(cli):
    result = cli("finetune", "--train.batch_size", "10", "--train.micro_batch_size", "4", "--train.lr", "1",
                 "--method", "qlora2")
    assert result.code == 2
    lines = result.err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("tunesmith: config error: ") for line in lines)
    assert "tunesmith: config error: unknown key train.lr (did you mean train.learning_rate?)" in lines
    assert ("tunesmith: config error: train.batch_size=10 is not a multiple of train.micro_batch_size=4"
            in lines)
    [literal] = [line for line in lines if "qlora2" in line]
    assert literal.startswith("tunesmith: config error: method='qlora2' is not one of 'lora', 'full'")
    assert "Traceback" not in result.err and result.out == ""


def test_cli_help_lists_every_key_with_its_doc(cli):
    result = cli("finetune", "--help")
    assert result.code == 0
    for key in config_module.all_keys():
        assert f"--{key} " in result.out
    assert "peak learning rate after warmup" in result.out


def test_cli_unknown_verb(cli):
    result = cli("finetnue")
    assert result.code == 2
    assert "unknown verb 'finetnue' (did you mean finetune?)" in result.err


def test_cli_run_directory_without_config(cli, tmp_path):
    result = cli("evaluate", tmp_path)
    assert result.code == 2
    assert "without config.yaml" in result.err


def test_fsdp_is_for_full_fine_tunes():
    assert problems_of(["--train.strategy", "fsdp"]) == [
        "train.strategy=fsdp shards a full fine-tune; method=lora trains small adapters that every process "
        "can hold whole: use train.strategy=ddp"]
    assert load(["--method", "full", "--train.strategy", "fsdp"]).train.strategy == "fsdp"


def test_readme_lists_every_config_key_as_the_code_declares_it():
    """README's key table is generated by scripts/readme_keys.py; run it after changing a key."""
    import importlib.util

    script = Path(__file__).resolve().parent.parent / "scripts" / "readme_keys.py"
    spec = importlib.util.spec_from_file_location("readme_keys", script)
    readme_keys = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(readme_keys)
    _, table, _ = readme_keys.split(readme_keys.README.read_text())
    assert table == readme_keys.table()


@pytest.mark.parametrize("verb", ["export", "merge", "generate", "chat", "serve"])
def test_argument_verbs_print_their_help(cli, verb):
    with pytest.raises(SystemExit) as stopped:
        cli(verb, "--help")
    assert stopped.value.code == 0


@pytest.mark.parametrize("batch, micro", [(4, 4), (12, 6), (16, 8), (7, 7), (10, 5)])
def test_an_unset_micro_batch_follows_the_batch_size(batch, micro):
    config = config_module.build({"train": {"batch_size": batch}})
    assert (config.train.batch_size, config.train.micro_batch_size) == (batch, micro)


def test_a_micro_batch_the_user_set_that_does_not_divide_stays_an_error():
    with pytest.raises(ConfigError, match=r"train.batch_size=4 is not a multiple of train.micro_batch_size=8"):
        config_module.build({"train": {"batch_size": 4, "micro_batch_size": 8}})


@pytest.mark.parametrize("clip", [0, -1.0])
def test_a_gradient_clip_of_zero_or_less_is_refused_at_load_time(clip):
    with pytest.raises(ConfigError, match=rf"train.grad_clip={clip} must be above 0 \(set it to null"):
        config_module.build({"train": {"grad_clip": clip}})
    assert config_module.build({"train": {"grad_clip": None}}).train.grad_clip is None


def test_more_torchrun_processes_than_examples_per_step_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match=r"torchrun started 4 processes but train.batch_size=2"):
        config_module.build({"train": {"batch_size": 2, "micro_batch_size": 1}})
    assert config_module.build({"train": {"batch_size": 4, "micro_batch_size": 1}}).train.batch_size == 4
