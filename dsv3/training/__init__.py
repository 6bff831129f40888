"""Training DeepSeek-V3: next-token + MTP losses, aux-loss-free load balancing, a resumable loop."""

from dsv3.training.balance import ExpertLoadBalancer, expert_counts, load_imbalance, moe_routers, update_router_bias
from dsv3.training.data import ByteTokenizer, TokenBlocks, load_text_dataset, split_blocks, tokenize_files
from dsv3.training.losses import TrainingLosses, mtp_losses, sequence_balance_loss, training_losses
from dsv3.training.trainer import Trainer, TrainingArguments, add_train_arguments, run_train, train

__all__ = [
    "ByteTokenizer", "ExpertLoadBalancer", "TokenBlocks", "Trainer", "TrainingArguments", "TrainingLosses",
    "add_train_arguments", "expert_counts", "load_imbalance", "load_text_dataset", "moe_routers", "mtp_losses",
    "run_train", "sequence_balance_loss", "split_blocks", "tokenize_files", "train", "training_losses",
    "update_router_bias",
]
