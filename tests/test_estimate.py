"""The estimator against numbers worked out by hand for the tiny llama (hidden 64, MLP 128, 2 layers,
4 heads of 16, 2 key/value heads, tied embeddings), against PEFT's real parameter counts, and against
the activations autograd really keeps."""

from __future__ import annotations

import pytest
import torch

from tunesmith import estimate as est
from tunesmith.config import RunConfig
from tunesmith.errors import ConfigError

# per layer: q 64x64, k 64x32, v 64x32, o 64x64, gate 64x128, up 64x128, down 128x64
LAYER_LINEARS = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)]
PER_LAYER = sum(i * o for i, o in LAYER_LINEARS) + 2 * 64  # 36864 linear weights + two norm scales


def config(llama, method="lora", **sections) -> RunConfig:
    raw = {"model": str(llama), "method": method, "data": {"max_seq_length": 32},
           "train": {"batch_size": 4, "micro_batch_size": 2, "precision": "fp32", "device": "cpu"},
           "lora": {"r": 8, "dropout": 0.0}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return RunConfig.model_validate(raw)


@pytest.fixture(scope="module")
def vocab(llama):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(llama).vocab_size


def test_parameter_counts_by_hand_and_against_peft(llama, vocab):
    from tunesmith.model.adapters import count_parameters, load_for_training, prepare_for_training

    total = 2 * PER_LAYER + 64 + vocab * 64  # layers, final norm, tied embedding
    expected_trainable = {"full": total,
                          "lora": 2 * sum(8 * (i + o) for i, o in LAYER_LINEARS),  # 2 x 8192
                          "dora": 2 * sum(8 * (i + o) + o for i, o in LAYER_LINEARS),  # + magnitudes
                          "adapter": 2 * (10 * 64 + 1)}  # 10 prompt vectors and a gate per layer
    assert expected_trainable["lora"] == 16384 and expected_trainable["dora"] == 17408
    for method, trainable in expected_trainable.items():
        result = est.estimate(config(llama, method))
        assert (result.total_params, result.trainable_params) == (total, trainable), method
        real = prepare_for_training(load_for_training(llama, config(llama, method), "cpu", torch.float32),
                                    config(llama, method), torch.float32)
        adapters = 0 if method == "full" else trainable  # PEFT's model holds base + adapter weights
        assert count_parameters(real) == (trainable, total + adapters), method  # PEFT agrees


def test_memory_components_by_hand(llama, vocab):
    result = est.estimate(config(llama, "lora"))
    total, trainable = 2 * PER_LAYER + 64 + vocab * 64, 16384
    tokens = 2 * 32  # micro batch x max_seq_length
    # activations per token: per layer 4d + 2kv + 3i = 704, plus the adapted linears' shared inputs
    # 3d + i = 320 and r per adapted linear 7 x 8 = 56; the final norm input and gathered hidden 2d
    per_token = 2 * (704 + 320 + 56) + 128
    assert result.memory == {
        "weights": 4 * total + 4 * trainable,  # fp32 base and fp32 adapters
        "gradients": 4 * trainable,
        "optimizer state": 8 * trainable,  # AdamW: two fp32 moments
        "activations": 4 * per_token * tokens,
        # fused loss (fp32): one piece of logits (all 64 rows here) and the hidden states' gradient
        "loss (output layer chunks)": 4 * tokens * vocab + 4 * tokens * 64,
        # glibc keeps freed activations for reuse, less what the gradient buffers take back
        "freed memory the CPU allocator keeps": 0.6 * 4 * per_token * tokens - 4 * trainable,
    }
    assert result.peak_bytes == sum(result.memory.values())
    compact = est.estimate(config(llama, "lora", train={"compact_memory": True}))  # freed memory returned at once
    assert compact.memory == {k: v for k, v in result.memory.items() if k != "freed memory the CPU allocator keeps"}


def test_fsdp_divides_what_each_rank_holds(llama, vocab):
    whole = est.estimate(config(llama, "full"))
    sharded = est.estimate(config(llama, "full", train={"devices": 4, "strategy": "fsdp"}))
    total, layer = 2 * PER_LAYER + 64 + vocab * 64, 4 * 36864  # one layer's linear weights in fp32
    assert sharded.memory["weights"] == 4 * total / 4 + 2 * layer  # a quarter, plus two gathered layers
    assert sharded.memory["gradients"] == whole.memory["gradients"] / 4 == total
    assert sharded.memory["optimizer state"] == whole.memory["optimizer state"] / 4
    assert sharded.memory["activations"] == whole.memory["activations"]  # each rank runs its own micro batch
    replicated = est.estimate(config(llama, "full", train={"devices": 4}))  # ddp: a full copy per rank
    assert replicated.memory == whole.memory


def test_qlora_weights_and_savings_by_hand(llama, vocab):
    result = est.estimate(config(llama, "qlora"))
    other = vocab * 64 + 2 * 2 * 64 + 64  # embedding and norms stay fp32

    def four_bit(n):  # codes + 8-bit block scales (1 per 64) + fp32 scale per 256 scales + offset
        return n / 2 + n / 64 + n / 64 / 256 * 4 + 4

    packed = 2 * sum(four_bit(i * o) for i, o in LAYER_LINEARS)
    assert result.memory["weights"] == pytest.approx(4 * other + packed + 4 * 16384)
    assert result.quantization_savings == pytest.approx(4 * 2 * 36864 - packed)
    no_double = est.estimate(config(llama, "qlora", qlora={"double_quant": False}))
    assert no_double.memory["weights"] - result.memory["weights"] == pytest.approx(
        2 * sum(i * o / 64 * 4 - (i * o / 64 + i * o / 64 / 256 * 4 + 4) for i, o in LAYER_LINEARS))


def test_optimizer_state_by_hand(llama):
    lora = config(llama, "lora")
    for name, expected in [("sgd", 4 * 16384), ("adamw", 8 * 16384), ("paged_adamw_32bit", 8 * 16384)]:
        raw = lora.model_copy(update={"train": lora.train.model_copy(update={"optimizer": name})})
        assert est.estimate(raw).memory["optimizer state"] == expected, name
    plain_sgd = lora.model_copy(update={"train": lora.train.model_copy(update={"optimizer": "sgd", "momentum": 0.0})})
    assert est.estimate(plain_sgd).memory["optimizer state"] == 0
    # adafactor: a row and a column of fp32 per matrix (A is 8 x in, B is out x 8)
    adafactor = lora.model_copy(update={"train": lora.train.model_copy(update={"optimizer": "adafactor"})})
    expected = 2 * sum(4 * (8 + i) + 4 * (o + 8) for i, o in LAYER_LINEARS)
    assert est.estimate(adafactor).memory["optimizer state"] == expected
    # adamw_8bit: every LoRA matrix here is under 4096 values except none: A 8x128 = 1024 ... all fp32
    eight_bit = lora.model_copy(update={"train": lora.train.model_copy(update={"optimizer": "adamw_8bit"})})
    assert est.estimate(eight_bit).memory["optimizer state"] == 8 * 16384
    big = config(llama, "lora", lora={"r": 64})  # A of q: 64 x 64 = 4096 values → 8-bit states
    big = big.model_copy(update={"train": big.train.model_copy(update={"optimizer": "adamw_8bit"})})
    shapes = est.trained_shapes(big, est.inventory(est.meta_model(est.model_config(str(llama)))))
    expected = sum(2 * r * c + 8 * -(-r * c // 256) + 2048 if r * c >= 4096 else 8 * r * c for r, c in shapes)
    assert est.estimate(big).memory["optimizer state"] == expected


def test_flops_per_token_by_hand(llama, vocab):
    full = est.estimate(config(llama, "full"))
    body = 2 * PER_LAYER + 64  # everything but the (tied) embedding / output layer
    attention = 3 * 4 * 2 * 4 * 16 * (32 + 1) / 2  # layers x heads x head_dim x mean causal pairs
    assert full.flops_per_token == 6 * body + 6 * vocab * 64 + attention
    lora = est.estimate(config(llama, "lora"))
    assert lora.flops_per_token == 4 * body + 6 * 16384 + 4 * vocab * 64 + attention
    assert lora.flops_per_step == lora.flops_per_token * 4 * 32 and lora.tokens_per_step == 128


@pytest.mark.parametrize("method, dropout", [("full", 0.0), ("lora", 0.0), ("lora", 0.1), ("dora", 0.0)])
def test_activation_formula_matches_what_autograd_keeps(llama, method, dropout):
    """Bytes of the tensors saved for backward in a real packed training forward, against the formula."""
    from tunesmith.model.adapters import load_for_training, prepare_for_training
    from tunesmith.train.batching import PackedBatch
    from tunesmith.train.kernels import packed_attention
    from tunesmith.train.loss import loss_sum, unwrap

    run = config(llama, method, lora={"dropout": dropout}, data={"max_seq_length": 128})
    model = prepare_for_training(load_for_training(llama, run, "cpu", torch.float32), run, torch.float32).train()
    length, count = 128, 2
    ids = torch.randint(3, 300, (1, length * count), generator=torch.Generator().manual_seed(0))
    batch = PackedBatch(ids, torch.arange(length).repeat(count)[None], [(0, length), (length, 2 * length)],
                        torch.arange(length * count - 1), ids[0, 1:])
    storages: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def keep(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), packed_attention(unwrap(model)):
        loss_sum(model, batch, 1024)
    measured = sum(size for pointer, size in storages.items() if pointer not in weights) / (length * count)
    inv = est.inventory(est.meta_model(est.model_config(str(llama))))
    predicted = 4 * est.activation_floats_per_token(run, inv, "cpu")
    assert predicted == pytest.approx(measured, rel=0.12)


def test_largest_micro_batch_and_suggestion(llama):
    run = config(llama, "lora")
    model_config = est.model_config(str(llama))
    one = est.step_memory(run, est.inventory(est.meta_model(model_config)), 1, torch.float32, "cpu", 16384)
    five = est.step_memory(run, est.inventory(est.meta_model(model_config)), 5, torch.float32, "cpu", 16384)
    budget = sum(five.values()) + 1
    assert est.largest_micro_batch(run, model_config, budget, "cpu", torch.float32) == 5
    assert est.largest_micro_batch(run, model_config, sum(one.values()) - 1, "cpu", torch.float32) == 0
    assert est.suggest_batch(32, 5) == (4, 8)  # the largest that fits and divides the batch
    assert est.suggest_batch(8, 100) == (8, 1)


def test_size_parsing_and_learning_rate_rule():
    assert est.parse_size("24GB") == 24 * 2**30 and est.parse_size("512 MiB") == 512 * 2**20
    assert est.parse_size("1.5t") == 1.5 * 2**40
    with pytest.raises(ConfigError, match="--memory='lots'"):
        est.parse_size("lots")
    assert est.parse_count("2M", "x") == 2e6 and est.parse_count("4e6", "x") == 4e6
    assert est.parse_count("3e-3", "x") == 3e-3
    assert est.scaled_learning_rate(3e-3, 4096, 4_194_304) == pytest.approx(3e-3 / 32)


def test_cli_estimate(llama, cli):
    result = cli("estimate", "--model", llama, "--method", "qlora", "--data.max_seq_length", 64,
                 "--train.batch_size", 8, "--train.micro_batch_size", 8, "--memory", "64MB",
                 "--pretrain-lr", "3e-3", "--pretrain-batch-tokens", "2M")
    assert result.code == 0, result.err
    out = result.out
    assert "method qlora" in out and "(4-bit storage saves)" in out and "GFLOP per token" in out
    assert "largest micro_batch_size that fits:" in out and "suggested: batch_size 8 = micro_batch_size" in out
    # 8 x 64 tokens, every one supervised: 3e-3 x sqrt(512 / 2e6)
    assert f"= {3e-3 * (512 / 2e6) ** 0.5:.2e}" in out
    tight = cli("estimate", "--model", llama, "--memory", "1MB")
    assert tight.code == 0 and "does NOT fit" in tight.out and "Even micro_batch_size 1 does not fit" in tight.out
    bad = cli("estimate", "--model", llama, "--memory", "lots")
    assert bad.code == 2 and "--memory='lots'" in bad.err
