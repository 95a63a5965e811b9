"""The search space of `tunesmith sweep`: a YAML file of dotted config keys and their ranges.

    train.learning_rate: {low: 1e-5, high: 1e-2, log: true}   # float range (log scale)
    train.warmup_steps: {low: 0, high: 20, step: 5}             # int range (ints everywhere)
    lora.r: [8, 16, 32]                                         # choices
    sampler: tpe          # grid | random | tpe (default: grid when every key is a list, else tpe)
    pruner: asha          # none | asha | successive_halving | hyperband | median | threshold,
                          # or {type: asha, min_resource: 2, reduction_factor: 2, ...} (Optuna's options)
    trials: 20            # trials in the whole study (every worker together)
    minutes: 60           # no new trial starts after this many minutes (per worker)
    metric: val_loss      # the lowest validation loss a trial reached (minimised), or a score of
                          # `evaluate` on the test split after training (maximised): exact_match,
                          # token_f1, bleu, rouge1, rouge2, rougeL
    seed: 42              # trial k samples with seed 42 + k (default: none, fresh randomness)

Every problem is reported at once, one line each naming the key; a key or value the config itself
refuses is reported with tunesmith's own config messages.
"""

from __future__ import annotations

import difflib
import inspect
import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tunesmith import config as config_module
from tunesmith.errors import ConfigError, TunesmithError

SETTINGS = ("sampler", "pruner", "trials", "minutes", "metric", "seed")
SAMPLERS = ("grid", "random", "tpe")
# Optuna's SuccessiveHalvingPruner is the asynchronous variant (ASHA): both names select it.
PRUNERS = {"none": "NopPruner", "asha": "SuccessiveHalvingPruner", "successive_halving": "SuccessiveHalvingPruner",
           "hyperband": "HyperbandPruner", "median": "MedianPruner", "threshold": "ThresholdPruner"}
SCORES = ("exact_match", "token_f1", "bleu", "rouge1", "rouge2", "rougeL")  # evaluate's, higher is better
METRICS = ("val_loss", *SCORES)
RANGE_FIELDS = ("low", "high", "log", "step")
# Keys the sweep sets itself for every trial.
NOT_SWEPT = {"out_dir": "each trial runs in <sweep dir>/trial-NNN", "name": "each trial runs in <sweep dir>/trial-NNN",
             "resume": "use `tunesmith sweep ... --resume` to continue a sweep",
             "data.folds": "a trial is one run, ranked by its validation loss",
             "data.fold": "a trial is one run, ranked by its validation loss"}
# PyYAML reads 1e-5 (no dot) as text; in a space file it is always meant as a number.
SCIENTIFIC = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def require_optuna():
    try:
        import optuna
    except ImportError:
        raise TunesmithError("sweeps need Optuna: pip install tunesmith[sweep]") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines say what each trial did
    return optuna


@dataclass(frozen=True)
class Param:
    """One swept key: choices (a list in the file) or a numeric range."""

    key: str
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None

    @property
    def integer(self) -> bool:
        return self.choices is None and all(isinstance(v, int) for v in (self.low, self.high, self.step or 1))

    @property
    def labels(self) -> tuple:
        """The choices as Optuna stores them: single values as they are, a list as its YAML text."""
        return tuple(yaml_text(c) if isinstance(c, list) else c for c in self.choices)

    def probe_values(self) -> list:
        return list(self.choices) if self.choices is not None else [self.low, self.high]

    def grid_values(self) -> list:
        if self.choices is not None:
            return list(self.choices)
        step = self.step or 1
        count = math.floor((self.high - self.low) / step + 1e-9) + 1
        values = [self.low + i * step for i in range(count)]
        return values if self.integer else [round(v, 12) for v in values]

    def suggest(self, trial) -> Any:
        """Draw this key's value for an Optuna trial; returns the config value."""
        if self.choices is not None:
            label = trial.suggest_categorical(self.key, self.labels)
            return self.value_of(label)
        if self.integer:
            return trial.suggest_int(self.key, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def value_of(self, stored: Any) -> Any:
        """The config value of what Optuna stored for this key."""
        if self.choices is not None and stored in self.labels:
            return self.choices[self.labels.index(stored)]
        return stored

    def stored(self, value: Any) -> Any:
        """What Optuna stores for a config value (the inverse of value_of)."""
        return yaml_text(value) if isinstance(value, list) else value

    def describe(self) -> dict:
        if self.choices is not None:
            return {"choices": list(self.labels)}
        return {"low": self.low, "high": self.high, "log": self.log, "step": self.step}


@dataclass(frozen=True)
class Space:
    params: tuple[Param, ...]
    sampler: str
    pruner: str
    pruner_options: dict
    trials: int | None
    minutes: float | None
    metric: str
    seed: int | None

    @property
    def scored(self) -> bool:
        """Trials are ranked by an evaluation score after training, not by their validation loss."""
        return self.metric in SCORES

    def grid(self) -> list[dict]:
        """Every combination, in the order the file lists keys and values: {key: config value}."""
        keys = [p.key for p in self.params]
        return [dict(zip(keys, values)) for values in itertools.product(*(p.grid_values() for p in self.params))]

    def fingerprint(self) -> dict:
        """What every worker of one study must agree on (minutes is each worker's own)."""
        return {"params": {p.key: p.describe() for p in self.params}, "sampler": self.sampler,
                "pruner": self.pruner, "pruner_options": self.pruner_options, "trials": self.trials,
                "metric": self.metric, "seed": self.seed}

    def make_sampler(self, optuna, trial_number: int = 0):
        """With a seed, trial k draws from seed + k: reproducible, and workers sharing a study do not
        draw the same values (one seed per worker would)."""
        seed = None if self.seed is None else self.seed + trial_number
        if self.sampler == "tpe":
            return optuna.samplers.TPESampler(seed=seed)
        return optuna.samplers.RandomSampler(seed=seed)  # grid: every trial's values are queued

    def make_pruner(self, optuna):
        return getattr(optuna.pruners, PRUNERS[self.pruner])(**self.pruner_options)


def yaml_text(value: Any) -> str:
    """A value as one line of YAML, which `--key value` flags read back to the same value."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip()
    return text[:-3].strip() if text.endswith("\n...") or text == "..." else text


def read(path: str | Path, base_raw: dict, base_dir: Path | None) -> Space:
    """Parse and check a space file against the run's raw config; raises ConfigError listing every problem."""
    path = Path(path)
    raw = config_module.read_yaml(path)
    problems: list[str] = []
    params = []
    for key, value in raw.items():
        if key in SETTINGS:
            continue
        param = _param(str(key), value, problems)
        if param is not None:
            params.append(param)
    if not params and not problems:
        problems.append("no config keys to sweep (e.g. train.learning_rate: {low: 1e-5, high: 1e-3, log: true})")
    settings = _settings(raw, params, problems)
    if not problems:
        problems += config_problems(params, base_raw, base_dir)
    if problems:
        raise ConfigError([f"{path}: {problem}" for problem in dict.fromkeys(problems)])
    return Space(tuple(params), **settings)


def _param(key: str, value: Any, problems: list[str]) -> Param | None:
    if key in NOT_SWEPT:
        problems.append(f"{key} cannot be swept: {NOT_SWEPT[key]}")
        return None
    if "." not in key and key not in config_module.RunConfig.model_fields:
        close = difflib.get_close_matches(key, [*SETTINGS, *config_module.all_keys()], n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        problems.append(f"unknown key {key}{hint}; settings: {', '.join(SETTINGS)}; config keys are dotted, "
                        "e.g. train.learning_rate")
        return None
    if key in config_module.SECTIONS and isinstance(value, dict):
        problems.append(f"{key}: write a section's keys dotted, e.g. {key}.{next(iter(value), 'x')}: [...]")
        return None
    if isinstance(value, list):
        return _choices(key, value, problems)
    if isinstance(value, dict):
        return _range(key, value, problems)
    problems.append(f"{key}: give a list of choices, e.g. [8, 16, 32], or a range {{low: 1e-5, high: 1e-3, "
                    f"log: true}}; a fixed value belongs in the config")
    return None


def _choices(key: str, values: list, problems: list[str]) -> Param | None:
    if not values:
        problems.append(f"{key}: the list of choices is empty")
        return None
    if any(isinstance(v, dict) for v in values):
        problems.append(f"{key}: a choice cannot be a mapping; sweep its keys one by one ({key}.x: [...])")
        return None
    choices = tuple(_number(v) if isinstance(v, str) and SCIENTIFIC.match(v) else v for v in values)
    if len(set(map(yaml_text, choices))) < len(choices):
        problems.append(f"{key}: a choice is listed twice")
        return None
    return Param(key, choices=choices)


def _range(key: str, spec: dict, problems: list[str]) -> Param | None:
    unknown = [str(field) for field in spec if field not in RANGE_FIELDS]
    if unknown:
        problems.append(f"{key}: unknown field {unknown[0]} (a range has {', '.join(RANGE_FIELDS)}; "
                        "choices are a list)")
        return None
    low, high, step = (_number(spec.get(name)) for name in ("low", "high", "step"))
    log = spec.get("log", False)
    found = len(problems)
    if low is None or high is None:
        problems.append(f"{key}: a range needs numbers low and high, e.g. {{low: 1e-5, high: 1e-3}}")
    elif low >= high:
        problems.append(f"{key}: low={low} must be below high={high}")
    if not isinstance(log, bool):
        problems.append(f"{key}: log={log!r} must be true or false")
    elif log and low is not None and low <= 0:
        problems.append(f"{key}: a log range needs low above 0 (low={low})")
    if "step" in spec and (step is None or step <= 0):
        problems.append(f"{key}: step={spec['step']!r} must be a number above 0")
    elif step is not None and log:
        problems.append(f"{key}: a range takes step or log, not both")
    if len(problems) > found:
        return None
    return Param(key, low=low, high=high, log=log, step=step)


def _number(value: Any) -> int | float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _settings(raw: dict, params: list[Param], problems: list[str]) -> dict:
    all_lists = all(p.choices is not None for p in params)
    sampler = raw.get("sampler", "grid" if all_lists else "tpe")
    if sampler not in SAMPLERS:
        problems.append(f"sampler={sampler!r} is not one of {', '.join(SAMPLERS)}")
    elif sampler == "grid":
        for param in params:
            if param.choices is None and (param.log or (param.step is None and not param.integer)):
                problems.append(f"{param.key}: sampler grid needs a list of values or a range with a step")
    pruner, options = _pruner(raw.get("pruner", "none"), problems)
    trials, minutes = raw.get("trials"), raw.get("minutes")
    if trials is not None and (not isinstance(trials, int) or isinstance(trials, bool) or trials < 1):
        problems.append(f"trials={trials!r} must be a whole number of at least 1")
    if minutes is not None and (_number(minutes) is None or _number(minutes) <= 0):
        problems.append(f"minutes={minutes!r} must be a number above 0")
    if trials is None and minutes is None and sampler != "grid":
        problems.append(f"sampler {sampler} needs a budget: trials: N and/or minutes: M")
    metric = raw.get("metric", "val_loss")
    if metric not in METRICS:
        problems.append(f"metric={metric!r} is not one of {', '.join(METRICS)}")
    seed = raw.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        problems.append(f"seed={seed!r} must be a whole number")
    return {"sampler": sampler, "pruner": pruner, "pruner_options": options, "trials": trials,
            "minutes": _number(minutes), "metric": metric, "seed": seed}


def _pruner(spec: Any, problems: list[str]) -> tuple[str, dict]:
    """`pruner: asha` or `pruner: {type: asha, reduction_factor: 2}`; options checked by Optuna itself."""
    options = dict(spec) if isinstance(spec, dict) else {}
    name = options.pop("type", None) if isinstance(spec, dict) else spec
    if name not in PRUNERS:
        problems.append(f"pruner={name!r} is not one of {', '.join(PRUNERS)}"
                        + (" (as a mapping: {type: asha, ...})" if isinstance(spec, dict) else ""))
        return "none", {}
    optuna = require_optuna()
    pruner_class = getattr(optuna.pruners, PRUNERS[name])
    accepted = [p for p in inspect.signature(pruner_class).parameters]
    unknown = [str(option) for option in options if option not in accepted]
    if unknown:
        problems.append(f"pruner.{unknown[0]}: not an option of {name} (options: {', '.join(accepted) or 'none'})")
        return name, {}
    try:
        pruner_class(**options)
    except (TypeError, ValueError) as err:
        problems.append(f"pruner: {name} refuses {options}: {err}")
    return name, options


def config_problems(params: list[Param], base_raw: dict, base_dir: Path | None) -> list[str]:
    """Each value of each key (a range: both ends) set on the run's config, the other keys at their
    first value, and checked by the config's own validation: the messages finetune would print."""
    first = {p.key: p.probe_values()[0] for p in params}
    problems: list[str] = []
    for param in params:
        for value in param.probe_values():
            problems += _checked(with_values(base_raw, {**first, param.key: value}), base_dir)
    return problems


def with_values(raw: dict, values: dict) -> dict:
    """The raw config with dotted keys set to values."""
    overrides: dict = {}
    for key, value in values.items():
        config_module.set_dotted(overrides, key, value)
    return config_module.merge(raw, overrides)


def _checked(raw: dict, base_dir: Path | None) -> list[str]:
    try:
        config_module.build(raw, base_dir)
    except ConfigError as err:
        return err.problems
    return []
