"""from_pretrained keyword arguments: unknown ones are errors (as in transformers), config fields override;
what save_pretrained writes for the router."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from dsv3 import AutoModelForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM, DeepseekV3Model
from dsv3.config import UnknownArgumentError


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    DeepseekV3ForCausalLM(DeepseekV3Config.tiny(num_hidden_layers=2)).save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["moe_layer_freq"] = 1          # a key of the published config.json that dsv3 keeps in `extra`
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("load", [DeepseekV3ForCausalLM.from_pretrained, AutoModelForCausalLM.from_pretrained,
                                  DeepseekV3Model.from_pretrained])
@pytest.mark.parametrize("kwargs, closest", [
    (dict(torch_dtpye="float32"), "torch_dtype"),
    (dict(quantisation="int8"), "quantization"),
    (dict(device="cpu"), "device_map"),
    (dict(load_mpt=False), "load_mtp"),
])
def test_unknown_keyword_is_an_error_naming_the_closest(checkpoint: Path, load, kwargs: dict, closest: str) -> None:
    (name,) = kwargs
    with pytest.raises(UnknownArgumentError, match=f"unexpected keyword argument '{name}'; did you mean "
                                                   f"'{closest}'") as err:
        load(checkpoint, **kwargs)
    message = str(err.value)
    for accepted in ("torch_dtype", "device_map", "fp8", "load_mtp", "strict", "progress", "trust_remote_code",
                     "hidden_size", "moe_layer_freq"):
        assert accepted in message
    assert isinstance(err.value, TypeError)       # what Python and transformers raise for unexpected keywords


def test_config_fields_still_override(checkpoint: Path) -> None:
    model = DeepseekV3ForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32, rms_norm_eps=1e-3,
                                                  moe_layer_freq=2, num_mtp_layers=0)
    assert model.config.rms_norm_eps == 1e-3 and model.model.norm.eps == 1e-3
    assert model.config.extra["moe_layer_freq"] == 2 and model.mtp is None
    given = DeepseekV3Config.from_pretrained(checkpoint)
    model = DeepseekV3ForCausalLM.from_pretrained(checkpoint, config=given, torch_dtype="float32", rms_norm_eps=1e-4)
    assert model.config.rms_norm_eps == 1e-4
    with pytest.raises(UnknownArgumentError, match="'rms_norm_epsilon'; did you mean 'rms_norm_eps'"):
        DeepseekV3ForCausalLM.from_pretrained(checkpoint, config=given, rms_norm_epsilon=1e-4)


def test_transformers_no_op_arguments_are_accepted_and_logged(checkpoint: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="dsv3.checkpoint.loader"):
        model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True, low_cpu_mem_usage=True,
                                                     torch_dtype=torch.float32)
    assert "trust_remote_code" not in model.config.extra and "low_cpu_mem_usage" not in model.config.extra
    assert "trust_remote_code=True) has no effect" in caplog.text


def test_model_save_states_the_router(checkpoint: Path) -> None:
    """save_pretrained writes scoring_func / topk_method as the published config.json does (converters such as
    llama.cpp's route with softmax when they are missing)."""
    written = json.loads((checkpoint / "config.json").read_text())
    assert (written["scoring_func"], written["topk_method"]) == ("sigmoid", "noaux_tc")
