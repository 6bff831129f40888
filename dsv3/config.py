"""DeepseekV3Config: the fields of a DeepSeek-V3 `config.json`, their defaults and derived values.

Field names are the keys of the published `config.json` (hub form). The transformers-5 spellings are
accepted on load and mapped here:

    hub form                      transformers-5 form
    rope_theta + rope_scaling     rope_parameters {"rope_type", "rope_theta", "factor", ...}
    num_nextn_predict_layers      num_mtp_layers

Unknown keys (moe_layer_freq, ep_size, auto_map, ...) are kept in `extra` and written back by `to_dict`,
so a config round-trips unchanged. `scoring_func` / `topk_method` are fields: dsv3 implements only
DeepSeek-V3's router (sigmoid scores, noaux_tc group-limited top-k), so other values are an error, and a
saved config.json always states them (converters such as llama.cpp's fall back to softmax without them).

RoPE scaling (`rope_scaling.type`), and the longest sequence each allows (`max_context_length`):

    default   max_position_embeddings
    linear    positions / factor (inv_freq / factor); factor × max_position_embeddings
    dynamic   NTK: past max_position_embeddings the base becomes θ·(f·L/L_max - (f-1))^(dr/(dr-2)),
              L = the longest position in the forward call + 1; factor × max_position_embeddings
    yarn      max_position_embeddings, which DeepSeek-V3 sets to factor × original_max_position_embeddings
              (163840 = 40 × 4096); a config that left it equal to the original length gets factor × original

Linear and dynamic leave max_position_embeddings at the trained length, as the transformers
documentation says. Derived values (qk_head_dim, the softmax scale with YaRN's mscale, the latent cache
width, the context limit) are properties, never stored twice.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_ACTIVATIONS = ("silu",)
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn")
SUPPORTED_SCORING_FUNCS = ("sigmoid",)
SUPPORTED_TOPK_METHODS = ("noaux_tc",)
# Other spellings from_dict accepts for a field (transformers-5 names); they are valid override names too.
ALIASES = {"num_mtp_layers": "num_nextn_predict_layers", "rope_parameters": "rope_scaling", "dtype": "torch_dtype"}


class ConfigError(ValueError):
    """A config value, or a combination of values, that the model cannot be built from."""


class UnknownArgumentError(ConfigError, TypeError):
    """A keyword argument that is neither a parameter of the call nor a config field (a TypeError, as Python
    raises for unexpected keywords, and a ConfigError, so callers that report config problems catch it)."""


def check_keyword_arguments(names: Iterable[str], config: DeepseekV3Config | None, caller: str,
                            parameters: Iterable[str] = ()) -> None:
    """Raise UnknownArgumentError for the first name that is neither one of `parameters` nor a config field
    to override (a dataclass field, an alias, or a key the loaded config.json already holds).

    The message names the argument, the closest accepted name and all of them."""
    params = list(parameters)
    fields = sorted(DeepseekV3Config.field_names() | set(ALIASES) | set(config.extra if config else ()))
    for name in names:
        if name in params or name in fields:
            continue
        close = difflib.get_close_matches(name, params + fields, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "."
        accepted = (f" It takes {', '.join(params)}; any other keyword overrides a config.json field: "
                    if params else " Fields that can be overridden: ")
        raise UnknownArgumentError(f"{caller} got an unexpected keyword argument {name!r}{hint}"
                                   f"{accepted}{', '.join(fields)}.")


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1·mscale·ln(scale) + 1 (1 when not extrapolating)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


@dataclass
class DeepseekV3Config:
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int | None = 128
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    n_group: int = 8
    topk_group: int = 4
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 3
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pretraining_tp: int = 1
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rope_interleave: bool = True
    attention_bias: bool = False
    attention_dropout: float = 0.0
    num_nextn_predict_layers: int = 1
    output_router_logits: bool = False
    quantization_config: dict[str, Any] | None = None
    torch_dtype: str | None = None
    model_type: str = "deepseek_v3"
    architectures: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.rope_scaling is not None:
            self.rope_scaling = _normalise_rope_scaling(self.rope_scaling)
        self.validate()

    # ----------------------------------------------------------------------------- derived values
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Values cached per token and layer: the latent c_kv plus the shared roped key (576 for V3)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def num_mtp_layers(self) -> int:
        return self.num_nextn_predict_layers

    @property
    def rope_type(self) -> str:
        return "default" if self.rope_scaling is None else self.rope_scaling["rope_type"]

    @property
    def max_context_length(self) -> int:
        """The most positions (cached + new tokens) the model accepts: see the RoPE table in the module
        docstring. Linear and dynamic scaling stretch max_position_embeddings (the trained length) by
        their factor; YaRN configs already state the stretched length in max_position_embeddings."""
        rs = self.rope_scaling
        if rs is None or rs["rope_type"] == "default":
            return self.max_position_embeddings
        factor = float(rs["factor"])
        if rs["rope_type"] == "yarn":
            # transformers' convention: factor = max_position_embeddings / original (it warns otherwise), except
            # that max_position_embeddings left at the original length means "not stated": then factor × original.
            original = int(rs["original_max_position_embeddings"])
            return int(factor * original) if self.max_position_embeddings == original else self.max_position_embeddings
        return int(factor * self.max_position_embeddings)

    @property
    def softmax_scale(self) -> float:
        """(dn+dr)^-0.5, times mscale² when YaRN is configured with mscale_all_dim."""
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs is not None and rs["rope_type"] == "yarn" and rs.get("mscale_all_dim"):
            m = yarn_get_mscale(rs["factor"], rs["mscale_all_dim"])
            scale = scale * m * m
        return scale

    @property
    def experts_per_group(self) -> int:
        return self.n_routed_experts // self.n_group

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    # ----------------------------------------------------------------------------- validation
    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                     "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "intermediate_size"):
            value = getattr(self, name)
            need(isinstance(value, int) and value > 0, f"{name}={value!r}: must be a positive integer")
        need(self.num_key_value_heads == self.num_attention_heads,
             f"num_key_value_heads={self.num_key_value_heads} != num_attention_heads={self.num_attention_heads}: "
             "MLA shares one latent across all heads, so the two must be equal (or omit num_key_value_heads)")
        need(self.qk_rope_head_dim % 2 == 0,
             f"qk_rope_head_dim={self.qk_rope_head_dim}: RoPE rotates pairs, so it must be even")
        need(self.q_lora_rank is None or self.q_lora_rank > 0,
             f"q_lora_rank={self.q_lora_rank}: must be a positive integer or null (no query compression)")
        need(self.hidden_act in SUPPORTED_ACTIVATIONS,
             f"hidden_act={self.hidden_act!r} is not supported; DeepSeek-V3 uses one of {SUPPORTED_ACTIVATIONS}")
        need(0 <= self.first_k_dense_replace <= self.num_hidden_layers,
             f"first_k_dense_replace={self.first_k_dense_replace}: must be in [0, num_hidden_layers="
             f"{self.num_hidden_layers}]")
        need(self.num_nextn_predict_layers >= 0,
             f"num_nextn_predict_layers={self.num_nextn_predict_layers}: must be >= 0")
        if self.first_k_dense_replace < self.num_hidden_layers or self.num_nextn_predict_layers > 0:
            self._validate_moe(need)
        if self.rope_scaling is not None:
            rt = self.rope_scaling["rope_type"]
            need(rt in SUPPORTED_ROPE_TYPES,
                 f"rope_scaling type {rt!r} is not supported; use one of {SUPPORTED_ROPE_TYPES} or null")
            if rt != "default":
                factor = self.rope_scaling.get("factor")
                need(isinstance(factor, (int, float)) and not isinstance(factor, bool) and factor >= 1.0,
                     f"rope_scaling.factor={factor!r}: {rt} scaling needs a number >= 1 (the context is "
                     "stretched by that factor)")
            if rt == "yarn":
                need("original_max_position_embeddings" in self.rope_scaling,
                     "rope_scaling of type yarn needs original_max_position_embeddings (4096 for DeepSeek-V3)")

    def _validate_moe(self, need: Any) -> None:
        e, g = self.n_routed_experts, self.n_group
        need(e > 0 and self.moe_intermediate_size > 0,
             f"n_routed_experts={e}, moe_intermediate_size={self.moe_intermediate_size}: must be positive")
        need(g > 0 and e % g == 0,
             f"n_routed_experts={e} is not divisible by n_group={g}: experts are split into equal groups")
        need(e // g >= 2, f"n_routed_experts/n_group={e // g}: a group's score sums its top-2 experts, "
             "so each group needs at least 2 experts (lower n_group)")
        need(1 <= self.topk_group <= g, f"topk_group={self.topk_group}: must be in [1, n_group={g}]")
        need(1 <= self.num_experts_per_tok <= self.topk_group * (e // g),
             f"num_experts_per_tok={self.num_experts_per_tok}: must be in [1, topk_group*experts_per_group="
             f"{self.topk_group * (e // g)}] (the experts of the kept groups)")
        need(self.n_shared_experts >= 0, f"n_shared_experts={self.n_shared_experts}: must be >= 0")
        need(self.scoring_func in SUPPORTED_SCORING_FUNCS,
             f"scoring_func={self.scoring_func!r} is not supported: dsv3 implements DeepSeek-V3's router, which "
             f"scores experts with {' / '.join(SUPPORTED_SCORING_FUNCS)} (softmax scoring is DeepSeek-V2's). Use a "
             "DeepSeek-V3-family checkpoint, or omit the key")
        need(self.topk_method in SUPPORTED_TOPK_METHODS,
             f"topk_method={self.topk_method!r} is not supported: dsv3 implements DeepSeek-V3's router, "
             f"{' / '.join(SUPPORTED_TOPK_METHODS)} (group-limited top-k on the scores plus e_score_correction_bias)."
             " Use a DeepSeek-V3-family checkpoint, or omit the key")

    # ----------------------------------------------------------------------------- (de)serialisation
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeepseekV3Config:
        data = copy.deepcopy(data)
        mt = data.get("model_type", "deepseek_v3")
        if mt != "deepseek_v3":
            raise ConfigError(f"model_type={mt!r}: dsv3 loads deepseek_v3 checkpoints only")
        if "num_mtp_layers" in data:
            mtp = data.pop("num_mtp_layers")
            if "num_nextn_predict_layers" in data and data["num_nextn_predict_layers"] != mtp:
                raise ConfigError(f"num_mtp_layers={mtp} and num_nextn_predict_layers="
                                  f"{data['num_nextn_predict_layers']} disagree: keep one of them")
            data["num_nextn_predict_layers"] = mtp
        for derived in ("head_dim", "qk_head_dim"):   # transformers writes these; here they are properties
            data.pop(derived, None)
        if "dtype" in data:                           # transformers-5 spelling of torch_dtype
            data.setdefault("torch_dtype", data.pop("dtype"))
        rope_params = data.pop("rope_parameters", None)
        if rope_params is not None:
            if data.get("rope_scaling") not in (None, {}):
                raise ConfigError("config has both rope_parameters and rope_scaling: keep one of them")
            rope_params = dict(rope_params)
            if "rope_theta" in rope_params:
                data["rope_theta"] = rope_params.pop("rope_theta")
            rtype = rope_params.get("rope_type", rope_params.get("type", "default"))
            data["rope_scaling"] = None if rtype == "default" else rope_params
        elif data.get("rope_scaling") == {}:
            data["rope_scaling"] = None
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        extra.update(known.pop("extra", None) or {})
        return cls(**known, extra=extra)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> DeepseekV3Config:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file; a checkpoint directory needs config.json") from None
        except IsADirectoryError:
            raise ConfigError(f"{path} is a directory; expected the config.json file (or its directory)") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e}); re-download or fix the file") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: holds a JSON {type(data).__name__}, expected an object of config fields "
                              '({"model_type": "deepseek_v3", ...})')
        return cls.from_dict(data)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> DeepseekV3Config:
        """config.json of a directory (or a JSON file); keyword arguments override its fields."""
        path = Path(path)
        cfg = cls.from_json_file(path / "config.json" if path.is_dir() else path)
        check_keyword_arguments(overrides, cfg, "DeepseekV3Config.from_pretrained()")
        return cfg.replace(**overrides) if overrides else cfg

    @classmethod
    def field_names(cls) -> set[str]:
        """The config.json keys this class has fields for (what `replace` and overrides may set)."""
        return {f.name for f in dataclasses.fields(cls)} - {"extra"}

    def replace(self, **changes: Any) -> DeepseekV3Config:
        """A copy with some fields changed (validated again). Takes field names, their transformers-5
        aliases and keys the config already holds in `extra`; anything else is an UnknownArgumentError."""
        check_keyword_arguments(changes, self, "DeepseekV3Config.replace()")
        data = self.to_dict()
        for alias, name in ALIASES.items():
            if alias in changes:              # the alias given now wins over the stored spelling
                data.pop(name, None)
        data.update(changes)
        return DeepseekV3Config.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "extra"}
        out.update(copy.deepcopy(self.extra))
        if out["rope_scaling"] is not None:
            # Write both spellings of the type: older readers look for "type", newer for "rope_type".
            out["rope_scaling"]["type"] = out["rope_scaling"]["rope_type"]
        if out["architectures"] is None:
            out["architectures"] = ["DeepseekV3ForCausalLM"]
        for key in ("quantization_config", "torch_dtype"):
            if out[key] is None:
                del out[key]
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        from dsv3.checkpoint.atomic import atomic_write_text

        Path(directory).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(directory) / "config.json", self.to_json_string())

    # ----------------------------------------------------------------------------- presets
    @classmethod
    def tiny(cls, **overrides: Any) -> DeepseekV3Config:
        """A debug-sized model with every feature on (q_lora, YaRN, groups, bias routing, MTP)."""
        base: dict[str, Any] = dict(
            vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
            n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1,
            kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=24,
            max_position_embeddings=2048, num_nextn_predict_layers=1,
            rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512,
                          "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        )
        base.update(overrides)
        return cls.from_dict(base)


def _normalise_rope_scaling(rs: dict[str, Any]) -> dict[str, Any]:
    """One spelling for the rope dict: `rope_type` (hub configs say `type`), numbers as floats."""
    rs = dict(rs)
    rtype = rs.pop("rope_type", None) or rs.pop("type", None) or "default"
    rs.pop("type", None)
    rs["rope_type"] = rtype
    return rs
