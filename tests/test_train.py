"""Training: gradients do not depend on how a step is split into micro batches, the loss goes
down, the learning-rate schedule follows its formulas, and the step plan is seeded."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from helpers import fast_train_flags, qa_rows, write_jsonl

from tunesmith.config import TrainConfig
from tunesmith.data.dataset import TokenizedSplit
from tunesmith.train.batching import StepPlan, pack, pack_sequences
from tunesmith.train.kernels import packed_attention
from tunesmith.train.loop import train_step
from tunesmith.train.optim import build_optimizer, lr_at

NO_AUTOCAST = torch.autocast("cpu", dtype=torch.float32, enabled=False)  # what the loop uses in fp32


def uneven_split(vocab_size: int) -> TokenizedSplit:
    """Four examples of quite different lengths and supervised shares."""
    generator = torch.Generator().manual_seed(3)
    ids, supervised = [], []
    for prompt_length, answer_length in ((3, 2), (14, 9), (6, 1), (9, 20)):
        length = prompt_length + answer_length
        ids.append(torch.randint(3, vocab_size, (length,), generator=generator).tolist())
        supervised.append([False] * prompt_length + [True] * answer_length)
    return TokenizedSplit.from_lists(ids, supervised)


def gradients_of(model, split, micro_batches: list[list[int]], chunk_size: int = 8):
    model.zero_grad(set_to_none=True)
    loss = train_step(model, [pack(split, ids) for ids in micro_batches], NO_AUTOCAST, chunk_size)
    return loss, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_accumulation_gives_the_same_gradients_as_one_big_micro_batch(llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32, attn_implementation="sdpa")
    model.train()
    split = uneven_split(model.config.vocab_size)

    one_loss, one = gradients_of(model, split, [[0, 1, 2, 3]])  # micro 4 x accumulation 1
    four_loss, four = gradients_of(model, split, [[0], [1], [2], [3]])  # micro 1 x accumulation 4
    two_loss, two = gradients_of(model, split, [[3, 1], [0, 2]], chunk_size=5)  # 2 x 2, another order

    assert one.keys() == four.keys() == two.keys() and len(one) == len(list(model.parameters()))
    torch.testing.assert_close(four_loss, one_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(two_loss, one_loss, rtol=1e-5, atol=1e-5)
    for name in one:
        for other in (four, two):
            torch.testing.assert_close(other[name], one[name], rtol=1e-5, atol=1e-5,
                                       msg=lambda m, n=name: f"{n}: {m}")
    # the step loss is the mean over the supervised tokens of the whole step (not a mean of means)
    targets = split.target_counts().tolist()
    assert targets == [2, 9, 1, 20]
    singles = [float(gradients_of(model, split, [[i]])[0]) for i in range(4)]
    expected = sum(loss * n for loss, n in zip(singles, targets)) / sum(targets)
    assert float(one_loss) == pytest.approx(expected, rel=1e-5)


def templated_split(vocab_size: int, system_length: int = 12) -> TokenizedSplit:
    """Four examples that begin with the same system block, then prompts and answers of their own."""
    generator = torch.Generator().manual_seed(5)
    system = torch.randint(3, vocab_size, (system_length,), generator=generator).tolist()
    ids, supervised = [], []
    for prompt_length, answer_length in ((3, 2), (9, 6), (5, 1), (7, 4)):
        rest = torch.randint(3, vocab_size, (prompt_length + answer_length,), generator=generator).tolist()
        ids.append(system + rest)
        supervised.append([False] * (system_length + prompt_length) + [True] * answer_length)
    return TokenizedSplit.from_lists(ids, supervised)


def test_a_shared_beginning_is_computed_once_with_the_same_loss_and_gradients(llama):
    """A micro batch whose examples share a system block holds it once; every example attends to it
    as to its own first tokens: loss, gradients and per-token log-probs equal the plain packing's."""
    from transformers import AutoModelForCausalLM

    from tunesmith.train.loss import token_logps
    from tunesmith.train.preference import sequence_logps

    model = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32, attn_implementation="sdpa")
    model.train()
    split = templated_split(model.config.vocab_size)
    shared, plain = pack(split, [0, 1, 2, 3], share_prefix=True), pack(split, [0, 1, 2, 3])
    prefix = shared.segments[0][1]
    assert prefix >= 12 and shared.parents == (-1, 0, 0, 0, 0) and shared.n_tokens == plain.n_tokens
    assert shared.n_computed == plain.n_tokens - 3 * prefix and len(shared.segments) == 5
    losses, grads = [], []
    for batch in (shared, plain):
        model.zero_grad(set_to_none=True)
        losses.append(train_step(model, [batch], NO_AUTOCAST, 8))
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for name, grad in grads[1].items():
        torch.testing.assert_close(grads[0][name], grad, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    with torch.no_grad(), packed_attention(model):
        torch.testing.assert_close(token_logps(model, shared), token_logps(model, plain), rtol=1e-5, atol=1e-5)
        for ours, theirs in zip(sequence_logps(model, shared, 8), sequence_logps(model, plain, 8)):  # DPO's sums
            assert ours.shape == (4,)
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert pack(split, [0, 1, 2, 3], share_prefix=True).segments == shared.segments
    assert pack(templated_split(model.config.vocab_size, 5), [0, 1], share_prefix=True).parents == ()  # too short
    long_rows = [(torch.cat([shared.input_ids[0, :12], torch.full((200,), token)]), torch.arange(212) > 100)
                 for token in (7, 8)]  # 12 tokens in common, 212 long
    assert pack_sequences(long_rows, share_prefix=True).parents == ()  # under an eighth of the rows: not worth a mask


def test_ddp_sums_gradients_once_per_step_after_the_accumulated_micro_batches(llama, tmp_path, monkeypatch):
    """torch's DistributedDataParallel (one gloo rank here): the micro batches before a step's last run
    under no_sync, so gradients cross the wire once per step, not once per micro batch, and the
    gradients are the plain model's."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from tunesmith.train import distributed

    model = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32, attn_implementation="sdpa")
    split = uneven_split(model.config.vocab_size)
    _, plain = gradients_of(model, split, [[0], [1], [2], [3]])
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    calls, all_reduce = [], dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, *a, **k: calls.append(tensor.numel()) or all_reduce(
        tensor, *a, **k))
    try:
        root = distributed.replicate(model)
        gradients_of(root, split, [[0, 1, 2, 3]])
        one_micro_batch = list(calls)
        calls.clear()
        _, replicated = gradients_of(root, split, [[0], [1], [2], [3]])
    finally:
        distributed._replicas.clear()
        dist.destroy_process_group()
    assert sum(one_micro_batch) == sum(p.numel() for p in model.parameters())  # every gradient, in buckets
    assert calls == one_micro_batch  # 4 micro batches: the same reductions as 1, not 4 times as many
    assert {name.removeprefix("module.model."): grad for name, grad in replicated.items()}.keys() == plain.keys()
    for name, grad in replicated.items():
        torch.testing.assert_close(grad, plain[name.removeprefix("module.model.")], rtol=1e-5, atol=1e-6)


def test_step_plan_is_seeded_and_covers_each_epoch():
    plan = StepPlan.build(10, batch_size=4, micro_batch_size=2, epochs=2, max_steps=None, seed=5)
    assert plan.total_steps == 5  # ceil(2 epochs x 10 examples / 4)
    assert plan.micro_batches(0) == [plan.step_indices(0)[:2], plan.step_indices(0)[2:]]
    first_epoch = plan.step_indices(0) + plan.step_indices(1) + plan.step_indices(2)[:2]
    assert sorted(first_epoch) == list(range(10))  # a permutation: every example once per epoch
    again = StepPlan.build(10, 4, 2, 2, None, seed=5)
    assert [again.step_indices(s) for s in range(5)] == [plan.step_indices(s) for s in range(5)]
    other = StepPlan.build(10, 4, 2, 2, None, seed=6)
    assert [other.step_indices(s) for s in range(5)] != [plan.step_indices(s) for s in range(5)]
    assert StepPlan.build(10, 4, 2, 2, max_steps=7, seed=5).total_steps == 7
    assert plan.epoch_at(5) == 2.0


def train_config(**values) -> TrainConfig:
    return TrainConfig(**{"learning_rate": 1e-3, "min_lr_ratio": 0.1, **values})


def test_warmup_is_linear_from_zero_to_peak():
    train = train_config(warmup_steps=4, lr_schedule="constant")
    assert [lr_at(s, 20, train) for s in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_schedules_follow_their_formulas(schedule):
    peak, floor, warmup, total = 1e-3, 1e-4, 3, 13
    train = train_config(warmup_steps=warmup, lr_schedule=schedule)
    for step in range(total):
        if step < warmup:
            expected = peak * (step + 1) / warmup
        else:
            progress = (step - warmup) / (total - warmup)
            expected = {"constant": peak,
                        "linear": peak - (peak - floor) * progress,
                        "cosine": floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))}[schedule]
        assert lr_at(step, total, train) == pytest.approx(expected, rel=1e-12), step
    # after warmup the rate never rises, and never goes below the floor
    rates = [lr_at(s, total, train) for s in range(warmup - 1, total + 3)]
    assert all(b <= a + 1e-15 for a, b in itertools.pairwise(rates))
    assert min(rates) >= floor - 1e-15
    assert lr_at(total, total, train) == pytest.approx(peak if schedule == "constant" else floor)


def test_no_warmup_starts_at_the_peak():
    assert lr_at(0, 10, train_config(warmup_steps=0, lr_schedule="cosine")) == pytest.approx(1e-3)


def test_weight_decay_only_on_matrices(llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama)
    optimizer = build_optimizer(model, train_config(weight_decay=0.1))
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decayed["params"]) and all(p.ndim < 2 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_loss_goes_down_and_metrics_are_logged(cli, llama, tmp_path):
    rows = [{"question": f"Say the word number {i}", "answer": word}
            for i, word in enumerate(["red", "green", "blue", "yes"])]
    path = write_jsonl(tmp_path / "words.jsonl", rows)
    run_dir = tmp_path / "run"
    result = cli("finetune", "--model", llama, "--method", "full", "--data.path", path, "--out_dir", run_dir,
                 "--data.val_split", 0, "--data.test_split", 0,
                 *fast_train_flags(max_steps=12, batch=4, micro=2),
                 "--train.learning_rate", 1e-2, "--train.lr_schedule", "constant", "--train.warmup_steps", 2)
    assert result.code == 0, result.err
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 13))  # log_interval 1, no validation split
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.5 * losses[0], losses
    assert [r["lr"] for r in records] == pytest.approx([5e-3] + [1e-2] * 11)
    assert all(r["grad_norm"] > 0 and r["tokens_per_second"] > 0 for r in records)
    assert "final training loss" in result.out
    state = json.loads((run_dir / "final" / "trainer_state.json").read_text())
    assert state["step"] == 12 and state["kind"] == "final" and state["best_step"] is None
    assert {p.name for p in (run_dir / "plots").iterdir()} == {"loss.png", "lr.png", "throughput.png"}


def test_gradient_checkpointing_keeps_fewer_activations_and_gives_the_same_run(cli, llama, tmp_path):
    """With train.gradient_checkpointing the layers keep only their inputs for backward and recompute
    the rest (inside the packed attention): autograd is handed a fraction of the tensors it keeps
    without it (counted by a saved-tensor hook around the whole run; the recomputed layers save
    theirs through checkpoint's own hooks, which this one does not see), and the run ends with the
    same weights."""
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(12))
    kept, adapters = {}, {}
    for flag in ("false", "true"):
        saved: list[int] = []  # bytes of each tensor autograd keeps for backward

        def keep(tensor, saved=saved):
            saved.append(tensor.numel() * tensor.element_size())
            return tensor

        out = tmp_path / f"gc-{flag}"
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            result = cli("finetune", "--model", llama, "--data.path", data, "--out_dir", out,
                         *fast_train_flags(max_steps=3), "--train.learning_rate", 1e-2, "--lora.dropout", 0,
                         "--train.gradient_checkpointing", flag)
        assert result.code == 0, result.err
        assert json.loads((out / "final" / "trainer_state.json").read_text())["step"] == 3
        kept[flag] = len(saved), sum(saved)
        adapters[flag] = load_file(str(out / "final" / "adapter_model.safetensors"))
    # measured: 369 tensors (3.2 MB) without, 36 (0.46 MB) with
    assert kept["true"][0] < kept["false"][0] / 4 and kept["true"][1] < kept["false"][1] / 4, kept
    assert adapters["true"].keys() == adapters["false"].keys()
    assert all(value.abs().max() > 1e-3 for key, value in adapters["false"].items() if "lora_B" in key)  # trained
    for key, value in adapters["false"].items():
        torch.testing.assert_close(adapters["true"][key], value, rtol=1e-5, atol=1e-6)


MALLOC_PROBE = """
import ctypes, ctypes.util, sys
from tunesmith.train import memory
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc.mallinfo2.restype = Info
if sys.argv[1] == "compact":
    assert memory.return_freed_memory_to_os()
if sys.argv[1] == "keep":
    assert memory.keep_freed_memory()
if sys.argv[-1] == "keep":  # what generation allocates: a 24 MiB block, freed, with a trim due after it
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(24 << 20)
    mapped = libc.mallinfo2().hblkhd - before
    libc.free(block)
    print(mapped, libc.mallinfo2().fordblks >= 24 << 20)
    sys.exit()
libc.free(libc.malloc(1 << 20))  # glibc raises its mmap threshold past this size, unless pinned
before = libc.mallinfo2().hblkhd
block = libc.malloc(1 << 20)
print(libc.mallinfo2().hblkhd - before)
"""


def test_compact_memory_serves_large_blocks_from_memory_the_os_gets_back():
    """With the pin a 1 MiB block freed and asked for again is a fresh mmap (freed = returned);
    without it glibc keeps it in its heap. Measured through glibc's own counters."""
    import ctypes.util
    import subprocess
    import sys

    if not hasattr(ctypes.CDLL(ctypes.util.find_library("c")), "mallinfo2"):
        pytest.skip("not glibc >= 2.33")
    mapped = {mode: int(subprocess.run([sys.executable, "-c", MALLOC_PROBE, mode], capture_output=True, text=True,
                                       check=True).stdout) for mode in ("compact", "default")}
    assert mapped["compact"] >= 1 << 20 and mapped["default"] == 0, mapped


def test_generation_keeps_large_freed_blocks_for_the_next_pass_unless_training_compacts():
    """keep_freed_memory: a 24 MiB block comes from glibc's heap (not a fresh mmap) and stays there
    once freed; by default it is mapped afresh; after return_freed_memory_to_os it is refused."""
    import ctypes.util
    import subprocess
    import sys

    if not hasattr(ctypes.CDLL(ctypes.util.find_library("c")), "mallinfo2"):
        pytest.skip("not glibc >= 2.33")
    run = [sys.executable, "-c", MALLOC_PROBE]
    kept = subprocess.run([*run, "keep", "keep"], capture_output=True, text=True, check=True).stdout.split()
    default = subprocess.run([*run, "default", "keep"], capture_output=True, text=True, check=True).stdout.split()
    assert kept == ["0", "True"] and int(default[0]) >= 24 << 20, (kept, default)
    after_compact = ("from tunesmith.train import memory; assert memory.return_freed_memory_to_os(); "
                     "assert not memory.keep_freed_memory()")
    refused = subprocess.run([sys.executable, "-c", after_compact], capture_output=True, text=True, check=False)
    assert refused.returncode == 0, refused.stderr


def test_the_engine_keeps_freed_memory_on_a_cpu(tiny_models, monkeypatch):
    from tunesmith.infer.engine import Engine
    from tunesmith.infer.generate import load_base
    from tunesmith.train import memory

    calls = []
    monkeypatch.setattr(memory, "keep_freed_memory", lambda: calls.append(1) or True)
    loaded = load_base(str(tiny_models("llama")), device="cpu", precision="fp32")
    Engine(loaded.model, loaded.tokenizer.pad_token_id)
    assert calls == [1]


@pytest.mark.parametrize("compact", [False, True])
def test_finetune_pins_the_allocator_only_when_asked(cli, llama, tmp_path, monkeypatch, compact):
    from tunesmith.train import memory

    calls = []
    monkeypatch.setattr(memory, "return_freed_memory_to_os", lambda: calls.append(1) or True)
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": f"q{i}", "answer": f"a{i}"} for i in range(8)])
    result = cli("finetune", "--model", llama, "--data.path", path, "--out_dir", tmp_path / "run",
                 "--data.val_split", 0, "--data.test_split", 0, *fast_train_flags(max_steps=1),
                 "--train.compact_memory", str(compact).lower())
    assert result.code == 0, result.err
    assert calls == ([1] if compact else [])


def test_compiled_layers_run_and_give_the_same_losses(cli, llama, tmp_path):
    """train.compile (torch.compile of each layer, dynamic shapes) really compiles: dynamo reports
    frames it turned into graphs during the compiled run and none during the plain one. It runs the
    packed attention and the chunked loss unchanged: the same per-step losses to float rounding.
    Dropout is off: compiled code draws its dropout masks from another random stream. (Compiling
    takes about a minute here on the first run; torch caches it after.)"""
    from torch._dynamo.utils import counters

    rows = [{"question": f"Say word {i} " * (1 + i % 5), "answer": f"w{i} " * (1 + i % 7)} for i in range(16)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    losses, compiled_frames, graphs = {}, {}, {}
    torch._dynamo.reset()  # forget frames compiled earlier in this process, so this run compiles its own
    for compiled in ("false", "true"):
        counters.clear()
        run_dir = tmp_path / compiled
        result = cli("finetune", "--model", llama, "--data.path", path, "--out_dir", run_dir,
                     "--data.val_split", 0, "--data.test_split", 0, *fast_train_flags(max_steps=3, batch=4, micro=2),
                     "--train.learning_rate", 1e-2, "--lora.dropout", 0,
                     "--train.compile", compiled)
        assert result.code == 0, result.err
        compiled_frames[compiled] = counters["frames"]["ok"]
        graphs[compiled] = counters["stats"]["unique_graphs"]
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses[compiled] = [r["loss"] for r in records if "loss" in r]
    torch._dynamo.reset()
    assert compiled_frames["false"] == graphs["false"] == 0
    assert compiled_frames["true"] >= 1 and graphs["true"] >= 1, (compiled_frames, graphs)
    assert len(losses["true"]) == 3
    assert losses["true"] == pytest.approx(losses["false"], abs=1e-4)


def test_short_bf16_pieces_are_attended_in_fp32_and_long_ones_in_bf16():
    """On a CPU, torch's flash attention takes about twice as long in bf16 as in fp32 for short
    examples: varlen_attention widens the pieces shorter than FP32_BELOW, gradients included, and
    leaves longer ones in bf16."""
    import torch.nn.functional as F

    from tunesmith.train import attention

    generator = torch.Generator().manual_seed(0)
    short, long = 12, attention.FP32_BELOW
    total = short + long
    q = torch.randn(1, 4, total, 16, generator=generator).bfloat16().requires_grad_()
    k = torch.randn(1, 2, total, 16, generator=generator).bfloat16().requires_grad_()
    v = torch.randn(1, 2, total, 16, generator=generator).bfloat16().requires_grad_()
    module = torch.nn.Module().eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as bf16 training runs it
        out, _ = attention.varlen_attention(module, q, k, v, None, tunesmith_segments=[(0, short), (short, total)])
    assert out.dtype == torch.bfloat16 and out.shape == (1, total, 4, 16)

    def sdpa(start, end, dtype):
        piece = [t[:, :, start:end].to(dtype) for t in (q, k, v)]
        return F.scaled_dot_product_attention(*piece, is_causal=True, enable_gqa=True).bfloat16().transpose(1, 2)

    assert torch.equal(out[:, :short], sdpa(0, short, torch.float32))  # widened: fp32's result, rounded once
    assert not torch.equal(sdpa(0, short, torch.float32), sdpa(0, short, torch.bfloat16))  # which bf16 would not give
    assert torch.equal(out[:, short:], sdpa(short, total, torch.bfloat16))
    out.float().square().sum().backward()
    assert q.grad.dtype == torch.bfloat16 and q.grad[:, :, :short].abs().sum() > 0 and k.grad[:, :, short:].abs().sum() > 0
