"""The New-run form: every config key with its doc, default and choices (from the typed config, as
`--help` lists them), checked with the same one-line errors as the CLI, then the data doctor's
verdict and the memory estimate for it, before anything starts."""

from __future__ import annotations

import re
import typing
from pathlib import Path

from tunesmith import config as config_module
from tunesmith.errors import ConfigError, TunesmithError

# Shown first, open; the rest sit in one folded group per section.
BASIC_KEYS = ("model", "method", "data.path", "data.format", "data.template", "data.max_seq_length",
              "train.max_steps", "train.epochs", "train.learning_rate", "train.batch_size", "lora.r")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SET_BY_STUDIO = ("name", "out_dir", "resume")  # the run's folder is the studio's; resume is its own button


def fields() -> list[dict]:
    choices = _choices()
    return [{"key": key, "default": default, "doc": doc, "choices": choices.get(key),
             "section": key.split(".")[0] if "." in key else "run", "basic": key in BASIC_KEYS}
            for key, default, doc in config_module.field_docs() if key not in SET_BY_STUDIO]


def _choices() -> dict[str, list[str]]:
    """Keys whose type is a fixed set of words (a Literal), for a select instead of a text box."""
    found = {}

    def walk(prefix: str, model) -> None:
        for key, field in model.model_fields.items():
            dotted = f"{prefix}{key}"
            nested = field.annotation if isinstance(field.annotation, type) else None
            if nested is not None and issubclass(nested, config_module.Section):
                walk(f"{dotted}.", nested)
            elif typing.get_origin(field.annotation) is typing.Literal:
                found[dotted] = [str(v) for v in typing.get_args(field.annotation)]

    walk("", config_module.RunConfig)
    return found


def arguments(root: Path, name: str, values: dict[str, str], here: Path) -> tuple[list[str], list[str]]:
    """The CLI arguments for the form (each key the user set, the run's folder under the runs folder;
    a relative path is taken from `here`, where the studio was started, as in that terminal), and
    the form's own problems."""
    problems = []
    if not NAME_PATTERN.match(name or ""):
        problems.append(f"run name {name!r}: use letters, digits, '-', '_' or '.' (at most 64), not starting with '.'")
    elif (root / name).exists():
        problems.append(f"run name {name!r}: {root / name} already exists; pick another name")
    known = set(config_module.all_keys())
    args = []
    for key, value in values.items():
        if key in SET_BY_STUDIO or key not in known:
            problems.append(f"{key}: not a config key the form sets")
            continue
        text = str(value).strip()
        if text == "":
            continue
        if key in ("data.path", "data.val_path", "data.test_path", "init_from") and not Path(text).is_absolute():
            text = str((here / text).resolve())
        args.append(f"--{key}={text}")
    return [f"--out_dir={root / name}", *args], problems


def check(root: Path, name: str, values: dict[str, str], here: Path) -> tuple[list[str], config_module.RunConfig]:
    """The arguments and the validated config, or ConfigError with every problem of the form."""
    args, problems = arguments(root, name, values, here)
    try:
        config = config_module.load(None, config_module.parse_overrides(args))
    except ConfigError as err:
        problems += err.problems
    if problems:
        raise ConfigError(problems)
    return args, config


def doctor(config: config_module.RunConfig, plot: Path) -> dict:
    """The data doctor's verdict, findings and token-length plot, or why the data cannot be read."""
    from tunesmith.data import doctor as doctor_module
    from tunesmith.data.doctor_report import histograms
    from tunesmith.model.load import load_tokenizer, resolve

    try:
        tokenizer = load_tokenizer(resolve(config.model), quiet=True)
        report = doctor_module.diagnose(config, tokenizer)
    except ConfigError as err:
        return {"verdict": "cannot read the data", "findings": [{"level": "problem", "message": p}
                                                               for p in err.problems]}
    except TunesmithError as err:
        return {"verdict": "cannot read the data", "findings": [{"level": "problem", "message": str(err)}]}
    histograms(report, plot)
    rows = {split: info["rows"] for split, info in report["splits"].items()}
    return {"verdict": doctor_module.verdict(report), "findings": report["findings"], "rows": rows,
            "format": report["format"], "template": report["template"], "plot": plot.name}


def memory(config: config_module.RunConfig) -> dict:
    """Will the configured step fit in this machine's memory, and the largest micro batch that does."""
    import torch

    from tunesmith import estimate
    from tunesmith.device import pick_device, pick_dtype

    try:
        device = str(pick_device(config.train.device))
        dtype = pick_dtype(config.train.precision, torch.device(device))
        model_config = estimate.model_config(config.model)
        result = estimate.estimate(config, model_config, device, dtype)
        budget, budget_text = estimate.available_memory(device)
        largest = estimate.largest_micro_batch(config, model_config, budget, device, dtype)
    except (TunesmithError, OSError, ValueError) as err:
        return {"fits": None, "lines": [f"no estimate: {err}"]}
    return {"fits": result.peak_bytes <= budget, "peak_mib": result.peak_bytes / 2**20,
            "budget_mib": budget / 2**20, "largest_micro_batch": largest,
            "lines": estimate.report(config, result, budget, budget_text, largest, device, dtype)}
