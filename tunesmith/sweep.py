"""`tunesmith sweep CONFIG --space FILE`: a hyperparameter search with Optuna, one finetune run per trial.

    <sweep dir>/study.db        the Optuna study (SQLite; --storage URL for one shared by several machines)
                base.yaml       the config every trial starts from (CONFIG with the flags given)
                trial-NNN/      complete run directories (config, metrics, checkpoints, curves)
                logs/trial-NNN.log
                trials.csv  summary.md  plots/sweep.png  best.yaml

The search space is read and checked in sweep_space.py, the study and its queue of trials are
kept in sweep_study.py, one trial runs and is watched in sweep_trial.py, and the table, plot and
best.yaml are written by sweep_report.py.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path

import yaml

from tunesmith import config as config_module
from tunesmith import sweep_report, sweep_space
from tunesmith.config import RunConfig
from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.log import say
from tunesmith.sweep_space import Space
from tunesmith.sweep_study import next_trial, open_study, shown
from tunesmith.sweep_trial import run_trial, sigterm_as_interrupt

USAGE = """usage: tunesmith sweep [CONFIG] --space SPACE.yaml [--storage URL] [--study NAME] [--resume]
                       [--section.key value ...]

Hyperparameter search with Optuna: every trial is a finetune run in <sweep dir>/trial-NNN, ranked by
the lowest validation loss it reached, or by a score `evaluate` gives it on the test split after
training (metric). The sweep directory is out_dir (default out/<name>-sweep).

  --space FILE    the search space (below)
  --storage URL   the Optuna storage (default: sqlite:///<sweep dir>/study.db); a database every machine
                  reaches, e.g. postgresql://user:password@host/db, lets several machines run one study
  --study NAME    the study's name in the storage (default: the sweep directory's name)
  --resume        continue an interrupted sweep: trials left running are marked failed and run again
                  (only when no other worker of the study is still running)
  --section.key v config overrides for every trial, as for finetune

The space file (YAML; every config key in dotted form):
  train.learning_rate: {low: 1e-5, high: 1e-2, log: true}   a float range
  train.warmup_steps: {low: 0, high: 20, step: 5}           an int range (low, high, step all ints)
  lora.r: [8, 16, 32]                                       choices
  sampler: grid | random | tpe          default: grid when every key is a list, else tpe
  pruner: none | asha | successive_halving | hyperband | median | threshold
          (or {type: asha, min_resource: 2, reduction_factor: 2}: Optuna's options); prunes on the
          validation loss of every train.eval_interval
  trials: N        trials in the whole study (a grid: every combination)
  minutes: M       no new trial starts after M minutes (per worker)
  metric: val_loss (default) | exact_match | token_f1 | bleu | rouge1 | rouge2 | rougeL
                   a score: each trained trial is evaluated on the test split (tuned model only)
                   and the highest wins; the pruner still compares validation losses
  seed: S          trial k samples with seed S + k (default: fresh randomness)"""

OWN_FLAGS = ("space", "storage", "study")


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(USAGE + "\n\nconfig keys (in CONFIG, as --key value, or dotted in the space file):")
        for key, default, doc in config_module.field_docs():
            print(f"  --{key:32} {doc} [default: {default}]")
        return 0
    own, config_args = split_flags(argv)
    if "space" not in own:
        raise ConfigError("--space FILE is required: the keys to sweep and their ranges (tunesmith sweep --help)")
    optuna = sweep_space.require_optuna()
    raw, base_dir = read_base(config_args)
    config = config_module.build(raw, base_dir)
    check_base(config)
    space = sweep_space.read(own["space"], raw, base_dir)
    if space.scored and config.data.test_split == 0 and not config.data.test_path:
        raise ConfigError(f"metric={space.metric} scores each trial on the test split, and data.test_split is 0 "
                          "with no data.test_path; set one of them")
    sweep_dir = sweep_directory(config)
    if "storage" not in own:  # the default SQLite file lives in the sweep directory
        if own.get("resume") and not (sweep_dir / "study.db").is_file():
            raise TunesmithError(f"nothing to resume: {sweep_dir} holds no study.db")
        sweep_dir.mkdir(parents=True, exist_ok=True)
    storage_url = own.get("storage") or f"sqlite:///{(sweep_dir / 'study.db').resolve()}"
    name = own.get("study") or sweep_dir.resolve().name
    study = open_study(optuna, storage_url, name, space, own.get("resume", False), sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    base_file, base = write_base(sweep_dir, raw, config)
    if space.pruner != "none" and config.train.eval_interval == 0:
        say("Note: train.eval_interval is 0, so each trial has one validation pass, at its end: "
            "the pruner cannot stop a trial early")
    deadline = time.monotonic() + 60 * space.minutes if space.minutes else None
    again = "tunesmith sweep " + shlex.join([*argv, *([] if own.get("resume") else ["--resume"])])
    with sigterm_as_interrupt():
        while deadline is None or time.monotonic() < deadline:
            trial = next_trial(study, space, optuna)
            if trial is None:
                break
            run_trial(study, trial, space, sweep_dir, base_file, again)
    return report(study, space, sweep_dir, base, f"Study {name!r} in {shown(storage_url)}")


def split_flags(argv: list[str]) -> tuple[dict, list[str]]:
    """The sweep's own flags (--space F, --storage URL, --study NAME, --resume); the rest is config."""
    own: dict = {}
    rest: list[str] = []
    index = 0
    while index < len(argv):
        flag = argv[index]
        name, equals, value = flag[2:].partition("=") if flag.startswith("--") else ("", "", "")
        if name == "resume":
            own["resume"] = not equals or value.lower() in ("true", "1", "yes")
        elif name in OWN_FLAGS and equals:
            own[name] = value
        elif name in OWN_FLAGS:
            if index + 1 >= len(argv) or argv[index + 1].startswith("--"):
                raise ConfigError(f"--{name} needs a value")
            own[name] = argv[index + 1]
            index += 1
        else:
            rest.append(flag)
        index += 1
    return own, rest


def read_base(args: list[str]) -> tuple[dict, Path | None]:
    """[CONFIG] then `--section.key value` overrides, as a raw dict (not yet validated)."""
    path = None
    if args and not args[0].startswith("--"):
        path, args = Path(args[0]), args[1:]
    raw = config_module.read_yaml(path) if path else {}
    return config_module.merge(raw, config_module.parse_overrides(args)), path.resolve().parent if path else None


def check_base(config: RunConfig) -> None:
    problems = []
    if not config.data.path:
        problems.append("data.path is not set: give the training data (e.g. --data.path train.jsonl)")
    if config.data.folds > 1:
        problems.append(f"data.folds={config.data.folds}: a sweep ranks single runs by validation loss; "
                        "set data.folds to 1")
    if config.data.val_split == 0 and not config.data.val_path:
        problems.append("data.val_split=0.0: a sweep ranks trials by validation loss; set data.val_split "
                        "above 0 or give data.val_path")
    if problems:
        raise ConfigError(problems)


def sweep_directory(config: RunConfig) -> Path:
    return Path(config.out_dir) if config.out_dir else Path("out") / f"{config.run_dir.name}-sweep"


def write_base(sweep_dir: Path, raw: dict, config: RunConfig) -> tuple[Path, dict]:
    """The config every trial starts from: the user's, with paths made absolute (trials may run
    from another directory) and without the keys the sweep sets per trial."""
    base = {key: value for key, value in raw.items() if key not in ("out_dir", "resume")}
    data = dict(base.get("data") or {})
    for key in ("path", "val_path", "test_path"):
        value = getattr(config.data, key)
        if value and Path(value).exists():
            data[key] = str(Path(value).resolve())
    if data:
        base["data"] = data
    for key in ("model", "init_from"):
        value = getattr(config, key, None)
        if value and Path(value).exists():
            base[key] = str(Path(value).resolve())
    path = sweep_dir / "base.yaml"
    sweep_report.write_atomic(path, "# The config every trial of this sweep starts from\n"
                              + yaml.safe_dump(base, sort_keys=False))
    return path, base


def report(study, space: Space, sweep_dir: Path, base_raw: dict, where: str) -> int:
    rows = sweep_report.trial_rows(study, space)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    sweep_report.print_table(rows, space, f"Sweep {sweep_dir}: "
                             + ", ".join(f"{n} {state}" for state, n in counts.items()))
    grid = "every combination of the grid" if space.sampler == "grid" and not space.trials else None
    budget = ", ".join(filter(None, [f"{space.trials} trials" if space.trials else grid,
                                     f"{space.minutes:g} minutes per worker" if space.minutes else None]))
    lines = [(f"{where}; sampler {space.sampler}, pruner {space.pruner}, budget {budget}; trials are ranked "
              f"{sweep_report.ranked_by(space)}.")]
    importances = sweep_report.importances(study, space)
    sweep_report.write_csv(sweep_dir / "trials.csv", rows, space)
    sweep_report.plot(sweep_dir / "plots" / "sweep.png", rows, space, importances)
    best = sweep_report.best_row(rows)
    if best:
        sweep_report.write_best(sweep_dir / "best.yaml", best, base_raw, sweep_dir, space)
        lines.append(f"Best: trial {best['trial']}, {sweep_report.best_words(best, space)} "
                     f"({sweep_report.describe(best['params'])}); its complete config: best.yaml")
    sweep_report.write_summary(sweep_dir / "summary.md", rows, space, lines, importances)
    for line in lines[1:]:
        print(line)
    running, waiting = counts.get("running", 0), counts.get("waiting", 0)
    if running or waiting:
        print(f"Not finished yet: {running} trials running (other workers; the last to end rewrites these "
              f"files), {waiting} queued (the next start of this sweep runs them)")
    print(f"Written: {sweep_dir}/trials.csv, summary.md, plots/sweep.png" + (", best.yaml" if best else ""))
    if not best and not running and not waiting:
        say(f"No trial completed: see the logs in {sweep_dir / 'logs'}")
        return 1
    return 0
