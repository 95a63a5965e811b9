"""The models a server offers, each under the name a request's `model` field chooses.

One base model is loaded once. LoRA and DoRA runs trained on that base are attached to it as
PEFT adapters, side by side. Plain LoRA adapters run together in one batch, PEFT applying each
row's own adapter (the base's rows get none); DoRA ones, which PEFT cannot mix, are switched per
batch with `set_adapter` (the base itself then runs with the adapters disabled). Each adapter costs only its own few MB; keeping a merged copy per
run instead would cost a whole model per run (540 MB for the 135M default in fp32) for a forward
pass that is only a little faster.

Runs that are not a low-rank update of this base get a model of their own, through the same
loader as `generate`: full fine-tunes, QLoRA runs (trained against the 4-bit base, so merged into
that), LLaMA-Adapter prompt runs, runs on another base, and merged model directories.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from tunesmith import config as config_module
from tunesmith.data.templates import choose
from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.infer.engine import context_length
from tunesmith.infer.generate import Loaded, load_base, load_run
from tunesmith.log import say
from tunesmith.model.load import ALIASES, LOADING, load_tokenizer, resolve
from tunesmith.train import checkpoint

SHARED_METHODS = ("lora", "dora")  # adapters that are a weight update of the base: attachable side by side


@dataclass
class Served:
    name: str
    loaded: Loaded  # the model may be shared with other Served entries
    adapter: str | None  # PEFT adapter to switch on; None: the model as it is
    base_of_shared: bool  # the shared base itself: run with every adapter switched off
    source: str  # what it was loaded from, for /v1/models and the log
    mixed_batches: bool = False  # rows of different adapters of this model may share a batch (plain LoRA)

    @property
    def batch_key(self) -> str:
        """Jobs with the same key can be decoded in one batch."""
        return f"shared:{id(self.loaded.model)}" if self.mixed_batches else self.name

    @property
    def peft_name(self) -> str:
        """This entry's adapter in a mixed batch ("__base__": no adapter)."""
        return self.adapter or "__base__"

    @property
    def context_length(self) -> int | None:
        return context_length(self.loaded.model)

    def activate(self):
        """A context in which the model computes this entry (call from the decoding thread only)."""
        model = self.loaded.model
        if self.adapter is not None:
            model.set_adapter(self.adapter)
            return nullcontext()
        if self.base_of_shared:
            return model.disable_adapter()
        return nullcontext()


def parse_adapter(text: str) -> tuple[str, Path]:
    """`NAME=PATH` or `PATH`; a run directory is named after itself, a checkpoint folder after its
    run and itself (runname-step-000200)."""
    name, sep, path = text.partition("=")
    if not sep:
        path, name = text, ""
    folder = Path(path)
    if not folder.exists():
        raise TunesmithError(f"--adapter {text}: {folder} does not exist")
    if not name:
        resolved = folder.resolve()
        checkpoint_folder = resolved.name in ("best", "final") or resolved.name.startswith("step-")
        name = f"{resolved.parent.name}-{resolved.name}" if checkpoint_folder else resolved.name
    return name, folder


def model_name(spec: str) -> str:
    """The served name of a base model: its alias, its directory's name, or the hub id."""
    if spec in ALIASES:
        return spec
    path = Path(spec).expanduser()
    return path.resolve().name if path.exists() else spec


def load_models(base_spec: str | None, adapters: list[tuple[str, Path]], template: str = "auto",
                device: str = "auto", precision: str = "auto") -> dict[str, Served]:
    """Every model to serve, by name. The base is `base_spec`, else the base of the first run."""
    names = [name for name, _ in adapters]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"two adapters are named {duplicates[0]!r}: give them names with NAME=RUN")
    runs = [(name, folder, read_run_config(folder)) for name, folder in adapters]
    if base_spec is None:
        if not runs or runs[0][2] is None:
            raise TunesmithError("give --model BASE, or --adapter RUN (whose base is then served too)")
        base_spec = runs[0][2].model
    base_name = model_name(base_spec)
    if base_name in names:
        raise ConfigError(f"adapter name {base_name!r} is the base model's name: pick another with NAME=RUN")
    say(f"Loading the base model {base_spec}")
    base = load_base(base_spec, template, None, device, precision)
    base_location = Path(str(resolve(base_spec))).resolve() if Path(str(resolve(base_spec))).exists() else None
    served: dict[str, Served] = {}
    shared = [(n, f, c) for n, f, c in runs if _shares_base(f, c, base_location)]
    for name, folder, run_config in runs:
        if (name, folder, run_config) not in shared:
            served[name] = _standalone(name, folder, run_config, device, precision)
    # PEFT runs a different LoRA adapter per row of one batch, but not DoRA ones
    mixable = bool(shared) and all(config.weights == "lora" for _, _, config in shared)
    if shared:
        base.model = _attach(base.model, shared)
        for name, folder, run_config in shared:
            tokenizer = load_tokenizer(checkpoint.pick(folder), quiet=True)
            template_of_run = choose(run_config.data.template, tokenizer, run_config.data.system_prompt)
            loaded = Loaded(base.model, tokenizer, template_of_run, f"adapter {name}")
            served[name] = Served(name, loaded, name, False, str(checkpoint.pick(folder)), mixable)
    served = {base_name: Served(base_name, base, None, bool(shared), base_spec, mixable), **served}
    for entry in served.values():
        say(f"  {entry.name:24} {_kind(entry)}  ({entry.source})")
    return served


def read_run_config(folder: Path):
    """The run's config, or None for a plain model directory (a merged model)."""
    if (folder / "config.json").is_file() and not (folder / "config.yaml").is_file():
        return None
    return config_module.load(checkpoint.pick(folder) / "config.yaml")


def _shares_base(folder: Path, run_config, base_location: Path | None) -> bool:
    if run_config is None or run_config.weights not in SHARED_METHODS or base_location is None:
        return False
    if not checkpoint.is_adapter(checkpoint.pick(folder)):
        return False
    run_base = Path(str(resolve(run_config.model)))
    return run_base.exists() and run_base.resolve() == base_location


def _attach(model, shared: list):
    """Wrap the base in PEFT once and load every shared adapter into it under its served name."""
    from peft import PeftModel

    (first_name, first_folder, _), rest = shared[0], shared[1:]
    with LOADING:
        model = PeftModel.from_pretrained(model, str(checkpoint.pick(first_folder)), adapter_name=first_name)
        for name, folder, _ in rest:
            model.load_adapter(str(checkpoint.pick(folder)), adapter_name=name)
    return model.eval()


def _standalone(name: str, folder: Path, run_config, device: str, precision: str) -> Served:
    if run_config is None:  # a merged model directory: it keeps its run's template (merge_info.json)
        return Served(name, load_base(str(folder), "auto", None, device, precision), None, False, str(folder))
    loaded = load_run(folder, device, precision)
    return Served(name, loaded, None, False, str(checkpoint.pick(folder)))


def _kind(entry: Served) -> str:
    if entry.adapter:
        return "adapter on the shared base"
    return "base (adapters off)" if entry.base_of_shared else "own model"
