"""Training: the bias update, the MTP and balance losses against direct computations, the dataset, and
short runs (imbalance falls with bias updates, loss falls, resume == uninterrupted)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dsv3 import DeepseekV3Config, DeepseekV3ForCausalLM
from dsv3.model.moe import Router, RouterOutput
from dsv3.training import (
    ByteTokenizer,
    ExpertLoadBalancer,
    TokenBlocks,
    Trainer,
    TrainingArguments,
    add_train_arguments,
    expert_counts,
    load_text_dataset,
    moe_routers,
    mtp_losses,
    run_train,
    sequence_balance_loss,
    tokenize_files,
    training_losses,
    update_router_bias,
)
from dsv3.training.trainer import lr_factor
from tests.oracle import assert_close

VOCAB = 257   # ByteTokenizer


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny(seed: int = 0, skew: float = 0.0, **overrides) -> DeepseekV3ForCausalLM:
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config.tiny(vocab_size=VOCAB, **overrides))
    with torch.no_grad():
        for router in moe_routers(model):
            router.weight.normal_(0, 0.3)
            if skew:   # expert 0 most favoured, expert E-1 least: a strongly unbalanced start
                router.e_score_correction_bias.copy_(torch.linspace(skew, -skew, router.num_experts))
            else:
                router.e_score_correction_bias.uniform_(-0.1, 0.1)
    return model


def random_blocks(n: int = 32, length: int = 24, seed: int = 0) -> TokenBlocks:
    return TokenBlocks(torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed)))


def quick_args(**overrides) -> TrainingArguments:
    base = dict(max_steps=4, batch_size=2, warmup_steps=1, learning_rate=1e-3, progress=False, log_every=1000)
    base.update(overrides)
    return TrainingArguments(**base)


# ----------------------------------------------------------------------------------------------- balancing
def test_bias_update_formula_on_hand_made_counts() -> None:
    config = DeepseekV3Config.tiny(n_routed_experts=4, n_group=2, topk_group=1, num_experts_per_tok=2)
    routers = [Router(config), Router(config)]
    routers[1].e_score_correction_bias.copy_(torch.tensor([0.5, -0.5, 0.0, 0.25]))
    before = [r.e_score_correction_bias.clone() for r in routers]
    counts = torch.tensor([[10.0, 0.0, 5.0, 5.0],     # mean 5: expert 0 over, 1 under, 2 and 3 exactly balanced
                           [1.0, 2.0, 3.0, 6.0]])     # mean 3
    update_router_bias(routers, counts, gamma=0.01)
    assert torch.equal(routers[0].e_score_correction_bias, before[0] + torch.tensor([-0.01, 0.01, 0.0, 0.0]))
    assert torch.equal(routers[1].e_score_correction_bias, before[1] + torch.tensor([0.01, 0.01, 0.0, -0.01]))
    assert routers[0].e_score_correction_bias.dtype == torch.float32
    with pytest.raises(ValueError, match="routers"):
        update_router_bias(routers, counts[:1], 0.01)
    # expert_counts: bincount of the chosen experts, per layer
    outs = [RouterOutput(torch.ones(3, 2), torch.tensor([[0, 1], [0, 2], [3, 0]]), torch.rand(3, 4))]
    assert expert_counts(outs, 4).tolist() == [[3.0, 1.0, 1.0, 1.0]]


def test_bias_gets_no_gradient_and_is_not_in_the_optimizer() -> None:
    model = tiny(seed=1)
    trainer = Trainer(model, quick_args(max_steps=1, bias_update_speed=0.0, balance_alpha=1e-2), random_blocks())
    routers = moe_routers(model)
    assert len(routers) == model.config.num_hidden_layers - model.config.first_k_dense_replace + 1   # + MTP
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    for r in routers:
        assert not r.e_score_correction_bias.requires_grad and id(r.e_score_correction_bias) not in optimised
    biases = [r.e_score_correction_bias.clone() for r in routers]
    weights = [r.weight.detach().clone() for r in routers]
    # a forward + backward with every loss on leaves the bias without a gradient
    losses = training_losses(model, random_blocks().blocks[:2], mtp_weight=0.3, balance_alpha=1e-2)
    losses.loss.backward()
    assert all(r.e_score_correction_bias.grad is None for r in routers)
    assert all(r.weight.grad is not None and r.weight.grad.abs().sum() > 0 for r in routers)
    model.zero_grad(set_to_none=True)
    trainer.train_step()   # optimizer step with γ = 0: weights move, biases do not
    for r, b, w in zip(routers, biases, weights):
        assert torch.equal(r.e_score_correction_bias, b)
        assert not torch.equal(r.weight, w)


def test_balancer_applies_the_update_to_the_observed_loads() -> None:
    model = tiny(seed=2)
    balancer = ExpertLoadBalancer(model, gamma=0.003)
    before = [r.e_score_correction_bias.clone() for r in balancer.routers]
    ids = random_blocks().blocks[:3]
    counts = 0
    with torch.no_grad():
        for chunk in (ids[:2], ids[2:]):   # two micro-batches, counted together
            losses = training_losses(model, chunk, mtp_weight=0.3)
            balancer.observe(losses.router_outputs)
            counts = counts + expert_counts(losses.router_outputs, 16)
    stats = balancer.step()
    for r, b, load in zip(balancer.routers, before, counts):
        assert torch.equal(r.e_score_correction_bias, b + 0.003 * torch.sign(load.mean() - load))
    assert stats["imbalance"] == pytest.approx(float((counts.max(-1).values / counts.mean(-1)).mean()))
    assert balancer.step() == {}   # counts were reset


def test_expert_imbalance_falls_with_bias_updates() -> None:
    """Start from a strongly skewed router bias (the first experts take nearly every token); γ-updates pull
    the loads together, the same run with γ = 0 stays skewed."""
    def run(gamma: float) -> list[float]:
        model = tiny(seed=3, skew=1.0)
        args = quick_args(max_steps=20, batch_size=2, warmup_steps=2, bias_update_speed=gamma)
        return [m["imbalance"] for m in Trainer(model, args, random_blocks(64, 32)).train()]

    balanced, skewed = run(0.1), run(0.0)
    start = balanced[0]
    assert start > 3.0                                      # near the worst case E/k = 4
    # 64 tokens a step leave sampling noise (max/mean ≈ 2 even for uniform routing): compare averages
    late_balanced = sum(balanced[-8:]) / 8
    late_skewed = sum(skewed[-8:]) / 8
    assert late_balanced < 0.8 * late_skewed and late_balanced < 0.8 * start, (balanced, skewed)


# ----------------------------------------------------------------------------------------------- losses
def test_mtp_loss_equals_direct_computation() -> None:
    model = tiny(seed=4).eval()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (2, 9), generator=g)
    labels = ids.clone()
    labels[0, 5] = -100                                      # an ignored target
    with torch.no_grad():
        out = model(ids, labels=labels, use_cache=False)
        got = mtp_losses(model, out.last_hidden_state, ids, labels)
        # depth 1: position i sees h_i and t_{i+1} and predicts t_{i+2}, for i = 0 .. T-3
        logits, _ = model.mtp_forward(out.last_hidden_state[:, :-1], ids[:, 1:])
        terms = [-F.log_softmax(logits[b, i], -1)[labels[b, i + 2]]
                 for b in range(2) for i in range(ids.shape[1] - 2) if labels[b, i + 2] != -100]
        direct = torch.stack(terms).mean()
        total = training_losses(model, ids, labels, mtp_weight=0.3)
    assert len(got) == 1
    assert_close(got[0], direct, 1e-5, "mtp loss")
    assert_close(total.loss, out.loss + 0.3 * direct, 1e-5, "lm + λ·mtp")
    assert_close(total.lm_loss, out.loss, 0.0, "lm loss")
    with pytest.raises(ValueError, match="too short"):
        mtp_losses(model, out.last_hidden_state[:, :2], ids[:, :2])


def _direct_balance(routes: list[RouterOutput], b: int, mask: torch.Tensor | None) -> torch.Tensor:
    total = torch.zeros(())
    for r in routes:
        n, e = r.scores.shape
        k, t = r.indices.shape[1], n // b
        per_seq = []
        for s in range(b):
            rows = [s * t + j for j in range(t) if mask is None or mask[s, j]]
            f = torch.zeros(e)
            p = torch.zeros(e)
            for row in rows:
                for i in r.indices[row].tolist():
                    f[i] += 1.0
                p = p + r.scores[row] / r.scores[row].sum()
            f = f * e / (k * len(rows))
            p = p / len(rows)
            per_seq.append((f * p).sum())
        total = total + torch.stack(per_seq).mean()
    return total


def test_sequence_balance_loss_equals_direct_per_sequence_computation() -> None:
    model = tiny(seed=6).eval()
    ids = random_blocks(4, 7, seed=7).blocks[:3]
    with torch.no_grad():
        routes = training_losses(model, ids, mtp_weight=0.3).router_outputs   # main layers (T=7) + MTP (T=6)
    assert [r.scores.shape[0] for r in routes] == [21, 21, 18]
    assert_close(sequence_balance_loss(routes, 3), _direct_balance(routes, 3, None), 1e-6, "balance loss")
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, :3] = 0
    assert_close(sequence_balance_loss(routes, 3, mask), _direct_balance(routes, 3, mask), 1e-6, "balance masked")
    # α scales it; the gradient reaches the router weights through P
    model.train()
    losses = training_losses(model, ids, mtp_weight=0.3, balance_alpha=0.5)
    assert_close(losses.balance_loss, 0.5 * sequence_balance_loss(losses.router_outputs, 3), 1e-6, "α·balance")
    losses.balance_loss.backward()
    assert all(float(r.weight.grad.abs().sum()) > 0 for r in moe_routers(model))


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    grads = []
    for enable in (False, True):
        model = tiny(seed=8).train()
        model.gradient_checkpointing_enable(enable)
        losses = training_losses(model, random_blocks().blocks[:2], mtp_weight=0.3, balance_alpha=1e-2)
        assert len(losses.router_outputs) == 3
        losses.loss.backward()
        assert len(losses.router_outputs) == 3   # recomputation in backward does not add to the snapshot
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert_close(grads[1][name], g, 1e-5, f"grad ckpt {name}")


def test_lr_schedule_warms_up_then_decays_to_the_floor() -> None:
    f = [lr_factor(s, 4, 20, 0.1) for s in range(21)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0] and f[4] == 1.0
    assert all(a >= b for a, b in zip(f[4:], f[5:])) and f[20] == pytest.approx(0.1)


# ----------------------------------------------------------------------------------------------- data
def test_token_stream_dataset(tmp_path: Path) -> None:
    files = []
    for i, text in enumerate(["hello world", "abc", "é"]):
        files.append(tmp_path / f"{i}.txt")
        files[-1].write_text(text, encoding="utf-8")
    tok = ByteTokenizer()
    stream = tokenize_files(files, tok)
    assert stream.tolist() == list(b"hello world") + [256] + list(b"abc") + [256] + list("é".encode()) + [256]
    train_a, held_a = load_text_dataset(files, tok, block_len=3, eval_fraction=0.25, seed=1)
    train_b, held_b = load_text_dataset(files, tok, block_len=3, eval_fraction=0.25, seed=1)
    assert len(train_a) + len(held_a) == len(stream) // 3 and len(held_a) == 2
    assert torch.equal(train_a.blocks, train_b.blocks) and torch.equal(held_a.blocks, held_b.blocks)
    all_blocks = {tuple(b) for b in stream[: len(stream) // 3 * 3].view(-1, 3).tolist()}
    assert {tuple(b) for b in torch.cat([train_a.blocks, held_a.blocks]).tolist()} == all_blocks
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(train_a.sample(5, g1), train_a.sample(5, g2))
    assert sum(len(b) for b in held_a.batches(1)) == 2
    with pytest.raises(ValueError, match="fewer than one block"):
        load_text_dataset(files, tok, block_len=1000)


# ----------------------------------------------------------------------------------------------- runs
def test_training_loss_decreases_on_a_repetitive_corpus(tmp_path: Path) -> None:
    corpus = tmp_path / "abc.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    train_data, held_out = load_text_dataset([corpus], ByteTokenizer(), block_len=32, eval_fraction=0.1)
    model = tiny(seed=9)
    trainer = Trainer(model, quick_args(max_steps=40, batch_size=4, warmup_steps=4, learning_rate=3e-3,
                                        eval_batches=2), train_data, held_out)
    before = trainer.evaluate()
    history = trainer.train()
    after = trainer.evaluate()
    first = sum(m["lm_loss"] for m in history[:3]) / 3
    last = sum(m["lm_loss"] for m in history[-3:]) / 3
    assert last < 0.5 * first, (first, last)
    assert after["eval_lm_loss"] < 0.5 * before["eval_lm_loss"]
    assert after["eval_mtp_loss"] < before["eval_mtp_loss"]
    assert all(m["tokens_per_s"] > 0 and "imbalance" in m and "grad_norm" in m for m in history)


def test_resume_gives_the_same_next_step_loss(tmp_path: Path) -> None:
    data = random_blocks(16, 16, seed=10)
    args = quick_args(max_steps=3, save_every=2, output_dir=str(tmp_path), bias_update_speed=0.01)
    straight = Trainer(tiny(seed=11), args, data).train()
    ckpt = tmp_path / "checkpoint-000002"
    assert (ckpt / "trainer_state.pt").is_file() and (ckpt / "config.json").is_file()
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-000003"
    assert not list(tmp_path.glob(".*tmp"))
    torch.manual_seed(1234)   # a different global RNG state: the checkpoint must restore it
    resumed = Trainer.from_checkpoint(ckpt, args, data)
    assert resumed.step == 2
    assert resumed.model.mtp is not None
    step3 = resumed.train()
    assert len(step3) == 1
    for key in ("loss", "lm_loss", "mtp_loss", "balance_loss", "imbalance", "lr"):
        assert step3[0][key] == pytest.approx(straight[2][key], rel=1e-6, abs=1e-9), key


def test_run_train_cli(tmp_path: Path) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("abcdefgh " * 40)
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    out = tmp_path / "run"
    common = [str(corpus), "--tokenizer", "bytes", "--output-dir", str(out), "--seq-len", "16", "--batch-size", "2",
              "--warmup", "1", "--eval-batches", "1"]
    assert run_train(parser.parse_args([*common, "--preset", "tiny", "--steps", "2"])) == 0
    assert (out / "latest").read_text().strip() == "checkpoint-000002"
    assert run_train(parser.parse_args([*common, "--resume", str(out), "--steps", "3", "--bf16"])) == 0
    assert (out / "latest").read_text().strip() == "checkpoint-000003"
