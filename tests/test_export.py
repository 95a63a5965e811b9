"""export: GGUF files made by llama.cpp's own converter, loaded by llama.cpp's own library
(llama-cpp-python), answering as the run does; the training template inside the file and in the
Ollama Modelfile; LoRA adapters as GGUF; refusals in one line with nothing written.

The independent reference here is transformers: each test tokenizes and answers greedily with the
run's model in plain transformers and with the file in libllama, outside tunesmith's own check.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import fast_train_flags, qa_rows, write_jsonl

llama_cpp = pytest.importorskip("llama_cpp", reason="tunesmith[gguf] (llama-cpp-python) is not installed")

FAMILIES = ["llama", "qwen2", "gemma3", "gpt_neox", "gpt2", "phi3", "mistral"]


def train(cli, model, root: Path, name: str, *flags) -> Path:
    """A short LoRA run with a large rate, so the adapter moves the answers far from the base's."""
    data = root / "d.jsonl"
    if not data.exists():
        write_jsonl(data, qa_rows(40))
    run = root / name
    result = cli("finetune", "--model", model, "--data.path", data, "--out_dir", run, "--lora.dropout", 0,
                 "--train.learning_rate", "3e-2", *map(str, fast_train_flags(max_steps=24, batch=4, micro=4)),
                 *map(str, flags))
    assert result.code == 0, result.err
    return run


def metadata(path: Path) -> dict:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, verbose=False)
    return dict(llm.metadata)


def transformers_answer(run: Path, prompt: str, max_new_tokens: int = 12) -> tuple[list[int], list[int]]:
    """Prompt ids and greedy answer ids (through the stop token) in plain transformers + PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = run / "final"  # validation runs only at the last step, so best/ (what export takes) is the same
    base_dir = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return ids, out[0, len(ids):].tolist()


def llama_cpp_answer(path: Path, prompt: str, max_new_tokens: int = 12, lora: Path | None = None):
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, verbose=False, lora_path=str(lora) if lora else None)
    ids = llm.tokenize(prompt.encode(), add_bos=True, special=True)
    answer = []
    for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        answer.append(token)
        if token == llm.token_eos() or len(answer) >= max_new_tokens:
            break
    return ids, answer


def held_out(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "data" / "test" / "rows.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def lora_run(tiny_models, tmp_path_factory, cli_module):
    return train(cli_module, tiny_models("llama"), tmp_path_factory.mktemp("export-llama"), "run")


@pytest.fixture(scope="module")
def cli_module():
    """The CLI in-process, for module-scoped fixtures (output is not captured)."""
    from helpers import CliResult

    from tunesmith.cli import main

    return lambda *args: CliResult(main([str(a) for a in args]), "", "")


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_answers_in_llama_cpp_as_in_transformers(family, tiny_models, tmp_path, cli):
    run = train(cli, tiny_models(family), tmp_path, family)
    result = cli("export", run, "--type", "f32")
    assert result.code == 0, result.err
    folder = run / "export-f32"
    path = folder / f"{family}.f32.gguf"
    assert sorted(p.name for p in folder.iterdir()) == sorted(["Modelfile", "export.json", path.name])
    assert "identical greedy answers (100%)" in result.out and "token ids equal" in result.out
    report = json.loads((folder / "export.json").read_text())["check"]
    assert report["agreement"] == 1.0 and report["tokens_differ"] == report["template_differs"] == 0
    # independently of tunesmith's check: the file's tokens and greedy answer equal transformers'
    prompt = held_out(run)[0]["prompt"]
    expected_ids, expected_answer = transformers_answer(run, prompt)
    ids, answer = llama_cpp_answer(path, prompt)
    assert ids == expected_ids
    assert answer == expected_answer
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    assert int(metadata(path)["tokenizer.ggml.eos_token_id"]) == tokenizer.eos_token_id


def render_ollama(template: str, system: str, prompt: str) -> str:
    """Ollama's Go template for the shapes tunesmith writes: if/else on .System, .Prompt, .Response."""
    branch = re.fullmatch(r"\{\{ if \.System \}\}(.*)\{\{ else \}\}(.*)\{\{ end \}\}(.*)", template, re.DOTALL)
    if branch:
        template = (branch[1] if system else branch[2]) + branch[3]
    head = template.split("{{ .Response }}")[0]
    return head.replace("{{ .System }}", system).replace("{{ .Prompt }}", prompt)


@pytest.mark.parametrize("template, system", [
    ("chat", None), ("chat", "Answer with a number only."), ("alpaca", None), ("qa", None),
    ("Q: {prompt}\nA:", None), ("[{system}] Q: {prompt}\nA:", "Be brief."),
])
def test_the_training_template_travels_into_the_file_and_the_modelfile(template, system, tiny_models, tmp_path,
                                                                        cli):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    flags = ["--data.template", template] + (["--data.system_prompt", system] if system else [])
    run = train(cli, tiny_models("llama", chat=template == "chat"), tmp_path, "run", *flags)
    result = cli("export", run, "--type", "f16")
    assert result.code == 0, result.err
    folder = run / "export-f16"
    row = held_out(run)[0]
    stored = metadata(folder / "run.f16.gguf")
    rendered = ImmutableSandboxedEnvironment().from_string(stored["tokenizer.chat_template"]).render(
        messages=row["messages"], add_generation_prompt=True, eos_token="", bos_token="")
    assert rendered == row["prompt"]  # exactly what the run was trained on
    modelfile = (folder / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./run.f16.gguf\n")
    go = re.search(r'TEMPLATE """(.*?)"""', modelfile, re.DOTALL)[1]
    assert render_ollama(go, system or "", row["messages"][-1]["content"]) == row["prompt"]
    assert (f'SYSTEM """{system}"""' in modelfile) == bool(system)
    eos = "<|im_end|>" if template == "chat" else "<|endoftext|>"
    assert f"PARAMETER stop {json.dumps(eos)}" in modelfile


def test_types_come_from_llama_cpp_and_q8_0_is_smaller(lora_run, cli):
    import gguf

    sizes = {}
    for kind in ("f16", "q8_0"):
        result = cli("export", lora_run, "--type", kind, "--out", lora_run / f"t-{kind}")
        assert result.code == 0, result.err
        path = lora_run / f"t-{kind}" / f"run.{kind}.gguf"
        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
        assert types["blk.0.attn_q.weight"] == kind.upper() and types["blk.0.attn_norm.weight"] == "F32"
        sizes[kind] = path.stat().st_size
    assert sizes["q8_0"] < 0.75 * sizes["f16"]


def test_a_file_whose_template_differs_from_training_is_not_kept(lora_run, tmp_path, cli, monkeypatch):
    from tunesmith import export

    # switch the feature off: store a template the run never trained with
    monkeypatch.setattr(export, "jinja_template", lambda template, tokenizer: "{{ messages[-1]['content'] }}")
    result = cli("export", lora_run, "--type", "f32", "--out", tmp_path / "bad")
    assert result.code == 2
    assert "renders 4 of 4 prompts differently" in result.err and "not kept" in result.err
    assert list(tmp_path.iterdir()) == []


def test_the_check_refuses_disagreement_and_runaways():
    from tunesmith.model.gguf_check import Agreement, verdict

    assert verdict(Agreement(prompts=20, same_answers=19, tunesmith_stopped=20), 0.95, "f16") is None
    assert "18 of 20" in verdict(Agreement(prompts=20, same_answers=18, tunesmith_stopped=20), 0.95, "f16")
    runaway = verdict(Agreement(prompts=4, same_answers=4, tunesmith_stopped=4, runaways=2), 0.5, "q8_0")
    assert "never stops" in runaway
    assert "BOS" in verdict(Agreement(prompts=4, same_answers=4, tokens_differ=1), 0.5, "f16")


def test_lora_adapter_as_gguf_applies_over_the_base_in_llama_cpp(lora_run, cli):
    result = cli("export", lora_run, "--format", "gguf-lora", "--type", "f32")
    assert result.code == 0, result.err
    folder = lora_run / "export-lora-f32"
    adapter, base = folder / "run.lora.f32.gguf", folder / "llama-chat.f32.gguf"
    assert adapter.is_file() and base.is_file()
    import gguf

    field = gguf.GGUFReader(str(adapter)).fields["general.type"]
    assert bytes(field.parts[field.data[0]]).decode() == "adapter"
    assert (folder / "Modelfile").read_text().startswith(f"FROM ./{base.name}\nADAPTER ./{adapter.name}\n")
    assert f"--lora {adapter}" in result.out
    agree = json.loads((folder / "export.json").read_text())["check"]
    assert agree["agreement"] == 1.0
    prompts = [row["prompt"] for row in held_out(lora_run)]
    tuned = [transformers_answer(lora_run, p)[1] for p in prompts]
    assert [llama_cpp_answer(base, p, lora=adapter)[1] for p in prompts] == tuned
    assert [llama_cpp_answer(base, p)[1] for p in prompts] != tuned  # the adapter is what made them


def test_full_and_qlora_runs_export(tiny_models, tmp_path, cli):
    for method, kind in (("full", "f32"), ("qlora", "f16")):
        run = train(cli, tiny_models("llama"), tmp_path, method, "--method", method)
        result = cli("export", run, "--type", kind)
        assert result.code == 0, (method, result.err)
        assert json.loads((run / f"export-{kind}" / "export.json").read_text())["check"]["agreement"] >= 0.75


def test_unknown_architecture_and_missing_tokenizer_model_are_one_line_and_write_nothing(tiny_models, tmp_path,
                                                                                       cli):
    odd = tmp_path / "odd"
    shutil.copytree(tiny_models("llama"), odd)
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "architectures": ["FooForCausalLM"]}))
    result = cli("export", odd, "--out", tmp_path / "out-odd")
    assert result.code == 2 and "cannot convert FooForCausalLM" in result.err
    assert len(result.err.strip().splitlines()) == 1
    # Gemma (1) keeps its vocabulary in a SentencePiece tokenizer.model; without one llama.cpp cannot read it
    result = cli("export", tiny_models("gemma"), "--out", tmp_path / "out-gemma")
    assert result.code == 2 and "tokenizer.model" in result.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd"]


def test_dora_is_refused_as_a_lora_file(tiny_models, tmp_path, cli):
    run = train(cli, tiny_models("llama"), tmp_path, "dora", "--method", "dora")
    result = cli("export", run, "--format", "gguf-lora", "--type", "f16")
    assert result.code == 2 and "dora adapter cannot be written" in result.err
    assert not (run / "export-lora-f16").exists()


def test_only_the_converters_unknown_pre_tokenizer_error_falls_back():
    """llama_cpp_entry.py gives a tokenizer the converter does not know by its hash the pre-tokenizer
    tunesmith determined; every other error of the converter still stops the export."""
    import importlib.util

    from tunesmith.model.llama_cpp import ENTRY

    spec = importlib.util.spec_from_file_location("llama_cpp_entry", ENTRY)
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    assert entry.unknown_split(NotImplementedError("BPE pre-tokenizer was not recognized - update get_vocab_base_pre()"))
    assert not entry.unknown_split(NotImplementedError("Architecture 'Foo' not supported!"))
    assert not entry.unknown_split(ValueError("BPE pre-tokenizer was not recognized"))
