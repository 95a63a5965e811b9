"""`tunesmith export RUN --format gguf`: the fine-tuned model as one GGUF file for llama.cpp, Ollama
and LM Studio, with its tokenizer and chat template inside.

Adapter runs are merged first (tunesmith merge). The file is written under a temporary name,
loaded back through transformers' GGUF loader, and its logits compared with the merged model's
on a few prompts; only a file that passes is renamed into place. Architectures and tokenizers the
writer does not know are refused before anything is written.

    f32   exact; f16: half the size, ~1e-3 relative error; q8_0: a quarter, blocks of 32 weights
          sharing one fp16 scale, ~1e-2 relative error. 1-D tensors (norms, biases) stay f32.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tunesmith import config as config_module
from tunesmith.errors import TunesmithError
from tunesmith.log import say
from tunesmith.train import checkpoint


class ExportError(TunesmithError):
    """The model cannot be exported, or the written file did not load back the same."""


@dataclass(frozen=True)
class Arch:
    gguf_name: str  # general.architecture in the file
    rotate_pairs: bool  # llama.cpp's llama kernels want q/k rows in interleaved-pair rotary order


# transformers model_type → how llama.cpp and transformers' GGUF loader both read it
ARCHS = {"llama": Arch("llama", True), "qwen2": Arch("qwen2", False)}

# relative RMS error of the reloaded logits that each type must stay under (measured well below)
TOLERANCE = {"f32": 1e-4, "f16": 1e-2, "q8_0": 6e-2}
CHECK_PROMPTS = ["What is the capital of France?", "Convert the date March 5, 2021 to ISO format.",
                 "hello world"]


def check_exportable(model_config, tokenizer) -> Arch:
    """Raise ExportError, before anything is written, for what the GGUF writer cannot express."""
    model_type = model_config.model_type
    if model_type not in ARCHS:
        raise ExportError(f"cannot export a {model_type} model to GGUF yet (supported: {', '.join(sorted(ARCHS))}); "
                          "`tunesmith merge` still writes a Hugging Face directory")
    rope = getattr(model_config, "rope_parameters", None) or getattr(model_config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ExportError(f"cannot export to GGUF: {rope['rope_type']} rotary scaling is not written yet")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    kinds = json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
    if spec["model"]["type"] != "BPE" or "ByteLevel" not in kinds:
        raise ExportError(f"cannot export to GGUF: only byte-level BPE tokenizers (GPT-2 style) are written; "
                          f"this one is {spec['model']['type']}")
    return ARCHS[model_type]


def rotate_pairs(weight: np.ndarray, heads: int) -> np.ndarray:
    """HF's rotate-half rotary layout → llama.cpp's interleaved pairs, per head (q and k rows)."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def tensor_plan(model, arch: Arch) -> list[tuple[str, np.ndarray]]:
    """(gguf name, fp32 array) for every weight; the output layer is skipped when tied."""
    import gguf

    config = model.config
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch.gguf_name)
    names = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    tied = getattr(config, "tie_word_embeddings", False)
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    plan = []
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        stem, _, suffix = hf_name.rpartition(".")
        gguf_stem = names.get_name(stem)
        if gguf_stem is None:
            raise ExportError(f"cannot export to GGUF: no GGUF name for weight {hf_name}")
        array = tensor.detach().float().cpu().numpy()
        if arch.rotate_pairs and gguf_stem.endswith(("attn_q", "attn_k")):
            array = rotate_pairs(array, config.num_attention_heads if gguf_stem.endswith("attn_q") else kv_heads)
        plan.append((f"{gguf_stem}.{suffix}", array))
    return plan


def encode_tensor(array: np.ndarray, kind: str):
    """(data, raw_dtype) for the writer: 1-D and odd-width tensors stay f32 / f16."""
    import gguf

    if array.ndim == 1 or kind == "f32":
        return array.astype(np.float32), None
    if kind == "q8_0" and array.shape[-1] % 32 == 0:
        qtype = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(array, qtype), qtype
    return array.astype(np.float16), None


def tokenizer_fields(tokenizer, vocab_size: int) -> dict:
    """Tokens (by id, padded to the embedding size), their types, merges and special ids."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    special = {t.content for t in tokenizer.backend_tokenizer.get_added_tokens_decoder().values() if t.special}
    tokens, types = [], []
    for index in range(vocab_size):
        token = by_id.get(index, f"[PAD{index}]")
        tokens.append(token)
        types.append(gguf.TokenType.CONTROL if token in special else
                     gguf.TokenType.UNUSED if index not in by_id else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges}


def write_gguf(model, tokenizer, path: Path, kind: str, arch: Arch, name: str, pre_tokenizer: str) -> None:
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), arch.gguf_name)
    writer.add_name(name)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind])
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(_rope_theta(config)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    _add_tokenizer(writer, tokenizer, config.vocab_size, pre_tokenizer)
    for tensor_name, array in tensor_plan(model, arch):
        data, raw_dtype = encode_tensor(array, kind)
        writer.add_tensor(tensor_name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return params.get("rope_theta") or getattr(config, "rope_theta", 10000.0)


def _add_tokenizer(writer, tokenizer, vocab_size: int, pre_tokenizer: str) -> None:
    fields = tokenizer_fields(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer)
    writer.add_token_list(fields["tokens"])
    writer.add_token_types(fields["types"])
    writer.add_token_merges(fields["merges"])
    # llama.cpp and older GGUF readers expect a BOS id; a tokenizer without one gets its EOS there,
    # never added to prompts (add_bos_token below stays false)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    for token_id, add in ((bos, writer.add_bos_token_id), (tokenizer.eos_token_id, writer.add_eos_token_id),
                          (tokenizer.pad_token_id, writer.add_pad_token_id),
                          (tokenizer.unk_token_id, writer.add_unk_token_id)):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


@torch.no_grad()
def check_round_trip(model, tokenizer, path: Path, kind: str) -> dict:
    """Load the file through transformers' GGUF loader; compare tokens and logits on CHECK_PROMPTS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        reloaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        reloaded_tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as err:  # noqa: BLE001 - the loader raises many types; all mean the file is not right
        raise ExportError(f"the written GGUF does not load back through transformers ({err})") from None
    errors, agree, total = [], 0, 0
    for prompt in CHECK_PROMPTS:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        again = reloaded_tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if again != ids:
            raise ExportError(f"the GGUF's tokenizer splits {prompt!r} differently ({again[:8]} vs {ids[:8]})")
        reference = model(torch.tensor([ids])).logits[0]  # (T, vocab)
        logits = reloaded(torch.tensor([ids])).logits[0]
        centred = reference - reference.mean(-1, keepdim=True)
        errors.append(float((logits - reference).norm() / centred.norm().clamp_min(1e-12)))
        agree += int((logits.argmax(-1) == reference.argmax(-1)).sum())
        total += len(ids)
    result = {"relative_error": max(errors), "top1_agreement": agree / total, "tolerance": TOLERANCE[kind]}
    if not result["relative_error"] <= TOLERANCE[kind]:
        raise ExportError(f"the GGUF's logits differ from the model's by {result['relative_error']:.2e} "
                          f"(relative RMS; {kind} allows {TOLERANCE[kind]:.0e}); the file was not kept")
    return result


def source_model(source: Path):
    """(model fp32, tokenizer, name, base spec) from an HF directory, a run or a checkpoint folder;
    the architecture and tokenizer are checked before any adapter is merged."""
    from transformers import AutoConfig, AutoTokenizer

    from tunesmith.model.load import load_model, resolve

    if (source / "config.json").is_file() and not checkpoint.is_adapter(source):
        tokenizer = AutoTokenizer.from_pretrained(str(source))
        check_exportable(AutoConfig.from_pretrained(str(source)), tokenizer)
        return load_model(source), tokenizer, source.name, None
    folder = checkpoint.pick(source)
    run_config = config_module.load(folder / "config.yaml")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if checkpoint.is_adapter(folder):
        from tunesmith.merge import merged_model

        check_exportable(AutoConfig.from_pretrained(str(resolve(run_config.model))), tokenizer)
        model = merged_model(folder, run_config)
    else:
        check_exportable(AutoConfig.from_pretrained(str(folder)), tokenizer)
        model = load_model(folder)
    name = source.name if source.name not in ("best", "final") else source.parent.name
    return model, tokenizer, name, run_config.model


def pre_tokenizer_name(tokenizer, base_spec: str | None) -> str:
    """llama.cpp's name for how text is split before BPE: the base GGUF's own when the base came as
    one, else the known split pattern this tokenizer uses, else GPT-2's."""
    from tunesmith.model.load import ALIASES, _alias_file

    path = _alias_file(base_spec) if base_spec in ALIASES else Path(base_spec) if base_spec else None
    if path is not None and path.suffix == ".gguf" and path.is_file():
        import gguf

        field = gguf.GGUFReader(str(path)).fields.get("tokenizer.ggml.pre")
        if field is not None:
            return bytes(field.parts[field.data[0]]).decode()
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:
        return "gpt-2"
    spec = json.dumps(json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer"))
    for name, pattern in GGUF_PRE_TOKENIZER_SPLITS.items():
        if json.dumps(pattern)[1:-1] in spec:
            return name
    return "gpt-2"


def export_gguf(source: Path, out: Path | None = None, kind: str = "q8_0") -> tuple[Path, dict]:
    model, tokenizer, name, base_spec = source_model(source)
    arch = check_exportable(model.config, tokenizer)
    model.float().eval()
    out = out or (source / f"{name}.{kind}.gguf")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp{os.getpid()}.gguf")
    say(f"Writing {out} ({kind}) and checking it loads back with the same logits")
    try:
        write_gguf(model, tokenizer, tmp, kind, arch, name, pre_tokenizer_name(tokenizer, base_spec))
        result = check_round_trip(model, tokenizer, tmp, kind)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out, result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tunesmith export",
                                     description="Write the fine-tuned model as a GGUF file (llama.cpp, Ollama).")
    parser.add_argument("run", help="run directory, checkpoint folder, or a merged HF model directory")
    parser.add_argument("--format", choices=["gguf", "hf"], default="gguf",
                        help="gguf: one file for llama.cpp; hf: a merged Hugging Face directory (as merge)")
    parser.add_argument("--type", choices=sorted(TOLERANCE), default="q8_0", help="gguf weight type")
    parser.add_argument("--out", help="output file (gguf) or directory (hf)")
    args = parser.parse_args(argv)
    source = Path(args.run)
    if not source.exists():
        raise ExportError(f"{source} not found")
    if args.format == "hf":
        from tunesmith.merge import merge_run

        print(f"Merged model written to {merge_run(source, Path(args.out) if args.out else None)}")
        return 0
    path, result = export_gguf(source, Path(args.out) if args.out else None, args.type)
    size_mb = path.stat().st_size / 2**20
    print(f"Wrote {path} ({size_mb:.1f} MB, {args.type}); reloaded through transformers: logits within "
          f"{result['relative_error']:.1e} relative RMS, top-1 token agrees at {100 * result['top1_agreement']:.0f}%")
    return 0
