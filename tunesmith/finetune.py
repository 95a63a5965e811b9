"""`tunesmith finetune CONFIG`: prepare the data (or reuse it), train, save, plot."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import torch

from tunesmith import config as config_module
from tunesmith import locks, plots
from tunesmith.config import RunConfig, dump
from tunesmith.data.prepare import data_key, prepare, summary_lines
from tunesmith.data.templates import choose
from tunesmith.device import pick_device, pick_dtype, use_threads
from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.log import say
from tunesmith.model.adapters import count_parameters, load_for_training, prepare_for_training
from tunesmith.model.load import load_tokenizer, resolve
from tunesmith.train import checkpoint, distributed, kernels, loop
from tunesmith.train.loss import unwrap


@dataclasses.dataclass
class Setup:
    """A run ready to train: its config with the template and starting model pinned, the prepared
    data, the processes and device, and the model with its trainable weights."""

    config: RunConfig
    tokenizer: object
    prepared: object
    group: distributed.Group
    device: torch.device
    dtype: torch.dtype
    model: torch.nn.Module
    resume_from: Path | None


def set_up(config: RunConfig) -> Setup:
    run_dir = config.run_dir
    if not distributed.under_torchrun():  # a device or kernel this machine lacks: refused before anything is written
        device = pick_device(config.train.device)
        kernels.check_requested(config.train.attention, config.train.loss_kernel, device)
    if config.init_from:  # the starting point becomes this run's model: chat, merge and export use it
        config = config.model_copy(update={"model": str(starting_model(config))})
    location = resolve(config.model)
    tokenizer = load_tokenizer(location)
    # Pin the template 'auto' chose, so checkpoints generate with exactly the training format.
    template = choose(config.data.template, tokenizer, config.data.system_prompt)
    config = config.model_copy(update={"data": config.data.model_copy(update={"template": template.spec})})
    resume_from = resume_point(config)
    if resume_from is not None:  # before prepare() replaces the data the checkpoint was trained on
        check_same_data(resume_from, config, tokenizer)
    prepared = prepare(config, tokenizer)  # first: a data error leaves no half-made run directory
    run_dir.mkdir(parents=True, exist_ok=True)
    if distributed.is_first_rank():  # one writer: two ranks replacing one temporary file race
        tmp = run_dir / "config.yaml.tmp"  # the file a user resumes from is never half-written
        tmp.write_text(dump(config))
        tmp.replace(run_dir / "config.yaml")
    for line in summary_lines(prepared):
        say(line)

    group, device_name = distributed.start(config.train.device)
    device = pick_device(device_name)
    dtype = pick_dtype(config.train.precision, device)
    use_threads(config.train.threads, device)
    if device.type == "cpu" and config.train.compact_memory:  # lower peak RSS for slower steps
        from tunesmith.train.memory import return_freed_memory_to_os

        return_freed_memory_to_os()
    torch.manual_seed(config.train.seed)
    model = load_for_training(location, config, str(device), dtype)
    model = prepare_for_training(model, config, dtype)
    trainable, total = count_parameters(model)
    weights = f"{config.method} on {config.weights}" if config.objective != "sft" else config.method
    say(f"Model {config.model}: {total / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trained ({weights})")
    say(kernels.choose(unwrap(model), config.train.attention, config.train.loss_kernel).describe())
    return Setup(config, tokenizer, prepared, group, device, dtype, model, resume_from)


def finetune(config: RunConfig) -> loop.TrainResult:
    run_dir = config.run_dir
    run = set_up(config)
    held = locks.training(run_dir) if run.group.is_main else contextlib.nullcontext()
    with held:  # the studio reads it: running, and which process a Stop goes to
        try:
            objective = make_objective(run.model, run.config, run.prepared, run.device, run.dtype, run.group)
            config, finder_seconds = resolve_learning_rate(run.model, objective, run.config, run.group)
            result = loop.run(run.model, run.tokenizer, config, objective, run.device, run.dtype,
                              run.resume_from, run.group)
            result = dataclasses.replace(result, finder_seconds=finder_seconds)
        finally:
            distributed.stop(run.group)
        if run.group.is_main:
            plots.curves(run_dir)
            from tunesmith.report import write_report

            write_report(config)  # curves and diagnosis now; `evaluate` adds its results to it
    return result


def resolve_learning_rate(model, objective, config: RunConfig, group) -> tuple[RunConfig, float]:
    """learning_rate: auto → the finder's pick (its plot in plots/lr_find.png); a resumed run reuses the
    pick it trained with (lr_find.json). Returns the config with a number in it and the finder's seconds."""
    if config.train.learning_rate != "auto":
        return config, 0.0
    from tunesmith.train import lr_find

    finding = lr_find.load(config.run_dir) if config.resume else None
    found_now = finding is None
    if found_now:
        finding = lr_find.find(model, objective, config.train, group=group)
        if group.is_main:
            lr_find.save(finding, config.run_dir)
        say(finding.describe())
    else:
        say(f"learning_rate auto: reusing the pick of {config.run_dir / 'lr_find.json'}: {finding.pick:.2e}")
    train = config.train.model_copy(update={"learning_rate": finding.pick})
    return config.model_copy(update={"train": train}), finding.seconds if found_now else 0.0


def make_objective(model, config: RunConfig, prepared, device, dtype, group):
    """What the steps minimise: supervised cross-entropy, or a preference loss (whose full fine-tunes get
    their reference log-probs now, from the weights as loaded, before any step or resume)."""
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    share = kernels.shares_prefixes(unwrap(model))  # a micro batch's common beginning (system block) computed once
    if config.objective == "sft":
        from tunesmith.train.objective import Supervised

        return Supervised(prepared.splits, config.train, device, autocast, group, share)
    from tunesmith.train import preference

    objective = preference.objective_for(config, prepared.splits, device, autocast, group, share)
    if objective.settings.uses_reference and config.weights == "full":
        objective.references = preference.load_or_compute_references(
            model, objective, prepared.folder, {"data": prepared.manifest["key"], "model": config.model})
    return objective


def starting_model(config: RunConfig) -> Path:
    """init_from: a finished run's model as a plain model directory: its full weights, or its adapter
    merged into its base once (kept in <this run>/init-model, reused while the source is unchanged)."""
    from tunesmith.merge import MergeError, merge_run

    source = Path(config.init_from)
    try:
        folder = checkpoint.pick(source)
    except TunesmithError as err:
        raise ConfigError(f"init_from={config.init_from}: {err}") from None
    saved = config_module.load(folder / "config.yaml")
    if saved.weights == "full":
        return folder.resolve()
    target = (config.run_dir / "init-model").resolve()
    info = target / "merge_info.json"
    if info.is_file() and json.loads(info.read_text()).get("source") == str(folder.resolve()) \
            and (folder / "adapter_model.safetensors").stat().st_mtime <= info.stat().st_mtime:
        return target
    try:
        return merge_run(source, target)
    except MergeError as err:
        raise ConfigError(f"init_from={config.init_from}: {err}") from None


def launch_ranks(config: RunConfig) -> int:
    """train.devices > 1 outside torchrun: start that many ranks of this same run."""
    config.run_dir.mkdir(parents=True, exist_ok=True)
    launch_file = config.run_dir / "launch.yaml"
    launch_file.write_text(dump(config))
    say(f"Starting {config.train.devices} ranks of: tunesmith finetune {launch_file}")
    return distributed.launch(config.train.devices, ["finetune", str(launch_file)])


# Keys that must match between a checkpoint and the run resuming it (they shape data and model).
MUST_MATCH = ("model", "method", "data", "lora", "qlora", "adapter", "preference", "init_from", "train.batch_size",
              "train.micro_batch_size", "train.seed", "train.strategy")


def resume_point(config: RunConfig) -> Path | None:
    if not config.resume:
        return None
    if config.resume is True:
        folder, notes = checkpoint.latest_resumable(config.run_dir)
        for note in notes:
            say(note)
    else:
        folder = Path(config.resume)
        problem = checkpoint.verify(folder) if folder.is_dir() else "missing"
        if problem:
            raise TunesmithError(f"cannot resume from {folder}: it is {problem}")
    saved = config_module.load(folder / "config.yaml").model_dump()
    current = config.model_dump()
    changed = [key for key in MUST_MATCH if _get(saved, key) != _get(current, key)]
    if changed:
        raise ConfigError([f"cannot resume from {folder}: {key} differs from the checkpoint's "
                           f"({_get(saved, key)!r} there, {_get(current, key)!r} now)" for key in changed])
    return folder


def check_same_data(folder: Path, config: RunConfig, tokenizer) -> None:
    """Refuse to resume on other rows: the data the checkpoint's run prepared (its data/manifest.json)
    must have the key the data has now (the sources' content, the data settings, the tokenizer)."""
    manifest = folder.parent / "data" / "manifest.json"
    if not manifest.is_file():
        return  # prepared data removed by hand: nothing to compare, the row order is still seeded
    trained_on = json.loads(manifest.read_text()).get("key", {})
    now = data_key(config, tokenizer)
    changed = [part for part in ("sources", "settings", "tokenizer") if trained_on.get(part) != now.get(part)]
    if changed:
        what = {"sources": "the data files' content", "settings": "the data settings",
                "tokenizer": "the tokenizer"}
        raise TunesmithError(f"cannot resume from {folder}: {' and '.join(what[c] for c in changed)} changed since "
                             "it was trained, so it would continue on other rows; restore the data, or start a new "
                             "run without --resume (or with another out_dir)")


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree[part]
    if isinstance(tree, dict):  # paths may be written differently; compare what they name
        return {k: v for k, v in tree.items() if k != "path"} | ({"path": str(Path(tree["path"]).resolve())}
                                                                 if tree.get("path") else {})
    return tree


def main(config: RunConfig) -> int:
    if config.data.folds > 1 and config.data.fold == 0:  # k-fold: every fold in turn, then mean ± std
        from tunesmith.crossval import run_folds

        return run_folds(config, main)
    if config.train.devices > 1 and not distributed.under_torchrun():
        return launch_ranks(config)
    result = finetune(config)
    if distributed.is_first_rank():
        _report(result, config)
    return 0


def _report(result: loop.TrainResult, config: RunConfig) -> None:
    for line in loop.describe(result, config.run_dir):
        print(line)
    from tunesmith.evaluate.diagnose import diagnose_run

    for line in diagnose_run(config.run_dir).lines():
        print(line)
    print(f"Run directory: {config.run_dir}  (curves in {config.run_dir / 'plots'}, "
          f"report {config.run_dir / 'report.html'})")
