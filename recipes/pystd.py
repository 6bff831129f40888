"""The recipe of the model that ships with dsv3: a small DeepSeek-V3 trained on Python's standard library.

    python -m recipes.pystd --output-dir dsv3/assets/dsv3-pystd --threads 2

runs every stage below and writes a complete checkpoint directory (config.json, model.safetensors in bf16,
generation_config.json, tokenizer.json, tokenizer_config.json, TRAINING.md) that dsv3 and transformers load.
Intermediate checkpoints go to --work-dir (default: a fresh temporary directory), never to the output.

Corpus: the `.py` sources of the standard library of the Python running this code (every fresh
machine has it; PSF-licensed, redistributable), excluding `site-packages` and the test suites.
Files are sorted by path and split into train / held-out *by file* (every 20th file is held out), so
the held-out loss measures generalisation to unseen modules.

Tokenizer: byte-level BPE trained with the `tokenizers` library on the training files only, using
DeepSeek-V3's pre-tokenizer (digits in groups of 1-3, CJK runs, DeepSeek's word/punctuation split),
plus DeepSeek's special tokens (`<｜begin▁of▁sentence｜>`, `<｜end▁of▁sentence｜>`, `<｜User｜>`,
`<｜Assistant｜>`, tool-call and `<think>` markers) and DeepSeek's own chat template, so
`apply_chat_template` works unchanged.

Data: each file's tokens followed by EOS, concatenated in path order, cut into non-overlapping blocks of
--seq-len tokens; the training blocks come from the training files, the held-out blocks from the held-out
files. Batches are drawn with a seeded generator (see Trainer).

Model: every DeepSeek-V3 feature at a small size (`model_config`): MLA with q_lora, YaRN rope scaling
(factor 4 over 1024 positions), one dense first layer then DeepSeekMoE layers (group-limited top-k with
the aux-loss-free bias, a shared expert), and one MTP module. Objective: next token + λ·MTP (λ=0.3) +
α·sequence balance (α=1e-4); bias update speed γ=1e-3; AdamW with warmup and cosine decay.

Evaluation, in nats per token on the same held-out tokens (every token of the held-out blocks but the
first of each, i.e. every token the model predicts):
    held-out loss   the model's cross entropy (of the shipped bf16 weights, computed in fp32)
    unigram         the cross entropy under the training set's token frequencies (add-one smoothed)
and, on 16 held-out prompts, greedy speculative decoding with the MTP drafter against plain greedy:
the drafts' acceptance rate and the ratio of main-model forward passes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import re
import shlex
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dsv3.checkpoint.atomic import atomic_write_text

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = [
    "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>",
    "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
    "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>",
    "<｜tool▁sep｜>",
]
BOS, EOS = SPECIAL_TOKENS[0], SPECIAL_TOKENS[1]
BOS_ID, EOS_ID = 0, 1           # the trainer adds the special tokens first, in this order
HELD_OUT_EVERY = 20
STDLIB_NAME = "lib/python{}.{}".format(*sys.version_info[:2])   # how the report names the default corpus
DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "dsv3" / "assets" / "dsv3-pystd"
# What `dsv3 generate` (and transformers' generate) use unless told otherwise.
GENERATION_DEFAULTS: dict[str, Any] = {"do_sample": True, "temperature": 0.7, "top_p": 0.95, "top_k": 0,
                                       "max_new_tokens": 64}
SAMPLE_PROMPTS = ["def ", "import ", "class ", "    def __init__(self", "    def __repr__(self):\n", '"""']


# ----------------------------------------------------------------------------------------------- corpus
def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """The standard library's .py files, sorted, without site-packages and test suites."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
    files = [p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts)]
    return sorted(files)


def split_files(files: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    held = [f for i, f in enumerate(files) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    train = [f for i, f in enumerate(files) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    return train, held


def read_texts(files: Sequence[Path]) -> list[str]:
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


# ----------------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: Sequence[str], vocab_size: int, out_dir: str | Path,
                    template_source: str | Path | None = None) -> None:
    """Train a byte-level BPE with DeepSeek's pre-tokenizer and special tokens; write tokenizer.json and
    tokenizer_config.json (with DeepSeek-V3's chat template) into out_dir."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from dsv3.tokenizer import default_tokenizer_dir

    tok = Tokenizer(models.BPE())
    word_split = (r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+|"
                  r" ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated"),
        pre_tokenizers.Split(Regex("[一-龥\u3040-ゟ゠-ヿ]+"), behavior="isolated"),
        pre_tokenizers.Split(Regex(word_split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    assert tok.token_to_id(BOS) == BOS_ID and tok.token_to_id(EOS) == EOS_ID
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "tokenizer.json", tok.to_str())
    source = Path(template_source or default_tokenizer_dir()) / "tokenizer_config.json"
    template = json.loads(source.read_text())["chat_template"]
    config = {
        "add_bos_token": False, "add_eos_token": False, "bos_token": BOS, "eos_token": EOS, "pad_token": EOS,
        "clean_up_tokenization_spaces": False, "model_max_length": 4096, "unk_token": None,
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template,
    }
    atomic_write_text(out / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def unigram_cross_entropy(train_ids: Sequence[int] | torch.Tensor, held_ids: Sequence[int] | torch.Tensor,
                          vocab_size: int) -> float:
    """Nats per token of held_ids under add-one-smoothed unigram frequencies of train_ids."""
    train_t = torch.as_tensor(train_ids, dtype=torch.long).reshape(-1)
    held_t = torch.as_tensor(held_ids, dtype=torch.long).reshape(-1)
    counts = torch.bincount(train_t, minlength=vocab_size).double() + 1
    logp = (counts / counts.sum()).log()
    return float(-logp[held_t].mean()) if held_t.numel() else 0.0


# ----------------------------------------------------------------------------------------------- data
def tokenize_texts(tokenizer_file: str | Path, texts: Sequence[str]) -> torch.Tensor:
    """Each text's tokens followed by EOS, concatenated: a 1-D int64 stream."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    stream: list[int] = []
    for enc in tok.encode_batch(list(texts), add_special_tokens=False):
        stream.extend(enc.ids)
        stream.append(EOS_ID)
    return torch.tensor(stream, dtype=torch.long)


def cut_blocks(stream: torch.Tensor, block_len: int) -> torch.Tensor:
    """Non-overlapping [N, block_len] blocks; the tail that does not fill one is dropped."""
    n = stream.numel() // block_len
    if n == 0:
        raise ValueError(f"{stream.numel()} tokens are fewer than one block of {block_len}; lower --seq-len")
    return stream[: n * block_len].view(n, block_len)


@dataclass
class Corpus:
    train_files: list[Path]
    held_files: list[Path]
    train_stream: torch.Tensor
    held_stream: torch.Tensor
    train_bytes: int
    held_bytes: int


def build_corpus(tokenizer_file: str | Path, train_files: list[Path], held_files: list[Path]) -> Corpus:
    train_texts, held_texts = read_texts(train_files), read_texts(held_files)
    return Corpus(train_files, held_files, tokenize_texts(tokenizer_file, train_texts),
                  tokenize_texts(tokenizer_file, held_texts), sum(len(t.encode()) for t in train_texts),
                  sum(len(t.encode()) for t in held_texts))


# ----------------------------------------------------------------------------------------------- model
def model_config(vocab_size: int, hidden_size: int = 256, num_hidden_layers: int = 4) -> Any:
    """The shipped architecture: DeepSeek-V3's shape scaled down, every feature on."""
    from dsv3.config import DeepseekV3Config

    return DeepseekV3Config(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
        intermediate_size=3 * hidden_size, moe_intermediate_size=hidden_size // 2,
        num_attention_heads=4, num_key_value_heads=4,
        q_lora_rank=hidden_size // 2, kv_lora_rank=hidden_size // 4,
        qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=32,
        n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1,
        routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=1, num_nextn_predict_layers=1,
        max_position_embeddings=4096, rope_theta=10000.0,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        tie_word_embeddings=False, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=None,
    )


@torch.no_grad()
def token_cross_entropy(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token cross entropy (nats) over every predicted token of `blocks` [N, T] (T-1 per block)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, blocks.shape[0], batch_size):
            ids = blocks[start: start + batch_size]
            logits = model(ids, use_cache=False).logits[:, :-1].float()
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                           reduction="sum"))
            count += ids[:, 1:].numel()
    finally:
        model.train(was_training)
    return total / count


# ----------------------------------------------------------------------------------------------- speculative
_DEF_LINE = re.compile(r"^[ \t]*def ", re.MULTILINE)


def held_out_prompts(texts: Sequence[str], n: int = 16, context_chars: int = 240) -> list[str]:
    """Up to n prompts, one per text: the ~context_chars before a `def` line in the second half of the
    text, ending with "def " (whole lines only, so every prompt starts at a line)."""
    prompts = []
    for text in texts:
        match = _DEF_LINE.search(text, len(text) // 2)
        if match is None:
            continue
        start = text.rfind("\n", 0, max(0, match.start() - context_chars)) + 1
        prompts.append(text[start: match.end()])
        if len(prompts) == n:
            break
    return prompts


@dataclass
class SpeculativeReport:
    batch_size: int
    prompts: int
    new_tokens: int                  # per prompt
    plain_forwards: int              # main-model forwards of plain greedy, summed over batches
    mtp_forwards: int                # ... of greedy speculative decoding with the MTP drafter
    drafts: int
    accepted: int
    identical: bool                  # speculative output == plain greedy output, every batch
    plain_seconds: float
    mtp_seconds: float

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafts if self.drafts else 0.0

    @property
    def forward_speedup(self) -> float:
        return self.plain_forwards / max(1, self.mtp_forwards)

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "acceptance_rate": self.acceptance_rate, "forward_speedup": self.forward_speedup}


@torch.no_grad()
def measure_speculative(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], batch_size: int,
                        max_new_tokens: int = 64) -> SpeculativeReport:
    """Greedy decoding of every prompt (left-padded batches), plain and with use_mtp=True; no EOS stop, so
    every row produces exactly max_new_tokens and the forward counts compare like for like."""
    from dsv3.generation.generate import generate

    plain_fw = mtp_fw = drafts = accepted = 0
    identical = True
    plain_s = mtp_s = 0.0
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(list(prompts[start: start + batch_size]), padding=True, padding_side="left",
                        return_tensors="pt")
        kw = dict(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=[], return_dict_in_generate=True)
        t0 = time.perf_counter()
        plain = generate(model, enc["input_ids"], enc["attention_mask"], **kw)
        t1 = time.perf_counter()
        spec = generate(model, enc["input_ids"], enc["attention_mask"], use_mtp=True, **kw)
        t2 = time.perf_counter()
        plain_s, mtp_s = plain_s + t1 - t0, mtp_s + t2 - t1
        plain_fw += plain.new_tokens        # the prefill yields the first token, each decode step one more
        mtp_fw += spec.speculative.main_forwards
        drafts += spec.speculative.drafts
        accepted += spec.speculative.accepted
        identical &= torch.equal(plain.sequences, spec.sequences)
    return SpeculativeReport(batch_size, len(prompts), max_new_tokens, plain_fw, mtp_fw, drafts, accepted,
                             identical, plain_s, mtp_s)


# ----------------------------------------------------------------------------------------------- samples
@torch.no_grad()
def sample_completions(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], seed: int = 0,
                       **overrides: Any) -> list[str]:
    """One completion per prompt with the model's generation_config (overridable), seeded."""
    from dsv3.generation.generate import generate

    out = []
    for i, prompt in enumerate(prompts):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        seq = generate(model, ids, generator=torch.Generator().manual_seed(seed + i), **overrides)
        out.append(tokenizer.decode(seq[0, ids.shape[1]:].tolist(), skip_special_tokens=True))
    return out


# ----------------------------------------------------------------------------------------------- the recipe
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT,
                   help=f"the finished model directory (replaced); default {DEFAULT_OUTPUT}")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="scratch space for the tokenizer and training checkpoints; default: a new temp dir")
    p.add_argument("--stdlib", type=Path, default=None, help="the corpus root; default: this Python's stdlib")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=4, help="decoder layers (the first is dense)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--mtp-weight", type=float, default=0.3)
    p.add_argument("--balance-alpha", type=float, default=1e-4)
    p.add_argument("--bias-update-speed", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--save-every", type=int, default=1000, help="training checkpoints (in --work-dir)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--resume", type=Path, default=None,
                   help="a training checkpoint (or its output dir with `latest`) from an earlier run; the "
                        "tokenizer must be the one in --work-dir")


def _prepare_output(directory: Path) -> None:
    """Refuse to replace a non-empty directory that is not a model directory."""
    if directory.exists() and any(directory.iterdir()) and not (directory / "config.json").is_file():
        raise ValueError(f"--output-dir {directory} is not empty and holds no config.json; refusing to replace "
                         "it, pass an empty or new directory")


def run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The whole recipe; returns the summary that TRAINING.md reports."""
    from dsv3.generation.generate import GenerationConfig
    from dsv3.model.transformer import DeepseekV3ForCausalLM
    from dsv3.tokenizer import AutoTokenizer
    from dsv3.training.data import TokenBlocks
    from dsv3.training.trainer import Trainer, TrainingArguments

    _prepare_output(args.output_dir)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="dsv3-pystd-"))
    final = work / "final"
    if final.exists():
        shutil.rmtree(final)
    final.mkdir(parents=True)
    logger.info("work dir %s", work)
    t_start = time.perf_counter()

    files = stdlib_files(args.stdlib)
    if not files:
        raise FileNotFoundError(f"no .py files under {args.stdlib or sysconfig.get_paths()['stdlib']}")
    train_files, held_files = split_files(files)
    t0 = time.perf_counter()
    train_tokenizer(read_texts(train_files), args.vocab_size, final)
    tokenizer_s = time.perf_counter() - t0
    corpus = build_corpus(final / "tokenizer.json", train_files, held_files)
    tokenizer = AutoTokenizer.from_pretrained(final)
    vocab = len(tokenizer)
    logger.info("corpus: %d train files (%d tokens), %d held-out files (%d tokens); tokenizer %d tokens in %.0f s",
                len(train_files), corpus.train_stream.numel(), len(held_files), corpus.held_stream.numel(), vocab,
                tokenizer_s)
    train_blocks = TokenBlocks(cut_blocks(corpus.train_stream, args.seq_len))
    held_blocks = cut_blocks(corpus.held_stream, args.seq_len)

    targs = TrainingArguments(
        max_steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, warmup_steps=args.warmup,
        min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay, mtp_weight=args.mtp_weight,
        balance_alpha=args.balance_alpha, bias_update_speed=args.bias_update_speed, eval_every=args.eval_every,
        eval_batches=8, save_every=args.save_every, output_dir=str(work / "checkpoints"), log_every=50,
        seed=args.seed, progress=False,
        mtp_embeddings="separate")   # the recipe of the shipped model, whose MTP module has its own copies
    if args.resume:
        trainer = Trainer.from_checkpoint(args.resume, targs, train_blocks, TokenBlocks(held_blocks))
        logger.info("resumed at step %d", trainer.step)
    else:
        torch.manual_seed(args.seed)
        model = DeepseekV3ForCausalLM(model_config(vocab, args.hidden_size, args.layers))
        trainer = Trainer(model, targs, train_blocks, TokenBlocks(held_blocks))
    model = trainer.model
    params = sum(p.numel() for p in model.parameters())
    logger.info("model: %.2fM parameters; %d steps of %d x %d tokens", params / 1e6, args.steps, args.batch_size,
                args.seq_len)
    t0 = time.perf_counter()
    first_step = trainer.step
    history = trainer.train()
    train_s = time.perf_counter() - t0
    trained_tokens = (trainer.step - first_step) * args.batch_size * args.seq_len

    # The shipped weights: bf16 (routers stay fp32), evaluated in fp32 as users load them for evaluation.
    model.eval()
    model.to(torch.bfloat16)
    model.generation_config = GenerationConfig.from_dict(
        {**GENERATION_DEFAULTS, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": EOS_ID})
    model.save_pretrained(final)
    shipped = DeepseekV3ForCausalLM.from_pretrained(final, torch_dtype=torch.float32).eval()
    t0 = time.perf_counter()
    held_loss = token_cross_entropy(shipped, held_blocks)
    g = torch.Generator().manual_seed(args.seed)
    train_sample = train_blocks.blocks[torch.randperm(len(train_blocks), generator=g)[: held_blocks.shape[0]]]
    train_loss = token_cross_entropy(shipped, train_sample)
    unigram = unigram_cross_entropy(corpus.train_stream, held_blocks[:, 1:], vocab)
    eval_s = time.perf_counter() - t0
    logger.info("held-out %.4f nats/token (unigram %.4f), train %.4f", held_loss, unigram, train_loss)

    prompts = held_out_prompts(read_texts(held_files))
    spec = {b: measure_speculative(shipped, tokenizer, prompts, b) for b in (1, 4)}
    for b, r in spec.items():
        logger.info("speculative batch %d: acceptance %.3f, main forwards %d -> %d (%.2fx), identical %s", b,
                    r.acceptance_rate, r.plain_forwards, r.mtp_forwards, r.forward_speedup, r.identical)
    samples = sample_completions(shipped, tokenizer, SAMPLE_PROMPTS, seed=args.seed)
    greedy = sample_completions(shipped, tokenizer, SAMPLE_PROMPTS[:3], do_sample=False, max_new_tokens=48)

    evals = [(int(h["step"]), h["eval_lm_loss"]) for h in history if "eval_lm_loss" in h]
    window = history[-50:]
    summary: dict[str, Any] = {
        "command": "python -m recipes.pystd "
                   + shlex.join(_public_argv(argv if argv is not None else sys.argv[1:])),
        "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "corpus": {"root": str(args.stdlib) if args.stdlib else STDLIB_NAME, "train_files": len(train_files),
                   "held_files": len(held_files), "train_bytes": corpus.train_bytes, "held_bytes": corpus.held_bytes,
                   "train_tokens": corpus.train_stream.numel(), "held_tokens": corpus.held_stream.numel(),
                   "held_predicted_tokens": held_blocks[:, 1:].numel()},
        "vocab_size": vocab, "parameters": params, "config": model.config.to_dict(),
        "training": {"steps": trainer.step, "batch_size": args.batch_size, "seq_len": args.seq_len,
                     "tokens": trained_tokens, "epochs": trained_tokens / corpus.train_stream.numel(),
                     "seconds": train_s, "tokens_per_s": trained_tokens / max(train_s, 1e-9),
                     "tokenizer_seconds": tokenizer_s, "eval_seconds": eval_s,
                     "last_50_steps": {k: sum(h[k] for h in window) / len(window)
                                       for k in ("loss", "lm_loss", "mtp_loss", "imbalance") if k in window[0]}},
        "eval_curve": evals,
        "loss": {"held_out": held_loss, "train": train_loss, "unigram": unigram},
        "speculative": {b: r.to_dict() for b, r in spec.items()},
        "samples": list(zip(SAMPLE_PROMPTS, samples)), "greedy": list(zip(SAMPLE_PROMPTS[:3], greedy)),
        "generation_config": GENERATION_DEFAULTS,
    }
    summary["total_seconds"] = time.perf_counter() - t_start
    atomic_write_text(final / "TRAINING.md", training_report(summary, final))
    atomic_write_text(work / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")

    if args.output_dir.exists():
        shutil.rmtree(args.output_dir)
    shutil.copytree(final, args.output_dir)
    logger.info("wrote %s (%.1f MB)", args.output_dir, _dir_bytes(args.output_dir) / 1e6)
    return summary


def _public_argv(argv: Sequence[str]) -> list[str]:
    """The command line without --work-dir (a scratch location on the training machine)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--work-dir":
            skip = True
        elif not a.startswith("--work-dir="):
            out.append(a)
    return out


def _dir_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.iterdir() if f.is_file())


def _fence(text: str) -> str:
    return "```python\n" + text.replace("```", "`\u200b``") + "\n```"


def training_report(s: dict[str, Any], directory: Path) -> str:
    c, tr, loss, corpus = s["config"], s["training"], s["loss"], s["corpus"]
    files = {f.name: f.stat().st_size for f in sorted(directory.iterdir()) if f.is_file()}
    files_text = ", ".join(f"`{n}` ({b / 1e6:.1f} MB)" for n, b in files.items())
    lines = [
        "# dsv3-pystd: how this model was trained",
        "",
        "A small DeepSeek-V3 (every architectural feature on) trained from scratch on the Python standard "
        "library's source, on CPU. Reproduce it from the repository root with:",
        "",
        f"```\n{s['command']}\n```",
        "",
        f"(Python {s['python']}, torch {s['torch']}, {s['threads']} CPU threads. The corpus is the stdlib of the "
        "Python that runs the command, so another Python version gives a slightly different corpus; same "
        "versions and thread count reproduce the run.)",
        "",
        "## Corpus",
        "",
        f"The `.py` files under `{corpus['root']}` without `site-packages` and the test suites "
        f"(`test`, `tests`, `idle_test`), sorted by path; every {HELD_OUT_EVERY}th file is held out.",
        "",
        "| | files | bytes | tokens |",
        "|---|---:|---:|---:|",
        f"| train | {corpus['train_files']} | {corpus['train_bytes']:,} | {corpus['train_tokens']:,} |",
        f"| held out | {corpus['held_files']} | {corpus['held_bytes']:,} | {corpus['held_tokens']:,} |",
        "",
        f"Tokenizer: byte-level BPE, {s['vocab_size']} tokens (DeepSeek-V3's pre-tokenizer and special tokens, its "
        f"chat template), trained on the training files only: {corpus['train_bytes'] / corpus['train_tokens']:.2f} "
        "bytes per token. Each file's tokens are followed by `<｜end▁of▁sentence｜>`; no BOS is added.",
        "",
        "## Model",
        "",
        f"{s['parameters'] / 1e6:.2f}M parameters (the MTP module's own embedding and head included); "
        f"saved in bf16 (routers in fp32): {files_text}.",
        "",
        f"- hidden {c['hidden_size']}, {c['num_hidden_layers']} layers (first {c['first_k_dense_replace']} dense, "
        f"SwiGLU {c['intermediate_size']}), vocab {c['vocab_size']}, untied embeddings",
        f"- MLA: {c['num_attention_heads']} heads, q_lora_rank {c['q_lora_rank']}, kv_lora_rank {c['kv_lora_rank']},"
        f" qk_nope {c['qk_nope_head_dim']} + qk_rope {c['qk_rope_head_dim']}, v {c['v_head_dim']}",
        f"- RoPE θ={c['rope_theta']:g} with YaRN factor {c['rope_scaling']['factor']:g} over "
        f"{c['rope_scaling']['original_max_position_embeddings']} positions "
        f"(max_position_embeddings {c['max_position_embeddings']})",
        f"- DeepSeekMoE: {c['n_routed_experts']} routed experts (intermediate {c['moe_intermediate_size']}), top "
        f"{c['num_experts_per_tok']} within the best {c['topk_group']} of {c['n_group']} groups, sigmoid scores "
        f"with the aux-loss-free bias, {c['n_shared_experts']} shared expert, routed_scaling_factor "
        f"{c['routed_scaling_factor']}",
        f"- {c['num_nextn_predict_layers']} MTP module (`model.layers.{c['num_hidden_layers']}.*`; transformers "
        "ignores it, dsv3 uses it for `generate(..., use_mtp=True)`)",
        "",
        "## Training",
        "",
        f"{tr['steps']} AdamW steps of {tr['batch_size']} x {tr['seq_len']} tokens ({tr['tokens']:,} tokens, "
        f"{tr['epochs']:.2f} epochs) in {tr['seconds'] / 60:.1f} min ({tr['tokens_per_s']:.0f} tokens/s); "
        f"tokenizer training {tr['tokenizer_seconds']:.0f} s, whole command {s['total_seconds'] / 60:.1f} min. "
        "Loss: next token + 0.3·MTP + 1e-4·sequence balance; bias update speed 1e-3; peak learning rate, warmup "
        "and cosine decay as in the command's defaults (`--help`).",
        "",
        "Held-out loss during training (first 8 batches of held-out blocks, fp32 weights):",
        "",
        "| step | " + " | ".join(str(step) for step, _ in s["eval_curve"]) + " |",
        "|---|" + "---:|" * len(s["eval_curve"]),
        "| loss | " + " | ".join(f"{v:.3f}" for _, v in s["eval_curve"]) + " |",
        "",
        "## Results",
        "",
        f"Nats per token of the shipped (bf16) weights, every predicted token of the held-out files "
        f"({corpus['held_predicted_tokens']:,} tokens):",
        "",
        "| | nats/token | perplexity | bits/byte |",
        "|---|---:|---:|---:|",
    ]
    bpt = corpus["held_bytes"] / corpus["held_tokens"]
    for name, value in (("held-out loss", loss["held_out"]), ("unigram baseline (train frequencies)", loss["unigram"]),
                        ("train loss (as many training blocks)", loss["train"])):
        lines.append(f"| {name} | {value:.3f} | {math.exp(value):.1f} | {value / math.log(2) / bpt:.3f} |")
    lines += [
        "",
        "Greedy speculative decoding with the MTP module as drafter (`generate(..., use_mtp=True)`) against "
        f"plain greedy, on {s['speculative'][1]['prompts']} held-out prompts (code before a `def`), "
        f"{s['speculative'][1]['new_tokens']} new tokens each, no EOS stop:",
        "",
        "| batch | acceptance | main forwards plain | with MTP | forward speedup | identical output |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for b, r in s["speculative"].items():
        lines.append(f"| {b} | {r['acceptance_rate']:.3f} | {r['plain_forwards']} | {r['mtp_forwards']} | "
                     f"{r['forward_speedup']:.2f}x | {'yes' if r['identical'] else 'NO'} |")
    gc = s["generation_config"]
    lines += [
        "",
        "## Sample completions",
        "",
        f"Sampled with the shipped `generation_config.json` (temperature {gc['temperature']}, top_p {gc['top_p']}, "
        f"top_k {gc['top_k']}, {gc['max_new_tokens']} new tokens), seeds 0, 1, 2, ...; "
        "each block starts with the prompt.",
        "",
    ]
    for prompt, text in s["samples"]:
        lines += [f"Prompt `{prompt!r}`:", "", _fence(prompt + text), ""]
    lines += ["Greedy (48 new tokens):", ""]
    for prompt, text in s["greedy"]:
        lines += [f"Prompt `{prompt!r}`:", "", _fence(prompt + text), ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m recipes.pystd",
                                description="Train the shipped dsv3 model on the Python standard library")
    add_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    run(args, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
