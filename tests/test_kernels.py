"""Which packed-row attention and output-layer loss a run takes (train/kernels.py), and the CUDA
attention backends (train/varlen_cuda.py) against the per-example reference: flex attention's forward
runs on a CPU too; FlashAttention's argument layout is checked through a stand-in with its contract.
tests/test_cuda_kernels.py checks losses and gradients on a GPU."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from test_loss import plain_transformers_loss, varied_split

from tunesmith.errors import ConfigError
from tunesmith.train import kernels, varlen_cuda
from tunesmith.train.batching import pack
from tunesmith.train.loss import loss_sum

BF16, FP32 = torch.bfloat16, torch.float32


@pytest.mark.parametrize(("device", "dtype", "flash", "flex", "expected"), [
    ("cpu", FP32, True, True, "per_example"),
    ("cpu", BF16, True, True, "per_example"),
    ("cuda", BF16, True, True, "flash_varlen"),
    ("cuda", torch.float16, True, False, "flash_varlen"),
    ("cuda", FP32, True, True, "flex"),  # FlashAttention has no fp32
    ("cuda", BF16, False, True, "flex"),
    ("cuda", BF16, False, False, "per_example"),
])
def test_auto_picks_the_fastest_backend_the_machine_has(device, dtype, flash, flex, expected):
    backend, reason = kernels.pick_attention("auto", device, dtype, False, flash, flex)
    assert backend == expected and reason


def test_a_soft_capping_model_keeps_transformers_attention():
    assert kernels.pick_attention("auto", "cuda", BF16, True, True, True)[0] == "transformers"
    with pytest.raises(ConfigError, match=r"train.attention=flex: this model soft-caps"):
        kernels.pick_attention("flex", "cuda", BF16, True, True, True)


@pytest.mark.parametrize(("requested", "device", "dtype", "flash", "flex", "message"), [
    ("flash_varlen", "cuda", BF16, False, True, "FlashAttention is not installed"),
    ("flash_varlen", "cuda", FP32, True, True, "CUDA in bf16 or fp16 only"),
    ("flash_varlen", "cpu", BF16, True, True, "CUDA in bf16 or fp16 only"),
    ("flex", "cpu", FP32, True, True, "flex attention trains on CUDA only"),
    ("flex", "cuda", BF16, True, False, "has no flex attention"),
])
def test_a_backend_the_machine_cannot_run_is_refused_by_name(requested, device, dtype, flash, flex, message):
    with pytest.raises(ConfigError, match=f"train.attention={requested}: .*{message}"):
        kernels.pick_attention(requested, device, dtype, False, flash, flex)
    assert kernels.pick_attention("per_example", device, dtype, False, flash, flex)[0] == "per_example"


def test_fused_loss_kernels_are_refused_where_they_cannot_run(monkeypatch):
    with pytest.raises(ConfigError, match=r"train.loss_kernel=liger runs on CUDA only"):
        kernels.check_loss_kernel("liger", "cpu", None)
    monkeypatch.setattr(kernels, "installed", lambda module: False)
    with pytest.raises(ConfigError, match=r"train.loss_kernel=cce: cut-cross-entropy is not installed"):
        kernels.check_loss_kernel("cce", "cuda", None)
    monkeypatch.setattr(kernels, "installed", lambda module: True)
    kernels.check_loss_kernel("liger", "cuda", types.SimpleNamespace(final_logit_softcapping=30.0))
    with pytest.raises(ConfigError, match=r"scales its logits"):
        kernels.check_loss_kernel("liger", "cuda", types.SimpleNamespace(logit_scale=0.5))
    kernels.check_loss_kernel("chunked", "cpu", types.SimpleNamespace(logit_scale=0.5))


def test_finetune_refuses_flex_on_a_cpu_before_writing_anything(cli, tmp_path):
    run_dir = tmp_path / "run"
    result = cli("finetune", "--model", "smollm2-135m", "--data.path", tmp_path / "none.jsonl",
                 "--out_dir", run_dir, "--train.device", "cpu", "--train.attention", "flex")
    assert result.code == 2
    assert "train.attention=flex: PyTorch's flex attention trains on CUDA only" in result.err
    assert "Traceback" not in result.err and not run_dir.exists()


def _model(tiny_models, family: str = "llama"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_models(family), dtype=torch.float32,
                                                attn_implementation="sdpa").eval()


def _packed_loss(model, backend: str, split) -> torch.Tensor:
    setattr(model, kernels.CHOICE_ATTRIBUTE, kernels.Kernels(backend, "test"))
    with torch.no_grad(), kernels.packed_attention(model):
        return loss_sum(model, pack(split, [0, 1, 2]), chunk_size=16)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_flex_attention_over_a_packed_row_equals_each_example_alone(tiny_models, family):
    model = _model(tiny_models, family)
    split = varied_split(model.config.vocab_size)
    with torch.no_grad():
        reference = plain_transformers_loss(model, split)
    torch.testing.assert_close(_packed_loss(model, "flex", split), reference, rtol=1e-5, atol=1e-4)
    assert model.config._attn_implementation == "sdpa"  # restored after the packed forward


def test_flex_attention_honours_a_sliding_window(tiny_models, tmp_path):
    import json
    import shutil

    from transformers import AutoModelForCausalLM

    folder = tmp_path / "mistral"
    shutil.copytree(tiny_models("mistral"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"sliding_window": 4}))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    split = varied_split(model.config.vocab_size)
    with torch.no_grad():
        reference = plain_transformers_loss(model, split)
        unwindowed = plain_transformers_loss(_model(tiny_models, "mistral"), split)
    assert abs(unwindowed.item() - reference.item()) > 1e-3  # the window matters for these examples
    torch.testing.assert_close(_packed_loss(model, "flex", split), reference, rtol=1e-5, atol=1e-4)


def _flash_stand_in(calls: list):
    """FlashAttention's varlen contract in plain PyTorch: (T, heads, d) inputs, int32 cumulative
    lengths, causal, window_size=(left, right), grouped key/value heads."""

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None,
                               causal=False, window_size=(-1, -1)):
        assert cu_seqlens_q.dtype == torch.int32 and torch.equal(cu_seqlens_q, cu_seqlens_k) and causal
        calls.append((cu_seqlens_q.tolist(), max_seqlen_q, window_size))
        outputs = []
        for start, end in zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist()):
            position = torch.arange(end - start)
            distance = position[:, None] - position[None, :]
            mask = distance >= 0
            if window_size[0] >= 0:
                mask &= distance <= window_size[0]
            piece = [t[start:end].transpose(0, 1)[None] for t in (q, k, v)]  # (1, heads, length, d)
            out = F.scaled_dot_product_attention(*piece, attn_mask=mask, scale=softmax_scale,
                                                 enable_gqa=q.shape[1] != k.shape[1])
            outputs.append(out[0].transpose(0, 1))
        return torch.cat(outputs)

    return types.SimpleNamespace(flash_attn_varlen_func=flash_attn_varlen_func)


def test_flash_varlen_passes_the_examples_boundaries_as_cumulative_lengths(tiny_models, monkeypatch):
    calls: list = []
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)  # FlashAttention 3 absent
    monkeypatch.setitem(sys.modules, "flash_attn", _flash_stand_in(calls))
    varlen_cuda._flash_function.cache_clear()
    try:
        model = _model(tiny_models)
        split = varied_split(model.config.vocab_size)
        with torch.no_grad():
            reference = plain_transformers_loss(model, split)
        packed = _packed_loss(model, "flash_varlen", split)
    finally:
        varlen_cuda._flash_function.cache_clear()
    torch.testing.assert_close(packed, reference, rtol=1e-5, atol=1e-4)
    assert calls == [([0, 8, 25, 37], 17, (-1, -1))] * model.config.num_hidden_layers
