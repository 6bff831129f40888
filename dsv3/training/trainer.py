"""The training loop: AdamW with warmup + cosine decay, MTP and balance losses, bias updates, checkpoints.

One optimizer step:
    for each of grad_accum_steps micro-batches: forward (main + MTP), observe expert loads, backward
    clip the gradient norm; AdamW step; learning-rate schedule step
    aux-loss-free balancing: b <- b + γ·sign(mean_load − load) from the loads of this step

Learning rate: linear warmup from lr/warmup_steps to lr, then cosine decay to min_lr_ratio·lr at max_steps.
Weight decay applies to matrices only (not to norms). Router biases are buffers, outside the optimizer.

A checkpoint directory is a normal model directory (save_pretrained, loadable with from_pretrained) plus
`trainer_state.pt` (optimizer, scheduler, step, data-generator and torch RNG states). It is written under
a temporary name and renamed into place when complete; `output_dir/latest` names the newest one.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import logging
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from dsv3.checkpoint.atomic import atomic_write_bytes, atomic_write_text
from dsv3.training.balance import ExpertLoadBalancer
from dsv3.training.data import TokenBlocks
from dsv3.training.losses import TrainingLosses, training_losses

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"


@dataclass
class TrainingArguments:
    max_steps: int = 1000
    batch_size: int = 8
    grad_accum_steps: int = 1
    learning_rate: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0           # 0 disables clipping
    mtp_weight: float = 0.3              # λ (DeepSeek-V3: 0.3, then 0.1 for the last 4.8T tokens)
    balance_alpha: float = 1e-4          # α of the sequence-wise balance loss; 0 disables it
    bias_update_speed: float = 1e-3      # γ of the aux-loss-free bias update; 0 disables it
    gradient_checkpointing: bool = False
    bf16: bool = False                   # autocast matmuls to bf16 (weights and optimizer stay fp32)
    eval_every: int = 0                  # 0: evaluate only at the end (when there is held-out data)
    eval_batches: int = 8
    save_every: int = 0                  # 0: save only at the end (when output_dir is set)
    output_dir: str | None = None
    log_every: int = 10
    seed: int = 0
    progress: bool | None = None         # a tqdm bar; default: when stderr is a terminal

    def validate(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum_steps", "log_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.learning_rate <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"learning_rate={self.learning_rate}, min_lr_ratio={self.min_lr_ratio}: need lr > 0 "
                             "and 0 <= min_lr_ratio <= 1")
        for name in ("warmup_steps", "eval_every", "save_every", "mtp_weight", "balance_alpha", "bias_update_speed",
                     "max_grad_norm", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 0")


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, args: TrainingArguments) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                             eps=args.adam_eps)


class Trainer:
    def __init__(self, model: nn.Module, args: TrainingArguments, train_data: TokenBlocks,
                 eval_data: TokenBlocks | None = None) -> None:
        args.validate()
        self.model, self.args = model, args
        self.train_data, self.eval_data = train_data, eval_data
        model.gradient_checkpointing_enable(args.gradient_checkpointing)  # type: ignore[operator]
        self.optimizer = build_optimizer(model, args)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, args.warmup_steps, args.max_steps, args.min_lr_ratio))
        has_mtp = getattr(model, "mtp", None) is not None and args.mtp_weight > 0
        self.balancer = ExpertLoadBalancer(model, args.bias_update_speed, include_mtp=has_mtp)
        self.generator = torch.Generator().manual_seed(args.seed)
        self.step = 0
        self.history: list[dict[str, float]] = []   # one entry per optimizer step (and eval results)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _autocast(self) -> Any:
        if not self.args.bf16:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _losses(self, ids: torch.Tensor) -> TrainingLosses:
        with self._autocast():
            return training_losses(self.model, ids.to(self.device), mtp_weight=self.args.mtp_weight,
                                   balance_alpha=self.args.balance_alpha if self.model.training else 0.0)

    # ------------------------------------------------------------------------------------------- training
    def train_step(self) -> dict[str, float]:
        """One optimizer step over grad_accum_steps random batches; returns its metrics."""
        args, model = self.args, self.model
        model.train()
        start = time.perf_counter()
        sums: dict[str, float] = {}
        tokens = 0
        for _ in range(args.grad_accum_steps):
            batch = self.train_data.sample(args.batch_size, self.generator)
            losses = self._losses(batch)
            self.balancer.observe(losses.router_outputs)   # before backward: recomputation would re-report
            (losses.loss / args.grad_accum_steps).backward()
            for name, value in _scalars(losses).items():
                sums[name] = sums.get(name, 0.0) + value / args.grad_accum_steps
            tokens += losses.tokens
        if args.max_grad_norm > 0:
            sums["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm))
        sums["lr"] = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        sums.update(self.balancer.step())
        self.step += 1
        sums["step"] = self.step
        sums["tokens_per_s"] = tokens / max(time.perf_counter() - start, 1e-9)
        self.history.append(sums)
        return sums

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean losses over the first eval_batches held-out batches (no bias updates)."""
        if self.eval_data is None:
            return {}
        was_training = self.model.training
        self.model.eval()
        sums: dict[str, float] = {}
        count = 0
        try:
            for batch in self.eval_data.batches(self.args.batch_size, self.args.eval_batches):
                for name, value in _scalars(self._losses(batch)).items():
                    sums[name] = sums.get(name, 0.0) + value
                count += 1
        finally:
            self.model.train(was_training)
        out = {f"eval_{name}": value / count for name, value in sums.items()}
        out["eval_ppl"] = math.exp(min(out["eval_lm_loss"], 50.0))
        return out

    def train(self) -> list[dict[str, float]]:
        """Run until max_steps (from the current step, e.g. after `load_state`); returns the history."""
        args = self.args
        progress = sys.stderr.isatty() if args.progress is None else args.progress
        bar = tqdm(total=args.max_steps, initial=self.step, desc="train", unit="step", disable=not progress)
        try:
            while self.step < args.max_steps:
                metrics = self.train_step()
                last = self.step == args.max_steps
                if progress:
                    bar.update(1)
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}",
                                    imb=f"{metrics.get('imbalance', 1.0):.2f}")
                if self.step % args.log_every == 0 or last:
                    logger.info(format_metrics(metrics, args.max_steps))
                if self.eval_data is not None and ((args.eval_every and self.step % args.eval_every == 0) or last):
                    result = self.evaluate()
                    metrics.update(result)
                    logger.info("step %d eval: %s", self.step,
                                " ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in result.items()))
                if args.output_dir and ((args.save_every and self.step % args.save_every == 0) or last):
                    path = self.save_checkpoint()
                    logger.info("saved %s", path)
        finally:
            bar.close()
        return self.history

    # ------------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(),
                "args": dataclasses.asdict(self.args)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.step = int(state["step"])

    def save_checkpoint(self, directory: str | os.PathLike | None = None) -> Path:
        """Write model + trainer state to `directory` (default output_dir/checkpoint-STEP), atomically."""
        if directory is None:
            if not self.args.output_dir:
                raise ValueError("no checkpoint directory: pass one or set TrainingArguments.output_dir")
            directory = Path(self.args.output_dir) / f"checkpoint-{self.step:06d}"
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = directory.with_name(f".{directory.name}.tmp")
        old = directory.with_name(f".{directory.name}.old")
        for stale in (tmp, old):
            if stale.exists():
                shutil.rmtree(stale)
        self.model.save_pretrained(tmp)  # type: ignore[operator]
        buffer = io.BytesIO()
        torch.save(self.state_dict(), buffer)
        atomic_write_bytes(tmp / STATE_FILE, buffer.getvalue())
        if directory.exists():
            os.replace(directory, old)
        os.replace(tmp, directory)
        if old.exists():
            shutil.rmtree(old)
        if self.args.output_dir and directory.parent == Path(self.args.output_dir):
            atomic_write_text(directory.parent / "latest", directory.name + "\n")
        return directory

    def load_state(self, directory: str | os.PathLike) -> None:
        """Restore optimizer, scheduler, step and RNG states saved next to the model in `directory`."""
        path = Path(directory) / STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no trainer state; resume from a directory written by "
                                    "Trainer.save_checkpoint (output_dir/checkpoint-NNNNNN)")
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    @classmethod
    def from_checkpoint(cls, directory: str | os.PathLike, args: TrainingArguments, train_data: TokenBlocks,
                        eval_data: TokenBlocks | None = None, device: Any = "cpu") -> Trainer:
        """Resume: the model from `directory` (in fp32), then the trainer state."""
        from dsv3.model.transformer import DeepseekV3ForCausalLM

        directory = resolve_checkpoint(directory)
        model = DeepseekV3ForCausalLM.from_pretrained(directory, torch_dtype=torch.float32, device_map=device)
        trainer = cls(model, args, train_data, eval_data)
        trainer.load_state(directory)
        return trainer


def resolve_checkpoint(directory: str | os.PathLike) -> Path:
    """A checkpoint directory, or an output_dir whose `latest` file names one."""
    directory = Path(directory)
    latest = directory / "latest"
    if not (directory / STATE_FILE).is_file() and latest.is_file():
        return directory / latest.read_text().strip()
    return directory


def format_metrics(m: dict[str, float], max_steps: int) -> str:
    parts = [f"step {int(m['step'])}/{max_steps}", f"loss {m['loss']:.4f}", f"lm {m['lm_loss']:.4f}"]
    if "mtp_loss" in m:
        parts.append(f"mtp {m['mtp_loss']:.4f}")
    if "balance_loss" in m:
        parts.append(f"bal {m['balance_loss']:.2e}")
    parts += [f"lr {m['lr']:.2e}", f"tok/s {m['tokens_per_s']:.0f}"]
    if "imbalance" in m:
        parts.append(f"load max/mean {m['imbalance']:.2f} (worst layer {m['imbalance_max']:.2f})")
    return " | ".join(parts)


def _scalars(losses: TrainingLosses) -> dict[str, float]:
    out = {"loss": float(losses.loss.detach()), "lm_loss": float(losses.lm_loss.detach())}
    if losses.mtp_loss is not None:
        out["mtp_loss"] = float(losses.mtp_loss.detach())
    if losses.balance_loss is not None:
        out["balance_loss"] = float(losses.balance_loss.detach())
    return out


def train(model: nn.Module, train_data: TokenBlocks, eval_data: TokenBlocks | None = None,
          args: TrainingArguments | None = None, **overrides: Any) -> list[dict[str, float]]:
    """Train `model` in place; keyword overrides set TrainingArguments fields. Returns the step history."""
    args = dataclasses.replace(args or TrainingArguments(), **overrides)
    return Trainer(model, args, train_data, eval_data).train()


# ----------------------------------------------------------------------------------------------- CLI
def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `dsv3 train`."""
    d = TrainingArguments()
    p.add_argument("data", nargs="+", type=Path, help="UTF-8 text files to train on")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", type=Path, default=None, help="checkpoint directory to start from")
    src.add_argument("--preset", choices=["tiny"], default=None,
                     help="a random-weight tiny model (the default without --model/--config/--resume)")
    src.add_argument("--config", type=Path, default=None, help="config.json of a model to train from scratch")
    src.add_argument("--resume", type=Path, default=None,
                     help="checkpoint directory (or output dir with a `latest` file) to resume")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory, or 'bytes' (UTF-8 bytes); default: the model's, else DeepSeek's")
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training block")
    p.add_argument("--eval-fraction", type=float, default=0.05, help="share of blocks held out for evaluation")
    p.add_argument("--no-mtp", action="store_true", help="train without the MTP modules")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    flags = {"max_steps": "--steps", "learning_rate": "--lr", "warmup_steps": "--warmup",
             "max_grad_norm": "--grad-clip", "grad_accum_steps": "--grad-accum"}
    for f in dataclasses.fields(TrainingArguments):
        if f.name in ("output_dir", "progress"):
            continue
        flag = flags.get(f.name, "--" + f.name.replace("_", "-"))
        default = getattr(d, f.name)
        if isinstance(default, bool):
            p.add_argument(flag, dest=f.name, action="store_true")
        else:
            p.add_argument(flag, dest=f.name, type=type(default), default=default, help=f"default {default}")


def run_train(args: argparse.Namespace) -> int:
    """`dsv3 train`: build or load the model, tokenize the data, train, save. Returns an exit code."""
    from dsv3.config import DeepseekV3Config
    from dsv3.model.transformer import DeepseekV3ForCausalLM
    from dsv3.training.data import ByteTokenizer, load_text_dataset

    if args.threads:
        torch.set_num_threads(args.threads)
    targs = TrainingArguments(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingArguments)
                                 if hasattr(args, f.name) and f.name != "output_dir"}, output_dir=str(args.output_dir))
    model_dir = resolve_checkpoint(args.resume) if args.resume else args.model
    if args.tokenizer == "bytes":
        tokenizer: Any = ByteTokenizer()
    else:
        from dsv3.tokenizer import AutoTokenizer

        tok_dir = args.tokenizer or (model_dir if model_dir and (Path(model_dir) / "tokenizer.json").is_file()
                                     else None)
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    train_data, eval_data = load_text_dataset(args.data, tokenizer, args.seq_len, args.eval_fraction, targs.seed)
    logger.info("data: %d training blocks, %d held out, %d tokens each", len(train_data),
                len(eval_data) if eval_data else 0, args.seq_len)
    mtp = False if args.no_mtp else None
    if args.resume:
        trainer = Trainer.from_checkpoint(args.resume, targs, train_data, eval_data, args.device)
        logger.info("resumed %s at step %d", model_dir, trainer.step)
    else:
        torch.manual_seed(targs.seed)
        if args.model is not None:
            model = DeepseekV3ForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32,
                                                          device_map=args.device,
                                                          load_mtp=False if args.no_mtp else None)
        else:
            if args.config is not None:
                config = DeepseekV3Config.from_pretrained(args.config)
            else:
                config = DeepseekV3Config.tiny(vocab_size=max(len(tokenizer), 256))
            model = DeepseekV3ForCausalLM(config, mtp=mtp).to(args.device)
        trainer = Trainer(model, targs, train_data, eval_data)
    vocab = trainer.model.config.vocab_size  # type: ignore[union-attr]
    top = int(train_data.blocks.max())
    if top >= vocab:
        raise ValueError(f"token id {top} >= the model's vocab_size={vocab}: the tokenizer does not match the model")
    trainer.train()
    print(f"checkpoint: {resolve_checkpoint(args.output_dir)}")
    return 0
