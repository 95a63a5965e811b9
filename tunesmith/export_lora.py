"""`tunesmith export RUN --format gguf-lora`: the adapter alone as a GGUF (llama.cpp `--lora`,
Ollama `ADAPTER`), with the base model it applies to as a GGUF beside it.

Both come from llama.cpp's own converters. The base file carries the run's template (so llama.cpp
renders the trained prompt with the base + adapter pair) and the pair is checked in llama.cpp as a
merged export is: held-out prompts answered greedily next to tunesmith.

    <run>/export-lora-<type>/<base>.<type>.gguf  <name>.lora.<type>.gguf  Modelfile  export.json

A QLoRA adapter was trained against the 4-bit base; over the 16-bit base file it answers a little
differently, which the check measures and reports.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tunesmith.export import (
    ExportError,
    Source,
    check,
    finish,
    load_source,
    output_place,
    pre_tokenizer,
    work_folder,
    write_tokenizer,
)
from tunesmith.model import llama_cpp
from tunesmith.train import checkpoint

LORA_TYPES = ("f32", "f16", "bf16", "q8_0")  # what llama.cpp's LoRA converter writes


def lora_source(source_path: Path) -> Source:
    folder = checkpoint.pick(source_path) if not (source_path / "config.json").is_file() else source_path
    if not checkpoint.is_adapter(folder):
        raise ExportError(f"{folder} is not an adapter run: --format gguf-lora needs a lora or qlora run "
                          "(export a full fine-tune with --format gguf)")
    source = load_source(source_path)
    if source.run_config.weights not in ("lora", "qlora"):
        raise ExportError(f"llama.cpp's LoRA format holds plain LoRA weights; a {source.run_config.method} adapter "
                          "cannot be written as one: use --format gguf (merged)")
    return source


def base_dir_with_template(source: Source, into: Path) -> None:
    """The base's weights (linked, not copied) with the run's tokenizer and template."""
    from transformers import AutoConfig

    base = source.base_dir  # load_source resolved it (and checked its architecture)
    into.mkdir(parents=True)
    for item in base.iterdir():
        if item.suffix == ".safetensors" or item.name in ("model.safetensors.index.json", "generation_config.json"):
            os.symlink(item.resolve(), into / item.name)
    AutoConfig.from_pretrained(str(base)).save_pretrained(str(into))
    write_tokenizer(source, into)


def export_gguf_lora(source_path: Path, out_dir: Path | None, kind: str, samples: int,
                     minimum: float) -> tuple[Path, dict]:
    if kind not in LORA_TYPES:
        raise ExportError(f"--type {kind}: a LoRA GGUF is written as one of {', '.join(LORA_TYPES)}")
    source = lora_source(source_path)
    base_name = f"{Path(str(source.run_config.model)).name.removesuffix('.gguf')}.{kind}.gguf"
    out_dir, adapter_name = output_place(out_dir, source, f"export-lora-{kind}", f"{source.name}.lora.{kind}.gguf")
    tmp = work_folder(out_dir)
    try:
        pre = pre_tokenizer(source)
        base_dir_with_template(source, tmp / "base")
        llama_cpp.run_converter("convert_hf_to_gguf.py", [str(tmp / "base"), "--outfile", str(tmp / base_name),
                                                          "--outtype", kind], pre, "the base model")
        llama_cpp.run_converter("convert_lora_to_gguf.py", ["--base", str(tmp / "base"), "--outfile",
                                                            str(tmp / adapter_name), "--outtype", kind,
                                                            str(source.folder)], pre, "the adapter")
        shutil.rmtree(tmp / "base")
        report = {"format": "gguf-lora", "type": kind, "file": adapter_name, "base_file": base_name,
                  "source": str(source.folder), "template": source.loaded.template.describe, "name": source.name,
                  "llama_cpp": llama_cpp.installed_version(),
                  "check": check(tmp / base_name, source, kind, samples, minimum, lora=tmp / adapter_name)}
        finish(tmp, out_dir, {"model": base_name, "adapter": adapter_name}, report, source)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir / adapter_name, report
