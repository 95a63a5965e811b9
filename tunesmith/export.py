"""`tunesmith export RUN --format gguf|gguf-lora|hf`: the fine-tuned model as it was trained, for
llama.cpp, Ollama and LM Studio.

    gguf       the whole model in one file: adapters merged (tunesmith merge), converted by
               llama.cpp's own converter, k-quants made by llama.cpp's quantizer
    gguf-lora  the adapter alone (llama.cpp --lora, Ollama ADAPTER) and the base it applies to
    hf         a merged Hugging Face directory (as `tunesmith merge`)

The run's template travels with the model: the file's `tokenizer.chat_template` renders the prompt
the run was trained on (model chat template, alpaca, qa or a custom string, with the run's system
prompt), its EOS is the token training appended, and an Ollama Modelfile is written beside it.

Before anything is kept the file is loaded by llama.cpp's library and answers held-out prompts
greedily next to `tunesmith generate` (model/gguf_check.py); a file that disagrees beyond the
type's tolerance is deleted. Everything is written in a temporary folder and renamed into place:

    <run>/export-<type>/<name>.<type>.gguf  Modelfile  export.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from tunesmith import config as config_module
from tunesmith.data.dataset import read_rows
from tunesmith.errors import TunesmithError
from tunesmith.log import say
from tunesmith.model import llama_cpp
from tunesmith.model.gguf_check import CheckError, compare, verdict
from tunesmith.model.portable_template import jinja_template, modelfile, render
from tunesmith.train import checkpoint

TYPES = (*llama_cpp.CONVERTER_TYPES, *llama_cpp.QUANTIZER_TYPES)
# share of held-out prompts whose greedy answers must be identical in llama.cpp. The demo run
# measured (bench/RESULTS.md, "Export"): f16 and q8_0 100%, q6_k 95%, q4_k_m 85%, q5_k_m 65% (a
# 135M model whose 576-wide rows k-quants cannot cut in 256-blocks falls back per tensor)
MIN_AGREEMENT = {"f32": 0.95, "f16": 0.95, "bf16": 0.9, "q8_0": 0.9, "q6_k": 0.8, "q5_k_m": 0.6, "q4_k_m": 0.6}
CHECK_PROMPTS = ["What is the capital of France?", "Convert the date March 5, 2021 to ISO format.",
                 "Name three primary colors.", "hello world", "What is 12 plus 30?"]


class ExportError(TunesmithError):
    """The model cannot be exported as asked."""


@dataclass
class Source:
    loaded: object  # infer.generate.Loaded: the model as tunesmith runs it (fp32, adapters merged)
    name: str
    run_dir: Path | None  # None for a plain HF directory
    folder: Path  # the checkpoint (or HF directory) exported
    run_config: object | None
    base_dir: Path | None = None  # the base model's HF directory (its tokenizer.model, for adapter runs)


def model_config_dir(source: Path) -> tuple[Path, Path | None, object | None]:
    """(folder holding the model's config.json, checkpoint folder, run config) — read before loading."""
    from tunesmith.model.load import resolve

    if (source / "config.json").is_file() and not checkpoint.is_adapter(source):
        return source, None, None
    folder = checkpoint.pick(source)
    run_config = config_module.load(folder / "config.yaml")
    if not checkpoint.is_adapter(folder):
        return folder, folder, run_config
    if run_config.weights == "adapter":
        raise ExportError(f"{folder} holds LLaMA-Adapter prompts, which llama.cpp cannot run; "
                          "export a lora, qlora, dora or full run")
    base = resolve(run_config.model)
    if not Path(str(base)).is_dir():
        raise ExportError(f"the base model {run_config.model} is not a local directory")
    return Path(str(base)), folder, run_config


def check_architecture(config_dir: Path) -> str:
    """The HF architecture name, refused in one line when llama.cpp's converter does not know it."""
    config = json.loads((config_dir / "config.json").read_text())
    architecture = (config.get("architectures") or ["?"])[0]
    known = llama_cpp.supported_architectures(llama_cpp.converter_root())
    if architecture not in known:
        raise ExportError(f"llama.cpp's converter (llama-cpp-python {llama_cpp.installed_version()}) cannot convert "
                          f"{architecture} ({config.get('model_type')}) models to GGUF; "
                          "`tunesmith export --format hf` still writes a merged Hugging Face directory")
    return architecture


def load_source(source: Path) -> Source:
    from tunesmith.infer.generate import load_base, load_run

    config_dir, folder, run_config = model_config_dir(source)
    check_architecture(config_dir)
    if folder is None:
        loaded = load_base(str(source), device="cpu", precision="fp32", for_saving=True)
        return Source(loaded, source.name, None, source, None)
    loaded = load_run(source, device="cpu", precision="fp32", for_saving=True)
    run_dir = source if folder != source else folder.parent
    name = run_dir.name if folder.name in ("best", "final") or folder == source else folder.name
    base = config_dir if config_dir != folder else base_dir(run_config)
    return Source(loaded, name, run_dir, folder, run_config, base)


def base_dir(run_config) -> Path | None:
    """The base model's local directory (a full fine-tune's tokenizer files may come from there)."""
    from tunesmith.model.load import resolve

    location = Path(str(resolve(run_config.model)))
    return location if location.is_dir() else None


def held_out_rows(source: Source, count: int) -> list[dict]:
    """Up to `count` prompts the run never trained on: its test split, else validation, else a few
    general questions, each as {prompt (as tunesmith renders it), messages, reference (if known)}."""
    for split in ("test", "val"):
        rows = read_rows(source.run_dir / "data" / split) if source.run_dir else []
        rows = [r for r in rows if r.get("prompt") and r.get("messages")]  # text (pre-training) runs have none
        if rows:
            return rows[:count]
    template, tokenizer = source.loaded.template, source.loaded.tokenizer
    return [{"prompt": render(template, tokenizer, template.system_prompt, text),
             "messages": [{"role": "user", "content": text}]} for text in CHECK_PROMPTS[:count]]


def max_answer_tokens(rows: list[dict], tokenizer, cap: int) -> int:
    """Long enough for the run's own answers to these prompts (their references), never above `cap`."""
    longest = max((len(tokenizer(r["reference"], add_special_tokens=False)["input_ids"]) for r in rows
                   if r.get("reference")), default=48)
    return min(cap, longest + 16)


def write_hf_dir(source: Source, into: Path) -> None:
    """The model as the converter reads it: fp32 safetensors and the run's tokenizer and template."""
    if hasattr(source.loaded.model, "peft_config"):
        raise ExportError("this model still wraps a PEFT adapter that cannot be merged; nothing was written")
    source.loaded.model.save_pretrained(str(into), safe_serialization=True)
    write_tokenizer(source, into)



def write_tokenizer(source: Source, into: Path) -> None:
    """The tokenizer carrying the run's template as its chat template (its EOS is the one training
    appended), so the converter writes both into the file."""
    tokenizer = source.loaded.tokenizer
    original = tokenizer.chat_template
    tokenizer.chat_template = jinja_template(source.loaded.template, tokenizer)
    try:
        tokenizer.save_pretrained(str(into))
    finally:
        tokenizer.chat_template = original
    keep_base_tokenizer_files(source.base_dir or source.folder, into)


def keep_base_tokenizer_files(base: Path, into: Path) -> None:
    """What transformers 5 does not write back but llama.cpp's converter reads: the SentencePiece
    model a tokenizer came from, and the tokenizer class name the base declared (it picks the
    vocabulary reader by it, e.g. Phi-4's GPT2Tokenizer)."""
    if (base / "tokenizer.model").is_file() and not (into / "tokenizer.model").exists():
        shutil.copyfile(base / "tokenizer.model", into / "tokenizer.model")
    try:
        declared = json.loads((base / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError):
        return
    written = into / "tokenizer_config.json"
    settings = json.loads(written.read_text())
    if declared and settings.get("tokenizer_class") != declared:
        written.write_text(json.dumps({**settings, "tokenizer_class": declared}, indent=2))


def pre_tokenizer(source: Source) -> str:
    from tunesmith.model.gguf_pre import pre_tokenizer_name

    return pre_tokenizer_name(source.loaded.tokenizer, source.run_config.model if source.run_config else None)


def convert(hf_dir: Path, target: Path, kind: str, source: Source) -> None:
    outtype = kind if kind in llama_cpp.CONVERTER_TYPES else "f16"
    plain = target if outtype == kind else target.with_name("f16-" + target.name)
    llama_cpp.run_converter("convert_hf_to_gguf.py", [str(hf_dir), "--outfile", str(plain), "--outtype", outtype],
                            pre_tokenizer(source), source.name)
    if plain != target:
        llama_cpp.quantize(plain, target, kind)
        plain.unlink()


def stop_strings(source: Source) -> list[str]:
    from tunesmith.infer.generate import stop_token_ids

    tokenizer = source.loaded.tokenizer
    return [tokenizer.convert_ids_to_tokens(i) for i in stop_token_ids(source.loaded)]


def check(gguf: Path, source: Source, kind: str, samples: int, minimum: float, lora: Path | None = None) -> dict:
    rows = held_out_rows(source, samples)
    max_new = max_answer_tokens(rows, source.loaded.tokenizer, cap=128)
    say(f"Checking {gguf.name} in llama.cpp: {len(rows)} held-out prompts, greedy, up to {max_new} tokens, "
        "next to tunesmith's answers")
    started = time.monotonic()
    result = compare(gguf, source.loaded, rows, max_new, lora)
    problem = verdict(result, minimum, kind)
    report = {**result.as_dict(), "max_new_tokens": max_new, "minimum_agreement": minimum,
              "seconds": round(time.monotonic() - started, 1)}
    if problem:
        raise CheckError(f"{problem}; the file was not kept (examples: {json.dumps(result.examples[:1])})")
    return report


def finish(tmp: Path, out_dir: Path, files: dict[str, str], report: dict, source: Source) -> None:
    """Write the Modelfile and export.json, then move every file into place: the model files first,
    export.json (the record that the check passed) last."""
    stops = stop_strings(source)
    text = modelfile(files["model"], source.loaded.template, source.loaded.tokenizer, stops, files.get("adapter"))
    (tmp / "Modelfile").write_text(text)
    (tmp / "export.json").write_text(json.dumps(report, indent=2))
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in [*files.values(), "Modelfile", "export.json"]:
        os.replace(tmp / name, out_dir / name)


def output_place(out: Path | None, source: Source, default_folder: str, default_file: str) -> tuple[Path, str]:
    """(folder, model file name): --out is a folder, or a path ending in .gguf for the file itself."""
    if out is not None and out.suffix == ".gguf":
        return out.parent, out.name
    return out or (source.run_dir or source.folder) / default_folder, default_file


def export_gguf(source_path: Path, out_dir: Path | None, kind: str, samples: int, minimum: float) -> tuple[Path, dict]:
    source = load_source(source_path)
    out_dir, file_name = output_place(out_dir, source, f"export-{kind}", f"{source.name}.{kind}.gguf")
    tmp = work_folder(out_dir)
    try:
        say(f"Converting {source.name} to {kind} with llama.cpp's converter")
        write_hf_dir(source, tmp / "hf")
        convert(tmp / "hf", tmp / file_name, kind, source)
        shutil.rmtree(tmp / "hf")
        report = {"format": "gguf", "type": kind, "file": file_name, "source": str(source.folder), "name": source.name,
                  "template": source.loaded.template.describe, "llama_cpp": llama_cpp.installed_version(),
                  "check": check(tmp / file_name, source, kind, samples, minimum)}
        finish(tmp, out_dir, {"model": file_name}, report, source)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir / file_name, report


def work_folder(out_dir: Path) -> Path:
    """A temporary folder beside the output (same file system, so the final moves are renames)."""
    tmp = out_dir.parent / f".{out_dir.name}.export-tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    source = Path(args.run)
    if not source.exists():
        raise ExportError(f"{source} not found")
    out = Path(args.out) if args.out else None
    if args.format == "hf":
        from tunesmith.merge import merge_run

        print(f"Merged model written to {merge_run(source, out)}")
        return 0
    minimum = MIN_AGREEMENT[args.type] if args.min_agreement is None else args.min_agreement
    if args.format == "gguf-lora":
        from tunesmith.export_lora import export_gguf_lora

        path, report = export_gguf_lora(source, out, args.type, args.samples, minimum)
    else:
        path, report = export_gguf(source, out, args.type, args.samples, minimum)
    print_summary(path, report)
    return 0


def print_summary(path: Path, report: dict) -> None:
    found = report["check"]
    size_mb = sum(p.stat().st_size for p in path.parent.glob("*.gguf")) / 2**20
    print(f"Wrote {path} ({size_mb:.1f} MB, {report['type']}, template {report['template']})")
    print(f"llama.cpp (llama-cpp-python {report['llama_cpp']}) on {found['prompts']} held-out prompts: "
          f"{found['same_answers']}/{found['prompts']} identical greedy answers ({100 * found['agreement']:.0f}%), "
          f"prompt template {'as trained' if not found['template_differs'] else 'DIFFERS on ' + str(found['template_differs'])}, "
          f"token ids {'equal' if not found['tokens_differ'] else 'differ'}, {found['runaways']} answers past the stop")
    folder = path.parent
    print(f"Ollama:    cd {folder} && ollama create {report.get('name', folder.parent.name)} -f Modelfile "
          f"&& ollama run {report.get('name', folder.parent.name)}")
    if "base_file" in report:
        print(f"llama.cpp: llama-server -m {folder / report['base_file']} --lora {path} --jinja")
    else:
        print(f"llama.cpp: llama-server -m {path} --jinja   (or llama-cli -m {path} -cnv)")


def parser() -> argparse.ArgumentParser:
    made = argparse.ArgumentParser(prog="tunesmith export",
                                   description="Ship the fine-tuned model: GGUF for llama.cpp / Ollama / LM Studio "
                                               "(checked in llama.cpp), or a merged Hugging Face directory.")
    made.add_argument("run", help="run directory, checkpoint folder, or a merged HF model directory")
    made.add_argument("--format", choices=["gguf", "gguf-lora", "hf"], default="gguf",
                      help="gguf: the whole model in one file; gguf-lora: the adapter + its base; hf: merged HF dir")
    made.add_argument("--type", choices=TYPES, default="q8_0",
                      help="weight type: f32, f16, bf16, q8_0 (converter) or q4_k_m, q5_k_m, q6_k (llama.cpp's quantizer)")
    made.add_argument("--out", help="output folder (default: RUN/export-TYPE), or the .gguf file's path; "
                                    "for hf, the directory")
    made.add_argument("--samples", type=int, default=20, help="held-out prompts answered in llama.cpp to check the file")
    made.add_argument("--min-agreement", type=float, default=None,
                      help="share of identical greedy answers a file must reach (default per type: "
                           + ", ".join(f"{k} {v:.0%}%" for k, v in MIN_AGREEMENT.items()) + ")")
    return made
