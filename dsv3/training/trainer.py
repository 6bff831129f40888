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
Before step 1 the output directory must be a writable directory; a new run (step 0) refuses one that
holds another run (`latest`, `checkpoint-*`) unless overwrite_output_dir says to replace it.

MTP embedding and output head (mtp_embeddings): DeepSeek-V3 trains its MTP modules with the main model's
embedding and output head. "shared" ties them (one Parameter each, trained by both losses); "separate"
trains the module's own copies; "auto" (default) ties them when the copies already equal the main ones
(a new model built by `dsv3 train`, a checkpoint of a tied run, the published V3 layout) and otherwise
keeps them separate with a warning, so a checkpoint whose copies differ keeps its behaviour.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import logging
import math
import os
import pickle
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from dsv3.checkpoint.atomic import atomic_write_bytes, atomic_write_text
from dsv3.checkpoint.errors import CheckpointError
from dsv3.training.balance import ExpertLoadBalancer
from dsv3.training.data import TokenBlocks
from dsv3.training.losses import TrainingLosses, training_losses

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
MTP_EMBEDDINGS = ("auto", "shared", "separate")
STATE_KEYS = ("step", "optimizer", "scheduler", "generator", "torch_rng")


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
    mtp_embeddings: str = "auto"         # auto, shared or separate: see the module docstring
    overwrite_output_dir: bool = False   # a new run may replace the run that output_dir holds

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
        if self.mtp_embeddings not in MTP_EMBEDDINGS:
            raise ValueError(f"mtp_embeddings={self.mtp_embeddings!r}: expected one of {MTP_EMBEDDINGS}")


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
        self.mtp_shared = apply_mtp_embeddings(model, args.mtp_embeddings)   # before the optimizer sees them
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
        if self.step >= args.max_steps:
            raise ValueError(f"the run is at step {self.step} and max_steps={args.max_steps}: nothing to train; "
                             f"pass a larger max_steps (dsv3 train --steps N with N > {self.step})")
        if args.output_dir:
            check_output_dir(args.output_dir, overwrite=args.overwrite_output_dir, continuing=self.step > 0)
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

    def _load_checked(self, path: Path) -> None:
        """load_state_dict from the file `path`, every way it can be unreadable a CheckpointError naming it."""
        fix = ("resume from another checkpoint of the run (output_dir/checkpoint-NNNNNN) or start a new run "
               "with --overwrite")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError, AttributeError,
                ImportError, IndexError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: the trainer state is unreadable ({_reason(e)}): the file is truncated, "
                                  f"corrupt or not written by dsv3's Trainer; {fix}") from None
        if not isinstance(state, dict) or any(k not in state for k in STATE_KEYS):
            found = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise CheckpointError(f"{path}: the trainer state has {found}; expected the keys {list(STATE_KEYS)} "
                                  f"(written by dsv3's Trainer); {fix}")
        try:
            self.load_state_dict(state)
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"{path}: the trainer state does not fit this model and trainer ({_reason(e)}); "
                                  "resume with the settings of the run that wrote it (e.g. the same --no-mtp "
                                  f"and --mtp-embeddings), or {fix}") from None

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
        self._load_checked(path)

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


def apply_mtp_embeddings(model: nn.Module, choice: str = "auto") -> bool:
    """Tie (or untie) the MTP modules' embedding and output head to the main model's, as `choice` says
    (auto, shared, separate; see the module docstring). Returns whether they are shared now."""
    from dsv3.model.mtp import main_weight_difference, mtp_weight_pairs, share_main_weights, shares_main_weights

    if choice not in MTP_EMBEDDINGS:
        raise ValueError(f"mtp_embeddings={choice!r}: expected one of {MTP_EMBEDDINGS}")
    if not mtp_weight_pairs(model):
        return False
    if choice == "separate":
        share_main_weights(model, shared=False)
        return False
    if shares_main_weights(model):
        return True
    diff = main_weight_difference(model)
    if diff == 0.0:
        share_main_weights(model)
        logger.info("MTP modules share the main embedding and output head (their copies were equal)")
        return True
    if choice == "shared":
        logger.warning("mtp_embeddings='shared': the MTP modules' own embedding/output head (max |difference| "
                       "from the main ones %.3g) are replaced by the main model's; their predictions change", diff)
        share_main_weights(model)
        return True
    logger.warning("the MTP modules' embedding/output head differ from the main model's (max |difference| %.3g): "
                   "training them as separate copies to keep the model's behaviour; pass mtp_embeddings='shared' "
                   "(dsv3 train --mtp-embeddings shared) to tie them as DeepSeek-V3 does", diff)
    return False


def run_files(directory: Path) -> list[str]:
    """The names in `directory` that belong to a training run (checkpoint-*, latest), sorted."""
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir()
                  if p.name == "latest" or (p.name.startswith("checkpoint-") and p.is_dir()))


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool = False, continuing: bool = False) -> None:
    """Make sure checkpoints can be written to `output_dir` before any training step: it is (or can be made)
    a writable directory, and unless `continuing` its run or `overwrite`, it holds no other run.
    With overwrite (and not continuing) the other run's checkpoints are removed."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"output directory {path} is a file, not a directory; pass a directory (--output-dir)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ValueError(f"output directory {path} is not writable ({e.strerror or e}); pass a directory you can "
                         "write to (--output-dir)") from None
    other = run_files(path)
    if not other or continuing:
        return
    if not overwrite:
        shown = ", ".join(other[:3]) + (", ..." if len(other) > 3 else "")
        raise ValueError(f"output directory {path} holds another run ({shown}); pass --resume {path} to continue "
                         "it, --overwrite to replace it, or another --output-dir")
    logger.warning("overwrite: removing the previous run in %s (%s)", path, ", ".join(other))
    for name in other:
        target = path / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()


def _reason(e: BaseException) -> str:
    """The exception's type and first line, without torch's advice to load with weights_only=False."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if not text or "weights_only" in str(e):
        return type(e).__name__
    return f"{type(e).__name__}: {text}"


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
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch")
    flags = {"max_steps": "--steps", "learning_rate": "--lr", "warmup_steps": "--warmup",
             "max_grad_norm": "--grad-clip", "grad_accum_steps": "--grad-accum", "overwrite_output_dir": "--overwrite"}
    helps = {"overwrite_output_dir": "replace the run that --output-dir holds (its checkpoints are removed)",
             "mtp_embeddings": "MTP embedding/output head: shared with the main model (DeepSeek-V3), separate "
                               "copies, or auto (shared when equal; a new model starts shared)"}
    for f in dataclasses.fields(TrainingArguments):
        if f.name in ("output_dir", "progress"):
            continue
        flag = flags.get(f.name, "--" + f.name.replace("_", "-"))
        default = getattr(d, f.name)
        if isinstance(default, bool):
            p.add_argument(flag, dest=f.name, action="store_true", help=helps.get(f.name))
        elif f.name == "mtp_embeddings":
            p.add_argument(flag, dest=f.name, choices=MTP_EMBEDDINGS, default=default, help=helps[f.name])
        else:
            p.add_argument(flag, dest=f.name, type=type(default), default=default, help=f"default {default}")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (e.g. --threads)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _run_dir(resume: str | os.PathLike) -> Path:
    """The output directory of the run that `resume` (a checkpoint or an output dir) belongs to."""
    resume = Path(resume)
    return resume if (resume / "latest").is_file() or not (resume / STATE_FILE).is_file() else resume.parent


def run_train(args: argparse.Namespace) -> int:
    """`dsv3 train`: build or load the model, tokenize the data, train, save. Returns an exit code."""
    from dsv3.config import DeepseekV3Config
    from dsv3.model.mtp import share_main_weights
    from dsv3.model.transformer import DeepseekV3ForCausalLM
    from dsv3.training.data import ByteTokenizer, load_text_dataset

    if args.threads:
        torch.set_num_threads(args.threads)
    # Fail on the output directory before reading data or models: a new run must not land on another run.
    continuing = args.resume is not None and _run_dir(args.resume).resolve() == Path(args.output_dir).resolve()
    check_output_dir(args.output_dir, overwrite=args.overwrite_output_dir, continuing=continuing)
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
            share_main_weights(model)   # a new model: MTP starts on the main embedding and head (DeepSeek-V3)
        trainer = Trainer(model, targs, train_data, eval_data)
    vocab = trainer.model.config.vocab_size  # type: ignore[union-attr]
    top = int(train_data.blocks.max())
    if top >= vocab:
        raise ValueError(f"token id {top} >= the model's vocab_size={vocab}: the tokenizer does not match the model")
    trainer.train()
    print(f"checkpoint: {resolve_checkpoint(args.output_dir)}")
    return 0
