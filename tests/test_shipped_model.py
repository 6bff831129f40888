"""The model that ships with dsv3 (dsv3/assets/dsv3-pystd): complete, loadable by transformers, honest about
its held-out loss, and exact under speculative decoding. The directory is committed, so a missing model is a
failure, not a skip."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from dsv3 import DeepseekV3ForCausalLM
from dsv3.cli import SHIPPED_MODEL, main
from dsv3.generation.generate import generate
from dsv3.tokenizer import AutoTokenizer
from recipes import pystd
from tests.oracle import assert_close

CODE = '''import os


def walk(top):
    """Yield every file below top."""
    for root, dirs, files in os.walk(top):
        for name in sorted(files):
            yield os.path.join(root, name)
'''


@pytest.fixture(scope="module")
def model() -> DeepseekV3ForCausalLM:
    return DeepseekV3ForCausalLM.from_pretrained(SHIPPED_MODEL, torch_dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer():  # noqa: ANN201
    return AutoTokenizer.from_pretrained(SHIPPED_MODEL)


def test_shipped_directory_is_complete_with_every_feature_on() -> None:
    names = {p.name for p in SHIPPED_MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "TRAINING.md"} <= names
    cfg = json.loads((SHIPPED_MODEL / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v3"
    assert cfg["q_lora_rank"] and cfg["rope_scaling"]["type"] == "yarn"
    assert cfg["n_group"] > 1 and cfg["topk_group"] < cfg["n_group"] and cfg["n_shared_experts"] >= 1
    assert cfg["first_k_dense_replace"] == 1 < cfg["num_hidden_layers"] and cfg["num_nextn_predict_layers"] == 1
    size = sum(p.stat().st_size for p in SHIPPED_MODEL.iterdir())
    assert size < 100e6, f"{size / 1e6:.1f} MB is too large to commit"
    mtp = f"model.layers.{cfg['num_hidden_layers']}."
    with safe_open(SHIPPED_MODEL / "model.safetensors", "pt") as f:
        keys = list(f.keys())
        dtypes = {f.get_slice(k).get_dtype() for k in keys if not k.endswith(("gate.weight",
                                                                               "e_score_correction_bias"))}
    assert dtypes == {"BF16"}
    for part in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.head.weight", "mlp.gate.weight"):
        assert any(k.startswith(mtp) and k.endswith(part) for k in keys), part


def test_transformers_loads_the_shipped_model_with_matching_logits(model, tokenizer) -> None:  # noqa: ANN001
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(SHIPPED_MODEL, dtype=torch.float32).eval()
    ids = tokenizer(CODE, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours = model(ids).logits
        theirs = hf(input_ids=ids).logits
    assert_close(ours, theirs, 1e-4, "shipped model: transformers logits")


def test_shipped_tokenizer_matches_transformers(tokenizer) -> None:  # noqa: ANN001
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast.from_pretrained(SHIPPED_MODEL)
    assert tokenizer.encode(CODE) == hf.encode(CODE)
    assert tokenizer.decode(tokenizer.encode(CODE), skip_special_tokens=True) == CODE
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "A loop?"},
                {"role": "assistant", "content": "<think>easy</think>for i in range(3): pass"},
                {"role": "user", "content": "Thanks"}]
    ours = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "<｜Assistant｜>" in ours and "easy" not in ours


def test_held_out_loss_beats_the_unigram_baseline(model) -> None:  # noqa: ANN001
    """Files the recipe held out (every 20th stdlib file), scored by the shipped model and by the unigram
    distribution of the training files, on the same predicted tokens."""
    train_files, held_files = pystd.split_files(pystd.stdlib_files())
    corpus = pystd.build_corpus(SHIPPED_MODEL / "tokenizer.json", train_files, held_files)
    blocks = pystd.cut_blocks(corpus.held_stream, 256)[:48]
    loss = pystd.token_cross_entropy(model, blocks)
    unigram = pystd.unigram_cross_entropy(corpus.train_stream, blocks[:, 1:], model.config.vocab_size)
    assert loss < unigram - 2.0, f"held-out {loss:.3f} nats/token vs unigram {unigram:.3f}"


@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_speculative_equals_plain_greedy(model, tokenizer, batch: int) -> None:  # noqa: ANN001
    prompts = ["def ", "import os\n\n\ndef main(", "class Config:\n    def __init__(self", '"""Utilities']
    report = pystd.measure_speculative(model, tokenizer, prompts[:batch] if batch == 1 else prompts, batch,
                                       max_new_tokens=24)
    assert report.identical
    assert report.drafts > 0 and report.mtp_forwards < report.plain_forwards


def test_readme_main_command_prints_a_completion(capsys: pytest.CaptureFixture) -> None:
    assert main(["generate", "def ", "--max-new-tokens", "24", "--seed", "0"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("def ") and len(out.strip()) > len("def")
    assert "tokens/s" in err


def test_shipped_model_completes_python(model, tokenizer) -> None:  # noqa: ANN001
    """Greedy completions look like the corpus: the continuation of a method header is indented Python."""
    ids = tokenizer("class Stack:\n    def __init__(self):\n", return_tensors="pt")["input_ids"]
    out = generate(model, ids, max_new_tokens=24, do_sample=False)
    text = tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
    assert text.startswith("        "), repr(text)
