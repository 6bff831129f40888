"""DeepseekV3Config: defaults, both config.json spellings, derived values and validation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dsv3 import AutoConfig, ConfigError, DeepseekV3Config

HUB = Path(__file__).resolve().parent / "data" / "deepseek-v3-hub.json"


def hub_dict() -> dict:
    return json.loads(HUB.read_text())


def test_defaults_are_the_documented_ones() -> None:
    c = DeepseekV3Config()
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (129280, 7168, 61, 128)
    assert (c.n_routed_experts, c.n_shared_experts, c.num_experts_per_tok, c.n_group, c.topk_group) == (
        256, 1, 8, 8, 4)
    assert (c.kv_lora_rank, c.q_lora_rank, c.qk_rope_head_dim, c.qk_nope_head_dim, c.v_head_dim) == (
        512, 1536, 64, 128, 128)
    assert c.routed_scaling_factor == 2.5 and c.first_k_dense_replace == 3 and c.rope_interleave is True
    assert c.intermediate_size == 18432 and c.moe_intermediate_size == 2048 and c.max_position_embeddings == 4096
    assert c.num_key_value_heads == 128 and c.hidden_act == "silu" and c.rms_norm_eps == 1e-6
    assert c.num_mtp_layers == 1


def test_published_v3_config_and_derived_values(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(HUB.read_text())
    c = AutoConfig.from_pretrained(tmp_path)
    assert c.qk_head_dim == 192 and c.kv_cache_dim == 576
    assert c.rope_type == "yarn" and c.rope_scaling["factor"] == 40
    mscale = 0.1 * 1.0 * math.log(40) + 1
    assert c.softmax_scale == pytest.approx(192**-0.5 * mscale**2, rel=1e-12)
    assert c.softmax_scale == pytest.approx(0.1352338, abs=1e-7)
    assert c.topk_method == "noaux_tc" and c.scoring_func == "sigmoid"
    assert c.max_context_length == 163840 == c.max_position_embeddings
    assert c.quantization_config["weight_block_size"] == [128, 128]
    assert [c.is_moe_layer(i) for i in (0, 2, 3, 60)] == [False, False, True, True]
    again = DeepseekV3Config.from_dict(c.to_dict())
    assert again == c
    assert again.to_dict()["topk_method"] == "noaux_tc"


def test_transformers5_spelling_is_equivalent() -> None:
    hub = hub_dict()
    t5 = dict(hub)
    rs = dict(t5.pop("rope_scaling"))
    rs["rope_type"] = rs.pop("type")
    t5["rope_parameters"] = {**rs, "rope_theta": t5.pop("rope_theta")}
    t5["num_mtp_layers"] = t5.pop("num_nextn_predict_layers")
    a, b = DeepseekV3Config.from_dict(hub), DeepseekV3Config.from_dict(t5)
    assert a.rope_scaling == b.rope_scaling and a.rope_theta == b.rope_theta
    assert a.num_mtp_layers == b.num_mtp_layers == 1 and a.softmax_scale == b.softmax_scale
    default = DeepseekV3Config.from_dict({"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})
    assert default.rope_scaling is None and default.rope_theta == 5e5


@pytest.mark.parametrize("changes, message", [
    (dict(n_routed_experts=10, n_group=4), "not divisible by n_group"),
    (dict(topk_group=9), "topk_group"),
    (dict(num_key_value_heads=8), "num_key_value_heads"),
    (dict(qk_rope_head_dim=63), "must be even"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(num_experts_per_tok=200), "num_experts_per_tok"),
    (dict(first_k_dense_replace=99), "first_k_dense_replace"),
    (dict(n_routed_experts=8, n_group=8), "at least 2 experts"),
    (dict(rope_scaling={"type": "longrope", "factor": 2.0}), "not supported"),
    (dict(rope_scaling={"type": "linear", "factor": 0.5}), "factor=0.5"),
    (dict(rope_scaling={"type": "dynamic"}), "factor=None"),
    (dict(scoring_func="softmax"), "scoring_func='softmax' is not supported.*sigmoid"),
    (dict(topk_method="group_limited_greedy"), "topk_method='group_limited_greedy' is not supported.*noaux_tc"),
    (dict(topk_method="greedy"), "topk_method='greedy'"),
    (dict(rope_scaling={"type": "yarn", "factor": 4.0}), "original_max_position_embeddings"),
    (dict(model_type="llama"), "deepseek_v3"),
    (dict(num_mtp_layers=2, num_nextn_predict_layers=1), "disagree"),
])
def test_impossible_combinations_raise(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DeepseekV3Config.from_dict({**hub_dict(), **changes})


def test_bad_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        DeepseekV3Config.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        DeepseekV3Config.from_pretrained(tmp_path)


def test_save_round_trip_is_atomic_and_transformers_reads_it(tmp_path: Path) -> None:
    from transformers import DeepseekV3Config as HFConfig

    c = DeepseekV3Config.from_dict(hub_dict())
    c.save_pretrained(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]   # no temporary left behind
    hf = HFConfig.from_pretrained(tmp_path)
    assert hf.rope_parameters["rope_type"] == "yarn" and hf.rope_parameters["factor"] == 40
    assert hf.num_mtp_layers == 1 and hf.q_lora_rank == 1536
    assert DeepseekV3Config.from_pretrained(tmp_path) == c


def test_router_keys_are_fields_written_on_save(tmp_path: Path) -> None:
    """scoring_func / topk_method: absent keys mean DeepSeek-V3's router, and every save states them."""
    hub = hub_dict()
    bare = {k: v for k, v in hub.items() if k not in ("scoring_func", "topk_method")}
    c = DeepseekV3Config.from_dict(bare)
    assert (c.scoring_func, c.topk_method) == ("sigmoid", "noaux_tc")
    c.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["scoring_func"] == hub["scoring_func"] == "sigmoid"
    assert written["topk_method"] == hub["topk_method"] == "noaux_tc"
    assert DeepseekV3Config.tiny().to_dict()["scoring_func"] == "sigmoid"


@pytest.mark.parametrize("rope, context", [
    (None, 4096),
    ({"type": "linear", "factor": 2.0}, 8192),
    ({"type": "dynamic", "factor": 4}, 16384),
    ({"rope_type": "dynamic", "factor": 1.5}, 6144),
    # YaRN: max_position_embeddings already states the stretched length (V3: 40 × 4096 = 163840) ...
    ({"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 2048}, 4096),
    ({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}, 4096),   # as stated
    # ... unless the config left it at the original length, as transformers allows.
    ({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}, 16384),
])
def test_max_context_length_follows_rope_scaling(rope: dict | None, context: int) -> None:
    c = DeepseekV3Config.from_dict({**hub_dict(), "max_position_embeddings": 4096, "rope_scaling": rope})
    assert c.max_context_length == context
    assert c.max_position_embeddings == 4096            # linear/dynamic leave the trained length as it is
    if c.rope_type != "yarn":
        assert c.softmax_scale == 192**-0.5             # no mscale outside YaRN
    assert DeepseekV3Config.from_dict(c.to_dict()) == c  # round-trips, "type" spelling included


def test_transformers_reads_linear_and_dynamic_as_saved(tmp_path: Path) -> None:
    from transformers import DeepseekV3Config as HFConfig

    for rtype in ("linear", "dynamic"):
        c = DeepseekV3Config.tiny(rope_scaling={"type": rtype, "factor": 2.0})
        c.save_pretrained(tmp_path)
        hf = HFConfig.from_pretrained(tmp_path)
        assert hf.rope_parameters["rope_type"] == rtype and hf.rope_parameters["factor"] == 2.0
        assert hf.max_position_embeddings == c.max_position_embeddings


@pytest.mark.parametrize("typo, suggestion", [("torch_dtpye", "torch_dtype"), ("hiden_size", "hidden_size"),
                                               ("rope_scalling", "rope_scaling")])
def test_unknown_override_is_rejected_with_the_closest_name(tmp_path: Path, typo: str, suggestion: str) -> None:
    from dsv3.config import UnknownArgumentError

    (tmp_path / "config.json").write_text(HUB.read_text())
    for load in (AutoConfig.from_pretrained, DeepseekV3Config.from_pretrained):
        with pytest.raises(UnknownArgumentError, match=f"'{typo}'; did you mean '{suggestion}'") as err:
            load(tmp_path, **{typo: 1})
        assert isinstance(err.value, TypeError) and isinstance(err.value, ConfigError)
        assert "vocab_size" in str(err.value) and "moe_layer_freq" in str(err.value)   # lists what it accepts
    with pytest.raises(UnknownArgumentError, match="'quantization'"):
        DeepseekV3Config.from_pretrained(tmp_path, quantization="int8")
    with pytest.raises(UnknownArgumentError, match="replace"):
        DeepseekV3Config.tiny().replace(num_layers=2)


def test_known_overrides_keep_transformers_semantics(tmp_path: Path) -> None:
    """Overrides of fields, of their transformers-5 aliases and of keys config.json holds still apply."""
    (tmp_path / "config.json").write_text(HUB.read_text())
    c = AutoConfig.from_pretrained(tmp_path, num_hidden_layers=4, moe_layer_freq=2, num_mtp_layers=0,
                                   rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5})
    assert c.num_hidden_layers == 4 and c.extra["moe_layer_freq"] == 2 and c.num_nextn_predict_layers == 0
    assert c.rope_type == "linear" and c.rope_theta == 5e5 and c.max_context_length == 2 * c.max_position_embeddings
    assert DeepseekV3Config.tiny().replace(dtype="bfloat16").torch_dtype == "bfloat16"


@pytest.mark.parametrize("content", ["[1, 2]", '"deepseek_v3"', "3", "null"])
def test_config_and_generation_config_must_be_json_objects(tmp_path, content: str) -> None:
    from dsv3.generation.generate import GenerationConfig

    (tmp_path / "config.json").write_text(content)
    with pytest.raises(ConfigError, match="expected an object"):
        DeepseekV3Config.from_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(content)
    with pytest.raises(ValueError, match="expected an object"):
        GenerationConfig.from_pretrained(tmp_path)


def test_config_or_generation_config_that_is_a_directory_is_named(tmp_path) -> None:
    from dsv3.generation.generate import GenerationConfig

    (tmp_path / "config.json").mkdir()
    (tmp_path / "generation_config.json").mkdir()
    with pytest.raises(ConfigError, match="is a directory"):
        DeepseekV3Config.from_json_file(tmp_path / "config.json")
    with pytest.raises(ValueError, match="is a directory"):
        GenerationConfig.from_pretrained(tmp_path)
