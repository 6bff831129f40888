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


# ----------------------------------------------------------------------------------------------- numerics
def test_router_under_bf16_autocast_routes_exactly_like_fp32() -> None:
    """bf16 autocast would run the router's linear in bf16 and move ~1 % of tokens to other experts."""
    config = DeepseekV3Config.tiny()
    torch.manual_seed(12)
    router = Router(config)
    with torch.no_grad():
        router.weight.normal_(0, 0.3)
        router.e_score_correction_bias.uniform_(-0.1, 0.1)
    x = torch.randn(4096, config.hidden_size)
    want = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = router(x)
        got_bf16_input = router(x.to(torch.bfloat16))
    assert torch.equal(got.indices, want.indices), \
        f"{(got.indices.sort(-1).values != want.indices.sort(-1).values).any(-1).float().mean():.2%} rerouted"
    assert got.weights.dtype == torch.float32 and torch.equal(got.weights, want.weights)
    assert torch.equal(got.scores, want.scores)
    with torch.no_grad():   # a bf16 input routes as its fp32 upcast does
        assert torch.equal(got_bf16_input.indices, router(x.to(torch.bfloat16).float()).indices)


def _mtp_logits(model: DeepseekV3ForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        hidden = model(ids, use_cache=False).last_hidden_state
        return model.mtp_forward(hidden[:, :-1], ids[:, 1:])[0]


def _shared(model: DeepseekV3ForCausalLM) -> bool:
    layer = model.mtp[0]
    return (layer.embed_tokens.weight is model.model.embed_tokens.weight
            and layer.shared_head.head.weight is model.lm_head.weight)


def test_mtp_trains_with_the_main_embedding_and_head() -> None:
    """A new model (as dsv3 train builds it) trains MTP on the main embedding and output head: after a step
    they are still the same tensors, and the MTP loss alone sends gradients into them."""
    from dsv3.model.mtp import share_main_weights

    model = tiny(seed=13)
    share_main_weights(model)
    n_params = len(list(model.parameters()))
    trainer = Trainer(model, quick_args(max_steps=2), random_blocks())
    before = model.model.embed_tokens.weight.detach().clone()
    trainer.train_step()
    assert trainer.mtp_shared and _shared(model)
    assert not torch.equal(model.mtp[0].embed_tokens.weight, before)      # trained, through the one tensor
    opt_params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    assert len(opt_params) == n_params == len({id(p) for p in opt_params})   # each tied tensor stepped once
    # gradients of the MTP loss alone (the main hidden state detached) reach the main embedding and head
    ids = random_blocks(4, 12, seed=14).blocks[:2]
    with torch.no_grad():
        hidden = model(ids, use_cache=False).last_hidden_state
    model.zero_grad(set_to_none=True)
    mtp_losses(model, hidden, ids)[0].backward()
    emb_grad = model.model.embed_tokens.weight.grad
    assert emb_grad is not None and model.lm_head.weight.grad is not None
    rows = emb_grad.abs().sum(-1).nonzero().flatten()
    assert set(rows.tolist()) == set(ids[:, 1:-1].flatten().tolist())     # the MTP inputs t_{i+1}, i <= T-3
    assert float(model.lm_head.weight.grad.abs().sum()) > 0


def test_mtp_embeddings_choice_keeps_a_checkpoint_with_different_copies(tmp_path: Path, caplog) -> None:
    """auto: equal copies (a tied run's checkpoint) are tied again; different ones (the shipped model) are
    kept, so the model's MTP predictions do not change; 'shared' ties them (warned), 'separate' unties."""
    from dsv3.cli import SHIPPED_MODEL
    from dsv3.model.mtp import main_weight_difference

    data = random_blocks()
    shipped = DeepseekV3ForCausalLM.from_pretrained(SHIPPED_MODEL, torch_dtype=torch.float32)
    assert main_weight_difference(shipped) > 0.1       # its MTP module has its own embedding and head
    ids = torch.randint(0, shipped.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(15))
    want = _mtp_logits(shipped, ids)
    with caplog.at_level("WARNING"):
        trainer = Trainer(shipped, quick_args(), TokenBlocks(data.blocks % shipped.config.vocab_size))
    assert not trainer.mtp_shared and not _shared(shipped) and "separate copies" in caplog.text
    assert torch.equal(_mtp_logits(shipped, ids), want)

    model = tiny(seed=16)
    with torch.no_grad():    # equal copies, separate tensors: what loading a tied run's checkpoint gives
        model.mtp[0].embed_tokens.weight.copy_(model.model.embed_tokens.weight)
        model.mtp[0].shared_head.head.weight.copy_(model.lm_head.weight)
    assert Trainer(model, quick_args(), data).mtp_shared and _shared(model)
    assert not Trainer(model, quick_args(mtp_embeddings="separate"), data).mtp_shared and not _shared(model)

    other = tiny(seed=17)
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert Trainer(other, quick_args(mtp_embeddings="shared"), data).mtp_shared and _shared(other)
    assert "predictions change" in caplog.text
    with pytest.raises(ValueError, match="mtp_embeddings"):
        Trainer(tiny(), quick_args(mtp_embeddings="tied"), data)


@pytest.mark.parametrize("mtp_embeddings", ["shared", "separate"])
def test_resume_of_a_tied_or_untied_run(tmp_path: Path, mtp_embeddings: str) -> None:
    data = random_blocks(16, 16, seed=18)
    args = quick_args(max_steps=3, save_every=2, output_dir=str(tmp_path), mtp_embeddings=mtp_embeddings)
    straight = Trainer(tiny(seed=19), args, data).train()
    resumed = Trainer.from_checkpoint(tmp_path / "checkpoint-000002", args, data)
    assert resumed.mtp_shared == (mtp_embeddings == "shared") == _shared(resumed.model)
    step3 = resumed.train()
    for key in ("loss", "lm_loss", "mtp_loss"):
        assert step3[0][key] == pytest.approx(straight[2][key], rel=1e-6, abs=1e-9), key


# ----------------------------------------------------------------------------------------------- not losing a run
def _train_cli(tmp_path: Path, *extra: str) -> int:
    corpus = tmp_path / "c.txt"
    if not corpus.exists():
        corpus.write_text("abcdefgh " * 40)
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    common = [str(corpus), "--tokenizer", "bytes", "--seq-len", "16", "--batch-size", "2", "--warmup", "1",
              "--eval-batches", "1"]
    return run_train(parser.parse_args([*common, *extra]))


def test_output_dir_must_be_a_writable_directory_before_step_1(tmp_path: Path) -> None:
    a_file = tmp_path / "file.txt"
    a_file.write_text("not a directory")
    for bad, match in ((a_file, "is a file"), (a_file / "run", "not writable")):
        trainer = Trainer(tiny(seed=20), quick_args(output_dir=str(bad)), random_blocks())
        with pytest.raises(ValueError, match=match):
            trainer.train()
        assert trainer.step == 0 and trainer.history == []
        with pytest.raises(ValueError, match=match):
            _train_cli(tmp_path, "--preset", "tiny", "--steps", "1", "--output-dir", str(bad))
    assert a_file.read_text() == "not a directory"


def test_a_new_run_never_lands_on_another_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert _train_cli(tmp_path, "--preset", "tiny", "--steps", "2", "--output-dir", str(out)) == 0
    first = (out / "checkpoint-000002" / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match=r"holds another run \(checkpoint-000002, latest\).*--resume.*--overwrite"):
        _train_cli(tmp_path, "--preset", "tiny", "--steps", "1", "--output-dir", str(out))
    with pytest.raises(ValueError, match="holds another run"):   # the Trainer API refuses too
        Trainer(tiny(), quick_args(output_dir=str(out)), random_blocks()).train()
    assert (out / "checkpoint-000002" / "model.safetensors").read_bytes() == first
    assert (out / "latest").read_text().strip() == "checkpoint-000002"
    # --resume continues the run in place; resuming it into another run's directory is refused
    other = tmp_path / "other"
    assert _train_cli(tmp_path, "--preset", "tiny", "--steps", "1", "--output-dir", str(other)) == 0
    with pytest.raises(ValueError, match="holds another run"):
        _train_cli(tmp_path, "--resume", str(out), "--steps", "3", "--output-dir", str(other))
    assert _train_cli(tmp_path, "--resume", str(out / "checkpoint-000002"), "--steps", "3",
                      "--output-dir", str(out)) == 0
    assert (out / "latest").read_text().strip() == "checkpoint-000003"
    # --overwrite replaces the run: its old checkpoints go
    assert _train_cli(tmp_path, "--preset", "tiny", "--steps", "1", "--output-dir", str(out), "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-000001", "latest"]


def test_resume_with_steps_at_or_below_the_checkpoint_says_so(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert _train_cli(tmp_path, "--preset", "tiny", "--steps", "2", "--output-dir", str(out)) == 0
    for steps in ("2", "1"):
        with pytest.raises(ValueError, match=r"at step 2 and max_steps=.*--steps N with N > 2"):
            _train_cli(tmp_path, "--resume", str(out), "--steps", steps, "--output-dir", str(out))
    assert (out / "latest").read_text().strip() == "checkpoint-000002"


def test_a_corrupt_trainer_state_is_a_clear_error(tmp_path: Path) -> None:
    from dsv3.checkpoint.errors import CheckpointError

    data = random_blocks(16, 16)
    args = quick_args(max_steps=1, output_dir=str(tmp_path / "run"))
    Trainer(tiny(seed=21), args, data).train()
    ckpt = tmp_path / "run" / "checkpoint-000001"
    state = ckpt / "trainer_state.pt"
    good = state.read_bytes()
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"step": argparse.Namespace(x=1)}, unsafe)   # weights_only refuses the class
    no_keys = tmp_path / "no_keys.pt"
    torch.save({"step": 1}, no_keys)
    cases = {"truncated": good[: len(good) // 2], "garbage": b"\x00not a torch file" * 10,
             "empty": b"", "unsafe pickle": unsafe.read_bytes(), "missing keys": no_keys.read_bytes()}
    for label, content in cases.items():
        state.write_bytes(content)
        with pytest.raises(CheckpointError) as info:
            Trainer.from_checkpoint(ckpt, quick_args(max_steps=2, output_dir=str(tmp_path / "run")), data)
        message = str(info.value)
        assert str(state) in message and "trainer state" in message, label
        assert "weights_only" not in message, (label, message)
    # a state that does not fit the model (saved with separate MTP copies, resumed with shared ones)
    state.write_bytes(good)
    with pytest.raises(CheckpointError, match="does not fit"):
        Trainer.from_checkpoint(ckpt, quick_args(max_steps=2, mtp_embeddings="shared"), data)


def test_training_data_that_is_not_text_names_the_file(tmp_path: Path) -> None:
    binary = tmp_path / "weights.bin"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    with pytest.raises(ValueError, match=r"weights\.bin is not UTF-8 text \(byte 0x89 at offset 0\)"):
        tokenize_files([binary], ByteTokenizer())
    with pytest.raises(ValueError, match="is a directory"):
        tokenize_files([tmp_path], ByteTokenizer())
